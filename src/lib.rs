//! chunkvault: a content-addressed, deduplicating, encrypted backup engine.
//!
//! The pipeline of a backup: walk files, cut them into chunks with FastCDC,
//! name each chunk by its keyed BLAKE3, skip chunks the repository has, and
//! compress (zstd), seal (AES-256-GCM) and pack the rest; then write the
//! trees, the index segments and, last, the snapshot. Restore runs it
//! backwards and verifies every chunk against its id before writing it.
//! `ARCHITECTURE.md` describes the formats and the commit protocol.
//!
//! ```
//! use std::sync::Arc;
//! use chunkvault::backend::LocalBackend;
//! use chunkvault::backup::{backup, BackupOptions, BackupProgress};
//! use chunkvault::crypto::KdfParams;
//! use chunkvault::repo::{InitOptions, Repository};
//! use chunkvault::restore::{restore, RestoreOptions, RestoreProgress};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let data = dir.path().join("data");
//! std::fs::create_dir(&data)?;
//! std::fs::write(data.join("hello.txt"), b"hello, world\n")?;
//!
//! // Create a repository on the local filesystem (a cheap KDF for the example).
//! let backend = Arc::new(LocalBackend::create(&dir.path().join("repo"))?);
//! let opts = InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..InitOptions::default() };
//! let repo = Repository::init(backend, b"secret", &opts)?;
//!
//! let done = backup(&repo, &[&data], &BackupOptions::default(), &BackupProgress::default())?;
//! println!("snapshot {}", done.id);
//!
//! let target = dir.path().join("restored");
//! let report = restore(&repo, &done.snapshot, &target, &RestoreOptions::default(), &RestoreProgress::default())?;
//! assert!(report.damaged.is_empty());
//! let restored = target.join(data.strip_prefix("/")?).join("hello.txt");
//! assert_eq!(std::fs::read(restored)?, b"hello, world\n");
//! # Ok(()) }
//! ```
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod backend;
pub mod backup;
pub mod blob;
pub mod buffers;
pub mod cache;
pub mod check;
pub mod chunker;
#[cfg(feature = "client")]
pub mod client;
pub mod copy;
pub mod crypto;
pub mod dump;
pub mod find;
pub mod id;
pub mod index;
pub mod ingest;
pub mod lock;
#[cfg(feature = "mount")]
pub mod mount;
pub mod pack;
pub mod packer;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod select;
#[cfg(feature = "server")]
pub mod server;
pub mod snapshot;
pub mod stats;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tree;
mod wire;
