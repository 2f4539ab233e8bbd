//! The registry's test suite, run against every backend: SQLite in a temp
//! dir, and PostgreSQL in a database of its own per test when
//! `CHUNKVAULT_TEST_POSTGRES` names a cluster (`scripts/postgres.sh start`;
//! without it those tests print why and pass, unless
//! `CHUNKVAULT_REQUIRE_POSTGRES=1`). Tests that take two registries get two
//! nodes of one PostgreSQL database, or one SQLite registry twice (SQLite
//! is one node's).

use std::sync::{Arc, Barrier};

use super::*;

pub(super) fn sqlite() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(&dir.path().join("registry.db")).unwrap();
    (dir, r)
}

pub(super) fn spec(tenant: &str, expires_at: DateTime<Utc>, max_activations: Option<u32>) -> DeploymentTokenSpec {
    DeploymentTokenSpec {
        tenant: tenant.into(),
        expires_at,
        max_activations,
        policies: Policies::default(),
        provisioned_only: false,
    }
}

pub(super) fn hour(now: DateTime<Utc>) -> DateTime<Utc> {
    now + chrono::Duration::hours(1)
}

/// Each test once per backend: `one` tests take a registry, `two` tests
/// two nodes of one registry.
macro_rules! on_every_backend {
    (one: [$($one:ident),* $(,)?], two: [$($two:ident),* $(,)?] $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $one() {
                let (_dir, r) = super::sqlite();
                super::$one(&r);
            })*
            $(#[test]
            fn $two() {
                let (_dir, r) = super::sqlite();
                super::$two(&r, &r);
            })*
        }

        #[cfg(feature = "postgres")]
        mod on_postgres {
            use super::super::postgres::testdb::TestDb;
            use super::*;

            fn node(db: &TestDb) -> Registry {
                Registry::connect(&RegistryLocation::Postgres(db.url.clone())).unwrap()
            }

            $(#[test]
            fn $one() {
                let Some(db) = TestDb::create() else { return };
                super::$one(&node(&db));
            })*
            $(#[test]
            fn $two() {
                let Some(db) = TestDb::create() else { return };
                let (a, b) = (node(&db), node(&db));
                super::$two(&a, &b);
            })*
        }
    };
}

on_every_backend!(
    one: [
        activation_then_session_then_states,
        a_reset_voids_the_old_token_and_lets_the_id_activate_once_more,
        provisioned_only_tokens_activate_only_listed_users,
        admin_tokens_are_stored_hashed_and_revoked_ones_refused,
        deployment_tokens_list_without_secrets_and_revoked_ones_activate_nothing,
        only_retired_or_wiped_devices_are_deleted_and_the_id_comes_back_in_a_new_generation,
        tenants_show_devices_usage_and_quotas_and_the_audit_log_filters,
        expired_and_unknown_deployment_tokens_are_refused,
        usage_reports_keep_the_last_figure_of_a_tenant_named_twice,
        reported_snapshots_list_per_device_and_a_completed_rescan_drops_those_not_seen_again,
        history_carries_stored_bytes_forward_and_counts_backups_per_day_forgotten_ones_included,
        a_node_with_changes_waiting_past_its_interval_is_behind_and_one_silent_for_two_is_stale,
    ],
    two: [
        nodes_of_one_registry_share_the_session_signing_secret,
        max_activations_holds_under_concurrent_activations_on_two_nodes,
        one_device_id_activated_on_two_nodes_at_once_is_taken_once,
        the_feed_cursor_misses_no_change_written_by_two_nodes_at_once,
    ],
);

