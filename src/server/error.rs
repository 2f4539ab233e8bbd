//! The one place errors become HTTP statuses and JSON bodies. Internal
//! errors are logged and answered with a generic message, so nothing about
//! the server's insides (or any secret) leaks to a client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{ApiError, ErrorBody};
use crate::auth::registry::RegistryError;
use crate::auth::token::TokenError;
use crate::ingest::IngestError;
use crate::lock::LockError;
use crate::repo::RepoError;

/// An error response: status, stable code, message.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        HttpError { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
    }

    /// A valid token that is not allowed to do this.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
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
        (self.status, Json(body)).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::TooLarge(_) => HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
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
            RegistryError::NoSuchDevice => HttpError::not_found(e.to_string()),
        }
    }
}

impl From<IngestError> for HttpError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::ChunkTooLarge(..) => {
                HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "chunk_too_large", e.to_string())
            }
            IngestError::ChunkMismatch => HttpError::new(StatusCode::BAD_REQUEST, "chunk_mismatch", e.to_string()),
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
            IngestError::Repo(_) | IngestError::Read(_) | IngestError::Flush(_) | IngestError::Lock(_) => {
                HttpError::internal("storage", e)
            }
        }
    }
}
