//! Snapshots as a read-only filesystem: `chunkvault mount` (feature `mount`).
//!
//! The layout, built when mounting from the snapshots that pass a
//! [`SnapshotFilter`]:
//!
//! ```text
//! snapshots/ID/...        every snapshot by its full id, and `latest` -> ID
//! hosts/HOST/ID/...       the same, by host (with its own `latest`)
//! tags/TAG/ID/...         the same, by tag (with its own `latest`)
//! ```
//!
//! [`SnapshotFs`] is the filesystem without FUSE (unit-tested on its own):
//! inode numbers handed out as entries are first looked up, directories
//! listed lazily from their tree blob the first time they are opened, and
//! file contents read through the repository's one blob read path
//! ([`Repository::read_blob_map`]) into a bounded chunk cache, so reading a
//! few bytes in the middle of a huge file costs the one chunk that holds
//! them. Modes, owners, times, sizes, symlink targets and extended
//! attributes are the stored ones. [`mount`] serves it through the kernel
//! with `fuser` (read-only mount) until it is unmounted.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr,
    Request,
};

use crate::id::{BlobId, SnapshotId};
use crate::repo::{RepoError, Repository};
use crate::select::SnapshotFilter;
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind, Timestamp, Xattr};

/// Default bound of the chunk cache: a few average chunks (1 MiB each with
/// the default chunker) per reader.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// How long the kernel may keep attributes and names: forever in effect,
/// since nothing in a mounted snapshot ever changes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a mount failed or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The snapshots could not be listed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The kernel refused the mount (no /dev/fuse, no permission, no
    /// fusermount3 for an unprivileged user, a bad mountpoint), or the
    /// session failed.
    #[error("mounting {path}: {source}")]
    Mount {
        /// The mountpoint.
        path: String,
        /// What the kernel or fusermount said.
        source: std::io::Error,
    },
}

/// Why one filesystem operation failed (the FUSE adapter turns it into an errno).
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such entry")]
    NotFound,
    /// A directory operation on something else.
    #[error("not a directory")]
    NotADirectory,
    /// A file operation on something else.
    #[error("not a regular file")]
    NotAFile,
    /// A tree or chunk could not be read (damage, a lost pack, storage).
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl FsError {
    fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::NotADirectory => Errno::ENOTDIR,
            FsError::NotAFile => Errno::EISDIR,
            FsError::Repo(_) => Errno::EIO,
        }
    }
}

/// Settings of a mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Which snapshots appear.
    pub filter: SnapshotFilter,
    /// Bytes of decrypted chunks kept for reads (at least one chunk is kept).
    pub cache_bytes: usize,
    /// Let other users in (`allow_other`, which /etc/fuse.conf must permit
    /// for a non-root user); the kernel then checks the stored modes.
    pub allow_other: bool,
    /// Threads answering the kernel.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            filter: SnapshotFilter::default(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            allow_other: false,
            threads: 4,
        }
    }
}

/// Counters of a mounted filesystem (what reads cost).
#[derive(Debug, Default)]
pub struct FsStats {
    /// Chunks read from the repository (cache misses).
    pub chunks_read: AtomicU64,
    /// Tree blobs read from the repository (directories listed).
    pub trees_read: AtomicU64,
}

/// One directory entry, as `readdir` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's inode number.
    pub ino: u64,
    /// What it is.
    pub kind: FileType,
    /// Its name (raw bytes).
    pub name: Vec<u8>,
}

/// What an inode is.
enum Content {
    /// A directory whose entries are known up front (the layout's own).
    Fixed(Vec<DirEntry>),
    /// A directory listed from a tree blob the first time it is needed.
    Tree { tree: BlobId, listing: Mutex<Option<Arc<Vec<DirEntry>>>> },
    /// A regular file: its chunks, and their offsets once computed.
    File { chunks: Vec<BlobId>, starts: Mutex<Option<Arc<Vec<u64>>>> },
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A fifo, socket or device.
    Special,
}

struct Inode {
    parent: u64,
    attr: FileAttr,
    xattrs: Vec<Xattr>,
    content: Content,
}

