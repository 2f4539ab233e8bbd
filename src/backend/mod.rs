//! Storage backends: where a repository's bytes live.
//!
//! A repository is a flat store of immutable objects, each named by an
//! [`ObjectKey`]. The engine above is synchronous and parallel, so the
//! [`Backend`] trait is synchronous, `Send + Sync` and object-safe (used as
//! `Arc<dyn Backend>`); it assumes nothing about latency, which is why it
//! offers only whole-object put, whole or ranged get, size, list and remove —
//! operations an object store (S3 and the like) does in one request each.
//!
//! [`LocalBackend`] stores objects as files in a directory;
//! [`S3Backend`] (feature `s3`) in an S3-compatible bucket;
//! [`FaultyBackend`] wraps any backend and injects failures, so crash-safety
//! tests can fail every write point of an operation in turn.

pub mod faulty;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

pub use faulty::{Fault, FaultyBackend};
pub use local::LocalBackend;
#[cfg(feature = "s3")]
pub use s3::{S3Backend, S3Config, S3Error};

use std::fmt;

use crate::id::{IndexId, KeyId, LockId, PackId, SnapshotId};

/// What a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileType {
    /// The one `config` object.
    Config,
    /// Key files under `keys/`.
    Key,
    /// Packfiles under `packs/<xx>/`.
    Pack,
    /// Index segments under `index/`.
    Index,
    /// Snapshot manifests under `snapshots/`.
    Snapshot,
    /// Lock files under `locks/`.
    Lock,
}

impl FileType {
    /// The directory (key prefix) under which objects of this type live, or
    /// `None` for the config, the only object at the top of the store.
    pub fn dir(self) -> Option<&'static str> {
        match self {
            FileType::Config => None,
            FileType::Key => Some("keys"),
            FileType::Pack => Some("packs"),
            FileType::Index => Some("index"),
            FileType::Snapshot => Some("snapshots"),
            FileType::Lock => Some("locks"),
        }
    }
}

/// A key in the store. Built only from typed ids, so no user-supplied string
/// ever becomes a path or an object name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKey {
    /// `config`.
    Config,
    /// `keys/<id>` (a random id).
    Key(KeyId),
    /// `packs/<xx>/<id>` (BLAKE3 of the pack file).
    Pack(PackId),
    /// `index/<id>` (BLAKE3 of the sealed segment).
    Index(IndexId),
    /// `snapshots/<id>` (BLAKE3 of the sealed manifest).
    Snapshot(SnapshotId),
    /// `locks/<id>` (a random id).
    Lock(LockId),
}

impl ObjectKey {
    /// The type of object this key names.
    pub fn file_type(&self) -> FileType {
        match self {
            ObjectKey::Config => FileType::Config,
            ObjectKey::Key(_) => FileType::Key,
            ObjectKey::Pack(_) => FileType::Pack,
            ObjectKey::Index(_) => FileType::Index,
            ObjectKey::Snapshot(_) => FileType::Snapshot,
            ObjectKey::Lock(_) => FileType::Lock,
        }
    }

    /// The object's name in the store: `config`, `keys/<hex>`,
    /// `packs/<first two hex>/<hex>`, `index/<hex>`, `snapshots/<hex>` or
    /// `locks/<hex>`. Packs are fanned out over 256 subdirectories so no
    /// directory of a large repository holds millions of entries.
    pub fn path(&self) -> String {
        match self {
            ObjectKey::Config => "config".to_owned(),
            ObjectKey::Key(id) => format!("keys/{id}"),
            ObjectKey::Pack(id) => {
                let hex = id.to_hex();
                format!("packs/{}/{hex}", &hex[..2])
            }
            ObjectKey::Index(id) => format!("index/{id}"),
            ObjectKey::Snapshot(id) => format!("snapshots/{id}"),
            ObjectKey::Lock(id) => format!("locks/{id}"),
        }
    }

    /// The inverse of [`path`](Self::path) for one type's listing: parses the
    /// last component of a name (the 64 lowercase hex characters, or `config`
    /// for [`FileType::Config`]) into a key. `None` if it is anything else —
    /// a temporary file, junk, `..`, uppercase hex or a wrong length.
    pub fn from_name(file_type: FileType, name: &str) -> Option<ObjectKey> {
        Some(match file_type {
            FileType::Config => return (name == "config").then_some(ObjectKey::Config),
            FileType::Key => ObjectKey::Key(name.parse().ok()?),
            FileType::Pack => ObjectKey::Pack(name.parse().ok()?),
            FileType::Index => ObjectKey::Index(name.parse().ok()?),
            FileType::Snapshot => ObjectKey::Snapshot(name.parse().ok()?),
            FileType::Lock => ObjectKey::Lock(name.parse().ok()?),
        })
    }
}

