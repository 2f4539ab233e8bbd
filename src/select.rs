//! Choosing snapshots: filters by host, tag and path, `latest` as the
//! newest snapshot that passes them, and rewriting a snapshot's tags.

use crate::id::SnapshotId;
use crate::lock::{LockError, LockKind, LockOptions};
use crate::repo::{RepoError, Repository, WriteSession};
use crate::snapshot::Snapshot;

/// Why snapshots could not be chosen or retagged.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Reading or writing the repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The exclusive lock for retagging could not be taken or lapsed.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `latest` with filters that no snapshot passes.
    #[error("no snapshot matches {0}")]
    NoMatch(String),
}

/// Which snapshots a command considers (restic's `--host`, `--tag`, `--path`).
/// Each list that is not empty must be satisfied; an empty filter passes
/// every snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    /// The snapshot's host is one of these.
    pub hosts: Vec<String>,
    /// The snapshot carries every tag of at least one of these sets
    /// (`--tag a,b --tag c`: a and b, or c).
    pub tags: Vec<Vec<String>>,
    /// The snapshot's paths include every one of these.
    pub paths: Vec<String>,
}

impl SnapshotFilter {
    /// Whether `s` passes the filter.
    pub fn matches(&self, s: &Snapshot) -> bool {
        let host = self.hosts.is_empty() || self.hosts.contains(&s.hostname);
        let tags = self.tags.is_empty() || self.tags.iter().any(|set| set.iter().all(|t| s.tags.contains(t)));
        let paths = self.paths.iter().all(|p| s.paths.iter().any(|sp| sp == p.trim_end_matches('/') || sp == p));
        host && tags && paths
    }

