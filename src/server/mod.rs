//! The HTTP server: a thin axum layer over the registry ([`crate::auth`]) and
//! the tenant repositories ([`crate::ingest`]). Handlers extract, call the
//! library (blocking calls on the blocking pool), and map errors in one place
//! ([`error`]). Roles pick which routes a process serves.

mod access;
mod admin;
mod catalog;
pub mod config;
mod console;
pub mod error;
mod fleet;
mod linger;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod quota;
mod revocation;
mod routes;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use subtle::ConstantTimeEq;

use crate::auth::registry::{Registry, RegistryLocation};
use crate::auth::token::{SessionSigner, SessionVerifier};
use crate::crypto::KdfParams;
use crate::ingest::{Owner, Tenants};
use crate::repo::InitOptions;
pub use config::{AuthUnreachable, Role, ServerConfig};
use error::HttpError;
use metrics::Metrics;
use revocation::DeviceStates;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The config does not suit its role ([`ServerConfig::validate`]).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The registry failed after it opened: making the signing key, or
    /// reading the device states and quotas a storage side starts from.
    #[error(transparent)]
    Registry(#[from] crate::auth::registry::RegistryError),
    /// The registry could not be opened (shown without a URL's password).
    #[error("the registry at {location}: {source}")]
    OpenRegistry {
        /// Where the registry was looked for.
        location: RegistryLocation,
        /// Why it could not be opened or migrated.
        source: crate::auth::registry::RegistryError,
    },
    /// Binding the listen address, or setting up the signal handlers or the
    /// async runtime, failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The storage role could not fetch the session key from `upstream` at
    /// start (unreachable, an untrusted certificate, a bad answer): the text
    /// says which, and how to trust a private CA.
    #[error("fetching the session key from upstream: {0}")]
    Upstream(String),
    /// Something the role needs is missing or unusable: a secret (the
    /// password, an admin or metrics token file that is empty or unreadable),
    /// `upstream_ca_cert`, or the TLS certificate and key.
    #[error("{0}")]
    Setup(String),
}

/// The auth role's parts.
struct AuthSide {
    registry: Registry,
    signer: SessionSigner,
    limiter: ActivationLimiter,
}

/// The storage role's parts.
struct StorageSide {
    tenants: Tenants,
    verifier: SessionVerifier,
    states: DeviceStates,
    /// Chunk upload slots per tenant (`max_concurrent_uploads_per_tenant`).
    upload_slots: UploadSlots,
    /// Restore streams reading at once (`max_concurrent_reads`).
    read_slots: Arc<tokio::sync::Semaphore>,
    /// Tenant quotas and stored bytes.
    quotas: quota::Quotas,
    /// The tenants' snapshots as reported to the auth role (for the console).
    catalog: catalog::Catalog,
}

/// What an upload holds while its body is in memory: one of its tenant's
/// slots and its share of the node's upload buffer (dropped together).
struct UploadPermit {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// Admission of uploads: slots per tenant, and the upload buffer all
/// tenants share, in KiB. The total count is bounded by a tower layer on
/// the route; no tower layer knows tenants, which only the verified
/// session token names, or a body's declared length, so this part is ours.
/// Tenants come from verified tokens only, so the map holds no more
/// entries than there are tenants.
struct UploadSlots {
    per_tenant: usize,
    wait: Duration,
    tenants: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    buffer: Arc<tokio::sync::Semaphore>,
    buffer_kib: u32,
}

/// The largest upload body: a chunk of FastCDC's largest maximum size in
/// a bundle frame (what a body without a declared length is counted as).
const MAX_UPLOAD_BODY: u64 = fastcdc::v2020::MAXIMUM_MAX as u64 + crate::api::BUNDLE_FRAME_HEADER as u64;

impl UploadSlots {
    fn new(config: &ServerConfig) -> Self {
        let buffer_kib = u32::try_from(config.max_upload_buffer_mib.saturating_mul(1024)).unwrap_or(u32::MAX);
        UploadSlots {
            per_tenant: config.max_concurrent_uploads_per_tenant,
            wait: Duration::from_millis(config.upload_slot_wait_ms),
            tenants: Mutex::default(),
            buffer: Arc::new(tokio::sync::Semaphore::new(buffer_kib as usize)),
            buffer_kib,
        }
    }

