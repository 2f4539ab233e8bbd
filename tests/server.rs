//! The real server over loopback, driven by the real device and admin
//! clients (the binary) and by raw HTTP for hostile input.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::{pseudo_random, PASSWORD};

use common::server::*;

#[test]
fn device_flow_from_deployment_token_to_restore_with_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone-a");
    assert_eq!(std::fs::metadata(&phone.state).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(phone.state.join("state.json")).unwrap().permissions().mode() & 0o777, 0o600);

    let data = dir.path().join("data");
    make_data(&data, 1);
    let first = phone.backup(&data);
    assert!(first["chunks_uploaded"].as_u64().unwrap() > 0);
    let id = first["id"].as_str().unwrap().to_owned();
    let again = phone.backup(&data);
    assert_eq!(again["chunks_uploaded"], 0, "unchanged data uploads nothing");

    let target = dir.path().join("restore-phone");
    phone.restore(&id, &target);
    assert_same_files(&data, &common::restored(&target, &data));

    // The same user's second device restores the first device's snapshot,
    // and its own backup of the same data uploads no chunk (source-side dedup).
    let laptop = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "laptop-a");
    let listed = laptop.json(&["snapshots"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let target2 = dir.path().join("restore-laptop");
    laptop.restore(&id[..10], &target2);
    assert_same_files(&data, &common::restored(&target2, &data));
    assert_eq!(laptop.backup(&data)["chunks_uploaded"], 0);

    // Another user of the tenant sees none of it and cannot read it.
    let bob = Dev::activate(dir.path(), &server.url, &token, "b@acme.com", "phone-b");
    assert!(bob.json(&["snapshots"]).as_array().unwrap().is_empty());
    let bob_session = bob.session();
    let tree = format!("{}/v1/snapshots/{id}/tree?path=", server.url);
    assert_eq!(http("GET", &tree, Some(&bob_session), None).0, 403);
    let file = format!("{}/v1/snapshots/{id}/file?path={}/notes.txt", server.url, &data.to_str().unwrap()[1..]);
    let (status, body) = http("GET", &file, Some(&bob_session), None);
    assert_eq!((status, code(&body).as_str()), (403, "forbidden"));

    // Another tenant's device: its tokens act only on its own repository.
    let globex = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "globex"), "a@acme.com", "g1");
    assert!(globex.json(&["snapshots"]).as_array().unwrap().is_empty());
    assert_eq!(http("GET", &tree, Some(&globex.session()), None).0, 404);
    let acme_session = phone.session();
    assert_eq!(http("GET", &tree, Some(&acme_session), None).0, 200);

    // A range of a file.
    let mut req = agent().get(&file).header("Authorization", &format!("Bearer {acme_session}"));
    req = req.header("Range", "bytes=6-9");
    let mut resp = req.call().unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.body_mut().read_to_vec().unwrap(), b"1\nno");

    let devices: serde_json::Value =
        serde_json::from_str(&ok(run(&mut admin(&server.url, &["devices", "--json"])))).unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 4);
}

#[test]
fn expired_forged_truncated_and_foreign_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &["--session-ttl-secs", "5"]);
    let other = Server::start(&dir.path().join("other-root"), &[]);
    let dev = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let session = dev.session();
    let list = format!("{}/v1/snapshots", server.url);
    assert_eq!(http("GET", &list, Some(&session), None).0, 200);

    let refused = |token: &str| {
        let (status, body) = http("GET", &list, Some(token), None);
        (status, code(&body))
    };
    let truncated = &session[..session.len() - 5];
    assert_eq!(refused(truncated), (401, "invalid_token".into()));
    let (head, sig) = session.rsplit_once('.').unwrap();
    let flipped = if head.ends_with('A') { 'B' } else { 'A' };
    let forged = format!("{}{flipped}.{sig}", &head[..head.len() - 1]);
    assert_eq!(refused(&forged).0, 401);
    assert_eq!(refused("").0, 401);
    assert_eq!(refused(dev.state_json()["device_token"].as_str().unwrap()).0, 401);
    assert_eq!(http("GET", &list, None, None).0, 401);

    // A session signed by another auth server (another key) is refused.
    let foreign = Dev::activate(dir.path(), &other.url, &deployment_token(&other.url, "acme"), "a@acme.com", "d2");
    foreign.json(&["snapshots"]);
    assert_eq!(refused(&foreign.session()), (401, "invalid_token".into()));

    // Admin routes need the admin token.
    let devices = format!("{}/v1/admin/devices", server.url);
    assert_eq!(http("GET", &devices, None, None).0, 401);
    assert_eq!(http("GET", &devices, Some("wrong"), None).0, 401);
    assert_eq!(http("GET", &devices, Some(&session), None).0, 401);

    eventually(20, "the session to expire", || refused(&session) == (401, "token_expired".into()));
}

