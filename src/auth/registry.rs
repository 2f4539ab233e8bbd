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
use crate::api::{DeviceChange, DeviceInfo};

/// Migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

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
    #[error("device id is registered to another user or tenant")]
    Conflict,
    #[error("no such device")]
    NoSuchDevice,
}

/// hash, tenant, expires_at, max_activations, activations.
type DeploymentRow = (Vec<u8>, String, i64, Option<u32>, u32);

/// Who a device token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub tenant: String,
    pub email: String,
    pub device_id: String,
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

    /// Creates a mass deployment token; returns its text (shown once).
    pub fn create_deployment_token(
        &self,
        tenant: &str,
        expires_at: DateTime<Utc>,
        max_activations: Option<u32>,
        now: DateTime<Utc>,
    ) -> Result<String, RegistryError> {
        let secret = token::new_secret(SecretKind::Deployment);
        self.conn.lock().expect("registry lock").execute(
            "INSERT INTO deployment_tokens (hash, tenant, expires_at, max_activations, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![&secret.hash[..], tenant, expires_at.timestamp(), max_activations, now.timestamp()],
        )?;
        Ok(secret.text)
    }

    /// Activates a device with a deployment token; returns the tenant and a
    /// new device token. Re-activating an active device replaces its token.
    pub fn activate(
        &self,
        deployment_token: &str,
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(String, String), RegistryError> {
        let hash =
            token::secret_hash(SecretKind::Deployment, deployment_token).map_err(|_| RegistryError::UnknownToken)?;
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let row: Option<DeploymentRow> = tx
            .query_row(
                "SELECT hash, tenant, expires_at, max_activations, activations FROM deployment_tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((stored, tenant, expires_at, max, used)) = row else {
            return Err(RegistryError::UnknownToken);
        };
        if !token::hashes_equal(&stored, &hash) {
            return Err(RegistryError::UnknownToken);
        }
        if expires_at <= now.timestamp() {
            return Err(RegistryError::Expired);
        }
        if max.is_some_and(|m| used >= m) {
            return Err(RegistryError::Exhausted);
        }
        let existing: Option<(String, String, String)> = tx
            .query_row("SELECT tenant, email, state FROM devices WHERE device_id = ?1", params![device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((t, e, state)) = existing {
            if t != tenant || e != email {
                return Err(RegistryError::Conflict);
            }
            let state: DeviceState = state.parse().map_err(|_| RegistryError::Conflict)?;
            if state != DeviceState::Active {
                return Err(RegistryError::State(state));
            }
        }
        let device = token::new_secret(SecretKind::Device);
        tx.execute(
            "INSERT INTO devices (device_id, tenant, email, token_hash, state, activated_at)
             VALUES (?1, ?2, ?3, ?4, 'active', ?5)
             ON CONFLICT (device_id) DO UPDATE SET token_hash = excluded.token_hash",
            params![device_id, tenant, email, &device.hash[..], now.timestamp()],
        )?;
        tx.execute("UPDATE deployment_tokens SET activations = activations + 1 WHERE hash = ?1", params![&hash[..]])?;
        tx.commit()?;
        Ok((tenant, device.text))
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
        let row: Option<(Vec<u8>, String, String, String)> = conn
            .query_row(
                "SELECT token_hash, tenant, email, state FROM devices WHERE device_id = ?1",
                params![device_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((stored, tenant, stored_email, state)) = row else {
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
        Ok(DeviceIdentity { tenant, email: stored_email, device_id: device_id.into() })
    }

    /// Changes a device's state and appends the change to the check-in feed.
    pub fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError> {
        let mut conn = self.conn.lock().expect("registry lock");
        let tx = conn.transaction()?;
        let tenant: String = tx
            .query_row("SELECT tenant FROM devices WHERE device_id = ?1", params![device_id], |r| r.get(0))
            .optional()?
            .ok_or(RegistryError::NoSuchDevice)?;
        tx.execute("UPDATE devices SET state = ?1 WHERE device_id = ?2", params![state.as_str(), device_id])?;
        tx.execute(
            "INSERT INTO changes (device_id, tenant, state) VALUES (?1, ?2, ?3)",
            params![device_id, tenant, state.as_str()],
        )?;
        tx.commit()?;
        Ok(DeviceChange { device_id: device_id.into(), tenant, state: state.as_str().into() })
    }

    /// Every device, by tenant and id.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt = conn.prepare(
            "SELECT device_id, tenant, email, state, activated_at, last_seen FROM devices ORDER BY tenant, device_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceInfo {
                device_id: r.get(0)?,
                tenant: r.get(1)?,
                email: r.get(2)?,
                state: r.get(3)?,
                activated_at: unix(r.get(4)?),
                last_seen: r.get::<_, Option<i64>>(5)?.map(unix),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// State changes after `cursor` (at most `limit`), and the new cursor.
    pub fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError> {
        let conn = self.conn.lock().expect("registry lock");
        let mut stmt =
            conn.prepare("SELECT seq, device_id, tenant, state FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let mut last = cursor;
        let rows = stmt.query_map(params![cursor as i64, limit], |r| {
            Ok((r.get::<_, i64>(0)?, DeviceChange { device_id: r.get(1)?, tenant: r.get(2)?, state: r.get(3)? }))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (seq, change) = row?;
            last = seq as u64;
            changes.push(change);
        }
        Ok((last, changes))
    }
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
        let dt = r.create_deployment_token("acme", now + chrono::Duration::hours(1), Some(2), now).unwrap();
        let (tenant, device_token) = r.activate(&dt, "a@acme.com", "phone", now).unwrap();
        assert_eq!(tenant, "acme");
        let id = r.authenticate_device(&device_token, "a@acme.com", "phone", now).unwrap();
        assert_eq!(id.tenant, "acme");
        // Wrong email, wrong device, other kind of token: all unknown.
        assert!(matches!(
            r.authenticate_device(&device_token, "b@acme.com", "phone", now),
            Err(RegistryError::UnknownToken)
        ));
        assert!(matches!(
            r.authenticate_device(&device_token, "a@acme.com", "tablet", now),
            Err(RegistryError::UnknownToken)
        ));
        assert!(matches!(r.authenticate_device(&dt, "a@acme.com", "phone", now), Err(RegistryError::UnknownToken)));
        // The same device id for another user conflicts.
        assert!(matches!(r.activate(&dt, "b@acme.com", "phone", now), Err(RegistryError::Conflict)));
        r.activate(&dt, "b@acme.com", "tablet", now).unwrap();
        assert!(matches!(r.activate(&dt, "c@acme.com", "laptop", now), Err(RegistryError::Exhausted)));

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
    }

    #[test]
    fn expired_and_unknown_deployment_tokens_are_refused() {
        let (_d, r) = registry();
        let now = Utc::now();
        let dt = r.create_deployment_token("acme", now, None, now).unwrap();
        assert!(matches!(r.activate(&dt, "a@b.c", "d", now), Err(RegistryError::Expired)));
        let fresh = token::new_secret(SecretKind::Deployment).text;
        assert!(matches!(r.activate(&fresh, "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
        assert!(matches!(r.activate("garbage", "a@b.c", "d", now), Err(RegistryError::UnknownToken)));
    }
}
