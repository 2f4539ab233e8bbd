//! The library API end to end, with hostile snapshots and injected faults.

mod common;

use std::path::Path;
use std::sync::Arc;

use chunkvault::backend::{Backend, Fault, FaultyBackend, FileType, LocalBackend};
use chunkvault::backup::{backup, backup_stream, BackupOptions, BackupProgress, NamedFile, ParentChoice};
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

/// For every write point of a backup: fail it (and tear it, for packs: the
/// local backend's rename makes every other object atomic), then require that the
/// committed snapshot still restores exactly, no partial snapshot appears,
/// and the next backup succeeds.
#[test]
fn a_failed_write_at_any_point_of_a_backup_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
    let faulty = Arc::new(FaultyBackend::new(local.clone()));
    let repo = init(faulty.clone());
    let first = dir.path().join("first");
    sample_tree(&first, 1);
    let committed = backup(&repo, &[&first], &BackupOptions::default(), &BackupProgress::default()).unwrap();

    let second = dir.path().join("second");
    sample_tree(&second, 100);
    let opts = BackupOptions { parent: ParentChoice::None, ..BackupOptions::default() };
    let before = faulty.puts();
    // A throwaway repository measures how many puts the second backup makes.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe_backend =
        Arc::new(FaultyBackend::new(Arc::new(LocalBackend::create(&probe_dir.path().join("repo")).unwrap())));
    let probe = init(probe_backend.clone());
    let probe_start = probe_backend.puts();
    backup(&probe, &[&second], &opts, &BackupProgress::default()).unwrap();
    let write_points = probe_backend.puts() - probe_start;
    assert!(write_points >= 4, "{write_points} write points");
    let pack_points = probe_backend.list(FileType::Pack).unwrap().len();
    let faults = (0..write_points)
        .map(|k| Fault::FailPut { nth: k, file_type: None })
        .chain((0..pack_points).map(|k| Fault::TornPut { nth: k, file_type: Some(FileType::Pack), keep: 10 }));
    assert_eq!(faulty.puts(), before);

    for (k, fault) in faults.enumerate() {
        faulty.clear();
        faulty.inject(fault.clone());
        let repo = Repository::open(faulty.clone(), PW).unwrap();
        let result = backup(&repo, &[&second], &opts, &BackupProgress::default());
        assert!(result.is_err(), "{fault:?}: the backup must fail");
        faulty.clear();
        let repo = Repository::open(faulty.clone(), PW).unwrap_or_else(|e| panic!("{fault:?}: reopen: {e}"));
        let snaps = repo.list_snapshots().unwrap_or_else(|e| panic!("{fault:?}: list: {e}"));
        assert_eq!(snaps.len(), 1, "{fault:?}: only the committed snapshot exists");
        let target = dir.path().join(format!("restore-{k}"));
        let report =
            restore(&repo, &committed.snapshot, &target, &RestoreOptions::default(), &RestoreProgress::default())
                .unwrap();
        assert!(report.damaged.is_empty(), "{fault:?}");
        assert_same_tree(&first, &restored(&target, &first));
        std::fs::remove_dir_all(&target).unwrap();
    }
    let repo = Repository::open(faulty.clone(), PW).unwrap();
    let next = backup(&repo, &[&second], &opts, &BackupProgress::default()).unwrap();
    let target = dir.path().join("restore-next");
    restore(&repo, &next.snapshot, &target, &RestoreOptions::default(), &RestoreProgress::default()).unwrap();
    assert_same_tree(&second, &restored(&target, &second));
    let report =
        chunkvault::check::check(&repo, chunkvault::check::CheckOptions { read_data: true }, &Default::default())
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
