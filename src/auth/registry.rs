//! The device registry: tenants' deployment tokens, devices, their state and
//! last check-in, and a feed of state changes for storage nodes. One SQLite
//! file, owner-only, migrated in code. Secrets are stored only as hashes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::token::{self, SecretKind};
use super::DeviceState;
use crate::api::{DeviceChange, DeviceInfo, Policies, UserInfo};

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
];

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
                        allow_restore_to_other_device, allow_open_in
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
                tx.execute(
                    "INSERT INTO devices (device_id, tenant, email, token_hash, state, activated_at,
                         deployment_token_id, generation, allow_restore_to_other_device, allow_open_in)
                     VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?6, 1, ?7, ?8)",
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
        let mut stmt = conn.prepare(
            "SELECT device_id, tenant, email, state, activated_at, last_seen, deployment_token_id,
                    allow_restore_to_other_device, allow_open_in
             FROM devices ORDER BY tenant, device_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceInfo {
                device_id: r.get(0)?,
                tenant: r.get(1)?,
                email: r.get(2)?,
                state: r.get(3)?,
                activated_at: unix(r.get(4)?),
                last_seen: r.get::<_, Option<i64>>(5)?.map(unix),
                deployment_token_id: r.get(6)?,
                policies: Policies { allow_restore_to_other_device: r.get(7)?, allow_open_in: r.get(8)? },
            })
        })?;
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
