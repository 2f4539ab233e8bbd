//! The device registry: tenants' deployment tokens, devices, their state and
//! last check-in, a feed of state changes for storage nodes, admin tokens,
//! quotas and the audit log. Secrets are stored only as hashes.
//!
//! Two backends keep it, behind one [`Registry`] the server holds: an
//! embedded SQLite file (the default; one auth node), and PostgreSQL
//! (`postgres://...`), which several auth nodes share. What is the
//! registry's own (token hashing, the checks an activation or a session
//! passes) is written once here; each backend stores and reads rows, in
//! transactions, with the same outcome for the same calls: one test suite
//! runs against both.

mod fleet;
mod postgres;
mod sqlite;

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};

use super::admin::{AdminIdentity, AdminRole};
use super::token::{self, SecretKind};
use super::DeviceState;
use crate::api::{
    AdminTokenInfo, AuditEntry, DeploymentTokenInfo, DeviceChange, DeviceInfo, NodeReport, Policies, SnapshotRecord,
    TenantInfo, TenantQuota, TenantSnapshots, TenantUsage, UserInfo,
};

pub use fleet::{DeviceBackups, MAX_DEVICE_SNAPSHOTS, MAX_HISTORY_DAYS};

/// Most audit entries one listing returns.
pub const MAX_AUDIT_ENTRIES: u32 = 10_000;

/// Why a registry operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Db(#[from] DbError),
    #[error("registry file: {0}")]
    Io(#[from] std::io::Error),
    /// The registry's database cannot be reached (PostgreSQL down, no
    /// connection free in time): the request may be retried.
    #[error("the registry database is unreachable: {0}")]
    Unavailable(String),
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

/// A failure of the database under the registry.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// The location or the schema cannot be used (a malformed URL, a
    /// schema newer than this build knows, a backend not built in).
    #[error("{0}")]
    Setup(String),
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError::Db(e.into())
    }
}

/// Where the registry lives: `postgres://` or `postgresql://` URLs name a
/// PostgreSQL database (libpq's URL form: `?host=/run/postgresql` for a unix
/// socket, `sslmode`, `options`, ...); anything else is a SQLite file.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryLocation {
    Sqlite(PathBuf),
    Postgres(String),
}

impl RegistryLocation {
    /// Reads a config value or flag.
    pub fn parse(s: &str) -> RegistryLocation {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            RegistryLocation::Postgres(s.to_owned())
        } else {
            RegistryLocation::Sqlite(PathBuf::from(s))
        }
    }
}

/// Shows a URL without its password, so that logs and errors never hold it.
impl fmt::Display for RegistryLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryLocation::Sqlite(path) => write!(f, "{}", path.display()),
            RegistryLocation::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for RegistryLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryLocation({self})")
    }
}

/// `scheme://user:secret@host/...` as `scheme://user:***@host/...`; a
/// `password=` query parameter likewise.
fn redact_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| if kv.starts_with("password=") { "password=***".to_owned() } else { kv.to_owned() })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
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

/// The registry the server holds, whichever backend keeps it. Every method
/// blocks on the database: call it from a blocking context (the server's
/// `spawn_blocking` pool), never from an async task.
pub struct Registry {
    store: Box<dyn Store>,
}

