//! Throughput of each pipeline stage (read from the page cache, chunk, hash,
//! compress + encrypt) on a 64 MiB mixed corpus (real files
//! from /usr plus 10% random data), single thread, and the 2-core pipeline
//! ceiling they imply.

use std::hint::black_box;
use std::time::Instant;

use chunkvault::blob::BlobCodec;
use chunkvault::chunker::{Chunker, ChunkerParams};
use chunkvault::crypto::{MasterKey, Role};
use chunkvault::id::{BlobId, BlobKind, PackId};
use std::sync::Arc;

use chunkvault::backend::{Backend, LocalBackend};
use chunkvault::crypto::KdfParams;
use chunkvault::index::{Index, IndexEntry, IndexSegment, PackEntries};
use chunkvault::pack::PackBuilder;
use chunkvault::packer::PACKS_PER_SEGMENT;
use chunkvault::repo::{InitOptions, Repository};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "common/corpus.rs"]
mod corpus;
#[path = "../tests/common/noise.rs"]
mod noise;

const CORPUS: usize = 64 << 20;

struct Fixture {
    data: Vec<u8>,
    chunks: Vec<std::ops::Range<usize>>,
    key: MasterKey,
    chunker: Chunker,
}

fn fixture() -> Fixture {
    let data = corpus::mixed(CORPUS);
    let key = MasterKey::from_bytes([42; 32]);
    let chunker = Chunker::new(ChunkerParams::default(), key.chunker_seed()).unwrap();
    let chunks = chunker.cut_points(&data).collect();
    Fixture { data, chunks, key, chunker }
}

