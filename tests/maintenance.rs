//! Forget, prune, repair, stats and diff through the library, and every
//! injected fault at every write point of backup, prune and repair (each a
//! write session).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chunkvault::backend::{Fault, FaultyBackend, FileType, LocalBackend, ObjectKey};
use chunkvault::backup::{backup, BackupError, BackupOptions, BackupProgress};
use chunkvault::check::{check, CheckOptions, CheckReport};
use chunkvault::chunker::ChunkerParams;
use chunkvault::crypto::KdfParams;
use chunkvault::id::SnapshotId;
use chunkvault::lock::{LockFile, LockKind};
use chunkvault::prune::{forget, prune, PruneError, PruneOptions, PruneProgress};
use chunkvault::repair::{repair_index, repair_snapshots};
use chunkvault::repo::{InitOptions, Repository};
use chunkvault::restore::{restore, RestoreOptions, RestoreProgress};
use chunkvault::retention::{GroupBy, Policy};
use chunkvault::stats::{diff, stats, Change, Difference};
use common::{assert_repository_intact, make_gen, pseudo_random, restored};

const PW: &[u8] = b"pw";

/// Small chunks and packs, so a tiny corpus spans many packs.
fn init_opts() -> InitOptions {
    InitOptions {
        kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 },
        chunker: ChunkerParams { min_size: 4096, avg_size: 16384, max_size: 65536 },
        pack_size: 1 << 20,
        ..InitOptions::default()
    }
}

fn open(dir: &Path) -> Repository {
    Repository::open(Arc::new(LocalBackend::open(dir).unwrap()), PW).unwrap()
}

fn backup_gen(repo: &Repository, base: &Path, i: u64) -> Result<SnapshotId, BackupError> {
    let src = make_gen(base, i, 150_000, 120_000);
    backup(repo, &[src], &BackupOptions::default(), &BackupProgress::default()).map(|d| d.id)
}

/// A repository with five generations backed up and all but the last two
/// forgotten: prune has whole packs to delete and mixed packs to repack.
struct Fixture {
    dir: tempfile::TempDir,
    template: PathBuf,
    snapshots: BTreeSet<SnapshotId>,
}

impl Fixture {
    fn new() -> Fixture {
        // These tests are about failures, not durability: a RAM-backed
        // directory, where there is one, spares them thousands of fsyncs.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let template = dir.path().join("template");
        let repo = Repository::init(Arc::new(LocalBackend::create(&template).unwrap()), PW, &init_opts()).unwrap();
        for i in 0..5 {
            backup_gen(&repo, &dir.path().join("data"), i).unwrap();
        }
        forget(
            &repo,
            &Policy { last: 2, ..Policy::default() },
            GroupBy { host: true, paths: false, tags: false },
            false,
        )
        .unwrap();
        let snapshots = repo.list_snapshots().unwrap().into_iter().map(|(id, _)| id).collect();
        Fixture { dir, template, snapshots }
    }

