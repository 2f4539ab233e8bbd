//! The request bodies of scoped administration and quotas (`CreateAdminToken`,
//! `SetQuota`, the storage nodes' `CheckinRequest`) must never panic, and what
//! each accepts must survive a serialize/parse roundtrip.
#![no_main]
use chunkvault::api::{parse_body, CheckinRequest, CreateAdminToken, SetQuota, Validate, MAX_CHECKIN_BODY};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn roundtrip<T: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = parse_body::<T>(data, MAX_CHECKIN_BODY) {
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_body::<T>(&again, usize::MAX).unwrap(), v);
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<CreateAdminToken>(data);
    roundtrip::<SetQuota>(data);
    roundtrip::<CheckinRequest>(data);
});
