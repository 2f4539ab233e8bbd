//! Backing up a stream of named files that are not on a local filesystem
//! (an embedder's own data, an archive being imported).

use std::collections::BTreeMap;
use std::io::Read;

use super::{lock_for_backup, save_tree, BackupError, BackupOptions};
use crate::id::{BlobId, BlobKind, SnapshotId};
use crate::packer::Packer;
use crate::repo::Repository;
use crate::snapshot::{Snapshot, Summary};
use crate::tree::{validate_name, Node, NodeKind, Timestamp};

/// One file of a stream backup.
pub struct NamedFile<R> {
    /// Slash-separated path inside the snapshot, e.g. `photos/2026/a.jpg`.
    pub path: String,
    pub reader: R,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
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
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(BackupError::NoPaths(format!("empty path {path:?}")));
        };
        let mut dir = self;
        for d in dirs {
            validate_name(d.as_bytes())?;
            dir = dir.dirs.entry(d.as_bytes().to_vec()).or_default();
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

    /// Saves every tree blob and returns the root's id; counts the
    /// directories into `summary`. Directories without metadata of their
    /// own get mode 0755 and the current time.
    pub fn save(self, packer: &Packer<'_>, summary: &mut Summary) -> Result<BlobId, BackupError> {
        let mut nodes = self.files;
        let now = Timestamp { sec: chrono::Utc::now().timestamp(), nsec: 0 };
        for (name, mut sub) in self.dirs {
            let meta = sub.meta.take();
            let subtree = sub.save(packer, summary)?;
            summary.dirs += 1;
            let default = Node {
                name: Vec::new(),
                kind: NodeKind::Dir { subtree },
                mode: 0o040755,
                uid: 0,
                gid: 0,
                mtime: now,
                ctime: now,
                inode: 0,
                size: 0,
                extra: crate::tree::NodeExtra::default(),
            };
            nodes.push(Node { name, kind: NodeKind::Dir { subtree }, ..meta.unwrap_or(default) });
        }
        save_tree(packer, nodes)
    }
}

/// Backs up the files an iterator yields into one snapshot whose root holds
/// them at their paths. Intermediate directories are created with mode 0755.
pub fn backup_stream<R: Read>(
    repo: &Repository,
    files: impl IntoIterator<Item = NamedFile<R>>,
    opts: &BackupOptions,
) -> Result<(SnapshotId, Snapshot), BackupError> {
    let started = std::time::Instant::now();
    let time = chrono::Local::now().fixed_offset();
    let lock = lock_for_backup(repo, opts)?;
    let packer = Packer::new(repo, opts.uploaders);
    let mut root = FileTree::default();
    let mut summary = Summary::default();
    for file in files {
        let mut chunks = Vec::new();
        let mut size = 0u64;
        for chunk in repo.chunker().stream(file.reader) {
            let chunk =
                chunk.map_err(|e| BackupError::Source { path: file.path.clone().into(), source: chunker_io(e) })?;
            size += chunk.len() as u64;
            chunks.push(packer.save(BlobKind::Data, &chunk)?.0);
        }
        summary.files_new += 1;
        summary.total_bytes += size;
        summary.bytes_read += size;
        let node = Node {
            name: Vec::new(),
            kind: NodeKind::File { chunks },
            mode: 0o100000 | (file.mode & 0o7777),
            uid: 0,
            gid: 0,
            mtime: file.mtime,
            ctime: file.mtime,
            inode: 0,
            size,
            extra: crate::tree::NodeExtra::default(),
        };
        root.insert(&file.path, node)?;
    }
    let tree = root.save(&packer, &mut summary)?;
    let stats = packer.stats();
    packer.finish()?;
    summary.blobs_new = stats.blobs_new.load(std::sync::atomic::Ordering::Relaxed);
    summary.bytes_new = stats.bytes_new.load(std::sync::atomic::Ordering::Relaxed);
    summary.bytes_stored = stats.bytes_stored.load(std::sync::atomic::Ordering::Relaxed);
    summary.duration_secs = started.elapsed().as_secs_f64();
    let username = crate::snapshot::current_user();
    let snapshot = Snapshot {
        time,
        hostname: opts.hostname.clone().unwrap_or_else(crate::snapshot::current_host),
        username,
        tenant: opts.tenant.clone(),
        user: opts.user.clone(),
        device: opts.device.clone(),
        tags: opts.tags.clone(),
        paths: vec!["/".into()],
        tree,
        parent: None,
        summary,
        program_version: format!("chunkvault {}", env!("CARGO_PKG_VERSION")),
    };
    lock.check()?;
    let id = repo.save_snapshot(&snapshot)?;
    Ok((id, snapshot))
}

fn chunker_io(e: crate::chunker::ChunkerError) -> std::io::Error {
    match e {
        crate::chunker::ChunkerError::Io(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}
