//! Restore: snapshot trees back to files, every chunk verified first, and
//! nothing that was in the target destroyed unless a complete, verified file
//! of the snapshot replaces it.
//!
//! A restore is a [`RestorePlan`] (directories, files, symlinks, relative to
//! the target; made from the trees by [`plan`], or by the device client from
//! the storage node's plan) written by [`restore_plan`] with chunks from a
//! [`ChunkSource`] (the repository's pack reader, or the storage node). The
//! steps, and why each is safe, are in ARCHITECTURE.md ("Data flow of a
//! restore"): directories first (never through a symlink), every file into a
//! fresh temporary name in its directory, contents with `pwrite` as verified
//! chunks arrive, metadata on the temporary file, and only then a `rename`
//! over the old entry. A file that could not be completed is never renamed,
//! so a failed restore leaves the old file as it was and no temporary file.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::id::BlobId;
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::{validate_name, walk, Node, NodeKind, Timestamp};

/// Why a restore could not run (damage to some files is reported, not this).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A filesystem operation on the target failed.
    #[error("{path}: {source}")]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A snapshot entry's name would escape the target.
    #[error("refusing unsafe entry {0:?}: it would escape the restore target")]
    UnsafeName(String),
    /// An `--include` path, or a `cat` path, is not in the snapshot.
    #[error("{0}: not in the snapshot")]
    PathNotFound(String),
    /// `cat` of something that is not a regular file.
    #[error("{0}: not a regular file")]
    NotAFile(String),
    /// A symlink or a non-directory sits where the snapshot has a directory.
    #[error("{path}: refusing to restore through a {what} already in the target")]
    InTheWay {
        /// The directory the snapshot has.
        path: PathBuf,
        /// What is there instead ("symlink", "file").
        what: &'static str,
    },
    /// Writing a `cat` to its output failed.
    #[error("writing the output: {0}")]
    Output(std::io::Error),
    /// The restore journal (what a device records before creating) failed.
    #[error("recording what the restore creates: {0}")]
    Journal(std::io::Error),
}

/// What to do with an entry that already exists in the target (restic's
/// `--overwrite` names). Whatever the choice, a file is replaced only by a
/// complete, verified copy, atomically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overwrite {
    /// Replace it.
    #[default]
    Always,
    /// Replace it unless it already has the snapshot's size and mtime (a
    /// file) or target (a symlink).
    IfChanged,
    /// Leave it alone.
    Never,
}

/// What to restore, and how.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Slash-separated snapshot paths to restore (with what lies below them);
    /// empty restores everything.
    pub include: Vec<String>,
    /// What to do with entries already in the target.
    pub overwrite: Overwrite,
    /// Drop setuid, setgid and sticky bits from the modes: a device restoring
    /// what a server sent does not let the server choose them.
    pub strip_special_bits: bool,
    /// Never change ownership, even as root (a device does not let the
    /// server choose owners); otherwise root restores the recorded ones.
    pub ignore_owner: bool,
}

/// Live counters a progress display polls.
#[derive(Debug, Default)]
pub struct RestoreProgress {
    /// Bytes the restore will write.
    pub total_bytes: AtomicU64,
    /// Bytes written so far.
    pub bytes: AtomicU64,
    /// Files completed.
    pub files: AtomicU64,
}

/// A file that could not be restored exactly (the target keeps what it had).
#[derive(Clone, Debug, Serialize)]
pub struct DamagedFile {
    /// Path relative to the target.
    pub path: String,
    /// Why.
    pub error: String,
}

/// The outcome of a restore.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    /// Files written.
    pub files: u64,
    /// Directories of the snapshot restored (created or already there).
    pub dirs: u64,
    /// Symlinks written.
    pub symlinks: u64,
    /// Of `files`, those made hard links to another file of the restore,
    /// as they were when backed up.
    pub hardlinks: u64,
    /// Fifos and devices created.
    pub specials: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Entries left alone because of [`Overwrite`].
    pub skipped: u64,
    /// Files whose data the repository could not give back intact (damage).
    pub damaged: Vec<DamagedFile>,
    /// Entries that could not be put in place (e.g. a directory in the way);
    /// what was in the target is unchanged.
    pub failed: Vec<DamagedFile>,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
    /// Entries of the snapshot not restored because they cannot be here
    /// (a socket; a device when not root), with why.
    pub left_out: Vec<DamagedFile>,
}

