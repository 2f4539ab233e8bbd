//! The token parsers (session tokens, deployment and device tokens) must
//! never panic, and must never accept bytes the key did not sign.
#![no_main]
use chunkvault::auth::token::{secret_hash, SecretKind, SessionSigner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let verifier = SessionSigner::new([7; 32]).verifier();
    assert!(verifier.verify(text, 0).is_err(), "accepted an unsigned token");
    let _ = secret_hash(SecretKind::Deployment, text);
    let _ = secret_hash(SecretKind::Device, text);
});
