//! The admin routes (auth role) and the storage nodes' check-in. Every
//! handler takes the caller as an [`Admin`] (the extractor checks the
//! token: the bootstrap `CHUNKVAULT_ADMIN_TOKEN`, or a registry admin
//! token) and asks its [`AdminIdentity`] before it reads or changes a
//! tenant's things; every change goes to the audit log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::Json;
use chrono::{DateTime, Utc};
use subtle::ConstantTimeEq;

use super::error::HttpError;
use super::routes::{blocking, parse, AppState, Reply};
use super::{bearer, App};
use crate::api::{self, *};
use crate::auth::admin::{AdminIdentity, AdminRole};
use crate::auth::registry::{DeploymentTokenSpec, MAX_AUDIT_ENTRIES};
use crate::auth::DeviceState;

/// Default deployment token lifetime: 30 days.
const DEFAULT_DEPLOYMENT_TTL: u64 = 30 * 86_400;

/// The caller of an admin route. A read-only token gets past this only
/// with a GET.
pub struct Admin(pub AdminIdentity);

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let given = bearer(&parts.headers).ok_or_else(|| HttpError::unauthorized("missing bearer token"))?;
        let bootstrap = app.admin_token.as_ref().is_some_and(|t| bool::from(given.as_bytes().ct_eq(t)));
        let who = if bootstrap {
            AdminIdentity::bootstrap()
        } else if app.auth.is_some() {
            let (app, given) = (app.clone(), given.to_owned());
            blocking(move || Ok(app.auth()?.registry.authenticate_admin(&given)?)).await?
        } else {
            return Err(HttpError::unauthorized("wrong admin token"));
        };
        if who.role == AdminRole::ReadOnly && !matches!(parts.method, Method::GET | Method::HEAD) {
            return Err(HttpError::forbidden("this admin token is read-only"));
        }
        Ok(Admin(who))
    }
}

/// Appends to the audit log what `who` did.
fn audit(
    app: &App,
    who: &AdminIdentity,
    action: &str,
    target: &str,
    tenant: Option<&str>,
    detail: String,
) -> Reply<()> {
    let entry = AuditEntry {
        at: Utc::now(),
        actor: who.id.clone(),
        action: action.into(),
        target: target.into(),
        tenant: tenant.map(Into::into),
        detail,
    };
    Ok(app.auth()?.registry.record_audit(&entry)?)
}

/// `GET /v1/admin/whoami`: the caller's token id, role and tenant.
#[utoipa::path(get, path = "/v1/admin/whoami", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "The caller's token id, role and tenant", body = AdminIdentity)))]
pub async fn whoami(Admin(who): Admin) -> Json<AdminIdentity> {
    Json(who)
}

#[utoipa::path(post, path = "/v1/admin/deployment-tokens", tag = "admin", security(("admin_token" = [])),
    request_body = CreateDeploymentToken,
    responses((status = 200, description = "The new token, shown this once, and its id", body = DeploymentTokenCreated)))]
pub async fn create_deployment_token(
    State(app): AppState,
    Admin(who): Admin,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<DeploymentTokenCreated>> {
    let req: CreateDeploymentToken = parse(&headers, body, MAX_JSON_BODY).await?;
    who.require_write_in(&req.tenant)?;
    blocking(move || {
        // The tenant's repository is created with its first deployment token.
        if let Some(storage) = &app.storage {
            storage.tenants.get(&crate::ingest::TenantName::new(&req.tenant)?)?;
        }
        let now = Utc::now();
        let spec = DeploymentTokenSpec {
            tenant: req.tenant,
            expires_at: now + Duration::from_secs(req.expires_in_secs.unwrap_or(DEFAULT_DEPLOYMENT_TTL)),
            max_activations: req.max_activations,
            policies: req.policies.unwrap_or_default(),
            provisioned_only: req.provisioned_only,
        };
        let created = app.auth()?.registry.create_deployment_token(&spec, now)?;
        tracing::info!("deployment token {} created for tenant {}", created.id, spec.tenant);
        let detail = format!("expires {}, max activations {:?}", spec.expires_at.to_rfc3339(), spec.max_activations);
        audit(&app, &who, "deployment-token create", &created.id, Some(&spec.tenant), detail)?;
        Ok(Json(DeploymentTokenCreated {
            token: created.text,
            token_id: created.id,
            tenant: spec.tenant,
            expires_at: spec.expires_at,
            policies: spec.policies,
            provisioned_only: spec.provisioned_only,
        }))
    })
    .await
}

/// `GET /v1/admin/deployment-tokens[?tenant=T]`: the caller's tenants' tokens.
#[utoipa::path(get, path = "/v1/admin/deployment-tokens", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = Option<String>, Query, description = "Only this tenant (a tenant admin may name only its own)")),
    responses((status = 200, description = "Deployment tokens without their secrets", body = Vec<DeploymentTokenInfo>)))]
