//! Verifying a repository: structure always, every byte with `read_data`.
//!
//! Structure: every index entry lies inside an existing pack, every snapshot
//! loads, every tree it reaches decrypts, decodes and hashes to its id, and
//! every chunk a file names is in the index. Data: every pack is read whole,
//! its name re-hashed, its frames' crc32 checked, its blob table compared
//! with the index and every blob opened and verified against its id.
//! Damage is then attributed to the files (snapshot and path) that use it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::id::{BlobId, PackId, SnapshotId};
use crate::index::BlobLocation;
use crate::pack::{self, HEADER_LEN, TRAILER_LEN};
use crate::repo::{RepoError, Repository};
use crate::tree::{walk, NodeKind};

/// What `check` should do beyond the structure.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    /// Read and verify every blob of every pack.
    pub read_data: bool,
    /// Read only subset `n` of `m` (1-based) of the packs, chosen by pack id,
    /// so `m` runs with n = 1..=m together read everything once.
    pub read_data_subset: Option<(u32, u32)>,
}

/// Whether `pack` falls in subset `n` of `m`.
fn in_subset(pack: &PackId, (n, m): (u32, u32)) -> bool {
    let x = u32::from_le_bytes(pack.0[..4].try_into().expect("4 bytes"));
    m > 0 && x % m == n.saturating_sub(1) % m
}

/// Live counters a progress display polls (from another thread).
#[derive(Debug, Default)]
pub struct CheckProgress {
    /// Packs `read_data` will read; set once the reading starts (0 without
    /// `read_data`).
    pub packs_total: AtomicU64,
    /// Packs read so far.
    pub packs_done: AtomicU64,
}

/// One problem found.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `damage` (data lost or altered) or `warning` (harmless, e.g. an
    /// unreferenced pack that prune will remove).
    pub severity: Severity,
    /// What is wrong and where (object ids, snapshot and path), and for
    /// some problems the command that fixes it; one line of text.
    pub message: String,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data is lost or altered: some snapshot may not restore exactly.
    Damage,
    /// Nothing a snapshot needs is lost by it: garbage prune removes, or an
    /// unreadable index segment (the damage it causes, if any, is reported
    /// apart, on the files).
    Warning,
}

/// A file some snapshot cannot restore exactly.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DamagedFile {
    /// The snapshot holding the file.
    pub snapshot: SnapshotId,
    /// Its path from the snapshot's root, `/`-separated with a leading
    /// `/`; a directory that cannot be listed ends in `/` (`/` alone for
    /// the root).
    pub path: String,
}

/// The result of a check (`check --json` prints it).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Snapshot manifests listed, readable or not.
    pub snapshots: u64,
    /// Distinct trees reached from the snapshots and read without error.
    pub trees: u64,
    /// Pack files in storage.
    pub packs: u64,
    /// Distinct blobs in the loaded index.
    pub blobs: u64,
    /// Packs read whole and verified (0 without `read_data`).
    pub packs_read: u64,
    /// Every problem found, sorted (damage first) and without duplicates.
    pub problems: Vec<Problem>,
    /// Every file (or unlistable directory) some snapshot cannot restore
    /// exactly, sorted and without duplicates.
    pub damaged_files: Vec<DamagedFile>,
}

impl CheckReport {
    /// True when any stored data is damaged or missing.
    pub fn has_damage(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Damage)
    }
}

/// Checks `repo`; see the module docs. The steps: `check_index` (the
/// index against the packs in storage), `read_packs` (with `read_data`),
/// `check_snapshots` (every snapshot's trees, damage attributed to files).
///
/// Damage is reported in the [`CheckReport`], not as an error; `Err` means
/// storage failed (listing, or a read that is not "not found"). Takes no
/// lock: hold a shared one ([`Repository::lock`]) so that a running prune's
/// deletions are not reported as damage. Blocks for the whole check; with
/// `read_data` it downloads every pack (in parallel on the rayon pool).
pub fn check(repo: &Repository, opts: CheckOptions, progress: &CheckProgress) -> Result<CheckReport, RepoError> {
    let mut report = CheckReport::default();
    let findings = Findings::default();
    let sizes: HashMap<PackId, u64> = repo.pack_sizes()?;
    report.packs = sizes.len() as u64;
    let (by_pack, mut bad_blobs) = check_index(repo, &sizes, &findings, &mut report);
    if opts.read_data || opts.read_data_subset.is_some() {
        bad_blobs.extend(read_packs(repo, &sizes, &by_pack, opts, progress, &findings, &mut report));
    }
    report.damaged_files = check_snapshots(repo, &bad_blobs, &findings, &mut report)?;
    let mut problems = findings.0.into_inner().expect("lock");
    problems.sort();
    problems.dedup();
    report.problems = problems;
    Ok(report)
}

