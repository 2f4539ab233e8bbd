//! The library API end to end, with hostile snapshots and injected faults.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chunkvault::backend::{Backend, Fault, FaultyBackend, FileType, LocalBackend};
use chunkvault::backup::{backup, backup_stream, BackupOptions, BackupProgress, NamedFile, ParentChoice};
use chunkvault::check::CheckOptions;
use chunkvault::crypto::KdfParams;
use chunkvault::id::BlobKind;
use chunkvault::packer::Packer;
use chunkvault::repo::{InitOptions, RepoError, Repository};
use chunkvault::restore::{cat, restore, RestoreError, RestoreOptions, RestoreProgress};
use chunkvault::snapshot::Snapshot;
use chunkvault::tree::Timestamp;
use common::{assert_same_tree, pseudo_random, restored};

const PW: &[u8] = b"pw";

fn init(backend: Arc<dyn Backend>) -> Repository {
    let opts = InitOptions {
        kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 },
        pack_size: 1 << 20,
        ..InitOptions::default()
    };
    Repository::init(backend, PW, &opts).unwrap()
}

fn sample_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/one"), pseudo_random(1_500_000, seed)).unwrap();
    std::fs::write(root.join("a/b/two"), pseudo_random(700_000, seed + 1)).unwrap();
    std::fs::write(root.join("three"), b"three\n".repeat(10_000)).unwrap();
}

/// Hand-encodes a tree blob holding one empty file called `name`,
/// bypassing `Tree::new`'s validation, as a hostile writer would.
fn raw_tree_with_name(name: &[u8]) -> Vec<u8> {
    let mut t = b"CVTR".to_vec();
    t.push(1);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.push(1); // file
    t.extend_from_slice(&(name.len() as u16).to_le_bytes());
    t.extend_from_slice(name);
    t.extend_from_slice(&0o100644u32.to_le_bytes());
    t.extend_from_slice(&[0; 8]); // uid, gid
    t.extend_from_slice(&[0; 24]); // mtime, ctime
    t.extend_from_slice(&[0; 16]); // inode, size
    t.extend_from_slice(&0u32.to_le_bytes()); // no chunks
    t
}

#[test]
fn restore_refuses_entry_escaping_target() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap()));
    let target = dir.path().join("deep/target");
    for evil in [&b".."[..], b"../escaped", b"/etc/escaped", b"a/../../escaped", b"nul\0byte"] {
        let packer = Packer::new(&repo, 1);
        let (tree, _) = packer.save(BlobKind::Tree, &raw_tree_with_name(evil)).unwrap();
        packer.finish().unwrap();
        let mut snap = sample_snapshot();
        snap.tree = tree;
        let err = restore(&repo, &snap, &target, &RestoreOptions::default(), &RestoreProgress::default()).unwrap_err();
        assert!(
            matches!(err, RestoreError::Repo(RepoError::Tree(..)) | RestoreError::UnsafeName(_)),
            "{evil:?}: {err}"
        );
    }
    assert!(!dir.path().join("deep/escaped").exists());
    assert!(!dir.path().join("escaped").exists());
    assert!(!Path::new("/etc/escaped").exists());
}

fn sample_snapshot() -> Snapshot {
    Snapshot {
        time: chrono::Local::now().fixed_offset(),
        hostname: "h".into(),
        username: "u".into(),
        tenant: None,
        user: None,
        device: None,
        tags: vec![],
        paths: vec!["/".into()],
        tree: chunkvault::id::BlobId([0; 32]),
        parent: None,
        original: None,
        summary: Default::default(),
        program_version: "test".into(),
    }
}

#[test]
fn stream_backup_roundtrips_through_cat() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap()));
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(300_000 * i + 17, i as u64)).collect();
    let files = contents.iter().enumerate().map(|(i, c)| NamedFile {
        path: format!("x/y/file{i}"),
        reader: std::io::Cursor::new(c.clone()),
        mode: 0o640,
        mtime: Timestamp { sec: 1_700_000_000, nsec: 5 },
    });
    let (_, snap) = backup_stream(&repo, files, &BackupOptions::default()).unwrap();
    for (i, c) in contents.iter().enumerate() {
        let node = repo.find_node(&snap.tree, &format!("x/y/file{i}")).unwrap().unwrap();
        let mut out = Vec::new();
        cat(&repo, &node, None, &mut out).unwrap();
        assert!(out == *c, "file{i}");
    }
    let bad = NamedFile { path: "../evil".into(), reader: std::io::empty(), mode: 0o600, mtime: Timestamp::default() };
    assert!(backup_stream(&repo, [bad], &BackupOptions::default()).is_err());
}