fn stages(c: &mut Criterion) {
    let f = fixture();
    let id_key = f.key.id_key();
    let mut g = c.benchmark_group("stage");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(f.data.len() as u64));
    g.bench_function("chunk", |b| b.iter(|| f.chunker.cut_points(&f.data).count()));
    g.bench_function("hash", |b| {
        b.iter(|| {
            f.chunks.iter().for_each(|r| {
                black_box(id_key.blob_id(&f.data[r.clone()]));
            })
        })
    });
    g.bench_function("crc32", |b| b.iter(|| f.chunks.iter().map(|r| crc32fast::hash(&f.data[r.clone()])).sum::<u32>()));
    for level in [1, 3] {
        g.bench_function(format!("compress-zstd{level}"), |b| {
            b.iter(|| {
                f.chunks.iter().map(|r| zstd::bulk::compress(&f.data[r.clone()], level).unwrap().len()).sum::<usize>()
            })
        });
    }
    g.bench_function("encrypt", |b| {
        b.iter_batched(
            || f.chunks.iter().map(|r| f.data[r.clone()].to_vec()).collect::<Vec<_>>(),
            |bufs| {
                for mut buf in bufs {
                    f.key.seal_blob(Role::Data, &BlobId([1; 32]), &mut buf);
                }
            },
            BatchSize::LargeInput,
        )
    });
    let codec = BlobCodec::new(f.key.clone(), 3);
    g.bench_function("seal-blob-zstd3", |b| {
        b.iter(|| {
            f.chunks
                .iter()
                .map(|r| codec.seal(BlobKind::Data, &BlobId([1; 32]), &f.data[r.clone()]).len())
                .sum::<usize>()
        })
    });
    let sealed: Vec<(BlobId, Vec<u8>, usize)> = f
        .chunks
        .iter()
        .map(|r| {
            let d = &f.data[r.clone()];
            let id = id_key.blob_id(d);
            (id, codec.seal(BlobKind::Data, &id, d), d.len())
        })
        .collect();
    g.bench_function("restore-open-blob", |b| {
        b.iter_batched(
            || sealed.clone(),
            |s| {
                for (id, stored, len) in s {
                    codec.open(BlobKind::Data, &id, stored, len).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("pack-write", |b| {
        b.iter(|| {
            let mut p = PackBuilder::new(BlobKind::Data, CORPUS + (1 << 20));
            for (id, stored, len) in &sealed {
                p.add(*id, *len as u32, stored);
            }
            p.finish(&f.key).id
        })
    });
    g.finish();
}

fn fake_packs(n: u32, per_pack: u32) -> Vec<PackEntries> {
    (0..n.div_ceil(per_pack))
        .map(|p| PackEntries {
            pack: PackId(*blake3::hash(&u64::from(p).to_le_bytes()).as_bytes()),
            kind: BlobKind::Data,
            blobs: (p * per_pack..((p + 1) * per_pack).min(n))
                .map(|i| IndexEntry {
                    id: BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                    offset: i % per_pack * 1000,
                    stored_len: 999,
                    raw_len: 1500,
                })
                .collect(),
        })
        .collect()
}

fn index(c: &mut Criterion) {
    let n = 1_000_000u32;
    let packs = fake_packs(n, 16);
    let ids: Vec<BlobId> = packs.iter().flat_map(|p| p.blobs.iter().map(|b| b.id)).collect();
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.throughput(Throughput::Elements(u64::from(n)));
    g.bench_function("insert-1M", |b| {
        b.iter(|| {
            let mut idx = Index::new();
            for p in &packs {
                idx.add_pack(p);
            }
            idx.len()
        })
    });
    let segment = IndexSegment { packs: packs.clone() };
    g.bench_function("load-1M", |b| b.iter(|| Index::from_segments([&segment]).len()));
    let idx = Index::from_segments([&segment]);
    g.bench_function("lookup-1M", |b| b.iter(|| ids.iter().filter(|id| idx.contains(id)).count()));
    g.finish();
}

/// Blobs per pack in the index benches: packs are ~16 MiB and a stored chunk
/// ~0.5 MiB (1 MiB raw on average, compressed), so a real pack holds ~32
/// blobs. Fewer blobs per pack means more pack-table bytes per chunk, so a
/// larger figure here would understate the index's memory.
const BLOBS_PER_PACK: u32 = 32;

/// Memory of the index at 10 million chunks, and the time to open a
/// repository whose index holds 1 million.
fn index_scale(_: &mut Criterion) {
    let segment = IndexSegment { packs: fake_packs(10_000_000, BLOBS_PER_PACK) };
    let idx = Index::from_segments([&segment]);
    drop(segment);
    println!(
        "\nindex at {} chunks, {} blobs per pack: {:.2} bytes per chunk ({} MiB)",
        idx.len(),
        BLOBS_PER_PACK,
        idx.memory_bytes() as f64 / idx.len() as f64,
        idx.memory_bytes() >> 20
    );
    drop(idx);

    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
    let opts =
        InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..InitOptions::default() };
    let repo = Repository::init(backend.clone(), b"bench", &opts).unwrap();
    // Segments as the packer writes them: up to PACKS_PER_SEGMENT packs each.
    for part in fake_packs(1_000_000, BLOBS_PER_PACK).chunks(PACKS_PER_SEGMENT) {
        repo.save_index_segment(&IndexSegment { packs: part.to_vec() }).unwrap();
    }
    drop(repo);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let repo = Repository::open(backend.clone(), b"bench").unwrap();
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(repo.index().len(), 1_000_000);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "open a repository with 1M chunks, {} blobs per pack: median {:.3}s (min {:.3}s, max {:.3}s)",
        BLOBS_PER_PACK, times[2], times[0], times[4]
    );
}

/// Times each stage once more by hand and prints the pipeline ceiling: with
/// every stage on the critical path per byte, one core does
/// 1 / sum(1/throughput) and the ceiling is that times the core count.
fn ceiling(_: &mut Criterion) {
    let f = fixture();
    let id_key = f.key.id_key();
    let codec = BlobCodec::new(f.key.clone(), InitOptions::default().compression_level);
    // The read stage: the corpus as a file in the page cache, read into a
    // reused buffer the size of a backup batch.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("corpus");
    std::fs::write(&file, &f.data).unwrap();
    let buf = std::cell::RefCell::new(vec![0u8; 16 << 20]);
    let mbps = |secs: f64| f.data.len() as f64 / secs / 1e6;
    let time = |work: &dyn Fn()| {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            work();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    let stages = [
        (
            "read",
            time(&|| {
                let mut file = std::fs::File::open(&file).unwrap();
                let mut buf = buf.borrow_mut();
                while std::io::Read::read(&mut file, &mut buf).unwrap() > 0 {}
            }),
        ),
        (
            "chunk",
            time(&|| {
                black_box(f.chunker.cut_points(&f.data).count());
            }),
        ),
        (
            "hash",
            time(&|| {
                f.chunks.iter().for_each(|r| {
                    black_box(id_key.blob_id(&f.data[r.clone()]));
                });
            }),
        ),
        (
            "compress+encrypt",
            time(&|| {
                black_box(
                    f.chunks
                        .iter()
                        .map(|r| codec.seal(BlobKind::Data, &BlobId([1; 32]), &f.data[r.clone()]).len())
                        .sum::<usize>(),
                );
            }),
        ),
    ];
    let per_byte: f64 = stages.iter().map(|(_, s)| s).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\npipeline ceiling on a {} MiB mixed corpus:", CORPUS >> 20);
    for (name, s) in &stages {
        println!("  {name:<18} {:>8.0} MB/s (one core)", mbps(*s));
    }
    println!(
        "  {:<18} {:>8.0} MB/s on one core, {:.0} MB/s on {cores} cores",
        "pipeline",
        mbps(per_byte),
        mbps(per_byte) * cores as f64
    );
}

criterion_group!(benches, ceiling, index_scale, stages, index);
criterion_main!(benches);
