//! Against a real S3-compatible cluster: several writers on one bucket, a
//! node failing during a backup, a failing endpoint, and the local cache.
//!
//! Needs the 3-node Garage cluster of `scripts/garage-cluster.sh start` and
//! `CHUNKVAULT_TEST_S3=1` (`.ci/run` does both); without it these tests are
//! listed as ignored, and when asked to run without a cluster they fail.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkvault::backend::{Backend, FileType, S3Backend};
use chunkvault::repo::Repository;
use common::{assert_same_tree, pseudo_random, restored, s3_location, Env, PASSWORD};

const NEEDS_CLUSTER: &str = "needs a Garage cluster: scripts/garage-cluster.sh start, CHUNKVAULT_TEST_S3=1";

/// An initialised repository on S3, with cheap KDF parameters.
fn s3_env(extra_init: &[&str]) -> Env {
    let env = Env::uninit();
    assert!(env.is_s3(), "{NEEDS_CLUSTER}");
    let mut args = vec!["init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"];
    args.extend_from_slice(extra_init);
    env.ok(&args);
    env
}

/// A device's files: some of its own, and one every device shares (so
/// concurrent writers race to store the same chunks).
fn device_tree(root: &Path, device: u64) {
    fs::create_dir_all(root.join("docs")).unwrap();
    fs::write(root.join("docs/own.bin"), pseudo_random(1 << 20, 100 + device)).unwrap();
    fs::write(root.join("docs/note.txt"), format!("device {device}\n").repeat(100)).unwrap();
    fs::write(root.join("shared.bin"), pseudo_random(1 << 20, 7)).unwrap();
}