#[test]
fn hostile_input_gets_json_errors_and_the_right_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let u = &server.url;
    let dev = Dev::activate(dir.path(), u, &deployment_token(u, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let s = dev.session();
    let s = Some(s.as_str());

    let oversized = vec![7u8; (4 << 20) + 1];
    let id = "a".repeat(64);
    let (status, body) = http("PUT", &format!("{u}/v1/chunks/{id}"), s, Some(&oversized));
    assert_eq!((status, code(&body).as_str()), (413, "chunk_too_large"));
    let (status, body) = http("POST", &format!("{u}/v1/chunks/missing"), s, Some(&vec![b' '; 65 << 20]));
    assert_eq!((status, code(&body).as_str()), (413, "too_large"));
    let (status, body) = http("POST", &format!("{u}/v1/session"), None, Some(&vec![b' '; 100_000]));
    assert_eq!((status, code(&body).as_str()), (413, "too_large"));
    let (status, body) = http("POST", &format!("{u}/v1/chunks/missing"), s, Some(b"{\"chunks\": [1,"));
    assert_eq!((status, code(&body).as_str()), (400, "malformed_json"));
    let (status, body) = http("PUT", &format!("{u}/v1/chunks/..%2Fetc"), s, Some(b"x"));
    assert_eq!((status, code(&body).as_str()), (400, "bad_id"));
    let (status, body) = http("GET", &format!("{u}/v1/snapshots/zz/tree?path="), s, None);
    assert_eq!((status, code(&body).as_str()), (400, "bad_id"));
    let (status, body) = http("PUT", &format!("{u}/v1/chunks/{id}"), s, Some(b"not the content of that id"));
    assert_eq!((status, code(&body).as_str()), (400, "chunk_mismatch"));
    let commit = serde_json::json!({"hostname": "h", "paths": ["/x"], "files": [
        {"path": "x", "mode": 420, "mtime": 0, "size": 1, "chunks": [id]}]});
    let (status, body) = http("POST", &format!("{u}/v1/snapshots"), s, Some(commit.to_string().as_bytes()));
    assert_eq!((status, code(&body).as_str()), (409, "missing_chunks"));
    let escape = serde_json::json!({"hostname": "h", "paths": ["/x"], "files": [
        {"path": "../etc/passwd", "mode": 420, "mtime": 0, "size": 0, "chunks": []}]});
    let (status, body) = http("POST", &format!("{u}/v1/snapshots"), s, Some(escape.to_string().as_bytes()));
    assert_eq!((status, code(&body).as_str()), (400, "invalid_request"));
    let (status, body) = http("GET", &format!("{u}/v1/nope"), None, None);
    assert_eq!((status, code(&body).as_str()), (404, "not_found"));
    let (status, _) = http("GET", &format!("{u}/healthz"), None, None);
    assert_eq!(status, 200);

    // Guessing deployment tokens is throttled per address.
    let guess = serde_json::json!({"deployment_token": "cvdt_guess", "email": "x@y.z", "device_id": "g"}).to_string();
    let statuses: Vec<u16> =
        (0..25).map(|_| http("POST", &format!("{u}/v1/activate"), None, Some(guess.as_bytes())).0).collect();
    assert_eq!(statuses[0], 401);
    assert_eq!(*statuses.last().unwrap(), 429);
    let (_, body) = http("POST", &format!("{u}/v1/activate"), None, Some(guess.as_bytes()));
    assert_eq!(code(&body), "too_many_attempts");
}

/// An auth server and a storage node checking in with it every second.
fn auth_and_storage(dir: &Path, policy: &str) -> (Server, Server) {
    let auth = Server::start(&dir.join("auth-root"), &["--role", "auth"]);
    let storage = Server::start(
        &dir.join(format!("storage-root-{policy}")),
        &["--role", "storage", "--upstream", &auth.url, "--checkin-interval-secs", "1", "--auth-unreachable", policy],
    );
    (auth, storage)
}

#[test]
fn retire_block_and_wipe_reach_issued_sessions_at_check_in() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, storage) = auth_and_storage(dir.path(), "fail_closed");
    let token = deployment_token(&auth.url, "acme");
    // Devices know one URL: the storage node relays activation and sessions.
    let retired = Dev::activate(dir.path(), &storage.url, &token, "a@acme.com", "retired");
    let blocked = Dev::activate(dir.path(), &storage.url, &token, "b@acme.com", "blocked");
    let wiped = Dev::activate(dir.path(), &storage.url, &token, "c@acme.com", "wiped");
    let data = dir.path().join("data");
    make_data(&data, 3);
    let id = wiped.backup(&data)["id"].as_str().unwrap().to_owned();
    let restored_to = dir.path().join("restored");
    wiped.restore(&id, &restored_to);
    assert!(common::restored(&restored_to, &data).join("notes.txt").exists());
    retired.json(&["snapshots"]);
    blocked.json(&["snapshots"]);
    let sessions: Vec<String> = [&retired, &blocked, &wiped].iter().map(|d| d.session()).collect();

    let list = format!("{}/v1/snapshots", storage.url);
    let status_of = |s: &str| {
        let (status, body) = http("GET", &list, Some(s), None);
        (status, code(&body))
    };
    for (dev, action, expect) in [
        ("retired", "retire", "device_retired"),
        ("blocked", "block", "device_blocked"),
        ("wiped", "wipe", "device_wiped"),
    ] {
        ok(run(&mut admin(&auth.url, &["device", action, dev])));
        let session = &sessions[["retired", "blocked", "wiped"].iter().position(|d| *d == dev).unwrap()];
        eventually(10, expect, || status_of(session) == (403, expect.to_owned()));
    }

    // The clients learn on their next call: retired and wiped log out
    // (wiped also deletes what it restored); blocked keeps its state.
    let out = run(&mut retired.cmd(&["snapshots"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("device_retired"));
    assert!(!retired.state.exists(), "a retired device clears its state");
    let out = run(&mut wiped.cmd(&["status", "--json"]));
    assert_eq!(out.status.code(), Some(1), "a wiped device's status is not a success");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "device_wiped");
    assert!(status["logged_out"]["wipe"]["removed"].as_array().unwrap().len() >= 3, "{status}");
    assert!(!wiped.state.exists(), "a wiped device clears its state");
    assert!(!common::restored(&restored_to, &data).exists(), "a wiped device deletes what it restored");
    assert!(!run(&mut blocked.cmd(&["snapshots"])).status.success());
    assert!(blocked.state.exists(), "a blocked device keeps its activation");

    ok(run(&mut admin(&auth.url, &["device", "allow", "blocked"])));
    eventually(10, "allow", || status_of(&sessions[1]).0 == 200);
    blocked.json(&["snapshots"]);
    let devices = ok(run(&mut admin(&auth.url, &["devices"])));
    assert!(devices.contains("retired") && devices.contains("wiped"));
}