/// Problems found so far; steps running in parallel add to it.
#[derive(Default)]
struct Findings(Mutex<Vec<Problem>>);

impl Findings {
    fn damage(&self, message: String) {
        self.0.lock().expect("lock").push(Problem { severity: Severity::Damage, message });
    }

    fn warn(&self, message: String) {
        self.0.lock().expect("lock").push(Problem { severity: Severity::Warning, message });
    }
}

/// The index's blobs by pack.
type ByPack = HashMap<PackId, Vec<(BlobId, BlobLocation)>>;

/// Step 1: every index entry lies inside an existing pack; unindexed packs
/// and unreadable segments are warnings. Returns the index's blobs by pack
/// and the blobs found missing.
fn check_index(
    repo: &Repository,
    sizes: &HashMap<PackId, u64>,
    findings: &Findings,
    report: &mut CheckReport,
) -> (ByPack, HashSet<BlobId>) {
    let mut bad_blobs: HashSet<BlobId> = HashSet::new();
    let mut by_pack: ByPack = HashMap::new();
    {
        let index = repo.index();
        report.blobs = index.len() as u64;
        for (id, loc) in index.iter() {
            by_pack.entry(loc.pack).or_default().push((id, loc));
        }
    }
    for (pack, blobs) in &by_pack {
        let Some(&size) = sizes.get(pack) else {
            findings.damage(format!("pack {pack} is in the index but missing from storage ({} blobs)", blobs.len()));
            bad_blobs.extend(blobs.iter().map(|(id, _)| *id));
            continue;
        };
        for (id, loc) in blobs {
            let end = loc.frame_end();
            if (loc.offset as usize) < HEADER_LEN || end + TRAILER_LEN as u64 > size {
                findings.damage(format!("blob {id}: index points outside pack {pack} ({size} bytes)"));
                bad_blobs.insert(*id);
            }
        }
    }
    for (segment, why) in repo.unreadable_index_segments() {
        findings.warn(format!("index segment {segment} is unreadable and was skipped ({why}); `repair index` rebuilds the index from the packs"));
    }
    for pack in sizes.keys().filter(|p| !by_pack.contains_key(p)) {
        findings.warn(format!("pack {pack} is not in the index (left by an interrupted backup; prune removes it)"));
    }
    (by_pack, bad_blobs)
}

/// Step 2: reads every pack (or the chosen subset) whole and verifies
/// everything in it. Returns the blobs found damaged.
fn read_packs(
    repo: &Repository,
    sizes: &HashMap<PackId, u64>,
    by_pack: &ByPack,
    opts: CheckOptions,
    progress: &CheckProgress,
    findings: &Findings,
    report: &mut CheckReport,
) -> HashSet<BlobId> {
    let mut ids: Vec<PackId> = sizes
        .keys()
        .copied()
        .filter(|p| by_pack.contains_key(p) && opts.read_data_subset.map_or(true, |s| in_subset(p, s)))
        .collect();
    ids.sort();
    progress.packs_total.store(ids.len() as u64, Ordering::Relaxed);
    let bad: Mutex<HashSet<BlobId>> = Mutex::default();
    ids.par_iter().for_each(|pack| {
        let found = read_pack(repo, pack, &by_pack[pack]);
        progress.packs_done.fetch_add(1, Ordering::Relaxed);
        if !found.problems.is_empty() {
            for m in found.problems {
                findings.damage(m);
            }
            bad.lock().expect("lock").extend(found.bad_blobs);
        }
    });
    report.packs_read = ids.len() as u64;
    bad.into_inner().expect("lock")
}

