//! The blob index: which pack holds each blob, and where in it.
//!
//! Built when a repository is opened, from every index segment, and
//! extended as packs are written; backup asks it whether a chunk is already
//! stored, restore and check ask where a blob lives. A repository can hold
//! tens of millions of blobs, so the in-memory form is compact: the bulk of
//! the index is one sorted array of 46-byte entries, bucketed by the first
//! two bytes of the id. A table of 65,537 offsets says where each bucket
//! starts, so an entry stores only the other 30 bytes of its id and a
//! 16-byte location, byte-packed with no padding, and a lookup bisects only
//! its bucket. Blobs added since the last merge sit in a small hash table
//! that is merged into the array when it grows past a fraction of it. Pack
//! ids and kinds are stored once per pack, not once per blob, and found
//! through a sorted array of pack positions (4 bytes a pack) rather than a
//! hash table (about 42).

pub mod segment;

pub use segment::{IndexEntry, IndexSegment, PackEntries, SegmentError};

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use crate::id::{BlobId, BlobKind, PackId};

/// Where a blob is: its pack, the pack's kind, and its place in the pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    /// The pack holding the blob.
    pub pack: PackId,
    /// The blob's kind (every blob of a pack has the pack's kind).
    pub kind: BlobKind,
    /// Byte offset of the blob's frame in the pack.
    pub offset: u32,
    /// Bytes the blob occupies in the pack (compressed and sealed).
    pub stored_len: u32,
    /// Bytes of the blob's plaintext.
    pub raw_len: u32,
}

impl BlobLocation {
    /// The byte offset just past the blob's frame in its pack.
    pub fn frame_end(&self) -> u64 {
        u64::from(self.offset) + crate::pack::frame_len(self.stored_len)
    }
}

/// A blob's location as stored in the table: the pack is a position in
/// [`Index::packs`], so a location is 16 bytes instead of 45.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
}

impl Loc {
    fn to_bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        for (bytes, word) in out.chunks_exact_mut(4).zip([self.pack, self.offset, self.stored_len, self.raw_len]) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    fn from_bytes(b: &[u8; 16]) -> Loc {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Loc { pack: word(0), offset: word(4), stored_len: word(8), raw_len: word(12) }
    }
}

/// Buckets of the sorted array: one per value of an id's first two bytes.
const BUCKETS: usize = 1 << 16;

/// The bucket of `id`: its first two bytes, big-endian, so that buckets in
/// order and entries in order within them are the ids in order.
fn bucket(id: &BlobId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]]))
}

/// One slot of the sorted array. The id's first two bytes are its bucket's
/// number, so only the other 30 are stored; the location is byte-packed.
/// All fields are byte arrays, so the slot is 46 bytes with alignment 1 and
/// no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// Bytes 2..32 of the id.
    tail: [u8; 30],
    /// [`Loc::to_bytes`].
    loc: [u8; 16],
}

impl Entry {
    const ZERO: Entry = Entry { tail: [0; 30], loc: [0; 16] };

    fn new(id: &BlobId, loc: Loc) -> Entry {
        let mut tail = [0; 30];
        tail.copy_from_slice(&id.0[2..]);
        Entry { tail, loc: loc.to_bytes() }
    }

    /// The full id, given the number of the bucket the entry is in.
    fn id(&self, bucket: usize) -> BlobId {
        let mut id = [0; 32];
        id[..2].copy_from_slice(&[(bucket >> 8) as u8, bucket as u8]);
        id[2..].copy_from_slice(&self.tail);
        BlobId(id)
    }

