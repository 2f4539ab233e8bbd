//! Scoped administration and quotas, on the real server: the admin CLI with
//! registry admin tokens, raw HTTP from a hostile admin, and a device
//! backing up past its tenant's quota.

mod common;

use std::process::Command;

use common::pseudo_random;
use common::server::*;
use serde_json::{json, Value};

/// `chunkvault admin` with `token` as the admin token.
fn admin_as(url: &str, token: &str, args: &[&str]) -> Command {
    let mut c = admin(url, args);
    c.env("CHUNKVAULT_ADMIN_TOKEN", token);
    c
}

/// `admin ... --json` with the bootstrap token, parsed.
fn admin_json(url: &str, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(run(&mut admin(url, &a)))).unwrap()
}

/// A new admin token (its text) made by the bootstrap admin.
fn admin_token(url: &str, args: &[&str]) -> (String, String) {
    let mut a = vec!["token", "create"];
    a.extend_from_slice(args);
    let created = admin_json(url, &a);
    (created["token"].as_str().unwrap().to_owned(), created["id"].as_str().unwrap().to_owned())
}

/// Activates a device with raw HTTP; returns its device token.
fn activate(url: &str, deployment_token: &str, email: &str, device: &str) -> (u16, Value) {
    let body = json!({"deployment_token": deployment_token, "email": email, "device_id": device}).to_string();
    let (status, body) = http("POST", &format!("{url}/v1/activate"), None, Some(body.as_bytes()));
    (status, serde_json::from_slice(&body).unwrap())
}

/// Status and error code of a raw request with a bearer token.
fn call(method: &str, url: &str, token: &str, body: Option<Value>) -> (u16, String) {
    let body = body.map(|b| b.to_string());
    let (status, resp) = http(method, url, Some(token), body.as_deref().map(str::as_bytes));
    let code = if status >= 400 { code(&resp) } else { String::new() };
    (status, code)
}

