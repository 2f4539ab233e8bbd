//! Shared helpers for the integration tests: run the real binary, build
//! trees, compare trees.
#![allow(dead_code)]

mod noise;
pub mod postgres;
pub mod server;

pub use noise::pseudo_random;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use chunkvault::backend::{Backend, FileType};

pub const PASSWORD: &str = "test password";

/// A repository plus a helper to run the CLI against it: in a temp dir, or,
/// when `CHUNKVAULT_TEST_S3=1`, under a fresh prefix of the S3 bucket that
/// `scripts/garage-cluster.sh start` set up (so the same tests run against
/// Garage). The temp dir is there either way, for sources, restores and the
/// local cache.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The local repository directory (unused when on S3).
    pub repo: PathBuf,
    /// What `CHUNKVAULT_REPO` is set to: `repo`, or an `s3://` location.
    pub location: String,
}

/// A fresh `s3://` location when the tests are to run against S3.
pub fn s3_location() -> Option<String> {
    if std::env::var("CHUNKVAULT_TEST_S3").ok().as_deref() != Some("1") {
        return None;
    }
    let bucket = std::env::var("CHUNKVAULT_TEST_S3_BUCKET")
        .expect("CHUNKVAULT_TEST_S3=1 needs the settings from scripts/garage-cluster.sh start");
    Some(format!("s3://{bucket}/test-{}", hex::encode(rand::random::<[u8; 8]>())))
}

impl Env {
    /// A fresh, initialised repository (with cheap KDF parameters).
    pub fn new() -> Env {
        let env = Env::uninit();
        env.ok(&["init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"]);
        env
    }

    /// A temp dir with a repository path that is not created yet.
    pub fn uninit() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        let location = s3_location().unwrap_or_else(|| repo.to_str().expect("utf-8 temp dir").to_owned());
        Env { dir, repo, location }
    }

    pub fn is_s3(&self) -> bool {
        self.location.starts_with("s3://")
    }

    /// The repository's backend, for tests that look at or damage objects.
    pub fn backend(&self) -> Arc<dyn Backend> {
        chunkvault::repo::open_backend(&self.location, false).expect("open backend")
    }

    /// Where the CLI keeps its cache of this repository's objects.
    pub fn cache_dir(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chunkvault"));
        c.env("CHUNKVAULT_REPO", &self.location)
            .env("CHUNKVAULT_CACHE_DIR", self.cache_dir())
            .env("CHUNKVAULT_PASSWORD", PASSWORD)
            .env_remove("CHUNKVAULT_PASSWORD_FILE");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run chunkvault")
    }

    /// Runs and requires exit code 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "chunkvault {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("json stdout")
    }

    /// Backs up `path` and returns the snapshot's JSON summary.
    pub fn backup(&self, path: &Path) -> serde_json::Value {
        self.json(&["backup", path.to_str().expect("utf-8 path")])
    }

    /// Bytes stored in the repository, summed over every object.
    pub fn repo_size(&self) -> u64 {
        let backend = self.backend();
        let types = [FileType::Config, FileType::Key, FileType::Pack, FileType::Index, FileType::Snapshot];
        types.iter().flat_map(|t| backend.list(*t).expect("list")).map(|(_, size)| size).sum()
    }
}

/// Bytes of every file below `p` (a local repository's size on disk).
pub fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).expect("read dir") {
        let e = e.expect("entry");
        let m = e.metadata().expect("metadata");
        total += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
    }
    total
}

/// What a comparison looks at for one entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Vec<u8>,
}

/// Every entry below `root`, keyed by relative path.
pub fn scan(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    scan_into(root, root, &mut out);
    out
}

