//! Key files: the master key wrapped by one password each.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::WrappedKey;

const MAX_KEY_FILE_SIZE: usize = 64 * 1024;

/// The JSON stored under `keys/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub created: DateTime<Utc>,
    pub hostname: String,
    pub username: String,
    pub key: WrappedKey,
}

impl KeyFile {
    /// Parses a key file, refusing oversized input.
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
