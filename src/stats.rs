//! Repository statistics (`stats`) and the difference of two snapshots (`diff`).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::id::BlobId;
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::{walk, Node, NodeKind};

/// Sizes and counts of a repository.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Snapshots counted (unreadable ones are skipped by [`stats`]).
    pub snapshots: u64,
    /// Bytes of file content over every snapshot (what restoring them all writes).
    pub logical_bytes: u64,
    /// Distinct data chunks the snapshots use.
    pub chunks: u64,
    /// Plaintext bytes of those distinct chunks.
    pub chunk_bytes: u64,
    /// Distinct trees the snapshots reach.
    pub trees: u64,
    /// Stored (compressed, sealed) bytes of the used chunks.
    pub chunk_stored_bytes: u64,
    /// Pack files in storage (the whole repository's, whatever the snapshots).
    pub packs: u64,
    /// Bytes of every pack on storage (including unused data prune would free).
    pub pack_bytes: u64,
    /// logical_bytes / chunk_bytes (1.0 when there are no chunks).
    pub dedup_ratio: f64,
    /// chunk_bytes / chunk_stored_bytes (1.0 when there are no chunks).
    pub compression_ratio: f64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Statistics of every readable snapshot. Walks every distinct tree once
/// (shared subtrees are counted, and read, once); blocks on those reads.
///
/// Fails on storage errors and on damage: an unreadable tree, or a chunk
/// that is not in the index ([`RepoError::MissingBlob`]).
pub fn stats(repo: &Repository) -> Result<Stats, RepoError> {
    stats_of(repo, &repo.list_snapshots()?)
}

/// [`stats`] of some snapshots only (the packs are the whole repository's).
pub fn stats_of(repo: &Repository, snapshots: &[(crate::id::SnapshotId, Snapshot)]) -> Result<Stats, RepoError> {
    let mut s = Stats { snapshots: snapshots.len() as u64, ..Stats::default() };
    // Per distinct tree: the bytes of its own files and its subtrees, so that
    // each snapshot's logical size is summed without reading a tree twice.
    let mut trees: HashMap<BlobId, (u64, Vec<BlobId>)> = HashMap::new();
    let mut seen_chunks = HashSet::new();
    for (_, snap) in snapshots {
        if trees.contains_key(&snap.tree) {
            continue;
        }
        trees.insert(snap.tree, (0, Vec::new()));
        let mut entries = walk(repo, &snap.tree);
        while let Some(entry) = entries.next() {
            let (_, node) = entry.map_err(|e| e.source)?;
            let parent = entries.parent_tree().expect("an entry is inside a tree");
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    trees.get_mut(&parent).expect("parent walked").1.push(*subtree);
                    if trees.contains_key(subtree) {
                        entries.skip_subtree();
                    } else {
                        trees.insert(*subtree, (0, Vec::new()));
                    }
                }
                NodeKind::File { chunks } => {
                    trees.get_mut(&parent).expect("parent walked").0 += node.size;
                    for c in chunks {
                        if seen_chunks.insert(*c) {
                            let loc = repo.index().get(c).ok_or(RepoError::MissingBlob(*c))?;
                            s.chunks += 1;
                            s.chunk_bytes += u64::from(loc.raw_len);
                            s.chunk_stored_bytes += u64::from(loc.stored_len);
                        }
                    }
                }
                NodeKind::Symlink { .. } | NodeKind::Special { .. } => {}
            }
        }
    }
    s.trees = trees.len() as u64;
    let mut totals = HashMap::with_capacity(trees.len());
    for (_, snap) in snapshots {
        s.logical_bytes += logical_size(&snap.tree, &trees, &mut totals);
    }
    let packs = repo.pack_sizes()?;
    s.packs = packs.len() as u64;
    s.pack_bytes = packs.values().sum();
    s.dedup_ratio = ratio(s.logical_bytes, s.chunk_bytes);
    s.compression_ratio = ratio(s.chunk_bytes, s.chunk_stored_bytes);
    Ok(s)
}

