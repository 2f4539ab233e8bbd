//! Format compatibility: `tests/fixtures/repo-v1` was written by chunkvault
//! as of 2026-12-03 (before the dependency upgrades of issue 15; see
//! `tests/fixtures/make_repo_v1.py`). Every later version must open it,
//! check it, restore both snapshots byte for byte with their metadata, and
//! cut the same chunks again (a new backup of the same files stores no new
//! data), whatever the chunking, compression and encryption crates became.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

const PASSWORD: &str = "chunkvault fixture v1";
/// The directory the fixture's snapshots were taken of.
const SOURCE: &str = "tmp/chunkvault-fixture-v1";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A private copy of the committed repository, so nothing a test does
    /// (locks, new snapshots) touches the fixture itself.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1"), &repo);
        // Git keeps no empty directories: give back the ones `init` makes.
        for d in ["keys", "index", "snapshots", "locks", "tmp"] {
            std::fs::create_dir_all(repo.join(d)).expect("mkdir");
        }
        Fixture { dir }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_chunkvault"))
            .env("CHUNKVAULT_REPO", self.dir.path().join("repo"))
            .env("CHUNKVAULT_CACHE_DIR", self.dir.path().join("cache"))
            .env("CHUNKVAULT_PASSWORD", PASSWORD)
            .env_remove("CHUNKVAULT_PASSWORD_FILE")
            .args(args)
            .output()
            .expect("run chunkvault")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(&[args, &["--json"]].concat());
        assert!(
            out.status.success(),
            "chunkvault {args:?}: {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// `expected-v1.txt`, by snapshot label ("first", "second").
fn expected() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/expected-v1.txt"))
        .expect("expected-v1.txt");
    let mut by_label: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let (label, rest) = line.split_once(' ').expect("label");
        by_label.entry(label.to_owned()).or_default().push(rest.to_owned());
    }
    by_label
}

/// The same lines as `make_repo_v1.py` writes, for a restored tree.
fn manifest(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(base).expect("under base").to_str().expect("utf-8").to_owned();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let mode = m.permissions().mode() & 0o7777;
            let mtime = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&p).expect("readlink");
                out.push(format!("symlink 0 0 0 {} {rel}", target.display()));
            } else if m.is_dir() {
                out.push(format!("dir {mode:o} {mtime} 0 - {rel}"));
                walk(base, &p, out);
            } else {
                let hash = hex::encode(Sha256::digest(std::fs::read(&p).expect("read")));
                out.push(format!("file {mode:o} {mtime} {} {hash} {rel}", m.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &root.join("src"), &mut out);
    out.sort();
    out
}

/// The fixture's snapshot ids, oldest first.
fn snapshot_ids(f: &Fixture) -> Vec<String> {
    let snaps = f.json(&["snapshots"]);
    let mut snaps: Vec<(String, String)> = snaps
        .as_array()
        .expect("array")
        .iter()
        .map(|s| (s["time"].as_str().expect("time").to_owned(), s["id"].as_str().expect("id").to_owned()))
        .collect();
    snaps.sort();
    snaps.into_iter().map(|(_, id)| id).collect()
}

#[test]
fn the_v1_fixture_opens_checks_and_restores_byte_for_byte() {
    let f = Fixture::new();
    let ids = snapshot_ids(&f);
    assert_eq!(
        ids,
        [
            "f133a47b8578a2f307b6aa53c7b2dec16c00791b56f89da9b5efc0bb4daafcad",
            "a37c4cd78cc4968525e0c177d77b1483378478ddca7e4a6dc192b3524521c5a3"
        ]
    );
    let check = f.run(&["check", "--read-data"]);
    assert!(check.status.success(), "check: {}", String::from_utf8_lossy(&check.stderr));

    let want = expected();
    for (label, id) in ["first", "second"].iter().zip(&ids) {
        let target = f.dir.path().join(format!("restore-{label}"));
        let out = f.run(&["restore", id, "--target", target.to_str().expect("utf-8"), "-q"]);
        assert!(out.status.success(), "restore {label}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(manifest(&target.join(SOURCE)), want[*label], "snapshot {label}");
    }
}

#[test]
fn the_same_files_cut_into_the_same_chunks_as_when_the_fixture_was_written() {
    let f = Fixture::new();
    let first = &snapshot_ids(&f)[0];
    let target = f.dir.path().join("restore");
    let out = f.run(&["restore", first, "--target", target.to_str().expect("utf-8"), "-q"]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));

    let source = target.join(SOURCE).join("src");
    let summary = &f.json(&["backup", "--force", source.to_str().expect("utf-8")])["summary"];
    assert_eq!(summary["bytes_read"], summary["total_bytes"], "every file was read again");
    // The fixture's first snapshot has 115 blobs; all of its file chunks must
    // be found again. New blobs may only be trees (the path above `src`
    // differs, and trees record it), never data.
    let trees = summary["dirs"].as_u64().expect("dirs") + SOURCE.split('/').count() as u64 + 3;
    assert!(
        summary["blobs_new"].as_u64().expect("blobs_new") <= trees,
        "new data chunks: the chunker cuts differently than the one that wrote the fixture: {summary}"
    );
}
