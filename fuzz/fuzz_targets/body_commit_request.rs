//! The `CommitRequest` (snapshot manifest) body parser must never panic,
//! what it accepts must survive a serialize/parse roundtrip, and it must
//! accept nothing the storage node could not store as a readable snapshot:
//! every path and tag within its bound, and the manifest size check (the
//! encoded snapshot below the read limit) must answer without panicking.
#![no_main]
use chunkvault::api::{
    parse_body, CommitRequest, Policies, MAX_HOSTNAME, MAX_MANIFEST_BODY, MAX_MANIFEST_PATH, MAX_MANIFEST_PATHS,
    MAX_TAG, MAX_TAGS,
};
use chunkvault::ingest::{check_manifest_size, Owner, TenantName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_body::<CommitRequest>(data, MAX_MANIFEST_BODY) {
        assert!(v.hostname.len() <= MAX_HOSTNAME);
        assert!(v.paths.len() <= MAX_MANIFEST_PATHS && v.paths.iter().all(|p| p.len() <= MAX_MANIFEST_PATH));
        assert!(v.tags.len() <= MAX_TAGS && v.tags.iter().all(|t| t.len() <= MAX_TAG));
        let owner = Owner {
            tenant: TenantName::new("acme").unwrap(),
            user: "a@acme.com".into(),
            device: "d".into(),
            policies: Policies::default(),
        };
        let _ = check_manifest_size(&owner, &v);
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_body::<CommitRequest>(&again, usize::MAX).unwrap(), v);
    }
});
