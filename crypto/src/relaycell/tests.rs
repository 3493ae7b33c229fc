//! Relay-cell tests: round trips, tagging, cmd flips, drop/reorder/replay, backward tampering,
//! nonce uniqueness, counter exhaustion, known-answer vectors and no-panic properties.

use std::cell::Cell;

use proptest::prelude::*;
use rand::SeedableRng as _;

use super::*;
use crate::aead::nonce_log;

const RELAY: u8 = 3;
const RELAY_EARLY: u8 = 4;

fn hop_keys(i: u8) -> HopKeys {
    HopKeys::dangerously_from_parts([i; 32], [i.wrapping_add(0x40); 32], [0; 32])
}

/// A client and `n` relays sharing fixed keys.
fn circuit(n: u8) -> (ClientCircuitCrypto, Vec<RelayHopCrypto>) {
    let mut client = ClientCircuitCrypto::new();
    let mut relays = Vec::new();
    for i in 1..=n {
        let k = hop_keys(i);
        client.add_hop(&k).unwrap();
        relays.push(RelayHopCrypto::new(&k));
    }
    (client, relays)
}

/// Run a forward cell through the relays; returns the hop that recognized it and the tag.
/// `handled` counts how many times each hop's crypto was invoked.
fn deliver_forward(
    relays: &mut [RelayHopCrypto],
    cmd: u8,
    body: &mut CellBody,
    handled: &[Cell<u32>],
) -> Result<(usize, Tag), CryptoError> {
    for (j, r) in relays.iter_mut().enumerate() {
        handled[j].set(handled[j].get() + 1);
        match r.decrypt_forward(cmd, body)? {
            Forward::Recognized { tag } => return Ok((j, tag)),
            Forward::Pass => {}
        }
    }
    Err(CryptoError::NoSuchHop)
}

/// Originate a backward cell at `hop` and layer it through the hops before it.
fn send_backward(relays: &mut [RelayHopCrypto], hop: usize, msg: &[u8]) -> (CellBody, Tag) {
    let mut body = [0u8; CELL_BODY_LEN];
    let t = relays[hop].encrypt_backward(RELAY, msg, &mut body).unwrap();
    for r in relays[..hop].iter_mut().rev() {
        r.relay_backward(&mut body).unwrap();
    }
    (body, t)
}

fn counters() -> Vec<Cell<u32>> {
    (0..MAX_HOPS).map(|_| Cell::new(0)).collect()
}

fn relay_msg(rng: &mut impl rand::Rng, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; 5 + len];
    rng.fill_bytes(&mut m);
    m[3..5].copy_from_slice(&(len as u16).to_be_bytes());
    m
}

#[test]
fn round_trips_all_hops_interleaved() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (mut client, mut relays) = circuit(3);
    let h = counters();
    for round in 0..5 {
        for dest in 0..3 {
            let len = rng.random_range(0..=MAX_DATA);
            let m = relay_msg(&mut rng, len);
            let mut body = [0u8; CELL_BODY_LEN];
            let cmd = if rng.random() { RELAY } else { RELAY_EARLY };
            let t = client.encrypt_forward(dest, cmd, &m, &mut body).unwrap();
            let (got, tag) = deliver_forward(&mut relays, cmd, &mut body, &h).unwrap();
            assert_eq!((got, tag), (dest, t));
            assert_eq!(&body[TAG_LEN..FORWARD_MSG_OFFSET], &[0u8; 16]);
            assert_eq!(&body[FORWARD_MSG_OFFSET..][..m.len()], &m[..]);

            // A backward cell in between, from every hop in every round.
            let from = (dest + round) % 3;
            let len = rng.random_range(0..=MAX_DATA);
            let m = relay_msg(&mut rng, len);
            let (mut body, t) = send_backward(&mut relays, from, &m);
            let (got, tag) = client.decrypt_backward(RELAY, &mut body).unwrap();
            assert_eq!((got, tag), (from, t));
            assert_eq!(&body[BACKWARD_MSG_OFFSET..][..m.len()], &m[..]);
        }
    }
    // Full-size messages.
    let m = vec![0xee; RELAY_MSG_LEN];
    let mut body = [0u8; CELL_BODY_LEN];
    client.encrypt_forward(2, RELAY, &m, &mut body).unwrap();
    assert_eq!(
        deliver_forward(&mut relays, RELAY, &mut body, &h)
            .unwrap()
            .0,
        2
    );
    assert_eq!(&body[FORWARD_MSG_OFFSET..][..RELAY_MSG_LEN], &m[..]);
    // Too long.
    let m = vec![0; RELAY_MSG_LEN + 1];
    assert!(matches!(
        client.encrypt_forward(0, RELAY, &m, &mut body),
        Err(CryptoError::MessageTooLong { .. })
    ));
    assert!(matches!(
        relays[0].encrypt_backward(RELAY, &m, &mut body),
        Err(CryptoError::MessageTooLong { .. })
    ));
    assert!(matches!(
        client.encrypt_forward(3, RELAY, b"", &mut body),
        Err(CryptoError::NoSuchHop)
    ));
}

