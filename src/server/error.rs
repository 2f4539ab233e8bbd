//! The one place errors become HTTP statuses and JSON bodies. Internal
//! errors are logged and answered with a generic message, so nothing about
//! the server's insides (or any secret) leaks to a client.
//!
//! Responses made outside the handlers (axum's 405 and extractor
//! rejections, a tower layer's refusal) get their JSON body here too, from
//! [`json_error_body`], so every error status a client sees carries
//! `{"error", "message"}`.

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::Json;

use super::quota::QuotaError;
use crate::api::{ApiError, ErrorBody};
use crate::auth::admin::ScopeError;
use crate::auth::registry::RegistryError;
use crate::auth::token::TokenError;
use crate::ingest::IngestError;
use crate::lock::LockError;
use crate::repo::RepoError;

/// Seconds a client is told to wait (`Retry-After`) when uploads are at
/// their limit: an upload slot frees within about one chunk's handling time.
const BUSY_RETRY_AFTER_SECS: u32 = 1;

/// An error response: status, stable code, message, and any headers the
/// status calls for (`Retry-After`, `Content-Range`).
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Few and rare, so a list (a `HeaderMap` would triple the error's size).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpError {
    /// An error with a status, a stable code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        HttpError { status, code, message: message.into(), headers: Vec::new() }
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds `Retry-After: SECS`.
    pub fn retry_after(self, secs: u32) -> Self {
        self.with_header(header::RETRY_AFTER, HeaderValue::from(secs))
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401 `invalid_token`: a missing, malformed or forged token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
    }

    /// A valid token that is not allowed to do this.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with a code saying what is unavailable.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// Every chunk upload slot of the server is taken.
    pub fn server_busy() -> Self {
        HttpError::unavailable("server_busy", "the server is handling as many uploads as it can; retry shortly")
            .retry_after(BUSY_RETRY_AFTER_SECS)
    }

    /// Every chunk upload slot of the request's tenant is taken.
    pub fn tenant_busy(limit: usize) -> Self {
        HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_uploads",
            format!("at most {limit} chunk uploads at once per tenant; retry shortly"),
        )
        .retry_after(BUSY_RETRY_AFTER_SECS)
    }

    /// Failed activations from one address are throttled for a minute.
    pub fn too_many_attempts() -> Self {
        HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed activations from this address; try again in a minute",
        )
        .retry_after(60)
    }

    /// A body larger than `limit` bytes.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    /// The client stopped sending its body for longer than the body timeout.
    pub fn body_timeout() -> Self {
        HttpError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "the request body stopped arriving")
    }

    /// The body could not be read (the client went away, or its framing is broken).
    pub fn bad_body(err: impl std::fmt::Display) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, "bad_body", format!("reading the request body: {err}"))
    }

    /// A request target longer than the server accepts.
    pub fn uri_too_long(max: usize) -> Self {
        HttpError::new(StatusCode::URI_TOO_LONG, "uri_too_long", format!("the request target is over {max} bytes"))
    }

    /// Request headers larger than the server accepts.
    pub fn headers_too_large(max: usize) -> Self {
        HttpError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request headers are over {max} bytes"),
        )
    }

    /// A `Range` that selects nothing of a `size`-byte file: 416 with
    /// `Content-Range: bytes */SIZE` (RFC 9110 15.5.17), so the client learns the size.
    pub fn range_not_satisfiable(size: u64) -> Self {
        let range = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
        HttpError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "bad_range",
            format!("one satisfiable bytes= range of {size}"),
        )
        .with_header(header::CONTENT_RANGE, range)
    }

    /// An internal failure: logged in full, answered in general terms.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {err}");
        HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{what} failed"))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.into(), message: self.message };
        (self.status, AppendHeaders(self.headers), Json(body)).into_response()
    }
}

/// The stable code of an error status produced outside the handlers.
fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::UNAUTHORIZED => "invalid_token",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "http_error",
    }
}

/// Gives an error response made outside the handlers (axum's 405 for a
/// known route with another method, an extractor's plain-text rejection, a
/// layer's refusal) the JSON error body, keeping its status and headers
/// (`Allow` on a 405). A short plain-text body becomes the message; JSON
/// error bodies (every [`HttpError`]) pass through untouched.
pub async fn json_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/json");
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejection texts are short; a bound keeps a surprise from costing memory.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    let json = serde_json::to_vec(&ErrorBody { error: code_of(status).into(), message }).expect("serializable");
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    Response::from_parts(parts, Body::from(json))
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::TooLarge(_) => HttpError::too_large("too_large", e.to_string()),
            ApiError::Json(_) => HttpError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()),
            ApiError::Invalid(_) => HttpError::bad_request(e.to_string()),
            ApiError::ManifestTooLarge(_) => {
                HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "manifest_too_large", e.to_string())
            }
        }
    }
}