fn activation_then_session_then_states(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", hour(now), Some(2)), now).unwrap();
    let a = r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    assert_eq!((a.tenant.as_str(), a.deployment_token_id.as_str()), ("acme", dt.id.as_str()));
    assert!(a.change.is_none());
    let device_token = a.device_token;
    let id = r.authenticate_device(&device_token, "a@acme.com", "phone", now).unwrap();
    assert_eq!(id.tenant, "acme");
    assert_eq!(id.policies, Policies::default());
    // Wrong email, wrong device, other kind of token: all unknown.
    assert!(matches!(
        r.authenticate_device(&device_token, "b@acme.com", "phone", now),
        Err(RegistryError::UnknownToken)
    ));
    assert!(matches!(
        r.authenticate_device(&device_token, "a@acme.com", "tablet", now),
        Err(RegistryError::UnknownToken)
    ));
    assert!(matches!(r.authenticate_device(&dt.text, "a@acme.com", "phone", now), Err(RegistryError::UnknownToken)));
    // An active device id cannot be activated again, by anyone.
    assert!(matches!(r.activate(&dt.text, "a@acme.com", "phone", now), Err(RegistryError::DeviceExists)));
    assert!(matches!(r.activate(&dt.text, "b@acme.com", "phone", now), Err(RegistryError::DeviceExists)));
    r.activate(&dt.text, "b@acme.com", "tablet", now).unwrap();
    assert!(matches!(r.activate(&dt.text, "c@acme.com", "laptop", now), Err(RegistryError::Exhausted)));
    // Another tenant's token cannot take the id either.
    let other = r.create_deployment_token(&spec("globex", hour(now), None), now).unwrap();
    assert!(matches!(r.activate(&other.text, "a@acme.com", "phone", now), Err(RegistryError::Conflict)));

    r.set_state("phone", DeviceState::Blocked).unwrap();
    assert!(matches!(
        r.authenticate_device(&device_token, "a@acme.com", "phone", now),
        Err(RegistryError::State(DeviceState::Blocked))
    ));
    r.set_state("phone", DeviceState::Wiped).unwrap();
    let (cursor, changes) = r.changes_since(0, 100).unwrap();
    assert_eq!(changes.iter().map(|c| c.state.as_str()).collect::<Vec<_>>(), ["blocked", "wiped"]);
    assert!(r.changes_since(cursor, 100).unwrap().1.is_empty());
    assert!(matches!(r.set_state("nope", DeviceState::Retired), Err(RegistryError::NoSuchDevice)));
    let devices = r.devices().unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices[0].last_seen.is_some());
    assert!(devices.iter().all(|d| d.deployment_token_id.as_deref() == Some(dt.id.as_str())));
}

fn a_reset_voids_the_old_token_and_lets_the_id_activate_once_more(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    let first = r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    let before = r.authenticate_device(&first.device_token, "a@acme.com", "phone", now).unwrap();
    assert!(matches!(r.reset("nope"), Err(RegistryError::NoSuchDevice)));
    let change = r.reset("phone").unwrap();
    assert_eq!((change.state.as_str(), change.generation), ("reset", Some(before.generation + 1)));
    assert!(matches!(
        r.authenticate_device(&first.device_token, "a@acme.com", "phone", now),
        Err(RegistryError::UnknownToken)
    ));
    // "allow" does not bring a reset device back without an activation.
    assert!(matches!(r.set_state("phone", DeviceState::Active), Err(RegistryError::State(DeviceState::Reset))));
    // The id activates again (here for another user), once.
    let strict = DeploymentTokenSpec {
        policies: Policies { allow_restore_to_other_device: false, allow_open_in: true },
        ..spec("acme", hour(now), None)
    };
    let dt2 = r.create_deployment_token(&strict, now).unwrap();
    let second = r.activate(&dt2.text, "b@acme.com", "phone", now).unwrap();
    let change = second.change.expect("storage nodes learn the reactivation");
    assert_eq!((change.state.as_str(), change.generation), ("active", Some(before.generation + 1)));
    assert!(matches!(r.activate(&dt.text, "a@acme.com", "phone", now), Err(RegistryError::DeviceExists)));
    let after = r.authenticate_device(&second.device_token, "b@acme.com", "phone", now).unwrap();
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(after.policies, strict.policies);
    let device = r.devices().unwrap().pop().unwrap();
    assert_eq!((device.email.as_str(), device.deployment_token_id), ("b@acme.com", Some(dt2.id)));
    // A retired device stays retired until reset.
    r.set_state("phone", DeviceState::Retired).unwrap();
    assert!(matches!(
        r.activate(&dt.text, "b@acme.com", "phone", now),
        Err(RegistryError::State(DeviceState::Retired))
    ));
    r.reset("phone").unwrap();
    r.activate(&dt.text, "b@acme.com", "phone", now).unwrap();
    let (_, changes) = r.changes_since(0, 100).unwrap();
    let feed: Vec<_> = changes.iter().map(|c| (c.state.as_str(), c.generation)).collect();
    let g = before.generation;
    assert_eq!(
        feed,
        [
            ("reset", Some(g + 1)),
            ("active", Some(g + 1)),
            ("retired", None),
            ("reset", Some(g + 2)),
            ("active", Some(g + 2))
        ]
    );
}

