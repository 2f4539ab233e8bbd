//! `chunkvault mount`: the real binary serving a snapshot over FUSE, read
//! with plain `find`, `cat` and `sha256sum`.
//!
//! Skipped, with the reason printed, only on a machine without /dev/fuse or
//! without fusermount3/fusermount; `CHUNKVAULT_REQUIRE_FUSE=1` (set by
//! `.ci/run`) turns that skip into a failure.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pseudo_random, Env};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fusermount to unmount with, or why FUSE cannot be tested here.
fn fuse() -> Option<&'static str> {
    let tool = ["fusermount3", "fusermount"]
        .into_iter()
        .find(|t| Command::new(t).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok());
    let reason = match (Path::new("/dev/fuse").exists(), tool) {
        (false, _) => "no /dev/fuse",
        (true, None) => "no fusermount3 or fusermount (Debian package fuse3)",
        (true, Some(tool)) => return Some(tool),
    };
    assert!(
        std::env::var("CHUNKVAULT_REQUIRE_FUSE").ok().as_deref() != Some("1"),
        "CHUNKVAULT_REQUIRE_FUSE=1 but {reason}"
    );
    eprintln!("skipped: {reason}");
    None
}

/// A running `chunkvault mount`; unmounted and reaped when dropped (a
/// failing test leaves no mount behind).
struct Mount {
    child: Child,
    point: PathBuf,
    stderr: PathBuf,
    fusermount: &'static str,
}