    /// A fresh copy of the template repository.
    fn copy(&self, name: &str) -> PathBuf {
        let to = self.dir.path().join("work").join(name);
        let _ = std::fs::remove_dir_all(&to);
        copy_dir(&self.template, &to);
        to
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The repository verifies (with every byte read) without damage, holds
/// exactly `expected`, and every snapshot restores to its source exactly.
fn verify(dir: &Path, expected: &BTreeSet<SnapshotId>, why: &str) -> CheckReport {
    verify_with(dir, expected, true, why)
}

/// [`verify`], reading every pack only with `read_data` (restore verifies
/// every chunk it reads anyway).
fn verify_with(dir: &Path, expected: &BTreeSet<SnapshotId>, read_data: bool, why: &str) -> CheckReport {
    let (report, ids) = assert_repository_intact(&open(dir), read_data, &dir.with_extension("restore"), why);
    assert_eq!(&ids, expected, "{why}: snapshots");
    report
}

fn prune_opts() -> PruneOptions {
    PruneOptions { max_unused_percent: 5.0, ..PruneOptions::default() }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Backup,
    Prune,
    /// `repair snapshots --forget` of a repository that lost a pack.
    Repair,
}

type MakeFault = fn(usize) -> Fault;

/// The fault kinds every write point is tried with. Snapshots are not torn:
/// puts are atomic by the backend contract, and a torn snapshot is damage
/// by definition; torn packs and index segments model a non-atomic store.
const FAULTS: [(&str, MakeFault); 5] = [
    ("eio", |k| Fault::FailPut { nth: k, file_type: None }),
    ("enospc", |k| Fault::NoSpace { nth: k, file_type: None }),
    ("torn pack", |k| Fault::TornPut { nth: k, file_type: Some(FileType::Pack), keep: 10 }),
    ("torn index", |k| Fault::TornPut { nth: k, file_type: Some(FileType::Index), keep: 10 }),
    ("crash", |k| Fault::FailAfter { ops: k }),
];

/// For each fault kind, fails write point k = 0, 1, ... of `op` on a fresh
/// copy of the fixture until the operation gets past every point. After
/// each fault: check finds no damage, exactly the committed snapshots exist
/// and restore exactly, and the next run of the operation succeeds (after a
/// clean prune, check finds nothing at all to warn about). Returns how many
/// faults fired per kind.
fn sweep(fx: &Fixture, op: Op) -> Vec<(&'static str, usize)> {
    let mut fired = Vec::new();
    for (name, make) in FAULTS {
        let mut count = 0;
        for k in 0.. {
            let fault = make(k);
            let why = format!("{op:?} {fault:?}");
            let dir = fx.copy("sweep");
            if let Op::Repair = op {
                remove_one_pack_used_by_latest(&dir);
            }
            let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(&dir).unwrap())));
            let repo = Repository::open(faulty.clone(), PW).unwrap();
            faulty.inject(fault.clone());
            let result = match op {
                Op::Backup => backup_gen(&repo, &fx.data(), 100).map(Some).map_err(|e| e.to_string()),
                Op::Prune => {
                    prune(&repo, &prune_opts(), &PruneProgress::default()).map(|_| None).map_err(|e| e.to_string())
                }
                Op::Repair => repair_snapshots(&repo, false, true, false, Default::default())
                    .map(|_| None)
                    .map_err(|e| e.to_string()),
            };
            faulty.clear();
            drop(repo);
            if let Op::Repair = op {
                verify_repair(&dir, &fx.snapshots, &why);
            } else {
                let mut expected = fx.snapshots.clone();
                if let Ok(Some(id)) = &result {
                    expected.insert(*id);
                }
                verify_with(&dir, &expected, false, &why);
            }
            // The next operation succeeds on what the fault left.
            let repo = open(&dir);
            match op {
                Op::Backup => {
                    backup_gen(&repo, &fx.data(), 101).unwrap_or_else(|e| panic!("{why}: next backup: {e}"));
                }
                Op::Prune => {
                    prune(&repo, &prune_opts(), &PruneProgress::default())
                        .unwrap_or_else(|e| panic!("{why}: next prune: {e}"));
                    let report = check(&repo, CheckOptions::default(), &Default::default()).unwrap();
                    assert!(report.problems.is_empty(), "{why}: after a clean prune: {:?}", report.problems);
                }
                Op::Repair => {
                    repair_snapshots(&repo, false, true, false, Default::default())
                        .unwrap_or_else(|e| panic!("{why}: next repair: {e}"));
                    prune(&repo, &prune_opts(), &PruneProgress::default())
                        .unwrap_or_else(|e| panic!("{why}: prune after repair: {e}"));
                    let report =
                        check(&repo, CheckOptions { read_data: true, ..Default::default() }, &Default::default())
                            .unwrap();
                    assert!(!report.has_damage(), "{why}: after repair and prune: {:?}", report.problems);
                }
            }
            if result.is_ok() {
                break;
            }
            count += 1;
        }
        fired.push((name, count));
    }
    fired
}

#[test]
fn every_fault_at_every_write_point_of_a_prune_loses_nothing() {
    let fx = Fixture::new();
    let fired = sweep(&fx, Op::Prune);
    eprintln!("prune fault points: {fired:?}");
    for (name, count) in fired {
        assert!(count >= 1, "{name}: no write point of prune was exercised");
    }
}

#[test]
fn every_fault_at_every_write_point_of_a_backup_loses_nothing() {
    let fx = Fixture::new();
    let fired = sweep(&fx, Op::Backup);
    eprintln!("backup fault points: {fired:?}");
    for (name, count) in fired {
        assert!(count >= 1, "{name}: no write point of backup was exercised");
    }
}

#[test]
fn every_fault_at_every_write_point_of_a_repair_loses_nothing() {
    let fx = Fixture::new();
    let fired = sweep(&fx, Op::Repair);
    eprintln!("repair fault points: {fired:?}");
    for (name, count) in fired {
        assert!(count >= 1, "{name}: no write point of repair was exercised");
    }
}

