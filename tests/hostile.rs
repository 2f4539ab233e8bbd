//! The server under hostile and careless clients (issue 11, findings 8 and
//! 9): slow and half-sent requests, huge and deeply nested bodies, floods of
//! uploads, malformed HTTP, and the error answers each of them gets. The real
//! binary over loopback; raw TCP where a well-behaved client cannot misbehave
//! enough. Memory is the server's VmHWM (peak RSS) from /proc.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pseudo_random;
use common::server::*;

const MIB: u64 = 1 << 20;

/// A session token of a fresh device of `tenant`.
fn session(dir: &Path, url: &str, tenant: &str, device: &str) -> String {
    let dev = Dev::activate(dir, url, &deployment_token(url, tenant), &format!("{device}@{tenant}.com"), device);
    dev.json(&["snapshots"]);
    dev.session()
}

fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_owned()
}

/// A `/proc/PID/status` figure in bytes (`VmHWM`: peak RSS; `VmRSS`: now).
fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's open-files limit (inherited by the server it
/// starts) to the hard limit: 1,000 idle connections need more than 1,024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(lim.rlim_cur >= 2400, "the hard open-files limit ({}) is too low for this test", lim.rlim_cur);
}

/// A response read off a raw connection: status, head, body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Sends `request` as bytes and reads one response until the server closes
/// the connection (requests ask for `Connection: close`) or 30 s pass.
fn raw(addr: &str, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> Raw {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no response: {all:?}"));
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Raw { status, head, body: all[split + 4..].to_vec() }
}

/// `GET /healthz` over a kept-alive connection, in milliseconds.
fn healthz_ms(agent: &ureq::Agent, url: &str) -> f64 {
    let t = Instant::now();
    let mut resp = agent.get(&format!("{url}/healthz")).call().expect("healthz");
    assert_eq!(resp.status().as_u16(), 200);
    resp.body_mut().read_to_vec().unwrap();
    t.elapsed().as_secs_f64() * 1000.0
}

/// Sets the flag when dropped: a test that panics inside a thread scope
/// still stops its probe thread, so the scope can end and report.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Probes `/healthz` every 20 ms until `stop`; the latencies, sorted.
fn probe_healthz(url: &str, stop: &AtomicBool) -> Vec<f64> {
    let agent = agent();
    let mut lat = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        lat.push(healthz_ms(&agent, url));
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// Lowers the calling thread's CPU priority. The load generator runs on
/// the server's two cores (a real client would not); 100 threads pushing
/// 4 MiB each would otherwise starve the probe thread that measures
/// `/healthz`, and the figure would be the test's own scheduling delay.
fn be_nice() {
    // SAFETY: setpriority on this thread's own id; no memory is involved.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS as _, libc::gettid() as libc::id_t, 10);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A JSON error body with this code.
fn assert_json_error(body: &[u8], expect: &str) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    assert_eq!(v["error"], expect, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

// ---- finding 8: held open and blown up ----

#[test]
fn half_sent_headers_are_cut_off_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &["--header-read-timeout-secs", "1"]);
    let a = addr(&server);
    let closed_after = |prefix: &[u8]| {
        let mut s = TcpStream::connect(&a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let t = Instant::now();
        s.write_all(prefix).unwrap();
        let mut buf = [0u8; 512];
        // EOF (or a reset) is the server closing; a timeout would be the bug.
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("connection still open after {:?}: {e}", t.elapsed()),
        };
        (n, t.elapsed())
    };
    // Half a request, nothing at all, and an idle kept-alive connection.
    for prefix in [&b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "[..], b""] {
        let (n, took) = closed_after(prefix);
        assert_eq!(n, 0, "no response to a request never completed");
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(6), "closed after {took:?}");
    }
    let mut s = TcpStream::connect(&a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    let t = Instant::now();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "an idle kept-alive connection is closed too");
    assert!(t.elapsed() < Duration::from_secs(6));
    // And the server still serves.
    assert_eq!(http("GET", &format!("{}/healthz", server.url), None, None).0, 200);
}

#[test]
fn a_stalled_body_gets_a_json_408_and_frees_its_upload_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("root"),
        &["--body-read-timeout-secs", "1", "--max-concurrent-uploads-per-tenant", "1"],
    );
    let s = session(dir.path(), &server.url, "acme", "d1");
    let id = "a".repeat(64);
    let t = Instant::now();
    let resp = raw(
        &addr(&server),
        format!(
            "PUT /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s}\r\nContent-Length: 1000\r\n\
             Connection: close\r\n\r\nonly ten b"
        )
        .as_bytes(),
    );
    assert_eq!(resp.status, 408, "{}", resp.head);
    assert_json_error(&resp.body, "body_timeout");
    assert!(t.elapsed() < Duration::from_secs(10));
    // The slot is free again: the next upload is heard (and found wrong).
    let (status, body) = http("PUT", &format!("{}/v1/chunks/{id}", server.url), Some(&s), Some(b"x"));
    assert_eq!((status, code(&body).as_str()), (400, "chunk_mismatch"));
}