#[test]
fn edge_relays_activation_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let edge = Server::start(&dir.path().join("edge-root"), &["--role", "edge", "--upstream", &server.url]);
    let token = deployment_token(&server.url, "acme");
    let body = serde_json::json!({"deployment_token": token, "email": "a@acme.com", "device_id": "e1"}).to_string();
    let (status, resp) = http("POST", &format!("{}/v1/activate", edge.url), None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    let device_token =
        serde_json::from_slice::<serde_json::Value>(&resp).unwrap()["device_token"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"device_token": device_token, "email": "a@acme.com", "device_id": "e1"}).to_string();
    let (status, resp) = http("POST", &format!("{}/v1/session", edge.url), None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    let session: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(session["policies"]["allow_restore_to_other_device"], true);
    let list = format!("{}/v1/snapshots", server.url);
    assert_eq!(http("GET", &list, session["session_token"].as_str(), None).0, 200);
    // Refusals come back through the edge as they are.
    let bad = serde_json::json!({"device_token": "cvdv_x", "email": "a@acme.com", "device_id": "e1"}).to_string();
    let (status, resp) = http("POST", &format!("{}/v1/session", edge.url), None, Some(bad.as_bytes()));
    assert_eq!((status, code(&resp).as_str()), (401, "invalid_token"));
    // The edge serves no storage routes.
    assert_eq!(http("GET", &format!("{}/v1/snapshots", edge.url), None, None).0, 404);
}

