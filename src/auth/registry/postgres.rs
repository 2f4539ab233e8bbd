//! The registry on PostgreSQL, which several auth nodes share.
//!
//! tokio-postgres with a deadpool connection pool. The registry's API is
//! blocking (the server calls it on its blocking pool, as it does SQLite),
//! so this backend owns a one-worker tokio runtime that drives the
//! connections, and each call waits on its queries with `block_on`: the
//! caller's thread polls its own queries and the worker does the sockets.
//!
//! What several writers change at once:
//! - an activation locks its deployment token's row (`FOR UPDATE`), so
//!   activations with one token on any number of nodes count one at a
//!   time, and `max_activations` holds; a device id's row is locked too,
//!   and a new id's insert waits on (then yields to) a concurrent one;
//! - every append to the check-in feed first takes the feed's advisory
//!   lock, held to commit, so the feed's numbers become visible in order
//!   and a storage node's cursor never passes a change it has not seen;
//! - the schema is migrated in one transaction under another advisory
//!   lock, so nodes starting together apply each migration once.
//!
//! Migrations are the SQL files of `migrations/postgres/`, compiled in and
//! recorded in the `registry_migrations` table.

#![cfg(feature = "postgres")]

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::fleet::{self, NodeRow, UsageRows};
use super::{
    activation_audit, change, check_deletable, check_state_change, count, first_generation, plan_activation, unix,
    Activated, ActivationPlan, AdminRow, DbError, DeploymentRow, DeploymentTokenSpec, DeviceBackups, DeviceIdentity,
    DeviceRow, ExistingDevice, RegistryError, Store, TokenTable,
};
use crate::api::{
    AdminTokenInfo, AuditEntry, DeploymentTokenInfo, DeviceChange, DeviceInfo, NodeReport, Policies, SnapshotRecord,
    TenantInfo, TenantQuota, TenantSnapshots, TenantUsage, UserInfo,
};
use crate::auth::DeviceState;

/// The schema's migrations, in order: version, file name, SQL. Never edit
/// one that shipped; a new one goes last (and its SQLite twin in
/// `sqlite::MIGRATIONS`).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "0001_registry.sql", include_str!("../../../migrations/postgres/0001_registry.sql")),
    (2, "0002_fleet.sql", include_str!("../../../migrations/postgres/0002_fleet.sql")),
];

/// Advisory lock keys (per database): migrating the schema, and appending
/// to the check-in feed. ASCII "cvmigrat" and "cvfeed".
const MIGRATION_LOCK: i64 = 0x6376_6d69_6772_6174;
const FEED_LOCK: i64 = 0x0000_6376_6665_6564;

/// Connections per auth node. Registry calls are short; a node's blocking
/// pool runs more at once than this, and the rest wait their turn.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free connection, and for a new one to open.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The PostgreSQL backend.
pub(super) struct PgStore {
    pool: Pool,
    /// Drives the connections; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.is_closed() {
            RegistryError::Unavailable(with_causes(&e))
        } else {
            RegistryError::Db(DbError::Postgres(e))
        }
    }
}

impl From<deadpool_postgres::PoolError> for RegistryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RegistryError::Unavailable(with_causes(&e))
    }
}

/// An error and what caused it ("error connecting to server: Connection
/// refused"), each said once. Causes are I/O and protocol errors: no URL.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl PgStore {
    /// Connects to the database at `url` and migrates it.
    pub(super) fn connect(url: &str) -> Result<PgStore, RegistryError> {
        // The parser's message never quotes the URL, which may hold a password.
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| DbError::Setup(format!("the registry's PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("chunkvault");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("registry-postgres")
            .enable_all()
            .build()?;
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(5)))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| DbError::Setup(format!("the registry's connection pool: {e}")))?;
        let store = PgStore { pool, runtime: Some(runtime) };
        store.run(store.migrate())?;
        Ok(store)
    }

    /// Waits for `f` on this thread, with the store's runtime driving the
    /// connections. Never call from an async task (tokio refuses).
    fn run<T>(&self, f: impl Future<Output = Result<T, RegistryError>>) -> Result<T, RegistryError> {
        self.runtime.as_ref().expect("the runtime lives until drop").block_on(f)
    }

    async fn migrate(&self) -> Result<(), RegistryError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Another node migrating holds this until it commits; then this one
        // reads the versions it recorded and has nothing left to do.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS registry_migrations (
                 version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await?;
        let applied: Option<i32> =
            tx.query_one("SELECT MAX(version) FROM registry_migrations", &[]).await?.try_get(0)?;
        let applied = applied.unwrap_or(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if applied > known {
            return Err(DbError::Setup(format!(
                "the registry's schema is at version {applied}, newer than this chunkvault's {known}: upgrade it"
            ))
            .into());
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO registry_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
            tracing::info!("registry: applied PostgreSQL migration {name}");
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The server drops its state inside its own runtime, where dropping
        // a runtime the usual way would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs a statement (prepared once per connection) that returns rows.
async fn rows(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Vec<Row>, RegistryError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query(&stmt, params).await?)
}

async fn row(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Option<Row>, RegistryError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&stmt, params).await?)
}