/// The filesystem of a repository's snapshots (see the module docs).
pub struct SnapshotFs {
    repo: Arc<Repository>,
    /// Inode `n` is at index `n - 1`; the root is 1. Never shrinks: the
    /// kernel may name any inode it was told about until it forgets it, and
    /// a mount lives as long as someone looks.
    inodes: RwLock<Vec<Arc<Inode>>>,
    cache: Mutex<ChunkCache>,
    stats: FsStats,
    /// Told when the session ends (unmounted by anyone).
    on_destroy: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl SnapshotFs {
    /// The filesystem of the snapshots of `repo` that pass `opts.filter`
    /// (listed now: snapshots made later appear at the next mount).
    pub fn new(repo: Arc<Repository>, opts: &MountOptions) -> Result<SnapshotFs, RepoError> {
        let snapshots = crate::select::list(&repo, &opts.filter)?;
        Ok(SnapshotFs::with_snapshots(repo, &snapshots, opts.cache_bytes))
    }

    /// The filesystem of `snapshots` (oldest first).
    pub fn with_snapshots(repo: Arc<Repository>, snapshots: &[(SnapshotId, Snapshot)], cache_bytes: usize) -> Self {
        let fs = SnapshotFs {
            repo,
            inodes: RwLock::new(Vec::new()),
            cache: Mutex::new(ChunkCache::new(cache_bytes)),
            stats: FsStats::default(),
            on_destroy: Mutex::new(None),
        };
        fs.build_layout(snapshots);
        fs
    }

    /// What reads cost so far.
    pub fn stats(&self) -> &FsStats {
        &self.stats
    }

    /// Builds the fixed part: the root, `snapshots`, `hosts`, `tags`, the
    /// group directories and a directory per snapshot in each place it shows.
    fn build_layout(&self, snapshots: &[(SnapshotId, Snapshot)]) {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let newest = snapshots.iter().map(|(_, s)| system_time(s.time.timestamp(), 0)).max().unwrap_or(UNIX_EPOCH);
        let root = self.push(0, dir_attr(newest, uid, gid), Content::Fixed(Vec::new()));
        debug_assert_eq!(root, 1);
        let mut by_host: Vec<(String, Vec<&(SnapshotId, Snapshot)>)> = Vec::new();
        let mut by_tag: Vec<(String, Vec<&(SnapshotId, Snapshot)>)> = Vec::new();
        for s in snapshots {
            group_into(&mut by_host, &s.1.hostname, s);
            for t in &s.1.tags {
                group_into(&mut by_tag, t, s);
            }
        }
        let all: Vec<&(SnapshotId, Snapshot)> = snapshots.iter().collect();
        let mut top = Vec::new();
        let ino = self.snapshot_dir(root, &all, uid, gid);
        top.push(DirEntry { ino, kind: FileType::Directory, name: b"snapshots".to_vec() });
        for (name, groups) in [("hosts", &by_host), ("tags", &by_tag)] {
            let parent = self.push(root, dir_attr(newest, uid, gid), Content::Fixed(Vec::new()));
            let mut entries = Vec::new();
            for (group, members) in groups {
                let ino = self.snapshot_dir(parent, members, uid, gid);
                entries.push(DirEntry { ino, kind: FileType::Directory, name: safe_name(group) });
            }
            self.set_fixed(parent, entries);
            top.push(DirEntry { ino: parent, kind: FileType::Directory, name: name.as_bytes().to_vec() });
        }
        self.set_fixed(root, top);
    }

    /// A directory holding one directory per snapshot (named by its full
    /// id) and `latest`, a symlink to the newest; returns its inode.
    fn snapshot_dir(&self, parent: u64, snapshots: &[&(SnapshotId, Snapshot)], uid: u32, gid: u32) -> u64 {
        let newest = snapshots.last().map(|(_, s)| system_time(s.time.timestamp(), 0)).unwrap_or(UNIX_EPOCH);
        let dir = self.push(parent, dir_attr(newest, uid, gid), Content::Fixed(Vec::new()));
        let mut entries = Vec::new();
        for (id, snap) in snapshots {
            let t = system_time(snap.time.timestamp(), snap.time.timestamp_subsec_nanos());
            let content = Content::Tree { tree: snap.tree, listing: Mutex::default() };
            let ino = self.push(dir, dir_attr(t, uid, gid), content);
            entries.push(DirEntry { ino, kind: FileType::Directory, name: id.to_hex().into_bytes() });
        }
        if let Some((id, _)) = snapshots.last() {
            let target = id.to_hex().into_bytes();
            let mut attr = dir_attr(newest, uid, gid);
            (attr.kind, attr.perm, attr.size) = (FileType::Symlink, 0o777, target.len() as u64);
            let ino = self.push(dir, attr, Content::Symlink(target));
            entries.push(DirEntry { ino, kind: FileType::Symlink, name: b"latest".to_vec() });
        }
        self.set_fixed(dir, entries);
        dir
    }

    fn set_fixed(&self, ino: u64, entries: Vec<DirEntry>) {
        let mut inodes = self.inodes.write().expect("inode lock");
        let slot = &mut inodes[(ino - 1) as usize];
        let old = Arc::get_mut(slot).expect("the layout is built before anyone reads it");
        old.content = Content::Fixed(entries);
    }

    /// Adds an inode of the layout and returns its number (`parent` 0: the root).
    fn push(&self, parent: u64, attr: FileAttr, content: Content) -> u64 {
        self.push_with_xattrs(parent, attr, Vec::new(), content)
    }

    /// Adds an inode and returns its number.
    fn push_with_xattrs(&self, parent: u64, mut attr: FileAttr, xattrs: Vec<Xattr>, content: Content) -> u64 {
        let mut inodes = self.inodes.write().expect("inode lock");
        let ino = inodes.len() as u64 + 1;
        attr.ino = INodeNo(ino);
        let parent = if parent == 0 { ino } else { parent };
        inodes.push(Arc::new(Inode { parent, attr, xattrs, content }));
        ino
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        let index = usize::try_from(ino.checked_sub(1).ok_or(FsError::NotFound)?).map_err(|_| FsError::NotFound)?;
        self.inodes.read().expect("inode lock").get(index).cloned().ok_or(FsError::NotFound)
    }

    /// The attributes of inode `ino`.
    pub fn getattr(&self, ino: u64) -> Result<FileAttr, FsError> {
        Ok(self.inode(ino)?.attr)
    }

    /// The entries of directory `ino` (without `.` and `..`), listing its
    /// tree the first time.
    pub fn readdir(&self, ino: u64) -> Result<Arc<Vec<DirEntry>>, FsError> {
        let inode = self.inode(ino)?;
        match &inode.content {
            Content::Fixed(entries) => Ok(Arc::new(entries.clone())),
            Content::Tree { tree, listing } => {
                let mut listing = listing.lock().expect("listing lock");
                if let Some(l) = &*listing {
                    return Ok(l.clone());
                }
                let nodes = self.repo.load_tree(tree)?;
                self.stats.trees_read.fetch_add(1, Ordering::Relaxed);
                let entries: Vec<DirEntry> = nodes
                    .nodes()
                    .iter()
                    .map(|n| {
                        let (attr, xattrs, content) = node_inode(n);
                        let kind = attr.kind;
                        let child = self.push_with_xattrs(ino, attr, xattrs, content);
                        DirEntry { ino: child, kind, name: n.name.clone() }
                    })
                    .collect();
                let entries = Arc::new(entries);
                *listing = Some(entries.clone());
                Ok(entries)
            }
            _ => Err(FsError::NotADirectory),
        }
    }

    /// The attributes of `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, FsError> {
        if name == b"." {
            return self.getattr(parent);
        }
        if name == b".." {
            return self.getattr(self.inode(parent)?.parent);
        }
        let entries = self.readdir(parent)?;
        let entry = entries.iter().find(|e| e.name == name).ok_or(FsError::NotFound)?;
        self.getattr(entry.ino)
    }

