//! The managed app configuration parser (what an MDM pushes to a device)
//! must never panic, must accept only configs whose fields it checked, and
//! what it accepts must survive a serialize/parse roundtrip.
#![no_main]
use chunkvault::api::{check_device_id, check_email};
use chunkvault::client::device::ManagedConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = ManagedConfig::parse(data) {
        assert!(c.server_url.starts_with("http://") || c.server_url.starts_with("https://"));
        assert!(check_email(&c.user_email).is_ok());
        assert!(c.device_id.as_deref().is_none_or(|d| check_device_id(d).is_ok()));
        let again = serde_json::to_vec(&c).unwrap();
        assert_eq!(ManagedConfig::parse(&again).unwrap(), c);
    }
});
