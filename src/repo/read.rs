//! The blob read path for many blobs at once: group by pack, read each pack
//! in offset order with nearby blobs coalesced into one ranged read, verify
//! and open every blob. Restore, `cat`, `dump`, the storage node's chunk
//! stream and file route, and prune's repack use it.

use std::collections::HashMap;
use std::sync::Mutex;

use rayon::prelude::*;

use super::{RepoError, Repository};
use crate::backend::ObjectKey;
use crate::blob::IdCheck;
use crate::buffers::READ_BUFFERS;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::pack::{PackError, FRAME_HEADER_LEN};

/// Blobs closer than this in a pack are fetched with one ranged read.
const COALESCE_GAP: u64 = 1 << 20;
/// Largest single ranged read.
const MAX_READ: u64 = 64 << 20;

/// Receives each blob read: its verified plaintext, or why it could not be read.
pub type DeliverBlob<'a> = dyn Fn(&BlobId, Result<&[u8], RepoError>) + Sync + 'a;

/// Receives each blob read with its sealed payload (as stored: the frame
/// without its header) after the frame was fully verified, or why it could
/// not be read (prune's repack, which copies sealed blobs as they are).
pub type DeliverSealed<'a> = dyn FnMut(&BlobId, Result<&[u8], RepoError>) + 'a;

/// Receives each blob's verified frame and its plaintext (the one loop
/// under [`DeliverBlob`] and [`DeliverSealed`]).
type DeliverFrame<'a> = dyn FnMut(&BlobId, Result<(&[u8], Vec<u8>), RepoError>) + 'a;

/// The blobs of one pack to read, sorted by offset.
pub type PackBlobs = (PackId, Vec<(BlobId, BlobLocation)>);

