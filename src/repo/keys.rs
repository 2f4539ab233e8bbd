//! Key files: the master key wrapped by one password each.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::WrappedKey;

const MAX_KEY_FILE_SIZE: usize = 64 * 1024;

/// The JSON stored under `keys/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    /// When the key file was written (UTC).
    pub created: DateTime<Utc>,
    /// The host that wrote it, for `key list`; informational, not verified.
    pub hostname: String,
    /// The user that wrote it (from the effective uid, see [`whoami`]);
    /// informational, not verified.
    pub username: String,
    /// The master key wrapped by this file's password (Argon2id, AES-256-GCM).
    pub key: WrappedKey,
}

impl KeyFile {
    /// Parses a key file, refusing input over 64 KiB before parsing it.
    pub fn decode(bytes: &[u8]) -> Result<KeyFile, serde_json::Error> {
        if bytes.len() > MAX_KEY_FILE_SIZE {
            return Err(serde::de::Error::custom("key file too large"));
        }
        serde_json::from_slice(bytes)
    }
}

/// The user name (from the effective uid, not `$USER`, so cron and sudo
/// record who really ran it) and host name recorded in key files and locks.
pub fn whoami() -> (String, String) {
    (crate::snapshot::current_user(), crate::snapshot::current_host())
}
