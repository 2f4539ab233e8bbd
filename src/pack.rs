//! Packfiles: many sealed blobs of one kind in one immutable object.
//!
//! ```text
//! header   "CVPK" | version u8 = 1 | kind u8 | 0u16                    8 bytes
//! frames   stored_len u32 | crc32(stored) u32 | stored bytes             per blob
//! table    sealed object (role PackTable): kind u8 | count u32 |
//!          count x (id 32 | offset u32 | stored_len u32 | raw_len u32)
//! trailer  table_len u32 | crc32(table) u32 | "CVPT"                    12 bytes
//! ```
//! The crc32 framing lets a scrub find damage without the key; the blob
//! table at the end lets `repair index` rebuild the index from packs alone.
//! The pack's id is the BLAKE3 of the whole file, so its name verifies it.
//! Offsets in the table and index point at a blob's frame header.

use crate::crypto::{CryptoError, MasterKey, Role};
use crate::id::{BlobId, BlobKind, PackId};
use crate::index::{IndexEntry, PackEntries};

const MAGIC: &[u8; 4] = b"CVPK";
const TRAILER_MAGIC: &[u8; 4] = b"CVPT";
const VERSION: u8 = 1;
/// Bytes before the first frame.
pub const HEADER_LEN: usize = 8;
/// Bytes of a frame before its stored bytes.
pub const FRAME_HEADER_LEN: usize = 8;

/// Bytes a blob's frame takes in its pack: the frame header and the sealed
/// bytes (`stored_len`).
pub fn frame_len(stored_len: u32) -> u64 {
    FRAME_HEADER_LEN as u64 + u64::from(stored_len)
}
/// Bytes after the sealed table.
pub const TRAILER_LEN: usize = 12;
const TABLE_ENTRY_LEN: usize = 44;
/// Largest pack accepted; offsets are u32.
pub const MAX_PACK_SIZE: u64 = u32::MAX as u64;

