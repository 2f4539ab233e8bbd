//! Two storage nodes on one root behind one auth role: a node sees what the
//! other stored once a new session starts (`Repository::refresh_index` per
//! new session), or when a session reads a snapshot committed since. The
//! S3 version of this is tests/s3_nodes.rs.

mod common;

use common::server::*;

#[test]
fn a_new_session_on_one_node_sees_what_the_other_node_stored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let auth = Server::start(&dir.path().join("auth-root"), &["--role", "auth"]);
    let storage = ["--role", "storage", "--upstream", &auth.url];
    let (a, b) = (Server::start(&root, &storage), Server::start(&root, &storage));
    let token = deployment_token(&auth.url, "acme");
    let on_a = Dev::activate(dir.path(), &a.url, &token, "u@acme.com", "on-a");
    let on_b = Dev::activate(dir.path(), &b.url, &token, "u@acme.com", "on-b");
    // Both nodes open the tenant (its index is loaded now, empty) before
    // anything is stored; node A creates it.
    on_a.json(&["snapshots"]);
    on_b.json(&["snapshots"]);

    let data = dir.path().join("data");
    make_data(&data, 1);
    let id = on_a.backup(&data)["id"].as_str().unwrap().to_owned();
    // A later session on node B: it restores A's snapshot (its index must
    // name A's packs), and backing up the same data there uploads nothing.
    let fresh = Dev::activate(dir.path(), &b.url, &token, "u@acme.com", "on-b-2");
    let target = dir.path().join("restore");
    fresh.restore(&id, &target);
    assert_same_files(&data, &common::restored(&target, &data));
    assert_eq!(fresh.backup(&data)["chunks_uploaded"], 0);

    // A session that started before A's next commit restores it too.
    make_data(&data, 2);
    let later = on_a.backup(&data)["id"].as_str().unwrap().to_owned();
    let target = dir.path().join("restore-later");
    on_b.restore(&later, &target);
    assert_same_files(&data, &common::restored(&target, &data));
}