    fn loc(&self) -> Loc {
        Loc::from_bytes(&self.loc)
    }
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

/// Packs added since the last pack merge are merged into the sorted pack
/// order once they number more than this, or more than an eighth of it.
const PACK_MERGE_MIN: usize = 1 << 12;

/// The in-memory blob index.
#[derive(Default)]
pub struct Index {
    /// Where each bucket of `sorted` starts, plus its end: bucket `b` is
    /// `sorted[buckets[b]..buckets[b + 1]]`. Empty while `sorted` is, so an
    /// empty index costs nothing; otherwise `BUCKETS + 1` offsets.
    buckets: Vec<u32>,
    /// Most blobs, sorted by id, each id once, bucketed by `buckets`.
    sorted: Vec<Entry>,
    /// Blobs added since the last merge; disjoint from `sorted`. A blob
    /// found in several packs keeps the first location added.
    recent: HashMap<BlobId, Loc, IdHasherBuilder>,
    /// Every pack added, in the order first added; [`Loc::pack`] indexes this.
    packs: Vec<(PackId, BlobKind)>,
    /// Positions in `packs` of the packs added before the last pack merge,
    /// sorted by pack id, so that a pack added twice is stored once.
    pack_order: Vec<u32>,
    /// Positions of the packs added since; disjoint from `pack_order`.
    recent_packs: HashMap<PackId, u32, IdHasherBuilder>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an index from many segments at once (repository open): each
    /// blob is placed straight into its bucket, and each bucket sorted on
    /// its own, instead of incremental merges or one sort of full ids.
    pub fn from_segments<'a>(segments: impl IntoIterator<Item = &'a IndexSegment>) -> Self {
        let packs: Vec<&PackEntries> = segments.into_iter().flat_map(|s| &s.packs).collect();
        let mut index = Index::new();
        // First pass: number the packs and count each bucket's blobs (in
        // the slot after it, so that a running sum gives the starts).
        let mut positions = Vec::with_capacity(packs.len());
        let mut starts = vec![0u32; BUCKETS + 1];
        let mut total = 0usize;
        for p in &packs {
            positions.push(index.pack_position(p));
            total += p.blobs.len();
            for b in &p.blobs {
                starts[bucket(&b.id) + 1] += 1;
            }
        }
        index.merge_packs();
        index.packs.shrink_to_fit();
        if total == 0 {
            return index;
        }
        u32::try_from(total).expect("fewer than 2^32 blobs");
        for b in 0..BUCKETS {
            starts[b + 1] += starts[b];
        }
        // Second pass: each blob into the next free slot of its bucket, in
        // the order added.
        let mut next = starts.clone();
        let mut all = vec![Entry::ZERO; total];
        for (p, &pack) in packs.iter().zip(&positions) {
            for b in &p.blobs {
                let k = bucket(&b.id);
                all[next[k] as usize] = Entry::new(&b.id, loc_of(pack, b));
                next[k] += 1;
            }
        }
        // Sort each bucket and keep the first of each id, moving the kept
        // entries down over the dropped ones. A stable sort keeps equal ids
        // in the order added, so the first kept is the first location.
        let mut kept = 0;
        for b in 0..BUCKETS {
            let (start, end) = (starts[b] as usize, starts[b + 1] as usize);
            // `starts[b]` is read for the last time here: it becomes the start after compaction.
            starts[b] = kept as u32;
            all[start..end].sort_by_key(|e| e.tail);
            for i in start..end {
                // Slots from `start` on are untouched by the compaction so far (`kept <= i`).
                if i == start || all[i].tail != all[i - 1].tail {
                    all[kept] = all[i];
                    kept += 1;
                }
            }
        }
        starts[BUCKETS] = kept as u32;
        all.truncate(kept);
        all.shrink_to_fit();
        index.buckets = starts;
        index.sorted = all;
        index
    }

    fn pack_position(&mut self, entries: &PackEntries) -> u32 {
        if let Some(pos) = self.find_pack(&entries.pack) {
            return pos;
        }
        let pos = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        self.packs.push((entries.pack, entries.kind));
        self.recent_packs.insert(entries.pack, pos);
        pos
    }

    fn find_pack(&self, pack: &PackId) -> Option<u32> {
        let sorted = self.pack_order.binary_search_by(|&pos| self.packs[pos as usize].0.cmp(pack));
        sorted.ok().map(|i| self.pack_order[i]).or_else(|| self.recent_packs.get(pack).copied())
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
        if self.recent_packs.len() > PACK_MERGE_MIN.max(self.pack_order.len() / 8) {
            self.merge_packs();
        }
    }

