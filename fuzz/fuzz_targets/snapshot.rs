//! Snapshot manifests, sealed objects and key files must never panic on
//! hostile input.
#![no_main]
use chunkvault::crypto::{MasterKey, Role};
use chunkvault::repo::{Config, KeyFile};
use chunkvault::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data) {
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }
    let _ = Config::decode(data);
    let _ = KeyFile::decode(data);
    let key = MasterKey::from_bytes([9; 32]);
    let _ = key.open_object(Role::Snapshot, data);
});