/// One entry of a plan: a path relative to the target and its node.
#[derive(Clone, Debug)]
pub struct PlanEntry {
    /// Relative path; every component validated with [`validate_name`].
    pub rel: PathBuf,
    /// The snapshot's node (name, kind, metadata).
    pub node: Node,
}

/// What a restore writes: directories parents first, files, symlinks.
#[derive(Clone, Debug, Default)]
pub struct RestorePlan {
    /// Directories, each after its parent.
    pub dirs: Vec<PlanEntry>,
    /// Regular files.
    pub files: Vec<PlanEntry>,
    /// Symlinks.
    pub symlinks: Vec<PlanEntry>,
    /// Fifos, sockets and devices (a device client's plan has none).
    pub specials: Vec<PlanEntry>,
}

impl RestorePlan {
    /// Adds an entry at the slash-separated path `rel`, checking every
    /// component: a plan made from a hostile server's answer cannot name a
    /// path outside the target.
    pub fn push(&mut self, rel: &str, node: Node) -> Result<(), RestoreError> {
        let mut path = PathBuf::new();
        for part in rel.split('/') {
            validate_name(part.as_bytes()).map_err(|_| RestoreError::UnsafeName(rel.to_owned()))?;
            path.push(part);
        }
        let entry = PlanEntry { rel: path, node };
        match entry.node.kind {
            NodeKind::Dir { .. } => self.dirs.push(entry),
            NodeKind::File { .. } => self.files.push(entry),
            NodeKind::Symlink { .. } => self.symlinks.push(entry),
            NodeKind::Special { .. } => self.specials.push(entry),
        }
        Ok(())
    }

    /// Every chunk the files need, once each, in file order.
    pub fn chunks(&self) -> Vec<BlobId> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for e in &self.files {
            if let NodeKind::File { chunks } = &e.node.kind {
                out.extend(chunks.iter().filter(|c| seen.insert(**c)));
            }
        }
        out
    }
}

/// Receives each chunk fetched: its verified plaintext, or why it could not be had.
pub type DeliverChunk<'a> = dyn Fn(&BlobId, Result<&[u8], String>) + Sync + 'a;

/// Where a restore gets chunks from.
pub trait ChunkSource: Sync {
    /// A chunk's plaintext length, if the source has it.
    fn chunk_len(&self, id: &BlobId) -> Option<u32>;
    /// Fetches `ids` in whatever order is cheapest and calls `deliver` once
    /// for each id, with its plaintext verified against the id or with why it
    /// could not be had. `deliver` may be called from several threads.
    fn fetch(&self, ids: &[BlobId], deliver: &DeliverChunk<'_>);
}

/// The repository's own packs, read by [`Repository::read_blobs`].
impl ChunkSource for Repository {
    fn chunk_len(&self, id: &BlobId) -> Option<u32> {
        self.index().get(id).map(|l| l.raw_len)
    }

    fn fetch(&self, ids: &[BlobId], deliver: &DeliverChunk<'_>) {
        let (packs, missing) = self.plan_blob_reads(ids.iter().copied());
        for id in missing {
            deliver(&id, Err(format!("chunk {id} is missing from the repository")));
        }
        self.read_blobs(&packs, &|id, r| deliver(id, r.map_err(|e| e.to_string())));
    }
}

/// What a restore is about to create, recorded before it does (the device
/// client keeps these so that a wipe removes exactly what it restored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Created {
    /// A directory that did not exist.
    Dir {
        /// Absolute path.
        path: PathBuf,
    },
    /// A regular file, with the size and mtime the restore gives it.
    File {
        /// Absolute path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Its mtime, seconds.
        mtime: i64,
        /// Its mtime, nanoseconds.
        mtime_nsec: u32,
    },
    /// A symlink to `target`.
    Symlink {
        /// Absolute path.
        path: PathBuf,
        /// The link's target bytes (lossy UTF-8).
        target: String,
    },
}

/// Receives what a restore will create, before it creates it.
pub trait RestoreJournal: Sync {
    /// Makes `entries` durable; the restore creates them only after `Ok`.
    fn record(&self, entries: &[Created]) -> std::io::Result<()>;
}

/// Splits and normalizes an include path into components.
fn include_parts(s: &str) -> Vec<&[u8]> {
    s.split('/').filter(|p| !p.is_empty() && *p != ".").map(str::as_bytes).collect()
}

