//! The real binary, end to end, on a local repository.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use chunkvault::backend::{FileType, ObjectKey};
use common::{assert_same_tree, pseudo_random, restored, set_mtime, Env};

/// Files, directories, symlinks (dangling too), empty files and directories,
/// odd names, permissions and nanosecond mtimes.
fn make_varied_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub dir/ünïcödé ☃")).unwrap();
    fs::create_dir_all(root.join("empty dir")).unwrap();
    fs::write(root.join("empty file"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello\n").unwrap();
    fs::write(root.join("dir/text with spaces.md"), "line of text\n".repeat(5000)).unwrap();
    fs::write(root.join("dir/sub dir/ünïcödé ☃/日本語.bin"), pseudo_random(3 << 20, 1)).unwrap();
    fs::write(root.join("dir/big.bin"), pseudo_random(9 << 20, 2)).unwrap();
    let dup = pseudo_random(2 << 20, 3);
    fs::write(root.join("dir/dup-a"), &dup).unwrap();
    fs::write(root.join("dir/dup-b"), &dup).unwrap();
    symlink("small.txt", root.join("link to small")).unwrap();
    symlink("/nonexistent/target", root.join("dangling link")).unwrap();
    symlink("sub dir", root.join("dir/link-to-dir")).unwrap();
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("dir/big.bin"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("empty file"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(root.join("empty dir"), fs::Permissions::from_mode(0o700)).unwrap();
    for (i, rel) in
        ["small.txt", "dir/big.bin", "empty file", "dangling link", "link to small", "dir/sub dir", "empty dir", "dir"]
            .iter()
            .enumerate()
    {
        set_mtime(&root.join(rel), 1_600_000_000 + i as i64 * 1000, 123_456_789 + i as i64);
    }
}

#[test]
fn every_kind_of_entry_restores_identically() {
    let env = Env::new();
    let src = env.path("src");
    make_varied_tree(&src);
    let snap = env.backup(&src);
    assert_eq!(snap["summary"]["errors"], 0);
    let target = env.path("restore");
    let report = env.json(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(report["damaged"].as_array().unwrap().len(), 0);
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn backup_prints_the_snapshot_id_and_prefixes_resolve() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    let id = env.ok(&["backup", src.to_str().unwrap(), "--tag", "t1", "--host", "h1"]).trim().to_string();
    assert_eq!(id.len(), 64, "stdout is the id: {id:?}");
    let list = env.json(&["snapshots"]);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["tags"][0], "t1");
    assert_eq!(list[0]["hostname"], "h1");
    let ls = env.json(&["ls", &id[..8]]);
    let paths: Vec<&str> = ls.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.iter().any(|p| p.ends_with("/src/a")), "{paths:?}");
    let missing = env.run(&["ls", "ffffffff"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn unchanged_rebackup_grows_repository_by_well_under_one_percent() {
    let env = Env::new();
    let src = env.path("src");
    make_varied_tree(&src);
    env.backup(&src);
    let before = env.repo_size();
    let second = env.backup(&src);
    let after = env.repo_size();
    assert_eq!(second["summary"]["files_unmodified"], 7);
    assert_eq!(second["summary"]["files_new"], 0);
    assert_eq!(second["summary"]["files_changed"], 0);
    assert_eq!(second["summary"]["bytes_read"], 0, "unchanged files are not read again");
    assert!((after - before) * 100 < before, "grew from {before} to {after}");
}

#[test]
fn insertion_in_the_middle_of_a_48_mib_file_adds_only_a_few_chunks() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let mut data = pseudo_random(48 << 20, 7);
    fs::write(src.join("big"), &data).unwrap();
    env.backup(&src);
    let before = env.repo_size();
    data.splice(24 << 20..24 << 20, b"a few inserted bytes".iter().copied());
    fs::write(src.join("big"), &data).unwrap();
    let second = env.backup(&src);
    let grown = env.repo_size() - before;
    // One or two data chunks around the edit plus the trees.
    let new_blobs = second["summary"]["blobs_new"].as_u64().unwrap();
    assert!(new_blobs <= 2 + 4, "{new_blobs} new blobs");
    assert!(grown < 10 << 20, "repository grew by {grown} bytes for a 20-byte insertion");
    let target = env.path("restore");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(fs::read(restored(&target, &src).join("big")).unwrap() == data);
}

#[test]
fn wrong_password_is_a_one_line_error_with_exit_1() {
    let env = Env::new();
    let out = env.cmd().env("CHUNKVAULT_PASSWORD", "not the password").args(["snapshots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("wrong password"), "{stderr}");
}

#[test]
fn missing_repository_and_bad_usage_have_distinct_exit_codes() {
    let env = Env::uninit();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("init"));
    assert_eq!(env.run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(env.run(&["backup"]).status.code(), Some(2));
    let out = Env::uninit().cmd().env_remove("CHUNKVAULT_REPO").args(["snapshots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The first pack (in key order) of a kind (1 data, 2 tree), with its bytes.
fn first_pack(env: &Env, want_kind: u8) -> (ObjectKey, Vec<u8>) {
    let backend = env.backend();
    let packs = backend.list(FileType::Pack).unwrap();
    packs
        .into_iter()
        .map(|(key, _)| (key, backend.get(&key).unwrap()))
        .find(|(_, bytes)| bytes[5] == want_kind)
        .expect("a pack of that kind")
}

#[test]
fn a_flipped_byte_in_a_pack_is_found_and_never_restored_silently() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("victim"), pseudo_random(100_000, 9)).unwrap();
    env.backup(&src);
    assert_eq!(env.run(&["check", "--read-data"]).status.code(), Some(0));

    // Damage through the backend (objects are write-once: remove, then put).
    let (pack, mut bytes) = first_pack(&env, 1);
    bytes[5000] ^= 0x01;
    let backend = env.backend();
    backend.remove(&pack).unwrap();
    backend.put(&pack, &bytes).unwrap();

    let check = env.run(&["check", "--read-data", "--json"]);
    assert_eq!(check.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let damaged = report["damaged_files"].as_array().unwrap();
    assert!(damaged.iter().any(|f| f["path"].as_str().unwrap().ends_with("/src/victim")), "{report}");

    let target = env.path("restore");
    let out = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("victim"));
    assert!(!restored(&target, &src).join("victim").exists(), "a damaged file must not be left with wrong bytes");
    let cat = env.run(&["cat", "latest", &format!("{}/victim", src.display())]);
    assert_eq!(cat.status.code(), Some(3));
}

#[test]
fn cat_streams_a_file_and_a_range() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let data = pseudo_random(5 << 20, 11);
    fs::write(src.join("f"), &data).unwrap();
    env.backup(&src);
    let path = format!("{}/f", src.display());
    let out = env.cmd().args(["cat", "latest", &path]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data);
    let start = (1 << 20) + 12345;
    let end = (3 << 20) + 777;
    let out = env.cmd().args(["cat", "latest", &path, "--range", &format!("{start}-{end}")]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data[start..end]);
    assert_eq!(env.run(&["cat", "latest", &path, "--range", "9-1"]).status.code(), Some(2));
}

#[test]
fn restore_include_selects_a_subtree() {
    let env = Env::new();
    let src = env.path("src");
    make_varied_tree(&src);
    env.backup(&src);
    let target = env.path("restore");
    let include = format!("{}/dir/sub dir", src.display());
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap(), "--include", &include]);
    let base = restored(&target, &src);
    assert!(base.join("dir/sub dir/ünïcödé ☃/日本語.bin").is_file());
    assert!(!base.join("small.txt").exists());
    assert!(!base.join("dir/big.bin").exists());
    let bad = env.run(&["restore", "latest", "--target", target.to_str().unwrap(), "--include", "/no/such/path"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn key_add_list_remove() {
    let env = Env::new();
    let added =
        env.cmd().env("CHUNKVAULT_NEW_PASSWORD", "second password").args(["key", "add", "--json"]).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&added.stdout).unwrap()["key"].as_str().unwrap().to_string();
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    // The new password opens the repository.
    let with_new =
        env.cmd().env("CHUNKVAULT_PASSWORD", "second password").args(["snapshots", "--json"]).output().unwrap();
    assert!(with_new.status.success());
    // The key in use cannot be removed; the other can.
    let own =
        keys.as_array().unwrap().iter().find(|k| k["current"] == true).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(env.run(&["key", "remove", &own]).status.code(), Some(1));
    env.ok(&["key", "remove", &id[..12]]);
    let gone = env.cmd().env("CHUNKVAULT_PASSWORD", "second password").args(["snapshots"]).output().unwrap();
    assert_eq!(gone.status.code(), Some(1));
}

#[test]
fn key_and_repository_files_are_owner_only() {
    let env = Env::new();
    if env.is_s3() {
        // The bucket's access is the store's business; what chunkvault
        // writes locally for it is the cache.
        let src = env.path("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), b"a").unwrap();
        env.backup(&src);
        env.ok(&["ls", "latest"]);
        assert_owner_only(&env.cache_dir());
        return;
    }
    let keys: Vec<_> = fs::read_dir(env.repo.join("keys")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(keys.len(), 1);
    for p in keys.iter().chain([&env.repo.join("config")]) {
        assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600, "{p:?}");
    }
    assert_eq!(fs::metadata(&env.repo).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn init_refuses_an_existing_repository() {
    let env = Env::new();
    let out = env.run(&["init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn unreadable_entries_are_warnings_not_failures() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("ok"), b"fine").unwrap();
    let missing = env.path("does-not-exist");
    let out = env.run(&["backup", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a missing top-level path is an error");
    let snap = env.backup(&src);
    assert_eq!(snap["summary"]["files_new"], 1);
}

/// Every file below `dir` is 0600 and every directory 0700 (`dir` itself may
/// be the test's, so only what is below it counts); and there are files.
fn assert_owner_only(dir: &Path) {
    let mut files = 0;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = fs::metadata(&p).unwrap();
        if meta.is_dir() {
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{p:?}");
            assert_owner_only(&p);
        } else {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{p:?}");
        }
        files += 1;
    }
    assert!(files > 0, "{dir:?} is empty");
}
