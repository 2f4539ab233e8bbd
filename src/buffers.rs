//! Large byte buffers kept for reuse, process-wide.
//!
//! Packs (up to 18 MiB), ranged pack reads (up to 64 MiB) and a storage
//! node's upload bodies (8 MiB) are written into buffers that are expensive to make fresh (every page is faulted in
//! and zeroed: 5% of a backup's CPU when each pack had a new one) and
//! expensive to keep (a storage node serves many tenants and restores at
//! once). Each kind has one pool shared by every repository in the process:
//! a buffer is taken, used, and given back, and the pool keeps at most a
//! few, so what is held between uses does not grow with tenants, threads
//! or concurrent restores; what is in use is bounded by their callers.

use std::sync::Mutex;

/// Spare buffers of one kind.
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` spare buffers.
    pub const fn new(keep: usize) -> Self {
        BufferPool { spare: Mutex::new(Vec::new()), keep }
    }

    /// A spare buffer (emptied), or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.spare.lock().expect("buffer pool lock").pop().unwrap_or_default()
    }

    /// Returns `buf` for reuse; dropped if the pool has enough spares.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        let mut spare = self.spare.lock().expect("buffer pool lock");
        if spare.len() < self.keep {
            spare.push(buf);
        }
    }

    /// Spare buffers held now.
    #[cfg(test)]
    fn spares(&self) -> usize {
        self.spare.lock().expect("buffer pool lock").len()
    }
}

/// Pack buffers: while a packer runs, at most two open packs, one queued
/// and one per upload thread exist, so a few spares are all the reuse there
/// is; a storage node's tenants share them.
pub static PACK_BUFFERS: BufferPool = BufferPool::new(4);

/// Ranged pack reads of the blob read path (`repo/read.rs`): one in use
/// per reading thread; spares for the cores' worth of readers.
pub static READ_BUFFERS: BufferPool = BufferPool::new(4);

/// Upload bodies on a storage node (bundles up to 8 MiB, single chunks),
/// from the request to the end of their sealing: the upload buffer
/// (`max_upload_buffer_mib`) bounds the declared bytes in use; a reused
/// buffer may be larger than the body it holds, by at most these spares.
pub static UPLOAD_BUFFERS: BufferPool = BufferPool::new(4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_its_spares_and_hands_them_back_empty() {
        let pool = BufferPool::new(2);
        assert_eq!(pool.take().capacity(), 0);
        for _ in 0..3 {
            pool.give(vec![7u8; 1000]);
        }
        assert_eq!(pool.spares(), 2);
        let reused = pool.take();
        assert!(reused.is_empty() && reused.capacity() >= 1000);
        pool.give(Vec::new());
        assert_eq!(pool.spares(), 1);
    }
}
