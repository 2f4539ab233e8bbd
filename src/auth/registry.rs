//! The device registry: tenants' deployment tokens, devices, their state and
//! last check-in, and a feed of state changes for storage nodes. One SQLite
//! file, owner-only, migrated in code. Secrets are stored only as hashes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::admin::{AdminIdentity, AdminRole};
use super::token::{self, SecretKind};
use super::DeviceState;
use crate::api::{
    AdminTokenInfo, AuditEntry, DeploymentTokenInfo, DeviceChange, DeviceInfo, Policies, TenantInfo, TenantQuota,
    TenantUsage, UserInfo,
};

mod fleet;
pub use fleet::{DeviceBackups, MAX_DEVICE_SNAPSHOTS, MAX_HISTORY_DAYS};

/// Migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Never edit one that shipped: registries in the field have run it.
const MIGRATIONS: &[&str] = &[
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
        tenant TEXT NOT NULL, snapshot_id TEXT NOT NULL, device_id TEXT, user TEXT, time INTEGER NOT NULL,
        files INTEGER NOT NULL, bytes INTEGER NOT NULL, removed_at INTEGER, stale INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, snapshot_id));
    CREATE INDEX snapshots_device ON snapshots (tenant, device_id, time);
    CREATE INDEX snapshots_time ON snapshots (tenant, time);
    CREATE TABLE usage_days (
        tenant TEXT NOT NULL, day INTEGER NOT NULL, stored_bytes INTEGER NOT NULL, PRIMARY KEY (tenant, day));
    CREATE TABLE storage_nodes (
        name TEXT PRIMARY KEY, auth_unreachable TEXT NOT NULL, checkin_interval_secs INTEGER NOT NULL,
        version TEXT NOT NULL, cursor INTEGER NOT NULL, checked_in_at INTEGER NOT NULL);
"#,
];

/// Most audit entries one listing returns.
pub const MAX_AUDIT_ENTRIES: u32 = 10_000;

/// Why a registry operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("registry file: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown or malformed token")]
    UnknownToken,
    #[error("deployment token expired")]
    Expired,
    #[error("deployment token has no activations left")]
    Exhausted,
    #[error("device is {0}")]
    State(DeviceState),
    #[error("device id is registered to another tenant")]
    Conflict,
    #[error("this device id is already active; the admin must reset it before it activates again")]
    DeviceExists,
    #[error("this deployment token activates only users the admin provisioned")]
    UserNotProvisioned,
    #[error("no such device")]
    NoSuchDevice,
    #[error("this token was revoked")]
    Revoked,
    #[error("no such token")]
    NoSuchToken,
    /// Only a retired or wiped device may be deleted.
    #[error("device is {0}: retire or wipe it before deleting it")]
    NotRetired(DeviceState),
}

/// What a new deployment token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentTokenSpec {
    pub tenant: String,
    pub expires_at: DateTime<Utc>,
    pub max_activations: Option<u32>,
    pub policies: Policies,
    pub provisioned_only: bool,
}

/// A deployment token just made: `text` is shown once and never stored.
pub struct NewDeploymentToken {
    pub text: String,
    /// Public name of the token (random, unrelated to the secret).
    pub id: String,
}

/// A successful activation.
pub struct Activation {
    pub tenant: String,
    pub device_token: String,
    /// The id of the deployment token used.
    pub deployment_token_id: String,
    /// For a device id activated again after a reset: the change storage
    /// nodes must learn (the device is active again, in a new generation).
    pub change: Option<DeviceChange>,
}

/// A deployment token's row.
struct DeploymentRow {
    hash: Vec<u8>,
    tenant: String,
    expires_at: i64,
    max_activations: Option<u32>,
    activations: u32,
    token_id: String,
    provisioned_only: bool,
    policies: Policies,
    revoked: bool,
}

/// Who a device token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub tenant: String,
    pub email: String,
    pub device_id: String,
    /// Which activation of the device id this is (see [`Registry::reset`]).
    pub generation: u32,
    pub policies: Policies,
}

/// The registry; one connection behind a mutex (SQLite serializes writes anyway).
pub struct Registry {
    conn: Mutex<Connection>,
}

