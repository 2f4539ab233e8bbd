//! Fixtures shared by the unit tests of several modules (compiled for tests
//! only): a repository that is cheap to create, and snapshot manifests with
//! no data behind them.

use std::path::Path;
use std::sync::Arc;

use crate::backend::LocalBackend;
use crate::crypto::KdfParams;
use crate::id::BlobId;
use crate::repo::{InitOptions, Repository};
use crate::snapshot::Snapshot;

/// The password of every test repository.
pub(crate) const PASSWORD: &[u8] = b"pw";

/// Default repository settings with a key derivation cheap enough for tests
/// (1 MiB, one pass, one lane).
pub(crate) fn cheap_init() -> InitOptions {
    InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..InitOptions::default() }
}

/// A new repository in the local directory `dir` (created if missing),
/// opened with [`PASSWORD`].
pub(crate) fn local_repo(dir: &Path) -> Repository {
    let backend = Arc::new(LocalBackend::create(dir).expect("create a local backend"));
    Repository::init(backend, PASSWORD, &cheap_init()).expect("init a repository")
}

/// A manifest taken at `time` (RFC 3339) on `host` with `tags` and `paths`,
/// naming an all-zero root tree: for code that reads manifests only
/// (retention, filters).
pub(crate) fn snapshot(time: &str, host: &str, tags: &[&str], paths: &[&str]) -> Snapshot {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    Snapshot {
        time: chrono::DateTime::parse_from_rfc3339(time).expect("an RFC 3339 time"),
        hostname: host.into(),
        username: "u".into(),
        tenant: None,
        user: None,
        device: None,
        tags: strings(tags),
        paths: strings(paths),
        tree: BlobId([0; 32]),
        parent: None,
        original: None,
        summary: Default::default(),
        program_version: "test".into(),
    }
}

/// `len` bytes of deterministic noise from `seed` (a linear congruential
/// generator's high byte): incompressible data, the same for the same seed,
/// that zstd cannot shrink and other seeds do not repeat in practice.
pub(crate) fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

/// A storage node's tenants under `dir`, each repository created with
/// [`cheap_init`] and [`PASSWORD`].
pub(crate) fn tenants(dir: &Path) -> crate::ingest::Tenants {
    crate::ingest::Tenants::new(dir.to_str().expect("a UTF-8 directory"), PASSWORD.to_vec(), cheap_init())
}