#[test]
fn uploads_beyond_the_limits_get_429_or_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("root"),
        &["--max-concurrent-uploads", "2", "--max-concurrent-uploads-per-tenant", "1", "--upload-slot-wait-ms", "200"],
    );
    let a = addr(&server);
    let acme = session(dir.path(), &server.url, "acme", "d1");
    let globex = session(dir.path(), &server.url, "globex", "d2");
    let initech = session(dir.path(), &server.url, "initech", "d3");
    let id = "b".repeat(64);
    // An upload whose body has not all arrived holds its slot.
    let hold = |token: &str| {
        let mut s = TcpStream::connect(&a).unwrap();
        s.write_all(
            format!("PUT /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\nx")
                .as_bytes(),
        )
        .unwrap();
        s
    };
    let put = |token: &str| {
        let resp = agent()
            .put(&format!("{}/v1/chunks/{id}", server.url))
            .header("Authorization", &format!("Bearer {token}"))
            .send(&b"y"[..])
            .unwrap();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        let status = resp.status().as_u16();
        (status, retry, resp.into_body().read_to_vec().unwrap())
    };
    let held_acme = hold(&acme);
    eventually(10, "acme's slot to be taken", || put(&acme).0 == 429);
    let (status, retry, body) = put(&acme);
    assert_eq!((status, retry.as_deref()), (429, Some("1")));
    assert_json_error(&body, "too_many_uploads");
    // Another tenant still gets in, up to the total.
    // globex's hold itself may be answered 503 when it arrives while the
    // server has not yet let go of an earlier upload's permit; then it is
    // sent again, until it holds its slot and the total is reached.
    let mut held_globex = hold(&globex);
    eventually(10, "the total to be reached", || {
        if answered(&held_globex) {
            held_globex = hold(&globex);
        }
        put(&initech).0 == 503
    });
    let (status, retry, body) = put(&initech);
    assert_eq!((status, retry.as_deref()), (503, Some("1")));
    assert_json_error(&body, "server_busy");
    // Slots come back when the uploads end.
    drop((held_acme, held_globex));
    eventually(10, "slots to come back", || put(&initech).0 == 400 && put(&acme).0 == 400);
}

/// Whether the server has answered (or closed) a request whose body was
/// left unfinished, without waiting.
fn answered(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let answered = !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    answered
}

