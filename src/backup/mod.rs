//! Backup: walk, chunk, dedup, store, then commit a snapshot.
//!
//! Directories are walked depth-first with their entries processed in
//! parallel (rayon); a file's chunks are hashed, compressed and sealed in
//! parallel too, while its cut points are found sequentially. A directory's
//! tree blob is written once all its entries are, so trees are built bottom
//! up. Files whose size, mtime, ctime and inode match the parent snapshot
//! reuse its chunk list without being read. Everything is written through
//! one [`WriteSession`], whose commit writes the snapshot only after every
//! pack and index segment is durable.

mod filter;
mod stream;
mod walk;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use filter::{parse_size, patterns_from_file, ExcludeError, ExcludeOptions, PatternList, CACHEDIR_TAG};
pub use stream::{backup_stream, stream_node, FileTree, NamedFile, StreamOrigin};
pub use walk::{scan, ScanProgress};

use crate::id::{BlobKind, SnapshotId};
use crate::lock::{LockError, LockKind, LockOptions};
use crate::packer::PackerStats;
use crate::repo::{RepoError, Repository, WriteError, WriteSession};
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{Tree, TreeError};

/// Why a backup failed (a file that cannot be read is a warning, not this).
#[derive(Debug, thiserror::Error)]
///
/// Whatever the error, no snapshot was written; packs already uploaded are
/// named by no snapshot and left for prune (see ARCHITECTURE.md, "The
/// commit protocol").
pub enum BackupError {
    /// The repository failed: storage, a failed upload, damage met while
    /// reading the parent snapshot.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A path given to the backup (or a stream's reader) could not be
    /// resolved or read. Unreadable entries *below* a given path are
    /// warnings ([`BackupResult::warnings`]), not this error.
    #[error("{path}: {source}")]
    Source {
        /// The path as given (or the stream file's path).
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A directory could not be made into a tree blob (a name the format
    /// refuses, or a listing over the tree size limit).
    #[error("building a tree: {0}")]
    Tree(#[from] TreeError),
    /// No paths were given, or a stream file has an empty path.
    #[error("nothing to back up: {0}")]
    NoPaths(String),
    /// The shared lock could not be taken (a prune holds the repository
    /// past `lock.wait`), or it lapsed before the snapshot was written.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The exclude options cannot be used (a bad pattern).
    #[error(transparent)]
    Exclude(#[from] ExcludeError),
}

/// Which snapshot to compare against for unchanged files.
#[derive(Clone, Debug, Default)]
pub enum ParentChoice {
    /// The latest snapshot of the same host and paths.
    #[default]
    Auto,
    /// Read every file.
    None,
    /// This snapshot.
    Snapshot(SnapshotId),
}

/// Options of one backup.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Tags recorded in the snapshot.
    pub tags: Vec<String>,
    /// Host name to record; the machine's by default.
    pub hostname: Option<String>,
    /// Which snapshot unchanged files are compared with.
    pub parent: ParentChoice,
    /// The tenant recorded in the snapshot (server backups).
    pub tenant: Option<String>,
    /// The user recorded in the snapshot (server backups).
    pub user: Option<String>,
    /// The device recorded in the snapshot (server backups).
    pub device: Option<String>,
    /// Upload threads (at least 1).
    pub uploaders: usize,
    /// Timing of the shared lock the backup holds (how long to wait for a prune).
    pub lock: LockOptions,
    /// What to leave out; excluded entries are neither stored nor descended into.
    pub exclude: ExcludeOptions,
}

/// Live counters a progress display polls.
#[derive(Debug, Default)]
pub struct BackupProgress {
    /// Files done.
    pub files: AtomicU64,
    /// Directories done.
    pub dirs: AtomicU64,
    /// File bytes done (read, or reused from the parent).
    pub bytes: AtomicU64,
    /// Entries that could not be read.
    pub errors: AtomicU64,
    /// The packer's counters (blobs and bytes stored), once it exists.
    pub packer: Mutex<Option<Arc<PackerStats>>>,
}

/// A committed backup.
#[derive(Debug)]
pub struct BackupResult {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// The snapshot as written.
    pub snapshot: Snapshot,
    /// Entries that could not be read and were left out.
    pub warnings: Vec<String>,
}

impl BackupResult {
    /// True when every entry was read (no warnings): a script's "exit 0".
    pub fn is_complete(&self) -> bool {
        self.warnings.is_empty()
    }
}

#[derive(Default)]
struct Counters {
    files_new: AtomicU64,
    files_changed: AtomicU64,
    files_unmodified: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    total_bytes: AtomicU64,
    bytes_read: AtomicU64,
}

/// What a backup would store ([`dry_run`]); nothing was written.
#[derive(Debug)]
pub struct DryRunResult {
    /// The snapshot that would be written; its summary counts the files and
    /// bytes that are new or changed, and `bytes_stored` what they would take.
    pub snapshot: Snapshot,
    /// Entries that could not be read and would be left out.
    pub warnings: Vec<String>,
}

/// Backs up `paths` (files or directories) into one snapshot.
///
/// Blocks until the snapshot is durable (or the backup fails); it uses the
/// rayon pool for reading and sealing and `opts.uploaders` threads for
/// uploads. Holds a shared lock for the whole backup, so it waits up to
/// `opts.lock.wait` for a running prune. Relative paths are made absolute
/// against the current directory. An entry that cannot be read is left out
/// with a warning ([`BackupResult::is_complete`] is then false); any other
/// failure is a [`BackupError`] and writes no snapshot.
pub fn backup<P: AsRef<Path>>(
    repo: &Repository,
    paths: &[P],
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupResult, BackupError> {
    let (snapshot, id, warnings) = run(repo, paths, opts, progress, false)?;
    let id = id.expect("a backup that is not a dry run writes its snapshot");
    Ok(BackupResult { id, snapshot, warnings })
}

/// Walks, reads, chunks, dedups and compresses like [`backup`], and writes
/// nothing: no pack, no index segment, no snapshot, no lock.
pub fn dry_run<P: AsRef<Path>>(
    repo: &Repository,
    paths: &[P],
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<DryRunResult, BackupError> {
    let (snapshot, _, warnings) = run(repo, paths, opts, progress, true)?;
    Ok(DryRunResult { snapshot, warnings })
}

/// A backup, or with `dry` a dry run (then no snapshot id).
fn run<P: AsRef<Path>>(
    repo: &Repository,
    paths: &[P],
    opts: &BackupOptions,
    progress: &BackupProgress,
    dry: bool,
) -> Result<(Snapshot, Option<SnapshotId>, Vec<String>), BackupError> {
    let started = Instant::now();
    let time = chrono::Local::now().fixed_offset();
    if paths.is_empty() {
        return Err(BackupError::NoPaths("no paths given".into()));
    }
    let mut abs = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let a = std::path::absolute(p).map_err(|source| BackupError::Source { path: p.into(), source })?;
        let a = normalize(&a);
        std::fs::symlink_metadata(&a).map_err(|source| BackupError::Source { path: p.into(), source })?;
        abs.push(a);
    }
    abs.sort();
    abs.dedup();
    let path_strings: Vec<String> = abs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let filter = filter::Filter::new(&opts.exclude, &abs)?;
    // The shared lock is held from before the index is trusted (dedup,
    // parent reuse) until the snapshot is written.
    let mut session = if dry { WriteSession::dry_run(repo) } else { begin_session(repo, opts)? };
    let username = crate::snapshot::current_user();
    let hostname = opts.hostname.clone().unwrap_or_else(crate::snapshot::current_host);

    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Snapshot(id) => Some((*id, repo.load_snapshot(id)?)),
        ParentChoice::Auto => {
            repo.list_snapshots()?.into_iter().rev().find(|(_, s)| s.hostname == hostname && s.paths == path_strings)
        }
    };
    let parent_tree = match &parent {
        Some((_, s)) => Some(repo.load_tree(&s.tree)?),
        None => None,
    };

    let stats = session.stats();
    *progress.packer.lock().expect("progress lock") = Some(stats.clone());
    let walker = walk::Walker {
        repo,
        session: &session,
        progress,
        filter: &filter,
        counters: Counters::default(),
        warnings: Mutex::new(Vec::new()),
    };
    let root = walker.backup_roots(&abs, parent_tree.as_ref())?;
    let walk::Walker { counters: c, warnings, .. } = walker;
    session.flush()?;

    let summary = Summary {
        files_new: c.files_new.load(Ordering::Relaxed),
        files_changed: c.files_changed.load(Ordering::Relaxed),
        files_unmodified: c.files_unmodified.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        symlinks: c.symlinks.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        total_bytes: c.total_bytes.load(Ordering::Relaxed),
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        blobs_new: stats.blobs_new.load(Ordering::Relaxed),
        bytes_new: stats.bytes_new.load(Ordering::Relaxed),
        bytes_stored: stats.bytes_stored.load(Ordering::Relaxed),
        duration_secs: started.elapsed().as_secs_f64(),
    };
    let snapshot = Snapshot {
        time,
        hostname,
        username,
        tenant: opts.tenant.clone(),
        user: opts.user.clone(),
        device: opts.device.clone(),
        tags: opts.tags.clone(),
        paths: path_strings,
        tree: root,
        parent: parent.map(|(id, _)| id),
        original: None,
        summary,
        program_version: format!("chunkvault {}", env!("CARGO_PKG_VERSION")),
    };
    let warnings = warnings.into_inner().expect("warnings lock");
    let id = session.commit(&snapshot)?;
    Ok((snapshot, id, warnings))
}

/// The write session of a backup: a shared lock with the backup's timing.
fn begin_session<'r>(repo: &'r Repository, opts: &BackupOptions) -> Result<WriteSession<'r>, BackupError> {
    Ok(WriteSession::begin(repo, LockKind::Shared, opts.lock, opts.uploaders)?)
}

/// Removes `.` and `..` components lexically (the path is absolute).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Stores a tree blob and returns its id.
fn save_tree(session: &WriteSession<'_>, nodes: Vec<crate::tree::Node>) -> Result<crate::id::BlobId, BackupError> {
    let tree = Tree::new(nodes)?;
    Ok(session.save(BlobKind::Tree, &tree.encode())?.0)
}

impl From<WriteError> for BackupError {
    fn from(e: WriteError) -> Self {
        e.split()
    }
}
