//! Copying snapshots from one repository into another (`chunkvault copy`):
//! an off-site copy, from S3 to a local disk and back.
//!
//! Blob ids are keyed by each repository's own id key, so a chunk has
//! another id in the target unless both repositories share their master
//! key (a repository copied byte for byte). Each snapshot's trees are
//! therefore rewritten bottom up through the target's [`WriteSession`]:
//!
//! - **Same chunker parameters** (the configs' `chunker`): a file keeps its
//!   chunk boundaries. Each chunk is read from the source (the one blob
//!   read path, a few chunks at a time), re-encrypted under the target's
//!   key and stored unless the target has it: the session deduplicates.
//!   Where both repositories share their ids, chunks and trees the target
//!   already has are not even read.
//! - **Different parameters**: every file is read through
//!   [`FileReader`] and cut again with the target's chunker, so it
//!   deduplicates with the target's own backups.
//!
//! What makes a second copy cheap: each copied manifest records the id of
//! the snapshot it copies (`original`, kept through copies of copies), so a
//! snapshot already in the target is skipped; and when a snapshot's parent
//! was copied before, the parent's source and target trees are walked
//! beside it, so unchanged directories and files reuse the target's trees
//! and chunks without reading a byte of their content. Within one run,
//! every chunk and tree is translated once.
//!
//! Each snapshot is committed on its own (packs, index segments, then the
//! manifest, ARCHITECTURE.md's commit order), so an interrupted copy keeps
//! the snapshots it finished and the next run goes on from there. The
//! source is only read, without a lock, as `restore` reads it.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::lock::{LockError, LockKind, LockOptions};
use crate::repo::{RepoError, Repository, WriteError, WriteSession};
use crate::restore::{FileReader, RestoreError};
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind, Tree, TreeError};

/// Chunks read from the source in one batch (bounds memory: at most this
/// many chunks of plaintext, 16 average chunks with the default chunker).
const READ_BATCH: usize = 16;

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the source or writing the target failed (damage in the
    /// source is a [`RepoError`] for which `is_damage` holds).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The target's lock could not be taken, or may have lapsed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A rewritten tree is not valid (the source holds a bad one).
    #[error("rewriting a tree: {0}")]
    Tree(#[from] TreeError),
    /// A file could not be read from the source for re-chunking.
    #[error("reading {file} from the source: {source}")]
    Read {
        /// The file's name.
        file: String,
        /// Why.
        source: std::io::Error,
    },
}

impl From<WriteError> for CopyError {
    fn from(e: WriteError) -> Self {
        e.split()
    }
}

/// Settings of a copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Timing of the target's shared lock.
    pub lock: LockOptions,
    /// Threads uploading packs to the target.
    pub uploaders: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions { lock: LockOptions::default(), uploaders: 2 }
    }
}

/// A snapshot copied.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Copied {
    /// Its id in the source.
    pub source: SnapshotId,
    /// The id of the copy in the target.
    pub snapshot: SnapshotId,
    /// The snapshot first taken (the source's, or what the source copied).
    pub original: SnapshotId,
    /// When the original backup was taken.
    pub time: chrono::DateTime<chrono::FixedOffset>,
    /// Its host.
    pub hostname: String,
    /// Its paths.
    pub paths: Vec<String>,
}

/// A snapshot left out because the target has a copy of it already.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    /// Its id in the source.
    pub source: SnapshotId,
    /// The target's snapshot that holds it.
    pub copy: SnapshotId,
}

/// What a copy did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CopyReport {
    /// Snapshots copied, in the order copied (oldest first).
    pub copied: Vec<Copied>,
    /// Snapshots the target had already.
    pub skipped: Vec<Skipped>,
    /// Whether file contents were cut again (the chunker parameters differ).
    pub rechunked: bool,
    /// Bytes of file content read from the source (what unchanged files
    /// and chunks the target has already did not cost).
    pub bytes_read: u64,
    /// Blobs (chunks and trees) the target did not have.
    pub blobs_new: u64,
    /// Their bytes before compression and encryption.
    pub bytes_new: u64,
    /// Their bytes as stored.
    pub bytes_stored: u64,
}