fn get_json(url: &str, token: &str) -> Value {
    let (status, body) = http("GET", url, Some(token), None);
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn tenants_of(list: &Value, key: &str) -> Vec<String> {
    let mut t: Vec<String> =
        list.as_array().unwrap().iter().map(|e| e[key].as_str().unwrap_or("-").to_owned()).collect();
    t.sort();
    t.dedup();
    t
}

#[test]
fn a_tenant_admin_token_does_everything_in_its_tenant_through_the_cli_and_nothing_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let (ta, ta_id) = admin_token(url, &["--role", "tenant-admin", "--tenant", "acme", "--label", "acme helpdesk"]);
    assert!(ta.starts_with("cvad_"));
    let who: Value = serde_json::from_str(&ok(run(&mut admin_as(url, &ta, &["whoami", "--json"])))).unwrap();
    assert_eq!(who, json!({"id": ta_id, "role": "tenant-admin", "tenant": "acme"}));
    let boot: Value = admin_json(url, &["whoami"]);
    assert_eq!(boot, json!({"id": "bootstrap", "role": "admin", "tenant": null}));

    // In its tenant: a deployment token, a device, a retire, users.
    let acme = ok(run(&mut admin_as(url, &ta, &["deployment-token", "create", "--tenant", "acme"]))).trim().to_owned();
    assert_eq!(activate(url, &acme, "a@acme.com", "acme-phone").0, 200);
    ok(run(&mut admin_as(url, &ta, &["user", "add", "--tenant", "acme", "u@acme.com"])));
    let globex = deployment_token(url, "globex");
    assert_eq!(activate(url, &globex, "g@globex.com", "globex-phone").0, 200);

    // Elsewhere: refused with 403, and listings hold only its tenant.
    for args in [
        &["deployment-token", "create", "--tenant", "globex"][..],
        &["device", "retire", "globex-phone"],
        &["user", "list", "--tenant", "globex"],
        &["audit", "--tenant", "globex"],
        &["tenant", "set-quota", "acme", "1000000"],
        &["token", "create", "--role", "admin"],
    ] {
        let out = run(&mut admin_as(url, &ta, args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("403"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let devices: Value = serde_json::from_str(&ok(run(&mut admin_as(url, &ta, &["devices", "--json"])))).unwrap();
    assert_eq!(tenants_of(&devices, "tenant"), ["acme"]);
    let tokens: Value =
        serde_json::from_str(&ok(run(&mut admin_as(url, &ta, &["deployment-token", "list", "--json"])))).unwrap();
    assert_eq!(tenants_of(&tokens, "tenant"), ["acme"]);
    let tenants: Value = serde_json::from_str(&ok(run(&mut admin_as(url, &ta, &["tenants", "--json"])))).unwrap();
    assert_eq!(tenants_of(&tenants, "tenant"), ["acme"]);
    ok(run(&mut admin_as(url, &ta, &["device", "retire", "acme-phone"])));
    let audit: Value = serde_json::from_str(&ok(run(&mut admin_as(url, &ta, &["audit", "--json"])))).unwrap();
    assert_eq!(tenants_of(&audit, "tenant"), ["acme"]);
    // Newest first, with who did it.
    assert_eq!((audit[0]["action"].as_str(), audit[0]["actor"].as_str()), (Some("retire"), Some(ta_id.as_str())));
    let everything = admin_json(url, &["audit"]);
    assert_eq!(tenants_of(&everything, "tenant"), ["acme", "globex"]);
    assert!(everything.as_array().unwrap().iter().any(|e| e["actor"] == "device" && e["target"] == "globex-phone"));
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(admin_json(url, &["audit", "--since", &later]), json!([]));
    // The globex device was never touched.
    let all = admin_json(url, &["devices"]);
    let g = all.as_array().unwrap().iter().find(|d| d["device_id"] == "globex-phone").unwrap();
    assert_eq!(g["state"], "active");

    // Revoked: refused at once, with its own code.
    let listed = admin_json(url, &["token", "list"]);
    assert_eq!(listed[0]["label"], "acme helpdesk");
    assert!(!listed.to_string().contains(&ta[5..]), "token list never shows a secret");
    ok(run(&mut admin(url, &["token", "revoke", &ta_id])));
    let out = run(&mut admin_as(url, &ta, &["whoami"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_revoked"));
}

#[test]
fn a_hostile_tenant_admin_reaches_no_other_tenants_devices_tokens_users_or_audit_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let (ta, ta_id) = admin_token(url, &["--role", "tenant-admin", "--tenant", "acme"]);
    let (_, globex_admin_id) = admin_token(url, &["--role", "tenant-admin", "--tenant", "globex"]);
    let (_, global_ro_id) = admin_token(url, &["--role", "read-only"]);
    let globex = admin_json(url, &["deployment-token", "create", "--tenant", "globex"]);
    let globex_token_id = globex["token_id"].as_str().unwrap();
    assert_eq!(activate(url, globex["token"].as_str().unwrap(), "g@globex.com", "globex-phone").0, 200);
    ok(run(&mut admin(url, &["user", "add", "--tenant", "globex", "g@globex.com"])));
    ok(run(&mut admin(url, &["device", "wipe", "globex-phone"])));

    let forbidden = (403, "forbidden".to_owned());
    let u = |p: &str| format!("{url}{p}");
    for (method, path, body) in [
        ("POST", "/v1/admin/devices/globex-phone/allow", None),
        ("POST", "/v1/admin/devices/globex-phone/reset", None),
        ("DELETE", "/v1/admin/devices/globex-phone", None),
        ("POST", &format!("/v1/admin/deployment-tokens/{globex_token_id}/revoke"), None),
        ("POST", "/v1/admin/deployment-tokens", Some(json!({"tenant": "globex"}))),
        ("GET", "/v1/admin/deployment-tokens?tenant=globex", None),
        ("GET", "/v1/admin/tenants/globex/users", None),
        ("POST", "/v1/admin/tenants/globex/users", Some(json!({"emails": ["x@globex.com"]}))),
        ("DELETE", "/v1/admin/tenants/globex/users/g@globex.com", None),
        ("GET", "/v1/admin/audit?tenant=globex", None),
        ("PUT", "/v1/admin/tenants/acme/quota", Some(json!({"quota_bytes": 0}))),
        ("POST", "/v1/admin/tokens", Some(json!({"role": "admin"}))),
        ("POST", "/v1/admin/tokens", Some(json!({"role": "tenant-admin", "tenant": "globex"}))),
        ("POST", "/v1/admin/tokens", Some(json!({"role": "read-only"}))),
        ("POST", &format!("/v1/admin/tokens/{globex_admin_id}/revoke"), None),
        ("POST", &format!("/v1/admin/tokens/{global_ro_id}/revoke"), None),
        ("GET", "/v1/checkin", None),
        (
            "POST",
            "/v1/checkin",
            Some(json!({"since": 0, "usage": [{"tenant": "globex", "stored_bytes": 1, "snapshots": 0}]})),
        ),
    ] {
        assert_eq!(call(method, &u(path), &ta, body), forbidden, "{method} {path}");
    }
    // Nothing of globex changed or leaked.
    let devices = get_json(&u("/v1/admin/devices"), &ta);
    assert_eq!(devices, json!([]));
    assert_eq!(get_json(&u("/v1/admin/deployment-tokens"), &ta), json!([]));
    let tokens = get_json(&u("/v1/admin/tokens"), &ta);
    assert_eq!(
        tokens.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(),
        [ta_id.as_str()]
    );
    assert_eq!(tenants_of(&get_json(&u("/v1/admin/audit"), &ta), "tenant"), ["acme"]);
    let all = admin_json(url, &["devices"]);
    assert_eq!(all[0]["state"], "wiped");
    assert_eq!(admin_json(url, &["user", "list", "--tenant", "globex"]).as_array().unwrap().len(), 1);
    assert_eq!(admin_json(url, &["deployment-token", "list"])[0]["revoked"], false);
    assert!(admin_json(url, &["token", "list"]).as_array().unwrap().iter().all(|t| t["revoked_at"].is_null()));
}

#[test]
fn read_only_revoked_forged_and_foreign_tokens_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let (ro, _) = admin_token(url, &["--role", "read-only"]);
    let token = deployment_token(url, "acme");
    let (_, activated) = activate(url, &token, "a@acme.com", "phone");
    let u = |p: &str| format!("{url}{p}");

    // Read-only: every GET, no change.
    for path in
        ["/v1/admin/devices", "/v1/admin/deployment-tokens", "/v1/admin/tenants", "/v1/admin/audit", "/v1/admin/tokens"]
    {
        get_json(&u(path), &ro);
    }
    let forbidden = (403, "forbidden".to_owned());
    for (method, path, body) in [
        ("POST", "/v1/admin/devices/phone/retire", None),
        ("DELETE", "/v1/admin/devices/phone", None),
        ("POST", "/v1/admin/deployment-tokens", Some(json!({"tenant": "acme"}))),
        ("POST", "/v1/admin/tokens", Some(json!({"role": "read-only"}))),
        ("PUT", "/v1/admin/tenants/acme/quota", Some(json!({"quota_bytes": 1}))),
        ("POST", "/v1/admin/tenants/acme/users", Some(json!({"emails": ["x@acme.com"]}))),
    ] {
        assert_eq!(call(method, &u(path), &ro, body), forbidden, "{method} {path}");
    }
    assert_eq!(admin_json(url, &["devices"])[0]["state"], "active");

    // Forged, malformed, foreign kinds of token, and a revoked one: 401.
    let (revoked, revoked_id) = admin_token(url, &["--role", "admin"]);
    get_json(&u("/v1/admin/whoami"), &revoked);
    ok(run(&mut admin(url, &["token", "revoke", &revoked_id])));
    assert_eq!(call("GET", &u("/v1/admin/whoami"), &revoked, None), (401, "token_revoked".into()));
    assert_eq!(call("POST", &u("/v1/admin/devices/phone/retire"), &revoked, None), (401, "token_revoked".into()));
    let device_token = activated["device_token"].as_str().unwrap();
    let mut flipped = revoked.clone().into_bytes();
    let last = flipped.len() - 2;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let forged = format!("cvad_{}", "A".repeat(43));
    for bad in [forged.as_str(), &flipped, device_token, &token, "cvad_", "test admin toke", "TEST ADMIN TOKEN"] {
        assert_eq!(call("GET", &u("/v1/admin/whoami"), bad, None).0, 401, "{bad}");
        assert_eq!(call("POST", &u("/v1/admin/devices/phone/retire"), bad, None).0, 401, "{bad}");
    }
    assert_eq!(admin_json(url, &["devices"])[0]["state"], "active");
}

#[test]
fn deployment_tokens_are_listed_without_secrets_and_a_revoked_one_activates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let created = admin_json(
        url,
        &["deployment-token", "create", "--tenant", "acme", "--max-activations", "3", "--policy", "allowOpenIn=false"],
    );
    let secret = created["token"].as_str().unwrap();
    let id = created["token_id"].as_str().unwrap();
    deployment_token(url, "globex");
    Dev::activate(dir.path(), url, secret, "a@acme.com", "first");
    let listed = admin_json(url, &["deployment-token", "list", "--tenant", "acme"]);
    assert!(!listed.to_string().contains(&secret[5..]), "no secret in {listed}");
    let t = &listed[0];
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(
        (t["token_id"].as_str(), t["activations"].as_u64(), t["max_activations"].as_u64()),
        (Some(id), Some(1), Some(3))
    );
    assert_eq!((t["policies"]["allow_open_in"].as_bool(), t["revoked"].as_bool()), (Some(false), Some(false)));
    assert!(t["created_at"].is_string() && t["expires_at"].is_string() && t["provisioned_only"] == false);
    assert_eq!(admin_json(url, &["deployment-token", "list"]).as_array().unwrap().len(), 2);

    ok(run(&mut admin(url, &["deployment-token", "revoke", id])));
    assert_eq!(admin_json(url, &["deployment-token", "list", "--tenant", "acme"])[0]["revoked"], true);
    let (status, body) = activate(url, secret, "b@acme.com", "second");
    assert_eq!((status, body["error"].as_str()), (401, Some("token_revoked")));
    let mc = dir.path().join("mc.json");
    std::fs::write(
        &mc,
        json!({"serverURL": url, "userEmail": "c@acme.com", "deploymentToken": secret, "deviceId": "third"})
            .to_string(),
    )
    .unwrap();
    let mut c = Command::new(BIN);
    c.args(["device", "activate", "--managed-config", mc.to_str().unwrap()])
        .env("CHUNKVAULT_DEVICE_STATE", dir.path().join("s3"));
    let out = run(&mut c);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_revoked"));
    // The device it activated before keeps working.
    ok(run(&mut Dev { state: dir.path().join("state-first") }.cmd(&["snapshots"])));
}

#[test]
fn a_device_is_deleted_only_after_retire_or_wipe_and_tenants_show_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let token = deployment_token(url, "acme");
    assert_eq!(activate(url, &token, "a@acme.com", "phone").0, 200);
    assert_eq!(activate(url, &token, "b@acme.com", "laptop").0, 200);
    let out = run(&mut admin(url, &["device", "delete", "phone"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_not_retired"));
    let tenants = admin_json(url, &["tenants"]);
    assert_eq!((tenants[0]["tenant"].as_str(), tenants[0]["devices"].as_u64()), (Some("acme"), Some(2)));
    ok(run(&mut admin(url, &["device", "retire", "phone"])));
    assert_eq!(ok(run(&mut admin(url, &["device", "delete", "phone"]))).trim(), "device phone deleted");
    assert_eq!(admin_json(url, &["tenants"])[0]["devices"], 1);
    assert_eq!(tenants_of(&admin_json(url, &["devices"]), "device_id"), ["laptop"]);
    let audit = admin_json(url, &["audit", "--tenant", "acme"]);
    let actions: Vec<_> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions[..2], ["delete", "retire"]);
    assert!(actions.contains(&"activate") && actions.contains(&"deployment-token create"));
    // The id may activate again, as a new device.
    assert_eq!(activate(url, &token, "c@acme.com", "phone").0, 200);
}

/// The id a tenant gives `data` (`GET /v1/chunking`'s id key).
fn chunk_id(url: &str, session: &str, data: &[u8]) -> String {
    let chunking = get_json(&format!("{url}/v1/chunking"), session);
    let key: [u8; 32] = hex::decode(chunking["id_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    blake3::keyed_hash(&key, data).to_hex().to_string()
}

#[test]
fn a_backup_past_the_quota_is_refused_with_507_and_every_earlier_snapshot_restores() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let url = &server.url;
    let token = deployment_token(url, "acme");
    let dev = Dev::activate(dir.path(), url, &token, "a@acme.com", "phone");
    let data = dir.path().join("data");
    make_data(&data, 1);
    let first = dev.backup(&data)["id"].as_str().unwrap().to_owned();
    let tenant = admin_json(url, &["tenants"])[0].clone();
    let stored = tenant["stored_bytes"].as_u64().unwrap();
    assert!(stored > 700_000, "{tenant}");
    assert_eq!((tenant["snapshots"].as_u64(), tenant["quota_bytes"].as_u64()), (Some(1), Some(0)));

    // Room for 100 kB more; the next backup adds 2 MB of new data.
    let quota = (stored + 100_000).to_string();
    ok(run(&mut admin(url, &["tenant", "set-quota", "acme", &quota])));
    assert_eq!(admin_json(url, &["tenants"])[0]["quota_bytes"].as_u64(), Some(stored + 100_000));
    std::fs::write(data.join("big.bin"), pseudo_random(2_000_000, 9)).unwrap();
    let out = run(&mut dev.cmd(&["backup", data.to_str().unwrap()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("quota is full") && stderr.contains("earlier backups are intact"), "{stderr}");
    let snapshots = dev.json(&["snapshots"]);
    assert_eq!(snapshots.as_array().unwrap().len(), 1, "the refused backup left no snapshot");

    // Both upload routes refuse a new chunk with 507 quota_exceeded.
    let session = dev.session();
    let chunk = pseudo_random(300_000, 77);
    let id = chunk_id(url, &session, &chunk);
    let (status, body) = http("PUT", &format!("{url}/v1/chunks/{id}"), Some(&session), Some(&chunk));
    assert_eq!((status, code(&body)), (507, "quota_exceeded".to_owned()));
    let mut bundle = hex::decode(&id).unwrap();
    bundle.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    bundle.extend_from_slice(&chunk);
    let (status, body) = http("POST", &format!("{url}/v1/chunks/bundle"), Some(&session), Some(&bundle));
    assert_eq!((status, code(&body)), (507, "quota_exceeded".to_owned()));
    // A small chunk still fits.
    let small = b"a small chunk that fits".to_vec();
    let small_id = chunk_id(url, &session, &small);
    assert_eq!(http("PUT", &format!("{url}/v1/chunks/{small_id}"), Some(&session), Some(&small)).0, 201);

    // The earlier snapshot restores exactly.
    let target = dir.path().join("restored");
    dev.restore(&first, &target);
    std::fs::remove_file(data.join("big.bin")).unwrap();
    assert_same_files(&data, &common::restored(&target, &data));

    // No quota: the big backup goes through.
    std::fs::write(data.join("big.bin"), pseudo_random(2_000_000, 9)).unwrap();
    ok(run(&mut admin(url, &["tenant", "set-quota", "acme", "0"])));
    dev.backup(&data);
    let tenant = admin_json(url, &["tenants"])[0].clone();
    assert_eq!(tenant["snapshots"].as_u64(), Some(2));
    assert!(tenant["stored_bytes"].as_u64().unwrap() > stored + 2_000_000, "{tenant}");
}

#[test]
fn a_storage_node_learns_quotas_and_reports_usage_at_check_in() {
    let dir = tempfile::tempdir().unwrap();
    let auth = Server::start(&dir.path().join("auth-root"), &["--role", "auth"]);
    let storage = Server::start(
        &dir.path().join("storage-root"),
        &["--role", "storage", "--upstream", &auth.url, "--checkin-interval-secs", "1"],
    );
    let token = deployment_token(&auth.url, "acme");
    let dev = Dev::activate(dir.path(), &storage.url, &token, "a@acme.com", "phone");
    let data = dir.path().join("data");
    make_data(&data, 2);
    dev.backup(&data);
    let reported = |t: &Value| t["snapshots"].as_u64() == Some(1) && t["stored_bytes"].as_u64().unwrap_or(0) > 700_000;
    eventually(20, "the usage report", || reported(&admin_json(&auth.url, &["tenants"])[0]));

    ok(run(&mut admin(&auth.url, &["tenant", "set-quota", "acme", "1000"])));
    let session = dev.session();
    // A new chunk each time (one stored before the quota arrived would be
    // a duplicate after it, which costs nothing).
    let mut seed = 5;
    let mut put = || {
        seed += 1;
        let chunk = pseudo_random(50_000, seed);
        let id = chunk_id(&storage.url, &session, &chunk);
        http("PUT", &format!("{}/v1/chunks/{id}", storage.url), Some(&session), Some(&chunk))
    };
    eventually(20, "the quota at the storage node", || put().0 == 507);
    assert_eq!(code(&put().1), "quota_exceeded");
}
