//! A local, size-bounded cache of immutable repository objects, so that
//! opening a large remote repository (S3) does not download every index
//! segment again, and walking snapshots does not fetch every tree again.
//!
//! What is cached (decided by the repository, `crate::repo`): index
//! segments, snapshot manifests and whole tree packs. All of them are named
//! by the BLAKE3 of their bytes and never change, so a cached copy can never
//! be stale, only damaged or gone; and every read from the cache is
//! verified as a read from the backend would be (segments and snapshots by
//! their name, tree blobs by crc, AES-GCM tag and id). A copy that fails
//! verification is dropped and the object fetched again. The cache is
//! therefore never trusted, only used; losing it costs downloads, nothing
//! else.
//!
//! Layout: `ROOT/<repository id>/` + [`ObjectKey::path`], files 0600 and
//! directories 0700 (the objects are encrypted, but what exists and how
//! large it is should not be public). `ROOT` is `$CHUNKVAULT_CACHE_DIR`,
//! else `$XDG_CACHE_HOME/chunkvault`, else `~/.cache/chunkvault`. When the
//! files exceed the size bound, the least recently used ones (by mtime,
//! which a read refreshes) are deleted down to three quarters of it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::backend::{FileType, ObjectKey};

/// Set (to anything but empty) to work without a cache (`--no-cache`).
pub const NO_CACHE_ENV: &str = "CHUNKVAULT_NO_CACHE";

/// The default size bound: 2 GiB holds the index of about 40 million
/// chunks, or many tree packs.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory could not be created or read.
    #[error("cache directory {path}: {source}")]
    Io {
        /// The directory that failed.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The repository id (given) is not 1 to 64 hex characters, so it cannot
    /// name a directory safely.
    #[error("{0:?} is not a repository id")]
    BadRepositoryId(String),
}

/// A cache directory for one repository; see the module docs.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes in the cache's files, as far as this process knows.
    used: Mutex<u64>,
}

/// The cache root from the environment, if there is one.
pub fn default_root() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if var(NO_CACHE_ENV).is_some() {
        return None;
    }
    var("CHUNKVAULT_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("chunkvault")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/chunkvault")))
}

fn mkdir(path: &Path) -> Result<(), CacheError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| CacheError::Io { path: path.to_owned(), source })
}