/// Copies `snapshots` of `source` into `target` (oldest first), leaving out
/// those the target holds a copy of already; see the module docs.
pub fn copy(
    source: &Repository,
    target: &Repository,
    snapshots: &[(SnapshotId, Snapshot)],
    opts: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let rechunk = source.config().chunker != target.config().chunker;
    let probe = b"chunkvault copy: do both repositories name blobs alike?";
    let same_ids = !rechunk && source.blob_id(probe) == target.blob_id(probe);
    let mut session = WriteSession::begin(target, LockKind::Shared, opts.lock, opts.uploaders)?;
    // What the target holds, by the snapshot first taken: its own
    // snapshots by their ids, copies by their originals.
    let mut held: HashMap<SnapshotId, (SnapshotId, BlobId)> =
        target.list_snapshots()?.into_iter().map(|(id, s)| (s.original.unwrap_or(id), (id, s.tree))).collect();
    let mut order: Vec<&(SnapshotId, Snapshot)> = snapshots.iter().collect();
    order.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
    let mut tr =
        Translator { source, target, rechunk, same_ids, trees: HashMap::new(), chunks: HashMap::new(), bytes_read: 0 };
    let mut report = CopyReport { rechunked: rechunk, ..CopyReport::default() };
    for (id, snap) in order {
        let original = snap.original.unwrap_or(*id);
        if let Some((copy, _)) = held.get(&original) {
            report.skipped.push(Skipped { source: *id, copy: *copy });
            continue;
        }
        // The parent's copy, if there is one: its trees guide this one's.
        let parent = snap.parent.and_then(|p| source.load_snapshot(&p).ok().map(|ps| (p, ps)));
        let parent_copy = parent.and_then(|(p, ps)| held.get(&ps.original.unwrap_or(p)).map(|c| (ps.tree, *c)));
        let hint = parent_copy.map(|(source_tree, (_, target_tree))| (source_tree, target_tree));
        let tree = tr.tree(&session, snap.tree, hint)?;
        let copied =
            Snapshot { tree, parent: parent_copy.map(|(_, (copy, _))| copy), original: Some(original), ..snap.clone() };
        let written = session.commit_group([&copied])?.into_iter().next().expect("one snapshot, one result")?;
        held.insert(original, (written, tree));
        report.copied.push(Copied {
            source: *id,
            snapshot: written,
            original,
            time: snap.time,
            hostname: snap.hostname.clone(),
            paths: snap.paths.clone(),
        });
    }
    report.bytes_read = tr.bytes_read;
    let stats = session.stats();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    (report.blobs_new, report.bytes_new, report.bytes_stored) =
        (load(&stats.blobs_new), load(&stats.bytes_new), load(&stats.bytes_stored));
    Ok(report)
}

/// A source chunk, and its id in the target with its length (or why it
/// could not be read or stored).
type Saved = (BlobId, Result<(BlobId, u64), RepoError>);

/// Source ids to target ids, translated once per run.
struct Translator<'r> {
    source: &'r Repository,
    target: &'r Repository,
    rechunk: bool,
    same_ids: bool,
    trees: HashMap<BlobId, BlobId>,
    chunks: HashMap<BlobId, BlobId>,
    /// Plaintext bytes of file content read from the source.
    bytes_read: u64,
}

impl Translator<'_> {
    /// The target's id of source tree `src`, storing it (and what it holds)
    /// in the target as needed. `hint`: the same directory in the parent
    /// snapshot, (its source tree, its copy's tree in the target).
    fn tree(&mut self, s: &WriteSession<'_>, src: BlobId, hint: Option<(BlobId, BlobId)>) -> Result<BlobId, CopyError> {
        if let Some(dst) = self.trees.get(&src) {
            return Ok(*dst);
        }
        // A tree is stored after everything below it, in the same commit:
        // a tree the target has comes with its whole subtree.
        let known = match hint {
            Some((hs, hd)) if hs == src => Some(hd),
            _ if self.same_ids => Some(src),
            _ => None,
        };
        if let Some(dst) = known.filter(|d| self.target.index().contains(d)) {
            self.trees.insert(src, dst);
            return Ok(dst);
        }
        let tree = self.source.load_tree(&src)?;
        let hint_trees = match hint {
            Some((hs, hd)) => self.source.load_tree(&hs).ok().zip(self.target.load_tree(&hd).ok()),
            None => None,
        };
        let mut nodes = Vec::with_capacity(tree.nodes().len());
        for node in tree.nodes() {
            let before = hint_trees.as_ref().and_then(|(hs, hd)| hs.find(&node.name).zip(hd.find(&node.name)));
            let kind = match (&node.kind, before.map(|(a, b)| (&a.kind, &b.kind))) {
                (NodeKind::Dir { subtree }, Some((NodeKind::Dir { subtree: hs }, NodeKind::Dir { subtree: hd }))) => {
                    NodeKind::Dir { subtree: self.tree(s, *subtree, Some((*hs, *hd)))? }
                }
                (NodeKind::Dir { subtree }, _) => NodeKind::Dir { subtree: self.tree(s, *subtree, None)? },
                // An unchanged file: the chunks its copy has.
                (NodeKind::File { chunks }, Some((NodeKind::File { chunks: hs }, NodeKind::File { chunks: hd })))
                    if hs == chunks && self.target_has(hd) =>
                {
                    NodeKind::File { chunks: hd.clone() }
                }
                (NodeKind::File { .. }, _) => NodeKind::File { chunks: self.file(s, node)? },
                (other, _) => other.clone(),
            };
            nodes.push(Node { kind, ..node.clone() });
        }
        let (dst, _) = s.save(BlobKind::Tree, &Tree::new(nodes)?.encode())?;
        self.trees.insert(src, dst);
        Ok(dst)
    }

    fn target_has(&self, ids: &[BlobId]) -> bool {
        let index = self.target.index();
        ids.iter().all(|c| index.contains(c))
    }

    /// The target's chunks of a file node of the source.
    fn file(&mut self, s: &WriteSession<'_>, node: &Node) -> Result<Vec<BlobId>, CopyError> {
        let NodeKind::File { chunks } = &node.kind else { unreachable!("called for files only") };
        if self.rechunk {
            let reader = FileReader::new(self.source, node, None).map_err(|e| match e {
                RestoreError::Repo(e) => CopyError::Repo(e),
                other => CopyError::Read { file: node.name_lossy(), source: std::io::Error::other(other) },
            })?;
            let mut out = Vec::new();
            for chunk in self.target.chunker().stream(reader) {
                let chunk = chunk.map_err(|e| CopyError::Read { file: node.name_lossy(), source: chunker_io(e) })?;
                self.bytes_read += chunk.len() as u64;
                out.push(s.save(BlobKind::Data, &chunk)?.0);
            }
            return Ok(out);
        }
        // The chunks not translated yet (with shared ids: not in the target yet).
        let mut todo: Vec<BlobId> = {
            let index = self.target.index();
            chunks
                .iter()
                .filter(|c| !(self.chunks.contains_key(c) || (self.same_ids && index.contains(c))))
                .copied()
                .collect()
        };
        todo.sort_unstable();
        todo.dedup();
        let same_ids = self.same_ids;
        for batch in todo.chunks(READ_BATCH) {
            let read = self.source.read_blob_map(batch.iter().copied());
            let saved: Vec<Saved> = read
                .into_par_iter()
                .map(|(src, plain)| {
                    let dst = plain.and_then(|plain| {
                        let dst = match same_ids {
                            true => s.save_named(BlobKind::Data, src, &plain).map(|_| src),
                            false => s.save(BlobKind::Data, &plain).map(|(dst, _)| dst),
                        };
                        dst.map(|d| (d, plain.len() as u64))
                    });
                    (src, dst)
                })
                .collect();
            for (src, dst) in saved {
                let (dst, len) = dst?;
                self.bytes_read += len;
                self.chunks.insert(src, dst);
            }
        }
        Ok(chunks.iter().map(|c| self.chunks.get(c).copied().unwrap_or(*c)).collect())
    }
}

