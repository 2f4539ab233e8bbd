//! What an operator sees of a running server: `/metrics` (described,
//! with units, moving with a device's backup, behind an optional token),
//! the access log (one line per request with its fields, no secrets), and
//! secrets handed over as systemd credentials.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::server::*;
use common::PASSWORD;

/// A server whose stderr (its log) goes to a file, killed on drop.
struct Logged {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Logged {
    /// Starts `serve` with `envs` only (no password or admin token unless
    /// given) plus `args`; the log goes to `DIR/server.log`.
    fn start(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Logged {
        let log = dir.join("server.log");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--root", dir.join("root").to_str().unwrap()])
            .args(["--tenant-kdf-memory-kib", "1024", "--tenant-kdf-iterations", "1"])
            .args(args)
            .env_remove("CHUNKVAULT_PASSWORD")
            .env_remove("CHUNKVAULT_ADMIN_TOKEN")
            .env_remove("CHUNKVAULT_LOG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = match line.trim().strip_prefix("listening on ") {
            Some(u) => u.to_owned(),
            None => panic!("server said {line:?}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()),
        };
        Logged { child, url, log }
    }

    /// Stops the server (so every access line is written) and returns its log.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRETS: [(&str, &str); 2] = [("CHUNKVAULT_PASSWORD", PASSWORD), ("CHUNKVAULT_ADMIN_TOKEN", ADMIN)];

/// One parsed scrape: sample values by `name{labels}`, and the families
/// (by name) that have a HELP and a TYPE line.
struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// Parses the Prometheus text format line by line, and fails on a
    /// sample whose family has no HELP or TYPE line, or a malformed line.
    fn parse(text: &str) -> Scrape {
        let (mut help, mut types) = (BTreeSet::new(), BTreeMap::new());
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
                assert!(!text.is_empty(), "empty HELP: {line}");
                help.insert(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
                assert!(help.contains(name), "TYPE before HELP: {line}");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap();
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "name of {line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "labels of {line}");
            }
            let family = match ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)) {
                Some(f) if types.get(f).is_some_and(|k| k == "histogram") => f,
                _ => name,
            };
            assert!(help.contains(family) && types.contains_key(family), "no HELP/TYPE for {line}");
            if types[family] == "counter" {
                assert!(name.ends_with("_total"), "a counter without _total: {line}");
            }
            samples.insert(series.to_owned(), value);
        }
        Scrape { samples }
    }

    fn get(&self, series: &str) -> f64 {
        *self.samples.get(series).unwrap_or_else(|| panic!("no {series} in {:#?}", self.samples.keys()))
    }

    /// The sum of every sample of `name` whose labels contain all of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name) && labels.iter().all(|l| s.contains(l)))
            .map(|(_, v)| v)
            .sum()
    }
}

fn scrape(url: &str, token: Option<&str>) -> Scrape {
    let (status, body) = http("GET", &format!("{url}/metrics"), token, None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    Scrape::parse(&String::from_utf8(body).unwrap())
}

#[test]
fn metrics_are_described_and_move_with_a_device_backup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let before = scrape(&server.url, None);
    let version = format!("chunkvault_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(before.get(&version), 1.0);
    assert_eq!(before.get("chunkvault_uploads_in_flight"), 0.0);

    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone-a");
    let data = dir.path().join("data");
    make_data(&data, 1);
    let first = phone.backup(&data);
    let uploaded = first["chunks_uploaded"].as_f64().unwrap();
    assert!(uploaded > 0.0);

    let after = scrape(&server.url, None);
    let acme = "{tenant=\"acme\"}";
    assert!(after.get(&format!("chunkvault_tenant_chunks{acme}")) >= uploaded);
    assert!(after.get(&format!("chunkvault_tenant_stored_bytes{acme}")) > 0.0);
    assert_eq!(after.get("chunkvault_snapshots_committed_total"), 1.0);
    assert!(after.get(&format!("chunkvault_chunks_offered_total{acme}")) >= uploaded);
    assert!(after.get("chunkvault_http_request_body_bytes_total") > 700_000.0, "the photo went up");
    // Per route template (never the raw path), method and status class.
    let hist = "chunkvault_http_request_duration_seconds_count";
    assert!(after.sum(hist, &["route=\"/v1/snapshots\"", "method=\"POST\"", "status=\"2xx\""]) >= 1.0);
    assert!(after.sum(hist, &["route=\"/v1/admin/deployment-tokens\"", "status=\"2xx\""]) >= 1.0);
    assert_eq!(
        after.sum(hist, &["route=\"/v1/chunks/"]),
        after.sum(hist, &["route=\"/v1/chunks/missing\""])
            + after.sum(hist, &["route=\"/v1/chunks/bundle\""])
            + after.sum(hist, &["route=\"/v1/chunks/{id}\""])
    );
    assert!(!after.samples.keys().any(|s| s.contains("/v1/chunks/0") || s.contains("/v1/snapshots/0")));

    // The same data again: every chunk offered is a dedup hit, none is uploaded.
    let hits = after.get(&format!("chunkvault_dedup_hits_total{acme}"));
    let again = phone.backup(&data);
    assert_eq!(again["chunks_uploaded"], 0);
    let last = scrape(&server.url, None);
    let offered_now = last.get(&format!("chunkvault_chunks_offered_total{acme}"))
        - after.get(&format!("chunkvault_chunks_offered_total{acme}"));
    assert!(offered_now > 0.0);
    assert_eq!(last.get(&format!("chunkvault_dedup_hits_total{acme}")) - hits, offered_now);
    assert_eq!(last.get("chunkvault_snapshots_committed_total"), 2.0);
}

#[test]
fn metrics_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, "scrape secret\n").unwrap();
    let server = Server::start(&dir.path().join("root"), &["--metrics-token-file", token_file.to_str().unwrap()]);
    let url = format!("{}/metrics", server.url);
    let (status, body) = http("GET", &url, None, None);
    assert_eq!((status, code(&body).as_str()), (401, "invalid_token"));
    assert_eq!(http("GET", &url, Some("wrong"), None).0, 401);
    assert_eq!(http("GET", &url, Some(ADMIN), None).0, 401, "the admin token is not the metrics token");
    scrape(&server.url, Some("scrape secret"));
    assert_eq!(http("GET", &format!("{}/healthz", server.url), None, None).0, 200);
}

