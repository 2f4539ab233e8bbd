//! Opening and creating repositories, and reading the objects in them.
//!
//! [`Repository`] ties a [`Backend`] to the unwrapped master key, the
//! config and the in-memory [`Index`]. Everything above (backup, restore,
//! check, the server) goes through it.

pub mod config;
pub mod keys;
mod objects;
mod read;
mod session;

pub use read::{DeliverBlob, DeliverSealed, PackBlobs};
pub use session::{WriteError, WriteSession};

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use rayon::prelude::*;

use crate::backend::{Backend, BackendError, FileType, LocalBackend, ObjectKey};
use crate::blob::{BlobCodec, BlobError, IdCheck};
use crate::cache::Cache;
use crate::chunker::{Chunker, ChunkerError, ChunkerParams};
use crate::crypto::{CryptoError, IdKey, KdfParams, MasterKey, Role};
use crate::id::{BlobId, BlobKind, IndexId, KeyId, PackId, SnapshotId};
use crate::index::{Index, IndexSegment, SegmentError};
use crate::pack::{self, PackError};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::tree::{Tree, TreeError};
pub use config::{Config, ConfigError, FORMAT_VERSION};
pub use keys::KeyFile;

/// Errors of repository-level operations.
///
/// [`RepoError::is_damage`] tells damaged stored data (exit code 3) apart
/// from everything else (storage unreachable, wrong password, bad input).
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage failed (I/O, network, permissions) or an object is
    /// missing; [`BackendError::is_not_found`] tells which.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// No key file unwraps with the password given (or there is no readable
    /// key file at all).
    #[error("wrong password: no key in this repository opens with it")]
    WrongPassword,
    /// The location (named here) has no `config` object: not a repository.
    #[error("no repository at {0} (run `chunkvault init` first)")]
    NotARepository(String),
    /// [`Repository::init`] or [`open_backend`] with `create`: the location
    /// (named here) already holds a `config`.
    #[error("a repository already exists at {0}")]
    AlreadyExists(String),
    /// The config decrypted but is not one this version can use (unknown
    /// format version, bad chunker or pack size).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The chunker parameters (from [`InitOptions`] or the config) are out
    /// of range.
    #[error(transparent)]
    Chunker(#[from] ChunkerError),
    /// A sealed object failed to open (or a key to wrap): damaged, or sealed
    /// under another key.
    #[error("{what} {name}: {source}")]
    Crypto {
        /// What kind of object: `"config"`, `"index segment"`, `"snapshot"`, `"key"`.
        what: &'static str,
        /// The object's storage key (e.g. `snapshots/<id>`), for messages.
        name: String,
        /// Why it did not open.
        source: CryptoError,
    },
    /// The object (its storage key here) does not hash to its name: damaged.
    #[error("{0} is damaged: its content does not match its name")]
    NameMismatch(String),
    /// A pack or a blob frame in it is damaged (bad crc, length or table).
    #[error("pack {pack}: {source}")]
    Pack {
        /// The pack's id in hex, or `blob <id>` when one frame was checked.
        pack: String,
        /// What is wrong with it.
        source: PackError,
    },
    /// A blob failed to open: authentication, decompression, or its
    /// plaintext does not hash to its id.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The tree blob with this id opened but does not decode.
    #[error("tree {0}: {1}")]
    Tree(BlobId, TreeError),
    /// The index segment (id in hex) opened but does not decode.
    #[error("index segment {0}: {1}")]
    Segment(String, SegmentError),
    /// The snapshot manifest (id in hex) opened but does not decode.
    #[error("snapshot {0}: {1}")]
    Snapshot(String, SnapshotError),
    /// The key file (id in hex) is not valid JSON of a key file.
    #[error("key file {0}: {1}")]
    KeyFile(String, serde_json::Error),
    /// A blob a tree or a caller asked for is in no loaded index segment
    /// (lost, or written after the index was loaded: see
    /// [`Repository::refresh_index`]).
    #[error("blob {0} is not in the index")]
    MissingBlob(BlobId),
    /// No stored snapshot matches the id, prefix or `latest` given.
    #[error("no snapshot matches {0:?}")]
    NoSuchSnapshot(String),
    /// The prefix given matches more than one snapshot id.
    #[error("{0:?} matches several snapshots; give more characters")]
    AmbiguousSnapshot(String),
    /// `latest` cannot be resolved: these snapshots cannot be read, so which
    /// one is the newest is unknown.
    #[error("snapshot{} {} cannot be read, so which snapshot is the latest is unknown; name a snapshot by id, or remove the damaged ones with `chunkvault forget ID` or `chunkvault repair snapshots --forget`", if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|i| i.to_hex()).collect::<Vec<_>>().join(", "))]
    UnreadableSnapshots(Vec<SnapshotId>),
    /// An earlier pack upload of this packer failed; it refuses further work.
    #[error("an earlier pack upload failed: {0}")]
    Upload(Arc<crate::packer::UploadError>),
    /// A path that is not in the snapshot ([`Repository::find_node`]).
    #[error("{0}: not found in the snapshot")]
    PathNotFound(String),
    /// A request the repository refuses (removing the key in use, an
    /// unknown key id, S3 in a build without it) or a pack read that failed
    /// under the read path; the message says which.
    #[error("{0}")]
    Invalid(String),
}

