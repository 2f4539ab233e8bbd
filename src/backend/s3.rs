//! A repository in an S3-compatible object store (AWS S3, Garage, Ceph RGW,
//! MinIO), through the `object_store` crate.
//!
//! Selected by a location `s3://bucket/prefix`; the endpoint and credentials
//! come from the environment ([`S3Config::from_url`]). Each object is stored
//! at `prefix/` + [`ObjectKey::path`], so a bucket can hold several
//! repositories under different prefixes.
//!
//! The engine is synchronous and parallel (rayon), `object_store` is async:
//! the backend owns a small tokio runtime and every call spawns its request
//! there and waits on a channel. That works from any thread, including a
//! thread that is itself inside another tokio runtime (where `block_on`
//! would panic), e.g. a server handler that forgot `spawn_blocking`.
//!
//! How the [`Backend`] contract is kept:
//! - **Atomic, durable put**: an S3 PUT (or multipart completion) makes the
//!   object visible whole or not at all, and is acknowledged only once the
//!   store has it (Garage: written to a quorum of its replicas).
//! - **Write once**: `put` asks for the object's size first (HEAD) and never
//!   overwrites: an object already there with the same size is the same
//!   object (names are content hashes or random ids), one with another size
//!   is refused. The PUT itself is conditional (`If-None-Match: *`) for the
//!   stores that honour it (AWS S3, MinIO, Ceph); Garage 2.5 ignores that
//!   header on PutObject (a second conditional PUT replaces the object),
//!   which is why the HEAD is there. The race between
//!   HEAD and PUT can only ever be two writers of identical bytes.
//! - **Retries**: transient failures (5xx, 429, dropped connections) are
//!   retried with exponential backoff by `object_store` ([`S3Config::max_retries`]).
//! - **Bounded concurrency**: at most [`S3Config::max_requests`] requests in
//!   flight per backend.
//! - **Large objects** go up as multipart uploads (parts of
//!   [`S3Config::part_size`]), which complete atomically like a PUT.
//! - **Ranged reads** are HTTP range requests: restore reads only the blobs
//!   it needs.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::limit::LimitStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::{Backend, BackendError, FileType, ObjectKey};

/// The largest range one `get_range` may ask for (as for the local backend):
/// a corrupt length must not make us allocate without bound.
const MAX_RANGE: u64 = 1 << 30;

/// Why an S3 backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The location (given) is not `s3://bucket[/prefix]` with components
    /// of ASCII letters, digits, `.`, `-` and `_`.
    #[error("bad S3 location {0:?}: expected s3://bucket or s3://bucket/prefix (letters, digits, '.', '-', '_')")]
    BadUrl(String),
    /// A required environment variable (named) is unset or empty.
    #[error("{0} is not set: an s3:// repository needs it (see the README, \"Storing backups in S3\")")]
    MissingEnv(&'static str),
    /// An environment variable (named first) has a value (second) it cannot take.
    #[error("{name} is not a valid value for {0}", name = .1)]
    BadEnv(&'static str, String),
    /// The endpoint (given) is plain `http://` to another host and
    /// `CHUNKVAULT_S3_ALLOW_HTTP=1` is not set: credentials and data would
    /// cross the network unencrypted.
    #[error(
        "refusing plain http to {0}: use https, or set CHUNKVAULT_S3_ALLOW_HTTP=1 for a trusted network \
         (loopback endpoints are always allowed)"
    )]
    InsecureEndpoint(String),
    /// The S3 client (object_store) refused the settings.
    #[error("S3 client setup: {0}")]
    Client(String),
    /// The backend's private tokio runtime could not be started.
    #[error("could not start the S3 runtime: {0}")]
    Runtime(io::Error),
}

impl From<S3Error> for BackendError {
    fn from(e: S3Error) -> Self {
        BackendError::Other(e.to_string())
    }
}

