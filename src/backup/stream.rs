//! Backing up a stream of named files that are not on a local filesystem
//! (an embedder's own data, an archive being imported).

use std::collections::BTreeMap;
use std::io::Read;

use super::{begin_session, save_tree, BackupError, BackupOptions};
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::repo::{Repository, WriteSession};
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{validate_name, Node, NodeKind, Timestamp};

/// One file of a stream backup.
pub struct NamedFile<R> {
    /// Slash-separated path inside the snapshot, e.g. `photos/2026/a.jpg`.
    pub path: String,
    /// The file's content, read to its end once; a read error fails the
    /// whole backup ([`BackupError::Source`]).
    pub reader: R,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Modification time recorded (and used as ctime too).
    pub mtime: Timestamp,
}

/// Files placed at slash-separated paths, saved as trees bottom up. Shared by
/// stream backups and the server's snapshot commit.
#[derive(Default)]
pub struct FileTree {
    dirs: BTreeMap<Vec<u8>, FileTree>,
    files: Vec<Node>,
    /// This directory's own node (mode, owner, times), if one was given.
    meta: Option<Node>,
}

impl FileTree {
    /// Places a file or symlink node at `path`, or, for a directory node,
    /// sets that directory's metadata; missing directories are created.
    pub fn insert(&mut self, path: &str, mut node: Node) -> Result<(), BackupError> {
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let Some(mut name) = parts.next() else {
            return Err(BackupError::NoPaths(format!("empty path {path:?}")));
        };
        let mut dir = self;
        // Every component but the last is a directory; a commit of many
        // files walks existing directories, so a name is copied only when
        // its directory is new.
        for next in parts {
            validate_name(name.as_bytes())?;
            if !dir.dirs.contains_key(name.as_bytes()) {
                dir.dirs.insert(name.as_bytes().to_vec(), FileTree::default());
            }
            dir = dir.dirs.get_mut(name.as_bytes()).expect("inserted above");
            name = next;
        }
        validate_name(name.as_bytes())?;
        node.name = name.as_bytes().to_vec();
        if node.is_dir() {
            let entry = dir.dirs.entry(node.name.clone()).or_default();
            entry.meta = Some(node);
        } else {
            dir.files.push(node);
        }
        Ok(())
    }

    /// Adds what `later` holds as if its inserts had come after this tree's
    /// (files appended, a directory's metadata replaced where `later` has
    /// it), so that trees built from consecutive slices of a manifest on
    /// several cores merge into the tree one pass would build. Without
    /// recursion: paths may be 2,048 levels deep.
    pub fn merge(&mut self, later: FileTree) {
        use std::collections::btree_map::Entry;
        let mut todo = vec![(self, later)];
        while let Some((into, from)) = todo.pop() {
            into.files.extend(from.files);
            if from.meta.is_some() {
                into.meta = from.meta;
            }
            // Directories both have are merged below; the rest move over.
            let mut both = BTreeMap::new();
            for (name, sub) in from.dirs {
                match into.dirs.entry(name) {
                    Entry::Occupied(o) => {
                        both.insert(o.key().clone(), sub);
                    }
                    Entry::Vacant(v) => {
                        v.insert(sub);
                    }
                }
            }
            if !both.is_empty() {
                for (name, child) in into.dirs.iter_mut() {
                    if let Some(sub) = both.remove(name) {
                        todo.push((child, sub));
                    }
                }
            }
        }
    }

