//! Route handlers: extract, call the library on the blocking pool, map the
//! result. Bodies are read with an explicit bound and parsed by `api` on the
//! blocking pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{BoxError, Extension, Json, Router};
use chrono::Utc;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::error::{ErrorCode, HttpError};
use super::{admin, App, Role};
use crate::api::{self, *};
use crate::auth::token::SessionClaims;
use crate::buffers::UPLOAD_BUFFERS;
use crate::id::{BlobId, SnapshotId};
use crate::ingest::{IngestError, Owner, ReadPlan};
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind};

pub(super) type AppState = State<Arc<App>>;
pub(super) type Reply<T> = Result<T, HttpError>;

/// Bytes per message of a streamed file read.
const STREAM_PIECE: usize = 256 * 1024;
/// Longest request target (path and query) the app accepts: a 4096-byte
/// snapshot path, percent-encoded, fits. Well below hyper's own limit
/// (65,534 bytes, answered by hyper without a body), so that a long
/// target gets our JSON 414.
const MAX_URI: usize = 16 * 1024;
/// Largest sum of header names and values the app accepts; below hyper's
/// buffer limit (about 400 KiB, answered by hyper with a bare 431).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The routes of the configured role, with metrics, head bounds, body
/// timeouts and JSON error bodies around all of them.
pub fn router(app: Arc<App>) -> Router {
    let config = &app.config;
    // All chunk uploads together: beyond the limit, 503 at once (load
    // shedding) rather than a queue of 4 MiB bodies.
    let uploads = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            if e.is::<tower::load_shed::error::Overloaded>() {
                HttpError::server_busy()
            } else {
                HttpError::internal("upload limit", e)
            }
        }))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::new(Semaphore::new(config.max_concurrent_uploads))));
    // Commits and missing-chunk queries (up to 64 MiB of JSON each, and a
    // parsed form of a few times that) take turns: they wait, unread, for
    // a slot, which bounds their memory without failing a device's backup.
    // A large one takes every slot, so only one is in memory at a time.
    let slots = config.max_concurrent_manifests;
    let manifests = middleware::from_fn_with_state(
        (Arc::new(Semaphore::new(slots)), u32::try_from(slots).unwrap_or(u32::MAX)),
        manifest_slot,
    );
    let body_timeout = Duration::from_secs(config.body_read_timeout_secs);
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi_json));
    let role = app.config.role;
    if matches!(role, Role::All | Role::Auth) {
        r = r
            .route("/v1/activate", post(activate))
            .route("/v1/session", post(session))
            .route("/v1/session-key", get(session_key))
            .route("/v1/checkin", get(admin::checkin).post(admin::checkin_report))
            .route("/v1/admin/whoami", get(admin::whoami))
            .route("/v1/admin/tokens", post(admin::create_admin_token).get(admin::admin_tokens))
            .route("/v1/admin/tokens/{id}/revoke", post(admin::revoke_admin_token))
            .route("/v1/admin/deployment-tokens", post(admin::create_deployment_token).get(admin::deployment_tokens))
            .route("/v1/admin/deployment-tokens/{id}/revoke", post(admin::revoke_deployment_token))
            .route("/v1/admin/devices", get(admin::devices))
            .route("/v1/admin/devices/{id}", delete(admin::delete_device))
            .route("/v1/admin/devices/{id}/{action}", post(admin::device_action))
            .route("/v1/admin/tenants", get(admin::tenants))
            .route("/v1/admin/tenants/{tenant}/quota", put(admin::set_quota))
            .route("/v1/admin/tenants/{tenant}/users", post(admin::add_users).get(admin::users))
            .route("/v1/admin/tenants/{tenant}/users/{email}", delete(admin::remove_user))
            .route("/v1/admin/audit", get(admin::audit_log))
            .merge(super::fleet::routes())
            .merge(super::console::routes());
    }
    // An edge relays device authentication to the auth role; so does a
    // storage node, so that a device needs one URL in either deployment.
    if matches!(role, Role::Edge | Role::Storage) {
        r = r.route("/v1/activate", post(relay)).route("/v1/session", post(relay));
    }
    if matches!(role, Role::All | Role::Storage) {
        r = r
            .route("/v1/chunking", get(chunking))
            .route("/v1/chunks/missing", post(missing).route_layer(manifests.clone()))
            // The tenant's slot first (outermost), then the total.
            .route(
                "/v1/chunks/{id}",
                put(put_chunk)
                    .route_layer(uploads.clone())
                    .route_layer(middleware::from_fn_with_state(app.clone(), upload_slot)),
            )
            // A bundle is an upload: the same tenant slots and total limit.
            .route(
                "/v1/chunks/bundle",
                post(put_bundle)
                    .route_layer(uploads)
                    .route_layer(middleware::from_fn_with_state(app.clone(), upload_slot)),
            )
            .route("/v1/snapshots", post(commit).route_layer(manifests).get(snapshots))
            .route("/v1/snapshots/{id}/tree", get(tree))
            .route("/v1/snapshots/{id}/file", get(file))
            .route("/v1/snapshots/{id}/restore-plan", post(restore_plan))
            .route("/v1/snapshots/{id}/chunks", post(read_chunks));
    }
    r.fallback(|| async { HttpError::not_found("no such route") })
        .layer(middleware::from_fn(bound_head))
        // Innermost of the rest, so that it sees every error response:
        // axum's 405, extractor rejections, the layers' refusals.
        .layer(middleware::map_response(super::error::json_error_body))
        .layer(middleware::from_fn_with_state(app.clone(), super::access::observe))
        // Inside the body timeout, so that draining a refused body stops
        // when the client does.
        .layer(middleware::map_request(super::linger::linger))
        // A body that stops arriving fails its read (408) instead of
        // holding its connection, buffer and any upload slot.
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        // Bodies are bounded per route by `read_bounded`, with a JSON 413.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Refuses request targets and header sets larger than the app accepts,
/// with JSON errors (see [`MAX_URI`], [`MAX_HEADER_BYTES`]).
async fn bound_head(req: Request, next: Next) -> Response {
    if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > MAX_URI {
        return HttpError::uri_too_long(MAX_URI).into_response();
    }
    // Each header as it was on the wire: name, ": ", value, CRLF.
    let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return HttpError::headers_too_large(MAX_HEADER_BYTES).into_response();
    }
    next.run(req).await
}