impl fmt::Display for ObjectKey {
    /// Shows the key as its [`path`](ObjectKey::path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The object does not exist.
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// The underlying storage failed; `key` names the object or path involved.
    #[error("{op} {key}: {source}")]
    Io {
        /// The operation: `"put"`, `"get"`, `"list"`, `"remove"`, ...
        op: &'static str,
        /// The object's path (see [`ObjectKey::path`]) or the directory involved.
        key: String,
        /// The error from the filesystem or the S3 client (retries, if
        /// any, already spent).
        #[source]
        source: std::io::Error,
    },
    /// A ranged read asked for bytes past the end of the object.
    #[error("{0} is shorter than the requested range")]
    ShortRead(ObjectKey),
    /// A failure injected by [`FaultyBackend`] that is not an I/O error.
    #[error("injected fault: {0}")]
    Injected(String),
    /// Anything else (bad arguments, a location that is not a repository).
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// Whether the error says the object does not exist (as opposed to the
    /// store failing), which callers often treat as an answer, not a failure.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound(_))
    }
}

/// A flat store of immutable objects named by [`ObjectKey`].
///
/// # Contract
///
/// Every backend keeps these promises; the engine's commit protocol (pack,
/// then index, then snapshot; never delete before the replacement is
/// durable) is built on them:
///
/// - **`put` is atomic and durable when it returns `Ok`.** A concurrent
///   reader sees either no object or all of it, never a prefix, and after a
///   crash or power loss the object is either absent or complete. (Local:
///   write a temporary file, fsync it, rename it into place, fsync the
///   directory.) When `put` fails, the object may be absent or complete,
///   never partial.
/// - **Objects are immutable.** The engine never puts different bytes under
///   one name: packs, index segments and snapshots are named by the hash of
///   their content, keys and locks by random ids. So a `put` over an existing
///   name may replace it, but only ever with identical bytes, and a repeated
///   `put` (a retry) is harmless.
/// - **Read-after-write.** `get`, `get_range`, `size` and `list` called after
///   a successful `put` see the object; after a successful `remove` they do
///   not.
/// - **`remove` is idempotent**: removing a missing object is `Ok`.
/// - **Missing objects are [`BackendError::NotFound`]** (see
///   [`BackendError::is_not_found`]) from `get`, `get_range` and `size`, so
///   callers can tell "absent" from "the store failed".
/// - **`list` returns complete objects only**, in ascending key order, with
///   their sizes; anything in the store that is not a valid name of that type
///   (temporary files, junk) is skipped.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where the store is, for messages (e.g. `local:/srv/backup`).
    fn location(&self) -> String;

    /// Stores `data` under `key`, atomically and durably (see the contract).
    fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError>;

    /// Reads a whole object.
    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, BackendError>;

    /// Reads exactly `len` bytes starting at `offset`, or fails with
    /// [`BackendError::ShortRead`] if the object ends before `offset + len`
    /// (so the range must lie within the object, even when `len` is 0).
    fn get_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Vec<u8>, BackendError>;

    /// [`Backend::get_range`] into `buf` (its contents replaced), so that a
    /// caller reading many ranges can reuse one allocation.
    fn get_range_into(&self, key: &ObjectKey, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), BackendError> {
        *buf = self.get_range(key, offset, len)?;
        Ok(())
    }

    /// The size of an object in bytes; [`BackendError::NotFound`] if absent.
    fn size(&self, key: &ObjectKey) -> Result<u64, BackendError>;

    /// Every object of one type with its size, in ascending key order.
    /// [`FileType::Config`] lists the config if it is present.
    fn list(&self, file_type: FileType) -> Result<Vec<(ObjectKey, u64)>, BackendError>;

    /// Deletes an object; `Ok` if it was already absent.
    fn remove(&self, key: &ObjectKey) -> Result<(), BackendError>;

    /// Whether every read is a network round trip, so that keeping index
    /// segments and tree packs in a local cache pays (see `crate::cache`).
    fn is_remote(&self) -> bool {
        false
    }
}

