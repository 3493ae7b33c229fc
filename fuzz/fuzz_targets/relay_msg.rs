//! Every relay message (BEGIN ... EXTENDED and unrecognized commands): the full region decoder
//! and the per-command body decoder, with decode(encode(x)) == x.
#![no_main]
use allium_crypto::relaycell::RELAY_MSG_LEN;
use allium_proto::relaymsg::{RelayCmd, RelayMsg};
use libfuzzer_sys::fuzz_target;

fn roundtrip(sid: u16, msg: &RelayMsg) {
    let mut buf = [0u8; RELAY_MSG_LEN];
    // A decoded message may be unencodable only if it does not fit; then nothing to compare.
    if let Ok(n) = msg.encode(sid, &mut buf) {
        let (sid2, again) = RelayMsg::decode(&buf[..n]).expect("re-decode an encoded message");
        assert_eq!(sid2, sid);
        assert_eq!(&again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((sid, msg)) = RelayMsg::decode(data) {
        roundtrip(sid, &msg);
    }
    // Body decoder with a fuzzer-chosen command (reaches every body parser directly).
    if let Some((&cmd, body)) = data.split_first() {
        let cmd = RelayCmd(cmd);
        if let Ok(msg) = RelayMsg::decode_body(cmd, body) {
            let sid = match cmd.stream_id_rule() {
                allium_proto::relaymsg::StreamIdRule::Zero => 0,
                _ => 1,
            };
            roundtrip(sid, &msg);
        }
    }
});
