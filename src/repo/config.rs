//! The repository config: fixed at `init`, sealed with role `Config`.

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;

/// Current repository format version.
pub const FORMAT_VERSION: u32 = 1;
/// Largest config accepted when decoding.
const MAX_CONFIG_SIZE: usize = 64 * 1024;

/// Parameters every writer of a repository must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Repository format version; [`Config::decode`] accepts only
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Random repository id, hex.
    pub id: String,
    /// FastCDC chunk sizes in bytes. Fixed for the repository's life: the
    /// same parameters (and the key's gear seed) cut the same data the same
    /// way, which is what makes deduplication across backups work.
    pub chunker: ChunkerParams,
    /// zstd level for new blobs, -7 to 22; 0 stores them uncompressed.
    pub compression_level: i32,
    /// Target size of a packfile in bytes, 1 MiB to 1 GiB.
    pub pack_size: u32,
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The decrypted config is not the JSON of a [`Config`].
    #[error("config is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// The config is over 64 KiB; refused before parsing.
    #[error("config too large")]
    TooLarge,
    /// The repository has a format version (given) this build cannot read.
    #[error("repository format version {0} is not supported by this chunkvault (supports {FORMAT_VERSION})")]
    Version(u32),
    /// A value is out of range (chunker sizes, compression level, pack size);
    /// the message names it.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses and validates an opened config.
    pub fn decode(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.len() > MAX_CONFIG_SIZE {
            return Err(ConfigError::TooLarge);
        }
        let c: Config = serde_json::from_slice(bytes)?;
        if c.version != FORMAT_VERSION {
            return Err(ConfigError::Version(c.version));
        }
        c.chunker.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(-7..=22).contains(&c.compression_level) {
            return Err(ConfigError::Invalid(format!("compression level {}", c.compression_level)));
        }
        if c.pack_size < 1 << 20 || c.pack_size > 1 << 30 {
            return Err(ConfigError::Invalid(format!("pack size {}", c.pack_size)));
        }
        Ok(c)
    }

    /// JSON for sealing.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("config serializes")
    }
}
