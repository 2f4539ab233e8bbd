//! A tenant's writer: one thread owning a write session, fed uploads and
//! commits over a channel (ARCHITECTURE.md, "The storage node and prune").

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::tenants::Tenant;
use super::{check_manifest_size, IngestError, IngestStats, Owner};
use crate::api::{BundleResponse, CommitRequest, CommitResponse, EntryKind, ManifestFile, ON_ALL_CORES_FROM};
use crate::backup::{stream_node, FileTree};
use crate::buffers::UPLOAD_BUFFERS;
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::lock::{LockKind, LockOptions};
use crate::repo::{RepoError, Repository, WriteSession};
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{NodeKind, Timestamp};

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

pub(super) enum Job {
    /// Verified chunks of one upload (a bundle, or a single chunk): ids and
    /// ranges into `body`.
    Upload(Upload),
    Commit {
        owner: Owner,
        req: Box<CommitRequest>,
        reply: SyncSender<Result<CommitResponse, IngestError>>,
    },
}

/// Chunks an upload verified against their ids, waiting to be sealed.
pub(super) struct Upload {
    body: Vec<u8>,
    chunks: Vec<(BlobId, std::ops::Range<usize>)>,
    reply: SyncSender<Result<(), IngestError>>,
}

impl Job {
    /// Answers a job the writer cannot take on.
    fn refuse(self, e: IngestError) {
        match self {
            Job::Upload(u) => drop(u.reply.send(Err(e))),
            Job::Commit { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Why the writer stopped sealing uploads as they came.
enum Stop {
    /// A job to serve once every upload before it is sealed: a commit, or
    /// an upload that came after a failure (it goes to a fresh packer).
    Next(Job),
    /// No job for `WriterTiming::idle`.
    Idle,
    /// Every sender is gone.
    Closed,
}

impl Tenant {
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
        let len = data.len();
        self.store(data, vec![(id, 0..len)])?;
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
        if new.is_empty() {
            UPLOAD_BUFFERS.give(body);
        } else {
            self.store(body, new)?;
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

    /// Hands verified chunks (ranges into `body`) to the writer and waits
    /// until they are sealed into its packs.
    fn store(&self, body: Vec<u8>, chunks: Vec<(BlobId, std::ops::Range<usize>)>) -> Result<(), IngestError> {
        let (reply, rx) = sync_channel(1);
        self.send(Job::Upload(Upload { body, chunks, reply }))?;
        rx.recv().map_err(|_| IngestError::WriterStopped)?
    }

    fn send(&self, job: Job) -> Result<(), IngestError> {
        let tx = self.jobs.lock().expect("jobs lock").clone().ok_or(IngestError::WriterStopped)?;
        tx.send(job).map_err(|_| IngestError::WriterStopped)
    }
}

/// The writer thread's state; see the module docs.
pub(super) struct Writer {
    pub(super) repo: Arc<Repository>,
    pub(super) pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    pub(super) stats: Arc<IngestStats>,
    pub(super) timing: WriterTiming,
}

/// What the writer holds while it has work: a write session (the shared
/// lock, and the packer that accepted chunks under it). Chunks are only ever
/// accepted, and committed, under the lock they were accepted under
/// (ARCHITECTURE.md, "The storage node and prune").
struct Held<'r> {
    session: WriteSession<'r>,
    since: Instant,
}

impl Writer {
    /// Serves jobs until every sender is gone.
    pub(super) fn run(self, jobs: Receiver<Job>) {
        let mut held: Option<Held<'_>> = None;
        // After releasing for `max_hold`, when the lock may be taken again.
        let mut out_until: Option<Instant> = None;
        // A job received but not served yet.
        let mut next: Option<Job> = None;
        loop {
            let job = match next.take() {
                Some(job) => job,
                None if held.is_some() => match jobs.recv_timeout(self.timing.idle) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        self.release(held.take());
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
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
            let (stop, failed) = self.seal_uploads(&h.session, job, &jobs);
            if failed {
                // A failed packer is sticky: it is discarded (the session
                // goes on under the same lock and index) and what it held
                // forgotten; devices upload it again when a commit names it.
                h.session.discard();
                self.pending.lock().expect("pending lock").clear();
            }
            let first = match stop {
                Stop::Idle => {
                    self.release(held.take());
                    continue;
                }
                Stop::Closed => break,
                Stop::Next(upload @ Job::Upload(_)) => {
                    next = Some(upload);
                    continue;
                }
                Stop::Next(Job::Commit { owner, req, reply }) => Pending { owner, req: *req, reply },
            };
            // Group commit: take the commits already queued, so that one
            // flush makes every waiting commit durable (fewer, larger packs).
            let mut group = vec![first];
            while let Ok(job) = jobs.try_recv() {
                match job {
                    Job::Commit { owner, req, reply } => group.push(Pending { owner, req: *req, reply }),
                    upload @ Job::Upload(_) => {
                        next = Some(upload);
                        break;
                    }
                }
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
        // Closed (idle tenant, or shutdown): what the packer holds is made
        // durable and indexed as when idle, so no accepted chunk needs to
        // be uploaded again; it is named by no snapshot until a commit.
        self.release(held);
    }

    /// Seals uploads as they arrive, starting with `first`, each as a task
    /// of its own on the shared rayon pool, so that the uploads of many
    /// requests are sealed at once and no core waits for the slowest chunk
    /// of one upload. Stops at the first job that needs every upload before
    /// it sealed (a commit), at an upload after a failure, when idle or
    /// closed; returns once every upload it started is sealed and answered,
    /// with whether any failed. Uploads in flight are bounded by the upload
    /// requests waiting for their answer.
    fn seal_uploads(&self, session: &WriteSession<'_>, first: Job, jobs: &Receiver<Job>) -> (Stop, bool) {
        let failed = AtomicBool::new(false);
        let stop = rayon::in_place_scope(|scope| {
            let mut job = first;
            loop {
                let upload = match job {
                    Job::Upload(upload) if !failed.load(Ordering::Relaxed) => upload,
                    other => return Stop::Next(other),
                };
                let failed = &failed;
                scope.spawn(move |_| {
                    if !self.seal(session, upload) {
                        failed.store(true, Ordering::Relaxed);
                    }
                });
                job = match jobs.recv_timeout(self.timing.idle) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => return Stop::Idle,
                    Err(RecvTimeoutError::Disconnected) => return Stop::Closed,
                };
            }
        });
        (stop, failed.into_inner())
    }

    /// Seals an upload's chunks into the session's packs on all cores (the
    /// packer is shared by its callers, as in a local backup), records the
    /// new ones as pending, and answers the upload. Returns whether the
    /// packer took them (a failed packer fails every later save).
    fn seal(&self, session: &WriteSession<'_>, upload: Upload) -> bool {
        use rayon::prelude::*;
        let Upload { body, chunks, reply } = upload;
        // `put_bundle` and `put_chunk` verified every id against its bytes.
        let saved = chunks
            .par_iter()
            .map(|(id, r)| session.save_named(BlobKind::Data, *id, &body[r.clone()]).map(|new| (*id, r.len(), new)))
            .collect::<Result<Vec<_>, RepoError>>();
        UPLOAD_BUFFERS.give(body);
        let sealed = saved.is_ok();
        let result = saved.map_err(IngestError::from).map(|saved| {
            let mut pending = self.pending.lock().expect("pending lock");
            for (id, len, new) in saved {
                if new {
                    pending.insert(id, len as u32);
                    self.stats.chunks_stored.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let _ = reply.send(result);
        sealed
    }

    /// Begins a write session: the shared lock, then an index made
    /// trustworthy under it (a prune that ran while the writer held no lock
    /// replaced the index, and its old entries may name deleted packs).
    fn take(&self) -> Result<Held<'_>, IngestError> {
        let session = WriteSession::begin(&self.repo, LockKind::Shared, self.timing.lock, 1)?;
        Ok(Held { session, since: Instant::now() })
    }

    /// Flushes what the writer holds (chunks of sessions that have not
    /// committed yet become durable and indexed, so they need no re-upload
    /// unless a prune removes them meanwhile), then releases the lock.
    fn release(&self, held: Option<Held<'_>>) {
        let Some(Held { mut session, .. }) = held else { return };
        if let Err(e) = session.flush() {
            tracing::warn!("flushing uploaded chunks before releasing the lock: {e}");
        }
        self.pending.lock().expect("pending lock").clear();
        drop(session);
    }

    /// Drops what the writer holds without flushing it.
    fn abandon(&self, held: Option<Held<'_>>) {
        self.pending.lock().expect("pending lock").clear();
        drop(held);
    }

    /// Prepares each commit (checks, tree blobs), then commits the ones
    /// whose preparation succeeded as one group (one flush). Returns whether
    /// the lock was found lapsed (nothing was committed).
    fn commit_group(&self, held: &mut Held<'_>, group: Vec<Pending>) -> bool {
        let prepared: Vec<_> =
            group.into_iter().map(|p| (self.prepare(&held.session, p.owner, p.req), p.reply)).collect();
        // Everything the snapshots name was checked against the index loaded
        // under this lock or accepted under it: still there if the lock held.
        // The group flushes whatever the outcome: no packer state outlives a commit.
        let committed = held.session.commit_group(prepared.iter().filter_map(|(s, _)| s.as_ref().ok()));
        self.pending.lock().expect("pending lock").clear();
        let mut committed = committed.map(Vec::into_iter).map_err(Arc::new);
        let mut lapsed = false;
        for (snapshot, reply) in prepared {
            let result = snapshot.and_then(|s| match &mut committed {
                Ok(ids) => {
                    let id = ids.next().expect("one result per prepared snapshot")?;
                    Ok(self.committed(id, &s))
                }
                Err(e) => Err(IngestError::Flush(e.clone())),
            });
            lapsed |= matches!(result, Err(IngestError::Lock(_)));
            let _ = reply.send(result);
        }
        lapsed
    }

    /// Checks a commit against what is stored and saves its trees.
    fn prepare(&self, session: &WriteSession<'_>, owner: Owner, req: CommitRequest) -> Result<Snapshot, IngestError> {
        let started = std::time::Instant::now();
        let mut summary = Summary::default();
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
        let origin = super::origin(&owner, &req);
        for f in req.files.iter().filter(|f| f.kind == EntryKind::File) {
            summary.files_new += 1;
            summary.total_bytes += f.size;
        }
        // A large manifest's tree is built on all cores, slice by slice,
        // and merged in manifest order.
        let insert = |mut tree: FileTree, f: ManifestFile| {
            let mtime = Timestamp { sec: f.mtime, nsec: f.mtime_nsec };
            let kind = match f.kind {
                EntryKind::File => NodeKind::File { chunks: f.chunks },
                // The subtree is filled in when the directory's tree is saved.
                EntryKind::Dir => NodeKind::Dir { subtree: BlobId([0; 32]) },
                EntryKind::Symlink => NodeKind::Symlink { target: f.target.unwrap_or_default().into_bytes() },
            };
            tree.insert(&f.path, stream_node(kind, f.mode, mtime, f.size)).map(|()| tree)
        };
        let root = if req.files.len() < ON_ALL_CORES_FROM {
            req.files.into_iter().try_fold(FileTree::default(), insert)?
        } else {
            req.files.into_par_iter().with_min_len(4096).try_fold(FileTree::default, insert).try_reduce(
                FileTree::default,
                |mut earlier, later| {
                    earlier.merge(later);
                    Ok(earlier)
                },
            )?
        };
        let tree = root.save(session, &mut summary)?;
        summary.duration_secs = started.elapsed().as_secs_f64();
        Ok(origin.snapshot(chrono::Utc::now().fixed_offset(), tree, summary))
    }

    /// Counts a committed snapshot and answers its commit.
    fn committed(&self, id: SnapshotId, snapshot: &Snapshot) -> CommitResponse {
        self.stats.snapshots_committed.fetch_add(1, Ordering::Relaxed);
        CommitResponse { id, files: snapshot.summary.files_new, bytes: snapshot.summary.total_bytes }
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
    use crate::ingest::tests::{commit_of, file_entry, owner};
    use crate::test_support::{cheap_init, PASSWORD};

    /// Uploads `files` (path, content; one chunk each) and commits them.
    fn upload_and_commit(t: &Tenant, files: &[(&str, Vec<u8>)]) -> Result<CommitResponse, IngestError> {
        let mut manifest = Vec::new();
        for (path, data) in files {
            let id = t.repo().blob_id(data);
            t.put_chunk(id, data.clone())?;
            manifest.push(file_entry(path, data.len() as u64, vec![id]));
        }
        t.commit(owner("a"), commit_of(manifest))
    }

    /// For each fault kind, fails write point k = 0, 1, ... of a device's
    /// uploads and commit through a tenant's writer, until they get past
    /// every point. After each fault the device retries (as it does on any
    /// error) and must succeed; then the repository checks without damage
    /// and every committed snapshot reads back exactly.
    #[test]
    fn every_fault_at_every_write_point_of_the_writer_loses_nothing() {
        use crate::backend::{Fault, FaultyBackend, FileType, LocalBackend};
        type MakeFault = fn(usize) -> Fault;
        let faults: [(&str, MakeFault); 4] = [
            ("eio", |k| Fault::FailPut { nth: k, file_type: None }),
            ("torn pack", |k| Fault::TornPut { nth: k, file_type: Some(FileType::Pack), keep: 10 }),
            ("torn index", |k| Fault::TornPut { nth: k, file_type: Some(FileType::Index), keep: 10 }),
            ("crash", |k| Fault::FailAfter { ops: k }),
        ];
        let files: Vec<(&str, Vec<u8>)> =
            vec![("a", vec![1; 3000]), ("d/b", vec![2; 5000]), ("d/e/c", (0..9000u32).map(|i| i as u8).collect())];
        let init = cheap_init();
        for (name, make) in faults {
            let mut fired = 0;
            for k in 0.. {
                let why = format!("{name} at write point {k}");
                let dir = tempfile::tempdir().unwrap();
                let local = || Arc::new(LocalBackend::open(dir.path()).unwrap());
                Repository::init(Arc::new(LocalBackend::create(dir.path()).unwrap()), PASSWORD, &init).unwrap();
                let faulty = Arc::new(FaultyBackend::new(local()));
                let repo = Arc::new(Repository::open(faulty.clone(), PASSWORD).unwrap());
                let t = Tenant::start("acme", repo, Arc::default(), WriterTiming::default());
                faulty.inject(make(k));
                let first = upload_and_commit(&t, &files);
                faulty.clear();
                let retry = upload_and_commit(&t, &files).unwrap_or_else(|e| panic!("{why}: retry: {e}"));
                drop(t);

                let repo = Repository::open(local(), PASSWORD).unwrap();
                let report = crate::check::check(
                    &repo,
                    crate::check::CheckOptions { read_data: true, ..Default::default() },
                    &Default::default(),
                )
                .unwrap();
                assert!(!report.has_damage(), "{why}: {:?}", report.problems);
                let mut expected: Vec<SnapshotId> = first.iter().map(|c| c.id).chain([retry.id]).collect();
                expected.sort();
                let mut listed: Vec<SnapshotId> =
                    repo.list_snapshots().unwrap().into_iter().map(|(id, _)| id).collect();
                listed.sort();
                assert_eq!(listed, expected, "{why}: exactly the committed snapshots exist");
                for id in &listed {
                    let snapshot = repo.load_snapshot(id).unwrap();
                    for (path, data) in &files {
                        let node = repo.find_node(&snapshot.tree, path).unwrap().unwrap();
                        let mut out = Vec::new();
                        crate::restore::cat(&repo, &node, None, &mut out).unwrap();
                        assert_eq!(&out, data, "{why}: {path}");
                    }
                }
                if first.is_ok() {
                    break;
                }
                fired += 1;
            }
            assert!(fired >= 1, "{name}: no write point of the writer was exercised");
        }
    }
}
