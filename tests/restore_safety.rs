//! Restore never destroys what it did not write, and `latest` never quietly
//! means an older snapshot (issue 11, findings 1 and 4; forget and repair of
//! unreadable manifests, finding 5's maintenance side).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chunkvault::backend::{Backend, Fault, FaultyBackend, FileType, LocalBackend, ObjectKey};
use chunkvault::backup::{backup, BackupOptions, BackupProgress};
use chunkvault::crypto::KdfParams;
use chunkvault::repo::{InitOptions, Repository};
use chunkvault::restore::{restore, Overwrite, RestoreOptions, RestoreProgress};
use common::{pseudo_random, restored, Env};
use proptest::prelude::*;

fn data_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("hello.txt"), b"hello from the snapshot\n").unwrap();
    fs::write(root.join("sub/numbers.txt"), "1 2 3\n".repeat(1000)).unwrap();
    fs::write(root.join("sub/big.bin"), pseudo_random(3 << 20, 7)).unwrap();
    symlink("hello.txt", root.join("link")).unwrap();
}

/// Every file below `root` that looks like a restore's temporary file.
fn temporaries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".chunkvault-") {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_directory_in_the_way_fails_that_file_and_leaves_every_other_file_whole() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    env.backup(&src);
    let target = env.path("T");
    let at = restored(&target, &src);
    fs::create_dir_all(at.join("sub/numbers.txt")).unwrap();
    fs::write(at.join("hello.txt"), b"precious old content\n").unwrap();
    fs::write(at.join("sub/big.bin"), b"old big\n").unwrap();

    let out = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("numbers.txt"));
    // Every other file is exactly the snapshot's (never NUL runs), the
    // directory in the way is untouched, and no temporary file is left.
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), fs::read(src.join("hello.txt")).unwrap());
    assert_eq!(fs::read(at.join("sub/big.bin")).unwrap(), fs::read(src.join("sub/big.bin")).unwrap());
    assert!(at.join("sub/numbers.txt").is_dir());
    assert_eq!(temporaries(&target), Vec::<PathBuf>::new());
}

#[test]
fn a_symlink_in_place_of_a_directory_is_refused_before_anything_is_written() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    env.backup(&src);
    let elsewhere = env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let target = env.path("T");
    let at = restored(&target, &src);
    fs::create_dir_all(&at).unwrap();
    fs::write(at.join("hello.txt"), b"precious\n").unwrap();
    symlink(&elsewhere, at.join("sub")).unwrap();

    let out = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing written through the link");
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), b"precious\n");
    assert_eq!(temporaries(&target), Vec::<PathBuf>::new());
}

#[test]
fn a_symlink_in_place_of_a_file_is_replaced_not_followed() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    env.backup(&src);
    let outside = env.path("outside.txt");
    fs::write(&outside, b"not yours\n").unwrap();
    let target = env.path("T");
    let at = restored(&target, &src);
    fs::create_dir_all(&at).unwrap();
    symlink(&outside, at.join("hello.txt")).unwrap();

    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(fs::read(&outside).unwrap(), b"not yours\n");
    assert!(!fs::symlink_metadata(at.join("hello.txt")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), fs::read(src.join("hello.txt")).unwrap());
}

