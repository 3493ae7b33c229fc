//! Signed `RelayDescriptor` documents: the envelope and the body. One valid byte form, so
//! encode(decode(x)) == x; decoding never trusts an unverified body.
#![no_main]
use allium_directory::doc::{RelayDescriptor, Signed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = Signed::<RelayDescriptor>::from_bytes(data) else {
        return;
    };
    assert_eq!(signed.to_bytes(), data);
    let _ = signed.dangerously_decode_unverified();
    let _ = signed.verify();
});
