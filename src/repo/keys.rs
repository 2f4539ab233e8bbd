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

/// The user name and host name recorded in key files and snapshots.
pub fn whoami() -> (String, String) {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    (user, hostname())
}

/// The machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