/// Restores every committed snapshot and compares it with its source.
fn assert_all_restore(repo: &Repository, committed: &[(Snapshot, PathBuf)], scratch: &Path, why: &str) {
    for (snap, src) in committed {
        let target = scratch.join("verify");
        let report = restore(repo, snap, &target, &RestoreOptions::default(), &RestoreProgress::default())
            .unwrap_or_else(|e| panic!("{why}: restore: {e}"));
        assert!(report.damaged.is_empty(), "{why}: {:?}", report.damaged);
        assert_same_tree(src, &restored(&target, src));
        std::fs::remove_dir_all(&target).unwrap();
    }
}

/// Fails each write point of a backup in turn (the k-th put, for k = 0, 1,
/// ... until a backup gets past every write and commits), and tears each
/// pack write likewise (the local backend's rename makes every other object
/// atomic). After every fault: the backup reports an error, the repository
/// opens, no partial snapshot appears, and every committed snapshot restores
/// exactly. Finally `check --read-data` finds no damage.
#[test]
fn a_failed_write_at_any_point_of_a_backup_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
    let faulty = Arc::new(FaultyBackend::new(local));
    let repo = init(faulty.clone());
    let first = dir.path().join("first");
    sample_tree(&first, 1);
    let done = backup(&repo, &[&first], &BackupOptions::default(), &BackupProgress::default()).unwrap();
    let mut committed = vec![(done.snapshot, first)];
    let opts = BackupOptions { parent: ParentChoice::None, ..BackupOptions::default() };

    type MakeFault = fn(usize) -> Fault;
    let kinds: [(&str, MakeFault); 2] = [
        ("fail", |k| Fault::FailPut { nth: k, file_type: None }),
        ("tear pack", |k| Fault::TornPut { nth: k, file_type: Some(FileType::Pack), keep: 10 }),
    ];
    for (round, (name, make)) in kinds.iter().enumerate() {
        // Fresh content each round, so the round's writes are not deduplicated away.
        let src = dir.path().join(format!("source-{round}"));
        sample_tree(&src, 100 * (round as u64 + 1));
        let mut failures = 0;
        for k in 0.. {
            let fault = make(k);
            faulty.clear();
            faulty.inject(fault.clone());
            let repo = Repository::open(faulty.clone(), PW).unwrap();
            let result = backup(&repo, &[&src], &opts, &BackupProgress::default());
            faulty.clear();
            let repo = Repository::open(faulty.clone(), PW).unwrap_or_else(|e| panic!("{fault:?}: reopen: {e}"));
            let snaps = repo.list_snapshots().unwrap_or_else(|e| panic!("{fault:?}: list: {e}"));
            match result {
                Ok(done) => {
                    committed.push((done.snapshot, src.clone()));
                    assert_eq!(snaps.len(), committed.len());
                    break;
                }
                Err(_) => {
                    failures += 1;
                    assert_eq!(snaps.len(), committed.len(), "{fault:?}: no partial snapshot");
                    assert_all_restore(&repo, &committed, dir.path(), &format!("{fault:?}"));
                }
            }
        }
        assert!(failures >= 2, "{name}: only {failures} write points were exercised");
    }
    let repo = Repository::open(faulty.clone(), PW).unwrap();
    assert_all_restore(&repo, &committed, dir.path(), "after all faults");
    let report = chunkvault::check::check(
        &repo,
        CheckOptions { read_data: true, ..CheckOptions::default() },
        &Default::default(),
    )
    .unwrap();
    assert!(!report.has_damage(), "{:?}", report.problems);
}

#[test]
fn a_flipped_byte_on_read_fails_the_restore_of_the_files_it_touches() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
    let faulty = Arc::new(FaultyBackend::new(local));
    let repo = init(faulty.clone());
    let src = dir.path().join("src");
    sample_tree(&src, 5);
    let done = backup(&repo, &[&src], &BackupOptions::default(), &BackupProgress::default()).unwrap();
    faulty.inject(Fault::FlipOnRead { file_type: FileType::Pack, offset: 100 });
    let target = dir.path().join("restore");
    let report = restore(&repo, &done.snapshot, &target, &RestoreOptions::default(), &RestoreProgress::default());
    // Either the tree reads fail (the whole restore fails) or data blobs do
    // (the files are reported); never a silent success.
    match report {
        Err(e) => assert!(matches!(e, RestoreError::Repo(ref r) if r.is_damage()), "{e}"),
        Ok(r) => assert!(!r.damaged.is_empty()),
    }
}