fn chunker_io(e: crate::chunker::ChunkerError) -> std::io::Error {
    match e {
        crate::chunker::ChunkerError::Io(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup_stream, BackupOptions, NamedFile};
    use crate::test_support::{local_repo, noise, PASSWORD};
    use crate::tree::Timestamp;

    fn open(dir: &std::path::Path) -> Repository {
        let backend = std::sync::Arc::new(crate::backend::LocalBackend::open(dir).unwrap());
        Repository::open(backend, PASSWORD).unwrap()
    }

    fn file<'a>(path: &str, data: &'a [u8]) -> NamedFile<&'a [u8]> {
        NamedFile { path: path.into(), reader: data, mode: 0o644, mtime: Timestamp { sec: 1, nsec: 0 } }
    }

    /// A repository copied byte for byte shares its key: blob ids mean the
    /// same in both, so only the blobs the target lacks are read, and a
    /// snapshot both have (same id) is not copied.
    #[test]
    fn repositories_sharing_a_key_copy_only_the_blobs_the_target_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let source = local_repo(&a);
        let big = noise(5 << 20, 1);
        let (first, _) = backup_stream(&source, [file("big", &big)], &BackupOptions::default()).unwrap();
        assert!(std::process::Command::new("cp").arg("-a").arg(&a).arg(&b).status().unwrap().success());
        let small = noise(1000, 2);
        let (second, snap) =
            backup_stream(&source, [file("big", &big), file("small", &small)], &BackupOptions::default()).unwrap();
        let target = open(&b);

        let all = crate::select::list(&source, &Default::default()).unwrap();
        let report = copy(&source, &target, &all, &CopyOptions::default()).unwrap();
        assert!(!report.rechunked);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!((report.skipped[0].source, report.skipped[0].copy), (first, first));
        assert_eq!(report.copied.len(), 1);
        assert_eq!(report.copied[0].source, second);
        assert_eq!(report.bytes_read, small.len() as u64, "the big file's chunks were there");

        // Same key, same tree bytes: the copy's root is the original's.
        let (_, copied) = target.find_snapshot(&report.copied[0].snapshot.to_hex()).unwrap();
        assert_eq!(copied.tree, snap.tree);
        assert_eq!(copied.original, Some(second));
        for (name, data) in [("big", &big), ("small", &small)] {
            let node = target.find_node(&copied.tree, name).unwrap().unwrap();
            let mut out = Vec::new();
            crate::restore::cat(&target, &node, None, &mut out).unwrap();
            assert!(out == *data, "{name}");
        }
        let again = copy(&source, &target, &all, &CopyOptions::default()).unwrap();
        assert!(again.copied.is_empty() && again.blobs_new == 0);
    }
}
