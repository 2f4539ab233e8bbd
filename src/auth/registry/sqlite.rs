//! The registry in one SQLite file, owner-only, migrated in code: the
//! embedded default, for one auth node. One connection behind a mutex
//! (SQLite serializes writes anyway), so a transaction is never raced.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::fleet::{self, NodeRow, UsageRows};
use super::{
    activation_audit, change, check_deletable, check_state_change, count, first_generation, plan_activation, unix,
    Activated, ActivationPlan, AdminRow, DeploymentRow, DeploymentTokenSpec, DeviceBackups, DeviceIdentity, DeviceRow,
    ExistingDevice, RegistryError, Store, TokenTable,
};
use crate::api::{
    AdminTokenInfo, AuditEntry, DeploymentTokenInfo, DeviceChange, DeviceInfo, NodeReport, Policies, SnapshotRecord,
    TenantInfo, TenantQuota, TenantSnapshots, TenantUsage, UserInfo,
};
use crate::auth::DeviceState;

/// Migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Never edit one that shipped: registries in the field have run it. A new
/// one has its PostgreSQL twin in `migrations/postgres/`.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE server_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret BLOB NOT NULL);
    CREATE TABLE deployment_tokens (
        hash BLOB PRIMARY KEY, tenant TEXT NOT NULL, expires_at INTEGER NOT NULL,
        max_activations INTEGER, activations INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, email TEXT NOT NULL,
        token_hash BLOB NOT NULL, state TEXT NOT NULL, activated_at INTEGER NOT NULL, last_seen INTEGER);
    CREATE UNIQUE INDEX devices_token ON devices (token_hash);
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, tenant TEXT NOT NULL, state TEXT NOT NULL);
"#,
    // 2: deployment tokens get a public id, policies and `provisioned_only`;
    // devices record the token that activated them, their policies and a
    // generation (bumped by a reset, carried in session tokens); the tenant's
    // provisioned users. Existing rows keep what they had: every policy
    // allowed, any email, generation 0 (that of `cvs1` session tokens).
    r#"
    ALTER TABLE deployment_tokens ADD COLUMN token_id TEXT;
    UPDATE deployment_tokens SET token_id = lower(hex(randomblob(8)));
    CREATE UNIQUE INDEX deployment_tokens_id ON deployment_tokens (token_id);
    ALTER TABLE deployment_tokens ADD COLUMN provisioned_only INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployment_tokens ADD COLUMN allow_restore_to_other_device INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE deployment_tokens ADD COLUMN allow_open_in INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE devices ADD COLUMN deployment_token_id TEXT;
    ALTER TABLE devices ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN allow_restore_to_other_device INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE devices ADD COLUMN allow_open_in INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE changes ADD COLUMN generation INTEGER;
    CREATE TABLE users (
        tenant TEXT NOT NULL, email TEXT NOT NULL, added_at INTEGER NOT NULL, PRIMARY KEY (tenant, email));
"#,
    // 3: scoped admin tokens (hashed like the others), revocable deployment
    // tokens, the audit log, and per-tenant quotas and reported usage. The
    // index on the feed finds a deleted device id's last generation.
    r#"
    CREATE TABLE admin_tokens (
        token_id TEXT PRIMARY KEY, hash BLOB NOT NULL, role TEXT NOT NULL, tenant TEXT, label TEXT,
        created_at INTEGER NOT NULL, revoked_at INTEGER);
    CREATE UNIQUE INDEX admin_tokens_hash ON admin_tokens (hash);
    ALTER TABLE deployment_tokens ADD COLUMN revoked_at INTEGER;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, tenant TEXT, detail TEXT NOT NULL DEFAULT '');
    CREATE INDEX audit_tenant ON audit (tenant, seq);
    CREATE TABLE tenants (
        tenant TEXT PRIMARY KEY, quota_bytes INTEGER NOT NULL DEFAULT 0,
        stored_bytes INTEGER, snapshots INTEGER, reported_at INTEGER);
    CREATE INDEX changes_device ON changes (device_id);
