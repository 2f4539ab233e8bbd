//! The blob index: which pack holds each blob, and where in it.
//!
//! Built when a repository is opened, from every index segment, and
//! extended as packs are written; backup asks it whether a chunk is already
//! stored, restore and check ask where a blob lives. A repository can hold
//! tens of millions of blobs, so the in-memory form is compact: the bulk of
//! the index is one sorted array of 48-byte entries (the 32-byte id and a
//! 16-byte [`Loc`]), searched by bisection, with no per-entry overhead;
//! blobs added since the last merge sit in a small hash table that is merged
//! into the array when it grows past a fraction of it. Pack ids and kinds
//! are stored once per pack, not once per blob.

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

/// One slot of the sorted array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    id: BlobId,
    loc: Loc,
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

/// Blobs added since the last merge are merged into the sorted array once
/// they number more than this, or more than an eighth of the array.
const MERGE_MIN: usize = 1 << 16;

/// The in-memory blob index.
#[derive(Default)]
pub struct Index {
    /// Most blobs, sorted by id, each id once.
    sorted: Vec<Entry>,
    /// Blobs added since the last merge; disjoint from `sorted`. A blob
    /// found in several packs keeps the first location added.
    recent: HashMap<BlobId, Loc, IdHasherBuilder>,
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

    /// Builds an index from many segments at once (repository open): one
    /// sort of all entries instead of incremental merges.
    pub fn from_segments<'a>(segments: impl IntoIterator<Item = &'a IndexSegment>) -> Self {
        let mut index = Index::new();
        let mut all = Vec::new();
        for segment in segments {
            all.reserve(segment.blob_count());
            for p in &segment.packs {
                let pack = index.pack_position(p);
                all.extend(p.blobs.iter().map(|b| Entry { id: b.id, loc: loc_of(pack, b) }));
            }
        }
        // A stable sort keeps equal ids in the order added, so keeping the
        // first of each id keeps its first location.
        all.sort_by_key(|e| e.id);
        all.dedup_by_key(|e| e.id);
        all.shrink_to_fit();
        index.sorted = all;
        index
    }

    fn pack_position(&mut self, entries: &PackEntries) -> u32 {
        match self.pack_pos.get(&entries.pack) {
            Some(&pos) => pos,
            None => {
                let pos = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
                self.packs.push((entries.pack, entries.kind));
                self.pack_pos.insert(entries.pack, pos);
                pos
            }
        }
    }

    /// Adds one pack's blobs. A blob already present keeps its first
    /// location: a blob stored twice (two backups racing, an interrupted
    /// prune) is the same content either way. A pack added again keeps the
    /// kind it was first added with.
    pub fn add_pack(&mut self, entries: &PackEntries) {
        let pack = self.pack_position(entries);
        for b in &entries.blobs {
            if self.find_sorted(&b.id).is_none() {
                self.recent.entry(b.id).or_insert(loc_of(pack, b));
            }
        }
        if self.recent.len() > MERGE_MIN.max(self.sorted.len() / 8) {
            self.merge();
        }
    }

    /// Adds every pack of a segment.
    pub fn add_segment(&mut self, segment: &IndexSegment) {
        for p in &segment.packs {
            self.add_pack(p);
        }
    }

    /// Moves `recent` into `sorted`, keeping the array exactly sized.
    fn merge(&mut self) {
        let mut fresh: Vec<Entry> = self.recent.drain().map(|(id, loc)| Entry { id, loc }).collect();
        fresh.sort_unstable_by_key(|e| e.id);
        let old = std::mem::take(&mut self.sorted);
        let mut merged = Vec::with_capacity(old.len() + fresh.len());
        let (mut a, mut b) = (old.into_iter().peekable(), fresh.into_iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.id <= y.id => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, _) => b.next(),
            };
            match next {
                Some(e) => merged.push(e),
                None => break,
            }
        }
        self.sorted = merged;
    }

    fn find_sorted(&self, id: &BlobId) -> Option<&Loc> {
        self.sorted.binary_search_by(|e| e.id.cmp(id)).ok().map(|i| &self.sorted[i].loc)
    }

    fn find(&self, id: &BlobId) -> Option<&Loc> {
        self.find_sorted(id).or_else(|| self.recent.get(id))
    }

    fn location(&self, loc: &Loc) -> BlobLocation {
        // `loc.pack` was a valid position in `packs` when stored, and packs are never removed.
        let (pack, kind) = self.packs[loc.pack as usize];
        BlobLocation { pack, kind, offset: loc.offset, stored_len: loc.stored_len, raw_len: loc.raw_len }
    }

    /// Where the blob `id` is stored, if it is indexed.
    pub fn get(&self, id: &BlobId) -> Option<BlobLocation> {
        self.find(id).map(|loc| self.location(loc))
    }

    /// Whether the blob `id` is indexed.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.find(id).is_some()
    }

    /// Number of distinct blobs indexed.
    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Whether no blob is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index holds (tables and arrays, by capacity).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        // A hash table slot is its key and value plus one control byte.
        let slot = |k: usize, v: usize| k + v + 1;
        self.sorted.capacity() * size_of::<Entry>()
            + self.recent.capacity() * slot(size_of::<BlobId>(), size_of::<Loc>())
            + self.packs.capacity() * size_of::<(PackId, BlobKind)>()
            + self.pack_pos.capacity() * slot(size_of::<PackId>(), size_of::<u32>())
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
        let sorted = self.sorted.iter().map(|e| (e.id, self.location(&e.loc)));
        sorted.chain(self.recent.iter().map(|(id, loc)| (*id, self.location(loc))))
    }

    /// Every blob of every pack, grouped by pack (used to rewrite the index
    /// and by check).
    ///
    /// Packs come in the order first added, blobs within a pack by offset.
    /// Only the location the index keeps for each blob is listed, so a pack
    /// whose blobs are all indexed elsewhere is left out: nothing refers to it.
    pub fn to_segment(&self) -> IndexSegment {
        let mut by_pack: Vec<Vec<IndexEntry>> = vec![Vec::new(); self.packs.len()];
        let all = self.sorted.iter().map(|e| (&e.id, &e.loc)).chain(self.recent.iter());
        for (id, loc) in all {
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

fn loc_of(pack: u32, b: &IndexEntry) -> Loc {
    Loc { pack, offset: b.offset, stored_len: b.stored_len, raw_len: b.raw_len }
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
        // A slot of the sorted array holds the id and its Loc; the target is <= 48 bytes.
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }

    #[test]
    fn a_loaded_index_costs_48_bytes_per_blob() {
        let blobs: Vec<IndexEntry> = (0..100_000u32)
            .map(|i| IndexEntry {
                id: BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                offset: i,
                stored_len: 1,
                raw_len: 1,
            })
            .collect();
        let seg = IndexSegment { packs: vec![pack(1, BlobKind::Data, blobs)] };
        let index = Index::from_segments([&seg]);
        assert_eq!(index.len(), 100_000);
        let per_blob = index.memory_bytes() as f64 / index.len() as f64;
        assert!(per_blob <= 48.01, "{per_blob} bytes per blob");
    }

    #[test]
    fn merges_keep_every_blob_findable() {
        let mut index = Index::new();
        let n = (MERGE_MIN * 3) as u32;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let blobs = chunk
                .iter()
                .map(|i| IndexEntry {
                    id: BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                    offset: *i,
                    stored_len: 1,
                    raw_len: 1,
                })
                .collect();
            index.add_pack(&PackEntries {
                pack: PackId(*blake3::hash(&chunk[0].to_be_bytes()).as_bytes()),
                kind: BlobKind::Data,
                blobs,
            });
        }
        assert_eq!(index.len(), n as usize);
        assert!(index.recent.len() <= MERGE_MIN, "merged along the way");
        for i in (0..n).step_by(997) {
            assert_eq!(index.get(&BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes())).unwrap().offset, i);
        }
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
        fn index_matches_model(segments in prop::collection::vec(segment_strategy(), 0..4), probe in any::<u8>(), bulk in any::<bool>()) {
            let index = if bulk {
                Index::from_segments(&segments)
            } else {
                let mut index = Index::new();
                for s in &segments {
                    index.add_segment(s);
                }
                index
            };
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