/// Where an S3 repository is and how to talk to it.
#[derive(Clone)]
pub struct S3Config {
    /// The bucket name (ASCII letters, digits, `.`, `-`, `_`).
    pub bucket: String,
    /// Key prefix without leading or trailing slash; empty for the bucket's root.
    pub prefix: String,
    /// `http(s)://host:port` of an S3-compatible service; `None` for AWS S3.
    pub endpoint: Option<String>,
    /// The bucket's region (`AWS_REGION`); S3-compatible services often
    /// accept any value.
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`; printed by `Debug`, it is not secret.
    pub access_key_id: String,
    /// Never printed: [`S3Config`]'s `Debug` leaves it out.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN` for temporary credentials; never printed.
    pub session_token: Option<String>,
    /// Allow an `http://` endpoint that is not on the loopback interface.
    pub allow_http: bool,
    /// Retries of a failed request (with exponential backoff) before giving up.
    pub max_retries: usize,
    /// Requests in flight at once, per backend.
    pub max_requests: usize,
    /// Objects at least this large are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part of a multipart upload (S3 wants at least 5 MiB).
    pub part_size: usize,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("max_retries", &self.max_retries)
            .field("max_requests", &self.max_requests)
            .finish_non_exhaustive()
    }
}

/// Whether a bucket name or prefix component is made of the characters we
/// accept: enough for real bucket names and prefixes, and nothing that S3
/// would percent-encode or interpret.
fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]` and reads the rest from `env`
    /// (`std::env::var` in production): `CHUNKVAULT_S3_ENDPOINT` (absent:
    /// AWS S3), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`
    /// (or `AWS_DEFAULT_REGION`), optionally `AWS_SESSION_TOKEN`,
    /// `CHUNKVAULT_S3_ALLOW_HTTP=1` and `CHUNKVAULT_S3_MAX_RETRIES`.
    pub fn from_url(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<S3Config, S3Error> {
        let bad = || S3Error::BadUrl(url.to_owned());
        let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_component(bucket) || (!prefix.is_empty() && !prefix.split('/').all(valid_component)) {
            return Err(bad());
        }
        let env = |name| env(name).filter(|v| !v.is_empty());
        let required = |name: &'static str| env(name).ok_or(S3Error::MissingEnv(name));
        let endpoint = env("CHUNKVAULT_S3_ENDPOINT").map(|e| e.trim_end_matches('/').to_owned());
        let allow_http = match env("CHUNKVAULT_S3_ALLOW_HTTP").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => return Err(S3Error::BadEnv("CHUNKVAULT_S3_ALLOW_HTTP", other.to_owned())),
        };
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(S3Error::BadEnv("CHUNKVAULT_S3_ENDPOINT", e.clone()));
            }
        }
        let max_retries = match env("CHUNKVAULT_S3_MAX_RETRIES") {
            None => 8,
            Some(v) => v.parse().map_err(|_| S3Error::BadEnv("CHUNKVAULT_S3_MAX_RETRIES", v))?,
        };
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).ok_or(S3Error::MissingEnv("AWS_REGION"))?,
            access_key_id: required("AWS_ACCESS_KEY_ID")?,
            secret_access_key: required("AWS_SECRET_ACCESS_KEY")?,
            session_token: env("AWS_SESSION_TOKEN"),
            allow_http,
            max_retries,
            max_requests: 32,
            // Default packs (16 MiB) go up in one PUT: fewer requests per
            // GiB, and one PUT is as atomic as a multipart completion.
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
        })
    }

    /// The location as a user would write it.
    pub fn location(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("s3://{}", self.bucket),
            p => format!("s3://{}/{p}", self.bucket),
        }
    }
}

/// Whether an `http://` endpoint points at this machine.
fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Requests sent, by kind, for figures and tests. A multipart upload counts
/// its initiation, each part and its completion; a listing counts one
/// request per 1000 keys (the S3 page size), rounded up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S3Requests {
    /// PUT requests, multipart initiations, parts and completions included.
    pub put: u64,
    /// GET requests, ranged reads included.
    pub get: u64,
    /// HEAD requests (`size`, `exists`).
    pub head: u64,
    /// LIST pages (one per 1000 keys, rounded up).
    pub list: u64,
    /// DELETE requests.
    pub delete: u64,
}

impl S3Requests {
    /// All requests of every kind.
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete
    }
}