fn provisioned_only_tokens_activate_only_listed_users(r: &Registry) {
    let now = Utc::now();
    let listed = DeploymentTokenSpec { provisioned_only: true, ..spec("acme", hour(now), None) };
    let dt = r.create_deployment_token(&listed, now).unwrap();
    let open = r.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    let emails = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches!(r.activate(&dt.text, "a@acme.com", "d1", now), Err(RegistryError::UserNotProvisioned)));
    assert_eq!(r.add_users("acme", &emails(&["a@acme.com", "b@acme.com"]), now).unwrap().len(), 2);
    assert_eq!(r.add_users("acme", &emails(&["a@acme.com"]), now).unwrap(), Vec::<String>::new());
    // Listed in another tenant does not count.
    r.add_users("globex", &emails(&["c@acme.com"]), now).unwrap();
    r.activate(&dt.text, "a@acme.com", "d1", now).unwrap();
    assert!(matches!(r.activate(&dt.text, "c@acme.com", "d2", now), Err(RegistryError::UserNotProvisioned)));
    // Emails compare exactly, as the storage node's users do.
    assert!(matches!(r.activate(&dt.text, "B@acme.com", "d2", now), Err(RegistryError::UserNotProvisioned)));
    let users: Vec<_> = r.users("acme").unwrap().into_iter().map(|u| u.email).collect();
    assert_eq!(users, ["a@acme.com", "b@acme.com"]);
    assert_eq!(r.remove_users("acme", &emails(&["b@acme.com", "x@acme.com"])).unwrap(), ["b@acme.com"]);
    assert!(matches!(r.activate(&dt.text, "b@acme.com", "d2", now), Err(RegistryError::UserNotProvisioned)));
    // A token without the flag activates anyone, as before.
    r.activate(&open.text, "z@acme.com", "d3", now).unwrap();
}

fn admin_tokens_are_stored_hashed_and_revoked_ones_refused(r: &Registry) {
    let now = Utc::now();
    let (text, info) = r.create_admin_token(AdminRole::TenantAdmin, Some("acme"), Some("helpdesk"), now).unwrap();
    assert!(text.starts_with("cvad_"));
    let who = r.authenticate_admin(&text).unwrap();
    assert_eq!(
        (who.id.as_str(), who.role, who.tenant.as_deref()),
        (info.id.as_str(), AdminRole::TenantAdmin, Some("acme"))
    );
    // The secret is nowhere in the registry, only its hash.
    let stored = r.admin_token_hash(&info.id);
    assert_eq!(stored, token::secret_hash(SecretKind::Admin, &text).unwrap());
    assert_eq!(r.admin_tokens().unwrap(), vec![info.clone()]);
    // Forged, malformed and other kinds of tokens are unknown.
    let forged = token::new_secret(SecretKind::Admin).text;
    let device_kind = token::new_secret(SecretKind::Device).text;
    for bad in [forged.as_str(), device_kind.as_str(), "cvad_", "garbage", &text[..text.len() - 1]] {
        assert!(matches!(r.authenticate_admin(bad), Err(RegistryError::UnknownToken)), "{bad}");
    }
    r.revoke_admin_token(&info.id, now).unwrap();
    assert!(matches!(r.authenticate_admin(&text), Err(RegistryError::Revoked)));
    assert!(r.admin_token(&info.id).unwrap().revoked_at.is_some());
    assert!(matches!(r.revoke_admin_token("nope", now), Err(RegistryError::NoSuchToken)));
}

