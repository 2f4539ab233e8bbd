//! Prune: delete the data no snapshot needs, without ever making a
//! committed snapshot unrestorable.
//!
//! Under an exclusive lock: mark every blob reachable from every snapshot,
//! then sort every pack in storage into *keep* (little garbage), *repack*
//! (garbage above the threshold: its live blobs are copied into new packs),
//! or *delete* (nothing live, or not indexed at all). The order of writes is
//! the safety argument (ARCHITECTURE.md, "Prune"):
//!
//! 1. new packs (repacked blobs), then their index segments, durable;
//! 2. new index segments naming every kept pack, durable;
//! 3. only then delete the old index segments;
//! 4. only then delete the obsolete packs.
//!
//! A crash anywhere leaves an index whose every segment names existing packs
//! and covers every live blob: at worst duplicates or garbage that the next
//! prune removes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::ObjectKey;
use crate::id::{BlobId, IndexId, PackId, SnapshotId};
use crate::index::{IndexSegment, PackEntries};
use crate::lock::{LockError, LockKind, LockOptions};
use crate::pack::FRAME_HEADER_LEN;
use crate::packer::{Packer, PACKS_PER_SEGMENT};
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::NodeKind;

/// Why prune stopped (before deleting anything, unless storage failed midway,
/// which the write order makes harmless).
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("refusing to prune: {0} (run `chunkvault check`; `repair index` or `repair snapshots` may help)")]
    Damaged(String),
}

impl From<crate::backend::BackendError> for PruneError {
    fn from(e: crate::backend::BackendError) -> Self {
        PruneError::Repo(e.into())
    }
}

/// Options of a prune.
#[derive(Clone, Copy, Debug)]
pub struct PruneOptions {
    /// A pack whose unused bytes exceed this percentage of it is repacked.
    pub max_unused_percent: f64,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    pub lock: LockOptions,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { max_unused_percent: 10.0, dry_run: false, lock: LockOptions::default() }
    }
}

/// What prune is doing, for a progress display.
#[derive(Debug, Default)]
pub struct PruneProgress {
    pub phase: Mutex<String>,
}

impl PruneProgress {
    fn set(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.into();
    }
}

/// What prune found and did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub blobs_used: u64,
    pub blobs_unused: u64,
    pub packs_total: u64,
    pub packs_kept: u64,
    pub packs_repacked: u64,
    /// Packs holding nothing live, deleted whole.
    pub packs_unused: u64,
    /// Packs no index names (left by interrupted backups), deleted.
    pub packs_unindexed: u64,
    pub packs_written: u64,
    pub bytes_before: u64,
    pub bytes_unused_before: u64,
    pub bytes_repacked: u64,
    pub bytes_after: u64,
    pub index_segments_written: u64,
    pub index_segments_deleted: u64,
}

/// Every blob (trees and data) reachable from `snapshots`. A tree that
/// cannot be loaded is an error: what it references is unknown.
pub fn reachable_blobs(repo: &Repository, snapshots: &[(SnapshotId, Snapshot)]) -> Result<HashSet<BlobId>, RepoError> {
    let mut used: HashSet<BlobId> = HashSet::new();
    let mut stack: Vec<BlobId> = snapshots.iter().map(|(_, s)| s.tree).collect();
    while let Some(tree_id) = stack.pop() {
        if !used.insert(tree_id) {
            continue;
        }
        for node in repo.load_tree(&tree_id)?.nodes() {
            match &node.kind {
                NodeKind::Dir { subtree } => stack.push(*subtree),
                NodeKind::File { chunks } => used.extend(chunks.iter().copied()),
                NodeKind::Symlink { .. } | NodeKind::Special { .. } => {}
            }
        }
    }
    Ok(used)
}

/// What to do with one pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Keep,
    Repack,
    Delete,
}