/// Whether `key` exists in `backend`, asked through [`Backend::size`] so that
/// only "not found" means `false` and every other failure is reported.
pub fn exists(backend: &dyn Backend, key: &ObjectKey) -> Result<bool, BackendError> {
    match backend.size(key) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every pack with its size.
pub fn pack_sizes(backend: &dyn Backend) -> Result<std::collections::HashMap<PackId, u64>, BackendError> {
    Ok(backend
        .list(FileType::Pack)?
        .into_iter()
        .filter_map(|(k, size)| match k {
            ObjectKey::Pack(id) => Some((id, size)),
            _ => None,
        })
        .collect())
}

/// The ids of every index segment, in ascending order.
pub fn index_ids(backend: &dyn Backend) -> Result<Vec<IndexId>, BackendError> {
    Ok(backend
        .list(FileType::Index)?
        .into_iter()
        .filter_map(|(k, _)| match k {
            ObjectKey::Index(id) => Some(id),
            _ => None,
        })
        .collect())
}

/// The ids of every snapshot, in ascending order.
pub fn snapshot_ids(backend: &dyn Backend) -> Result<Vec<SnapshotId>, BackendError> {
    Ok(backend
        .list(FileType::Snapshot)?
        .into_iter()
        .filter_map(|(k, _)| match k {
            ObjectKey::Snapshot(id) => Some(id),
            _ => None,
        })
        .collect())
}

/// The suite every backend must pass: it checks the [`Backend`] contract
/// through the trait alone. `b` must be empty when called.
#[cfg(test)]
pub(crate) fn conformance(b: &dyn Backend) {
    const TYPES: [FileType; 6] =
        [FileType::Config, FileType::Key, FileType::Pack, FileType::Index, FileType::Snapshot, FileType::Lock];

    /// Distinct, recognisable bytes for each object.
    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    for t in TYPES {
        assert_eq!(b.list(t).unwrap(), vec![], "{t:?} not empty at start");
    }

    // One object of every kind, plus a second pack and an empty lock.
    let objects: Vec<(ObjectKey, Vec<u8>)> = vec![
        (ObjectKey::Config, content(1, 300)),
        (ObjectKey::Key(KeyId::random()), content(2, 500)),
        (ObjectKey::Pack(PackId::random()), content(3, 100_000)),
        (ObjectKey::Pack(PackId::random()), content(4, 7)),
        (ObjectKey::Index(IndexId::random()), content(5, 4_000)),
        (ObjectKey::Snapshot(SnapshotId::random()), content(6, 1_000)),
        (ObjectKey::Lock(LockId::random()), Vec::new()),
    ];
    for (key, data) in &objects {
        assert!(!exists(b, key).unwrap());
        let err = b.get(key).unwrap_err();
        assert!(err.is_not_found(), "get of missing {key}: {err}");
        assert!(b.size(key).unwrap_err().is_not_found());
        assert!(b.get_range(key, 0, 1).unwrap_err().is_not_found());
        b.put(key, data).unwrap();
    }

    // Read-after-write: whole gets, sizes and existence.
    for (key, data) in &objects {
        assert_eq!(&b.get(key).unwrap(), data, "{key}");
        assert_eq!(b.size(key).unwrap(), data.len() as u64, "{key}");
        assert!(exists(b, key).unwrap());
    }

    // Ranged reads: middle, the exact end, empty at the end, past the end.
    let (pack, data) = &objects[2];
    let n = data.len() as u64;
    assert_eq!(b.get_range(pack, 1000, 500).unwrap(), &data[1000..1500]);
    assert_eq!(b.get_range(pack, n - 10, 10).unwrap(), &data[data.len() - 10..]);
    assert_eq!(b.get_range(pack, 0, n).unwrap(), *data);
    assert_eq!(b.get_range(pack, n, 0).unwrap(), Vec::<u8>::new());
    for (offset, len) in [(n - 10, 11), (n, 1), (n + 1, 0), (n + 100, 1), (u64::MAX - 1, 2), (u64::MAX, 1)] {
        let err = b.get_range(pack, offset, len).unwrap_err();
        assert!(matches!(err, BackendError::ShortRead(k) if k == *pack), "{offset}+{len}: {err}");
    }

    // Listing shows exactly what was put, with sizes, in key order.
    for t in TYPES {
        let mut expected: Vec<(ObjectKey, u64)> =
            objects.iter().filter(|(k, _)| k.file_type() == t).map(|(k, d)| (*k, d.len() as u64)).collect();
        expected.sort();
        assert_eq!(b.list(t).unwrap(), expected, "{t:?}");
    }

    // Putting the same bytes again (a retry) is fine.
    let (key, data) = &objects[1];
    b.put(key, data).unwrap();
    assert_eq!(&b.get(key).unwrap(), data);
    assert_eq!(b.list(FileType::Key).unwrap(), vec![(*key, data.len() as u64)]);

    // Concurrent puts from several threads all land.
    let parallel: Vec<(ObjectKey, Vec<u8>)> =
        (0..8u8).map(|i| (ObjectKey::Index(IndexId::random()), content(100 + i, 2_000 + i as usize))).collect();
    std::thread::scope(|s| {
        for (key, data) in &parallel {
            s.spawn(move || b.put(key, data).unwrap());
        }
    });
    for (key, data) in &parallel {
        assert_eq!(&b.get(key).unwrap(), data);
    }
    assert_eq!(b.list(FileType::Index).unwrap().len(), 1 + parallel.len());

    // Remove is idempotent, and removed objects are gone everywhere.
    for (key, _) in objects.iter().chain(&parallel) {
        b.remove(key).unwrap();
        b.remove(key).unwrap();
        assert!(b.get(key).unwrap_err().is_not_found());
        assert!(!exists(b, key).unwrap());
    }
    for t in TYPES {
        assert_eq!(b.list(t).unwrap(), vec![], "{t:?} not empty after removing everything");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_of(variant: u8, bytes: [u8; 32]) -> ObjectKey {
        match variant % 6 {
            0 => ObjectKey::Config,
            1 => ObjectKey::Key(KeyId(bytes)),
            2 => ObjectKey::Pack(PackId(bytes)),
            3 => ObjectKey::Index(IndexId(bytes)),
            4 => ObjectKey::Snapshot(SnapshotId(bytes)),
            _ => ObjectKey::Lock(LockId(bytes)),
        }
    }

    #[test]
    fn path_layout() {
        let bytes = [0xab; 32];
        let hex = "ab".repeat(32);
        assert_eq!(ObjectKey::Config.path(), "config");
        assert_eq!(ObjectKey::Key(KeyId(bytes)).path(), format!("keys/{hex}"));
        assert_eq!(ObjectKey::Pack(PackId(bytes)).path(), format!("packs/ab/{hex}"));
        assert_eq!(ObjectKey::Index(IndexId(bytes)).path(), format!("index/{hex}"));
        assert_eq!(ObjectKey::Snapshot(SnapshotId(bytes)).path(), format!("snapshots/{hex}"));
        assert_eq!(ObjectKey::Lock(LockId(bytes)).path(), format!("locks/{hex}"));
        assert_eq!(ObjectKey::Lock(LockId(bytes)).to_string(), format!("locks/{hex}"));
    }

    #[test]
    fn from_name_refuses_bad_names() {
        let good = "0f".repeat(32);
        assert!(ObjectKey::from_name(FileType::Pack, &good).is_some());
        let bad = [
            String::new(),
            "../x".to_owned(),
            format!("../{}", &good[3..]),
            format!("{}/", &good[1..]),
            "0F".repeat(32),
            good[1..].to_owned(),
            format!("{good}0"),
            format!("{good}.tmp"),
            "config".to_owned(),
            "zz".repeat(32),
        ];
        for t in [FileType::Key, FileType::Pack, FileType::Index, FileType::Snapshot, FileType::Lock] {
            for name in &bad {
                assert_eq!(ObjectKey::from_name(t, name), None, "{t:?} {name:?}");
            }
        }
        assert_eq!(ObjectKey::from_name(FileType::Config, "config"), Some(ObjectKey::Config));
        assert_eq!(ObjectKey::from_name(FileType::Config, &good), None);
        assert_eq!(ObjectKey::from_name(FileType::Config, "config.tmp"), None);
    }

    #[test]
    fn is_not_found_only_for_not_found() {
        assert!(BackendError::NotFound(ObjectKey::Config).is_not_found());
        let io = BackendError::Io {
            op: "get",
            key: "config".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(!io.is_not_found());
        assert!(!BackendError::ShortRead(ObjectKey::Config).is_not_found());
    }

    proptest! {
        #[test]
        fn path_from_name_roundtrip(variant in 0u8..6, bytes in any::<[u8; 32]>()) {
            let key = key_of(variant, bytes);
            let path = key.path();
            let name = path.rsplit('/').next().unwrap();
            prop_assert_eq!(ObjectKey::from_name(key.file_type(), name), Some(key));
            // The path is the type's directory (plus the pack fan-out) and the name.
            if let Some(dir) = key.file_type().dir() {
                let prefix = format!("{dir}/");
                prop_assert!(path.starts_with(&prefix));
            }
            if let ObjectKey::Pack(id) = key {
                prop_assert_eq!(&path[6..8], &id.to_hex()[..2]);
            }
        }
    }
}
