//! Known-answer vectors for 3-hop forward and backward cells: fixed chain keys, fixed padding.
//! Recomputed independently by `tools/vectors/crosscheck.py`.
//!
//! Hop `j` (1-based) has `CK_f = 32 x (0xf0 + j)` and `CK_b = 32 x (0xb0 + j)`. Padding byte `i` of
//! a padding region is `(7i + 0x5a) mod 256`. Link commands: RELAY = 3, RELAY_EARLY = 4.
//!
//! Forward (client → hop): F1 to hop 3, F2 to hop 1, F3 to hop 2 (934 data bytes), F4 to hop 3 as
//! RELAY_EARLY. Backward (hop → client, as the client receives it): B1 from hop 3, B2 from hop 1,
//! B3 from hop 2, B4 from hop 3. Hop 1 sees 4 cells each way, so a ratchet step boundary is crossed.

use super::test_hooks::set_fixed_padding;
use super::*;

fn hop_keys(j: u8) -> HopKeys {
    HopKeys::dangerously_from_parts([0xf0 + j; 32], [0xb0 + j; 32], [0; 32])
}

/// `(dest hop 0-based, link cmd, relay message hex)`.
pub(super) fn forward_inputs() -> Vec<(usize, u8, Vec<u8>)> {
    let mut big = hex::decode("02000303a6").unwrap();
    big.extend((0..934u32).map(|i| (i & 0xff) as u8));
    vec![
        (2, 3, hex::decode("020001000568656c6c6f").unwrap()),
        (0, 3, hex::decode("0200020003616263").unwrap()),
        (1, 3, big),
        (2, 4, hex::decode("0e00000000").unwrap()),
    ]
}

/// `(origin hop 0-based, relay message)`; link cmd RELAY.
pub(super) fn backward_inputs() -> Vec<(usize, Vec<u8>)> {
    vec![
        (2, hex::decode("0200010005776f726c64").unwrap()),
        (0, hex::decode("02000200026f6b").unwrap()),
        (1, hex::decode("0300010001ff").unwrap()),
        (2, hex::decode("0200010000").unwrap()),
    ]
}

include!("kat_vectors.rs");

#[test]
fn three_hop_known_answers() {
    set_fixed_padding(true);
    let mut client = ClientCircuitCrypto::new();
    let mut relays: Vec<RelayHopCrypto> = Vec::new();
    for j in 1..=3 {
        client.add_hop(&hop_keys(j)).unwrap();
        relays.push(RelayHopCrypto::new(&hop_keys(j)));
    }
    let mut got_fwd = Vec::new();
    for (dest, cmd, msg) in forward_inputs() {
        let mut body = [0u8; CELL_BODY_LEN];
        let tag = client.encrypt_forward(dest, cmd, &msg, &mut body).unwrap();
        got_fwd.push(hex::encode(body));
        for (j, r) in relays.iter_mut().enumerate() {
            match r.decrypt_forward(cmd, &mut body).unwrap() {
                Forward::Recognized { tag: t } => {
                    assert_eq!((j, t), (dest, tag));
                    assert_eq!(&body[FORWARD_MSG_OFFSET..][..msg.len()], &msg[..]);
                    break;
                }
                Forward::Pass => assert!(j < dest),
            }
        }
    }
    let mut got_bwd = Vec::new();
    for (origin, msg) in backward_inputs() {
        let mut body = [0u8; CELL_BODY_LEN];
        let tag = relays[origin].encrypt_backward(3, &msg, &mut body).unwrap();
        for r in relays[..origin].iter_mut().rev() {
            r.relay_backward(&mut body).unwrap();
        }
        got_bwd.push(hex::encode(body));
        assert_eq!(
            client.decrypt_backward(3, &mut body).unwrap(),
            (origin, tag)
        );
        assert_eq!(&body[BACKWARD_MSG_OFFSET..][..msg.len()], &msg[..]);
    }
    set_fixed_padding(false);
    if std::env::var_os("ALLIUM_PRINT_VECTORS").is_some() {
        for (i, v) in got_fwd.iter().enumerate() {
            println!("F{} {v}", i + 1);
        }
        for (i, v) in got_bwd.iter().enumerate() {
            println!("B{} {v}", i + 1);
        }
    }
    let want_fwd = [KAT_F1, KAT_F2, KAT_F3, KAT_F4];
    let want_bwd = [KAT_B1, KAT_B2, KAT_B3, KAT_B4];
    for (i, (g, w)) in got_fwd.iter().zip(want_fwd).enumerate() {
        assert_eq!(g, &w.concat(), "forward vector F{}", i + 1);
    }
    for (i, (g, w)) in got_bwd.iter().zip(want_bwd).enumerate() {
        assert_eq!(g, &w.concat(), "backward vector B{}", i + 1);
    }
}