/// Restores `snapshot` (or the parts `opts.include` names) under `target`,
/// from the repository's packs.
///
/// Blocks until done; files are created, written and given their metadata
/// on the rayon pool. A file whose chunks are missing or damaged, or that
/// cannot be written, is listed in [`RestoreReport`] (the target keeps what
/// it had) rather than failing the restore; [`RestoreError`] is for what
/// stops it as a whole (an unsafe name, something in a directory's way, an
/// unreadable tree, an include path not in the snapshot). Takes no lock.
pub fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    target: &Path,
    opts: &RestoreOptions,
    progress: &RestoreProgress,
) -> Result<RestoreReport, RestoreError> {
    let plan = plan(repo, snapshot, &opts.include)?;
    restore_plan(&plan, repo, target, opts, None, progress)
}

/// The plan of a restore of `snapshot`, or of the `include` paths of it (a
/// path selects itself and everything below; directories on the way to it
/// are restored too). Every name is validated.
pub fn plan(repo: &Repository, snapshot: &Snapshot, include: &[String]) -> Result<RestorePlan, RestoreError> {
    let includes: Vec<Vec<&[u8]>> = include.iter().map(|s| include_parts(s)).collect();
    let mut plan = RestorePlan::default();
    let mut matched = vec![includes.is_empty(); includes.len()];
    let mut entries = walk(repo, &snapshot.tree);
    while let Some(entry) = entries.next() {
        let (path, node) = entry.map_err(|e| e.source)?;
        validate_name(&node.name).map_err(|_| RestoreError::UnsafeName(node.name_lossy()))?;
        let comps: Vec<&[u8]> = path.iter().map(OsStrExt::as_bytes).collect();
        // Selected: an include is a prefix of this path (restore all below).
        // On the way: this path is a prefix of an include (descend only).
        let mut selected = includes.is_empty();
        let mut on_the_way = false;
        for (i, inc) in includes.iter().enumerate() {
            let common = inc.iter().zip(&comps).take_while(|(a, b)| a == b).count();
            if common == inc.len() && comps.len() >= inc.len() {
                selected = true;
                matched[i] = true;
            } else if common == comps.len() {
                on_the_way = true;
            }
        }
        if !(selected || on_the_way) {
            entries.skip_subtree();
            continue;
        }
        let entry = PlanEntry { rel: path, node };
        match &entry.node.kind {
            NodeKind::Dir { .. } => plan.dirs.push(entry),
            NodeKind::File { .. } if selected => plan.files.push(entry),
            NodeKind::Symlink { .. } if selected => plan.symlinks.push(entry),
            NodeKind::Special { .. } if selected => plan.specials.push(entry),
            _ => {}
        }
    }
    if let Some(i) = matched.iter().position(|m| !m) {
        return Err(RestoreError::PathNotFound(include[i].clone()));
    }
    Ok(plan)
}

