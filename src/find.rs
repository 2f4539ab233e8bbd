//! `find`: which snapshots hold paths matching glob patterns.

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;

use crate::id::{BlobId, SnapshotId};
use crate::repo::{RepoError, Repository};
use crate::snapshot::Snapshot;
use crate::tree::walk;

/// Why a search could not run.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// A tree could not be read.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A pattern is not a valid glob.
    #[error("bad pattern: {0}")]
    Pattern(#[from] globset::Error),
}

/// Compiled patterns: one with a `/` matches the whole path (`/home/*/.ssh`,
/// `**/*.jpg`), one without matches the entry's name (`*.jpg`, `notes.txt`).
pub struct Patterns {
    names: GlobSet,
    paths: GlobSet,
}

impl Patterns {
    /// Compiles `patterns` (globset syntax: `*` and `?` stay within a path
    /// component, `**` crosses them, `{a,b}` and `[abc]` as usual).
    pub fn new(patterns: &[String]) -> Result<Patterns, FindError> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let glob = globset::GlobBuilder::new(p).literal_separator(true).build()?;
            if p.contains('/') {
                paths.add(glob);
            } else {
                names.add(Glob::new(p)?);
            }
        }
        Ok(Patterns { names: names.build()?, paths: paths.build()? })
    }

    fn matches(&self, path: &str, name: &str) -> bool {
        self.names.is_match(name) || self.paths.is_match(path)
    }
}

/// One matching entry of a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    /// Its absolute path in the snapshot.
    pub path: String,
    /// `file`, `dir`, `symlink`, ... (see [`crate::tree::Node::type_name`]).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Content length (0 for anything but a file).
    pub size: u64,
    /// Modification time, RFC 3339.
    pub mtime: String,
}

/// The matches in one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotMatches {
    /// The snapshot searched.
    pub snapshot: SnapshotId,
    /// When it was taken.
    pub time: chrono::DateTime<chrono::FixedOffset>,
    /// The host it came from.
    pub hostname: String,
    /// Its matching entries, in walk order (directories before their contents).
    pub matches: Vec<Found>,
}

/// Searches `snapshots` for entries matching `patterns`; snapshots without
/// a match are left out.
pub fn find(
    repo: &Repository,
    snapshots: &[(SnapshotId, Snapshot)],
    patterns: &Patterns,
) -> Result<Vec<SnapshotMatches>, FindError> {
    let mut out = Vec::new();
    for (id, snap) in snapshots {
        let matches = matches_in(repo, &snap.tree, patterns)?;
        if !matches.is_empty() {
            out.push(SnapshotMatches { snapshot: *id, time: snap.time, hostname: snap.hostname.clone(), matches });
        }
    }
    Ok(out)
}

/// The entries of one snapshot's tree that match `p`, in walk order.
fn matches_in(repo: &Repository, root: &BlobId, p: &Patterns) -> Result<Vec<Found>, FindError> {
    let mut out = Vec::new();
    for entry in walk(repo, root) {
        let (rel, node) = entry.map_err(|e| e.source)?;
        let name = node.name_lossy();
        let path = format!("/{}", rel.to_string_lossy());
        if p.matches(&path, &name) {
            let mtime = chrono::DateTime::from_timestamp(node.mtime.sec, node.mtime.nsec)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            out.push(Found { path, kind: node.type_name(), size: node.size, mtime });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_without_a_slash_match_names_and_with_one_whole_paths() {
        let p = Patterns::new(&["*.jpg".into(), "/home/*/.ssh".into(), "**/cache/**".into()]).unwrap();
        assert!(p.matches("/a/b/photo.jpg", "photo.jpg"));
        assert!(p.matches("/home/me/.ssh", ".ssh"));
        assert!(!p.matches("/home/me/x/.ssh", ".ssh"), "* stays within one component");
        assert!(p.matches("/var/cache/x/y", "y"));
        assert!(!p.matches("/a/notes.txt", "notes.txt"));
        assert!(Patterns::new(&["[".into()]).is_err());
    }
}