/// After a `repair snapshots --forget` that may have failed anywhere: every
/// original snapshot is still there or has a repaired copy, and no repaired
/// copy names data that is missing or damaged.
fn verify_repair(dir: &Path, originals: &BTreeSet<SnapshotId>, why: &str) {
    let repo = open(dir);
    let snaps = repo.list_snapshots().unwrap();
    let repaired: Vec<SnapshotId> =
        snaps.iter().filter(|(_, s)| s.tags.iter().any(|t| t == "repaired")).map(|(id, _)| *id).collect();
    for old in originals {
        let kept = snaps.iter().any(|(id, s)| id == old || s.parent == Some(*old));
        assert!(kept, "{why}: snapshot {old} is gone without a repaired copy");
    }
    let report = check(&repo, CheckOptions { read_data: true, ..Default::default() }, &Default::default()).unwrap();
    let bad: Vec<_> = report.damaged_files.iter().filter(|f| repaired.contains(&f.snapshot)).collect();
    assert!(bad.is_empty(), "{why}: a repaired snapshot names missing data: {bad:?}");
}

#[test]
fn repair_snapshots_dry_run_writes_nothing() {
    let fx = Fixture::new();
    let dir = fx.copy("repair-dry");
    remove_one_pack_used_by_latest(&dir);
    let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(&dir).unwrap())));
    let repo = Repository::open(faulty.clone(), PW).unwrap();
    let before = walk(&dir);
    let dry = repair_snapshots(&repo, false, true, true, Default::default()).unwrap();
    assert_eq!(dry.len(), 1, "{dry:?}");
    assert!(!dry[0].dropped.is_empty());
    assert_eq!(faulty.puts(), 0, "a dry run puts nothing, not even a lock or a tree pack");
    assert_eq!(walk(&dir), before);
}

#[test]
fn read_faults_during_prune_stop_it_before_anything_is_lost() {
    let fx = Fixture::new();
    for file_type in [FileType::Pack, FileType::Index, FileType::Snapshot, FileType::Lock] {
        let dir = fx.copy("flip");
        let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(&dir).unwrap())));
        let repo = Repository::open(faulty.clone(), PW).unwrap();
        faulty.inject(Fault::FlipOnRead { file_type, offset: 200 });
        let result = prune(&repo, &prune_opts(), &PruneProgress::default());
        // Prune reads only its own lock, which it does not need to parse.
        if file_type != FileType::Lock {
            assert!(result.is_err(), "{file_type:?}: a prune reading damaged bytes must stop");
        }
        faulty.clear();
        verify(&dir, &fx.snapshots, &format!("flip {file_type:?}"));
    }
    // A slow store only slows prune down.
    let dir = fx.copy("stall");
    let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(&dir).unwrap())));
    let repo = Repository::open(faulty.clone(), PW).unwrap();
    faulty.inject(Fault::Stall { file_type: FileType::Pack, millis: 5 });
    prune(&repo, &prune_opts(), &PruneProgress::default()).unwrap();
    verify(&dir, &fx.snapshots, "stall");
}

#[test]
fn read_faults_during_backup_never_commit_a_bad_snapshot() {
    let fx = Fixture::new();
    let faults = [
        Fault::FlipOnRead { file_type: FileType::Pack, offset: 200 },
        Fault::FlipOnRead { file_type: FileType::Index, offset: 200 },
        Fault::FlipOnRead { file_type: FileType::Snapshot, offset: 200 },
        Fault::FlipOnRead { file_type: FileType::Lock, offset: 20 },
        Fault::Stall { file_type: FileType::Pack, millis: 5 },
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        let dir = fx.copy("backup-read-fault");
        let faulty = Arc::new(FaultyBackend::new(Arc::new(LocalBackend::open(&dir).unwrap())));
        let repo = Repository::open(faulty.clone(), PW).unwrap();
        faulty.inject(fault.clone());
        // Back up a generation the repository has, so the backup reads its
        // parent's trees and deduplicates against the index.
        let src = fx.data().join("gen-4");
        let result = backup(&repo, &[src], &BackupOptions::default(), &BackupProgress::default()).map(|d| d.id);
        faulty.clear();
        let mut expected = fx.snapshots.clone();
        if let Ok(id) = result {
            expected.insert(id);
        }
        verify(&dir, &expected, &format!("{fault:?}"));
        backup_gen(&open(&dir), &fx.data(), 200 + i as u64).unwrap();
    }
}

