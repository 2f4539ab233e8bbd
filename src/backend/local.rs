//! A repository in a local directory.
//!
//! Each object is one file at its [`ObjectKey::path`] under the root:
//!
//! ```text
//! root/config
//! root/keys/<hex>
//! root/packs/00/ .. root/packs/ff/<hex>
//! root/index/<hex>  root/snapshots/<hex>  root/locks/<hex>
//! root/tmp/          (files being written; never listed)
//! ```
//!
//! Files are created mode 0600 and directories 0700: a repository holds
//! encrypted data, but key files are only as strong as their password, so
//! nobody else on the machine should be able to read them.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Backend, BackendError, FileType, ObjectKey};

/// The largest range one `get_range` may ask for, so that a corrupt length
/// read from a pack header cannot make us allocate without bound.
const MAX_RANGE: u64 = 1 << 30;

/// Where objects are written before being renamed into place.
const TMP_DIR: &str = "tmp";

/// A [`Backend`] storing each object as a file under a root directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// Lays out a new repository at `root`: creates `root` (if missing) and
    /// its subdirectories `keys`, `index`, `snapshots`, `locks`, `tmp` and
    /// `packs/00` .. `packs/ff`, all mode 0700. Refuses if `root/config`
    /// exists, so an existing repository is never initialised twice.
    /// Writing the config is the caller's job.
    pub fn create(root: &Path) -> Result<Self, BackendError> {
        if fs::symlink_metadata(root.join("config")).is_ok() {
            return Err(BackendError::Other(format!("a repository already exists at {}", root.display())));
        }
        let mkdir = |path: &Path| {
            DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|source| BackendError::Io {
                op: "create directory",
                key: path.display().to_string(),
                source,
            })
        };
        mkdir(root)?;
        for dir in ["keys", "index", "snapshots", "locks", TMP_DIR] {
            mkdir(&root.join(dir))?;
        }
        let packs = root.join("packs");
        for i in 0..=255u8 {
            mkdir(&packs.join(format!("{i:02x}")))?;
        }
        // Make the new directory entries durable before anything is put in them.
        for dir in [&packs, root] {
            sync_dir(dir).map_err(|source| BackendError::Io {
                op: "fsync directory",
                key: dir.display().to_string(),
                source,
            })?;
        }
        Ok(LocalBackend { root: root.to_owned() })
    }

    /// Opens the repository directory at `root`, which must exist and be a
    /// directory. Whether it holds a repository (a config) is for the caller
    /// to find out through [`Backend::get`].
    pub fn open(root: &Path) -> Result<Self, BackendError> {
        let meta = fs::metadata(root).map_err(|source| BackendError::Io {
            op: "open repository",
            key: root.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(BackendError::Other(format!("{} is not a directory", root.display())));
        }
        Ok(LocalBackend { root: root.to_owned() })
    }

    /// The repository's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding `key`.
    fn file(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.path())
    }

    /// Appends the objects of `file_type` found in `dir` to `out`. A missing
    /// directory is empty (as an object store's empty prefix would be, and
    /// `put` recreates it). `fan_out` is the pack subdirectory's name, which
    /// a pack's name must start with to be reachable by its key.
    fn list_dir(
        &self,
        dir: &str,
        file_type: FileType,
        fan_out: Option<&str>,
        out: &mut Vec<(ObjectKey, u64)>,
    ) -> Result<(), BackendError> {
        let path = self.root.join(dir);
        let io = |source| BackendError::Io { op: "list", key: dir.to_owned(), source };
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let key = name
                .to_str()
                .filter(|name| fan_out.map_or(true, |prefix| name.starts_with(prefix)))
                .and_then(|name| ObjectKey::from_name(file_type, name));
            let Some(key) = key else {
                tracing::debug!(dir, name = ?name, "skipping a file that is not an object name");
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Removed since the directory was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            if !meta.is_file() {
                tracing::debug!(dir, name = ?name, "skipping an entry that is not a regular file");
                continue;
            }
            out.push((key, meta.len()));
        }
        Ok(())
    }
}

/// Maps an I/O error on `key`, turning "no such file" into `NotFound`.
fn error(op: &'static str, key: &ObjectKey, source: io::Error) -> BackendError {
    if source.kind() == io::ErrorKind::NotFound {
        BackendError::NotFound(*key)
    } else {
        BackendError::Io { op, key: key.path(), source }
    }
}

/// Makes the entries of directory `dir` (a rename, a new file, a removal)
/// durable. File systems that cannot fsync a directory (EINVAL, ENOTSUP)
/// give no stronger promise to anyone, so that is not an error.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => Ok(()),
        result => result,
    }
}

