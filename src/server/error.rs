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

/// Declares [`ErrorCode`]: every stable error code a client can see, each
/// with the one status it is sent with.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $status:ident $code:literal,)*) => {
        /// Every stable error code a client can see (the `error` field of
        /// the JSON error body), each with the one HTTP status it comes
        /// with. The OpenAPI document names these codes in its response
        /// descriptions; a test holds the two to each other.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The status this code is sent with.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }

            /// The code as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    /// A request that breaks the API's rules (a bad field, a bad query).
    InvalidRequest = BAD_REQUEST "invalid_request",
    /// An id in the path that is not 64 hex digits.
    BadId = BAD_REQUEST "bad_id",
    /// A chunk bundle with broken framing.
    BadBundle = BAD_REQUEST "bad_bundle",
    /// A body that could not be read.
    BadBody = BAD_REQUEST "bad_body",
    /// A body that is not the JSON the route takes.
    MalformedJson = BAD_REQUEST "malformed_json",
    /// A chunk that does not hash to its id.
    ChunkMismatch = BAD_REQUEST "chunk_mismatch",
    /// A missing, malformed or forged token.
    InvalidToken = UNAUTHORIZED "invalid_token",
    /// A token past its expiry.
    TokenExpired = UNAUTHORIZED "token_expired",
    /// A deployment token the administrator revoked.
    TokenRevoked = UNAUTHORIZED "token_revoked",
    /// The caller may not do this.
    Forbidden = FORBIDDEN "forbidden",
    /// A deployment token with no activations left.
    ActivationsExhausted = FORBIDDEN "activations_exhausted",
    /// An email that a provisioned-only token does not list.
    UserNotProvisioned = FORBIDDEN "user_not_provisioned",
    /// The device was blocked.
    DeviceBlocked = FORBIDDEN "device_blocked",
    /// The device was retired.
    DeviceRetired = FORBIDDEN "device_retired",
    /// The device was wiped.
    DeviceWiped = FORBIDDEN "device_wiped",
    /// The device's activation was reset.
    DeviceReset = FORBIDDEN "device_reset",
    /// A restore of another device's snapshot that the policy forbids.
    RestoreToOtherDeviceDenied = FORBIDDEN "restore_to_other_device_denied",
    /// No such route, snapshot, path, device or token.
    NotFound = NOT_FOUND "not_found",
    /// A known route with another method.
    MethodNotAllowed = METHOD_NOT_ALLOWED "method_not_allowed",
    /// A request that took too long as a whole.
    RequestTimeout = REQUEST_TIMEOUT "request_timeout",
    /// A body that stopped arriving.
    BodyTimeout = REQUEST_TIMEOUT "body_timeout",
    /// The device id is taken by another user's device.
    DeviceConflict = CONFLICT "device_conflict",
    /// A device id that is already registered.
    DeviceExists = CONFLICT "device_exists",
    /// A device deleted before it was retired or wiped.
    DeviceNotRetired = CONFLICT "device_not_retired",
    /// A commit naming chunks the repository lacks.
    MissingChunks = CONFLICT "missing_chunks",
    /// A body over the route's limit.
    TooLarge = PAYLOAD_TOO_LARGE "too_large",
    /// A commit manifest over its limit.
    ManifestTooLarge = PAYLOAD_TOO_LARGE "manifest_too_large",
    /// A chunk over the repository's largest chunk.
    ChunkTooLarge = PAYLOAD_TOO_LARGE "chunk_too_large",
    /// A bundle over the bundle limit.
    BundleTooLarge = PAYLOAD_TOO_LARGE "bundle_too_large",
    /// A request target over the limit.
    UriTooLong = URI_TOO_LONG "uri_too_long",
    /// A body of a content type the route does not take.
    UnsupportedMediaType = UNSUPPORTED_MEDIA_TYPE "unsupported_media_type",
    /// A `Range` that selects nothing of the file.
    BadRange = RANGE_NOT_SATISFIABLE "bad_range",
    /// A body that parses but cannot be processed (made outside the handlers).
    UnprocessableEntity = UNPROCESSABLE_ENTITY "unprocessable_entity",
    /// A limit of a layer outside the handlers.
    TooManyRequests = TOO_MANY_REQUESTS "too_many_requests",
    /// The tenant's upload slots are taken.
    TooManyUploads = TOO_MANY_REQUESTS "too_many_uploads",
    /// Too many failed activations from one address.
    TooManyAttempts = TOO_MANY_REQUESTS "too_many_attempts",
    /// Request headers over the limit.
    HeadersTooLarge = REQUEST_HEADER_FIELDS_TOO_LARGE "headers_too_large",
    /// An internal failure (logged; the message says nothing more).
    Internal = INTERNAL_SERVER_ERROR "internal",
    /// Stored data failed verification.
    DamagedData = INTERNAL_SERVER_ERROR "damaged_data",
    /// The service cannot answer now.
    Unavailable = SERVICE_UNAVAILABLE "unavailable",
    /// Every upload slot of the server is taken.
    ServerBusy = SERVICE_UNAVAILABLE "server_busy",
    /// The repository is locked for maintenance.
    RepositoryLocked = SERVICE_UNAVAILABLE "repository_locked",
    /// The auth role cannot reach its registry (a shared PostgreSQL).
    RegistryUnavailable = SERVICE_UNAVAILABLE "registry_unavailable",
    /// The edge relay cannot reach the auth role.
    UpstreamUnreachable = SERVICE_UNAVAILABLE "upstream_unreachable",
    /// A fail-closed storage node has not reached the auth role lately.
    AuthUnreachable = SERVICE_UNAVAILABLE "auth_unreachable",
    /// Storing this would pass the tenant's quota.
    QuotaExceeded = INSUFFICIENT_STORAGE "quota_exceeded",
}

