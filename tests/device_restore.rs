//! The device's restore and wipe against the real server (issue 11,
//! findings 2 and 3): the whole tree as the CLI restores it, never through
//! a planted link, no temporary file after a failure, and a wipe that
//! removes exactly what restores wrote.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::server::*;
use common::{assert_same_tree, pseudo_random, restored, set_mtime, PASSWORD};

/// A server with its root under `dir`, and a phone activated on it in
/// tenant `acme`.
fn phone_on_a_server(dir: &Path) -> (PathBuf, Server, Dev) {
    let root = dir.join("root");
    let server = Server::start(&root, &[]);
    let phone = Dev::activate(dir, &server.url, &deployment_token(&server.url, "acme"), "a@acme.com", "phone");
    (root, server, phone)
}

/// Files, an empty directory, symlinks (one dangling), modes and mtimes.
fn varied(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    fs::write(root.join("sub/numbers.txt"), "1 2 3\n".repeat(3000)).unwrap();
    fs::write(root.join("sub/deeper/big.bin"), pseudo_random(5 << 20, 11)).unwrap();
    fs::write(root.join("sub/empty-file"), b"").unwrap();
    symlink("hello.txt", root.join("link")).unwrap();
    symlink("/nonexistent/dangling", root.join("sub/dangling")).unwrap();
    fs::set_permissions(root.join("sub/numbers.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    for (i, rel) in ["hello.txt", "sub/numbers.txt", "link", "sub/deeper", "empty", "sub", ""].iter().enumerate() {
        set_mtime(&root.join(rel), 1_650_000_000 + i as i64 * 77, 5_000 + i as i64);
    }
}

/// Every file below `root` that looks like a restore's temporary file.
fn temporaries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().contains("chunkvault-") {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn cli_restore(root: &Path, tenant: &str, id: &str, target: &Path) {
    let out = run(Command::new(BIN)
        .args(["restore", id, "--target", target.to_str().unwrap()])
        .env("CHUNKVAULT_REPO", root.join(tenant))
        .env("CHUNKVAULT_PASSWORD", PASSWORD)
        .env("CHUNKVAULT_CACHE_DIR", root.join("cache")));
    ok(out);
}

use std::process::Command;

#[test]
fn device_restore_gives_the_same_tree_as_the_cli_and_strips_special_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _server, phone) = phone_on_a_server(dir.path());
    let data = dir.path().join("data");
    varied(&data);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();

    let by_device = dir.path().join("by-device");
    let r = phone.restore(&id, &by_device);
    assert_eq!((r["files"].as_u64(), r["symlinks"].as_u64()), (Some(4), Some(2)), "{r}");
    let by_cli = dir.path().join("by-cli");
    cli_restore(&root, "acme", &id, &by_cli);
    assert_same_tree(&data, &restored(&by_device, &data));
    assert_same_tree(&restored(&by_cli, &data), &restored(&by_device, &data));
    assert!(restored(&by_device, &data).join("empty").is_dir());
    assert_eq!(fs::read_link(restored(&by_device, &data).join("link")).unwrap(), Path::new("hello.txt"));

    // Setuid, setgid and sticky bits chosen by the server are dropped.
    fs::set_permissions(data.join("hello.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(data.join("sub"), fs::Permissions::from_mode(0o3777)).unwrap();
    let id2 = phone.backup(&data)["id"].as_str().unwrap().to_owned();
    let t = dir.path().join("special");
    phone.restore(&id2, &t);
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(restored(&t, &data).join("hello.txt")), 0o755);
    assert_eq!(mode(restored(&t, &data).join("sub")), 0o777);
}

#[test]
fn device_restore_never_writes_through_a_planted_symlink_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _server, phone) = phone_on_a_server(dir.path());
    let data = dir.path().join("data");
    varied(&data);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();

    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let t = dir.path().join("T");
    let first = data.components().nth(1).unwrap().as_os_str().to_owned(); // "tmp" or similar
    fs::create_dir_all(&t).unwrap();
    symlink(&elsewhere, t.join(&first)).unwrap();
    let out = run(&mut phone.cmd(&["restore", &id, "--target", t.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing through the link");

    // A chunk the server cannot read (a damaged pack): the files needing it
    // are not written, the old ones stay, and no temporary file is left.
    let t2 = dir.path().join("T2");
    let at = restored(&t2, &data);
    fs::create_dir_all(at.join("sub/deeper")).unwrap();
    fs::write(at.join("sub/deeper/big.bin"), b"the user's own old copy").unwrap();
    for pack in walk_files(&root.join("acme/packs")) {
        let mut bytes = fs::read(&pack).unwrap();
        if bytes.len() > 1 << 20 {
            let n = bytes.len() / 3;
            bytes[n] ^= 0xff;
            fs::write(&pack, bytes).unwrap();
        }
    }
    let out = run(&mut phone.cmd(&["restore", &id, "--target", t2.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(at.join("sub/deeper/big.bin")).unwrap(), b"the user's own old copy");
    assert_eq!(fs::read(at.join("hello.txt")).unwrap(), b"hello\n", "undamaged files are restored");
    assert_eq!(temporaries(&t2), Vec::<PathBuf>::new());
}

fn walk_files(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(d).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn wipe_removes_exactly_what_restores_created() {
    let dir = tempfile::tempdir().unwrap();
    let (_root, server, phone) = phone_on_a_server(dir.path());
    let data = dir.path().join("data");
    varied(&data);
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();

    // The target already holds the user's own files, beside and above the
    // restored ones; the restore brings back one file and one directory.
    let t = dir.path().join("T");
    let at = restored(&t, &data);
    let parent = at.parent().unwrap().to_path_buf();
    fs::create_dir_all(parent.join("mystuff")).unwrap();
    fs::write(parent.join("mystuff/precious.txt"), b"mine").unwrap();
    fs::create_dir_all(&at).unwrap();
    fs::write(at.join("notes-of-mine.txt"), b"also mine").unwrap();
    let include_file = format!("{}/hello.txt", data.display());
    let include_dir = format!("{}/sub", data.display());
    ok(run(&mut phone.cmd(&[
        "restore",
        &id,
        "--target",
        t.to_str().unwrap(),
        "--include",
        &include_file,
        "--include",
        &include_dir,
    ])));
    assert!(at.join("hello.txt").exists() && at.join("sub/deeper/big.bin").exists());
    // The user edits one restored file and adds one to a restored directory.
    fs::write(at.join("sub/numbers.txt"), b"edited").unwrap();
    fs::write(at.join("sub/deeper/added-later.txt"), b"new").unwrap();

    ok(run(&mut admin(&server.url, &["device", "wipe", "phone"])));
    let out = run(&mut phone.cmd(&["status", "--json"]));
    assert_eq!(out.status.code(), Some(1));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "device_wiped");
    let wipe = &status["logged_out"]["wipe"];

    assert_eq!(fs::read(parent.join("mystuff/precious.txt")).unwrap(), b"mine");
    assert_eq!(fs::read(at.join("notes-of-mine.txt")).unwrap(), b"also mine");
    assert!(!at.join("hello.txt").exists(), "restored file removed");
    assert!(!at.join("sub/deeper/big.bin").exists(), "restored file removed");
    assert!(!at.join("sub/empty-file").exists() && !at.join("sub/dangling").exists());
    assert_eq!(fs::read(at.join("sub/numbers.txt")).unwrap(), b"edited", "changed since: left");
    assert_eq!(fs::read(at.join("sub/deeper/added-later.txt")).unwrap(), b"new");
    let left: Vec<&str> = wipe["left"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert!(left.iter().any(|p| p.ends_with("sub/numbers.txt")), "{wipe}");
    assert!(left.iter().any(|p| p.ends_with("sub/deeper")), "{wipe}");
    assert!(!phone.state.exists());
}

#[test]
fn a_restore_of_more_chunks_than_one_request_carries() {
    let dir = tempfile::tempdir().unwrap();
    let (_root, _server, phone) = phone_on_a_server(dir.path());
    let data = dir.path().join("data");
    for d in 0..10 {
        fs::create_dir_all(data.join(format!("d{d}"))).unwrap();
        for f in 0..500 {
            fs::write(data.join(format!("d{d}/f{f}")), format!("file {d}/{f}\n")).unwrap();
        }
    }
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();
    let t = dir.path().join("T");
    let r = phone.restore(&id, &t);
    assert_eq!(r["files"], 5000, "{r}");
    assert_same_tree(&data, &restored(&t, &data));
}

/// One value of the server's `/metrics`.
fn metric(url: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Issue 16: a tenant idle for `tenant_idle_secs` is closed (index
/// dropped, writer stopped) and opened again by the next request, without
/// the device noticing: it backs up again, and both snapshots restore
/// exactly.
#[test]
fn an_idle_tenant_is_closed_and_opened_again_for_the_next_backup() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let config = dir.path().join("server.toml");
    fs::write(&config, "tenant_idle_secs = 1\n").unwrap();
    let server = Server::start(&root, &["--config", config.to_str().unwrap()]);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone");
    let first_data = dir.path().join("first");
    varied(&first_data);
    let first = phone.backup(&first_data)["id"].as_str().unwrap().to_owned();
    assert_eq!(metric(&server.url, "chunkvault_tenants_open"), 1.0);

    // Polled: the closing task looks every 250 ms for tenants idle 1 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(&server.url, "chunkvault_tenants_closed_total") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the idle tenant was not closed within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(metric(&server.url, "chunkvault_tenants_open"), 0.0);

    // Half the same data (deduplicated against the closed tenant's index,
    // loaded again), half new.
    let second_data = dir.path().join("second");
    varied(&second_data);
    fs::write(second_data.join("sub/deeper/big.bin"), pseudo_random(3 << 20, 12)).unwrap();
    let second = phone.backup(&second_data)["id"].as_str().unwrap().to_owned();
    for (id, data) in [(&first, &first_data), (&second, &second_data)] {
        let target = dir.path().join(format!("restored-{id}"));
        phone.restore(id, &target);
        assert_same_tree(data, &restored(&target, data));
    }
    assert!(metric(&server.url, "chunkvault_tenants_open") <= 1.0);
}

/// A chunk that is authentic (sealed with the tenant's key under its id)
/// but whose bytes do not hash to that id, as a faulty storage node could
/// have stored it: the node's chunk stream does not re-hash (the device
/// does), so it is the device's check that must refuse it. The file is not
/// written; the others are.
#[test]
fn a_chunk_that_does_not_hash_to_its_id_is_refused_by_the_device() {
    use chunkvault::pack::FRAME_HEADER_LEN;
    use chunkvault::tree::NodeKind;
    let dir = tempfile::tempdir().unwrap();
    let (root, _server, phone) = phone_on_a_server(dir.path());
    let data = dir.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("ok.txt"), b"fine\n").unwrap();
    let original = pseudo_random(100_000, 3);
    fs::write(data.join("forged.bin"), &original).unwrap();
    let id = phone.backup(&data)["id"].as_str().unwrap().to_owned();

    let backend = chunkvault::repo::open_backend(root.join("acme").to_str().unwrap(), false).unwrap();
    let repo = chunkvault::repo::Repository::open(backend, PASSWORD.as_bytes()).unwrap();
    let snap = repo.load_snapshot(&id.parse().unwrap()).unwrap();
    let rel = format!("{}/forged.bin", &data.to_str().unwrap()[1..]);
    let chunk = match repo.find_node(&snap.tree, &rel).unwrap().unwrap().kind {
        NodeKind::File { chunks } => chunks[0],
        _ => panic!("forged.bin is not a file"),
    };
    let loc = repo.index().get(&chunk).unwrap();
    let mut other = original.clone();
    other[0] ^= 1;
    let mut stored = Vec::new();
    repo.codec().seal_into(chunkvault::id::BlobKind::Data, &chunk, &other, &mut stored);
    assert_eq!(stored.len() as u32, loc.stored_len, "random bytes are stored raw, at the same length");
    let pack = walk_files(&root.join("acme/packs")).into_iter().find(|p| p.ends_with(loc.pack.to_hex())).unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let at = loc.offset as usize;
    bytes[at + 4..at + 8].copy_from_slice(&crc32fast::hash(&stored).to_le_bytes());
    bytes[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + stored.len()].copy_from_slice(&stored);
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&pack, bytes).unwrap();
    drop(repo);

    let t = dir.path().join("T");
    let out = run(&mut phone.cmd(&["restore", &id, "--target", t.to_str().unwrap()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // Caught by the device (the node passed the authentic bytes on).
    assert!(stderr.contains("from the server does not match its id"), "{stderr}");
    let at = restored(&t, &data);
    assert!(!at.join("forged.bin").exists(), "a chunk that is not its id is never written");
    assert_eq!(fs::read(at.join("ok.txt")).unwrap(), b"fine\n");
    assert_eq!(temporaries(&t), Vec::<PathBuf>::new());
}