/// Writes `plan` under `target` with chunks from `source`. `journal`, if
/// given, hears of every directory, file and symlink before it is created.
pub fn restore_plan(
    plan: &RestorePlan,
    source: &dyn ChunkSource,
    target: &Path,
    opts: &RestoreOptions,
    journal: Option<&dyn RestoreJournal>,
    progress: &RestoreProgress,
) -> Result<RestoreReport, RestoreError> {
    let record = |entries: &[Created]| match journal {
        Some(j) if !entries.is_empty() => j.record(entries).map_err(RestoreError::Journal),
        _ => Ok(()),
    };
    let mut report = RestoreReport::default();
    make_target(target, &record)?;

    // Directories: refuse anything but a directory in their place before a
    // single file is written.
    let mut new_dirs = Vec::new();
    for e in &plan.dirs {
        let path = target.join(&e.rel);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(RestoreError::InTheWay { path, what: "symlink" }),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(RestoreError::InTheWay { path, what: "file" }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_dirs.push(path),
            Err(source) => return Err(RestoreError::Io { path, source }),
        }
    }
    record(&new_dirs.iter().map(|p| Created::Dir { path: p.clone() }).collect::<Vec<_>>())?;
    for path in &new_dirs {
        std::fs::create_dir(path).map_err(|source| RestoreError::Io { path: path.clone(), source })?;
    }

    // Files: decide what to write, then write each into a temporary file.
    // A file that shares its inode with an earlier file of the plan (a hard
    // link when backed up) is not written: it becomes a link to that one
    // once that one is in place.
    let mut writing = Vec::new();
    let mut links: Vec<(usize, usize)> = Vec::new();
    let mut first_of_inode: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, e) in plan.files.iter().enumerate() {
        match decide(&target.join(&e.rel), &e.node, opts.overwrite) {
            Decision::Write => match link_key(&e.node) {
                Some(key) if first_of_inode.contains_key(&key) => links.push((i, first_of_inode[&key])),
                key => {
                    if let Some(key) = key {
                        first_of_inode.insert(key, i);
                    }
                    writing.push(i);
                }
            },
            Decision::Skip => report.skipped += 1,
            Decision::Fail(error) => report.failed.push(failure(&e.rel, error)),
        }
    }
    let temps = TempFiles::default();
    let created: Vec<Result<PathBuf, String>> = writing
        .par_iter()
        .map(|&i| {
            let e = &plan.files[i];
            let tmp = temp_sibling(&target.join(&e.rel));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&tmp)
                .map_err(|err| format!("creating {}: {err}", tmp.display()))?;
            temps.add(tmp.clone());
            file.set_len(e.node.size).map_err(|err| format!("sizing {}: {err}", tmp.display()))?;
            Ok(tmp)
        })
        .collect();
    let mut files: Vec<(usize, PathBuf)> = Vec::new();
    for (i, r) in writing.iter().zip(created) {
        match r {
            Ok(tmp) => files.push((*i, tmp)),
            Err(error) => report.failed.push(failure(&plan.files[*i].rel, error)),
        }
    }
    progress.total_bytes.store(files.iter().map(|(i, _)| plan.files[*i].node.size).sum(), Ordering::Relaxed);
    let damaged = write_contents(source, plan, &files, progress);

    // Metadata on the temporary files, then record and rename them into place.
    let mut complete = Vec::new();
    for (n, (i, tmp)) in files.iter().enumerate() {
        match damaged.get(&n) {
            Some(error) => {
                report.damaged.push(failure(&plan.files[*i].rel, error.clone()));
                temps.remove(tmp);
            }
            None => complete.push((*i, tmp.clone())),
        }
    }
    let warnings: Vec<String> =
        complete.par_iter().flat_map_iter(|(i, tmp)| apply_metadata(tmp, &plan.files[*i].node, false, opts)).collect();
    report.warnings.extend(warnings);
    let entries: Vec<Created> = complete
        .iter()
        .map(|(i, _)| {
            let node = &plan.files[*i].node;
            Created::File {
                path: target.join(&plan.files[*i].rel),
                size: node.size,
                mtime: node.mtime.sec,
                mtime_nsec: node.mtime.nsec,
            }
        })
        .collect();
    record(&entries)?;
    let renamed: Vec<Result<u64, String>> = complete
        .par_iter()
        .map(|(i, tmp)| {
            let dest = target.join(&plan.files[*i].rel);
            std::fs::rename(tmp, &dest).map_err(|err| format!("putting it in place: {err}"))?;
            temps.done(tmp);
            Ok(plan.files[*i].node.size)
        })
        .collect();
    let mut placed = std::collections::HashSet::new();
    for ((i, tmp), r) in complete.iter().zip(renamed) {
        match r {
            Ok(bytes) => {
                report.files += 1;
                report.bytes += bytes;
                placed.insert(*i);
            }
            Err(error) => {
                temps.remove(tmp);
                report.failed.push(failure(&plan.files[*i].rel, error));
            }
        }
    }

    // Hard links to the files just put in place, under a temporary name and
    // renamed over, like the files.
    for (i, first) in links {
        let e = &plan.files[i];
        if !placed.contains(&first) {
            let why = format!("{} (a hard link to it) was not restored", plan.files[first].rel.display());
            report.failed.push(failure(&e.rel, why));
            continue;
        }
        let path = target.join(&e.rel);
        let node = &e.node;
        record(&[Created::File {
            path: path.clone(),
            size: node.size,
            mtime: node.mtime.sec,
            mtime_nsec: node.mtime.nsec,
        }])?;
        let tmp = temp_sibling(&path);
        if let Err(err) = std::fs::hard_link(target.join(&plan.files[first].rel), &tmp) {
            report.failed.push(failure(&e.rel, format!("creating the hard link: {err}")));
            continue;
        }
        temps.add(tmp.clone());
        if put_in_place(&tmp, &path, &e.rel, &temps, &mut report) {
            report.files += 1;
            report.hardlinks += 1;
        }
    }

    // Symlinks, the same way: made under a temporary name, renamed over.
    for e in &plan.symlinks {
        let path = target.join(&e.rel);
        let NodeKind::Symlink { target: link } = &e.node.kind else { continue };
        if !wants_write(&path, e, opts.overwrite, &mut report) {
            continue;
        }
        record(&[Created::Symlink { path: path.clone(), target: String::from_utf8_lossy(link).into_owned() }])?;
        let tmp = temp_sibling(&path);
        if let Err(err) = std::os::unix::fs::symlink(OsStr::from_bytes(link), &tmp) {
            report.failed.push(failure(&e.rel, format!("creating the link: {err}")));
            continue;
        }
        temps.add(tmp.clone());
        report.warnings.extend(apply_metadata(&tmp, &e.node, true, opts));
        if put_in_place(&tmp, &path, &e.rel, &temps, &mut report) {
            report.symlinks += 1;
        }
    }
    restore_specials(plan, target, opts, &record, &temps, &mut report)?;
    for e in plan.dirs.iter().rev() {
        report.dirs += 1;
        report.warnings.extend(apply_metadata(&target.join(&e.rel), &e.node, false, opts));
    }
    Ok(report)
}