/// Polls `cond` every 50 ms until it holds, for at most `secs` seconds.
fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // The poll interval, so the loop does not flood the store with LISTs.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_ok(child: Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Eight devices back up at once through two "storage nodes" (processes
/// with their own caches) into one bucket; every snapshot restores exactly
/// through either node, the shared file is stored once per racing writer at
/// most, and `check --read-data` passes.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn eight_devices_through_two_nodes_on_one_bucket() {
    let env = s3_env(&[]);
    let node_cache = |node: usize| env.path(&format!("node-{node}-cache"));
    let mut running = Vec::new();
    for device in 0..8u64 {
        let src = env.path(&format!("device-{device}"));
        device_tree(&src, device);
        let child = env
            .cmd()
            .env("CHUNKVAULT_CACHE_DIR", node_cache(device as usize % 2))
            .args(["backup", src.to_str().unwrap(), "--host", &format!("device-{device}"), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        running.push((device, src, child));
    }
    let mut snapshots = Vec::new();
    for (device, src, child) in running {
        let out = wait_ok(child, &format!("backup of device {device}"));
        let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
        snapshots.push((summary["snapshot"].as_str().unwrap().to_owned(), src));
    }
    for node in 0..2 {
        for (id, src) in &snapshots {
            let target = env.path(&format!("restore-{node}-{}", &id[..8]));
            let out = env
                .cmd()
                .env("CHUNKVAULT_CACHE_DIR", node_cache(node))
                .args(["restore", id, "--target", target.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_same_tree(src, &restored(&target, src));
        }
    }
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 8);
    let check = env.run(&["check", "--read-data"]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
}

/// Two repository handles on one bucket, as two storage nodes have: what
/// one stores, the other sees after `refresh_index`, and then does not
/// store again.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn a_node_sees_the_other_nodes_chunks_after_refresh() {
    let env = s3_env(&[]);
    let open = || Repository::open(env.backend(), PASSWORD.as_bytes()).unwrap();
    let (a, b) = (open(), open());
    let src = env.path("src");
    device_tree(&src, 1);
    let opts = chunkvault::backup::BackupOptions::default();
    let progress = chunkvault::backup::BackupProgress::default();
    let first = chunkvault::backup::backup(&a, &[&src], &opts, &progress).unwrap();
    assert!(first.snapshot.summary.blobs_new > 0);

    assert_eq!(b.index().len(), 0, "b opened before a stored anything");
    assert!(b.refresh_index().unwrap() >= 1, "b loads a's new segment");
    assert_eq!(b.index().len(), a.index().len());
    assert_eq!(b.refresh_index().unwrap(), 0, "nothing new the second time");
    // The same files under another path: no parent snapshot, so every file
    // is read and chunked, and every data chunk is found in the index.
    let copy = env.path("copy");
    device_tree(&copy, 1);
    let again = chunkvault::backup::backup(&b, &[&copy], &opts, &progress).unwrap();
    let summary = &again.snapshot.summary;
    assert_eq!(summary.bytes_read, first.snapshot.summary.bytes_read);
    assert!(summary.bytes_new < 16 << 10, "only new trees: {summary:?}");
}

/// One of the three Garage nodes stops while a backup is uploading: the
/// backup completes (a write quorum of two remains) or fails cleanly and a
/// retry completes; the snapshot committed before is intact, and so is
/// everything after the node is back.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn a_storage_node_stopped_mid_backup_loses_nothing_committed() {
    let env = s3_env(&["--pack-size-mib", "1"]);
    let first = env.path("first");
    device_tree(&first, 1);
    env.backup(&first);

    let big = env.path("big");
    fs::create_dir(&big).unwrap();
    for i in 0..64 {
        fs::write(big.join(format!("f{i}")), pseudo_random(1 << 20, 1000 + i)).unwrap();
    }
    let backend = env.backend();
    let packs_before = backend.list(FileType::Pack).unwrap().len();
    let mut child = env
        .cmd()
        .args(["backup", big.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the backup to upload a pack", 120, || backend.list(FileType::Pack).unwrap().len() > packs_before);
    cluster(&["stop-node", "3"]);
    // Said, not asserted: how fast the backup is is not this test's business.
    let mid = child.try_wait().unwrap().is_none();
    eprintln!("node 3 stopped {} the backup finished", if mid { "before" } else { "after" });
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("S3 endpoint"), "a clean, clear failure: {stderr}");
        eprintln!("the backup failed cleanly with a node down; retrying: {stderr}");
        env.backup(&big);
    }
    let ok = env.run(&["check", "--read-data"]);
    cluster(&["start-node", "3"]);
    assert_eq!(ok.status.code(), Some(0), "with a node down: {}", String::from_utf8_lossy(&ok.stderr));
    for src in [&first, &big] {
        let target = env.path(&format!("restore-{}", src.file_name().unwrap().to_str().unwrap()));
        let snapshot = env
            .json(&["snapshots"])
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s["paths"].as_array().unwrap().iter().any(|p| p.as_str() == src.to_str()))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        env.ok(&["restore", &snapshot, "--target", target.to_str().unwrap()]);
        assert_same_tree(src, &restored(&target, src));
    }
    assert_eq!(env.run(&["check", "--read-data"]).status.code(), Some(0));
}

fn cluster(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/garage-cluster.sh");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "garage-cluster.sh {args:?}");
}

/// What the proxy does with new connections.
const FORWARD: u8 = 0;
const FAIL_503: u8 = 1;
const DROP: u8 = 2;