/// The bytes of every file below `tree`, from the per-tree sums `stats`
/// gathered (in memory; each tree's total is computed once).
fn logical_size(tree: &BlobId, trees: &HashMap<BlobId, (u64, Vec<BlobId>)>, totals: &mut HashMap<BlobId, u64>) -> u64 {
    if let Some(n) = totals.get(tree) {
        return *n;
    }
    let (own, subtrees) = &trees[tree];
    let total = own + subtrees.iter().map(|t| logical_size(t, trees, totals)).sum::<u64>();
    totals.insert(*tree, total);
    total
}

/// How an entry differs between two snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Only in the second snapshot (a new directory is listed, its
    /// content below it too).
    Added,
    /// Only in the first snapshot (likewise with a directory's content).
    Removed,
    /// Content (or the kind of entry, or a symlink's target) changed.
    Modified,
    /// Same content; mode, owner or mtime changed.
    MetadataChanged,
}

/// One difference, at a slash-separated path inside the snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `/`-separated from the snapshots' root, with a leading `/`; names
    /// that are not UTF-8 are shown lossily.
    pub path: String,
    /// How the entry differs.
    pub change: Change,
}

/// The differences from snapshot `a` to snapshot `b`, in path order.
/// Subtrees with equal ids are skipped without being read.
pub fn diff(repo: &Repository, a: &Snapshot, b: &Snapshot) -> Result<Vec<Difference>, RepoError> {
    let mut out = Vec::new();
    diff_trees(repo, Some(a.tree), Some(b.tree), "", &mut out)?;
    Ok(out)
}

fn diff_trees(
    repo: &Repository,
    a: Option<BlobId>,
    b: Option<BlobId>,
    prefix: &str,
    out: &mut Vec<Difference>,
) -> Result<(), RepoError> {
    if a == b {
        return Ok(());
    }
    let load = |id: Option<BlobId>| -> Result<Vec<Node>, RepoError> {
        Ok(match id {
            Some(id) => repo.load_tree(&id)?.nodes().to_vec(),
            None => Vec::new(),
        })
    };
    let (na, nb) = (load(a)?, load(b)?);
    // Both listings are sorted by name: merge them.
    let (mut i, mut j) = (0, 0);
    while i < na.len() || j < nb.len() {
        let order = match (na.get(i), nb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        let (x, y) = match order {
            std::cmp::Ordering::Less => (na.get(i), None),
            std::cmp::Ordering::Greater => (None, nb.get(j)),
            std::cmp::Ordering::Equal => (na.get(i), nb.get(j)),
        };
        i += usize::from(x.is_some());
        j += usize::from(y.is_some());
        let name = x.or(y).expect("one side").name_lossy();
        let path = format!("{prefix}/{name}");
        let subtree = |n: Option<&Node>| match n.map(|n| &n.kind) {
            Some(NodeKind::Dir { subtree }) => Some(*subtree),
            _ => None,
        };
        match (x, y) {
            (Some(_), None) => out.push(Difference { path: path.clone(), change: Change::Removed }),
            (None, Some(_)) => out.push(Difference { path: path.clone(), change: Change::Added }),
            (Some(x), Some(y)) => {
                let same_meta = (x.mode, x.uid, x.gid, x.mtime) == (y.mode, y.uid, y.gid, y.mtime);
                let same_content = match (&x.kind, &y.kind) {
                    (NodeKind::Dir { .. }, NodeKind::Dir { .. }) => true,
                    (a, b) => a == b,
                };
                if !same_content {
                    out.push(Difference { path: path.clone(), change: Change::Modified });
                } else if !same_meta {
                    out.push(Difference { path: path.clone(), change: Change::MetadataChanged });
                }
            }
            (None, None) => unreachable!("the merge advances at least one side"),
        }
        // Everything below an added or removed directory is listed too.
        if subtree(x).is_some() || subtree(y).is_some() {
            diff_trees(repo, subtree(x), subtree(y), &path, out)?;
        }
    }
    Ok(())
}
