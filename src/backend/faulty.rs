//! A backend decorator that injects faults, for crash-safety tests.
//!
//! [`FaultyBackend`] forwards every call to the backend it wraps until a
//! [`Fault`] armed with [`FaultyBackend::inject`] says otherwise. The counters
//! [`FaultyBackend::puts`] and [`FaultyBackend::operations`] let a test
//! enumerate every write point of an operation: run it once without faults
//! to count, then rerun it failing at each point in turn
//! ([`Fault::FailPut`] with `nth = k`, or [`Fault::FailAfter`] with `ops = k`)
//! and check that the repository is still consistent.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Backend, BackendError, FileType, ObjectKey};

/// A fault to inject. Put faults count puts from when they are armed, and
/// each fires once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The nth put (0-based, counted from when the fault is armed) of the
    /// given file type (`None` = any) fails with an I/O error (EIO) without
    /// writing.
    FailPut {
        /// Which matching put fails, 0-based.
        nth: usize,
        /// Only puts of this type count; `None` counts every put.
        file_type: Option<FileType>,
    },
    /// The nth put fails with ENOSPC without writing (a full disk).
    NoSpace {
        /// Which matching put fails, 0-based.
        nth: usize,
        /// Only puts of this type count; `None` counts every put.
        file_type: Option<FileType>,
    },
    /// The nth put stores only the first `keep` bytes (a torn write, as a
    /// backend without atomic puts could leave) and then reports EIO. With
    /// `keep` at least the data's length the whole object is stored and the
    /// put still fails: the "it worked but the answer was lost" case.
    TornPut {
        /// Which matching put is torn, 0-based.
        nth: usize,
        /// Only puts of this type count; `None` counts every put.
        file_type: Option<FileType>,
        /// Bytes of the object that are stored.
        keep: usize,
    },
    /// Every operation after the first `ops` operations (counted from when
    /// the fault is armed) fails with [`BackendError::Injected`] without
    /// reaching the store: the "disk died" or "process crashed" model.
    FailAfter {
        /// Operations (of any kind) that still succeed.
        ops: usize,
    },
    /// Reads (`get`, `get_range`) of objects of this type return their bytes
    /// with the byte at `offset` (relative to the returned buffer, modulo its
    /// length) XORed with 0x01. The stored object is untouched.
    FlipOnRead {
        /// Reads of objects of this type are altered.
        file_type: FileType,
        /// Which byte of the returned buffer is flipped (modulo its length).
        offset: usize,
    },
    /// Reads (`get`, `get_range`) of objects of this type sleep for `millis`
    /// before answering, for timeout tests; use sparingly.
    Stall {
        /// Reads of objects of this type are delayed.
        file_type: FileType,
        /// The delay, in milliseconds.
        millis: u64,
    },
}

/// An armed fault and how many matching operations it has seen.
#[derive(Debug)]
struct Armed {
    fault: Fault,
    seen: usize,
}

/// What a put does, decided under the lock before the inner call.
enum PutPlan {
    Forward,
    Fail(io::Error),
    Tear(usize),
}

#[derive(Debug, Default)]
struct State {
    armed: Vec<Armed>,
    puts: usize,
    operations: usize,
}

