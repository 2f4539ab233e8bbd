//! Request and response bodies of the HTTP API, shared by the server and its
//! clients so a route's shape is defined once (Proxmox's api-types idea).
//!
//! Every body is parsed with [`parse_body`]: a size bound first, then serde,
//! then the type's own checks ([`Validate`]), so a handler only ever sees
//! well-formed, bounded input. Ids are lowercase hex, times RFC 3339.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, SnapshotId};

/// Largest ordinary JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// Largest snapshot manifest a device may commit.
pub const MAX_MANIFEST_BODY: usize = 64 << 20;
/// Most chunk ids in one `chunks/missing` query.
pub const MAX_MISSING_QUERY: usize = 100_000;
/// Longest path a snapshot may name, in bytes (as a tree entry name: `PATH_MAX`).
pub const MAX_MANIFEST_PATH: usize = 4096;
/// Most paths a snapshot may name.
pub const MAX_MANIFEST_PATHS: usize = 1024;
/// Longest tag, in bytes.
pub const MAX_TAG: usize = 256;
/// Most tags on one snapshot.
pub const MAX_TAGS: usize = 64;
/// Longest hostname, in bytes.
pub const MAX_HOSTNAME: usize = 255;
/// Most emails in one `users` request.
pub const MAX_USERS_PER_REQUEST: usize = 1000;

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is longer than the route's limit (the number, in bytes).
    /// Answered 413 `too_large`.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not JSON of the route's shape (a missing field, a wrong
    /// type, an id that is not 64 hex digits). Answered 400 `malformed_json`.
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field fails [`Validate::validate`]; the text names the field and the
    /// rule. Answered 400 `invalid_request`.
    #[error("{0}")]
    Invalid(String),
    /// A snapshot manifest that would be too large to read back.
    #[error("manifest too large: {0}")]
    ManifestTooLarge(String),
}

/// Field checks a body runs after it deserializes.
pub trait Validate {
    /// Refuses malformed fields (answered as bad input).
    fn validate(&self) -> Result<(), String>;

    /// Refuses fields too long or too many for what the server stores, which
    /// a bound on the body's bytes cannot express (answered as too large).
    fn check_limits(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// Parses a bounded JSON body and validates it. Never panics.
pub fn parse_body<T: DeserializeOwned + Validate>(bytes: &[u8], limit: usize) -> Result<T, ApiError> {
    if bytes.len() > limit {
        return Err(ApiError::TooLarge(limit));
    }
    let value: T = serde_json::from_slice(bytes)?;
    value.check_limits()?;
    value.validate().map_err(ApiError::Invalid)?;
    Ok(value)
}

/// A tenant name: it becomes a directory under the server's root, so only
/// lowercase letters, digits, `-` and `_`, 1 to 64 of them.
pub fn check_tenant(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !t.starts_with('-');
    ok.then_some(()).ok_or_else(|| "tenant: 1-64 of a-z 0-9 - _".into())
}

/// A device id as the MDM or the device chose it: 1 to 128 printable ASCII
/// characters without `/` (it appears in URL paths).
pub fn check_device_id(d: &str) -> Result<(), String> {
    let ok = !d.is_empty()
        && d.len() <= 128
        && d.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(()).ok_or_else(|| "device_id: 1-128 of A-Z a-z 0-9 - _ . :".into())
}

/// An email: at most 254 characters, one `@` with text both sides, no
/// whitespace or control characters.
pub fn check_email(e: &str) -> Result<(), String> {
    let ok = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(e.split_once('@'), Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains('@'));
    ok.then_some(()).ok_or_else(|| "email: not a valid address".into())
}

/// `POST /v1/admin/deployment-tokens`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CreateDeploymentToken {
    /// The tenant whose devices activate with it (created with its first token).
    #[cfg_attr(feature = "server", schema(pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$"))]
    pub tenant: String,
    /// Seconds from now until the token stops activating devices: 1 to ten
    /// years (315,360,000 s). Absent: 30 days. Devices it activated keep
    /// working after it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// How many devices the token may activate in all (absent: no limit; 0
    /// makes a token that activates none). Several auth nodes sharing a
    /// registry never exceed it together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_activations: Option<u32>,
    /// What devices activated with this token may do (default: everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Policies>,
    /// Activate only emails the admin provisioned in the tenant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub provisioned_only: bool,
}

impl Validate for CreateDeploymentToken {
    fn validate(&self) -> Result<(), String> {
        check_tenant(&self.tenant)?;
        match self.expires_in_secs {
            Some(s) if s == 0 || s > 10 * 365 * 86_400 => Err("expires_in_secs: 1 to ten years".into()),
            _ => Ok(()),
        }
    }
}

/// The answer to `POST /v1/admin/deployment-tokens`: the secret (shown this
/// once) and the token's id, which names it from then on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeploymentTokenCreated {
    /// The secret (`cvdt_` and 43 base64url characters): shown this once,
    /// stored only as a hash. Devices send it to `POST /v1/activate`.
    pub token: String,
    /// The token's public id (16 hex digits, unrelated to the secret), which
    /// names it in listings, the audit log and `revoke`. Empty from servers
    /// older than token ids.
    #[serde(default)]
    pub token_id: String,
    /// The tenant its devices join.
    pub tenant: String,
    /// When it stops activating devices (RFC 3339, UTC).
    pub expires_at: DateTime<Utc>,
    /// What devices activated with it may do.
    #[serde(default)]
    pub policies: Policies,
    /// Whether it activates only emails the admin provisioned in the tenant.
    #[serde(default)]
    pub provisioned_only: bool,
}

/// `POST /v1/activate`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ActivateRequest {
    /// The deployment token's secret (`cvdt_...`), as the administrator handed
    /// it out.
    pub deployment_token: String,
    /// The user's email (checked against the provisioned users when the token says so).
    #[cfg_attr(feature = "server", schema(pattern = "^[^@\\s]+@[^@\\s]+$", max_length = 254))]
    pub email: String,
    /// The device's id, as the MDM or the device chose it.
    #[cfg_attr(feature = "server", schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$"))]
    pub device_id: String,
}

impl Validate for ActivateRequest {
    fn validate(&self) -> Result<(), String> {
        check_email(&self.email)?;
        check_device_id(&self.device_id)
    }
}