impl RepoError {
    /// True when the error means stored data is damaged (exit code 3).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            RepoError::NameMismatch(_)
                | RepoError::Pack { .. }
                | RepoError::Blob(_)
                | RepoError::Tree(..)
                | RepoError::Segment(..)
                | RepoError::Crypto { .. }
                | RepoError::MissingBlob(_)
                | RepoError::UnreadableSnapshots(_)
        ) || matches!(self, RepoError::Snapshot(_, SnapshotError::Json(_)))
    }
}

/// Settings fixed when a repository is created. The first three are stored
/// in the config and cannot change later; `kdf` applies to the first key
/// file only.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// FastCDC chunk sizes (bytes); validated by [`Repository::init`].
    pub chunker: ChunkerParams,
    /// zstd level for blobs, -7 to 22 (default 3); 0 stores them uncompressed.
    pub compression_level: i32,
    /// Target size of a pack file in bytes, 1 MiB to 1 GiB (default 16 MiB).
    pub pack_size: u32,
    /// Argon2id cost of wrapping the master key with the password.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression_level: 3,
            pack_size: 16 << 20,
            kdf: KdfParams::default(),
        }
    }
}

/// Opens the backend a location names: `s3://bucket/prefix` (feature `s3`,
/// settings from the environment) or a local directory path.
pub fn open_backend(location: &str, create: bool) -> Result<Arc<dyn Backend>, RepoError> {
    if location.starts_with("s3://") {
        return open_s3(location);
    }
    let path = Path::new(location);
    if create {
        if path.join("config").exists() {
            return Err(RepoError::AlreadyExists(location.into()));
        }
        Ok(Arc::new(LocalBackend::create(path)?))
    } else {
        if !path.join("config").is_file() {
            return Err(RepoError::NotARepository(location.into()));
        }
        Ok(Arc::new(LocalBackend::open(path)?))
    }
}

/// An S3 location; whether a repository is there (or not, for `init`) is
/// found out by [`Repository::open`] and [`Repository::init`], which ask for
/// the config.
#[cfg(feature = "s3")]
fn open_s3(location: &str) -> Result<Arc<dyn Backend>, RepoError> {
    Ok(Arc::new(crate::backend::S3Backend::from_url(location).map_err(BackendError::from)?))
}

#[cfg(not(feature = "s3"))]
fn open_s3(location: &str) -> Result<Arc<dyn Backend>, RepoError> {
    Err(RepoError::Invalid(format!("{location}: this build has no S3 support (feature \"s3\")")))
}