impl Mount {
    /// Starts `chunkvault mount POINT ARGS...` and polls until the
    /// filesystem answers (its `snapshots` directory is there).
    fn start(env: &Env, fusermount: &'static str, args: &[&str]) -> Mount {
        let point = env.path("mnt");
        fs::create_dir_all(&point).unwrap();
        let stderr = env.path("mount.stderr");
        let child = env
            .cmd()
            .arg("mount")
            .arg(&point)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount { child, point, stderr, fusermount };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !m.point.join("snapshots").is_dir() {
            if let Some(status) = m.child.try_wait().unwrap() {
                panic!("mount exited with {status} before it was ready: {}", m.stderr());
            }
            assert!(Instant::now() < deadline, "the mount did not answer within 60 s: {}", m.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn is_mounted(&self) -> bool {
        let point = fs::canonicalize(&self.point).unwrap();
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
        table.lines().any(|l| l.split(' ').nth(4) == Some(s(&point)))
    }

    /// Waits for the process to end by itself (after an unmount) and returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "mount still running 60 s after its unmount: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new(self.fusermount).args(["-u", "-z"]).arg(&self.point).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a shell line and returns its stdout, requiring success.
fn sh(line: &str) -> String {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// What `find` says about every entry below `dir`: type, path, mode,
/// owner, mtime (ns), symlink target, and the size of files.
fn listing(dir: &Path) -> String {
    let mut lines: Vec<String> = sh(&format!(
        "cd '{}' && find . -printf '%y %p %m %U %G %T@ %l\\n' && find . -type f -printf 'size %p %s\\n'",
        s(dir)
    ))
    .lines()
    .map(str::to_owned)
    .collect();
    lines.sort();
    lines.join("\n")
}

/// `sha256sum` of every file below `dir`, by relative path.
fn checksums(dir: &Path) -> String {
    sh(&format!("cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum", s(dir)))
}

/// A home-like tree: nested directories, a symlink, a big file of several
/// chunks, a private file, an empty file.
fn source(env: &Env) -> PathBuf {
    let src = env.path("src");
    fs::create_dir_all(src.join("docs/2026/deep/er")).unwrap();
    fs::create_dir_all(src.join("empty-dir")).unwrap();
    fs::write(src.join("docs/readme.txt"), b"hello from the mount\n").unwrap();
    fs::write(src.join("docs/2026/deep/er/note.md"), b"# deep\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("big.bin"), pseudo_random(20 << 20, 14)).unwrap();
    fs::write(src.join("secret"), b"only mine").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    symlink("docs/readme.txt", src.join("link")).unwrap();
    src
}

#[test]
fn a_mounted_snapshot_reads_back_byte_for_byte_and_refuses_writes() {
    let Some(fusermount) = fuse() else { return };
    let env = Env::new();
    let src = source(&env);
    let id =
        env.json(&["backup", s(&src), "--host", "laptop", "--tag", "home"])["snapshot"].as_str().unwrap().to_owned();
    // Another host's snapshot, which --host leaves out.
    let other = env.path("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("f"), b"other").unwrap();
    let other_id = env.json(&["backup", s(&other), "--host", "server"])["snapshot"].as_str().unwrap().to_owned();

    let mut m = Mount::start(&env, fusermount, &["--host", "laptop"]);
    let snap = m.point.join("snapshots").join(&id);
    let mounted = common::restored(&snap, &src);

    assert_eq!(listing(&mounted), listing(&src));
    assert_eq!(checksums(&mounted), checksums(&src));
    assert_eq!(sh(&format!("cat '{}'", s(&mounted.join("link")))), "hello from the mount\n");
    assert_eq!(fs::read_link(mounted.join("link")).unwrap(), Path::new("docs/readme.txt"));
    // 1 KiB from the middle of the big file.
    let middle =
        sh(&format!("dd if='{}' bs=1024 skip=10000 count=1 status=none | sha256sum", s(&mounted.join("big.bin"))));
    let want = sh(&format!("dd if='{}' bs=1024 skip=10000 count=1 status=none | sha256sum", s(&src.join("big.bin"))));
    assert_eq!(middle, want);

    // Read-only: no new file, no change, no removal, no directory.
    for line in [
        format!("echo x > '{}'", s(&mounted.join("new"))),
        format!("echo x >> '{}'", s(&mounted.join("docs/readme.txt"))),
        format!("touch '{}'", s(&mounted.join("empty"))),
        format!("rm '{}'", s(&mounted.join("secret"))),
        format!("mkdir '{}'", s(&mounted.join("d"))),
    ] {
        let out = Command::new("sh").args(["-c", &line]).output().unwrap();
        assert!(!out.status.success(), "{line} succeeded on the mount");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{line}: {out:?}");
    }

    // The layout: by id, by host, by tag, `latest`; the filter holds.
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(m.point.join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(""), ["hosts", "snapshots", "tags"]);
    assert_eq!(names("snapshots"), [id.clone(), "latest".into()]);
    assert_eq!(names("hosts"), ["laptop"]);
    assert_eq!(names("tags"), ["home"]);
    assert_eq!(fs::read_link(m.point.join("snapshots/latest")).unwrap(), Path::new(&id));
    assert_eq!(fs::read_link(m.point.join("hosts/laptop/latest")).unwrap(), Path::new(&id));
    for dir in [format!("hosts/laptop/{id}"), format!("tags/home/{id}"), "snapshots/latest".into()] {
        assert_eq!(checksums(&common::restored(&m.point.join(dir), &src)), checksums(&src));
    }
    assert!(!m.point.join("snapshots").join(&other_id).exists());

    let out = Command::new(fusermount).arg("-u").arg(&m.point).output().unwrap();
    assert!(out.status.success(), "{fusermount} -u: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(m.wait_exit(), Some(0), "{}", m.stderr());
    assert!(!m.is_mounted());
}

#[test]
fn sigint_and_sigterm_unmount_and_exit_cleanly() {
    let Some(fusermount) = fuse() else { return };
    let env = Env::new();
    let src = source(&env);
    env.ok(&["backup", s(&src)]);
    for signal in ["-INT", "-TERM"] {
        let mut m = Mount::start(&env, fusermount, &[]);
        assert!(m.is_mounted());
        let pid = m.child.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
        assert_eq!(m.wait_exit(), Some(0), "after kill {signal}: {}", m.stderr());
        assert!(!m.is_mounted(), "still mounted after kill {signal}");
        assert!(m.stderr().contains("unmounted"), "{}", m.stderr());
    }
}