#[test]
fn overwrite_never_if_changed_and_always() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    env.backup(&src);
    let target = env.path("T");
    let t = target.to_str().unwrap();
    env.ok(&["restore", "latest", "--target", t]);
    let at = restored(&target, &src);
    fs::write(at.join("hello.txt"), b"edited locally\n").unwrap();
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let numbers_inode = inode(&at.join("sub/numbers.txt"));

    let r = env.json(&["restore", "latest", "--target", t, "--overwrite", "never"]);
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), b"edited locally\n");
    assert_eq!(r["files"], 0);
    assert_eq!(r["skipped"], 4);

    let r = env.json(&["restore", "latest", "--target", t, "--overwrite", "if-changed"]);
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), fs::read(src.join("hello.txt")).unwrap());
    assert_eq!(r["files"], 1, "only the edited file is written: {r}");
    assert_eq!(inode(&at.join("sub/numbers.txt")), numbers_inode, "unchanged file left in place");

    let r = env.json(&["restore", "latest", "--target", t, "--overwrite", "always"]);
    assert_eq!(r["files"], 3);
    assert_ne!(inode(&at.join("sub/numbers.txt")), numbers_inode, "replaced by a fresh, complete copy");
    let bad = env.run(&["restore", "latest", "--target", t, "--overwrite", "sometimes"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn latest_refuses_while_a_snapshot_cannot_be_read_and_forget_by_id_removes_it() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    env.backup(&src);
    fs::write(src.join("hello.txt"), b"second version\n").unwrap();
    let newest = env.backup(&src)["snapshot"].as_str().unwrap().to_owned();
    // Damage the newest manifest: `latest` must not fall back to the older.
    let backend = env.backend();
    let key = backend
        .list(FileType::Snapshot)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| matches!(k, ObjectKey::Snapshot(id) if id.to_hex() == newest))
        .unwrap();
    let mut bytes = backend.get(&key).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    let path = env.repo.join("snapshots").join(&newest);
    assert!(path.exists(), "local layout: {path:?}");
    fs::write(&path, &bytes).unwrap();

    let target = env.path("T");
    let file = format!("{}/hello.txt", src.display());
    for args in [
        vec!["restore", "latest", "--target", target.to_str().unwrap()],
        vec!["cat", "latest", file.as_str()],
        vec!["ls", "latest"],
        vec!["cat", "latest", file.as_str(), "-q"],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&newest), "{args:?} names the snapshot");
        assert!(out.stdout.is_empty(), "{args:?} printed nothing of an older snapshot");
    }
    assert!(!target.exists());
    let check = env.run(&["check"]);
    assert_eq!(check.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains(&newest)
            || String::from_utf8_lossy(&check.stderr).contains(&newest)
    );

    let r = env.json(&["forget", &newest[..12]]);
    assert_eq!(r["removed"], 1);
    env.ok(&["check"]);
    assert_eq!(env.ok(&["cat", "latest", &file]).as_bytes(), b"hello from the snapshot\n");
    // Neither ids and policies together, nor nothing at all.
    assert_eq!(env.run(&["forget"]).status.code(), Some(2));
    assert_eq!(env.run(&["forget", "abcd", "--keep-last", "1"]).status.code(), Some(2));
    assert_eq!(env.run(&["forget", "ffffffffffff"]).status.code(), Some(1));
}

#[test]
fn repair_snapshots_forget_removes_an_unreadable_manifest() {
    let env = Env::new();
    let src = env.path("data");
    data_tree(&src);
    let id = env.backup(&src)["snapshot"].as_str().unwrap().to_owned();
    let path = env.repo.join("snapshots").join(&id);
    fs::write(&path, b"not a sealed manifest").unwrap();
    let dry = env.json(&["repair", "snapshots", "--dry-run"]);
    assert_eq!(dry["snapshots"][0]["old"], id.as_str());
    assert!(dry["snapshots"][0]["unreadable"].is_string());
    assert!(path.exists());
    env.ok(&["repair", "snapshots", "--forget"]);
    assert!(!path.exists());
    env.ok(&["check"]);
}

// ---- the property: a restore that fails anywhere destroys nothing ----

const PW: &[u8] = b"pw";

#[derive(Clone, Debug)]
enum Pre {
    File(Vec<u8>),
    Dir,
    Link(String),
}