impl Registry {
    /// Opens or creates the SQLite registry at `path` (owner-only) and migrates it.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        Ok(Registry { store: Box::new(sqlite::SqliteStore::open(path)?) })
    }

    /// Opens the registry at `location` and migrates it: a SQLite file, or
    /// a PostgreSQL database that other auth nodes may share (they migrate
    /// it one at a time).
    pub fn connect(location: &RegistryLocation) -> Result<Registry, RegistryError> {
        match location {
            RegistryLocation::Sqlite(path) => Registry::open(path),
            #[cfg(feature = "postgres")]
            RegistryLocation::Postgres(url) => Ok(Registry { store: Box::new(postgres::PgStore::connect(url)?) }),
            #[cfg(not(feature = "postgres"))]
            RegistryLocation::Postgres(_) => {
                Err(DbError::Setup("this build has no PostgreSQL support (cargo feature `postgres`)".into()).into())
            }
        }
    }

    /// The Ed25519 secret that signs session tokens, made on first use.
    /// Auth nodes sharing a registry share it, so storage nodes verify the
    /// sessions of any of them; two nodes making it at once agree on one.
    pub fn signing_secret(&self) -> Result<[u8; 32], RegistryError> {
        self.store.signing_secret(rand::random())
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
        self.store.create_deployment_token(&secret.hash, &id, spec, now)?;
        Ok(NewDeploymentToken { text: secret.text, id })
    }

    /// Activates a device with a deployment token: a new device id, or one
    /// the admin reset. A device id that is active (or blocked, retired,
    /// wiped) is refused: activating again must never take a device's place
    /// silently. A token's `max_activations` holds however many auth nodes
    /// activate with it at once.
    pub fn activate(
        &self,
        deployment_token: &str,
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Activation, RegistryError> {
        let hash =
            token::secret_hash(SecretKind::Deployment, deployment_token).map_err(|_| RegistryError::UnknownToken)?;
        let device = token::new_secret(SecretKind::Device);
        let done = self.store.activate(&hash, email, device_id, &device.hash, now)?;
        Ok(Activation {
            tenant: done.tenant,
            device_token: device.text,
            deployment_token_id: done.token_id,
            change: done.change,
        })
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
        self.store.authenticate_device(&hash, email, device_id, now)
    }

    /// Changes a device's state and appends the change to the check-in feed.
    /// A reset device only leaves that state by activating again
    /// ([`activate`](Self::activate)); use [`reset`](Self::reset) to reset.
    pub fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError> {
        self.store.set_state(device_id, state)
    }

    /// Resets a device: its device token stops working for good (replaced by
    /// random bytes nobody holds), its generation moves on so storage nodes
    /// refuse the sessions it was issued, and the device id may activate
    /// again (with any deployment token, as any user).
    pub fn reset(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        self.store.reset(device_id, &rand::random())
    }

    /// Every device, by tenant and id.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        self.store.devices()
    }

    /// State changes after `cursor` (at most `limit`), and the new cursor.
    /// A cursor never passes a change that is yet to be seen: changes
    /// become visible in the order of their numbers, on every backend.
    pub fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError> {
        self.store.changes_since(cursor, limit)
    }

    /// Provisions users of a tenant (who may activate with its
    /// `provisioned_only` tokens); returns those that were not yet listed.
    pub fn add_users(&self, tenant: &str, emails: &[String], now: DateTime<Utc>) -> Result<Vec<String>, RegistryError> {
        self.store.add_users(tenant, emails, now)
    }

    /// Removes provisioned users; returns those that were listed. Their
    /// devices keep working: retire them to stop that.
    pub fn remove_users(&self, tenant: &str, emails: &[String]) -> Result<Vec<String>, RegistryError> {
        self.store.remove_users(tenant, emails)
    }

    /// A tenant's provisioned users, by email.
    pub fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, RegistryError> {
        self.store.users(tenant)
    }

    /// One device's row.
    pub fn device(&self, device_id: &str) -> Result<DeviceInfo, RegistryError> {
        self.store.device(device_id)
    }

    /// Deletes a retired or wiped device from the registry. Its snapshots
    /// stay. The feed gets a reset in a new generation, so storage nodes
    /// forget its state and keep its old sessions void; the id may then
    /// activate again as a new device.
    pub fn delete_device(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        self.store.delete_device(device_id)
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
        let info = AdminTokenInfo {
            id,
            role,
            tenant: tenant.map(Into::into),
            label: label.map(Into::into),
            created_at: unix(now.timestamp()),
            revoked_at: None,
        };
        self.store.create_admin_token(&secret.hash, &info)?;
        Ok((secret.text, info))
    }

    /// Who an admin token belongs to: unknown and malformed tokens are
    /// `UnknownToken`, revoked ones `Revoked`.
    pub fn authenticate_admin(&self, text: &str) -> Result<AdminIdentity, RegistryError> {
        let hash = token::secret_hash(SecretKind::Admin, text).map_err(|_| RegistryError::UnknownToken)?;
        AdminRow::check(self.store.admin_by_hash(&hash)?, &hash)
    }

    /// Every admin token, oldest first (never a secret or hash).
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, RegistryError> {
        self.store.admin_tokens()
    }

    /// One admin token's row.
    pub fn admin_token(&self, id: &str) -> Result<AdminTokenInfo, RegistryError> {
        self.store.admin_token(id)
    }

    /// Revokes an admin token (at once: every request looks it up).
    pub fn revoke_admin_token(&self, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.store.revoke(TokenTable::Admin, id, now)
    }

    /// Every deployment token, by tenant and creation (never a secret).
    pub fn deployment_tokens(&self) -> Result<Vec<DeploymentTokenInfo>, RegistryError> {
        self.store.deployment_tokens()
    }

    /// One deployment token's row.
    pub fn deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, RegistryError> {
        self.store.deployment_token(id)
    }

    /// Revokes a deployment token: it activates nothing from now on (the
    /// devices it activated keep working).
    pub fn revoke_deployment_token(&self, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.store.revoke(TokenTable::Deployment, id, now)
    }

    /// Sets a tenant's quota in bytes (0: none).
    pub fn set_quota(&self, tenant: &str, quota_bytes: u64) -> Result<(), RegistryError> {
        self.store.set_quota(tenant, i64::try_from(quota_bytes).unwrap_or(i64::MAX))
    }

    /// Every tenant with a quota.
    pub fn quotas(&self) -> Result<Vec<TenantQuota>, RegistryError> {
        self.store.quotas()
    }

    /// Records what a storage node reported its tenants store (the latest
    /// report wins: nodes sharing a store report the same repositories).
    pub fn record_usage(&self, usage: &[TenantUsage], now: DateTime<Utc>) -> Result<(), RegistryError> {
        // One order for every writer, so that two nodes' reports never
        // wait on each other's rows in a cycle.
        // A tenant named twice: the last report of it wins.
        let by_tenant: std::collections::BTreeMap<&str, &TenantUsage> =
            usage.iter().map(|u| (u.tenant.as_str(), u)).collect();
        let usage: Vec<TenantUsage> = by_tenant.into_values().cloned().collect();
        self.store.record_usage(&usage, now)
    }

    /// Every tenant the registry knows (from deployment tokens, devices,
    /// quotas or usage reports), with its device count, last reported
    /// usage and quota.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, RegistryError> {
        self.store.tenants()
    }

    /// Appends an entry to the audit log.
    pub fn record_audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        self.store.record_audit(entry)
    }

    /// The audit log, newest first: of one tenant (entries without a
    /// tenant are left out then), at or after `since`, at most `limit`.
    pub fn audit_log(
        &self,
        tenant: Option<&str>,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, RegistryError> {
        self.store.audit_log(tenant, since.map_or(i64::MIN, |t| t.timestamp()), limit.min(MAX_AUDIT_ENTRIES))
    }

    /// The stored hash of an admin token, for tests that look for secrets.
    #[cfg(test)]
    fn admin_token_hash(&self, id: &str) -> Vec<u8> {
        self.store.admin_token_hash(id).expect("admin token hash")
    }
}

