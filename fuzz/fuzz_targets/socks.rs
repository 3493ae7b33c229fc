//! The SOCKS4/4a/5 server handshake, fed in fuzzer-chosen pieces.
#![no_main]
use allium_client::socks::handshake::ServerHandshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut hs = ServerHandshake::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + step).min(input.len());
        let was_done = hs.is_done();
        let p = hs.handle(&input[pos..end]);
        assert!(p.consumed <= end - pos);
        if was_done {
            assert_eq!(p.consumed, 0, "a finished handshake consumed input");
            assert!(p.outcome.is_none());
            break;
        }
        if p.outcome.is_some() {
            assert!(hs.is_done());
        }
        if p.consumed == 0 && !hs.is_done() && end - pos > 0 {
            // It keeps a partial message; the next piece continues it.
        }
        pos = end;
    }
});
