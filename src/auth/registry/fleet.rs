//! What the console lists and charts beyond devices and tokens (migration
//! 4): the snapshots storage nodes report (who took each, when, how big;
//! never paths or contents), each tenant's stored bytes per day, and the
//! storage nodes' check-ins.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::{unix, Registry, RegistryError};
use crate::api::{NodeReport, SnapshotRecord, StorageNodeInfo, TenantDay, TenantSnapshots, TenantUsage};

const DAY: i64 = 86_400;
/// Removed snapshots stay this long: the backups-per-day chart counts them.
const KEEP_REMOVED_SECS: i64 = 60 * DAY;
/// Days of stored bytes kept per tenant.
const KEEP_DAYS: i64 = 400;
/// A node that has not checked in for this long leaves the list.
const FORGET_NODE_SECS: i64 = 30 * DAY;
/// Most snapshots one device listing returns, newest first.
pub const MAX_DEVICE_SNAPSHOTS: u32 = 10_000;
/// Most days one history covers.
pub const MAX_HISTORY_DAYS: u32 = 366;

/// Per (tenant, device id): its snapshots that exist, and when the newest was taken.
pub type DeviceBackups = HashMap<(String, String), (u64, DateTime<Utc>)>;

/// A count as SQLite's signed 64-bit integer.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records the day's stored bytes of a usage report (inside its transaction).
pub(super) fn record_day(
    tx: &rusqlite::Transaction<'_>,
    usage: &TenantUsage,
    now: DateTime<Utc>,
) -> Result<(), RegistryError> {
    let day = now.timestamp().div_euclid(DAY);
    tx.execute(
        "INSERT INTO usage_days (tenant, day, stored_bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, day) DO UPDATE SET stored_bytes = ?3",
        params![usage.tenant, day, int(usage.stored_bytes)],
    )?;
    tx.execute("DELETE FROM usage_days WHERE tenant = ?1 AND day < ?2", params![usage.tenant, day - KEEP_DAYS])?;
    Ok(())
}

impl Registry {
    /// Records storage nodes' snapshot reports. A rescan marks the
    /// tenant's recorded snapshots stale; each snapshot reported again is
    /// fresh; when the rescan is complete, those still stale are gone.
    pub fn record_snapshots(&self, reports: &[TenantSnapshots], now: DateTime<Utc>) -> Result<(), RegistryError> {
        if reports.is_empty() {
            return Ok(());
        }
        let now = now.timestamp();
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        for r in reports {
            if r.rescan {
                tx.execute(
                    "UPDATE snapshots SET stale = 1 WHERE tenant = ?1 AND removed_at IS NULL",
                    params![r.tenant],
                )?;
            }
            for s in &r.added {
                tx.execute(
                    "INSERT INTO snapshots (tenant, snapshot_id, device_id, user, time, files, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant, snapshot_id) DO UPDATE SET removed_at = NULL, stale = 0",
                    params![r.tenant, s.id.to_hex(), s.device, s.user, s.time.timestamp(), int(s.files), int(s.bytes)],
                )?;
            }
            for id in &r.removed {
                tx.execute(
                    "UPDATE snapshots SET removed_at = ?3, stale = 0
                     WHERE tenant = ?1 AND snapshot_id = ?2 AND removed_at IS NULL",
                    params![r.tenant, id.to_hex(), now],
                )?;
            }
            if r.complete {
                tx.execute(
                    "UPDATE snapshots SET removed_at = ?2, stale = 0 WHERE tenant = ?1 AND stale = 1",
                    params![r.tenant, now],
                )?;
            }
        }
        tx.execute("DELETE FROM snapshots WHERE removed_at < ?1", params![now - KEEP_REMOVED_SECS])?;
        tx.commit()?;
        Ok(())
    }

