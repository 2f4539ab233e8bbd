//! Writing blobs: dedup, compress + seal, pack, upload, index.
//!
//! A [`Packer`] is shared by the worker threads of one backup (or server
//! upload). `save` hashes a blob, skips it when the index or this session
//! already has it, seals it outside any lock, and appends it to the open pack
//! of its kind. A full pack is handed over a bounded channel to uploader
//! threads, which seal its table, verify it, and store it; the channel bound
//! is what keeps memory flat when storage is slower than the CPU. The first
//! upload error is sticky: every later call fails instead of writing on over
//! a hole. `finish` flushes, waits for every upload, and writes the index
//! segment naming the new packs, after which a snapshot may reference them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::{Backend, BackendError, ObjectKey};
use crate::buffers::PACK_BUFFERS;
use crate::crypto::MasterKey;
use crate::id::{BlobId, BlobKind};
use crate::index::{IndexSegment, PackEntries};
use crate::pack::{self, PackBuilder, PackError};
use crate::repo::{RepoError, Repository};

/// Packs per index segment: bounds a segment's size (~45 bytes per blob).
pub const PACKS_PER_SEGMENT: usize = 256;

/// Why a pack upload failed. The first failure is sticky: the packer
/// refuses all further work with it ([`RepoError::Upload`]).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Storing the pack failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The pack's table, read back before the upload, does not decode.
    #[error("pack self-check: {0}")]
    SelfCheck(PackError),
    /// The pack's table, read back before the upload, is not what was written.
    #[error("pack self-check: table does not match")]
    TableMismatch,
    /// An uploader thread panicked, so nothing more can be uploaded.
    #[error("the pack uploaders stopped")]
    Stopped,
}

/// Counters of what a packer wrote.
#[derive(Debug, Default)]
pub struct PackerStats {
    /// Blobs stored (not already in the repository).
    pub blobs_new: AtomicU64,
    /// Their bytes before compression and encryption.
    pub bytes_new: AtomicU64,
    /// Their bytes as stored.
    pub bytes_stored: AtomicU64,
    /// Packs written.
    pub packs: AtomicU64,
}

type Shared<T> = Arc<Mutex<T>>;

thread_local! {
    static SEAL_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Blob writer for one session; see the module docs.
pub struct Packer<'r> {
    repo: &'r Repository,
    open: [Mutex<Option<PackBuilder>>; 2],
    claimed: Mutex<HashSet<BlobId>>,
    tx: Option<SyncSender<PackBuilder>>,
    workers: Vec<JoinHandle<()>>,
    written: Shared<Vec<PackEntries>>,
    error: Shared<Option<Arc<UploadError>>>,
    stats: Arc<PackerStats>,
    /// Count and seal blobs (for the sizes) but write nothing.
    dry_run: bool,
}

impl<'r> Packer<'r> {
    /// A packer with `uploaders` upload threads and at most `uploaders + 1`
    /// finished packs waiting in memory.
    pub fn new(repo: &'r Repository, uploaders: usize) -> Self {
        Packer::with_stats(repo, uploaders, Arc::default(), false)
    }

    /// [`Packer::new`] counting into `stats` (a [`WriteSession`](crate::repo::WriteSession)
    /// counts over every packer it makes). With `dry_run` it dedups,
    /// compresses and seals blobs and counts them, but writes no pack and no
    /// index segment (a backup's `--dry-run`).
    pub(crate) fn with_stats(repo: &'r Repository, uploaders: usize, stats: Arc<PackerStats>, dry_run: bool) -> Self {
        let uploaders = uploaders.max(1);
        let (tx, rx) = sync_channel::<PackBuilder>(1);
        let rx = Arc::new(Mutex::new(rx));
        let written: Shared<Vec<PackEntries>> = Arc::default();
        let error: Shared<Option<Arc<UploadError>>> = Arc::default();
        let workers = (0..uploaders)
            .map(|i| {
                let ctx = Uploader {
                    rx: rx.clone(),
                    backend: repo.backend().clone(),
                    key: repo.master_key().clone(),
                    written: written.clone(),
                    error: error.clone(),
                    stats: stats.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || ctx.run())
                    .expect("spawn uploader")
            })
            .collect();
        Packer {
            repo,
            open: [Mutex::new(None), Mutex::new(None)],
            claimed: Mutex::default(),
            tx: Some(tx),
            workers,
            written,
            error,
            stats,
            dry_run,
        }
    }

    /// Counters, shared so a progress display can read them.
    pub fn stats(&self) -> Arc<PackerStats> {
        self.stats.clone()
    }

    fn check_error(&self) -> Result<(), RepoError> {
        match &*self.error.lock().expect("error lock") {
            Some(e) => Err(RepoError::Upload(e.clone())),
            None => Ok(()),
        }
    }

    /// True when the blob is already stored or claimed by this session;
    /// otherwise claims it, so exactly one caller stores it.
    fn is_known_or_claim(&self, id: &BlobId) -> bool {
        if self.repo.index().contains(id) {
            return true;
        }
        !self.claimed.lock().expect("claim lock").insert(*id)
    }

    /// Stores a blob unless it exists; returns its id and whether it was new.
    ///
    /// Callable from many threads at once. Blocks while the upload queue is
    /// full (that is the backpressure that bounds memory). After any upload
    /// of this packer failed, fails with [`RepoError::Upload`] (sticky). A
    /// blob that is new is durable only after [`Packer::finish`].
    pub fn save(&self, kind: BlobKind, plaintext: &[u8]) -> Result<(BlobId, bool), RepoError> {
        let id = self.repo.blob_id(plaintext);
        let new = self.save_named(kind, id, plaintext)?;
        Ok((id, new))
    }

