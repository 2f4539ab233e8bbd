//! The library side of a storage node: one repository per tenant under a
//! root, opened on demand with keys wrapped by the server's password, a
//! long-lived writer per tenant that takes verified chunks from many
//! concurrent uploads, and reads filtered by the owning user.
//!
//! The writer is one thread per tenant owning a [`Packer`]: uploads hand it
//! chunks over a channel; a snapshot commit flushes the packer (every pack and
//! index segment durable) and only then writes the snapshot, so a crash loses
//! at most chunks not yet named by a committed snapshot.
//!
//! The writer holds the repository's shared lock only while it has work (see
//! [`WriterTiming`] and ARCHITECTURE.md, "The storage node and prune"), so that a prune of
//! a tenant repository gets in between sessions and never deletes data a
//! later commit names.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{
    BundleResponse, CommitRequest, CommitResponse, EntryKind, PlanChunk, PlanEntry, Policies, RestorePlanResponse,
    SnapshotInfo, TreeEntry,
};
use crate::backup::{BackupError, FileTree};
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::lock::{LockError, LockGuard, LockKind, LockOptions};
use crate::packer::Packer;
use crate::repo::{self, InitOptions, RepoError, Repository};
use crate::restore::RestoreError;
use crate::snapshot::{Snapshot, Summary, MAX_SNAPSHOT_SIZE};
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
    #[error("chunk {0} of the bundle does not hash to its id; nothing of the bundle was stored")]
    BundleMismatch(BlobId),
    #[error("{} chunks are not stored; upload them first", .0.len())]
    MissingChunks(Vec<BlobId>),
    #[error("{0}: size does not match its chunks")]
    SizeMismatch(String),
    #[error("{0}")]
    NotFound(String),
    #[error("this snapshot belongs to another user")]
    NotOwner,
    #[error("this snapshot was made by another device, and this device's policy forbids restoring it")]
    OtherDevice,
    #[error("the snapshot manifest would be {0} bytes, more than the {1} a snapshot may have")]
    ManifestTooLarge(usize, usize),
    #[error("reading: {0}")]
    Read(String),
    #[error("the tenant's writer stopped")]
    WriterStopped,
    #[error("making uploads durable: {0}")]
    Flush(String),
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// When a tenant's writer holds the repository's shared lock. It takes the
/// lock when work arrives and gives it up when idle, or after a commit once
/// it has held it for `max_hold`, so that a prune of the tenant repository
/// can run between sessions even under steady load.
#[derive(Clone, Copy, Debug)]
pub struct WriterTiming {
    /// Without work for this long, the writer flushes what it holds and
    /// releases the lock.
    pub idle: Duration,
    /// Held this long, the lock is released after the next commit ...
    pub max_hold: Duration,
    /// ... and not taken again for this long: longer than a waiting prune's
    /// longest backoff between tries (2 s plus jitter), so it gets its turn.
    pub yield_for: Duration,
    /// Timing of the lock itself; `wait` bounds how long work waits for a
    /// running prune before it is refused (`503 repository_locked`).
    pub lock: LockOptions,
}

impl Default for WriterTiming {
    fn default() -> Self {
        WriterTiming {
            idle: Duration::from_secs(5),
            max_hold: Duration::from_secs(10 * 60),
            yield_for: Duration::from_secs(3),
            lock: LockOptions { wait: Duration::from_secs(30), ..LockOptions::default() },
        }
    }
}

/// Who a request acts for (from a verified session token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tenant: String,
    pub user: String,
    pub device: String,
    /// The device's policies, as signed into the session token.
    pub policies: Policies,
}

/// Room left in a manifest for what the commit adds after the size check
/// (summary counts, duration, tree id): a few hundred bytes at most.
const MANIFEST_MARGIN: usize = 4096;

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
    timing: WriterTiming,
    /// Session token ids seen, with their expiry: the first request of each
    /// new session refreshes its tenant's index.
    sessions: Mutex<HashMap<[u8; 16], i64>>,
}

/// One tenant's entry: locked on its own while the repository opens (an
/// Argon2id unwrap), so opening one tenant does not stall the others.
type Slot = Arc<Mutex<Option<Arc<Tenant>>>>;