    /// The filter in words, for "no snapshot matches ...".
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.hosts.is_empty() {
            parts.push(format!("host {}", self.hosts.join(" or ")));
        }
        if !self.tags.is_empty() {
            let sets: Vec<String> = self.tags.iter().map(|s| s.join(",")).collect();
            parts.push(format!("tags {}", sets.join(" or ")));
        }
        if !self.paths.is_empty() {
            parts.push(format!("paths {}", self.paths.join(" and ")));
        }
        if parts.is_empty() {
            "(the repository has no snapshots)".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The readable snapshots that pass `filter`, oldest first.
pub fn list(repo: &Repository, filter: &SnapshotFilter) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
    Ok(repo.list_snapshots()?.into_iter().filter(|(_, s)| filter.matches(s)).collect())
}

/// A snapshot by id, unique id prefix, or `latest`: the newest snapshot that
/// passes `filter`. An id names its snapshot whatever the filter says.
pub fn find(repo: &Repository, spec: &str, filter: &SnapshotFilter) -> Result<(SnapshotId, Snapshot), SelectError> {
    if spec != "latest" {
        return Ok(repo.find_snapshot(spec)?);
    }
    let (good, bad) = repo.list_snapshots_and_unreadable()?;
    if !bad.is_empty() {
        // Any of them could be the newest.
        return Err(RepoError::UnreadableSnapshots(bad.into_iter().map(|(id, _)| id).collect()).into());
    }
    good.into_iter().rev().find(|(_, s)| filter.matches(s)).ok_or_else(|| SelectError::NoMatch(filter.describe()))
}

/// The snapshots named by `specs`, or when there are none, every snapshot
/// that passes `filter` (oldest first).
pub fn find_all(
    repo: &Repository,
    specs: &[String],
    filter: &SnapshotFilter,
) -> Result<Vec<(SnapshotId, Snapshot)>, SelectError> {
    if specs.is_empty() {
        return Ok(list(repo, filter)?);
    }
    let mut out: Vec<(SnapshotId, Snapshot)> = Vec::new();
    for spec in specs {
        let found = find(repo, spec, filter)?;
        if !out.iter().any(|(id, _)| *id == found.0) {
            out.push(found);
        }
    }
    Ok(out)
}

/// A change to snapshots' tags (`tag --add/--remove/--set`).
#[derive(Clone, Debug, Default)]
pub struct TagChange {
    /// Replace every tag with these (before `add` and `remove`).
    pub set: Option<Vec<String>>,
    /// Tags to add.
    pub add: Vec<String>,
    /// Tags to remove.
    pub remove: Vec<String>,
}

impl TagChange {
    /// The tags of a snapshot that had `tags`, in their order, without duplicates.
    pub fn apply(&self, tags: &[String]) -> Vec<String> {
        let mut out: Vec<String> = self.set.clone().unwrap_or_else(|| tags.to_vec());
        out.extend(self.add.iter().cloned());
        out.retain(|t| !self.remove.contains(t));
        let mut seen = std::collections::HashSet::new();
        out.retain(|t| seen.insert(t.clone()));
        out
    }
}

/// Rewrites the tags of `snapshots` under the exclusive lock: for each one
/// whose tags change, the new manifest is written first and the old one
/// removed after, so a crash in between leaves both (a duplicate, which
/// `forget` removes), never neither. Returns (old, new) ids of those changed.
pub fn retag(
    repo: &Repository,
    snapshots: &[(SnapshotId, Snapshot)],
    change: &TagChange,
    lock: LockOptions,
) -> Result<Vec<(SnapshotId, SnapshotId)>, SelectError> {
    let mut session = WriteSession::begin(repo, LockKind::Exclusive, lock, 1).map_err(|e| e.split::<SelectError>())?;
    let retagged: Vec<(SnapshotId, Snapshot)> = snapshots
        .iter()
        .filter_map(|(old, snap)| {
            let tags = change.apply(&snap.tags);
            (tags != snap.tags).then(|| (*old, Snapshot { tags, ..snap.clone() }))
        })
        .collect();
    let written = session.commit_group(retagged.iter().map(|(_, snap)| snap))?;
    let mut changed = Vec::new();
    for ((old, _), new) in retagged.iter().zip(written) {
        let new = new.map_err(|e| e.split::<SelectError>())?;
        // The old manifest goes only while the lock is surely held.
        session.check_lock()?;
        repo.remove_snapshot(old)?;
        changed.push((*old, new));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(host: &str, tags: &[&str], paths: &[&str]) -> Snapshot {
        crate::test_support::snapshot("2026-01-01T00:00:00Z", host, tags, paths)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filters_combine_hosts_or_tag_sets_and_all_paths() {
        let s = snap("h1", &["a", "b"], &["/home", "/etc"]);
        assert!(SnapshotFilter::default().matches(&s));
        let f = |hosts: &[&str], tags: &[&[&str]], paths: &[&str]| SnapshotFilter {
            hosts: strings(hosts),
            tags: tags.iter().map(|t| strings(t)).collect(),
            paths: strings(paths),
        };
        assert!(f(&["h2", "h1"], &[], &[]).matches(&s));
        assert!(!f(&["h2"], &[], &[]).matches(&s));
        assert!(f(&[], &[&["a", "b"]], &[]).matches(&s));
        assert!(!f(&[], &[&["a", "c"]], &[]).matches(&s));
        assert!(f(&[], &[&["a", "c"], &["b"]], &[]).matches(&s));
        assert!(f(&[], &[], &["/etc", "/home/"]).matches(&s));
        assert!(!f(&[], &[], &["/etc", "/root"]).matches(&s));
    }

    #[test]
    fn tag_changes_set_then_add_then_remove_without_duplicates() {
        let c = TagChange { set: None, add: strings(&["x", "a"]), remove: strings(&["b"]) };
        assert_eq!(c.apply(&strings(&["a", "b"])), strings(&["a", "x"]));
        let c = TagChange { set: Some(strings(&["s"])), add: strings(&["t"]), remove: Vec::new() };
        assert_eq!(c.apply(&strings(&["a"])), strings(&["s", "t"]));
        assert_eq!(TagChange::default().apply(&strings(&["a"])), strings(&["a"]));
    }
}
