//! The real binary killed with SIGKILL at random moments of backup and
//! prune, and separate processes racing each other. After every kill: check
//! finds no damage, every snapshot restores exactly to its source, and the
//! next operation succeeds.
//!
//! `CHUNKVAULT_CRASH_ITERATIONS` raises the number of kills (default 50).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkvault::backend::LocalBackend;
use chunkvault::id::SnapshotId;
use chunkvault::repo::Repository;
use common::{assert_repository_intact, Env, PASSWORD};
use rand::{RngExt, SeedableRng};

fn make_gen(base: &Path, i: u64) -> PathBuf {
    common::make_gen(base, i, 300_000, 200_000)
}

/// A repository with small chunks and packs, so every run writes several packs.
fn small_env() -> Env {
    let env = Env::uninit();
    env.ok(&[
        "init",
        "--kdf-memory-kib",
        "1024",
        "--kdf-iterations",
        "1",
        "--chunk-avg",
        "16384",
        "--pack-size-mib",
        "1",
    ]);
    env
}

/// The repository is intact (see `assert_repository_intact`); returns its snapshots.
fn verify(env: &Env, why: &str) -> BTreeSet<SnapshotId> {
    let repo = Repository::open(Arc::new(LocalBackend::open(&env.repo).unwrap()), PASSWORD.as_bytes()).unwrap();
    assert_repository_intact(&repo, false, &env.path("verify"), why).1
}

fn spawn(env: &Env, args: &[&str]) -> Child {
    env.cmd().args(args).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn")
}

/// Runs `args` to completion and returns how long it took.
fn timed(env: &Env, args: &[&str]) -> Duration {
    let start = Instant::now();
    env.ok(args);
    start.elapsed()
}

#[test]
fn sigkill_at_random_moments_of_backup_and_prune_loses_nothing_committed() {
    let iterations: usize =
        std::env::var("CHUNKVAULT_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("CHUNKVAULT_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = small_env();
    let data = env.path("data");
    // Calibrate: how long a clean backup and a clean prune take here.
    let mut backup_time = Duration::ZERO;
    for i in 0..3 {
        let src = make_gen(&data, i);
        backup_time = backup_time.max(timed(&env, &["backup", src.to_str().unwrap()]));
    }
    env.ok(&["forget", "--group-by", "host", "--keep-last", "2"]);
    let prune_time = timed(&env, &["prune", "--max-unused-percent", "5"]);
    let mut committed = verify(&env, "setup");

    let (mut killed, mut finished) = (0, 0);
    for i in 0..iterations {
        let is_backup = i % 2 == 0;
        let src;
        let (args, budget): (Vec<&str>, Duration) = if is_backup {
            src = make_gen(&data, 10 + i as u64);
            (vec!["backup", src.to_str().unwrap()], backup_time)
        } else {
            // Give the prune something to do: forget all but the two newest.
            env.ok(&["forget", "--group-by", "host", "--keep-last", "2"]);
            committed = verify(&env, "after forget");
            (vec!["prune", "--max-unused-percent", "5"], prune_time)
        };
        let mut child = spawn(&env, &args);
        let delay = Duration::from_micros(rng.random_range(0..budget.as_micros() as u64 + 1));
        std::thread::sleep(delay);
        let was_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if was_running {
            killed += 1;
        } else {
            finished += 1;
        }
        let why = format!("iteration {i} ({}, killed after {delay:?}, {status})", args[0]);
        // A killed backup may or may not have committed; nothing else changes.
        let now = verify(&env, &why);
        let new: Vec<_> = now.difference(&committed).collect();
        assert!(committed.is_subset(&now), "{why}: a committed snapshot disappeared");
        assert!(is_backup || new.is_empty(), "{why}: a prune made a snapshot");
        assert!(new.len() <= 1, "{why}: {new:?}");
        committed = now;
    }
    eprintln!("{iterations} iterations: {killed} killed mid-run, {finished} finished before the kill");
    // The next operations succeed and leave a clean repository.
    let src = make_gen(&data, 999);
    env.ok(&["backup", src.to_str().unwrap()]);
    env.ok(&["prune", "--max-unused-percent", "5"]);
    let out = env.json(&["check", "--read-data"]);
    assert_eq!(out["problems"].as_array().unwrap().len(), 0, "{out}");
    verify(&env, "at the end");
    assert!(killed >= iterations / 4, "only {killed} of {iterations} runs were killed mid-run");
}

#[test]
fn two_backups_from_separate_processes_at_once_both_restore() {
    let env = small_env();
    let data = env.path("data");
    let (a, b) = (make_gen(&data, 1), make_gen(&data, 2));
    let children = [spawn(&env, &["backup", a.to_str().unwrap()]), spawn(&env, &["backup", b.to_str().unwrap()])];
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let ids = verify(&env, "two concurrent backups");
    assert_eq!(ids.len(), 2);
}

#[test]
fn a_backup_racing_a_prune_from_separate_processes_loses_nothing() {
    let env = small_env();
    let data = env.path("data");
    for i in 0..4 {
        env.ok(&["backup", make_gen(&data, i).to_str().unwrap()]);
    }
    env.ok(&["forget", "--group-by", "host", "--keep-last", "1"]);
    for round in 0..3 {
        let src = make_gen(&data, 100 + round);
        // Each waits for the other's lock as long as it needs.
        let mut prune = spawn(&env, &["prune", "--retry-lock", "120", "--max-unused-percent", "0"]);
        let mut backup = spawn(&env, &["backup", "--retry-lock", "120", src.to_str().unwrap()]);
        assert!(backup.wait().unwrap().success(), "round {round}: backup");
        assert!(prune.wait().unwrap().success(), "round {round}: prune");
        let ids = verify(&env, &format!("round {round}"));
        env.ok(&["forget", "--group-by", "host", "--keep-last", "1"]);
        assert!(ids.len() >= 2);
    }
}