    /// A slot for one upload of `tenant`, then room for its body of
    /// `declared` bytes (the largest possible body if undeclared), held
    /// until the permit is dropped. Waits (first come, first served) up to
    /// `wait` in all, with the body unread, which costs little; then 429
    /// `too_many_uploads` for the tenant's slots, 503 `server_busy` for
    /// the buffer.
    async fn take(&self, tenant: &str, declared: Option<u64>) -> Result<UploadPermit, HttpError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let sem = self
            .tenants
            .lock()
            .expect("upload slots lock")
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_tenant)))
            .clone();
        // The semaphores are never closed; a timeout is the refusal.
        let slot = match tokio::time::timeout_at(deadline, sem.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(HttpError::tenant_busy(self.per_tenant)),
        };
        let kib = upload_kib(declared, self.buffer_kib);
        match tokio::time::timeout_at(deadline, self.buffer.clone().acquire_many_owned(kib)).await {
            Ok(Ok(bytes)) => Ok(UploadPermit { _slot: slot, _bytes: bytes }),
            _ => Err(HttpError::server_busy()),
        }
    }
}

/// KiB of the upload buffer a body of `declared` bytes takes: rounded up,
/// at most the largest body (a longer one is refused unread, 413), and at
/// most the whole buffer.
fn upload_kib(declared: Option<u64>, buffer_kib: u32) -> u32 {
    let bytes = declared.unwrap_or(MAX_UPLOAD_BODY).min(MAX_UPLOAD_BODY);
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, buffer_kib)
}

/// Shared state of every handler.
pub struct App {
    config: ServerConfig,
    auth: Option<AuthSide>,
    storage: Option<StorageSide>,
    admin_token: Option<Vec<u8>>,
    /// The bearer token `/metrics` asks for (`metrics_token_file`), if any.
    metrics_token: Option<Vec<u8>>,
    metrics: Metrics,
    /// The agent of calls to `upstream` (session key, check-in, relay):
    /// platform roots plus `upstream_ca_cert`.
    upstream: ureq::Agent,
}

/// What an upstream call's certificate error tells the operator to do.
const HOW_TO_TRUST_UPSTREAM: &str = "give its CA as `upstream_ca_cert` in the server config";

