//! Choosing snapshots (`--host`, `--tag`, `--path`, `latest`, `tag`,
//! `forget --group-by tags`) and getting data out (`find`, `dump`).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{pseudo_random, Env};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two directories backed up as two hosts: a (h1, tag daily) twice, its
/// file changed in between (the second without a tag), and b (h2, weekly).
fn three_snapshots(env: &Env) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (env.path("a"), env.path("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    fs::write(a.join("f"), b"first").unwrap();
    fs::write(b.join("g"), b"other").unwrap();
    env.ok(&["backup", s(&a), "--host", "h1", "--tag", "daily"]);
    env.ok(&["backup", s(&b), "--host", "h2", "--tag", "weekly"]);
    fs::write(a.join("f"), b"second").unwrap();
    env.ok(&["backup", s(&a), "--host", "h1"]);
    (a, b)
}

#[test]
fn latest_is_the_newest_snapshot_that_passes_the_filters() {
    let env = Env::new();
    let (a, b) = three_snapshots(&env);
    let f = format!("{}/f", s(&a));
    assert_eq!(env.ok(&["cat", "latest", &f]), "second");
    assert_eq!(env.ok(&["cat", "latest", &f, "--tag", "daily"]), "first");
    assert_eq!(env.ok(&["cat", "latest", &f, "--host", "h1", "--tag", "weekly", "--tag", "daily"]), "first");
    let ls = env.json(&["ls", "latest", "--host", "h2"]);
    assert!(ls.as_array().unwrap().iter().any(|e| e["path"] == format!("{}/g", s(&b))), "{ls}");

    assert_eq!(env.json(&["snapshots", "--host", "h1"]).as_array().unwrap().len(), 2);
    assert_eq!(env.json(&["snapshots", "--tag", "daily,weekly"]).as_array().unwrap().len(), 0);
    assert_eq!(env.json(&["snapshots", "--path", s(&b)]).as_array().unwrap().len(), 1);

    let target = env.path("t");
    env.ok(&["restore", "latest", "--path", s(&b), "--target", s(&target)]);
    assert_eq!(fs::read(common::restored(&target, &b).join("g")).unwrap(), b"other");

    let diff = env.json(&["diff", "latest", "latest", "--host", "h2"]);
    assert!(diff["changes"].as_array().unwrap().is_empty());
    let stats = env.json(&["stats", "--host", "h2"]);
    assert_eq!(stats["snapshots"], 1);

    let out = env.run(&["ls", "latest", "--host", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot matches host nosuch"));
}

#[test]
fn forget_applies_its_policy_to_filtered_snapshots_grouped_by_tags() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    for tag in ["db", "db", "web"] {
        env.ok(&["backup", s(&src), "--host", "h1", "--tag", tag]);
    }
    env.ok(&["backup", s(&src), "--host", "h2", "--tag", "db"]);
    let before = env.json(&["snapshots"]);
    let older_db = before[0]["id"].as_str().unwrap().to_owned();
    let out = env.json(&["forget", "--keep-last", "1", "--host", "h1", "--group-by", "host,tags"]);
    assert_eq!(out["removed_ids"], serde_json::json!([older_db]), "{out}");
    assert_eq!(out["groups"].as_array().unwrap().len(), 2);
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 3);
}

#[test]
fn tag_writes_new_manifests_and_removes_the_old_ones() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    env.ok(&["backup", s(&src), "--tag", "a"]);
    env.ok(&["backup", s(&src), "--tag", "b"]);
    let before = env.json(&["snapshots"]);
    let changed = env.json(&["tag", "--add", "new", "--remove", "a", "--tag", "a"]);
    let changed = changed["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "only the snapshot tagged a passes the filter");
    assert_eq!(changed[0]["old"], before[0]["id"]);
    let after = env.json(&["snapshots"]);
    assert_eq!(after.as_array().unwrap().len(), 2, "the old manifest is gone");
    let retagged = after.as_array().unwrap().iter().find(|s| s["id"] == changed[0]["new"]).unwrap();
    assert_eq!(retagged["tags"], serde_json::json!(["new"]));
    assert_eq!(retagged["tree"], before[0]["tree"]);
    let backend = env.backend();
    let old: chunkvault::id::SnapshotId = before[0]["id"].as_str().unwrap().parse().unwrap();
    assert!(backend.get(&chunkvault::backend::ObjectKey::Snapshot(old)).is_err());

    env.ok(&["tag", "--set", "only", "latest"]);
    assert_eq!(env.json(&["snapshots", "--tag", "only"]).as_array().unwrap().len(), 1);
    // Nothing to change: nothing rewritten.
    let same = env.json(&["tag", "--add", "only", "latest"]);
    assert!(same["changed"].as_array().unwrap().is_empty());
    let out = env.run(&["tag", "latest"]);
    assert_eq!(out.status.code(), Some(2), "no --add, --remove or --set is a usage error");
}

#[test]
fn find_lists_matching_paths_per_snapshot_with_size() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("pics")).unwrap();
    fs::write(src.join("pics/a.jpg"), b"12345").unwrap();
    fs::write(src.join("notes.txt"), b"n").unwrap();
    let first = env.backup(&src)["snapshot"].as_str().unwrap().to_owned();
    fs::write(src.join("b.jpg"), b"xy").unwrap();
    env.backup(&src);
    let found = env.json(&["find", "*.jpg"]);
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0]["snapshot"], first);
    let paths: Vec<&str> =
        found[0]["matches"].as_array().unwrap().iter().map(|m| m["path"].as_str().unwrap()).collect();
    assert_eq!(paths, vec![format!("{}/pics/a.jpg", s(&src))]);
    assert_eq!(found[0]["matches"][0]["size"], 5);
    assert_eq!(found[1]["matches"].as_array().unwrap().len(), 2);
    let only_first = env.json(&["find", "**/pics/*", "--snapshot", &first[..8]]);
    assert_eq!(only_first.as_array().unwrap().len(), 1);
    assert!(env.json(&["find", "nothing-like-this"]).as_array().unwrap().is_empty());
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dump_writes_a_file_and_a_directory_as_tar_or_zip() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let big = pseudo_random(3 << 20, 7);
    fs::write(src.join("big.bin"), &big).unwrap();
    fs::write(src.join("sub/small"), b"small\n").unwrap();
    fs::hard_link(src.join("sub/small"), src.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("small", src.join("sub/sym")).unwrap();
    env.backup(&src);

    let file = env.cmd().args(["dump", "latest", &format!("{}/big.bin", s(&src))]).output().unwrap();
    assert!(file.status.success());
    assert!(file.stdout == big, "a file dumps as its bytes");

    let tar = env.cmd().args(["dump", "latest", s(&src), "--archive", "tar"]).output().unwrap();
    assert!(tar.status.success(), "{}", String::from_utf8_lossy(&tar.stderr));
    let tar_path = env.path("src.tar");
    fs::write(&tar_path, &tar.stdout).unwrap();
    let x = env.path("x-tar");
    fs::create_dir(&x).unwrap();
    run_ok(Command::new("tar").args(["-xf", s(&tar_path), "-C", s(&x)]));
    assert!(fs::read(x.join("src/big.bin")).unwrap() == big);
    assert_eq!(fs::read(x.join("src/sub/link")).unwrap(), b"small\n");
    assert_eq!(
        fs::metadata(x.join("src/sub/link")).unwrap().ino(),
        fs::metadata(x.join("src/sub/small")).unwrap().ino()
    );
    assert_eq!(fs::read_link(x.join("src/sub/sym")).unwrap(), Path::new("small"));

    let zip = env.cmd().args(["dump", "latest", s(&src), "--archive", "zip"]).output().unwrap();
    assert!(zip.status.success(), "{}", String::from_utf8_lossy(&zip.stderr));
    let zip_path = env.path("src.zip");
    fs::write(&zip_path, &zip.stdout).unwrap();
    let z = env.path("x-zip");
    run_ok(Command::new("unzip").args(["-q", s(&zip_path), "-d", s(&z)]));
    assert!(fs::read(z.join("src/big.bin")).unwrap() == big);
    assert_eq!(fs::read(z.join("src/sub/small")).unwrap(), b"small\n");

    let missing = env.run(&["dump", "latest", "/no/such/path"]);
    assert_eq!(missing.status.code(), Some(1));
}