/// The answer to `POST /v1/activate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ActivateResponse {
    /// The device's own secret (`cvdv_` and 43 base64url characters), shown
    /// this once: the device keeps it and sends it to `POST /v1/session`.
    /// Sessions are refused while the device is blocked, and for good once
    /// it is retired, wiped or reset.
    pub device_token: String,
}

/// `POST /v1/session`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SessionRequest {
    /// The device token that activation returned (`cvdv_...`). Refused with
    /// `invalid_token` unless `email` and `device_id` are the ones it was
    /// activated with.
    pub device_token: String,
    /// The user's email (checked against the provisioned users when the token says so).
    #[cfg_attr(feature = "server", schema(pattern = "^[^@\\s]+@[^@\\s]+$", max_length = 254))]
    pub email: String,
    /// The device's id, as the MDM or the device chose it.
    #[cfg_attr(feature = "server", schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$"))]
    pub device_id: String,
}

impl Validate for SessionRequest {
    fn validate(&self) -> Result<(), String> {
        check_email(&self.email)?;
        check_device_id(&self.device_id)
    }
}

/// What the admin allows a device to do with restored data. Set on the
/// deployment token, kept with each device it activates, carried in the
/// signed session token; a missing field means allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Policies {
    /// Read snapshots that another device of the same user made (enforced
    /// by the storage node).
    #[serde(default = "allowed")]
    pub allow_restore_to_other_device: bool,
    /// Hand restored files to other apps (enforced by the device app).
    #[serde(default = "allowed")]
    pub allow_open_in: bool,
}

fn allowed() -> bool {
    true
}

impl Default for Policies {
    /// Everything allowed: what devices had before policies existed.
    fn default() -> Self {
        Policies { allow_restore_to_other_device: true, allow_open_in: true }
    }
}

impl Policies {
    /// The names the admin CLI and the managed config use.
    pub const NAMES: [&'static str; 2] = ["allowRestoreToOtherDevice", "allowOpenIn"];

    /// Sets one policy by its managed-config name (`allowOpenIn`, ...).
    pub fn set(&mut self, name: &str, value: bool) -> Result<(), String> {
        match name {
            "allowRestoreToOtherDevice" => self.allow_restore_to_other_device = value,
            "allowOpenIn" => self.allow_open_in = value,
            other => return Err(format!("unknown policy {other:?}; known: {}", Policies::NAMES.join(", "))),
        }
        Ok(())
    }
}

/// The answer to `POST /v1/session`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SessionResponse {
    /// A signed session token (`cvs2.` ...), sent as `Authorization: Bearer` to
    /// the storage routes. Storage nodes verify it offline; it stays valid
    /// until `expires_at` unless the device is retired, blocked, wiped or reset
    /// first.
    pub session_token: String,
    /// When the session token stops working (RFC 3339, UTC): issued plus the
    /// auth role's `session_ttl_secs` (default 900 s). Ask for a new session
    /// before then.
    pub expires_at: DateTime<Utc>,
    /// The device's policies, as signed into the token.
    pub policies: Policies,
}

/// `GET /v1/session-key`: the auth role's Ed25519 public key (hex), which
/// storage nodes fetch at start to verify session tokens offline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SessionKey {
    /// The Ed25519 public key: 64 lowercase hex digits (32 bytes).
    pub public_key: String,
}

/// `GET /v1/chunking`: what a device needs to cut and name chunks exactly as
/// its tenant's repository does, so it can ask which ones are missing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Chunking {
    /// No cut before this many bytes (a file's last chunk may be shorter).
    pub min_size: u32,
    /// The chunk size FastCDC (2020 variant) aims for, in bytes.
    pub avg_size: u32,
    /// A cut is forced at this many bytes; no chunk is longer.
    pub max_size: u32,
    /// The seed of the FastCDC gear tables (`get_gear_with_seed`): cut points
    /// depend on it, so they differ between repositories.
    pub seed: u64,
    /// The tenant repository's id key, hex (see ARCHITECTURE.md for the trade-off).
    pub id_key: String,
}

/// `POST /v1/chunks/missing`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct MissingRequest {
    /// Chunk ids (64 lowercase hex digits each) to look up; at most 100,000 per
    /// query.
    pub chunks: Vec<BlobId>,
}

impl Validate for MissingRequest {
    fn validate(&self) -> Result<(), String> {
        if self.chunks.len() > MAX_MISSING_QUERY {
            return Err(format!("at most {MAX_MISSING_QUERY} chunk ids per query"));
        }
        Ok(())
    }
}

/// One entry of a restore plan: what the restore creates at `path`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct PlanEntry {
    /// Slash-separated path relative to the restore target.
    pub path: String,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Permission bits (the device decides which it applies).
    pub mode: u32,
    /// Numeric owner at backup time (0 for snapshots a device committed).
    pub uid: u32,
    /// Numeric group at backup time (0 for snapshots a device committed).
    pub gid: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Nanoseconds past `mtime` (0 to 999,999,999).
    pub mtime_nsec: u32,
    /// A file's content length in bytes: the sum of its chunks' lengths (0 for
    /// directories and symlinks).
    pub size: u64,
    /// A file's chunks, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<BlobId>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `POST /v1/snapshots/{id}/restore-plan`: the paths to restore (each with
/// what lies below it); empty for everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct RestorePlanRequest {
    /// Slash-separated paths inside the snapshot, each selecting itself and
    /// everything below it (the directories on the way are restored too).
    /// Empty: the whole snapshot. At most 1024 paths of at most 4096 bytes
    /// each.
    #[serde(default)]
    pub include: Vec<String>,
}

impl Validate for RestorePlanRequest {
    fn validate(&self) -> Result<(), String> {
        if self.include.len() > MAX_MANIFEST_PATHS {
            return Err(format!("at most {MAX_MANIFEST_PATHS} include paths"));
        }
        if self.include.iter().any(|p| p.len() > MAX_MANIFEST_PATH) {
            return Err(format!("include paths are at most {MAX_MANIFEST_PATH} bytes"));
        }
        Ok(())
    }
}

/// A chunk of a restore plan and its plaintext length.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct PlanChunk {
    /// The chunk's id, the keyed BLAKE3 of its plaintext: check the bytes
    /// the chunk stream sends against it.
    pub id: BlobId,
    /// Its plaintext length in bytes.
    pub len: u32,
}

