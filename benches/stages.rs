//! Throughput of each pipeline stage on a 64 MiB mixed corpus (real files
//! from /usr plus 10% random data), single thread, and the 2-core pipeline
//! ceiling they imply.

use std::hint::black_box;
use std::time::Instant;

use chunkvault::blob::BlobCodec;
use chunkvault::chunker::{Chunker, ChunkerParams};
use chunkvault::crypto::{MasterKey, Role};
use chunkvault::id::{BlobId, BlobKind, PackId};
use chunkvault::index::{Index, IndexEntry, PackEntries};
use chunkvault::pack::PackBuilder;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "common/corpus.rs"]
mod corpus;

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

fn index(c: &mut Criterion) {
    let n = 1_000_000u32;
    let ids: Vec<BlobId> = (0..n).map(|i| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
    let packs: Vec<PackEntries> = ids
        .chunks(16)
        .enumerate()
        .map(|(p, chunk)| PackEntries {
            pack: PackId(*blake3::hash(&(p as u64).to_le_bytes()).as_bytes()),
            kind: BlobKind::Data,
            blobs: chunk
                .iter()
                .enumerate()
                .map(|(i, id)| IndexEntry { id: *id, offset: i as u32 * 1000, stored_len: 999, raw_len: 1500 })
                .collect(),
        })
        .collect();
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
    let mut idx = Index::new();
    for p in &packs {
        idx.add_pack(p);
    }
    g.bench_function("lookup-1M", |b| b.iter(|| ids.iter().filter(|id| idx.contains(id)).count()));
    g.finish();
}

/// Times each stage once more by hand and prints the pipeline ceiling: with
/// every stage on the critical path per byte, one core does
/// 1 / sum(1/throughput) and the ceiling is that times the core count.
fn ceiling(_: &mut Criterion) {
    let f = fixture();
    let id_key = f.key.id_key();
    let codec = BlobCodec::new(f.key.clone(), 3);
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

criterion_group!(benches, ceiling, stages, index);
criterion_main!(benches);
