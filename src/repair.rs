//! Repairs: rebuilding the index from the packs, and rewriting snapshots so
//! that what survives of them stays restorable.

use std::collections::HashMap;

use serde::Serialize;

use crate::backend::{FileType, ObjectKey};
use crate::id::{BlobId, BlobKind, IndexId, PackId, SnapshotId};
use crate::index::{IndexSegment, PackEntries};
use crate::lock::{LockError, LockKind, LockOptions};
use crate::pack::{self, FRAME_HEADER_LEN, TRAILER_LEN};
use crate::packer::{Packer, PACKS_PER_SEGMENT};
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind, Tree};

/// Why a repair failed.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("building a tree: {0}")]
    Tree(#[from] crate::tree::TreeError),
}

impl From<crate::backend::BackendError> for RepairError {
    fn from(e: crate::backend::BackendError) -> Self {
        RepairError::Repo(e.into())
    }
}

/// Reads a pack's own blob table with two ranged reads (trailer, table).
pub fn read_pack_table(repo: &Repository, pack: &PackId, size: u64) -> Result<PackEntries, RepoError> {
    let key = ObjectKey::Pack(*pack);
    let damaged = |source| RepoError::Pack { pack: pack.to_hex(), source };
    if size < (pack::HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(damaged(pack::PackError::Format("shorter than header and trailer")));
    }
    let trailer = repo.backend().get_range(&key, size - TRAILER_LEN as u64, TRAILER_LEN as u64)?;
    let (table_len, crc) = pack::parse_trailer(&trailer, size).map_err(damaged)?;
    let start = size - TRAILER_LEN as u64 - u64::from(table_len);
    let sealed = repo.backend().get_range(&key, start, u64::from(table_len))?;
    let table = pack::decode_table(repo.master_key(), &sealed, crc, size).map_err(damaged)?;
    Ok(PackEntries { pack: *pack, kind: table.kind, blobs: table.blobs })
}

/// What `repair index` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairIndexReport {
    pub packs: u64,
    pub blobs: u64,
    /// Packs whose table could not be read, with why (left in place, not indexed).
    pub unreadable_packs: Vec<(PackId, String)>,
    pub segments_written: u64,
    pub segments_deleted: u64,
}

/// Rebuilds the index from the blob tables of every pack: writes the new
/// segments (durable), then deletes the old ones. Exclusive lock, like prune.
pub fn repair_index(repo: &Repository, lock: LockOptions) -> Result<RepairIndexReport, RepairError> {
    let guard = repo.lock(LockKind::Exclusive, lock)?;
    let old: Vec<IndexId> = crate::backend::index_ids(repo.backend().as_ref())?;
    let mut report = RepairIndexReport::default();
    let mut entries = Vec::new();
    for (key, size) in repo.backend().list(FileType::Pack)? {
        let ObjectKey::Pack(pack) = key else { continue };
        match read_pack_table(repo, &pack, size) {
            Ok(e) => {
                report.blobs += e.blobs.len() as u64;
                entries.push(e);
            }
            Err(RepoError::Backend(e)) if !e.is_not_found() => return Err(RepoError::Backend(e).into()),
            Err(e) => report.unreadable_packs.push((pack, e.to_string())),
        }
    }
    report.packs = entries.len() as u64;
    for chunk in entries.chunks(PACKS_PER_SEGMENT) {
        repo.save_index_segment(&IndexSegment { packs: chunk.to_vec() })?;
        report.segments_written += 1;
    }
    guard.check()?;
    for id in old {
        repo.backend().remove(&ObjectKey::Index(id))?;
        report.segments_deleted += 1;
    }
    repo.reload_index()?;
    Ok(report)
}

/// A snapshot `repair snapshots` rewrote.
#[derive(Clone, Debug, Serialize)]
pub struct RepairedSnapshot {
    /// The damaged snapshot.
    pub old: SnapshotId,
    /// Its repaired copy; `None` when the manifest itself cannot be read
    /// (nothing of it can be saved) or in a dry run.
    pub new: Option<SnapshotId>,
    /// Why the manifest cannot be read, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// Paths dropped because data they need is missing or damaged.
    pub dropped: Vec<String>,
    /// Whether the old snapshot was removed.
    pub forgotten: bool,
}

/// Blob availability, decided once per blob: indexed, in an existing pack,
/// and (when reading data) its bytes verified.
struct Available<'r> {
    repo: &'r Repository,
    pack_sizes: HashMap<PackId, u64>,
    read_data: bool,
    known: HashMap<BlobId, bool>,
}