/// `GET /v1/snapshots/{id}/restore-plan`: every entry to create, and every
/// chunk the files need, once each, in the order the storage node reads
/// them fastest (by pack, then offset): fetch them in that order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct RestorePlanResponse {
    /// Every entry to create: the directories first, then the files, then the
    /// symlinks.
    #[serde(deserialize_with = "array_on_all_cores")]
    pub entries: Vec<PlanEntry>,
    /// Every chunk the files use, once each, in the order to fetch them (by
    /// pack, then offset).
    #[serde(deserialize_with = "array_on_all_cores")]
    pub chunks: Vec<PlanChunk>,
}

impl RestorePlanResponse {
    /// The plan as JSON, as `serde_json::to_vec` writes it, but encoded on
    /// all cores (a plan of 42,000 files is 15 MB).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 300 * self.entries.len() + 90 * self.chunks.len());
        out.extend_from_slice(b"{\"entries\":");
        push_array_on_all_cores(&self.entries, &mut out);
        out.extend_from_slice(b",\"chunks\":");
        push_array_on_all_cores(&self.chunks, &mut out);
        out.push(b'}');
        out
    }
}

/// `POST /v1/snapshots/{id}/chunks`: chunks of that snapshot to stream back.
/// The answer is a stream of frames `id (32) | status u8 (0 ok, 1 failed) |
/// len u32 LE | bytes`: the chunk's plaintext, or why it could not be read
/// (UTF-8, at most [`MAX_CHUNK_ERROR`] bytes). The device checks every
/// chunk against its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ChunkReadRequest {
    /// The chunks to send, from the snapshot's files: 1 to 4096 ids. A chunk
    /// the snapshot does not use is refused (404 `not_found`).
    pub chunks: Vec<BlobId>,
}

/// Longest error message in a chunk stream frame.
pub const MAX_CHUNK_ERROR: usize = 4096;
/// Bytes before a chunk stream frame's payload.
pub const CHUNK_FRAME_HEADER: usize = 32 + 1 + 4;

impl Validate for ChunkReadRequest {
    fn validate(&self) -> Result<(), String> {
        if self.chunks.is_empty() || self.chunks.len() > MAX_CHUNK_READ {
            return Err(format!("1 to {MAX_CHUNK_READ} chunk ids per request"));
        }
        Ok(())
    }
}

/// The answer to `POST /v1/chunks/missing`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct MissingResponse {
    /// The queried ids the tenant's repository lacks (each once): upload these,
    /// then commit.
    pub missing: Vec<BlobId>,
}

/// `POST /v1/chunks/bundle`: many chunks in one body, each framed
/// `id (32) | len u32 LE | bytes`, back to back and nothing after the last.
/// The storage node verifies every chunk against its id before it stores
/// any, and stores only those it lacks.
pub const BUNDLE_FRAME_HEADER: usize = 32 + 4;
/// Largest bundle body the storage node reads (a bundle holding one chunk of
/// the repository's maximum size is always allowed as well).
pub const MAX_BUNDLE_BODY: usize = 8 << 20;

/// The answer to a bundle upload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct BundleResponse {
    /// Chunks the node stored.
    pub stored: u64,
    /// Chunks it already had (or that appeared twice in the bundle).
    pub deduplicated: u64,
}

/// Splits a bundle body into its chunks' ids and byte ranges; refuses a
/// frame that runs past the end of the body, a chunk over `max_chunk`
/// bytes and an empty bundle.
pub fn parse_bundle(body: &[u8], max_chunk: usize) -> Result<Vec<(BlobId, std::ops::Range<usize>)>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < body.len() {
        let Some(header) = body.get(pos..pos + BUNDLE_FRAME_HEADER) else {
            return Err(format!("bundle truncated in the header of chunk {}", out.len()));
        };
        let id = BlobId(header[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(header[32..].try_into().expect("4 bytes")) as usize;
        if len > max_chunk {
            return Err(format!("chunk {id} is {len} bytes, more than the maximum of {max_chunk}"));
        }
        let start = pos + BUNDLE_FRAME_HEADER;
        if body.len() - start < len {
            return Err(format!("bundle truncated in chunk {id}"));
        }
        out.push((id, start..start + len));
        pos = start + len;
    }
    if out.is_empty() {
        return Err("an empty bundle".into());
    }
    Ok(out)
}

/// The header of a bundle frame holding `len` bytes of chunk `id` (see
/// [`parse_bundle`]).
pub fn bundle_frame_header(id: &BlobId, len: usize) -> [u8; BUNDLE_FRAME_HEADER] {
    let mut header = [0u8; BUNDLE_FRAME_HEADER];
    header[..32].copy_from_slice(&id.0);
    header[32..].copy_from_slice(&(len as u32).to_le_bytes());
    header
}

/// Appends one chunk's frame to a bundle body (see [`parse_bundle`]).
pub fn push_bundle_frame(body: &mut Vec<u8>, id: &BlobId, data: &[u8]) {
    body.extend_from_slice(&bundle_frame_header(id, data.len()));
    body.extend_from_slice(data);
}

/// What a manifest or restore-plan entry is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    #[default]
    File,
    /// A directory (its metadata; its entries are listed separately).
    Dir,
    /// A symbolic link.
    Symlink,
}

/// Longest symlink target accepted in a manifest.
pub const MAX_LINK_TARGET: usize = 4096;
/// Most chunks one `POST /v1/snapshots/{id}/chunks` may ask for.
pub const MAX_CHUNK_READ: usize = 4096;

/// One entry (a regular file by default, or a directory or symlink) of a
/// snapshot being committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ManifestFile {
    /// File (the default, so older devices' manifests still parse), dir or symlink.
    #[serde(default)]
    pub kind: EntryKind,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Slash-separated path inside the snapshot.
    pub path: String,
    /// Permission bits: `mode & 0o7777` is kept, the file type comes from
    /// `kind`.
    pub mode: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Nanoseconds past `mtime` (0 to 999,999,999; absent: 0).
    #[serde(default)]
    pub mtime_nsec: u32,
    /// A file's content length in bytes, which must equal the sum of its
    /// chunks' lengths (else the commit is refused); 0 for directories and
    /// symlinks.
    pub size: u64,
    /// A file's chunks, in order; each must be in the repository already
    /// (uploaded, or there before), else the commit is refused with 409
    /// `missing_chunks`. Empty for directories and symlinks.
    pub chunks: Vec<BlobId>,
}