/// Step 3: walks every snapshot's trees, attributing missing or damaged
/// blobs to the files (snapshot and path) that use them.
fn check_snapshots(
    repo: &Repository,
    bad_blobs: &HashSet<BlobId>,
    findings: &Findings,
    report: &mut CheckReport,
) -> Result<Vec<DamagedFile>, RepoError> {
    // Walk every snapshot's trees, attributing missing or damaged blobs to files.
    let snapshots = repo.snapshot_ids()?;
    let mut first: HashMap<BlobId, (SnapshotId, PathBuf)> = HashMap::new();
    let mut failed: HashSet<BlobId> = HashSet::new();
    let mut damaged_files = Vec::new();
    for sid in snapshots {
        report.snapshots += 1;
        let snap = match repo.load_snapshot(&sid) {
            Ok(s) => s,
            Err(e) => {
                findings.damage(format!(
                    "snapshot {sid} cannot be read: {e} (`chunkvault forget {sid}` or `repair snapshots --forget` removes it)"
                ));
                continue;
            }
        };
        // Damage is reported at a tree's first visit (`first`: the snapshot
        // and path of it); every visit attributes it to the files it hurts.
        first.entry(snap.tree).or_insert((sid, PathBuf::new()));
        let mut entries = walk(repo, &snap.tree);
        while let Some(entry) = entries.next() {
            let (path, node) = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    if first[&e.tree] == (sid, e.path.clone()) && failed.insert(e.tree) {
                        findings.damage(format!("tree {} at {}/: {}", e.tree, slash(&e.path), e.source));
                    }
                    damaged_files.push(DamagedFile { snapshot: sid, path: format!("{}/", slash(&e.path)) });
                    continue;
                }
            };
            let first_visit = entries.parent_tree().is_some_and(|t| first[&t] == (sid, parent_of(&path)));
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    first.entry(*subtree).or_insert((sid, path));
                }
                NodeKind::File { chunks } => {
                    let child = slash(&path);
                    let index = repo.index();
                    let missing = chunks.iter().find(|c| !index.contains(c));
                    if let Some(c) = missing {
                        if first_visit {
                            findings
                                .damage(format!("{child} in snapshot {}: chunk {c} is not in the index", sid.short()));
                        }
                        damaged_files.push(DamagedFile { snapshot: sid, path: child });
                    } else if chunks.iter().any(|c| bad_blobs.contains(c)) {
                        damaged_files.push(DamagedFile { snapshot: sid, path: child });
                    }
                }
                NodeKind::Symlink { .. } | NodeKind::Special { .. } => {}
            }
        }
    }
    report.trees = (first.len() - failed.len()) as u64;
    damaged_files.sort();
    damaged_files.dedup();
    Ok(damaged_files)
}

/// A path below a snapshot's root as check reports it: `/a/b`, and the
/// root as the empty string (so that `{}/` names a directory).
fn slash(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!("/{}", path.display())
    }
}

/// A path's directory (empty for an entry of the root).
fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

struct PackFindings {
    problems: Vec<String>,
    bad_blobs: Vec<BlobId>,
}

/// Reads one pack whole and verifies everything in it.
fn read_pack(repo: &Repository, pack: &PackId, expected: &[(BlobId, BlobLocation)]) -> PackFindings {
    let mut f = PackFindings { problems: Vec::new(), bad_blobs: Vec::new() };
    let all_bad = |f: &mut PackFindings| f.bad_blobs.extend(expected.iter().map(|(id, _)| *id));
    let bytes = match repo.read_pack(pack) {
        Ok(b) => b,
        Err(e) => {
            f.problems.push(format!("pack {pack}: {e}"));
            all_bad(&mut f);
            return f;
        }
    };
    if PackId::of_content(&bytes) != *pack {
        f.problems.push(format!("pack {pack}: content does not match its name (damaged on storage)"));
    }
    match pack::scrub(&bytes) {
        Ok(d) => {
            for off in d {
                f.problems.push(format!("pack {pack}: crc32 mismatch in the frame at offset {off}"));
            }
        }
        Err(e) => f.problems.push(format!("pack {pack}: {e}")),
    }
    match pack::read_table(repo.master_key(), &bytes) {
        Ok(table) => {
            let in_table: HashSet<BlobId> = table.blobs.iter().map(|b| b.id).collect();
            for (id, _) in expected {
                if !in_table.contains(id) {
                    f.problems.push(format!("pack {pack}: blob {id} is in the index but not in the pack's table"));
                }
            }
        }
        Err(e) => f.problems.push(format!("pack {pack}: blob table: {e}")),
    }
    for (id, loc) in expected {
        let Some(frame) = bytes.get(loc.offset as usize..loc.frame_end() as usize) else {
            f.problems.push(format!("pack {pack}: blob {id} lies past the end of the pack"));
            f.bad_blobs.push(*id);
            continue;
        };
        if let Err(e) = repo.open_frame(id, loc.kind, frame, u64::from(loc.offset), loc.stored_len, loc.raw_len) {
            f.problems.push(format!("pack {pack}: {e}"));
            f.bad_blobs.push(*id);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_data_subsets_partition_the_packs() {
        for _ in 0..200 {
            let pack = PackId::random();
            for m in [1, 2, 3, 10] {
                let hits = (1..=m).filter(|&n| in_subset(&pack, (n, m))).count();
                assert_eq!(hits, 1, "{pack} in {hits} of {m} subsets");
            }
        }
    }
}