/// Why bytes are not a valid pack (or a valid part of one).
#[derive(Debug, thiserror::Error)]
///
/// Every variant means damaged (or foreign) bytes; none is retryable.
pub enum PackError {
    /// Header, trailer or table structure is wrong; the text says what.
    #[error("not a pack: {0}")]
    Format(&'static str),
    /// The header's version byte (given) is not one this build reads.
    #[error("unsupported pack version {0}")]
    Version(u8),
    /// The sealed blob table did not open (damaged, or another repository's key).
    #[error("pack blob table: {0}")]
    Table(CryptoError),
    /// A blob frame is damaged: bad length or crc32.
    #[error("blob frame at offset {offset}: {what}")]
    Frame {
        /// Byte offset of the frame's header in the pack.
        offset: u64,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// Accumulates sealed blobs into one pack in memory.
#[derive(Debug)]
pub struct PackBuilder {
    kind: BlobKind,
    buf: Vec<u8>,
    blobs: Vec<IndexEntry>,
}

/// A finished pack: its name, bytes, and what it contains.
#[derive(Debug)]
pub struct FinishedPack {
    /// BLAKE3 of `bytes`: the pack's name in storage.
    pub id: PackId,
    /// The whole pack file, ready to upload.
    pub bytes: Vec<u8>,
    /// Its blobs, in frame order, as the index will record them.
    pub entries: PackEntries,
}

impl PackBuilder {
    /// An empty pack of `kind`, with room reserved for `capacity` bytes.
    pub fn new(kind: BlobKind, capacity: usize) -> Self {
        Self::with_buffer(kind, Vec::new(), capacity)
    }

    /// Like [`PackBuilder::new`], reusing `buf` (the bytes of a pack already
    /// stored): its pages are already faulted in.
    pub fn with_buffer(kind: BlobKind, mut buf: Vec<u8>, capacity: usize) -> Self {
        buf.clear();
        buf.reserve(capacity);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&[VERSION, kind as u8, 0, 0]);
        PackBuilder { kind, buf, blobs: Vec::new() }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Appends a sealed blob. The caller keeps packs below [`MAX_PACK_SIZE`].
    pub fn add(&mut self, id: BlobId, raw_len: u32, stored: &[u8]) {
        let offset = self.buf.len() as u32;
        let stored_len = stored.len() as u32;
        self.buf.extend_from_slice(&stored_len.to_le_bytes());
        self.buf.extend_from_slice(&crc32fast::hash(stored).to_le_bytes());
        self.buf.extend_from_slice(stored);
        self.blobs.push(IndexEntry { id, offset, stored_len, raw_len });
    }

    /// Seals the blob table, appends the trailer and names the pack.
    pub fn finish(mut self, key: &MasterKey) -> FinishedPack {
        let mut table = Vec::with_capacity(5 + self.blobs.len() * TABLE_ENTRY_LEN);
        table.push(self.kind as u8);
        table.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        for b in &self.blobs {
            table.extend_from_slice(&b.id.0);
            table.extend_from_slice(&b.offset.to_le_bytes());
            table.extend_from_slice(&b.stored_len.to_le_bytes());
            table.extend_from_slice(&b.raw_len.to_le_bytes());
        }
        let sealed = key.seal_object(Role::PackTable, &table);
        self.buf.extend_from_slice(&sealed);
        self.buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&crc32fast::hash(&sealed).to_le_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        let id = PackId::of_content(&self.buf);
        FinishedPack { id, bytes: self.buf, entries: PackEntries { pack: id, kind: self.kind, blobs: self.blobs } }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

/// Reads the kind from a pack's first [`HEADER_LEN`] bytes.
pub fn parse_header(bytes: &[u8]) -> Result<BlobKind, PackError> {
    let h = bytes.get(..HEADER_LEN).ok_or(PackError::Format("shorter than its header"))?;
    if &h[..4] != MAGIC {
        return Err(PackError::Format("bad magic"));
    }
    if h[4] != VERSION {
        return Err(PackError::Version(h[4]));
    }
    if h[6..8] != [0, 0] {
        return Err(PackError::Format("reserved header bytes are not zero"));
    }
    BlobKind::from_byte(h[5]).ok_or(PackError::Format("unknown blob kind"))
}

/// From the last [`TRAILER_LEN`] bytes of a pack of `pack_len` bytes, the
/// length of the sealed table and its crc.
pub fn parse_trailer(trailer: &[u8], pack_len: u64) -> Result<(u32, u32), PackError> {
    if trailer.len() != TRAILER_LEN || &trailer[8..] != TRAILER_MAGIC {
        return Err(PackError::Format("bad trailer"));
    }
    let table_len = u32_at(trailer, 0).expect("12 bytes");
    let crc = u32_at(trailer, 4).expect("12 bytes");
    if u64::from(table_len) + (HEADER_LEN + TRAILER_LEN) as u64 > pack_len {
        return Err(PackError::Format("table longer than the pack"));
    }
    Ok((table_len, crc))
}

/// Opens a pack's sealed table; every entry must lie inside the frames area
/// of a pack of `pack_len` bytes.
pub fn decode_table(key: &MasterKey, sealed: &[u8], crc: u32, pack_len: u64) -> Result<PackTable, PackError> {
    if crc32fast::hash(sealed) != crc {
        return Err(PackError::Format("blob table checksum mismatch"));
    }
    let table = key.open_object(Role::PackTable, sealed).map_err(PackError::Table)?;
    let kind = table.first().and_then(|&b| BlobKind::from_byte(b)).ok_or(PackError::Format("table kind"))?;
    let count = u32_at(&table, 1).ok_or(PackError::Format("table truncated"))? as usize;
    let body = &table[5..];
    if body.len() != count.checked_mul(TABLE_ENTRY_LEN).ok_or(PackError::Format("table count"))? {
        return Err(PackError::Format("table length does not match its count"));
    }
    let frames_end = pack_len - (sealed.len() + TRAILER_LEN) as u64;
    let mut blobs = Vec::with_capacity(count);
    for e in body.chunks_exact(TABLE_ENTRY_LEN) {
        let entry = IndexEntry {
            id: BlobId(e[..32].try_into().expect("32 bytes")),
            offset: u32_at(e, 32).expect("44 bytes"),
            stored_len: u32_at(e, 36).expect("44 bytes"),
            raw_len: u32_at(e, 40).expect("44 bytes"),
        };
        let end = u64::from(entry.offset) + FRAME_HEADER_LEN as u64 + u64::from(entry.stored_len);
        if (entry.offset as usize) < HEADER_LEN || end > frames_end {
            return Err(PackError::Format("table entry outside the pack"));
        }
        blobs.push(entry);
    }
    Ok(PackTable { kind, blobs })
}

/// A pack's decoded blob table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackTable {
    /// The kind of every blob in the pack (header and table agree on it).
    pub kind: BlobKind,
    /// The pack's blobs in table order; every entry's frame lies inside the
    /// pack's frame area.
    pub blobs: Vec<IndexEntry>,
}

/// Parses a whole pack held in memory: header, trailer and table.
pub fn read_table(key: &MasterKey, pack: &[u8]) -> Result<PackTable, PackError> {
    let kind = parse_header(pack)?;
    let len = pack.len() as u64;
    if pack.len() < HEADER_LEN + TRAILER_LEN {
        return Err(PackError::Format("shorter than header and trailer"));
    }
    let (table_len, crc) = parse_trailer(&pack[pack.len() - TRAILER_LEN..], len)?;
    let start = pack.len() - TRAILER_LEN - table_len as usize;
    let table = decode_table(key, &pack[start..pack.len() - TRAILER_LEN], crc, len)?;
    if table.kind != kind {
        return Err(PackError::Format("header and table disagree on the kind"));
    }
    Ok(table)
}

/// Checks a frame (`stored_len | crc | stored`) read from `offset` and
/// returns its stored bytes.
pub fn check_frame(frame: &[u8], offset: u64, stored_len: u32) -> Result<&[u8], PackError> {
    let bad = |what| PackError::Frame { offset, what };
    let len = u32_at(frame, 0).ok_or_else(|| bad("truncated"))?;
    let crc = u32_at(frame, 4).ok_or_else(|| bad("truncated"))?;
    if len != stored_len || frame.len() != FRAME_HEADER_LEN + len as usize {
        return Err(bad("length does not match the index"));
    }
    let stored = &frame[FRAME_HEADER_LEN..];
    if crc32fast::hash(stored) != crc {
        return Err(bad("crc32 mismatch: the bytes on storage are damaged"));
    }
    Ok(stored)
}

/// Keyless scrub: walks the frames of a pack by their lengths and returns
/// the offsets of frames whose crc32 does not match. Errors when the frame
/// chain does not end exactly where the table begins.
pub fn scrub(pack: &[u8]) -> Result<Vec<u64>, PackError> {
    parse_header(pack)?;
    if pack.len() < HEADER_LEN + TRAILER_LEN {
        return Err(PackError::Format("shorter than header and trailer"));
    }
    let (table_len, crc) = parse_trailer(&pack[pack.len() - TRAILER_LEN..], pack.len() as u64)?;
    let end = pack.len() - TRAILER_LEN - table_len as usize;
    let mut damaged = Vec::new();
    if crc32fast::hash(&pack[end..pack.len() - TRAILER_LEN]) != crc {
        damaged.push(end as u64);
    }
    let mut pos = HEADER_LEN;
    while pos < end {
        let len = u32_at(pack, pos).ok_or(PackError::Frame { offset: pos as u64, what: "truncated" })? as usize;
        let next = pos + FRAME_HEADER_LEN + len;
        if next > end {
            return Err(PackError::Frame { offset: pos as u64, what: "frame runs past the table" });
        }
        if check_frame(&pack[pos..next], pos as u64, len as u32).is_err() {
            damaged.push(pos as u64);
        }
        pos = next;
    }
    Ok(damaged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(key: &MasterKey, blobs: &[Vec<u8>]) -> FinishedPack {
        let mut b = PackBuilder::new(BlobKind::Data, 1024);
        for data in blobs {
            let id = key.id_key().blob_id(data);
            b.add(id, data.len() as u32, data);
        }
        b.finish(key)
    }

    proptest! {
        #[test]
        fn pack_write_read_roundtrip(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20)) {
            let key = MasterKey::generate();
            let pack = build(&key, &blobs);
            prop_assert_eq!(pack.id, PackId::of_content(&pack.bytes));
            let table = read_table(&key, &pack.bytes).unwrap();
            prop_assert_eq!(&table.blobs, &pack.entries.blobs);
            for (entry, data) in table.blobs.iter().zip(&blobs) {
                let start = entry.offset as usize;
                let frame = &pack.bytes[start..start + FRAME_HEADER_LEN + entry.stored_len as usize];
                prop_assert_eq!(check_frame(frame, start as u64, entry.stored_len).unwrap(), &data[..]);
            }
            prop_assert!(scrub(&pack.bytes).unwrap().is_empty());
        }

        #[test]
        fn parsers_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let key = MasterKey::generate();
            let _ = read_table(&key, &bytes);
            let _ = scrub(&bytes);
            let _ = check_frame(&bytes, 0, 7);
        }

        #[test]
        fn a_flipped_byte_is_found(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..8), pos in any::<usize>()) {
            let key = MasterKey::generate();
            let mut bytes = build(&key, &blobs).bytes;
            let pos = pos % bytes.len();
            bytes[pos] ^= 0x10;
            let table_ok = read_table(&key, &bytes).is_ok();
            let scrub_clean = matches!(scrub(&bytes), Ok(d) if d.is_empty());
            prop_assert!(!(table_ok && scrub_clean), "flip at {} went unnoticed", pos);
        }
    }

    #[test]
    fn table_with_wrong_key_is_refused() {
        let pack = build(&MasterKey::generate(), &[b"abc".to_vec()]);
        assert!(matches!(read_table(&MasterKey::generate(), &pack.bytes), Err(PackError::Table(_))));
    }
}