/// `POST /v1/snapshots`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CommitRequest {
    /// The device's name, shown in listings and the console: at most 255 bytes.
    pub hostname: String,
    /// The paths the device backed up, as it names them (shown, not used to
    /// place files): at most 1024, each at most 4096 bytes.
    pub paths: Vec<String>,
    /// Labels, in order: at most 64, each at most 256 bytes (absent: none).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Every entry of the snapshot; directories that hold listed entries are
    /// created if not listed themselves.
    #[serde(deserialize_with = "array_on_all_cores")]
    pub files: Vec<ManifestFile>,
}

/// Arrays shorter than this (a manifest's or a restore plan's entries) are
/// parsed, checked, encoded and built on the calling thread: on all cores
/// only where that pays. Small manifests from many devices handled on the
/// rayon threads made a storage node's RSS grow round after round under
/// the 64-device load (351 -> 511 MiB over 24 rounds, against 418 -> 476
/// when they stayed on the request's thread).
pub const ON_ALL_CORES_FROM: usize = 4096;

/// A large array (a manifest's or a restore plan's 42,000 entries) parsed
/// on all cores: split into its items' JSON text first, then each item is
/// parsed (a 42,000-file manifest is otherwise 40 ms on one core while the
/// other waits). The input must be borrowable (`serde_json::from_slice`,
/// as `parse_body` and the client read).
fn array_on_all_cores<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned + Send,
{
    use rayon::prelude::*;
    use serde::de::Error;
    let raw: Vec<&'de serde_json::value::RawValue> = Vec::deserialize(d)?;
    let parse = |r: &&serde_json::value::RawValue| serde_json::from_str(r.get());
    let parsed: Vec<Result<T, serde_json::Error>> = if raw.len() < ON_ALL_CORES_FROM {
        raw.iter().map(parse).collect()
    } else {
        raw.par_iter().with_min_len(1024).map(parse).collect()
    };
    // The first bad item's error, whichever core met it.
    parsed.into_iter().enumerate().map(|(i, r)| r.map_err(|e| D::Error::custom(format!("entry {i}: {e}")))).collect()
}

/// Appends `items` as a JSON array to `out`, encoded on all cores (slices
/// encoded apart, then joined): the counterpart of `array_on_all_cores`.
fn push_array_on_all_cores<T: Serialize + Sync>(items: &[T], out: &mut Vec<u8>) {
    use rayon::prelude::*;
    if items.len() < ON_ALL_CORES_FROM {
        serde_json::to_writer(out, items).expect("plan entries encode");
        return;
    }
    let parts: Vec<Vec<u8>> = items
        .par_chunks(1024)
        .map(|slice| {
            let mut part = Vec::new();
            for item in slice {
                part.push(b',');
                serde_json::to_writer(&mut part, item).expect("plan entries encode");
            }
            part
        })
        .collect();
    out.push(b'[');
    for (i, part) in parts.iter().enumerate() {
        // Every slice starts with a comma; the first item has none.
        out.extend_from_slice(if i == 0 { &part[1..] } else { part });
    }
    out.push(b']');
}

impl Validate for CommitRequest {
    /// Every string the manifest keeps is bounded, so that what is accepted
    /// can be read back (the storage node also bounds the encoded manifest).
    fn check_limits(&self) -> Result<(), ApiError> {
        let too_large = |what: String| Err(ApiError::ManifestTooLarge(what));
        if self.hostname.len() > MAX_HOSTNAME {
            return too_large(format!("hostname is longer than {MAX_HOSTNAME} bytes"));
        }
        if self.paths.len() > MAX_MANIFEST_PATHS {
            return too_large(format!("more than {MAX_MANIFEST_PATHS} paths"));
        }
        if self.tags.len() > MAX_TAGS {
            return too_large(format!("more than {MAX_TAGS} tags"));
        }
        if self.paths.iter().any(|p| p.len() > MAX_MANIFEST_PATH) {
            return too_large(format!("a path is longer than {MAX_MANIFEST_PATH} bytes"));
        }
        if self.tags.iter().any(|t| t.len() > MAX_TAG) {
            return too_large(format!("a tag is longer than {MAX_TAG} bytes"));
        }
        Ok(())
    }

    /// Checks every entry (on all cores); the first bad entry's error.
    fn validate(&self) -> Result<(), String> {
        use rayon::prelude::*;
        let check = |f: &ManifestFile| -> Result<(), String> {
            check_manifest_path(&f.path)?;
            if f.mtime_nsec >= 1_000_000_000 {
                return Err(format!("{}: mtime_nsec out of range", f.path));
            }
            let data = !f.chunks.is_empty() || f.size != 0;
            match (f.kind, &f.target) {
                (EntryKind::File, None) => {}
                (EntryKind::Dir, None) if !data => {}
                (EntryKind::Symlink, Some(t)) if !data && !t.is_empty() && t.len() <= MAX_LINK_TARGET && !t.contains('\0') => {}
                _ => return Err(format!("{}: a file has chunks, a directory nothing, a symlink one target of at most {MAX_LINK_TARGET} bytes", f.path)),
            }
            Ok(())
        };
        let first_bad = if self.files.len() < ON_ALL_CORES_FROM {
            self.files.iter().find_map(|f| check(f).err())
        } else {
            self.files.par_iter().with_min_len(1024).find_map_first(|f| check(f).err())
        };
        match first_bad {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A manifest path: non-empty components that are valid tree entry names, so
/// nothing can name `..` or an absolute path.
pub fn check_manifest_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_MANIFEST_PATH {
        return Err("path too long".into());
    }
    let mut any = false;
    for part in path.split('/') {
        crate::tree::validate_name(part.as_bytes()).map_err(|e| format!("path {path:?}: {e}"))?;
        any = true;
    }
    any.then_some(()).ok_or_else(|| "empty path".into())
}

/// The answer to `POST /v1/snapshots`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CommitResponse {
    /// The new snapshot's id, which names it in `/v1/snapshots/{id}/...`.
    pub id: SnapshotId,
    /// Regular files in the manifest.
    pub files: u64,
    /// Bytes of file content in the manifest (the files' `size`, added up).
    pub bytes: u64,
}

/// One entry of `GET /v1/snapshots`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SnapshotInfo {
    /// The snapshot's id, which names it in `/v1/snapshots/{id}/...`.
    pub id: SnapshotId,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub time: DateTime<Utc>,
    /// The device id that committed it; `null` for a local backup (one not
    /// committed through this API).
    pub device: Option<String>,
    /// The host name the backup reported.
    pub hostname: String,
    /// The paths the backup was given.
    pub paths: Vec<String>,
    /// Its labels, in the order given.
    pub tags: Vec<String>,
    /// Regular files in the snapshot (new, changed and unchanged ones).
    pub files: u64,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
}