    /// The parent directory's inode of `ino` (the root's is itself).
    pub fn parent(&self, ino: u64) -> Result<u64, FsError> {
        Ok(self.inode(ino)?.parent)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        match &self.inode(ino)?.content {
            Content::Symlink(target) => Ok(target.clone()),
            _ => Err(FsError::NotFound),
        }
    }

    /// The extended attributes stored with `ino`.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<Xattr>, FsError> {
        Ok(self.inode(ino)?.xattrs.clone())
    }

    /// Up to `size` bytes of file `ino` from `offset`: only the chunks that
    /// overlap them are read (those not in the cache), each verified.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let inode = self.inode(ino)?;
        let Content::File { chunks, starts } = &inode.content else { return Err(FsError::NotAFile) };
        let end = offset.saturating_add(u64::from(size)).min(inode.attr.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let starts = self.chunk_starts(chunks, starts)?;
        // Chunk i holds bytes starts[i]..starts[i + 1].
        let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let last = starts.partition_point(|&s| s < end).saturating_sub(1).min(chunks.len() - 1);
        let wanted = &chunks[first..=last];
        let mut have: HashMap<BlobId, Arc<Vec<u8>>> = HashMap::new();
        let mut missing = Vec::new();
        {
            let mut cache = self.cache.lock().expect("cache lock");
            for c in wanted {
                match cache.get(c) {
                    Some(data) => {
                        have.insert(*c, data);
                    }
                    None => missing.push(*c),
                }
            }
        }
        if !missing.is_empty() {
            for (id, data) in self.repo.read_blob_map(missing) {
                self.stats.chunks_read.fetch_add(1, Ordering::Relaxed);
                let data = Arc::new(data?);
                self.cache.lock().expect("cache lock").insert(id, data.clone());
                have.insert(id, data);
            }
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, c) in wanted.iter().enumerate() {
            let at = starts[first + i];
            let data = &have[c];
            let from = offset.saturating_sub(at) as usize;
            let to = ((end - at) as usize).min(data.len());
            if from < to {
                out.extend_from_slice(&data[from..to]);
            }
        }
        Ok(out)
    }

    /// Each chunk's offset in the file, and the file's length last (from
    /// the index's plaintext lengths), computed once per file.
    fn chunk_starts(&self, chunks: &[BlobId], starts: &Mutex<Option<Arc<Vec<u64>>>>) -> Result<Arc<Vec<u64>>, FsError> {
        let mut starts = starts.lock().expect("starts lock");
        if let Some(s) = &*starts {
            return Ok(s.clone());
        }
        let index = self.repo.index();
        let mut out = Vec::with_capacity(chunks.len() + 1);
        let mut at = 0u64;
        for c in chunks {
            out.push(at);
            at += u64::from(index.get(c).ok_or(RepoError::MissingBlob(*c))?.raw_len);
        }
        out.push(at);
        let out = Arc::new(out);
        *starts = Some(out.clone());
        Ok(out)
    }
}