impl App {
    /// Builds the state a role needs. `password` wraps tenant keys (storage).
    pub fn new(
        config: ServerConfig,
        password: Option<Vec<u8>>,
        admin_token: Option<Vec<u8>>,
    ) -> Result<App, ServerError> {
        config.validate()?;
        // An empty token would make the admin routes answer to an empty
        // `Bearer` (or to nothing, were a client to send no token at all
        // as an empty one): refuse to start rather than guess.
        if admin_token.as_ref().is_some_and(|t| t.iter().all(u8::is_ascii_whitespace)) {
            return Err(ServerError::Setup(
                "the admin token is empty: put a secret in CHUNKVAULT_ADMIN_TOKEN (or the config's \
                 admin_token_file), or unset it to run without the admin routes"
                    .into(),
            ));
        }
        let upstream = upstream_agent(&config)?;
        let auth = match config.role {
            Role::All | Role::Auth => {
                let location =
                    config.registry_location().ok_or_else(|| ServerError::Setup("no registry location".into()))?;
                let registry = Registry::connect(&location)
                    .map_err(|source| ServerError::OpenRegistry { location: location.clone(), source })?;
                let signer = SessionSigner::new(registry.signing_secret()?);
                Some(AuthSide { registry, signer, limiter: ActivationLimiter::default() })
            }
            _ => None,
        };
        let storage = match config.role {
            Role::All | Role::Storage => {
                let root = config.root.clone().ok_or_else(|| ServerError::Setup("no root".into()))?;
                let password = password.ok_or_else(|| {
                    ServerError::Setup("set CHUNKVAULT_PASSWORD: it wraps the tenant repositories' keys".into())
                })?;
                let verifier = match &auth {
                    Some(a) => a.signer.verifier(),
                    None => fetch_session_key(&upstream, config.upstream.as_deref().unwrap_or_default())?,
                };
                let init = InitOptions {
                    kdf: KdfParams {
                        memory_kib: config.tenant_kdf_memory_kib,
                        iterations: config.tenant_kdf_iterations,
                        parallelism: KdfParams::default().parallelism,
                    },
                    ..InitOptions::default()
                };
                let interval = Duration::from_secs(config.checkin_interval_secs);
                let states = DeviceStates::new(auth.is_some(), config.auth_unreachable, interval);
                let quotas = quota::Quotas::new(interval);
                if let Some(a) = &auth {
                    // Sessions issued before a restart must still meet earlier retires.
                    let (cursor, changes) = a.registry.changes_since(0, u32::MAX)?;
                    states.apply(&changes);
                    states.checked_in(cursor);
                    quotas.set_all(&a.registry.quotas()?);
                }
                let upload_slots = UploadSlots::new(&config);
                Some(StorageSide {
                    tenants: Tenants::new(&root, password, init),
                    verifier,
                    states,
                    upload_slots,
                    read_slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_reads)),
                    quotas,
                    catalog: catalog::Catalog::default(),
                })
            }
            _ => None,
        };
        let metrics_token = match &config.metrics_token_file {
            Some(path) => Some(read_secret(path, "metrics_token_file")?),
            None => None,
        };
        let metrics = Metrics::new(storage.as_ref().map(|s| s.tenants.stats().clone()));
        Ok(App { config, auth, storage, admin_token, metrics_token, metrics, upstream })
    }

    fn auth(&self) -> Result<&AuthSide, HttpError> {
        self.auth.as_ref().ok_or_else(|| HttpError::not_found("this server does not run the auth role"))
    }

    fn storage(&self) -> Result<&StorageSide, HttpError> {
        self.storage.as_ref().ok_or_else(|| HttpError::not_found("this server does not run the storage role"))
    }

    /// A turn to read packs for a restore stream (waiting for one), and how
    /// long the stream may wait for its client to take each piece.
    async fn read_slot(&self) -> Result<(tokio::sync::OwnedSemaphorePermit, Duration), HttpError> {
        let slots = self.storage()?.read_slots.clone();
        let slot = slots.acquire_owned().await.map_err(|e| HttpError::internal("read slots", e))?;
        Ok((slot, Duration::from_secs(self.config.body_read_timeout_secs)))
    }

    /// With `metrics_token_file` set, `/metrics` wants that bearer token.
    fn require_metrics_token(&self, headers: &axum::http::HeaderMap) -> Result<(), HttpError> {
        match &self.metrics_token {
            Some(expected) => check_bearer(headers, expected, "wrong metrics token"),
            None => Ok(()),
        }
    }

    /// Verifies the session token of a storage request and the device's
    /// current state; returns who the request acts for.
    fn session(&self, headers: &axum::http::HeaderMap) -> Result<Owner, HttpError> {
        let storage = self.storage()?;
        let token = bearer(headers).ok_or_else(|| HttpError::unauthorized("missing bearer token"))?;
        let now = Utc::now().timestamp();
        let claims = storage.verifier.verify(token, now)?;
        storage.states.check(&claims.device, claims.generation)?;
        self.metrics.session_seen(&claims.tenant, claims.token_id, claims.expires, now);
        access::note(Some(&claims.tenant), Some(&claims.device));
        let tenant = crate::ingest::TenantName::new(&claims.tenant)?;
        storage.tenants.session_seen(&tenant, claims.token_id, claims.expires, now);
        Ok(Owner { tenant, user: claims.user, device: claims.device, policies: claims.policies })
    }
}

/// The bearer token of a request, if any. The scheme is matched without
/// regard to case (RFC 9110 11.1: `bearer` and `BEARER` are `Bearer`).
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start_matches(' '))
}

/// Compares a request's bearer token with `expected` in constant time.
fn check_bearer(headers: &axum::http::HeaderMap, expected: &[u8], wrong: &str) -> Result<(), HttpError> {
    let given = bearer(headers).ok_or_else(|| HttpError::unauthorized("missing bearer token"))?;
    if bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(HttpError::unauthorized(wrong))
    }
}

/// The first line of a secret file, refused when empty: an empty token
/// would let an empty `Bearer` in.
fn read_secret(path: &std::path::Path, key: &str) -> Result<Vec<u8>, ServerError> {
    let text = std::fs::read(path).map_err(|e| ServerError::Setup(format!("{key} {}: {e}", path.display())))?;
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(ServerError::Setup(format!("{key} {}: the file is empty", path.display())));
    }
    Ok(line.to_vec())
}