/// One entry of `GET /v1/snapshots/{id}/tree`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct TreeEntry {
    /// One path component; bytes that are not UTF-8 are shown as U+FFFD.
    pub name: String,
    /// `file`, `dir` or `symlink`; special files of a local backup are
    /// `fifo`, `socket`, `chardev`, `blockdev` or `special`.
    pub kind: String,
    /// Content length in bytes (0 for directories and symlinks).
    pub size: u64,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Nanoseconds past `mtime`.
    pub mtime_nsec: u32,
}

/// A device's state in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeviceInfo {
    /// The device's id (1 to 128 of `A-Z a-z 0-9 - _ . :`).
    pub device_id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The email it activated with.
    pub email: String,
    /// `active`, `blocked`, `retired`, `wiped` or `reset`.
    pub state: String,
    /// When the device id last activated (RFC 3339, UTC).
    pub activated_at: DateTime<Utc>,
    /// When it last started a session (`null`: none since its last activation).
    pub last_seen: Option<DateTime<Utc>>,
    /// The id of the deployment token that activated it (none for devices
    /// activated before tokens had ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_token_id: Option<String>,
    /// What it may do, as its deployment token set (absent from older servers:
    /// everything allowed).
    #[serde(default)]
    pub policies: Policies,
    /// Snapshots of this device that the storage nodes reported and that
    /// still exist (0 before any report).
    #[serde(default)]
    pub snapshots: u64,
    /// When the newest of them was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<DateTime<Utc>>,
}

/// One state change in the check-in feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeviceChange {
    /// The device whose state changed.
    pub device_id: String,
    /// The tenant it belongs (or belonged) to.
    pub tenant: String,
    /// Its new state: `active`, `blocked`, `retired`, `wiped` or `reset` (a
    /// reset, or the device's deletion: its sessions are void and the id may
    /// activate again).
    pub state: String,
    /// Set by a reset and by the activation after it: sessions of an earlier
    /// activation of this device id (a lower generation) are void.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
}

/// `POST /v1/admin/tenants/{tenant}/users`: emails allowed to activate with
/// the tenant's `provisioned_only` deployment tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AddUsers {
    /// 1 to 1000 emails, each at most 254 characters with one `@`.
    pub emails: Vec<String>,
}

impl Validate for AddUsers {
    fn validate(&self) -> Result<(), String> {
        if self.emails.is_empty() || self.emails.len() > MAX_USERS_PER_REQUEST {
            return Err(format!("emails: 1 to {MAX_USERS_PER_REQUEST} of them"));
        }
        self.emails.iter().try_for_each(|e| check_email(e))
    }
}

/// One entry of `GET /v1/admin/tenants/{tenant}/users`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UserInfo {
    /// The provisioned email.
    pub email: String,
    /// When it was added (RFC 3339, UTC).
    pub added_at: DateTime<Utc>,
}

/// What a `users` change did: the emails added (or removed); emails already
/// so are left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UsersChanged {
    /// The tenant whose user list changed.
    pub tenant: String,
    /// The emails added (or removed), in the order given.
    pub changed: Vec<String>,
}

/// The answer to a check-in (`GET /v1/checkin?since=CURSOR`, or `POST
/// /v1/checkin` with a [`CheckinRequest`]): device state changes after the
/// cursor, and every tenant's quota.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CheckinResponse {
    /// The feed position this answer brings the caller to: send it as `since`
    /// next time.
    pub cursor: u64,
    /// State changes after `since`, oldest first: at most 10,000 per answer
    /// (check in again for the rest).
    pub changes: Vec<DeviceChange>,
    /// Every tenant with a quota (absent: none); the whole list each time,
    /// so a storage node replaces what it knew. Older auth roles send none.
    #[serde(default)]
    pub quotas: Vec<TenantQuota>,
}

/// Most tenants one check-in reports on.
pub const MAX_CHECKIN_TENANTS: usize = 10_000;
/// Most new snapshots one check-in reports (the rest go with the next).
pub const MAX_CHECKIN_SNAPSHOTS: usize = 2_000;
/// Most removed snapshot ids one check-in reports.
pub const MAX_CHECKIN_REMOVED: usize = 20_000;
/// Largest check-in request body: a report of [`MAX_CHECKIN_TENANTS`],
/// [`MAX_CHECKIN_SNAPSHOTS`] and [`MAX_CHECKIN_REMOVED`] fits.
pub const MAX_CHECKIN_BODY: usize = 4 << 20;
/// Longest storage node name (its host name and listen address), in bytes.
pub const MAX_NODE_NAME: usize = 320;

/// `POST /v1/checkin`: a storage node asks for the changes after `since`
/// and reports what the tenants it has open store, and, for the console,
/// itself and what changed in its tenants' snapshots.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckinRequest {
    /// The `cursor` of the node's last check-in (absent or 0: from the start of
    /// the feed).
    #[serde(default)]
    pub since: u64,
    /// What the repositories of the tenants touched since the node's last
    /// report store (a tenant named twice: the last entry wins).
    #[serde(default)]
    pub usage: Vec<TenantUsage>,
    /// The node itself, for the console's storage nodes page (older nodes
    /// send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeReport>,
    /// What changed in its tenants' snapshots since its last report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<TenantSnapshots>,
}