/// Prunes `repo`; see the module docs.
pub fn prune(repo: &Repository, opts: &PruneOptions, progress: &PruneProgress) -> Result<PruneReport, PruneError> {
    let lock = repo.lock(LockKind::Exclusive, opts.lock)?;
    let mut report = PruneReport { dry_run: opts.dry_run, ..PruneReport::default() };

    progress.set("loading index");
    let segment_ids: Vec<IndexId> = crate::backend::index_ids(repo.backend().as_ref())?;
    let segments: Vec<(IndexId, Result<IndexSegment, RepoError>)> =
        segment_ids.par_iter().map(|id| (*id, repo.load_index_segment(id))).collect();
    let sizes: HashMap<PackId, u64> = crate::backend::pack_sizes(repo.backend().as_ref())?;
    // Each existing pack's entries, from the first readable segment naming it.
    // Unreadable segments are replaced like the rest; if they held the only
    // location of a live blob, marking below finds it missing and stops.
    let mut packs: HashMap<PackId, PackEntries> = HashMap::new();
    let mut unreadable_segments = 0;
    // Entries naming packs that are gone (lost, or deleted by hand): the
    // rewritten index leaves them out.
    let mut dangling = 0;
    for (id, segment) in segments {
        match segment {
            Ok(s) => {
                for p in s.packs {
                    if sizes.contains_key(&p.pack) {
                        packs.entry(p.pack).or_insert(p);
                    } else {
                        dangling += 1;
                    }
                }
            }
            Err(RepoError::Backend(e)) if !e.is_not_found() => return Err(RepoError::Backend(e).into()),
            Err(e) => {
                tracing::warn!("index segment {id} is unreadable and will be replaced: {e}");
                unreadable_segments += 1;
            }
        }
    }
    repo.reload_index()?;

    progress.set("marking used blobs");
    let snapshots = list_all_snapshots(repo)?;
    report.snapshots = snapshots.len() as u64;
    let used = reachable_blobs(repo, &snapshots).map_err(|e| PruneError::Damaged(e.to_string()))?;

    // One home per live blob: the first existing pack (in id order) holding it.
    let mut pack_ids: Vec<PackId> = packs.keys().copied().collect();
    pack_ids.sort();
    let mut home: HashMap<BlobId, PackId> = HashMap::with_capacity(used.len());
    for pack in &pack_ids {
        for b in &packs[pack].blobs {
            if used.contains(&b.id) {
                home.entry(b.id).or_insert(*pack);
            }
        }
    }
    if home.len() != used.len() {
        let missing = used.iter().find(|b| !home.contains_key(b)).expect("one is missing");
        return Err(PruneError::Damaged(format!(
            "{} used blobs are in no existing pack (e.g. {missing})",
            used.len() - home.len()
        )));
    }
    report.blobs_used = used.len() as u64;

    progress.set("planning");
    let mut fates: HashMap<PackId, Fate> = HashMap::new();
    for pack in &pack_ids {
        let size = sizes[pack];
        // Garbage is the frames of blobs that live elsewhere or nowhere; the
        // header, table and trailer are the cost of any pack, not garbage.
        let (mut dead, mut live_blobs) = (0u64, 0u64);
        for b in &packs[pack].blobs {
            if home.get(&b.id) == Some(pack) {
                live_blobs += 1;
            } else {
                dead += (FRAME_HEADER_LEN as u64) + u64::from(b.stored_len);
            }
        }
        report.blobs_unused += packs[pack].blobs.len() as u64 - live_blobs;
        report.bytes_unused_before += dead;
        let live = size.saturating_sub(dead);
        let fate = if live_blobs == 0 {
            Fate::Delete
        } else if dead as f64 * 100.0 > opts.max_unused_percent * size as f64 {
            Fate::Repack
        } else {
            Fate::Keep
        };
        match fate {
            Fate::Keep => report.packs_kept += 1,
            Fate::Repack => {
                report.packs_repacked += 1;
                report.bytes_repacked += live;
            }
            Fate::Delete => report.packs_unused += 1,
        }
        fates.insert(*pack, fate);
    }
    let unindexed: Vec<PackId> = sizes.keys().filter(|p| !packs.contains_key(p)).copied().collect();
    report.packs_unindexed = unindexed.len() as u64;
    report.packs_total = sizes.len() as u64;
    report.bytes_before = sizes.values().sum();
    let kept_bytes: u64 = fates.iter().filter(|(_, f)| **f == Fate::Keep).map(|(p, _)| sizes[p]).sum();
    report.bytes_after = kept_bytes + report.bytes_repacked;

    let nothing_to_do = report.packs_repacked == 0
        && report.packs_unused == 0
        && unindexed.is_empty()
        && unreadable_segments == 0
        && dangling == 0;
    if opts.dry_run || nothing_to_do {
        return Ok(report);
    }

    // 1. Repack: copy live blobs out of mostly-garbage packs, verifying each.
    let repack: Vec<PackId> = pack_ids.iter().filter(|p| fates[*p] == Fate::Repack).copied().collect();
    let packer = Packer::new(repo, 2);
    for (i, pack) in repack.iter().enumerate() {
        progress.set(format!("repacking {}/{}", i + 1, repack.len()));
        let bytes = repo.backend().get(&ObjectKey::Pack(*pack))?;
        let entries = &packs[pack];
        for b in entries.blobs.iter().filter(|b| home.get(&b.id) == Some(pack)) {
            let start = b.offset as usize;
            let frame = bytes
                .get(start..start + FRAME_HEADER_LEN + b.stored_len as usize)
                .ok_or_else(|| PruneError::Damaged(format!("pack {pack}: blob {} lies past its end", b.id)))?;
            // Open it fully (crc, tag, hash) so damage is never copied on as good.
            repo.open_frame(&b.id, entries.kind, frame, u64::from(b.offset), b.stored_len, b.raw_len)
                .map_err(|e| PruneError::Damaged(format!("pack {pack}: {e}")))?;
            packer.save_stored(entries.kind, b.id, b.raw_len, &frame[FRAME_HEADER_LEN..])?;
        }
    }
    progress.set("writing index");
    let written = packer.finish()?;
    report.packs_written = written.len() as u64;
    report.index_segments_written = written.len().div_ceil(PACKS_PER_SEGMENT) as u64;
    report.bytes_after = kept_bytes
        + written
            .iter()
            .map(|p| repo.backend().size(&ObjectKey::Pack(p.pack)))
            .collect::<Result<Vec<u64>, _>>()?
            .iter()
            .sum::<u64>();

    // 2. Index every kept pack anew.
    let kept: Vec<PackEntries> =
        pack_ids.iter().filter(|p| fates[*p] == Fate::Keep).map(|p| packs[p].clone()).collect();
    for chunk in kept.chunks(PACKS_PER_SEGMENT) {
        repo.save_index_segment(&IndexSegment { packs: chunk.to_vec() })?;
        report.index_segments_written += 1;
    }

    // 3. and 4. Only now delete: the old segments, then the packs. A lock
    // that may have gone stale means a backup may have started meanwhile and
    // deduplicated against these packs: stop.
    lock.check()?;
    for (i, id) in segment_ids.iter().enumerate() {
        progress.set(format!("deleting old index segments {}/{}", i + 1, segment_ids.len()));
        repo.backend().remove(&ObjectKey::Index(*id))?;
        report.index_segments_deleted += 1;
    }
    let doomed: Vec<PackId> = pack_ids.iter().filter(|p| fates[*p] != Fate::Keep).copied().chain(unindexed).collect();
    for (i, pack) in doomed.iter().enumerate() {
        progress.set(format!("deleting packs {}/{}", i + 1, doomed.len()));
        repo.backend().remove(&ObjectKey::Pack(*pack))?;
    }
    repo.reload_index()?;
    progress.set("done");
    drop(lock);
    Ok(report)
}