#[test]
fn prune_frees_what_forget_released_and_a_dry_run_changes_nothing() {
    let fx = Fixture::new();
    let dir = fx.copy("prune");
    let listing =
        |d: &Path| -> BTreeSet<PathBuf> { walk(d).into_iter().filter(|p| !p.starts_with(d.join("locks"))).collect() };
    let before = listing(&dir);
    let repo = open(&dir);
    let dry = prune(&repo, &PruneOptions { dry_run: true, ..prune_opts() }, &PruneProgress::default()).unwrap();
    assert!(dry.packs_unused + dry.packs_repacked > 0, "{dry:?}");
    assert_eq!(listing(&dir), before, "a dry run changes nothing");
    let size_before = common::dir_size(&dir);
    let done = prune(&repo, &prune_opts(), &PruneProgress::default()).unwrap();
    assert_eq!(
        (done.packs_unused, done.packs_repacked, done.blobs_used),
        (dry.packs_unused, dry.packs_repacked, dry.blobs_used)
    );
    assert!(common::dir_size(&dir) < size_before);
    let report = verify(&dir, &fx.snapshots, "after prune");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A second prune finds nothing to do.
    let again = prune(&open(&dir), &prune_opts(), &PruneProgress::default()).unwrap();
    assert_eq!((again.packs_unused, again.packs_repacked, again.packs_unindexed, again.blobs_unused), (0, 0, 0, 0));
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn remove_one_pack_used_by_latest(dir: &Path) -> String {
    let repo = open(dir);
    let (_, latest) = repo.list_snapshots().unwrap().pop().unwrap();
    let node = repo.find_node(&latest.tree, &format!("{}/sub/own", &latest.paths[0][1..])).unwrap().unwrap();
    let chunkvault::tree::NodeKind::File { chunks } = &node.kind else { panic!("not a file") };
    let pack = repo.index().get(&chunks[0]).unwrap().pack;
    repo.backend().remove(&ObjectKey::Pack(pack)).unwrap();
    format!("{}/sub/own", latest.paths[0])
}

#[test]
fn prune_refuses_when_a_used_blob_is_missing_and_repair_snapshots_recovers_the_rest() {
    let fx = Fixture::new();
    let dir = fx.copy("repair-snapshots");
    let lost = remove_one_pack_used_by_latest(&dir);
    let repo = open(&dir);
    let before = walk(&dir).len();
    let err = prune(&repo, &prune_opts(), &PruneProgress::default()).unwrap_err();
    assert!(matches!(err, PruneError::Damaged(_)), "{err}");
    assert_eq!(walk(&dir).len(), before, "a refused prune deletes nothing");

    let report = check(&repo, CheckOptions::default(), &Default::default()).unwrap();
    assert!(report.has_damage());
    assert!(report.damaged_files.iter().any(|f| f.path == lost), "{:?}", report.damaged_files);

    let dry = repair_snapshots(&repo, false, false, true, Default::default()).unwrap();
    assert_eq!(dry.len(), 1);
    // The lost pack may hold other new chunks of that backup too.
    let dropped = dry[0].dropped.clone();
    assert!(dropped.contains(&lost), "{dropped:?}");
    let done = repair_snapshots(&repo, false, true, false, Default::default()).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].dropped, dropped);
    let (_, snap) = repo.find_snapshot(&done[0].new.unwrap().to_hex()).unwrap();
    assert!(snap.tags.contains(&"repaired".to_string()));
    assert!(repo.find_snapshot(&done[0].old.to_hex()).is_err(), "--forget removed the original");
    // Prune now succeeds and drops the missing pack from the index.
    prune(&repo, &prune_opts(), &PruneProgress::default()).unwrap();
    let report = check(&repo, CheckOptions::default(), &Default::default()).unwrap();
    assert!(!report.has_damage(), "{:?}", report.problems);
    // Everything but the dropped files restores exactly.
    let target = dir.with_extension("restore");
    let r = restore(&repo, &snap, &target, &RestoreOptions::default(), &RestoreProgress::default()).unwrap();
    assert!(r.damaged.is_empty());
    let src = Path::new(&snap.paths[0]);
    for rel in ["shared", "note", "sub/own"] {
        let path = src.join(rel);
        let out = restored(&target, &path);
        if dropped.contains(&path.display().to_string()) {
            assert!(!out.exists(), "{rel}");
        } else {
            assert_eq!(std::fs::read(out).unwrap(), std::fs::read(&path).unwrap(), "{rel}");
        }
    }
}

#[test]
fn repair_index_rebuilds_a_lost_index_from_the_packs() {
    let fx = Fixture::new();
    let dir = fx.copy("repair-index");
    std::fs::remove_dir_all(dir.join("index")).unwrap();
    std::fs::create_dir(dir.join("index")).unwrap();
    let repo = open(&dir);
    assert!(check(&repo, CheckOptions::default(), &Default::default()).unwrap().has_damage());
    let r = repair_index(&repo, Default::default()).unwrap();
    assert!(r.packs > 0 && r.unreadable_packs.is_empty(), "{r:?}");
    drop(repo);
    verify(&dir, &fx.snapshots, "after repair index");
}