async fn exec(c: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<u64, RegistryError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.execute(&stmt, params).await?)
}

/// A stored generation (BIGINT) as the API's `u32`.
fn generation(r: &Row, i: usize) -> Result<u32, RegistryError> {
    Ok(count(r.try_get::<_, i64>(i)?))
}

impl Store for PgStore {
    fn signing_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            // Two nodes starting at once: the second insert does nothing,
            // and both read the first one's secret.
            exec(&c, "INSERT INTO server_key (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING", &[&&fresh[..]])
                .await?;
            let stored: Vec<u8> = row(&c, "SELECT secret FROM server_key WHERE id = 1", &[])
                .await?
                .ok_or_else(|| DbError::Setup("the session signing key vanished".into()))?
                .try_get(0)?;
            Ok(<[u8; 32]>::try_from(stored).unwrap_or(fresh))
        })
    }

    fn create_deployment_token(
        &self,
        hash: &[u8; 32],
        id: &str,
        spec: &DeploymentTokenSpec,
        now: DateTime<Utc>,
    ) -> Result<(), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            exec(
                &c,
                "INSERT INTO deployment_tokens (hash, tenant, expires_at, max_activations, created_at, token_id,
                     provisioned_only, allow_restore_to_other_device, allow_open_in)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &&hash[..],
                    &spec.tenant,
                    &spec.expires_at.timestamp(),
                    &spec.max_activations.map(i64::from),
                    &now.timestamp(),
                    &id,
                    &spec.provisioned_only,
                    &spec.policies.allow_restore_to_other_device,
                    &spec.policies.allow_open_in,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn activate(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        device_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Activated, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // Locked until commit: another activation with this token, on
            // any node, waits here and then reads the count this one left.
            let dt = row(
                &tx,
                "SELECT hash, tenant, expires_at, max_activations, activations, token_id, provisioned_only,
                        allow_restore_to_other_device, allow_open_in, revoked_at IS NOT NULL
                 FROM deployment_tokens WHERE hash = $1 FOR UPDATE",
                &[&&hash[..]],
            )
            .await?
            .ok_or(RegistryError::UnknownToken)?;
            let dt = DeploymentRow {
                hash: dt.try_get(0)?,
                tenant: dt.try_get(1)?,
                expires_at: dt.try_get(2)?,
                max_activations: dt.try_get::<_, Option<i64>>(3)?.map(count),
                activations: count(dt.try_get(4)?),
                token_id: dt.try_get(5)?,
                provisioned_only: dt.try_get(6)?,
                policies: Policies { allow_restore_to_other_device: dt.try_get(7)?, allow_open_in: dt.try_get(8)? },
                revoked: dt.try_get(9)?,
            };
            dt.check(hash, now)?;
            if dt.provisioned_only {
                let listed: bool = row(
                    &tx,
                    "SELECT EXISTS (SELECT 1 FROM users WHERE tenant = $1 AND email = $2)",
                    &[&dt.tenant, &email],
                )
                .await?
                .map_or(Ok(false), |r| r.try_get(0))?;
                if !listed {
                    return Err(RegistryError::UserNotProvisioned);
                }
            }
            let p = dt.policies;
            let change = match plan_activation(existing_device(&tx, device_id).await?, &dt.tenant)? {
                ActivationPlan::Insert => {
                    let last: Option<i64> =
                        row(&tx, "SELECT MAX(generation) FROM changes WHERE device_id = $1", &[&device_id])
                            .await?
                            .map_or(Ok(None), |r| r.try_get(0))?;
                    let inserted = exec(
                        &tx,
                        "INSERT INTO devices (device_id, tenant, email, token_hash, state, activated_at,
                             deployment_token_id, generation, allow_restore_to_other_device, allow_open_in)
                         VALUES ($1, $2, $3, $4, 'active', $5, $6, $9, $7, $8)
                         ON CONFLICT (device_id) DO NOTHING",
                        &[
                            &device_id,
                            &dt.tenant,
                            &email,
                            &&device_hash[..],
                            &now.timestamp(),
                            &dt.token_id,
                            &p.allow_restore_to_other_device,
                            &p.allow_open_in,
                            &i64::from(first_generation(last.map(count))),
                        ],
                    )
                    .await?;
                    if inserted == 0 {
                        // Another node activated this id since it was read:
                        // refuse as if it had been there first.
                        plan_activation(existing_device(&tx, device_id).await?, &dt.tenant)?;
                        return Err(RegistryError::DeviceExists);
                    }
                    None
                }
                ActivationPlan::Reactivate { generation } => {
                    exec(
                        &tx,
                        "UPDATE devices SET tenant = $2, email = $3, token_hash = $4, state = 'active',
                             activated_at = $5, last_seen = NULL, deployment_token_id = $6,
                             allow_restore_to_other_device = $7, allow_open_in = $8
                         WHERE device_id = $1",
                        &[
                            &device_id,
                            &dt.tenant,
                            &email,
                            &&device_hash[..],
                            &now.timestamp(),
                            &dt.token_id,
                            &p.allow_restore_to_other_device,
                            &p.allow_open_in,
                        ],
                    )
                    .await?;
                    Some(append_change(&tx, device_id, &dt.tenant, DeviceState::Active, Some(generation)).await?)
                }
            };
            exec(&tx, "UPDATE deployment_tokens SET activations = activations + 1 WHERE hash = $1", &[&&hash[..]])
                .await?;
            insert_audit(&tx, &activation_audit(now, device_id, email, &dt)).await?;
            tx.commit().await?;
            Ok(Activated { tenant: dt.tenant, token_id: dt.token_id, change })
        })
    }

    fn authenticate_device(
        &self,
        hash: &[u8; 32],
        email: &str,
        device_id: &str,
        now: DateTime<Utc>,
    ) -> Result<DeviceIdentity, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let r = row(
                &c,
                "SELECT token_hash, tenant, email, state, generation, allow_restore_to_other_device, allow_open_in
                 FROM devices WHERE device_id = $1",
                &[&device_id],
            )
            .await?
            .ok_or(RegistryError::UnknownToken)?;
            let device = DeviceRow {
                token_hash: r.try_get(0)?,
                tenant: r.try_get(1)?,
                email: r.try_get(2)?,
                state: r.try_get(3)?,
                generation: generation(&r, 4)?,
                policies: Policies { allow_restore_to_other_device: r.try_get(5)?, allow_open_in: r.try_get(6)? },
            };
            device.verify(hash, email)?;
            exec(&c, "UPDATE devices SET last_seen = $1 WHERE device_id = $2", &[&now.timestamp(), &device_id]).await?;
            device.identity(device_id)
        })
    }

    fn set_state(&self, device_id: &str, state: DeviceState) -> Result<DeviceChange, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let r = row(&tx, "SELECT tenant, state FROM devices WHERE device_id = $1 FOR UPDATE", &[&device_id])
                .await?
                .ok_or(RegistryError::NoSuchDevice)?;
            let (tenant, current): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            check_state_change(&current, state)?;
            exec(&tx, "UPDATE devices SET state = $1 WHERE device_id = $2", &[&state.as_str(), &device_id]).await?;
            let change = append_change(&tx, device_id, &tenant, state, None).await?;
            tx.commit().await?;
            Ok(change)
        })
    }

    fn reset(&self, device_id: &str, dead: &[u8; 32]) -> Result<DeviceChange, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let r = row(&tx, "SELECT tenant, generation FROM devices WHERE device_id = $1 FOR UPDATE", &[&device_id])
                .await?
                .ok_or(RegistryError::NoSuchDevice)?;
            let tenant: String = r.try_get(0)?;
            let next = generation(&r, 1)?.saturating_add(1);
            exec(
                &tx,
                "UPDATE devices SET state = $2, generation = $3, token_hash = $4 WHERE device_id = $1",
                &[&device_id, &DeviceState::Reset.as_str(), &i64::from(next), &&dead[..]],
            )
            .await?;
            let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(next)).await?;
            tx.commit().await?;
            Ok(change)
        })
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{DEVICE_COLUMNS} ORDER BY tenant, device_id");
            rows(&c, &sql, &[]).await?.iter().map(device_row).collect()
        })
    }

    fn changes_since(&self, cursor: u64, limit: u32) -> Result<(u64, Vec<DeviceChange>), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let found = rows(
                &c,
                "SELECT seq, device_id, tenant, state, generation FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&i64::try_from(cursor).unwrap_or(i64::MAX), &i64::from(limit)],
            )
            .await?;
            let mut last = cursor;
            let mut changes = Vec::with_capacity(found.len());
            for r in &found {
                last = u64::try_from(r.try_get::<_, i64>(0)?).unwrap_or(last);
                changes.push(DeviceChange {
                    device_id: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    state: r.try_get(3)?,
                    generation: r.try_get::<_, Option<i64>>(4)?.map(count),
                });
            }
            Ok((last, changes))
        })
    }

    fn add_users(&self, tenant: &str, emails: &[String], now: DateTime<Utc>) -> Result<Vec<String>, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let mut added = Vec::new();
            for email in emails {
                let n = exec(
                    &tx,
                    "INSERT INTO users (tenant, email, added_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&tenant, email, &now.timestamp()],
                )
                .await?;
                if n > 0 {
                    added.push(email.clone());
                }
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    fn remove_users(&self, tenant: &str, emails: &[String]) -> Result<Vec<String>, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let mut removed = Vec::new();
            for email in emails {
                if exec(&tx, "DELETE FROM users WHERE tenant = $1 AND email = $2", &[&tenant, email]).await? > 0 {
                    removed.push(email.clone());
                }
            }
            tx.commit().await?;
            Ok(removed)
        })
    }

    fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(&c, "SELECT email, added_at FROM users WHERE tenant = $1 ORDER BY email", &[&tenant])
                .await?
                .iter()
                .map(|r| Ok(UserInfo { email: r.try_get(0)?, added_at: unix(r.try_get(1)?) }))
                .collect()
        })
    }

    fn device(&self, device_id: &str) -> Result<DeviceInfo, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{DEVICE_COLUMNS} WHERE device_id = $1");
            device_row(&row(&c, &sql, &[&device_id]).await?.ok_or(RegistryError::NoSuchDevice)?)
        })
    }

    fn delete_device(&self, device_id: &str) -> Result<DeviceChange, RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let r = row(
                &tx,
                "SELECT tenant, state, generation FROM devices WHERE device_id = $1 FOR UPDATE",
                &[&device_id],
            )
            .await?
            .ok_or(RegistryError::NoSuchDevice)?;
            let (tenant, state): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            check_deletable(&state)?;
            exec(&tx, "DELETE FROM devices WHERE device_id = $1", &[&device_id]).await?;
            let next = generation(&r, 2)?.saturating_add(1);
            let change = append_change(&tx, device_id, &tenant, DeviceState::Reset, Some(next)).await?;
            tx.commit().await?;
            Ok(change)
        })
    }

    fn create_admin_token(&self, hash: &[u8; 32], info: &AdminTokenInfo) -> Result<(), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            exec(
                &c,
                "INSERT INTO admin_tokens (token_id, hash, role, tenant, label, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&info.id, &&hash[..], &info.role.as_str(), &info.tenant, &info.label, &info.created_at.timestamp()],
            )
            .await?;
            Ok(())
        })
    }

    fn admin_by_hash(&self, hash: &[u8; 32]) -> Result<Option<AdminRow>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let found = row(
                &c,
                "SELECT hash, token_id, role, tenant, revoked_at IS NOT NULL FROM admin_tokens WHERE hash = $1",
                &[&&hash[..]],
            )
            .await?;
            match found {
                Some(r) => Ok(Some(AdminRow {
                    hash: r.try_get(0)?,
                    id: r.try_get(1)?,
                    role: r.try_get(2)?,
                    tenant: r.try_get(3)?,
                    revoked: r.try_get(4)?,
                })),
                None => Ok(None),
            }
        })
    }

    fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{ADMIN_TOKEN_COLUMNS} ORDER BY created_at, token_id");
            rows(&c, &sql, &[]).await?.iter().map(admin_token_row).collect()
        })
    }

    fn admin_token(&self, id: &str) -> Result<AdminTokenInfo, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{ADMIN_TOKEN_COLUMNS} WHERE token_id = $1");
            admin_token_row(&row(&c, &sql, &[&id]).await?.ok_or(RegistryError::NoSuchToken)?)
        })
    }

    fn revoke(&self, table: TokenTable, id: &str, now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("UPDATE {} SET revoked_at = COALESCE(revoked_at, $2) WHERE token_id = $1", table.name());
            if exec(&c, &sql, &[&id, &now.timestamp()]).await? == 0 {
                return Err(RegistryError::NoSuchToken);
            }
            Ok(())
        })
    }

    fn deployment_tokens(&self) -> Result<Vec<DeploymentTokenInfo>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{DEPLOYMENT_TOKEN_COLUMNS} ORDER BY tenant, created_at, token_id");
            rows(&c, &sql, &[]).await?.iter().map(deployment_token_row).collect()
        })
    }

    fn deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let sql = format!("{DEPLOYMENT_TOKEN_COLUMNS} WHERE token_id = $1");
            deployment_token_row(&row(&c, &sql, &[&id]).await?.ok_or(RegistryError::NoSuchToken)?)
        })
    }

    fn set_quota(&self, tenant: &str, quota_bytes: i64) -> Result<(), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            exec(
                &c,
                "INSERT INTO tenants (tenant, quota_bytes) VALUES ($1, $2)
                 ON CONFLICT (tenant) DO UPDATE SET quota_bytes = EXCLUDED.quota_bytes",
                &[&tenant, &quota_bytes],
            )
            .await?;
            Ok(())
        })
    }

    fn quotas(&self) -> Result<Vec<TenantQuota>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(&c, "SELECT tenant, quota_bytes FROM tenants WHERE quota_bytes > 0 ORDER BY tenant", &[])
                .await?
                .iter()
                .map(|r| Ok(TenantQuota { tenant: r.try_get(0)?, quota_bytes: r.try_get::<_, i64>(1)? as u64 }))
                .collect()
        })
    }

    fn record_usage(&self, usage: &[TenantUsage], now: DateTime<Utc>) -> Result<(), RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            for u in usage {
                exec(
                    &tx,
                    "INSERT INTO tenants (tenant, stored_bytes, snapshots, reported_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant) DO UPDATE SET stored_bytes = EXCLUDED.stored_bytes,
                         snapshots = EXCLUDED.snapshots, reported_at = EXCLUDED.reported_at",
                    &[
                        &u.tenant,
                        &i64::try_from(u.stored_bytes).unwrap_or(i64::MAX),
                        &i64::try_from(u.snapshots).unwrap_or(i64::MAX),
                        &now.timestamp(),
                    ],
                )
                .await?;
                let day = fleet::day_of(now);
                exec(
                    &tx,
                    "INSERT INTO usage_days (tenant, day, stored_bytes) VALUES ($1, $2, $3)
                     ON CONFLICT (tenant, day) DO UPDATE SET stored_bytes = EXCLUDED.stored_bytes",
                    &[&u.tenant, &day, &fleet::int(u.stored_bytes)],
                )
                .await?;
                exec(
                    &tx,
                    "DELETE FROM usage_days WHERE tenant = $1 AND day < $2",
                    &[&u.tenant, &(day - fleet::KEEP_DAYS)],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn tenants(&self) -> Result<Vec<TenantInfo>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(
                &c,
                "WITH names AS (SELECT tenant FROM deployment_tokens UNION SELECT tenant FROM devices
                                UNION SELECT tenant FROM tenants)
                 SELECT n.tenant, (SELECT COUNT(*) FROM devices d WHERE d.tenant = n.tenant),
                        t.snapshots, t.stored_bytes, COALESCE(t.quota_bytes, 0), t.reported_at
                 FROM names n LEFT JOIN tenants t ON t.tenant = n.tenant ORDER BY n.tenant",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(TenantInfo {
                    tenant: r.try_get(0)?,
                    devices: r.try_get::<_, i64>(1)? as u64,
                    snapshots: r.try_get::<_, Option<i64>>(2)?.map(|n| n as u64),
                    stored_bytes: r.try_get::<_, Option<i64>>(3)?.map(|n| n as u64),
                    quota_bytes: r.try_get::<_, i64>(4)? as u64,
                    reported_at: r.try_get::<_, Option<i64>>(5)?.map(unix),
                    logical_bytes: None,
                })
            })
            .collect()
        })
    }

    fn record_audit(&self, entry: &AuditEntry) -> Result<(), RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            insert_audit(&c, entry).await
        })
    }

    fn audit_log(&self, tenant: Option<&str>, since: i64, limit: u32) -> Result<Vec<AuditEntry>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(
                &c,
                "SELECT at, actor, action, target, tenant, detail FROM audit
                 WHERE ($1::text IS NULL OR tenant = $1) AND at >= $2 ORDER BY seq DESC LIMIT $3",
                &[&tenant, &since, &i64::from(limit)],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: unix(r.try_get(0)?),
                    actor: r.try_get(1)?,
                    action: r.try_get(2)?,
                    target: r.try_get(3)?,
                    tenant: r.try_get(4)?,
                    detail: r.try_get(5)?,
                })
            })
            .collect()
        })
    }

    fn record_snapshots(&self, reports: &[TenantSnapshots], now: i64) -> Result<(), RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            for r in reports {
                if r.rescan {
                    exec(
                        &tx,
                        "UPDATE snapshots SET stale = TRUE WHERE tenant = $1 AND removed_at IS NULL",
                        &[&r.tenant],
                    )
                    .await?;
                }
                for s in &r.added {
                    exec(
                        &tx,
                        "INSERT INTO snapshots (tenant, snapshot_id, device_id, user_name, time_ms, files, bytes)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (tenant, snapshot_id) DO UPDATE SET removed_at = NULL, stale = FALSE",
                        &[
                            &r.tenant,
                            &s.id.to_hex(),
                            &s.device,
                            &s.user,
                            &s.time.timestamp_millis(),
                            &fleet::int(s.files),
                            &fleet::int(s.bytes),
                        ],
                    )
                    .await?;
                }
                for id in &r.removed {
                    exec(
                        &tx,
                        "UPDATE snapshots SET removed_at = $3, stale = FALSE
                         WHERE tenant = $1 AND snapshot_id = $2 AND removed_at IS NULL",
                        &[&r.tenant, &id.to_hex(), &now],
                    )
                    .await?;
                }
                if r.complete {
                    exec(
                        &tx,
                        "UPDATE snapshots SET removed_at = $2, stale = FALSE WHERE tenant = $1 AND stale",
                        &[&r.tenant, &now],
                    )
                    .await?;
                }
            }
            exec(&tx, "DELETE FROM snapshots WHERE removed_at < $1", &[&(now - fleet::KEEP_REMOVED_SECS)]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn device_snapshots(
        &self,
        tenant: &str,
        device_id: &str,
        limit: u32,
    ) -> Result<Vec<SnapshotRecord>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(
                &c,
                "SELECT snapshot_id, time_ms, device_id, user_name, files, bytes FROM snapshots
                 WHERE tenant = $1 AND device_id = $2 AND removed_at IS NULL
                 ORDER BY time_ms DESC, snapshot_id DESC LIMIT $3",
                &[&tenant, &device_id, &i64::from(limit)],
            )
            .await?
            .iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                Ok(SnapshotRecord {
                    id: fleet::snapshot_id(&id).map_err(|e| DbError::Setup(format!("snapshots.snapshot_id: {e}")))?,
                    time: fleet::unix_ms(r.try_get(1)?),
                    device: r.try_get(2)?,
                    user: r.try_get(3)?,
                    files: fleet::uint(r.try_get(4)?),
                    bytes: fleet::uint(r.try_get(5)?),
                })
            })
            .collect()
        })
    }

    fn device_backups(&self) -> Result<DeviceBackups, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(
                &c,
                "SELECT tenant, device_id, COUNT(*), MAX(time_ms) FROM snapshots
                 WHERE removed_at IS NULL AND device_id IS NOT NULL GROUP BY tenant, device_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), (fleet::uint(r.try_get(2)?), fleet::unix_ms(r.try_get(3)?)))))
            .collect()
        })
    }

    fn logical_bytes(&self) -> Result<HashMap<String, u64>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            // SUM of BIGINT is NUMERIC in PostgreSQL; the cast keeps it an integer.
            rows(&c, "SELECT tenant, SUM(bytes)::BIGINT FROM snapshots WHERE removed_at IS NULL GROUP BY tenant", &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, fleet::uint(r.try_get(1)?))))
                .collect()
        })
    }

    fn usage_rows(&self, tenant: &str, first: i64, last: i64) -> Result<UsageRows, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let before = row(
                &c,
                "SELECT stored_bytes FROM usage_days WHERE tenant = $1 AND day < $2 ORDER BY day DESC LIMIT 1",
                &[&tenant, &first],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
            let stored = rows(
                &c,
                "SELECT day, stored_bytes FROM usage_days WHERE tenant = $1 AND day BETWEEN $2 AND $3",
                &[&tenant, &first, &last],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, RegistryError>>()?;
            let backups = rows(
                &c,
                "SELECT time_ms / $4, COUNT(*) FROM snapshots WHERE tenant = $1 AND time_ms >= $2 AND time_ms < $3
                 GROUP BY time_ms / $4",
                &[&tenant, &(first * fleet::DAY_MS), &((last + 1) * fleet::DAY_MS), &fleet::DAY_MS],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, RegistryError>>()?;
            Ok(UsageRows { before, stored, backups })
        })
    }

    fn record_node(&self, node: &NodeReport, cursor: i64, now: i64) -> Result<(), RegistryError> {
        self.run(async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            exec(
                &tx,
                "INSERT INTO storage_nodes (name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET auth_unreachable = EXCLUDED.auth_unreachable,
                     checkin_interval_secs = EXCLUDED.checkin_interval_secs, version = EXCLUDED.version,
                     cursor = EXCLUDED.cursor, checked_in_at = EXCLUDED.checked_in_at",
                &[
                    &node.name,
                    &node.auth_unreachable,
                    &fleet::int(node.checkin_interval_secs),
                    &node.version,
                    &cursor,
                    &now,
                ],
            )
            .await?;
            exec(&tx, "DELETE FROM storage_nodes WHERE checked_in_at < $1", &[&(now - fleet::FORGET_NODE_SECS)]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn storage_nodes(&self) -> Result<Vec<NodeRow>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            rows(
                &c,
                "SELECT name, auth_unreachable, checkin_interval_secs, version, cursor, checked_in_at,
                        (SELECT COUNT(*) FROM changes c WHERE c.seq > n.cursor)
                 FROM storage_nodes n ORDER BY name",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(NodeRow {
                    name: r.try_get(0)?,
                    auth_unreachable: r.try_get(1)?,
                    checkin_interval_secs: r.try_get(2)?,
                    version: r.try_get(3)?,
                    cursor: r.try_get(4)?,
                    checked_in_at: r.try_get(5)?,
                    pending: r.try_get(6)?,
                })
            })
            .collect()
        })
    }

    fn latest_change(&self) -> Result<u64, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            let seq: Option<i64> =
                row(&c, "SELECT MAX(seq) FROM changes", &[]).await?.map_or(Ok(None), |r| r.try_get(0))?;
            Ok(fleet::uint(seq.unwrap_or(0)))
        })
    }

    #[cfg(test)]
    fn admin_token_hash(&self, id: &str) -> Result<Vec<u8>, RegistryError> {
        self.run(async {
            let c = self.pool.get().await?;
            Ok(row(&c, "SELECT hash FROM admin_tokens WHERE token_id = $1", &[&id])
                .await?
                .ok_or(RegistryError::NoSuchToken)?
                .try_get(0)?)
        })
    }
}

