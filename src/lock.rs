//! Repository locks: shared for writers that add data (backup, a server's
//! upload sessions), exclusive for prune, which deletes it.
//!
//! A lock is a small plaintext JSON object under `locks/<random id>`.
//! Objects are immutable, so a holder keeps its lock fresh by writing a new
//! one and then deleting the old one. A taker writes its lock first and then
//! lists the locks: of two conflicting takers at least one sees the other
//! (read-after-write), and the one that sees a conflict removes its own lock
//! and backs off. ARCHITECTURE.md ("Locks") has the full safety argument.
//!
//! A lock is stale, and ignored (and removable with `unlock`), when it was
//! not refreshed for [`LockOptions::stale_after`], or when it was written on
//! this host by a process that no longer exists.
//!
//! An embedder that writes data does not take locks itself: a
//! [`WriteSession`](crate::repo::WriteSession) takes the lock, makes the
//! index trustworthy under it, and checks it right before it commits. A
//! session held for a process's whole life keeps prune out for that long:
//! begin one per unit of work instead.

use std::collections::HashSet;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, FileType, ObjectKey};
use crate::id::LockId;
use crate::repo::Repository;

/// Largest lock file accepted when decoding.
pub const MAX_LOCK_FILE_SIZE: usize = 4096;
/// Longest host or user name a lock file may carry.
const MAX_NAME_LEN: usize = 256;

/// Why a lock could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Listing, reading, writing or removing lock objects failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A live conflicting lock (or an unreadable lock file) was still there
    /// when [`LockOptions::wait`] ran out; the text describes each holder.
    #[error("the repository is locked: {0} (wait, or run `chunkvault unlock` if that process is gone)")]
    Locked(String),
    /// [`LockGuard::check`]: the held lock (id given) was last written too
    /// long ago, so others may have taken it as stale; the work relying on it
    /// must not commit.
    #[error("lock {0} was not refreshed in time ({1}); stopping before committing anything")]
    Expired(LockId, String),
    /// A lock file over [`MAX_LOCK_FILE_SIZE`], not JSON of a [`LockFile`],
    /// or with a name over 256 bytes.
    #[error("lock file is not valid: {0}")]
    Invalid(String),
}

/// What a lock allows others to do meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Others may add data (backups) but not delete it.
    Shared,
    /// Nobody else may hold any lock (prune).
    Exclusive,
}

impl LockKind {
    /// Whether a lock of this kind cannot coexist with one of `other`.
    pub fn conflicts_with(self, other: LockKind) -> bool {
        self == LockKind::Exclusive || other == LockKind::Exclusive
    }
}

/// The JSON stored under `locks/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockFile {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// When this lock object was written (a refresh writes a new one).
    pub created: DateTime<Utc>,
    /// The holder's host, at most 256 bytes; a lock of this host whose
    /// process is gone is stale at once.
    pub hostname: String,
    /// The holder's user (effective uid's name), at most 256 bytes; for messages.
    pub username: String,
    /// The holder's process id on `hostname`.
    pub pid: u32,
}

impl LockFile {
    /// A lock of `kind` for this process, created now.
    pub fn for_this_process(kind: LockKind) -> LockFile {
        let (username, hostname) = crate::repo::keys::whoami();
        LockFile { kind, created: Utc::now(), hostname, username, pid: std::process::id() }
    }

    /// The JSON stored under `locks/<id>` (well under [`MAX_LOCK_FILE_SIZE`]
    /// for names within the limit).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lock file always serializes")
    }

    /// Parses a lock file, refusing oversized input and oversized names.
    pub fn decode(bytes: &[u8]) -> Result<LockFile, LockError> {
        if bytes.len() > MAX_LOCK_FILE_SIZE {
            return Err(LockError::Invalid(format!("{} bytes", bytes.len())));
        }
        let lock: LockFile = serde_json::from_slice(bytes).map_err(|e| LockError::Invalid(e.to_string()))?;
        if lock.hostname.len() > MAX_NAME_LEN || lock.username.len() > MAX_NAME_LEN {
            return Err(LockError::Invalid("name too long".into()));
        }
        Ok(lock)
    }

    /// Who holds it, for messages.
    pub fn describe(&self, id: &LockId) -> String {
        let kind = match self.kind {
            LockKind::Shared => "shared",
            LockKind::Exclusive => "exclusive",
        };
        format!(
            "{kind} lock {} by {}@{} pid {} since {}",
            id.short(),
            self.username,
            self.hostname,
            self.pid,
            self.created.to_rfc3339()
        )
    }
}