"#,
    // 4: what the console charts and lists (`registry::fleet`): snapshots
    // as storage nodes report them, each tenant's stored bytes per day,
    // and the storage nodes' check-ins.
    r#"
    CREATE TABLE snapshots (
        tenant TEXT NOT NULL, snapshot_id TEXT NOT NULL, device_id TEXT, user TEXT, time_ms INTEGER NOT NULL,
        files INTEGER NOT NULL, bytes INTEGER NOT NULL, removed_at INTEGER, stale INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, snapshot_id));
    CREATE INDEX snapshots_device ON snapshots (tenant, device_id, time_ms);
    CREATE INDEX snapshots_time ON snapshots (tenant, time_ms);
    CREATE TABLE usage_days (
        tenant TEXT NOT NULL, day INTEGER NOT NULL, stored_bytes INTEGER NOT NULL, PRIMARY KEY (tenant, day));
    CREATE TABLE storage_nodes (
        name TEXT PRIMARY KEY, auth_unreachable TEXT NOT NULL, checkin_interval_secs INTEGER NOT NULL,
        version TEXT NOT NULL, cursor INTEGER NOT NULL, checked_in_at INTEGER NOT NULL);
"#,
];

/// The SQLite backend.
pub(super) struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens or creates the file (owner-only) and migrates it.
    pub(super) fn open(path: &Path) -> Result<SqliteStore, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = SqliteStore { conn: Mutex::new(conn) };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().expect("registry lock")
    }

    fn migrate(&self) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn signing_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], RegistryError> {
        let conn = self.conn();
        conn.execute("INSERT OR IGNORE INTO server_key (id, secret) VALUES (1, ?1)", params![&fresh[..]])?;
        let stored: Vec<u8> = conn.query_row("SELECT secret FROM server_key WHERE id = 1", [], |r| r.get(0))?;
        Ok(<[u8; 32]>::try_from(stored).unwrap_or(fresh))
    }

    fn create_deployment_token(
        &self,
        hash: &[u8; 32],
        id: &str,
        spec: &DeploymentTokenSpec,
        now: DateTime<Utc>,
    ) -> Result<(), RegistryError> {
        self.conn().execute(
            "INSERT INTO deployment_tokens (hash, tenant, expires_at, max_activations, created_at, token_id,
                 provisioned_only, allow_restore_to_other_device, allow_open_in)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                &hash[..],
                spec.tenant,
                spec.expires_at.timestamp(),
                spec.max_activations,
                now.timestamp(),
                id,
                spec.provisioned_only,
                spec.policies.allow_restore_to_other_device,
                spec.policies.allow_open_in,
            ],
        )?;
        Ok(())
    }

    fn activate(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        device_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Activated, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<DeploymentRow> = tx
            .query_row(
                "SELECT hash, tenant, expires_at, max_activations, activations, token_id, provisioned_only,
                        allow_restore_to_other_device, allow_open_in, revoked_at IS NOT NULL
                 FROM deployment_tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| {
                    Ok(DeploymentRow {
                        hash: r.get(0)?,
                        tenant: r.get(1)?,
                        expires_at: r.get(2)?,
                        max_activations: r.get(3)?,
                        activations: r.get(4)?,
                        token_id: r.get(5)?,
                        provisioned_only: r.get(6)?,
                        policies: Policies { allow_restore_to_other_device: r.get(7)?, allow_open_in: r.get(8)? },
                        revoked: r.get(9)?,
                    })
                },
            )
            .optional()?;
        let dt = row.ok_or(RegistryError::UnknownToken)?;
        dt.check(hash, now)?;
        if dt.provisioned_only {
            let listed: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM users WHERE tenant = ?1 AND email = ?2)",
                params![dt.tenant, email],
                |r| r.get(0),
            )?;
            if !listed {
                return Err(RegistryError::UserNotProvisioned);
            }
        }
        let existing = tx
            .query_row("SELECT tenant, state, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok(ExistingDevice { tenant: r.get(0)?, state: r.get(1)?, generation: r.get(2)? })
            })
            .optional()?;
        let p = dt.policies;
        let change = match plan_activation(existing, &dt.tenant)? {
            ActivationPlan::Insert => {
                let last: Option<u32> = tx.query_row(
                    "SELECT MAX(generation) FROM changes WHERE device_id = ?1",
                    params![device_id],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO devices (device_id, tenant, email, token_hash, state, activated_at,
                         deployment_token_id, generation, allow_restore_to_other_device, allow_open_in)
                     VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?6, ?9, ?7, ?8)",
                    params![
                        device_id,
                        dt.tenant,
                        email,
                        &device_hash[..],
                        now.timestamp(),
                        dt.token_id,
                        p.allow_restore_to_other_device,
                        p.allow_open_in,
                        first_generation(last),
                    ],
                )?;
                None
            }
            ActivationPlan::Reactivate { generation } => {
                tx.execute(
                    "UPDATE devices SET tenant = ?2, email = ?3, token_hash = ?4, state = 'active', activated_at = ?5,
                         last_seen = NULL, deployment_token_id = ?6, allow_restore_to_other_device = ?7,
                         allow_open_in = ?8
                     WHERE device_id = ?1",
                    params![
                        device_id,
                        dt.tenant,
                        email,
                        &device_hash[..],
                        now.timestamp(),
                        dt.token_id,
                        p.allow_restore_to_other_device,
                        p.allow_open_in
                    ],
                )?;
                Some(append_change(&tx, device_id, &dt.tenant, DeviceState::Active, Some(generation))?)
            }
        };
        tx.execute("UPDATE deployment_tokens SET activations = activations + 1 WHERE hash = ?1", params![&hash[..]])?;
        insert_audit(&tx, &activation_audit(now, device_id, email, &dt))?;
        tx.commit()?;
        Ok(Activated { tenant: dt.tenant, token_id: dt.token_id, change })
    }

    fn authenticate_device(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<DeviceIdentity, RegistryError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT token_hash, tenant, email, state, generation, allow_restore_to_other_device, allow_open_in
                 FROM devices WHERE device_id = ?1",
                params![device_id],
                |r| {
                    Ok(DeviceRow {
                        token_hash: r.get(0)?,
                        tenant: r.get(1)?,
                        email: r.get(2)?,
                        state: r.get(3)?,
                        generation: r.get(4)?,
                        policies: Policies { allow_restore_to_other_device: r.get(5)?, allow_open_in: r.get(6)? },
                    })
                },
            )
            .optional()?
            .ok_or(RegistryError::UnknownToken)?;
        row.verify(hash, email)?;
        conn.execute("UPDATE devices SET last_seen = ?1 WHERE device_id = ?2", params![now.timestamp(), device_id])?;
        row.identity(device_id)
    }

    fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (tenant, current): (String, String) = tx
            .query_row("SELECT tenant, state FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        check_state_change(&current, state)?;
        tx.execute("UPDATE devices SET state = ?1 WHERE device_id = ?2", params![state.as_str(), device_id])?;
        let change = append_change(&tx, device_id, &tenant, state, None)?;
        tx.commit()?;
        Ok(change)
    }

    fn reset(&self, device_id: &str, dead: &[u8; 32]) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (tenant, generation): (String, u32) = tx
            .query_row("SELECT tenant, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        let generation = generation.saturating_add(1);
        tx.execute(
            "UPDATE devices SET state = ?2, generation = ?3, token_hash = ?4 WHERE device_id = ?1",
            params![device_id, DeviceState::Reset.as_str(), generation, &dead[..]],
        )?;
        let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(generation))?;
        tx.commit()?;
        Ok(change)
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{DEVICE_COLUMNS} ORDER BY tenant, device_id"))?;
        let rows = stmt.query_map([], device_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, device_id, tenant, state, generation FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut last = cursor;
        let rows = stmt.query_map(params![i64::try_from(cursor).unwrap_or(i64::MAX), limit], |r| {
            let change =
                DeviceChange { device_id: r.get(1)?, tenant: r.get(2)?, state: r.get(3)?, generation: r.get(4)? };
            Ok((r.get::<_, i64>(0)?, change))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (seq, change) = row?;
            last = seq as u64;
            changes.push(change);
        }
        Ok((last, changes))
    }

    fn add_users(&self, tenant: &str, emails: &[String], now: DateTime<Utc>) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = Vec::new();
        for email in emails {
            let n = tx.execute(
                "INSERT INTO users (tenant, email, added_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![tenant, email, now.timestamp()],
            )?;
            if n > 0 {
                added.push(email.clone());
            }
        }
        tx.commit()?;
        Ok(added)
    }

    fn remove_users(&self, tenant: &str, emails: &[String]) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut removed = Vec::new();
        for email in emails {
            if tx.execute("DELETE FROM users WHERE tenant = ?1 AND email = ?2", params![tenant, email])? > 0 {
                removed.push(email.clone());
            }
        }
        tx.commit()?;
        Ok(removed)
    }

    fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT email, added_at FROM users WHERE tenant = ?1 ORDER BY email")?;
        let rows = stmt.query_map(params![tenant], |r| Ok(UserInfo { email: r.get(0)?, added_at: unix(r.get(1)?) }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn device(&self, device_id: &str) -> Result<DeviceInfo, RegistryError> {
        let sql = format!("{DEVICE_COLUMNS} WHERE device_id = ?1");
        self.conn().query_row(&sql, params![device_id], device_row).optional()?.ok_or(RegistryError::NoSuchDevice)
    }

    fn delete_device(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (tenant, state, generation): (String, String, u32) = tx
            .query_row("SELECT tenant, state, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        check_deletable(&state)?;
        tx.execute("DELETE FROM devices WHERE device_id = ?1", params![device_id])?;
        let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(generation.saturating_add(1)))?;
        tx.commit()?;
        Ok(change)
    }

    fn create_admin_token(&self, hash: &[u8; 32], info: &AdminTokenInfo) -> Result<(), RegistryError> {
        self.conn().execute(
            "INSERT INTO admin_tokens (token_id, hash, role, tenant, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![info.id, &hash[..], info.role.as_str(), info.tenant, info.label, info.created_at.timestamp()],
        )?;
        Ok(())
    }

    fn admin_by_hash(&self, hash: &[u8; 32]) -> Result<Option<AdminRow>, RegistryError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT hash, token_id, role, tenant, revoked_at IS NOT NULL FROM admin_tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| {
                    Ok(AdminRow {
                        hash: r.get(0)?,
                        id: r.get(1)?,
                        role: r.get(2)?,
                        tenant: r.get(3)?,
                        revoked: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{ADMIN_TOKEN_COLUMNS} ORDER BY created_at, token_id"))?;
        let rows = stmt.query_map([], admin_token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn admin_token(&self, id: &str) -> Result<AdminTokenInfo, RegistryError> {
        let sql = format!("{ADMIN_TOKEN_COLUMNS} WHERE token_id = ?1");
        self.conn().query_row(&sql, params![id], admin_token_row).optional()?.ok_or(RegistryError::NoSuchToken)
    }

    fn revoke(&self, table: TokenTable, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        let sql = format!("UPDATE {} SET revoked_at = COALESCE(revoked_at, ?2) WHERE token_id = ?1", table.name());
        if self.conn().execute(&sql, params![id, now.timestamp()])? == 0 {
            return Err(RegistryError::NoSuchToken);
        }
        Ok(())
    }

    fn deployment_tokens(&self) -> Result<Vec<DeploymentTokenInfo>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{DEPLOYMENT_TOKEN_COLUMNS} ORDER BY tenant, created_at, token_id"))?;
        let rows = stmt.query_map([], deployment_token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, RegistryError> {
        let sql = format!("{DEPLOYMENT_TOKEN_COLUMNS} WHERE token_id = ?1");
        self.conn().query_row(&sql, params![id], deployment_token_row).optional()?.ok_or(RegistryError::NoSuchToken)
    }

    fn set_quota(&self, tenant: &str, quota_bytes: i64) -> Result<(), RegistryError> {
        self.conn().execute(
            "INSERT INTO tenants (tenant, quota_bytes) VALUES (?1, ?2)
             ON CONFLICT (tenant) DO UPDATE SET quota_bytes = ?2",
            params![tenant, quota_bytes],
        )?;
        Ok(())
    }

    fn quotas(&self) -> Result<Vec<TenantQuota>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT tenant, quota_bytes FROM tenants WHERE quota_bytes > 0 ORDER BY tenant")?;
        let rows =
            stmt.query_map([], |r| Ok(TenantQuota { tenant: r.get(0)?, quota_bytes: r.get::<_, i64>(1)? as u64 }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_usage(&self, usage: &[TenantUsage], now: DateTime<Utc>) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for u in usage {
            tx.execute(
                "INSERT INTO tenants (tenant, stored_bytes, snapshots, reported_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant) DO UPDATE SET stored_bytes = ?2, snapshots = ?3, reported_at = ?4",
                params![
                    u.tenant,
                    i64::try_from(u.stored_bytes).unwrap_or(i64::MAX),
                    i64::try_from(u.snapshots).unwrap_or(i64::MAX),
                    now.timestamp()
                ],
            )?;
            let day = fleet::day_of(now);
            tx.execute(
                "INSERT INTO usage_days (tenant, day, stored_bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tenant, day) DO UPDATE SET stored_bytes = ?3",
                params![u.tenant, day, fleet::int(u.stored_bytes)],
            )?;
            tx.execute(
                "DELETE FROM usage_days WHERE tenant = ?1 AND day < ?2",
                params![u.tenant, day - fleet::KEEP_DAYS],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn tenants(&self) -> Result<Vec<TenantInfo>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "WITH names AS (SELECT tenant FROM deployment_tokens UNION SELECT tenant FROM devices
                            UNION SELECT tenant FROM tenants)
             SELECT n.tenant, (SELECT COUNT(*) FROM devices d WHERE d.tenant = n.tenant),
                    t.snapshots, t.stored_bytes, COALESCE(t.quota_bytes, 0), t.reported_at
             FROM names n LEFT JOIN tenants t ON t.tenant = n.tenant ORDER BY n.tenant",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TenantInfo {
                tenant: r.get(0)?,
                devices: r.get::<_, i64>(1)? as u64,
                snapshots: r.get::<_, Option<i64>>(2)?.map(|n| n as u64),
                stored_bytes: r.get::<_, Option<i64>>(3)?.map(|n| n as u64),
                quota_bytes: r.get::<_, i64>(4)? as u64,
                reported_at: r.get::<_, Option<i64>>(5)?.map(unix),
                logical_bytes: None,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_audit(&tx, entry)?;
        tx.commit()?;
        Ok(())
    }

    fn audit_log(&self, tenant: Option<&str>, since: i64, limit: u32) -> Result<Vec<AuditEntry>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, actor, action, target, tenant, detail FROM audit
             WHERE (?1 IS NULL OR tenant = ?1) AND at >= ?2 ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![tenant, since, limit], |r| {
            Ok(AuditEntry {
                at: unix(r.get(0)?),
                actor: r.get(1)?,
                action: r.get(2)?,
                target: r.get(3)?,
                tenant: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_snapshots(&self, reports: &[TenantSnapshots], now: i64) -> Result<(), RegistryError> {
        let mut conn = self.conn();
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
                    "INSERT INTO snapshots (tenant, snapshot_id, device_id, user, time_ms, files, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant, snapshot_id) DO UPDATE SET removed_at = NULL, stale = 0",
                    params![
                        r.tenant,
                        s.id.to_hex(),
                        s.device,
                        s.user,
                        s.time.timestamp_millis(),
                        fleet::int(s.files),
                        fleet::int(s.bytes)
                    ],
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
        tx.execute("DELETE FROM snapshots WHERE removed_at < ?1", params![now - fleet::KEEP_REMOVED_SECS])?;
        tx.commit()?;
        Ok(())
    }

    fn device_snapshots(
        &self,
        tenant: &str,
        device_id: &str,
        limit: u32,
    ) -> Result<Vec<SnapshotRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT snapshot_id, time_ms, device_id, user, files, bytes FROM snapshots
             WHERE tenant = ?1 AND device_id = ?2 AND removed_at IS NULL
             ORDER BY time_ms DESC, snapshot_id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![tenant, device_id, limit], |r| {
            let id: String = r.get(0)?;
            Ok(SnapshotRecord {
                id: fleet::snapshot_id(&id)
                    .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))?,
                time: fleet::unix_ms(r.get(1)?),
                device: r.get(2)?,
                user: r.get(3)?,
                files: fleet::uint(r.get(4)?),
                bytes: fleet::uint(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn device_backups(&self) -> Result<DeviceBackups, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT tenant, device_id, COUNT(*), MAX(time_ms) FROM snapshots
             WHERE removed_at IS NULL AND device_id IS NOT NULL GROUP BY tenant, device_id",
        )?;
        let rows =
            stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (fleet::uint(r.get(2)?), fleet::unix_ms(r.get(3)?)))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn logical_bytes(&self) -> Result<HashMap<String, u64>, RegistryError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT tenant, SUM(bytes) FROM snapshots WHERE removed_at IS NULL GROUP BY tenant")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, fleet::uint(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn usage_rows(&self, tenant: &str, first: i64, last: i64) -> Result<UsageRows, RegistryError> {
        let conn = self.conn();
        let before = conn
            .query_row(
                "SELECT stored_bytes FROM usage_days WHERE tenant = ?1 AND day < ?2 ORDER BY day DESC LIMIT 1",
                params![tenant, first],
                |r| r.get(0),
            )
            .optional()?;
        let mut stmt =
            conn.prepare("SELECT day, stored_bytes FROM usage_days WHERE tenant = ?1 AND day BETWEEN ?2 AND ?3")?;
        let stored =
            stmt.query_map(params![tenant, first, last], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT time_ms / ?4, COUNT(*) FROM snapshots WHERE tenant = ?1 AND time_ms >= ?2 AND time_ms < ?3
             GROUP BY time_ms / ?4",
        )?;
        let backups = stmt
            .query_map(params![tenant, first * fleet::DAY_MS, (last + 1) * fleet::DAY_MS, fleet::DAY_MS], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(UsageRows { before, stored, backups })
    }

    fn record_node(&self, node: &NodeReport, cursor: i64, now: i64) -> Result<(), RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO storage_nodes (name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET auth_unreachable = ?2, checkin_interval_secs = ?3, version = ?4,
                 cursor = ?5, checked_in_at = ?6",
            params![
                node.name,
                node.auth_unreachable,
                fleet::int(node.checkin_interval_secs),
                node.version,
                cursor,
                now
            ],
        )?;
        tx.execute("DELETE FROM storage_nodes WHERE checked_in_at < ?1", params![now - fleet::FORGET_NODE_SECS])?;
        tx.commit()?;
        Ok(())
    }

    fn storage_nodes(&self) -> Result<Vec<NodeRow>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at,
                    (SELECT COUNT(*) FROM changes c WHERE c.seq > n.cursor)
             FROM storage_nodes n ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(NodeRow {
                name: r.get(0)?,
                auth_unreachable: r.get(1)?,
                checkin_interval_secs: r.get(2)?,
                version: r.get(3)?,
                cursor: r.get(4)?,
                checked_in_at: r.get(5)?,
                pending: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn latest_change(&self) -> Result<u64, RegistryError> {
        let seq: Option<i64> = self.conn().query_row("SELECT MAX(seq) FROM changes", [], |r| r.get(0))?;
        Ok(fleet::uint(seq.unwrap_or(0)))
    }

    #[cfg(test)]
    fn admin_token_hash(&self, id: &str) -> Result<Vec<u8>, RegistryError> {
        Ok(self.conn().query_row("SELECT hash FROM admin_tokens WHERE token_id = ?1", params![id], |r| r.get(0))?)
    }
}

const DEVICE_COLUMNS: &str = "SELECT device_id, tenant, email, state, activated_at, last_seen, deployment_token_id,
        allow_restore_to_other_device, allow_open_in FROM devices";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceInfo> {
    Ok(DeviceInfo {
        device_id: r.get(0)?,
        tenant: r.get(1)?,
        email: r.get(2)?,
        state: r.get(3)?,
        activated_at: unix(r.get(4)?),
        last_seen: r.get::<_, Option<i64>>(5)?.map(unix),
        deployment_token_id: r.get(6)?,
        policies: Policies { allow_restore_to_other_device: r.get(7)?, allow_open_in: r.get(8)? },
        snapshots: 0,
        last_backup: None,
    })
}

const ADMIN_TOKEN_COLUMNS: &str = "SELECT token_id, role, tenant, label, created_at, revoked_at FROM admin_tokens";

fn admin_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AdminTokenInfo> {
    let role: String = r.get(1)?;
    Ok(AdminTokenInfo {
        id: r.get(0)?,
        role: role
            .parse()
            .map_err(|e: String| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into()))?,
        tenant: r.get(2)?,
        label: r.get(3)?,
        created_at: unix(r.get(4)?),
        revoked_at: r.get::<_, Option<i64>>(5)?.map(unix),
    })
}

const DEPLOYMENT_TOKEN_COLUMNS: &str = "SELECT token_id, tenant, created_at, expires_at, activations, max_activations,
        allow_restore_to_other_device, allow_open_in, provisioned_only, revoked_at IS NOT NULL FROM deployment_tokens";

fn deployment_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentTokenInfo> {
    Ok(DeploymentTokenInfo {
        token_id: r.get(0)?,
        tenant: r.get(1)?,
        created_at: unix(r.get(2)?),
        expires_at: unix(r.get(3)?),
        activations: count(r.get(4)?),
        max_activations: r.get::<_, Option<i64>>(5)?.map(count),
        policies: Policies { allow_restore_to_other_device: r.get(6)?, allow_open_in: r.get(7)? },
        provisioned_only: r.get(8)?,
        revoked: r.get(9)?,
    })
}

/// Appends an audit entry inside a transaction.
fn insert_audit(tx: &Transaction<'_>, e: &AuditEntry) -> Result<(), RegistryError> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, target, tenant, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![e.at.timestamp(), e.actor, e.action, e.target, e.tenant, e.detail],
    )?;
    Ok(())
}

/// Appends a state change to the check-in feed. SQLite has one writer at a
/// time, so the feed's numbers become visible in order.
fn append_change(
    tx: &Transaction<'_>,
    device_id: &str,
    tenant: &str,
    state: DeviceState,
    generation: Option<u32>,
) -> Result<DeviceChange, RegistryError> {
    tx.execute(
        "INSERT INTO changes (device_id, tenant, state, generation) VALUES (?1, ?2, ?3, ?4)",
        params![device_id, tenant, state.as_str(), generation],
    )?;
    Ok(change(device_id, tenant, state, generation))
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection};

    use super::super::tests::{hour, sqlite};
    use super::*;
    use crate::auth::registry::Registry;
    use crate::auth::token::{self, SecretKind};

    #[test]
    fn registry_file_is_owner_only_and_reopens_with_same_key() {
        let (dir, r) = sqlite();
        let secret = r.signing_secret().unwrap();
        drop(r);
        let path = dir.path().join("registry.db");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Registry::open(&path).unwrap().signing_secret().unwrap(), secret);
    }

    #[test]
    fn a_version_1_registry_migrates_and_keeps_its_devices_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let now = Utc::now();
        // A registry as the first release left it, with a token and a device.
        let dt = token::new_secret(SecretKind::Deployment);
        let dev = token::new_secret(SecretKind::Device);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO deployment_tokens (hash, tenant, expires_at, created_at) VALUES (?1, 'acme', ?2, ?3)",
                params![&dt.hash[..], hour(now).timestamp(), now.timestamp()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO devices (device_id, tenant, email, token_hash, state, activated_at)
                 VALUES ('old', 'acme', 'a@acme.com', ?1, 'active', ?2)",
                params![&dev.hash[..], now.timestamp()],
            )
            .unwrap();
            conn.execute("INSERT INTO changes (device_id, tenant, state) VALUES ('old', 'acme', 'blocked')", [])
                .unwrap();
        }
        let r = Registry::open(&path).unwrap();
        let version: i64 =
            Connection::open(&path).unwrap().pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let id = r.authenticate_device(&dev.text, "a@acme.com", "old", now).unwrap();
        assert_eq!((id.generation, id.policies), (0, Policies::default()));
        assert_eq!(r.devices().unwrap()[0].deployment_token_id, None);
        assert_eq!(r.changes_since(0, 10).unwrap().1[0].generation, None);
        // The old token got an id and still activates.
        let a = r.activate(&dt.text, "b@acme.com", "new", now).unwrap();
        assert_eq!(a.deployment_token_id.len(), 16);
        assert!(matches!(r.activate(&dt.text, "a@acme.com", "old", now), Err(RegistryError::DeviceExists)));
        drop(r);
        // Opening it again applies nothing twice.
        Registry::open(&path).unwrap();
    }
}
