//! The library side of a storage node: one repository per tenant under a
//! root, opened on demand with keys wrapped by the server's password, a
//! long-lived writer per tenant that takes verified chunks from many
//! concurrent uploads, and reads filtered by the owning user.
//!
//! The writer is one thread per tenant owning a [`Packer`]: uploads hand it
//! chunks over a channel; a snapshot commit flushes the packer (every pack and
//! index segment durable) and only then writes the snapshot, so a crash loses
//! at most chunks not yet named by a committed snapshot.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::api::{CommitRequest, CommitResponse, SnapshotInfo, TreeEntry};
use crate::backup::{BackupError, FileTree};
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::packer::Packer;
use crate::repo::{self, InitOptions, RepoError, Repository};
use crate::restore::RestoreError;
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{Node, NodeKind, Timestamp};

/// Why a storage operation failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("chunk is {0} bytes, larger than the repository's maximum of {1}")]
    ChunkTooLarge(usize, u32),
    #[error("chunk content does not hash to its id")]
    ChunkMismatch,
    #[error("{} chunks are not stored; upload them first", .0.len())]
    MissingChunks(Vec<BlobId>),
    #[error("{0}: size does not match its chunks")]
    SizeMismatch(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this snapshot belongs to another user")]
    NotOwner,
    #[error("reading: {0}")]
    Read(String),
    #[error("the tenant's writer stopped")]
    WriterStopped,
    #[error("making uploads durable: {0}")]
    Flush(String),
}

/// Who a request acts for (from a verified session token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tenant: String,
    pub user: String,
    pub device: String,
}

/// Counters for the server's metrics.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub chunks_stored: AtomicU64,
    pub chunks_deduplicated: AtomicU64,
    pub snapshots_committed: AtomicU64,
}

/// Every tenant repository under one root.
pub struct Tenants {
    root: String,
    password: Vec<u8>,
    init: InitOptions,
    open: Mutex<HashMap<String, Slot>>,
    stats: Arc<IngestStats>,
}

/// One tenant's entry: locked on its own while the repository opens (an
/// Argon2id unwrap), so opening one tenant does not stall the others.
type Slot = Arc<Mutex<Option<Arc<Tenant>>>>;

