//! The `CommitRequest` request body parser must never panic, and what it accepts
//! must survive a serialize/parse roundtrip.
#![no_main]
use chunkvault::api::{parse_body, CommitRequest, MAX_MANIFEST_BODY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_body::<CommitRequest>(data, MAX_MANIFEST_BODY) {
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_body::<CommitRequest>(&again, usize::MAX).unwrap(), v);
    }
});
