//! Several auth nodes on one PostgreSQL registry (`serve --role auth
//! --registry postgres://...`), each test in a database of its own: a
//! device activated through one node gets sessions from the other, a
//! retire made on one reaches a storage node that checks in with the
//! other, and a deployment token's `max_activations` holds while both
//! nodes activate with it at once.

mod common;

use std::path::Path;
use std::sync::Barrier;

use common::postgres::TestDb;
use common::server::*;
use serde_json::{json, Value};

/// An auth node on the test database, with its own (unused) root.
fn auth_node(dir: &Path, name: &str, db: &TestDb, extra: &[&str]) -> Server {
    let mut args = vec!["--role", "auth", "--registry", &db.url];
    args.extend_from_slice(extra);
    Server::start(&dir.join(name), &args)
}

fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let (status, bytes) = http("POST", url, None, Some(body.to_string().as_bytes()));
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Activates `device` on the auth node at `url`; returns its device token.
fn activate(url: &str, token: &str, email: &str, device: &str) -> String {
    let (status, body) = post_json(
        &format!("{url}/v1/activate"),
        &json!({"deployment_token": token, "email": email, "device_id": device}),
    );
    assert_eq!(status, 200, "{body}");
    body["device_token"].as_str().unwrap().to_owned()
}

/// Asks the auth node at `url` for a session: status and body.
fn session(url: &str, device_token: &str, email: &str, device: &str) -> (u16, Value) {
    post_json(&format!("{url}/v1/session"), &json!({"device_token": device_token, "email": email, "device_id": device}))
}

fn admin_get(url: &str, path: &str) -> Value {
    let (status, body) = http("GET", &format!("{url}{path}"), Some(ADMIN), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn a_device_activates_on_one_auth_node_and_gets_sessions_from_the_other() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = auth_node(dir.path(), "a", &db, &[]);
    let b = auth_node(dir.path(), "b", &db, &[]);
    // One signing key, made by whichever node started first.
    assert_eq!(admin_get(&a.url, "/v1/session-key"), admin_get(&b.url, "/v1/session-key"));

    let token = deployment_token(&a.url, "acme");
    let device_token = activate(&a.url, &token, "u@acme.com", "phone");
    let (status, body) = session(&b.url, &device_token, "u@acme.com", "phone");
    assert_eq!(status, 200, "{body}");
    let from_b = body["session_token"].as_str().unwrap().to_owned();
    // A storage node that learnt the key from A takes B's session.
    let storage = Server::start(&dir.path().join("storage"), &["--role", "storage", "--upstream", &a.url]);
    let (status, body) = http("GET", &format!("{}/v1/chunking", storage.url), Some(&from_b), None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // B records the check-in and lists what A activated.
    let devices = admin_get(&b.url, "/v1/admin/devices");
    assert_eq!(devices[0]["device_id"], "phone");
    assert!(!devices[0]["last_seen"].is_null());

    // A real device: activated through a storage node in front of A, it
    // backs up through one in front of B, on the same root.
    let root = dir.path().join("root");
    let via_a = Server::start(&root, &["--role", "storage", "--upstream", &a.url]);
    let via_b = Server::start(&root, &["--role", "storage", "--upstream", &b.url]);
    let dev = Dev::activate(dir.path(), &via_a.url, &token, "v@acme.com", "laptop");
    let mut state = dev.state_json();
    assert_eq!(state["server_url"], json!(via_a.url));
    // Its next session comes from B.
    state["server_url"] = json!(via_b.url);
    state["session"] = Value::Null;
    std::fs::write(dev.state.join("state.json"), state.to_string()).unwrap();
    let data = dir.path().join("data");
    make_data(&data, 1);
    let id = dev.backup(&data)["id"].as_str().unwrap().to_owned();
    let target = dir.path().join("restore");
    dev.restore(&id, &target);
    assert_same_files(&data, &common::restored(&target, &data));
}

#[test]
fn a_retire_on_one_auth_node_reaches_a_storage_node_checking_in_with_the_other() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = auth_node(dir.path(), "a", &db, &[]);
    let b = auth_node(dir.path(), "b", &db, &[]);
    let storage = Server::start(
        &dir.path().join("storage"),
        &["--role", "storage", "--upstream", &b.url, "--checkin-interval-secs", "1"],
    );
    let token = deployment_token(&a.url, "acme");
    let device_token = activate(&a.url, &token, "u@acme.com", "phone");
    let (status, body) = session(&a.url, &device_token, "u@acme.com", "phone");
    assert_eq!(status, 200, "{body}");
    let session_token = body["session_token"].as_str().unwrap().to_owned();
    let chunking = format!("{}/v1/chunking", storage.url);
    assert_eq!(http("GET", &chunking, Some(&session_token), None).0, 200);

    ok(run(&mut admin(&a.url, &["device", "retire", "phone"])));
    // B refuses new sessions at once: the registry is one.
    let (status, body) = session(&b.url, &device_token, "u@acme.com", "phone");
    assert_eq!((status, body["error"].as_str()), (403, Some("device_retired")));
    // The storage node hears of it at its next check-in with B, and the
    // session A issued before stops working there.
    eventually(30, "the storage node to refuse the retired device", || {
        let (status, body) = http("GET", &chunking, Some(&session_token), None);
        status == 403 && code(&body) == "device_retired"
    });
    // The audit log, read on B, names what was done on A.
    let audit = admin_get(&b.url, "/v1/admin/audit");
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == "retire" && e["target"] == "phone"), "{audit}");
}

