//! `chunkvault prune` run on a tenant repository by another process while
//! the server is up and devices back up: the storage node lets it in between
//! sessions, and no snapshot ever points at data it deleted.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::pseudo_random;
use common::server::*;

/// The CLI on the tenant repository `ROOT/acme`.
fn on_tenant(root: &Path, args: &[&str]) -> Command {
    let mut c = tenant_cli(root.join("acme").to_str().unwrap());
    c.args(args);
    c
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[test]
fn prune_of_a_tenant_repository_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = Server::start(&root, &[]);
    let token = deployment_token(&server.url, "acme");
    let phone = Dev::activate(dir.path(), &server.url, &token, "a@acme.com", "phone");
    let laptop = Dev::activate(dir.path(), &server.url, &token, "b@acme.com", "laptop");
    let (old, kept, late) = (dir.path().join("old"), dir.path().join("kept"), dir.path().join("late"));
    make_data(&old, 1);
    make_data(&kept, 2);
    make_data(&late, 3);
    std::fs::write(late.join("more.bin"), pseudo_random(500_000, 4)).unwrap();

    let forgotten = phone.backup(&old)["id"].as_str().unwrap().to_owned();
    let kept_id = laptop.backup(&kept)["id"].as_str().unwrap().to_owned();
    // The operator forgets the phone's snapshot (removing it is what
    // `forget` does) so that the prune has data to delete.
    std::fs::remove_file(root.join("acme/snapshots").join(&forgotten)).unwrap();

    // Prune from another process, waiting for the node's shared lock, while
    // the laptop backs up: whichever gets the repository first, both succeed.
    let prune = on_tenant(&root, &["prune", "--json", "--retry-lock", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let late_id = laptop.backup(&late)["id"].as_str().unwrap().to_owned();
    let report = json(prune.wait_with_output().unwrap());
    assert!(report["packs_unused"].as_u64().unwrap() + report["packs_repacked"].as_u64().unwrap() > 0, "{report}");

    // The phone backs up the pruned data again with its cached session: the
    // node's view from before the prune must not let it skip an upload.
    let again = phone.backup(&old);
    assert!(again["chunks_uploaded"].as_u64().unwrap() > 0, "{again}");
    let again_id = again["id"].as_str().unwrap().to_owned();

    for (dev, id, data) in [(&laptop, &kept_id, &kept), (&laptop, &late_id, &late), (&phone, &again_id, &old)] {
        let target = dir.path().join(format!("restore-{id}"));
        dev.restore(id, &target);
        assert_same_files(data, &common::restored(&target, data));
    }
    ok(on_tenant(&root, &["check", "--read-data"]).output().unwrap());
}
