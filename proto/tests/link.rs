//! The sans-IO Noise XK link: handshake outcomes, framing bounds, tampering, replay, rekeying.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use allium_crypto::{RelayId, X25519Secret};
use allium_proto::cell::CELL_LEN;
use allium_proto::err::LinkError;
use allium_proto::link::{
    self, HandshakeInfo, Initiator, LinkTransport, MAX_FRAME_LEN, REKEY_INTERVAL, Responder,
};

struct Relay {
    id: RelayId,
    key: X25519Secret,
}

fn relay(n: u8) -> Relay {
    Relay {
        id: RelayId([n; 32]),
        key: X25519Secret::generate(),
    }
}

/// Run the three messages in memory; `dial_id` / `dial_key` are what the initiator believes.
fn handshake(
    responder: &Relay,
    dial_id: &RelayId,
    dial_key: &allium_crypto::X25519Public,
    our_static: Option<&X25519Secret>,
) -> Result<
    (
        LinkTransport,
        HandshakeInfo,
        LinkTransport,
        HandshakeInfo,
        [usize; 3],
    ),
    LinkError,
> {
    let mut m1 = Vec::new();
    let init = Initiator::start(dial_id, dial_key, our_static, &mut m1)?;
    let resp = Responder::new(&responder.id, &responder.key)?;
    let l1 = link::handshake_msg_len([m1[0], m1[1]])?;
    assert_eq!(l1 + 2, m1.len());
    let mut m2 = Vec::new();
    let wait = resp.read_msg1(&m1[2..], 1_000, &mut m2)?;
    let mut m3 = Vec::new();
    let (ti, info_i) = init.read_msg2(&m2[2..], 2_000, &mut m3)?;
    let (tr, info_r) = wait.read_msg3(&m3[2..])?;
    Ok((ti, info_i, tr, info_r, [m1.len(), m2.len(), m3.len()]))
}