fn content_length(h: &HeaderMap) -> u64 {
    declared_length(h).unwrap_or(0)
}

/// The body length a request declares (`Content-Length`), if it does.
fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())
}

/// Reads a body of at most `limit` bytes into one buffer; a larger one is
/// `too_large()`, a stalled one 408, a broken one 400.
///
/// The buffer is sized from `Content-Length` (which hyper holds the body
/// to), so a 64 MiB manifest costs 64 MiB once, not its frames plus a
/// contiguous copy as with `to_bytes`. A body declared over the limit is
/// read (up to the limit, and dropped) rather than refused unread: a
/// client still sending would otherwise see a reset instead of our 413.
async fn read_bounded(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    too_large: impl Fn() -> HttpError,
) -> Reply<Vec<u8>> {
    read_bounded_into(Vec::new(), headers, body, limit, too_large).await
}

/// [`read_bounded`] into `buf` (emptied first; a buffer taken from a pool
/// saves faulting in a fresh one for every upload).
async fn read_bounded_into(
    mut buf: Vec<u8>,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    too_large: impl Fn() -> HttpError,
) -> Reply<Vec<u8>> {
    let declared = content_length(headers);
    let keep = declared <= limit as u64;
    buf.clear();
    if keep {
        buf.reserve_exact(declared as usize);
    }
    let mut read = 0usize;
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(body_error)?;
        read += frame.len();
        if read > limit {
            return Err(too_large());
        }
        if keep {
            if buf.capacity() < read {
                // Chunked bodies: grow by doubling, but never past the limit.
                let want = (buf.capacity() * 2).max(read).min(limit);
                buf.reserve_exact(want - buf.len());
            }
            buf.extend_from_slice(&frame);
        }
    }
    Ok(buf)
}

/// A body read failure: the body timeout, or the client's fault.
fn body_error(e: axum::Error) -> HttpError {
    let inner = e.into_inner();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*inner);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return HttpError::body_timeout();
        }
        cause = c.source();
    }
    HttpError::bad_body(inner)
}

/// Reads a bounded JSON body and parses it on the blocking pool: a large
/// manifest takes a good part of a second to parse, which on an async
/// worker would stall every other request it serves (`/healthz` too).
pub(super) async fn parse<T: serde::de::DeserializeOwned + Validate + Send + 'static>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Reply<T> {
    let bytes = read_bounded(headers, body, limit, || api::ApiError::TooLarge(limit).into()).await?;
    blocking(move || Ok(api::parse_body(&bytes, limit)?)).await
}

/// Runs blocking library work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Reply<T> + Send + 'static) -> Reply<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| HttpError::internal("worker", e))?
}

#[utoipa::path(get, path = "/metrics", tag = "operator", security((), ("metrics_token" = [])),
    responses((status = 200, description = "Prometheus text format (version 0.0.4)", content_type = "text/plain", body = String)))]