/// A loopback TCP proxy in front of the S3 endpoint that forwards, answers
/// every request with 503, or drops every connection. The mode applies to
/// connections accepted after it is set (each CLI run makes new ones).
struct Proxy {
    addr: String,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let m = mode.clone();
        // Lives until the test process ends.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                match m.load(Ordering::SeqCst) {
                    FORWARD => forward(conn, &upstream),
                    FAIL_503 => {
                        std::thread::spawn(move || answer_503(conn));
                    }
                    _ => drop(conn),
                }
            }
        });
        Proxy { addr, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

fn forward(client: TcpStream, upstream: &str) {
    let Ok(server) = TcpStream::connect(upstream) else { return };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
    pipe(server, client);
}

/// Reads the request head, answers 503 SlowDown and closes.
fn answer_503(mut conn: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let body = "<Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
    let _ = write!(
        conn,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.shutdown(Shutdown::Both);
}

/// Through a proxy that fails every request (503) or drops every
/// connection, commands fail with a clear error naming the endpoint, never
/// print the secret key, and leave the repository as it was: it checks
/// clean and restores once the endpoint works again.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn a_failing_endpoint_is_a_clear_error_and_damages_nothing() {
    let endpoint = std::env::var("CHUNKVAULT_S3_ENDPOINT").expect(NEEDS_CLUSTER);
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").expect(NEEDS_CLUSTER);
    let proxy = Proxy::start(&endpoint);
    let env = s3_env(&[]);
    let via_proxy = |args: &[&str]| {
        env.cmd()
            .env("CHUNKVAULT_S3_ENDPOINT", &proxy.addr)
            .env("CHUNKVAULT_S3_MAX_RETRIES", "2")
            .args(args)
            .output()
            .unwrap()
    };
    let src = env.path("src");
    device_tree(&src, 3);
    let first = via_proxy(&["backup", src.to_str().unwrap()]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));

    fs::write(src.join("new.bin"), pseudo_random(2 << 20, 99)).unwrap();
    for (mode, expect) in [(FAIL_503, "503"), (DROP, "S3 endpoint")] {
        proxy.set(mode);
        for args in [vec!["backup", src.to_str().unwrap()], vec!["snapshots"]] {
            let out = via_proxy(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.contains(&proxy.addr) && stderr.contains(expect), "{args:?}: {stderr}");
            assert!(!stderr.contains(&secret), "the secret key leaked: {stderr}");
        }
    }
    proxy.set(FORWARD);
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 1, "nothing half-committed");
    assert_eq!(env.run(&["check", "--read-data"]).status.code(), Some(0));
    env.backup(&src);
    let target = env.path("restore");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &restored(&target, &src));
}

/// Reopening a remote repository reads its index segments and trees from
/// the local cache: the second open and walk send no GET for them.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn reopening_reads_index_and_trees_from_the_cache() {
    let env = s3_env(&[]);
    for i in 0..3 {
        let src = env.path(&format!("src{i}"));
        device_tree(&src, i);
        env.backup(&src);
    }
    // The library reads the cache location from the environment.
    std::env::set_var("CHUNKVAULT_CACHE_DIR", env.path("lib-cache"));
    let location = s3_location().map(|_| env.location.clone()).unwrap();
    let walk = || {
        let backend = Arc::new(S3Backend::from_url(&location).unwrap());
        let repo = Repository::open(backend.clone(), PASSWORD.as_bytes()).unwrap();
        let segments = backend.list(FileType::Index).unwrap().len() as u64;
        for (_, snapshot) in repo.list_snapshots().unwrap() {
            let path = snapshot.paths[0].trim_start_matches('/').to_owned();
            let node = repo.find_node(&snapshot.tree, &format!("{path}/docs/note.txt")).unwrap();
            assert!(node.is_some());
        }
        (backend.requests().get, segments)
    };
    let (cold, segments) = walk();
    let (warm, _) = walk();
    // Warm: the config and the key file only (snapshots, segments, trees cached).
    assert_eq!(warm, 2, "cold run sent {cold} GETs for {segments} segments");
    assert!(cold > warm + segments, "cold {cold}, warm {warm}");

    // A damaged cache is never believed: every cached file zeroed, the walk
    // still finds every file (it fetches again), and the cache is repaired.
    let zeroed = zero_files(&env.path("lib-cache"));
    assert!(zeroed > segments as usize, "{zeroed} files cached");
    let (repair, _) = walk();
    assert!(repair > warm + segments, "repair run sent {repair} GETs");
    assert_eq!(walk().0, 2, "repaired");
}

/// Overwrites every file below `dir` with zeros of the same length.
fn zero_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            n += zero_files(&p);
        } else {
            let len = fs::metadata(&p).unwrap().len() as usize;
            fs::write(&p, vec![0u8; len]).unwrap();
            n += 1;
        }
    }
    n
}

/// `init` into a bucket that does not exist names the bucket.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn init_into_a_missing_bucket_says_so() {
    let env = Env::uninit();
    assert!(env.is_s3(), "{NEEDS_CLUSTER}");
    let out = env
        .cmd()
        .env("CHUNKVAULT_REPO", "s3://no-such-bucket-here/x")
        .args(["init", "--kdf-memory-kib", "1024", "--kdf-iterations", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bucket \"no-such-bucket-here\" does not exist"), "{stderr}");
}