impl Repository {
    /// Groups `ids` by the pack that holds them (packs in id order, blobs in
    /// offset order); ids the index does not know are returned apart.
    /// Duplicates in `ids` are read once.
    pub fn plan_blob_reads(&self, ids: impl IntoIterator<Item = BlobId>) -> (Vec<PackBlobs>, Vec<BlobId>) {
        let index = self.index();
        let mut by_pack: HashMap<PackId, Vec<(BlobId, BlobLocation)>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            match index.get(&id) {
                Some(loc) => by_pack.entry(loc.pack).or_default().push((id, loc)),
                None => missing.push(id),
            }
        }
        let mut packs: Vec<PackBlobs> = by_pack.into_iter().collect();
        packs.sort_by_key(|(p, _)| *p);
        for (_, blobs) in &mut packs {
            blobs.sort_by_key(|(_, l)| l.offset);
        }
        (packs, missing)
    }

    /// Reads every blob of `packs` (from [`Repository::plan_blob_reads`]) and
    /// calls `deliver` with each one's verified plaintext, or with why it
    /// could not be read. Packs are read in parallel, each in offset order;
    /// `deliver` is called from several threads.
    pub fn read_blobs(&self, packs: &[PackBlobs], deliver: &DeliverBlob<'_>) {
        packs.par_iter().for_each(|(pack, blobs)| self.read_pack_blobs(pack, blobs, IdCheck::Rehash, deliver));
    }

    /// [`Repository::read_blobs`] for one pack, on the calling thread, with
    /// the id check `check` asks for ([`IdCheck::ReaderVerifies`] only for
    /// bytes handed to a reader that hashes each blob against its id
    /// itself). For a `deliver` that may block for long (a network client),
    /// which must not hold the shared rayon pool meanwhile.
    pub fn read_pack_blobs(
        &self,
        pack: &PackId,
        blobs: &[(BlobId, BlobLocation)],
        check: IdCheck,
        deliver: &DeliverBlob<'_>,
    ) {
        self.read_frames(pack, blobs, check, &mut |id, r| match r {
            Ok((_, plain)) => deliver(id, Ok(&plain)),
            Err(e) => deliver(id, Err(e)),
        });
    }

    /// Reads `ids` through [`Repository::read_blobs`] and returns each one's
    /// verified plaintext, or why it could not be read (an id the index
    /// lacks: [`RepoError::MissingBlob`]). For callers that want a handful
    /// of blobs at once (`cat`'s window, the mount's chunk cache, `copy`).
    pub fn read_blob_map(&self, ids: impl IntoIterator<Item = BlobId>) -> HashMap<BlobId, Result<Vec<u8>, RepoError>> {
        let (packs, missing) = self.plan_blob_reads(ids);
        let read: Mutex<HashMap<BlobId, Result<Vec<u8>, RepoError>>> = Mutex::default();
        self.read_blobs(&packs, &|id, r| {
            read.lock().expect("read lock").insert(*id, r.map(<[u8]>::to_vec));
        });
        let mut read = read.into_inner().expect("read lock");
        read.extend(missing.into_iter().map(|id| (id, Err(RepoError::MissingBlob(id)))));
        read
    }

    /// Reads the blobs of one pack like [`Repository::read_blobs`], but
    /// hands over each one's sealed payload, once its frame opened (crc,
    /// tag, id): damage is never passed on as good.
    pub fn read_pack_sealed(&self, pack: &PackId, blobs: &[(BlobId, BlobLocation)], deliver: &mut DeliverSealed<'_>) {
        self.read_frames(pack, blobs, IdCheck::Rehash, &mut |id, r| {
            deliver(id, r.map(|(frame, _)| &frame[FRAME_HEADER_LEN..]))
        });
    }

    /// The one loop under both: coalesced ranged reads, each frame opened.
    fn read_frames(
        &self,
        pack: &PackId,
        blobs: &[(BlobId, BlobLocation)],
        check: IdCheck,
        deliver: &mut DeliverFrame<'_>,
    ) {
        for group in coalesce(blobs) {
            let start = u64::from(group[0].1.offset);
            let last = group.last().expect("non-empty group").1;
            let end = last.frame_end();
            // Reused across groups, threads and repositories (a fresh one
            // costs its pages' faults; one per thread would be kept by
            // every thread that ever read).
            let mut bytes = READ_BUFFERS.take();
            if let Err(e) = self.backend.get_range_into(&ObjectKey::Pack(*pack), start, end - start, &mut bytes) {
                let e = RepoError::from(e);
                for (id, _) in group {
                    deliver(id, Err(RepoError::Invalid(format!("reading pack {pack}: {e}"))));
                }
                READ_BUFFERS.give(bytes);
                continue;
            }
            for (id, loc) in group {
                let at = (u64::from(loc.offset) - start) as usize;
                let Some(frame) = bytes.get(at..at + FRAME_HEADER_LEN + loc.stored_len as usize) else {
                    let short = PackError::Format("shorter than the index says");
                    deliver(id, Err(RepoError::Pack { pack: pack.to_hex(), source: short }));
                    continue;
                };
                let at = (u64::from(loc.offset), loc.stored_len, loc.raw_len);
                match self.open_frame_with(id, loc.kind, frame, at, check) {
                    Ok(plain) => deliver(id, Ok((frame, plain))),
                    Err(e) => deliver(id, Err(e)),
                }
            }
            READ_BUFFERS.give(bytes);
        }
    }
}

/// Splits offset-sorted blobs into runs worth one ranged read each.
fn coalesce(blobs: &[(BlobId, BlobLocation)]) -> Vec<&[(BlobId, BlobLocation)]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=blobs.len() {
        let split = i == blobs.len() || {
            let prev = &blobs[i - 1].1;
            let prev_end = prev.frame_end();
            let next = &blobs[i].1;
            let next_end = next.frame_end();
            u64::from(next.offset).saturating_sub(prev_end) > COALESCE_GAP
                || next_end - u64::from(blobs[start].1.offset) > MAX_READ
        };
        if split {
            groups.push(&blobs[start..i]);
            start = i;
        }
    }
    groups
}
