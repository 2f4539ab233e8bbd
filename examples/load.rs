//! Load benchmark (issue 16): many devices in several tenants back up and
//! restore their own slices of a realistic corpus against one real
//! `chunkvault serve` over loopback, after one device alone does the same
//! in the same run, and the two are compared.
//!
//! ```text
//! cargo build --release && cargo run --release --example load -- \
//!     [--devices 64] [--tenants 8] [--rounds 3] [--mib 8] [--random-pct 20] \
//!     [--source /usr/share:/usr/lib] [--idle-secs N] [--churn N] [--restore-dir DIR] \
//!     [--server-setting 'max_concurrent_uploads = 16']...
//! ```
//! The server binary is `$CHUNKVAULT_BIN`, else `target/release/chunkvault`
//! if it exists, else `target/debug/chunkvault`.
//!
//! Each device gets its own slice (`--mib` MiB) of the regular files under
//! `--source` (copied, in path order, so a slice is a few neighbouring
//! directories), plus `--random-pct` percent of random bytes that dedup
//! with nothing. Each round every device backs up (all at once), then
//! every device restores its snapshot (all at once), then each restore is
//! compared byte for byte with the source, untimed. Between rounds each
//! device rewrites its random file and appends to one file in twenty.
//! Restores go under `--restore-dir` (default: the work directory, on the
//! temporary directory's file system); a tmpfs such as /dev/shm takes the
//! machine's disk out of the restore figures, as `bench/devices.sh` does.
//! Each `--server-setting` is a line of the server's TOML config (see
//! `chunkvault serve --help`), to compare its limits under the same load.
//!
//! Printed: throughput up (logical bytes backed up per second of the
//! backup phase, and bytes actually sent) and down (bytes restored per
//! second of the restore phase), per round and in total; p50 and p99 of
//! each request type as the devices saw it; errors; the server's RSS
//! sampled every second (min, max, last, and its trend over the second
//! half of the multi-device phase); and the ratio of the devices' total
//! throughput to the single device's.
//!
//! `--churn N` instead measures what an idle tenant costs the server: N
//! tenants one after another, one device each, one backup and restore, and
//! the server's RSS (VmRSS, VmHWM) and open tenants after each.

#[path = "../tests/common/noise.rs"]
mod noise;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use chunkvault::client::admin::AdminClient;
use chunkvault::client::device::{Device, ManagedConfig};
use chunkvault::client::{RequestObserver, RequestTiming};

const ADMIN: &str = "load admin token";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Command-line settings.
#[derive(Clone, Debug)]
struct Args {
    devices: usize,
    tenants: usize,
    rounds: usize,
    mib: u64,
    random_pct: u64,
    sources: Vec<PathBuf>,
    idle_secs: Option<u64>,
    churn: Option<usize>,
    restore_dir: Option<PathBuf>,
    server_settings: Vec<String>,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        devices: 64,
        tenants: 8,
        rounds: 3,
        mib: 8,
        random_pct: 20,
        sources: vec!["/usr/share".into(), "/usr/lib".into()],
        idle_secs: None,
        churn: None,
        restore_dir: None,
        server_settings: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--tenants" => a.tenants = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--mib" => a.mib = value()?.parse()?,
            "--random-pct" => a.random_pct = value()?.parse()?,
            "--source" => a.sources = value()?.split(':').map(PathBuf::from).collect(),
            "--idle-secs" => a.idle_secs = Some(value()?.parse()?),
            "--churn" => a.churn = Some(value()?.parse()?),
            "--restore-dir" => a.restore_dir = Some(value()?.into()),
            "--server-setting" => a.server_settings.push(value()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.devices == 0 || a.tenants == 0 || a.tenants > a.devices || a.rounds == 0 {
        return Err("need devices >= tenants >= 1 and rounds >= 1".into());
    }
    Ok(a)
}

/// Latencies (seconds) and errors per request type.
#[derive(Default)]
struct Requests {
    by_route: Mutex<BTreeMap<String, (Vec<f64>, u64)>>,
}

impl Requests {
    fn record(&self, route: &str, elapsed: Duration, ok: bool) {
        let mut m = self.by_route.lock().expect("requests lock");
        let e = m.entry(route.to_owned()).or_default();
        e.0.push(elapsed.as_secs_f64());
        if !ok {
            e.1 += 1;
        }
    }