fn deployment_tokens_list_without_secrets_and_revoked_ones_activate_nothing(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", hour(now), Some(5)), now).unwrap();
    r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    let listed = r.deployment_tokens().unwrap();
    assert_eq!(listed.len(), 1);
    let t = &listed[0];
    assert_eq!((t.token_id.as_str(), t.activations, t.max_activations, t.revoked), (dt.id.as_str(), 1, Some(5), false));
    assert!(!serde_json::to_string(&listed).unwrap().contains(&dt.text[5..]));
    r.revoke_deployment_token(&dt.id, now).unwrap();
    assert!(r.deployment_token(&dt.id).unwrap().revoked);
    assert!(matches!(r.activate(&dt.text, "b@acme.com", "tablet", now), Err(RegistryError::Revoked)));
    // The device it activated keeps working.
    assert_eq!(r.devices().unwrap()[0].state, "active");
    assert!(matches!(r.revoke_deployment_token("nope", now), Err(RegistryError::NoSuchToken)));
}

fn only_retired_or_wiped_devices_are_deleted_and_the_id_comes_back_in_a_new_generation(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    let first = r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    let g = r.authenticate_device(&first.device_token, "a@acme.com", "phone", now).unwrap().generation;
    assert!(matches!(r.delete_device("phone"), Err(RegistryError::NotRetired(DeviceState::Active))));
    r.set_state("phone", DeviceState::Blocked).unwrap();
    assert!(matches!(r.delete_device("phone"), Err(RegistryError::NotRetired(DeviceState::Blocked))));
    r.set_state("phone", DeviceState::Retired).unwrap();
    let change = r.delete_device("phone").unwrap();
    assert_eq!((change.state.as_str(), change.generation), ("reset", Some(g + 1)));
    assert!(r.devices().unwrap().is_empty());
    assert!(matches!(r.device("phone"), Err(RegistryError::NoSuchDevice)));
    assert!(matches!(r.delete_device("phone"), Err(RegistryError::NoSuchDevice)));
    let again = r.activate(&dt.text, "b@acme.com", "phone", now).unwrap();
    let id = r.authenticate_device(&again.device_token, "b@acme.com", "phone", now).unwrap();
    assert_eq!(id.generation, g + 1, "sessions of the deleted device stay void");
}

fn tenants_show_devices_usage_and_quotas_and_the_audit_log_filters(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    r.create_deployment_token(&spec("globex", hour(now), None), now).unwrap();
    r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    r.set_quota("acme", 1000).unwrap();
    r.set_quota("initech", 0).unwrap();
    r.record_usage(&[TenantUsage { tenant: "acme".into(), stored_bytes: 600, snapshots: 2 }], now).unwrap();
    let t = r.tenants().unwrap();
    let names: Vec<_> = t.iter().map(|t| t.tenant.as_str()).collect();
    assert_eq!(names, ["acme", "globex", "initech"]);
    assert_eq!((t[0].devices, t[0].snapshots, t[0].stored_bytes, t[0].quota_bytes), (1, Some(2), Some(600), 1000));
    assert_eq!((t[1].devices, t[1].stored_bytes, t[1].quota_bytes), (0, None, 0));
    // A usage report keeps the quota; a quota change keeps the usage.
    r.set_quota("acme", 2000).unwrap();
    assert_eq!(r.tenants().unwrap()[0].stored_bytes, Some(600));
    assert_eq!(r.quotas().unwrap(), vec![TenantQuota { tenant: "acme".into(), quota_bytes: 2000 }]);

    let entry = |tenant: Option<&str>, at: DateTime<Utc>| AuditEntry {
        at,
        actor: "bootstrap".into(),
        action: "retire".into(),
        target: "x".into(),
        tenant: tenant.map(Into::into),
        detail: String::new(),
    };
    let earlier = now - chrono::Duration::hours(2);
    r.record_audit(&entry(Some("globex"), earlier)).unwrap();
    r.record_audit(&entry(None, now)).unwrap();
    let all = r.audit_log(None, None, 100).unwrap();
    // Newest first: the two above, then the activation (by the device).
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].tenant, None);
    assert_eq!(
        (all[2].actor.as_str(), all[2].action.as_str(), all[2].target.as_str()),
        ("device", "activate", "phone")
    );
    assert_eq!(r.audit_log(Some("globex"), None, 100).unwrap().len(), 1);
    assert_eq!(r.audit_log(None, Some(now - chrono::Duration::hours(1)), 100).unwrap().len(), 2);
    assert_eq!(r.audit_log(None, None, 1).unwrap().len(), 1);
}

