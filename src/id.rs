//! Typed 32-byte identifiers.
//!
//! Every object in a repository is named by 32 bytes shown as lowercase hex.
//! Each kind of object has its own type, so a pack id can never be passed
//! where a blob id belongs (the lesson of rustic's `BlobId`/`PackId`).

use std::fmt;
use std::str::FromStr;

/// Why a string is not an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The string is not 64 bytes long (its length given).
    #[error("an id is 64 hex characters, got {0} characters")]
    Length(usize),
    /// The string has a character other than `0-9a-f` (uppercase is refused);
    /// its first 80 characters given.
    #[error("an id is lowercase hex: {0:?}")]
    NotHex(String),
}

/// Parses 64 lowercase hex characters into 32 bytes.
pub fn parse_hex32(s: &str) -> Result<[u8; 32], IdError> {
    if s.len() != 64 {
        return Err(IdError::Length(s.len()));
    }
    if !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(IdError::NotHex(s.chars().take(80).collect()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| IdError::NotHex(s.to_owned()))?;
    Ok(out)
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lowercase hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 8 hex characters, for humans.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
            /// A fresh random id (for objects not named by their content).
            pub fn random() -> Self {
                Self(rand::random())
            }
            /// The id of `bytes` under plain (unkeyed) BLAKE3, used for objects
            /// that are named by their content so they can be verified by name.
            pub fn of_content(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex32(s).map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// A data chunk or a tree blob: BLAKE3 of its plaintext keyed with the
    /// repository's id key, so equal content has an equal id (deduplication)
    /// but ids reveal nothing to whoever lacks the key.
    BlobId
);
typed_id!(
    /// A packfile: plain BLAKE3 of the whole file, so a pack is verifiable by name.
    PackId
);
typed_id!(
    /// An index segment: plain BLAKE3 of the stored file.
    IndexId
);
typed_id!(
    /// A snapshot manifest: plain BLAKE3 of the stored file.
    SnapshotId
);
typed_id!(
    /// A key file (random).
    KeyId
);
typed_id!(
    /// A lock file (random).
    LockId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let id = BlobId::random();
        assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
        assert_eq!(id.short().len(), 8);
    }

    #[test]
    fn rejects_bad_hex() {
        assert_eq!("ab".parse::<PackId>(), Err(IdError::Length(2)));
        let upper = "A".repeat(64);
        assert!(matches!(upper.parse::<PackId>(), Err(IdError::NotHex(_))));
        let path = format!("../{}", "a".repeat(61));
        assert!(path.parse::<PackId>().is_err());
    }

    #[test]
    fn serde_as_hex_string() {
        let id = SnapshotId([7; 32]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "07".repeat(32)));
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), id);
    }
}

/// Which of the two pack families a blob lives in. Data and tree blobs go
/// into separate packs so that tree-only operations (listing, check,
/// prune's mark phase) read little.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of file content (byte 1 on disk).
    Data = 1,
    /// A tree blob: one directory listing (byte 2 on disk).
    Tree = 2,
}

impl BlobKind {
    /// Decodes the on-disk byte.
    pub fn from_byte(b: u8) -> Option<BlobKind> {
        match b {
            1 => Some(BlobKind::Data),
            2 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}
