//! Opening and creating tenant repositories under the storage node's root,
//! and refreshing a tenant's index when a new session starts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use super::writer::{Job, Writer, WriterTiming};
use super::{IngestError, IngestStats};
use crate::id::{BlobId, SnapshotId};
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

    /// The tenant's repository, opened (or created, on first use) once and
    /// kept.
    pub fn get(&self, tenant: &TenantName) -> Result<Arc<Tenant>, IngestError> {
        let t = self.open(tenant)?;
        t.refresh_if_wanted()?;
        Ok(t)
    }

    fn open(&self, tenant: &TenantName) -> Result<Arc<Tenant>, IngestError> {
        let slot = self.open.lock().expect("tenants lock").entry(tenant.clone()).or_default().clone();
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
        let t = Arc::new(Tenant::start(tenant.as_str(), Arc::new(repo), self.stats.clone(), self.timing));
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// One tenant's repository and its writer.
pub struct Tenant {
    pub(super) repo: Arc<Repository>,
    pub(super) jobs: Mutex<SyncSender<Job>>,
    /// Chunks the writer holds in open packs, with their raw lengths: stored
    /// as far as uploads are concerned, durable at the next commit.
    pub(super) pending: Arc<Mutex<HashMap<BlobId, u32>>>,
    pub(super) stats: Arc<IngestStats>,
    /// Bumped by each new session: the index should be brought up to date.
    wanted: AtomicU64,
    /// The last `wanted` the index was brought up to date for; held while
    /// refreshing, so a request of a new session waits for the refresh.
    pub(super) refreshed: Mutex<u64>,
    /// The chunks of recently planned snapshots, newest last: the chunk
    /// stream hands out only chunks of a snapshot the session may read.
    pub(super) snapshot_chunks: Mutex<Vec<(SnapshotId, Arc<HashSet<BlobId>>)>>,
}

impl Tenant {
    /// Starts the tenant's writer thread over `repo`.
    pub(super) fn start(name: &str, repo: Arc<Repository>, stats: Arc<IngestStats>, timing: WriterTiming) -> Tenant {
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