fn group_into<'s>(
    groups: &mut Vec<(String, Vec<&'s (SnapshotId, Snapshot)>)>,
    key: &str,
    s: &'s (SnapshotId, Snapshot),
) {
    match groups.iter_mut().find(|(k, _)| k == key) {
        Some((_, members)) => members.push(s),
        None => groups.push((key.to_owned(), vec![s])),
    }
}

/// A host or tag as a file name: `/` and NUL replaced, never empty, `.` or `..`.
fn safe_name(s: &str) -> Vec<u8> {
    let name: String = s.chars().map(|c| if c == '/' || c == '\0' { '_' } else { c }).collect();
    match name.as_str() {
        "" | "." | ".." => format!("_{name}").into_bytes(),
        _ => name.into_bytes(),
    }
}

fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec));
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos
    }
}

fn timestamp(t: Timestamp) -> SystemTime {
    system_time(t.sec, t.nsec)
}

/// A directory of the layout: read-only for its owner and others.
fn dir_attr(time: SystemTime, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: FileType::Directory,
        perm: 0o555,
        nlink: 1,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes, extended attributes and content of a tree node.
fn node_inode(n: &Node) -> (FileAttr, Vec<Xattr>, Content) {
    let (kind, content, rdev) = match &n.kind {
        NodeKind::File { chunks } => {
            (FileType::RegularFile, Content::File { chunks: chunks.clone(), starts: Mutex::default() }, 0)
        }
        NodeKind::Dir { subtree } => {
            (FileType::Directory, Content::Tree { tree: *subtree, listing: Mutex::default() }, 0)
        }
        NodeKind::Symlink { target } => (FileType::Symlink, Content::Symlink(target.clone()), 0),
        NodeKind::Special { rdev } => {
            let kind = match n.mode & libc::S_IFMT {
                libc::S_IFIFO => FileType::NamedPipe,
                libc::S_IFCHR => FileType::CharDevice,
                libc::S_IFBLK => FileType::BlockDevice,
                _ => FileType::Socket,
            };
            // The kernel's 32-bit encoding (major 12 bits, minor 20 bits).
            let (major, minor) = (libc::major(*rdev as libc::dev_t), libc::minor(*rdev as libc::dev_t));
            (kind, Content::Special, (major << 20) | (minor & 0xfffff))
        }
    };
    let size = match &n.kind {
        NodeKind::File { .. } => n.size,
        NodeKind::Symlink { target } => target.len() as u64,
        _ => 0,
    };
    let attr = FileAttr {
        ino: INodeNo(0),
        size,
        blocks: size.div_ceil(512),
        atime: timestamp(n.mtime),
        mtime: timestamp(n.mtime),
        ctime: timestamp(n.ctime),
        crtime: timestamp(n.mtime),
        kind,
        perm: (n.mode & 0o7777) as u16,
        // 1 for directories too: "unknown", so `find` does not count subdirectories by it.
        nlink: 1,
        uid: n.uid,
        gid: n.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    };
    (attr, n.extra.xattrs.clone(), content)
}

/// Decrypted chunks, least recently used evicted past a byte budget.
struct ChunkCache {
    max_bytes: usize,
    bytes: usize,
    clock: u64,
    entries: HashMap<BlobId, (Arc<Vec<u8>>, u64)>,
}

impl ChunkCache {
    fn new(max_bytes: usize) -> Self {
        ChunkCache { max_bytes, bytes: 0, clock: 0, entries: HashMap::new() }
    }

    fn get(&mut self, id: &BlobId) -> Option<Arc<Vec<u8>>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(data, used)| {
            *used = clock;
            data.clone()
        })
    }

    fn insert(&mut self, id: BlobId, data: Arc<Vec<u8>>) {
        self.clock += 1;
        self.bytes += data.len();
        if let Some((old, _)) = self.entries.insert(id, (data, self.clock)) {
            self.bytes -= old.len();
        }
        // Evict the least recently used; the chunk just added always stays.
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, _)| **k != id)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
                .expect("more than one entry");
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.bytes -= old.len();
            }
        }
    }
}

