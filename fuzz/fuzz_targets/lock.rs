//! Lock files are read from a shared store: they must never panic, and
//! whatever decodes must re-encode to the same lock.
#![no_main]
use chunkvault::lock::LockFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = LockFile::decode(data) {
        assert_eq!(LockFile::decode(&l.encode()).unwrap(), l);
    }
});