#[test]
fn storage_fails_open_or_closed_as_configured_when_auth_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (mut auth, closed) = auth_and_storage(dir.path(), "fail_closed");
    let open = Server::start(
        &dir.path().join("storage-root-open"),
        &[
            "--role",
            "storage",
            "--upstream",
            &auth.url,
            "--checkin-interval-secs",
            "1",
            "--auth-unreachable",
            "fail_open",
        ],
    );
    let dev = Dev::activate(dir.path(), &closed.url, &deployment_token(&auth.url, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let session = dev.session();
    let list = |s: &Server| {
        let (status, body) = http("GET", &format!("{}/v1/snapshots", s.url), Some(&session), None);
        (status, code(&body))
    };
    assert_eq!(list(&closed).0, 200);
    assert_eq!(list(&open).0, 200);

    auth.kill();
    eventually(20, "fail-closed node to refuse", || list(&closed) == (503, "auth_unreachable".into()));
    // The fail-open node has missed as many check-ins and still serves.
    let failures = || {
        let (_, m) = http("GET", &format!("{}/metrics", open.url), None, None);
        let text = String::from_utf8(m).unwrap();
        let line = text.lines().find(|l| l.starts_with("chunkvault_checkin_failures_total ")).unwrap().to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    eventually(20, "fail-open node to miss check-ins", || failures() >= 3);
    assert_eq!(list(&open).0, 200);
}

#[test]
fn sigkill_during_concurrent_backups_loses_only_unacknowledged_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = Server::start(&root, &[]);
    let token = deployment_token(&server.url, "acme");
    let shared = pseudo_random(600_000, 99);
    let devices: Vec<(Dev, PathBuf)> = (0..8)
        .map(|i| {
            let dev = Dev::activate(dir.path(), &server.url, &token, &format!("u{}@acme.com", i % 4), &format!("d{i}"));
            let data = dir.path().join(format!("data{i}"));
            make_data(&data, 10 + i);
            std::fs::write(data.join("big.bin"), pseudo_random(300_000 + 800_000 * i as usize, 20 + i)).unwrap();
            std::fs::write(data.join("shared.bin"), &shared).unwrap();
            (dev, data)
        })
        .collect();
    let running: Vec<Child> = devices.iter().map(|(dev, data)| dev.spawn_backup(data)).collect();
    // Kill once a few snapshots are committed and the larger backups are
    // still uploading (or done, on a very fast machine).
    let committed = || {
        let (_, m) = http("GET", &format!("{}/metrics", server.url), None, None);
        let text = String::from_utf8(m).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("chunkvault_snapshots_committed_total "))
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    eventually(60, "the first commits", || committed() >= 2);
    server.kill();
    let acknowledged: Vec<(String, &PathBuf)> = running
        .into_iter()
        .zip(&devices)
        .filter_map(|(child, (_, data))| {
            let out = child.wait_with_output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            out.status.success().then(|| (v["id"].as_str().unwrap().to_owned(), data))
        })
        .collect();

    let repo = root.join("acme");
    let local = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args).env("CHUNKVAULT_REPO", &repo).env("CHUNKVAULT_PASSWORD", PASSWORD);
        run(&mut c)
    };
    ok(local(&["check", "--read-data"]));
    for (id, data) in &acknowledged {
        let target = dir.path().join(format!("restore-{id}"));
        ok(local(&["restore", id, "--target", target.to_str().unwrap()]));
        assert_same_files(data, &common::restored(&target, data));
    }

    eprintln!("{} of 8 backups were acknowledged before the kill", acknowledged.len());
    // After a restart every device backs up again (re-uploading what was lost).
    let _restarted = Server::start_at(&root, server.url.trim_start_matches("http://"), &[]);
    for (dev, data) in &devices {
        assert_eq!(dev.backup(data)["files"], 5);
    }
    ok(local(&["check", "--read-data"]));
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("root"), &[]);
    assert_eq!(http("GET", &format!("{}/healthz", server.url), None, None).0, 200);
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let mut status = None;
    eventually(30, "the server to exit", || {
        status = server.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "exit after SIGTERM: {status:?}");
}