/// Timing of locks. The defaults suit production; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct LockOptions {
    /// A lock not refreshed for this long is stale.
    pub stale_after: Duration,
    /// How often a held lock is refreshed; well below `stale_after`.
    pub refresh_every: Duration,
    /// How long to keep retrying when the repository is locked (0: fail at once).
    pub wait: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            stale_after: Duration::from_secs(30 * 60),
            refresh_every: Duration::from_secs(5 * 60),
            wait: Duration::ZERO,
        }
    }
}

/// Locks held by guards alive in this process: a lock with this host and
/// pid that is not among them was left by a guard that is gone (an operation
/// that failed before it could remove it), and is stale.
fn live() -> MutexGuard<'static, HashSet<LockId>> {
    static LIVE: LazyLock<Mutex<HashSet<LockId>>> = LazyLock::new(Mutex::default);
    // Poisoning cannot leave a set of ids inconsistent.
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a process with this pid exists on this machine.
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `lock` can be ignored at `now`: too old, or left on this host by
/// a process (or, in this process, a guard) that is gone.
pub fn is_stale(id: &LockId, lock: &LockFile, now: DateTime<Utc>, opts: &LockOptions) -> bool {
    let age = now.signed_duration_since(lock.created);
    if age.to_std().is_ok_and(|a| a > opts.stale_after) {
        return true;
    }
    if lock.hostname != crate::snapshot::current_host() {
        return false;
    }
    if lock.pid == std::process::id() {
        return !live().contains(id);
    }
    !pid_alive(lock.pid)
}

/// A lock's id with its content, or why it cannot be read.
pub type ListedLock = (LockId, Result<LockFile, LockError>);

