//! What the console lists and charts beyond devices and tokens (migration
//! 4 in SQLite, `0002_fleet.sql` in PostgreSQL): the snapshots storage
//! nodes report (who took each, when, how big; never paths or contents),
//! each tenant's stored bytes per day, and the storage nodes' check-ins.
//!
//! The rules live here (which days a history covers, when a node is
//! behind); each backend only reads and writes the rows (`Store`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{unix, Registry, RegistryError};
use crate::api::{NodeReport, SnapshotRecord, StorageNodeInfo, TenantDay, TenantSnapshots};

/// Seconds in a day; days are numbered from the unix epoch (UTC).
pub(super) const DAY: i64 = 86_400;

/// A day in milliseconds: snapshot times are stored to the millisecond, so
/// that two snapshots taken within one second still list in order.
pub(super) const DAY_MS: i64 = DAY * 1000;

/// A stored snapshot time (milliseconds since the epoch) as a time.
pub(super) fn unix_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Removed snapshots stay this long (seconds): the backups-per-day chart counts them.
pub(super) const KEEP_REMOVED_SECS: i64 = 60 * DAY;
/// Days of stored bytes kept per tenant.
pub(super) const KEEP_DAYS: i64 = 400;
/// A node that has not checked in for this long (seconds) leaves the list.
pub(super) const FORGET_NODE_SECS: i64 = 30 * DAY;
/// Most snapshots one device listing returns, newest first.
pub const MAX_DEVICE_SNAPSHOTS: u32 = 10_000;
/// Most days one history covers.
pub const MAX_HISTORY_DAYS: u32 = 366;

/// Per (tenant, device id): how many of its snapshots exist, and when the
/// newest was taken.
pub type DeviceBackups = HashMap<(String, String), (u64, DateTime<Utc>)>;

/// A count as the databases' signed 64-bit integer (saturating).
pub(super) fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count back as `u64` (a negative one, which no writer stores, as 0).
pub(super) fn uint(n: i64) -> u64 {
    n.max(0) as u64
}

/// The day number (days since the unix epoch, UTC) that `at` falls on.
pub(super) fn day_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(DAY)
}

/// A stored snapshot id (hex) back as an id.
pub(super) fn snapshot_id(text: &str) -> Result<crate::id::SnapshotId, crate::id::IdError> {
    text.parse()
}

/// A storage node's row as a backend reads it.
pub(super) struct NodeRow {
    pub name: String,
    pub auth_unreachable: String,
    pub checkin_interval_secs: i64,
    pub version: String,
    /// The feed cursor its last check-in brought it to.
    pub cursor: i64,
    /// Unix seconds.
    pub checked_in_at: i64,
    /// Feed entries after its cursor.
    pub pending: i64,
}

/// What a backend reads for a tenant's history over days `first..=last`.
pub(super) struct UsageRows {
    /// Stored bytes of the last day reported before `first`.
    pub before: Option<i64>,
    /// Stored bytes per reported day in the window.
    pub stored: HashMap<i64, i64>,
    /// Snapshots taken per day in the window (removed ones included).
    pub backups: HashMap<i64, i64>,
}

impl Registry {
    /// Records storage nodes' snapshot reports, in one transaction. A
    /// rescan marks the tenant's recorded snapshots stale; each snapshot
    /// reported again is fresh; when the rescan is complete, those still
    /// stale are gone. Snapshots removed more than 60 days ago are dropped.
    pub fn record_snapshots(&self, reports: &[TenantSnapshots], now: DateTime<Utc>) -> Result<(), RegistryError> {
        if reports.is_empty() {
            return Ok(());
        }
        self.store.record_snapshots(reports, now.timestamp())
    }

    /// A device's snapshots that still exist, newest first (at most
    /// [`MAX_DEVICE_SNAPSHOTS`]).
    pub fn device_snapshots(&self, tenant: &str, device_id: &str) -> Result<Vec<SnapshotRecord>, RegistryError> {
        self.store.device_snapshots(tenant, device_id, MAX_DEVICE_SNAPSHOTS)
    }

    /// Per tenant and device id: how many of its snapshots exist, and when
    /// the newest was taken.
    pub fn device_backups(&self) -> Result<DeviceBackups, RegistryError> {
        self.store.device_backups()
    }

    /// Per tenant: bytes of file content of its snapshots that exist, added up.
    pub fn logical_bytes(&self) -> Result<HashMap<String, u64>, RegistryError> {
        self.store.logical_bytes()
    }

    /// The last `days` days of a tenant (1 to [`MAX_HISTORY_DAYS`]), oldest
    /// first, ending today (UTC): stored bytes as last reported on or
    /// before each day, and the snapshots taken each day.
    pub fn tenant_history(&self, tenant: &str, days: u32, now: DateTime<Utc>) -> Result<Vec<TenantDay>, RegistryError> {
        let days = i64::from(days.clamp(1, MAX_HISTORY_DAYS));
        let today = day_of(now);
        let first = today - days + 1;
        let rows = self.store.usage_rows(tenant, first, today)?;
        let mut stored = rows.before;
        Ok((first..=today)
            .map(|day| {
                if let Some(&b) = rows.stored.get(&day) {
                    stored = Some(b);
                }
                TenantDay {
                    day: unix(day * DAY).date_naive(),
                    stored_bytes: stored.map(uint),
                    backups: uint(rows.backups.get(&day).copied().unwrap_or(0)),
                }
            })
            .collect())
    }

    /// Records a storage node's check-in, which brought it to `cursor`;
    /// nodes silent for 30 days are forgotten.
    pub fn record_node(&self, node: &NodeReport, cursor: u64, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.store.record_node(node, int(cursor), now.timestamp())
    }

    /// The storage nodes that checked in during the last 30 days, by name.
    /// A node is stale when silent for two check-in intervals, and behind
    /// when stale or when changes have waited for it past one and a half.
    pub fn storage_nodes(&self, now: DateTime<Utc>) -> Result<Vec<StorageNodeInfo>, RegistryError> {
        let now = now.timestamp();
        Ok(self
            .store
            .storage_nodes()?
            .into_iter()
            .map(|n| {
                let pending = uint(n.pending);
                let age = now.saturating_sub(n.checked_in_at);
                let interval = n.checkin_interval_secs;
                let stale = age > interval.saturating_mul(2);
                StorageNodeInfo {
                    name: n.name,
                    local: false,
                    auth_unreachable: n.auth_unreachable,
                    checkin_interval_secs: uint(interval),
                    version: n.version,
                    last_checkin: unix(n.checked_in_at),
                    cursor: uint(n.cursor),
                    pending_changes: pending,
                    stale,
                    behind: stale || (pending > 0 && age > interval.saturating_mul(3) / 2),
                }
            })
            .collect())
    }

    /// The check-in feed's newest cursor (0 when empty).
    pub fn latest_change(&self) -> Result<u64, RegistryError> {
        self.store.latest_change()
    }
}
