//! The library side of a storage node: one repository per tenant under a
//! root, opened on demand with keys wrapped by the server's password, a
//! long-lived writer per tenant that takes verified chunks from many
//! concurrent uploads, and reads filtered by the owning user.
//!
//! The writer is one thread per tenant owning a
//! [`WriteSession`](crate::repo::WriteSession): uploads hand it
//! verified chunks over a channel, and it seals each upload as a task on
//! the shared rayon pool, many at once; a snapshot commit waits for the
//! uploads before it, flushes the packer (every pack and index segment
//! durable) and only then writes the snapshot, so a crash loses at most
//! chunks not yet named by a committed snapshot.
//!
//! The writer holds the repository's shared lock only while it has work (see
//! [`WriterTiming`] and ARCHITECTURE.md, "The storage node and prune"), so that a prune of
//! a tenant repository gets in between sessions and never deletes data a
//! later commit names.

mod reads;
mod tenants;
mod writer;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::api::{CommitRequest, Policies};
use crate::backup::{BackupError, StreamOrigin};
use crate::id::BlobId;
use crate::lock::LockError;
use crate::repo::{RepoError, WriteError};
use crate::restore::RestoreError;
use crate::snapshot::{Snapshot, Summary, MAX_SNAPSHOT_SIZE};

pub use reads::{ChunkGrant, ReadPlan};
pub use tenants::{Tenant, TenantName, TenantUse, Tenants};
pub use writer::WriterTiming;

/// Why a storage operation failed or was refused.
#[derive(Debug, thiserror::Error)]
///
/// The server maps these to HTTP statuses in `server/error.rs`; the
/// variants from `ChunkTooLarge` to `ManifestTooLarge` are the client's
/// fault and nothing was stored for them.
pub enum IngestError {
    /// The tenant repository failed (storage, damage, lock): see [`RepoError`].
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A commit's file list cannot be made into trees (an empty or invalid
    /// path component), or saving the trees failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// An uploaded chunk's length in bytes (first) is over the repository's
    /// chunker `max_size` (second).
    #[error("chunk is {0} bytes, larger than the repository's maximum of {1}")]
    ChunkTooLarge(usize, u32),
    /// An uploaded chunk does not hash (keyed BLAKE3) to the id it was sent under.
    #[error("chunk content does not hash to its id")]
    ChunkMismatch,
    /// A chunk (id given) of a bundle upload does not hash to its id; the
    /// whole bundle was refused.
    #[error("chunk {0} of the bundle does not hash to its id; nothing of the bundle was stored")]
    BundleMismatch(BlobId),
    /// A commit names chunks (listed, sorted and unique) the tenant has not
    /// stored; nothing was committed.
    #[error("{} chunks are not stored; upload them first", .0.len())]
    MissingChunks(Vec<BlobId>),
    /// A committed file's (path given) size is not the sum of its chunks' lengths.
    #[error("{0}: size does not match its chunks")]
    SizeMismatch(String),
    /// No such snapshot, path in it, or chunk in it; the message says which.
    #[error("{0}")]
    NotFound(String),
    /// The snapshot belongs to another user of the tenant (the server
    /// answers as for a missing snapshot so as not to reveal it).
    #[error("this snapshot belongs to another user")]
    NotOwner,
    /// The snapshot was taken by another device of the user and the
    /// device's policy allows restoring only its own.
    #[error("this snapshot was made by another device, and this device's policy forbids restoring it")]
    OtherDevice,
    /// The commit's manifest would encode to the first count of bytes; the
    /// second is the most allowed (under [`MAX_SNAPSHOT_SIZE`]).
    #[error("the snapshot manifest would be {0} bytes, more than the {1} a snapshot may have")]
    ManifestTooLarge(usize, usize),
    /// Reading a snapshot for a device failed (the repository's own
    /// failures are [`IngestError::Repo`]).
    #[error("reading: {0}")]
    Read(#[source] RestoreError),
    /// The tenant's writer thread is gone (it panicked or the node is
    /// shutting down); the request was not served.
    #[error("the tenant's writer stopped")]
    WriterStopped,
    /// The flush of a commit group failed: nothing of the group was committed.
    #[error("making uploads durable: {0}")]
    Flush(#[source] Arc<RepoError>),
    /// The writer could not take the repository's shared lock in time (a
    /// prune holds it), or its lock lapsed before a commit.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A tenant name that cannot name a repository under the root.
    #[error("tenant {0:?}: {1}")]
    InvalidTenant(String, String),
}

impl From<RestoreError> for IngestError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Repo(r) => IngestError::Repo(r),
            e @ RestoreError::PathNotFound(_) => IngestError::NotFound(e.to_string()),
            other => IngestError::Read(other),
        }
    }
}