fn cells(n: usize, seed: u8) -> Vec<u8> {
    (0..n * CELL_LEN)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_succeeds_and_sizes_are_fixed() {
    let r = relay(1);
    let client = X25519Secret::generate();
    let (ti, info_i, tr, info_r, sizes) =
        handshake(&r, &r.id, &r.key.public(), Some(&client)).unwrap();
    // 2-byte prefix + 48 / 80 / 128 bytes.
    assert_eq!(sizes, [50, 82, 130]);
    assert!(ti.is_initiator() && !tr.is_initiator());
    assert_eq!(ti.remote_static(), r.key.public());
    assert_eq!(tr.remote_static(), client.public());
    assert_eq!(info_i.peer_unix_time, 1_000);
    assert_eq!(info_r.peer_unix_time, 2_000);
    assert_eq!((info_i.peer_version, info_r.peer_version), (1, 1));
}

#[test]
fn clients_get_a_fresh_static_key_each_time() {
    let r = relay(1);
    let (_, _, tr1, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let (_, _, tr2, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    assert_ne!(tr1.remote_static(), tr2.remote_static());
}

#[test]
fn wrong_identity_in_prologue_fails() {
    // M advertises A's link key: dialling "M" reaches A, whose prologue names A.
    let a = relay(1);
    let m_id = RelayId([2; 32]);
    let e = handshake(&a, &m_id, &a.key.public(), None).unwrap_err();
    assert!(matches!(e, LinkError::Handshake), "{e:?}");
}

#[test]
fn wrong_link_key_fails() {
    let a = relay(1);
    let other = X25519Secret::generate();
    let e = handshake(&a, &a.id, &other.public(), None).unwrap_err();
    assert!(matches!(e, LinkError::Handshake), "{e:?}");
}

#[test]
fn frames_round_trip_both_ways() {
    let r = relay(1);
    let (mut ti, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let mut frame = vec![0u8; MAX_FRAME_LEN + 2];
    let mut plain = vec![0u8; MAX_FRAME_LEN];
    for n in [1usize, 2, 31, 32] {
        let c = cells(n, n as u8);
        let len = ti.seal_frame(&c, &mut frame).unwrap();
        assert_eq!(len, 2 + n * CELL_LEN + 16);
        let (msg, used) = link::split_transport_frame(&frame[..len]).unwrap().unwrap();
        assert_eq!(used, len);
        let p = tr.open_frame(msg, &mut plain).unwrap();
        assert_eq!(&plain[..p], &c[..]);
        // And back.
        let len = tr.seal_frame(&c, &mut frame).unwrap();
        let p = ti.open_frame(&frame[2..len], &mut plain).unwrap();
        assert_eq!(&plain[..p], &c[..]);
    }
    // Partial frames need more bytes.
    let len = ti.seal_frame(&cells(1, 0), &mut frame).unwrap();
    assert!(
        link::split_transport_frame(&frame[..len - 1])
            .unwrap()
            .is_none()
    );
}

#[test]
fn seal_rejects_bad_plaintext_sizes() {
    let r = relay(1);
    let (mut ti, _, _, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let mut frame = vec![0u8; 40_000];
    for n in [0usize, 1, 1023, 1025, 33 * CELL_LEN] {
        assert!(matches!(
            ti.seal_frame(&vec![0; n], &mut frame),
            Err(LinkError::Misuse(_))
        ));
    }
    assert!(ti.seal_frame(&cells(2, 0), &mut [0u8; 2000]).is_err());
}

#[test]
fn tampered_frame_is_fatal() {
    let r = relay(1);
    let (mut ti, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let mut frame = vec![0u8; MAX_FRAME_LEN + 2];
    let mut plain = vec![0u8; MAX_FRAME_LEN];
    let len = ti.seal_frame(&cells(3, 1), &mut frame).unwrap();
    frame[100] ^= 0x01;
    assert!(matches!(
        tr.open_frame(&frame[2..len], &mut plain),
        Err(LinkError::Decrypt)
    ));
    // The transport is poisoned: even a good frame is refused now.
    let len = ti.seal_frame(&cells(1, 1), &mut frame).unwrap();
    assert!(matches!(
        tr.open_frame(&frame[2..len], &mut plain),
        Err(LinkError::Closed)
    ));
}

#[test]
fn replay_and_reorder_are_fatal() {
    let r = relay(1);
    let (mut ti, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let mut plain = vec![0u8; MAX_FRAME_LEN];
    let mut f1 = vec![0u8; 2 * CELL_LEN];
    let mut f2 = vec![0u8; 2 * CELL_LEN];
    let l1 = ti.seal_frame(&cells(1, 1), &mut f1).unwrap();
    let l2 = ti.seal_frame(&cells(1, 2), &mut f2).unwrap();
    tr.open_frame(&f1[2..l1], &mut plain).unwrap();
    assert!(tr.open_frame(&f1[2..l1], &mut plain).is_err(), "replay");
    let (mut ti, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let l1 = ti.seal_frame(&cells(1, 1), &mut f1).unwrap();
    let l2b = ti.seal_frame(&cells(1, 2), &mut f2).unwrap();
    assert_eq!(l2, l2b);
    assert!(tr.open_frame(&f2[2..l2b], &mut plain).is_err(), "reorder");
    let _ = l1;
}

#[test]
fn bad_frame_lengths_are_rejected_before_decrypting() {
    let r = relay(1);
    let mut plain = vec![0u8; MAX_FRAME_LEN];
    for len in [0usize, 16, 1039, 1041, 2063, 32785, 40_000] {
        let (_, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
        assert!(matches!(
            tr.open_frame(&vec![0u8; len], &mut plain),
            Err(LinkError::BadFrameLength(_))
        ));
        if let Ok(l) = u16::try_from(len) {
            assert!(link::split_transport_frame(&l.to_be_bytes()).is_err());
        }
    }
    for prefix in [
        [0u8, 0],
        [0, 5],
        [0x80, 0x11],
        [0x84, 0x10],
        [0xff, 0xff],
        [0x04, 0x11],
    ] {
        assert!(link::transport_frame_len(prefix).is_err(), "{prefix:?}");
    }
    assert_eq!(link::transport_frame_len([0x04, 0x10]).unwrap(), 1040);
    assert_eq!(link::transport_frame_len([0x08, 0x10]).unwrap(), 2064);
    assert_eq!(
        link::transport_frame_len((32784u16).to_be_bytes()).unwrap(),
        32784
    );
    assert!(link::handshake_msg_len([0, 0]).is_err());
    assert!(link::handshake_msg_len([1, 1]).is_err());
    assert_eq!(link::handshake_msg_len([1, 0]).unwrap(), 256);
}

#[test]
fn rekeying_keeps_both_sides_in_step() {
    let r = relay(1);
    let (mut ti, _, mut tr, _, _) = handshake(&r, &r.id, &r.key.public(), None).unwrap();
    let c = cells(1, 9);
    let mut frame = vec![0u8; 2 * CELL_LEN];
    let mut plain = vec![0u8; 2 * CELL_LEN];
    let total = 2 * REKEY_INTERVAL + 3;
    for i in 0..total {
        let len = ti.seal_frame(&c, &mut frame).unwrap();
        let n = tr.open_frame(&frame[2..len], &mut plain).unwrap();
        assert_eq!(&plain[..n], &c[..], "frame {i}");
    }
    assert_eq!((ti.frames_sent(), tr.frames_received()), (total, total));
}

#[test]
fn rekeying_changes_the_key() {
    // A plain snow responder that never rekeys opens frames 1..=4096 of our initiator, then fails
    // on frame 4097: so our side did rekey after exactly REKEY_INTERVAL frames.
    let r = relay(1);
    let mut raw = snow::Builder::new(link::NOISE_PARAMS.parse().unwrap())
        .prologue(&link::prologue(&r.id))
        .unwrap()
        .local_private_key(r.key.secret_bytes())
        .unwrap()
        .build_responder()
        .unwrap();
    let mut m1 = Vec::new();
    let init = Initiator::start(&r.id, &r.key.public(), None, &mut m1).unwrap();
    let mut scratch = [0u8; 256];
    raw.read_message(&m1[2..], &mut scratch).unwrap();
    let mut payload = [0u8; 32];
    payload[1] = 1; // version 1
    let n = raw.write_message(&payload, &mut scratch).unwrap();
    let mut m2 = (n as u16).to_be_bytes().to_vec();
    m2.extend_from_slice(&scratch[..n]);
    let mut m3 = Vec::new();
    let (mut ti, _) = init.read_msg2(&m2[2..], 0, &mut m3).unwrap();
    raw.read_message(&m3[2..], &mut scratch).unwrap();
    let mut raw = raw.into_transport_mode().unwrap();

    let c = cells(1, 0);
    let mut frame = vec![0u8; 2 * CELL_LEN];
    let mut plain = vec![0u8; 2 * CELL_LEN];
    for _ in 0..REKEY_INTERVAL {
        let len = ti.seal_frame(&c, &mut frame).unwrap();
        raw.read_message(&frame[2..len], &mut plain).unwrap();
    }
    let len = ti.seal_frame(&c, &mut frame).unwrap();
    assert!(raw.read_message(&frame[2..len], &mut plain).is_err());
}

#[test]
fn unsupported_version_in_payload_is_rejected() {
    let r = relay(1);
    let mut raw = snow::Builder::new(link::NOISE_PARAMS.parse().unwrap())
        .prologue(&link::prologue(&r.id))
        .unwrap()
        .local_private_key(r.key.secret_bytes())
        .unwrap()
        .build_responder()
        .unwrap();
    let mut m1 = Vec::new();
    let init = Initiator::start(&r.id, &r.key.public(), None, &mut m1).unwrap();
    let mut scratch = [0u8; 256];
    raw.read_message(&m1[2..], &mut scratch).unwrap();
    let mut payload = [0u8; 32];
    payload[1] = 2; // version 2
    let n = raw.write_message(&payload, &mut scratch).unwrap();
    let e = init
        .read_msg2(&scratch[..n], 0, &mut Vec::new())
        .unwrap_err();
    assert!(matches!(e, LinkError::BadPayload(_)), "{e:?}");
}