/// The agent of calls to `upstream`: the platform's roots plus the CA in
/// `upstream_ca_cert`, if any.
fn upstream_agent(config: &ServerConfig) -> Result<ureq::Agent, ServerError> {
    let ca = match &config.upstream_ca_cert {
        Some(path) => {
            let pem = tls::read_pem_file(path, crate::tls::MAX_CA_PEM as u64, "upstream_ca_cert")?;
            crate::tls::parse_ca_pem(&pem)
                .map_err(|e| ServerError::Setup(format!("upstream_ca_cert {}: {e}", path.display())))?
        }
        None => Vec::new(),
    };
    Ok(crate::tls::agent(&ca, Duration::from_secs(30)))
}

fn fetch_session_key(agent: &ureq::Agent, upstream: &str) -> Result<SessionVerifier, ServerError> {
    let url = format!("{}/v1/session-key", upstream.trim_end_matches('/'));
    let mut resp = agent
        .get(&url)
        .call()
        .map_err(|e| ServerError::Upstream(format!("{url}: {}", crate::tls::explain(&e, HOW_TO_TRUST_UPSTREAM))))?;
    if resp.status().as_u16() >= 400 {
        return Err(ServerError::Upstream(format!("{url}: answered {}", resp.status())));
    }
    let key: crate::api::SessionKey =
        resp.body_mut().read_json().map_err(|e| ServerError::Upstream(format!("{url}: {e}")))?;
    SessionVerifier::from_public_hex(&key.public_key).map_err(|e| ServerError::Upstream(e.to_string()))
}