/// Objects at least this large (packs) are written with `O_DIRECT`.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths: the largest logical
/// block size of the disks we expect.
const DIRECT_ALIGN: usize = 4096;
/// Bytes staged per `O_DIRECT` write.
const DIRECT_STAGE: usize = 1 << 20;

thread_local! {
    /// An `O_DIRECT` staging buffer per writing thread, with room to align.
    static DIRECT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Creates `tmp` (exclusively, mode 0600), writes `data` to it and forces it
/// to disk.
///
/// Packs are written once and not read again until a restore or a check, so
/// they bypass the page cache: with `O_DIRECT` the disk reads them from one
/// small staging buffer instead of the kernel copying every byte into fresh
/// page-cache pages, which cost a backup as much CPU as hashing them did (and
/// evicted the user's own cached files). A file system that refuses
/// `O_DIRECT` (tmpfs, some network file systems) gets an ordinary write.
fn write_synced(tmp: &Path, data: &[u8]) -> io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true).mode(0o600);
    if data.len() >= DIRECT_MIN {
        match opts.clone().custom_flags(libc::O_DIRECT).open(tmp) {
            Ok(file) => match write_direct(&file, data) {
                Ok(()) => return file.sync_all(),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Refused after all (an unusual block size): start over.
                    drop(file);
                    fs::remove_file(tmp)?;
                }
                Err(e) => return Err(e),
            },
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let mut file = opts.open(tmp)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Writes `data` through a file opened with `O_DIRECT`, in aligned pieces
/// copied into the thread's staging buffer; the last piece is padded with
/// zeros to the alignment and the file then cut to `data.len()`.
fn write_direct(file: &File, data: &[u8]) -> io::Result<()> {
    DIRECT_BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(DIRECT_STAGE + DIRECT_ALIGN, 0);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let stage = &mut buf[start..start + DIRECT_STAGE];
        let mut offset = 0;
        for piece in data.chunks(DIRECT_STAGE) {
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            stage[..piece.len()].copy_from_slice(piece);
            stage[piece.len()..padded].fill(0);
            file.write_all_at(&stage[..padded], offset as u64)?;
            offset += piece.len();
        }
        if data.len() % DIRECT_ALIGN != 0 {
            file.set_len(data.len() as u64)?;
        }
        Ok(())
    })
}

/// Renames `tmp` to `target`, creating `target`'s directory if it is missing
/// (one level only: a vanished repository root is an error, not recreated).
fn rename_into_place(tmp: &Path, target: &Path) -> io::Result<()> {
    match fs::rename(tmp, target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some(parent) = target.parent() else {
                return Err(e);
            };
            match DirBuilder::new().mode(0o700).create(parent) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            if let Some(grandparent) = parent.parent() {
                sync_dir(grandparent)?;
            }
            fs::rename(tmp, target)
        }
        result => result,
    }
}