    fn observer(self: &Arc<Self>) -> RequestObserver {
        let me = self.clone();
        Arc::new(move |t: &RequestTiming<'_>| me.record(t.route, t.elapsed, t.ok))
    }

    fn print(&self) {
        println!(
            "  {:<40} {:>8} {:>10} {:>10} {:>10} {:>7}",
            "request (device side)", "count", "p50 ms", "p99 ms", "max ms", "errors"
        );
        for (route, (lat, errors)) in self.by_route.lock().expect("requests lock").iter() {
            let mut lat = lat.clone();
            lat.sort_by(f64::total_cmp);
            println!(
                "  {route:<40} {:>8} {:>10.1} {:>10.1} {:>10.1} {errors:>7}",
                lat.len(),
                quantile(&lat, 0.5) * 1e3,
                quantile(&lat, 0.99) * 1e3,
                lat.last().copied().unwrap_or(0.0) * 1e3
            );
        }
    }
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The server process and its RSS samples (one a second).
struct Server {
    child: Child,
    url: String,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(work: &Path, a: &Args) -> Result<(Server, String), Error> {
        let bin = std::env::var("CHUNKVAULT_BIN").ok().unwrap_or_else(|| {
            if Path::new("target/release/chunkvault").exists() {
                "target/release/chunkvault".into()
            } else {
                "target/debug/chunkvault".into()
            }
        });
        let config = work.join("server.toml");
        let mut toml = String::new();
        if let Some(s) = a.idle_secs {
            toml.push_str(&format!("tenant_idle_secs = {s}\n"));
        }
        for line in &a.server_settings {
            toml.push_str(line);
            toml.push('\n');
        }
        std::fs::write(&config, toml)?;
        let mut child = Command::new(&bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(work.join("root"))
            .args(["--tenant-kdf-memory-kib", "8192", "--tenant-kdf-iterations", "1"])
            .env("CHUNKVAULT_PASSWORD", "load password")
            .env("CHUNKVAULT_ADMIN_TOKEN", ADMIN)
            .env("CHUNKVAULT_LOG", std::env::var("CHUNKVAULT_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line)?;
        let url = line.trim().strip_prefix("listening on ").ok_or("server did not start")?.to_owned();
        let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (pid, s2, stop2) = (child.id(), samples.clone(), stop.clone());
        let started = Instant::now();
        let sampler = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                s2.lock().expect("samples").push((started.elapsed().as_secs_f64(), status_kib(pid, "VmRSS:")));
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Ok((Server { child, url, samples, stop, sampler: Some(sampler) }, bin))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn elapsed_marker(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    fn stop(mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One value of the server's `/metrics`.
fn metric(url: &str, name: &str) -> Option<f64> {
    let text = ureq::get(&format!("{url}/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The corpus: regular files under the sources, in path order.
fn corpus_files(sources: &[PathBuf], want: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut stack: Vec<PathBuf> = sources.iter().rev().cloned().collect();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let Ok(meta) = e.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                subdirs.push(e.path());
            } else if meta.is_file() && meta.len() <= 16 << 20 && std::fs::File::open(e.path()).is_ok() {
                total += meta.len();
                out.push((e.path(), meta.len()));
                if total >= want {
                    return out;
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    out
}

/// Copies consecutive corpus files into `dir` until `bytes`; returns the
/// rest of the corpus.
fn fill_slice<'a>(files: &'a [(PathBuf, u64)], dir: &Path, bytes: u64) -> Result<&'a [(PathBuf, u64)], Error> {
    let mut copied = 0;
    let mut n = 0;
    for (i, (path, len)) in files.iter().enumerate() {
        if copied >= bytes {
            break;
        }
        let rel = path.strip_prefix("/").unwrap_or(path);
        let to = dir.join(format!("{i:06}")).join(rel.file_name().unwrap_or_default());
        std::fs::create_dir_all(to.parent().expect("parent"))?;
        std::fs::copy(path, &to)?;
        copied += len;
        n = i + 1;
    }
    Ok(&files[n..])
}

/// One device's state in the benchmark.
struct Bench {
    device: Device,
    data: PathBuf,
    /// Where this device's restores go (a directory of its own).
    restores: PathBuf,
    random_bytes: usize,
    seed: u64,
}

impl Bench {
    /// Changes between rounds: a new random file, and one file in twenty appended to.
    fn change(&self, round: usize) -> Result<(), Error> {
        let seed = self.seed << 16 | round as u64;
        std::fs::write(self.data.join("random.bin"), noise::pseudo_random(self.random_bytes, seed))?;
        if round > 0 {
            let mut n = 0;
            for e in walk(&self.data.join("files"))? {
                n += 1;
                if n % 20 == round % 20 {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new().append(true).open(&e)?;
                    f.write_all(format!("round {round}\n").as_bytes())?;
                }
            }
        }
        Ok(())
    }
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.symlink_metadata()?.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Compares every file under `a` with the same path under `b`.
fn same_tree(a: &Path, b: &Path) -> Result<(), Error> {
    for p in walk(a)? {
        let rel = p.strip_prefix(a)?;
        if std::fs::read(&p)? != std::fs::read(b.join(rel))? {
            return Err(format!("restored {} differs", rel.display()).into());
        }
    }
    Ok(())
}

/// What one phase (one or many devices) did.
#[derive(Default)]
struct Phase {
    backup_secs: Vec<f64>,
    restore_secs: Vec<f64>,
    logical: Vec<u64>,
    uploaded: Vec<u64>,
    restored: Vec<u64>,
    /// The server's RSS sample count at the end of each round.
    rss_marks: Vec<usize>,
    errors: AtomicU64,
}

impl Phase {
    fn up_mbs(&self, round: usize) -> f64 {
        self.logical[round] as f64 / self.backup_secs[round] / 1e6
    }
    fn down_mbs(&self, round: usize) -> f64 {
        self.restored[round] as f64 / self.restore_secs[round] / 1e6
    }
    fn total_up(&self) -> f64 {
        self.logical.iter().sum::<u64>() as f64 / self.backup_secs.iter().sum::<f64>() / 1e6
    }
    fn total_down(&self) -> f64 {
        self.restored.iter().sum::<u64>() as f64 / self.restore_secs.iter().sum::<f64>() / 1e6
    }
}

fn main() -> Result<(), Error> {
    let mut a = args()?;
    let work = tempfile::Builder::new().prefix("cv-load").tempdir_in(std::env::temp_dir())?;
    // A directory of this run's own under --restore-dir, removed at the end.
    let restores = match &a.restore_dir {
        Some(dir) => Some(tempfile::Builder::new().prefix("cv-load-restores").tempdir_in(dir)?),
        None => None,
    };
    a.restore_dir = restores.as_ref().map(|d| d.path().to_owned());
    let (server, bin) = Server::start(work.path(), &a)?;
    let debug = !bin.contains("release");
    println!(
        "server {bin}{}, pid {}, {} cores; start RSS {:.1} MiB",
        if debug { " (DEBUG build: figures are not release figures)" } else { "" },
        server.pid(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        mib(status_kib(server.pid(), "VmRSS:"))
    );
    if !a.server_settings.is_empty() {
        println!("server settings: {}", a.server_settings.join("; "));
    }
    if let Some(dir) = &a.restore_dir {
        println!("restores under {}", dir.display());
    }
    let admin = AdminClient::new(&server.url, ADMIN.into());
    let result = match a.churn {
        Some(n) => churn(&a, n, &server, &admin, work.path()),
        None => bench(&a, &server, &admin, work.path()),
    };
    server.stop()?;
    result
}

fn deployment_token(admin: &AdminClient, tenant: &str) -> Result<String, Error> {
    Ok(admin
        .create_deployment_token(&chunkvault::api::CreateDeploymentToken {
            tenant: tenant.into(),
            expires_in_secs: None,
            max_activations: None,
            policies: None,
            provisioned_only: false,
        })?
        .token)
}

fn activate(url: &str, token: &str, i: usize, dir: &Path, requests: &Arc<Requests>) -> Result<Device, Error> {
    let managed = ManagedConfig {
        server_url: url.into(),
        user_email: format!("user{i}@load.example"),
        deployment_token: token.into(),
        allow_restore_to_other_device: true,
        allow_open_in: true,
        device_id: Some(format!("load-{i}")),
        ca_certificate: None,
        // A load test may aim at a plain-HTTP test server on another host.
        allow_insecure_http: true,
    };
    let t = Instant::now();
    let device = Device::activate(&dir.join("state"), &managed);
    requests.record("POST /v1/activate", t.elapsed(), device.is_ok());
    let mut device = device?;
    device.set_request_observer(Some(requests.observer()));
    Ok(device)
}

/// Prepares `n` devices (ids from `first`), each with its slice.
#[allow(clippy::too_many_arguments)]
fn prepare(
    a: &Args,
    first: usize,
    n: usize,
    tenant_of: impl Fn(usize) -> String,
    url: &str,
    admin: &AdminClient,
    work: &Path,
    corpus: &mut &[(PathBuf, u64)],
    requests: &Arc<Requests>,
) -> Result<Vec<Bench>, Error> {
    let slice = a.mib << 20;
    let random_bytes = (slice * a.random_pct / 100) as usize;
    let mut tokens = BTreeMap::new();
    let mut out = Vec::new();
    for i in first..first + n {
        let tenant = tenant_of(i);
        if !tokens.contains_key(&tenant) {
            tokens.insert(tenant.clone(), deployment_token(admin, &tenant)?);
        }
        let dir = work.join(format!("d{i}"));
        let data = dir.join("data");
        *corpus = fill_slice(corpus, &data.join("files"), slice - random_bytes as u64)?;
        if corpus.is_empty() {
            return Err("the corpus is too small for this many devices; use --source or --mib".into());
        }
        let device = activate(url, &tokens[&tenant], i, &dir, requests)?;
        let restores = a.restore_dir.as_deref().unwrap_or(work).join(format!("d{i}-restores"));
        out.push(Bench { device, data, restores, random_bytes, seed: i as u64 });
    }
    Ok(out)
}

/// Runs `rounds` of backup-all, restore-all, verify over the devices.
/// Runs `rounds` rounds of backup, restore and compare on every bench at
/// once; `rss_mark` gives the server's RSS sample count (at each round's end).
fn run_phase(benches: Vec<Bench>, rounds: usize, rss_mark: &dyn Fn() -> usize) -> Result<Phase, Error> {
    let n = benches.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let phase = Arc::new(Mutex::new(Phase::default()));
    let errors = Arc::new(AtomicU64::new(0));
    let per_round: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::new(Mutex::new(vec![(0, 0, 0); rounds]));
    let workers: Vec<_> = benches
        .into_iter()
        .map(|mut b| {
            let (barrier, errors, per_round) = (barrier.clone(), errors.clone(), per_round.clone());
            std::thread::spawn(move || {
                let id = b.device.device_id().to_owned();
                for round in 0..rounds {
                    let fail = |e: Error| {
                        eprintln!("device {id}: round {round}: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    };
                    if let Err(e) = b.change(round) {
                        fail(e);
                    }
                    barrier.wait(); // backups start together
                    let done = b.device.backup(std::slice::from_ref(&b.data));
                    barrier.wait(); // backups done
                    barrier.wait(); // restores start together
                    let target = b.restores.join(format!("restore-{round}"));
                    let restored = done.as_ref().map_err(|e| e.to_string()).and_then(|d| {
                        b.device
                            .restore(&d.id, &target, &[], chunkvault::restore::Overwrite::Always)
                            .map_err(|e| e.to_string())
                    });
                    barrier.wait(); // restores done
                    match (&done, &restored) {
                        (Ok(d), Ok(r)) => {
                            let mut p = per_round.lock().expect("rounds");
                            p[round].0 += d.bytes;
                            p[round].1 += d.bytes_uploaded;
                            p[round].2 += r.report.bytes;
                            drop(p);
                            let back = target.join(b.data.strip_prefix("/").expect("absolute"));
                            if let Err(e) = same_tree(&b.data, &back) {
                                fail(e);
                            }
                        }
                        (Err(e), _) => fail(format!("backup: {e}").into()),
                        (_, Err(e)) => fail(format!("restore: {e}").into()),
                    }
                    let _ = std::fs::remove_dir_all(&target);
                    barrier.wait(); // verified
                }
            })
        })
        .collect();
    for round in 0..rounds {
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        let backup = t.elapsed().as_secs_f64();
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        let restore = t.elapsed().as_secs_f64();
        barrier.wait();
        let (logical, uploaded, restored) = per_round.lock().expect("rounds")[round];
        let mut p = phase.lock().expect("phase");
        p.backup_secs.push(backup);
        p.restore_secs.push(restore);
        p.logical.push(logical);
        p.uploaded.push(uploaded);
        p.restored.push(restored);
        p.rss_marks.push(rss_mark());
        println!(
            "    round {}: backup {backup:.2} s ({:.1} MB/s logical, {:.1} MB sent), restore {restore:.2} s ({:.1} MB/s)",
            round + 1,
            logical as f64 / backup / 1e6,
            uploaded as f64 / 1e6,
            restored as f64 / restore / 1e6
        );
    }
    for w in workers {
        w.join().map_err(|_| "device thread panicked")?;
    }
    let mut p = std::mem::take(&mut *phase.lock().expect("phase"));
    p.errors = AtomicU64::new(errors.load(Ordering::Relaxed));
    Ok(p)
}

fn bench(a: &Args, server: &Server, admin: &AdminClient, work: &Path) -> Result<(), Error> {
    let want = (a.devices as u64 + 2) * (a.mib << 20);
    let t = Instant::now();
    let files = corpus_files(&a.sources, want);
    let mut corpus: &[(PathBuf, u64)] = &files;
    println!(
        "corpus: {} files, {:.0} MiB from {:?} (listed in {:.1} s); {} MiB per device, {}% of it random",
        files.len(),
        files.iter().map(|f| f.1).sum::<u64>() as f64 / 1048576.0,
        a.sources,
        t.elapsed().as_secs_f64(),
        a.mib,
        a.random_pct
    );

    println!("1 device, 1 tenant, {} rounds:", a.rounds);
    let solo_requests = Arc::new(Requests::default());
    let solo = prepare(a, 0, 1, |_| "solo".into(), &server.url, admin, work, &mut corpus, &solo_requests)?;
    let single = run_phase(solo, a.rounds, &|| server.elapsed_marker())?;
    solo_requests.print();

    println!("{} devices, {} tenants, {} rounds:", a.devices, a.tenants, a.rounds);
    let requests = Arc::new(Requests::default());
    let tenants = a.tenants;
    let many =
        prepare(a, 1, a.devices, |i| format!("t{}", i % tenants), &server.url, admin, work, &mut corpus, &requests)?;
    let from = server.elapsed_marker();
    let t = Instant::now();
    let multi = run_phase(many, a.rounds, &|| server.elapsed_marker())?;
    let wall = t.elapsed().as_secs_f64();
    requests.print();
    let samples: Vec<(f64, u64)> = server.samples.lock().expect("samples").clone();

    let hwm = status_kib(server.pid(), "VmHWM:");
    println!("summary:");
    println!(
        "  single device: up {:.1} MB/s (rounds {}), down {:.1} MB/s (rounds {}); errors {}",
        single.total_up(),
        rounds_list(&single, Phase::up_mbs),
        single.total_down(),
        rounds_list(&single, Phase::down_mbs),
        single.errors.load(Ordering::Relaxed)
    );
    println!(
        "  {} devices: up {:.1} MB/s (rounds {}), down {:.1} MB/s (rounds {}); errors {}; phase wall {wall:.1} s",
        a.devices,
        multi.total_up(),
        rounds_list(&multi, Phase::up_mbs),
        multi.total_down(),
        rounds_list(&multi, Phase::down_mbs),
        multi.errors.load(Ordering::Relaxed)
    );
    println!(
        "  ratio many/single: up {:.2}, down {:.2} (goal: at least 0.80)",
        multi.total_up() / single.total_up(),
        multi.total_down() / single.total_down()
    );
    print_rss(&samples, from, &multi.rss_marks, hwm);
    Ok(())
}

fn rounds_list(p: &Phase, f: fn(&Phase, usize) -> f64) -> String {
    (0..p.logical.len()).map(|r| format!("{:.1}", f(p, r))).collect::<Vec<_>>().join(" / ")
}

/// RSS min/max/last over the phase's samples (`samples[from..]`), the peak
/// of each round (rounds end at `marks`), and whether the later rounds
/// peaked higher than the earlier ones. Whole rounds are compared, so both
/// sides hold as much backup as restore; the first round (empty
/// repositories, every chunk new) is left out.
fn print_rss(samples: &[(f64, u64)], from: usize, marks: &[usize], hwm: u64) {
    let rss: Vec<u64> = samples[from.min(samples.len())..].iter().map(|s| s.1).collect();
    if rss.is_empty() {
        return;
    }
    let (min, max, last) = (*rss.iter().min().expect("some"), *rss.iter().max().expect("some"), rss[rss.len() - 1]);
    println!(
        "  server RSS over the phase ({} samples, 1/s): min {:.0} MiB, max {:.0} MiB, last {:.0} MiB, peak (VmHWM) {:.0} MiB",
        rss.len(),
        mib(min),
        mib(max),
        mib(last),
        mib(hwm)
    );
    let mut start = from;
    let peaks: Vec<u64> = marks
        .iter()
        .map(|&end| {
            let end = end.min(samples.len());
            let peak = samples[start.min(end)..end].iter().map(|x| x.1).max().unwrap_or(0);
            start = end;
            peak
        })
        .collect();
    let list = peaks.iter().map(|&p| format!("{:.0}", mib(p))).collect::<Vec<_>>().join(" / ");
    let later_rounds = peaks.get(1..).unwrap_or_default();
    if later_rounds.len() < 2 {
        println!("  peak per round: {list} MiB");
        return;
    }
    let (earlier, later) = later_rounds.split_at(later_rounds.len() / 2);
    let (earlier, later) = (*earlier.iter().max().expect("some"), *later.iter().max().expect("some"));
    println!(
        "  peak per round: {list} MiB; rounds 2-{}: {:.0} MiB, rounds {}-{}: {:.0} MiB: {}",
        1 + later_rounds.len() / 2,
        mib(earlier),
        2 + later_rounds.len() / 2,
        peaks.len(),
        mib(later),
        if later as f64 > earlier as f64 * 1.05 { "GREW (more than 5%)" } else { "flat (within 5%)" }
    );
}

fn churn(a: &Args, n: usize, server: &Server, admin: &AdminClient, work: &Path) -> Result<(), Error> {
    let files = corpus_files(&a.sources, (n as u64 + 1) * (a.mib << 20));
    let mut corpus: &[(PathBuf, u64)] = &files;
    let requests = Arc::new(Requests::default());
    println!("{:>6} {:>10} {:>10} {:>8} {:>8}", "tenant", "RSS MiB", "HWM MiB", "open", "closed");
    for i in 0..n {
        let benches = prepare(a, i, 1, |i| format!("c{i}"), &server.url, admin, work, &mut corpus, &requests)?;
        let phase = run_phase_quiet(benches)?;
        if phase > 0 {
            return Err("errors in a churn round".into());
        }
        let open = metric(&server.url, "chunkvault_tenants_open").map_or("?".into(), |v| v.to_string());
        let closed = metric(&server.url, "chunkvault_tenants_closed_total").map_or("?".into(), |v| v.to_string());
        println!(
            "{i:>6} {:>10.1} {:>10.1} {open:>8} {closed:>8}",
            mib(status_kib(server.pid(), "VmRSS:")),
            mib(status_kib(server.pid(), "VmHWM:"))
        );
        let _ = std::fs::remove_dir_all(work.join(format!("d{i}")));
    }
    if a.idle_secs.is_some_and(|s| s > 0) {
        // Every tenant closed, and the server's idle blocking threads (10 s
        // keep-alive, with their read buffers) gone: what is left.
        let deadline = Instant::now() + Duration::from_secs(120);
        while metric(&server.url, "chunkvault_tenants_open").unwrap_or(0.0) > 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(15));
        let closed = metric(&server.url, "chunkvault_tenants_open").map_or("?".into(), |v| v.to_string());
        println!(
            "{:>6} {:>10.1} {:>10.1} {closed:>8}   (all idle, 15 s later)",
            "idle",
            mib(status_kib(server.pid(), "VmRSS:")),
            mib(status_kib(server.pid(), "VmHWM:"))
        );
    }
    requests.print();
    Ok(())
}

/// One backup, restore and compare of each device; the number of errors.
fn run_phase_quiet(benches: Vec<Bench>) -> Result<u64, Error> {
    let mut errors = 0;
    for mut b in benches {
        b.change(0)?;
        let done = b.device.backup(std::slice::from_ref(&b.data))?;
        let target = b.restores.join("restore");
        b.device.restore(&done.id, &target, &[], chunkvault::restore::Overwrite::Always)?;
        if same_tree(&b.data, &target.join(b.data.strip_prefix("/")?)).is_err() {
            errors += 1;
        }
    }
    Ok(errors)
}
