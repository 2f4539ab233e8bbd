//! Prune: delete the data no snapshot needs, without ever making a
//! committed snapshot unrestorable.
//!
//! Under an exclusive lock: mark every blob reachable from every snapshot,
//! then sort every pack in storage into *keep* (little garbage), *repack*
//! (garbage above the threshold: its live blobs are copied into new packs),
//! or *delete* (nothing live, or not indexed at all): that is [`plan`], which
//! writes nothing. [`execute`] then writes and deletes in the order that is
//! the safety argument (ARCHITECTURE.md, "Prune", steps 4-6):
//!
//! 4. new packs (repacked blobs), then their index segments, durable;
//! 5. new index segments naming every kept pack, durable;
//! 6. the lock checked, then the old index segments deleted, and only then
//!    the obsolete packs.
//!
//! A crash anywhere leaves an index whose every segment names existing packs
//! and covers every live blob: at worst duplicates or garbage that the next
//! prune removes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use crate::id::{BlobId, IndexId, PackId, SnapshotId};
use crate::index::{BlobLocation, IndexSegment, PackEntries};
use crate::lock::{LockError, LockKind, LockOptions};
use crate::packer::PACKS_PER_SEGMENT;
use crate::repo::{RepoError, Repository, WriteError, WriteSession};
use crate::snapshot::Snapshot;
use crate::tree::{walk, NodeKind};

/// Why prune stopped (before deleting anything, unless storage failed midway,
/// which the write order makes harmless).
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Storage failed (or a write through the session did). If it happens
    /// during deletion, what is left is what a crash would leave: harmless
    /// garbage for the next prune.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The exclusive lock could not be taken within `lock.wait` (backups or
    /// another prune hold the repository), or it lapsed before the first
    /// delete; nothing was deleted then.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The repository is damaged in a way that makes the set of live blobs
    /// unknown (an unreadable snapshot or tree, a live blob in no pack, a
    /// blob that fails verification while repacked); nothing was deleted.
    #[error("refusing to prune: {0} (run `chunkvault check`; `repair index` or `repair snapshots` may help)")]
    Damaged(String),
}

impl From<WriteError> for PruneError {
    fn from(e: WriteError) -> Self {
        e.split()
    }
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
    /// Compute and report, change nothing (the exclusive lock is still taken).
    pub dry_run: bool,
    /// How long to wait for the exclusive lock, and its refresh timing.
    pub lock: LockOptions,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { max_unused_percent: 10.0, dry_run: false, lock: LockOptions::default() }
    }
}

/// What prune is doing, for a progress display; another thread may poll it.
#[derive(Debug, Default)]
pub struct PruneProgress {
    /// The current step in words (`"marking used blobs"`, `"repacking 3/40"`,
    /// ..., `"done"`); empty before prune starts.
    pub phase: Mutex<String>,
}

impl PruneProgress {
    fn set(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.into();
    }
}

/// What prune found and did (or, with `dry_run`, would do). Sizes are in
/// bytes of pack files as stored (compressed and sealed). `prune --json`
/// prints it; the field names are part of that output.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    /// True when nothing was changed ([`PruneOptions::dry_run`]).
    pub dry_run: bool,
    /// Snapshots whose trees were marked.
    pub snapshots: u64,
    /// Distinct blobs (trees and chunks) the snapshots reach.
    pub blobs_used: u64,
    /// Index entries of indexed packs that are not a live blob's one home:
    /// unreachable blobs and extra copies of live ones.
    pub blobs_unused: u64,
    /// Packs in storage, indexed or not.
    pub packs_total: u64,
    /// Packs kept whole (garbage at or under the threshold).
    pub packs_kept: u64,
    /// Packs whose live blobs are copied into new packs, then deleted.
    pub packs_repacked: u64,
    /// Packs holding nothing live, deleted whole.
    pub packs_unused: u64,
    /// Packs no index names (left by interrupted backups), deleted.
    pub packs_unindexed: u64,
    /// New packs written by repacking (0 in a dry run).
    pub packs_written: u64,
    /// Bytes of every pack in storage before prune.
    pub bytes_before: u64,
    /// Bytes of the frames of unused blobs in indexed packs (unindexed
    /// packs are counted in `bytes_before` only).
    pub bytes_unused_before: u64,
    /// Bytes of the repacked packs minus their garbage: about what repacking
    /// reads and writes again.
    pub bytes_repacked: u64,
    /// Bytes of packs after prune: the kept packs plus the new ones (in a
    /// dry run, plus the estimate `bytes_repacked`).
    pub bytes_after: u64,
    /// Index segments written (0 in a dry run).
    pub index_segments_written: u64,
    /// Old index segments deleted (0 in a dry run).
    pub index_segments_deleted: u64,
}

