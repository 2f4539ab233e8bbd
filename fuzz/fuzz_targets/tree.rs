//! Tree decoding must never panic, whatever the bytes, and whatever it
//! accepts must survive a roundtrip: the encoding is canonical.
#![no_main]
use chunkvault::tree::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = Tree::decode(data) {
        let encoded = tree.encode();
        assert_eq!(encoded, data, "a decoded tree re-encodes to the same bytes");
        assert_eq!(
            Tree::decode(&encoded).expect("a re-encoded tree decodes"),
            tree
        );
    }
});
