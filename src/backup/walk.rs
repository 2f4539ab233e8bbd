//! The filesystem side of a backup: metadata, file contents, directories.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use super::filter::{is_one_of, Filter, Verdict};
use super::{save_tree, BackupError, BackupProgress, Counters};
use crate::id::{BlobId, BlobKind};
use crate::repo::Repository;
use crate::repo::WriteSession;
use crate::tree::{Node, NodeExtra, NodeKind, Timestamp, Tree, Xattr, MAX_XATTR_VALUE_LEN};

/// Files at least this large are memory-mapped instead of read.
const MMAP_THRESHOLD: u64 = 1 << 20;
/// Bytes of a file cut and saved in parallel at a time.
const BATCH_BYTES: usize = 16 << 20;
/// Granularity of releasing mapped pages.
const PAGE: usize = 4096;

thread_local! {
    /// Holds files below [`MMAP_THRESHOLD`] while they are chunked.
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

pub(super) struct Walker<'a, 'r> {
    pub repo: &'r Repository,
    pub session: &'a WriteSession<'r>,
    pub progress: &'a BackupProgress,
    pub filter: &'a Filter,
    pub counters: Counters,
    pub warnings: Mutex<Vec<String>>,
}

/// The part of the absolute path hierarchy above the backed-up paths.
#[derive(Default)]
struct Virtual {
    children: BTreeMap<OsString, Entry>,
}

enum Entry {
    Real(PathBuf),
    Virtual(Virtual),
}

impl<'r> Walker<'_, 'r> {
    fn warn(&self, path: &Path, err: impl std::fmt::Display) {
        let msg = format!("{}: {err}", path.display());
        tracing::debug!("{msg}");
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
        self.warnings.lock().expect("warnings lock").push(msg);
    }

    /// Builds the root tree: the components of each absolute path lead to it.
    pub fn backup_roots(&self, paths: &[PathBuf], parent: Option<&Tree>) -> Result<BlobId, BackupError> {
        let mut root = Virtual::default();
        for path in paths {
            let comps: Vec<OsString> = path.components().skip(1).map(|c| c.as_os_str().to_owned()).collect();
            let mut cur = &mut root;
            for (i, c) in comps.iter().enumerate() {
                if i + 1 == comps.len() {
                    cur.children.insert(c.clone(), Entry::Real(path.clone()));
                    break;
                }
                let entry = cur.children.entry(c.clone()).or_insert_with(|| Entry::Virtual(Virtual::default()));
                match entry {
                    Entry::Virtual(v) => cur = v,
                    Entry::Real(_) => break, // an ancestor is backed up whole
                }
            }
        }
        self.backup_virtual(Path::new("/"), &root, parent)
    }

    fn backup_virtual(&self, dir: &Path, v: &Virtual, parent: Option<&Tree>) -> Result<BlobId, BackupError> {
        let mut nodes = Vec::new();
        for (name, entry) in &v.children {
            let path = dir.join(name);
            let parent_node = parent.and_then(|t| t.find(name.as_bytes()));
            let node = match entry {
                Entry::Real(p) => match std::fs::symlink_metadata(p) {
                    Ok(meta) => self.filtered_entry(p, name.as_bytes(), &meta, parent_node)?,
                    Err(e) => {
                        self.warn(p, e);
                        None
                    }
                },
                Entry::Virtual(child) => {
                    let meta = std::fs::metadata(&path)
                        .map_err(|source| BackupError::Source { path: path.clone(), source })?;
                    let parent_sub = self.parent_subtree(parent_node);
                    let subtree = self.backup_virtual(&path, child, parent_sub.as_ref())?;
                    Some(self.node(&path, name.as_bytes(), &meta, NodeKind::Dir { subtree }))
                }
            };
            nodes.extend(node);
        }
        save_tree(self.session, nodes)
    }

    fn parent_subtree(&self, node: Option<&Node>) -> Option<Tree> {
        match node.map(|n| &n.kind) {
            Some(NodeKind::Dir { subtree }) => match self.repo.load_tree(subtree) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("parent tree {subtree} unreadable, reading files again: {e}");
                    None
                }
            },
            _ => None,
        }
    }

    /// One filesystem entry, unless the filter leaves it out.
    fn filtered_entry(
        &self,
        path: &Path,
        name: &[u8],
        meta: &Metadata,
        parent: Option<&Node>,
    ) -> Result<Option<Node>, BackupError> {
        match self.filter.verdict(path, meta) {
            Verdict::Keep => self.backup_entry(path, name, meta, parent),
            Verdict::Exclude => {
                tracing::debug!("{}: excluded", path.display());
                Ok(None)
            }
            Verdict::EmptyDir => {
                tracing::debug!("{}: another filesystem, kept empty", path.display());
                let subtree = save_tree(self.session, Vec::new())?;
                self.counters.dirs.fetch_add(1, Ordering::Relaxed);
                self.progress.dirs.fetch_add(1, Ordering::Relaxed);
                Ok(Some(self.node(path, name, meta, NodeKind::Dir { subtree })))
            }
        }
    }

    /// One filesystem entry; `None` when it was skipped with a warning.
    fn backup_entry(
        &self,
        path: &Path,
        name: &[u8],
        meta: &Metadata,
        parent: Option<&Node>,
    ) -> Result<Option<Node>, BackupError> {
        let ft = meta.file_type();
        if ft.is_file() {
            match self.backup_file(path, meta, parent) {
                Ok((chunks, size)) => {
                    let mut node = self.node(path, name, meta, NodeKind::File { chunks });
                    node.size = size;
                    Ok(Some(node))
                }
                // The file could not be read: a warning. Anything else (the
                // repository failing) ends the backup.
                Err(BackupError::Source { source, .. }) => {
                    self.warn(path, source);
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        } else if ft.is_dir() {
            let parent_tree = self.parent_subtree(parent);
            match self.backup_dir(path, parent_tree.as_ref()) {
                Ok(subtree) => {
                    self.counters.dirs.fetch_add(1, Ordering::Relaxed);
                    self.progress.dirs.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(self.node(path, name, meta, NodeKind::Dir { subtree })))
                }
                Err(BackupError::Source { path, source }) => {
                    self.warn(&path, source);
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        } else if ft.is_symlink() {
            match std::fs::read_link(path) {
                Ok(target) => {
                    self.counters.symlinks.fetch_add(1, Ordering::Relaxed);
                    let target = target.into_os_string().into_vec();
                    Ok(Some(self.node(path, name, meta, NodeKind::Symlink { target })))
                }
                Err(e) => {
                    self.warn(path, e);
                    Ok(None)
                }
            }
        } else {
            // A fifo, socket or device: its metadata is all there is.
            Ok(Some(self.node(path, name, meta, NodeKind::Special { rdev: meta.rdev() })))
        }
    }

    /// A tree node with the metadata of `meta` and the extended attributes
    /// of `path` (a failure to read those is a warning; the node is kept).
    fn node(&self, path: &Path, name: &[u8], meta: &Metadata, kind: NodeKind) -> Node {
        let mut node = node_from_meta(name, meta, kind);
        match read_xattrs(path) {
            Ok(xattrs) => node.extra.xattrs = xattrs,
            Err(e) => self.warn(path, format_args!("reading extended attributes: {e}")),
        }
        node
    }

    fn backup_dir(&self, path: &Path, parent: Option<&Tree>) -> Result<BlobId, BackupError> {
        let source = |source| BackupError::Source { path: path.to_owned(), source };
        let mut entries: Vec<(OsString, std::fs::DirEntry)> = Vec::new();
        for e in std::fs::read_dir(path).map_err(source)? {
            let e = e.map_err(source)?;
            entries.push((e.file_name(), e));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(keep) = self.filter.tagged(path, entries.iter().map(|(n, _)| n.as_os_str())) {
            tracing::debug!("{}: tagged, only its tag files kept", path.display());
            entries.retain(|(n, _)| is_one_of(n, &keep));
        }
        let nodes: Vec<Option<Node>> = entries
            .par_iter()
            .map(|(name, entry)| {
                let p = entry.path();
                // `DirEntry::metadata` stats relative to the open directory
                // (fstatat) rather than resolving the whole path again: a
                // tenth of a no-change backup's CPU went to path lookups.
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) => {
                        self.warn(&p, e);
                        return Ok(None);
                    }
                };
                let parent_node = parent.and_then(|t| t.find(name.as_bytes()));
                self.filtered_entry(&p, name.as_bytes(), &meta, parent_node)
            })
            .collect::<Result<_, BackupError>>()?;
        save_tree(self.session, nodes.into_iter().flatten().collect())
    }

    /// Returns the file's chunk list and size, reusing the parent's list when
    /// the file is unchanged.
    fn backup_file(
        &self,
        path: &Path,
        meta: &Metadata,
        parent: Option<&Node>,
    ) -> Result<(Vec<BlobId>, u64), BackupError> {
        let c = &self.counters;
        if let Some(chunks) = self.reusable(meta, parent) {
            c.files_unmodified.fetch_add(1, Ordering::Relaxed);
            c.total_bytes.fetch_add(meta.size(), Ordering::Relaxed);
            self.progress.files.fetch_add(1, Ordering::Relaxed);
            self.progress.bytes.fetch_add(meta.size(), Ordering::Relaxed);
            return Ok((chunks, meta.size()));
        }
        let source = |source| BackupError::Source { path: path.to_owned(), source };
        let file = File::open(path).map_err(source)?;
        let size = file.metadata().map_err(source)?.len();
        let chunks = if size >= MMAP_THRESHOLD {
            // SAFETY: the map is read-only and private to this process. A file
            // truncated by another process while mapped raises SIGBUS, which
            // aborts the backup in flight; committed snapshots are unaffected.
            let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(source)?;
            let _ = map.advise(memmap2::Advice::Sequential);
            self.save_chunks(&map, |done| {
                // Drop the pages behind us from this process's mapping so its
                // resident set stays at one batch per thread, not one file.
                // SAFETY: a private read-only file mapping refaults from the
                // file; no slice into this range outlives its batch.
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, done) };
            })?
        } else {
            // A reused buffer per thread (taken out of its cell, as a rayon
            // worker may start another file while this one is in flight).
            let mut data = READ_BUFFER.take();
            data.clear();
            data.reserve(size as usize);
            let saved = (&file).read_to_end(&mut data).map_err(source).and_then(|_| self.save_chunks(&data, |_| {}));
            READ_BUFFER.set(data);
            saved?
        };
        let (ids, read) = chunks;
        if parent.is_some() {
            c.files_changed.fetch_add(1, Ordering::Relaxed);
        } else {
            c.files_new.fetch_add(1, Ordering::Relaxed);
        }
        c.total_bytes.fetch_add(read, Ordering::Relaxed);
        c.bytes_read.fetch_add(read, Ordering::Relaxed);
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        Ok((ids, read))
    }

    /// Cuts `data` into chunks and saves them, a batch of cut points at a
    /// time so memory stays bounded; `released(n)` is told after each batch
    /// that the first `n` bytes (page aligned) are no longer needed.
    fn save_chunks(&self, data: &[u8], released: impl Fn(usize)) -> Result<(Vec<BlobId>, u64), BackupError> {
        let mut ids = Vec::new();
        let mut cuts = self.repo.chunker().cut_points(data).peekable();
        while cuts.peek().is_some() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(r) = cuts.next_if(|_| bytes < BATCH_BYTES) {
                bytes += r.len();
                batch.push(r);
            }
            let saved = batch
                .par_iter()
                .map(|r| {
                    let id = self.session.save(BlobKind::Data, &data[r.clone()]).map(|(id, _)| id);
                    self.progress.bytes.fetch_add(r.len() as u64, Ordering::Relaxed);
                    id
                })
                .collect::<Result<Vec<_>, _>>()?;
            ids.extend(saved);
            let end = batch.last().map_or(0, |r| r.end);
            released(end & !(PAGE - 1));
        }
        Ok((ids, data.len() as u64))
    }

    fn reusable(&self, meta: &Metadata, parent: Option<&Node>) -> Option<Vec<BlobId>> {
        let p = parent?;
        let NodeKind::File { chunks } = &p.kind else {
            return None;
        };
        let same = p.size == meta.size()
            && p.inode == meta.ino()
            && p.mtime == Timestamp { sec: meta.mtime(), nsec: meta.mtime_nsec() as u32 }
            && p.ctime == Timestamp { sec: meta.ctime(), nsec: meta.ctime_nsec() as u32 };
        if !same {
            return None;
        }
        let index = self.repo.index();
        chunks.iter().all(|c| index.contains(c)).then(|| chunks.clone())
    }
}