impl From<WriteError> for IngestError {
    fn from(e: WriteError) -> Self {
        e.split()
    }
}

/// Who a request acts for (from a verified session token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The tenant whose repository the request uses.
    pub tenant: TenantName,
    /// The user id; snapshots are read only by the user that made them.
    pub user: String,
    /// The device id; recorded in snapshots, and checked against the
    /// device's restore policy.
    pub device: String,
    /// The device's policies, as signed into the session token.
    pub policies: Policies,
}

/// Room left in a manifest for what the commit adds after the size check
/// (summary counts, duration, tree id): a few hundred bytes at most.
const MANIFEST_MARGIN: usize = 4096;

/// Counters for the server's metrics, over all tenants since start; all but
/// `tenants_open` only ever increase (relaxed atomics, read them with any
/// ordering).
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Chunks uploaded that were new and written to a pack.
    pub chunks_stored: AtomicU64,
    /// Chunks uploaded that the tenant already had (not written again).
    pub chunks_deduplicated: AtomicU64,
    /// Snapshots committed.
    pub snapshots_committed: AtomicU64,
    /// Tenants open now (index in memory, writer running).
    pub tenants_open: AtomicU64,
    /// Tenants closed after being idle ([`Tenants::close_idle`]).
    pub tenants_closed: AtomicU64,
}

/// Refuses a commit whose manifest could not be read back (over
/// [`MAX_SNAPSHOT_SIZE`]): such a snapshot would fail `check` for good. The
/// request's fields are bounded one by one (`api`); their encoding (JSON
/// escapes of control characters take six bytes each) is what is measured
/// here, before any tree is written.
pub fn check_manifest_size(owner: &Owner, req: &CommitRequest) -> Result<(), IngestError> {
    let draft = origin(owner, req).snapshot(chrono::Utc::now().fixed_offset(), BlobId([0; 32]), Summary::default());
    let len = draft.encode().len();
    if len + MANIFEST_MARGIN > MAX_SNAPSHOT_SIZE {
        return Err(IngestError::ManifestTooLarge(len, MAX_SNAPSHOT_SIZE - MANIFEST_MARGIN));
    }
    Ok(())
}

/// What a device's commit records: its manifest's host, tags and paths, and
/// the session's tenant, user and device.
fn origin(owner: &Owner, req: &CommitRequest) -> StreamOrigin {
    StreamOrigin {
        hostname: req.hostname.clone(),
        username: owner.user.clone(),
        tenant: Some(owner.tenant.to_string()),
        user: Some(owner.user.clone()),
        device: Some(owner.device.clone()),
        tags: req.tags.clone(),
        paths: req.paths.clone(),
    }
}

