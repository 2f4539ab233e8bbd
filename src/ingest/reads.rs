//! Reads of a tenant's snapshots, filtered by the owner and the device's
//! policy; they return library types (the server maps them to `api` types).

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

use super::tenants::{Tenant, TenantName};
use super::{owns, IngestError, Owner};
use crate::blob::IdCheck;
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

/// Bytes of chunk sets kept, all tenants together (a snapshot of 45,000
/// chunks takes about 2.5 MiB).
const CHUNK_SETS_BYTES: usize = 64 << 20;

/// The chunk sets of recently restored snapshots, least recently used
/// first, bounded in bytes across every tenant of the node.
#[derive(Default)]
pub(super) struct ChunkSets {
    sets: Mutex<(Vec<CachedSet>, usize)>,
}

struct CachedSet {
    tenant: TenantName,
    snapshot: SnapshotId,
    chunks: Arc<HashSet<BlobId>>,
    bytes: usize,
}

/// About what a set takes: its table, one id and a control byte a slot.
fn set_bytes(set: &HashSet<BlobId>) -> usize {
    set.capacity() * (std::mem::size_of::<BlobId>() + 1) + 64
}

impl ChunkSets {
    fn get(&self, tenant: &TenantName, snapshot: &SnapshotId) -> Option<Arc<HashSet<BlobId>>> {
        let mut guard = self.sets.lock().expect("chunk sets lock");
        let sets = &mut guard.0;
        let pos = sets.iter().position(|c| &c.snapshot == snapshot && &c.tenant == tenant)?;
        let hit = sets.remove(pos);
        let chunks = hit.chunks.clone();
        sets.push(hit);
        Some(chunks)
    }

    /// Keeps a set, dropping the least recently used ones over the budget.
    /// A set larger than the whole budget is not kept.
    fn put(&self, tenant: &TenantName, snapshot: SnapshotId, chunks: Arc<HashSet<BlobId>>) {
        self.put_within(tenant, snapshot, chunks, CHUNK_SETS_BYTES);
    }

    fn put_within(&self, tenant: &TenantName, snapshot: SnapshotId, chunks: Arc<HashSet<BlobId>>, budget: usize) {
        let bytes = set_bytes(&chunks);
        if bytes > budget {
            return;
        }
        let mut guard = self.sets.lock().expect("chunk sets lock");
        let (sets, total) = &mut *guard;
        if let Some(pos) = sets.iter().position(|c| c.snapshot == snapshot && &c.tenant == tenant) {
            *total -= sets.remove(pos).bytes;
        }
        while *total + bytes > budget && !sets.is_empty() {
            *total -= sets.remove(0).bytes;
        }
        *total += bytes;
        sets.push(CachedSet { tenant: tenant.clone(), snapshot, chunks, bytes });
    }

    /// Drops a closed tenant's sets.
    pub(super) fn forget_tenant(&self, tenant: &TenantName) {
        let mut guard = self.sets.lock().expect("chunk sets lock");
        let (sets, total) = &mut *guard;
        sets.retain(|c| {
            &c.tenant != tenant || {
                *total -= c.bytes;
                false
            }
        });
    }

