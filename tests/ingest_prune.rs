//! A storage node's tenant writer against prunes of its repository run by
//! another handle (as `chunkvault prune` in another process would): the
//! writer holds the shared lock while it has work, releases it when idle,
//! and never commits a snapshot naming data a prune deleted.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chunkvault::api::{CommitRequest, ManifestFile};
use chunkvault::backend::{Backend, ObjectKey};
use chunkvault::check::{check, CheckOptions};
use chunkvault::crypto::KdfParams;
use chunkvault::id::BlobId;
use chunkvault::ingest::{IngestError, Owner, Tenant, TenantName, Tenants, WriterTiming};
use chunkvault::lock::{list_locks, LockError, LockOptions};
use chunkvault::prune::{prune, PruneError, PruneOptions, PruneProgress};
use chunkvault::repo::{open_backend, InitOptions, Repository};
use common::pseudo_random;

const PW: &[u8] = b"pw";

fn tenants(root: &Path, timing: WriterTiming) -> Tenants {
    let init = InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..Default::default() };
    Tenants::new(root.to_str().unwrap(), PW.to_vec(), init).with_writer_timing(timing)
}

/// Another handle on the tenant repository, as a separate process has.
fn other_handle(root: &Path) -> Repository {
    Repository::open(open_backend(root.join("acme").to_str().unwrap(), false).unwrap(), PW).unwrap()
}

fn prune_with_wait(repo: &Repository, wait: Duration) -> Result<(), PruneError> {
    let opts = PruneOptions { lock: LockOptions { wait, ..LockOptions::default() }, ..PruneOptions::default() };
    prune(repo, &opts, &PruneProgress::default()).map(drop)
}

fn acme() -> TenantName {
    TenantName::new("acme").unwrap()
}

fn owner() -> Owner {
    Owner { tenant: acme(), user: "u@example.com".into(), device: "d1".into(), policies: Default::default() }
}

/// Uploads one chunk per seed; returns their ids with their data.
fn put(t: &Tenant, seeds: &[u64]) -> Vec<(BlobId, Vec<u8>)> {
    seeds
        .iter()
        .map(|s| {
            let data = pseudo_random(10_000, *s);
            let id = t.repo().blob_id(&data);
            t.put_chunk(id, data.clone()).unwrap();
            (id, data)
        })
        .collect()
}

/// A snapshot of one file per chunk.
fn commit(t: &Tenant, chunks: &[(BlobId, Vec<u8>)]) -> Result<chunkvault::api::CommitResponse, IngestError> {
    let files = chunks
        .iter()
        .enumerate()
        .map(|(i, (id, data))| ManifestFile {
            kind: chunkvault::api::EntryKind::File,
            target: None,
            path: format!("f{i}"),
            mode: 0o644,
            mtime: 1,
            mtime_nsec: 0,
            size: data.len() as u64,
            chunks: vec![*id],
        })
        .collect();
    t.commit(owner(), CommitRequest { hostname: "h".into(), paths: vec!["/".into()], tags: vec![], files })
}

fn no_locks(backend: &dyn Backend) -> bool {
    list_locks(backend).unwrap().is_empty()
}

/// Polls `cond` until it holds, for at most 30 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_intact(repo: &Repository) {
    let report = check(repo, CheckOptions { read_data: true, ..CheckOptions::default() }, &Default::default()).unwrap();
    assert!(!report.has_damage(), "{:?} {:?}", report.problems, report.damaged_files);
}

/// While the writer holds uploaded chunks it holds the shared lock, so a
/// prune cannot start; once the node lets go (here: it shuts down) prune can.
#[test]
fn a_writer_with_uploaded_chunks_keeps_prune_out() {
    let dir = tempfile::tempdir().unwrap();
    let timing = WriterTiming { idle: Duration::from_secs(3600), ..WriterTiming::default() };
    let node = tenants(dir.path(), timing);
    let t = node.get(&acme()).unwrap();
    put(&t, &[1]);
    let other = other_handle(dir.path());
    assert!(
        matches!(prune_with_wait(&other, Duration::ZERO), Err(PruneError::Lock(LockError::Locked(_)))),
        "prune must not run while the writer holds uploads"
    );
    drop((t, node));
    eventually("the stopped writer's lock to go", || no_locks(other.backend().as_ref()));
    prune_with_wait(&other, Duration::ZERO).unwrap();
}

/// Chunks a device uploaded (flushed when the writer went idle) or that the
/// node's index had when a session asked, then a prune that deletes them
/// because no snapshot names them: a later commit naming them is refused
/// (`missing_chunks`, so the device uploads them again), never committed
/// into deleted packs.
#[test]
fn a_prune_between_sessions_never_leaves_a_snapshot_on_deleted_data() {
    let dir = tempfile::tempdir().unwrap();
    let timing = WriterTiming {
        idle: Duration::from_millis(100),
        lock: LockOptions { wait: Duration::from_secs(30), ..LockOptions::default() },
        ..WriterTiming::default()
    };
    let node = tenants(dir.path(), timing);
    let t = node.get(&acme()).unwrap();
    let other = other_handle(dir.path());

    // Session 1 commits x; another device uploads y and goes away.
    let x = put(&t, &[1]);
    let first = commit(&t, &x).unwrap();
    let y = put(&t, &[2]);
    eventually("the idle writer to release its lock", || no_locks(other.backend().as_ref()));
    assert!(t.missing(&[x[0].0, y[0].0]).is_empty(), "both stored as far as the node knows");

    // The snapshot naming x is forgotten, and a prune deletes x and y.
    other.backend().remove(&ObjectKey::Snapshot(first.id)).unwrap();
    prune_with_wait(&other, Duration::ZERO).unwrap();

    // Session 2 names both without uploading them (the node's index said
    // they were stored): refused, however stale that index was.
    let both = [x.clone(), y.clone()].concat();
    match commit(&t, &both) {
        Err(IngestError::MissingChunks(mut m)) => {
            m.sort();
            let mut want = vec![x[0].0, y[0].0];
            want.sort();
            assert_eq!(m, want);
        }
        other => panic!("a commit on pruned chunks must be refused, got {other:?}"),
    }
    // The device uploads them again and commits.
    put(&t, &[1, 2]);
    let second = commit(&t, &both).unwrap();
    let node_file = t.file(&owner(), &second.id, "f1").unwrap();
    let mut out = Vec::new();
    t.read_file(&node_file, 0, node_file.size, &mut out).unwrap();
    assert_eq!(out, y[0].1);
    eventually("the idle writer to release its lock", || no_locks(other.backend().as_ref()));
    assert_intact(&other_handle(dir.path()));
}

/// A writer that is never idle long enough still lets a waiting prune in:
/// after a commit, once it has held the lock for `max_hold`, it releases it.
#[test]
fn a_busy_writer_lets_a_waiting_prune_in_after_max_hold() {
    let dir = tempfile::tempdir().unwrap();
    let timing = WriterTiming { idle: Duration::from_secs(3600), max_hold: Duration::ZERO, ..WriterTiming::default() };
    let node = tenants(dir.path(), timing);
    let t = node.get(&acme()).unwrap();
    let x = put(&t, &[1]);
    commit(&t, &x).unwrap();
    let other = other_handle(dir.path());
    prune_with_wait(&other, Duration::from_secs(30)).unwrap();
    // Work goes on after the prune: the writer takes the lock again.
    let y = put(&t, &[2]);
    commit(&t, &[x, y].concat()).unwrap();
    drop((t, node));
    eventually("the stopped writer's lock to go", || no_locks(other.backend().as_ref()));
    assert_intact(&other_handle(dir.path()));
}