    /// Adds every pack of a segment.
    pub fn add_segment(&mut self, segment: &IndexSegment) {
        for p in &segment.packs {
            self.add_pack(p);
        }
    }

    /// Moves `recent` into `sorted`, keeping the array exactly sized and
    /// giving the emptied table's memory back.
    fn merge(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let mut fresh: Vec<(usize, Entry)> =
            std::mem::take(&mut self.recent).into_iter().map(|(id, loc)| (bucket(&id), Entry::new(&id, loc))).collect();
        fresh.sort_unstable_by(|(a, x), (b, y)| (a, &x.tail).cmp(&(b, &y.tail)));
        let mut merged = Vec::with_capacity(self.sorted.len() + fresh.len());
        let mut buckets = Vec::with_capacity(BUCKETS + 1);
        let mut fresh = &fresh[..];
        for b in 0..BUCKETS {
            buckets.push(u32::try_from(merged.len()).expect("fewer than 2^32 blobs"));
            let here = fresh.partition_point(|&(k, _)| k == b);
            let old = self.bucket_entries(b).iter().copied();
            merge_sorted(old, fresh[..here].iter().map(|&(_, e)| e), |x, y| x.tail < y.tail, &mut merged);
            fresh = &fresh[here..];
        }
        buckets.push(u32::try_from(merged.len()).expect("fewer than 2^32 blobs"));
        self.buckets = buckets;
        self.sorted = merged;
    }

    /// Moves `recent_packs` into `pack_order`, keeping it exactly sized.
    fn merge_packs(&mut self) {
        let packs = &self.packs;
        let mut fresh: Vec<u32> = std::mem::take(&mut self.recent_packs).into_values().collect();
        fresh.sort_unstable_by(|&a, &b| packs[a as usize].0.cmp(&packs[b as usize].0));
        let mut merged = Vec::with_capacity(self.pack_order.len() + fresh.len());
        let less = |&a: &u32, &b: &u32| packs[a as usize].0 < packs[b as usize].0;
        merge_sorted(self.pack_order.iter().copied(), fresh.into_iter(), less, &mut merged);
        self.pack_order = merged;
    }

    /// The sorted entries whose ids start with the bucket number `b`.
    fn bucket_entries(&self, b: usize) -> &[Entry] {
        match self.buckets.get(b..b + 2) {
            Some(&[start, end]) => &self.sorted[start as usize..end as usize],
            _ => &[],
        }
    }

    fn find_sorted(&self, id: &BlobId) -> Option<Loc> {
        let entries = self.bucket_entries(bucket(id));
        let i = entries.binary_search_by(|e| e.tail[..].cmp(&id.0[2..])).ok()?;
        Some(entries[i].loc())
    }

    fn find(&self, id: &BlobId) -> Option<Loc> {
        self.find_sorted(id).or_else(|| self.recent.get(id).copied())
    }

    fn location(&self, loc: Loc) -> BlobLocation {
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
        // std's hash tables keep at most 7/8 of their buckets full, and a
        // bucket is a key-value pair and one control byte.
        fn table<K, V>(capacity: usize) -> usize {
            capacity.div_ceil(7) * 8 * (size_of::<(K, V)>() + 1)
        }
        self.buckets.capacity() * size_of::<u32>()
            + self.sorted.capacity() * size_of::<Entry>()
            + table::<BlobId, Loc>(self.recent.capacity())
            + self.packs.capacity() * size_of::<(PackId, BlobKind)>()
            + self.pack_order.capacity() * size_of::<u32>()
            + table::<PackId, u32>(self.recent_packs.capacity())
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

    /// Every indexed blob with its location as stored, in no particular order.
    fn locs(&self) -> impl Iterator<Item = (BlobId, Loc)> + '_ {
        let sorted =
            self.buckets.windows(2).enumerate().flat_map(move |(b, w)| {
                self.sorted[w[0] as usize..w[1] as usize].iter().map(move |e| (e.id(b), e.loc()))
            });
        sorted.chain(self.recent.iter().map(|(id, loc)| (*id, *loc)))
    }