    /// Saves every tree blob and returns the root's id; counts the
    /// directories into `summary`. Directories without metadata of their
    /// own get mode 0755 and the current time.
    ///
    /// Level by level from the deepest, each level's trees on all cores (a
    /// device's commit names tens of thousands of files), and without
    /// recursion: a manifest's paths may be 2,048 levels deep, and a
    /// recursive save (rayon's frames at every level) overflowed a stack.
    pub fn save(self, session: &WriteSession<'_>, summary: &mut Summary) -> Result<BlobId, BackupError> {
        use rayon::prelude::*;
        let now = Timestamp { sec: chrono::Utc::now().timestamp(), nsec: 0 };
        // Every directory once, parents before children, with its depth.
        let mut flat: Vec<(usize, SavedDir)> = Vec::new();
        let mut todo = vec![(None, 0, Vec::new(), self)];
        while let Some((parent, depth, name, mut tree)) = todo.pop() {
            let index = flat.len();
            for (child, sub) in std::mem::take(&mut tree.dirs) {
                todo.push((Some(index), depth + 1, child, sub));
            }
            flat.push((
                depth,
                SavedDir { parent, name, meta: tree.meta.take(), nodes: std::mem::take(&mut tree.files) },
            ));
        }
        summary.dirs += flat.len() as u64 - 1;
        let deepest = flat.iter().map(|(depth, _)| *depth).max().unwrap_or(0);
        let mut levels: Vec<Vec<SavedDir>> = (0..=deepest).map(|_| Vec::new()).collect();
        let mut slot = Vec::with_capacity(flat.len());
        for (depth, dir) in flat {
            // A directory's place in its level, for its children to find it.
            slot.push((depth, levels[depth].len()));
            levels[depth].push(dir);
        }
        // The level below, saved: each directory (its nodes gone) and its tree id.
        let mut saved_below: Vec<(SavedDir, BlobId)> = Vec::new();
        while let Some(mut level) = levels.pop() {
            for (dir, subtree) in saved_below.drain(..) {
                let (_, at) = slot[dir.parent.expect("only the root has no parent, and it is saved last")];
                let default = stream_node(NodeKind::Dir { subtree }, 0o755, now, 0);
                let node = Node { name: dir.name, kind: NodeKind::Dir { subtree }, ..dir.meta.unwrap_or(default) };
                level[at].nodes.push(node);
            }
            saved_below = level
                .into_par_iter()
                .map(|mut dir| {
                    let id = save_tree(session, std::mem::take(&mut dir.nodes))?;
                    Ok((dir, id))
                })
                .collect::<Result<_, BackupError>>()?;
        }
        let (_, root) = saved_below.pop().expect("the root level holds the root");
        Ok(root)
    }
}

/// A directory of a [`FileTree`] on its way to being saved.
struct SavedDir {
    /// Its parent's index in the flattened tree (`None` for the root).
    parent: Option<usize>,
    name: Vec<u8>,
    meta: Option<Node>,
    /// Its files, then its subdirectories once they are saved.
    nodes: Vec<Node>,
}

/// Backs up the files an iterator yields into one snapshot whose root holds
/// them at their paths. Intermediate directories are created with mode 0755.
///
/// Blocks until the snapshot is durable; holds a shared lock throughout,
/// like [`backup`](super::backup). Files are read one at a time in the
/// iterator's order. A file given twice at one path is stored twice and
/// refused when its tree is built ([`BackupError::Tree`]); nothing is
/// committed on any error.
pub fn backup_stream<R: Read>(
    repo: &Repository,
    files: impl IntoIterator<Item = NamedFile<R>>,
    opts: &BackupOptions,
) -> Result<(SnapshotId, Snapshot), BackupError> {
    let started = std::time::Instant::now();
    let time = chrono::Local::now().fixed_offset();
    let mut session = begin_session(repo, opts)?;
    let mut root = FileTree::default();
    let mut summary = Summary::default();
    for file in files {
        let mut chunks = Vec::new();
        let mut size = 0u64;
        for chunk in repo.chunker().stream(file.reader) {
            let chunk =
                chunk.map_err(|e| BackupError::Source { path: file.path.clone().into(), source: chunker_io(e) })?;
            size += chunk.len() as u64;
            chunks.push(session.save(BlobKind::Data, &chunk)?.0);
        }
        summary.files_new += 1;
        summary.total_bytes += size;
        summary.bytes_read += size;
        root.insert(&file.path, stream_node(NodeKind::File { chunks }, file.mode, file.mtime, size))?;
    }
    let tree = root.save(&session, &mut summary)?;
    let stats = session.stats();
    session.flush()?;
    summary.blobs_new = stats.blobs_new.load(std::sync::atomic::Ordering::Relaxed);
    summary.bytes_new = stats.bytes_new.load(std::sync::atomic::Ordering::Relaxed);
    summary.bytes_stored = stats.bytes_stored.load(std::sync::atomic::Ordering::Relaxed);
    summary.duration_secs = started.elapsed().as_secs_f64();
    let username = crate::snapshot::current_user();
    let origin = StreamOrigin {
        hostname: opts.hostname.clone().unwrap_or_else(crate::snapshot::current_host),
        username,
        tenant: opts.tenant.clone(),
        user: opts.user.clone(),
        device: opts.device.clone(),
        tags: opts.tags.clone(),
        paths: vec!["/".into()],
    };
    let snapshot = origin.snapshot(time, tree, summary);
    let id = session.commit(&snapshot)?.expect("a backup session is not a dry run");
    Ok((id, snapshot))
}