impl State {
    /// Fails if a [`Fault::FailAfter`] has already let its quota through.
    fn check_alive(&self, op: &str, what: &str) -> Result<(), BackendError> {
        for armed in &self.armed {
            if let Fault::FailAfter { ops } = armed.fault {
                if armed.seen >= ops {
                    return Err(BackendError::Injected(format!(
                        "{op} {what}: the store is gone after {ops} operations"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Counts one operation about to be forwarded to the inner backend.
    fn forward(&mut self) {
        self.operations += 1;
        for armed in &mut self.armed {
            if let Fault::FailAfter { .. } = armed.fault {
                armed.seen += 1;
            }
        }
    }

    /// Counts a put of `file_type` against every put fault that matches it
    /// and returns what the first one to fire (in arming order) asks for.
    fn plan_put(&mut self, file_type: FileType) -> PutPlan {
        let mut plan = None;
        for armed in &mut self.armed {
            let (nth, only, action) = match armed.fault {
                Fault::FailPut { nth, file_type } => {
                    (nth, file_type, PutPlan::Fail(io::Error::from_raw_os_error(libc::EIO)))
                }
                Fault::NoSpace { nth, file_type } => {
                    (nth, file_type, PutPlan::Fail(io::Error::from_raw_os_error(libc::ENOSPC)))
                }
                Fault::TornPut { nth, file_type, keep } => (nth, file_type, PutPlan::Tear(keep)),
                _ => continue,
            };
            if only.is_some_and(|t| t != file_type) {
                continue;
            }
            if armed.seen == nth && plan.is_none() {
                plan = Some(action);
            }
            armed.seen += 1;
        }
        plan.unwrap_or(PutPlan::Forward)
    }
}

/// Wraps a backend and injects [`Fault`]s into its operations. Without
/// faults armed it is transparent (its location is the inner one's).
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    state: Mutex<State>,
}

/// The error an injected put fault reports: a real `io::Error`, so callers
/// see the same kind and OS error code as from a real disk.
fn injected_io(key: &ObjectKey, source: io::Error) -> BackendError {
    BackendError::Io { op: "put (injected fault)", key: key.path(), source }
}

impl FaultyBackend {
    /// Wraps `inner`, with no faults armed.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        FaultyBackend { inner, state: Mutex::new(State::default()) }
    }

    /// Arms `fault`; several may be armed at once.
    pub fn inject(&self, fault: Fault) {
        self.state().armed.push(Armed { fault, seen: 0 });
    }

    /// Disarms every fault. The counters of [`puts`](Self::puts) and
    /// [`operations`](Self::operations) go on.
    pub fn clear(&self) {
        self.state().armed.clear();
    }

    /// How many puts have succeeded (torn and failed ones excluded) since
    /// this backend was made.
    pub fn puts(&self) -> usize {
        self.state().puts
    }

    /// How many operations have been forwarded to the inner backend (whatever
    /// their outcome) since this backend was made; what
    /// [`Fault::FailAfter`] counts.
    pub fn operations(&self) -> usize {
        self.state().operations
    }

    /// The state; a panic elsewhere while holding the lock cannot leave it
    /// inconsistent, so a poisoned lock is used as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lets an operation other than put through to the inner backend, or
    /// fails it if the store is "gone".
    fn admit(&self, op: &str, what: &str) -> Result<(), BackendError> {
        let mut state = self.state();
        state.check_alive(op, what)?;
        state.forward();
        Ok(())
    }

    /// Admits a read of `key`, then applies the stalls armed for its type.
    fn admit_read(&self, op: &str, key: &ObjectKey) -> Result<(), BackendError> {
        self.admit(op, &key.path())?;
        let millis: u64 = self
            .state()
            .armed
            .iter()
            .filter_map(|armed| match armed.fault {
                Fault::Stall { file_type, millis } if file_type == key.file_type() => Some(millis),
                _ => None,
            })
            .sum();
        if millis > 0 {
            std::thread::sleep(Duration::from_millis(millis));
        }
        Ok(())
    }

    /// Applies the byte flips armed for `key`'s type to bytes read from it.
    fn corrupt(&self, key: &ObjectKey, mut data: Vec<u8>) -> Vec<u8> {
        if data.is_empty() {
            return data;
        }
        for armed in &self.state().armed {
            if let Fault::FlipOnRead { file_type, offset } = armed.fault {
                if file_type == key.file_type() {
                    let i = offset % data.len();
                    data[i] ^= 0x01;
                }
            }
        }
        data
    }
}

impl Backend for FaultyBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), BackendError> {
        let plan = {
            let mut state = self.state();
            state.check_alive("put", &key.path())?;
            let plan = state.plan_put(key.file_type());
            if !matches!(plan, PutPlan::Fail(_)) {
                state.forward();
            }
            plan
        };
        match plan {
            PutPlan::Fail(source) => Err(injected_io(key, source)),
            PutPlan::Tear(keep) => {
                self.inner.put(key, &data[..keep.min(data.len())])?;
                Err(injected_io(key, io::Error::from_raw_os_error(libc::EIO)))
            }
            PutPlan::Forward => {
                self.inner.put(key, data)?;
                self.state().puts += 1;
                Ok(())
            }
        }
    }

    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, BackendError> {
        self.admit_read("get", key)?;
        let data = self.inner.get(key)?;
        Ok(self.corrupt(key, data))
    }

    fn get_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        self.admit_read("get_range", key)?;
        let data = self.inner.get_range(key, offset, len)?;
        Ok(self.corrupt(key, data))
    }

    fn size(&self, key: &ObjectKey) -> Result<u64, BackendError> {
        self.admit("size", &key.path())?;
        self.inner.size(key)
    }

    fn list(&self, file_type: FileType) -> Result<Vec<(ObjectKey, u64)>, BackendError> {
        self.admit("list", &format!("{file_type:?}"))?;
        self.inner.list(file_type)
    }

    fn remove(&self, key: &ObjectKey) -> Result<(), BackendError> {
        self.admit("remove", &key.path())?;
        self.inner.remove(key)
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::backend::local::tests::plant_junk;
    use crate::backend::{conformance, LocalBackend};
    use crate::id::{IndexId, KeyId, PackId, SnapshotId};

    /// A faulty backend over a fresh local repository, and the local
    /// repository itself to look behind the faults.
    fn setup() -> (tempfile::TempDir, Arc<LocalBackend>, FaultyBackend) {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBackend::create(&dir.path().join("repo")).unwrap());
        let faulty = FaultyBackend::new(local.clone());
        (dir, local, faulty)
    }

    fn pack() -> ObjectKey {
        ObjectKey::Pack(PackId::random())
    }

    fn raw_os_error(err: &BackendError) -> Option<i32> {
        match err {
            BackendError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    #[test]
    fn conformance_without_faults() {
        let (_dir, local, faulty) = setup();
        plant_junk(local.root());
        conformance(&faulty);
        assert_eq!(faulty.location(), local.location());
    }

    #[test]
    fn fail_put_fails_only_the_nth_put() {
        let (_dir, local, faulty) = setup();
        faulty.inject(Fault::FailPut { nth: 2, file_type: None });
        let keys: Vec<ObjectKey> = (0..4).map(|_| pack()).collect();
        let results: Vec<_> = keys.iter().map(|k| faulty.put(k, b"data")).collect();
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
        let err = results[2].as_ref().unwrap_err();
        assert_eq!(raw_os_error(err), Some(libc::EIO), "{err}");
        assert!(!crate::backend::exists(local.as_ref(), &keys[2]).unwrap());
        assert_eq!(faulty.puts(), 3);
    }

    #[test]
    fn put_faults_count_only_their_file_type() {
        let (_dir, local, faulty) = setup();
        faulty.inject(Fault::FailPut { nth: 1, file_type: Some(FileType::Snapshot) });
        faulty.put(&ObjectKey::Snapshot(SnapshotId::random()), b"s0").unwrap();
        for _ in 0..3 {
            faulty.put(&pack(), b"pack").unwrap();
        }
        let snapshot = ObjectKey::Snapshot(SnapshotId::random());
        assert!(faulty.put(&snapshot, b"s1").is_err());
        faulty.put(&ObjectKey::Snapshot(SnapshotId::random()), b"s2").unwrap();
        assert_eq!(local.list(FileType::Snapshot).unwrap().len(), 2);
    }

    #[test]
    fn no_space_reports_enospc() {
        let (_dir, local, faulty) = setup();
        faulty.inject(Fault::NoSpace { nth: 0, file_type: Some(FileType::Pack) });
        let key = pack();
        let err = faulty.put(&key, b"data").unwrap_err();
        assert_eq!(raw_os_error(&err), Some(libc::ENOSPC), "{err}");
        assert!(err.to_string().contains(&key.path()), "{err}");
        assert_eq!(local.list(FileType::Pack).unwrap(), vec![]);
        faulty.put(&key, b"data").unwrap();
    }

    #[test]
    fn torn_put_stores_a_prefix_and_fails() {
        let (_dir, local, faulty) = setup();
        faulty.inject(Fault::TornPut { nth: 0, file_type: None, keep: 10 });
        let key = ObjectKey::Index(IndexId::random());
        let data: Vec<u8> = (0..100).collect();
        let err = faulty.put(&key, &data).unwrap_err();
        assert_eq!(raw_os_error(&err), Some(libc::EIO), "{err}");
        assert_eq!(local.get(&key).unwrap(), &data[..10]);
        assert_eq!(faulty.puts(), 0);
    }

    #[test]
    fn fail_after_blocks_everything_later() {
        let (_dir, local, faulty) = setup();
        let stored = pack();
        faulty.put(&stored, b"before").unwrap();
        faulty.inject(Fault::FailAfter { ops: 2 });
        faulty.get(&stored).unwrap();
        faulty.list(FileType::Pack).unwrap();
        let late = pack();
        let errors = [
            faulty.put(&late, b"late").unwrap_err(),
            faulty.get(&stored).unwrap_err(),
            faulty.get_range(&stored, 0, 1).unwrap_err(),
            faulty.size(&stored).unwrap_err(),
            faulty.list(FileType::Pack).unwrap_err(),
            faulty.remove(&stored).unwrap_err(),
        ];
        for err in &errors {
            assert!(matches!(err, BackendError::Injected(_)), "{err}");
        }
        // Nothing after the quota reached the store.
        assert_eq!(local.list(FileType::Pack).unwrap(), vec![(stored, 6)]);
        assert_eq!(faulty.operations(), 3);
        faulty.clear();
        faulty.put(&late, b"late").unwrap();
    }

    #[test]
    fn flip_on_read_changes_exactly_one_byte() {
        let (_dir, local, faulty) = setup();
        let key = ObjectKey::Index(IndexId::random());
        let data: Vec<u8> = (0..50).collect();
        faulty.put(&key, &data).unwrap();
        let other = ObjectKey::Key(KeyId::random());
        faulty.put(&other, &data).unwrap();
        faulty.inject(Fault::FlipOnRead { file_type: FileType::Index, offset: 57 });

        let read = faulty.get(&key).unwrap();
        let differing: Vec<usize> = (0..data.len()).filter(|&i| read[i] != data[i]).collect();
        assert_eq!(differing, vec![7]);
        assert_eq!(read[7], data[7] ^ 0x01);

        let range = faulty.get_range(&key, 20, 10).unwrap();
        let differing: Vec<usize> = (0..10).filter(|&i| range[i] != data[20 + i]).collect();
        assert_eq!(differing, vec![7]);

        assert_eq!(faulty.get(&other).unwrap(), data);
        assert_eq!(local.get(&key).unwrap(), data);
    }

    #[test]
    fn stall_delays_reads_of_its_type() {
        let (_dir, _local, faulty) = setup();
        let key = ObjectKey::Snapshot(SnapshotId::random());
        faulty.put(&key, b"snapshot").unwrap();
        faulty.inject(Fault::Stall { file_type: FileType::Snapshot, millis: 50 });
        let start = Instant::now();
        assert_eq!(faulty.get(&key).unwrap(), b"snapshot");
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn faults_count_from_arming_and_clear_disarms() {
        let (_dir, _local, faulty) = setup();
        faulty.put(&pack(), b"a").unwrap();
        faulty.put(&pack(), b"b").unwrap();
        faulty.inject(Fault::FailPut { nth: 0, file_type: None });
        assert!(faulty.put(&pack(), b"c").is_err());
        faulty.put(&pack(), b"d").unwrap();
        faulty.inject(Fault::FailPut { nth: 1, file_type: None });
        faulty.clear();
        faulty.put(&pack(), b"e").unwrap();
        faulty.put(&pack(), b"f").unwrap();
        assert_eq!(faulty.puts(), 5);
        assert_eq!(faulty.operations(), 5);
    }

    /// The pattern crash tests follow: count the write points of a workload,
    /// then fail each one in turn.
    #[test]
    fn every_write_point_can_be_failed() {
        fn workload(b: &dyn Backend) -> Result<(), BackendError> {
            for i in 0..3u8 {
                b.put(&ObjectKey::Pack(PackId::random()), &[i; 64])?;
            }
            b.put(&ObjectKey::Index(IndexId::random()), b"index")?;
            b.put(&ObjectKey::Snapshot(SnapshotId::random()), b"snapshot")
        }
        let (_dir, _local, faulty) = setup();
        workload(&faulty).unwrap();
        let points = faulty.puts();
        assert_eq!(points, 5);
        for k in 0..points {
            let (_dir, local, faulty) = setup();
            faulty.inject(Fault::FailPut { nth: k, file_type: None });
            assert!(workload(&faulty).is_err());
            assert_eq!(faulty.puts(), k);
            let stored: usize = [FileType::Pack, FileType::Index, FileType::Snapshot]
                .into_iter()
                .map(|t| local.list(t).unwrap().len())
                .sum();
            assert_eq!(stored, k);
        }
    }
}