pub async fn deployment_tokens(
    State(app): AppState,
    Admin(who): Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<Vec<DeploymentTokenInfo>>> {
    let tenant = tenant_filter(&who, &q)?;
    blocking(move || {
        let mut all = app.auth()?.registry.deployment_tokens()?;
        all.retain(|t| who.sees(&t.tenant) && tenant.as_ref().map_or(true, |f| *f == t.tenant));
        Ok(Json(all))
    })
    .await
}

/// `POST /v1/admin/deployment-tokens/{id}/revoke`
#[utoipa::path(post, path = "/v1/admin/deployment-tokens/{id}/revoke", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The id")),
    responses((status = 200, description = "The revoked token; activations with it get 401 `token_revoked`", body = DeploymentTokenInfo)))]
pub async fn revoke_deployment_token(
    State(app): AppState,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> Reply<Json<DeploymentTokenInfo>> {
    blocking(move || {
        let registry = &app.auth()?.registry;
        let token = registry.deployment_token(&id)?;
        who.require_write_in(&token.tenant)?;
        registry.revoke_deployment_token(&id, Utc::now())?;
        audit(&app, &who, "deployment-token revoke", &id, Some(&token.tenant), String::new())?;
        Ok(Json(registry.deployment_token(&id)?))
    })
    .await
}

/// `GET /v1/admin/devices`: the devices of the caller's tenants, with
/// their snapshot counts and last backups as the storage nodes reported them.
#[utoipa::path(get, path = "/v1/admin/devices", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "The devices of the caller's tenants, their state and when they were last seen", body = Vec<DeviceInfo>)))]
pub async fn devices(State(app): AppState, Admin(who): Admin) -> Reply<Json<Vec<DeviceInfo>>> {
    blocking(move || {
        super::fleet::sync_local(&app)?;
        let mut all = app.auth()?.registry.devices()?;
        all.retain(|d| who.sees(&d.tenant));
        super::fleet::add_backups(&app, &mut all)?;
        Ok(Json(all))
    })
    .await
}

/// `POST /v1/admin/devices/{id}/{action}`: retire, block, allow, wipe, reset.
#[utoipa::path(post, path = "/v1/admin/devices/{id}/{action}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_.:-]{1,128}$"), ("action" = String, Path, description = "What to do: retire, block, allow, wipe or reset")),
    responses((status = 200, description = "The device's new state", body = DeviceChange)))]
pub async fn device_action(
    State(app): AppState,
    Admin(who): Admin,
    Path((id, action)): Path<(String, String)>,
) -> Reply<Json<DeviceChange>> {
    api::check_device_id(&id).map_err(HttpError::bad_request)?;
    let state = match action.as_str() {
        "retire" => DeviceState::Retired,
        "block" => DeviceState::Blocked,
        "allow" => DeviceState::Active,
        "wipe" => DeviceState::Wiped,
        "reset" => DeviceState::Reset,
        _ => return Err(HttpError::not_found("actions: retire, block, allow, wipe, reset")),
    };
    blocking(move || {
        let registry = &app.auth()?.registry;
        who.require_write_in(&registry.device(&id)?.tenant)?;
        let change = if state == DeviceState::Reset { registry.reset(&id)? } else { registry.set_state(&id, state)? };
        apply_locally(&app, &change);
        tracing::info!("device {id} is now {state}");
        audit(&app, &who, &action, &id, Some(&change.tenant), format!("now {state}"))?;
        Ok(Json(change))
    })
    .await
}

