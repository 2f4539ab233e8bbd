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
fn wrong_password_is_a_one_line_error_with_exit_12() {
    let env = Env::new();
    let out = env.cmd().env("CHUNKVAULT_PASSWORD", "not the password").args(["snapshots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(12));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("wrong password"), "{stderr}");
    let out = env.cmd().env("CHUNKVAULT_PASSWORD", "nope").args(["backup", "/nonexistent", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(12));
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"], "wrong_password");
}

#[test]
fn missing_repository_and_bad_usage_have_distinct_exit_codes() {
    let env = Env::uninit();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(10));
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
    assert_eq!(gone.status.code(), Some(12), "a removed key's password is a wrong password");
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

#[test]
fn a_missing_repository_exits_10_for_every_command_that_opens_one() {
    let env = Env::uninit();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    for args in [vec!["backup", src.to_str().unwrap()], vec!["ls", "latest"], vec!["check"], vec!["prune"]] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(10), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = env.run(&["snapshots", "--json"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"], "no_repository");
}

#[test]
fn a_locked_repository_exits_11() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    env.backup(&src);
    let repo = chunkvault::repo::Repository::open(env.backend(), common::PASSWORD.as_bytes()).unwrap();
    let exclusive = repo.lock_exclusive().unwrap();
    for args in [vec!["backup", src.to_str().unwrap()], vec!["prune"], vec!["check"], vec!["repair", "index"]] {
        let out = env.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(11), "{args:?}: {stderr}");
        assert!(stderr.contains("locked"), "{args:?}: {stderr}");
    }
    let out = env.run(&["prune", "--json"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"], "locked");
    drop(exclusive);
    // A shared lock (a backup running) keeps prune out, not another backup.
    let shared = repo.lock_shared().unwrap();
    assert_eq!(env.run(&["prune"]).status.code(), Some(11));
    env.backup(&src);
    drop(shared);
    env.ok(&["prune"]);
}

/// A backup that could not read some of its sources writes its snapshot
/// with what it could read, names what it left out, and exits 3. Reading
/// `/proc/self/mem` from its start fails (EIO) for every user, root too; a
/// mode-000 file and directory fail too when not running as root.
#[test]
fn a_backup_that_skipped_unreadable_files_exits_3_after_writing_its_snapshot() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("ok"), b"fine").unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        fs::write(src.join("secret"), b"no").unwrap();
        fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = env.run(&["backup", src.to_str().unwrap(), "/proc/self/mem", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings: Vec<&str> = done["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(warnings.iter().any(|w| w.starts_with("/proc/self/mem:")), "{warnings:?}");
    assert!(stderr.contains("/proc/self/mem"), "named on stderr: {stderr}");
    if !root {
        assert!(warnings.iter().any(|w| w.contains("secret")), "{warnings:?}");
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The snapshot is there, with the readable file and without the other.
    let list = env.json(&["snapshots"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], done["snapshot"]);
    let ok = format!("{}/ok", src.display());
    assert_eq!(env.cmd().args(["cat", "latest", &ok]).output().unwrap().stdout, b"fine");
    let mem = env.run(&["cat", "latest", "/proc/self/mem"]);
    assert_eq!(mem.status.code(), Some(1), "not in the snapshot");
    // Everything readable: 0.
    env.ok(&["backup", src.join("ok").to_str().unwrap()]);
}

/// The relative paths `ls` shows below `src` in the latest snapshot.
fn stored(env: &Env, src: &Path) -> Vec<String> {
    let ls = env.json(&["ls", "latest", src.to_str().unwrap()]);
    let prefix = format!("{}/", src.display());
    let mut paths: Vec<String> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str().unwrap().strip_prefix(&prefix).map(String::from))
        .collect();
    paths.sort();
    paths
}

/// A small home-like tree for the exclude tests.
fn make_home(src: &Path) {
    for d in ["Documents/taxes", "Music", "proj/target/debug", "proj/src", ".cache/app", "fake-cache", "Photos"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    for (f, body) in [
        ("Documents/taxes/2024.pdf", "taxes"),
        ("Documents/notes.txt", "notes"),
        ("Documents/build.log", "log"),
        ("Music/song.mp3", "la la"),
        ("proj/src/main.rs", "fn main() {}"),
        ("proj/target/debug/app", "binary"),
        ("proj/keep.log", "keep"),
        (".cache/app/blob", "cached"),
        ("fake-cache/CACHEDIR.TAG", "not the signature\n"),
        ("fake-cache/data", "data"),
        ("Photos/IMG_1.JPG", "jpeg"),
        ("Photos/img_2.jpg", "jpeg"),
    ] {
        fs::write(src.join(f), body).unwrap();
    }
    fs::write(src.join(".cache/CACHEDIR.TAG"), format!("{}\n# a cache\n", chunkvault::backup::CACHEDIR_TAG.1)).unwrap();
    fs::write(src.join("Music/big.flac"), pseudo_random(3 << 20, 5)).unwrap();
}

fn backup_with(env: &Env, src: &Path, flags: &[&str]) -> Vec<String> {
    let mut args = vec!["backup", src.to_str().unwrap()];
    args.extend(flags);
    env.ok(&args);
    stored(env, src)
}

#[test]
fn exclude_patterns_follow_restics_semantics() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    let anchored = format!("{}/proj/target", src.display());
    let got = backup_with(&env, &src, &["--exclude", "*.log", "--exclude", &anchored, "-e", "!keep.log"]);
    assert!(!got.iter().any(|p| p == "Documents/build.log"), "{got:?}");
    assert!(got.contains(&"proj/keep.log".to_string()), "re-included: {got:?}");
    assert!(!got.iter().any(|p| p.starts_with("proj/target")), "not stored, not descended: {got:?}");
    assert!(got.contains(&"proj/src/main.rs".to_string()), "{got:?}");
    // An anchored pattern matches only from the root.
    let got = backup_with(&env, &src, &["--exclude", "/proj"]);
    assert!(got.contains(&"proj/src/main.rs".to_string()), "/proj is not {src:?}/proj: {got:?}");
    // `**` spans directories, `*` does not.
    let deep = format!("{}/**/*.pdf", src.display());
    let shallow = format!("{}/*/*.txt", src.display());
    let got = backup_with(&env, &src, &["--exclude", &deep, "--exclude", &shallow]);
    assert!(!got.contains(&"Documents/taxes/2024.pdf".to_string()), "{got:?}");
    assert!(!got.contains(&"Documents/notes.txt".to_string()), "{got:?}");
    assert!(got.contains(&"Documents/taxes".to_string()), "{got:?}");
    // A bad pattern is a usage error, before anything is written.
    let before = env.json(&["snapshots"]).as_array().unwrap().len();
    let out = env.run(&["backup", src.to_str().unwrap(), "--exclude", "a[b"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), before);
}

#[test]
fn iexclude_ignores_case_and_exclude_files_are_read() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    let got = backup_with(&env, &src, &["--iexclude", "*.jpg"]);
    assert!(!got.iter().any(|p| p.starts_with("Photos/")), "{got:?}");
    let got = backup_with(&env, &src, &["--exclude", "*.jpg"]);
    assert!(got.contains(&"Photos/IMG_1.JPG".to_string()) && !got.contains(&"Photos/img_2.jpg".to_string()));
    let file = env.path("excludes.txt");
    fs::write(&file, "# what not to keep\n\nMusic\n  target  \n").unwrap();
    let got = backup_with(&env, &src, &["--exclude-file", file.to_str().unwrap()]);
    assert!(!got.iter().any(|p| p.starts_with("Music")), "{got:?}");
    assert!(!got.iter().any(|p| p.starts_with("proj/target")), "{got:?}");
    assert!(got.contains(&"Documents/notes.txt".to_string()), "{got:?}");
    let missing = env.run(&["backup", src.to_str().unwrap(), "--exclude-file", "/no/such/file"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn exclude_caches_and_exclude_if_present_keep_the_directory_and_its_tag() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    fs::write(src.join("proj/.nobackup"), b"").unwrap();
    let got = backup_with(&env, &src, &["--exclude-caches"]);
    assert!(got.contains(&".cache".to_string()) && got.contains(&".cache/CACHEDIR.TAG".to_string()), "{got:?}");
    assert!(!got.iter().any(|p| p.starts_with(".cache/app")), "{got:?}");
    assert!(got.contains(&"fake-cache/data".to_string()), "a tag without the signature marks nothing: {got:?}");
    let got = backup_with(&env, &src, &["--exclude-if-present", ".nobackup"]);
    assert!(got.contains(&"proj/.nobackup".to_string()), "{got:?}");
    assert!(!got.iter().any(|p| p.starts_with("proj/src") || p.starts_with("proj/target")), "{got:?}");
    assert!(got.contains(&".cache/app/blob".to_string()), "{got:?}");
    // NAME:HEADER marks only when the file starts with HEADER.
    let got = backup_with(&env, &src, &["--exclude-if-present", "CACHEDIR.TAG:not the"]);
    assert!(!got.contains(&"fake-cache/data".to_string()) && got.contains(&".cache/app/blob".to_string()));
}

#[test]
fn exclude_larger_than_leaves_out_only_big_files() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    let got = backup_with(&env, &src, &["--exclude-larger-than", "1M"]);
    assert!(!got.contains(&"Music/big.flac".to_string()), "{got:?}");
    assert!(got.contains(&"Music/song.mp3".to_string()), "{got:?}");
    let got = backup_with(&env, &src, &["--exclude-larger-than", "4m"]);
    assert!(got.contains(&"Music/big.flac".to_string()), "{got:?}");
    assert_eq!(env.run(&["backup", src.to_str().unwrap(), "--exclude-larger-than", "lots"]).status.code(), Some(2));
}

/// A tmpfs mounted inside the tree, in a private mount namespace
/// (`unshare -m`, so nothing is left mounted); skipped with a reason where
/// mounting is not allowed.
#[test]
fn one_file_system_keeps_a_mountpoint_empty() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    fs::create_dir(src.join("mnt")).unwrap();
    let script = "mount -t tmpfs cvtest \"$1/mnt\" && echo inside > \"$1/mnt/file\" && shift && exec \"$@\"";
    let run = |flags: &[&str]| {
        let cmd = env.cmd();
        let mut c = std::process::Command::new("unshare");
        c.args(["-m", "sh", "-c", script, "sh", src.to_str().unwrap(), env!("CARGO_BIN_EXE_chunkvault"), "backup"]);
        c.arg(&src).args(flags);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.output().unwrap()
    };
    let out = run(&[]);
    if !out.status.success() {
        eprintln!(
            "skipped: cannot mount a second filesystem here (unshare -m + mount tmpfs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(stored(&env, &src).contains(&"mnt/file".to_string()), "without -x the mount is backed up");
    let out = run(&["--one-file-system"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = stored(&env, &src);
    assert!(got.contains(&"mnt".to_string()), "the mountpoint is kept: {got:?}");
    assert!(!got.contains(&"mnt/file".to_string()), "its contents are not: {got:?}");
    assert!(got.contains(&"Documents/notes.txt".to_string()), "{got:?}");
}

#[test]
fn dry_run_counts_what_would_be_stored_and_writes_nothing() {
    let env = Env::new();
    let src = env.path("home");
    make_home(&src);
    let objects = |env: &Env| {
        let b = env.backend();
        let types = [FileType::Pack, FileType::Index, FileType::Snapshot, FileType::Lock];
        types.iter().flat_map(|t| b.list(*t).unwrap()).map(|(k, _)| format!("{k:?}")).collect::<Vec<_>>()
    };
    let empty = objects(&env);
    let dry = env.json(&["backup", src.to_str().unwrap(), "--dry-run", "--exclude", "Photos"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["summary"]["files_new"], 12, "{dry}");
    assert!(dry["summary"]["bytes_new"].as_u64().unwrap() > 3 << 20, "{dry}");
    assert_eq!(objects(&env), empty, "a dry run writes nothing");
    let real = env.json(&["backup", src.to_str().unwrap(), "--exclude", "Photos"]);
    assert_eq!(real["summary"]["files_new"], dry["summary"]["files_new"]);
    assert_eq!(real["summary"]["bytes_new"], dry["summary"]["bytes_new"]);
    // After a change, only the changed file counts.
    let after_backup = objects(&env);
    fs::write(src.join("Documents/notes.txt"), "new notes").unwrap();
    let dry = env.json(&["backup", src.to_str().unwrap(), "-n", "--exclude", "Photos"]);
    assert_eq!(dry["summary"]["files_changed"], 1, "{dry}");
    assert_eq!(dry["summary"]["files_unmodified"], 11, "{dry}");
    assert_eq!(objects(&env), after_backup);
    let text = env.ok(&["backup", src.to_str().unwrap(), "--dry-run"]);
    assert!(text.contains("dry run, nothing written"), "{text}");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 1);
}