    /// Every indexed blob with its location, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (BlobId, BlobLocation)> + '_ {
        self.locs().map(|(id, loc)| (id, self.location(loc)))
    }

    /// Every blob of every pack, grouped by pack (used to rewrite the index
    /// and by check).
    ///
    /// Packs come in the order first added, blobs within a pack by offset.
    /// Only the location the index keeps for each blob is listed, so a pack
    /// whose blobs are all indexed elsewhere is left out: nothing refers to it.
    pub fn to_segment(&self) -> IndexSegment {
        let mut by_pack: Vec<Vec<IndexEntry>> = vec![Vec::new(); self.packs.len()];
        for (id, loc) in self.locs() {
            by_pack[loc.pack as usize].push(IndexEntry {
                id,
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

/// Appends the merge of two sorted sequences to `out`; of equal items, those
/// of `a` come first.
fn merge_sorted<T>(
    a: impl Iterator<Item = T>,
    b: impl Iterator<Item = T>,
    less: impl Fn(&T, &T) -> bool,
    out: &mut Vec<T>,
) {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if less(y, x) => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(item) => out.push(item),
            None => break,
        }
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
        // A slot of the sorted array holds 30 bytes of the id and its Loc,
        // byte-packed: no padding, whatever the field order.
        assert_eq!(std::mem::size_of::<Entry>(), 46);
        assert_eq!(std::mem::align_of::<Entry>(), 1);
    }

    /// Ids that are uniformly random, as keyed BLAKE3 makes them.
    fn random_id(i: u32) -> BlobId {
        BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn a_loaded_index_costs_under_48_bytes_per_blob() {
        // 1M blobs in packs of 32, as real 16 MiB packs hold: enough to
        // amortise the fixed 256 KiB bucket table (2.6 bytes a blob at
        // 100,000 blobs, 0.26 at 1M), and the pack table at its real share.
        let n = 1_000_000u32;
        let packs = (0..n / 32)
            .map(|p| PackEntries {
                pack: PackId(*blake3::hash(&p.to_be_bytes()).as_bytes()),
                kind: BlobKind::Data,
                blobs: (p * 32..(p + 1) * 32)
                    .map(|i| IndexEntry { id: random_id(i), offset: i, stored_len: 1, raw_len: 1 })
                    .collect(),
            })
            .collect();
        let index = Index::from_segments([&IndexSegment { packs }]);
        assert_eq!(index.len(), n as usize);
        let per_blob = index.memory_bytes() as f64 / index.len() as f64;
        // 46 (entry) + 0.26 (buckets) + 33 / 32 (pack id and kind) + 4 / 32 (pack order).
        assert!(per_blob <= 47.5, "{per_blob} bytes per blob");
        assert_eq!(index.get(&random_id(12345)).unwrap().offset, 12345);
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

    /// Ids that collide on purpose where the layout splits them: a few
    /// first-two-byte prefixes (the bucket edges 0x0000 and 0xffff among
    /// them) times a few 30-byte tails, so ids share buckets, and equal
    /// tails recur in different buckets.
    fn clashing_id() -> impl Strategy<Value = BlobId> {
        let prefix = prop_oneof![
            Just(0x0000u16),
            Just(0x0001),
            Just(0x00ff),
            Just(0x0100),
            Just(0x8000),
            Just(0xfffe),
            Just(0xffff),
            any::<u16>()
        ];
        let byte = prop_oneof![Just(0x00u8), Just(0x01), Just(0x80), Just(0xff)];
        (prefix, byte.clone(), byte).prop_map(|(prefix, first, last)| {
            let mut id = [0x5a; 32];
            id[..2].copy_from_slice(&prefix.to_be_bytes());
            id[2] = first;
            id[31] = last;
            BlobId(id)
        })
    }

    fn clashing_pack() -> impl Strategy<Value = PackEntries> {
        let entry = (clashing_id(), any::<u32>(), 1..=u32::MAX, any::<u32>())
            .prop_map(|(id, offset, stored_len, raw_len)| IndexEntry { id, offset, stored_len, raw_len });
        let kind = prop_oneof![Just(BlobKind::Data), Just(BlobKind::Tree)];
        // Few pack ids, so packs come back, with the other kind too.
        (0u8..8, kind, prop::collection::vec(entry, 0..10)).prop_map(|(id, kind, blobs)| PackEntries {
            pack: PackId([id; 32]),
            kind,
            blobs,
        })
    }

    #[derive(Clone, Debug)]
    enum Op {
        AddPack(PackEntries),
        AddSegment(IndexSegment),
        /// Merges happen on their own only past 64 Ki blobs (4 Ki packs).
        Merge,
        MergePacks,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => clashing_pack().prop_map(Op::AddPack),
            1 => prop::collection::vec(clashing_pack(), 0..4).prop_map(|packs| Op::AddSegment(IndexSegment { packs })),
            1 => Just(Op::Merge),
            1 => Just(Op::MergePacks),
        ]
    }

    /// What the index must answer, kept the plain way: first insert wins,
    /// for blobs and for the kind of a pack.
    #[derive(Default)]
    struct Model {
        blobs: HashMap<BlobId, BlobLocation>,
        kinds: HashMap<PackId, BlobKind>,
        packs: Vec<(PackId, BlobKind)>,
    }

    impl Model {
        fn add_pack(&mut self, p: &PackEntries) {
            let kind = match self.kinds.get(&p.pack) {
                Some(&kind) => kind,
                None => {
                    self.kinds.insert(p.pack, p.kind);
                    self.packs.push((p.pack, p.kind));
                    p.kind
                }
            };
            for b in &p.blobs {
                self.blobs.entry(b.id).or_insert(BlobLocation {
                    pack: p.pack,
                    kind,
                    offset: b.offset,
                    stored_len: b.stored_len,
                    raw_len: b.raw_len,
                });
            }
        }
    }

    proptest! {
        #[test]
        fn operations_match_model(
            loaded in prop::collection::vec(prop::collection::vec(clashing_pack(), 0..6), 0..3),
            ops in prop::collection::vec(op(), 0..24),
            probes in prop::collection::vec(clashing_id(), 0..16),
        ) {
            let loaded: Vec<IndexSegment> = loaded.into_iter().map(|packs| IndexSegment { packs }).collect();
            let mut index = Index::from_segments(&loaded);
            let mut model = Model::default();
            loaded.iter().flat_map(|s| &s.packs).for_each(|p| model.add_pack(p));
            for op in &ops {
                match op {
                    Op::AddPack(p) => {
                        index.add_pack(p);
                        model.add_pack(p);
                    }
                    Op::AddSegment(s) => {
                        index.add_segment(s);
                        s.packs.iter().for_each(|p| model.add_pack(p));
                    }
                    Op::Merge => index.merge(),
                    Op::MergePacks => index.merge_packs(),
                }
                for id in model.blobs.keys().chain(&probes) {
                    prop_assert_eq!(index.get(id), model.blobs.get(id).copied(), "{:?} after {:?}", id, op);
                    prop_assert_eq!(index.contains(id), model.blobs.contains_key(id));
                }
                prop_assert_eq!(index.len(), model.blobs.len());
            }
            let got: HashMap<_, _> = index.iter().collect();
            prop_assert_eq!(got.len(), index.len(), "iter lists each blob once");
            prop_assert_eq!(&got, &model.blobs);
            prop_assert_eq!(index.packs().collect::<Vec<_>>(), model.packs);
            let rebuilt = Index::from_segments([&index.to_segment()]);
            prop_assert_eq!(rebuilt.iter().collect::<HashMap<_, _>>(), model.blobs);
        }
    }
}