#[derive(Debug, Default)]
struct Counters {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

type Store = Arc<LimitStore<AmazonS3>>;

/// A [`Backend`] over an S3 bucket; see the module docs.
pub struct S3Backend {
    store: Store,
    config: S3Config,
    /// `prefix/`, or empty.
    root: String,
    /// `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
    counters: Counters,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend").field("config", &self.config).finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Opens the backend described by `config`. Sends no request: an
    /// unreachable endpoint shows up at the first operation, as an error
    /// naming the endpoint.
    pub fn new(config: S3Config) -> Result<S3Backend, S3Error> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: config.max_retries,
                retry_timeout: Duration::from_secs(120),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    // A 16 MiB pack over a slow uplink needs more than the
                    // default 30 s.
                    .with_timeout(Duration::from_secs(300)),
            );
        if let Some(token) = &config.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &config.endpoint {
            if endpoint.starts_with("http://") && !config.allow_http && !is_loopback_http(endpoint) {
                return Err(S3Error::InsecureEndpoint(endpoint.clone()));
            }
            // S3-compatible services are addressed path-style
            // (`endpoint/bucket/key`): no wildcard DNS needed.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        // The builder's errors name the setting, never its value.
        let s3 = builder.build().map_err(|e| S3Error::Client(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chunkvault-s3")
            .enable_all()
            .build()
            .map_err(S3Error::Runtime)?;
        let root = if config.prefix.is_empty() { String::new() } else { format!("{}/", config.prefix) };
        Ok(S3Backend {
            store: Arc::new(LimitStore::new(s3, config.max_requests.max(1))),
            config,
            root,
            runtime: Some(runtime),
            counters: Counters::default(),
        })
    }

    /// Opens `s3://bucket/prefix` with settings from the process environment.
    pub fn from_url(url: &str) -> Result<S3Backend, S3Error> {
        S3Backend::new(S3Config::from_url(url, |name| std::env::var(name).ok())?)
    }

    /// Requests sent so far.
    pub fn requests(&self) -> S3Requests {
        let c = &self.counters;
        S3Requests {
            put: c.put.load(Ordering::Relaxed),
            get: c.get.load(Ordering::Relaxed),
            head: c.head.load(Ordering::Relaxed),
            list: c.list.load(Ordering::Relaxed),
            delete: c.delete.load(Ordering::Relaxed),
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it. Spawning and
    /// waiting on a channel (rather than `block_on`) works from any thread,
    /// even one inside another tokio runtime.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.as_ref().expect("runtime lives until drop").spawn(async move {
            // The receiver waits for this send; it cannot be gone.
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("an S3 request task panicked")
    }

    fn path(&self, key: &ObjectKey) -> Path {
        Path::from(format!("{}{}", self.root, key.path()))
    }

    /// Maps an `object_store` error: "not found" becomes
    /// [`BackendError::NotFound`], anything else an I/O error whose message
    /// has the whole cause chain (e.g. "connection refused") and the
    /// endpoint, and never a credential.
    fn error(&self, op: &'static str, key: &ObjectKey, e: object_store::Error) -> BackendError {
        if let object_store::Error::NotFound { .. } = e {
            return BackendError::NotFound(*key);
        }
        self.failure(op, &key.path(), &e)
    }

    /// A failed request on `name` (an object's path or a listed prefix).
    fn failure(&self, op: &'static str, name: &str, e: &object_store::Error) -> BackendError {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg = format!("{msg}: {text}");
            }
            source = s.source();
        }
        let endpoint = self.config.endpoint.as_deref().unwrap_or("AWS S3");
        BackendError::Io {
            op,
            key: format!("{}/{name}", self.config.location()),
            source: io::Error::other(format!("S3 endpoint {endpoint}: {msg}")),
        }
    }

    fn head(&self, key: &ObjectKey) -> Result<u64, BackendError> {
        bump(&self.counters.head, 1);
        let (store, path) = (self.store.clone(), self.path(key));
        let meta = self.run(async move { store.head(&path).await }).map_err(|e| self.error("head", key, e))?;
        Ok(meta.size)
    }

    /// Uploads in parts; the object appears only at completion. A failed
    /// upload is aborted so its parts do not linger (best effort: a bucket
    /// lifecycle rule should clean up after a crash).
    fn put_multipart(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError> {
        let part_size = self.config.part_size.max(5 << 20);
        let parts = data.len().div_ceil(part_size) as u64;
        bump(&self.counters.put, parts + 2);
        let (store, path) = (self.store.clone(), self.path(key));
        let data = data.to_vec();
        let result = self.run(async move {
            let upload = store.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
            for chunk in data.chunks(part_size) {
                if let Err(e) = writer.wait_for_capacity(4).await {
                    let _ = writer.abort().await;
                    return Err(e);
                }
                writer.write(chunk);
            }
            writer.finish().await
        });
        result.map(drop).map_err(|e| self.put_error(key, e))
    }

    /// A failed upload. "Not found" from a PUT means the bucket is missing,
    /// which the generic mapping would turn into a baffling "not found" of
    /// the very object being written.
    fn put_error(&self, key: &ObjectKey, e: object_store::Error) -> BackendError {
        if let object_store::Error::NotFound { .. } = e {
            return BackendError::Other(format!(
                "cannot write {key} to {}: bucket {:?} does not exist (create it first)",
                self.location(),
                self.config.bucket
            ));
        }
        self.failure("put", &key.path(), &e)
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        tracing::debug!(requests = ?self.requests(), "S3 backend closed");
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.config.location()
    }

    /// HEAD, then a conditional PUT (or a multipart upload) if the object
    /// is absent; see the module docs for why this keeps objects write-once.
    fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError> {
        let expected = data.len() as u64;
        let already = |size: u64| {
            if size == expected {
                Ok(())
            } else {
                Err(BackendError::Other(format!(
                    "refusing to overwrite {key} in {}: it exists with {size} bytes, not {expected}",
                    self.location()
                )))
            }
        };
        match self.head(key) {
            Ok(size) => return already(size),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        if data.len() >= self.config.multipart_threshold {
            return self.put_multipart(key, data);
        }
        bump(&self.counters.put, 1);
        let (store, path) = (self.store.clone(), self.path(key));
        let payload = PutPayload::from(data.to_vec());
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.run(async move { store.put_opts(&path, payload, opts).await }) {
            Ok(_) => Ok(()),
            // Another writer (or our own retried request) got there first.
            Err(object_store::Error::AlreadyExists { .. }) => already(self.head(key)?),
            Err(e) => Err(self.put_error(key, e)),
        }
    }

    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, BackendError> {
        bump(&self.counters.get, 1);
        let (store, path) = (self.store.clone(), self.path(key));
        let bytes = self.run(async move { store.get(&path).await?.bytes().await });
        Ok(bytes.map_err(|e| self.error("get", key, e))?.to_vec())
    }

    /// One HTTP range request. An empty range is answered with a HEAD (HTTP
    /// cannot ask for zero bytes); a range past the end is a
    /// [`BackendError::ShortRead`], found out with a HEAD after the store
    /// refused or shortened the range. Refuses ranges over 1 GiB.
    fn get_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let Some(end) = offset.checked_add(len) else {
            return Err(BackendError::ShortRead(*key));
        };
        if len > MAX_RANGE {
            return Err(BackendError::Other(format!(
                "get_range {key}: {len} bytes is more than one read may ask for ({MAX_RANGE})"
            )));
        }
        if len == 0 {
            return if self.head(key)? >= offset { Ok(Vec::new()) } else { Err(BackendError::ShortRead(*key)) };
        }
        bump(&self.counters.get, 1);
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.get_range(&path, offset..end).await }) {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes.to_vec()),
            Ok(_) => Err(BackendError::ShortRead(*key)),
            Err(e) => {
                let e = self.error("get_range", key, e);
                if e.is_not_found() {
                    return Err(e);
                }
                match self.head(key) {
                    Ok(size) if size < end => Err(BackendError::ShortRead(*key)),
                    _ => Err(e),
                }
            }
        }
    }

    fn size(&self, key: &ObjectKey) -> Result<u64, BackendError> {
        self.head(key)
    }

    /// Lists the type's prefix (for packs, recursively through the fan-out
    /// level), keeping only valid object names, packs in the right fan-out
    /// directory.
    fn list(&self, file_type: FileType) -> Result<Vec<(ObjectKey, u64)>, BackendError> {
        let Some(dir) = file_type.dir() else {
            return match self.head(&ObjectKey::Config) {
                Ok(size) => Ok(vec![(ObjectKey::Config, size)]),
                Err(e) if e.is_not_found() => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        };
        let prefix = format!("{}{dir}", self.root);
        let store = self.store.clone();
        let list_path = Path::from(prefix.as_str());
        let metas = self
            .run(async move { store.list(Some(&list_path)).try_collect::<Vec<_>>().await })
            .map_err(|e| self.failure("list", dir, &e))?;
        bump(&self.counters.list, 1 + metas.len() as u64 / 1000);
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let full = meta.location.to_string();
            let Some(rel) = full.strip_prefix(&prefix).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let name = match (file_type, rel.split_once('/')) {
                (FileType::Pack, Some((fan_out, name))) if name.starts_with(fan_out) && fan_out.len() == 2 => name,
                (FileType::Pack, _) | (_, Some(_)) => {
                    tracing::debug!(name = rel, "skipping an object that is not an object name");
                    continue;
                }
                (_, None) => rel,
            };
            match ObjectKey::from_name(file_type, name) {
                Some(key) => out.push((key, meta.size)),
                None => tracing::debug!(name = rel, "skipping an object that is not an object name"),
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, key: &ObjectKey) -> Result<(), BackendError> {
        bump(&self.counters.delete, 1);
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.delete(&path).await }) {
            Err(e) if !matches!(e, object_store::Error::NotFound { .. }) => {
                Err(self.failure("remove", &key.path(), &e))
            }
            _ => Ok(()),
        }
    }

    fn is_remote(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("CHUNKVAULT_S3_ENDPOINT", "http://127.0.0.1:3900/"),
        ("AWS_ACCESS_KEY_ID", "GKexample"),
        ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
        ("AWS_REGION", "garage"),
    ];

    #[test]
    fn parses_bucket_and_prefix() {
        let c = S3Config::from_url("s3://backups/team-a/repo1/", env_of(FULL)).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("backups", "team-a/repo1"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(c.location(), "s3://backups/team-a/repo1");
        let c = S3Config::from_url("s3://backups", env_of(FULL)).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("backups", ""));
        assert_eq!(c.location(), "s3://backups");
    }

    #[test]
    fn refuses_bad_locations() {
        for url in ["s3://", "s3:///x", "s3://b//x", "s3://b/../x", "s3://b/a b", "s3://b/x?y", "http://b/x", "b/x"] {
            let err = S3Config::from_url(url, env_of(FULL)).unwrap_err();
            assert!(matches!(err, S3Error::BadUrl(_)), "{url}: {err}");
        }
    }

    proptest::proptest! {
        /// Any string is either refused or parsed into a location that
        /// prints back to the same bucket and prefix.
        #[test]
        fn location_parsing_is_total_and_roundtrips(url in "(s3://)?[a-z0-9./_ -]{0,40}") {
            if let Ok(c) = S3Config::from_url(&url, env_of(FULL)) {
                let again = S3Config::from_url(&c.location(), env_of(FULL)).unwrap();
                proptest::prop_assert_eq!((&again.bucket, &again.prefix), (&c.bucket, &c.prefix));
                proptest::prop_assert!(c.location().trim_end_matches('/') == url.trim_end_matches('/'));
            }
        }
    }

    #[test]
    fn missing_settings_are_named() {
        for missing in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
            let rest: Vec<(&str, &str)> = FULL.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = S3Config::from_url("s3://b/p", env_of(&rest)).unwrap_err();
            assert!(matches!(err, S3Error::MissingEnv(name) if name == missing), "{err}");
            assert!(err.to_string().contains(missing));
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = S3Config::from_url("s3://b/p", env_of(FULL)).unwrap();
        let backend = S3Backend::new(c.clone()).unwrap();
        for shown in [format!("{c:?}"), format!("{backend:?}")] {
            assert!(!shown.contains("very-secret-value"), "{shown}");
            assert!(shown.contains("GKexample"));
        }
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for (endpoint, ok) in [
            ("http://127.0.0.1:3900", true),
            ("http://localhost:9000", true),
            ("http://[::1]:9000", true),
            ("http://10.0.0.5:9000", false),
            ("http://s3.example.com", false),
            ("https://s3.example.com", true),
        ] {
            let mut env: Vec<(&str, &str)> = FULL[1..].to_vec();
            env.push(("CHUNKVAULT_S3_ENDPOINT", endpoint));
            let result = S3Backend::new(S3Config::from_url("s3://b", env_of(&env)).unwrap());
            assert_eq!(result.is_ok(), ok, "{endpoint}");
            env.push(("CHUNKVAULT_S3_ALLOW_HTTP", "1"));
            assert!(S3Backend::new(S3Config::from_url("s3://b", env_of(&env)).unwrap()).is_ok());
        }
    }

    /// An endpoint nobody listens on: a clear error naming it, quickly (no
    /// retries configured), from a plain thread and from inside a tokio
    /// runtime alike.
    #[test]
    fn unreachable_endpoint_is_a_clear_error_from_any_thread() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut env: Vec<(&str, &str)> = FULL[1..].to_vec();
        env.push(("CHUNKVAULT_S3_ENDPOINT", &endpoint));
        env.push(("CHUNKVAULT_S3_MAX_RETRIES", "0"));
        let backend = S3Backend::new(S3Config::from_url("s3://b/p", env_of(&env)).unwrap()).unwrap();
        let check = |err: BackendError| {
            let msg = err.to_string();
            assert!(!err.is_not_found());
            assert!(msg.contains(&endpoint) && msg.contains("s3://b/p/config"), "{msg}");
            assert!(!msg.contains("very-secret-value"), "{msg}");
        };
        check(backend.get(&ObjectKey::Config).unwrap_err());
        let other = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        other.block_on(async { check(backend.get(&ObjectKey::Config).unwrap_err()) });
        // Dropping the backend inside another runtime must not panic either.
        other.block_on(async move { drop(backend) });
    }

    /// Settings of the cluster started by `scripts/garage-cluster.sh`, with
    /// a fresh prefix per test.
    pub(crate) fn garage_backend(tuning: impl FnOnce(&mut S3Config)) -> S3Backend {
        let bucket = std::env::var("CHUNKVAULT_TEST_S3_BUCKET")
            .expect("CHUNKVAULT_TEST_S3_BUCKET: start a cluster with scripts/garage-cluster.sh start");
        let url = format!("s3://{bucket}/unit-{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut config = S3Config::from_url(&url, |n| std::env::var(n).ok()).unwrap();
        tuning(&mut config);
        S3Backend::new(config).unwrap()
    }

    #[test]
    #[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
    fn conformance_on_garage() {
        let backend = garage_backend(|_| {});
        super::super::conformance(&backend);
        assert!(backend.requests().total() > 0);
    }

    /// Multipart uploads, with a small threshold so a 12 MiB object goes up
    /// in three parts, and a refused overwrite with other bytes.
    #[test]
    #[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
    fn multipart_and_write_once_on_garage() {
        let backend = garage_backend(|c| {
            c.multipart_threshold = 5 << 20;
            c.part_size = 5 << 20;
        });
        let key = ObjectKey::Pack(crate::id::PackId::random());
        let data: Vec<u8> = (0..12u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let before = backend.requests().put;
        backend.put(&key, &data).unwrap();
        assert_eq!(backend.requests().put - before, 3 + 2, "three parts, initiation, completion");
        assert!(backend.get(&key).unwrap() == data);
        assert_eq!(backend.get_range(&key, (5 << 20) - 3, 10).unwrap(), &data[(5 << 20) - 3..(5 << 20) + 7]);
        // The same bytes again: nothing sent. Other bytes: refused, object intact.
        let puts = backend.requests().put;
        backend.put(&key, &data).unwrap();
        assert_eq!(backend.requests().put, puts);
        let err = backend.put(&key, b"other").unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert!(backend.get(&key).unwrap() == data);
        backend.remove(&key).unwrap();
    }
}
