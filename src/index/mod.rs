//! The blob index: which pack holds each blob, and where in it.
//!
//! Built when a repository is opened, from every index segment, and
//! extended as packs are written; backup asks it whether a chunk is already
//! stored, restore and check ask where a blob lives. A repository can hold
//! tens of millions of blobs, so the in-memory form is compact: each blob
//! costs its 32-byte id plus a 16-byte [`Loc`] in the hash table, and the
//! pack id and kind are stored once per pack, not once per blob.

pub mod segment;

pub use segment::{IndexEntry, IndexSegment, PackEntries, SegmentError};

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use crate::id::{BlobId, BlobKind, PackId};

/// Where a blob is: its pack, the pack's kind, and its place in the pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub kind: BlobKind,
    /// Byte offset of the blob's frame in the pack.
    pub offset: u32,
    /// Bytes the blob occupies in the pack (compressed and sealed).
    pub stored_len: u32,
    /// Bytes of the blob's plaintext.
    pub raw_len: u32,
}

/// A blob's location as stored in the table: the pack is a position in
/// [`Index::packs`], so an entry is 16 bytes instead of 45.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
}

/// Hashes an id by its first 8 bytes.
///
/// Blob ids are keyed BLAKE3 and pack ids plain BLAKE3, so their bytes are
/// already uniformly random: running SipHash over all 32 of them would only
/// cost time. Neither can be chosen by an attacker to collide (blob ids need
/// the repository's key; pack ids are only taken from authenticated index
/// segments and from packs this process wrote).
#[derive(Clone, Copy, Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Folds in up to the first 8 bytes of each write. An id's `Hash` writes
    /// its length (a constant) and then its bytes, so the result is the id's
    /// first 8 bytes up to a constant.
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(8) ^ u64::from_le_bytes(word);
    }
}

/// Builds [`IdHasher`]s for the index's tables.
#[derive(Clone, Copy, Debug, Default)]
struct IdHasherBuilder;

impl BuildHasher for IdHasherBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher::default()
    }
}

/// The in-memory blob index.
#[derive(Default)]
pub struct Index {
    /// Every indexed blob. A blob found in several packs keeps the first
    /// location added.
    blobs: HashMap<BlobId, Loc, IdHasherBuilder>,
    /// Every pack added, in the order first added; [`Loc::pack`] indexes this.
    packs: Vec<(PackId, BlobKind)>,
    /// Position of each pack in `packs`, so a pack added twice is stored once.
    pack_pos: HashMap<PackId, u32, IdHasherBuilder>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one pack's blobs. A blob already present keeps its first
    /// location: a blob stored twice (two backups racing, an interrupted
    /// prune) is the same content either way. A pack added again keeps the
    /// kind it was first added with.
    pub fn add_pack(&mut self, entries: &PackEntries) {
        let pack = match self.pack_pos.get(&entries.pack) {
            Some(&pos) => pos,
            None => {
                let pos = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
                self.packs.push((entries.pack, entries.kind));
                self.pack_pos.insert(entries.pack, pos);
                pos
            }
        };
        self.blobs.reserve(entries.blobs.len());
        for b in &entries.blobs {
            self.blobs.entry(b.id).or_insert(Loc {
                pack,
                offset: b.offset,
                stored_len: b.stored_len,
                raw_len: b.raw_len,
            });
        }
    }

    /// Adds every pack of a segment.
    pub fn add_segment(&mut self, segment: &IndexSegment) {
        self.blobs.reserve(segment.blob_count());
        for p in &segment.packs {
            self.add_pack(p);
        }
    }

    fn location(&self, loc: &Loc) -> BlobLocation {
        // `loc.pack` was a valid position in `packs` when stored, and packs are never removed.
        let (pack, kind) = self.packs[loc.pack as usize];
        BlobLocation { pack, kind, offset: loc.offset, stored_len: loc.stored_len, raw_len: loc.raw_len }
    }

    /// Where the blob `id` is stored, if it is indexed.
    pub fn get(&self, id: &BlobId) -> Option<BlobLocation> {
        self.blobs.get(id).map(|loc| self.location(loc))
    }