impl ErrorCode {
    /// The code with this wire name, if any.
    pub fn from_wire(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == code)
    }

    /// The code that refuses a device in `state` (`forbidden` for an
    /// active one, which is refused for another reason).
    fn of_device(state: crate::auth::DeviceState) -> ErrorCode {
        state.error_code().and_then(ErrorCode::from_wire).unwrap_or(ErrorCode::Forbidden)
    }
}

/// An error response: status, stable code, message, and any headers the
/// status calls for (`Retry-After`, `Content-Range`).
#[derive(Debug)]
pub struct HttpError {
    /// The status, which follows from the code (or, for a response made
    /// outside the handlers, the code from the status).
    pub status: StatusCode,
    /// The stable code of the JSON error body.
    pub code: &'static str,
    /// The human-readable message.
    pub message: String,
    /// Few and rare, so a list (a `HeaderMap` would triple the error's size).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpError {
    /// An error with a stable code (and so its status) and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        HttpError { status: code.status(), code: code.as_str(), message: message.into(), headers: Vec::new() }
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(self, secs: u32) -> Self {
        self.with_header(header::RETRY_AFTER, HeaderValue::from(secs))
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::InvalidRequest, message)
    }

    /// 400 `bad_id`: an id in the path that does not parse.
    pub fn bad_id(what: &str, err: impl std::fmt::Display) -> Self {
        HttpError::new(ErrorCode::BadId, format!("{what} id: {err}"))
    }

    /// 400 `bad_bundle`: a chunk bundle whose framing is broken.
    pub fn bad_bundle(message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::BadBundle, message)
    }

    /// 401 `invalid_token`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::InvalidToken, message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::Forbidden, message)
    }

    /// 403 with the code of a device's state (`device_retired`, ...).
    pub fn device_refused(state: crate::auth::DeviceState, message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::of_device(state), message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        HttpError::new(ErrorCode::NotFound, message)
    }

    /// The edge relay could not reach the auth role.
    pub fn upstream_unreachable(err: impl std::fmt::Display) -> Self {
        HttpError::new(ErrorCode::UpstreamUnreachable, format!("auth server: {err}"))
    }

    /// A fail-closed storage node that has not reached the auth role lately.
    pub fn auth_unreachable() -> Self {
        HttpError::new(ErrorCode::AuthUnreachable, "the auth server is unreachable and this node fails closed")
    }

    /// Every chunk upload slot of the server is taken.
    pub fn server_busy() -> Self {
        HttpError::new(ErrorCode::ServerBusy, "the server is handling as many uploads as it can; retry shortly")
            .retry_after(BUSY_RETRY_AFTER_SECS)
    }

    /// Every chunk upload slot of the request's tenant is taken.
    pub fn tenant_busy(limit: usize) -> Self {
        HttpError::new(
            ErrorCode::TooManyUploads,
            format!("at most {limit} chunk uploads at once per tenant; retry shortly"),
        )
        .retry_after(BUSY_RETRY_AFTER_SECS)
    }

    /// Failed activations from one address are throttled for a minute.
    pub fn too_many_attempts() -> Self {
        HttpError::new(
            ErrorCode::TooManyAttempts,
            "too many failed activations from this address; try again in a minute",
        )
        .retry_after(60)
    }

    /// A body larger than its limit: `code` is one of the 413 codes.
    pub fn too_large(code: ErrorCode, message: impl Into<String>) -> Self {
        debug_assert_eq!(code.status(), StatusCode::PAYLOAD_TOO_LARGE);
        HttpError::new(code, message)
    }

    /// The client stopped sending its body for longer than the body timeout.
    pub fn body_timeout() -> Self {
        HttpError::new(ErrorCode::BodyTimeout, "the request body stopped arriving")
    }

    /// The body could not be read (the client went away, or its framing is broken).
    pub fn bad_body(err: impl std::fmt::Display) -> Self {
        HttpError::new(ErrorCode::BadBody, format!("reading the request body: {err}"))
    }

    /// A request target longer than the server accepts.
    pub fn uri_too_long(max: usize) -> Self {
        HttpError::new(ErrorCode::UriTooLong, format!("the request target is over {max} bytes"))
    }

    /// Request headers larger than the server accepts.
    pub fn headers_too_large(max: usize) -> Self {
        HttpError::new(ErrorCode::HeadersTooLarge, format!("the request headers are over {max} bytes"))
    }

    /// A `Range` that selects nothing of a `size`-byte file: 416 with
    /// `Content-Range: bytes */SIZE` (RFC 9110 15.5.17), so the client learns the size.
    pub fn range_not_satisfiable(size: u64) -> Self {
        let range = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
        HttpError::new(ErrorCode::BadRange, format!("one satisfiable bytes= range of {size}"))
            .with_header(header::CONTENT_RANGE, range)
    }

    /// An internal failure: logged in full, answered in general terms.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {err}");
        HttpError::new(ErrorCode::Internal, format!("{what} failed"))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.into(), message: self.message };
        (self.status, AppendHeaders(self.headers), Json(body)).into_response()
    }
}

