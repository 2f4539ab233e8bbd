//! Restore: snapshot trees back to files, every chunk verified first.
//!
//! The plan is made from the trees (names validated again, so a hostile
//! snapshot cannot write outside the target), directories and empty files are
//! created, then the needed blobs are grouped by pack and each pack is read
//! once, in offset order, with nearby blobs coalesced into one ranged read.
//! Packs are processed in parallel; a blob is written with `pwrite` to every
//! place that needs it. A blob that fails verification marks the files using
//! it damaged: they are deleted rather than left with wrong bytes, and the
//! report lists them. Metadata (mode, owner, times) is applied last,
//! directories deepest first, so writing files does not disturb their times.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::backend::ObjectKey;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::pack::FRAME_HEADER_LEN;
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::{validate_name, Node, NodeKind, Timestamp};

/// Blobs closer than this in a pack are fetched with one ranged read.
const COALESCE_GAP: u64 = 1 << 20;
/// Largest single ranged read.
const MAX_READ: u64 = 64 << 20;

/// Why a restore could not run (damage to some files is reported, not this).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("refusing unsafe entry {0:?}: it would escape the restore target")]
    UnsafeName(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{path}: refusing to restore through a symlink already in the target")]
    SymlinkInTarget { path: PathBuf },
}

/// What to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Slash-separated snapshot paths to restore (with what lies below them);
    /// empty restores everything.
    pub include: Vec<String>,
}

/// Live counters a progress display polls.
#[derive(Debug, Default)]
pub struct RestoreProgress {
    pub total_bytes: AtomicU64,
    pub bytes: AtomicU64,
    pub files: AtomicU64,
}

/// A file that could not be restored exactly (and was removed).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DamagedFile {
    pub path: String,
    pub error: String,
}

/// The outcome of a restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub damaged: Vec<DamagedFile>,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
}

struct Plan {
    dirs: Vec<(PathBuf, Node)>,
    files: Vec<(PathBuf, Node)>,
    symlinks: Vec<(PathBuf, Node)>,
}

/// Splits and normalizes an include path into components.
fn include_parts(s: &str) -> Vec<&[u8]> {
    s.split('/').filter(|p| !p.is_empty() && *p != ".").map(str::as_bytes).collect()
}

/// Restores `snapshot` (or the parts `opts.include` names) under `target`.
pub fn restore(
    repo: &Repository,
    snapshot: &Snapshot,
    target: &Path,
    opts: &RestoreOptions,
    progress: &RestoreProgress,
) -> Result<RestoreReport, RestoreError> {
    let includes: Vec<Vec<&[u8]>> = opts.include.iter().map(|s| include_parts(s)).collect();
    let mut plan = Plan { dirs: Vec::new(), files: Vec::new(), symlinks: Vec::new() };
    let mut matched = vec![includes.is_empty(); includes.len()];
    plan_tree(repo, &snapshot.tree, PathBuf::new(), &mut Vec::new(), &includes, &mut matched, &mut plan)?;
    if let Some(i) = matched.iter().position(|m| !m) {
        return Err(RestoreError::NotFound(format!("{}: not in the snapshot", opts.include[i])));
    }
    std::fs::create_dir_all(target).map_err(|source| RestoreError::Io { path: target.into(), source })?;
    let mut report = RestoreReport::default();

    for (rel, _) in &plan.dirs {
        make_dir(&target.join(rel))?;
    }
    let total: u64 = plan.files.iter().map(|(_, n)| n.size).sum();
    progress.total_bytes.store(total, Ordering::Relaxed);
    // Creating files and setting their metadata are kernel work on many
    // inodes in many directories: they run in parallel like the contents.
    plan.files.par_iter().try_for_each(|(rel, node)| {
        let path = target.join(rel);
        let f = open_for_write(&path, true).map_err(|source| RestoreError::Io { path: path.clone(), source })?;
        f.set_len(node.size).map_err(|source| RestoreError::Io { path, source })
    })?;

    let damaged = write_contents(repo, target, &plan.files, progress);
    let file_warnings: Vec<String> = plan
        .files
        .par_iter()
        .enumerate()
        .filter(|(i, _)| !damaged.contains_key(i))
        .flat_map_iter(|(_, (rel, node))| {
            let mut warnings = Vec::new();
            apply_metadata(&target.join(rel), node, false, &mut warnings);
            warnings
        })
        .collect();
    report.warnings.extend(file_warnings);
    for (i, (rel, node)) in plan.files.iter().enumerate() {
        if let Some(err) = damaged.get(&i) {
            let _ = std::fs::remove_file(target.join(rel));
            report.damaged.push(DamagedFile { path: rel.to_string_lossy().into_owned(), error: err.clone() });
            continue;
        }
        report.files += 1;
        report.bytes += node.size;
    }
    for (rel, node) in &plan.symlinks {
        let path = target.join(rel);
        let NodeKind::Symlink { target: link } = &node.kind else {
            continue;
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(RestoreError::Io {
                    path,
                    source: std::io::Error::other("a directory is in the way of a symlink"),
                })
            }
            Ok(_) => std::fs::remove_file(&path).map_err(|source| RestoreError::Io { path: path.clone(), source })?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(OsStr::from_bytes(link), &path)
            .map_err(|source| RestoreError::Io { path: path.clone(), source })?;
        report.symlinks += 1;
        apply_metadata(&path, node, true, &mut report.warnings);
    }
    for (rel, node) in plan.dirs.iter().rev() {
        report.dirs += 1;
        apply_metadata(&target.join(rel), node, false, &mut report.warnings);
    }
    Ok(report)
}

