//! Helpers for tests that run the real server (`chunkvault serve`) and drive
//! it with the real device and admin clients, or with raw HTTP.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{pseudo_random, PASSWORD};

pub const ADMIN: &str = "test admin token";
pub const BIN: &str = env!("CARGO_BIN_EXE_chunkvault");

/// A running `chunkvault serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `serve` with cheap tenant keys plus `args`, and waits for its
    /// `listening on` line (bounded by the read: the process exits on error).
    pub fn start(root: &Path, args: &[&str]) -> Server {
        Server::start_at(root, "127.0.0.1:0", args)
    }

    pub fn start_at(root: &Path, listen: &str, args: &[&str]) -> Server {
        Server::start_with(root.to_str().unwrap(), listen, args, &[])
    }

    /// `root` may be a directory or an `s3://` location; `envs` are set for
    /// the server process (e.g. its own cache directory).
    pub fn start_with(root: &str, listen: &str, args: &[&str], envs: &[(&str, &Path)]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--root", root])
            .args(["--tenant-kdf-memory-kib", "1024", "--tenant-kdf-iterations", "1"])
            .args(args)
            .env("CHUNKVAULT_PASSWORD", PASSWORD)
            .env("CHUNKVAULT_ADMIN_TOKEN", ADMIN)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read server stdout");
        let url =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("server said {line:?}")).to_owned();
        Server { child, url }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run chunkvault")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn admin(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["admin", "--server", url]).args(args).env("CHUNKVAULT_ADMIN_TOKEN", ADMIN);
    c
}

pub fn deployment_token(url: &str, tenant: &str) -> String {
    ok(run(&mut admin(url, &["deployment-token", "create", "--tenant", tenant]))).trim().to_owned()
}

/// One device: its state directory and managed config.
pub struct Dev {
    pub state: PathBuf,
}

impl Dev {
    /// Writes a managed config and activates silently.
    pub fn activate(dir: &Path, url: &str, token: &str, email: &str, id: &str) -> Dev {
        let state = dir.join(format!("state-{id}"));
        let mc = dir.join(format!("managed-{id}.json"));
        let config =
            serde_json::json!({"serverURL": url, "userEmail": email, "deploymentToken": token, "deviceId": id});
        std::fs::write(&mc, config.to_string()).unwrap();
        let dev = Dev { state };
        ok(run(&mut dev.cmd(&["activate", "--managed-config", mc.to_str().unwrap()])));
        dev
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("device").args(args).env("CHUNKVAULT_DEVICE_STATE", &self.state);
        c
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&ok(run(&mut self.cmd(&a)))).unwrap()
    }

    pub fn backup(&self, path: &Path) -> serde_json::Value {
        self.json(&["backup", path.to_str().unwrap()])
    }

    /// Starts `device backup PATH --json` without waiting for it.
    pub fn spawn_backup(&self, path: &Path) -> std::process::Child {
        self.cmd(&["backup", path.to_str().unwrap(), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn restore(&self, snapshot: &str, target: &Path) -> serde_json::Value {
        self.json(&["restore", snapshot, "--target", target.to_str().unwrap()])
    }

    /// The session token the device cached on its last call.
    pub fn session(&self) -> String {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.state.join("state.json")).unwrap()).unwrap();
        state["session"]["token"].as_str().expect("a cached session").to_owned()
    }

    pub fn state_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state.join("state.json")).unwrap()).unwrap()
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// Status and body of a request.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let a = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match (method, body) {
        ("GET" | "DELETE", _) => {
            let mut r = if method == "GET" { a.get(url) } else { a.delete(url) };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()
        }
        (m, b) => {
            let mut r = if m == "PUT" { a.put(url) } else { a.post(url) };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send(b.unwrap_or_default())
        }
    };
    let mut resp = resp.expect("http");
    let status = resp.status().as_u16();
    (status, resp.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap())
}

/// The error code of a JSON error body.
pub fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// Polls `f` until it returns true, for at most `secs` seconds.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn make_data(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("docs/deeper")).unwrap();
    std::fs::write(dir.join("notes.txt"), format!("notes {seed}\n").repeat(100)).unwrap();
    std::fs::write(dir.join("docs/photo.bin"), pseudo_random(700_000, seed)).unwrap();
    std::fs::write(dir.join("docs/deeper/empty"), b"").unwrap();
    std::fs::set_permissions(dir.join("notes.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
}

/// Every regular file below `a` is in `b` with the same bytes, mode and mtime.
pub fn assert_same_files(a: &Path, b: &Path) {
    let (sa, sb) = (super::scan(a), super::scan(b));
    let files = |s: &std::collections::BTreeMap<PathBuf, super::Entry>| {
        s.iter().filter(|(_, e)| e.kind == "file").map(|(p, _)| p.clone()).collect::<Vec<_>>()
    };
    assert_eq!(files(&sa), files(&sb));
    for p in files(&sa) {
        let (ea, eb) = (&sa[&p], &sb[&p]);
        assert!(ea.content == eb.content, "{p:?} content");
        assert_eq!((ea.mode, ea.mtime), (eb.mode, eb.mtime), "{p:?} metadata");
    }
}

/// The CLI on a tenant repository (`ROOT/TENANT`: a directory or an `s3://`
/// location), with the server's password, which wraps the tenant keys.
pub fn tenant_cli(location: &str) -> Command {
    let mut c = Command::new(BIN);
    c.env("CHUNKVAULT_REPO", location).env("CHUNKVAULT_PASSWORD", PASSWORD).env_remove("CHUNKVAULT_PASSWORD_FILE");
    c
}