#[test]
fn a_deployment_tokens_max_activations_holds_under_concurrent_activations_across_both_nodes() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Refused activations count as failures per client address: raise the
    // limit so that every one of them reaches the registry.
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, "activation_failures_per_minute = 100000\n").unwrap();
    let config = config.to_str().unwrap();
    let nodes = [
        auth_node(dir.path(), "a", &db, &["--config", config]),
        auth_node(dir.path(), "b", &db, &["--config", config]),
    ];
    let max = 30;
    let token = ok(run(&mut admin(
        &nodes[0].url,
        &["deployment-token", "create", "--tenant", "acme", "--max-activations", &max.to_string()],
    )))
    .trim()
    .to_owned();

    let (threads, per_thread) = (16, 10);
    let start = Barrier::new(threads);
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, nodes, token) = (&start, &nodes, &token);
                s.spawn(move || {
                    start.wait();
                    (0..per_thread)
                        .map(|i| {
                            let url = &nodes[(t + i) % 2].url;
                            post_json(
                                &format!("{url}/v1/activate"),
                                &json!({"deployment_token": token, "email": "u@acme.com", "device_id": format!("d-{t}-{i}")}),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let activated = results.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(activated, max, "{} activations of a token good for {max}", threads * per_thread);
    for (status, body) in &results {
        assert!(*status == 200 || (*status == 403 && body["error"] == "activations_exhausted"), "{status} {body}");
    }
    // Both nodes were used, and both see the one count.
    let devices = admin_get(&nodes[1].url, "/v1/admin/devices");
    assert_eq!(devices.as_array().unwrap().len(), max);
    for node in &nodes {
        let tokens = admin_get(&node.url, "/v1/admin/deployment-tokens");
        assert_eq!(tokens[0]["activations"], max);
    }
}

#[test]
fn an_all_in_one_node_on_the_shared_registry_follows_retires_made_on_another_node() {
    let Some(db) = TestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    // An `all` node (auth and storage in one process) has no check-in: it
    // follows the shared registry's feed itself.
    let all = Server::start(&dir.path().join("all"), &["--registry", &db.url, "--checkin-interval-secs", "1"]);
    let auth = auth_node(dir.path(), "auth", &db, &[]);
    let token = deployment_token(&auth.url, "acme");
    let device_token = activate(&all.url, &token, "u@acme.com", "phone");
    let (status, body) = session(&all.url, &device_token, "u@acme.com", "phone");
    assert_eq!(status, 200, "{body}");
    let session_token = body["session_token"].as_str().unwrap().to_owned();
    let chunking = format!("{}/v1/chunking", all.url);
    assert_eq!(http("GET", &chunking, Some(&session_token), None).0, 200);

    ok(run(&mut admin(&auth.url, &["device", "block", "phone"])));
    eventually(30, "the all-in-one node to refuse the device blocked elsewhere", || {
        let (status, body) = http("GET", &chunking, Some(&session_token), None);
        status == 403 && code(&body) == "device_blocked"
    });
    ok(run(&mut admin(&auth.url, &["device", "allow", "phone"])));
    eventually(30, "the all-in-one node to take the device back", || {
        http("GET", &chunking, Some(&session_token), None).0 == 200
    });
}