/// Applies a retention policy: removes the snapshots it does not keep
/// (unless `dry_run`) and returns the decision per group. Needs no lock:
/// removing a snapshot deletes no data, and a prune running meanwhile only
/// keeps more than it had to.
pub fn forget(
    repo: &Repository,
    policy: &crate::retention::Policy,
    group_by: crate::retention::GroupBy,
    dry_run: bool,
) -> Result<Vec<crate::retention::GroupDecision>, RepoError> {
    let decisions = crate::retention::apply(policy, group_by, &repo.list_snapshots()?);
    if !dry_run {
        for id in decisions.iter().flat_map(|d| &d.remove) {
            repo.backend().remove(&ObjectKey::Snapshot(*id))?;
        }
    }
    Ok(decisions)
}

/// Removes the named snapshots (full ids or unique prefixes), readable or
/// not: a damaged manifest can be removed by its id. Every name is resolved
/// before anything is removed, so a typo removes nothing.
pub fn forget_ids(repo: &Repository, specs: &[String], dry_run: bool) -> Result<Vec<SnapshotId>, RepoError> {
    let mut ids = Vec::with_capacity(specs.len());
    for spec in specs {
        let id = repo.resolve_snapshot_id(spec)?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if !dry_run {
        for id in &ids {
            repo.backend().remove(&ObjectKey::Snapshot(*id))?;
        }
    }
    Ok(ids)
}

/// Every snapshot; unlike `list_snapshots`, one that cannot be read stops
/// prune, since the blobs it needs are unknown.
fn list_all_snapshots(repo: &Repository) -> Result<Vec<(SnapshotId, Snapshot)>, PruneError> {
    let ids: Vec<SnapshotId> = crate::backend::snapshot_ids(repo.backend().as_ref())?;
    ids.par_iter()
        .map(|id| match repo.load_snapshot(id) {
            Ok(s) => Ok((*id, s)),
            Err(RepoError::Backend(e)) if !e.is_not_found() => Err(RepoError::Backend(e).into()),
            Err(e) => Err(PruneError::Damaged(format!("snapshot {id}: {e}"))),
        })
        .collect()
}