/// Every file below `dir` with its size and mtime.
fn files_below(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            files_below(&entry.path(), out);
        } else if meta.is_file() {
            out.push((entry.path(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
    }
}

impl Cache {
    /// Opens (creating it if needed) the cache of repository `repo_id` under
    /// `root`, bounded to `max_bytes`.
    pub fn open(root: &Path, repo_id: &str, max_bytes: u64) -> Result<Cache, CacheError> {
        if repo_id.is_empty() || repo_id.len() > 64 || !repo_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CacheError::BadRepositoryId(repo_id.to_owned()));
        }
        let dir = root.join(repo_id);
        mkdir(&dir)?;
        let mut files = Vec::new();
        files_below(&dir, &mut files);
        let used = files.iter().map(|f| f.1).sum();
        Ok(Cache { dir, max_bytes, used: Mutex::new(used) })
    }

    /// The directory holding this repository's cached objects.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes currently cached (as this process counts them).
    pub fn used_bytes(&self) -> u64 {
        *self.used.lock().expect("cache lock")
    }

    fn file(&self, key: &ObjectKey) -> PathBuf {
        self.dir.join(key.path())
    }

    /// Marks a file as just used, for eviction order. Best effort.
    fn touch(file: &File) {
        let _ = file.set_modified(SystemTime::now());
    }

    /// The whole cached object, if present. The caller verifies it.
    pub fn get(&self, key: &ObjectKey) -> Option<Vec<u8>> {
        let file = File::open(self.file(key)).ok()?;
        Self::touch(&file);
        let len = file.metadata().ok()?.len();
        let mut buf = vec![0; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, 0).ok()?;
        Some(buf)
    }

    /// `len` bytes at `offset` of a cached object, if it is present and that
    /// long. The caller verifies them.
    pub fn get_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Option<Vec<u8>> {
        let file = File::open(self.file(key)).ok()?;
        if offset.checked_add(len)? > file.metadata().ok()?.len() {
            return None;
        }
        Self::touch(&file);
        let mut buf = vec![0; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// Stores a verified object. Failures are logged and otherwise ignored:
    /// the cache only saves downloads.
    pub fn put(&self, key: &ObjectKey, data: &[u8]) {
        if data.len() as u64 > self.max_bytes / 4 {
            return;
        }
        if let Err(e) = self.write(key, data) {
            tracing::warn!(key = %key, error = %e, "could not write to the cache");
            return;
        }
        let over = {
            let mut used = self.used.lock().expect("cache lock");
            *used += data.len() as u64;
            *used > self.max_bytes
        };
        if over {
            self.evict();
        }
    }

    /// Writes a temporary file and renames it into place, so a reader never
    /// sees a partial object under its name.
    fn write(&self, key: &ObjectKey, data: &[u8]) -> io::Result<()> {
        let target = self.file(key);
        let parent = target.parent().unwrap_or(&self.dir);
        DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
        let tmp = parent.join(format!(".tmp-{}", hex::encode(rand::random::<[u8; 8]>())));
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| fs::rename(&tmp, &target));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Drops one object (e.g. one that failed verification).
    pub fn remove(&self, key: &ObjectKey) {
        let file = self.file(key);
        if let Ok(meta) = fs::metadata(&file) {
            if fs::remove_file(&file).is_ok() {
                let mut used = self.used.lock().expect("cache lock");
                *used = used.saturating_sub(meta.len());
            }
        }
    }

    /// Drops the cached objects of `file_type` for which `keep` says no
    /// (e.g. index segments no longer in the repository).
    pub fn retain(&self, file_type: FileType, keep: impl Fn(&ObjectKey) -> bool) {
        let Some(dir) = file_type.dir() else { return };
        let mut files = Vec::new();
        files_below(&self.dir.join(dir), &mut files);
        for (path, _, _) in files {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match ObjectKey::from_name(file_type, name) {
                Some(key) if keep(&key) => {}
                Some(key) => self.remove(&key),
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }

    /// Deletes least recently used files until the cache is at three
    /// quarters of its bound, and recounts what is left.
    fn evict(&self) {
        let mut files = Vec::new();
        files_below(&self.dir, &mut files);
        files.sort_by_key(|f| f.2);
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let target = self.max_bytes / 4 * 3;
        for (path, len, _) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        *self.used.lock().expect("cache lock") = total;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::id::{IndexId, PackId};

    fn open(dir: &Path, max: u64) -> Cache {
        Cache::open(dir, "00ff", max).unwrap()
    }

    #[test]
    fn stores_and_reads_whole_objects_and_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = open(tmp.path(), 1 << 20);
        let key = ObjectKey::Pack(PackId::random());
        assert_eq!(cache.get(&key), None);
        cache.put(&key, b"0123456789");
        assert_eq!(cache.get(&key).unwrap(), b"0123456789");
        assert_eq!(cache.get_range(&key, 3, 4).unwrap(), b"3456");
        assert_eq!(cache.get_range(&key, 8, 3), None, "past the end");
        assert_eq!(cache.get_range(&key, u64::MAX, 2), None);
        assert_eq!(cache.used_bytes(), 10);
        // A reopened cache counts what is there.
        assert_eq!(open(tmp.path(), 1 << 20).used_bytes(), 10);
        cache.remove(&key);
        assert_eq!(cache.get(&key), None);
        assert_eq!(cache.used_bytes(), 0);
    }

    #[test]
    fn files_and_directories_are_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = open(tmp.path(), 1 << 20);
        let key = ObjectKey::Pack(PackId([0xab; 32]));
        cache.put(&key, b"x");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache.dir().join(key.path())), 0o600);
        assert_eq!(mode(cache.dir()), 0o700);
        assert_eq!(mode(&cache.dir().join("packs/ab")), 0o700);
    }

    #[test]
    fn stays_within_its_bound_dropping_the_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = open(tmp.path(), 10_000);
        let keys: Vec<ObjectKey> = (0..12).map(|_| ObjectKey::Index(IndexId::random())).collect();
        for (i, key) in keys.iter().enumerate() {
            cache.put(key, &[i as u8; 1000]);
            // Distinct mtimes, oldest first, without sleeping.
            let file = File::options().write(true).open(cache.dir().join(key.path())).unwrap();
            file.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64)).unwrap();
        }
        assert!(cache.used_bytes() <= 10_000, "{}", cache.used_bytes());
        assert!(cache.get(&keys[0]).is_none(), "the oldest went first");
        assert_eq!(cache.get(&keys[11]).unwrap(), vec![11u8; 1000], "the newest stays");
        // Objects larger than a quarter of the bound are not cached at all.
        let big = ObjectKey::Index(IndexId::random());
        cache.put(&big, &[0; 2_600]);
        assert!(cache.get(&big).is_none());
    }

    #[test]
    fn retain_drops_what_the_repository_no_longer_has() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = open(tmp.path(), 1 << 20);
        let (gone, kept) = (ObjectKey::Index(IndexId::random()), ObjectKey::Index(IndexId::random()));
        cache.put(&gone, b"a");
        cache.put(&kept, b"b");
        cache.retain(FileType::Index, |k| *k == kept);
        assert!(cache.get(&gone).is_none());
        assert_eq!(cache.get(&kept).unwrap(), b"b");
        assert_eq!(cache.used_bytes(), 1);
    }

    #[test]
    fn refuses_a_repository_id_that_is_not_hex() {
        let tmp = tempfile::tempdir().unwrap();
        for id in ["", "..", "../x", "ab/cd", &"a".repeat(65)] {
            assert!(matches!(Cache::open(tmp.path(), id, 1), Err(CacheError::BadRepositoryId(_))), "{id:?}");
        }
    }
}