    /// Bytes kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.sets.lock().expect("chunk sets lock").1
    }
}

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
        let needed = plan.chunks();
        if include.is_empty() {
            // The chunk reads that follow check each chunk against this
            // set; without it the first of them walks the snapshot's
            // trees again (60 ms for 42,000 files) while the device waits.
            self.remember_chunks(id, &needed);
        }
        let (packs, missing) = self.repo.plan_blob_reads(needed);
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

    /// Reads granted chunks in pack order, on the calling thread, calling
    /// `deliver` with each one's authenticated plaintext or why it failed.
    pub fn read_chunks(&self, grant: &ChunkGrant, deliver: &repo::DeliverBlob<'_>) {
        let (packs, missing) = self.repo.plan_blob_reads(grant.0.iter().copied());
        for c in missing {
            deliver(&c, Err(RepoError::MissingBlob(c)));
        }
        // The device hashes every chunk against its id before it uses it
        // (`client::remote`); the tag still authenticates each one here.
        // Pack after pack on this thread, not on the rayon pool: `deliver`
        // waits for the device to take the bytes (up to the stall timeout),
        // and a few slow devices must not stall every tenant's sealing and
        // reads. Parallelism comes from concurrent requests (read turns).
        for (pack, blobs) in &packs {
            self.repo.read_pack_blobs(pack, blobs, IdCheck::ReaderVerifies, deliver);
        }
    }

    /// Every chunk a snapshot's files use (cached, [`ChunkSets`]).
    fn chunks_of(&self, id: &SnapshotId, snapshot: &Snapshot) -> Result<Arc<HashSet<BlobId>>, IngestError> {
        if let Some(set) = self.chunk_sets.get(&self.name, id) {
            return Ok(set);
        }
        let plan = crate::restore::plan(&self.repo, snapshot, &[]).map_err(IngestError::from)?;
        Ok(self.remember_chunks(id, &plan.chunks()))
    }

    /// Caches `chunks`, those of a whole snapshot's restore plan, as the
    /// snapshot's [`ChunkSets`] entry.
    fn remember_chunks(&self, id: &SnapshotId, chunks: &[BlobId]) -> Arc<HashSet<BlobId>> {
        let set: Arc<HashSet<BlobId>> = Arc::new(chunks.iter().copied().collect());
        self.chunk_sets.put(&self.name, *id, set.clone());
        set
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::tests::{acme, commit_of, file_entry, owner};
    use crate::test_support::tenants;

    #[test]
    fn a_whole_restore_plan_leaves_its_chunk_set_for_the_reads_that_follow() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get(&acme()).unwrap();
        let (a, b) = (b"first file".to_vec(), b"second file".to_vec());
        let (ia, ib) = (t.repo().blob_id(&a), t.repo().blob_id(&b));
        t.put_chunk(ia, a.clone()).unwrap();
        t.put_chunk(ib, b.clone()).unwrap();
        let files = vec![file_entry("d/a", a.len() as u64, vec![ia]), file_entry("d/b", b.len() as u64, vec![ib])];
        let done = t.commit(owner("u"), commit_of(files)).unwrap();
        // A plan of some paths covers only some chunks: not the snapshot's set.
        t.restore_plan(&owner("u"), &done.id, &["d/a".to_owned()]).unwrap();
        assert!(t.chunk_sets.get(&acme(), &done.id).is_none());
        let plan = t.restore_plan(&owner("u"), &done.id, &[]).unwrap();
        assert_eq!(plan.chunks.len(), 2);
        let set = t.chunk_sets.get(&acme(), &done.id).expect("cached by the whole plan");
        assert_eq!(*set, HashSet::from([ia, ib]));
        t.grant_chunks(&owner("u"), &done.id, vec![ia, ib]).unwrap();
        assert!(matches!(t.grant_chunks(&owner("u"), &done.id, vec![BlobId([7; 32])]), Err(IngestError::NotFound(_))));
    }

    fn set(n: u8) -> Arc<HashSet<BlobId>> {
        Arc::new((0..n).map(|i| BlobId([i; 32])).collect())
    }

    #[test]
    fn chunk_sets_stay_within_their_byte_budget_across_tenants() {
        let sets = ChunkSets::default();
        let (a, b) = (TenantName::new("a").unwrap(), TenantName::new("b").unwrap());
        let one = set_bytes(&set(100));
        let budget = one * 3;
        for i in 0..5u8 {
            let tenant = if i % 2 == 0 { &a } else { &b };
            sets.put_within(tenant, SnapshotId([i; 32]), set(100), budget);
            assert!(sets.bytes() <= budget);
        }
        // The three most recent are kept, the older ones dropped.
        assert!(sets.get(&a, &SnapshotId([0; 32])).is_none());
        assert!(sets.get(&b, &SnapshotId([1; 32])).is_none());
        assert!(sets.get(&a, &SnapshotId([4; 32])).is_some());
        // Another tenant's snapshot id does not hit.
        assert!(sets.get(&b, &SnapshotId([4; 32])).is_none());
        // Too large for the whole budget: not kept.
        sets.put_within(&a, SnapshotId([9; 32]), set(255), one);
        assert!(sets.get(&a, &SnapshotId([9; 32])).is_none());
        sets.forget_tenant(&a);
        assert!(sets.get(&a, &SnapshotId([4; 32])).is_none());
        assert_eq!(sets.bytes(), set_bytes(&set(100)), "b's one set is left");
    }
}