async fn metrics(State(app): AppState, headers: HeaderMap) -> Reply<Response> {
    app.require_metrics_token(&headers)?;
    let text = blocking(move || {
        if let Some(storage) = &app.storage {
            for tenant in app.metrics.tenants() {
                // A closed tenant is not opened for this: its gauges keep
                // their last values.
                match crate::ingest::TenantName::new(&tenant).map(|name| storage.tenants.if_open(&name)) {
                    Ok(Some(t)) => app.metrics.set_tenant_usage(&tenant, super::metrics::usage(t.repo())),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("metrics: tenant {tenant}: {e}"),
                }
            }
        }
        Ok(app.metrics.render(Utc::now().timestamp()))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response())
}

/// Liveness: answers while the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operator",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// This API's OpenAPI 3.1 description (also `docs/openapi.json`).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operator",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOC.get_or_init(super::openapi::json).as_str();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

// ---- auth role ----

#[utoipa::path(post, path = "/v1/activate", tag = "device", request_body = ActivateRequest,
    responses(
        (status = 200, description = "The device's long-lived device token", body = ActivateResponse),
        (status = 401, description = "`invalid_token`, `token_expired`, `token_revoked`: an unknown, expired or revoked deployment token", body = ErrorBody),
        (status = 403, description = "`activations_exhausted`, `user_not_provisioned`, `device_retired`, `device_blocked`, `device_wiped`: the token may not activate this device", body = ErrorBody),
        (status = 409, description = "`device_conflict`, `device_exists`: the device id is taken by another user or tenant", body = ErrorBody),
        (status = 429, description = "`too_many_attempts`: too many failed activations from this address; see Retry-After", body = ErrorBody),
        (status = 503, description = "`upstream_unreachable`: an edge or storage node could not reach the auth role; `registry_unavailable`: the auth role could not reach its registry", body = ErrorBody),
    ))]
async fn activate(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<ActivateResponse>> {
    let auth = app.auth()?;
    auth.limiter.check(peer.ip(), app.config.activation_failures_per_minute)?;
    let req: ActivateRequest = match parse(&headers, body, MAX_JSON_BODY).await {
        Ok(r) => r,
        Err(e) => {
            auth.limiter.failed(peer.ip());
            return Err(e);
        }
    };
    super::access::note(None, Some(&req.device_id));
    let app2 = app.clone();
    let result = blocking(move || {
        let auth = app2.auth()?;
        let a = auth.registry.activate(&req.deployment_token, &req.email, &req.device_id, Utc::now())?;
        // A reset device id activated again: in the `all` role the storage
        // side learns at once that its earlier sessions stay void.
        if let (Some(change), Some(storage)) = (&a.change, &app2.storage) {
            storage.states.apply(std::slice::from_ref(change));
        }
        // The user's email stays out of the log: it is personal data, and
        // the registry (devices, audit) already ties it to the device.
        tracing::info!(
            "device {} activated in tenant {} with deployment token {}",
            req.device_id,
            a.tenant,
            a.deployment_token_id
        );
        Ok(ActivateResponse { device_token: a.device_token })
    })
    .await;
    if result.is_err() {
        auth.limiter.failed(peer.ip());
    }
    result.map(Json)
}

#[utoipa::path(post, path = "/v1/session", tag = "device", request_body = SessionRequest,
    responses(
        (status = 200, description = "A signed, short-lived session token and the device's policies", body = SessionResponse),
        (status = 401, description = "`invalid_token`, `token_expired`: the device token is unknown or does not match the email and device id", body = ErrorBody),
        (status = 403, description = "`device_retired`, `device_blocked`, `device_wiped`: the device may not start sessions", body = ErrorBody),
        (status = 503, description = "`upstream_unreachable`: an edge or storage node could not reach the auth role; `registry_unavailable`: the auth role could not reach its registry", body = ErrorBody),
    ))]
async fn session(State(app): AppState, headers: HeaderMap, body: Body) -> Reply<Json<SessionResponse>> {
    let req: SessionRequest = parse(&headers, body, MAX_JSON_BODY).await?;
    super::access::note(None, Some(&req.device_id));
    blocking(move || {
        let auth = app.auth()?;
        let now = Utc::now();
        let id = auth.registry.authenticate_device(&req.device_token, &req.email, &req.device_id, now)?;
        let expires_at = now + Duration::from_secs(app.config.session_ttl_secs);
        let claims = SessionClaims {
            tenant: id.tenant,
            user: id.email,
            device: id.device_id,
            expires: expires_at.timestamp(),
            token_id: rand::random(),
            generation: id.generation,
            policies: id.policies,
        };
        Ok(Json(SessionResponse { session_token: auth.signer.sign(&claims), expires_at, policies: id.policies }))
    })
    .await
}

