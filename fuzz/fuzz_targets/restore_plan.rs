//! A restore plan is what a (possibly hostile) storage node tells a device
//! to create: whatever it sends, the plan the device accepts names only
//! paths inside the restore target.
#![no_main]
use std::path::Component;

use chunkvault::api::RestorePlanResponse;
use chunkvault::client::device::plan_from_wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = serde_json::from_slice::<RestorePlanResponse>(data) else { return };
    if let Ok(plan) = plan_from_wire(wire.entries) {
        for e in plan.dirs.iter().chain(&plan.files).chain(&plan.symlinks) {
            assert!(!e.rel.as_os_str().is_empty());
            assert!(e.rel.components().all(|c| matches!(c, Component::Normal(_))), "{:?}", e.rel);
        }
    }
});