fn expired_and_unknown_deployment_tokens_are_refused(r: &Registry) {
    let now = Utc::now();
    let dt = r.create_deployment_token(&spec("acme", now, None), now).unwrap();
    assert!(matches!(r.activate(&dt.text, "a@b.c", "d", now), Err(RegistryError::Expired)));
    let fresh = token::new_secret(SecretKind::Deployment).text;
    assert!(matches!(r.activate(&fresh, "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
    assert!(matches!(r.activate("garbage", "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
}

fn usage_reports_keep_the_last_figure_of_a_tenant_named_twice(r: &Registry) {
    let now = Utc::now();
    let u = |tenant: &str, stored_bytes| TenantUsage { tenant: tenant.into(), stored_bytes, snapshots: 1 };
    r.record_usage(&[u("b", 1), u("a", 2), u("b", 3)], now).unwrap();
    let t = r.tenants().unwrap();
    assert_eq!(
        t.iter().map(|t| (t.tenant.as_str(), t.stored_bytes)).collect::<Vec<_>>(),
        [("a", Some(2)), ("b", Some(3))]
    );
}

fn record(n: u8, device: &str, time: DateTime<Utc>, bytes: u64) -> SnapshotRecord {
    SnapshotRecord {
        id: crate::id::SnapshotId([n; 32]),
        time,
        device: Some(device.into()),
        user: Some("a@acme.com".into()),
        files: u64::from(n),
        bytes,
    }
}

fn report(rescan: bool, complete: bool, added: Vec<SnapshotRecord>, removed: Vec<u8>) -> TenantSnapshots {
    TenantSnapshots {
        tenant: "acme".into(),
        rescan,
        complete,
        added,
        removed: removed.into_iter().map(|n| crate::id::SnapshotId([n; 32])).collect(),
    }
}

fn snapshot_ids(r: &Registry, device: &str) -> Vec<u8> {
    r.device_snapshots("acme", device).unwrap().iter().map(|s| s.id.0[0]).collect()
}

fn reported_snapshots_list_per_device_and_a_completed_rescan_drops_those_not_seen_again(r: &Registry) {
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    r.record_snapshots(
        &[report(
            true,
            false,
            vec![record(1, "phone", now - hour * 3, 100), record(2, "phone", now - hour, 50)],
            vec![],
        )],
        now,
    )
    .unwrap();
    r.record_snapshots(&[report(false, true, vec![record(3, "tablet", now, 10)], vec![])], now).unwrap();
    assert_eq!(snapshot_ids(r, "phone"), [2, 1], "newest first");
    let backups = r.device_backups().unwrap();
    assert_eq!(
        backups[&("acme".to_string(), "phone".to_string())],
        (2, fleet::unix_ms((now - hour).timestamp_millis()))
    );
    assert_eq!(r.logical_bytes().unwrap()["acme"], 160);
    // A delta removes one; a record sent twice stays one.
    r.record_snapshots(&[report(false, false, vec![record(2, "phone", now - hour, 50)], vec![1])], now).unwrap();
    assert_eq!(snapshot_ids(r, "phone"), [2]);
    // A rescan (a node restarted) that finds only snapshot 3: 2 is gone
    // once the rescan completes, not before.
    r.record_snapshots(&[report(true, false, vec![], vec![])], now).unwrap();
    assert_eq!(snapshot_ids(r, "phone"), [2], "in doubt, still listed");
    r.record_snapshots(&[report(false, true, vec![record(3, "tablet", now, 10)], vec![])], now).unwrap();
    assert!(snapshot_ids(r, "phone").is_empty());
    assert_eq!(snapshot_ids(r, "tablet"), [3]);
    assert_eq!(r.logical_bytes().unwrap()["acme"], 10);
    // Other tenants are untouched by acme's reports.
    assert!(r.device_snapshots("globex", "tablet").unwrap().is_empty());
}

fn history_carries_stored_bytes_forward_and_counts_backups_per_day_forgotten_ones_included(r: &Registry) {
    let now = Utc::now();
    let day = chrono::Duration::days(1);
    let usage = |bytes| [TenantUsage { tenant: "acme".into(), stored_bytes: bytes, snapshots: 0 }];
    r.record_usage(&usage(1000), now - day * 40).unwrap();
    r.record_usage(&usage(5000), now - day * 3).unwrap();
    r.record_usage(&usage(7000), now - day * 3).unwrap();
    r.record_usage(&usage(9000), now).unwrap();
    let added =
        vec![record(1, "phone", now - day * 3, 1), record(2, "phone", now - day * 3, 1), record(3, "phone", now, 1)];
    r.record_snapshots(&[report(false, false, added, vec![])], now).unwrap();
    r.record_snapshots(&[report(false, false, vec![], vec![2])], now).unwrap();
    let h = r.tenant_history("acme", 30, now).unwrap();
    assert_eq!(h.len(), 30);
    assert_eq!(h[29].day, now.date_naive());
    assert_eq!(h[0].stored_bytes, Some(1000), "carried from before the window");
    assert_eq!((h[26].stored_bytes, h[26].backups), (Some(7000), 2), "the day's last report");
    assert_eq!((h[27].stored_bytes, h[28].stored_bytes), (Some(7000), Some(7000)));
    assert_eq!((h[29].stored_bytes, h[29].backups), (Some(9000), 1));
    assert_eq!(h.iter().map(|d| d.backups).sum::<u64>(), 3);
    assert!(r.tenant_history("globex", 7, now).unwrap().iter().all(|d| d.stored_bytes.is_none() && d.backups == 0));
}

fn a_node_with_changes_waiting_past_its_interval_is_behind_and_one_silent_for_two_is_stale(r: &Registry) {
    let now = Utc::now();
    let node = |name: &str| NodeReport {
        name: name.into(),
        auth_unreachable: "fail_open".into(),
        checkin_interval_secs: 30,
        version: "0.1.0".into(),
    };
    let dt = r.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
    let latest = r.latest_change().unwrap();
    r.record_node(&node("current"), latest, now - chrono::Duration::seconds(50)).unwrap();
    r.record_node(&node("silent"), latest, now - chrono::Duration::seconds(61)).unwrap();
    r.set_state("phone", DeviceState::Retired).unwrap();
    r.record_node(&node("fresh"), latest, now - chrono::Duration::seconds(5)).unwrap();
    let nodes = r.storage_nodes(now).unwrap();
    let by = |n: &str| nodes.iter().find(|x| x.name == n).unwrap().clone();
    assert_eq!((by("fresh").pending_changes, by("fresh").behind, by("fresh").stale), (1, false, false));
    assert_eq!((by("current").behind, by("current").stale), (true, false));
    assert_eq!((by("silent").behind, by("silent").stale), (true, true));
    assert_eq!(r.latest_change().unwrap(), latest + 1);
    // Nodes gone for a month leave the list.
    r.record_node(&node("fresh"), latest + 1, now + chrono::Duration::days(31)).unwrap();
    assert_eq!(r.storage_nodes(now).unwrap().len(), 1);
}

fn nodes_of_one_registry_share_the_session_signing_secret(a: &Registry, b: &Registry) {
    let (sa, sb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.signing_secret().unwrap());
        let tb = s.spawn(|| b.signing_secret().unwrap());
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(sa, sb);
    assert_eq!(a.signing_secret().unwrap(), sa, "made once, then kept");
}

/// Runs `per_thread` calls of `f(node, thread, i)` on each of `threads`
/// threads, which start together and take turns between the two nodes.
fn at_once<T: Send>(
    a: &Registry,
    b: &Registry,
    threads: usize,
    per_thread: usize,
    f: impl Fn(&Registry, usize, usize) -> T + Sync,
) -> Vec<T> {
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (f, start) = (&f, &start);
                s.spawn(move || {
                    start.wait();
                    (0..per_thread).map(|i| f(if (t + i) % 2 == 0 { a } else { b }, t, i)).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

fn max_activations_holds_under_concurrent_activations_on_two_nodes(a: &Registry, b: &Registry) {
    let now = Utc::now();
    let max = 25;
    let dt = a.create_deployment_token(&spec("acme", hour(now), Some(max)), now).unwrap();
    let results = at_once(a, b, 8, 20, |r, t, i| r.activate(&dt.text, "u@acme.com", &format!("d-{t}-{i}"), now));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, max as usize, "160 activations of a token good for {max}");
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(RegistryError::Exhausted))));
    assert_eq!(b.deployment_token(&dt.id).unwrap().activations, max);
    assert_eq!(a.devices().unwrap().len(), max as usize);
    let audited = b.audit_log(Some("acme"), None, 1000).unwrap();
    assert_eq!(audited.iter().filter(|e| e.action == "activate").count(), max as usize);
}

fn one_device_id_activated_on_two_nodes_at_once_is_taken_once(a: &Registry, b: &Registry) {
    let now = Utc::now();
    let tokens: Vec<_> =
        (0..8).map(|_| a.create_deployment_token(&spec("acme", hour(now), None), now).unwrap()).collect();
    let results = at_once(a, b, 8, 1, |r, t, _| r.activate(&tokens[t].text, "u@acme.com", "phone", now));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(RegistryError::DeviceExists))));
    let counted: u32 = b.deployment_tokens().unwrap().iter().map(|t| t.activations).sum();
    assert_eq!(counted, 1, "the refused activations count nothing");
    // Another tenant's token racing for an id: refused as a conflict.
    let other = a.create_deployment_token(&spec("globex", hour(now), None), now).unwrap();
    assert!(matches!(b.activate(&other.text, "u@globex.com", "phone", now), Err(RegistryError::Conflict)));
}

fn the_feed_cursor_misses_no_change_written_by_two_nodes_at_once(a: &Registry, b: &Registry) {
    let now = Utc::now();
    let dt = a.create_deployment_token(&spec("acme", hour(now), None), now).unwrap();
    for d in 0..8 {
        a.activate(&dt.text, "u@acme.com", &format!("d{d}"), now).unwrap();
    }
    let (writers, per_writer) = (6, 20);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::thread::scope(|s| {
        // A storage node's check-in loop, polling with its cursor while the
        // two nodes write.
        let reader = {
            let done = done.clone();
            s.spawn(move || {
                let (mut cursor, mut seen) = (0, Vec::new());
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    let (next, changes) = b.changes_since(cursor, 7).unwrap();
                    cursor = next;
                    let empty = changes.is_empty();
                    seen.extend(changes);
                    if finished && empty {
                        return seen;
                    }
                }
            })
        };
        at_once(a, b, writers, per_writer, |r, t, i| {
            let state = if i % 2 == 0 { DeviceState::Blocked } else { DeviceState::Active };
            r.set_state(&format!("d{}", (t + i) % 8), state).unwrap()
        });
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert_eq!(seen.len(), writers * per_writer, "every change reached the reader");
    assert_eq!(a.changes_since(0, u32::MAX).unwrap().1, seen, "in the feed's order");
}

#[test]
fn urls_are_told_apart_from_paths_and_shown_without_passwords() {
    let pg = RegistryLocation::parse("postgres://cv:s3cret@db.example:5432/registry?sslmode=disable&password=two");
    assert!(matches!(pg, RegistryLocation::Postgres(_)));
    let shown = format!("{pg} {pg:?}");
    assert!(!shown.contains("s3cret") && !shown.contains("two"), "{shown}");
    assert!(shown.contains("postgres://cv:***@db.example:5432/registry?sslmode=disable&password=***"), "{shown}");
    assert!(matches!(RegistryLocation::parse("postgresql:///r?host=/run/pg"), RegistryLocation::Postgres(_)));
    assert_eq!(RegistryLocation::parse("/srv/registry.db"), RegistryLocation::Sqlite("/srv/registry.db".into()));
    assert_eq!(RegistryLocation::parse("postgres.db"), RegistryLocation::Sqlite("postgres.db".into()));
}

#[cfg(feature = "postgres")]
#[test]
fn an_unreachable_postgres_registry_is_unavailable_not_an_internal_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgresql://cv@/registry?host={}&port=1&connect_timeout=2", dir.path().display());
    match Registry::connect(&RegistryLocation::parse(&url)) {
        Err(RegistryError::Unavailable(e)) => assert!(!e.is_empty()),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}
