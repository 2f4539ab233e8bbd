//! Embedding chunkvault in another program: create a repository, back up a
//! directory and a stream of named files, list snapshots, restore a tree and
//! stream one file, all without the CLI.
//!
//! Run with: `cargo run --example embed -- /some/dir`

use std::path::PathBuf;
use std::sync::Arc;

use chunkvault::backend::LocalBackend;
use chunkvault::backup::{backup, backup_stream, BackupOptions, BackupProgress, NamedFile};
use chunkvault::repo::{InitOptions, Repository};
use chunkvault::restore::{cat, restore, RestoreOptions, RestoreProgress};
use chunkvault::tree::Timestamp;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "src".into()));
    let work = tempfile::tempdir()?;
    let password = b"example password";

    // 1. A repository on the local filesystem.
    let backend = Arc::new(LocalBackend::create(&work.path().join("repo"))?);
    let repo = Repository::init(backend.clone(), password, &InitOptions::default())?;
    println!("created repository {}", repo.config().id);

    // 2. Back up a directory.
    let done = backup(&repo, &[&source], &BackupOptions::default(), &BackupProgress::default())?;
    let s = &done.snapshot.summary;
    println!("snapshot {}: {} files, {} bytes, {} stored", done.id.short(), s.files_new, s.total_bytes, s.bytes_stored);

    // 3. Back up a stream of named files that live nowhere on disk.
    let files = (0..3).map(|i| NamedFile {
        path: format!("generated/file-{i}.txt"),
        reader: std::io::Cursor::new(format!("generated content {i}\n").repeat(1000)),
        mode: 0o644,
        mtime: Timestamp { sec: 1_700_000_000, nsec: 0 },
    });
    let (stream_id, stream_snap) = backup_stream(&repo, files, &BackupOptions::default())?;
    println!("stream snapshot {}", stream_id.short());

    // 4. Reopen (as another process would) and list snapshots.
    let repo = Repository::open(backend, password)?;
    for (id, snap) in repo.list_snapshots()? {
        println!("{}  {}  {:?}", id.short(), snap.time, snap.paths);
    }

    // 5. Restore the directory snapshot, and stream one generated file.
    let target = work.path().join("restored");
    let report = restore(&repo, &done.snapshot, &target, &RestoreOptions::default(), &RestoreProgress::default())?;
    println!("restored {} files ({} bytes) to {}", report.files, report.bytes, target.display());
    let node = repo.find_node(&stream_snap.tree, "generated/file-1.txt")?.expect("a file");
    let mut out = Vec::new();
    cat(&repo, &node, Some((0, 20)), &mut out)?;
    println!("first bytes of generated/file-1.txt: {:?}", String::from_utf8_lossy(&out));
    Ok(())
}
