//! The one write transaction: [`WriteSession`].
//!
//! Every stage that adds data to a repository (backup, stream backup, the
//! storage node's writer, `repair snapshots`, prune's repack) goes through a
//! session, so the commit protocol (ARCHITECTURE.md, "The commit protocol")
//! is written once, here, in an order callers cannot change:
//!
//! 1. [`WriteSession::begin`] takes the lock (shared to add data, exclusive
//!    for prune), then reloads the index if a prune replaced it since it was
//!    loaded: only then is it trusted for deduplication;
//! 2. blobs are saved through a packer made under that lock;
//! 3. [`WriteSession::commit`] finishes the packer (every pack durable, then
//!    the index segments naming them), checks that the lock is still held,
//!    and only then writes the snapshot.
//!
//! Dropping a session without committing abandons it: the packer's upload
//! threads stop and the lock is released. Packs already uploaded are named by
//! no index segment (or by segments no snapshot uses): garbage for prune,
//! exactly what a crash at the same point leaves.

use std::sync::{Arc, OnceLock};

use super::{RepoError, Repository};
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::index::PackEntries;
use crate::lock::{LockError, LockGuard, LockKind, LockOptions};
use crate::packer::{Packer, PackerStats};
use crate::snapshot::Snapshot;

/// Why a write session could not start or commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Storage, or the packer's sticky upload failure.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The lock could not be taken, or may have lapsed before the commit.
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl WriteError {
    /// Into a stage's own error type, which has a variant for each part.
    pub fn split<E: From<RepoError> + From<LockError>>(self) -> E {
        match self {
            WriteError::Repo(e) => e.into(),
            WriteError::Lock(e) => e.into(),
        }
    }
}

/// A lock, a packer made under it, and the commit that ends them; see the
/// module docs. `Sync`: blobs may be saved from many threads at once.
pub struct WriteSession<'r> {
    repo: &'r Repository,
    /// `None` in a dry run, which takes no lock and writes nothing.
    guard: Option<LockGuard>,
    /// Made on first use, and again after each [`WriteSession::flush`].
    packer: OnceLock<Packer<'r>>,
    uploaders: usize,
    dry_run: bool,
    /// Counters over every packer of the session.
    stats: Arc<PackerStats>,
}

