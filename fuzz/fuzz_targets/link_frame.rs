//! Link framing: the length prefixes of handshake and transport frames and the frame splitter.
#![no_main]
use allium_proto::link::{handshake_msg_len, split_transport_frame, transport_frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.first_chunk::<2>() {
        if let Ok(n) = handshake_msg_len(*prefix) {
            assert!(n >= 1);
        }
        let _ = transport_frame_len(*prefix);
    }
    // Split frames off the stream the way the link reader does; every frame lies inside the
    // input, consumes its prefix, and a frame length is accepted only if valid.
    let mut rest = data;
    while let Ok(Some((msg, used))) = split_transport_frame(rest) {
        assert_eq!(used, msg.len() + 2);
        assert!(used <= rest.len());
        let prefix = rest.first_chunk::<2>().copied().unwrap_or_default();
        assert_eq!(transport_frame_len(prefix).ok(), Some(msg.len()));
        rest = &rest[used..];
    }
});