/// The node of an entry that comes from a stream rather than a filesystem
/// (a stream backup, a device's commit): no owner, no inode, ctime = mtime;
/// the permission bits of `mode` are kept and its type bits follow `kind`
/// (a directory's subtree is filled in when its tree is saved).
pub fn stream_node(kind: NodeKind, mode: u32, mtime: Timestamp, size: u64) -> Node {
    let type_bits = match kind {
        NodeKind::File { .. } => 0o100000,
        NodeKind::Dir { .. } => 0o040000,
        NodeKind::Symlink { .. } => 0o120000,
        // A stream names no fifo or device; should one come, `mode` says which.
        NodeKind::Special { .. } => mode & 0o170000,
    };
    Node {
        name: Vec::new(),
        kind,
        mode: type_bits | (mode & 0o7777),
        uid: 0,
        gid: 0,
        mtime,
        ctime: mtime,
        inode: 0,
        size,
        extra: crate::tree::NodeExtra::default(),
    }
}

/// Who and what a stream snapshot records: a stream backup's options, or a
/// device's commit on the storage node.
pub struct StreamOrigin {
    /// Host name recorded.
    pub hostname: String,
    /// User name recorded (the operating system's, or the device's user).
    pub username: String,
    /// Tenant, user and device (server backups).
    pub tenant: Option<String>,
    /// See `tenant`.
    pub user: Option<String>,
    /// See `tenant`.
    pub device: Option<String>,
    /// Tags recorded.
    pub tags: Vec<String>,
    /// Paths recorded.
    pub paths: Vec<String>,
}

