//! Two storage nodes (`chunkvault serve --role storage`) on one S3 bucket
//! behind one auth role, taking concurrent backups from real device
//! clients; every snapshot restores from either node.
//!
//! Needs the Garage cluster of `scripts/garage-cluster.sh start` and
//! `CHUNKVAULT_TEST_S3=1`, as tests/s3.rs (`.ci/run` runs both).

mod common;

use std::path::PathBuf;
use std::process::Child;

use common::server::*;
use common::{pseudo_random, s3_location};

const TENANTS: [&str; 2] = ["acme", "globex"];

/// Eight devices of two tenants, four on each node, back up at once (every
/// device of a tenant also has a file the others have, so the nodes race
/// to store the same chunks); each snapshot restores exactly through a
/// device of the same user on the other node too, and `check --read-data`
/// passes on each tenant repository.
#[test]
#[ignore = "needs a Garage cluster: scripts/garage-cluster.sh start (run by .ci/run)"]
fn eight_devices_through_two_storage_nodes_on_one_bucket() {
    let root = s3_location().expect("needs a Garage cluster: scripts/garage-cluster.sh start, CHUNKVAULT_TEST_S3=1");
    let dir = tempfile::tempdir().unwrap();
    let auth = Server::start(&dir.path().join("auth-root"), &["--role", "auth"]);
    let nodes: Vec<Server> = (0..2)
        .map(|n| {
            let cache = dir.path().join(format!("node-{n}-cache"));
            let args = ["--role", "storage", "--upstream", &auth.url];
            Server::start_with(&root, "127.0.0.1:0", &args, &[("CHUNKVAULT_CACHE_DIR", &cache)])
        })
        .collect();
    let tokens: Vec<String> = TENANTS.iter().map(|t| deployment_token(&auth.url, t)).collect();
    // Device i: tenant i % 2, its own user, on node i / 4.
    let user = |i: usize| format!("user{i}@{}.com", TENANTS[i % 2]);
    let devices: Vec<(Dev, PathBuf)> = (0..8)
        .map(|i| {
            let dev = Dev::activate(dir.path(), &nodes[i / 4].url, &tokens[i % 2], &user(i), &format!("dev{i}"));
            let data = dir.path().join(format!("data{i}"));
            make_data(&data, i as u64);
            std::fs::write(data.join("shared.bin"), pseudo_random(400_000, 50 + (i % 2) as u64)).unwrap();
            (dev, data)
        })
        .collect();
    // A tenant repository is created on its first use: make that happen on
    // one node before both use it (two nodes creating the same tenant at
    // once is not supported).
    for dev in [&devices[0].0, &devices[1].0] {
        dev.json(&["snapshots"]);
    }

    let running: Vec<Child> = devices.iter().map(|(dev, data)| dev.spawn_backup(data)).collect();
    let ids: Vec<String> = running
        .into_iter()
        .map(|child| {
            let v: serde_json::Value = serde_json::from_str(&ok(child.wait_with_output().unwrap())).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();

    for (i, ((dev, data), id)) in devices.iter().zip(&ids).enumerate() {
        let twin = Dev::activate(dir.path(), &nodes[1 - i / 4].url, &tokens[i % 2], &user(i), &format!("twin{i}"));
        for (who, name) in [(dev, "own"), (&twin, "twin")] {
            let target = dir.path().join(format!("restore-{i}-{name}"));
            who.restore(id, &target);
            assert_same_files(data, &common::restored(&target, data));
        }
    }
    for tenant in TENANTS {
        let mut check = tenant_cli(&format!("{root}/{tenant}"));
        check.env("CHUNKVAULT_CACHE_DIR", dir.path().join("cli-cache")).args(["check", "--read-data"]);
        ok(check.output().unwrap());
    }
}