    /// Stores a blob whose id the caller has already computed and checked
    /// (`id == repo.blob_id(plaintext)`: the server verifies every upload
    /// before queueing it), so the hot upload path hashes each chunk once.
    /// Returns whether it was new.
    ///
    /// # Panics
    /// In debug builds, when `id` is not the id of `plaintext`. A release
    /// build stores such a blob, and every later read of it fails
    /// verification: the caller must check.
    pub fn save_named(&self, kind: BlobKind, id: BlobId, plaintext: &[u8]) -> Result<bool, RepoError> {
        debug_assert!(self.repo.blob_id(plaintext) == id, "save_named with a wrong id");
        if self.is_known_or_claim(&id) {
            return Ok(false);
        }
        // One sealing buffer per thread, taken out of its cell for the call
        // (a rayon worker may run another save while this one is in flight;
        // that one then just allocates its own).
        let mut stored = SEAL_BUFFER.take();
        self.repo.codec().seal_into(kind, &id, plaintext, &mut stored);
        let added = self.add_sealed(kind, id, plaintext.len() as u32, &stored);
        SEAL_BUFFER.set(stored);
        added.map(|()| true)
    }

    /// Stores a blob that is already sealed (prune copying it out of a pack
    /// it repacks), even though the index knows it elsewhere. Returns whether
    /// it was stored: a blob already saved in this session is not stored twice.
    pub fn save_stored(&self, kind: BlobKind, id: BlobId, raw_len: u32, stored: &[u8]) -> Result<bool, RepoError> {
        if !self.claimed.lock().expect("claim lock").insert(id) {
            return Ok(false);
        }
        self.add_sealed(kind, id, raw_len, stored)?;
        Ok(true)
    }

    fn add_sealed(&self, kind: BlobKind, id: BlobId, raw_len: u32, stored: &[u8]) -> Result<(), RepoError> {
        self.check_error()?;
        self.stats.blobs_new.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_new.fetch_add(u64::from(raw_len), Ordering::Relaxed);
        self.stats.bytes_stored.fetch_add(stored.len() as u64, Ordering::Relaxed);
        if self.dry_run {
            return Ok(());
        }
        let pack_size = self.repo.config().pack_size as usize;
        let full = {
            let mut slot = self.open[kind as usize - 1].lock().expect("pack lock");
            let builder = slot.get_or_insert_with(|| {
                // Buffers of stored packs are reused (`buffers::PACK_BUFFERS`).
                let buf = PACK_BUFFERS.take();
                PackBuilder::with_buffer(kind, buf, pack_size + pack_size / 8)
            });
            builder.add(id, raw_len, stored);
            if builder.len() >= pack_size {
                slot.take()
            } else {
                None
            }
        };
        match full {
            Some(b) => self.send(b),
            None => Ok(()),
        }
    }

    fn send(&self, builder: PackBuilder) -> Result<(), RepoError> {
        let tx = self.tx.as_ref().expect("sender lives until finish");
        if tx.send(builder).is_err() {
            self.check_error()?;
            return Err(RepoError::Upload(Arc::new(UploadError::Stopped)));
        }
        Ok(())
    }

    /// Flushes the open packs, waits for every upload and writes the index
    /// segments naming them. When this returns Ok, every blob saved is durable
    /// and indexed.
    pub fn finish(mut self) -> Result<Vec<PackEntries>, RepoError> {
        let mut result = Ok(());
        for slot in &self.open {
            let pending = slot.lock().expect("pack lock").take();
            if let Some(b) = pending.filter(|b| !b.is_empty()) {
                if let Err(e) = self.send(b) {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                *self.error.lock().expect("error lock") = Some(Arc::new(UploadError::Stopped));
            }
        }
        result?;
        self.check_error()?;
        let written = std::mem::take(&mut *self.written.lock().expect("written lock"));
        for packs in written.chunks(PACKS_PER_SEGMENT) {
            self.repo.save_index_segment(&IndexSegment { packs: packs.to_vec() })?;
        }
        Ok(written)
    }
}

impl Drop for Packer<'_> {
    fn drop(&mut self) {
        // An abandoned packer (error path) still stops its threads.
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct Uploader {
    rx: Arc<Mutex<Receiver<PackBuilder>>>,
    backend: Arc<dyn Backend>,
    key: MasterKey,
    written: Shared<Vec<PackEntries>>,
    error: Shared<Option<Arc<UploadError>>>,
    stats: Arc<PackerStats>,
}

impl Uploader {
    fn run(self) {
        loop {
            let next = self.rx.lock().expect("rx lock").recv();
            let Ok(builder) = next else { return };
            if self.error.lock().expect("error lock").is_some() {
                continue; // drain without writing after a failure
            }
            if let Err(e) = self.upload(builder) {
                tracing::error!("pack upload failed: {e}");
                self.error.lock().expect("error lock").get_or_insert(Arc::new(e));
            }
        }
    }

    fn upload(&self, builder: PackBuilder) -> Result<(), UploadError> {
        let pack = builder.finish(&self.key);
        // Verify what we are about to store: the table must decode to what we
        // meant to write (restic's "re-read before upload").
        let table = pack::read_table(&self.key, &pack.bytes).map_err(UploadError::SelfCheck)?;
        if table.blobs != pack.entries.blobs {
            return Err(UploadError::TableMismatch);
        }
        self.backend.put(&ObjectKey::Pack(pack.id), &pack.bytes)?;
        self.stats.packs.fetch_add(1, Ordering::Relaxed);
        self.written.lock().expect("written lock").push(pack.entries);
        PACK_BUFFERS.give(pack.bytes);
        Ok(())
    }
}
