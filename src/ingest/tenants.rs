//! Opening and creating tenant repositories under the storage node's root,
//! and refreshing a tenant's index when a new session starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::reads::ChunkSets;
use super::writer::{Job, Writer, WriterTiming};
use super::{IngestError, IngestStats};
use crate::id::BlobId;
use crate::repo::{self, InitOptions, RepoError, Repository};

/// A tenant's name, validated (`api::check_tenant`: 1-64 of `a-z 0-9 - _`,
/// not starting with `-`), so that it is one path component of the root:
/// never empty, `.`, `..`, or holding a `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TenantName(String);

impl TenantName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<TenantName, IngestError> {
        crate::api::check_tenant(name).map_err(|why| IngestError::InvalidTenant(name.to_owned(), why))?;
        Ok(TenantName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every tenant repository under one root.
///
/// A tenant is opened on first use and kept open (its index in memory, its
/// writer thread running) until [`Tenants::close_idle`] finds it unused for
/// long enough; the next request opens it again.
pub struct Tenants {
    root: String,
    password: Vec<u8>,
    init: InitOptions,
    open: Mutex<HashMap<TenantName, Slot>>,
    stats: Arc<IngestStats>,
    timing: WriterTiming,
    /// Session token ids seen, with their expiry: the first request of each
    /// new session refreshes its tenant's index.
    sessions: Mutex<HashMap<[u8; 16], i64>>,
    /// The chunk sets of restored snapshots, all tenants together.
    chunk_sets: Arc<ChunkSets>,
    /// The clock of [`Tenant`]'s `last_used`.
    born: Instant,
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
            chunk_sets: Arc::default(),
            born: Instant::now(),
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
    pub fn session_seen(&self, tenant: &TenantName, token_id: [u8; 16], expires: i64, now: i64) {
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

    /// The counters shared by every tenant's writer (for `/metrics`).
    pub fn stats(&self) -> &Arc<IngestStats> {
        &self.stats
    }

    /// The tenant's repository, opened (or created, on first use) if it is
    /// not open. Long-lived holders (usage counts, the snapshot catalog)
    /// use this: what they keep stays usable for listings after the tenant
    /// is closed. A request uses [`Tenants::hold`].
    pub fn get(&self, tenant: &TenantName) -> Result<Arc<Tenant>, IngestError> {
        let t = self.open(tenant, false)?;
        t.refresh_if_wanted()?;
        Ok(t)
    }

    /// As [`Tenants::get`], for the length of one request: the tenant is
    /// not closed while the returned value lives.
    pub fn hold(&self, tenant: &TenantName) -> Result<TenantUse, IngestError> {
        let t = TenantUse(self.open(tenant, true)?);
        t.refresh_if_wanted()?;
        Ok(t)
    }

    /// Milliseconds since this was made: the clock of `last_used`.
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Closes every open tenant that no request holds and that has not
    /// been asked for in `idle`: its writer (idle, so holding nothing
    /// uncommitted; had it held anything, it flushes it first) stops, and
    /// its index and cached chunk sets are dropped. The next request opens
    /// the tenant again. Returns how many were closed.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let slots: Vec<(TenantName, Slot)> =
            self.open.lock().expect("tenants lock").iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        let now = self.now_ms();
        let mut closed = 0;
        for (name, slot) in slots {
            // Locked: the tenant is being opened, so it is in use.
            let Ok(mut slot) = slot.try_lock() else { continue };
            let unused = slot.as_ref().is_some_and(|t| {
                t.users.load(Ordering::SeqCst) == 0
                    && u128::from(now.saturating_sub(t.last_used.load(Ordering::SeqCst))) >= idle.as_millis()
            });
            if !unused {
                continue;
            }
            // Under the slot lock: no request can take the tenant meanwhile,
            // and one that asks for it waits until the writer has stopped.
            let t = slot.take().expect("checked above");
            t.close();
            self.chunk_sets.forget_tenant(&name);
            self.stats.tenants_open.fetch_sub(1, Ordering::Relaxed);
            self.stats.tenants_closed.fetch_add(1, Ordering::Relaxed);
            closed += 1;
        }
        closed
    }

    fn open(&self, tenant: &TenantName, hold: bool) -> Result<Arc<Tenant>, IngestError> {
        let slot = self.open.lock().expect("tenants lock").entry(tenant.clone()).or_default().clone();
        let mut slot = slot.lock().expect("tenant lock");
        let now = self.now_ms();
        if let Some(t) = &*slot {
            t.last_used.store(now, Ordering::SeqCst);
            if hold {
                t.users.fetch_add(1, Ordering::SeqCst);
            }
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
        let t = Tenant::start(tenant.as_str(), Arc::new(repo), self.stats.clone(), self.timing);
        let t = Arc::new(Tenant { chunk_sets: self.chunk_sets.clone(), ..t });
        t.last_used.store(now, Ordering::SeqCst);
        if hold {
            t.users.fetch_add(1, Ordering::SeqCst);
        }
        self.stats.tenants_open.fetch_add(1, Ordering::Relaxed);
        *slot = Some(t.clone());
        Ok(t)
    }

    /// The tenant if it is open, without opening it or counting as a use.
    pub fn if_open(&self, tenant: &TenantName) -> Option<Arc<Tenant>> {
        let slot = self.open.lock().expect("tenants lock").get(tenant).cloned()?;
        let t = slot.lock().expect("tenant lock").clone();
        t
    }

    /// How many tenants are open.
    pub fn open_count(&self) -> usize {
        let slots: Vec<Slot> = self.open.lock().expect("tenants lock").values().cloned().collect();
        slots.iter().filter(|s| s.lock().expect("tenant lock").is_some()).count()
    }
}

/// A tenant held open for one request ([`Tenants::hold`]); derefs to the
/// tenant.
pub struct TenantUse(Arc<Tenant>);

impl std::ops::Deref for TenantUse {
    type Target = Arc<Tenant>;

    fn deref(&self) -> &Arc<Tenant> {
        &self.0
    }
}

impl Drop for TenantUse {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One tenant's repository and its writer.
pub struct Tenant {
    pub(super) name: TenantName,
    pub(super) repo: Arc<Repository>,
    /// The writer's queue; `None` once the tenant is closed.
    pub(super) jobs: Mutex<Option<SyncSender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Requests holding the tenant ([`TenantUse`]).
    users: AtomicUsize,
    /// When the tenant was last asked for (`Tenants::now_ms`).
    last_used: AtomicU64,
    /// Chunks the writer holds in open packs, with their raw lengths: stored
    /// as far as uploads are concerned, durable at the next commit.
    pub(super) pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    pub(super) stats: Arc<IngestStats>,
    /// Bumped by each new session: the index should be brought up to date.
    wanted: AtomicU64,
    /// The last `wanted` the index was brought up to date for; held while
    /// refreshing, so a request of a new session waits for the refresh.
    pub(super) refreshed: Mutex<u64>,
    /// The chunks of recently planned snapshots (shared by all tenants):
    /// the chunk stream hands out only chunks of a snapshot the session may
    /// read.
    pub(super) chunk_sets: Arc<ChunkSets>,
}

impl Tenant {
    /// Starts the tenant's writer thread over `repo`.
    pub(super) fn start(name: &str, repo: Arc<Repository>, stats: Arc<IngestStats>, timing: WriterTiming) -> Tenant {
        let (tx, rx) = sync_channel(16);
        let pending: Arc<Mutex<HashMap<BlobId, u32>>> = Arc::default();
        let writer = Writer { repo: repo.clone(), pending: pending.clone(), stats: stats.clone(), timing };
        let handle = std::thread::Builder::new()
            .name(format!("writer-{name}"))
            .spawn(move || writer.run(rx))
            .expect("spawn tenant writer");
        Tenant {
            name: TenantName(name.to_owned()),
            repo,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            users: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            pending,
            stats,
            wanted: AtomicU64::new(0),
            refreshed: Mutex::new(0),
            chunk_sets: Arc::default(),
        }
    }

    /// Stops the writer (it finishes the jobs queued, flushes what it holds
    /// and exits; this waits for it) and drops the index. What holds the
    /// tenant after this can still list its repository; a job sent to it
    /// is refused with [`IngestError::WriterStopped`].
    fn close(&self) {
        drop(self.jobs.lock().expect("jobs lock").take());
        if let Some(writer) = self.writer.lock().expect("writer lock").take() {
            if writer.join().is_err() {
                tracing::error!("tenant {}: the writer panicked", self.name);
            }
        }
        self.repo.unload_index();
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
    pub(super) fn refresh(&self) -> Result<(), IngestError> {
        if !self.repo.reload_index_if_replaced()? {
            self.repo.refresh_index()?;
        }
        Ok(())
    }

    /// The tenant's repository.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::tests::{acme, commit_of, file_entry, owner};
    use crate::test_support::{cheap_init, PASSWORD};

    /// Reads a one-file snapshot's file `path` back whole.
    fn read_back(t: &Tenant, id: &crate::id::SnapshotId, path: &str) -> Vec<u8> {
        let node = t.file(&owner("a"), id, path).unwrap();
        let mut out = Vec::new();
        t.read_file(&node, 0, node.size, &mut out).unwrap();
        out
    }

    #[test]
    fn an_idle_tenant_is_closed_and_reopened_transparently() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = Tenants::new(dir.path().to_str().unwrap(), PASSWORD.to_vec(), cheap_init());
        let t = tenants.hold(&acme()).unwrap();
        let first = b"the first snapshot's file".to_vec();
        let id = t.repo().blob_id(&first);
        t.put_chunk(id, first.clone()).unwrap();
        let one = t.commit(owner("a"), commit_of(vec![file_entry("f", first.len() as u64, vec![id])])).unwrap();
        // Accepted, not yet committed when the tenant closes: flushed, not lost.
        let later = b"uploaded before the close, committed after".to_vec();
        let later_id = t.repo().blob_id(&later);
        t.put_chunk(later_id, later.clone()).unwrap();
        assert_eq!(tenants.close_idle(Duration::ZERO), 0, "a tenant a request holds stays open");
        drop(t);
        // What a long-lived holder (usage counts, catalog) keeps.
        let kept = tenants.get(&acme()).unwrap();
        assert_eq!(tenants.close_idle(Duration::from_secs(3600)), 0, "not idle long enough");
        assert_eq!(tenants.close_idle(Duration::ZERO), 1);
        assert_eq!(tenants.open_count(), 0);
        assert!(tenants.if_open(&acme()).is_none());
        assert_eq!(tenants.stats().tenants_open.load(Ordering::Relaxed), 0);
        assert_eq!(tenants.stats().tenants_closed.load(Ordering::Relaxed), 1);
        assert_eq!(kept.repo().snapshot_ids().unwrap().len(), 1, "the kept handle still lists");
        let stray = b"sent to a closed tenant".to_vec();
        let stray_id = kept.repo().blob_id(&stray);
        assert!(matches!(kept.put_chunk(stray_id, stray), Err(IngestError::WriterStopped)));

        let t = tenants.hold(&acme()).unwrap();
        assert_eq!(tenants.open_count(), 1);
        assert!(t.missing(&[id, later_id]).is_empty(), "both chunks are indexed after the reopen");
        let two = t.commit(owner("a"), commit_of(vec![file_entry("g", later.len() as u64, vec![later_id])])).unwrap();
        assert_eq!(read_back(&t, &one.id, "f"), first);
        assert_eq!(read_back(&t, &two.id, "g"), later);
        let grant = t.grant_chunks(&owner("a"), &one.id, vec![id]).unwrap();
        let got = Mutex::new(Vec::new());
        t.read_chunks(&grant, &|_, data| got.lock().unwrap().push(data.unwrap().to_vec()));
        assert_eq!(got.into_inner().unwrap(), vec![first]);
    }

    #[test]
    fn a_tenant_name_is_one_safe_path_component() {
        for good in ["acme", "a_b-1", "0", &"x".repeat(64)] {
            assert_eq!(TenantName::new(good).unwrap().as_str(), good);
        }
        let long = "x".repeat(65);
        for bad in ["", ".", "..", "../x", "a/b", "/abs", "Acme", "a.b", "-a", "a b", "a\0b", long.as_str()] {
            assert!(matches!(TenantName::new(bad), Err(IngestError::InvalidTenant(..))), "{bad:?}");
        }
    }
}