impl<'r> WriteSession<'r> {
    /// Takes a lock of `kind` (waiting as `lock` says), then reloads the
    /// index if a prune or `repair index` replaced it since it was loaded.
    /// Packs are uploaded by `uploaders` threads (at least 1), started at
    /// the first save.
    ///
    /// Blocks up to `lock.wait` while a conflicting lock is held, then
    /// fails with [`WriteError::Lock`]; storage errors listing or reloading
    /// the index are [`WriteError::Repo`].
    pub fn begin(
        repo: &'r Repository,
        kind: LockKind,
        lock: LockOptions,
        uploaders: usize,
    ) -> Result<WriteSession<'r>, WriteError> {
        let guard = repo.lock(kind, lock)?;
        repo.reload_index_if_replaced()?;
        Ok(WriteSession::assemble(repo, Some(guard), uploaders, false))
    }

    /// A session that deduplicates, compresses and seals like a real one and
    /// counts what it would store, but takes no lock and writes nothing: no
    /// pack, no index segment, no snapshot.
    pub fn dry_run(repo: &'r Repository) -> WriteSession<'r> {
        WriteSession::assemble(repo, None, 1, true)
    }

    fn assemble(repo: &'r Repository, guard: Option<LockGuard>, uploaders: usize, dry_run: bool) -> Self {
        WriteSession { repo, guard, packer: OnceLock::new(), uploaders, dry_run, stats: Arc::default() }
    }

    /// The repository written to.
    pub fn repo(&self) -> &'r Repository {
        self.repo
    }

    /// Whether this is a [`WriteSession::dry_run`].
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// What the session stored so far, shared so a progress display can read it.
    pub fn stats(&self) -> Arc<PackerStats> {
        self.stats.clone()
    }

    fn packer(&self) -> &Packer<'r> {
        self.packer.get_or_init(|| Packer::with_stats(self.repo, self.uploaders, self.stats.clone(), self.dry_run))
    }

    /// Stores a blob unless the repository or this session has it; returns
    /// its id and whether it was new. See [`Packer::save`]: callable from
    /// many threads, blocks while the upload queue is full, and fails with
    /// [`RepoError::Upload`] for good once an upload failed (until
    /// [`WriteSession::discard`] or [`WriteSession::flush`]).
    pub fn save(&self, kind: BlobKind, plaintext: &[u8]) -> Result<(BlobId, bool), RepoError> {
        self.packer().save(kind, plaintext)
    }

    /// Stores a blob whose id the caller computed and verified. See
    /// [`Packer::save_named`] (a wrong id panics in debug builds).
    pub fn save_named(&self, kind: BlobKind, id: BlobId, plaintext: &[u8]) -> Result<bool, RepoError> {
        self.packer().save_named(kind, id, plaintext)
    }

    /// Stores an already sealed blob even though the index knows it
    /// elsewhere (prune's repack). See [`Packer::save_stored`].
    pub fn save_stored(&self, kind: BlobKind, id: BlobId, raw_len: u32, stored: &[u8]) -> Result<bool, RepoError> {
        self.packer().save_stored(kind, id, raw_len, stored)
    }

    /// Makes every blob saved so far durable and indexed (packs, then their
    /// index segments) and returns the packs written. Whatever the outcome,
    /// the packer is done: the next save starts a fresh one under the same
    /// lock, and after a failure what the old one held is lost (its uploaded
    /// packs are garbage for prune).
    pub fn flush(&mut self) -> Result<Vec<PackEntries>, RepoError> {
        match self.packer.take() {
            Some(packer) => packer.finish(),
            None => Ok(Vec::new()),
        }
    }

    /// Drops what was saved since the last flush without making it durable
    /// (a packer whose upload failed refuses all further work; the session
    /// goes on with a fresh one).
    pub fn discard(&mut self) {
        drop(self.packer.take());
    }

    /// Fails if the lock may have lapsed: others may have pruned meanwhile,
    /// so nothing accepted under it may be committed or deleted. A dry run
    /// holds no lock and always passes.
    pub fn check_lock(&self) -> Result<(), LockError> {
        self.guard.as_ref().map_or(Ok(()), LockGuard::check)
    }

    /// The commit: flush (every pack and index segment durable), check the
    /// lock, write the snapshot, release the lock. A dry run writes nothing
    /// and returns `None`.
    pub fn commit(mut self, snapshot: &Snapshot) -> Result<Option<SnapshotId>, WriteError> {
        self.flush()?;
        if self.dry_run {
            return Ok(None);
        }
        Ok(Some(self.write_snapshot(snapshot)?))
    }

    /// Commits several snapshots after one flush, keeping the session (and
    /// its lock) for more work: the storage node's group commit, `repair
    /// snapshots`. If the flush fails nothing is written (`Err`); otherwise
    /// each snapshot is written after its own lock check, and a
    /// [`WriteError::Lock`] among the results means the lock may have
    /// lapsed: the caller must drop the session. A dry run writes nothing
    /// and returns no results.
    pub fn commit_group<'s>(
        &mut self,
        snapshots: impl IntoIterator<Item = &'s Snapshot>,
    ) -> Result<Vec<Result<SnapshotId, WriteError>>, RepoError> {
        self.flush()?;
        if self.dry_run {
            return Ok(Vec::new());
        }
        Ok(snapshots.into_iter().map(|s| self.write_snapshot(s)).collect())
    }

    /// Checks the lock, then writes a snapshot whose data the last flush
    /// made durable.
    fn write_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotId, WriteError> {
        self.check_lock()?;
        Ok(self.repo.save_snapshot(snapshot)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Fault, FaultyBackend, FileType, LocalBackend};
    use crate::packer::UploadError;
    use crate::repo::InitOptions;
    use crate::test_support::PASSWORD;

    fn faulty_repo(dir: &std::path::Path) -> (Arc<FaultyBackend>, Repository) {
        let init = InitOptions { pack_size: 1 << 20, ..crate::test_support::cheap_init() };
        Repository::init(Arc::new(LocalBackend::create(dir).unwrap()), PASSWORD, &init).unwrap();
        let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(dir).unwrap())));
        let repo = Repository::open(faulty.clone(), PASSWORD).unwrap();
        (faulty, repo)
    }

    fn noise(len: usize) -> Vec<u8> {
        (0..len).map(|_| rand::random::<u8>()).collect()
    }

    #[test]
    fn a_failed_upload_is_sticky_typed_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (faulty, repo) = faulty_repo(dir.path());
        let mut session = WriteSession::begin(&repo, LockKind::Shared, LockOptions::default(), 1).unwrap();
        faulty.inject(Fault::FailPut { nth: 0, file_type: Some(FileType::Pack) });
        // Three packs' worth: the first full pack's upload fails.
        let mut saved = Ok(());
        for _ in 0..48 {
            saved = session.save(BlobKind::Data, &noise(64 << 10)).map(drop);
            if saved.is_err() {
                break;
            }
        }
        let flushed = saved.and_then(|()| session.flush().map(drop));
        let Err(RepoError::Upload(e)) = flushed else { panic!("expected a sticky upload error, got {flushed:?}") };
        assert!(matches!(*e, UploadError::Backend(_)), "{e}");
        faulty.clear();
        drop(session);
        assert!(repo.list_snapshots().unwrap().is_empty());
        assert!(repo.index().is_empty(), "no index segment names the failed session's packs");
    }

    #[test]
    fn a_dry_run_session_writes_nothing_and_commits_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (faulty, repo) = faulty_repo(dir.path());
        let session = WriteSession::dry_run(&repo);
        let (tree, new) = session.save(BlobKind::Tree, &crate::tree::Tree::new(Vec::new()).unwrap().encode()).unwrap();
        assert!(new);
        let snapshot = crate::backup::StreamOrigin {
            hostname: "h".into(),
            username: "u".into(),
            tenant: None,
            user: None,
            device: None,
            tags: Vec::new(),
            paths: vec!["/".into()],
        }
        .snapshot(chrono::Utc::now().fixed_offset(), tree, Default::default());
        assert_eq!(session.stats().blobs_new.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(session.commit(&snapshot).unwrap(), None);
        assert_eq!(faulty.puts(), 0);
    }
}
