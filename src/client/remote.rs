//! Chunks of a snapshot fetched from the storage node for a restore: in the
//! node's pack order, in batches, several batches in flight, each chunk
//! checked against its id (keyed BLAKE3) before the restore writes it.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Mutex;

use super::{ClientError, Http};
use crate::api::{ChunkReadRequest, PlanChunk, CHUNK_FRAME_HEADER, MAX_CHUNK_ERROR, MAX_CHUNK_READ};
use crate::crypto::IdKey;
use crate::id::BlobId;
use crate::restore::{ChunkSource, DeliverChunk};

/// Plaintext bytes asked for in one request.
const BATCH_BYTES: u64 = 16 << 20;
/// Requests in flight at once.
const IN_FLIGHT: usize = 4;

/// A snapshot's chunks on a storage node.
pub struct RemoteChunks {
    pub(super) http: Http,
    pub(super) token: String,
    pub(super) snapshot: String,
    pub(super) id_key: IdKey,
    /// Every chunk of the plan with its length, in the node's read order.
    pub(super) order: Vec<PlanChunk>,
    pub(super) lens: HashMap<BlobId, u32>,
}

impl RemoteChunks {
    /// Chunks in the node's order, with lengths, from a restore plan.
    pub fn new(http: Http, token: String, snapshot: String, id_key: IdKey, order: Vec<PlanChunk>) -> RemoteChunks {
        let lens = order.iter().map(|c| (c.id, c.len)).collect();
        RemoteChunks { http, token, snapshot, id_key, order, lens }
    }

    /// Fetches one batch and delivers each chunk; returns the ids it could
    /// not deliver because the transfer failed.
    fn fetch_batch(&self, batch: &[PlanChunk], deliver: &DeliverChunk<'_>) -> Result<(), (ClientError, Vec<BlobId>)> {
        let mut pending: HashSet<BlobId> = batch.iter().map(|c| c.id).collect();
        let req = ChunkReadRequest { chunks: batch.iter().map(|c| c.id).collect() };
        let path = format!("/v1/snapshots/{}/chunks", self.snapshot);
        let started = std::time::Instant::now();
        let read = self.read_stream(&path, &req, &mut pending, deliver);
        self.http.observe("POST", &path, started, read.is_ok());
        read.map_err(|e| (e, pending.into_iter().collect()))
    }

    /// Sends a chunk read and delivers the chunks of its answer, removing
    /// each from `pending`.
    fn read_stream(
        &self,
        path: &str,
        req: &ChunkReadRequest,
        pending: &mut HashSet<BlobId>,
        deliver: &DeliverChunk<'_>,
    ) -> Result<(), ClientError> {
        let mut resp = self.http.post_raw(path, &self.token, req)?;
        let mut body = resp.body_mut().with_config().limit(u64::MAX).reader();
        let mut header = [0u8; CHUNK_FRAME_HEADER];
        let mut data = Vec::new();
        while !pending.is_empty() {
            body.read_exact(&mut header).map_err(|e| ClientError::Transport(format!("chunk stream: {e}")))?;
            let id = BlobId(header[..32].try_into().expect("32 bytes"));
            let len = u32::from_le_bytes(header[33..].try_into().expect("4 bytes"));
            let expected = match (pending.contains(&id), header[32]) {
                (true, 0) => self.lens[&id] as usize,
                (true, 1) if len as usize <= MAX_CHUNK_ERROR => len as usize,
                _ => {
                    let e = ClientError::Transport(format!("chunk stream: unexpected frame for chunk {id}"));
                    return Err(e);
                }
            };
            if len as usize != expected {
                let e = ClientError::Transport(format!("chunk {id}: {len} bytes, the plan says {expected}"));
                return Err(e);
            }
            data.resize(expected, 0);
            body.read_exact(&mut data).map_err(|e| ClientError::Transport(format!("chunk stream: {e}")))?;
            pending.remove(&id);
            if header[32] == 1 {
                deliver(&id, Err(format!("the server could not read chunk {id}: {}", String::from_utf8_lossy(&data))));
            } else if self.id_key.blob_id(&data) != id {
                deliver(&id, Err(format!("chunk {id} from the server does not match its id")));
            } else {
                deliver(&id, Ok(&data));
            }
        }
        Ok(())
    }
}

impl ChunkSource for RemoteChunks {
    fn chunk_len(&self, id: &BlobId) -> Option<u32> {
        self.lens.get(id).copied()
    }

    fn fetch(&self, ids: &[BlobId], deliver: &DeliverChunk<'_>) {
        let wanted: HashSet<BlobId> = ids.iter().copied().collect();
        let mut batches: Vec<Vec<PlanChunk>> = Vec::new();
        let mut bytes = 0u64;
        for c in self.order.iter().filter(|c| wanted.contains(&c.id)) {
            let full = batches.last().map_or(true, |b| b.len() >= MAX_CHUNK_READ || bytes >= BATCH_BYTES);
            if full {
                batches.push(Vec::new());
                bytes = 0;
            }
            batches.last_mut().expect("a batch").push(*c);
            bytes += u64::from(c.len);
        }
        // Several batches in flight; each worker takes the next batch in order.
        let next = Mutex::new(batches.iter());
        std::thread::scope(|s| {
            for _ in 0..IN_FLIGHT.min(batches.len()) {
                s.spawn(|| loop {
                    let Some(batch) = next.lock().expect("batch lock").next() else { break };
                    if let Err((e, undelivered)) = self.fetch_batch(batch, deliver) {
                        for id in undelivered {
                            deliver(&id, Err(e.to_string()));
                        }
                    }
                });
            }
        });
    }
}
