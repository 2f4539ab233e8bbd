//! Repairs: rebuilding the index from the packs, and rewriting snapshots so
//! that what survives of them stays restorable.

use std::collections::HashMap;

use serde::Serialize;

use crate::id::{BlobId, BlobKind, IndexId, PackId, SnapshotId};
use crate::index::IndexSegment;
use crate::lock::{LockError, LockKind, LockOptions};
use crate::packer::PACKS_PER_SEGMENT;
use crate::repo::{RepoError, Repository, WriteError, WriteSession};
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind, Tree};

/// Why a repair failed.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// Storage failed, or a write through the session did. Old segments
    /// and snapshots are removed only after their replacements are durable,
    /// so a failure leaves at most duplicates.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The lock (exclusive for `repair index`, shared for `repair
    /// snapshots`) could not be taken in time, or lapsed before the commit.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A rewritten directory could not be made into a tree (it cannot
    /// happen for trees that decoded; kept for safety).
    #[error("building a tree: {0}")]
    Tree(#[from] crate::tree::TreeError),
}

impl From<WriteError> for RepairError {
    fn from(e: WriteError) -> Self {
        e.split()
    }
}

impl From<crate::backend::BackendError> for RepairError {
    fn from(e: crate::backend::BackendError) -> Self {
        RepairError::Repo(e.into())
    }
}

/// What `repair index` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairIndexReport {
    /// Packs whose blob table was read and indexed.
    pub packs: u64,
    /// Index entries written: the blobs of those packs.
    pub blobs: u64,
    /// Packs whose table could not be read, with why (left in place, not indexed).
    pub unreadable_packs: Vec<(PackId, String)>,
    /// New index segments written.
    pub segments_written: u64,
    /// Old index segments deleted (after the new ones were durable).
    pub segments_deleted: u64,
}

/// Rebuilds the index from the blob tables of every pack: writes the new
/// segments (durable), then deletes the old ones. Exclusive lock, like prune.
pub fn repair_index(repo: &Repository, lock: LockOptions) -> Result<RepairIndexReport, RepairError> {
    let guard = repo.lock(LockKind::Exclusive, lock)?;
    let old: Vec<IndexId> = repo.index_segment_ids()?;
    let mut report = RepairIndexReport::default();
    let mut entries = Vec::new();
    let mut packs: Vec<(PackId, u64)> = repo.pack_sizes()?.into_iter().collect();
    packs.sort();
    for (pack, size) in packs {
        match repo.read_pack_table(&pack, size) {
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
        repo.remove_index_segment(&id)?;
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
                let end = loc.frame_end();
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
    // A dry run takes no lock and seals new trees only to name them: it
    // writes nothing at all.
    let mut session =
        if dry_run { WriteSession::dry_run(repo) } else { WriteSession::begin(repo, LockKind::Shared, lock, 1)? };
    let pack_sizes = repo.pack_sizes()?;
    let mut avail = Available { repo, pack_sizes, read_data, known: HashMap::new() };
    let mut plans = Vec::new();
    let (snapshots, unreadable) = repo.list_snapshots_and_unreadable()?;
    for (id, snap) in snapshots {
        let mut dropped = Vec::new();
        let tree = if avail.blob(&snap.tree) && repo.load_tree(&snap.tree).is_ok() {
            rewrite_tree(&session, &mut avail, &snap.tree, "", &mut dropped)?
        } else {
            // Nothing of it can be reached: keep an empty snapshot as the record.
            dropped.push("/".into());
            session.save(BlobKind::Tree, &Tree::new(Vec::new())?.encode())?.0
        };
        if !dropped.is_empty() {
            let mut tags = snap.tags.clone();
            if !tags.iter().any(|t| t == "repaired") {
                tags.push("repaired".into());
            }
            plans.push((id, Snapshot { tree, tags, parent: Some(id), ..snap }, dropped));
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
            .map(|(old, _, dropped)| RepairedSnapshot { old, new: None, unreadable: None, dropped, forgotten: false })
            .chain(unreadable)
            .collect());
    }
    // Every new tree durable, the lock checked, then the new snapshots.
    let ids = session.commit_group(plans.iter().map(|(_, snap, _)| snap))?;
    let mut out = Vec::new();
    // A manifest that cannot be read names no data: with `forget` it goes.
    for r in unreadable {
        if forget {
            repo.remove_snapshot(&r.old)?;
        }
        out.push(r);
    }
    for ((old, _, dropped), new) in plans.into_iter().zip(ids) {
        let new = new?;
        if forget {
            repo.remove_snapshot(&old)?;
        }
        out.push(RepairedSnapshot { old, new: Some(new), unreadable: None, dropped, forgotten: forget });
    }
    Ok(out)
}

/// Rebuilds a tree without what cannot be restored; returns its (possibly
/// unchanged) id. New trees go through the packer (deduplicated).
fn rewrite_tree(
    session: &WriteSession<'_>,
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
                let new = rewrite_tree(session, avail, subtree, &child, dropped)?;
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
    Ok(session.save(BlobKind::Tree, &Tree::new(nodes)?.encode())?.0)
}
