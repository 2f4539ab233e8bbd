//! Load test: N concurrent devices back up and restore over loopback against
//! a real `chunkvault serve` for a bounded time, then print throughput,
//! latency, errors and the server's peak memory.
//!
//! ```text
//! cargo build && cargo run --example load -- [DEVICES=32] [SECONDS=20] [FILE_KIB=512]
//! ```
//! The server binary is `$CHUNKVAULT_BIN`, else `target/debug/chunkvault`.
//! Each round a device rewrites one file (new random bytes) next to an
//! unchanged one, backs up, restores the snapshot and compares the bytes.

#[path = "../tests/common/noise.rs"]
mod noise;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkvault::client::admin::AdminClient;
use chunkvault::client::device::{Device, ManagedConfig};

const ADMIN: &str = "load admin token";

#[derive(Default)]
struct Totals {
    rounds: AtomicU64,
    errors: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (devices, seconds, file_kib) = (arg(1, 32) as usize, arg(2, 20), arg(3, 512) as usize);
    let bin = std::env::var("CHUNKVAULT_BIN").unwrap_or_else(|_| "target/debug/chunkvault".into());
    let work = tempfile::tempdir()?;

    let mut server = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(work.path().join("root"))
        .args(["--tenant-kdf-memory-kib", "8192", "--tenant-kdf-iterations", "1"])
        .env("CHUNKVAULT_PASSWORD", "load password")
        .env("CHUNKVAULT_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout")).read_line(&mut line)?;
    let url = line.trim().strip_prefix("listening on ").ok_or("server did not start")?.to_owned();

    let admin = AdminClient::new(&url, ADMIN.into());
    let token = admin
        .create_deployment_token(&chunkvault::api::CreateDeploymentToken {
            tenant: "load".into(),
            expires_in_secs: None,
            max_activations: None,
            policies: None,
            provisioned_only: false,
        })?
        .token;

    let totals = Arc::new(Totals::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..devices)
        .map(|i| {
            let (url, token, totals, dir) =
                (url.clone(), token.clone(), totals.clone(), work.path().join(format!("d{i}")));
            std::thread::spawn(move || {
                if let Err(e) = device_loop(i, &url, &token, &dir, file_kib, deadline, &totals) {
                    eprintln!("device {i}: {e}");
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("device thread");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = ureq::get(&format!("{url}/metrics")).call()?.body_mut().read_to_string()?;
    let peak_kib = peak_rss_kib(server.id());
    // SAFETY: signalling our own child process by its pid.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    server.wait()?;

    let mut lat = totals.latencies.lock().expect("latencies").clone();
    lat.sort_by(f64::total_cmp);
    let q =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    let (up, down) = (totals.bytes_up.load(Ordering::Relaxed), totals.bytes_down.load(Ordering::Relaxed));
    println!("devices {devices}, {elapsed:.1} s, file {file_kib} KiB + 64 KiB unchanged per round");
    println!("rounds (backup + restore + compare): {}", totals.rounds.load(Ordering::Relaxed));
    println!("throughput: up {:.1} MB/s, down {:.1} MB/s", up as f64 / elapsed / 1e6, down as f64 / elapsed / 1e6);
    println!("operation latency (backup or restore): p50 {:.1} ms, p99 {:.1} ms", q(0.5) * 1e3, q(0.99) * 1e3);
    let (p50, p99, count) = histogram_quantiles(&metrics);
    println!(
        "request latency (server histogram, bucket upper bounds): p50 <= {p50} s, p99 <= {p99} s over {count} requests"
    );
    println!("errors: {}", totals.errors.load(Ordering::Relaxed));
    println!("server peak RSS: {:.1} MiB", peak_kib as f64 / 1024.0);
    Ok(())
}

fn device_loop(
    i: usize,
    url: &str,
    token: &str,
    dir: &Path,
    file_kib: usize,
    deadline: Instant,
    totals: &Totals,
) -> Result<(), Box<dyn std::error::Error>> {
    let managed = ManagedConfig {
        server_url: url.into(),
        user_email: format!("user{}@load.example", i % 8),
        deployment_token: token.into(),
        allow_restore_to_other_device: true,
        allow_open_in: true,
        device_id: Some(format!("load-{i}")),
        ca_certificate: None,
        // A load test may aim at a plain-HTTP test server on another host.
        allow_insecure_http: true,
    };
    let mut device = Device::activate(&dir.join("state"), &managed)?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("unchanged.bin"), noise::pseudo_random(64 * 1024, i as u64))?;
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let content = noise::pseudo_random(file_kib * 1024, (i as u64) << 32 | round);
        std::fs::write(data.join("changing.bin"), &content)?;
        let t = Instant::now();
        let done = device.backup(std::slice::from_ref(&data))?;
        record(totals, t);
        totals.bytes_up.fetch_add(done.bytes_uploaded, Ordering::Relaxed);
        let target = dir.join(format!("restore-{round}"));
        let t = Instant::now();
        let restored = device.restore(&done.id, &target, &[], chunkvault::restore::Overwrite::Always)?;
        record(totals, t);
        totals.bytes_down.fetch_add(restored.report.bytes, Ordering::Relaxed);
        let back = std::fs::read(target.join(data.strip_prefix("/")?).join("changing.bin"))?;
        if back != content {
            return Err("restored bytes differ".into());
        }
        std::fs::remove_dir_all(&target)?;
        totals.rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn record(totals: &Totals, since: Instant) {
    totals.latencies.lock().expect("latencies").push(since.elapsed().as_secs_f64());
}

/// The p50 and p99 bucket bounds of the server's latency histogram.
fn histogram_quantiles(metrics: &str) -> (String, String, u64) {
    let buckets: Vec<(String, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("chunkvault_request_duration_seconds_bucket{le=\""))
        .filter_map(|l| l.split_once("\"} ").map(|(le, n)| (le.to_owned(), n.parse().unwrap_or(0))))
        .collect();
    let count = buckets.last().map_or(0, |b| b.1);
    let at = |p: f64| {
        let want = (count as f64 * p).ceil() as u64;
        buckets.iter().find(|(_, n)| *n >= want).map_or("?".into(), |(le, _)| le.clone())
    };
    (at(0.5), at(0.99), count)
}

/// The peak resident set (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status"))).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