/// Extended attribute namespaces a backup keeps: what restic keeps, and
/// POSIX ACLs (stored by Linux as `system.posix_acl_*` attributes).
const XATTR_PREFIXES: [&[u8]; 4] = [b"user.", b"security.", b"trusted.", b"system.posix_acl_"];

/// The extended attributes of `path` itself (a symlink's own, never its
/// target's) in the kept namespaces; none where the filesystem has none.
fn read_xattrs(path: &Path) -> std::io::Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        let name = name.into_vec();
        if !XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) || name.len() > 255 {
            continue;
        }
        // Gone since the listing (ENODATA): nothing to keep.
        let Some(value) = xattr::get(path, OsStr::from_bytes(&name))? else { continue };
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(std::io::Error::other(format!("attribute {} is over 64 KiB", String::from_utf8_lossy(&name))));
        }
        out.push(Xattr { name, value });
    }
    Ok(out)
}

/// The user or group name of an id, looked up once per backup process
/// (getpwuid/getgrgid read /etc/passwd or NSS each time); empty when the
/// id has no name.
fn owner_name(id: u32, group: bool) -> String {
    type Names = Mutex<HashMap<(bool, u32), String>>;
    static NAMES: OnceLock<Names> = OnceLock::new();
    let names = NAMES.get_or_init(Names::default);
    if let Some(n) = names.lock().expect("owner names lock").get(&(group, id)) {
        return n.clone();
    }
    let name = if group {
        nix::unistd::Group::from_gid(id.into()).ok().flatten().map(|g| g.name)
    } else {
        nix::unistd::User::from_uid(id.into()).ok().flatten().map(|u| u.name)
    };
    let name = name.unwrap_or_default();
    names.lock().expect("owner names lock").insert((group, id), name.clone());
    name
}