/// Every blob (trees and data) reachable from `snapshots`. A tree that
/// cannot be loaded is an error: what it references is unknown. Blocks on
/// reading every tree once (a subtree shared by snapshots is read once).
pub fn reachable_blobs(repo: &Repository, snapshots: &[(SnapshotId, Snapshot)]) -> Result<HashSet<BlobId>, RepoError> {
    let mut used: HashSet<BlobId> = HashSet::new();
    for (_, snapshot) in snapshots {
        if !used.insert(snapshot.tree) {
            continue;
        }
        let mut entries = walk(repo, &snapshot.tree);
        while let Some(entry) = entries.next() {
            let (_, node) = entry.map_err(|e| e.source)?;
            match &node.kind {
                // A subtree seen before: everything below it is marked.
                NodeKind::Dir { subtree } if !used.insert(*subtree) => entries.skip_subtree(),
                NodeKind::File { chunks } => used.extend(chunks.iter().copied()),
                NodeKind::Dir { .. } | NodeKind::Symlink { .. } | NodeKind::Special { .. } => {}
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

/// What a prune will do ([`plan`]), for [`execute`]; its report is what
/// `--dry-run` prints.
pub struct PrunePlan {
    /// The figures of the plan (packs and bytes before and after).
    pub report: PruneReport,
    /// Every index segment: all are replaced.
    segment_ids: Vec<IndexId>,
    /// Each existing pack's entries, from the first readable segment naming it.
    packs: HashMap<PackId, PackEntries>,
    /// The indexed packs, in id order, each with its fate.
    fates: Vec<(PackId, Fate)>,
    /// Each live blob's one home: the first pack (in id order) holding it.
    home: HashMap<BlobId, PackId>,
    /// Packs no index names (left by interrupted backups).
    unindexed: Vec<PackId>,
    /// Bytes of the packs kept whole.
    kept_bytes: u64,
    /// Whether the index must be rewritten even if no pack goes (unreadable
    /// segments, entries naming packs that are gone).
    index_stale: bool,
}

impl PrunePlan {
    /// True when executing the plan would change nothing.
    pub fn is_empty(&self) -> bool {
        let r = &self.report;
        r.packs_repacked == 0 && r.packs_unused == 0 && self.unindexed.is_empty() && !self.index_stale
    }

    fn with_fate(&self, fate: Fate) -> impl Iterator<Item = PackId> + '_ {
        self.fates.iter().filter(move |(_, f)| *f == fate).map(|(p, _)| *p)
    }
}

/// Prunes `repo`: [`plan`], then (unless `opts.dry_run`) [`execute`], under
/// one exclusive lock; see the module docs.
///
/// Blocks for the whole prune: it waits up to `opts.lock.wait` for running
/// backups, reads every index segment and tree, and reads and rewrites the
/// live part of every repacked pack.
pub fn prune(repo: &Repository, opts: &PruneOptions, progress: &PruneProgress) -> Result<PruneReport, PruneError> {
    let mut session = WriteSession::begin(repo, LockKind::Exclusive, opts.lock, 2)?;
    let plan = plan(&session, opts, progress)?;
    if opts.dry_run || plan.is_empty() {
        return Ok(plan.report);
    }
    execute(&mut session, plan, progress)
}

/// Steps 1-3 of ARCHITECTURE.md's "Prune": load the index, mark what the
/// snapshots use, decide each pack's fate. Writes nothing; `session` (an
/// exclusive one) is what makes the plan hold until it is executed.
pub fn plan(
    session: &WriteSession<'_>,
    opts: &PruneOptions,
    progress: &PruneProgress,
) -> Result<PrunePlan, PruneError> {
    let repo = session.repo();
    let mut report = PruneReport { dry_run: opts.dry_run, ..PruneReport::default() };

    // 1. Load every index segment itself, and list the packs.
    progress.set("loading index");
    let segment_ids: Vec<IndexId> = repo.index_segment_ids()?;
    let segments: Vec<(IndexId, Result<IndexSegment, RepoError>)> =
        segment_ids.par_iter().map(|id| (*id, repo.load_index_segment(id))).collect();
    let sizes: HashMap<PackId, u64> = repo.pack_sizes()?;
    // Each existing pack's entries, from the first readable segment naming it.
    // Unreadable segments are replaced like the rest; if they held the only
    // location of a live blob, marking (a tree) or planning (a chunk) below
    // finds it missing and stops.
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

    // 2. Mark every blob the snapshots reach.
    progress.set("marking used blobs");
    let snapshots = list_all_snapshots(repo)?;
    report.snapshots = snapshots.len() as u64;
    let used = reachable_blobs(repo, &snapshots).map_err(|e| PruneError::Damaged(e.to_string()))?;

    // 3. Plan: one home per live blob, the first existing pack (in id order)
    // holding it; then each pack's fate.
    progress.set("planning");
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
    let mut fates = Vec::with_capacity(pack_ids.len());
    for pack in &pack_ids {
        let size = sizes[pack];
        // Garbage is the frames of blobs that live elsewhere or nowhere; the
        // header, table and trailer are the cost of any pack, not garbage.
        let (mut dead, mut live_blobs) = (0u64, 0u64);
        for b in &packs[pack].blobs {
            if home.get(&b.id) == Some(pack) {
                live_blobs += 1;
            } else {
                dead += crate::pack::frame_len(b.stored_len);
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
        fates.push((*pack, fate));
    }
    let unindexed: Vec<PackId> = sizes.keys().filter(|p| !packs.contains_key(p)).copied().collect();
    report.packs_unindexed = unindexed.len() as u64;
    report.packs_total = sizes.len() as u64;
    report.bytes_before = sizes.values().sum();
    let kept_bytes: u64 = fates.iter().filter(|(_, f)| *f == Fate::Keep).map(|(p, _)| sizes[p]).sum();
    report.bytes_after = kept_bytes + report.bytes_repacked;
    let index_stale = unreadable_segments > 0 || dangling > 0;
    Ok(PrunePlan { report, segment_ids, packs, fates, home, unindexed, kept_bytes, index_stale })
}

/// Steps 4-6 of ARCHITECTURE.md's "Prune": repack, write the new index,
/// then (lock checked) delete the old segments and the obsolete packs, in
/// the order the safety argument needs. `session` must be the exclusive one
/// `plan` ran under.
pub fn execute(
    session: &mut WriteSession<'_>,
    mut plan: PrunePlan,
    progress: &PruneProgress,
) -> Result<PruneReport, PruneError> {
    let repo = session.repo();
    let mut report = std::mem::take(&mut plan.report);
    let (packs, home) = (&plan.packs, &plan.home);

    // 4. Repack: copy live blobs out of mostly-garbage packs, verifying each.
    let repack: Vec<PackId> = plan.with_fate(Fate::Repack).collect();
    for (i, pack) in repack.iter().enumerate() {
        progress.set(format!("repacking {}/{}", i + 1, repack.len()));
        let entries = &packs[pack];
        let mut live: Vec<(BlobId, BlobLocation)> = entries
            .blobs
            .iter()
            .filter(|b| home.get(&b.id) == Some(pack))
            .map(|b| {
                let loc = BlobLocation {
                    pack: *pack,
                    kind: entries.kind,
                    offset: b.offset,
                    stored_len: b.stored_len,
                    raw_len: b.raw_len,
                };
                (b.id, loc)
            })
            .collect();
        live.sort_by_key(|(_, l)| l.offset);
        let raw_len: HashMap<BlobId, u32> = live.iter().map(|(id, l)| (*id, l.raw_len)).collect();
        // Each frame is opened fully (crc, tag, hash) by the read path before
        // it is copied, so damage is never carried on as good.
        let mut failed = None;
        repo.read_pack_sealed(pack, &live, &mut |id, sealed| {
            if failed.is_some() {
                return;
            }
            let copied = match sealed {
                Ok(sealed) => {
                    session.save_stored(entries.kind, *id, raw_len[id], sealed).map(drop).map_err(PruneError::from)
                }
                Err(e) => Err(PruneError::Damaged(format!("pack {pack}: {e}"))),
            };
            failed = copied.err();
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    // The new packs, then the segments naming them, durable.
    progress.set("writing index");
    let written = session.flush()?;
    report.packs_written = written.len() as u64;
    report.index_segments_written = written.len().div_ceil(PACKS_PER_SEGMENT) as u64;
    report.bytes_after = plan.kept_bytes
        + written.iter().map(|p| repo.pack_size(&p.pack)).collect::<Result<Vec<u64>, _>>()?.iter().sum::<u64>();

    // 5. Index every kept pack anew.
    let kept: Vec<PackEntries> = plan.with_fate(Fate::Keep).map(|p| packs[&p].clone()).collect();
    for chunk in kept.chunks(PACKS_PER_SEGMENT) {
        repo.save_index_segment(&IndexSegment { packs: chunk.to_vec() })?;
        report.index_segments_written += 1;
    }

    // 6. Only now delete: the old segments, then the packs. A lock that may
    // have gone stale means a backup may have started meanwhile and
    // deduplicated against these packs: stop.
    session.check_lock()?;
    for (i, id) in plan.segment_ids.iter().enumerate() {
        progress.set(format!("deleting old index segments {}/{}", i + 1, plan.segment_ids.len()));
        repo.remove_index_segment(id)?;
        report.index_segments_deleted += 1;
    }
    let doomed: Vec<PackId> = plan
        .fates
        .iter()
        .filter(|(_, f)| *f != Fate::Keep)
        .map(|(p, _)| *p)
        .chain(plan.unindexed.iter().copied())
        .collect();
    for (i, pack) in doomed.iter().enumerate() {
        progress.set(format!("deleting packs {}/{}", i + 1, doomed.len()));
        repo.remove_pack(pack)?;
    }
    repo.reload_index()?;
    progress.set("done");
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
            repo.remove_snapshot(id)?;
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
            repo.remove_snapshot(id)?;
        }
    }
    Ok(ids)
}

/// Every snapshot; unlike `list_snapshots`, one that cannot be read stops
/// prune, since the blobs it needs are unknown.
fn list_all_snapshots(repo: &Repository) -> Result<Vec<(SnapshotId, Snapshot)>, PruneError> {
    let ids: Vec<SnapshotId> = repo.snapshot_ids()?;
    ids.par_iter()
        .map(|id| match repo.load_snapshot(id) {
            Ok(s) => Ok((*id, s)),
            Err(RepoError::Backend(e)) if !e.is_not_found() => Err(RepoError::Backend(e).into()),
            Err(e) => Err(PruneError::Damaged(format!("snapshot {id}: {e}"))),
        })
        .collect()
}