/// Whether to write the entry at `path` (`--overwrite`); otherwise counts
/// the skip or records the failure.
fn wants_write(path: &Path, e: &PlanEntry, overwrite: Overwrite, report: &mut RestoreReport) -> bool {
    match decide(path, &e.node, overwrite) {
        Decision::Write => true,
        Decision::Skip => {
            report.skipped += 1;
            false
        }
        Decision::Fail(error) => {
            report.failed.push(failure(&e.rel, error));
            false
        }
    }
}

/// Renames the finished temporary entry `tmp` over `path`; when that fails,
/// removes it and records why.
fn put_in_place(tmp: &Path, path: &Path, rel: &Path, temps: &TempFiles, report: &mut RestoreReport) -> bool {
    match std::fs::rename(tmp, path) {
        Ok(()) => {
            temps.done(tmp);
            true
        }
        Err(err) => {
            temps.remove(tmp);
            report.failed.push(failure(rel, format!("putting it in place: {err}")));
            false
        }
    }
}

/// The identity of a file that had hard links when backed up.
fn link_key(node: &Node) -> Option<(u64, u64)> {
    (node.extra.links > 1).then_some((node.extra.device, node.inode))
}

/// Fifos and devices, made with `mknod` under a temporary name and renamed
/// over. Sockets, and devices when not root, are left out with why.
fn restore_specials(
    plan: &RestorePlan,
    target: &Path,
    opts: &RestoreOptions,
    record: &dyn Fn(&[Created]) -> Result<(), RestoreError>,
    temps: &TempFiles,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    for e in &plan.specials {
        let NodeKind::Special { rdev } = e.node.kind else { continue };
        let kind = SFlag::from_bits_truncate(e.node.mode & libc::S_IFMT);
        let why_not = match kind {
            SFlag::S_IFIFO => None,
            SFlag::S_IFCHR | SFlag::S_IFBLK if nix::unistd::geteuid().is_root() => None,
            SFlag::S_IFCHR | SFlag::S_IFBLK => Some("a device: only root can create one"),
            SFlag::S_IFSOCK => Some("a socket: it belongs to the program that listened on it"),
            _ => Some("an unknown file type"),
        };
        if let Some(why) = why_not {
            report.left_out.push(failure(&e.rel, why.into()));
            continue;
        }
        let path = target.join(&e.rel);
        if !wants_write(&path, e, opts.overwrite, report) {
            continue;
        }
        let node = &e.node;
        record(&[Created::File { path: path.clone(), size: 0, mtime: node.mtime.sec, mtime_nsec: node.mtime.nsec }])?;
        let tmp = temp_sibling(&path);
        // Owner-only until apply_metadata sets the snapshot's mode.
        if let Err(err) = mknod(&tmp, kind, Mode::S_IRUSR | Mode::S_IWUSR, rdev as libc::dev_t) {
            report.failed.push(failure(&e.rel, format!("creating it: {err}")));
            continue;
        }
        temps.add(tmp.clone());
        report.warnings.extend(apply_metadata(&tmp, node, false, opts));
        if put_in_place(&tmp, &path, &e.rel, temps, report) {
            report.specials += 1;
        }
    }
    Ok(())
}