impl Validate for CheckinRequest {
    fn validate(&self) -> Result<(), String> {
        if self.usage.len() > MAX_CHECKIN_TENANTS || self.snapshots.len() > MAX_CHECKIN_TENANTS {
            return Err(format!("at most {MAX_CHECKIN_TENANTS} tenants per check-in"));
        }
        if self.snapshots.iter().map(|t| t.added.len()).sum::<usize>() > MAX_CHECKIN_SNAPSHOTS {
            return Err(format!("at most {MAX_CHECKIN_SNAPSHOTS} new snapshots per check-in"));
        }
        if self.snapshots.iter().map(|t| t.removed.len()).sum::<usize>() > MAX_CHECKIN_REMOVED {
            return Err(format!("at most {MAX_CHECKIN_REMOVED} removed snapshots per check-in"));
        }
        if let Some(node) = &self.node {
            node.validate()?;
        }
        self.usage.iter().try_for_each(|u| check_tenant(&u.tenant))?;
        self.snapshots.iter().try_for_each(TenantSnapshots::validate)
    }
}

/// A storage node as it describes itself at check-in.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its host name and listen address (`store-1 0.0.0.0:8080`).
    pub name: String,
    /// What it does when the auth role is unreachable: `fail_closed` or `fail_open`.
    pub auth_unreachable: String,
    /// How often it checks in.
    pub checkin_interval_secs: u64,
    /// Its chunkvault version.
    pub version: String,
}

impl NodeReport {
    fn validate(&self) -> Result<(), String> {
        let text = |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
        if !text(&self.name, MAX_NODE_NAME) || !text(&self.version, 64) {
            return Err(format!("node: a name of 1-{MAX_NODE_NAME} and a version of 1-64 printable bytes"));
        }
        if !matches!(self.auth_unreachable.as_str(), "fail_closed" | "fail_open") {
            return Err("node: auth_unreachable is fail_closed or fail_open".into());
        }
        Ok(())
    }
}

/// What a storage node saw change in one tenant's snapshots since its last
/// report. A node reports every snapshot it finds once per process (a
/// rescan, over as many check-ins as it takes), then only changes.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSnapshots {
    /// The tenant (1 to 64 of `a-z 0-9 - _`).
    pub tenant: String,
    /// This report starts a rescan: the snapshots recorded for the tenant
    /// are in doubt until the rescan is `complete`.
    #[serde(default)]
    pub rescan: bool,
    /// This report ends a rescan: recorded snapshots it did not report
    /// again are gone.
    #[serde(default)]
    pub complete: bool,
    /// Snapshots found since the last report (at most 2000 across all the
    /// tenants of one check-in).
    #[serde(default)]
    pub added: Vec<SnapshotRecord>,
    /// Ids of snapshots that are gone (at most 20,000 across all the tenants of
    /// one check-in).
    #[serde(default)]
    pub removed: Vec<SnapshotId>,
}

impl TenantSnapshots {
    fn validate(&self) -> Result<(), String> {
        check_tenant(&self.tenant)?;
        for s in &self.added {
            if let Some(d) = &s.device {
                check_device_id(d)?;
            }
            if let Some(u) = &s.user {
                check_email(u)?;
            }
        }
        Ok(())
    }
}

/// A snapshot as the auth role records it for the console: who took it,
/// when, and its size; never its paths or contents.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot's id in the tenant's repository.
    pub id: SnapshotId,
    /// When it was taken (RFC 3339, UTC).
    pub time: DateTime<Utc>,
    /// The device id that committed it; absent for a local backup or an id the
    /// API would refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The email of the device's user; absent for a local backup or an email
    /// the API would refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Files in the snapshot.
    pub files: u64,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
}

/// One entry of `GET /v1/admin/storage-nodes`.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNodeInfo {
    /// Its host name and listen address, as it reported them.
    pub name: String,
    /// The storage side of this very process (role `all`): it learns every
    /// change at once and never checks in.
    pub local: bool,
    /// `fail_closed` or `fail_open`.
    pub auth_unreachable: String,
    /// How often it checks in, in seconds.
    pub checkin_interval_secs: u64,
    /// Its chunkvault version.
    pub version: String,
    /// When it last checked in (RFC 3339, UTC; now for the local node).
    pub last_checkin: DateTime<Utc>,
    /// The check-in feed's cursor the node has reached.
    pub cursor: u64,
    /// Device state changes after its cursor: retires and blocks it has not applied yet.
    pub pending_changes: u64,
    /// No check-in for two intervals: the node applies `auth_unreachable`.
    pub stale: bool,
    /// Stale, or changes have waited longer than an interval past its last check-in.
    pub behind: bool,
}

/// One day of `GET /v1/admin/tenants/{tenant}/history`.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantDay {
    /// The day (UTC).
    pub day: chrono::NaiveDate,
    /// What the tenant stored at the end of the day, as last reported on
    /// or before it (none before the first report).
    pub stored_bytes: Option<u64>,
    /// Snapshots taken that day (forgotten ones included).
    pub backups: u64,
}

/// What a tenant's repository holds, as a storage node counts it.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// The tenant (1 to 64 of `a-z 0-9 - _`).
    pub tenant: String,
    /// Bytes of the tenant's packs (compressed, encrypted, deduplicated).
    pub stored_bytes: u64,
    /// Snapshots in the tenant's repository.
    pub snapshots: u64,
}

/// A tenant's storage quota in bytes.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantQuota {
    /// The tenant (1 to 64 of `a-z 0-9 - _`).
    pub tenant: String,
    /// The quota in bytes of stored (compressed, encrypted, deduplicated) data;
    /// always more than 0 (a tenant without a quota is not listed).
    pub quota_bytes: u64,
}

/// `PUT /v1/admin/tenants/{tenant}/quota`: 0 removes the quota.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetQuota {
    /// The quota in bytes of stored (compressed, encrypted, deduplicated) data,
    /// at most 2^63 - 1; 0 removes it. Uploads that would go past it are
    /// refused with `quota_exceeded`; what is stored already stays.
    pub quota_bytes: u64,
}

impl Validate for SetQuota {
    fn validate(&self) -> Result<(), String> {
        // Stored as SQLite's signed 64-bit integer.
        i64::try_from(self.quota_bytes).map(|_| ()).map_err(|_| "quota_bytes: at most 2^63 - 1".into())
    }
}