fn plan_tree(
    repo: &Repository,
    tree_id: &BlobId,
    rel: PathBuf,
    comps: &mut Vec<Vec<u8>>,
    includes: &[Vec<&[u8]>],
    matched: &mut [bool],
    plan: &mut Plan,
) -> Result<(), RestoreError> {
    let tree = repo.load_tree(tree_id)?;
    for node in tree.nodes() {
        validate_name(&node.name).map_err(|_| RestoreError::UnsafeName(node.name_lossy()))?;
        comps.push(node.name.clone());
        // Selected: an include is a prefix of this path (restore all below).
        // On the way: this path is a prefix of an include (descend only).
        let mut selected = includes.is_empty();
        let mut on_the_way = false;
        for (i, inc) in includes.iter().enumerate() {
            let common = inc.iter().zip(comps.iter()).take_while(|(a, b)| **a == b.as_slice()).count();
            if common == inc.len() && comps.len() >= inc.len() {
                selected = true;
                matched[i] = true;
            } else if common == comps.len() {
                on_the_way = true;
            }
        }
        let path = rel.join(OsStr::from_bytes(&node.name));
        if selected || on_the_way {
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    plan.dirs.push((path.clone(), node.clone()));
                    plan_tree(repo, subtree, path, comps, includes, matched, plan)?;
                }
                NodeKind::File { .. } if selected => plan.files.push((path, node.clone())),
                NodeKind::Symlink { .. } if selected => plan.symlinks.push((path, node.clone())),
                _ => {}
            }
        }
        comps.pop();
    }
    Ok(())
}

fn make_dir(path: &Path) -> Result<(), RestoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(RestoreError::SymlinkInTarget { path: path.into() }),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(RestoreError::Io {
            path: path.into(),
            source: std::io::Error::other("a file is in the way of a directory"),
        }),
        Err(_) => std::fs::create_dir(path).map_err(|source| RestoreError::Io { path: path.into(), source }),
    }
}

/// Opens a file for writing without following a symlink in its last component.
fn open_for_write(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new().write(true).create(create).truncate(create).custom_flags(libc::O_NOFOLLOW).mode(0o600).open(path)
}

