//! Reads of a tenant's snapshots, filtered by the owner and the device's
//! policy; they return library types (the server maps them to `api` types).

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use super::tenants::Tenant;
use super::{owns, IngestError, Owner};
use crate::id::{BlobId, SnapshotId};
use crate::repo::{self, RepoError};
use crate::restore::RestorePlan;
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind};

/// What a device's restore of a snapshot needs: the plan (every entry), and
/// every chunk once with its length, in the order they are read fastest.
pub struct ReadPlan {
    /// Directories, files and symlinks, paths relative to the snapshot root.
    pub plan: RestorePlan,
    /// Chunk ids and plaintext lengths, in pack order.
    pub chunks: Vec<(BlobId, u32)>,
}

/// Chunks a session may read, from [`Tenant::grant_chunks`].
pub struct ChunkGrant(Vec<BlobId>);

/// Snapshots whose chunk sets a tenant keeps (about 3 MiB for a snapshot
/// of 45,000 chunks).
const CACHED_CHUNK_SETS: usize = 8;

impl Tenant {
    /// The owner's snapshots, oldest first.
    pub fn snapshots(&self, owner: &Owner) -> Result<Vec<(SnapshotId, Snapshot)>, IngestError> {
        Ok(self.repo.list_snapshots()?.into_iter().filter(|(_, s)| owns(owner, s)).collect())
    }

    /// Loads a snapshot the owner may read: its tenant's and user's, and,
    /// when the device's policy forbids restoring to another device, made by
    /// this device. Every route that reads a snapshot's trees or files must
    /// get the snapshot from here: it is the one place those rules live.
    pub fn readable_snapshot(&self, owner: &Owner, id: &SnapshotId) -> Result<Snapshot, IngestError> {
        let snapshot = match self.repo.load_snapshot(id) {
            Err(RepoError::Backend(e)) if e.is_not_found() => {
                return Err(IngestError::NotFound(format!("no snapshot {id}")))
            }
            other => other?,
        };
        if !owns(owner, &snapshot) {
            return Err(IngestError::NotOwner);
        }
        if !owner.policies.allow_restore_to_other_device && snapshot.device.as_deref() != Some(owner.device.as_str()) {
            return Err(IngestError::OtherDevice);
        }
        if !self.repo.index().contains(&snapshot.tree) {
            // Committed (by another node) after this session's refresh: its
            // segments were written before it, so one refresh finds them.
            let _refreshing = self.refreshed.lock().expect("refresh lock");
            self.refresh()?;
        }
        Ok(snapshot)
    }

    /// The restore plan of one of the owner's snapshots (or of its
    /// `include` paths), with every chunk it needs once, in pack order.
    pub fn restore_plan(&self, owner: &Owner, id: &SnapshotId, include: &[String]) -> Result<ReadPlan, IngestError> {
        let snapshot = self.readable_snapshot(owner, id)?;
        let plan = crate::restore::plan(&self.repo, &snapshot, include).map_err(IngestError::from)?;
        let (packs, missing) = self.repo.plan_blob_reads(plan.chunks());
        if let Some(id) = missing.first() {
            return Err(IngestError::Repo(RepoError::MissingBlob(*id)));
        }
        let chunks = packs.iter().flat_map(|(_, blobs)| blobs.iter().map(|(id, l)| (*id, l.raw_len))).collect();
        Ok(ReadPlan { plan, chunks })
    }

    /// Checks that the owner may read `ids`: chunks of one of its snapshots
    /// that it may restore. A chunk the snapshot does not use is refused.
    pub fn grant_chunks(&self, owner: &Owner, id: &SnapshotId, ids: Vec<BlobId>) -> Result<ChunkGrant, IngestError> {
        let snapshot = self.readable_snapshot(owner, id)?;
        let allowed = self.chunks_of(id, &snapshot)?;
        if let Some(c) = ids.iter().find(|c| !allowed.contains(c)) {
            return Err(IngestError::NotFound(format!("chunk {c} is not part of snapshot {id}")));
        }
        Ok(ChunkGrant(ids))
    }

    /// Reads granted chunks in pack order, calling `deliver` (from several
    /// threads) with each one's verified plaintext or why it failed.
    pub fn read_chunks(&self, grant: &ChunkGrant, deliver: &repo::DeliverBlob<'_>) {
        let (packs, missing) = self.repo.plan_blob_reads(grant.0.iter().copied());
        for c in missing {
            deliver(&c, Err(RepoError::MissingBlob(c)));
        }
        self.repo.read_blobs(&packs, deliver);
    }

    /// Every chunk a snapshot's files use (cached for a few snapshots).
    fn chunks_of(&self, id: &SnapshotId, snapshot: &Snapshot) -> Result<Arc<HashSet<BlobId>>, IngestError> {
        let mut cache = self.snapshot_chunks.lock().expect("chunk set lock");
        if let Some(pos) = cache.iter().position(|(s, _)| s == id) {
            let hit = cache.remove(pos);
            let set = hit.1.clone();
            cache.push(hit);
            return Ok(set);
        }
        drop(cache);
        let plan = crate::restore::plan(&self.repo, snapshot, &[]).map_err(IngestError::from)?;
        let set: Arc<HashSet<BlobId>> = Arc::new(plan.chunks().into_iter().collect());
        let mut cache = self.snapshot_chunks.lock().expect("chunk set lock");
        if cache.len() >= CACHED_CHUNK_SETS {
            cache.remove(0);
        }
        cache.push((*id, set.clone()));
        Ok(set)
    }

    /// The node at `path` in one of the owner's snapshots (`None`: the root).
    fn node(&self, owner: &Owner, id: &SnapshotId, path: &str) -> Result<(Snapshot, Option<Node>), IngestError> {
        let snapshot = self.readable_snapshot(owner, id)?;
        let node = match self.repo.find_node(&snapshot.tree, path) {
            Err(e @ RepoError::PathNotFound(_)) => return Err(IngestError::NotFound(e.to_string())),
            other => other?,
        };
        Ok((snapshot, node))
    }

    /// Lists a directory of one of the owner's snapshots.
    pub fn tree(&self, owner: &Owner, id: &SnapshotId, path: &str) -> Result<Vec<Node>, IngestError> {
        let subtree = match self.node(owner, id, path)? {
            (s, None) => s.tree,
            (_, Some(Node { kind: NodeKind::Dir { subtree }, .. })) => subtree,
            _ => return Err(IngestError::NotFound(format!("{path}: not a directory"))),
        };
        Ok(self.repo.load_tree(&subtree)?.nodes().to_vec())
    }

    /// A file of one of the owner's snapshots: its node, for size and range.
    pub fn file(&self, owner: &Owner, id: &SnapshotId, path: &str) -> Result<Node, IngestError> {
        match self.node(owner, id, path)? {
            (_, Some(n)) if n.is_file() => Ok(n),
            _ => Err(IngestError::NotFound(format!("{path}: not a file"))),
        }
    }

    /// Writes `start..end` of a file to `out`, verifying every chunk read.
    pub fn read_file(&self, node: &Node, start: u64, end: u64, out: &mut dyn Write) -> Result<u64, IngestError> {
        crate::restore::cat(&self.repo, node, Some((start, end)), out).map_err(IngestError::from)
    }
}
