//! End-to-end backup and restore through the library, on a generated 64 MiB
//! mixed corpus written as files (real /usr content plus 10% random data).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chunkvault::backend::LocalBackend;
use chunkvault::backup::{backup, BackupOptions, BackupProgress, ParentChoice};
use chunkvault::crypto::KdfParams;
use chunkvault::repo::{InitOptions, Repository};
use chunkvault::restore::{restore, RestoreOptions, RestoreProgress};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "common/corpus.rs"]
mod corpus;
#[path = "../tests/common/noise.rs"]
mod noise;

const CORPUS: usize = 64 << 20;

/// Writes the corpus as files of varied sizes (1 KiB .. 8 MiB).
fn write_corpus(dir: &Path) -> PathBuf {
    let data = corpus::mixed(CORPUS);
    let src = dir.join("corpus");
    let mut pos = 0;
    let mut n = 0usize;
    while pos < data.len() {
        let size = [1 << 10, 16 << 10, 200 << 10, 1 << 20, 8 << 20][n % 5].min(data.len() - pos);
        let sub = src.join(format!("d{}", n % 17));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{n}")), &data[pos..pos + size]).unwrap();
        pos += size;
        n += 1;
    }
    src
}

fn new_repo(dir: &Path) -> Repository {
    let _ = std::fs::remove_dir_all(dir);
    let backend = Arc::new(LocalBackend::create(dir).unwrap());
    let opts =
        InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..InitOptions::default() };
    Repository::init(backend, b"bench", &opts).unwrap()
}

fn end_to_end(c: &mut Criterion) {
    let work = tempfile::tempdir().unwrap();
    let src = write_corpus(work.path());
    let opts = BackupOptions { uploaders: 2, parent: ParentChoice::None, ..BackupOptions::default() };
    let mut g = c.benchmark_group("end-to-end");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(CORPUS as u64));
    g.bench_function("backup-64MiB", |b| {
        b.iter_batched(
            || new_repo(&work.path().join("repo")),
            |repo| backup(&repo, &[&src], &opts, &BackupProgress::default()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    let repo = new_repo(&work.path().join("repo"));
    let done = backup(&repo, &[&src], &opts, &BackupProgress::default()).unwrap();
    g.bench_function("restore-64MiB", |b| {
        b.iter_batched(
            || {
                let t = work.path().join("restore");
                let _ = std::fs::remove_dir_all(&t);
                t
            },
            |t| restore(&repo, &done.snapshot, &t, &RestoreOptions::default(), &RestoreProgress::default()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