fn owns(owner: &Owner, s: &Snapshot) -> bool {
    s.tenant.as_deref() == Some(owner.tenant.as_str()) && s.user.as_deref() == Some(owner.user.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EntryKind, ManifestFile};
    use crate::test_support::tenants;

    /// A regular file of a device's manifest: mode 0644, mtime 5.
    pub(super) fn file_entry(path: &str, size: u64, chunks: Vec<BlobId>) -> ManifestFile {
        ManifestFile {
            kind: EntryKind::File,
            target: None,
            path: path.into(),
            mode: 0o644,
            mtime: 5,
            mtime_nsec: 0,
            size,
            chunks,
        }
    }

    /// A commit of `files` from host `h` with no tags.
    pub(super) fn commit_of(files: Vec<ManifestFile>) -> CommitRequest {
        CommitRequest { hostname: "h".into(), paths: vec!["/".into()], tags: vec![], files }
    }

    pub(super) fn acme() -> TenantName {
        TenantName::new("acme").unwrap()
    }

    /// Tenant `acme` in `dir`, holding one stored chunk of `data`, and that
    /// chunk's id.
    pub(super) fn acme_with_chunk(dir: &std::path::Path, data: &[u8]) -> (std::sync::Arc<Tenant>, BlobId) {
        let t = tenants(dir).get(&acme()).unwrap();
        let id = t.repo().blob_id(data);
        t.put_chunk(id, data.to_vec()).unwrap();
        (t, id)
    }

    pub(super) fn owner(user: &str) -> Owner {
        Owner { tenant: acme(), user: user.into(), device: "d1".into(), policies: Policies::default() }
    }

    #[test]
    fn upload_commit_list_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get(&acme()).unwrap();
        let data = b"hello chunk".to_vec();
        let id = t.repo().blob_id(&data);
        assert_eq!(t.missing(&[id]), vec![id]);
        assert!(matches!(t.put_chunk(BlobId([0; 32]), data.clone()), Err(IngestError::ChunkMismatch)));
        assert!(t.put_chunk(id, data.clone()).unwrap());
        assert!(!t.put_chunk(id, data.clone()).unwrap());
        assert!(t.missing(&[id]).is_empty());
        let file = |path: &str, size| file_entry(path, size, vec![id]);
        let req = commit_of;
        assert!(matches!(t.commit(owner("a"), req(vec![file("x", 3)])), Err(IngestError::SizeMismatch(_))));
        let done = t.commit(owner("a"), req(vec![file("dir/x", data.len() as u64)])).unwrap();
        assert!(t.repo().index().contains(&id), "a commit makes its chunks durable and indexed");

        assert_eq!(t.snapshots(&owner("a")).unwrap().len(), 1);
        assert!(t.snapshots(&owner("b")).unwrap().is_empty());
        assert!(matches!(t.tree(&owner("b"), &done.id, ""), Err(IngestError::NotOwner)));
        assert_eq!(t.tree(&owner("a"), &done.id, "dir").unwrap()[0].name, b"x");
        let node = t.file(&owner("a"), &done.id, "dir/x").unwrap();
        let mut out = Vec::new();
        t.read_file(&node, 6, 100, &mut out).unwrap();
        assert_eq!(out, b"chunk");
        assert!(matches!(t.file(&owner("a"), &done.id, "dir/nope"), Err(IngestError::NotFound(_))));
        assert!(matches!(t.file(&owner("a"), &done.id, "dir/x/below"), Err(IngestError::NotFound(_))));
        let tree = t.repo().load_snapshot(&done.id).unwrap().tree;
        for missing in ["nope", "dir/nope", "dir/x/below", "nope/x"] {
            let found = t.repo().find_node(&tree, missing);
            assert!(matches!(found, Err(RepoError::PathNotFound(ref p)) if p == missing), "{missing}: {found:?}");
        }

        let other = BlobId([1; 32]);
        let missing = ManifestFile { chunks: vec![other], ..file("y", 1) };
        assert!(
            matches!(t.commit(owner("a"), req(vec![missing])), Err(IngestError::MissingChunks(m)) if m == vec![other])
        );
    }

    #[test]
    fn a_manifest_large_enough_to_be_built_on_all_cores_is_the_tree_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (t, id) = acme_with_chunk(dir.path(), b"shared");
        // Directories spread over every slice, files in manifest order.
        let n = crate::api::ON_ALL_CORES_FROM * 2 + 7;
        let files = (0..n).map(|i| file_entry(&format!("top/d{}/f{i:05}", i % 50), 6, vec![id])).collect();
        let done = t.commit(owner("a"), commit_of(files)).unwrap();
        assert_eq!(done.files, n as u64);
        let top = t.tree(&owner("a"), &done.id, "top").unwrap();
        assert_eq!(top.len(), 50);
        let d7 = t.tree(&owner("a"), &done.id, "top/d7").unwrap();
        let names: Vec<String> = d7.iter().map(|n| n.name_lossy()).collect();
        let expected: Vec<String> = (0..n).filter(|i| i % 50 == 7).map(|i| format!("f{i:05}")).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn concurrent_commits_all_land_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get(&acme()).unwrap();
        std::thread::scope(|scope| {
            for i in 0..8u8 {
                let t = &t;
                scope.spawn(move || {
                    let data = vec![i; 1000 + usize::from(i)];
                    let id = t.repo().blob_id(&data);
                    t.put_chunk(id, data.clone()).unwrap();
                    let req = commit_of(vec![file_entry("f", data.len() as u64, vec![id])]);
                    t.commit(owner(&format!("u{i}")), req).unwrap();
                });
            }
        });
        for i in 0..8u8 {
            let o = owner(&format!("u{i}"));
            let snaps = t.snapshots(&o).unwrap();
            assert_eq!(snaps.len(), 1);
            let node = t.file(&o, &snaps[0].0, "f").unwrap();
            let mut out = Vec::new();
            t.read_file(&node, 0, node.size, &mut out).unwrap();
            assert_eq!(out, vec![i; 1000 + usize::from(i)]);
        }
    }

    #[test]
    fn a_policy_keeps_reads_to_the_devices_own_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (t, id) = acme_with_chunk(dir.path(), b"phone data");
        let req = commit_of(vec![file_entry("f", 10, vec![id])]);
        let phone = Owner { device: "phone".into(), ..owner("a") };
        let done = t.commit(phone.clone(), req).unwrap();
        let strict = Policies { allow_restore_to_other_device: false, allow_open_in: true };
        let laptop = Owner { device: "laptop".into(), policies: strict, ..owner("a") };
        assert!(matches!(t.readable_snapshot(&laptop, &done.id), Err(IngestError::OtherDevice)));
        assert!(matches!(t.tree(&laptop, &done.id, ""), Err(IngestError::OtherDevice)));
        assert!(matches!(t.file(&laptop, &done.id, "f"), Err(IngestError::OtherDevice)));
        // The user's other device without the policy, and the phone under it, read.
        t.file(&Owner { device: "laptop".into(), ..owner("a") }, &done.id, "f").unwrap();
        t.file(&Owner { policies: strict, ..phone }, &done.id, "f").unwrap();
    }

    #[test]
    fn a_manifest_too_large_to_read_back_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get(&acme()).unwrap();
        // Within every field bound, but each control character encodes as
        // six bytes of JSON: 24 MiB of manifest.
        let path = "\u{1}".repeat(crate::api::MAX_MANIFEST_PATH);
        let paths = vec![path; crate::api::MAX_MANIFEST_PATHS];
        let req = CommitRequest { paths, ..commit_of(vec![]) };
        assert!(matches!(t.commit(owner("a"), req), Err(IngestError::ManifestTooLarge(..))));
        assert!(t.repo().list_snapshots().unwrap().is_empty());
        assert!(t.repo().index().is_empty(), "no tree was written");
    }

    #[test]
    fn oversized_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get(&acme()).unwrap();
        let big = vec![0u8; t.repo().config().chunker.max_size as usize + 1];
        let id = t.repo().blob_id(&big);
        assert!(matches!(t.put_chunk(id, big), Err(IngestError::ChunkTooLarge(..))));
    }
}
