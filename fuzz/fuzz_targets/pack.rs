//! Pack parsing: table, trailer, frames and the keyless scrub must never
//! panic, whatever the bytes.
#![no_main]
use chunkvault::crypto::MasterKey;
use chunkvault::pack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([7; 32]);
    let _ = pack::read_table(&key, data);
    let _ = pack::scrub(data);
    let _ = pack::parse_header(data);
    if data.len() >= pack::TRAILER_LEN {
        let _ = pack::parse_trailer(&data[data.len() - pack::TRAILER_LEN..], data.len() as u64);
    }
    if data.len() >= 4 {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap());
        let _ = pack::check_frame(data, 0, len);
    }
});