impl StreamOrigin {
    /// The snapshot of the root tree `tree`, taken at `time` (no parent).
    pub fn snapshot(self, time: chrono::DateTime<chrono::FixedOffset>, tree: BlobId, summary: Summary) -> Snapshot {
        Snapshot {
            time,
            hostname: self.hostname,
            username: self.username,
            tenant: self.tenant,
            user: self.user,
            device: self.device,
            tags: self.tags,
            paths: self.paths,
            tree,
            parent: None,
            original: None,
            summary,
            program_version: format!("chunkvault {}", env!("CARGO_PKG_VERSION")),
        }
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
    use crate::lock::{LockKind, LockOptions};
    use crate::test_support::local_repo;

    fn file(size: u64) -> Node {
        stream_node(NodeKind::File { chunks: Vec::new() }, 0o640, Timestamp { sec: 7, nsec: 0 }, size)
    }

    #[test]
    fn the_deepest_paths_a_manifest_allows_save_without_exhausting_a_stack() {
        // 2,048 levels (a 4 KiB path of one-letter names), as one chain and
        // as two chains at every level (so every level splits), saved from
        // a thread with the default 2 MiB stack like the tenant writer.
        let dir = tempfile::tempdir().unwrap();
        let repo = local_repo(dir.path());
        let depth = crate::api::MAX_MANIFEST_PATH / 2;
        let chain = vec!["a"; depth - 1].join("/");
        let mut root = FileTree::default();
        root.insert(&format!("{chain}/f"), file(1)).unwrap();
        for d in 1..200 {
            let fork = vec!["a"; d].join("/");
            root.insert(&format!("{fork}/b/f"), file(2)).unwrap();
        }
        let session = WriteSession::begin(&repo, LockKind::Shared, LockOptions::default(), 1).unwrap();
        let dirs = std::thread::scope(|s| {
            let saved = std::thread::Builder::new().stack_size(2 << 20).spawn_scoped(s, || {
                // A commit refused after its tree was built drops it unsaved.
                let mut unsaved = FileTree::default();
                unsaved.insert(&format!("{chain}/f"), file(1)).unwrap();
                drop(unsaved);
                let mut summary = Summary::default();
                root.save(&session, &mut summary).map(|_| summary.dirs)
            });
            saved.unwrap().join().unwrap().unwrap()
        });
        assert_eq!(dirs, (depth - 1 + 199) as u64);
    }

    #[test]
    fn a_tree_of_many_directories_saves_every_level_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let repo = local_repo(dir.path());
        let mut root = FileTree::default();
        // 4 top directories of 5 subdirectories of 6 files each, and a file
        // at the root; one directory with its own metadata.
        for a in 0..4 {
            for b in 0..5 {
                for c in 0..6 {
                    root.insert(&format!("d{a}/s{b}//f{c}"), file(c)).unwrap();
                }
            }
        }
        root.insert("top", file(1)).unwrap();
        let meta = stream_node(NodeKind::Dir { subtree: BlobId([0; 32]) }, 0o700, Timestamp { sec: 9, nsec: 0 }, 0);
        root.insert("d2/s3", meta).unwrap();
        assert!(matches!(root.insert("", file(1)), Err(BackupError::NoPaths(_))));
        assert!(root.insert("d1/../x", file(1)).is_err(), "a name that is not a plain component is refused");

        let mut session = WriteSession::begin(&repo, LockKind::Shared, LockOptions::default(), 1).unwrap();
        let mut summary = Summary::default();
        let id = root.save(&session, &mut summary).unwrap();
        session.flush().unwrap();
        assert_eq!(summary.dirs, 4 + 4 * 5);
        let top = repo.load_tree(&id).unwrap();
        let names: Vec<&[u8]> = top.nodes().iter().map(|n| n.name.as_slice()).collect();
        assert_eq!(names, [&b"d0"[..], b"d1", b"d2", b"d3", b"top"]);
        for a in 0..4 {
            for b in 0..5 {
                for c in 0..6u64 {
                    let node = repo.find_node(&id, &format!("d{a}/s{b}/f{c}")).unwrap().unwrap();
                    assert_eq!((node.size, node.mode & 0o7777), (c, 0o640));
                }
            }
        }
        let s3 = repo.find_node(&id, "d2/s3").unwrap().unwrap();
        assert_eq!((s3.mode & 0o7777, s3.mtime.sec), (0o700, 9));
        assert_eq!(repo.find_node(&id, "d2/s2").unwrap().unwrap().mode & 0o7777, 0o755);
    }
    /// Every directory (path, metadata, files in order), depth first.
    fn listing(tree: &FileTree, path: String, out: &mut Vec<(String, Option<Node>, Vec<Node>)>) {
        out.push((path.clone(), tree.meta.clone(), tree.files.clone()));
        for (name, sub) in &tree.dirs {
            listing(sub, format!("{path}/{}", String::from_utf8_lossy(name)), out);
        }
    }

    proptest::proptest! {
        /// Trees built from consecutive slices of a manifest and merged in
        /// order are the tree one pass builds: same directories, files in
        /// the same order, the last metadata given for a directory.
        #[test]
        fn slices_merged_in_order_are_the_tree_one_pass_builds(
            entries in proptest::collection::vec(("[ab]{1,2}(/[ab]{1,2}){0,3}", proptest::bool::ANY, 0u64..4), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..4),
        ) {
            let node = |is_dir: bool, size: u64| {
                let kind = if is_dir { NodeKind::Dir { subtree: BlobId([0; 32]) } } else { NodeKind::File { chunks: Vec::new() } };
                stream_node(kind, 0o700 + size as u32, Timestamp { sec: size as i64, nsec: 0 }, if is_dir { 0 } else { size })
            };
            let mut whole = FileTree::default();
            for (path, is_dir, size) in &entries {
                whole.insert(path, node(*is_dir, *size)).unwrap();
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(entries.len())).collect();
            cuts.push(0);
            cuts.push(entries.len());
            cuts.sort_unstable();
            let mut merged = FileTree::default();
            for w in cuts.windows(2) {
                let mut part = FileTree::default();
                for (path, is_dir, size) in &entries[w[0]..w[1]] {
                    part.insert(path, node(*is_dir, *size)).unwrap();
                }
                merged.merge(part);
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            listing(&whole, String::new(), &mut a);
            listing(&merged, String::new(), &mut b);
            proptest::prop_assert_eq!(a, b);
        }
    }
}
