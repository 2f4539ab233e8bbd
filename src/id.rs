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
    // One pass, no allocation: ids are parsed by the hundred thousand from
    // manifests and restore plans.
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
            _ => return Err(IdError::NotHex(s.chars().take(80).collect())),
        }
    }
    Ok(out)
}

/// Reads an id from a string of [`parse_hex32`]'s form, borrowed from the
/// input where the format allows (no `String` per id).
struct HexVisitor;

impl serde::de::Visitor<'_> for HexVisitor {
    type Value = [u8; 32];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("64 lowercase hex digits")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<[u8; 32], E> {
        parse_hex32(v).map_err(E::custom)
    }
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
                let mut hex = [0u8; 64];
                hex::encode_to_slice(self.0, &mut hex).expect("32 bytes are 64 hex digits");
                s.serialize_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(HexVisitor).map(Self)
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
        // An escaped string is read from serde's unescaped copy.
        let escaped = format!("\"\\u0030\\u0037{}\"", "07".repeat(31));
        assert_eq!(serde_json::from_str::<SnapshotId>(&escaped).unwrap(), id);
        for bad in ["7", "null", "[7]", "\"07\"", &format!("\"{}\"", "0G".repeat(32))] {
            assert!(serde_json::from_str::<SnapshotId>(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_hex32_takes_exactly_lowercase_hex(bytes in proptest::array::uniform32(proptest::prelude::any::<u8>()), s in "[0-9a-fA-Gz/.]{64}") {
            proptest::prop_assert_eq!(parse_hex32(&hex::encode(bytes)), Ok(bytes));
            let lower_hex = s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let mut expected = [0u8; 32];
            let decoded = hex::decode_to_slice(&s, &mut expected).is_ok() && lower_hex;
            proptest::prop_assert_eq!(parse_hex32(&s).ok(), decoded.then_some(expected));
        }
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