fn scan_into(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        let (kind, content) = if m.file_type().is_symlink() {
            ("symlink", std::fs::read_link(&p).expect("readlink").into_os_string().into_encoded_bytes())
        } else if m.is_dir() {
            scan_into(root, &p, out);
            ("dir", Vec::new())
        } else {
            ("file", std::fs::read(&p).expect("read"))
        };
        let mode = if kind == "symlink" { 0 } else { m.permissions().mode() };
        out.insert(
            p.strip_prefix(root).expect("below root").to_owned(),
            Entry { kind, mode, uid: m.uid(), gid: m.gid(), mtime: (m.mtime(), m.mtime_nsec()), content },
        );
    }
}

/// Asserts two trees are identical, naming the first difference.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (scan(a), scan(b));
    let keys_a: Vec<_> = sa.keys().collect();
    let keys_b: Vec<_> = sb.keys().collect();
    assert_eq!(keys_a, keys_b, "different entries");
    for (k, ea) in &sa {
        let eb = &sb[k];
        assert_eq!(ea.kind, eb.kind, "{k:?} kind");
        assert_eq!(ea.content.len(), eb.content.len(), "{k:?} length");
        assert!(ea.content == eb.content, "{k:?} content differs");
        assert_eq!(ea.mode, eb.mode, "{k:?} mode");
        assert_eq!((ea.uid, ea.gid), (eb.uid, eb.gid), "{k:?} owner");
        assert_eq!(ea.mtime, eb.mtime, "{k:?} mtime");
    }
}

/// Sets a path's mtime with nanoseconds, without following symlinks.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    let t = libc::timespec { tv_sec: sec, tv_nsec: nsec };
    // SAFETY: valid C string and a two-element array, as utimensat requires.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {p:?}");
}

/// Where a backed-up absolute path lands under a restore target.
pub fn restored(target: &Path, original: &Path) -> PathBuf {
    target.join(original.strip_prefix("/").expect("absolute"))
}

/// Generation `i` of a small data set: `shared` bytes every generation has
/// in common, `own` bytes of its own, and a text file naming it. Each
/// generation is its own directory, so a snapshot's path says what it must
/// restore to.
pub fn make_gen(base: &Path, i: u64, shared: usize, own: usize) -> PathBuf {
    let d = base.join(format!("gen-{i}"));
    std::fs::create_dir_all(d.join("sub")).expect("mkdir");
    std::fs::write(d.join("shared"), pseudo_random(shared, 7)).expect("write");
    std::fs::write(d.join("sub/own"), pseudo_random(own + (i as usize % 7) * 1000, 1000 + i)).expect("write");
    std::fs::write(d.join("note"), format!("generation {i}\n").repeat(50)).expect("write");
    d
}

/// `check` (reading every pack with `read_data`) finds no damage, and every
/// snapshot restores exactly to the directory it was taken of (its first
/// path). Returns the check report and the snapshot ids.
pub fn assert_repository_intact(
    repo: &chunkvault::repo::Repository,
    read_data: bool,
    scratch: &Path,
    why: &str,
) -> (chunkvault::check::CheckReport, BTreeSet<chunkvault::id::SnapshotId>) {
    use chunkvault::check::{check, CheckOptions};
    use chunkvault::restore::{restore, RestoreOptions, RestoreProgress};
    let report = check(repo, CheckOptions { read_data, ..CheckOptions::default() }, &Default::default())
        .unwrap_or_else(|e| panic!("{why}: check: {e}"));
    assert!(!report.has_damage(), "{why}: {:?} {:?}", report.problems, report.damaged_files);
    let snaps = repo.list_snapshots().unwrap_or_else(|e| panic!("{why}: list: {e}"));
    for (id, snap) in &snaps {
        let r = restore(repo, snap, scratch, &RestoreOptions::default(), &RestoreProgress::default())
            .unwrap_or_else(|e| panic!("{why}: restore {id}: {e}"));
        assert!(r.damaged.is_empty(), "{why}: {:?}", r.damaged);
        let src = Path::new(&snap.paths[0]);
        assert_same_tree(src, &restored(scratch, src));
        std::fs::remove_dir_all(scratch).expect("clean scratch");
    }
    (report, snaps.into_iter().map(|(id, _)| id).collect())
}