#[utoipa::path(get, path = "/v1/session-key", tag = "device",
    responses(
        (status = 200, description = "The auth role's Ed25519 public key, which storage nodes verify sessions with", body = SessionKey),
        (status = 404, description = "`not_found`: this server does not run the auth role", body = ErrorBody),
    ))]
async fn session_key(State(app): AppState) -> Reply<Json<SessionKey>> {
    Ok(Json(SessionKey { public_key: app.auth()?.signer.verifier().public_hex() }))
}

// ---- edge role ----

/// Forwards an activation or session request to the auth role unchanged.
async fn relay(State(app): AppState, path: MatchedPath, headers: HeaderMap, body: Body) -> Reply<Response> {
    let limit = MAX_JSON_BODY;
    let bytes = read_bounded(&headers, body, limit, || api::ApiError::TooLarge(limit).into()).await?;
    let url = format!("{}{}", app.config.upstream.as_deref().unwrap_or_default().trim_end_matches('/'), path.as_str());
    let agent = app.upstream.clone();
    blocking(move || {
        let resp = agent
            .post(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .header("Content-Type", "application/json")
            .send(&bytes[..])
            .map_err(|e| {
                let e = crate::tls::explain(&e, super::HOW_TO_TRUST_UPSTREAM);
                HttpError::upstream_unreachable(e)
            })?;
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let body = resp
            .into_body()
            .with_config()
            .limit(MAX_JSON_BODY as u64)
            .read_to_vec()
            .map_err(HttpError::upstream_unreachable)?;
        Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
    })
    .await
}

// ---- storage role ----

fn snapshot_id(s: &str) -> Reply<SnapshotId> {
    s.parse().map_err(|e| HttpError::bad_id("snapshot", e))
}

#[utoipa::path(get, path = "/v1/chunking", tag = "storage", security(("session_token" = [])),
    responses((status = 200, description = "How the tenant's repository cuts and names chunks", body = Chunking)))]