/// One entry of `GET /v1/admin/tenants`.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantInfo {
    /// The tenant (1 to 64 of `a-z 0-9 - _`).
    pub tenant: String,
    /// Devices in the registry for it, in any state.
    pub devices: u64,
    /// As a storage node last reported (none yet: `null`).
    pub snapshots: Option<u64>,
    /// Bytes its repository stores (compressed, encrypted, deduplicated), as a
    /// storage node last reported (`null`: no report yet).
    pub stored_bytes: Option<u64>,
    /// 0: no quota.
    pub quota_bytes: u64,
    /// When the storage figures were reported.
    pub reported_at: Option<DateTime<Utc>>,
    /// Bytes of file content in the tenant's snapshots, added up (as the
    /// storage nodes reported them): over `stored_bytes`, the dedup ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
}

/// Longest admin token label, in bytes.
pub const MAX_LABEL: usize = 128;

/// `POST /v1/admin/tokens`: a scoped admin token.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateAdminToken {
    /// `admin`, `tenant-admin` or `read-only`; a caller grants no role above
    /// its own.
    pub role: crate::auth::admin::AdminRole,
    /// The tenant a `tenant-admin` token is confined to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "server", schema(pattern = "^[a-z0-9_][a-z0-9_-]{0,63}$"))]
    pub tenant: Option<String>,
    /// What the token is for (shown by `token list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Validate for CreateAdminToken {
    fn validate(&self) -> Result<(), String> {
        crate::auth::admin::check_scope(self.role, self.tenant.as_deref())?;
        match &self.label {
            Some(l) if l.len() > MAX_LABEL || l.chars().any(char::is_control) => {
                Err(format!("label: at most {MAX_LABEL} bytes, no control characters"))
            }
            _ => Ok(()),
        }
    }
}

/// An admin token's row: never its secret.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminTokenInfo {
    /// The token's public id (16 hex digits).
    pub id: String,
    /// What it may do.
    pub role: crate::auth::admin::AdminRole,
    /// The one tenant it covers (`null`: every tenant).
    pub tenant: Option<String>,
    /// What it is for, as given at creation (`null`: none).
    pub label: Option<String>,
    /// When it was made (RFC 3339, UTC).
    pub created_at: DateTime<Utc>,
    /// When it was revoked (`null`: it still works).
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The answer to `POST /v1/admin/tokens`: the secret, shown this once.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    /// The secret (`cvad_` and 43 base64url characters), shown this once: send
    /// it as `Authorization: Bearer` to the admin routes.
    pub token: String,
    /// The token's row; its fields sit beside `token`, not under a key.
    #[serde(flatten)]
    pub info: AdminTokenInfo,
}

/// One entry of `GET /v1/admin/deployment-tokens`: never the secret.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentTokenInfo {
    /// The token's public id (16 hex digits).
    pub token_id: String,
    /// The tenant its devices join.
    pub tenant: String,
    /// When it was made (RFC 3339, UTC).
    pub created_at: DateTime<Utc>,
    /// When it stops activating devices (RFC 3339, UTC).
    pub expires_at: DateTime<Utc>,
    /// Devices activated with it so far.
    pub activations: u32,
    /// How many it may activate in all (`null`: no limit).
    pub max_activations: Option<u32>,
    /// What devices activated with it may do.
    pub policies: Policies,
    /// Whether it activates only provisioned emails.
    pub provisioned_only: bool,
    /// Whether an admin revoked it (it activates nothing more; its devices keep
    /// working).
    pub revoked: bool,
}

/// One entry of the audit log (`GET /v1/admin/audit`).
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When it happened (RFC 3339, UTC).
    pub at: DateTime<Utc>,
    /// The admin token id, `bootstrap`, or `device` (an activation).
    pub actor: String,
    /// What was done: `activate`, `deployment-token create`, `deployment-token
    /// revoke`, `retire`, `block`, `allow`, `wipe`, `reset`, `delete`, `user
    /// add`, `user remove`, `token create`, `token revoke` or `set-quota`.
    pub action: String,
    /// What was acted on: a device id, a token id, a tenant, an email.
    pub target: String,
    /// The tenant acted in (`null`: none, such as an admin token for every
    /// tenant).
    pub tenant: Option<String>,
    /// More about it (an expiry, a role, a new state); empty when there is
    /// nothing more.
    #[serde(default)]
    pub detail: String,
}