/// A commit manifest of about `target` bytes naming chunks nobody uploaded.
fn big_commit(target: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(target + 1024);
    out.extend_from_slice(br#"{"hostname":"h","paths":["/d"],"files":["#);
    let mut i = 0u64;
    while out.len() < target - 200 {
        if i > 0 {
            out.push(b',');
        }
        let id = blake3::hash(&i.to_le_bytes()).to_hex();
        write!(out, r#"{{"path":"d/f{i:08}","mode":420,"mtime":0,"size":1,"chunks":["{id}"]}}"#).unwrap();
        i += 1;
    }
    out.extend_from_slice(b"]}");
    out
}

#[test]
fn four_64_mib_commits_at_once_stay_in_bounded_memory_and_off_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let pid = server.child.id();
    let s = session(dir.path(), &server.url, "acme", "d1");
    let body = big_commit((64 << 20) - 4096);
    let before = proc_status(pid, "VmRSS");
    let stop = AtomicBool::new(false);
    let url = format!("{}/v1/snapshots", server.url);
    let lat = std::thread::scope(|scope| {
        let probe = scope.spawn(|| probe_healthz(&server.url, &stop));
        let _stop = StopOnDrop(&stop);
        let commits: Vec<_> = (0..4).map(|_| scope.spawn(|| http("POST", &url, Some(&s), Some(&body)))).collect();
        for c in commits {
            let (status, resp) = c.join().unwrap();
            assert_eq!((status, code(&resp).as_str()), (409, "missing_chunks"));
        }
        stop.store(true, Ordering::Relaxed);
        probe.join().unwrap()
    });
    let peak = proc_status(pid, "VmHWM");
    let (max, p50) = (lat[lat.len() - 1], percentile(&lat, 0.5));
    eprintln!(
        "4 x 64 MiB commits: RSS {} MiB before, peak {} MiB; /healthz max {max:.1} ms, p50 {p50:.1} ms ({} probes)",
        before / MIB,
        peak / MIB,
        lat.len()
    );
    assert!(peak < 512 * MIB, "peak RSS {} MiB", peak / MIB);
    assert!(max < 100.0, "/healthz took {max:.1} ms");
}

#[test]
fn oversized_and_deeply_nested_bodies_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let u = &server.url;
    let s = session(dir.path(), u, "acme", "d1");
    let s = Some(s.as_str());
    let nested = |depth: usize| {
        let mut b = "[".repeat(depth).into_bytes();
        b.extend(vec![b']'; depth]);
        b
    };
    for (route, token, body) in [
        ("/v1/snapshots", s, nested(1_000_000)),
        ("/v1/chunks/missing", s, format!("{{\"chunks\": {}}}", String::from_utf8(nested(50_000)).unwrap()).into()),
        ("/v1/session", None, nested(30_000)),
        ("/v1/activate", None, format!("{{\"a\":{}}}", "{\"a\":".repeat(10_000)).into_bytes()),
    ] {
        let (status, resp) = http("POST", &format!("{u}{route}"), token, Some(&body));
        assert_eq!((status, code(&resp).as_str()), (400, "malformed_json"), "{route}");
    }
    let (status, resp) = http("POST", &format!("{u}/v1/snapshots"), s, Some(&vec![b'['; (64 << 20) + 1]));
    assert_eq!((status, code(&resp).as_str()), (413, "too_large"));
    let (status, resp) = http("POST", &format!("{u}/v1/admin/deployment-tokens"), Some(ADMIN), Some(&[b' '; 70_000]));
    assert_eq!((status, code(&resp).as_str()), (413, "too_large"));
    // A chunked body over the bound (no Content-Length to go by).
    let mut req =
        b"POST /v1/session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 40_000, " ".repeat(40_000)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(&addr(&server), &req);
    assert_eq!(resp.status, 413);
    assert_json_error(&resp.body, "too_large");
    assert_eq!(http("GET", &format!("{u}/healthz"), None, None).0, 200, "still up");
}

#[test]
fn thousand_half_open_connections_and_hundred_4_mib_uploads_stay_under_512_mib() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    // A header timeout longer than the test, so that the idle connections
    // are there for all of it (half_sent_headers_... checks that they go).
    let server = Server::start(&dir.path().join("root"), &["--header-read-timeout-secs", "300"]);
    let pid = server.child.id();
    let a = addr(&server);
    let s = session(dir.path(), &server.url, "acme", "d1");
    let (status, chunking) = http("GET", &format!("{}/v1/chunking", server.url), Some(&s), None);
    assert_eq!(status, 200);
    let chunking: serde_json::Value = serde_json::from_slice(&chunking).unwrap();
    let key: [u8; 32] = hex::decode(chunking["id_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    // Made before the load, so the test's own work does not compete with it.
    let chunks: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| {
            let data = pseudo_random(4 << 20, 7_000 + i);
            (blake3::keyed_hash(&key, &data).to_hex().to_string(), data)
        })
        .collect();
    let rss_before = proc_status(pid, "VmRSS");
    let fds_before = open_fds(pid);

    let stop = AtomicBool::new(false);
    let refused = AtomicUsize::new(0);
    let half_open = Mutex::new(Vec::new());
    let lat = std::thread::scope(|scope| {
        let probe = scope.spawn(|| probe_healthz(&server.url, &stop));
        let _stop = StopOnDrop(&stop);
        let mut conns = half_open.lock().unwrap();
        for _ in 0..1000 {
            let mut c = TcpStream::connect(&a).unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Partial: still typ").unwrap();
            conns.push(c);
        }
        drop(conns);
        eventually(30, "the server to accept 1,000 connections", || open_fds(pid) >= fds_before + 1000);
        // Started over one second (a load test's ramp-up): all 100 are in
        // flight together (they take seconds), but 100 threads starting to
        // push 4 MiB into loopback sockets in the same millisecond would
        // measure the kernel's burst on these two cores, not the server.
        let uploads: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, (id, data))| {
                let (url, refused) = (format!("{}/v1/chunks/{id}", server.url), &refused);
                let s = &s;
                scope.spawn(move || {
                    be_nice();
                    std::thread::sleep(Duration::from_millis(10 * i as u64));
                    upload_until_stored(&url, s, data, refused);
                })
            })
            .collect();
        for u in uploads {
            u.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        probe.join().unwrap()
    });
    // The server kept every idle connection: bounded memory, not shedding.
    let mut conns = half_open.into_inner().unwrap();
    for c in &mut conns {
        c.set_nonblocking(true).unwrap();
        let err = c.read(&mut [0u8; 16]).expect_err("nothing to read and not closed");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    }
    let peak = proc_status(pid, "VmHWM");
    let (max, p50, p99) = (lat[lat.len() - 1], percentile(&lat, 0.5), percentile(&lat, 0.99));
    eprintln!(
        "1,000 half-open + 100 x 4 MiB uploads: RSS {} MiB before, peak (VmHWM) {} MiB; {} uploads refused \
         (429/503) and retried; /healthz max {max:.1} ms, p99 {p99:.1} ms, p50 {p50:.1} ms ({} probes)",
        rss_before / MIB,
        peak / MIB,
        refused.load(Ordering::Relaxed),
        lat.len()
    );
    assert!(peak < 512 * MIB, "peak RSS {} MiB", peak / MIB);
    assert!(max < 100.0, "/healthz took {max:.1} ms");
    let (status, body) = http(
        "POST",
        &format!("{}/v1/chunks/missing", server.url),
        Some(&s),
        Some(serde_json::json!({"chunks": chunks.iter().map(|(id, _)| id).collect::<Vec<_>>()}).to_string().as_bytes()),
    );
    assert_eq!(status, 200);
    let missing: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(missing["missing"].as_array().unwrap().len(), 0, "every upload was stored");
}