/// Objects loaded (id and value), and apart those that could not be (id and
/// why, as a message).
pub type Loaded<I, T> = (Vec<(I, T)>, Vec<(I, String)>);

/// A repository opened with a password.
///
/// `Send + Sync`: share one in an `Arc` between threads. Every method takes
/// `&self` and blocks on storage I/O (call it from `spawn_blocking` in async
/// code). The in-memory index sits behind a read-write lock: index reloads
/// wait for readers holding [`Repository::index`]'s guard, so do not hold
/// that guard across a reload or a commit.
pub struct Repository {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    key_id: KeyId,
    id_key: IdKey,
    config: Config,
    codec: BlobCodec,
    chunker: Chunker,
    index: RwLock<Index>,
    bad_segments: Mutex<Vec<(IndexId, String)>>,
    /// Index segments in `index` (or known unreadable), so that
    /// [`Repository::refresh_index`] loads only new ones and
    /// [`Repository::reload_index_if_replaced`] sees when one is gone.
    loaded_segments: Mutex<HashSet<IndexId>>,
    /// Local copies of index segments, snapshots and tree packs, for remote
    /// backends (see `crate::cache`).
    cache: Option<Cache>,
    /// Held while a tree pack is downloaded into the cache, so that threads
    /// needing the same pack wait for one download instead of each making one.
    cache_fill: Mutex<()>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("location", &self.backend.location()).field("config", &self.config).finish()
    }
}

/// A key as `key list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyInfo {
    /// The key file's id (its name under `keys/`).
    pub id: KeyId,
    /// True for the key this repository was opened with.
    pub current: bool,
    /// When the key file was written (UTC, as recorded in it).
    pub created: chrono::DateTime<chrono::Utc>,
    /// The host that wrote it, as recorded (not verified).
    pub hostname: String,
    /// The user that wrote it, as recorded (not verified).
    pub username: String,
}

impl Repository {
    /// Creates a repository in an empty backend and opens it.
    pub fn init(backend: Arc<dyn Backend>, password: &[u8], opts: &InitOptions) -> Result<Repository, RepoError> {
        if crate::backend::exists(backend.as_ref(), &ObjectKey::Config)? {
            return Err(RepoError::AlreadyExists(backend.location()));
        }
        opts.chunker.validate()?;
        let key = MasterKey::generate();
        let config = Config {
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: opts.chunker,
            compression_level: opts.compression_level,
            pack_size: opts.pack_size,
        };
        // Validate through the same path `open` uses, so init never writes
        // a config that open would refuse.
        Config::decode(&config.encode())?;
        let key_id = write_key(backend.as_ref(), &key, password, opts.kdf)?;
        // The config goes last: its presence marks a usable repository.
        backend.put(&ObjectKey::Config, &key.seal_object(Role::Config, &config.encode()))?;
        Repository::assemble(backend, key, key_id, config, Index::new())
    }