impl From<TokenError> for HttpError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => HttpError::new(StatusCode::UNAUTHORIZED, "token_expired", e.to_string()),
            TokenError::Malformed | TokenError::BadSignature => HttpError::unauthorized(e.to_string()),
        }
    }
}

impl From<RegistryError> for HttpError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Db(_) | RegistryError::Io(_) => HttpError::internal("registry", e),
            RegistryError::Unavailable(_) => {
                tracing::error!("{e}");
                HttpError::unavailable("registry_unavailable", "the registry is unreachable; retry shortly")
                    .retry_after(BUSY_RETRY_AFTER_SECS)
            }
            RegistryError::UnknownToken => HttpError::unauthorized(e.to_string()),
            RegistryError::Expired => HttpError::new(StatusCode::UNAUTHORIZED, "token_expired", e.to_string()),
            RegistryError::Exhausted => HttpError::new(StatusCode::FORBIDDEN, "activations_exhausted", e.to_string()),
            RegistryError::State(s) => {
                HttpError::new(StatusCode::FORBIDDEN, s.error_code().unwrap_or("forbidden"), e.to_string())
            }
            RegistryError::Conflict => HttpError::new(StatusCode::CONFLICT, "device_conflict", e.to_string()),
            RegistryError::DeviceExists => HttpError::new(StatusCode::CONFLICT, "device_exists", e.to_string()),
            RegistryError::UserNotProvisioned => {
                HttpError::new(StatusCode::FORBIDDEN, "user_not_provisioned", e.to_string())
            }
            RegistryError::NoSuchDevice | RegistryError::NoSuchToken => HttpError::not_found(e.to_string()),
            RegistryError::Revoked => HttpError::new(StatusCode::UNAUTHORIZED, "token_revoked", e.to_string()),
            RegistryError::NotRetired(_) => HttpError::new(StatusCode::CONFLICT, "device_not_retired", e.to_string()),
        }
    }
}

impl From<ScopeError> for HttpError {
    fn from(e: ScopeError) -> Self {
        HttpError::forbidden("forbidden", e.to_string())
    }
}

impl From<QuotaError> for HttpError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Exceeded { .. } => {
                HttpError::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", e.to_string())
            }
            QuotaError::Count(r) => IngestError::Repo(r).into(),
        }
    }
}

impl From<IngestError> for HttpError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::ChunkTooLarge(..) => HttpError::too_large("chunk_too_large", e.to_string()),
            IngestError::ChunkMismatch | IngestError::BundleMismatch(_) => {
                HttpError::new(StatusCode::BAD_REQUEST, "chunk_mismatch", e.to_string())
            }
            IngestError::MissingChunks(_) => HttpError::new(StatusCode::CONFLICT, "missing_chunks", e.to_string()),
            IngestError::SizeMismatch(_) | IngestError::Backup(_) => HttpError::bad_request(e.to_string()),
            IngestError::NotFound(_) | IngestError::Repo(RepoError::NoSuchSnapshot(_)) => {
                HttpError::not_found(e.to_string())
            }
            IngestError::NotOwner => HttpError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            IngestError::OtherDevice => {
                HttpError::new(StatusCode::FORBIDDEN, "restore_to_other_device_denied", e.to_string())
            }
            IngestError::ManifestTooLarge(..) => {
                HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "manifest_too_large", e.to_string())
            }
            IngestError::WriterStopped => HttpError::unavailable("unavailable", e.to_string()),
            // Who holds the lock (host, user, pid) is the operator's business.
            IngestError::Lock(LockError::Locked(_)) => HttpError::unavailable(
                "repository_locked",
                "the repository is locked for maintenance (prune); try again later",
            ),
            // Stored data that fails verification is not the client's fault
            // and not a transient failure: a distinct code, so an operator
            // (and the device) can tell it from an outage.
            IngestError::Repo(r) if r.is_damage() => {
                tracing::error!("damaged data: {r}");
                HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "damaged_data",
                    "stored data failed verification; the operator should run `chunkvault check`",
                )
            }
            IngestError::Repo(_) | IngestError::Read(_) | IngestError::Flush(_) | IngestError::Lock(_) => {
                HttpError::internal("storage", e)
            }
        }
    }
}
