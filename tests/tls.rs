//! HTTPS end to end (issue 12): a throwaway CA and certificates made here
//! (rcgen), the real binary serving HTTPS on loopback, and the device
//! client, the admin client and a storage node checking in with an https
//! auth node, all trusting that CA as PEM. A wrong CA is refused with a
//! clear error and exit 1; SIGHUP swaps the certificate for new
//! connections and leaves established ones alone.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::server::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that signs server certificates for `localhost` and 127.0.0.1.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, issuer: Issuer::new(params, key) }
    }

    /// Writes `DIR/NAME.crt` and `DIR/NAME.key` for the loopback server.
    fn server_pair(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An HTTPS agent trusting the platform's roots and `ca_pem`.
fn agent_trusting(ca_pem: &str) -> ureq::Agent {
    let ca = chunkvault::tls::parse_ca_pem(ca_pem.as_bytes()).unwrap();
    chunkvault::tls::agent(&ca, std::time::Duration::from_secs(30))
}

/// A device activated from a managed config that pushes `ca_pem`.
fn activate(dir: &Path, url: &str, token: &str, id: &str, ca_pem: &str) -> (Dev, std::process::Output) {
    let state = dir.join(format!("state-{id}"));
    let mc = dir.join(format!("managed-{id}.json"));
    let config = serde_json::json!({
        "serverURL": url, "userEmail": "u@acme.com", "deploymentToken": token, "deviceId": id,
        "caCertificate": ca_pem,
    });
    std::fs::write(&mc, config.to_string()).unwrap();
    let dev = Dev { state };
    let out = run(&mut dev.cmd(&["activate", "--managed-config", s(&mc)]));
    (dev, out)
}

fn failed_with(out: std::process::Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(what), "expected {what:?} in: {stderr}");
    stderr
}

#[test]
fn device_admin_and_a_storage_node_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("chunkvault test CA");
    let ca_file = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server_pair(dir.path(), "server");
    let tls = ["--tls-cert", s(&cert), "--tls-key", s(&key)];

    // The auth node serves HTTPS.
    let auth = Server::start(&dir.path().join("auth-root"), &[&["--role", "auth"][..], &tls].concat());
    assert!(auth.url.starts_with("https://127.0.0.1:"), "{}", auth.url);

    // The admin client, trusting the CA through --ca-cert and through
    // CHUNKVAULT_CA_CERT.
    let token =
        ok(run(admin(&auth.url, &["deployment-token", "create", "--tenant", "acme"]).args(["--ca-cert", s(&ca_file)])))
            .trim()
            .to_owned();
    assert!(token.starts_with("cvdt_"), "{token}");
    ok(run(admin(&auth.url, &["devices"]).env("CHUNKVAULT_CA_CERT", &ca_file)));

    // A storage node (HTTPS itself) whose upstream is the https auth node:
    // it fetches the session key at start, relays activations and checks in.
    let node = Server::start(
        &dir.path().join("root"),
        &[
            &["--role", "storage", "--upstream", &auth.url, "--upstream-ca-cert", s(&ca_file)][..],
            &["--checkin-interval-secs", "1"],
            &tls,
        ]
        .concat(),
    );
    assert!(node.url.starts_with("https://"), "{}", node.url);

    // The device flow, with the CA pushed in the managed config and kept in
    // the device state for every later call.
    let (dev, out) = activate(dir.path(), &node.url, &token, "phone", &ca.pem);
    ok(out);
    assert_eq!(dev.state_json()["ca_certificate"].as_str(), Some(ca.pem.as_str()));
    let data = dir.path().join("data");
    make_data(&data, 7);
    let id = dev.backup(&data)["id"].as_str().unwrap().to_owned();
    let target = dir.path().join("restore");
    dev.restore(&id, &target);
    assert_same_files(&data, &common::restored(&target, &data));

    // The node learns of a retire through its check-in over HTTPS.
    let session = dev.session();
    ok(run(admin(&auth.url, &["device", "retire", "phone"]).args(["--ca-cert", s(&ca_file)])));
    let agent = agent_trusting(&ca.pem);
    eventually(30, "the storage node to learn of the retire", || {
        let resp = agent.get(format!("{}/v1/snapshots", node.url)).header("Authorization", format!("Bearer {session}"));
        resp.call().unwrap().status().as_u16() == 403
    });
    let (status, body) = {
        let mut r = agent.get(format!("{}/metrics", node.url)).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(status, 200);
    assert!(body.contains("chunkvault_checkin_failures_total 0"), "{body}");
}

