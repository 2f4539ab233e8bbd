//! Listing, fetching and removing the repository's objects for the stages
//! that manage them (check, prune, repair, forget, stats), so that they go
//! through [`Repository`] rather than the raw backend and the pack format.

use std::collections::HashMap;

use super::{RepoError, Repository};
use crate::backend::ObjectKey;
use crate::id::{IndexId, PackId, SnapshotId};
use crate::index::PackEntries;
use crate::pack::{self, TRAILER_LEN};

impl Repository {
    /// Every pack in storage with its size.
    pub fn pack_sizes(&self) -> Result<HashMap<PackId, u64>, RepoError> {
        Ok(crate::backend::pack_sizes(self.backend.as_ref())?)
    }

    /// The ids of every index segment in storage, ascending.
    pub fn index_segment_ids(&self) -> Result<Vec<IndexId>, RepoError> {
        Ok(crate::backend::index_ids(self.backend.as_ref())?)
    }

    /// The ids of every snapshot in storage, ascending (readable or not).
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>, RepoError> {
        Ok(crate::backend::snapshot_ids(self.backend.as_ref())?)
    }

    /// A whole pack, as stored (not verified: `check` reports what is wrong with it).
    pub fn read_pack(&self, pack: &PackId) -> Result<Vec<u8>, RepoError> {
        Ok(self.backend.get(&ObjectKey::Pack(*pack))?)
    }

    /// A pack's size in storage.
    pub fn pack_size(&self, pack: &PackId) -> Result<u64, RepoError> {
        Ok(self.backend.size(&ObjectKey::Pack(*pack))?)
    }

    /// Reads a pack's own blob table with two ranged reads (trailer, table);
    /// `size` is the pack's size in storage.
    pub fn read_pack_table(&self, pack: &PackId, size: u64) -> Result<PackEntries, RepoError> {
        let key = ObjectKey::Pack(*pack);
        let damaged = |source| RepoError::Pack { pack: pack.to_hex(), source };
        if size < (pack::HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(damaged(pack::PackError::Format("shorter than header and trailer")));
        }
        let trailer = self.backend.get_range(&key, size - TRAILER_LEN as u64, TRAILER_LEN as u64)?;
        let (table_len, crc) = pack::parse_trailer(&trailer, size).map_err(damaged)?;
        let start = size - TRAILER_LEN as u64 - u64::from(table_len);
        let sealed = self.backend.get_range(&key, start, u64::from(table_len))?;
        let table = pack::decode_table(&self.key, &sealed, crc, size).map_err(damaged)?;
        Ok(PackEntries { pack: *pack, kind: table.kind, blobs: table.blobs })
    }

    /// Removes a snapshot: a `forget`. It deletes no data.
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self.backend.remove(&ObjectKey::Snapshot(*id))?)
    }

    /// Removes an index segment. Only prune and `repair index` do, after the
    /// segments replacing it are durable, under an exclusive lock.
    pub fn remove_index_segment(&self, id: &IndexId) -> Result<(), RepoError> {
        Ok(self.backend.remove(&ObjectKey::Index(*id))?)
    }

    /// Removes a pack. Only prune does, after every segment naming it is
    /// gone, under an exclusive lock.
    pub fn remove_pack(&self, pack: &PackId) -> Result<(), RepoError> {
        Ok(self.backend.remove(&ObjectKey::Pack(*pack))?)
    }
}