/// The access log's JSON lines (target `chunkvault::access`).
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["target"] == "chunkvault::access")
        .collect()
}

#[test]
fn access_log_has_one_json_line_per_request_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &["--log-format", "json"], &SECRETS);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone-a");
    let data = dir.path().join("data");
    make_data(&data, 2);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();
    let session = phone.session();
    let device_token = phone.state_json()["device_token"].as_str().unwrap_or_default().to_owned();
    // A path inside the snapshot, in the query string, and a secret-looking query.
    let file = format!("{}/v1/snapshots/{id}/file?path={}/notes.txt&token=querysecret", server.url, data.display());
    let (status, body) = http("GET", &file, Some(&session), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(http("GET", &format!("{}/v1/snapshots", server.url), Some("forged.session.token"), None).0, 401);
    assert_eq!(http("GET", &format!("{}/no/such/route", server.url), None, None).0, 404);
    let log = server.stop();

    // Secrets, a path inside a snapshot, and the user's email (personal data).
    for secret in
        [ADMIN, token.as_str(), session.as_str(), "querysecret", "forged.session.token", "notes.txt", "a@acme.com"]
    {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
    if !device_token.is_empty() {
        assert!(!log.contains(&device_token), "the log holds the device token");
    }
    let lines = access_lines(&log);
    for l in &lines {
        for field in
            ["timestamp", "method", "route", "status", "bytes_in", "bytes_out", "duration_ms", "tenant", "device"]
        {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
    }
    let find = |method: &str, route: &str| {
        lines
            .iter()
            .find(|l| l["method"] == method && l["route"] == route)
            .unwrap_or_else(|| panic!("no {method} {route} in {lines:#?}"))
    };
    let read = find("GET", "/v1/snapshots/{id}/file");
    assert_eq!(
        (read["status"].as_u64(), read["tenant"].as_str(), read["device"].as_str()),
        (Some(200), Some("acme"), Some("phone-a"))
    );
    assert_eq!(read["bytes_out"].as_u64(), Some(body.len() as u64));
    let commit = find("POST", "/v1/snapshots");
    assert!(commit["bytes_in"].as_u64().unwrap() > 0);
    assert_eq!(find("POST", "/v1/activate")["device"], "phone-a");
    let forged = lines.iter().find(|l| l["route"] == "/v1/snapshots" && l["status"] == 401).expect("the 401");
    assert_eq!(forged["tenant"], "-");
    assert!(lines.iter().any(|l| l["route"] == "unmatched" && l["status"] == 404));
}

#[test]
fn text_log_has_timestamps_and_no_colour_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &[], &SECRETS);
    assert_eq!(http("GET", &format!("{}/healthz", server.url), None, None).0, 200);
    let log = server.stop();
    assert!(!log.contains('\x1b'), "ANSI codes in a log to a file:\n{log}");
    let access = log.lines().find(|l| l.contains("chunkvault::access")).unwrap_or_else(|| panic!("{log}"));
    // An RFC 3339 UTC timestamp leads every line.
    let stamp = access.split(' ').next().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(stamp).is_ok(), "{access}");
    for field in ["method=GET", "route=/healthz", "status=200", "bytes_out=3", "duration_ms="] {
        assert!(access.contains(field), "{field} not in {access}");
    }
}

#[test]
fn secrets_come_from_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("password"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(creds.join("admin_token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(creds.join("metrics_token"), "scrape secret\n").unwrap();
    let server = Logged::start(dir.path(), &[], &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    // The admin token works, and the tenant's repository is wrapped by the password.
    deployment_token(&server.url, "acme");
    ok(run(tenant_cli(dir.path().join("root/acme").to_str().unwrap()).arg("snapshots")));
    assert_eq!(http("GET", &format!("{}/metrics", server.url), None, None).0, 401);
    scrape(&server.url, Some("scrape secret"));
    drop(server);

    // Without them (and without the variables) a storage server cannot start.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--root", dir.path().join("root").to_str().unwrap()])
        .env_remove("CHUNKVAULT_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHUNKVAULT_PASSWORD"));
}

/// Every `chunkvault_*` metric name in the expressions of a Grafana dashboard.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(e) = map.get("expr").and_then(|e| e.as_str()) {
                    exprs.push(e.to_owned());
                }
                if let Some(q) = map.get("query").and_then(|e| e.as_str()) {
                    exprs.push(q.to_owned());
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    for e in exprs {
        for (start, _) in e.match_indices("chunkvault_") {
            let name: String = e[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/chunkvault.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(!dashboard["panels"].as_array().unwrap().is_empty());
    let queried = dashboard_metrics(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");

    // Every series a storage node exports exists once a device has backed up.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone-a");
    let data = dir.path().join("data");
    make_data(&data, 3);
    phone.backup(&data);
    let exported: BTreeSet<String> =
        scrape(&server.url, None).samples.keys().map(|s| s.split('{').next().unwrap().to_owned()).collect();
    let unknown: Vec<_> = queried.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics /metrics lacks: {unknown:?}");
}
