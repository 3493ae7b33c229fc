//! The circuit handshake messages: the onionskin (relay side), the reply (client side) and the
//! TLV lists carried inside them.
#![no_main]
use allium_crypto::handshake::{client_start, relay_respond, tlv};
use allium_fuzz::{OWN, onion_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let key = onion_key();
    match sel % 3 {
        0 => {
            // A hostile onionskin: must fail cleanly unless it is a real one.
            let _ = relay_respond(&OWN, &[&key], rest, |cm| {
                let _ = tlv::parse(cm);
                Vec::new()
            });
        }
        1 => {
            // A hostile reply to a real onionskin.
            let (hs, _skin) = client_start(&OWN, &key.public(), &[]).expect("client_start");
            assert!(hs.finish(rest).is_err(), "a random reply was accepted");
        }
        _ => {
            if let Ok(entries) = tlv::parse(rest) {
                assert_eq!(tlv::encode(&entries).ok().as_deref(), Some(rest));
            }
        }
    }
});