/// The device id's row, locked until the transaction ends.
async fn existing_device(c: &impl GenericClient, device_id: &str) -> Result<Option<ExistingDevice>, RegistryError> {
    match row(c, "SELECT tenant, state, generation FROM devices WHERE device_id = $1 FOR UPDATE", &[&device_id]).await?
    {
        Some(r) => {
            Ok(Some(ExistingDevice { tenant: r.try_get(0)?, state: r.try_get(1)?, generation: generation(&r, 2)? }))
        }
        None => Ok(None),
    }
}

const DEVICE_COLUMNS: &str = "SELECT device_id, tenant, email, state, activated_at, last_seen, deployment_token_id,
        allow_restore_to_other_device, allow_open_in FROM devices";

fn device_row(r: &Row) -> Result<DeviceInfo, RegistryError> {
    Ok(DeviceInfo {
        device_id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        email: r.try_get(2)?,
        state: r.try_get(3)?,
        activated_at: unix(r.try_get(4)?),
        last_seen: r.try_get::<_, Option<i64>>(5)?.map(unix),
        deployment_token_id: r.try_get(6)?,
        policies: Policies { allow_restore_to_other_device: r.try_get(7)?, allow_open_in: r.try_get(8)? },
        snapshots: 0,
        last_backup: None,
    })
}