/// The stable code of an error status produced outside the handlers: the
/// general code of that status.
fn code_of(status: StatusCode) -> &'static str {
    let code = match status {
        StatusCode::BAD_REQUEST => ErrorCode::InvalidRequest,
        StatusCode::UNAUTHORIZED => ErrorCode::InvalidToken,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::UnprocessableEntity,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ErrorCode::HeadersTooLarge,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => return "http_error",
    };
    code.as_str()
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
            ApiError::TooLarge(_) => HttpError::too_large(ErrorCode::TooLarge, e.to_string()),
            ApiError::Json(_) => HttpError::new(ErrorCode::MalformedJson, e.to_string()),
            ApiError::Invalid(_) => HttpError::bad_request(e.to_string()),
            ApiError::ManifestTooLarge(_) => HttpError::too_large(ErrorCode::ManifestTooLarge, e.to_string()),
        }
    }
}

impl From<TokenError> for HttpError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => HttpError::new(ErrorCode::TokenExpired, e.to_string()),
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
                HttpError::new(ErrorCode::RegistryUnavailable, "the registry is unreachable; retry shortly")
                    .retry_after(BUSY_RETRY_AFTER_SECS)
            }
            RegistryError::UnknownToken => HttpError::unauthorized(e.to_string()),
            RegistryError::Expired => HttpError::new(ErrorCode::TokenExpired, e.to_string()),
            RegistryError::Exhausted => HttpError::new(ErrorCode::ActivationsExhausted, e.to_string()),
            RegistryError::State(s) => HttpError::device_refused(s, e.to_string()),
            RegistryError::Conflict => HttpError::new(ErrorCode::DeviceConflict, e.to_string()),
            RegistryError::DeviceExists => HttpError::new(ErrorCode::DeviceExists, e.to_string()),
            RegistryError::UserNotProvisioned => HttpError::new(ErrorCode::UserNotProvisioned, e.to_string()),
            RegistryError::NoSuchDevice | RegistryError::NoSuchToken => HttpError::not_found(e.to_string()),
            RegistryError::Revoked => HttpError::new(ErrorCode::TokenRevoked, e.to_string()),
            RegistryError::NotRetired(_) => HttpError::new(ErrorCode::DeviceNotRetired, e.to_string()),
        }
    }
}