impl Available<'_> {
    fn blob(&mut self, id: &BlobId) -> bool {
        if let Some(&ok) = self.known.get(id) {
            return ok;
        }
        let ok = match self.repo.index().get(id) {
            None => false,
            Some(loc) => {
                let end = u64::from(loc.offset) + (FRAME_HEADER_LEN as u64) + u64::from(loc.stored_len);
                let in_pack = self.pack_sizes.get(&loc.pack).is_some_and(|&size| end <= size);
                in_pack && (!self.read_data || self.repo.read_blob(id).is_ok())
            }
        };
        self.known.insert(*id, ok);
        ok
    }
}

/// Writes, for every snapshot with missing or damaged data, a new snapshot
/// without the files (and unreadable directories) that need it, tagged
/// `repaired`. The old snapshot is removed only with `forget`. With
/// `read_data`, every chunk is read and verified; otherwise a chunk counts
/// as present when the index places it inside an existing pack.
pub fn repair_snapshots(
    repo: &Repository,
    read_data: bool,
    forget: bool,
    dry_run: bool,
    lock: LockOptions,
) -> Result<Vec<RepairedSnapshot>, RepairError> {
    let guard = repo.lock(LockKind::Shared, lock)?;
    repo.reload_index_if_replaced()?;
    let pack_sizes = crate::backend::pack_sizes(repo.backend().as_ref())?;
    let mut avail = Available { repo, pack_sizes, read_data, known: HashMap::new() };
    let packer = Packer::new(repo, 1);
    let mut plans = Vec::new();
    let (snapshots, unreadable) = repo.list_snapshots_and_unreadable()?;
    for (id, snap) in snapshots {
        let mut dropped = Vec::new();
        let tree = if avail.blob(&snap.tree) && repo.load_tree(&snap.tree).is_ok() {
            rewrite_tree(&packer, &mut avail, &snap.tree, "", &mut dropped)?
        } else {
            // Nothing of it can be reached: keep an empty snapshot as the record.
            dropped.push("/".into());
            packer.save(BlobKind::Tree, &Tree::new(Vec::new())?.encode())?.0
        };
        if !dropped.is_empty() {
            plans.push((id, snap, tree, dropped));
        }
    }
    let unreadable = unreadable.into_iter().map(|(old, why)| RepairedSnapshot {
        old,
        new: None,
        unreadable: Some(why),
        dropped: vec!["/".into()],
        forgotten: forget && !dry_run,
    });
    if dry_run {
        return Ok(plans
            .into_iter()
            .map(|(old, _, _, dropped)| RepairedSnapshot {
                old,
                new: None,
                unreadable: None,
                dropped,
                forgotten: false,
            })
            .chain(unreadable)
            .collect());
    }
    packer.finish()?;
    guard.check()?;
    let mut out = Vec::new();
    // A manifest that cannot be read names no data: with `forget` it goes.
    for r in unreadable {
        if forget {
            repo.backend().remove(&ObjectKey::Snapshot(r.old))?;
        }
        out.push(r);
    }
    for (old, snap, tree, dropped) in plans {
        let mut tags = snap.tags.clone();
        if !tags.iter().any(|t| t == "repaired") {
            tags.push("repaired".into());
        }
        let new = repo.save_snapshot(&Snapshot { tree, tags, parent: Some(old), ..snap })?;
        if forget {
            repo.backend().remove(&ObjectKey::Snapshot(old))?;
        }
        out.push(RepairedSnapshot { old, new: Some(new), unreadable: None, dropped, forgotten: forget });
    }
    Ok(out)
}

/// Rebuilds a tree without what cannot be restored; returns its (possibly
/// unchanged) id. New trees go through the packer (deduplicated).
fn rewrite_tree(
    packer: &Packer<'_>,
    avail: &mut Available<'_>,
    id: &BlobId,
    path: &str,
    dropped: &mut Vec<String>,
) -> Result<BlobId, RepairError> {
    let tree = avail.repo.load_tree(id)?;
    let before = dropped.len();
    let mut nodes: Vec<Node> = Vec::with_capacity(tree.nodes().len());
    for node in tree.nodes() {
        let child = format!("{path}/{}", node.name_lossy());
        match &node.kind {
            NodeKind::Dir { subtree } => {
                let ok = avail.blob(subtree) && avail.repo.load_tree(subtree).is_ok();
                if !ok {
                    dropped.push(format!("{child}/"));
                    continue;
                }
                let new = rewrite_tree(packer, avail, subtree, &child, dropped)?;
                nodes.push(Node { kind: NodeKind::Dir { subtree: new }, ..node.clone() });
            }
            NodeKind::File { chunks } => {
                if chunks.iter().all(|c| avail.blob(c)) {
                    nodes.push(node.clone());
                } else {
                    dropped.push(child);
                }
            }
            NodeKind::Symlink { .. } | NodeKind::Special { .. } => nodes.push(node.clone()),
        }
    }
    if dropped.len() == before {
        return Ok(*id);
    }
    Ok(packer.save(BlobKind::Tree, &Tree::new(nodes)?.encode())?.0)
}