async fn chunking(State(app): AppState, headers: HeaderMap) -> Reply<Json<Chunking>> {
    let owner = app.session(&headers)?;
    blocking(move || {
        let tenant = app.storage()?.tenants.hold(&owner.tenant)?;
        let repo = tenant.repo();
        let p = repo.config().chunker;
        Ok(Json(Chunking {
            min_size: p.min_size,
            avg_size: p.avg_size,
            max_size: p.max_size,
            seed: repo.chunker_seed(),
            id_key: hex::encode(repo.id_key().as_bytes()),
        }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/chunks/missing", tag = "storage", security(("session_token" = [])),
    request_body = MissingRequest,
    responses((status = 200, description = "The chunk ids the tenant's repository lacks", body = MissingResponse)))]
async fn missing(State(app): AppState, headers: HeaderMap, body: Body) -> Reply<Json<MissingResponse>> {
    let owner = app.session(&headers)?;
    let req: MissingRequest = parse(&headers, body, MAX_MANIFEST_BODY).await?;
    blocking(move || {
        let tenant = app.storage()?.tenants.hold(&owner.tenant)?;
        let missing = tenant.missing(&req.chunks);
        app.metrics.chunks_offered(owner.tenant.as_str(), req.chunks.len(), missing.len());
        Ok(Json(MissingResponse { missing }))
    })
    .await
}

/// Bodies above this take every manifest slot (see `router`).
const LARGE_MANIFEST: u64 = 4 << 20;

/// Waits for manifest slots: one for a small body, all of them for a large
/// one (by `Content-Length`; without one, a body counts as large).
async fn manifest_slot(State((slots, all)): State<(Arc<Semaphore>, u32)>, req: Request, next: Next) -> Response {
    let len = declared_length(req.headers());
    let wanted = if len.is_some_and(|l| l <= LARGE_MANIFEST) { 1 } else { all };
    match slots.acquire_many(wanted).await {
        Ok(_permits) => next.run(req).await,
        Err(e) => HttpError::internal("manifest limit", e).into_response(),
    }
}

/// Verifies an upload's session and takes one of its tenant's upload slots
/// and room for its body in the upload buffer (waiting a bounded time),
/// before the total limit and the handler; both are held until the handler
/// has handed the chunks to the writer and dropped the body.
async fn upload_slot(State(app): AppState, mut req: Request, next: Next) -> Response {
    let owner = match app.session(req.headers()) {
        Ok(owner) => owner,
        Err(e) => return e.into_response(),
    };
    let declared = declared_length(req.headers());
    let taken = async {
        let slot = app.storage()?.upload_slots.take(owner.tenant.as_str(), declared).await?;
        Ok::<_, HttpError>((owner, slot))
    };
    match taken.await {
        Ok((owner, _slot)) => {
            req.extensions_mut().insert(owner);
            let _in_flight = app.metrics.upload_started();
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(put, path = "/v1/chunks/{id}", tag = "storage", security(("session_token" = [])),
    params(("id" = String, Path, description = "The chunk id: its keyed BLAKE3, 64 lowercase hex digits", pattern = "^[0-9a-f]{64}$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The chunk's plaintext"),
    responses(
        (status = 201, description = "Stored"),
        (status = 200, description = "Already stored"),
        (status = 400, description = "`bad_id`, `chunk_mismatch`, `bad_body`: a malformed id, or bytes that do not hash to it", body = ErrorBody),
        (status = 507, description = "`quota_exceeded`: storing this would pass the tenant's quota", body = ErrorBody),
        (status = 413, description = "`chunk_too_large`: larger than the repository's maximum chunk size", body = ErrorBody),
        (status = 429, description = "`too_many_uploads`: the tenant's upload slots are taken; see Retry-After", body = ErrorBody),
        (status = 503, description = "`server_busy`, `repository_locked`, `auth_unreachable`, `unavailable`: retry later; see Retry-After", body = ErrorBody),
    ))]
async fn put_chunk(
    State(app): AppState,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Reply<StatusCode> {
    let id: BlobId = id.parse().map_err(|e| HttpError::bad_id("chunk", e))?;
    let (app2, name) = (app.clone(), owner.tenant.clone());
    let tenant = blocking(move || Ok(app2.storage()?.tenants.hold(&owner.tenant)?)).await?;
    let max = tenant.repo().config().chunker.max_size as usize;
    let too_large = || HttpError::too_large(ErrorCode::ChunkTooLarge, format!("chunks are at most {max} bytes"));
    // Pooled like a bundle's body: the writer gives both back once sealed.
    let data = read_bounded_into(UPLOAD_BUFFERS.take(), &headers, body, max, too_large).await?;
    let new = blocking(move || {
        let admitted = app.storage()?.quotas.admit(name.as_str(), &tenant, &[(id, data.len())])?;
        let new = tenant.put_chunk(id, data)?;
        admitted.settle(new);
        Ok(new)
    })
    .await?;
    Ok(if new { StatusCode::CREATED } else { StatusCode::OK })
}

/// `POST /v1/chunks/bundle`: many chunks in one framed body
/// (`api::parse_bundle`), each verified against its id before any is
/// stored; only the ones the tenant lacks are stored.
#[utoipa::path(post, path = "/v1/chunks/bundle", tag = "storage", security(("session_token" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Chunks framed `id (32 bytes) | length (u32 LE) | plaintext`, back to back"),
    responses(
        (status = 200, description = "How many chunks were stored and how many were already there", body = BundleResponse),
        (status = 400, description = "`bad_bundle`, `chunk_mismatch`, `bad_body`: broken framing, or a chunk that does not hash to its id", body = ErrorBody),
        (status = 507, description = "`quota_exceeded`: storing this would pass the tenant's quota", body = ErrorBody),
        (status = 413, description = "`bundle_too_large`: the body is over the bundle limit", body = ErrorBody),
        (status = 429, description = "`too_many_uploads`: the tenant's upload slots are taken; see Retry-After", body = ErrorBody),
        (status = 503, description = "`server_busy`, `repository_locked`, `auth_unreachable`, `unavailable`: retry later; see Retry-After", body = ErrorBody),
    ))]
async fn put_bundle(
    State(app): AppState,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Body,
) -> Reply<Json<BundleResponse>> {
    let (app2, name) = (app.clone(), owner.tenant.clone());
    let tenant = blocking(move || Ok(app2.storage()?.tenants.hold(&owner.tenant)?)).await?;
    let max_chunk = tenant.repo().config().chunker.max_size as usize;
    let limit = MAX_BUNDLE_BODY.max(max_chunk + BUNDLE_FRAME_HEADER);
    let too_large = || HttpError::too_large(ErrorCode::BundleTooLarge, format!("bundles are at most {limit} bytes"));
    let data = read_bounded_into(UPLOAD_BUFFERS.take(), &headers, body, limit, too_large).await?;
    blocking(move || {
        let chunks = api::parse_bundle(&data, max_chunk).map_err(HttpError::bad_bundle)?;
        let sizes: Vec<_> = chunks.iter().map(|(id, r)| (*id, r.len())).collect();
        let admitted = app.storage()?.quotas.admit(name.as_str(), &tenant, &sizes)?;
        let stored = tenant.put_bundle(data, chunks)?;
        admitted.settle(stored.stored > 0);
        Ok(Json(stored))
    })
    .await
}

#[utoipa::path(post, path = "/v1/snapshots", tag = "storage", security(("session_token" = [])),
    request_body = CommitRequest,
    responses(
        (status = 200, description = "The committed snapshot", body = CommitResponse),
        (status = 409, description = "`missing_chunks`: the manifest names chunks the repository lacks", body = ErrorBody),
        (status = 413, description = "`too_large`, `manifest_too_large`: the manifest is over a limit", body = ErrorBody),
    ))]
async fn commit(State(app): AppState, headers: HeaderMap, body: Body) -> Reply<Json<CommitResponse>> {
    let owner = app.session(&headers)?;
    let req: CommitRequest = parse(&headers, body, MAX_MANIFEST_BODY).await?;
    blocking(move || {
        let storage = app.storage()?;
        let tenant = storage.tenants.hold(&owner.tenant)?;
        // The next usage report counts the new snapshot.
        storage.quotas.touch(owner.tenant.as_str(), &tenant);
        Ok(Json(tenant.commit(owner, req)?))
    })
    .await
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "storage", security(("session_token" = [])),
    responses((status = 200, description = "The user's snapshots", body = Vec<SnapshotInfo>)))]
async fn snapshots(State(app): AppState, headers: HeaderMap) -> Reply<Json<Vec<SnapshotInfo>>> {
    let owner = app.session(&headers)?;
    blocking(move || {
        let snapshots = app.storage()?.tenants.hold(&owner.tenant)?.snapshots(&owner)?;
        Ok(Json(snapshots.into_iter().map(snapshot_info).collect()))
    })
    .await
}

#[utoipa::path(get, path = "/v1/snapshots/{id}/tree", tag = "storage", security(("session_token" = [])),
    params(("id" = String, Path, description = "The snapshot id (64 hex digits)", pattern = "^[0-9a-f]{64}$"),
        ("path" = Option<String>, Query, description = "A directory in the snapshot (default: its root)")),
    responses((status = 200, description = "The directory's entries", body = Vec<TreeEntry>)))]