#[test]
fn four_hops_and_no_fifth() {
    let (mut client, mut relays) = circuit(4);
    let h = counters();
    for dest in 0..4 {
        let mut body = [0u8; CELL_BODY_LEN];
        let t = client
            .encrypt_forward(dest, RELAY, b"x", &mut body)
            .unwrap();
        assert_eq!(
            deliver_forward(&mut relays, RELAY, &mut body, &h).unwrap(),
            (dest, t)
        );
        let (mut body, t) = send_backward(&mut relays, dest, b"y");
        assert_eq!(
            client.decrypt_backward(RELAY, &mut body).unwrap(),
            (dest, t)
        );
    }
    assert!(matches!(
        client.add_hop(&hop_keys(9)),
        Err(CryptoError::TooManyHops { .. })
    ));
}

/// The tagging attack: hop 1 flips any one bit of a cell for hop 3. Hop 2 must fail, hop 3 must
/// never see the cell, and the circuit is destroyed (the `Err` that the relay turns into DESTROY).
#[test]
fn tagging_every_bit_position_is_caught_at_next_hop() {
    let (mut client, mut relays) = circuit(3);
    let mut templ = [0u8; CELL_BODY_LEN];
    client
        .encrypt_forward(2, RELAY, b"\x02\x00\x01\x00\x03abc", &mut templ)
        .unwrap();
    // Hop 1 processes the genuine cell once; every trial restarts hop 2 from the same state.
    let mut after_hop1 = templ;
    assert_eq!(
        relays[0].decrypt_forward(RELAY, &mut after_hop1).unwrap(),
        Forward::Pass
    );
    let hop2_keys = hop_keys(2);
    let hop3_calls = Cell::new(0u32);
    let mut failures = 0u32;
    for bit in 0..CELL_BODY_LEN * 8 {
        let mut body = after_hop1;
        body[bit / 8] ^= 1 << (bit % 8);
        let mut hop2 = RelayHopCrypto::new(&hop2_keys);
        let mut hop3 = RelayHopCrypto::new(&hop_keys(3));
        let r = hop2.decrypt_forward(RELAY, &mut body);
        match r {
            Err(CryptoError::CellAuthFailed) => {
                failures += 1;
                // The relay turns this Err into DESTROY both ways; the poisoned state stays dead.
                assert!(hop2.decrypt_forward(RELAY, &mut body).is_err());
            }
            other => {
                hop3_calls.set(hop3_calls.get() + 1);
                let _ = hop3.decrypt_forward(RELAY, &mut body);
                panic!("bit {bit}: hop 2 accepted a tagged cell: {other:?}");
            }
        }
    }
    assert_eq!(failures as usize, CELL_BODY_LEN * 8);
    assert_eq!(hop3_calls.get(), 0);
    // Control: the untouched cell goes through hop 2 to hop 3.
    let mut body = after_hop1;
    let mut hop2 = RelayHopCrypto::new(&hop2_keys);
    let mut hop3 = RelayHopCrypto::new(&hop_keys(3));
    assert_eq!(
        hop2.decrypt_forward(RELAY, &mut body).unwrap(),
        Forward::Pass
    );
    assert!(matches!(
        hop3.decrypt_forward(RELAY, &mut body).unwrap(),
        Forward::Recognized { .. }
    ));
}

