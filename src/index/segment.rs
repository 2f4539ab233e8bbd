//! Index segments: the persisted form of the blob index.
//!
//! Each segment lists, for some packs, every blob each pack holds and where.
//! This module only turns a segment into plaintext bytes and back; the caller
//! seals the bytes before storing them and opens them after loading.
//!
//! # Format
//!
//! All integers are little-endian:
//!
//! ```text
//! magic      4   b"CVIX"
//! version    1   1
//! pack_count 4   u32
//! pack_count times:
//!   pack id    32
//!   kind       1   BlobKind byte (1 data, 2 tree)
//!   blob_count 4   u32
//!   blob_count times:
//!     blob id    32
//!     offset     4   u32, where the blob's frame starts in the pack
//!     stored_len 4   u32, bytes stored (compressed and sealed), never 0
//!     raw_len    4   u32, bytes of plaintext
//! ```
//!
//! Nothing may follow the last pack. Decoded bytes are treated as hostile:
//! every count is checked against the bytes that remain before anything is
//! allocated for it, and decoding never panics.

use crate::id::{BlobId, BlobKind, PackId};
use crate::wire::{put_u32_len, Reader, Truncated};

/// Largest encoded segment accepted (decode refuses more).
pub const MAX_SEGMENT_SIZE: usize = 256 << 20;

const MAGIC: &[u8; 4] = b"CVIX";
const VERSION: u8 = 1;
const ID_LEN: usize = 32;
/// A pack's header: id, kind, blob_count.
const PACK_HEADER_LEN: usize = ID_LEN + 1 + 4;
/// One blob: id, offset, stored_len, raw_len.
const BLOB_LEN: usize = ID_LEN + 4 + 4 + 4;

/// Where one blob sits inside its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The blob (keyed BLAKE3 of its plaintext).
    pub id: BlobId,
    /// Byte offset of the blob's frame in the pack.
    pub offset: u32,
    /// Bytes the blob occupies in the pack (compressed and sealed).
    pub stored_len: u32,
    /// Bytes of the blob's plaintext.
    pub raw_len: u32,
}

/// Every blob of one pack. A pack holds blobs of a single kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackEntries {
    /// The pack (BLAKE3 of its file).
    pub pack: PackId,
    /// The kind of every blob in it.
    pub kind: BlobKind,
    /// Its blobs, in frame order for packs this build wrote.
    pub blobs: Vec<IndexEntry>,
}

/// The plaintext of one index segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexSegment {
    /// The packs this segment names, each with all of its blobs. The same
    /// blob may appear under several packs (and in several segments); the
    /// merged index keeps the first location it meets.
    pub packs: Vec<PackEntries>,
}

/// Why bytes are not a valid index segment.
#[derive(Debug, thiserror::Error)]
///
/// Every variant means damaged or foreign bytes (the segment already passed
/// its name and AES-GCM checks when it reaches the decoder, so in practice a
/// bug or a newer format).
pub enum SegmentError {
    /// The bytes end inside a field.
    #[error("index segment is truncated")]
    Truncated,
    /// The first four bytes are not `CVIX`.
    #[error("not an index segment (bad magic bytes)")]
    BadMagic,
    /// The version byte (given) is not one this build reads.
    #[error("unsupported index segment version {0}")]
    UnsupportedVersion(u8),
    /// A pack's kind byte is neither data (1) nor tree (2).
    #[error("pack {pack} has unknown blob kind {kind}")]
    BadKind {
        /// The pack whose header holds the byte.
        pack: PackId,
        /// The byte found.
        kind: u8,
    },
    /// A blob entry (id given) records 0 stored bytes, which no frame has.
    #[error("blob {0} has a stored length of 0")]
    ZeroStoredLen(BlobId),
    /// The pack count cannot fit in the bytes left (checked before allocating).
    #[error("segment claims {count} packs but only {remaining} bytes follow")]
    TooManyPacks {
        /// Packs the segment claims.
        count: u32,
        /// Bytes left after the count.
        remaining: usize,
    },
    /// A pack's blob count cannot fit in the bytes left (checked before allocating).
    #[error("pack {pack} claims {count} blobs but only {remaining} bytes follow")]
    TooManyBlobs {
        /// The pack whose header holds the count.
        pack: PackId,
        /// Blobs it claims.
        count: u32,
        /// Bytes left after the count.
        remaining: usize,
    },
    /// Bytes (how many given) follow the last pack.
    #[error("{0} bytes follow the last pack")]
    TrailingBytes(usize),
    /// The plaintext (its length in bytes given) is over [`MAX_SEGMENT_SIZE`].
    #[error("index segment of {0} bytes is larger than the limit of {MAX_SEGMENT_SIZE} bytes")]
    TooLarge(usize),
}