#[test]
fn a_wrong_ca_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("right CA"), Ca::new("wrong CA"));
    let (cert, key) = ca.server_pair(dir.path(), "server");
    let wrong = other.write(dir.path(), "wrong");
    let server = Server::start(
        &dir.path().join("root"),
        &["--tls-cert", s(&cert), "--tls-key", s(&key), "--checkin-interval-secs", "1"],
    );

    // The admin client: exit 1, and the message says what to do.
    let out = run(admin(&server.url, &["devices"]).args(["--ca-cert", s(&wrong)]));
    let stderr = failed_with(out, "certificate is not trusted");
    assert!(stderr.contains("--ca-cert"), "{stderr}");
    // Without any CA, the platform's roots do not know this one either.
    failed_with(run(&mut admin(&server.url, &["devices"])), "certificate is not trusted");

    // The device client.
    let token = ok(run(admin(&server.url, &["deployment-token", "create", "--tenant", "acme"])
        .args(["--ca-cert", s(&ca.write(dir.path(), "right"))])))
    .trim()
    .to_owned();
    let (_, out) = activate(dir.path(), &server.url, &token, "phone", &other.pem);
    failed_with(out, "caCertificate");

    // A storage node whose upstream's CA is not the one it trusts does not
    // start, and says why.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--root", s(&dir.path().join("node"))])
        .args(["--role", "storage", "--upstream", &server.url, "--upstream-ca-cert", s(&wrong)])
        .env("CHUNKVAULT_PASSWORD", common::PASSWORD)
        .output()
        .unwrap();
    failed_with(out, "upstream_ca_cert");

    // A CA file that is not PEM, and a key file that is not there.
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let out = run(admin(&server.url, &["devices"]).args(["--ca-cert", s(&dir.path().join("junk.pem"))]));
    failed_with(out, "no `BEGIN CERTIFICATE`");
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--root", s(&dir.path().join("r2"))])
        .args(["--tls-cert", s(&cert), "--tls-key", s(&dir.path().join("missing.key"))])
        .env("CHUNKVAULT_PASSWORD", common::PASSWORD)
        .output()
        .unwrap();
    failed_with(out, "reading tls_key");
}

#[test]
fn plain_http_to_a_remote_address_needs_allow_insecure_http() {
    let dir = tempfile::tempdir().unwrap();
    let mc = dir.path().join("managed.json");
    let config =
        serde_json::json!({"serverURL": "http://192.0.2.1:8080", "userEmail": "u@acme.com", "deploymentToken": "t"});
    std::fs::write(&mc, config.to_string()).unwrap();
    let dev = Dev { state: dir.path().join("state") };
    let out = run(&mut dev.cmd(&["activate", "--managed-config", s(&mc)]));
    failed_with(out, "allowInsecureHttp");
}

/// One HTTP/1.1 request on an open TLS connection; the status line.
fn get_on(conn: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) -> String {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).lines().next().unwrap().to_owned()
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (cert, key) = old_ca.server_pair(dir.path(), "server");
    let server = Server::start(&dir.path().join("root"), &["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    let addr = server.url.strip_prefix("https://").unwrap().to_owned();

    // A connection established with the old certificate, kept open.
    let mut roots = rustls::RootCertStore::empty();
    for c in chunkvault::tls::parse_ca_pem(old_ca.pem.as_bytes()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(c.der().to_vec())).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut kept = rustls::StreamOwned::new(tls, std::net::TcpStream::connect(&addr).unwrap());
    assert!(get_on(&mut kept).starts_with("HTTP/1.1 200"));

    // A new pair signed by another CA replaces the files; SIGHUP.
    let (new_cert, new_key) = new_ca.server_pair(dir.path(), "next");
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) }, 0);

    let (old, new) = (agent_trusting(&old_ca.pem), agent_trusting(&new_ca.pem));
    eventually(30, "new connections to get the new certificate", || {
        new.get(format!("{}/healthz", server.url)).call().is_ok()
    });
    let e = old.get(format!("{}/healthz", server.url)).call().unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // The connection from before the reload is still served.
    assert!(get_on(&mut kept).starts_with("HTTP/1.1 200"));
}

#[test]
fn a_stalled_handshake_is_cut_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (cert, key) = ca.server_pair(dir.path(), "server");
    let server = Server::start(
        &dir.path().join("root"),
        &["--tls-cert", s(&cert), "--tls-key", s(&key), "--header-read-timeout-secs", "1"],
    );
    let addr = server.url.strip_prefix("https://").unwrap();
    // Connect and send nothing: no ClientHello ever comes.
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let started = std::time::Instant::now();
    let n = tcp.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "the server closes the connection without a byte");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
}