impl Tenants {
    /// `root` is a directory or an object-store URL (`s3://bucket/prefix`);
    /// `init` is used for tenants created here.
    pub fn new(root: &str, password: Vec<u8>, init: InitOptions) -> Tenants {
        Tenants {
            root: root.trim_end_matches('/').to_owned(),
            password,
            init,
            open: Mutex::default(),
            stats: Arc::default(),
            timing: WriterTiming::default(),
            sessions: Mutex::default(),
        }
    }

    /// Sets the writers' lock timing (for tenants opened after this).
    pub fn with_writer_timing(mut self, timing: WriterTiming) -> Tenants {
        self.timing = timing;
        self
    }

    /// Notes a verified session. The first time a session is seen, its
    /// tenant (if open) will bring its index up to date at the next
    /// [`get`](Self::get): other storage nodes on the same store may have
    /// added chunks, or a prune replaced the index. Requests of a session
    /// already seen cost nothing here. Never waits for I/O (it runs on the
    /// async side): a tenant being opened loads a fresh index anyway.
    pub fn session_seen(&self, tenant: &str, token_id: [u8; 16], expires: i64, now: i64) {
        let new = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions.len() > 100_000 {
                sessions.retain(|_, e| *e > now);
            }
            sessions.insert(token_id, expires).is_none()
        };
        if !new {
            return;
        }
        let Some(slot) = self.open.lock().expect("tenants lock").get(tenant).cloned() else { return };
        // Locked: the tenant is being opened, with a fresh index.
        let opened = match slot.try_lock() {
            Ok(t) => t.clone(),
            Err(_) => None,
        };
        if let Some(t) = opened {
            t.wanted.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn stats(&self) -> &Arc<IngestStats> {
        &self.stats
    }

    /// The tenant's repository, opened (or created, on first use) once and
    /// kept. `tenant` must already be validated (`api::check_tenant`).
    pub fn get(&self, tenant: &str) -> Result<Arc<Tenant>, IngestError> {
        let t = self.open(tenant)?;
        t.refresh_if_wanted()?;
        Ok(t)
    }

    fn open(&self, tenant: &str) -> Result<Arc<Tenant>, IngestError> {
        let slot = self.open.lock().expect("tenants lock").entry(tenant.to_owned()).or_default().clone();
        let mut slot = slot.lock().expect("tenant lock");
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let location = format!("{}/{tenant}", self.root);
        // No repository yet: a local root says so when opening the backend,
        // an object store only when the config is not there.
        let repo = match repo::open_backend(&location, false).and_then(|b| Repository::open(b, &self.password)) {
            Ok(repo) => repo,
            Err(RepoError::NotARepository(_)) => {
                Repository::init(repo::open_backend(&location, true)?, &self.password, &self.init)?
            }
            Err(e) => return Err(e.into()),
        };
        let t = Arc::new(Tenant::start(tenant, Arc::new(repo), self.stats.clone(), self.timing));
        *slot = Some(t.clone());
        Ok(t)
    }
}

enum Job {
    Put {
        id: BlobId,
        data: Vec<u8>,
        reply: SyncSender<Result<(), IngestError>>,
    },
    /// Verified chunks of one bundle: ids and ranges into `body`.
    PutMany {
        body: Vec<u8>,
        chunks: Vec<(BlobId, std::ops::Range<usize>)>,
        reply: SyncSender<Result<(), IngestError>>,
    },
    Commit {
        owner: Owner,
        req: Box<CommitRequest>,
        reply: SyncSender<Result<CommitResponse, IngestError>>,
    },
}

impl Job {
    /// Answers a job the writer cannot take on.
    fn refuse(self, e: IngestError) {
        match self {
            Job::Put { reply, .. } | Job::PutMany { reply, .. } => drop(reply.send(Err(e))),
            Job::Commit { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// One tenant's repository and its writer.
pub struct Tenant {
    repo: Arc<Repository>,
    jobs: Mutex<SyncSender<Job>>,
    /// Chunks the writer holds in open packs, with their raw lengths: stored
    /// as far as uploads are concerned, durable at the next commit.
    pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    stats: Arc<IngestStats>,
    /// Bumped by each new session: the index should be brought up to date.
    wanted: AtomicU64,
    /// The last `wanted` the index was brought up to date for; held while
    /// refreshing, so a request of a new session waits for the refresh.
    refreshed: Mutex<u64>,
    /// The chunks of recently planned snapshots, newest last: the chunk
    /// stream hands out only chunks of a snapshot the session may read.
    snapshot_chunks: Mutex<Vec<(SnapshotId, Arc<HashSet<BlobId>>)>>,
}

/// Chunks a session may read, from [`Tenant::grant_chunks`].
pub struct ChunkGrant(Vec<BlobId>);

/// Snapshots whose chunk sets a tenant keeps (about 3 MiB for a snapshot
/// of 45,000 chunks).
const CACHED_CHUNK_SETS: usize = 8;

impl Tenant {
    fn start(name: &str, repo: Arc<Repository>, stats: Arc<IngestStats>, timing: WriterTiming) -> Tenant {
        let (tx, rx) = sync_channel(16);
        let pending: Arc<Mutex<HashMap<BlobId, u32>>> = Arc::default();
        let writer = Writer { repo: repo.clone(), pending: pending.clone(), stats: stats.clone(), timing };
        std::thread::Builder::new()
            .name(format!("writer-{name}"))
            .spawn(move || writer.run(rx))
            .expect("spawn tenant writer");
        Tenant {
            repo,
            jobs: Mutex::new(tx),
            pending,
            stats,
            wanted: AtomicU64::new(0),
            refreshed: Mutex::new(0),
            snapshot_chunks: Mutex::default(),
        }
    }

    /// Brings the index up to date if a new session asked for it: one
    /// listing of `index/` when nothing changed; new segments are fetched,
    /// and a replaced index (a prune ran) is reloaded, so reads do not look
    /// for blobs in packs that are gone. Uploads never rely on this alone:
    /// the writer checks the index again under its lock.
    fn refresh_if_wanted(&self) -> Result<(), IngestError> {
        let wanted = self.wanted.load(Ordering::SeqCst);
        let mut refreshed = self.refreshed.lock().expect("refresh lock");
        if *refreshed < wanted {
            self.refresh()?;
            *refreshed = wanted;
        }
        Ok(())
    }

    /// Reloads a replaced index, else loads the segments added since.
    /// Callers hold `refreshed`, so one refresh runs at a time.
    fn refresh(&self) -> Result<(), IngestError> {
        if !self.repo.reload_index_if_replaced()? {
            self.repo.refresh_index()?;
        }
        Ok(())
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Plaintext bytes of the chunks the writer accepted and has not yet
    /// committed (for quota accounting: some may already be in packs).
    pub fn pending_bytes(&self) -> u64 {
        self.pending.lock().expect("pending lock").values().map(|&n| u64::from(n)).sum()
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

    /// Verifies every chunk of a bundle (`api::parse_bundle`'s ranges into
    /// `body`) against its id and size bound, on all cores, before storing
    /// any; then hands the ones neither the index nor the writer has to the
    /// writer in one job. A bundle with one wrong chunk stores nothing.
    pub fn put_bundle(
        &self,
        body: Vec<u8>,
        chunks: Vec<(BlobId, std::ops::Range<usize>)>,
    ) -> Result<BundleResponse, IngestError> {
        use rayon::prelude::*;
        let max = self.repo.config().chunker.max_size;
        if let Some((_, r)) = chunks.iter().find(|(_, r)| r.len() > max as usize) {
            return Err(IngestError::ChunkTooLarge(r.len(), max));
        }
        let bad = chunks.par_iter().find_any(|(id, r)| self.repo.blob_id(&body[r.clone()]) != *id);
        if let Some((id, _)) = bad {
            return Err(IngestError::BundleMismatch(*id));
        }
        let total = chunks.len() as u64;
        let mut seen = HashSet::with_capacity(chunks.len());
        let unique: Vec<_> = chunks.into_iter().filter(|(id, _)| seen.insert(*id)).collect();
        let ids: Vec<BlobId> = unique.iter().map(|(id, _)| *id).collect();
        let missing: HashSet<BlobId> = self.missing(&ids).into_iter().collect();
        let new: Vec<_> = unique.into_iter().filter(|(id, _)| missing.contains(id)).collect();
        let stored = new.len() as u64;
        self.stats.chunks_deduplicated.fetch_add(total - stored, Ordering::Relaxed);
        if !new.is_empty() {
            let (reply, rx) = sync_channel(1);
            self.send(Job::PutMany { body, chunks: new, reply })?;
            rx.recv().map_err(|_| IngestError::WriterStopped)??;
        }
        Ok(BundleResponse { stored, deduplicated: total - stored })
    }

    /// Commits a snapshot of the files a device uploaded; refuses it unless
    /// every chunk it names is stored and every file's size adds up.
    pub fn commit(&self, owner: Owner, req: CommitRequest) -> Result<CommitResponse, IngestError> {
        check_manifest_size(&owner, &req)?;
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
    /// `include` paths): every entry, and every chunk once, in pack order.
    pub fn restore_plan(
        &self,
        owner: &Owner,
        id: &SnapshotId,
        include: &[String],
    ) -> Result<RestorePlanResponse, IngestError> {
        let snapshot = self.readable_snapshot(owner, id)?;
        let plan = crate::restore::plan(&self.repo, &snapshot, include).map_err(|e| match e {
            RestoreError::Repo(r) => IngestError::Repo(r),
            other => IngestError::NotFound(other.to_string()),
        })?;
        let wire = |e: &crate::restore::PlanEntry| {
            let n = &e.node;
            let (kind, chunks, target) = match &n.kind {
                NodeKind::File { chunks } => (EntryKind::File, chunks.clone(), None),
                NodeKind::Dir { .. } => (EntryKind::Dir, Vec::new(), None),
                NodeKind::Symlink { target } => {
                    (EntryKind::Symlink, Vec::new(), Some(String::from_utf8_lossy(target).into_owned()))
                }
                // Not reached: fifos and devices are in `plan.specials`,
                // which a device is not sent.
                NodeKind::Special { .. } => (EntryKind::File, Vec::new(), None),
            };
            PlanEntry {
                path: e.rel.to_string_lossy().into_owned(),
                kind,
                mode: n.mode & 0o7777,
                uid: n.uid,
                gid: n.gid,
                mtime: n.mtime.sec,
                mtime_nsec: n.mtime.nsec,
                size: n.size,
                chunks,
                target,
            }
        };
        let entries = plan.dirs.iter().chain(&plan.files).chain(&plan.symlinks).map(wire).collect();
        let (packs, missing) = self.repo.plan_blob_reads(plan.chunks());
        if let Some(id) = missing.first() {
            return Err(IngestError::Repo(RepoError::MissingBlob(*id)));
        }
        let chunks = packs
            .iter()
            .flat_map(|(_, blobs)| blobs.iter().map(|(id, l)| PlanChunk { id: *id, len: l.raw_len }))
            .collect();
        Ok(RestorePlanResponse { entries, chunks })
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
        let plan = crate::restore::plan(&self.repo, snapshot, &[]).map_err(|e| match e {
            RestoreError::Repo(r) => IngestError::Repo(r),
            other => IngestError::Read(other.to_string()),
        })?;
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

/// Refuses a commit whose manifest could not be read back (over
/// [`MAX_SNAPSHOT_SIZE`]): such a snapshot would fail `check` for good. The
/// request's fields are bounded one by one (`api`); their encoding (JSON
/// escapes of control characters take six bytes each) is what is measured
/// here, before any tree is written.
pub fn check_manifest_size(owner: &Owner, req: &CommitRequest) -> Result<(), IngestError> {
    let draft = Snapshot {
        time: chrono::Utc::now().fixed_offset(),
        hostname: req.hostname.clone(),
        username: owner.user.clone(),
        tenant: Some(owner.tenant.clone()),
        user: Some(owner.user.clone()),
        device: Some(owner.device.clone()),
        tags: req.tags.clone(),
        paths: req.paths.clone(),
        tree: BlobId([0; 32]),
        parent: None,
        summary: Summary::default(),
        program_version: format!("chunkvault {}", env!("CARGO_PKG_VERSION")),
    };
    let len = draft.encode().len();
    if len + MANIFEST_MARGIN > MAX_SNAPSHOT_SIZE {
        return Err(IngestError::ManifestTooLarge(len, MAX_SNAPSHOT_SIZE - MANIFEST_MARGIN));
    }
    Ok(())
}

fn owns(owner: &Owner, s: &Snapshot) -> bool {
    s.tenant.as_deref() == Some(owner.tenant.as_str()) && s.user.as_deref() == Some(owner.user.as_str())
}

struct Writer {
    repo: Arc<Repository>,
    pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    stats: Arc<IngestStats>,
    timing: WriterTiming,
}

/// What the writer holds while it has work: the shared lock, and the packer
/// that accepted chunks under it. Chunks are only ever accepted, and
/// committed, under the lock they were accepted under (ARCHITECTURE.md,
/// "The storage node and prune").
struct Held<'r> {
    guard: LockGuard,
    packer: Packer<'r>,
    since: Instant,
}

impl Writer {
    fn run(self, jobs: Receiver<Job>) {
        let mut held: Option<Held<'_>> = None;
        // After releasing for `max_hold`, when the lock may be taken again.
        let mut out_until: Option<Instant> = None;
        loop {
            let job = if held.is_some() {
                match jobs.recv_timeout(self.timing.idle) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        self.release(held.take());
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            if held.is_none() {
                if let Some(until) = out_until.take() {
                    // Not a wait for readiness: a turn for a waiting prune.
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                }
                match self.take() {
                    Ok(h) => held = Some(h),
                    Err(e) => {
                        job.refuse(e);
                        continue;
                    }
                }
            }
            let h = held.as_mut().expect("held after take");
            let mut group = Vec::new();
            self.handle(&mut h.packer, job, &mut group);
            if group.is_empty() {
                continue;
            }
            // Group commit: take what is already queued, so that one flush
            // makes every waiting commit durable (fewer, larger packs).
            while let Ok(next) = jobs.try_recv() {
                self.handle(&mut h.packer, next, &mut group);
            }
            if self.commit_group(h, group) {
                // The lock may have lapsed, so others may have pruned:
                // nothing accepted under it may be used any more.
                self.abandon(held.take());
            } else if h.since.elapsed() >= self.timing.max_hold {
                // Right after a commit the packer is empty.
                self.release(held.take());
                out_until = Some(Instant::now() + self.timing.yield_for);
            }
        }
        // Shutdown: the open packer is dropped without a commit; its chunks
        // are named by no snapshot, so the repository stays consistent.
        self.abandon(held);
    }

    /// Takes the shared lock, then makes the index trustworthy under it: a
    /// prune that ran while the writer held no lock replaced the index, and
    /// its old entries may name deleted packs. Only then a packer is made,
    /// which deduplicates against that index.
    fn take(&self) -> Result<Held<'_>, IngestError> {
        let guard = self.repo.lock(LockKind::Shared, self.timing.lock)?;
        self.repo.reload_index_if_replaced()?;
        Ok(Held { guard, packer: Packer::new(&self.repo, 1), since: Instant::now() })
    }

    /// Flushes what the writer holds (chunks of sessions that have not
    /// committed yet become durable and indexed, so they need no re-upload
    /// unless a prune removes them meanwhile), then releases the lock.
    fn release(&self, held: Option<Held<'_>>) {
        let Some(Held { guard, packer, .. }) = held else { return };
        if let Err(e) = packer.finish() {
            tracing::warn!("flushing uploaded chunks before releasing the lock: {e}");
        }
        self.pending.lock().expect("pending lock").clear();
        drop(guard);
    }

    /// Drops what the writer holds without flushing it.
    fn abandon(&self, held: Option<Held<'_>>) {
        self.pending.lock().expect("pending lock").clear();
        drop(held);
    }

    /// Stores an upload at once; queues a commit into `group`.
    /// Records chunks the packer took (`(id, length, new)`) as pending; a
    /// failed packer is sticky, so it is replaced (under the same lock and
    /// index) and what it held forgotten (devices re-upload at commit).
    fn settle_uploads<'r>(
        &'r self,
        packer: &mut Packer<'r>,
        saved: Result<Vec<(BlobId, usize, bool)>, RepoError>,
    ) -> Result<(), IngestError> {
        match saved {
            Ok(saved) => {
                let mut pending = self.pending.lock().expect("pending lock");
                for (id, len, new) in saved {
                    if new {
                        pending.insert(id, len as u32);
                        self.stats.chunks_stored.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
            Err(e) => {
                drop(std::mem::replace(packer, Packer::new(&self.repo, 1)));
                self.pending.lock().expect("pending lock").clear();
                Err(e.into())
            }
        }
    }

    fn handle<'r>(&'r self, packer: &mut Packer<'r>, job: Job, group: &mut Vec<Pending>) {
        match job {
            Job::Put { id, data, reply } => {
                // `put_chunk` verified that `id` is the hash of `data`.
                let saved = packer.save_named(BlobKind::Data, id, &data).map(|new| vec![(id, data.len(), new)]);
                let result = self.settle_uploads(packer, saved);
                let _ = reply.send(result);
            }
            Job::PutMany { body, chunks, reply } => {
                // Sealing (compression, encryption) on all cores: the
                // packer is shared by its callers, as in a local backup.
                use rayon::prelude::*;
                // `put_bundle` verified every id against its bytes.
                let saved = chunks
                    .par_iter()
                    .map(|(id, r)| {
                        packer.save_named(BlobKind::Data, *id, &body[r.clone()]).map(|new| (*id, r.len(), new))
                    })
                    .collect::<Result<Vec<_>, _>>();
                let result = self.settle_uploads(packer, saved);
                let _ = reply.send(result);
            }
            Job::Commit { owner, req, reply } => group.push(Pending { owner, req: *req, reply }),
        }
    }

    /// Prepares each commit (checks, tree blobs), flushes the packer once,
    /// and only then writes the snapshots whose preparation succeeded.
    /// Returns whether the lock was found lapsed (nothing was committed).
    fn commit_group<'r>(&'r self, held: &mut Held<'r>, group: Vec<Pending>) -> bool {
        let prepared: Vec<_> = group
            .into_iter()
            .map(|p| {
                let snapshot = self.prepare(&held.packer, p.owner, p.req);
                (snapshot, p.reply)
            })
            .collect();
        // Flush whatever the outcome: no packer state outlives a commit.
        let flushed =
            std::mem::replace(&mut held.packer, Packer::new(&self.repo, 1)).finish().map_err(|e| e.to_string());
        self.pending.lock().expect("pending lock").clear();
        let mut lapsed = false;
        for (snapshot, reply) in prepared {
            let result = snapshot.and_then(|s| match &flushed {
                Ok(_) => {
                    // Everything the snapshot names was checked against the
                    // index loaded under this lock or accepted under it:
                    // still there if the lock held.
                    held.guard.check()?;
                    self.save(s)
                }
                Err(e) => Err(IngestError::Flush(e.clone())),
            });
            lapsed |= matches!(result, Err(IngestError::Lock(_)));
            let _ = reply.send(result);
        }
        lapsed
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
            let mtime = Timestamp { sec: f.mtime, nsec: f.mtime_nsec };
            let (kind, type_bits) = match f.kind {
                EntryKind::File => {
                    summary.files_new += 1;
                    summary.total_bytes += f.size;
                    (NodeKind::File { chunks: f.chunks }, 0o100000)
                }
                // The subtree is filled in when the directory's tree is saved.
                EntryKind::Dir => (NodeKind::Dir { subtree: BlobId([0; 32]) }, 0o040000),
                EntryKind::Symlink => {
                    (NodeKind::Symlink { target: f.target.unwrap_or_default().into_bytes() }, 0o120000)
                }
            };
            let node = Node {
                name: Vec::new(),
                kind,
                mode: type_bits | (f.mode & 0o7777),
                uid: 0,
                gid: 0,
                mtime,
                ctime: mtime,
                inode: 0,
                size: f.size,
                extra: crate::tree::NodeExtra::default(),
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
        Owner { tenant: "acme".into(), user: user.into(), device: "d1".into(), policies: Policies::default() }
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
            kind: crate::api::EntryKind::File,
            target: None,
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
                        kind: crate::api::EntryKind::File,
                        target: None,
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
    fn a_policy_keeps_reads_to_the_devices_own_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenants(dir.path()).get("acme").unwrap();
        let data = b"phone data".to_vec();
        let id = t.repo().blob_id(&data);
        t.put_chunk(id, data.clone()).unwrap();
        let file = ManifestFile {
            kind: crate::api::EntryKind::File,
            target: None,
            path: "f".into(),
            mode: 0o600,
            mtime: 1,
            mtime_nsec: 0,
            size: 10,
            chunks: vec![id],
        };
        let req = CommitRequest { hostname: "h".into(), paths: vec![], tags: vec![], files: vec![file] };
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
        let t = tenants(dir.path()).get("acme").unwrap();
        // Within every field bound, but each control character encodes as
        // six bytes of JSON: 24 MiB of manifest.
        let path = "\u{1}".repeat(crate::api::MAX_MANIFEST_PATH);
        let paths = vec![path; crate::api::MAX_MANIFEST_PATHS];
        let req = CommitRequest { hostname: "h".into(), paths, tags: vec![], files: vec![] };
        assert!(matches!(t.commit(owner("a"), req), Err(IngestError::ManifestTooLarge(..))));
        assert!(t.repo().list_snapshots().unwrap().is_empty());
        assert!(t.repo().index().is_empty(), "no tree was written");
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