impl Registry {
    /// Opens or creates the registry at `path` (owner-only) and migrates it.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let registry = Registry { conn: Mutex::new(conn) };
        registry.migrate()?;
        Ok(registry)
    }

    fn migrate(&self) -> Result<(), RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The Ed25519 secret that signs session tokens, made on first use.
    pub fn signing_secret(&self) -> Result<[u8; 32], RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let existing: Option<Vec<u8>> =
            conn.query_row("SELECT secret FROM server_key WHERE id = 1", [], |r| r.get(0)).optional()?;
        if let Some(secret) = existing.and_then(|s| <[u8; 32]>::try_from(s).ok()) {
            return Ok(secret);
        }
        let secret: [u8; 32] = rand::random();
        conn.execute("INSERT OR REPLACE INTO server_key (id, secret) VALUES (1, ?1)", params![&secret[..]])?;
        Ok(secret)
    }

    /// Creates a mass deployment token; returns its text (shown once) and id.
    pub fn create_deployment_token(
        &self,
        spec: &DeploymentTokenSpec,
        now: DateTime<Utc>,
    ) -> Result<NewDeploymentToken, RegistryError> {
        let secret = token::new_secret(SecretKind::Deployment);
        // A separate random id, so that naming a token (in the device list,
        // in logs) says nothing about its secret.
        let id = hex::encode(rand::random::<[u8; 8]>());
        self.conn.lock().expect("registry lock").execute(
            "INSERT INTO deployment_tokens (hash, tenant, expires_at, max_activations, created_at, token_id,
                 provisioned_only, allow_restore_to_other_device, allow_open_in)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                &secret.hash[..],
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
        Ok(NewDeploymentToken { text: secret.text, id })
    }

    /// Activates a device with a deployment token: a new device id, or one
    /// the admin reset. A device id that is active (or blocked, retired,
    /// wiped) is refused: activating again must never take a device's place
    /// silently.
    pub fn activate(
        &self,
        deployment_token: &str,
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Activation, RegistryError> {
        let hash =
            token::secret_hash(SecretKind::Deployment, deployment_token).map_err(|_| RegistryError::UnknownToken)?;
        let mut conn = self.conn.lock().expect("registry lock");
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
        let Some(dt) = row else {
            return Err(RegistryError::UnknownToken);
        };
        if !token::hashes_equal(&dt.hash, &hash) {
            return Err(RegistryError::UnknownToken);
        }
        if dt.revoked {
            return Err(RegistryError::Revoked);
        }
        if dt.expires_at <= now.timestamp() {
            return Err(RegistryError::Expired);
        }
        if dt.max_activations.is_some_and(|m| dt.activations >= m) {
            return Err(RegistryError::Exhausted);
        }
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
        let existing: Option<(String, String, u32)> = tx
            .query_row("SELECT tenant, state, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let device = token::new_secret(SecretKind::Device);
        let p = dt.policies;
        let change = match existing {
            None => {
                // An id the admin deleted starts in the generation its
                // deletion began, so the storage nodes' floor lets it in.
                let generation: Option<u32> = tx.query_row(
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
                        &device.hash[..],
                        now.timestamp(),
                        dt.token_id,
                        p.allow_restore_to_other_device,
                        p.allow_open_in,
                        generation.unwrap_or(1).max(1),
                    ],
                )?;
                None
            }
            Some((_, state, generation)) if state == DeviceState::Reset.as_str() => {
                // The admin released this id: it starts over, possibly for
                // another user or tenant, in the generation the reset began.
                tx.execute(
                    "UPDATE devices SET tenant = ?2, email = ?3, token_hash = ?4, state = 'active', activated_at = ?5,
                         last_seen = NULL, deployment_token_id = ?6, allow_restore_to_other_device = ?7,
                         allow_open_in = ?8
                     WHERE device_id = ?1",
                    params![
                        device_id,
                        dt.tenant,
                        email,
                        &device.hash[..],
                        now.timestamp(),
                        dt.token_id,
                        p.allow_restore_to_other_device,
                        p.allow_open_in
                    ],
                )?;
                Some(append_change(&tx, device_id, &dt.tenant, DeviceState::Active, Some(generation))?)
            }
            Some((tenant, _, _)) if tenant != dt.tenant => return Err(RegistryError::Conflict),
            Some((_, state, _)) => {
                let state: DeviceState = state.parse().map_err(|_| RegistryError::Conflict)?;
                return Err(match state {
                    DeviceState::Active => RegistryError::DeviceExists,
                    other => RegistryError::State(other),
                });
            }
        };
        tx.execute("UPDATE deployment_tokens SET activations = activations + 1 WHERE hash = ?1", params![&hash[..]])?;
        let detail = format!("{email} with deployment token {}", dt.token_id);
        insert_audit(&tx, now, "device", "activate", device_id, Some(&dt.tenant), &detail)?;
        tx.commit()?;
        Ok(Activation { tenant: dt.tenant, device_token: device.text, deployment_token_id: dt.token_id, change })
    }

    /// Checks a device token for a new session and records the check-in.
    pub fn authenticate_device(
        &self,
        device_token: &str,
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<DeviceIdentity, RegistryError> {
        let hash = token::secret_hash(SecretKind::Device, device_token).map_err(|_| RegistryError::UnknownToken)?;
        let conn = self.conn.lock().expect("registry lock");
        type Row = (Vec<u8>, String, String, String, u32, bool, bool);
        let row: Option<Row> = conn
            .query_row(
                "SELECT token_hash, tenant, email, state, generation, allow_restore_to_other_device, allow_open_in
                 FROM devices WHERE device_id = ?1",
                params![device_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )
            .optional()?;
        let Some((stored, tenant, stored_email, state, generation, restore_other, open_in)) = row else {
            return Err(RegistryError::UnknownToken);
        };
        // The token must be this device's, and the email the one it activated with.
        if !token::hashes_equal(&stored, &hash) || stored_email != email {
            return Err(RegistryError::UnknownToken);
        }
        conn.execute("UPDATE devices SET last_seen = ?1 WHERE device_id = ?2", params![now.timestamp(), device_id])?;
        let state: DeviceState = state.parse().map_err(|_| RegistryError::UnknownToken)?;
        if state != DeviceState::Active {
            return Err(RegistryError::State(state));
        }
        let policies = Policies { allow_restore_to_other_device: restore_other, allow_open_in: open_in };
        Ok(DeviceIdentity { tenant, email: stored_email, device_id: device_id.into(), generation, policies })
    }

    /// Changes a device's state and appends the change to the check-in feed.
    /// A reset device only leaves that state by activating again
    /// ([`activate`](Self::activate)); use [`reset`](Self::reset) to reset.
    pub fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let (tenant, current): (String, String) = tx
            .query_row("SELECT tenant, state FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        // "allow" must not make a reset device active without an activation:
        // it would hold the id with no token that works.
        if state == DeviceState::Reset || (state == DeviceState::Active && current == DeviceState::Reset.as_str()) {
            return Err(RegistryError::State(DeviceState::Reset));
        }
        tx.execute("UPDATE devices SET state = ?1 WHERE device_id = ?2", params![state.as_str(), device_id])?;
        let change = append_change(&tx, device_id, &tenant, state, None)?;
        tx.commit()?;
        Ok(change)
    }

    /// Resets a device: its device token stops working for good (replaced by
    /// random bytes nobody holds), its generation moves on so storage nodes
    /// refuse the sessions it was issued, and the device id may activate
    /// again (with any deployment token, as any user).
    pub fn reset(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let (tenant, generation): (String, u32) = tx
            .query_row("SELECT tenant, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        let generation = generation.saturating_add(1);
        let dead: [u8; 32] = rand::random();
        tx.execute(
            "UPDATE devices SET state = ?2, generation = ?3, token_hash = ?4 WHERE device_id = ?1",
            params![device_id, DeviceState::Reset.as_str(), generation, &dead[..]],
        )?;
        let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(generation))?;
        tx.commit()?;
        Ok(change)
    }

    /// Every device, by tenant and id.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(&format!("{DEVICE_COLUMNS} ORDER BY tenant, device_id"))?;
        let rows = stmt.query_map([], device_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// State changes after `cursor` (at most `limit`), and the new cursor.
    pub fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT seq, device_id, tenant, state, generation FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut last = cursor;
        let rows = stmt.query_map(params![cursor as i64, limit], |r| {
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

    /// Provisions users of a tenant (who may activate with its
    /// `provisioned_only` tokens); returns those that were not yet listed.
    pub fn add_users(&self, tenant: &str, emails: &[String], now: DateTime<Utc>) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let mut added = Vec::new();
        for email in emails {
            let n = tx.execute(
                "INSERT OR IGNORE INTO users (tenant, email, added_at) VALUES (?1, ?2, ?3)",
                params![tenant, email, now.timestamp()],
            )?;
            if n > 0 {
                added.push(email.clone());
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// Removes provisioned users; returns those that were listed. Their
    /// devices keep working: retire them to stop that.
    pub fn remove_users(&self, tenant: &str, emails: &[String]) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
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

    /// A tenant's provisioned users, by email.
    pub fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare("SELECT email, added_at FROM users WHERE tenant = ?1 ORDER BY email")?;
        let rows = stmt.query_map(params![tenant], |r| Ok(UserInfo { email: r.get(0)?, added_at: unix(r.get(1)?) }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One device's row.
    pub fn device(&self, device_id: &str) -> Result<DeviceInfo, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let sql = format!("{DEVICE_COLUMNS} WHERE device_id = ?1");
        conn.query_row(&sql, params![device_id], device_row).optional()?.ok_or(RegistryError::NoSuchDevice)
    }

    /// Deletes a retired or wiped device from the registry. Its snapshots
    /// stay. The feed gets a reset in a new generation, so storage nodes
    /// forget its state and keep its old sessions void; the id may then
    /// activate again as a new device.
    pub fn delete_device(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let (tenant, state, generation): (String, String, u32) = tx
            .query_row("SELECT tenant, state, generation FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        let state: DeviceState = state.parse().map_err(|_| RegistryError::NoSuchDevice)?;
        if !matches!(state, DeviceState::Retired | DeviceState::Wiped) {
            return Err(RegistryError::NotRetired(state));
        }
        tx.execute("DELETE FROM devices WHERE device_id = ?1", params![device_id])?;
        let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(generation.saturating_add(1)))?;
        tx.commit()?;
        Ok(change)
    }

    /// Makes a scoped admin token; returns its text (shown once) and row.
    pub fn create_admin_token(
        &self,
        role: AdminRole,
        tenant: Option<&str>,
        label: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(String, AdminTokenInfo), RegistryError> {
        let secret = token::new_secret(SecretKind::Admin);
        let id = hex::encode(rand::random::<[u8; 8]>());
        self.conn.lock().expect("registry lock").execute(
            "INSERT INTO admin_tokens (token_id, hash, role, tenant, label, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, &secret.hash[..], role.as_str(), tenant, label, now.timestamp()],
        )?;
        let info = AdminTokenInfo {
            id,
            role,
            tenant: tenant.map(Into::into),
            label: label.map(Into::into),
            created_at: unix(now.timestamp()),
            revoked_at: None,
        };
        Ok((secret.text, info))
    }

    /// Who an admin token belongs to: unknown and malformed tokens are
    /// `UnknownToken`, revoked ones `Revoked`.
    pub fn authenticate_admin(&self, text: &str) -> Result<AdminIdentity, RegistryError> {
        let hash = token::secret_hash(SecretKind::Admin, text).map_err(|_| RegistryError::UnknownToken)?;
        let conn = self.conn.lock().expect("registry lock");
        // hash, id, role, tenant, revoked at
        type Row = (Vec<u8>, String, String, Option<String>, Option<i64>);
        let row: Option<Row> = conn
            .query_row(
                "SELECT hash, token_id, role, tenant, revoked_at FROM admin_tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((stored, id, role, tenant, revoked)) = row else {
            return Err(RegistryError::UnknownToken);
        };
        if !token::hashes_equal(&stored, &hash) {
            return Err(RegistryError::UnknownToken);
        }
        if revoked.is_some() {
            return Err(RegistryError::Revoked);
        }
        let role = role.parse().map_err(|_| RegistryError::UnknownToken)?;
        Ok(AdminIdentity { id, role, tenant })
    }

    /// Every admin token, oldest first (never a secret or hash).
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(&format!("{ADMIN_TOKEN_COLUMNS} ORDER BY created_at, token_id"))?;
        let rows = stmt.query_map([], admin_token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One admin token's row.
    pub fn admin_token(&self, id: &str) -> Result<AdminTokenInfo, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let sql = format!("{ADMIN_TOKEN_COLUMNS} WHERE token_id = ?1");
        conn.query_row(&sql, params![id], admin_token_row).optional()?.ok_or(RegistryError::NoSuchToken)
    }

    /// Revokes an admin token (at once: every request looks it up).
    pub fn revoke_admin_token(&self, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.revoke("admin_tokens", id, now)
    }

    /// Marks a token of `table` (a constant, never input) revoked; the
    /// first revocation's time stays.
    fn revoke(&self, table: &'static str, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        let sql = format!("UPDATE {table} SET revoked_at = COALESCE(revoked_at, ?2) WHERE token_id = ?1");
        if self.conn.lock().expect("registry lock").execute(&sql, params![id, now.timestamp()])? == 0 {
            return Err(RegistryError::NoSuchToken);
        }
        Ok(())
    }

    /// Every deployment token, by tenant and creation (never a secret).
    pub fn deployment_tokens(&self) -> Result<Vec<DeploymentTokenInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(&format!("{DEPLOYMENT_TOKEN_COLUMNS} ORDER BY tenant, created_at, token_id"))?;
        let rows = stmt.query_map([], deployment_token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One deployment token's row.
    pub fn deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let sql = format!("{DEPLOYMENT_TOKEN_COLUMNS} WHERE token_id = ?1");
        conn.query_row(&sql, params![id], deployment_token_row).optional()?.ok_or(RegistryError::NoSuchToken)
    }

    /// Revokes a deployment token: it activates nothing from now on (the
    /// devices it activated keep working).
    pub fn revoke_deployment_token(&self, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.revoke("deployment_tokens", id, now)
    }

    /// Sets a tenant's quota in bytes (0: none).
    pub fn set_quota(&self, tenant: &str, quota_bytes: u64) -> Result<(), RegistryError> {
        let quota = i64::try_from(quota_bytes).unwrap_or(i64::MAX);
        self.conn.lock().expect("registry lock").execute(
            "INSERT INTO tenants (tenant, quota_bytes) VALUES (?1, ?2)
             ON CONFLICT (tenant) DO UPDATE SET quota_bytes = ?2",
            params![tenant, quota],
        )?;
        Ok(())
    }

    /// Every tenant with a quota.
    pub fn quotas(&self) -> Result<Vec<TenantQuota>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare("SELECT tenant, quota_bytes FROM tenants WHERE quota_bytes > 0 ORDER BY tenant")?;
        let rows =
            stmt.query_map([], |r| Ok(TenantQuota { tenant: r.get(0)?, quota_bytes: r.get::<_, i64>(1)? as u64 }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records what a storage node reported its tenants store (the latest
    /// report wins: nodes sharing a store report the same repositories).
    pub fn record_usage(&self, usage: &[TenantUsage], now: DateTime<Utc>) -> Result<(), RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
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
            fleet::record_day(&tx, u, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every tenant the registry knows (from deployment tokens, devices,
    /// quotas or usage reports), with its device count, last reported
    /// usage and quota.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
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

    /// Appends an entry to the audit log.
    pub fn record_audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let e = entry;
        insert_audit(&tx, e.at, &e.actor, &e.action, &e.target, e.tenant.as_deref(), &e.detail)?;
        tx.commit()?;
        Ok(())
    }

    /// The audit log, newest first: of one tenant (entries without a
    /// tenant are left out then), at or after `since`, at most `limit`.
    pub fn audit_log(
        &self,
        tenant: Option<&str>,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT at, actor, action, target, tenant, detail FROM audit
             WHERE (?1 IS NULL OR tenant = ?1) AND at >= ?2 ORDER BY seq DESC LIMIT ?3",
        )?;
        let since = since.map_or(i64::MIN, |t| t.timestamp());
        let rows = stmt.query_map(params![tenant, since, limit.min(MAX_AUDIT_ENTRIES)], |r| {
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
        activations: r.get(4)?,
        max_activations: r.get(5)?,
        policies: Policies { allow_restore_to_other_device: r.get(6)?, allow_open_in: r.get(7)? },
        provisioned_only: r.get(8)?,
        revoked: r.get(9)?,
    })
}

/// Appends an audit entry inside a transaction.
fn insert_audit(
    tx: &rusqlite::Transaction<'_>,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    target: &str,
    tenant: Option<&str>,
    detail: &str,
) -> Result<(), RegistryError> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, target, tenant, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![at.timestamp(), actor, action, target, tenant, detail],
    )?;
    Ok(())
}

/// Appends a state change to the check-in feed.
fn append_change(
    tx: &rusqlite::Transaction<'_>,
    device_id: &str,
    tenant: &str,
    state: DeviceState,
    generation: Option<u32>,
) -> Result<DeviceChange, RegistryError> {
    tx.execute(
        "INSERT INTO changes (device_id, tenant, state, generation) VALUES (?1, ?2, ?3, ?4)",
        params![device_id, tenant, state.as_str(), generation],
    )?;
    Ok(DeviceChange { device_id: device_id.into(), tenant: tenant.into(), state: state.as_str().into(), generation })
}

fn unix(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("registry.db")).unwrap();
        (dir, r)
    }

    fn spec(tenant: &str, expires_at: DateTime<Utc>, max_activations: Option<u32>) -> DeploymentTokenSpec {
        DeploymentTokenSpec {
            tenant: tenant.into(),
            expires_at,
            max_activations,
            policies: Policies::default(),
            provisioned_only: false,
        }
    }

    fn hour(now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::Duration::hours(1)
    }

    #[test]
    fn registry_file_is_owner_only_and_reopens_with_same_key() {
        let (dir, r) = registry();
        let secret = r.signing_secret().unwrap();
        drop(r);
        let path = dir.path().join("registry.db");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Registry::open(&path).unwrap().signing_secret().unwrap(), secret);
    }

    #[test]
    fn activation_then_session_then_states() {
        let (_d, r) = registry();
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
        assert!(matches!(
            r.authenticate_device(&dt.text, "a@acme.com", "phone", now),
            Err(RegistryError::UnknownToken)
        ));
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

    #[test]
    fn a_reset_voids_the_old_token_and_lets_the_id_activate_once_more() {
        let (_d, r) = registry();
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

    #[test]
    fn provisioned_only_tokens_activate_only_listed_users() {
        let (_d, r) = registry();
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
        let version: i64 = r.conn.lock().unwrap().pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
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

    #[test]
    fn admin_tokens_are_stored_hashed_and_revoked_ones_refused() {
        let (_d, r) = registry();
        let now = Utc::now();
        let (text, info) = r.create_admin_token(AdminRole::TenantAdmin, Some("acme"), Some("helpdesk"), now).unwrap();
        assert!(text.starts_with("cvad_"));
        let who = r.authenticate_admin(&text).unwrap();
        assert_eq!(
            (who.id.as_str(), who.role, who.tenant.as_deref()),
            (info.id.as_str(), AdminRole::TenantAdmin, Some("acme"))
        );
        // The secret is nowhere in the registry, only its hash.
        let stored: Vec<u8> = r
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT hash FROM admin_tokens WHERE token_id = ?1", params![info.id], |row| row.get(0))
            .unwrap();
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

    #[test]
    fn deployment_tokens_list_without_secrets_and_revoked_ones_activate_nothing() {
        let (_d, r) = registry();
        let now = Utc::now();
        let dt = r.create_deployment_token(&spec("acme", hour(now), Some(5)), now).unwrap();
        r.activate(&dt.text, "a@acme.com", "phone", now).unwrap();
        let listed = r.deployment_tokens().unwrap();
        assert_eq!(listed.len(), 1);
        let t = &listed[0];
        assert_eq!(
            (t.token_id.as_str(), t.activations, t.max_activations, t.revoked),
            (dt.id.as_str(), 1, Some(5), false)
        );
        assert!(!serde_json::to_string(&listed).unwrap().contains(&dt.text[5..]));
        r.revoke_deployment_token(&dt.id, now).unwrap();
        assert!(r.deployment_token(&dt.id).unwrap().revoked);
        assert!(matches!(r.activate(&dt.text, "b@acme.com", "tablet", now), Err(RegistryError::Revoked)));
        // The device it activated keeps working.
        assert_eq!(r.devices().unwrap()[0].state, "active");
        assert!(matches!(r.revoke_deployment_token("nope", now), Err(RegistryError::NoSuchToken)));
    }

    #[test]
    fn only_retired_or_wiped_devices_are_deleted_and_the_id_comes_back_in_a_new_generation() {
        let (_d, r) = registry();
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

    #[test]
    fn tenants_show_devices_usage_and_quotas_and_the_audit_log_filters() {
        let (_d, r) = registry();
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

    #[test]
    fn expired_and_unknown_deployment_tokens_are_refused() {
        let (_d, r) = registry();
        let now = Utc::now();
        let dt = r.create_deployment_token(&spec("acme", now, None), now).unwrap();
        assert!(matches!(r.activate(&dt.text, "a@b.c", "d", now), Err(RegistryError::Expired)));
        let fresh = token::new_secret(SecretKind::Deployment).text;
        assert!(matches!(r.activate(&fresh, "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
        assert!(matches!(r.activate("garbage", "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
    }
}