const ADMIN_TOKEN_COLUMNS: &str = "SELECT token_id, role, tenant, label, created_at, revoked_at FROM admin_tokens";

fn admin_token_row(r: &Row) -> Result<AdminTokenInfo, RegistryError> {
    let role: String = r.try_get(1)?;
    Ok(AdminTokenInfo {
        id: r.try_get(0)?,
        role: role.parse().map_err(|e: String| DbError::Setup(format!("admin_tokens.role: {e}")))?,
        tenant: r.try_get(2)?,
        label: r.try_get(3)?,
        created_at: unix(r.try_get(4)?),
        revoked_at: r.try_get::<_, Option<i64>>(5)?.map(unix),
    })
}

const DEPLOYMENT_TOKEN_COLUMNS: &str = "SELECT token_id, tenant, created_at, expires_at, activations, max_activations,
        allow_restore_to_other_device, allow_open_in, provisioned_only, revoked_at IS NOT NULL FROM deployment_tokens";

fn deployment_token_row(r: &Row) -> Result<DeploymentTokenInfo, RegistryError> {
    Ok(DeploymentTokenInfo {
        token_id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        created_at: unix(r.try_get(2)?),
        expires_at: unix(r.try_get(3)?),
        activations: count(r.try_get(4)?),
        max_activations: r.try_get::<_, Option<i64>>(5)?.map(count),
        policies: Policies { allow_restore_to_other_device: r.try_get(6)?, allow_open_in: r.try_get(7)? },
        provisioned_only: r.try_get(8)?,
        revoked: r.try_get(9)?,
    })
}