impl IndexSegment {
    /// Total number of blob entries over all packs (duplicates included).
    pub fn blob_count(&self) -> usize {
        self.packs.iter().map(|p| p.blobs.len()).sum()
    }

    /// The encoding described in the module documentation.
    ///
    /// Encoding does not validate: a segment with a zero `stored_len` or
    /// more than [`MAX_SEGMENT_SIZE`] bytes of encoding is written as is and
    /// refused by [`IndexSegment::decode`]. Writers keep segments well under
    /// the limit by splitting them by pack count.
    pub fn encode(&self) -> Vec<u8> {
        let len = 4 + 1 + 4 + self.packs.len() * PACK_HEADER_LEN + self.blob_count() * BLOB_LEN;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_u32_len(&mut out, self.packs.len());
        for p in &self.packs {
            out.extend_from_slice(p.pack.as_bytes());
            out.push(p.kind as u8);
            put_u32_len(&mut out, p.blobs.len());
            for b in &p.blobs {
                out.extend_from_slice(b.id.as_bytes());
                out.extend_from_slice(&b.offset.to_le_bytes());
                out.extend_from_slice(&b.stored_len.to_le_bytes());
                out.extend_from_slice(&b.raw_len.to_le_bytes());
            }
        }
        out
    }

    /// Parses and validates a segment's plaintext.
    pub fn decode(bytes: &[u8]) -> Result<IndexSegment, SegmentError> {
        if bytes.len() > MAX_SEGMENT_SIZE {
            return Err(SegmentError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(SegmentError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(SegmentError::UnsupportedVersion(version));
        }
        let pack_count = r.u32()?;
        if pack_count as usize > r.remaining() / PACK_HEADER_LEN {
            return Err(SegmentError::TooManyPacks { count: pack_count, remaining: r.remaining() });
        }
        let mut packs = Vec::with_capacity(pack_count as usize);
        for _ in 0..pack_count {
            let pack = PackId(r.array::<ID_LEN>()?);
            let kind = r.u8()?;
            let kind = BlobKind::from_byte(kind).ok_or(SegmentError::BadKind { pack, kind })?;
            let count = r.u32()?;
            if count as usize > r.remaining() / BLOB_LEN {
                return Err(SegmentError::TooManyBlobs { pack, count, remaining: r.remaining() });
            }
            let mut blobs = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let entry = IndexEntry {
                    id: BlobId(r.array::<ID_LEN>()?),
                    offset: r.u32()?,
                    stored_len: r.u32()?,
                    raw_len: r.u32()?,
                };
                if entry.stored_len == 0 {
                    return Err(SegmentError::ZeroStoredLen(entry.id));
                }
                blobs.push(entry);
            }
            packs.push(PackEntries { pack, kind, blobs });
        }
        if r.remaining() != 0 {
            return Err(SegmentError::TrailingBytes(r.remaining()));
        }
        Ok(IndexSegment { packs })
    }
}

impl From<Truncated> for SegmentError {
    fn from(_: Truncated) -> Self {
        SegmentError::Truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = BlobKind> {
        prop_oneof![Just(BlobKind::Data), Just(BlobKind::Tree)]
    }

    fn entry_strategy() -> impl Strategy<Value = IndexEntry> {
        (any::<[u8; 32]>(), any::<u32>(), 1..=u32::MAX, any::<u32>())
            .prop_map(|(id, offset, stored_len, raw_len)| IndexEntry { id: BlobId(id), offset, stored_len, raw_len })
    }

    fn segment_strategy() -> impl Strategy<Value = IndexSegment> {
        let pack = (any::<[u8; 32]>(), kind_strategy(), prop::collection::vec(entry_strategy(), 0..16))
            .prop_map(|(id, kind, blobs)| PackEntries { pack: PackId(id), kind, blobs });
        prop::collection::vec(pack, 0..8).prop_map(|packs| IndexSegment { packs })
    }

    fn sample() -> IndexSegment {
        let blob = |n: u8| IndexEntry { id: BlobId([n; 32]), offset: u32::from(n) * 100, stored_len: 90, raw_len: 120 };
        IndexSegment {
            packs: vec![
                PackEntries { pack: PackId([1; 32]), kind: BlobKind::Data, blobs: vec![blob(1), blob(2)] },
                PackEntries { pack: PackId([2; 32]), kind: BlobKind::Tree, blobs: vec![blob(3)] },
            ],
        }
    }

    proptest! {
        #[test]
        fn roundtrip(seg in segment_strategy()) {
            let bytes = seg.encode();
            prop_assert_eq!(bytes.len(), 9 + seg.packs.len() * PACK_HEADER_LEN + seg.blob_count() * BLOB_LEN);
            prop_assert_eq!(IndexSegment::decode(&bytes).unwrap(), seg);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = IndexSegment::decode(&bytes);
            // Past the header too, with a small count, so the pack parser sees random input.
            let mut with_header = b"CVIX\x01".to_vec();
            with_header.extend_from_slice(&u32::from(bytes.first().copied().unwrap_or(0) % 4).to_le_bytes());
            with_header.extend_from_slice(bytes.get(1..).unwrap_or_default());
            if let Ok(seg) = IndexSegment::decode(&with_header) {
                prop_assert_eq!(seg.encode(), with_header);
            }
        }

        #[test]
        fn flipped_bytes_never_panic(seg in segment_strategy(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
            let mut bytes = seg.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= mask;
            // Whatever decodes must be canonical: re-encoding gives the same bytes.
            if let Ok(s) = IndexSegment::decode(&bytes) {
                prop_assert_eq!(s.encode(), bytes);
            }
        }

        #[test]
        fn truncated_is_rejected(seg in segment_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = seg.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(IndexSegment::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn rejects_malformed_segments() {
        let bytes = sample().encode();
        assert_eq!(sample().blob_count(), 3);

        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(IndexSegment::decode(&b), Err(SegmentError::BadMagic)));
        let mut b = bytes.clone();
        b[4] = 9;
        assert!(matches!(IndexSegment::decode(&b), Err(SegmentError::UnsupportedVersion(9))));
        let mut b = bytes.clone();
        b[9 + ID_LEN] = 3;
        assert!(matches!(IndexSegment::decode(&b), Err(SegmentError::BadKind { kind: 3, .. })));
        let mut b = bytes.clone();
        b.extend_from_slice(b"xy");
        assert!(matches!(IndexSegment::decode(&b), Err(SegmentError::TrailingBytes(2))));
        assert!(matches!(IndexSegment::decode(&bytes[..7]), Err(SegmentError::Truncated)));
        // A count that no longer fits is refused before reading its entries.
        assert!(matches!(
            IndexSegment::decode(&bytes[..bytes.len() - 1]),
            Err(SegmentError::TooManyBlobs { count: 1, .. })
        ));
        assert!(matches!(IndexSegment::decode(&vec![0; MAX_SEGMENT_SIZE + 1]), Err(SegmentError::TooLarge(_))));

        let mut zero = sample();
        zero.packs[1].blobs[0].stored_len = 0;
        assert!(
            matches!(IndexSegment::decode(&zero.encode()), Err(SegmentError::ZeroStoredLen(id)) if id == BlobId([3; 32]))
        );
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut b = b"CVIX\x01".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(IndexSegment::decode(&b), Err(SegmentError::TooManyPacks { count: u32::MAX, remaining: 0 })));

        let mut b =
            IndexSegment { packs: vec![PackEntries { pack: PackId([1; 32]), kind: BlobKind::Data, blobs: vec![] }] }
                .encode();
        let at = b.len() - 4;
        b[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            IndexSegment::decode(&b),
            Err(SegmentError::TooManyBlobs { count: u32::MAX, remaining: 0, .. })
        ));
    }
}