async fn tree(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Json<Vec<TreeEntry>>> {
    let owner = app.session(&headers)?;
    let id = snapshot_id(&id)?;
    let path = q.get("path").cloned().unwrap_or_default();
    blocking(move || {
        let nodes = app.storage()?.tenants.hold(&owner.tenant)?.tree(&owner, &id, &path)?;
        Ok(Json(nodes.iter().map(tree_entry).collect()))
    })
    .await
}

/// What a restore of a snapshot (or of some paths of it) creates, and the
/// chunks it needs in the order they are read fastest.
#[utoipa::path(post, path = "/v1/snapshots/{id}/restore-plan", tag = "storage", security(("session_token" = [])),
    params(("id" = String, Path, description = "The snapshot id (64 hex digits)", pattern = "^[0-9a-f]{64}$")),
    request_body = RestorePlanRequest,
    responses((status = 200, description = "Every entry to create, and the chunks needed in the order they read fastest", body = RestorePlanResponse)))]
async fn restore_plan(State(app): AppState, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Reply<Response> {
    let owner = app.session(&headers)?;
    let id = snapshot_id(&id)?;
    let req: RestorePlanRequest = parse(&headers, body, MAX_JSON_BODY * 16).await?;
    blocking(move || {
        let plan = app.storage()?.tenants.hold(&owner.tenant)?.restore_plan(&owner, &id, &req.include)?;
        let json = restore_plan_response(plan).to_json();
        Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
    })
    .await
}

/// A snapshot as the list route shows it.
fn snapshot_info((id, s): (SnapshotId, Snapshot)) -> SnapshotInfo {
    SnapshotInfo {
        id,
        time: s.time.to_utc(),
        device: s.device,
        hostname: s.hostname,
        paths: s.paths,
        tags: s.tags,
        files: s.summary.files_new + s.summary.files_changed + s.summary.files_unmodified,
        bytes: s.summary.total_bytes,
    }
}

/// A directory entry as the tree route shows it.
fn tree_entry(n: &Node) -> TreeEntry {
    TreeEntry {
        name: n.name_lossy(),
        kind: n.type_name().into(),
        size: n.size,
        mode: n.mode,
        mtime: n.mtime.sec,
        mtime_nsec: n.mtime.nsec,
    }
}

/// A device's restore plan on the wire: every entry with its metadata, and
/// every chunk once in pack order.
fn restore_plan_response(read: ReadPlan) -> RestorePlanResponse {
    // Entries taken apart, not copied: a plan may hold 42,000 files.
    let wire = |e: crate::restore::PlanEntry| {
        let n = e.node;
        let (kind, chunks, target) = match n.kind {
            NodeKind::File { chunks } => (EntryKind::File, chunks, None),
            NodeKind::Dir { .. } => (EntryKind::Dir, Vec::new(), None),
            NodeKind::Symlink { target } => {
                (EntryKind::Symlink, Vec::new(), Some(String::from_utf8_lossy(&target).into_owned()))
            }
            // Not reached: fifos and devices are in `plan.specials`, which
            // a device is not sent.
            NodeKind::Special { .. } => (EntryKind::File, Vec::new(), None),
        };
        PlanEntry {
            path: e.rel.into_os_string().into_string().unwrap_or_else(|p| p.to_string_lossy().into_owned()),
            kind,
            mode: n.mode & 0o7777,
            uid: n.uid,
            gid: n.gid,
            mtime: n.mtime.sec,
            mtime_nsec: n.mtime.nsec,
            size: n.size,
            chunks,
            target,
        }
    };
    let plan = read.plan;
    let entries = plan.dirs.into_iter().chain(plan.files).chain(plan.symlinks).map(wire).collect();
    let chunks = read.chunks.into_iter().map(|(id, len)| PlanChunk { id, len }).collect();
    RestorePlanResponse { entries, chunks }
}

/// Chunks of a snapshot, streamed as frames (`api::ChunkReadRequest`) as
/// they are read and verified, in pack order.
#[utoipa::path(post, path = "/v1/snapshots/{id}/chunks", tag = "storage", security(("session_token" = [])),
    params(("id" = String, Path, description = "The snapshot id (64 hex digits)", pattern = "^[0-9a-f]{64}$")),
    request_body = ChunkReadRequest,
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>,
        description = "Frames `id (32 bytes) | status (u8: 0 ok, 1 failed) | length (u32 LE) | plaintext or error text`, in pack order")))]