async fn insert_audit(c: &impl GenericClient, e: &AuditEntry) -> Result<(), RegistryError> {
    exec(
        c,
        "INSERT INTO audit (at, actor, action, target, tenant, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&e.at.timestamp(), &e.actor, &e.action, &e.target, &e.tenant, &e.detail],
    )
    .await?;
    Ok(())
}

/// Appends a state change to the check-in feed. The feed's lock, held to
/// commit, orders the appends of every node: a change numbered after
/// another commits after it, so a reader that sees one sees the other.
async fn append_change(
    tx: &deadpool_postgres::Transaction<'_>,
    device_id: &str,
    tenant: &str,
    state: DeviceState,
    generation: Option<u32>,
) -> Result<DeviceChange, RegistryError> {
    exec(tx, "SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK]).await?;
    exec(
        tx,
        "INSERT INTO changes (device_id, tenant, state, generation) VALUES ($1, $2, $3, $4)",
        &[&device_id, &tenant, &state.as_str(), &generation.map(i64::from)],
    )
    .await?;
    Ok(change(device_id, tenant, state, generation))
}

/// A database of its own for each test, in the cluster that
/// `CHUNKVAULT_TEST_POSTGRES` names (`scripts/postgres.sh start`).
#[cfg(test)]
pub(super) mod testdb {
    /// A fresh database, dropped with this value.
    pub struct TestDb {
        base: String,
        name: String,
        /// The URL of the fresh database.
        pub url: String,
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    async fn admin(base: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// `base` with its database name replaced by `name`.
    pub fn with_database(base: &str, name: &str) -> String {
        let (head, query) = base.split_once('?').map_or((base, None), |(h, q)| (h, Some(q)));
        let after_scheme = head.find("://").map_or(0, |i| i + 3);
        let head = match head[after_scheme..].find('/') {
            Some(i) => &head[..after_scheme + i],
            None => head,
        };
        match query {
            Some(q) => format!("{head}/{name}?{q}"),
            None => format!("{head}/{name}"),
        }
    }

    impl TestDb {
        /// A fresh database, or `None` (with the reason printed) when no
        /// cluster is configured; with `CHUNKVAULT_REQUIRE_POSTGRES=1` that
        /// and an unreachable cluster fail the test instead.
        pub fn create() -> Option<TestDb> {
            let required = std::env::var("CHUNKVAULT_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
            let Ok(base) = std::env::var("CHUNKVAULT_TEST_POSTGRES") else {
                assert!(!required, "CHUNKVAULT_REQUIRE_POSTGRES=1 but CHUNKVAULT_TEST_POSTGRES is not set");
                eprintln!("skipped: set CHUNKVAULT_TEST_POSTGRES (eval \"$(scripts/postgres.sh start)\") to run this");
                return None;
            };
            let name = format!("cv_test_{}", hex::encode(rand::random::<[u8; 8]>()));
            let made = runtime()
                .block_on(async { admin(&base).await?.batch_execute(&format!("CREATE DATABASE {name}")).await });
            if let Err(e) = made {
                assert!(!required, "PostgreSQL at CHUNKVAULT_TEST_POSTGRES: {e}");
                eprintln!("skipped: PostgreSQL at CHUNKVAULT_TEST_POSTGRES: {e}");
                return None;
            }
            let url = with_database(&base, &name);
            Some(TestDb { base, name, url })
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = runtime().block_on(async { admin(&self.base).await?.batch_execute(&sql).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::TestDb;
    use super::*;
    use crate::auth::registry::{Registry, RegistryLocation};

    /// Runs one statement on the test database outside the registry.
    fn sql(db: &TestDb, sql: &str) -> Vec<Row> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
            tokio::spawn(conn);
            client.query(sql, &[]).await.unwrap()
        })
    }

    #[test]
    fn nodes_starting_together_apply_each_migration_once() {
        let Some(db) = TestDb::create() else { return };
        let location = RegistryLocation::Postgres(db.url.clone());
        let start = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            let nodes: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        Registry::connect(&location).map(drop)
                    })
                })
                .collect();
            for n in nodes {
                n.join().unwrap().unwrap();
            }
        });
        let versions: Vec<i32> =
            sql(&db, "SELECT version FROM registry_migrations ORDER BY version").iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>());
        // Versions are 1, 2, ... in order, and file names carry them.
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i32 + 1);
            assert!(name.starts_with(&format!("{version:04}_")), "{name}");
        }
    }

    #[test]
    fn a_schema_newer_than_this_build_is_refused() {
        let Some(db) = TestDb::create() else { return };
        let location = RegistryLocation::Postgres(db.url.clone());
        Registry::connect(&location).unwrap();
        sql(&db, "INSERT INTO registry_migrations (version, name) VALUES (9999, '9999_future.sql')");
        let e = Registry::connect(&location).err().expect("refused");
        assert!(e.to_string().contains("newer than this chunkvault"), "{e}");
    }

    #[test]
    fn test_urls_get_their_own_database() {
        let base = "postgresql://cv@/postgres?host=/tmp/x&port=5";
        assert_eq!(testdb::with_database(base, "t1"), "postgresql://cv@/t1?host=/tmp/x&port=5");
        assert_eq!(testdb::with_database("postgres://h:5/db", "t2"), "postgres://h:5/t2");
        assert_eq!(testdb::with_database("postgres://h", "t3"), "postgres://h/t3");
    }
}