/// `DELETE /v1/admin/devices/{id}`: a retired or wiped device leaves the registry.
#[utoipa::path(delete, path = "/v1/admin/devices/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The device id", pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, description = "The device left the registry; its id may activate again as a new device", body = DeviceChange),
        (status = 409, description = "`device_not_retired`: retire or wipe the device first", body = ErrorBody)))]
pub async fn delete_device(
    State(app): AppState,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> Reply<Json<DeviceChange>> {
    api::check_device_id(&id).map_err(HttpError::bad_request)?;
    blocking(move || {
        let registry = &app.auth()?.registry;
        who.require_write_in(&registry.device(&id)?.tenant)?;
        let change = registry.delete_device(&id)?;
        apply_locally(&app, &change);
        tracing::info!("device {id} deleted");
        audit(&app, &who, "delete", &id, Some(&change.tenant), String::new())?;
        Ok(Json(change))
    })
    .await
}

/// In the `all` role the storage side learns a device change at once.
fn apply_locally(app: &App, change: &DeviceChange) {
    if let Some(storage) = &app.storage {
        storage.states.apply(std::slice::from_ref(change));
    }
}

/// `POST /v1/admin/tenants/{tenant}/users`: provisions users.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/users", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = String, Path, description = "The tenant", pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$")), request_body = AddUsers,
    responses((status = 200, description = "The emails newly provisioned", body = UsersChanged)))]
pub async fn add_users(
    State(app): AppState,
    Admin(who): Admin,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<UsersChanged>> {
    api::check_tenant(&tenant).map_err(HttpError::bad_request)?;
    who.require_write_in(&tenant)?;
    let req: AddUsers = parse(&headers, body, MAX_JSON_BODY).await?;
    blocking(move || {
        let changed = app.auth()?.registry.add_users(&tenant, &req.emails, Utc::now())?;
        tracing::info!("{} users provisioned in tenant {tenant}", changed.len());
        audit(&app, &who, "user add", &changed.join(","), Some(&tenant), String::new())?;
        Ok(Json(UsersChanged { tenant, changed }))
    })
    .await
}

/// `GET /v1/admin/tenants/{tenant}/users`
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/users", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = String, Path, description = "The tenant", pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$")),
    responses((status = 200, description = "The tenant's provisioned users", body = Vec<UserInfo>)))]
pub async fn users(State(app): AppState, Admin(who): Admin, Path(tenant): Path<String>) -> Reply<Json<Vec<UserInfo>>> {
    api::check_tenant(&tenant).map_err(HttpError::bad_request)?;
    who.require_tenant(&tenant)?;
    blocking(move || Ok(Json(app.auth()?.registry.users(&tenant)?))).await
}

/// `DELETE /v1/admin/tenants/{tenant}/users/{email}` (the email percent-encoded).
#[utoipa::path(delete, path = "/v1/admin/tenants/{tenant}/users/{email}", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = String, Path, description = "The tenant", pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$"), ("email" = String, Path, description = "The email, percent-encoded", pattern = "^[^@\\s]+@[^@\\s]+$", max_length = 254)),
    responses((status = 200, description = "The emails removed (none if it was not provisioned)", body = UsersChanged)))]
pub async fn remove_user(
    State(app): AppState,
    Admin(who): Admin,
    Path((tenant, email)): Path<(String, String)>,
) -> Reply<Json<UsersChanged>> {
    api::check_tenant(&tenant).map_err(HttpError::bad_request)?;
    api::check_email(&email).map_err(HttpError::bad_request)?;
    who.require_write_in(&tenant)?;
    blocking(move || {
        let changed = app.auth()?.registry.remove_users(&tenant, std::slice::from_ref(&email))?;
        tracing::info!("{} users removed from tenant {tenant}", changed.len());
        audit(&app, &who, "user remove", &email, Some(&tenant), format!("{} removed", changed.len()))?;
        Ok(Json(UsersChanged { tenant, changed }))
    })
    .await
}