/// Creates the target (and missing parents), recording them first.
fn make_target(target: &Path, record: &dyn Fn(&[Created]) -> Result<(), RestoreError>) -> Result<(), RestoreError> {
    let mut missing = Vec::new();
    let mut p = Some(target);
    while let Some(dir) = p {
        if dir.as_os_str().is_empty() || std::fs::symlink_metadata(dir).is_ok() {
            break;
        }
        missing.push(Created::Dir { path: dir.to_owned() });
        p = dir.parent();
    }
    missing.reverse();
    record(&missing)?;
    std::fs::create_dir_all(target).map_err(|source| RestoreError::Io { path: target.into(), source })
}

fn failure(rel: &Path, error: String) -> DamagedFile {
    DamagedFile { path: rel.to_string_lossy().into_owned(), error }
}

enum Decision {
    Write,
    Skip,
    Fail(String),
}

/// What to do with a file or symlink of the snapshot at `path`.
fn decide(path: &Path, node: &Node, overwrite: Overwrite) -> Decision {
    let existing = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Decision::Write,
        Err(e) => return Decision::Fail(e.to_string()),
        Ok(m) => m,
    };
    if existing.is_dir() {
        return Decision::Fail("a directory is in the way".into());
    }
    let unchanged = || match &node.kind {
        NodeKind::File { .. } => {
            existing.is_file()
                && existing.len() == node.size
                && existing.mtime() == node.mtime.sec
                && existing.mtime_nsec() == i64::from(node.mtime.nsec)
        }
        NodeKind::Symlink { target } => {
            existing.file_type().is_symlink()
                && std::fs::read_link(path).is_ok_and(|t| t.as_os_str().as_bytes() == target.as_slice())
        }
        NodeKind::Dir { .. } | NodeKind::Special { .. } => false,
    };
    match overwrite {
        Overwrite::Always => Decision::Write,
        Overwrite::Never => Decision::Skip,
        Overwrite::IfChanged if unchanged() => Decision::Skip,
        Overwrite::IfChanged => Decision::Write,
    }
}

/// A fresh name beside `path` for writing it: hidden, and unlikely to be
/// anyone else's (created with `O_EXCL`, so never someone else's).
fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = OsString::from(".chunkvault-");
    name.push(hex::encode(rand::random::<[u8; 8]>()));
    name.push(".tmp");
    path.with_file_name(name)
}

/// Temporary files this restore made; those not renamed into place are
/// removed when it ends, however it ends.
#[derive(Default)]
struct TempFiles(Mutex<std::collections::HashSet<PathBuf>>);

impl TempFiles {
    fn add(&self, p: PathBuf) {
        self.0.lock().expect("temp lock").insert(p);
    }

    /// Renamed into place: no longer ours to remove.
    fn done(&self, p: &Path) {
        self.0.lock().expect("temp lock").remove(p);
    }