thread_local! {
    /// A ranged read of a pack (up to [`MAX_READ`]) being restored.
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where a blob's bytes go: (file number, offset in the file).
type Targets = Vec<(usize, u64)>;

/// Writes every file's content; returns the files that failed, with why.
fn write_contents(
    repo: &Repository,
    target: &Path,
    files: &[(PathBuf, Node)],
    progress: &RestoreProgress,
) -> HashMap<usize, String> {
    let damaged: Mutex<HashMap<usize, String>> = Mutex::default();
    let mark = |file: usize, err: String| {
        damaged.lock().expect("damage lock").entry(file).or_insert(err);
    };
    let mut by_pack: HashMap<PackId, Vec<(BlobId, BlobLocation)>> = HashMap::new();
    let mut targets: HashMap<BlobId, Targets> = HashMap::new();
    {
        let index = repo.index();
        for (i, (_, node)) in files.iter().enumerate() {
            let NodeKind::File { chunks } = &node.kind else {
                continue;
            };
            let mut offset = 0u64;
            for c in chunks {
                let Some(loc) = index.get(c) else {
                    mark(i, format!("chunk {c} is missing from the repository"));
                    break;
                };
                let t = targets.entry(*c).or_default();
                if t.is_empty() {
                    by_pack.entry(loc.pack).or_default().push((*c, loc));
                }
                t.push((i, offset));
                offset += u64::from(loc.raw_len);
            }
            if offset != node.size && !damaged.lock().expect("damage lock").contains_key(&i) {
                mark(i, format!("chunk lengths add up to {offset} bytes, the file has {}", node.size));
            }
        }
    }
    let mut packs: Vec<(PackId, Vec<(BlobId, BlobLocation)>)> = by_pack.into_iter().collect();
    packs.sort_by_key(|(p, _)| *p);
    packs.par_iter_mut().for_each(|(pack, blobs)| {
        blobs.sort_by_key(|(_, l)| l.offset);
        for group in coalesce(blobs) {
            let start = u64::from(group[0].1.offset);
            let last = group.last().expect("non-empty group").1;
            let end = u64::from(last.offset) + FRAME_HEADER_LEN as u64 + u64::from(last.stored_len);
            let fail_all = |err: String| {
                for (id, _) in group {
                    for (f, _) in &targets[id] {
                        mark(*f, err.clone());
                    }
                }
            };
            // One read buffer per thread, reused from group to group.
            let mut bytes = READ_BUFFER.take();
            if let Err(e) = repo.backend().get_range_into(&ObjectKey::Pack(*pack), start, end - start, &mut bytes) {
                fail_all(format!("reading pack {pack}: {e}"));
                READ_BUFFER.set(bytes);
                continue;
            }
            for (id, loc) in group {
                let at = (u64::from(loc.offset) - start) as usize;
                let frame = &bytes[at..at + FRAME_HEADER_LEN + loc.stored_len as usize];
                let result = repo.open_frame(id, loc.kind, frame, u64::from(loc.offset), loc.stored_len, loc.raw_len);
                let data = match result {
                    Ok(d) => d,
                    Err(e) => {
                        for (f, _) in &targets[id] {
                            mark(*f, e.to_string());
                        }
                        continue;
                    }
                };
                for (f, off) in &targets[id] {
                    let path = target.join(&files[*f].0);
                    let written = open_for_write(&path, false).and_then(|file| file.write_all_at(&data, *off));
                    match written {
                        Ok(()) => {
                            progress.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => mark(*f, format!("writing: {e}")),
                    }
                }
            }
            READ_BUFFER.set(bytes);
        }
    });
    progress.files.store(files.len() as u64, Ordering::Relaxed);
    damaged.into_inner().expect("damage lock")
}

/// Splits offset-sorted blobs into runs worth one ranged read each.
fn coalesce(blobs: &[(BlobId, BlobLocation)]) -> Vec<&[(BlobId, BlobLocation)]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=blobs.len() {
        let split = i == blobs.len() || {
            let prev = &blobs[i - 1].1;
            let prev_end = u64::from(prev.offset) + FRAME_HEADER_LEN as u64 + u64::from(prev.stored_len);
            let next = &blobs[i].1;
            let next_end = u64::from(next.offset) + FRAME_HEADER_LEN as u64 + u64::from(next.stored_len);
            u64::from(next.offset).saturating_sub(prev_end) > COALESCE_GAP
                || next_end - u64::from(blobs[start].1.offset) > MAX_READ
        };
        if split {
            groups.push(&blobs[start..i]);
            start = i;
        }
    }
    groups
}

fn apply_metadata(path: &Path, node: &Node, is_link: bool, warnings: &mut Vec<String>) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let flags = if is_link { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path; the calls only read it.
    unsafe {
        // Ownership first: chown clears setuid/setgid bits, chmod then sets them.
        if libc::geteuid() == 0 && libc::fchownat(libc::AT_FDCWD, c.as_ptr(), node.uid, node.gid, flags) != 0 {
            warnings.push(format!("{}: chown: {}", path.display(), std::io::Error::last_os_error()));
        }
        if !is_link && libc::chmod(c.as_ptr(), (node.mode & 0o7777) as libc::mode_t) != 0 {
            warnings.push(format!("{}: chmod: {}", path.display(), std::io::Error::last_os_error()));
        }
        let times = [to_timespec(node.mtime), to_timespec(node.mtime)];
        if libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) != 0 {
            warnings.push(format!("{}: set times: {}", path.display(), std::io::Error::last_os_error()));
        }
    }
}

fn to_timespec(t: Timestamp) -> libc::timespec {
    libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long }
}

/// Writes one file of a snapshot (or the byte range `start..end` of it) to
/// `out`, verifying every chunk. Returns the bytes written.
pub fn cat(
    repo: &Repository,
    node: &Node,
    range: Option<(u64, u64)>,
    out: &mut dyn Write,
) -> Result<u64, RestoreError> {
    let NodeKind::File { chunks } = &node.kind else {
        return Err(RestoreError::NotFound(format!("{} is not a file", node.name_lossy())));
    };
    let (start, end) = range.unwrap_or((0, node.size));
    let end = end.min(node.size);
    let mut pos = 0u64;
    let mut written = 0u64;
    for c in chunks {
        if pos >= end {
            break;
        }
        let len = u64::from(repo.index().get(c).ok_or(RepoError::MissingBlob(*c))?.raw_len);
        if pos + len > start {
            let data = repo.read_blob(c)?;
            let from = start.saturating_sub(pos) as usize;
            let to = ((end - pos) as usize).min(data.len());
            out.write_all(&data[from..to]).map_err(|source| RestoreError::Io { path: "<stdout>".into(), source })?;
            written += (to - from) as u64;
        }
        pos += len;
    }
    Ok(written)
}
