//! `chunkvault copy`: snapshots between two local repositories with
//! different passwords (so different keys), with the same chunker
//! parameters (no re-chunking) and with different ones (re-chunked);
//! restores from the target byte for byte; a second copy adds nothing.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{assert_same_tree, pseudo_random, Env, PASSWORD};

const TARGET_PASSWORD: &str = "the target's own password";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A repository opened with [`TARGET_PASSWORD`].
struct Target(Env);

impl Target {
    fn new(init: &[&str]) -> Target {
        let t = Target(Env::uninit());
        let mut args = vec!["init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"];
        args.extend_from_slice(init);
        t.ok(&args);
        t
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.0.cmd().env("CHUNKVAULT_PASSWORD", TARGET_PASSWORD).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `copy --from-repo SOURCE ARGS... --json`, the source's password from a file.
    fn copy_from(&self, source: &Env, args: &[&str]) -> serde_json::Value {
        let pw = self.0.path("source-password");
        fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        let mut a = vec!["copy", "--from-repo", &source.location, "--from-password-file", s(&pw)];
        a.extend_from_slice(args);
        self.json(&a)
    }
}

/// Two snapshots of a home-like tree (the second with one file changed and
/// one added), as (source ids oldest first, the directory).
fn two_snapshots(env: &Env) -> (Vec<String>, PathBuf) {
    let src = env.path("home");
    fs::create_dir_all(src.join("docs/a/b")).unwrap();
    fs::write(src.join("docs/a/b/note.txt"), b"deep note\n").unwrap();
    fs::write(src.join("docs/readme"), b"first\n").unwrap();
    fs::write(src.join("big.bin"), pseudo_random(6 << 20, 3)).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    symlink("docs/readme", src.join("link")).unwrap();
    let first = env.backup(&src)["snapshot"].as_str().unwrap().to_owned();
    fs::write(src.join("docs/readme"), b"second\n").unwrap();
    fs::write(src.join("docs/new.bin"), pseudo_random(1 << 20, 4)).unwrap();
    let second = env.backup(&src)["snapshot"].as_str().unwrap().to_owned();
    (vec![first, second], src)
}

fn ids(v: &serde_json::Value, list: &str, field: &str) -> Vec<String> {
    v[list].as_array().unwrap().iter().map(|c| c[field].as_str().unwrap().to_owned()).collect()
}

/// Each copied snapshot restores from the target exactly as its original
/// restores from the source.
fn assert_copies_restore(source: &Env, target: &Target, copied: &serde_json::Value) {
    for c in copied["copied"].as_array().unwrap() {
        let (from, to) = (c["source"].as_str().unwrap(), c["snapshot"].as_str().unwrap());
        let (a, b) = (source.path(&format!("r-{from}")), target.0.path(&format!("r-{to}")));
        source.ok(&["restore", from, "--target", s(&a)]);
        target.ok(&["restore", to, "--target", s(&b)]);
        assert_same_tree(&a, &b);
    }
}

#[test]
fn copy_with_the_same_chunker_keeps_chunks_and_a_second_copy_adds_nothing() {
    let source = Env::new();
    let (source_ids, src) = two_snapshots(&source);
    let target = Target::new(&[]);

    let one = target.copy_from(&source, &[&source_ids[0]]);
    assert_eq!(one["rechunked"], false);
    assert_eq!(ids(&one, "copied", "source"), [source_ids[0].clone()]);
    // The rest: the second snapshot's parent was copied, so only what
    // changed is read from the source (the new file and the changed one).
    let rest = target.copy_from(&source, &[]);
    assert_eq!(ids(&rest, "copied", "source"), [source_ids[1].clone()]);
    assert_eq!(ids(&rest, "copied", "original"), [source_ids[1].clone()]);
    assert_eq!(ids(&rest, "skipped", "source"), [source_ids[0].clone()]);
    assert_eq!(rest["bytes_read"], (1 << 20) + "second\n".len(), "{rest}");
    assert_copies_restore(&source, &target, &one);
    assert_copies_restore(&source, &target, &rest);
    let latest = target.0.path("latest");
    target.ok(&["restore", "latest", "--target", s(&latest)]);
    assert_same_tree(&src, &common::restored(&latest, &src));

    // Same boundaries: the target holds the same chunks (under its own ids).
    let (a, b) = (source.json(&["stats"]), target.json(&["stats"]));
    assert_eq!((a["chunks"].clone(), a["chunk_bytes"].clone()), (b["chunks"].clone(), b["chunk_bytes"].clone()));
    // The copies name their originals and their parent's copy.
    let snaps = target.json(&["snapshots"]);
    let snaps = snaps.as_array().unwrap();
    let copies = [ids(&one, "copied", "snapshot"), ids(&rest, "copied", "snapshot")].concat();
    assert_eq!(snaps[0]["original"], source_ids[0].as_str());
    assert_eq!(snaps[1]["original"], source_ids[1].as_str());
    assert_eq!(snaps[1]["parent"], copies[0].as_str());

    // Again: nothing new.
    let again = target.copy_from(&source, &[]);
    assert!(again["copied"].as_array().unwrap().is_empty(), "{again}");
    assert_eq!(ids(&again, "skipped", "copy"), copies);
    assert_eq!(again["blobs_new"], 0);
    assert_eq!(target.json(&["snapshots"]).as_array().unwrap().len(), 2);

    // And back: the source has the originals of the copies.
    let pw = source.path("target-password");
    fs::write(&pw, TARGET_PASSWORD).unwrap();
    let back = source.json(&["copy", "--from-repo", &target.0.location, "--from-password-file", s(&pw)]);
    assert!(back["copied"].as_array().unwrap().is_empty(), "{back}");
    assert_eq!(ids(&back, "skipped", "copy"), source_ids);
}

#[test]
fn copy_with_another_chunker_rechunks_and_filters_choose_snapshots() {
    let source = Env::new();
    let (source_ids, _) = two_snapshots(&source);
    let other = source.path("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("f"), pseudo_random(300 << 10, 9)).unwrap();
    let other_id = source.json(&["backup", s(&other), "--host", "elsewhere"])["snapshot"].as_str().unwrap().to_owned();
    let target = Target::new(&["--chunk-avg", "65536"]);

    // One snapshot by id; then the rest of one host, the password from a command.
    let one = target.copy_from(&source, &[&source_ids[0][..12]]);
    assert_eq!(ids(&one, "copied", "source"), [source_ids[0].clone()]);
    assert_eq!(one["rechunked"], true);
    let host = source.json(&["snapshots"])[0]["hostname"].as_str().unwrap().to_owned();
    let by_host = target.json(&[
        "copy",
        "--from-repo",
        &source.location,
        "--from-password-command",
        &format!("printf '%s\\n' '{PASSWORD}'"),
        "--host",
        &host,
    ]);
    assert_eq!(ids(&by_host, "copied", "source"), [source_ids[1].clone()]);
    assert_eq!(ids(&by_host, "skipped", "source"), [source_ids[0].clone()]);
    assert_eq!(by_host["bytes_read"], (1 << 20) + "second\n".len(), "only what changed is read: {by_host}");
    assert!(!ids(&by_host, "copied", "source").contains(&other_id));
    assert_copies_restore(&source, &target, &one);
    assert_copies_restore(&source, &target, &by_host);

    // Cut again with 64 KiB chunks instead of 1 MiB ones.
    let (a, b) = (source.json(&["stats"]), target.json(&["stats"]));
    assert!(b["chunks"].as_u64().unwrap() > 2 * a["chunks"].as_u64().unwrap(), "{a}\n{b}");

    let all = target.copy_from(&source, &[]);
    assert_eq!(ids(&all, "copied", "source"), [other_id]);
    let again = target.copy_from(&source, &[]);
    assert!(again["copied"].as_array().unwrap().is_empty());
    assert_eq!(again["blobs_new"], 0);
    assert_copies_restore(&source, &target, &all);

    // A wrong source password is the wrong-password exit code.
    let bad = source.path("bad");
    fs::write(&bad, "nope").unwrap();
    let out = target.run(&["copy", "--from-repo", &source.location, "--from-password-file", s(&bad)]);
    assert_eq!(out.status.code(), Some(12), "{}", String::from_utf8_lossy(&out.stderr));
}
