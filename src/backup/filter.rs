//! Which entries a backup leaves out: restic's exclude options.
//!
//! Patterns follow restic's documented semantics. A pattern is matched
//! against the entry's absolute path, one path component at a time: `*`,
//! `?` and `[...]` stay within a component and `**` spans any number of
//! them. A pattern that starts with `/` is anchored at the root; any other
//! pattern may match at any depth (`*.o` matches `/src/a.o`, `foo/bar`
//! matches `/x/foo/bar`). A pattern that matches a directory matches
//! everything below it. A pattern starting with `!` re-includes what an
//! earlier pattern excluded: of the patterns that match a path, the last one
//! decides. An excluded directory is not descended into, so a `!` pattern
//! brings back only entries whose parent directories are themselves
//! included.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The file that marks a cache directory, and how it must start
/// (<https://bford.info/cachedir/>).
pub const CACHEDIR_TAG: (&str, &str) = ("CACHEDIR.TAG", "Signature: 8a477f597d28d172789f06886806bc55");

/// What a backup leaves out; the default leaves out nothing.
#[derive(Clone, Debug, Default)]
pub struct ExcludeOptions {
    /// Patterns of paths to leave out (`--exclude`; see the module docs).
    pub patterns: Vec<String>,
    /// The same, matched without regard to case (`--iexclude`).
    pub ipatterns: Vec<String>,
    /// Leave out the contents of directories marked with a `CACHEDIR.TAG`
    /// that starts with the standard signature (the directory and the tag
    /// file are kept, as restic and tar do).
    pub caches: bool,
    /// Leave out the contents of directories that hold a file of this name:
    /// `NAME`, or `NAME:HEADER` for only when the file starts with HEADER.
    pub if_present: Vec<String>,
    /// Leave out files larger than this many bytes.
    pub larger_than: Option<u64>,
    /// Stay on the filesystems of the paths given: a directory where another
    /// filesystem is mounted is kept, empty.
    pub one_file_system: bool,
}

/// An exclude option that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExcludeError {
    /// A pattern that is not a valid glob.
    #[error("exclude pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        source: globset::Error,
    },
    /// An `if_present` entry with no file name.
    #[error("exclude-if-present {0:?}: no file name")]
    EmptyName(String),
    /// A path given to back up cannot be looked at (for `one_file_system`).
    #[error("{path}: {source}")]
    Source {
        /// The path.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Reads patterns from an exclude file (restic's `--exclude-file`): one a
/// line, surrounding blanks trimmed; empty lines and lines starting with `#`
/// are ignored.
pub fn patterns_from_file(path: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

/// Parses a size: bytes, or a number with a `k`, `m`, `g` or `t` suffix
/// (powers of 1024, as restic; `KiB`, `MB` and the like are read the same).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// An ordered list of exclude patterns, compiled (see the module docs).
#[derive(Debug)]
pub struct PatternList {
    set: GlobSet,
    /// For each glob of `set`: the pattern it came from, and whether that
    /// pattern re-includes.
    owners: Vec<(usize, bool)>,
    negated: bool,
}

impl PatternList {
    /// Compiles `patterns` in order; `case_insensitive` for `--iexclude`.
    pub fn new<S: AsRef<str>>(patterns: &[S], case_insensitive: bool) -> Result<PatternList, ExcludeError> {
        let mut set = GlobSetBuilder::new();
        let mut owners = Vec::new();
        let mut negated = false;
        for (i, p) in patterns.iter().enumerate() {
            let p = p.as_ref();
            let (neg, body) = match p.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, p),
            };
            negated |= neg;
            let body = body.trim_end_matches('/');
            let base = if body.starts_with('/') {
                body.to_owned()
            } else if body.is_empty() {
                continue;
            } else {
                format!("**/{body}")
            };
            // The entry itself, or anything below it.
            for glob in [base.clone(), format!("{base}/**")] {
                let g = GlobBuilder::new(&glob)
                    .literal_separator(true)
                    .case_insensitive(case_insensitive)
                    .backslash_escape(true)
                    .build()
                    .map_err(|source| ExcludeError::Pattern { pattern: p.to_owned(), source })?;
                set.add(g);
                owners.push((i, neg));
            }
        }
        let set = set.build().map_err(|source| ExcludeError::Pattern { pattern: patterns_joined(patterns), source })?;
        Ok(PatternList { set, owners, negated })
    }

    /// True when the last pattern matching `path` (absolute) excludes it.
    pub fn is_excluded(&self, path: &Path) -> bool {
        if !self.negated {
            return self.set.is_match(path);
        }
        let last = self.set.matches(path).into_iter().map(|g| self.owners[g]).max_by_key(|(i, _)| *i);
        matches!(last, Some((_, false)))
    }
}