/// PUTs one chunk until it is stored, waiting `Retry-After` whenever the
/// server is at its upload limits; counts those refusals.
fn upload_until_stored(url: &str, token: &str, data: &[u8], refused: &AtomicUsize) {
    loop {
        let resp = agent().put(url).header("Authorization", &format!("Bearer {token}")).send(data).expect("upload");
        let status = resp.status().as_u16();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        let body = resp.into_body().read_to_vec().unwrap();
        match status {
            201 => return,
            429 | 503 => {
                assert_json_error(&body, if status == 429 { "too_many_uploads" } else { "server_busy" });
                refused.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(retry.expect("Retry-After")));
            }
            other => panic!("upload: {other} {}", String::from_utf8_lossy(&body)),
        }
    }
}

// ---- finding 9: error answers ----

#[test]
fn method_not_allowed_long_uris_and_big_headers_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let u = &server.url;
    let resp = agent().delete(&format!("{u}/v1/snapshots")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("POST"), "Allow: {allow}");
    assert_json_error(&resp.into_body().read_to_vec().unwrap(), "method_not_allowed");
    let (status, body) = http("GET", &format!("{u}/healthz"), None, None);
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));

    let long = format!("{u}/v1/snapshots/{}/tree?path={}", "a".repeat(64), "x".repeat(20_000));
    let (status, body) = http("GET", &long, None, None);
    assert_eq!(status, 414);
    assert_json_error(&body, "uri_too_long");

    let resp = agent().get(&format!("{u}/healthz")).header("X-Big", "y".repeat(70_000)).call().unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    assert_json_error(&resp.into_body().read_to_vec().unwrap(), "headers_too_large");
}

#[test]
fn malformed_requests_the_app_sees_get_json_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let a = addr(&server);
    let s = session(dir.path(), &server.url, "acme", "d1");
    // A path segment that is not UTF-8 once percent-decoded.
    let resp = raw(&a, format!("GET /v1/snapshots/%FF%FE/tree HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s}\r\nConnection: close\r\n\r\n").as_bytes());
    assert_eq!(resp.status, 400, "{}", resp.head);
    assert_json_error(&resp.body, "invalid_request");
    // A chunked body whose framing breaks half-way.
    let resp = raw(
        &a,
        b"POST /v1/session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\n{\"a\":\r\nzz-not-hex\r\n",
    );
    assert_eq!(resp.status, 400, "{}", resp.head);
    assert_json_error(&resp.body, "bad_body");
    assert_eq!(resp.header("content-type").as_deref(), Some("application/json"));
}