    /// A device's snapshots that still exist, newest first.
    pub fn device_snapshots(&self, tenant: &str, device_id: &str) -> Result<Vec<SnapshotRecord>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT snapshot_id, time, device_id, user, files, bytes FROM snapshots
             WHERE tenant = ?1 AND device_id = ?2 AND removed_at IS NULL ORDER BY time DESC, rowid DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![tenant, device_id, MAX_DEVICE_SNAPSHOTS], |r| {
            let id: String = r.get(0)?;
            Ok(SnapshotRecord {
                id: id.parse().map_err(|e: crate::id::IdError| {
                    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
                })?,
                time: unix(r.get(1)?),
                device: r.get(2)?,
                user: r.get(3)?,
                files: r.get::<_, i64>(4)?.max(0) as u64,
                bytes: r.get::<_, i64>(5)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per tenant and device id: how many of its snapshots exist, and when
    /// the newest was taken.
    pub fn device_backups(&self) -> Result<DeviceBackups, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT tenant, device_id, COUNT(*), MAX(time) FROM snapshots
             WHERE removed_at IS NULL AND device_id IS NOT NULL GROUP BY tenant, device_id",
        )?;
        let rows =
            stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get::<_, i64>(2)? as u64, unix(r.get(3)?)))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per tenant: bytes of file content of its snapshots that exist, added up.
    pub fn logical_bytes(&self) -> Result<HashMap<String, u64>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt =
            conn.prepare("SELECT tenant, SUM(bytes) FROM snapshots WHERE removed_at IS NULL GROUP BY tenant")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last `days` days of a tenant, oldest first, ending today (UTC):
    /// stored bytes as last reported on or before each day, and the
    /// snapshots taken each day.
    pub fn tenant_history(&self, tenant: &str, days: u32, now: DateTime<Utc>) -> Result<Vec<TenantDay>, RegistryError> {
        let days = i64::from(days.clamp(1, MAX_HISTORY_DAYS));
        let today = now.timestamp().div_euclid(DAY);
        let first = today - days + 1;
        let conn = self.conn.lock().expect("registry lock");
        let mut stored: Option<i64> = conn
            .query_row(
                "SELECT stored_bytes FROM usage_days WHERE tenant = ?1 AND day < ?2 ORDER BY day DESC LIMIT 1",
                params![tenant, first],
                |r| r.get(0),
            )
            .optional()?;
        let mut stmt =
            conn.prepare("SELECT day, stored_bytes FROM usage_days WHERE tenant = ?1 AND day BETWEEN ?2 AND ?3")?;
        let reported: HashMap<i64, i64> =
            stmt.query_map(params![tenant, first, today], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT time / 86400, COUNT(*) FROM snapshots WHERE tenant = ?1 AND time >= ?2 AND time < ?3
             GROUP BY time / 86400",
        )?;
        let backups: HashMap<i64, i64> = stmt
            .query_map(params![tenant, first * DAY, (today + 1) * DAY], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(days as usize);
        for day in first..=today {
            if let Some(&b) = reported.get(&day) {
                stored = Some(b);
            }
            out.push(TenantDay {
                day: unix(day * DAY).date_naive(),
                stored_bytes: stored.map(|b| b.max(0) as u64),
                backups: backups.get(&day).copied().unwrap_or(0).max(0) as u64,
            });
        }
        Ok(out)
    }

    /// Records a storage node's check-in, which brought it to `cursor`.
    pub fn record_node(&self, node: &NodeReport, cursor: u64, now: DateTime<Utc>) -> Result<(), RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        conn.execute(
            "INSERT INTO storage_nodes (name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET auth_unreachable = ?2, checkin_interval_secs = ?3, version = ?4,
                 cursor = ?5, checked_in_at = ?6",
            params![
                node.name,
                node.auth_unreachable,
                int(node.checkin_interval_secs),
                node.version,
                int(cursor),
                now.timestamp()
            ],
        )?;
        conn.execute(
            "DELETE FROM storage_nodes WHERE checked_in_at < ?1",
            params![now.timestamp() - FORGET_NODE_SECS],
        )?;
        Ok(())
    }