fn patterns_joined<S: AsRef<str>>(patterns: &[S]) -> String {
    patterns.iter().map(|p| p.as_ref()).collect::<Vec<_>>().join(", ")
}

/// What the walk does with one entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Back it up.
    Keep,
    /// Leave it out, and do not descend into it.
    Exclude,
    /// A directory on another filesystem: keep it, empty.
    EmptyDir,
}

/// [`ExcludeOptions`], compiled for one backup.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    exclude: Option<PatternList>,
    iexclude: Option<PatternList>,
    /// Tag files: name, and the bytes the file must start with.
    tags: Vec<(OsString, Vec<u8>)>,
    larger_than: Option<u64>,
    /// With `one_file_system`: the devices of the paths given.
    devices: Option<HashSet<u64>>,
}

impl Filter {
    /// Compiles `opts`; `roots` are the absolute paths being backed up.
    pub fn new(opts: &ExcludeOptions, roots: &[std::path::PathBuf]) -> Result<Filter, ExcludeError> {
        let list = |p: &[String], ci| -> Result<_, ExcludeError> {
            Ok(if p.is_empty() { None } else { Some(PatternList::new(p, ci)?) })
        };
        let mut tags = Vec::new();
        if opts.caches {
            tags.push((CACHEDIR_TAG.0.into(), CACHEDIR_TAG.1.as_bytes().to_vec()));
        }
        for spec in &opts.if_present {
            let (name, header) = spec.split_once(':').unwrap_or((spec, ""));
            if name.is_empty() {
                return Err(ExcludeError::EmptyName(spec.clone()));
            }
            tags.push((name.into(), header.as_bytes().to_vec()));
        }
        let devices = if opts.one_file_system {
            let mut set = HashSet::new();
            for r in roots {
                let meta = std::fs::symlink_metadata(r)
                    .map_err(|source| ExcludeError::Source { path: r.display().to_string(), source })?;
                set.insert(meta.dev());
            }
            Some(set)
        } else {
            None
        };
        Ok(Filter {
            exclude: list(&opts.patterns, false)?,
            iexclude: list(&opts.ipatterns, true)?,
            tags,
            larger_than: opts.larger_than,
            devices,
        })
    }

    /// Whether to back up the entry at `path` (absolute) with `meta`.
    pub fn verdict(&self, path: &Path, meta: &Metadata) -> Verdict {
        let by_pattern = |l: &Option<PatternList>| l.as_ref().is_some_and(|l| l.is_excluded(path));
        if by_pattern(&self.exclude) || by_pattern(&self.iexclude) {
            return Verdict::Exclude;
        }
        if let Some(max) = self.larger_than {
            if meta.is_file() && meta.len() > max {
                return Verdict::Exclude;
            }
        }
        if let Some(devices) = &self.devices {
            if !devices.contains(&meta.dev()) {
                return if meta.is_dir() { Verdict::EmptyDir } else { Verdict::Exclude };
            }
        }
        Verdict::Keep
    }

    /// When the directory `dir`, whose entries are named `names`, is marked
    /// by a tag file: the names of the tag files to keep (everything else in
    /// it is left out). A tag file that cannot be read marks nothing.
    pub fn tagged<'n>(&self, dir: &Path, names: impl Iterator<Item = &'n OsStr> + Clone) -> Option<Vec<OsString>> {
        if self.tags.is_empty() {
            return None;
        }
        let mut marked = false;
        for (tag, header) in &self.tags {
            if !names.clone().any(|n| n == tag.as_os_str()) {
                continue;
            }
            marked |= header.is_empty() || starts_with(&dir.join(tag), header);
        }
        marked.then(|| self.tags.iter().map(|(t, _)| t.clone()).collect())
    }
}

/// True when the file at `path` starts with `header`.
fn starts_with(path: &Path, header: &[u8]) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::with_capacity(header.len());
    f.take(header.len() as u64).read_to_end(&mut buf).is_ok() && buf == header
}