#[test]
fn unsatisfiable_range_has_content_range_and_bearer_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let dev = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "d1");
    let data = dir.path().join("data");
    make_data(&data, 1);
    let id = dev.backup(&data)["id"].as_str().unwrap().to_owned();
    let s = dev.session();
    let file = format!("{}/v1/snapshots/{id}/file?path={}/notes.txt", server.url, &data.to_str().unwrap()[1..]);
    let size = std::fs::metadata(data.join("notes.txt")).unwrap().len();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = agent().get(&file).header("Authorization", &format!("{scheme} {s}")).call().unwrap();
        assert_eq!(resp.status().as_u16(), 200, "scheme {scheme}");
    }
    let resp = agent()
        .get(&file)
        .header("Authorization", &format!("Bearer {s}"))
        .header("Range", "bytes=5000-")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 416);
    let range = resp.headers().get("content-range").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(range, Some(format!("bytes */{size}")));
    assert_json_error(&resp.into_body().read_to_vec().unwrap(), "bad_range");
    // A scheme that is not Bearer is not a token.
    let resp = agent().get(&file).header("Authorization", &format!("Basic {s}")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[test]
fn damaged_chunk_before_the_first_byte_is_a_json_500_after_it_a_cut() {
    use chunkvault::tree::NodeKind;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = Server::start(&root, &[]);
    let dev = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "d1");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (small, big) = (pseudo_random(100_000, 1), pseudo_random(5_000_000, 2));
    std::fs::write(data.join("small.bin"), &small).unwrap();
    std::fs::write(data.join("big.bin"), &big).unwrap();
    let id = dev.backup(&data)["id"].as_str().unwrap().to_owned();

    // Find each file's chunks and flip a byte inside the stored chunk: the
    // first (only) chunk of small.bin, the second of big.bin (the first of
    // which, at least 256 KiB, is sent before the second is read).
    let backend = chunkvault::repo::open_backend(root.join("acme").to_str().unwrap(), false).unwrap();
    let repo = chunkvault::repo::Repository::open(backend, common::PASSWORD.as_bytes()).unwrap();
    let snap = repo.load_snapshot(&id.parse().unwrap()).unwrap();
    let rel = |name: &str| format!("{}/{name}", &data.to_str().unwrap()[1..]);
    let chunks = |name: &str| match repo.find_node(&snap.tree, &rel(name)).unwrap().unwrap().kind {
        NodeKind::File { chunks } => chunks,
        _ => panic!("{name} is not a file"),
    };
    let (small_chunks, big_chunks) = (chunks("small.bin"), chunks("big.bin"));
    assert!(big_chunks.len() >= 2);
    for c in [small_chunks[0], big_chunks[1]] {
        let loc = repo.index().get(&c).unwrap();
        let pack = walk(&root.join("acme/packs")).into_iter().find(|p| p.ends_with(loc.pack.to_hex())).unwrap();
        let mut bytes = std::fs::read(&pack).unwrap();
        let at = loc.offset as usize + chunkvault::pack::FRAME_HEADER_LEN + 20;
        bytes[at] ^= 0x55;
        std::fs::set_permissions(&pack, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        std::fs::write(&pack, bytes).unwrap();
    }
    drop(repo);

    let s = dev.session();
    let url = |name: &str| format!("{}/v1/snapshots/{id}/file?path={}", server.url, rel(name));
    let (status, body) = http("GET", &url("small.bin"), Some(&s), None);
    assert_eq!(status, 500);
    assert_json_error(&body, "damaged_data");
    // After the first piece was handed to hyper: the connection is cut,
    // never wrong bytes. The client gets the status and a prefix of the
    // file, or, when the cut comes before hyper flushed its buffer, nothing.
    match agent().get(&url("big.bin")).header("Authorization", &format!("Bearer {s}")).call() {
        Ok(mut resp) => {
            assert_eq!(resp.status().as_u16(), 200);
            let mut got = Vec::new();
            let read = resp.body_mut().as_reader().read_to_end(&mut got);
            assert!(read.is_err() || got.len() < big.len(), "the response was not cut");
            assert!(big.starts_with(&got), "{} bytes, not a prefix of the file", got.len());
        }
        Err(e) => eprintln!("cut before the head was flushed: {e}"),
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn an_empty_admin_token_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let empty_file = dir.path().join("admin-token");
    std::fs::write(&empty_file, "\n").unwrap();
    let start = |env: Option<&str>, file: Option<&Path>| {
        let mut c = std::process::Command::new(BIN);
        c.args(["serve", "--listen", "127.0.0.1:0", "--root", dir.path().join("root").to_str().unwrap()])
            .env("CHUNKVAULT_PASSWORD", common::PASSWORD)
            .env_remove("CHUNKVAULT_ADMIN_TOKEN");
        if let Some(v) = env {
            c.env("CHUNKVAULT_ADMIN_TOKEN", v);
        }
        if let Some(f) = file {
            c.arg("--admin-token-file").arg(f);
        }
        let mut child = c
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that accepted the token would run until killed: poll.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server started with an empty admin token");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    for out in [start(Some(""), None), start(None, Some(&empty_file))] {
        assert!(!out.status.success(), "started with an empty admin token");
        assert!(out.stdout.is_empty(), "it never listened");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin token is empty"), "{err}");
    }
}

/// Restore streams take turns (`--max-concurrent-reads`), each holding a
/// read buffer while it reads: a client that stops reading must not keep
/// its turn, or a few such clients would stop every restore on the node.
#[test]
fn a_client_that_stops_reading_a_restore_stream_loses_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start(&dir.path().join("root"), &["--max-concurrent-reads", "1", "--body-read-timeout-secs", "1"]);
    let dev = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "d1");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // More than the stalled client's socket buffer (made small below) and
    // the server's send buffer and the stream's channel hold, so the
    // stream blocks on the client.
    std::fs::write(data.join("big.bin"), pseudo_random(24 << 20, 7)).unwrap();
    std::fs::write(data.join("small.txt"), b"small and quick").unwrap();
    let id = dev.backup(&data)["id"].as_str().unwrap().to_owned();
    let s = dev.session();
    let path = |name: &str| format!("/v1/snapshots/{id}/file?path={}/{name}", &data.to_str().unwrap()[1..]);

    // The stalled client: sends its request, reads the head, then nothing.
    let mut stalled = TcpStream::connect(addr(&server)).unwrap();
    // A fixed small receive buffer: loopback's autotuning would otherwise
    // take in tens of MiB for a client that reads nothing.
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a plain setsockopt on a socket this test owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stalled),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let request = format!("GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s}\r\n\r\n", path("big.bin"));
    stalled.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 64];
    stalled.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));

    // The only read turn is the stalled stream's until it gives up on its
    // client; then the next restore is served. Bounded by the agent's timeout.
    let quick = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let mut resp = quick
        .get(&format!("{}{}", server.url, path("small.txt")))
        .header("Authorization", &format!("Bearer {s}"))
        .call()
        .expect("a restore behind a stalled one is served once the stall times out");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.body_mut().read_to_vec().unwrap(), b"small and quick");
    // The stalled stream was cut, not finished: the client can read what
    // was buffered on the way, then the connection ends short of the file.
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(rest.len() < 24 << 20, "the stalled stream was not cut ({} bytes)", rest.len());
    drop(stalled);
}