    /// The storage nodes that checked in during the last 30 days, by name,
    /// and whether each is behind at `now`.
    pub fn storage_nodes(&self, now: DateTime<Utc>) -> Result<Vec<StorageNodeInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at,
                    (SELECT COUNT(*) FROM changes c WHERE c.seq > n.cursor)
             FROM storage_nodes n ORDER BY name",
        )?;
        let now = now.timestamp();
        let rows = stmt.query_map([], |r| {
            let interval: i64 = r.get(2)?;
            let checked_in_at: i64 = r.get(5)?;
            let pending = r.get::<_, i64>(6)?.max(0) as u64;
            let age = now.saturating_sub(checked_in_at);
            let stale = age > interval.saturating_mul(2);
            Ok(StorageNodeInfo {
                name: r.get(0)?,
                local: false,
                auth_unreachable: r.get(1)?,
                checkin_interval_secs: interval.max(0) as u64,
                version: r.get(3)?,
                last_checkin: unix(checked_in_at),
                cursor: r.get::<_, i64>(4)?.max(0) as u64,
                pending_changes: pending,
                stale,
                behind: stale || (pending > 0 && age > interval.saturating_mul(3) / 2),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The check-in feed's newest cursor.
    pub fn latest_change(&self) -> Result<u64, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let seq: Option<i64> = conn.query_row("SELECT MAX(seq) FROM changes", [], |r| r.get(0))?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DeviceState;
    use crate::id::SnapshotId;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("registry.db")).unwrap();
        (dir, r)
    }

    fn record(n: u8, device: &str, time: DateTime<Utc>, bytes: u64) -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId([n; 32]),
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
            removed: removed.into_iter().map(|n| SnapshotId([n; 32])).collect(),
        }
    }

    fn ids(r: &Registry, device: &str) -> Vec<u8> {
        r.device_snapshots("acme", device).unwrap().iter().map(|s| s.id.0[0]).collect()
    }

    #[test]
    fn reported_snapshots_list_per_device_and_a_completed_rescan_drops_those_not_seen_again() {
        let (_d, r) = registry();
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
        assert_eq!(ids(&r, "phone"), [2, 1], "newest first");
        let backups = r.device_backups().unwrap();
        assert_eq!(backups[&("acme".to_string(), "phone".to_string())], (2, unix((now - hour).timestamp())));
        assert_eq!(r.logical_bytes().unwrap()["acme"], 160);
        // A delta removes one; a record sent twice stays one.
        r.record_snapshots(&[report(false, false, vec![record(2, "phone", now - hour, 50)], vec![1])], now).unwrap();
        assert_eq!(ids(&r, "phone"), [2]);
        // A rescan (a node restarted) that finds only snapshot 3: 2 is gone
        // once the rescan completes, not before.
        r.record_snapshots(&[report(true, false, vec![], vec![])], now).unwrap();
        assert_eq!(ids(&r, "phone"), [2], "in doubt, still listed");
        r.record_snapshots(&[report(false, true, vec![record(3, "tablet", now, 10)], vec![])], now).unwrap();
        assert!(ids(&r, "phone").is_empty());
        assert_eq!(ids(&r, "tablet"), [3]);
        assert_eq!(r.logical_bytes().unwrap()["acme"], 10);
        // Other tenants are untouched by acme's reports.
        assert!(r.device_snapshots("globex", "tablet").unwrap().is_empty());
    }

    #[test]
    fn history_carries_stored_bytes_forward_and_counts_backups_per_day_forgotten_ones_included() {
        let (_d, r) = registry();
        let now = Utc::now();
        let day = chrono::Duration::days(1);
        let usage = |bytes| [TenantUsage { tenant: "acme".into(), stored_bytes: bytes, snapshots: 0 }];
        r.record_usage(&usage(1000), now - day * 40).unwrap();
        r.record_usage(&usage(5000), now - day * 3).unwrap();
        r.record_usage(&usage(7000), now - day * 3).unwrap();
        r.record_usage(&usage(9000), now).unwrap();
        r.record_snapshots(
            &[report(
                false,
                false,
                vec![
                    record(1, "phone", now - day * 3, 1),
                    record(2, "phone", now - day * 3, 1),
                    record(3, "phone", now, 1),
                ],
                vec![],
            )],
            now,
        )
        .unwrap();
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

    #[test]
    fn a_node_with_changes_waiting_past_its_interval_is_behind_and_one_silent_for_two_is_stale() {
        let (_d, r) = registry();
        let now = Utc::now();
        let node = |name: &str| NodeReport {
            name: name.into(),
            auth_unreachable: "fail_open".into(),
            checkin_interval_secs: 30,
            version: "0.1.0".into(),
        };
        let dt = r
            .create_deployment_token(
                &super::super::DeploymentTokenSpec {
                    tenant: "acme".into(),
                    expires_at: now + chrono::Duration::hours(1),
                    max_activations: None,
                    policies: Default::default(),
                    provisioned_only: false,
                },
                now,
            )
            .unwrap();
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
}
