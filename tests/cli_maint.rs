//! The maintenance commands of the real binary: forget, prune, check
//! subsets, repair, stats, diff, unlock.

mod common;

use std::fs;

use common::{pseudo_random, Env};

fn snapshot_ids(env: &Env) -> Vec<String> {
    env.json(&["snapshots"]).as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn forget_dry_run_then_forget_with_prune() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    for i in 0..4 {
        fs::write(src.join("data"), pseudo_random(400_000, i)).unwrap();
        env.backup(&src);
    }
    let before = snapshot_ids(&env);
    let no_policy = env.run(&["forget"]);
    assert_eq!(no_policy.status.code(), Some(2), "forget without a policy is a usage error");

    let dry = env.json(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["removed"], 3);
    assert_eq!(snapshot_ids(&env), before, "a dry run removes nothing");
    assert_eq!(dry["groups"][0]["keep"][0]["id"], before[3].as_str());
    assert_eq!(dry["groups"][0]["keep"][0]["reasons"][0], "last");

    let size = env.repo_size();
    let done = env.json(&["forget", "--keep-last", "1", "--prune"]);
    assert_eq!(done["removed"], 3);
    assert!(done["prune"]["packs_unused"].as_u64().unwrap() + done["prune"]["packs_repacked"].as_u64().unwrap() > 0);
    assert_eq!(snapshot_ids(&env), vec![before[3].clone()]);
    assert!(env.repo_size() < size);
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    let target = env.path("restore");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(fs::read(common::restored(&target, &src).join("data")).unwrap(), pseudo_random(400_000, 3));
}

#[test]
fn prune_dry_run_json_and_check_subsets_cover_every_pack() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), pseudo_random(3 << 20, 1)).unwrap();
    env.backup(&src);
    let dry = env.json(&["prune", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["snapshots"], 1);
    let full = env.json(&["check", "--read-data"]);
    let mut read = 0;
    for n in 1..=3 {
        let part = env.json(&["check", "--read-data-subset", &format!("{n}/3")]);
        read += part["packs_read"].as_u64().unwrap();
    }
    assert_eq!(read, full["packs_read"].as_u64().unwrap());
    assert_eq!(env.run(&["check", "--read-data-subset", "4/3"]).status.code(), Some(2));
}

#[test]
fn a_missing_pack_is_damage_for_check_and_prune_and_repair_recovers() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    env.backup(&src);
    let before = all_packs(&env);
    fs::write(src.join("big"), pseudo_random(2 << 20, 9)).unwrap();
    env.backup(&src);
    // The largest pack the second backup wrote holds data of `big` only.
    let biggest = all_packs(&env)
        .into_iter()
        .filter(|p| !before.contains(p))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    fs::remove_file(biggest).unwrap();
    let check = env.run(&["check"]);
    assert_eq!(check.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&check.stderr).contains("/src/big"));
    assert_eq!(env.run(&["prune"]).status.code(), Some(3), "prune refuses over missing data");
    let repaired = env.json(&["repair", "snapshots", "--forget"]);
    assert_eq!(repaired["snapshots"].as_array().unwrap().len(), 1);
    // Prune drops the lost pack's entries from the index.
    env.ok(&["prune"]);
    let check = env.json(&["check"]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    env.ok(&["repair", "index"]);
    env.ok(&["check"]);
    let target = env.path("restore");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let out = common::restored(&target, &src);
    assert_eq!(fs::read(out.join("small")).unwrap(), b"small");
    assert!(!out.join("big").exists());
}

fn all_packs(env: &Env) -> Vec<std::path::PathBuf> {
    fs::read_dir(env.repo.join("packs"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect()
}

#[test]
fn stats_diff_and_unlock() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), pseudo_random(100_000, 1)).unwrap();
    let one = env.backup(&src)["snapshot"].as_str().unwrap().to_string();
    fs::write(src.join("b"), b"new").unwrap();
    let two = env.backup(&src)["snapshot"].as_str().unwrap().to_string();
    let stats = env.json(&["stats"]);
    assert_eq!(stats["snapshots"], 2);
    assert_eq!(stats["logical_bytes"], 2 * 100_000 + 3);
    assert!(stats["dedup_ratio"].as_f64().unwrap() > 1.9);
    let d = env.json(&["diff", &one, &two]);
    let changes = d["changes"].as_array().unwrap();
    let added: Vec<&str> =
        changes.iter().filter(|c| c["change"] == "added").map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(added, vec![format!("{}/b", src.display())]);
    assert_eq!(env.json(&["unlock"])["removed"], 0);
}
