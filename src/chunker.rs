//! Content-defined chunking with FastCDC (v2020).
//!
//! Cut points depend only on the content and the repository's chunker seed,
//! so an insertion in the middle of a file changes only the chunks around it.
//! Two entry points: [`Chunker::cut_points`] over a slice (an mmap of a large
//! file, or a small file read whole) and [`Chunker::stream`] over any reader.

use std::borrow::Cow;
use std::io::Read;
use std::ops::Range;

use fastcdc::v2020::{self, Normalization};

/// Invalid chunker parameters, or a read error while streaming.
#[derive(Debug, thiserror::Error)]
pub enum ChunkerError {
    /// [`ChunkerParams::validate`] refused the sizes; the message gives the
    /// accepted ranges.
    #[error("invalid chunker parameters: {0}")]
    Params(String),
    /// The reader given to [`Chunker::stream`] failed.
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
}

/// Chunk size bounds, kept in the repository config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
///
/// All three are in bytes, even, and `min_size <= avg_size <= max_size`
/// within FastCDC's ranges ([`ChunkerParams::validate`]).
pub struct ChunkerParams {
    /// No cut before this many bytes (the last chunk of a file may be shorter).
    pub min_size: u32,
    /// The chunk size FastCDC aims for, in bytes.
    pub avg_size: u32,
    /// A cut is forced at this many bytes.
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// 256 KiB / 1 MiB / 4 MiB: large enough that the index of a multi-terabyte
    /// repository fits in memory, small enough that an edit re-uploads little.
    fn default() -> Self {
        ChunkerParams { min_size: 256 * 1024, avg_size: 1024 * 1024, max_size: 4 * 1024 * 1024 }
    }
}

impl ChunkerParams {
    /// Checks the bounds FastCDC accepts, as a typed error instead of its panic.
    pub fn validate(&self) -> Result<(), ChunkerError> {
        let (min, avg, max) = (self.min_size as usize, self.avg_size as usize, self.max_size as usize);
        // FastCDC's v2020 scan tests cut candidates in byte pairs from half
        // of each bound, so odd bounds are off by one (fastcdc 5 asserts it).
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && [min, avg, max].iter().all(|v| v % 2 == 0);
        if ok {
            Ok(())
        } else {
            Err(ChunkerError::Params(format!(
                "need even sizes, min {}..={} <= avg {}..={} <= max {}..={}, got {}/{}/{}",
                v2020::MINIMUM_MIN,
                v2020::MINIMUM_MAX,
                v2020::AVERAGE_MIN,
                v2020::AVERAGE_MAX,
                v2020::MAXIMUM_MIN,
                v2020::MAXIMUM_MAX,
                self.min_size,
                self.avg_size,
                self.max_size
            )))
        }
    }
}

/// A configured chunker: parameters, masks and the seeded gear tables.
#[derive(Clone)]
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker").field("params", &self.params).finish_non_exhaustive()
    }
}

impl Chunker {
    /// A chunker with the given bounds and gear seed.
    pub fn new(params: ChunkerParams, seed: u64) -> Result<Self, ChunkerError> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg_size as usize, Normalization::Level1);
        let (gear, gear_ls) = v2020::get_gear_with_seed(seed);
        Ok(Chunker { params, mask_s, mask_l, gear, gear_ls })
    }

    /// The bounds this chunker was built with.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Length of the next chunk at the start of `data` (which must be non-empty).
    fn next_cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut_gear(
            data,
            self.params.min_size as usize,
            self.params.avg_size as usize,
            self.params.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        len
    }

    /// The chunk ranges of an in-memory buffer, covering it exactly.
    pub fn cut_points<'a>(&'a self, data: &'a [u8]) -> impl Iterator<Item = Range<usize>> + 'a {
        let mut pos = 0;
        std::iter::from_fn(move || {
            if pos >= data.len() {
                return None;
            }
            let len = self.next_cut(&data[pos..]).max(1);
            let range = pos..pos + len;
            pos += len;
            Some(range)
        })
    }

    /// Chunks a reader; yields owned chunks. Holds at most `2 * max_size` bytes.
    pub fn stream<R: Read>(&self, reader: R) -> StreamChunker<'_, R> {
        StreamChunker { chunker: self, reader, buf: Vec::new(), start: 0, eof: false }
    }
}