    fn remove(&self, p: &Path) {
        let _ = std::fs::remove_file(p);
        self.done(p);
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in self.0.get_mut().expect("temp lock").drain() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes every file's content into its temporary file; returns the files
/// (positions in `files`) that failed, with why.
fn write_contents(
    source: &dyn ChunkSource,
    plan: &RestorePlan,
    files: &[(usize, PathBuf)],
    progress: &RestoreProgress,
) -> HashMap<usize, String> {
    let damaged: Mutex<HashMap<usize, String>> = Mutex::default();
    let mark = |file: usize, err: String| {
        damaged.lock().expect("damage lock").entry(file).or_insert(err);
    };
    // Where each chunk's bytes go: (file position, offset in the file).
    let mut targets: HashMap<BlobId, Vec<(usize, u64)>> = HashMap::new();
    let mut wanted = Vec::new();
    for (n, (i, _)) in files.iter().enumerate() {
        let node = &plan.files[*i].node;
        let NodeKind::File { chunks } = &node.kind else { continue };
        let mut offset = 0u64;
        let mut ok = true;
        for c in chunks {
            let Some(len) = source.chunk_len(c) else {
                mark(n, format!("chunk {c} is missing from the repository"));
                ok = false;
                break;
            };
            let t = targets.entry(*c).or_default();
            if t.is_empty() {
                wanted.push(*c);
            }
            t.push((n, offset));
            offset += u64::from(len);
        }
        if ok && offset != node.size {
            mark(n, format!("chunk lengths add up to {offset} bytes, the file has {}", node.size));
        }
    }
    source.fetch(&wanted, &|id, result| {
        let Some(places) = targets.get(id) else { return };
        let data = match result {
            Ok(d) => d,
            Err(e) => {
                for (n, _) in places {
                    mark(*n, e.clone());
                }
                return;
            }
        };
        for (n, off) in places {
            let tmp = &files[*n].1;
            let written = open_temp(tmp).and_then(|file| file.write_all_at(data, *off));
            match written {
                Ok(()) => {
                    progress.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Err(e) => mark(*n, format!("writing: {e}")),
            }
        }
    });
    progress.files.store(files.len() as u64, Ordering::Relaxed);
    damaged.into_inner().expect("damage lock")
}

/// Opens one of this restore's temporary files for writing, never through a
/// symlink put in its place.
fn open_temp(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn apply_metadata(path: &Path, node: &Node, is_link: bool, opts: &RestoreOptions) -> Vec<String> {
    let mut warnings = Vec::new();
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return warnings;
    };
    let flags = if is_link { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
    let mode_bits = if opts.strip_special_bits { 0o777 } else { 0o7777 };
    // Ownership first: chown clears setuid/setgid bits (chmod then sets
    // them) and security.capability (set below).
    // SAFETY: `c` is a valid NUL-terminated path; the call only reads it.
    if !opts.ignore_owner
        && unsafe { libc::geteuid() } == 0
        && unsafe { libc::fchownat(libc::AT_FDCWD, c.as_ptr(), node.uid, node.gid, flags) } != 0
    {
        warnings.push(format!("{}: chown: {}", path.display(), std::io::Error::last_os_error()));
    }
    // Before chmod: a read-only mode would stop its owner setting user.*.
    // Each attribute is tried: the restoring user may set user.* but not trusted.*.
    for x in &node.extra.xattrs {
        if let Err(e) = xattr::set(path, OsStr::from_bytes(&x.name), &x.value) {
            warnings.push(format!("{}: extended attribute {}: {e}", path.display(), String::from_utf8_lossy(&x.name)));
        }
    }
    // SAFETY: as above; `times` outlives the call.
    unsafe {
        if !is_link && libc::chmod(c.as_ptr(), (node.mode & mode_bits) as libc::mode_t) != 0 {
            warnings.push(format!("{}: chmod: {}", path.display(), std::io::Error::last_os_error()));
        }
        let times = [to_timespec(node.mtime), to_timespec(node.mtime)];
        if libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) != 0 {
            warnings.push(format!("{}: set times: {}", path.display(), std::io::Error::last_os_error()));
        }
    }
    warnings
}

fn to_timespec(t: Timestamp) -> libc::timespec {
    libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long }
}

/// Chunks `cat` reads in one pass of the pack-ordered reader (bounds the
/// memory it holds: one window of plaintext).
const CAT_WINDOW: u64 = 16 << 20;

/// One file of a snapshot (or the byte range `start..end` of it) as a
/// stream of verified bytes. Chunks are read through the repository's one
/// blob read path ([`Repository::read_blobs`]: pack order, nearby blobs in
/// one ranged read), a window of the chunks starting within 16 MiB at a
/// time, so memory is bounded (16 MiB plus one chunk) whatever the file's
/// size. Used by `cat`, `dump` and the storage
/// node's file route.
pub struct FileReader<'r> {
    repo: &'r Repository,
    /// The chunks overlapping the range, each with its offset in the file.
    wanted: Vec<(BlobId, u64)>,
    /// The first of `wanted` not read yet.
    next: usize,
    start: u64,
    end: u64,
    /// The window read last, trimmed to the range, and how much of it was taken.
    buf: Vec<u8>,
    pos: usize,
    /// A chunk of the window that failed: reported once the good bytes
    /// before it are taken, so output stops right before it.
    failed: Option<RepoError>,
}

impl<'r> FileReader<'r> {
    /// A reader of `node`'s content, or of `range` (`start..end`, clamped to
    /// the file's size) of it. Fails if `node` is not a file or names a
    /// chunk the index lacks.
    pub fn new(repo: &'r Repository, node: &Node, range: Option<(u64, u64)>) -> Result<FileReader<'r>, RestoreError> {
        let NodeKind::File { chunks } = &node.kind else {
            return Err(RestoreError::NotAFile(node.name_lossy()));
        };
        let (start, end) = range.unwrap_or((0, node.size));
        let end = end.min(node.size);
        let mut wanted = Vec::new();
        let mut pos = 0u64;
        let index = repo.index();
        for c in chunks {
            if pos >= end {
                break;
            }
            let len = u64::from(index.get(c).ok_or(RepoError::MissingBlob(*c))?.raw_len);
            if pos + len > start {
                wanted.push((*c, pos));
            }
            pos += len;
        }
        Ok(FileReader { repo, wanted, next: 0, start, end, buf: Vec::new(), pos: 0, failed: None })
    }

    /// Reads the next window into `buf`; `false` at the end of the range.
    fn fill(&mut self) -> Result<bool, RepoError> {
        let rest = &self.wanted[self.next..];
        let Some(&(_, first)) = rest.first() else { return Ok(false) };
        let window = &rest[..rest.iter().take_while(|(_, at)| *at - first < CAT_WINDOW).count()];
        self.next += window.len();
        let mut read = self.repo.read_blob_map(window.iter().map(|(c, _)| *c));
        self.buf.clear();
        self.pos = 0;
        for (c, at) in window {
            let data = match read.remove(c) {
                Some(Ok(data)) => data,
                Some(Err(e)) => {
                    self.failed = Some(e);
                    self.next = self.wanted.len();
                    break;
                }
                None => {
                    self.failed = Some(RepoError::MissingBlob(*c));
                    self.next = self.wanted.len();
                    break;
                }
            };
            let from = self.start.saturating_sub(*at) as usize;
            let to = ((self.end - at) as usize).min(data.len());
            self.buf.extend_from_slice(&data[from..to]);
        }
        Ok(true)
    }

    /// The unread part of the current window, reading the next one when it
    /// is used up; empty at the end of the range.
    fn window(&mut self) -> Result<&[u8], RepoError> {
        while self.pos == self.buf.len() {
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if !self.fill()? {
                return Ok(&[]);
            }
        }
        Ok(&self.buf[self.pos..])
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let window = self.window().map_err(std::io::Error::other)?;
        let n = out.len().min(window.len());
        out[..n].copy_from_slice(&window[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes one file of a snapshot (or the byte range `start..end` of it) to
/// `out` through a [`FileReader`]; a chunk that fails ends the output at the
/// window before it. Returns the bytes written.
pub fn cat(
    repo: &Repository,
    node: &Node,
    range: Option<(u64, u64)>,
    out: &mut dyn Write,
) -> Result<u64, RestoreError> {
    let mut reader = FileReader::new(repo, node, range)?;
    let mut written = 0u64;
    loop {
        let window = reader.window()?;
        if window.is_empty() {
            return Ok(written);
        }
        let n = window.len();
        out.write_all(window).map_err(RestoreError::Output)?;
        reader.pos += n;
        written += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup_stream, BackupOptions, NamedFile};

    /// A file of several `cat` windows: every range, within one window or
    /// across them, comes back exactly.
    #[test]
    fn cat_reads_any_range_across_windows() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_support::local_repo(dir.path());
        let mut x = 1u64;
        let data: Vec<u8> = (0..(CAT_WINDOW * 2 + 12345))
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let file = NamedFile { path: "f".into(), reader: &data[..], mode: 0o644, mtime: Timestamp { sec: 1, nsec: 0 } };
        let (_, snap) = backup_stream(&repo, [file], &BackupOptions::default()).unwrap();
        let node = repo.find_node(&snap.tree, "f").unwrap().unwrap();
        let NodeKind::File { chunks } = &node.kind else { panic!("a file") };
        assert!(chunks.len() > 4, "{} chunks", chunks.len());
        let len = data.len() as u64;
        for (start, end) in [(0, len), (5, 6), (CAT_WINDOW - 3, CAT_WINDOW + 7), (len - 10, len + 100), (len, len)] {
            let mut out = Vec::new();
            let n = cat(&repo, &node, Some((start, end)), &mut out).unwrap();
            let end = end.min(len);
            assert_eq!(n, end - start);
            assert!(out == data[start as usize..end as usize], "{start}..{end}");
        }
    }
}