/// What a backend keeps and how: rows in transactions. Every method has the
/// meaning of [`Registry`]'s method of the same name; secrets arrive hashed
/// and random values made, so a backend decides nothing but what its
/// database must (which row is locked, in which order changes are numbered).
trait Store: Send + Sync {
    /// Stores `fresh` unless a secret is there already; returns the stored one.
    fn signing_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], RegistryError>;
    fn create_deployment_token(
        &self,
        hash: &[u8; 32],
        id: &str,
        spec: &DeploymentTokenSpec,
        now: DateTime<Utc>,
    ) -> Result<(), RegistryError>;
    /// In one transaction: the token's row (locked against other
    /// activations with it), [`DeploymentRow::check`], the user list for a
    /// provisioned-only token, the device id's row (locked), [`plan_activation`],
    /// then the device row, the token's count, the feed and the audit log.
    fn activate(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        device_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Activated, RegistryError>;
    /// [`DeviceRow::verify`], the check-in time, then [`DeviceRow::identity`].
    fn authenticate_device(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<DeviceIdentity, RegistryError>;
    fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError>;
    /// `dead`: the random bytes that replace the device token's hash.
    fn reset(&self, device_id: &str, dead: &[u8; 32]) -> Result<DeviceChange, RegistryError>;
    fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError>;
    fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError>;
    fn add_users(&self, tenant: &str, emails: &[String], now: DateTime<Utc>) -> Result<Vec<String>, RegistryError>;
    fn remove_users(&self, tenant: &str, emails: &[String]) -> Result<Vec<String>, RegistryError>;
    fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, RegistryError>;
    fn device(&self, device_id: &str) -> Result<DeviceInfo, RegistryError>;
    fn delete_device(&self, device_id: &str) -> Result<DeviceChange, RegistryError>;
    fn create_admin_token(&self, hash: &[u8; 32], info: &AdminTokenInfo) -> Result<(), RegistryError>;
    /// The admin token stored under `hash`, unchecked ([`AdminRow::check`]).
    fn admin_by_hash(&self, hash: &[u8; 32]) -> Result<Option<AdminRow>, RegistryError>;
    fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, RegistryError>;
    fn admin_token(&self, id: &str) -> Result<AdminTokenInfo, RegistryError>;
    /// Marks a token revoked; the first revocation's time stays.
    fn revoke(&self, table: TokenTable, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError>;
    fn deployment_tokens(&self) -> Result<Vec<DeploymentTokenInfo>, RegistryError>;
    fn deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, RegistryError>;
    fn set_quota(&self, tenant: &str, quota_bytes: i64) -> Result<(), RegistryError>;
    fn quotas(&self) -> Result<Vec<TenantQuota>, RegistryError>;
    /// `usage` comes sorted by tenant, each tenant once.
    fn record_usage(&self, usage: &[TenantUsage], now: DateTime<Utc>) -> Result<(), RegistryError>;
    fn tenants(&self) -> Result<Vec<TenantInfo>, RegistryError>;
    fn record_audit(&self, entry: &AuditEntry) -> Result<(), RegistryError>;
    /// `since` in unix seconds (`i64::MIN`: all); `limit` already bounded.
    fn audit_log(&self, tenant: Option<&str>, since: i64, limit: u32) -> Result<Vec<AuditEntry>, RegistryError>;
    /// Applies the reports in one transaction; `now` in unix seconds.
    fn record_snapshots(&self, reports: &[TenantSnapshots], now: i64) -> Result<(), RegistryError>;
    fn device_snapshots(&self, tenant: &str, device_id: &str, limit: u32)
        -> Result<Vec<SnapshotRecord>, RegistryError>;
    fn device_backups(&self) -> Result<DeviceBackups, RegistryError>;
    fn logical_bytes(&self) -> Result<std::collections::HashMap<String, u64>, RegistryError>;
    /// The tenant's usage rows for days `first..=last` (day numbers).
    fn usage_rows(&self, tenant: &str, first: i64, last: i64) -> Result<fleet::UsageRows, RegistryError>;
    /// Upserts the node's row and forgets silent ones; `now` in unix seconds.
    fn record_node(&self, node: &NodeReport, cursor: i64, now: i64) -> Result<(), RegistryError>;
    /// Every node's row, by name.
    fn storage_nodes(&self) -> Result<Vec<fleet::NodeRow>, RegistryError>;
    fn latest_change(&self) -> Result<u64, RegistryError>;
    #[cfg(test)]
    fn admin_token_hash(&self, id: &str) -> Result<Vec<u8>, RegistryError>;
}

/// The two tables of revocable tokens.
#[derive(Clone, Copy, Debug)]
enum TokenTable {
    Admin,
    Deployment,
}

impl TokenTable {
    /// The table's name: a constant, never input.
    fn name(self) -> &'static str {
        match self {
            TokenTable::Admin => "admin_tokens",
            TokenTable::Deployment => "deployment_tokens",
        }
    }
}

/// What a backend's activation did.
struct Activated {
    tenant: String,
    token_id: String,
    change: Option<DeviceChange>,
}

/// A deployment token's row, as an activation reads it.
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

impl DeploymentRow {
    /// Whether the token may activate one more device now.
    fn check(&self, hash: &[u8; 32], now: DateTime<Utc>) -> Result<(), RegistryError> {
        if !token::hashes_equal(&self.hash, hash) {
            return Err(RegistryError::UnknownToken);
        }
        if self.revoked {
            return Err(RegistryError::Revoked);
        }
        if self.expires_at <= now.timestamp() {
            return Err(RegistryError::Expired);
        }
        if self.max_activations.is_some_and(|m| self.activations >= m) {
            return Err(RegistryError::Exhausted);
        }
        Ok(())
    }
}

/// The device id's row, as an activation finds it.
struct ExistingDevice {
    tenant: String,
    state: String,
    generation: u32,
}

/// What an activation does with the device id.
enum ActivationPlan {
    /// A new row, in the generation after the id's last one in the feed
    /// (an id the admin deleted), at least 1.
    Insert,
    /// The admin reset this id: it starts over, possibly for another user
    /// or tenant, in the generation the reset began.
    Reactivate { generation: u32 },
}

/// Decides what an activation with a token of `tenant` does with a device
/// id: a new or reset id activates; any other is refused.
fn plan_activation(existing: Option<ExistingDevice>, tenant: &str) -> Result<ActivationPlan, RegistryError> {
    match existing {
        None => Ok(ActivationPlan::Insert),
        Some(d) if d.state == DeviceState::Reset.as_str() => {
            Ok(ActivationPlan::Reactivate { generation: d.generation })
        }
        Some(d) if d.tenant != tenant => Err(RegistryError::Conflict),
        Some(d) => {
            let state: DeviceState = d.state.parse().map_err(|_| RegistryError::Conflict)?;
            Err(match state {
                DeviceState::Active => RegistryError::DeviceExists,
                other => RegistryError::State(other),
            })
        }
    }
}

/// The generation a new row of a device id starts in: the one its deletion
/// began (so the storage nodes' floor lets it in), at least 1.
fn first_generation(last_in_feed: Option<u32>) -> u32 {
    last_in_feed.unwrap_or(1).max(1)
}

/// A device's row, as a session request reads it.
struct DeviceRow {
    token_hash: Vec<u8>,
    tenant: String,
    email: String,
    state: String,
    generation: u32,
    policies: Policies,
}

impl DeviceRow {
    /// The token must be this device's, and the email the one it activated with.
    fn verify(&self, hash: &[u8; 32], email: &str) -> Result<(), RegistryError> {
        if !token::hashes_equal(&self.token_hash, hash) || self.email != email {
            return Err(RegistryError::UnknownToken);
        }
        Ok(())
    }

    /// Who the device is, if it may start a session.
    fn identity(self, device_id: &str) -> Result<DeviceIdentity, RegistryError> {
        let state: DeviceState = self.state.parse().map_err(|_| RegistryError::UnknownToken)?;
        if state != DeviceState::Active {
            return Err(RegistryError::State(state));
        }
        Ok(DeviceIdentity {
            tenant: self.tenant,
            email: self.email,
            device_id: device_id.into(),
            generation: self.generation,
            policies: self.policies,
        })
    }
}

/// Refuses a state change an admin may not make: "allow" must not make a
/// reset device active without an activation (it would hold the id with
/// no token that works), and a reset goes through [`Registry::reset`].
fn check_state_change(current: &str, state: DeviceState) -> Result<(), RegistryError> {
    if state == DeviceState::Reset || (state == DeviceState::Active && current == DeviceState::Reset.as_str()) {
        return Err(RegistryError::State(DeviceState::Reset));
    }
    Ok(())
}

/// Refuses to delete a device that is not retired or wiped.
fn check_deletable(state: &str) -> Result<(), RegistryError> {
    let state: DeviceState = state.parse().map_err(|_| RegistryError::NoSuchDevice)?;
    if !matches!(state, DeviceState::Retired | DeviceState::Wiped) {
        return Err(RegistryError::NotRetired(state));
    }
    Ok(())
}

/// An admin token's row, as authentication reads it.
struct AdminRow {
    hash: Vec<u8>,
    id: String,
    role: String,
    tenant: Option<String>,
    revoked: bool,
}

impl AdminRow {
    /// The identity of the token stored under `hash` (`None`: no such
    /// token), if the hash matches and it is not revoked.
    fn check(row: Option<AdminRow>, hash: &[u8; 32]) -> Result<AdminIdentity, RegistryError> {
        let row = row.ok_or(RegistryError::UnknownToken)?;
        if !token::hashes_equal(&row.hash, hash) {
            return Err(RegistryError::UnknownToken);
        }
        if row.revoked {
            return Err(RegistryError::Revoked);
        }
        let role = row.role.parse().map_err(|_| RegistryError::UnknownToken)?;
        Ok(AdminIdentity { id: row.id, role, tenant: row.tenant })
    }
}

/// The audit entry of an activation.
fn activation_audit(now: DateTime<Utc>, device_id: &str, email: &str, row: &DeploymentRow) -> AuditEntry {
    AuditEntry {
        at: now,
        actor: "device".into(),
        action: "activate".into(),
        target: device_id.into(),
        tenant: Some(row.tenant.clone()),
        detail: format!("{email} with deployment token {}", row.token_id),
    }
}

fn change(device_id: &str, tenant: &str, state: DeviceState, generation: Option<u32>) -> DeviceChange {
    DeviceChange { device_id: device_id.into(), tenant: tenant.into(), state: state.as_str().into(), generation }
}

fn unix(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

/// A stored count as the API's `u32` (never negative; huge ones saturate).
fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