/// Iterator over the chunks of a reader; see [`Chunker::stream`].
pub struct StreamChunker<'a, R> {
    chunker: &'a Chunker,
    reader: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: Read> StreamChunker<'_, R> {
    fn fill(&mut self) -> std::io::Result<()> {
        let max = self.chunker.params.max_size as usize;
        if self.start > 0 && self.buf.len() - self.start < max {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let want = self.start + 2 * max;
        while !self.eof && self.buf.len() < self.start + max {
            let old = self.buf.len();
            self.buf.resize(want, 0);
            match self.reader.read(&mut self.buf[old..]) {
                Ok(0) => {
                    self.buf.truncate(old);
                    self.eof = true;
                }
                Ok(n) => self.buf.truncate(old + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => self.buf.truncate(old),
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for StreamChunker<'_, R> {
    type Item = Result<Vec<u8>, ChunkerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(e.into()));
        }
        let avail = &self.buf[self.start..];
        if avail.is_empty() {
            return None;
        }
        let len = self.chunker.next_cut(avail).max(1);
        let chunk = avail[..len].to_vec();
        self.start += len;
        Some(Ok(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> ChunkerParams {
        ChunkerParams { min_size: 64, avg_size: 256, max_size: 1024 }
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    proptest! {
        #[test]
        fn cut_points_cover_input_with_sizes_in_bounds(data in proptest::collection::vec(any::<u8>(), 0..20_000), seed in any::<u64>()) {
            let c = Chunker::new(small(), seed).unwrap();
            let ranges: Vec<_> = c.cut_points(&data).collect();
            let mut pos = 0;
            for (i, r) in ranges.iter().enumerate() {
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.len() <= 1024);
                if i + 1 < ranges.len() {
                    prop_assert!(r.len() >= 64);
                }
                pos = r.end;
            }
            prop_assert_eq!(pos, data.len());
        }

        #[test]
        fn stream_matches_slice(data in proptest::collection::vec(any::<u8>(), 0..20_000), read_size in 1usize..3000) {
            let c = Chunker::new(small(), 7).unwrap();
            let from_slice: Vec<Vec<u8>> = c.cut_points(&data).map(|r| data[r].to_vec()).collect();
            let reader = SlowReader { data: &data, pos: 0, step: read_size };
            let from_stream: Vec<Vec<u8>> = c.stream(reader).map(|r| r.unwrap()).collect();
            prop_assert_eq!(from_slice, from_stream);
        }
    }

    struct SlowReader<'a> {
        data: &'a [u8],
        pos: usize,
        step: usize,
    }

    impl Read for SlowReader<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn insertion_changes_only_nearby_chunks() {
        let c = Chunker::new(ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 65536 }, 1).unwrap();
        let data = pseudo_random(1 << 20, 42);
        let mut edited = data.clone();
        edited.splice(500_000..500_000, b"inserted bytes".iter().copied());
        let set = |d: &[u8]| -> std::collections::HashSet<Vec<u8>> { c.cut_points(d).map(|r| d[r].to_vec()).collect() };
        let before = set(&data);
        let after = set(&edited);
        let new = after.difference(&before).count();
        assert!(new <= 3, "{new} chunks changed");
    }

    #[test]
    fn fixed_seed_boundaries_are_stable() {
        // Golden values: a change here means every existing repository would
        // stop deduplicating against new backups.
        let c = Chunker::new(ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 65536 }, 0x5eed).unwrap();
        let data = pseudo_random(200_000, 99);
        let lens: Vec<usize> = c.cut_points(&data).map(|r| r.len()).collect();
        assert_eq!(lens.iter().sum::<usize>(), 200_000);
        assert_eq!(lens, GOLDEN_LENGTHS);
    }

    const GOLDEN_LENGTHS: [usize; 24] = [
        8587, 10113, 4393, 10553, 9606, 4267, 7677, 8669, 11619, 4724, 10962, 11242, 11060, 5664, 10727, 6102, 9499,
        13000, 4759, 11314, 10632, 5603, 5915, 3313,
    ];

    #[test]
    fn invalid_params_are_an_error_not_a_panic() {
        assert!(Chunker::new(ChunkerParams { min_size: 1, avg_size: 2, max_size: 3 }, 0).is_err());
        assert!(Chunker::new(ChunkerParams { min_size: 4096, avg_size: 1024, max_size: 8192 }, 0).is_err());
    }
}