async fn read_chunks(State(app): AppState, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Reply<Response> {
    let owner = app.session(&headers)?;
    let id = snapshot_id(&id)?;
    // At most 4096 quoted hex ids; the bound leaves room for whitespace.
    let req: ChunkReadRequest = parse(&headers, body, MAX_CHUNK_READ * 128 + 1024).await?;
    let app2 = app.clone();
    let (tenant, grant) = blocking(move || {
        let tenant = app2.storage()?.tenants.hold(&owner.tenant)?;
        let grant = tenant.grant_chunks(&owner, &id, req.chunks)?;
        Ok((tenant, grant))
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, IngestError>>(4);
    let (slot, stall) = app.read_slot().await?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let out = std::sync::Mutex::new(ChannelWriter::new(tx, stall));
        tenant.read_chunks(&grant, &|id, result| {
            use std::io::Write;
            let (status, payload): (u8, std::borrow::Cow<[u8]>) = match result {
                Ok(data) => (0, data.into()),
                Err(e) => {
                    tracing::error!("reading chunk {id} for a restore: {e}");
                    let mut msg = e.to_string().into_bytes();
                    msg.truncate(MAX_CHUNK_ERROR);
                    (1, msg.into())
                }
            };
            let mut out = out.lock().expect("stream lock");
            let mut header = [0u8; CHUNK_FRAME_HEADER];
            header[..32].copy_from_slice(&id.0);
            header[32] = status;
            header[33..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            // A client that went away stops receiving; the rest is read for nothing.
            let _ = out.write_all(&header).and_then(|_| out.write_all(&payload));
        });
        use std::io::Write;
        let _ = out.into_inner().expect("stream lock").flush();
    });
    let mut resp = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// A file's bytes, whole or one `Range: bytes=` range, streamed through a
/// bounded channel as chunks are read and verified. The status is sent
/// with the first piece: a failure before it (a damaged first chunk) is a
/// JSON error, one after it cuts the response short.
#[utoipa::path(get, path = "/v1/snapshots/{id}/file", tag = "storage", security(("session_token" = [])),
    params(("id" = String, Path, description = "The snapshot id (64 hex digits)", pattern = "^[0-9a-f]{64}$"),
        ("path" = String, Query, description = "A file in the snapshot"),
        ("Range" = Option<String>, Header, description = "One `bytes=` range")),
    responses(
        (status = 200, description = "The file's bytes, each verified against its chunk id", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 416, description = "`bad_range`: the range selects nothing of the file; Content-Range says its size", body = ErrorBody),
    ))]
async fn file(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<Response> {
    let owner = app.session(&headers)?;
    let id = snapshot_id(&id)?;
    let path = q.get("path").cloned().ok_or_else(|| HttpError::bad_request("path is required"))?;
    let app2 = app.clone();
    let (tenant, node) = blocking(move || {
        let tenant = app2.storage()?.tenants.hold(&owner.tenant)?;
        let node = tenant.file(&owner, &id, &path)?;
        Ok((tenant, node))
    })
    .await?;
    let size = node.size;
    let range = headers.get(header::RANGE).map(|v| parse_range(v.to_str().unwrap_or(""), size)).transpose()?;
    let (start, end) = range.unwrap_or((0, size));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, IngestError>>(4);
    let name = node.name_lossy();
    let (slot, stall) = app.read_slot().await?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut out = ChannelWriter::new(tx.clone(), stall);
        let result = tenant.read_file(&node, start, end, &mut out).and_then(|_| {
            use std::io::Write;
            out.flush().map_err(|e| IngestError::Read(crate::restore::RestoreError::Output(e)))
        });
        if let Err(e) = result {
            out.fail(e);
        }
    });
    // Every byte in a piece was verified before it was written to the
    // channel, so waiting for the first piece is waiting for the first
    // verified chunk(s), up to STREAM_PIECE bytes.
    let first = match rx.recv().await {
        Some(Ok(piece)) => Some(piece),
        Some(Err(e)) => return Err(e.into()),
        None => None,
    };
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |piece| {
        piece.map_err(|e| {
            // Abort the body: the client sees a short read, never wrong bytes.
            tracing::error!("reading {name} of a snapshot: {e}; cutting the response");
            std::io::Error::other("read failed")
        })
    });
    let body = Body::from_stream(tokio_stream::iter(first.map(Ok)).chain(rest));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let v = format!("bytes {start}-{}/{size}", end.saturating_sub(1));
        resp.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).expect("ascii"));
    }
    Ok(resp)
}