/// The same attack through the full chain with a counting mock of hop 3's handler.
#[test]
fn tagging_through_chain_never_reaches_hop3() {
    let h = counters();
    for bit in 0..CELL_BODY_LEN * 8 {
        let (mut client, mut relays) = circuit(3);
        let mut body = [0u8; CELL_BODY_LEN];
        client
            .encrypt_forward(2, RELAY, b"data", &mut body)
            .unwrap();
        h[0].set(h[0].get() + 1);
        assert_eq!(
            relays[0].decrypt_forward(RELAY, &mut body).unwrap(),
            Forward::Pass
        );
        body[bit / 8] ^= 1 << (bit % 8);
        let r = deliver_forward(&mut relays[1..], RELAY, &mut body, &h[1..]);
        assert!(matches!(r, Err(CryptoError::CellAuthFailed)), "bit {bit}");
    }
    assert!(h[1].get() > 0);
    assert_eq!(h[2].get(), 0, "hop 3's handler was called");
}

#[test]
fn cmd_flip_after_hop1_fails_at_hop2() {
    for (sent, flipped) in [(RELAY, RELAY_EARLY), (RELAY_EARLY, RELAY)] {
        let (mut client, mut relays) = circuit(3);
        let mut body = [0u8; CELL_BODY_LEN];
        client.encrypt_forward(2, sent, b"x", &mut body).unwrap();
        assert_eq!(
            relays[0].decrypt_forward(sent, &mut body).unwrap(),
            Forward::Pass
        );
        assert!(relays[1].decrypt_forward(flipped, &mut body).is_err());
    }
}

#[test]
fn drop_reorder_replay_at_hop1_fail_at_hop2() {
    let make = || {
        let (mut client, relays) = circuit(3);
        let mut a = [0u8; CELL_BODY_LEN];
        let mut b = [0u8; CELL_BODY_LEN];
        client.encrypt_forward(2, RELAY, b"a", &mut a).unwrap();
        client.encrypt_forward(2, RELAY, b"b", &mut b).unwrap();
        (relays, a, b)
    };
    // Drop: hop 1 processes a and b but forwards only b.
    let (mut r, mut a, mut b) = make();
    r[0].decrypt_forward(RELAY, &mut a).unwrap();
    r[0].decrypt_forward(RELAY, &mut b).unwrap();
    assert!(r[1].decrypt_forward(RELAY, &mut b).is_err());
    // Reorder: b before a.
    let (mut r, mut a, mut b) = make();
    r[0].decrypt_forward(RELAY, &mut a).unwrap();
    r[0].decrypt_forward(RELAY, &mut b).unwrap();
    assert!(r[1].decrypt_forward(RELAY, &mut b).is_err());
    // Replay: a twice.
    let (mut r, mut a, _) = make();
    r[0].decrypt_forward(RELAY, &mut a).unwrap();
    let a2 = a;
    r[1].decrypt_forward(RELAY, &mut a).unwrap();
    let mut a2 = a2;
    assert!(r[1].decrypt_forward(RELAY, &mut a2).is_err());
    // Replay at hop 1 itself (a cell fed twice into hop 1).
    let (mut r, a, _) = make();
    let mut x = a;
    let mut y = a;
    r[0].decrypt_forward(RELAY, &mut x).unwrap();
    assert!(r[0].decrypt_forward(RELAY, &mut y).is_err());
}

#[test]
fn backward_tamper_is_rejected_by_client() {
    for origin in 0..3 {
        for (pos, at_middle) in [(0usize, false), (17, false), (500, true), (1018, true)] {
            let (mut client, mut relays) = circuit(3);
            let mut body = [0u8; CELL_BODY_LEN];
            relays[origin]
                .encrypt_backward(RELAY, b"msg", &mut body)
                .unwrap();
            if !at_middle {
                body[pos] ^= 0x80;
            }
            for (j, r) in relays[..origin].iter_mut().enumerate().rev() {
                r.relay_backward(&mut body).unwrap();
                if at_middle && j == origin.saturating_sub(1) {
                    body[pos] ^= 0x01;
                }
            }
            if at_middle && origin == 0 {
                body[pos] ^= 0x01;
            }
            assert!(client.decrypt_backward(RELAY, &mut body).is_err());
            // The circuit is dead afterwards.
            let mut b2 = [0u8; CELL_BODY_LEN];
            assert!(client.encrypt_forward(0, RELAY, b"", &mut b2).is_err());
        }
    }
    // Wrong cmd on the backward cell.
    let (mut client, mut relays) = circuit(2);
    let (mut body, _) = send_backward(&mut relays, 1, b"x");
    assert!(client.decrypt_backward(RELAY_EARLY, &mut body).is_err());
}