#[test]
fn a_commit_at_the_deepest_allowed_paths_is_stored_and_planned_without_harm() {
    // A 4 KiB path of one-letter names is 2,048 levels: the node builds and
    // saves its trees (once a recursion that overflowed a stack and aborted
    // the whole node) and walks them for a restore plan.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let u = &server.url;
    let s = session(dir.path(), u, "acme", "d1");
    let depth = 2048;
    let chain = vec!["a"; depth - 1].join("/");
    let mut files = vec![format!(r#"{{"path":"{chain}/f","mode":420,"mtime":0,"size":0,"chunks":[]}}"#)];
    for d in 1..100 {
        let fork = vec!["a"; d].join("/");
        files.push(format!(r#"{{"path":"{fork}/b","mode":420,"mtime":0,"size":0,"chunks":[]}}"#));
    }
    let body = format!(r#"{{"hostname":"h","paths":["/a"],"files":[{}]}}"#, files.join(","));
    let (status, resp) = http("POST", &format!("{u}/v1/snapshots"), Some(&s), Some(body.as_bytes()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let id = serde_json::from_slice::<serde_json::Value>(&resp).unwrap()["id"].as_str().unwrap().to_owned();
    let (status, plan) = http("POST", &format!("{u}/v1/snapshots/{id}/restore-plan"), Some(&s), Some(b"{}"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&plan));
    let plan: serde_json::Value = serde_json::from_slice(&plan).unwrap();
    let entries = plan["entries"].as_array().unwrap();
    assert_eq!(entries.len(), (depth - 1) + 100, "every directory and file of the commit");
    assert!(entries.iter().any(|e| e["path"].as_str() == Some(&format!("{chain}/f"))));
    assert_eq!(http("GET", &format!("{u}/healthz"), None, None).0, 200);
}