impl Backend for LocalBackend {
    /// The root directory, as a path that opens this repository again.
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    /// Writes `root/tmp/<random>` (created exclusively, mode 0600), fsyncs
    /// it, renames it to the object's path and fsyncs that directory, so the
    /// object is either absent or complete whatever happens. The temporary
    /// file is removed if anything before the rename fails.
    fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError> {
        let io = |source| BackendError::Io { op: "put", key: key.path(), source };
        let target = self.file(key);
        let tmp = self.root.join(TMP_DIR).join(hex::encode(rand::random::<[u8; 16]>()));
        if let Err(e) = write_synced(&tmp, data).and_then(|()| rename_into_place(&tmp, &target)) {
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(io(e)); // not ours to remove
            }
            if let Err(rm) = fs::remove_file(&tmp) {
                tracing::warn!(tmp = %tmp.display(), error = %rm, "could not remove a temporary file");
            }
            return Err(io(e));
        }
        let dir = target.parent().unwrap_or(&self.root);
        sync_dir(dir).map_err(io)
    }

    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, BackendError> {
        fs::read(self.file(key)).map_err(|e| error("get", key, e))
    }

    /// Refuses ranges over 1 GiB with [`BackendError::Other`].
    fn get_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let mut buf = Vec::new();
        self.get_range_into(key, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, key: &ObjectKey, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), BackendError> {
        if len > MAX_RANGE {
            return Err(BackendError::Other(format!(
                "get_range {key}: {len} bytes is more than one read may ask for ({MAX_RANGE})"
            )));
        }
        let file = File::open(self.file(key)).map_err(|e| error("get_range", key, e))?;
        let size = file.metadata().map_err(|e| error("get_range", key, e))?.len();
        if offset.checked_add(len).map_or(true, |end| end > size) {
            return Err(BackendError::ShortRead(*key));
        }
        // Read into reserved capacity: no zeroing of a buffer about to be
        // overwritten (ranges are up to 64 MiB on the restore path).
        buf.clear();
        buf.reserve(len as usize);
        let mut file = &file;
        file.seek(io::SeekFrom::Start(offset)).map_err(|e| error("get_range", key, e))?;
        file.take(len).read_to_end(buf).map_err(|e| error("get_range", key, e))?;
        if buf.len() as u64 != len {
            return Err(BackendError::ShortRead(*key)); // the file shrank since its size was read
        }
        Ok(())
    }

    fn size(&self, key: &ObjectKey) -> Result<u64, BackendError> {
        Ok(fs::metadata(self.file(key)).map_err(|e| error("size", key, e))?.len())
    }

    /// Reads the type's directory (for packs, each of the 256 fan-out
    /// subdirectories), skipping names that are not object names, packs in
    /// the wrong subdirectory and anything that is not a regular file.
    fn list(&self, file_type: FileType) -> Result<Vec<(ObjectKey, u64)>, BackendError> {
        let mut out = Vec::new();
        match file_type.dir() {
            None => match fs::metadata(self.file(&ObjectKey::Config)) {
                Ok(meta) if meta.is_file() => out.push((ObjectKey::Config, meta.len())),
                Ok(_) => tracing::debug!("skipping a config that is not a regular file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(error("list", &ObjectKey::Config, e)),
            },
            Some(dir) if file_type == FileType::Pack => {
                for i in 0..=255u8 {
                    let sub = format!("{i:02x}");
                    self.list_dir(&format!("{dir}/{sub}"), file_type, Some(&sub), &mut out)?;
                }
            }
            Some(dir) => self.list_dir(dir, file_type, None, &mut out)?,
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Unlinks the file and fsyncs its directory; a missing file is `Ok`.
    fn remove(&self, key: &ObjectKey) -> Result<(), BackendError> {
        let path = self.file(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(error("remove", key, e)),
        }
        let dir = path.parent().unwrap_or(&self.root);
        sync_dir(dir).map_err(|source| BackendError::Io { op: "remove", key: key.path(), source })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::backend::conformance;
    use crate::id::{IndexId, KeyId, LockId, PackId};

    /// A fresh repository in a temporary directory.
    fn repo() -> (tempfile::TempDir, LocalBackend) {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::create(&dir.path().join("repo")).unwrap();
        (dir, backend)
    }

    /// Fills a repository with things that are not objects and must never be
    /// listed: odd names, uppercase hex, a pack in the wrong fan-out
    /// directory, a directory with an object's name, temporary files.
    pub(crate) fn plant_junk(root: &Path) {
        let hex = "cd".repeat(32);
        let write = |path: &str| fs::write(root.join(path), b"junk").unwrap();
        write("config.bak");
        write("keys/README");
        write(&format!("keys/{}", hex.to_uppercase()));
        write(&format!("keys/{hex}.tmp"));
        write(&format!("packs/ab/{hex}"));
        write(&format!("packs/cd/{}", &hex[1..]));
        write(&format!("snapshots/.{hex}"));
        write(&format!("tmp/{hex}"));
        fs::create_dir(root.join(format!("index/{hex}"))).unwrap();
        fs::create_dir(root.join("packs/zz")).unwrap();
        write(&format!("packs/zz/{hex}"));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn tmp_entries(b: &LocalBackend) -> usize {
        fs::read_dir(b.root().join(TMP_DIR)).unwrap().count()
    }

    #[test]
    fn conformance_on_local_directory() {
        let (_dir, b) = repo();
        plant_junk(b.root());
        conformance(&b);
    }

    #[test]
    fn files_are_0600_and_directories_0700() {
        let (_dir, b) = repo();
        let keys = [
            ObjectKey::Config,
            ObjectKey::Key(KeyId::random()),
            ObjectKey::Pack(PackId::random()),
            ObjectKey::Lock(LockId::random()),
        ];
        for key in &keys {
            b.put(key, b"secret").unwrap();
            assert_eq!(mode(&b.root().join(key.path())), 0o600, "{key}");
        }
        for dir in ["", "keys", "index", "snapshots", "locks", "tmp", "packs", "packs/00", "packs/ff"] {
            assert_eq!(mode(&b.root().join(dir)), 0o700, "{dir:?}");
        }
        assert_eq!(fs::read_dir(b.root().join("packs")).unwrap().count(), 256);
    }

    #[test]
    fn puts_leave_no_temporary_files() {
        let (_dir, b) = repo();
        for i in 0..20u8 {
            b.put(&ObjectKey::Pack(PackId::random()), &[i; 1000]).unwrap();
        }
        b.put(&ObjectKey::Config, b"config").unwrap();
        assert_eq!(tmp_entries(&b), 0);
    }

    #[test]
    fn large_objects_written_direct_read_back_exactly() {
        // Sizes around the O_DIRECT threshold, the staging piece and the
        // alignment (on a file system without O_DIRECT these take the
        // buffered path, which must give the same bytes).
        let (_dir, b) = repo();
        for len in [
            DIRECT_MIN - 1,
            DIRECT_MIN,
            DIRECT_MIN + 1,
            DIRECT_STAGE + DIRECT_ALIGN,
            3 * DIRECT_STAGE + 17,
            5 * DIRECT_STAGE - 1,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let key = ObjectKey::Pack(PackId::random());
            b.put(&key, &data).unwrap();
            assert_eq!(b.size(&key).unwrap(), len as u64);
            assert!(b.get(&key).unwrap() == data, "{len} bytes differ after the roundtrip");
            assert_eq!(b.get_range(&key, len as u64 - 10, 10).unwrap(), &data[len - 10..]);
        }
        assert_eq!(tmp_entries(&b), 0);
    }

    #[test]
    fn failed_put_removes_its_temporary_file() {
        let (_dir, b) = repo();
        // A non-empty directory where the object belongs makes the rename
        // fail, even for root, who ignores permission bits.
        let key = ObjectKey::Index(IndexId::random());
        let blocker = b.root().join(key.path());
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        let err = b.put(&key, b"data").unwrap_err();
        assert!(matches!(&err, BackendError::Io { op: "put", .. }), "{err}");
        assert_eq!(tmp_entries(&b), 0);
    }

    #[test]
    fn put_recreates_a_missing_directory() {
        let (_dir, b) = repo();
        let pack = ObjectKey::Pack(PackId([0xab; 32]));
        fs::remove_dir(b.root().join("packs/ab")).unwrap();
        fs::remove_dir(b.root().join("locks")).unwrap();
        assert_eq!(b.list(FileType::Pack).unwrap(), vec![]);
        assert_eq!(b.list(FileType::Lock).unwrap(), vec![]);
        b.put(&pack, b"pack").unwrap();
        assert_eq!(b.get(&pack).unwrap(), b"pack");
        assert_eq!(mode(&b.root().join("packs/ab")), 0o700);
        let lock = ObjectKey::Lock(LockId::random());
        b.put(&lock, b"lock").unwrap();
        assert_eq!(b.list(FileType::Lock).unwrap(), vec![(lock, 4)]);
    }

    #[test]
    fn put_does_not_recreate_a_vanished_root() {
        let (_dir, b) = repo();
        fs::remove_dir_all(b.root()).unwrap();
        assert!(b.put(&ObjectKey::Pack(PackId::random()), b"pack").is_err());
        assert!(!b.root().exists());
    }

    #[test]
    fn create_refuses_an_existing_repository() {
        let (_dir, b) = repo();
        b.put(&ObjectKey::Config, b"config").unwrap();
        let err = LocalBackend::create(b.root()).unwrap_err();
        assert!(err.to_string().contains("a repository already exists at"), "{err}");
        assert_eq!(b.get(&ObjectKey::Config).unwrap(), b"config");
    }

    #[test]
    fn create_accepts_an_existing_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(dir.path()).unwrap();
        assert!(b.root().join("packs/7f").is_dir());
        assert_eq!(b.location(), dir.path().display().to_string());
    }

    #[test]
    fn open_refuses_a_missing_directory_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = LocalBackend::open(&dir.path().join("nothing")).unwrap_err();
        assert!(matches!(&missing, BackendError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound));
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = LocalBackend::open(&file).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }

    #[test]
    fn open_sees_what_create_stored() {
        let (_dir, b) = repo();
        let key = ObjectKey::Key(KeyId::random());
        b.put(&key, b"key").unwrap();
        let reopened = LocalBackend::open(b.root()).unwrap();
        assert_eq!(reopened.get(&key).unwrap(), b"key");
        assert_eq!(reopened.list(FileType::Key).unwrap(), vec![(key, 3)]);
    }

    #[test]
    fn get_range_refuses_more_than_a_gibibyte() {
        let (_dir, b) = repo();
        let key = ObjectKey::Pack(PackId::random());
        b.put(&key, b"small").unwrap();
        let err = b.get_range(&key, 0, MAX_RANGE + 1).unwrap_err();
        assert!(matches!(err, BackendError::Other(_)), "{err}");
        assert_eq!(b.get_range(&key, 1, 3).unwrap(), b"mal");
    }
}
