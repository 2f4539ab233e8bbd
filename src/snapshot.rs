//! Snapshot manifests: what was backed up, when, by whom, and its root tree.
//!
//! Stored as JSON sealed with role `Snapshot`, named by the BLAKE3 of the
//! stored bytes. Written last in a backup: its presence is the commit.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, SnapshotId};

/// Largest snapshot manifest accepted when decoding.
pub const MAX_SNAPSHOT_SIZE: usize = 16 << 20;

/// Why bytes are not a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The manifest (its length in bytes given) is over [`MAX_SNAPSHOT_SIZE`];
    /// refused before parsing.
    #[error("snapshot manifest too large ({0} bytes)")]
    TooLarge(usize),
    /// The opened manifest is not the JSON of a [`Snapshot`] (damage; see
    /// `RepoError::is_damage`).
    #[error("snapshot manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
}

/// One committed backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the backup started, with the local UTC offset of the machine.
    pub time: DateTime<FixedOffset>,
    /// The host that took the backup, as the backup reported it (the
    /// `--host` override, or the machine's name); `--host` filters on it.
    pub hostname: String,
    /// The user the backup ran as (effective uid's name), as reported.
    pub username: String,
    /// The server's tenant, for snapshots taken by devices through a
    /// storage node; `None` for local backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The server's user owning the device that took it; `None` for local
    /// backups. Reads on the storage node are filtered by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The server's device id that took it; `None` for local backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Labels (`--tag`), in the order given; `forget --keep-tag` and
    /// `--tag` filters match them exactly.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The paths given to the backup, absolute.
    pub paths: Vec<String>,
    /// Root tree: the absolute paths' components lead to the backed-up data.
    pub tree: BlobId,
    /// The snapshot whose file lists were reused for unchanged files (or
    /// the damaged original, for one written by `repair snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SnapshotId>,
    /// For a snapshot made by `copy`: the id of the snapshot it copies in
    /// the repository where it was first taken (kept through copies of
    /// copies), so a second copy knows it is there already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<SnapshotId>,
    /// What the backup did.
    pub summary: Summary,
    /// What wrote it: `chunkvault <version>`; informational.
    pub program_version: String,
}

/// Counts from the backup that made a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Regular files read that had no entry at their path in the parent.
    pub files_new: u64,
    /// Regular files read again: the parent had an entry at that path, but
    /// size, inode, mtime or ctime differ (or a chunk is no longer indexed).
    pub files_changed: u64,
    /// Regular files whose chunk list was taken from the parent unread.
    pub files_unmodified: u64,
    /// Directories in the snapshot.
    pub dirs: u64,
    /// Symbolic links in the snapshot.
    pub symlinks: u64,
    /// Entries skipped because they could not be read (see the warnings).
    pub errors: u64,
    /// Bytes of file content in the snapshot.
    pub total_bytes: u64,
    /// Bytes of file content read and chunked (excludes unmodified files).
    pub bytes_read: u64,
    /// Blobs (chunks and trees) stored by this backup, i.e. not already in
    /// the repository.
    pub blobs_new: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_new: u64,
    /// Bytes of new blobs as stored (compressed and sealed).
    pub bytes_stored: u64,
    /// Wall-clock seconds the backup took, from start to commit.
    pub duration_secs: f64,
}

/// The name of the user this process runs as, from its effective uid
/// (getpwuid), not from `$USER`, which cron and service managers leave
/// unset or wrong; the uid as a number when it has no name.
pub fn current_user() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

/// The machine's host name (gethostname), or "unknown".
pub fn current_host() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

impl Snapshot {
    /// JSON for sealing.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serializes")
    }

    /// Parses an opened manifest, refusing oversized input.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.len() > MAX_SNAPSHOT_SIZE {
            return Err(SnapshotError::TooLarge(bytes.len()));
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Snapshot {
        Snapshot {
            time: DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123456789+01:00").unwrap(),
            hostname: "host".into(),
            username: "me".into(),
            tenant: None,
            user: Some("a@example.com".into()),
            device: None,
            tags: vec!["daily".into()],
            paths: vec!["/home/me".into()],
            tree: BlobId([1; 32]),
            parent: Some(SnapshotId([2; 32])),
            original: None,
            summary: Summary { files_new: 3, duration_secs: 1.5, ..Summary::default() },
            program_version: "chunkvault 0.1.0".into(),
        }
    }

    #[test]
    fn snapshot_roundtrip() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Snapshot::decode(&bytes);
        }

        #[test]
        fn decode_of_damaged_json_never_panics(pos in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = sample().encode();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            let _ = Snapshot::decode(&bytes);
        }
    }
}