/// Every lock in the repository. A lock removed while listing is left out.
pub fn list_locks(backend: &dyn Backend) -> Result<Vec<ListedLock>, LockError> {
    let mut out = Vec::new();
    for (key, _) in backend.list(FileType::Lock)? {
        let ObjectKey::Lock(id) = key else { continue };
        match backend.get(&key) {
            Ok(bytes) => out.push((id, LockFile::decode(&bytes))),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Locks that keep a lock of `kind` from being held, except `own`. An
/// unreadable lock file counts (it might be anything).
fn conflicts(
    backend: &dyn Backend,
    kind: LockKind,
    own: Option<LockId>,
    opts: &LockOptions,
) -> Result<Vec<String>, LockError> {
    let now = Utc::now();
    let mut found = Vec::new();
    for (id, lock) in list_locks(backend)? {
        if Some(id) == own {
            continue;
        }
        match lock {
            Ok(l) if is_stale(&id, &l, now, opts) || !kind.conflicts_with(l.kind) => {}
            Ok(l) => found.push(l.describe(&id)),
            Err(e) => found.push(format!("unreadable lock {}: {e}", id.short())),
        }
    }
    Ok(found)
}

/// Removes the locks that are stale (or, with `all`, every lock); returns
/// how many were removed.
pub fn remove_locks(backend: &dyn Backend, all: bool, opts: &LockOptions) -> Result<usize, LockError> {
    let now = Utc::now();
    let mut removed = 0;
    for (id, lock) in list_locks(backend)? {
        let stale = match &lock {
            Ok(l) => is_stale(&id, l, now, opts),
            Err(_) => false,
        };
        if all || stale {
            backend.remove(&ObjectKey::Lock(id))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes a new lock object; on failure removes whatever a failed put may
/// have left, so a torn lock never blocks others.
fn write_lock(backend: &dyn Backend, kind: LockKind) -> Result<(LockId, DateTime<Utc>), LockError> {
    let id = LockId::random();
    let file = LockFile::for_this_process(kind);
    live().insert(id);
    if let Err(e) = backend.put(&ObjectKey::Lock(id), &file.encode()) {
        let _ = backend.remove(&ObjectKey::Lock(id));
        live().remove(&id);
        return Err(e.into());
    }
    Ok((id, file.created))
}

/// The current lock object of a guard and when it was written.
#[derive(Debug)]
struct Held {
    id: LockId,
    written: DateTime<Utc>,
}

/// A held lock. It refreshes itself on a thread until dropped, and dropping
/// it removes it. Call [`check`](Self::check) before committing work that
/// relies on it.
///
/// Dropping blocks: it stops and joins the refresher thread and removes the
/// lock object (best effort; a leftover is stale since its holder is gone).
/// `Send + Sync`; [`check`](Self::check) may be called from any thread.
#[derive(Debug)]
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    kind: LockKind,
    opts: LockOptions,
    held: Arc<Mutex<Held>>,
    stop: Option<Sender<()>>,
    refresher: Option<JoinHandle<()>>,
}

impl LockGuard {
    /// Takes a lock of `kind`, retrying with backoff for up to `opts.wait`.
    ///
    /// Blocks (sleeps between tries, at most 2 s each) while the repository
    /// is locked; [`LockError::Locked`] when `wait` runs out, at once with a
    /// zero `wait`. Starts the refresher thread.
    pub fn acquire(backend: Arc<dyn Backend>, kind: LockKind, opts: LockOptions) -> Result<LockGuard, LockError> {
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let err = match Self::try_acquire(&backend, kind, &opts) {
                Ok(guard) => return Ok(guard),
                Err(LockError::Locked(why)) => why,
                Err(e) => return Err(e),
            };
            if started.elapsed() + backoff > opts.wait {
                return Err(LockError::Locked(err));
            }
            // Random jitter, so two takers that saw each other do not retry in step.
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            std::thread::sleep(backoff + jitter);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn try_acquire(backend: &Arc<dyn Backend>, kind: LockKind, opts: &LockOptions) -> Result<LockGuard, LockError> {
        let before = conflicts(backend.as_ref(), kind, None, opts)?;
        if !before.is_empty() {
            return Err(LockError::Locked(before.join("; ")));
        }
        let (id, written) = write_lock(backend.as_ref(), kind)?;
        // Re-list after writing: a conflicting taker that wrote before our
        // list is seen here; one that writes after it will see us.
        let after = match conflicts(backend.as_ref(), kind, Some(id), opts) {
            Ok(c) => c,
            Err(e) => {
                release(backend.as_ref(), id);
                return Err(e);
            }
        };
        if !after.is_empty() {
            release(backend.as_ref(), id);
            return Err(LockError::Locked(after.join("; ")));
        }
        let held = Arc::new(Mutex::new(Held { id, written }));
        let (stop, stopped) = channel::<()>();
        let refresher = {
            let (backend, held, every) = (backend.clone(), held.clone(), opts.refresh_every);
            std::thread::Builder::new().name("lock-refresh".into()).spawn(move || loop {
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => refresh(backend.as_ref(), kind, &held),
                    _ => return,
                }
            })
        };
        let refresher = match refresher {
            Ok(t) => t,
            Err(e) => {
                release(backend.as_ref(), id);
                return Err(LockError::Backend(BackendError::Other(format!("spawn lock refresher: {e}"))));
            }
        };
        Ok(LockGuard {
            backend: backend.clone(),
            kind,
            opts: *opts,
            held,
            stop: Some(stop),
            refresher: Some(refresher),
        })
    }

    /// Shared or exclusive, as taken.
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// The id of the current lock object.
    pub fn id(&self) -> LockId {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).id
    }

    /// Fails if the lock may have gone stale for others (refreshes failed, or
    /// this process was suspended): work relying on it must not commit.
    /// The margin of one refresh interval covers clock drift and the time
    /// between this check and the commit.
    pub fn check(&self) -> Result<(), LockError> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let age = Utc::now().signed_duration_since(held.written).to_std().unwrap_or_default();
        let limit = self.opts.stale_after.saturating_sub(self.opts.refresh_every);
        if age > limit {
            return Err(LockError::Expired(held.id, format!("last written {}s ago", age.as_secs())));
        }
        Ok(())
    }
}

impl Repository {
    /// Takes a shared lock (for adding data) with the default timing; hold
    /// the guard for as long as the work lasts.
    pub fn lock_shared(&self) -> Result<LockGuard, LockError> {
        self.lock(LockKind::Shared, LockOptions::default())
    }

    /// Takes an exclusive lock (for deleting data) with the default timing.
    pub fn lock_exclusive(&self) -> Result<LockGuard, LockError> {
        self.lock(LockKind::Exclusive, LockOptions::default())
    }

    /// Takes a lock of `kind` with the given timing.
    pub fn lock(&self, kind: LockKind, opts: LockOptions) -> Result<LockGuard, LockError> {
        LockGuard::acquire(self.backend().clone(), kind, opts)
    }
}

/// Replaces the held lock object by a fresh one. A failed write keeps the old
/// one (and `check` will notice if that goes on too long).
fn refresh(backend: &dyn Backend, kind: LockKind, held: &Mutex<Held>) {
    match write_lock(backend, kind) {
        Ok((id, written)) => {
            let old = {
                let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::replace(&mut *h, Held { id, written }).id
            };
            release(backend, old);
        }
        Err(e) => tracing::warn!("refreshing the repository lock failed: {e}"),
    }
}

/// Removes a lock object of ours, best effort (a leftover is stale once
/// this process is gone, or at once for this process: it is no longer live).
fn release(backend: &dyn Backend, id: LockId) {
    live().remove(&id);
    if let Err(e) = backend.remove(&ObjectKey::Lock(id)) {
        tracing::warn!("removing lock {id}: {e}");
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        release(self.backend.as_ref(), self.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use proptest::prelude::*;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
        (dir, b)
    }

    fn plant(b: &dyn Backend, lock: &LockFile) -> LockId {
        let id = LockId::random();
        b.put(&ObjectKey::Lock(id), &lock.encode()).unwrap();
        id
    }

    fn other_host(kind: LockKind, age: chrono::Duration) -> LockFile {
        LockFile { kind, created: Utc::now() - age, hostname: "another-host".into(), username: "u".into(), pid: 1 }
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_conflicts_with_any() {
        let (_d, b) = backend();
        let opts = LockOptions::default();
        let s1 = LockGuard::acquire(b.clone(), LockKind::Shared, opts).unwrap();
        let s2 = LockGuard::acquire(b.clone(), LockKind::Shared, opts).unwrap();
        assert!(matches!(LockGuard::acquire(b.clone(), LockKind::Exclusive, opts), Err(LockError::Locked(_))));
        drop((s1, s2));
        assert_eq!(b.list(FileType::Lock).unwrap(), vec![], "guards remove their locks");
        let x = LockGuard::acquire(b.clone(), LockKind::Exclusive, opts).unwrap();
        assert!(matches!(LockGuard::acquire(b.clone(), LockKind::Shared, opts), Err(LockError::Locked(_))));
        assert!(matches!(LockGuard::acquire(b.clone(), LockKind::Exclusive, opts), Err(LockError::Locked(_))));
        drop(x);
        assert_eq!(b.list(FileType::Lock).unwrap(), vec![]);
    }

    #[test]
    fn a_lock_seen_only_after_writing_makes_the_taker_back_off() {
        // The exclusive taker's first listing is empty; the shared lock
        // appears between its write and its re-list (simulated by planting
        // it from a backend that intercepts the taker's lock put).
        #[derive(Debug)]
        struct Racer(Arc<dyn Backend>);
        impl Backend for Racer {
            fn location(&self) -> String {
                self.0.location()
            }
            fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError> {
                self.0.put(key, data)?;
                plant(self.0.as_ref(), &other_host(LockKind::Shared, chrono::Duration::zero()));
                Ok(())
            }
            fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, BackendError> {
                self.0.get(key)
            }
            fn get_range(&self, key: &ObjectKey, o: u64, l: u64) -> Result<Vec<u8>, BackendError> {
                self.0.get_range(key, o, l)
            }
            fn size(&self, key: &ObjectKey) -> Result<u64, BackendError> {
                self.0.size(key)
            }
            fn list(&self, t: FileType) -> Result<Vec<(ObjectKey, u64)>, BackendError> {
                self.0.list(t)
            }
            fn remove(&self, key: &ObjectKey) -> Result<(), BackendError> {
                self.0.remove(key)
            }
        }
        let (_d, b) = backend();
        let racer: Arc<dyn Backend> = Arc::new(Racer(b.clone()));
        let err = LockGuard::acquire(racer, LockKind::Exclusive, LockOptions::default()).unwrap_err();
        assert!(matches!(err, LockError::Locked(ref m) if m.contains("another-host")), "{err}");
        // Only the planted shared lock is left: the taker removed its own.
        let left = list_locks(b.as_ref()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().unwrap().kind, LockKind::Shared);
    }

    #[test]
    fn stale_locks_are_ignored_and_removable() {
        let (_d, b) = backend();
        let opts = LockOptions::default();
        let old = other_host(LockKind::Exclusive, chrono::Duration::hours(2));
        plant(b.as_ref(), &old);
        // A dead process on this host (pid far above pid_max).
        let mut dead = LockFile::for_this_process(LockKind::Exclusive);
        dead.pid = 0x7fff_fff0;
        plant(b.as_ref(), &dead);
        // A guard of this process that is gone.
        plant(b.as_ref(), &LockFile::for_this_process(LockKind::Exclusive));
        let fresh_other = other_host(LockKind::Shared, chrono::Duration::minutes(1));
        plant(b.as_ref(), &fresh_other);

        let s = LockGuard::acquire(b.clone(), LockKind::Shared, opts).unwrap();
        assert!(matches!(LockGuard::acquire(b.clone(), LockKind::Exclusive, opts), Err(LockError::Locked(_))));
        drop(s);
        assert_eq!(remove_locks(b.as_ref(), false, &opts).unwrap(), 3);
        let left = list_locks(b.as_ref()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().unwrap(), &fresh_other);
        assert_eq!(remove_locks(b.as_ref(), true, &opts).unwrap(), 1);
    }

    #[test]
    fn an_unreadable_lock_blocks_until_removed() {
        let (_d, b) = backend();
        b.put(&ObjectKey::Lock(LockId::random()), b"{not json").unwrap();
        let err = LockGuard::acquire(b.clone(), LockKind::Shared, LockOptions::default()).unwrap_err();
        assert!(matches!(err, LockError::Locked(ref m) if m.contains("unreadable")), "{err}");
        assert_eq!(remove_locks(b.as_ref(), false, &LockOptions::default()).unwrap(), 0);
        assert_eq!(remove_locks(b.as_ref(), true, &LockOptions::default()).unwrap(), 1);
        LockGuard::acquire(b, LockKind::Shared, LockOptions::default()).unwrap();
    }

    #[test]
    fn a_guard_refreshes_by_replacing_its_lock() {
        let (_d, b) = backend();
        let opts = LockOptions { refresh_every: Duration::from_millis(20), ..LockOptions::default() };
        let g = LockGuard::acquire(b.clone(), LockKind::Shared, opts).unwrap();
        let first = g.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while g.id() == first {
            assert!(std::time::Instant::now() < deadline, "no refresh");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Exactly one lock object at a time after a refresh settles; the old one is gone.
        assert!(!crate::backend::exists(b.as_ref(), &ObjectKey::Lock(first)).unwrap());
        g.check().unwrap();
        drop(g);
        assert_eq!(b.list(FileType::Lock).unwrap(), vec![]);
    }

    #[test]
    fn check_fails_once_the_lock_may_look_stale() {
        let (_d, b) = backend();
        let opts = LockOptions {
            stale_after: Duration::from_millis(60),
            refresh_every: Duration::from_secs(3600),
            wait: Duration::ZERO,
        };
        let g = LockGuard::acquire(b, LockKind::Shared, opts).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while g.check().is_ok() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(g.check(), Err(LockError::Expired(..))));
    }

    #[test]
    fn waiting_takes_the_lock_once_it_is_released() {
        let (_d, b) = backend();
        let x = LockGuard::acquire(b.clone(), LockKind::Exclusive, LockOptions::default()).unwrap();
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || {
                let opts = LockOptions { wait: Duration::from_secs(60), ..LockOptions::default() };
                LockGuard::acquire(b, LockKind::Shared, opts).map(|g| g.kind())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(x);
        assert_eq!(waiter.join().unwrap().unwrap(), LockKind::Shared);
    }

    #[test]
    fn lock_file_roundtrip_and_bounds() {
        let l = LockFile::for_this_process(LockKind::Exclusive);
        assert_eq!(LockFile::decode(&l.encode()).unwrap(), l);
        let mut long = l.clone();
        long.hostname = "h".repeat(MAX_NAME_LEN + 1);
        assert!(LockFile::decode(&long.encode()).is_err());
        assert!(LockFile::decode(&vec![b' '; MAX_LOCK_FILE_SIZE + 1]).is_err());
    }

    proptest! {
        #[test]
        fn lock_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = LockFile::decode(&bytes);
        }
    }
}
