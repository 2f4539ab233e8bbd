//! What the device's restores created, recorded before each creation, and
//! the wipe that removes exactly that.
//!
//! The journal is `restored.jsonl` in the device's state directory (0600):
//! one [`Created`] per line, appended and fsynced by the restore before it
//! creates the entries. A wipe walks it deepest path first and removes an
//! entry only while it still is what the restore wrote: a regular file of
//! the recorded size and mtime, a symlink to the recorded target, or a
//! directory the restore created that is empty by then. Anything else (a
//! file the user changed, a directory the user put files in, an entry that
//! existed before the restore) is left, and reported.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::restore::{Created, RestoreJournal};

/// The journal file in a state directory.
pub const JOURNAL_FILE: &str = "restored.jsonl";

/// An append-only, fsynced record of what restores created.
pub struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Opens (creating, owner-only) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(state_dir.join(JOURNAL_FILE))?;
        Ok(Journal { file: Mutex::new(file) })
    }
}

impl RestoreJournal for Journal {
    fn record(&self, entries: &[Created]) -> std::io::Result<()> {
        let mut text = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut text, e)?;
            text.push(b'\n');
        }
        let mut f = self.file.lock().expect("journal lock");
        f.write_all(&text)?;
        f.sync_data()
    }
}

/// What a wipe removed and what it left, with why.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WipeReport {
    /// Entries removed.
    pub removed: Vec<PathBuf>,
    /// Entries left in place, with the reason.
    pub left: Vec<LeftEntry>,
}

/// An entry a wipe did not remove.
#[derive(Clone, Debug, Serialize)]
pub struct LeftEntry {
    /// The path.
    pub path: PathBuf,
    /// Why it was left.
    pub reason: String,
}

/// Removes what the journal in `state_dir` records, deepest first, where it
/// is still what the restore wrote. A journal that is missing removes
/// nothing; a damaged line is skipped and reported.
pub fn wipe(state_dir: &Path) -> WipeReport {
    let mut report = WipeReport::default();
    let path = state_dir.join(JOURNAL_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(_) => return report,
    };
    let mut entries: Vec<Created> = Vec::new();
    for line in BufReader::new(file).lines() {
        match line.map_err(|e| e.to_string()).and_then(|l| serde_json::from_str(&l).map_err(|e| e.to_string())) {
            Ok(e) => entries.push(e),
            Err(e) => {
                report.left.push(LeftEntry { path: path.clone(), reason: format!("unreadable journal line: {e}") })
            }
        }
    }
    // Deepest first, so a directory's entries go before it; a path recorded
    // twice (restored twice) is considered once, as last recorded.
    let mut latest = std::collections::BTreeMap::new();
    for e in entries {
        latest.insert(path_of(&e).to_path_buf(), e);
    }
    let mut entries: Vec<Created> = latest.into_values().collect();
    entries.sort_by_key(|e| std::cmp::Reverse(path_of(e).components().count()));
    for e in &entries {
        let p = path_of(e);
        match still_ours(e) {
            Ok(true) => {
                let removed = if matches!(e, Created::Dir { .. }) { fs::remove_dir(p) } else { fs::remove_file(p) };
                match removed {
                    Ok(()) => report.removed.push(p.to_path_buf()),
                    Err(err) => report.left.push(LeftEntry { path: p.to_path_buf(), reason: err.to_string() }),
                }
            }
            Ok(false) => {}
            Err(reason) => report.left.push(LeftEntry { path: p.to_path_buf(), reason }),
        }
    }
    report
}

fn path_of(e: &Created) -> &Path {
    match e {
        Created::Dir { path } | Created::File { path, .. } | Created::Symlink { path, .. } => path,
    }
}

/// Whether the entry is still exactly what the restore created: `Ok(false)`
/// when it is gone, `Err(why)` when something else is there now.
fn still_ours(e: &Created) -> Result<bool, String> {
    let meta = match fs::symlink_metadata(path_of(e)) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err.to_string()),
        Ok(m) => m,
    };
    match e {
        Created::File { size, mtime, mtime_nsec, .. } => {
            if !meta.is_file() {
                return Err("no longer the restored file".into());
            }
            if meta.len() != *size || meta.mtime() != *mtime || meta.mtime_nsec() != i64::from(*mtime_nsec) {
                return Err("changed since it was restored".into());
            }
            Ok(true)
        }
        Created::Symlink { path, target } => {
            let same = meta.file_type().is_symlink()
                && fs::read_link(path).is_ok_and(|t| t.to_string_lossy() == target.as_str());
            if same {
                Ok(true)
            } else {
                Err("no longer the restored symlink".into())
            }
        }
        Created::Dir { path } => {
            if !meta.is_dir() {
                return Err("no longer a directory".into());
            }
            match fs::read_dir(path).map(|mut d| d.next().is_none()) {
                Ok(true) => Ok(true),
                Ok(false) => Err("holds entries the restore did not create".into()),
                Err(err) => Err(err.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_removes_only_what_is_still_as_restored() {
        let state = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(state.path()).unwrap();
        let dir = t.path().join("made");
        let kept_dir = t.path().join("shared");
        fs::create_dir_all(&kept_dir).unwrap();
        fs::write(kept_dir.join("precious"), b"user data").unwrap();
        fs::create_dir(&dir).unwrap();
        let file = |p: &Path, body: &[u8]| {
            fs::write(p, body).unwrap();
            let m = fs::metadata(p).unwrap();
            Created::File { path: p.to_owned(), size: m.len(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec() as u32 }
        };
        let a = file(&dir.join("a"), b"restored");
        let b = file(&kept_dir.join("b"), b"restored too");
        let c = file(&dir.join("c"), b"later edited");
        std::os::unix::fs::symlink("a", dir.join("l")).unwrap();
        j.record(&[Created::Dir { path: dir.clone() }, Created::Dir { path: kept_dir.clone() }]).unwrap();
        j.record(&[a, b, c, Created::Symlink { path: dir.join("l"), target: "a".into() }]).unwrap();
        fs::write(dir.join("c"), b"edited by the user, longer").unwrap();

        let r = wipe(state.path());
        assert!(!dir.join("a").exists() && !kept_dir.join("b").exists() && !dir.join("l").exists());
        assert_eq!(fs::read(dir.join("c")).unwrap(), b"edited by the user, longer");
        assert_eq!(fs::read(kept_dir.join("precious")).unwrap(), b"user data");
        assert!(dir.exists(), "not empty: the edited file is still in it");
        let left: Vec<_> = r.left.iter().map(|l| l.path.clone()).collect();
        assert!(left.contains(&dir.join("c")) && left.contains(&dir) && left.contains(&kept_dir), "{r:?}");
        assert_eq!(r.removed.len(), 3, "{r:?}");
    }
}