#[test]
fn a_retire_before_a_restart_still_refuses_issued_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = Server::start(&root, &[]);
    let dev = Dev::activate(dir.path(), &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let session = dev.session();
    ok(run(&mut admin(&server.url, &["device", "retire", "d1"])));
    server.kill();
    let server = Server::start_at(&root, server.url.trim_start_matches("http://"), &[]);
    let (status, body) = http("GET", &format!("{}/v1/snapshots", server.url), Some(&session), None);
    assert_eq!((status, code(&body).as_str()), (403, "device_retired"));
}

#[test]
fn managed_policy_can_forbid_restoring_another_devices_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone");
    let data = dir.path().join("data");
    make_data(&data, 5);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();
    let mc = dir.path().join("strict.json");
    let config = serde_json::json!({"serverURL": server.url, "userEmail": "a@acme.com", "deploymentToken": token,
        "deviceId": "kiosk", "allowRestoreToOtherDevice": false});
    std::fs::write(&mc, config.to_string()).unwrap();
    let kiosk = Dev { state: dir.path().join("state-kiosk") };
    ok(run(&mut kiosk.cmd(&["activate", "--managed-config", mc.to_str().unwrap()])));
    let out = run(&mut kiosk.cmd(&["restore", &id, "--target", dir.path().join("t").to_str().unwrap()]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy"));
    assert!(!dir.path().join("t").join(&data.to_str().unwrap()[1..]).exists());
}

/// POSTs a commit manifest with a session.
fn commit_raw(url: &str, session: &str, manifest: &serde_json::Value) -> (u16, String) {
    let (status, body) =
        http("POST", &format!("{url}/v1/snapshots"), Some(session), Some(manifest.to_string().as_bytes()));
    (status, code(&body))
}

/// Issue 11, finding 5: a manifest too large to read back (60 paths of
/// 300,000 characters was accepted, then broke `check` for good) is refused
/// with 413, whether one field is too long or only the encoding is too large.
#[test]
fn a_manifest_too_large_to_read_back_is_refused_and_check_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = Server::start(&root, &[]);
    let u = &server.url;
    let dev = Dev::activate(dir.path(), u, &deployment_token(u, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let s = dev.session();
    let manifest = |paths: Vec<String>, tags: Vec<String>| serde_json::json!({"hostname": "h", "paths": paths, "tags": tags, "files": []});

    let long_paths = vec!["/".to_owned() + &"p".repeat(300_000); 60];
    assert_eq!(commit_raw(u, &s, &manifest(long_paths, vec![])), (413, "manifest_too_large".into()));
    assert_eq!(commit_raw(u, &s, &manifest(vec![], vec!["t".repeat(257)])), (413, "manifest_too_large".into()));
    assert_eq!(commit_raw(u, &s, &manifest(vec!["/x".into(); 1025], vec![])), (413, "manifest_too_large".into()));
    // Every field within its bound, but control characters take six bytes
    // each in the stored JSON: 24 MiB of manifest, over the 16 MiB read limit.
    let escaped = vec!["\u{1}".repeat(4096); 1024];
    assert_eq!(commit_raw(u, &s, &manifest(escaped, vec![])), (413, "manifest_too_large".into()));
    // At the bounds, plain text: accepted, and read back.
    let (status, _) = commit_raw(u, &s, &manifest(vec!["p".repeat(4096); 1024], vec!["t".repeat(256); 64]));
    assert_eq!(status, 200);
    assert_eq!(dev.json(&["snapshots"]).as_array().unwrap().len(), 1);

    ok(run(tenant_cli(root.join("acme").to_str().unwrap()).arg("check")));
}

/// Issue 11, finding 6: activating again with an active device id took the
/// device's place silently; now it is refused until the admin resets the
/// id, a reset voids the old token and sessions (on a separate storage node
/// too), and a `--provisioned-only` token activates only listed users.
#[test]
fn activation_is_bound_to_a_device_id_and_a_provisioned_user() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, storage) = auth_and_storage(dir.path(), "fail_closed");
    let created: serde_json::Value = serde_json::from_str(&ok(run(&mut admin(
        &auth.url,
        &["deployment-token", "create", "--tenant", "acme", "--json"],
    ))))
    .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["token_id"].as_str().unwrap().to_owned();
    assert!(!token.contains(&token_id) && token_id.len() == 16);
    let phone = Dev::activate(dir.path(), &storage.url, &token, "a@acme.com", "phone");
    phone.json(&["snapshots"]);
    let old_session = phone.session();
    let list = format!("{}/v1/snapshots", storage.url);
    let status_of = |session: &str| {
        let (status, body) = http("GET", &list, Some(session), None);
        (status, if status == 200 { String::new() } else { code(&body) })
    };

    // The same id again, as the same user or another: 409, through the relay,
    // and the real device keeps working.
    let activate = |email: &str, id: &str, token: &str| {
        let body = serde_json::json!({"deployment_token": token, "email": email, "device_id": id}).to_string();
        let (status, resp) = http("POST", &format!("{}/v1/activate", storage.url), None, Some(body.as_bytes()));
        (status, if status == 200 { String::new() } else { code(&resp) })
    };
    assert_eq!(activate("a@acme.com", "phone", &token), (409, "device_exists".into()));
    assert_eq!(activate("mallory@acme.com", "phone", &token), (409, "device_exists".into()));
    phone.json(&["snapshots"]);
    let devices: serde_json::Value =
        serde_json::from_str(&ok(run(&mut admin(&auth.url, &["devices", "--json"])))).unwrap();
    assert_eq!(devices[0]["deployment_token_id"], token_id.as_str());
    assert!(!devices.to_string().contains(&token), "the secret is never shown again");

    // A reset voids the old token and its sessions; the id activates again.
    let reset: serde_json::Value =
        serde_json::from_str(&ok(run(&mut admin(&auth.url, &["device", "reset", "phone", "--json"])))).unwrap();
    assert_eq!(reset["state"], "reset");
    eventually(10, "the storage node to refuse the reset device", || {
        status_of(&old_session) == (403, "device_reset".into())
    });
    let old_token = phone.state_json()["device_token"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"device_token": old_token, "email": "a@acme.com", "device_id": "phone"}).to_string();
    assert_eq!(http("POST", &format!("{}/v1/session", storage.url), None, Some(body.as_bytes())).0, 401);
    std::fs::create_dir(dir.path().join("reinstalled")).unwrap();
    let again = Dev::activate(&dir.path().join("reinstalled"), &storage.url, &token, "a@acme.com", "phone");
    again.json(&["snapshots"]);
    // The storage node accepts the new activation's sessions at once.
    assert_eq!(status_of(&again.session()).0, 200);
    assert_eq!(status_of(&old_session), (403, "device_reset".into()), "the old activation's session stays void");
    assert_eq!(activate("a@acme.com", "phone", &token), (409, "device_exists".into()));

    // Provisioned users.
    ok(run(&mut admin(&auth.url, &["user", "add", "--tenant", "acme", "a@acme.com", "b+x/y@acme.com"])));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(run(&mut admin(&auth.url, &["user", "list", "--tenant", "acme", "--json"])))).unwrap();
    let emails: Vec<&str> = listed.as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap()).collect();
    assert_eq!(emails, ["a@acme.com", "b+x/y@acme.com"]);
    let strict =
        ok(run(&mut admin(&auth.url, &["deployment-token", "create", "--tenant", "acme", "--provisioned-only"])))
            .trim()
            .to_owned();
    assert_eq!(activate("mallory@acme.com", "m1", &strict), (403, "user_not_provisioned".into()));
    assert_eq!(activate("a@acme.com", "tablet", &strict).0, 200);
    // The open token still activates anyone; other tenants' lists do not count.
    assert_eq!(activate("mallory@acme.com", "m2", &token).0, 200);
    ok(run(&mut admin(&auth.url, &["user", "remove", "--tenant", "acme", "b+x/y@acme.com", "nobody@acme.com"])));
    assert_eq!(activate("b+x/y@acme.com", "b1", &strict), (403, "user_not_provisioned".into()));
    let listed = ok(run(&mut admin(&auth.url, &["user", "list", "--tenant", "acme"])));
    assert!(listed.contains("a@acme.com") && !listed.contains("b+x/y"));
}