/// What was in the target before, or what the snapshot has, by relative path.
fn snapshot_of(root: &Path) -> BTreeMap<PathBuf, Pre> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            let t = e.file_type().unwrap();
            if t.is_symlink() {
                out.insert(rel, Pre::Link(fs::read_link(e.path()).unwrap().to_string_lossy().into_owned()));
            } else if t.is_dir() {
                out.insert(rel, Pre::Dir);
                stack.push(e.path());
            } else {
                out.insert(rel, Pre::File(fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

fn same(a: &Pre, b: &Pre) -> bool {
    match (a, b) {
        (Pre::File(x), Pre::File(y)) => x == y,
        (Pre::Dir, Pre::Dir) => true,
        (Pre::Link(x), Pre::Link(y)) => x == y,
        _ => false,
    }
}

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn source_tree(root: &Path, seed: u64) {
    fs::create_dir_all(root).unwrap();
    for (i, n) in NAMES.iter().enumerate() {
        let s = seed + i as u64;
        match s % 3 {
            0 => {
                fs::create_dir_all(root.join(n)).unwrap();
                fs::write(root.join(n).join("inner"), pseudo_random(200_000 + (s as usize % 5) * 90_000, s)).unwrap();
            }
            1 => fs::write(root.join(n), pseudo_random(50_000 + (s as usize % 7) * 150_000, s)).unwrap(),
            _ => fs::write(root.join(n), format!("small {s}\n")).unwrap(),
        }
    }
    symlink("a", root.join("ln")).unwrap();
}

fn prefill(at: &Path, kinds: &[u8]) {
    fs::create_dir_all(at).unwrap();
    for (n, k) in NAMES.iter().chain(["ln", "other"].iter()).zip(kinds) {
        match k % 4 {
            0 => {}
            1 => fs::write(at.join(n), format!("pre-existing {n}\n")).unwrap(),
            2 => {
                fs::create_dir_all(at.join(n)).unwrap();
                fs::write(at.join(n).join("inner"), b"pre-existing inner\n").unwrap();
            }
            _ => symlink("/nonexistent", at.join(n)).unwrap(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// A target pre-filled with files, directories and symlinks, and a
    /// restore that fails part-way (a read fault after N operations, or a
    /// flipped byte in a pack): every pre-existing entry is unchanged or
    /// equal to the snapshot's, and no temporary file remains.
    #[test]
    fn a_failing_restore_never_destroys_and_leaves_no_temporaries(
        seed in 0u64..1000,
        kinds in prop::collection::vec(0u8..4, 8),
        fail_after in 0usize..12,
        flip in any::<bool>(),
        offset in 0usize..2_000_000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
        let faulty = Arc::new(FaultyBackend::new(inner));
        let opts = InitOptions {
            kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 },
            pack_size: 1 << 20,
            ..InitOptions::default()
        };
        let repo = Repository::init(faulty.clone(), PW, &opts).unwrap();
        let src = dir.path().join("src");
        source_tree(&src, seed);
        let done = backup(&repo, std::slice::from_ref(&src), &BackupOptions::default(), &BackupProgress::default()).unwrap();
        let want = snapshot_of(&src);

        let target = dir.path().join("T");
        let at = restored(&target, &src);
        prefill(&at, &kinds);
        let before = snapshot_of(&at);
        if flip {
            faulty.inject(Fault::FlipOnRead { file_type: FileType::Pack, offset });
        } else {
            faulty.inject(Fault::FailAfter { ops: fail_after });
        }
        let ropts = RestoreOptions { overwrite: Overwrite::Always, ..RestoreOptions::default() };
        let _ = restore(&repo, &done.snapshot, &target, &ropts, &RestoreProgress::default());
        faulty.clear();

        let after = snapshot_of(&at);
        for (rel, old) in &before {
            let now = after.get(rel);
            let ok = match now {
                Some(now) => same(now, old) || want.get(rel).is_some_and(|w| same(now, w)),
                // Gone is only allowed where the snapshot's entry replaced a parent.
                None => false,
            };
            prop_assert!(ok, "{rel:?} was {old:?}, is now {now:?}");
        }
        for (rel, now) in &after {
            if !before.contains_key(rel) {
                prop_assert!(want.get(rel).is_some_and(|w| same(now, w)), "{rel:?} is new but not the snapshot's: {now:?}");
            }
        }
        prop_assert_eq!(temporaries(&target), Vec::<PathBuf>::new());
    }
}