impl Tenants {
    /// `root` is a directory (or, once supported, an object-store URL);
    /// `init` is used for tenants created here.
    pub fn new(root: &str, password: Vec<u8>, init: InitOptions) -> Tenants {
        Tenants {
            root: root.trim_end_matches('/').to_owned(),
            password,
            init,
            open: Mutex::default(),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<IngestStats> {
        &self.stats
    }

    /// The tenant's repository, opened (or created, on first use) once and
    /// kept. `tenant` must already be validated (`api::check_tenant`).
    pub fn get(&self, tenant: &str) -> Result<Arc<Tenant>, IngestError> {
        let slot = self.open.lock().expect("tenants lock").entry(tenant.to_owned()).or_default().clone();
        let mut slot = slot.lock().expect("tenant lock");
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let location = format!("{}/{tenant}", self.root);
        let repo = match repo::open_backend(&location, false) {
            Ok(backend) => Repository::open(backend, &self.password)?,
            Err(RepoError::NotARepository(_)) => {
                Repository::init(repo::open_backend(&location, true)?, &self.password, &self.init)?
            }
            Err(e) => return Err(e.into()),
        };
        let t = Arc::new(Tenant::start(tenant, Arc::new(repo), self.stats.clone()));
        *slot = Some(t.clone());
        Ok(t)
    }
}

enum Job {
    Put { id: BlobId, data: Vec<u8>, reply: SyncSender<Result<(), IngestError>> },
    Commit { owner: Owner, req: Box<CommitRequest>, reply: SyncSender<Result<CommitResponse, IngestError>> },
}

/// One tenant's repository and its writer.
pub struct Tenant {
    repo: Arc<Repository>,
    jobs: Mutex<SyncSender<Job>>,
    /// Chunks the writer holds in open packs, with their raw lengths: stored
    /// as far as uploads are concerned, durable at the next commit.
    pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    stats: Arc<IngestStats>,
}

impl Tenant {
    fn start(name: &str, repo: Arc<Repository>, stats: Arc<IngestStats>) -> Tenant {
        let (tx, rx) = sync_channel(16);
        let pending: Arc<Mutex<HashMap<BlobId, u32>>> = Arc::default();
        let writer = Writer { repo: repo.clone(), pending: pending.clone(), stats: stats.clone() };
        std::thread::Builder::new()
            .name(format!("writer-{name}"))
            .spawn(move || writer.run(rx))
            .expect("spawn tenant writer");
        Tenant { repo, jobs: Mutex::new(tx), pending, stats }
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The ids among `ids` that neither the repository nor the writer has.
    pub fn missing(&self, ids: &[BlobId]) -> Vec<BlobId> {
        let index = self.repo.index();
        let pending = self.pending.lock().expect("pending lock");
        ids.iter().filter(|id| !index.contains(id) && !pending.contains_key(id)).copied().collect()
    }

    /// Verifies a chunk against its id and size bound, and stores it unless
    /// it is already stored. Returns whether it was new.
    pub fn put_chunk(&self, id: BlobId, data: Vec<u8>) -> Result<bool, IngestError> {
        let max = self.repo.config().chunker.max_size;
        if data.len() > max as usize {
            return Err(IngestError::ChunkTooLarge(data.len(), max));
        }
        if self.repo.blob_id(&data) != id {
            return Err(IngestError::ChunkMismatch);
        }
        if self.missing(&[id]).is_empty() {
            self.stats.chunks_deduplicated.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let (reply, rx) = sync_channel(1);
        self.send(Job::Put { id, data, reply })?;
        rx.recv().map_err(|_| IngestError::WriterStopped)??;
        Ok(true)
    }

    /// Commits a snapshot of the files a device uploaded; refuses it unless
    /// every chunk it names is stored and every file's size adds up.
    pub fn commit(&self, owner: Owner, req: CommitRequest) -> Result<CommitResponse, IngestError> {
        let (reply, rx) = sync_channel(1);
        self.send(Job::Commit { owner, req: Box::new(req), reply })?;
        rx.recv().map_err(|_| IngestError::WriterStopped)?
    }

    fn send(&self, job: Job) -> Result<(), IngestError> {
        let tx = self.jobs.lock().expect("jobs lock").clone();
        tx.send(job).map_err(|_| IngestError::WriterStopped)
    }

    /// The owner's snapshots, oldest first.
    pub fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>, IngestError> {
        Ok(self
            .repo
            .list_snapshots()?
            .into_iter()
            .filter(|(_, s)| owns(owner, s))
            .map(|(id, s)| SnapshotInfo {
                id,
                time: s.time.to_utc(),
                device: s.device,
                hostname: s.hostname,
                paths: s.paths,
                tags: s.tags,
                files: s.summary.files_new + s.summary.files_changed + s.summary.files_unmodified,
                bytes: s.summary.total_bytes,
            })
            .collect())
    }

    /// Loads a snapshot the owner may read.
    fn owned_snapshot(&self, owner: &Owner, id: &SnapshotId) -> Result<Snapshot, IngestError> {
        let snapshot = match self.repo.load_snapshot(id) {
            Err(RepoError::Backend(e)) if e.is_not_found() => {
                return Err(IngestError::NotFound(format!("no snapshot {id}")))
            }
            other => other?,
        };
        if !owns(owner, &snapshot) {
            return Err(IngestError::NotOwner);
        }
        Ok(snapshot)
    }

    /// The node at `path` in one of the owner's snapshots (`None`: the root).
    fn node(&self, owner: &Owner, id: &SnapshotId, path: &str) -> Result<(Snapshot, Option<Node>), IngestError> {
        let snapshot = self.owned_snapshot(owner, id)?;
        let node = match self.repo.find_node(&snapshot.tree, path) {
            Err(RepoError::Invalid(msg)) => return Err(IngestError::NotFound(msg)),
            other => other?,
        };
        Ok((snapshot, node))
    }

    /// Lists a directory of one of the owner's snapshots.
    pub fn tree(&self, owner: &Owner, id: &SnapshotId, path: &str) -> Result<Vec<TreeEntry>, IngestError> {
        let subtree = match self.node(owner, id, path)? {
            (s, None) => s.tree,
            (_, Some(Node { kind: NodeKind::Dir { subtree }, .. })) => subtree,
            _ => return Err(IngestError::NotFound(format!("{path}: not a directory"))),
        };
        let tree = self.repo.load_tree(&subtree)?;
        Ok(tree
            .nodes()
            .iter()
            .map(|n| TreeEntry {
                name: n.name_lossy(),
                kind: match n.kind {
                    NodeKind::File { .. } => "file",
                    NodeKind::Dir { .. } => "dir",
                    _ => "symlink",
                }
                .into(),
                size: n.size,
                mode: n.mode,
                mtime: n.mtime.sec,
                mtime_nsec: n.mtime.nsec,
            })
            .collect())
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
        crate::restore::cat(&self.repo, node, Some((start, end)), out).map_err(|e| match e {
            RestoreError::Repo(r) => IngestError::Repo(r),
            other => IngestError::Read(other.to_string()),
        })
    }
}

fn owns(owner: &Owner, s: &Snapshot) -> bool {
    s.tenant.as_deref() == Some(owner.tenant.as_str()) && s.user.as_deref() == Some(owner.user.as_str())
}

struct Writer {
    repo: Arc<Repository>,
    pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    stats: Arc<IngestStats>,
}

impl Writer {
    fn run(self, jobs: Receiver<Job>) {
        // SHARED-LOCK: once repository locks exist, take `lock_shared()` here
        // and hold it for as long as this writer lives (renewing it), so a
        // prune never removes packs this writer is about to reference.
        let mut packer = Packer::new(&self.repo, 1);
        while let Ok(job) = jobs.recv() {
            let mut group = Vec::new();
            self.handle(&mut packer, job, &mut group);
            if group.is_empty() {
                continue;
            }
            // Group commit: take what is already queued, so that one flush
            // makes every waiting commit durable (fewer, larger packs).
            while let Ok(next) = jobs.try_recv() {
                self.handle(&mut packer, next, &mut group);
            }
            self.commit_group(&mut packer, group);
        }
        // Shutdown: the open packer is dropped without a commit; its chunks
        // are named by no snapshot, so the repository stays consistent.
    }

    /// Stores an upload at once; queues a commit into `group`.
    fn handle<'r>(&'r self, packer: &mut Packer<'r>, job: Job, group: &mut Vec<Pending>) {
        match job {
            Job::Put { id, data, reply } => {
                let result = match packer.save(BlobKind::Data, &data) {
                    Ok((_, new)) => {
                        if new {
                            self.pending.lock().expect("pending lock").insert(id, data.len() as u32);
                            self.stats.chunks_stored.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        // A failed packer is sticky: start over, forgetting
                        // what it held (devices re-upload at commit).
                        drop(std::mem::replace(packer, Packer::new(&self.repo, 1)));
                        self.pending.lock().expect("pending lock").clear();
                        Err(e.into())
                    }
                };
                let _ = reply.send(result);
            }
            Job::Commit { owner, req, reply } => group.push(Pending { owner, req: *req, reply }),
        }
    }

    /// Prepares each commit (checks, tree blobs), flushes the packer once,
    /// and only then writes the snapshots whose preparation succeeded.
    fn commit_group<'r>(&'r self, packer: &mut Packer<'r>, group: Vec<Pending>) {
        let prepared: Vec<_> = group
            .into_iter()
            .map(|p| {
                let snapshot = self.prepare(packer, p.owner, p.req);
                (snapshot, p.reply)
            })
            .collect();
        // Flush whatever the outcome: no packer state outlives a commit.
        let flushed = std::mem::replace(packer, Packer::new(&self.repo, 1)).finish().map_err(|e| e.to_string());
        self.pending.lock().expect("pending lock").clear();
        for (snapshot, reply) in prepared {
            let result = snapshot.and_then(|s| match &flushed {
                Ok(_) => self.save(s),
                Err(e) => Err(IngestError::Flush(e.clone())),
            });
            let _ = reply.send(result);
        }
    }

    /// Checks a commit against what is stored and saves its trees.
    fn prepare<'r>(&'r self, packer: &Packer<'r>, owner: Owner, req: CommitRequest) -> Result<Snapshot, IngestError> {
        let started = std::time::Instant::now();
        let mut summary = Summary::default();
        let mut root = FileTree::default();
        {
            let index = self.repo.index();
            let pending = self.pending.lock().expect("pending lock");
            let mut missing = Vec::new();
            for f in &req.files {
                let mut size = 0u64;
                for c in &f.chunks {
                    match index.get(c).map(|l| l.raw_len).or_else(|| pending.get(c).copied()) {
                        Some(len) => size += u64::from(len),
                        None => missing.push(*c),
                    }
                }
                if missing.is_empty() && size != f.size {
                    return Err(IngestError::SizeMismatch(f.path.clone()));
                }
            }
            if !missing.is_empty() {
                missing.sort();
                missing.dedup();
                return Err(IngestError::MissingChunks(missing));
            }
        }
        for f in req.files {
            summary.files_new += 1;
            summary.total_bytes += f.size;
            let mtime = Timestamp { sec: f.mtime, nsec: f.mtime_nsec };
            let node = Node {
                name: Vec::new(),
                kind: NodeKind::File { chunks: f.chunks },
                mode: 0o100000 | (f.mode & 0o7777),
                uid: 0,
                gid: 0,
                mtime,
                ctime: mtime,
                inode: 0,
                size: f.size,
            };
            root.insert(&f.path, node)?;
        }
        let tree = root.save(packer, &mut summary)?;
        summary.duration_secs = started.elapsed().as_secs_f64();
        Ok(Snapshot {
            time: chrono::Utc::now().fixed_offset(),
            hostname: req.hostname,
            username: owner.user.clone(),
            tenant: Some(owner.tenant),
            user: Some(owner.user),
            device: Some(owner.device),
            tags: req.tags,
            paths: req.paths,
            tree,
            parent: None,
            summary,
            program_version: format!("chunkvault {}", env!("CARGO_PKG_VERSION")),
        })
    }

    /// Writes a snapshot whose packs and index segments are durable: the commit.
    fn save(&self, snapshot: Snapshot) -> Result<CommitResponse, IngestError> {
        let id = self.repo.save_snapshot(&snapshot)?;
        self.stats.snapshots_committed.fetch_add(1, Ordering::Relaxed);
        Ok(CommitResponse { id, files: snapshot.summary.files_new, bytes: snapshot.summary.total_bytes })
    }
}

/// A commit waiting for its group's flush.
struct Pending {
    owner: Owner,
    req: CommitRequest,
    reply: SyncSender<Result<CommitResponse, IngestError>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ManifestFile;
    use crate::crypto::KdfParams;

    fn tenants(dir: &std::path::Path) -> Tenants {
        let init =
            InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..Default::default() };
        Tenants::new(dir.to_str().unwrap(), b"pw".to_vec(), init)
    }

    fn owner(user: &str) -> Owner {
        Owner { tenant: "acme".into(), user: user.into(), device: "d1".into() }
    }

    #[test]
    fn upload_commit_list_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get("acme").unwrap();
        let data = b"hello chunk".to_vec();
        let id = t.repo().blob_id(&data);
        assert_eq!(t.missing(&[id]), vec![id]);
        assert!(matches!(t.put_chunk(BlobId([0; 32]), data.clone()), Err(IngestError::ChunkMismatch)));
        assert!(t.put_chunk(id, data.clone()).unwrap());
        assert!(!t.put_chunk(id, data.clone()).unwrap());
        assert!(t.missing(&[id]).is_empty());
        let file = |path: &str, size| ManifestFile {
            path: path.into(),
            mode: 0o644,
            mtime: 5,
            mtime_nsec: 0,
            size,
            chunks: vec![id],
        };
        let req = |files| CommitRequest { hostname: "h".into(), paths: vec!["/".into()], tags: vec![], files };
        assert!(matches!(t.commit(owner("a"), req(vec![file("x", 3)])), Err(IngestError::SizeMismatch(_))));
        let done = t.commit(owner("a"), req(vec![file("dir/x", data.len() as u64)])).unwrap();
        assert!(t.repo().index().contains(&id), "a commit makes its chunks durable and indexed");

        assert_eq!(t.snapshots(&owner("a")).unwrap().len(), 1);
        assert!(t.snapshots(&owner("b")).unwrap().is_empty());
        assert!(matches!(t.tree(&owner("b"), &done.id, ""), Err(IngestError::NotOwner)));
        assert_eq!(t.tree(&owner("a"), &done.id, "dir").unwrap()[0].name, "x");
        let node = t.file(&owner("a"), &done.id, "dir/x").unwrap();
        let mut out = Vec::new();
        t.read_file(&node, 6, 100, &mut out).unwrap();
        assert_eq!(out, b"chunk");
        assert!(matches!(t.file(&owner("a"), &done.id, "dir/nope"), Err(IngestError::NotFound(_))));

        let other = BlobId([1; 32]);
        let missing = ManifestFile { chunks: vec![other], ..file("y", 1) };
        assert!(
            matches!(t.commit(owner("a"), req(vec![missing])), Err(IngestError::MissingChunks(m)) if m == vec![other])
        );
    }