/// A tree node with the metadata of `meta` (owner names, and the link count
/// and device of a file with hard links; no extended attributes).
fn node_from_meta(name: &[u8], meta: &Metadata, kind: NodeKind) -> Node {
    let is_file = matches!(kind, NodeKind::File { .. });
    // Only files: a directory's link count changes with its subdirectories,
    // which would make every parent tree differ from the last backup's.
    let hard_linked = is_file && meta.nlink() > 1;
    Node {
        name: name.to_vec(),
        size: if is_file { meta.size() } else { 0 },
        extra: NodeExtra {
            user: owner_name(meta.uid(), false),
            group: owner_name(meta.gid(), true),
            device: if hard_linked { meta.dev() } else { 0 },
            links: if hard_linked { meta.nlink() } else { 0 },
            xattrs: Vec::new(),
        },
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: Timestamp { sec: meta.mtime(), nsec: meta.mtime_nsec() as u32 },
        ctime: Timestamp { sec: meta.ctime(), nsec: meta.ctime_nsec() as u32 },
        inode: meta.ino(),
    }
}

/// What [`scan`] has counted so far: the size of a backup, for a progress
/// display's total and ETA while the backup runs.
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Regular files found.
    pub files: std::sync::atomic::AtomicU64,
    /// Their bytes.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Set when the scan has seen everything (the counts are final).
    pub done: std::sync::atomic::AtomicBool,
}

