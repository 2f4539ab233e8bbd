//! The web console on the real server: its files and their security
//! headers, and the admin routes its fleet pages read (a device's
//! snapshots, a tenant's daily history, the storage nodes), in one process
//! and across an auth role and a storage node that checks in.
//! `tests/console_browser.rs` drives the console itself in a browser.

mod common;

use common::server::*;
use serde_json::Value;

const HTML: &str = "text/html; charset=utf-8";

fn get_json(url: &str, token: &str) -> Value {
    let (status, body) = http("GET", url, Some(token), None);
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn status_code(url: &str, token: &str) -> (u16, String) {
    let (status, body) = http("GET", url, Some(token), None);
    (status, if status >= 400 { code(&body) } else { String::new() })
}

/// A new admin token of `role` (and `tenant`), made by the bootstrap admin.
fn admin_token(url: &str, role: &str, tenant: Option<&str>) -> String {
    let mut body = serde_json::json!({"role": role});
    if let Some(t) = tenant {
        body["tenant"] = t.into();
    }
    let (status, resp) =
        http("POST", &format!("{url}/v1/admin/tokens"), Some(ADMIN), Some(body.to_string().as_bytes()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    serde_json::from_slice::<Value>(&resp).unwrap()["token"].as_str().unwrap().to_owned()
}

fn device<'a>(devices: &'a Value, id: &str) -> &'a Value {
    devices.as_array().unwrap().iter().find(|d| d["device_id"] == id).unwrap_or_else(|| panic!("no {id} in {devices}"))
}

#[test]
fn console_files_are_served_with_their_content_types_and_strict_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let files = [
        ("/console", HTML),
        ("/console/", HTML),
        ("/console/index.html", HTML),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
    ];
    for (path, content_type) in files {
        // No token: the page is public, the API behind it is not.
        let resp = agent().get(format!("{}{path}", server.url)).call().unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let h = resp.headers();
        let header =
            |name: &str| h.get(name).unwrap_or_else(|| panic!("{path}: no {name}")).to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), content_type, "{path}");
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{path}: {csp}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        let body = resp.into_body().read_to_vec().unwrap();
        assert!(!body.is_empty(), "{path}");
        if content_type == HTML {
            let html = String::from_utf8(body).unwrap();
            assert!(html.contains(r#"<script src="/console/app.js" defer></script>"#));
            assert!(html.contains(r#"<link rel="stylesheet" href="/console/app.css">"#));
        }
    }
    let (status, body) = http("GET", &format!("{}/console/secrets.txt", server.url), None, None);
    assert_eq!((status, code(&body).as_str()), (404, "not_found"));
    let (status, body) = http("GET", &format!("{}/console/%2e%2e%2fregistry.db", server.url), None, None);
    assert_eq!((status, code(&body).as_str()), (404, "not_found"), "only built-in files, never one from disk");

    // The auth role serves it; a storage node does not.
    let auth = Server::start(&dir.path().join("auth-root"), &["--role", "auth"]);
    assert_eq!(http("GET", &format!("{}/console/", auth.url), None, None).0, 200);
    let storage = Server::start(&dir.path().join("store"), &["--role", "storage", "--upstream", &auth.url]);
    assert_eq!(http("GET", &format!("{}/console/", storage.url), None, None).0, 404);
}

#[test]
fn device_snapshots_tenant_history_and_dedup_come_from_the_storage_side_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = Server::start(&root, &[]);
    let url = &server.url;
    let dev = Dev::activate(dir.path(), url, &deployment_token(url, "acme"), "ann@acme.com", "ann-phone");
    Dev::activate(dir.path(), url, &deployment_token(url, "globex"), "gus@globex.com", "gus-phone");
    let data = dir.path().join("data");
    make_data(&data, 1);
    dev.backup(&data);

    let devices = get_json(&format!("{url}/v1/admin/devices"), ADMIN);
    let ann = device(&devices, "ann-phone");
    assert_eq!(ann["snapshots"], 1);
    assert!(ann["last_backup"].is_string());
    assert_eq!(device(&devices, "gus-phone")["snapshots"], 0);
    let snaps = get_json(&format!("{url}/v1/admin/devices/ann-phone/snapshots"), ADMIN);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    let first = &snaps[0];
    let content = 100 * "notes 1\n".len() as u64 + 700_000;
    assert_eq!((first["files"].as_u64(), first["bytes"].as_u64()), (Some(3), Some(content)));
    assert_eq!((first["device"].as_str(), first["user"].as_str()), (Some("ann-phone"), Some("ann@acme.com")));

    // The same data again: a second snapshot, nothing new stored, so the
    // dedup ratio (file content over stored bytes) is about two.
    dev.backup(&data);
    let snaps = get_json(&format!("{url}/v1/admin/devices/ann-phone/snapshots"), ADMIN);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
    assert_eq!(snaps[1]["id"], first["id"], "newest first");
    let tenants = get_json(&format!("{url}/v1/admin/tenants"), ADMIN);
    let acme = tenants.as_array().unwrap().iter().find(|t| t["tenant"] == "acme").unwrap();
    assert_eq!(acme["logical_bytes"].as_u64(), Some(2 * content));
    let ratio = 2.0 * content as f64 / acme["stored_bytes"].as_f64().unwrap();
    assert!(ratio > 1.5, "{acme}");

    let history = get_json(&format!("{url}/v1/admin/tenants/acme/history"), ADMIN);
    let days = history.as_array().unwrap();
    assert_eq!(days.len(), 30);
    let today = &days[29];
    assert_eq!(today["day"], chrono::Utc::now().date_naive().to_string());
    assert_eq!(today["backups"], 2);
    assert_eq!(today["stored_bytes"], acme["stored_bytes"]);
    assert!(days[..29].iter().all(|d| d["backups"] == 0 && d["stored_bytes"].is_null()));
    assert_eq!(get_json(&format!("{url}/v1/admin/tenants/acme/history?days=7"), ADMIN).as_array().unwrap().len(), 7);
    for bad in ["0", "367", "x"] {
        assert_eq!(status_code(&format!("{url}/v1/admin/tenants/acme/history?days={bad}"), ADMIN).0, 400, "{bad}");
    }

    // A snapshot forgotten on the repository leaves the listings.
    let out = run(tenant_cli(root.join("acme").to_str().unwrap()).args(["forget", first["id"].as_str().unwrap()]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(get_json(&format!("{url}/v1/admin/devices"), ADMIN).as_array().unwrap()[0]["snapshots"], 1);
    let history = get_json(&format!("{url}/v1/admin/tenants/acme/history?days=1"), ADMIN);
    assert_eq!(history[0]["backups"], 2, "the chart still counts the day's backups");

    // This process's own storage side is its one storage node.
    let nodes = get_json(&format!("{url}/v1/admin/storage-nodes"), ADMIN);
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!((nodes[0]["local"].as_bool(), nodes[0]["behind"].as_bool()), (Some(true), Some(false)));
    assert_eq!(nodes[0]["auth_unreachable"], "fail_closed");

    // Scopes: another tenant's admin sees none of it, and no tenant's
    // admin sees the storage nodes; a read-only token of every tenant does.
    let globex = admin_token(url, "tenant-admin", Some("globex"));
    assert_eq!(status_code(&format!("{url}/v1/admin/devices/ann-phone/snapshots"), &globex), (403, "forbidden".into()));
    assert_eq!(status_code(&format!("{url}/v1/admin/tenants/acme/history"), &globex), (403, "forbidden".into()));
    assert_eq!(status_code(&format!("{url}/v1/admin/storage-nodes"), &globex), (403, "forbidden".into()));
    assert_eq!(status_code(&format!("{url}/v1/admin/devices/gus-phone/snapshots"), &globex).0, 200);
    let devices = get_json(&format!("{url}/v1/admin/devices"), &globex);
    assert_eq!(devices.as_array().unwrap().len(), 1);
    let read_only = admin_token(url, "read-only", None);
    assert_eq!(status_code(&format!("{url}/v1/admin/storage-nodes"), &read_only).0, 200);
    assert_eq!(status_code(&format!("{url}/v1/admin/devices/nobody/snapshots"), ADMIN).0, 404);
}

#[test]
fn a_storage_node_reports_itself_and_its_tenants_snapshots_when_it_checks_in() {
    let dir = tempfile::tempdir().unwrap();
    let auth = Server::start(&dir.path().join("auth-root"), &["--role", "auth"]);
    let store = dir.path().join("store");
    let storage_args = [
        "--role",
        "storage",
        "--upstream",
        &auth.url,
        "--checkin-interval-secs",
        "1",
        "--auth-unreachable",
        "fail_open",
    ];
    let mut storage = Server::start(&store, &storage_args);
    let nodes_url = format!("{}/v1/admin/storage-nodes", auth.url);
    let mut node = Value::Null;
    eventually(20, "the storage node's check-in", || {
        node = get_json(&nodes_url, ADMIN)[0].clone();
        !node.is_null()
    });
    assert_eq!((node["local"].as_bool(), node["auth_unreachable"].as_str()), (Some(false), Some("fail_open")));
    assert_eq!((node["checkin_interval_secs"].as_u64(), node["stale"].as_bool()), (Some(1), Some(false)));
    assert!(node["name"]
        .as_str()
        .unwrap()
        .contains(storage.url.trim_start_matches("http://").split(':').next().unwrap()));

    let dev =
        Dev::activate(dir.path(), &storage.url, &deployment_token(&auth.url, "acme"), "ann@acme.com", "ann-phone");
    let data = dir.path().join("data");
    make_data(&data, 2);
    dev.backup(&data);
    let snaps_url = format!("{}/v1/admin/devices/ann-phone/snapshots", auth.url);
    eventually(20, "the snapshot to be reported", || get_json(&snaps_url, ADMIN).as_array().unwrap().len() == 1);
    let devices = get_json(&format!("{}/v1/admin/devices", auth.url), ADMIN);
    assert_eq!(device(&devices, "ann-phone")["snapshots"], 1);

    // A retire waits in the feed until the node's next check-in.
    ok(run(&mut admin(&auth.url, &["device", "retire", "ann-phone"])));
    eventually(20, "the node to fetch the retire", || get_json(&nodes_url, ADMIN)[0]["pending_changes"] == 0);

    // A node that stops checking in becomes stale, and so behind.
    storage.kill();
    ok(run(&mut admin(&auth.url, &["device", "block", "ann-phone"])));
    eventually(20, "the silent node to go stale", || {
        let n = &get_json(&nodes_url, ADMIN)[0];
        n["stale"] == true && n["behind"] == true && n["pending_changes"] == 1
    });

    // Restarted, it rescans: the registry keeps what exists, drops nothing.
    let _storage = Server::start(&store, &storage_args);
    eventually(20, "the restarted node's check-in", || get_json(&nodes_url, ADMIN)[0]["stale"] == false);
    assert_eq!(get_json(&snaps_url, ADMIN).as_array().unwrap().len(), 1);
}
