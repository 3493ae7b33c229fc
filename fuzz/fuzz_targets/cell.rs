//! Link cells (1024 bytes) and the CREATE, CREATED and DESTROY bodies: decode(encode(x)) == x.
#![no_main]
use allium_proto::cell::{Cell, Create, Created, Destroy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cell) = Cell::decode(data) {
        // One valid byte form: re-encoding gives back the input.
        assert_eq!(&cell.to_bytes()[..], data);
    }
    // The bodies, from the input itself (any length).
    if let Ok(c) = Create::decode(data) {
        let mut body = Box::new([0u8; 1019]);
        if c.encode(&mut body).is_ok() {
            assert_eq!(Create::decode(&body[..]).ok(), Some(c));
        }
    }
    if let Ok(c) = Created::decode(data) {
        let mut body = Box::new([0u8; 1019]);
        if c.encode(&mut body).is_ok() {
            assert_eq!(Created::decode(&body[..]).ok(), Some(c));
        }
    }
    if let Ok(d) = Destroy::decode(data) {
        let mut body = Box::new([0u8; 1019]);
        d.encode(&mut body);
        assert_eq!(Destroy::decode(&body[..]).ok(), Some(d));
    }
});