/// Every error response: a stable code and a human message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// A stable code for programs to match (`invalid_token`, `device_retired`,
    /// `quota_exceeded`, ...); each comes with one HTTP status, and the
    /// operations list theirs.
    pub error: String,
    /// A sentence for people; its wording may change.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn field_checks() {
        assert!(check_tenant("acme-1").is_ok());
        for bad in ["", "..", "a/b", "Acme", "-x", &"a".repeat(65)] {
            assert!(check_tenant(bad).is_err(), "{bad:?}");
        }
        assert!(check_device_id("iPhone-1.A:b").is_ok());
        assert!(check_device_id("a/b").is_err());
        assert!(check_email("a@b.c").is_ok());
        for bad in ["a", "@b", "a@", "a b@c", "a@b@c"] {
            assert!(check_email(bad).is_err(), "{bad:?}");
        }
        assert!(check_manifest_path("a/b.txt").is_ok());
        for bad in ["", "/a", "a//b", "../x", "a/..", "a/\0"] {
            assert!(check_manifest_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_body_bounds_and_validates() {
        let ok = br#"{"deployment_token":"x","email":"a@b","device_id":"d"}"#;
        assert!(parse_body::<ActivateRequest>(ok, MAX_JSON_BODY).is_ok());
        assert!(matches!(parse_body::<ActivateRequest>(ok, 10), Err(ApiError::TooLarge(10))));
        assert!(matches!(parse_body::<ActivateRequest>(b"{", MAX_JSON_BODY), Err(ApiError::Json(_))));
        let bad = br#"{"deployment_token":"x","email":"nope","device_id":"d"}"#;
        assert!(matches!(parse_body::<ActivateRequest>(bad, MAX_JSON_BODY), Err(ApiError::Invalid(_))));
        let bad_id = br#"{"chunks":["zz"]}"#;
        assert!(matches!(parse_body::<MissingRequest>(bad_id, MAX_JSON_BODY), Err(ApiError::Json(_))));
    }

    #[test]
    fn commit_fields_are_bounded_and_refused_as_too_large() {
        let body = |hostname: usize, paths: Vec<String>, tags: Vec<String>| {
            let req = CommitRequest { hostname: "h".repeat(hostname), paths, tags, files: vec![] };
            parse_body::<CommitRequest>(&serde_json::to_vec(&req).unwrap(), MAX_MANIFEST_BODY)
        };
        let (paths, tags) =
            (vec!["p".repeat(MAX_MANIFEST_PATH); MAX_MANIFEST_PATHS], vec!["t".repeat(MAX_TAG); MAX_TAGS]);
        body(MAX_HOSTNAME, paths.clone(), tags.clone()).unwrap();
        let too_large = |r: Result<CommitRequest, ApiError>| matches!(r, Err(ApiError::ManifestTooLarge(_)));
        assert!(too_large(body(MAX_HOSTNAME + 1, vec![], vec![])));
        assert!(too_large(body(1, vec!["p".repeat(MAX_MANIFEST_PATH + 1)], vec![])));
        assert!(too_large(body(1, vec!["p".into(); MAX_MANIFEST_PATHS + 1], vec![])));
        assert!(too_large(body(1, vec![], vec!["t".repeat(MAX_TAG + 1)])));
        assert!(too_large(body(1, vec![], vec!["t".into(); MAX_TAGS + 1])));
    }

    #[test]
    fn policies_default_to_allowed_and_are_set_by_name() {
        let p: Policies = serde_json::from_str(r#"{"allow_open_in": false}"#).unwrap();
        assert_eq!(p, Policies { allow_restore_to_other_device: true, allow_open_in: false });
        let mut r = Policies::default();
        r.set("allowRestoreToOtherDevice", false).unwrap();
        assert!(!r.allow_restore_to_other_device);
        assert!(r.set("allowEverything", true).is_err());
    }

    #[test]
    fn a_restore_plan_encoded_on_all_cores_is_what_serde_json_writes() {
        let entry = |i: usize| PlanEntry {
            path: format!("d{}/f\"{i}\u{e9}", i % 7),
            kind: if i % 5 == 0 { EntryKind::Symlink } else { EntryKind::File },
            mode: 0o644,
            uid: i as u32,
            gid: 0,
            mtime: -(i as i64),
            mtime_nsec: 3,
            size: i as u64,
            chunks: vec![BlobId([(i % 251) as u8; 32]); i % 3],
            target: (i % 5 == 0).then(|| format!("t{i}")),
        };
        // Empty, one entry, on the calling thread up to the threshold, on
        // all cores from it (one full slice of 1,024 more, several).
        for n in [0, 1, ON_ALL_CORES_FROM - 1, ON_ALL_CORES_FROM, ON_ALL_CORES_FROM + 1024, 9000] {
            let plan = RestorePlanResponse {
                entries: (0..n).map(entry).collect(),
                chunks: (0..n / 2).map(|i| PlanChunk { id: BlobId([(i % 13) as u8; 32]), len: i as u32 }).collect(),
            };
            let json = plan.to_json();
            assert_eq!(json, serde_json::to_vec(&plan).unwrap(), "{n} entries");
            assert_eq!(serde_json::from_slice::<RestorePlanResponse>(&json).unwrap(), plan);
        }
    }

    #[test]
    fn a_large_manifest_parses_on_all_cores_and_names_its_first_bad_entry() {
        let file = |i: usize| ManifestFile {
            kind: EntryKind::File,
            target: None,
            path: format!("d{}/f{i}", i % 7),
            mode: 0o644,
            mtime: i as i64,
            mtime_nsec: 0,
            size: i as u64,
            chunks: vec![BlobId([(i % 251) as u8; 32])],
        };
        let req = CommitRequest {
            hostname: "h".into(),
            paths: vec!["/".into()],
            tags: vec![],
            files: (0..5000).map(file).collect(),
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        assert_eq!(parse_body::<CommitRequest>(&bytes, MAX_MANIFEST_BODY).unwrap(), req);
        // Two bad entries in different slices: the first is named.
        let text = String::from_utf8(bytes).unwrap();
        let path = |i: usize| format!("\"path\":\"{}\"", file(i).path);
        let bad = text.replace(&path(2500), "\"path\":7").replace(&path(4990), "\"path\":8");
        let err = parse_body::<CommitRequest>(bad.as_bytes(), MAX_MANIFEST_BODY).unwrap_err().to_string();
        assert!(err.contains("entry 2500:"), "{err}");
    }

    fn commit_strategy() -> impl Strategy<Value = CommitRequest> {
        let file = ("[a-z]{1,8}(/[a-z]{1,8}){0,2}", any::<u32>(), any::<i64>(), 0u32..1_000_000_000, any::<u64>())
            .prop_map(|(path, mode, mtime, mtime_nsec, size)| ManifestFile {
                kind: EntryKind::File,
                target: None,
                path,
                mode,
                mtime,
                mtime_nsec,
                size,
                chunks: vec![BlobId([7; 32])],
            });
        ("[a-z]{0,12}", prop::collection::vec(file, 0..4)).prop_map(|(hostname, files)| CommitRequest {
            hostname,
            paths: vec!["/x".into()],
            tags: vec![],
            files,
        })
    }

    #[test]
    fn bundles_round_trip_and_refuse_truncation() {
        let mut body = Vec::new();
        push_bundle_frame(&mut body, &BlobId([1; 32]), b"abc");
        push_bundle_frame(&mut body, &BlobId([2; 32]), b"");
        let parsed = parse_bundle(&body, 16).unwrap();
        assert_eq!(parsed, vec![(BlobId([1; 32]), 36..39), (BlobId([2; 32]), 75..75)]);
        for cut in [1, 35, 38, 40, 74] {
            assert!(parse_bundle(&body[..cut], 16).is_err(), "cut at {cut}");
        }
        assert!(parse_bundle(&body, 2).is_err());
        assert!(parse_bundle(&[], 16).is_err());
    }

    proptest! {
        #[test]
        fn commit_roundtrip(req in commit_strategy()) {
            let bytes = serde_json::to_vec(&req).unwrap();
            prop_assert_eq!(parse_body::<CommitRequest>(&bytes, MAX_MANIFEST_BODY).unwrap(), req);
        }

        #[test]
        fn bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_body::<CreateDeploymentToken>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<ActivateRequest>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<SessionRequest>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<MissingRequest>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<CommitRequest>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<AddUsers>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<CreateAdminToken>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<SetQuota>(&bytes, MAX_JSON_BODY);
            let _ = parse_body::<CheckinRequest>(&bytes, MAX_JSON_BODY);
        }
    }
}