/// Issue 11, finding 7: with `allowRestoreToOtherDevice=false` another
/// device's session read the first device's files with plain HTTP. The
/// policy is now set on the deployment token, carried in the signed session
/// token, and enforced by a storage node that has no registry.
#[test]
fn policies_on_the_deployment_token_are_enforced_by_the_storage_node() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, storage) = auth_and_storage(dir.path(), "fail_closed");
    let strict = ok(run(&mut admin(
        &auth.url,
        &[
            "deployment-token",
            "create",
            "--tenant",
            "acme",
            "--policy",
            "allowRestoreToOtherDevice=false",
            "--policy",
            "allowOpenIn=false",
        ],
    )))
    .trim()
    .to_owned();
    let bad =
        run(&mut admin(&auth.url, &["deployment-token", "create", "--tenant", "acme", "--policy", "allowAll=true"]));
    assert_eq!(bad.status.code(), Some(2), "an unknown policy is a usage error");
    let open = deployment_token(&auth.url, "acme");
    let phone = Dev::activate(dir.path(), &storage.url, &strict, "a@acme.com", "phone");
    let laptop = Dev::activate(dir.path(), &storage.url, &strict, "a@acme.com", "laptop");
    let desktop = Dev::activate(dir.path(), &storage.url, &open, "a@acme.com", "desktop");
    let data = dir.path().join("data");
    make_data(&data, 7);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();

    // The session response carries the device's policies.
    let token = laptop.state_json()["device_token"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"device_token": token, "email": "a@acme.com", "device_id": "laptop"}).to_string();
    let (status, resp) = http("POST", &format!("{}/v1/session", storage.url), None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp["policies"], serde_json::json!({"allow_restore_to_other_device": false, "allow_open_in": false}));
    let laptop_session = resp["session_token"].as_str().unwrap().to_owned();

    // Plain HTTP with the laptop's session: refused on every read route.
    let tree = format!("{}/v1/snapshots/{id}/tree?path=", storage.url);
    let file = format!("{}/v1/snapshots/{id}/file?path={}/notes.txt", storage.url, &data.to_str().unwrap()[1..]);
    for url in [&tree, &file] {
        let (status, body) = http("GET", url, Some(&laptop_session), None);
        assert_eq!((status, code(&body).as_str()), (403, "restore_to_other_device_denied"), "{url}");
    }
    // The phone reads its own snapshot; a device under the open token reads it too.
    phone.json(&["snapshots"]);
    assert_eq!(http("GET", &file, Some(&phone.session()), None).0, 200);
    desktop.json(&["snapshots"]);
    assert_eq!(http("GET", &file, Some(&desktop.session()), None).0, 200);

    // The laptop's client applies the server's policy over its permissive
    // managed config (which can only narrow it), and says so before writing.
    let target = dir.path().join("t");
    let out = run(&mut laptop.cmd(&["restore", &id, "--target", target.to_str().unwrap()]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy"));
    assert_eq!(laptop.state_json()["allow_restore_to_other_device"], false);
    assert!(!target.join(&data.to_str().unwrap()[1..]).exists());
}

#[test]
fn bundle_uploads_verify_every_chunk_and_refuse_hostile_bundles_with_json_errors() {
    use chunkvault::api::{push_bundle_frame, BUNDLE_FRAME_HEADER, MAX_BUNDLE_BODY};
    use chunkvault::crypto::IdKey;
    use chunkvault::id::BlobId;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let u = &server.url;
    let dev = Dev::activate(dir.path(), u, &deployment_token(u, "acme"), "a@acme.com", "d1");
    dev.json(&["snapshots"]);
    let session = dev.session();
    let s = Some(session.as_str());
    let (status, body) = http("GET", &format!("{u}/v1/chunking"), s, None);
    assert_eq!(status, 200);
    let chunking: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let key = hex::decode(chunking["id_key"].as_str().unwrap()).unwrap();
    let id_key = IdKey::from_bytes(key.try_into().unwrap());
    let missing = |ids: &[BlobId]| -> Vec<String> {
        let q = serde_json::json!({ "chunks": ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>() });
        let (status, body) = http("POST", &format!("{u}/v1/chunks/missing"), s, Some(q.to_string().as_bytes()));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["missing"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
    };
    let bundle_url = format!("{u}/v1/chunks/bundle");
    let (a, b, c) = (pseudo_random(50_000, 1), pseudo_random(70_000, 2), pseudo_random(30_000, 3));
    let (ia, ib, ic) = (id_key.blob_id(&a), id_key.blob_id(&b), id_key.blob_id(&c));

    // A good bundle: both stored, then both deduplicated (a chunk twice in
    // one bundle is stored once).
    let mut good = Vec::new();
    push_bundle_frame(&mut good, &ia, &a);
    push_bundle_frame(&mut good, &ib, &b);
    push_bundle_frame(&mut good, &ia, &a);
    let (status, body) = http("POST", &bundle_url, s, Some(&good));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((v["stored"].as_u64(), v["deduplicated"].as_u64()), (Some(2), Some(1)));
    assert!(missing(&[ia, ib]).is_empty());
    let (status, body) = http("POST", &bundle_url, s, Some(&good));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((v["stored"].as_u64(), v["deduplicated"].as_u64()), (Some(0), Some(3)));

    // One chunk under a wrong id: nothing of the bundle is stored, neither
    // the good chunk nor the bytes under the id they were sent with.
    let (x, ix) = (pseudo_random(40_000, 4), id_key.blob_id(&pseudo_random(40_000, 5)));
    let mut wrong = Vec::new();
    push_bundle_frame(&mut wrong, &ic, &c);
    push_bundle_frame(&mut wrong, &ix, &x);
    let (status, body) = http("POST", &bundle_url, s, Some(&wrong));
    assert_eq!((status, code(&body).as_str()), (400, "chunk_mismatch"));
    assert_eq!(missing(&[ic, ix, id_key.blob_id(&x)]).len(), 3);

    // Truncated: in a header, and in a chunk's bytes.
    let mut one = Vec::new();
    push_bundle_frame(&mut one, &ic, &c);
    for cut in [BUNDLE_FRAME_HEADER - 1, one.len() - 1] {
        let (status, body) = http("POST", &bundle_url, s, Some(&one[..cut]));
        assert_eq!((status, code(&body).as_str()), (400, "bad_bundle"), "cut at {cut}");
    }
    let mut long_tail = one.clone();
    long_tail.extend_from_slice(&[0; 10]);
    let (status, body) = http("POST", &bundle_url, s, Some(&long_tail));
    assert_eq!((status, code(&body).as_str()), (400, "bad_bundle"));
    let (status, body) = http("POST", &bundle_url, s, Some(b""));
    assert_eq!((status, code(&body).as_str()), (400, "bad_bundle"));
    // A frame claiming more than a chunk may have.
    let mut huge = ic.0.to_vec();
    huge.extend_from_slice(&(5u32 << 20).to_le_bytes());
    let (status, body) = http("POST", &bundle_url, s, Some(&huge));
    assert_eq!((status, code(&body).as_str()), (400, "bad_bundle"));
    assert_eq!(missing(&[ic]).len(), 1);

    // Oversized, and without a session.
    let (status, body) = http("POST", &bundle_url, s, Some(&vec![0u8; MAX_BUNDLE_BODY + 1]));
    assert_eq!((status, code(&body).as_str()), (413, "bundle_too_large"));
    let (status, body) = http("POST", &bundle_url, None, Some(&one));
    assert_eq!((status, code(&body).as_str()), (401, "invalid_token"));
    assert_eq!(missing(&[ic]).len(), 1);

    // What a bundle stored, a snapshot can name.
    let commit = serde_json::json!({"hostname": "h", "paths": ["/x"], "files": [
        {"path": "x", "mode": 420, "mtime": 0, "size": a.len() + b.len(), "chunks": [ia.to_hex(), ib.to_hex()]}]});
    let (status, body) = http("POST", &format!("{u}/v1/snapshots"), s, Some(commit.to_string().as_bytes()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}