/// Counts the files and bytes a backup of `paths` with `exclude` would read,
/// leaving out what the backup leaves out; run it on a thread of its own
/// beside the backup (as restic does). Unreadable entries are skipped: the
/// backup reports them.
pub fn scan<P: AsRef<Path>>(
    paths: &[P],
    exclude: &super::ExcludeOptions,
    progress: &ScanProgress,
) -> Result<(), BackupError> {
    let mut roots = Vec::new();
    for p in paths {
        let p = p.as_ref();
        roots.push(std::path::absolute(p).map_err(|source| BackupError::Source { path: p.into(), source })?);
    }
    let filter = Filter::new(exclude, &roots)?;
    let mut stack: Vec<PathBuf> = roots;
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !matches!(filter.verdict(&path, &meta), Verdict::Keep) {
            continue;
        }
        if meta.is_file() {
            progress.files.fetch_add(1, Ordering::Relaxed);
            progress.bytes.fetch_add(meta.size(), Ordering::Relaxed);
        } else if meta.is_dir() {
            let Ok(dir) = std::fs::read_dir(&path) else { continue };
            let names: Vec<OsString> = dir.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
            let keep = filter.tagged(&path, names.iter().map(OsString::as_os_str));
            let kept = |n: &OsString| keep.as_ref().map_or(true, |k| is_one_of(n, k));
            stack.extend(names.into_iter().filter(kept).map(|n| path.join(n)));
        }
    }
    progress.done.store(true, Ordering::Relaxed);
    Ok(())
}
