//! The admin routes the console's fleet pages read (auth role): storage
//! nodes and their check-ins, a tenant's daily history, a device's
//! snapshots; and, in the `all` role, bringing the registry's usage and
//! snapshot records up to date from this process's own storage side (a
//! storage node sends them with its check-in instead).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;

use super::admin::Admin;
use super::error::HttpError;
use super::routes::{blocking, AppState, Reply};
use super::{catalog, App, AuthUnreachable};
use crate::api::{self, DeviceInfo, NodeReport, SnapshotRecord, StorageNodeInfo, TenantDay, TenantInfo};
use crate::auth::admin::{AdminIdentity, ScopeError};
use crate::auth::registry::MAX_HISTORY_DAYS;

/// The fleet routes (auth role).
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/admin/storage-nodes", get(storage_nodes))
        .route("/v1/admin/tenants/{tenant}/history", get(tenant_history))
        .route("/v1/admin/devices/{id}/snapshots", get(device_snapshots))
}

/// Days a history covers unless asked otherwise.
const DEFAULT_HISTORY_DAYS: u32 = 30;
/// Most reports one local sync makes (each up to the check-in's bounds).
const MAX_SYNC_ROUNDS: usize = 64;

/// How this node describes itself at check-in.
pub(super) fn node_report(app: &App) -> NodeReport {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let mut name = format!("{} {}", if host.is_empty() { "storage" } else { &host }, app.config.listen);
    name.retain(|c| !c.is_control());
    while name.len() > api::MAX_NODE_NAME {
        name.pop();
    }
    NodeReport {
        name,
        auth_unreachable: match app.config.auth_unreachable {
            AuthUnreachable::FailClosed => "fail_closed",
            AuthUnreachable::FailOpen => "fail_open",
        }
        .into(),
        checkin_interval_secs: app.config.checkin_interval_secs,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// In the `all` role: records what this process's tenants store and the
/// snapshots they hold, as a storage node's check-in would. Elsewhere a
/// no-op. Blocking.
pub(super) fn sync_local(app: &App) -> Reply<()> {
    let (Some(auth), Some(storage)) = (&app.auth, &app.storage) else { return Ok(()) };
    auth.registry.record_usage(&storage.quotas.report(), Utc::now())?;
    for _ in 0..MAX_SYNC_ROUNDS {
        let due = storage.quotas.recently_touched(catalog::RECHECK);
        let (delivered, more) = storage.catalog.report(due, |batch| auth.registry.record_snapshots(&batch, Utc::now()));
        delivered?;
        if !more {
            break;
        }
    }
    Ok(())
}

/// In the `all` role, [`sync_local`] every check-in interval, so that the
/// daily figures are recorded even when nobody looks.
pub(super) async fn sync_local_every(app: Arc<App>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(app.config.checkin_interval_secs.max(1)));
    loop {
        ticker.tick().await;
        let app2 = app.clone();
        match tokio::task::spawn_blocking(move || sync_local(&app2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("recording usage and snapshots: {}", e.message),
            Err(e) => tracing::warn!("recording usage and snapshots: {e}"),
        }
    }
}

/// Adds each device's snapshot count and last backup (blocking).
pub(super) fn add_backups(app: &App, devices: &mut [DeviceInfo]) -> Reply<()> {
    let backups = app.auth()?.registry.device_backups()?;
    for d in devices {
        if let Some(&(count, last)) = backups.get(&(d.tenant.clone(), d.device_id.clone())) {
            d.snapshots = count;
            d.last_backup = Some(last);
        }
    }
    Ok(())
}

/// Adds each tenant's logical bytes (blocking).
pub(super) fn add_logical_bytes(app: &App, tenants: &mut [TenantInfo]) -> Reply<()> {
    let logical = app.auth()?.registry.logical_bytes()?;
    for t in tenants {
        t.logical_bytes = logical.get(&t.tenant).copied();
    }
    Ok(())
}

/// Storage nodes serve every tenant: only a token of every tenant sees them.
fn require_every_tenant(who: &AdminIdentity) -> Result<(), ScopeError> {
    match &who.tenant {
        None => Ok(()),
        Some(_) => Err(ScopeError::Forbidden(
            "storage nodes serve every tenant: a token of one tenant does not see them".into(),
        )),
    }
}

/// `GET /v1/admin/storage-nodes`: each node's last check-in, its
/// `auth_unreachable` policy and whether it is behind.
#[utoipa::path(get, path = "/v1/admin/storage-nodes", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "The storage nodes that checked in during the last 30 days (and, in the `all` role, this process's own storage side), by name", body = Vec<StorageNodeInfo>)))]
pub async fn storage_nodes(State(app): AppState, Admin(who): Admin) -> Reply<Json<Vec<StorageNodeInfo>>> {
    require_every_tenant(&who)?;
    blocking(move || {
        let registry = &app.auth()?.registry;
        let now = Utc::now();
        let mut nodes = registry.storage_nodes(now)?;
        if app.storage.is_some() {
            let me = node_report(&app);
            nodes.insert(
                0,
                StorageNodeInfo {
                    name: me.name,
                    local: true,
                    auth_unreachable: me.auth_unreachable,
                    checkin_interval_secs: me.checkin_interval_secs,
                    version: me.version,
                    last_checkin: now,
                    cursor: registry.latest_change()?,
                    pending_changes: 0,
                    stale: false,
                    behind: false,
                },
            );
        }
        Ok(Json(nodes))
    })
    .await
}

/// `GET /v1/admin/tenants/{tenant}/history[?days=N]`: the tenant's stored
/// bytes and backups per day.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/history", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = String, Path, description = "The tenant"),
        ("days" = Option<u32>, Query, description = "Days to cover, ending today (UTC): 1 to 366, default 30")),
    responses((status = 200, description = "One entry a day, oldest first: stored bytes as last reported on or before it, and the snapshots taken that day", body = Vec<TenantDay>)))]
pub async fn tenant_history(
    State(app): AppState,
    Admin(who): Admin,
    Path(tenant): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<Vec<TenantDay>>> {
    api::check_tenant(&tenant).map_err(HttpError::bad_request)?;
    who.require_tenant(&tenant)?;
    let days = match q.get("days") {
        Some(d) => d
            .parse::<u32>()
            .ok()
            .filter(|d| (1..=MAX_HISTORY_DAYS).contains(d))
            .ok_or_else(|| HttpError::bad_request(format!("days: 1 to {MAX_HISTORY_DAYS}")))?,
        None => DEFAULT_HISTORY_DAYS,
    };
    blocking(move || {
        sync_local(&app)?;
        Ok(Json(app.auth()?.registry.tenant_history(&tenant, days, Utc::now())?))
    })
    .await
}

/// `GET /v1/admin/devices/{id}/snapshots`: a device's snapshots, newest first.
#[utoipa::path(get, path = "/v1/admin/devices/{id}/snapshots", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The device's snapshots that exist, newest first, as the storage nodes reported them (at most 10,000)", body = Vec<SnapshotRecord>)))]
pub async fn device_snapshots(
    State(app): AppState,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> Reply<Json<Vec<SnapshotRecord>>> {
    api::check_device_id(&id).map_err(HttpError::bad_request)?;
    blocking(move || {
        let registry = &app.auth()?.registry;
        let tenant = registry.device(&id)?.tenant;
        who.require_tenant(&tenant)?;
        sync_local(&app)?;
        Ok(Json(registry.device_snapshots(&tenant, &id)?))
    })
    .await
}
