//! Index segment decoding must never panic, whatever the bytes, and whatever
//! it accepts must survive a roundtrip: the encoding is canonical.
#![no_main]
use chunkvault::index::IndexSegment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(segment) = IndexSegment::decode(data) {
        let encoded = segment.encode();
        assert_eq!(
            encoded, data,
            "a decoded segment re-encodes to the same bytes"
        );
        assert_eq!(
            IndexSegment::decode(&encoded).expect("a re-encoded segment decodes"),
            segment
        );
    }
});