#[test]
fn a_backup_opened_before_a_prune_does_not_dedup_against_pruned_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let data = dir.path().join("data");
    let a = Repository::init(Arc::new(LocalBackend::create(&repo_dir).unwrap()), PW, &init_opts()).unwrap();
    backup_gen(&a, &data, 1).unwrap();
    // Another process forgets everything and prunes: gen 1's data is deleted.
    let b = open(&repo_dir);
    backup_gen(&b, &data, 2).unwrap();
    forget(&b, &Policy { tags: vec!["none".into()], ..Policy::default() }, GroupBy::default(), false).unwrap();
    prune(&b, &prune_opts(), &PruneProgress::default()).unwrap();
    // `a` still has gen 1's chunks in its in-memory index.
    let id = backup_gen(&a, &data, 1).unwrap();
    verify(&repo_dir, &BTreeSet::from([id]), "backup after a concurrent prune");
}

#[test]
fn a_live_exclusive_lock_blocks_backup_and_prune() {
    let fx = Fixture::new();
    let dir = fx.copy("locked");
    let repo = open(&dir);
    let mut lock = LockFile::for_this_process(LockKind::Exclusive);
    lock.hostname = "elsewhere".into();
    let id = chunkvault::id::LockId::random();
    repo.backend().put(&ObjectKey::Lock(id), &lock.encode()).unwrap();
    let err = backup_gen(&repo, &fx.data(), 50).unwrap_err();
    assert!(matches!(err, BackupError::Lock(_)), "{err}");
    assert!(matches!(prune(&repo, &prune_opts(), &PruneProgress::default()), Err(PruneError::Lock(_))));
    repo.backend().remove(&ObjectKey::Lock(id)).unwrap();
    backup_gen(&repo, &fx.data(), 50).unwrap();
    assert_eq!(repo.backend().list(FileType::Lock).unwrap(), vec![], "the backup released its lock");
}

#[test]
fn stats_and_diff_report_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let repo =
        Repository::init(Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap()), PW, &init_opts()).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d/e")).unwrap();
    std::fs::write(src.join("same"), pseudo_random(50_000, 1)).unwrap();
    std::fs::write(src.join("edit"), b"old").unwrap();
    std::fs::write(src.join("gone"), b"bye").unwrap();
    std::fs::write(src.join("d/e/deep"), b"deep").unwrap();
    std::fs::write(src.join("chmod"), b"mode").unwrap();
    let one = backup(&repo, &[&src], &BackupOptions::default(), &BackupProgress::default()).unwrap();
    let s = stats(&repo).unwrap();
    assert_eq!(s.snapshots, 1);
    assert_eq!(s.logical_bytes, 50_000 + 3 + 3 + 4 + 4);
    // Two identical snapshots: twice the logical size, the same chunks.
    let two = backup(&repo, &[&src], &BackupOptions::default(), &BackupProgress::default()).unwrap();
    let s2 = stats(&repo).unwrap();
    assert_eq!((s2.logical_bytes, s2.chunks, s2.chunk_bytes), (2 * s.logical_bytes, s.chunks, s.chunk_bytes));
    assert!((s2.dedup_ratio - 2.0 * s.dedup_ratio).abs() < 1e-9);
    let p = |rel: &str| format!("{}/{rel}", src.display());
    // Only below the source: its ancestors' mtimes are not this test's.
    let below = |changes: Vec<Difference>| -> Vec<Difference> {
        changes.into_iter().filter(|d| d.path.starts_with(&p(""))).collect()
    };
    assert_eq!(below(diff(&repo, &one.snapshot, &two.snapshot).unwrap()), vec![]);

    std::fs::write(src.join("edit"), b"new content").unwrap();
    std::fs::remove_file(src.join("gone")).unwrap();
    std::fs::remove_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("added"), b"hi").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("chmod"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let three = backup(&repo, &[&src], &BackupOptions::default(), &BackupProgress::default()).unwrap();
    let changes = below(diff(&repo, &one.snapshot, &three.snapshot).unwrap());
    let expected = vec![
        Difference { path: p("added"), change: Change::Added },
        Difference { path: p("chmod"), change: Change::MetadataChanged },
        Difference { path: p("d"), change: Change::Removed },
        Difference { path: p("d/e"), change: Change::Removed },
        Difference { path: p("d/e/deep"), change: Change::Removed },
        Difference { path: p("edit"), change: Change::Modified },
        Difference { path: p("gone"), change: Change::Removed },
    ];
    assert_eq!(changes, expected);
}