impl Filesystem for SnapshotFs {
    fn destroy(&mut self) {
        if let Some(tx) = self.on_destroy.lock().expect("destroy lock").take() {
            let _ = tx.send(());
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match SnapshotFs::lookup(self, parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match SnapshotFs::getattr(self, ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match SnapshotFs::readlink(self, ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    /// The mounting user may read everything (it holds the key); nothing is
    /// writable, and only files with an execute bit are executable.
    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.inode(ino.0) {
            Err(e) => reply.error(e.errno()),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(i)
                if mask.contains(AccessFlags::X_OK)
                    && i.attr.kind != FileType::Directory
                    && i.attr.perm & 0o111 == 0 =>
            {
                reply.error(Errno::EACCES)
            }
            Ok(_) => reply.ok(),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.inode(ino.0) {
            // Contents never change: the kernel may keep them cached.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match SnapshotFs::read(self, ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::warn!("reading inode {}: {e}", ino.0);
                reply.error(e.errno())
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match SnapshotFs::readdir(self, ino.0) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("listing inode {}: {e}", ino.0);
                return reply.error(e.errno());
            }
        };
        let parent = self.parent(ino.0).unwrap_or(ino.0);
        let dots = [(ino.0, FileType::Directory, OsStr::new(".")), (parent, FileType::Directory, OsStr::new(".."))];
        let all = dots.into_iter().chain(entries.iter().map(|e| (e.ino, e.kind, OsStr::from_bytes(&e.name))));
        for (i, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            // The offset of the entry after this one.
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let xattrs = match self.xattrs(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(e.errno()),
        };
        match xattrs.iter().find(|x| x.name == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some(x) => xattr_reply(&x.value, size, reply),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino.0) {
            Ok(xattrs) => {
                let mut names = Vec::new();
                for x in &xattrs {
                    names.extend_from_slice(&x.name);
                    names.push(0);
                }
                xattr_reply(&names, size, reply)
            }
            Err(e) => reply.error(e.errno()),
        }
    }
}

/// `getxattr`/`listxattr` answers: the size when asked for it (`size` 0),
/// the bytes when they fit, ERANGE when not.
fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(data.len() as u32)
    } else if data.len() <= size as usize {
        reply.data(data)
    } else {
        reply.error(Errno::ERANGE)
    }
}

/// A mounted filesystem: served by background threads until unmounted
/// ([`Unmounter::unmount`], `fusermount3 -u`, `umount`).
pub struct Mounted {
    unmounter: Unmounter,
    session: std::thread::JoinHandle<std::io::Result<()>>,
    ended: std::sync::mpsc::Receiver<()>,
}

/// Unmounts a [`Mounted`] filesystem from any thread (a signal handler's).
#[derive(Clone)]
pub struct Unmounter {
    mountpoint: std::path::PathBuf,
    inner: Arc<Mutex<fuser::SessionUnmounter>>,
}

/// Mounts `fs` read-only at `mountpoint` and serves it from background
/// threads. Returns once the kernel answers for the mountpoint.
pub fn mount(fs: SnapshotFs, mountpoint: &Path, opts: &MountOptions) -> Result<Mounted, MountError> {
    use fuser::MountOption;
    let (tx, ended) = std::sync::mpsc::channel();
    *fs.on_destroy.lock().expect("destroy lock") = Some(tx);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::FSName(format!("chunkvault:{}", fs.repo.backend().location())),
        MountOption::Subtype("chunkvault".into()),
    ];
    if opts.allow_other {
        // Others only through the stored modes.
        config.acl = fuser::SessionACL::All;
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    config.n_threads = Some(opts.threads.max(1));
    let err = |source| MountError::Mount { path: mountpoint.display().to_string(), source };
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(err)?;
    let inner = Arc::new(Mutex::new(session.unmount_callable()));
    let session = std::thread::Builder::new().name("fuse-session".into()).spawn(move || session.run()).map_err(err)?;
    Ok(Mounted { unmounter: Unmounter { mountpoint: mountpoint.to_path_buf(), inner }, session, ended })
}

impl Mounted {
    /// A handle that unmounts this filesystem.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Waits until the filesystem is unmounted (by an [`Unmounter`] or from
    /// outside) and its session has ended.
    pub fn wait(self) -> Result<(), MountError> {
        let _ = self.ended.recv();
        let path = self.unmounter.mountpoint.display().to_string();
        match self.session.join() {
            Ok(r) => r.map_err(|source| MountError::Mount { path, source }),
            Err(_) => Err(MountError::Mount { path, source: std::io::Error::other("the session thread panicked") }),
        }
    }
}

impl Unmounter {
    /// Unmounts. A busy mountpoint (a shell inside it) cannot be unmounted
    /// at once: it is then detached lazily, and the session ends when the
    /// last user leaves.
    pub fn unmount(&self) -> Result<(), MountError> {
        let err = |source| MountError::Mount { path: self.mountpoint.display().to_string(), source };
        match self.inner.lock().expect("unmounter lock").unmount() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => lazy_unmount(&self.mountpoint).map_err(err),
            Err(e) => Err(err(e)),
        }
    }
}

/// Detaches a busy mount (`umount -l`): directly as root, else through
/// fusermount3 (or fusermount).
fn lazy_unmount(mountpoint: &Path) -> std::io::Result<()> {
    if nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return Ok(());
    }
    let mut last = std::io::Error::other("neither fusermount3 nor fusermount could be run");
    for tool in ["fusermount3", "fusermount"] {
        match std::process::Command::new(tool).arg("-u").arg("-z").arg("--").arg(mountpoint).status() {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => last = std::io::Error::other(format!("{tool} -u -z: {s}")),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup_stream, BackupOptions, NamedFile};
    use crate::test_support::{local_repo, noise};

    fn repo(dir: &Path) -> Arc<Repository> {
        Arc::new(local_repo(dir))
    }

    fn lookup_path(fs: &SnapshotFs, path: &str) -> FileAttr {
        let mut attr = fs.getattr(1).unwrap();
        for part in path.split('/') {
            attr = fs.lookup(attr.ino.0, part.as_bytes()).unwrap_or_else(|e| panic!("{path}: {part}: {e}"));
        }
        attr
    }

    #[test]
    fn reading_a_few_bytes_in_the_middle_costs_one_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let data = noise(24 << 20, 7);
        let file =
            NamedFile { path: "big".into(), reader: &data[..], mode: 0o600, mtime: Timestamp { sec: 5, nsec: 6 } };
        let opts = BackupOptions { hostname: Some("h/1".into()), tags: vec!["t".into()], ..Default::default() };
        let (id, snap) = backup_stream(&repo, [file], &opts).unwrap();
        let NodeKind::File { chunks } = repo.find_node(&snap.tree, "big").unwrap().unwrap().kind else { panic!() };
        assert!(chunks.len() > 8, "{} chunks", chunks.len());

        let fs = SnapshotFs::new(repo.clone(), &MountOptions::default()).unwrap();
        let big = lookup_path(&fs, &format!("snapshots/{}/big", id.to_hex()));
        assert_eq!((big.size, big.perm, big.kind), (data.len() as u64, 0o600, FileType::RegularFile));
        assert_eq!(big.mtime, UNIX_EPOCH + Duration::new(5, 6));
        let middle = (data.len() / 2) as u64;
        let got = fs.read(big.ino.0, middle, 1024).unwrap();
        assert!(got == data[middle as usize..middle as usize + 1024]);
        assert_eq!(fs.stats().chunks_read.load(Ordering::Relaxed), 1, "one chunk for 1 KiB");
        // Again: from the cache.
        fs.read(big.ino.0, middle + 10, 100).unwrap();
        assert_eq!(fs.stats().chunks_read.load(Ordering::Relaxed), 1);
        // The whole file in kernel-sized reads comes back exactly.
        let mut all = Vec::new();
        while (all.len() as u64) < big.size {
            let part = fs.read(big.ino.0, all.len() as u64, 128 << 10).unwrap();
            assert!(!part.is_empty());
            all.extend_from_slice(&part);
        }
        assert!(all == data);
        assert!(fs.read(big.ino.0, big.size, 10).unwrap().is_empty());
        assert_eq!(fs.stats().chunks_read.load(Ordering::Relaxed), chunks.len() as u64);

        // The same snapshot by host (the `/` made safe) and tag, and `latest`.
        lookup_path(&fs, &format!("hosts/h_1/{}/big", id.to_hex()));
        lookup_path(&fs, &format!("tags/t/{}/big", id.to_hex()));
        let latest = lookup_path(&fs, "snapshots/latest");
        assert_eq!(fs.readlink(latest.ino.0).unwrap(), id.to_hex().into_bytes());
        assert!(matches!(fs.lookup(1, b"nothing"), Err(FsError::NotFound)));
    }

    #[test]
    fn the_cache_keeps_to_its_budget_and_the_newest_chunk() {
        let mut cache = ChunkCache::new(10);
        let id = |n: u8| BlobId([n; 32]);
        cache.insert(id(1), Arc::new(vec![0; 4]));
        cache.insert(id(2), Arc::new(vec![0; 4]));
        assert!(cache.get(&id(1)).is_some());
        cache.insert(id(3), Arc::new(vec![0; 4]));
        assert!(cache.get(&id(2)).is_none(), "the least recently used goes");
        assert!(cache.get(&id(1)).is_some() && cache.get(&id(3)).is_some());
        cache.insert(id(4), Arc::new(vec![0; 50]));
        assert!(cache.get(&id(4)).is_some(), "a chunk over the budget stays alone");
        assert_eq!(cache.entries.len(), 1);
    }
}