/// `POST /v1/admin/tokens`: a scoped admin token, no wider than the caller.
#[utoipa::path(post, path = "/v1/admin/tokens", tag = "admin", security(("admin_token" = [])),
    request_body = CreateAdminToken,
    responses((status = 200, description = "The new admin token, shown this once", body = AdminTokenCreated)))]
pub async fn create_admin_token(
    State(app): AppState,
    Admin(who): Admin,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<AdminTokenCreated>> {
    let req: CreateAdminToken = parse(&headers, body, MAX_JSON_BODY).await?;
    who.require_grant(req.role, req.tenant.as_deref())?;
    blocking(move || {
        let (token, info) = app.auth()?.registry.create_admin_token(
            req.role,
            req.tenant.as_deref(),
            req.label.as_deref(),
            Utc::now(),
        )?;
        tracing::info!("admin token {} created ({})", info.id, info.role);
        audit(&app, &who, "token create", &info.id, info.tenant.as_deref(), format!("role {}", info.role))?;
        Ok(Json(AdminTokenCreated { token, info }))
    })
    .await
}

/// `GET /v1/admin/tokens`: the admin tokens of the caller's tenants.
#[utoipa::path(get, path = "/v1/admin/tokens", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "The admin tokens of the caller's tenants, without secrets", body = Vec<AdminTokenInfo>)))]
pub async fn admin_tokens(State(app): AppState, Admin(who): Admin) -> Reply<Json<Vec<AdminTokenInfo>>> {
    blocking(move || {
        let mut all = app.auth()?.registry.admin_tokens()?;
        // A tenant's admin sees its tenant's tokens, not the global ones.
        all.retain(|t| who.tenant.is_none() || t.tenant == who.tenant);
        Ok(Json(all))
    })
    .await
}

/// `POST /v1/admin/tokens/{id}/revoke`: at once, for every request after it.
#[utoipa::path(post, path = "/v1/admin/tokens/{id}/revoke", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The id")),
    responses((status = 200, description = "The revoked token", body = AdminTokenInfo)))]
pub async fn revoke_admin_token(
    State(app): AppState,
    Admin(who): Admin,
    Path(id): Path<String>,
) -> Reply<Json<AdminTokenInfo>> {
    blocking(move || {
        let registry = &app.auth()?.registry;
        let token = registry.admin_token(&id)?;
        who.require_grant(token.role, token.tenant.as_deref())?;
        registry.revoke_admin_token(&id, Utc::now())?;
        audit(&app, &who, "token revoke", &id, token.tenant.as_deref(), format!("role {}", token.role))?;
        Ok(Json(registry.admin_token(&id)?))
    })
    .await
}

/// `GET /v1/admin/tenants`: the caller's tenants with devices, snapshots,
/// stored bytes, logical bytes and quota. In the `all` role the storage
/// side's counts of tenants used since the last listing are recorded first.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Tenants with devices, snapshots, stored bytes and quota", body = Vec<TenantInfo>)))]
pub async fn tenants(State(app): AppState, Admin(who): Admin) -> Reply<Json<Vec<TenantInfo>>> {
    blocking(move || {
        super::fleet::sync_local(&app)?;
        let mut all = app.auth()?.registry.tenants()?;
        all.retain(|t| who.sees(&t.tenant));
        super::fleet::add_logical_bytes(&app, &mut all)?;
        Ok(Json(all))
    })
    .await
}

/// `PUT /v1/admin/tenants/{tenant}/quota`: only an admin of every tenant
/// (a tenant's own admin raising its quota would defeat it).
#[utoipa::path(put, path = "/v1/admin/tenants/{tenant}/quota", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = String, Path, description = "The tenant", pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$")), request_body = SetQuota,
    responses((status = 200, description = "The tenant's new quota (0 = none)", body = TenantQuota)))]