    /// Opens a repository: finds the key the password unwraps, reads the
    /// config and loads every index segment.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8]) -> Result<Repository, RepoError> {
        let sealed_config = match backend.get(&ObjectKey::Config) {
            Err(e) if e.is_not_found() => return Err(RepoError::NotARepository(backend.location())),
            other => other?,
        };
        let (key_id, key) = unlock(backend.as_ref(), password)?;
        let config_bytes = key.open_object(Role::Config, &sealed_config).map_err(|source| RepoError::Crypto {
            what: "config",
            name: "config".into(),
            source,
        })?;
        let config = Config::decode(&config_bytes)?;
        let repo = Repository::assemble(backend, key, key_id, config, Index::new())?;
        repo.reload_index()?;
        Ok(repo)
    }

    fn assemble(
        backend: Arc<dyn Backend>,
        key: MasterKey,
        key_id: KeyId,
        config: Config,
        index: Index,
    ) -> Result<Repository, RepoError> {
        let chunker = Chunker::new(config.chunker, key.chunker_seed())?;
        let codec = BlobCodec::new(key.clone(), config.compression_level);
        let cache = if backend.is_remote() { open_cache(&config.id) } else { None };
        Ok(Repository {
            id_key: key.id_key(),
            backend,
            key,
            key_id,
            codec,
            chunker,
            config,
            index: RwLock::new(index),
            bad_segments: Mutex::default(),
            loaded_segments: Mutex::default(),
            cache,
            cache_fill: Mutex::new(()),
        })
    }

    /// Loads every index segment from the backend (in parallel), replacing
    /// the in-memory index. A segment that cannot be read is skipped with a
    /// warning and remembered for `check`: the packs it names count as
    /// unindexed, and only snapshots that need them are affected.
    pub fn reload_index(&self) -> Result<(), RepoError> {
        let (good, bad) = self.load_all(
            FileType::Index,
            |k| match k {
                ObjectKey::Index(id) => Some(*id),
                _ => None,
            },
            |id| self.load_index_segment(id),
        )?;
        let loaded: HashSet<IndexId> = good.iter().map(|(id, _)| *id).chain(bad.iter().map(|(id, _)| *id)).collect();
        if let Some(cache) = &self.cache {
            // Segments gone from the repository (prune) leave the cache too.
            cache.retain(FileType::Index, |k| matches!(k, ObjectKey::Index(id) if loaded.contains(id)));
        }
        let segments: Vec<IndexSegment> = good.into_iter().map(|(_, s)| s).collect();
        *self.index.write().expect("index lock") = Index::from_segments(&segments);
        *self.bad_segments.lock().expect("segments lock") = bad;
        *self.loaded_segments.lock().expect("segments lock") = loaded;
        Ok(())
    }

    /// Drops the in-memory index (a storage node closing an idle tenant
    /// whose repository may still be listed by what holds it). The next
    /// [`Repository::refresh_index`] or [`Repository::reload_index`] loads
    /// every segment again; until then no blob is found.
    pub fn unload_index(&self) {
        *self.index.write().expect("index lock") = Index::default();
        self.bad_segments.lock().expect("segments lock").clear();
        self.loaded_segments.lock().expect("segments lock").clear();
    }

    /// Loads the index segments that appeared since the index was loaded:
    /// those written by other processes sharing the repository (other
    /// storage nodes on one bucket). Returns how many were added.
    ///
    /// A long-running process calls this when it starts a unit of work (the
    /// server: on each new session) to see the chunks others stored since;
    /// until then it may store a chunk again that another node has, which
    /// costs space, never correctness (see ARCHITECTURE.md, "Several
    /// writers"). Blobs already indexed keep their first location.
    pub fn refresh_index(&self) -> Result<usize, RepoError> {
        let known = self.loaded_segments.lock().expect("segments lock").clone();
        let (good, bad) = self.load_all(
            FileType::Index,
            |k| match k {
                ObjectKey::Index(id) if !known.contains(id) => Some(*id),
                _ => None,
            },
            |id| self.load_index_segment(id),
        )?;
        if good.is_empty() && bad.is_empty() {
            // The common case on a busy node: one listing, and readers of
            // the index are not held up by a write lock for nothing.
            return Ok(0);
        }
        let mut loaded = self.loaded_segments.lock().expect("segments lock");
        let mut index = self.index.write().expect("index lock");
        let mut added = 0;
        for (id, segment) in &good {
            // Another refresh may have added it meanwhile.
            if loaded.insert(*id) {
                index.add_segment(segment);
                added += 1;
            }
        }
        for (id, _) in &bad {
            loaded.insert(*id);
        }
        self.bad_segments.lock().expect("segments lock").extend(bad);
        Ok(added)
    }

    /// Loads every object of a type in parallel. Objects that fail to decode
    /// or verify are returned apart, with why; a storage error fails it all.
    fn load_all<I: Send + Copy + std::fmt::Display, T: Send>(
        &self,
        file_type: FileType,
        id_of: impl Fn(&ObjectKey) -> Option<I> + Sync,
        load: impl Fn(&I) -> Result<T, RepoError> + Sync,
    ) -> Result<Loaded<I, T>, RepoError> {
        let listed = self.backend.list(file_type)?;
        let loaded: Vec<(I, Result<T, RepoError>)> =
            listed.par_iter().filter_map(|(k, _)| id_of(k)).map(|id| (id, load(&id))).collect();
        let (mut good, mut bad) = (Vec::with_capacity(loaded.len()), Vec::new());
        for (id, result) in loaded {
            match result {
                Ok(t) => good.push((id, t)),
                Err(RepoError::Backend(e)) if !e.is_not_found() => return Err(RepoError::Backend(e)),
                Err(e) => {
                    tracing::warn!("skipping unreadable {id}: {e}");
                    bad.push((id, e.to_string()));
                }
            }
        }
        Ok((good, bad))
    }

    /// Reloads the index if a segment it was built from is gone: prune or
    /// `repair index` replaced the index since, and packs it names may be
    /// deleted. A writer calls this once it holds its lock, before it trusts
    /// the index for deduplication. Returns whether it reloaded.
    pub fn reload_index_if_replaced(&self) -> Result<bool, RepoError> {
        let listed: HashSet<IndexId> = crate::backend::index_ids(self.backend.as_ref())?.into_iter().collect();
        let replaced = !self.loaded_segments.lock().expect("segments lock").is_subset(&listed);
        if replaced {
            self.reload_index()?;
        }
        Ok(replaced)
    }

    /// Index segments the last load had to skip, with why.
    pub fn unreadable_index_segments(&self) -> Vec<(IndexId, String)> {
        self.bad_segments.lock().expect("segments lock").clone()
    }

    /// Reads, verifies and decodes one index segment.
    pub fn load_index_segment(&self, id: &IndexId) -> Result<IndexSegment, RepoError> {
        let plain = self.load_named(&ObjectKey::Index(*id), id.0, Role::Index, "index segment")?;
        IndexSegment::decode(&plain).map_err(|e| RepoError::Segment(id.to_hex(), e))
    }

    /// Fetches an object named by the BLAKE3 of its bytes, checks the name
    /// and opens it. With a cache, a cached copy that matches its name is
    /// used, and a fetched one that matches is cached.
    fn load_named(
        &self,
        key: &ObjectKey,
        name: [u8; 32],
        role: Role,
        what: &'static str,
    ) -> Result<Vec<u8>, RepoError> {
        let matches = |bytes: &[u8]| *blake3::hash(bytes).as_bytes() == name;
        let cached = self.cache.as_ref().and_then(|c| c.get(key)).filter(|b| matches(b));
        let sealed = match cached {
            Some(sealed) => sealed,
            None => {
                let sealed = self.backend.get(key)?;
                if !matches(&sealed) {
                    return Err(RepoError::NameMismatch(key.to_string()));
                }
                if let Some(cache) = &self.cache {
                    cache.put(key, &sealed);
                }
                sealed
            }
        };
        self.key.open_object(role, &sealed).map_err(|source| RepoError::Crypto { what, name: key.to_string(), source })
    }

    /// Seals and stores an object named by the hash of its stored bytes.
    fn save_named(
        &self,
        role: Role,
        plain: &[u8],
        make_key: impl Fn([u8; 32]) -> ObjectKey,
    ) -> Result<[u8; 32], RepoError> {
        let sealed = self.key.seal_object(role, plain);
        let name = *blake3::hash(&sealed).as_bytes();
        self.backend.put(&make_key(name), &sealed)?;
        Ok(name)
    }

    /// Stores an index segment durably and adds it to the in-memory index.
    pub fn save_index_segment(&self, segment: &IndexSegment) -> Result<IndexId, RepoError> {
        let name = self.save_named(Role::Index, &segment.encode(), |n| ObjectKey::Index(IndexId(n)))?;
        self.index.write().expect("index lock").add_segment(segment);
        self.loaded_segments.lock().expect("segments lock").insert(IndexId(name));
        Ok(IndexId(name))
    }

    /// Stores a snapshot manifest. Call only after everything it references
    /// is durable: this write is the backup's commit.
    pub fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotId, RepoError> {
        let name = self.save_named(Role::Snapshot, &snapshot.encode(), |n| ObjectKey::Snapshot(SnapshotId(n)))?;
        Ok(SnapshotId(name))
    }

    /// Reads one snapshot manifest.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot, RepoError> {
        let plain = self.load_named(&ObjectKey::Snapshot(*id), id.0, Role::Snapshot, "snapshot")?;
        Snapshot::decode(&plain).map_err(|e| RepoError::Snapshot(id.to_hex(), e))
    }

    /// Every readable snapshot, oldest first. One that cannot be read is
    /// skipped with a warning (`check` reports it as damage).
    pub fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
        Ok(self.list_snapshots_and_unreadable()?.0)
    }

    /// Every readable snapshot, oldest first, and apart the snapshots that
    /// cannot be read, with why.
    pub fn list_snapshots_and_unreadable(&self) -> Result<Loaded<SnapshotId, Snapshot>, RepoError> {
        let (mut out, bad) = self.load_all(
            FileType::Snapshot,
            |k| match k {
                ObjectKey::Snapshot(id) => Some(*id),
                _ => None,
            },
            |id| self.load_snapshot(id),
        )?;
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok((out, bad))
    }

    /// Resolves `latest`, a full id or a unique id prefix, and loads it.
    /// `latest` is refused while any snapshot cannot be read: its time is
    /// inside it, so it might be the newest ([`RepoError::UnreadableSnapshots`]).
    pub fn find_snapshot(&self, spec: &str) -> Result<(SnapshotId, Snapshot), RepoError> {
        if spec == "latest" {
            let (mut good, bad) = self.list_snapshots_and_unreadable()?;
            if !bad.is_empty() {
                return Err(RepoError::UnreadableSnapshots(bad.into_iter().map(|(id, _)| id).collect()));
            }
            return good.pop().ok_or_else(|| RepoError::NoSuchSnapshot(spec.into()));
        }
        let id = self.resolve_snapshot_id(spec)?;
        Ok((id, self.load_snapshot(&id)?))
    }

    /// Resolves a full snapshot id or a unique prefix of one among the
    /// stored snapshots, without reading it (so a damaged one can be named).
    pub fn resolve_snapshot_id(&self, spec: &str) -> Result<SnapshotId, RepoError> {
        if spec.is_empty() || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RepoError::NoSuchSnapshot(spec.into()));
        }
        let spec_lower = spec.to_ascii_lowercase();
        let matches: Vec<SnapshotId> = self
            .backend
            .list(FileType::Snapshot)?
            .into_iter()
            .filter_map(|(k, _)| match k {
                ObjectKey::Snapshot(id) if id.to_hex().starts_with(&spec_lower) => Some(id),
                _ => None,
            })
            .collect();
        match matches.as_slice() {
            [] => Err(RepoError::NoSuchSnapshot(spec.into())),
            [id] => Ok(*id),
            _ => Err(RepoError::AmbiguousSnapshot(spec.into())),
        }
    }

    /// Reads a blob, verifying crc, authenticity and that it hashes to `id`.
    pub fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>, RepoError> {
        let loc = self.index().get(id).ok_or(RepoError::MissingBlob(*id))?;
        let frame_len = pack::frame_len(loc.stored_len);
        let (offset, key) = (u64::from(loc.offset), ObjectKey::Pack(loc.pack));
        let open = |frame: &[u8]| self.open_frame(id, loc.kind, frame, offset, loc.stored_len, loc.raw_len);
        if let (Some(cache), BlobKind::Tree) = (&self.cache, loc.kind) {
            // A damaged cached copy is dropped and the pack fetched again
            // (once); if that fails too, the backend's own answer decides.
            for _ in 0..2 {
                let Some(frame) = self.cached_tree_frame(cache, &loc.pack, offset, frame_len) else { break };
                match open(&frame) {
                    Ok(plain) => return Ok(plain),
                    Err(_) => cache.remove(&key),
                }
            }
        }
        open(&self.backend.get_range(&key, offset, frame_len)?)
    }

    /// A tree blob's frame from the cached copy of its pack, downloading the
    /// whole pack into the cache first if needed (tree packs are few and a
    /// walk reads many trees of each). `None` if the pack cannot be had
    /// whole and verified; the caller then reads the range from the backend.
    fn cached_tree_frame(&self, cache: &Cache, pack: &PackId, offset: u64, len: u64) -> Option<Vec<u8>> {
        let key = ObjectKey::Pack(*pack);
        if let Some(frame) = cache.get_range(&key, offset, len) {
            return Some(frame);
        }
        let _one_download = self.cache_fill.lock().expect("cache lock");
        if let Some(frame) = cache.get_range(&key, offset, len) {
            return Some(frame);
        }
        let bytes = self.backend.get(&key).ok()?;
        if blake3::hash(&bytes).as_bytes() != &pack.0 {
            return None;
        }
        cache.put(&key, &bytes);
        let start = usize::try_from(offset).ok()?;
        bytes.get(start..start.checked_add(usize::try_from(len).ok()?)?).map(<[u8]>::to_vec)
    }

    /// Verifies and opens one blob frame read from a pack.
    pub fn open_frame(
        &self,
        id: &BlobId,
        kind: BlobKind,
        frame: &[u8],
        offset: u64,
        stored_len: u32,
        raw_len: u32,
    ) -> Result<Vec<u8>, RepoError> {
        self.open_frame_with(id, kind, frame, (offset, stored_len, raw_len), IdCheck::Rehash)
    }

    /// [`Repository::open_frame`] with the id check `check` asks for;
    /// `at` is the frame's offset, stored length and plaintext length.
    pub(crate) fn open_frame_with(
        &self,
        id: &BlobId,
        kind: BlobKind,
        frame: &[u8],
        (offset, stored_len, raw_len): (u64, u32, u32),
        check: IdCheck,
    ) -> Result<Vec<u8>, RepoError> {
        let stored = pack::check_frame(frame, offset, stored_len)
            .map_err(|source| RepoError::Pack { pack: format!("blob {id}"), source })?;
        Ok(self.codec.open_with(kind, id, stored.to_vec(), raw_len as usize, check)?)
    }

    /// Loads and decodes a tree blob.
    pub fn load_tree(&self, id: &BlobId) -> Result<Tree, RepoError> {
        let bytes = self.read_blob(id)?;
        Tree::decode(&bytes).map_err(|e| RepoError::Tree(*id, e))
    }

    /// Finds the node at `path` (slash-separated, relative to the root tree)
    /// and returns it with the tree that holds it; `None` for the root itself.
    pub fn find_node(&self, root: &BlobId, path: &str) -> Result<Option<crate::tree::Node>, RepoError> {
        let mut tree_id = *root;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(None);
        };
        for part in dirs {
            let tree = self.load_tree(&tree_id)?;
            match tree.find(part.as_bytes()).map(|n| &n.kind) {
                Some(crate::tree::NodeKind::Dir { subtree }) => tree_id = *subtree,
                _ => return Err(RepoError::PathNotFound(path.to_owned())),
            }
        }
        let tree = self.load_tree(&tree_id)?;
        tree.find(last.as_bytes()).cloned().map(Some).ok_or_else(|| RepoError::PathNotFound(path.to_owned()))
    }

    /// Adds a key file for another password.
    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<KeyId, RepoError> {
        write_key(self.backend.as_ref(), &self.key, password, kdf)
    }

    /// The key files, without unwrapping them.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, RepoError> {
        let mut out = Vec::new();
        for (k, _) in self.backend.list(FileType::Key)? {
            let ObjectKey::Key(id) = k else { continue };
            let file = KeyFile::decode(&self.backend.get(&k)?).map_err(|e| RepoError::KeyFile(id.to_hex(), e))?;
            out.push(KeyInfo {
                id,
                current: id == self.key_id,
                created: file.created,
                hostname: file.hostname,
                username: file.username,
            });
        }
        out.sort_by_key(|k| k.created);
        Ok(out)
    }

    /// Removes a key file; refuses the key this session opened with.
    pub fn remove_key(&self, id: &KeyId) -> Result<(), RepoError> {
        if *id == self.key_id {
            return Err(RepoError::Invalid(
                "refusing to remove the key in use; open with another password first".into(),
            ));
        }
        if !crate::backend::exists(self.backend.as_ref(), &ObjectKey::Key(*id))? {
            return Err(RepoError::Invalid(format!("no key {id}")));
        }
        self.backend.remove(&ObjectKey::Key(*id))?;
        Ok(())
    }

    /// The id of the key this repository was opened with.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The storage under the repository. Stages go through `Repository`;
    /// this is for tools that list or copy raw objects (`unlock`, locks,
    /// tests). Writing through it bypasses the commit protocol.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The decrypted config (format version, chunker, compression, pack size).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The chunker keyed for this repository (its gear seed derives from the
    /// master key, so cut points differ between repositories).
    pub fn chunker(&self) -> &Chunker {
        &self.chunker
    }

    /// The blob codec (compress, seal, open, verify) under this repository's key.
    pub fn codec(&self) -> &BlobCodec {
        &self.codec
    }

    /// The key naming blobs, for clients that chunk and hash on their side.
    pub fn id_key(&self) -> &IdKey {
        &self.id_key
    }

    /// The chunker's gear seed, for clients that chunk on their side.
    pub fn chunker_seed(&self) -> u64 {
        self.key.chunker_seed()
    }

    /// The id of a blob's plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        self.id_key.blob_id(plaintext)
    }

    pub(crate) fn master_key(&self) -> &MasterKey {
        &self.key
    }

    /// Read access to the in-memory index.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().expect("index lock")
    }
}