/// True when a path's file name is one of `names` (the tag files kept).
pub(crate) fn is_one_of(name: &OsStr, names: &[OsString]) -> bool {
    names.iter().any(|n| n.as_bytes() == name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(patterns: &[&str], path: &str) -> bool {
        PatternList::new(patterns, false).unwrap().is_excluded(Path::new(path))
    }

    #[test]
    fn a_star_stays_within_a_component() {
        assert!(excluded(&["*.o"], "/src/a.o"));
        assert!(excluded(&["*.o"], "/src/deep/er/b.o"));
        assert!(!excluded(&["*.o"], "/src/a.oo"));
        assert!(excluded(&["/src/*/x"], "/src/a/x"));
        assert!(!excluded(&["/src/*/x"], "/src/a/b/x"));
        assert!(excluded(&["/src/?/x"], "/src/a/x"));
        assert!(excluded(&["/src/[ab]/x"], "/src/b/x"));
        assert!(!excluded(&["/src/[ab]/x"], "/src/c/x"));
    }

    #[test]
    fn a_double_star_spans_components() {
        assert!(excluded(&["/src/**/x"], "/src/a/b/x"));
        assert!(excluded(&["/src/**/x"], "/src/x"));
        assert!(!excluded(&["/src/**/x"], "/other/a/x"));
        assert!(excluded(&["/home/**/*.tmp"], "/home/me/a/b.tmp"));
    }

    #[test]
    fn a_leading_slash_anchors_and_other_patterns_match_at_any_depth() {
        assert!(excluded(&["foo"], "/foo"));
        assert!(excluded(&["foo"], "/a/b/foo"));
        assert!(excluded(&["foo/bar"], "/x/foo/bar"));
        assert!(!excluded(&["foo/bar"], "/x/foo/barn"));
        assert!(!excluded(&["/foo"], "/a/foo"));
        assert!(excluded(&["/a/foo"], "/a/foo"));
        assert!(!excluded(&["oo"], "/a/foo"), "a pattern matches whole components");
    }

    #[test]
    fn a_match_on_a_directory_covers_what_is_below_it() {
        assert!(excluded(&["/a/cache"], "/a/cache/x/y"));
        assert!(excluded(&["cache/"], "/home/me/cache/f"));
        assert!(excluded(&["node_modules"], "/p/node_modules/lib/index.js"));
    }

    #[test]
    fn the_last_matching_pattern_decides_and_a_bang_re_includes() {
        let p = ["/home/me/*", "!/home/me/Documents"];
        assert!(excluded(&p, "/home/me/Music"));
        assert!(!excluded(&p, "/home/me/Documents"));
        assert!(!excluded(&p, "/home/me/Documents/taxes/2024.pdf"));
        assert!(!excluded(&p, "/home/me"));
        // Order matters: an exclusion after the re-inclusion wins again.
        let p = ["*.log", "!keep.log", "/var/keep.log"];
        assert!(excluded(&p, "/tmp/a.log"));
        assert!(!excluded(&p, "/tmp/keep.log"));
        assert!(excluded(&p, "/var/keep.log"));
        // A bang pattern alone excludes nothing.
        assert!(!excluded(&["!x"], "/x"));
    }

    #[test]
    fn case_is_ignored_only_when_asked() {
        let ci = PatternList::new(&["*.JPG"], true).unwrap();
        assert!(ci.is_excluded(Path::new("/p/a.jpg")));
        assert!(ci.is_excluded(Path::new("/p/a.Jpg")));
        assert!(!excluded(&["*.JPG"], "/p/a.jpg"));
    }

    #[test]
    fn a_bad_pattern_is_a_typed_error() {
        let err = PatternList::new(&["/a/[b"], false).unwrap_err();
        assert!(matches!(err, ExcludeError::Pattern { ref pattern, .. } if pattern == "/a/[b"), "{err}");
    }

    #[test]
    fn non_utf8_paths_are_matched_by_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(OsStr::from_bytes(b"/data/\xff\xfe.tmp"));
        assert!(PatternList::new(&["*.tmp"], false).unwrap().is_excluded(path));
    }

    #[test]
    fn sizes_parse_like_restic() {
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("3GiB"), Some(3 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn exclude_files_skip_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("excludes");
        std::fs::write(&f, "# comment\n\n  *.tmp  \n!keep.tmp\n").unwrap();
        assert_eq!(patterns_from_file(&f).unwrap(), ["*.tmp", "!keep.tmp"]);
    }

    #[test]
    fn a_tag_file_marks_its_directory_only_with_the_right_header() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ExcludeOptions { caches: true, if_present: vec![".nobackup".into()], ..Default::default() };
        let f = Filter::new(&opts, &[]).unwrap();
        let names = |n: &'static [&'static str]| n.iter().map(OsStr::new);
        assert_eq!(f.tagged(dir.path(), names(&["a"])), None);
        std::fs::write(dir.path().join("CACHEDIR.TAG"), "not the signature").unwrap();
        assert_eq!(f.tagged(dir.path(), names(&["a", "CACHEDIR.TAG"])), None);
        std::fs::write(dir.path().join("CACHEDIR.TAG"), format!("{}\n# a cache\n", CACHEDIR_TAG.1)).unwrap();
        assert!(f.tagged(dir.path(), names(&["a", "CACHEDIR.TAG"])).is_some());
        assert!(f.tagged(dir.path(), names(&[".nobackup"])).is_some(), "no header: any file of that name");
    }
}