pub async fn set_quota(
    State(app): AppState,
    Admin(who): Admin,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<TenantQuota>> {
    api::check_tenant(&tenant).map_err(HttpError::bad_request)?;
    who.require_global_admin()?;
    let req: SetQuota = parse(&headers, body, MAX_JSON_BODY).await?;
    blocking(move || {
        app.auth()?.registry.set_quota(&tenant, req.quota_bytes)?;
        if let Some(storage) = &app.storage {
            storage.quotas.set(&tenant, req.quota_bytes);
        }
        audit(&app, &who, "set-quota", &tenant, Some(&tenant), format!("{} bytes", req.quota_bytes))?;
        Ok(Json(TenantQuota { tenant, quota_bytes: req.quota_bytes }))
    })
    .await
}

/// `GET /v1/admin/audit[?tenant=T][&since=RFC3339]`: newest first; a
/// tenant's admin sees its tenant's entries only.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", security(("admin_token" = [])),
    params(("tenant" = Option<String>, Query, description = "Only this tenant (a tenant admin may name only its own)"), ("since" = Option<String>, Query, description = "Only entries at or after this RFC 3339 time")),
    responses((status = 200, description = "Audit entries, newest first", body = Vec<AuditEntry>)))]
pub async fn audit_log(
    State(app): AppState,
    Admin(who): Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<Vec<AuditEntry>>> {
    let tenant = tenant_filter(&who, &q)?;
    let since = match q.get("since") {
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| HttpError::bad_request(format!("since: an RFC 3339 time ({e})")))?
                .to_utc(),
        ),
        None => None,
    };
    blocking(move || Ok(Json(app.auth()?.registry.audit_log(tenant.as_deref(), since, MAX_AUDIT_ENTRIES)?))).await
}

/// The tenant a listing is limited to: the `tenant` query (which the
/// caller must cover), else the caller's own tenant, if it has one.
fn tenant_filter(who: &AdminIdentity, q: &HashMap<String, String>) -> Reply<Option<String>> {
    match q.get("tenant") {
        Some(t) => {
            api::check_tenant(t).map_err(HttpError::bad_request)?;
            who.require_tenant(t)?;
            Ok(Some(t.clone()))
        }
        None => Ok(who.tenant.clone()),
    }
}

/// `GET /v1/checkin?since=CURSOR`: the feed for storage nodes that do not
/// report usage.
#[utoipa::path(get, path = "/v1/checkin", tag = "admin", security(("admin_token" = [])),
    params(("since" = Option<u64>, Query, description = "The cursor of the last check-in (default 0)")),
    responses((status = 200, description = "Device state changes after the cursor, the new cursor and every quota", body = CheckinResponse)))]
pub async fn checkin(
    State(app): AppState,
    Admin(who): Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<CheckinResponse>> {
    let since = match q.get("since") {
        Some(s) => s.parse::<u64>().map_err(|_| HttpError::bad_request("since: a number"))?,
        None => 0,
    };
    answer_checkin(app, who, CheckinRequest { since, ..CheckinRequest::default() }).await
}

/// `POST /v1/checkin`: a storage node reports its tenants' usage and gets
/// the device changes after its cursor and every quota.
#[utoipa::path(post, path = "/v1/checkin", tag = "admin", security(("admin_token" = [])),
    request_body = CheckinRequest,
    responses((status = 200, description = "A storage node reports usage; gets device changes after its cursor and every quota", body = CheckinResponse)))]
pub async fn checkin_report(
    State(app): AppState,
    Admin(who): Admin,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<CheckinResponse>> {
    let req: CheckinRequest = parse(&headers, body, MAX_CHECKIN_BODY).await?;
    answer_checkin(app, who, req).await
}

/// Storage nodes check in as administrators of every tenant: the feed
/// names every tenant's devices.
async fn answer_checkin(app: Arc<App>, who: AdminIdentity, req: CheckinRequest) -> Reply<Json<CheckinResponse>> {
    who.require_global_admin()?;
    blocking(move || {
        let registry = &app.auth()?.registry;
        let now = Utc::now();
        if !req.usage.is_empty() {
            registry.record_usage(&req.usage, now)?;
        }
        registry.record_snapshots(&req.snapshots, now)?;
        let (cursor, changes) = registry.changes_since(req.since, 10_000)?;
        if let Some(node) = &req.node {
            registry.record_node(node, cursor, now)?;
        }
        Ok(Json(CheckinResponse { cursor, changes, quotas: registry.quotas()? }))
    })
    .await
}