#[test]
fn nonces_never_repeat_over_100k_cells() {
    nonce_log::start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut client, mut relays) = circuit(3);
    let h = counters();
    let mut body = [0u8; CELL_BODY_LEN];
    for _ in 0..100_000 {
        let hop = rng.random_range(0..3);
        if rng.random() {
            client.encrypt_forward(hop, RELAY, b"n", &mut body).unwrap();
            assert_eq!(
                deliver_forward(&mut relays, RELAY, &mut body, &h)
                    .unwrap()
                    .0,
                hop
            );
        } else {
            let (mut b, _) = send_backward(&mut relays, hop, b"n");
            assert_eq!(client.decrypt_backward(RELAY, &mut b).unwrap().0, hop);
        }
    }
    let (uses, dups) = nonce_log::stop();
    assert!(uses >= 100_000, "only {uses} uses logged");
    assert_eq!(dups, 0);
}

#[test]
fn duplicate_keys_would_be_detected_by_the_nonce_log() {
    // The log itself can fail: two circuits with the same keys reuse (key, nonce).
    nonce_log::start();
    let (mut c1, _) = circuit(1);
    let (mut c2, _) = circuit(1);
    let mut body = [0u8; CELL_BODY_LEN];
    c1.encrypt_forward(0, RELAY, b"", &mut body).unwrap();
    c2.encrypt_forward(0, RELAY, b"", &mut body).unwrap();
    assert_eq!(nonce_log::stop().1, 1);
}

#[test]
fn counters_are_exhausted_not_wrapped() {
    let last = (1u64 << 32) - 1;
    let k = hop_keys(1);
    let mut client = ClientCircuitCrypto::new();
    client.add_hop_with_counters(&k, last).unwrap();
    let mut relay = RelayHopCrypto::with_counters(&k, last);
    // Counter 2^32 - 1 is the last usable one in each direction.
    let mut body = [0u8; CELL_BODY_LEN];
    client
        .encrypt_forward(0, RELAY, b"last", &mut body)
        .unwrap();
    assert!(matches!(
        relay.decrypt_forward(RELAY, &mut body),
        Ok(Forward::Recognized { .. })
    ));
    relay.encrypt_backward(RELAY, b"last", &mut body).unwrap();
    client.decrypt_backward(RELAY, &mut body).unwrap();
    // Now every direction is at 2^32: destroy, never wrap.
    for _ in 0..3 {
        assert!(matches!(
            client.encrypt_forward(0, RELAY, b"", &mut body),
            Err(CryptoError::CounterExhausted)
        ));
        assert!(matches!(
            relay.decrypt_forward(RELAY, &mut body),
            Err(CryptoError::CounterExhausted)
        ));
        assert!(matches!(
            relay.encrypt_backward(RELAY, b"", &mut body),
            Err(CryptoError::CounterExhausted)
        ));
        assert!(matches!(
            relay.relay_backward(&mut body),
            Err(CryptoError::CounterExhausted)
        ));
        assert!(matches!(
            client.decrypt_backward(RELAY, &mut body),
            Err(CryptoError::CounterExhausted)
        ));
    }
    assert_eq!(relay.fwd.ctr, 1 << 32);
    assert_eq!(client.hops[0].fwd.ctr, 1 << 32);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decrypt_forward_never_panics(bytes in proptest::collection::vec(any::<u8>(), CELL_BODY_LEN), cmd in any::<u8>()) {
        let mut body = [0u8; CELL_BODY_LEN];
        body.copy_from_slice(&bytes);
        let mut r = RelayHopCrypto::new(&hop_keys(1));
        prop_assert!(r.decrypt_forward(cmd, &mut body).is_err());
    }

    #[test]
    fn decrypt_backward_never_panics(bytes in proptest::collection::vec(any::<u8>(), CELL_BODY_LEN), cmd in any::<u8>(), n in 0u8..=4) {
        let mut body = [0u8; CELL_BODY_LEN];
        body.copy_from_slice(&bytes);
        let (mut c, _) = circuit(n);
        prop_assert!(c.decrypt_backward(cmd, &mut body).is_err());
    }
}