impl From<ScopeError> for HttpError {
    fn from(e: ScopeError) -> Self {
        HttpError::forbidden(e.to_string())
    }
}

impl From<QuotaError> for HttpError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Exceeded { .. } => HttpError::new(ErrorCode::QuotaExceeded, e.to_string()),
            QuotaError::Count(r) => IngestError::Repo(r).into(),
        }
    }
}

impl From<IngestError> for HttpError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::ChunkTooLarge(..) => HttpError::too_large(ErrorCode::ChunkTooLarge, e.to_string()),
            IngestError::ChunkMismatch | IngestError::BundleMismatch(_) => {
                HttpError::new(ErrorCode::ChunkMismatch, e.to_string())
            }
            IngestError::MissingChunks(_) => HttpError::new(ErrorCode::MissingChunks, e.to_string()),
            IngestError::SizeMismatch(_) | IngestError::Backup(_) | IngestError::InvalidTenant(..) => {
                HttpError::bad_request(e.to_string())
            }
            IngestError::NotFound(_) | IngestError::Repo(RepoError::NoSuchSnapshot(_)) => {
                HttpError::not_found(e.to_string())
            }
            IngestError::NotOwner => HttpError::forbidden(e.to_string()),
            IngestError::OtherDevice => HttpError::new(ErrorCode::RestoreToOtherDeviceDenied, e.to_string()),
            IngestError::ManifestTooLarge(..) => HttpError::too_large(ErrorCode::ManifestTooLarge, e.to_string()),
            IngestError::WriterStopped => HttpError::new(ErrorCode::Unavailable, e.to_string()),
            // Who holds the lock (host, user, pid) is the operator's business.
            IngestError::Lock(LockError::Locked(_)) => HttpError::new(
                ErrorCode::RepositoryLocked,
                "the repository is locked for maintenance (prune); try again later",
            ),
            // Stored data that fails verification is not the client's fault
            // and not a transient failure: a distinct code, so an operator
            // (and the device) can tell it from an outage.
            IngestError::Repo(r) if r.is_damage() => {
                tracing::error!("damaged data: {r}");
                HttpError::new(
                    ErrorCode::DamagedData,
                    "stored data failed verification; the operator should run `chunkvault check`",
                )
            }
            IngestError::Repo(_) | IngestError::Read(_) | IngestError::Flush(_) | IngestError::Lock(_) => {
                HttpError::internal("storage", e)
            }
        }
    }
}