/// Counts failed activations per client address over a one-minute window.
#[derive(Default)]
struct ActivationLimiter {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl ActivationLimiter {
    fn check(&self, ip: IpAddr, limit: u32) -> Result<(), HttpError> {
        let f = self.failures.lock().expect("limiter lock");
        match f.get(&ip) {
            Some((start, n)) if start.elapsed() < Duration::from_secs(60) && *n >= limit => {
                Err(HttpError::too_many_attempts())
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut f = self.failures.lock().expect("limiter lock");
        if f.len() > 100_000 {
            f.retain(|_, (start, _)| start.elapsed() < Duration::from_secs(60));
        }
        let entry = f.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// Caps glibc's malloc arenas at one per core, and serves every block of
/// 4 MiB or more with its own mapping. By default glibc makes up to eight
/// arenas per core, one for each thread that meets contention, and a freed
/// block stays in its arena: every tenant's writer thread, sealing packs of
/// several MiB, kept its own tens of MiB (measured: the node's RSS grew by
/// about 45 MiB per tenant served, 13 MiB with two arenas). And glibc
/// raises its mapping threshold to the largest block freed (up to 32 MiB),
/// after which request bodies, manifests and restore plans of several MiB
/// come from the arenas and their pages stay there: under the 64-device
/// load the node kept about 300 MiB more than it had allocated, and its
/// per-round peak climbed from 330 to 464 MiB over 24 rounds (228-310 MiB
/// with the fixed threshold). The large buffers that are reused come from
/// pools (`buffers.rs`), so the mappings are not made per request.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before the server's threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

/// Gives the memory freed by closing tenants back to the system (glibc
/// keeps freed blocks in its arenas otherwise).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Closes the tenants idle for `idle` (`tenant_idle_secs`), looking a few
/// times per `idle`.
async fn close_idle_tenants(app: Arc<App>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let app2 = app.clone();
        // Closing waits for the writers to stop: off the async workers.
        let closed =
            tokio::task::spawn_blocking(move || app2.storage.as_ref().map_or(0, |s| s.tenants.close_idle(idle)));
        match closed.await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("closed {n} idle tenants");
                release_freed_memory();
            }
            Err(e) => tracing::error!("closing idle tenants: {e}"),
        }
    }
}

/// Binds, prints `listening on http://ADDR` (`https://` with `tls_cert`)
/// as the first stdout line, and serves until SIGTERM or SIGINT; in-flight
/// requests finish first. With TLS, SIGHUP re-reads the certificate and key
/// for new connections.
pub fn run(config: ServerConfig, password: Option<Vec<u8>>, admin_token: Option<Vec<u8>>) -> Result<(), ServerError> {
    listen::raise_fd_limit();
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listen = config.listen.clone();
        let app = Arc::new(
            tokio::task::spawn_blocking(move || App::new(config, password, admin_token))
                .await
                .map_err(|e| ServerError::Setup(e.to_string()))??,
        );
        // Handlers go in before the listening line, so a SIGTERM sent as
        // soon as the server is up is a graceful shutdown, not a kill.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        // The pair is read before binding, so a bad file stops the start.
        let resolver = match (&app.config.tls_cert, &app.config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(tls::CertResolver::new(cert.clone(), key.clone())?)),
            _ => None,
        };
        // SIGHUP would end the process by default; with TLS it reloads, and
        // without TLS it is ignored.
        let mut hup = signal(SignalKind::hangup())?;
        let reloader = resolver.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match &reloader {
                    Some(r) => match r.reload() {
                        Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate and key"),
                        Err(e) => tracing::error!("SIGHUP: keeping the old TLS certificate: {e}"),
                    },
                    None => tracing::info!("SIGHUP: nothing to reload (no TLS)"),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let addr = listener.local_addr()?;
        {
            use std::io::Write;
            let scheme = if resolver.is_some() { "https" } else { "http" };
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {scheme}://{addr}")?;
            out.flush()?;
        }
        if app.storage.as_ref().is_some_and(|s| !s.states.is_local()) {
            tokio::spawn(revocation::poll_upstream(app.clone()));
        }
        let shared_registry = matches!(app.config.registry_location(), Some(RegistryLocation::Postgres(_)));
        if app.auth.is_some() && app.storage.is_some() && shared_registry {
            tokio::spawn(revocation::poll_registry(app.clone()));
        }
        if app.storage.is_some() && app.auth.is_some() {
            // What a storage node's check-in would report, recorded locally.
            tokio::spawn(fleet::sync_local_every(app.clone()));
        }
        if app.storage.is_some() && app.config.tenant_idle_secs > 0 {
            tokio::spawn(close_idle_tenants(app.clone(), Duration::from_secs(app.config.tenant_idle_secs)));
        }
        let limits =
            listen::ConnLimits { header_read_timeout: Duration::from_secs(app.config.header_read_timeout_secs) };
        let router = routes::router(app);
        match resolver {
            Some(r) => {
                let acceptor = Arc::new(tls::TlsTcp::new(tls::server_config(r)?));
                listen::serve(listener, acceptor, router, limits, shutdown).await?
            }
            None => listen::serve(listener, Arc::new(listen::PlainTcp), router, limits, shutdown).await?,
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(buffer_mib: u64, per_tenant: usize, wait_ms: u64) -> UploadSlots {
        UploadSlots::new(&ServerConfig {
            max_upload_buffer_mib: buffer_mib,
            max_concurrent_uploads_per_tenant: per_tenant,
            upload_slot_wait_ms: wait_ms,
            ..ServerConfig::default()
        })
    }

    #[test]
    fn an_upload_takes_its_declared_length_in_kib() {
        assert_eq!(upload_kib(Some(0), 1024), 1);
        assert_eq!(upload_kib(Some(1025), 1024), 2);
        assert_eq!(upload_kib(Some(8 << 20), 1 << 20), 8192);
        // Undeclared: the largest body; a longer declared one is refused
        // unread later, so it holds no more than the largest body.
        let largest = MAX_UPLOAD_BODY.div_ceil(1024) as u32;
        assert_eq!(upload_kib(None, 1 << 20), largest);
        assert_eq!(upload_kib(Some(u64::MAX), 1 << 20), largest);
        assert_eq!(upload_kib(None, 100), 100);
    }

    #[tokio::test]
    async fn uploads_wait_for_room_in_the_buffer_then_are_refused_busy() {
        let s = slots(32, 8, 50);
        let first = s.take("a", Some(20 << 20)).await.unwrap();
        // Another tenant's body does not fit beside it: it waits, then 503.
        let refused = s.take("b", Some(20 << 20)).await.err().unwrap();
        assert_eq!((refused.status, refused.code), (axum::http::StatusCode::SERVICE_UNAVAILABLE, "server_busy"));
        // A small one fits.
        let small = s.take("b", Some(1 << 20)).await.unwrap();
        drop((first, small));
        // Freed room is taken by a waiting upload.
        let s = Arc::new(slots(32, 8, 5000));
        let held = s.take("a", Some(30 << 20)).await.unwrap();
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.take("b", Some(30 << 20)).await.map(drop).map_err(|e| e.code) }
        });
        tokio::task::yield_now().await;
        drop(held);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_tenant_out_of_slots_is_told_too_many_uploads() {
        let s = slots(128, 1, 20);
        let _held = s.take("a", Some(1024)).await.unwrap();
        assert_eq!(s.take("a", Some(1024)).await.err().unwrap().code, "too_many_uploads");
        s.take("b", Some(1024)).await.unwrap();
    }
}
