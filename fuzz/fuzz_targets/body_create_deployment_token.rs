//! The `CreateDeploymentToken` request body parser must never panic, and what it accepts
//! must survive a serialize/parse roundtrip.
#![no_main]
use chunkvault::api::{parse_body, CreateDeploymentToken, MAX_JSON_BODY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_body::<CreateDeploymentToken>(data, MAX_JSON_BODY) {
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_body::<CreateDeploymentToken>(&again, usize::MAX).unwrap(), v);
    }
});