/// The cache for a remote repository, if a cache directory can be had
/// (`crate::cache::default_root`); without one the repository works, only
/// slower to open.
fn open_cache(repo_id: &str) -> Option<Cache> {
    let root = crate::cache::default_root()?;
    match Cache::open(&root, repo_id, crate::cache::DEFAULT_MAX_BYTES) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!("working without a local cache: {e}");
            None
        }
    }
}

fn write_key(backend: &dyn Backend, key: &MasterKey, password: &[u8], kdf: KdfParams) -> Result<KeyId, RepoError> {
    let (username, hostname) = keys::whoami();
    let file = KeyFile {
        created: chrono::Utc::now(),
        hostname,
        username,
        key: key.wrap(password, kdf).map_err(|source| RepoError::Crypto { what: "key", name: "new".into(), source })?,
    };
    let id = KeyId::random();
    backend.put(&ObjectKey::Key(id), &serde_json::to_vec_pretty(&file).expect("key file serializes"))?;
    Ok(id)
}

fn unlock(backend: &dyn Backend, password: &[u8]) -> Result<(KeyId, MasterKey), RepoError> {
    for (k, _) in backend.list(FileType::Key)? {
        let ObjectKey::Key(id) = k else { continue };
        let file = match backend
            .get(&k)
            .map_err(RepoError::from)
            .and_then(|b| KeyFile::decode(&b).map_err(|e| RepoError::KeyFile(id.to_hex(), e)))
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("skipping unreadable key file {id}: {e}");
                continue;
            }
        };
        match file.key.unwrap_key(password) {
            Ok(master) => return Ok((id, master)),
            Err(CryptoError::Authentication) => continue,
            Err(e) => tracing::warn!("skipping key file {id}: {e}"),
        }
    }
    Err(RepoError::WrongPassword)
}