    /// Whether the blob `id` is indexed.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    /// Number of distinct blobs indexed.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Whether no blob is indexed.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Number of distinct packs added (including packs whose blobs were all
    /// already indexed elsewhere).
    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Every pack added, with its kind, in the order first added.
    pub fn packs(&self) -> impl Iterator<Item = (PackId, BlobKind)> + '_ {
        self.packs.iter().copied()
    }

    /// Every indexed blob with its location, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (BlobId, BlobLocation)> + '_ {
        self.blobs.iter().map(|(id, loc)| (*id, self.location(loc)))
    }

    /// Every blob of every pack, grouped by pack (used to rewrite the index
    /// and by check).
    ///
    /// Packs come in the order first added, blobs within a pack by offset.
    /// Only the location the index keeps for each blob is listed, so a pack
    /// whose blobs are all indexed elsewhere is left out: nothing refers to it.
    pub fn to_segment(&self) -> IndexSegment {
        let mut by_pack: Vec<Vec<IndexEntry>> = vec![Vec::new(); self.packs.len()];
        for (id, loc) in &self.blobs {
            by_pack[loc.pack as usize].push(IndexEntry {
                id: *id,
                offset: loc.offset,
                stored_len: loc.stored_len,
                raw_len: loc.raw_len,
            });
        }
        let packs = self
            .packs
            .iter()
            .zip(by_pack)
            .filter(|(_, blobs)| !blobs.is_empty())
            .map(|(&(pack, kind), mut blobs)| {
                blobs.sort_unstable_by_key(|b| (b.offset, b.id));
                PackEntries { pack, kind, blobs }
            })
            .collect();
        IndexSegment { packs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn entry(id: u8, offset: u32) -> IndexEntry {
        IndexEntry { id: BlobId([id; 32]), offset, stored_len: 10 + u32::from(id), raw_len: 20 + u32::from(id) }
    }

    fn pack(id: u8, kind: BlobKind, blobs: Vec<IndexEntry>) -> PackEntries {
        PackEntries { pack: PackId([id; 32]), kind, blobs }
    }

    #[test]
    fn entries_stay_compact() {
        // A hash table slot holds the id and its Loc; the target is <= 48 bytes.
        assert_eq!(std::mem::size_of::<(BlobId, Loc)>(), 48);
    }

    #[test]
    fn lookups_across_packs() {
        let mut index = Index::new();
        assert!(index.is_empty());
        index.add_pack(&pack(1, BlobKind::Data, vec![entry(1, 0), entry(2, 100)]));
        index.add_pack(&pack(2, BlobKind::Tree, vec![entry(3, 50)]));
        assert_eq!(index.len(), 3);
        assert_eq!(index.pack_count(), 2);
        assert!(index.contains(&BlobId([2; 32])));
        assert!(!index.contains(&BlobId([4; 32])));
        assert_eq!(index.get(&BlobId([4; 32])), None);
        assert_eq!(
            index.get(&BlobId([3; 32])),
            Some(BlobLocation { pack: PackId([2; 32]), kind: BlobKind::Tree, offset: 50, stored_len: 13, raw_len: 23 })
        );
        assert_eq!(index.get(&BlobId([2; 32])).unwrap().pack, PackId([1; 32]));
        assert_eq!(
            index.packs().collect::<Vec<_>>(),
            vec![(PackId([1; 32]), BlobKind::Data), (PackId([2; 32]), BlobKind::Tree)]
        );
        let mut all: Vec<_> = index.iter().map(|(id, loc)| (id, loc.offset)).collect();
        all.sort();
        assert_eq!(all, vec![(BlobId([1; 32]), 0), (BlobId([2; 32]), 100), (BlobId([3; 32]), 50)]);
    }

    #[test]
    fn duplicate_blob_keeps_first_location() {
        let mut index = Index::new();
        index.add_pack(&pack(1, BlobKind::Data, vec![entry(7, 500)]));
        index.add_pack(&pack(2, BlobKind::Data, vec![entry(7, 0), entry(8, 90)]));
        // The same pack again changes nothing.
        index.add_pack(&pack(1, BlobKind::Data, vec![entry(7, 500)]));
        assert_eq!(index.len(), 2);
        assert_eq!(index.pack_count(), 2);
        let loc = index.get(&BlobId([7; 32])).unwrap();
        assert_eq!((loc.pack, loc.offset), (PackId([1; 32]), 500));
    }

    #[test]
    fn to_segment_leaves_out_packs_with_nothing_indexed() {
        let mut index = Index::new();
        index.add_pack(&pack(1, BlobKind::Data, vec![entry(1, 200), entry(2, 0)]));
        index.add_pack(&pack(2, BlobKind::Data, vec![entry(1, 0)]));
        let seg = index.to_segment();
        assert_eq!(seg, IndexSegment { packs: vec![pack(1, BlobKind::Data, vec![entry(2, 0), entry(1, 200)])] });
    }

    fn segment_strategy() -> impl Strategy<Value = IndexSegment> {
        // Few distinct blob and pack ids, so duplicates across packs are common.
        let entry =
            (0u8..40, any::<u32>(), 1..=u32::MAX, any::<u32>()).prop_map(|(id, offset, stored_len, raw_len)| {
                IndexEntry { id: BlobId([id; 32]), offset, stored_len, raw_len }
            });
        let kind = prop_oneof![Just(BlobKind::Data), Just(BlobKind::Tree)];
        let pack = (0u8..10, kind, prop::collection::vec(entry, 0..12)).prop_map(|(id, kind, blobs)| PackEntries {
            pack: PackId([id; 32]),
            kind,
            blobs,
        });
        prop::collection::vec(pack, 0..10).prop_map(|packs| IndexSegment { packs })
    }

    /// The index's meaning, spelled out: the first location of each blob wins,
    /// and a pack keeps the kind it first appeared with.
    fn model(segments: &[IndexSegment]) -> BTreeMap<BlobId, BlobLocation> {
        let mut kinds: BTreeMap<PackId, BlobKind> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for p in segments.iter().flat_map(|s| &s.packs) {
            let kind = *kinds.entry(p.pack).or_insert(p.kind);
            for b in &p.blobs {
                out.entry(b.id).or_insert(BlobLocation {
                    pack: p.pack,
                    kind,
                    offset: b.offset,
                    stored_len: b.stored_len,
                    raw_len: b.raw_len,
                });
            }
        }
        out
    }

    proptest! {
        #[test]
        fn index_matches_model(segments in prop::collection::vec(segment_strategy(), 0..4), probe in any::<u8>()) {
            let mut index = Index::new();
            for s in &segments {
                index.add_segment(s);
            }
            let expected = model(&segments);
            prop_assert_eq!(index.len(), expected.len());
            prop_assert_eq!(index.is_empty(), expected.is_empty());
            let got: BTreeMap<_, _> = index.iter().collect();
            prop_assert_eq!(&got, &expected);
            for (id, loc) in &expected {
                prop_assert_eq!(index.get(id), Some(*loc));
                prop_assert!(index.contains(id));
            }
            let id = BlobId([probe; 32]);
            prop_assert_eq!(index.get(&id), expected.get(&id).copied());
        }

        #[test]
        fn to_segment_roundtrip(segments in prop::collection::vec(segment_strategy(), 0..4)) {
            let mut index = Index::new();
            for s in &segments {
                index.add_segment(s);
            }
            let seg = index.to_segment();
            prop_assert_eq!(seg.blob_count(), index.len());
            let decoded = IndexSegment::decode(&seg.encode()).unwrap();
            let mut rebuilt = Index::new();
            rebuilt.add_segment(&decoded);
            prop_assert_eq!(rebuilt.len(), index.len());
            for (id, loc) in index.iter() {
                prop_assert_eq!(rebuilt.get(&id), Some(loc));
            }
            let expected_packs: Vec<_> = index.packs().filter(|(p, _)| seg.packs.iter().any(|e| e.pack == *p)).collect();
            prop_assert_eq!(rebuilt.packs().collect::<Vec<_>>(), expected_packs);
        }
    }
}