/// Parses a `Range:` header into one `start..end` (end exclusive) within
/// `size`. Several ranges (a multipart answer) are refused as unsatisfiable.
fn parse_range(value: &str, size: u64) -> Reply<(u64, u64)> {
    let bad = || HttpError::range_not_satisfiable(size);
    let ranges = http_range_header::parse_range_header(value).and_then(|r| r.validate(size)).map_err(|_| bad())?;
    match ranges.as_slice() {
        [one] => Ok((*one.start(), one.end() + 1)),
        _ => Err(bad()),
    }
}

/// A `Write` that sends pieces of a bounded size into the response channel,
/// from a blocking thread; a client that takes no piece for `stall` ends
/// the stream (it holds a read slot and a read buffer meanwhile).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, IngestError>>,
    buf: Vec<u8>,
    stall: Duration,
    /// The runtime whose timer bounds each send: writes also come from the
    /// blob read path's rayon threads, which are outside it.
    runtime: tokio::runtime::Handle,
}

impl ChannelWriter {
    /// Called on a blocking thread of the runtime.
    fn new(tx: tokio::sync::mpsc::Sender<Result<Bytes, IngestError>>, stall: Duration) -> Self {
        let runtime = tokio::runtime::Handle::current();
        ChannelWriter { tx, buf: Vec::with_capacity(STREAM_PIECE), stall, runtime }
    }

    /// Sends `piece` unless the client is gone or stalled for `stall`.
    fn send(&self, piece: Result<Bytes, IngestError>) -> std::io::Result<()> {
        // The timer is made inside `block_on`, in the runtime's context.
        let send = async { tokio::time::timeout(self.stall, self.tx.send(piece)).await };
        match self.runtime.block_on(send) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::other("client went away")),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading")),
        }
    }

    /// Ends the stream with `e` (cut short, or a JSON error if nothing was sent).
    fn fail(&self, e: IngestError) {
        let _ = self.send(Err(e));
    }
}

impl std::io::Write for ChannelWriter {
    /// Takes at most what fills the current piece, so that no piece is
    /// larger than `STREAM_PIECE` (a whole chunk, up to 16 MiB, would make
    /// the channel hold 4 of those per stream); `write_all` loops.
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= STREAM_PIECE {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(STREAM_PIECE)));
        self.send(Ok(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=95-200", 100).unwrap(), (95, 100));
        for bad in ["bytes=100-", "bytes=5-4", "items=0-1", "bytes=a-b", "bytes=0-1,3-4", ""] {
            assert!(parse_range(bad, 100).is_err(), "{bad}");
        }
    }
}