    #[test]
    fn concurrent_commits_all_land_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get("acme").unwrap();
        std::thread::scope(|scope| {
            for i in 0..8u8 {
                let t = &t;
                scope.spawn(move || {
                    let data = vec![i; 1000 + usize::from(i)];
                    let id = t.repo().blob_id(&data);
                    t.put_chunk(id, data.clone()).unwrap();
                    let file = ManifestFile {
                        path: "f".into(),
                        mode: 0o600,
                        mtime: 1,
                        mtime_nsec: 0,
                        size: data.len() as u64,
                        chunks: vec![id],
                    };
                    let req = CommitRequest { hostname: "h".into(), paths: vec![], tags: vec![], files: vec![file] };
                    t.commit(owner(&format!("u{i}")), req).unwrap();
                });
            }
        });
        for i in 0..8u8 {
            let o = owner(&format!("u{i}"));
            let snaps = t.snapshots(&o).unwrap();
            assert_eq!(snaps.len(), 1);
            let node = t.file(&o, &snaps[0].id, "f").unwrap();
            let mut out = Vec::new();
            t.read_file(&node, 0, node.size, &mut out).unwrap();
            assert_eq!(out, vec![i; 1000 + usize::from(i)]);
        }
    }

    #[test]
    fn oversized_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get("acme").unwrap();
        let big = vec![0u8; t.repo().config().chunker.max_size as usize + 1];
        let id = t.repo().blob_id(&big);
        assert!(matches!(t.put_chunk(id, big), Err(IngestError::ChunkTooLarge(..))));
    }
}
