//! Fuzz-style property tests (design §3.6 item 9): every decoder takes arbitrary bytes without
//! panicking, and whatever decodes re-encodes to the same bytes (one byte form per message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use allium_crypto::{RelayId, X25519Secret};
use allium_proto::cell::{CELL_BODY_LEN, CELL_LEN, Cell, Create, Created, Destroy};
use allium_proto::link::{self, Initiator, LinkTransport, Responder};
use allium_proto::relaymsg::{
    Data, Extend, LinkSpec, MAX_DATA, RELAY_MSG_LEN, RelayCmd, RelayHeader, RelayMsg,
};
use proptest::prelude::*;

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..1100),
        // Mostly-zero bodies reach deeper into the fixed-layout decoders.
        (any::<[u8; 8]>(), 0usize..1019).prop_map(|(head, len)| {
            let mut v = vec![0u8; CELL_BODY_LEN];
            v[..8].copy_from_slice(&head);
            v.truncate(len.max(8));
            v
        }),
    ]
}

/// A pair of transports after an in-memory handshake.
fn transport_pair() -> (LinkTransport, LinkTransport) {
    let id = RelayId([3; 32]);
    let key = X25519Secret::generate();
    let mut m1 = Vec::new();
    let init = Initiator::start(&id, &key.public(), None, &mut m1).unwrap();
    let resp = Responder::new(&id, &key).unwrap();
    let mut m2 = Vec::new();
    let wait = resp.read_msg1(&m1[2..], 1, &mut m2).unwrap();
    let mut m3 = Vec::new();
    let (ti, _) = init.read_msg2(&m2[2..], 1, &mut m3).unwrap();
    let (tr, _) = wait.read_msg3(&m3[2..]).unwrap();
    (ti, tr)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn cell_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1100)) {
        if let Ok(c) = Cell::decode(&b) {
            prop_assert_eq!(c.to_bytes().to_vec(), b);
        }
    }

    #[test]
    fn cell_header_space(circ in any::<u32>(), cmd in any::<u8>(), fill in any::<u8>()) {
        let mut b = vec![fill; CELL_LEN];
        b[..4].copy_from_slice(&circ.to_be_bytes());
        b[4] = cmd;
        match Cell::decode(&b) {
            Ok(c) => {
                prop_assert!(cmd <= 5);
                prop_assert_eq!(cmd == 0, circ == 0);
                prop_assert_eq!(c.to_bytes().to_vec(), b);
            }
            Err(_) => prop_assert!(cmd > 5 || (cmd == 0) != (circ == 0)),
        }
    }

    #[test]
    fn create_created_destroy_decoders(b in body_strategy()) {
        let mut body = [0u8; CELL_BODY_LEN];
        if let Ok(c) = Create::decode(&b) {
            c.encode(&mut body).unwrap();
            prop_assert_eq!(&body[..b.len()], &b[..]);
        }
        if let Ok(c) = Created::decode(&b) {
            c.encode(&mut body).unwrap();
            prop_assert_eq!(&body[..b.len()], &b[..]);
        }
        if let Ok(d) = Destroy::decode(&b) {
            d.encode(&mut body);
            prop_assert_eq!(&body[..b.len()], &b[..]);
        }
    }

    #[test]
    fn relay_msg_decode_never_panics_and_is_canonical(
        cmd in prop_oneof![1u8..=16, any::<u8>()],
        stream in prop_oneof![Just(0u16), Just(1u16), any::<u16>()],
        data in proptest::collection::vec(any::<u8>(), 0..960),
        lie in proptest::option::of(any::<u16>()),
    ) {
        let len = lie.unwrap_or(data.len() as u16);
        let mut region = vec![cmd];
        region.extend_from_slice(&stream.to_be_bytes());
        region.extend_from_slice(&len.to_be_bytes());
        region.extend_from_slice(&data);
        let _ = RelayHeader::parse(&region);
        if let Ok((sid, msg)) = RelayMsg::decode(&region) {
            prop_assert_eq!(sid, stream);
            let mut out = [0u8; RELAY_MSG_LEN];
            let n = msg.encode(sid, &mut out).unwrap();
            prop_assert_eq!(&out[..n], &region[..n]);
            prop_assert_eq!(n, 5 + usize::from(len));
        }
    }

    #[test]
    fn extend_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(m) = RelayMsg::decode_body(RelayCmd::EXTEND, &data) {
            let mut out = [0u8; RELAY_MSG_LEN];
            let n = m.encode(0, &mut out).unwrap();
            prop_assert_eq!(&out[5..n], &data[..]);
        }
    }

    #[test]
    fn extend_round_trip(
        id in any::<[u8; 32]>(),
        v4 in any::<([u8; 4], u16)>(),
        hdata in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let ext = Extend {
            specs: vec![
                LinkSpec::Ed25519Id(RelayId(id)),
                LinkSpec::Ipv4(std::net::SocketAddrV4::new(v4.0.into(), v4.1)),
            ],
            htype: 1,
            hdata,
        };
        let m: RelayMsg = ext.into();
        let v = m.to_vec(0).unwrap();
        prop_assert_eq!(RelayMsg::decode(&v).unwrap(), (0, m));
    }

    #[test]
    fn data_round_trip(stream in 1u16.., data in proptest::collection::vec(any::<u8>(), 0..=MAX_DATA)) {
        let m: RelayMsg = Data { data: data.clone() }.into();
        let v = m.to_vec(stream).unwrap();
        let mut out = [0u8; RELAY_MSG_LEN];
        let n = allium_proto::relaymsg::encode_data(stream, &data, &mut out);
        prop_assert_eq!(&out[..n], &v[..]);
        prop_assert_eq!(RelayMsg::decode(&v).unwrap(), (stream, m));
    }

    #[test]
    fn frame_length_checks(prefix in any::<[u8; 2]>(), rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let len = usize::from(u16::from_be_bytes(prefix));
        let ok = link::transport_frame_len(prefix).is_ok();
        prop_assert_eq!(ok, (1040..=32784).contains(&len) && (len - 16) % 1024 == 0);
        prop_assert_eq!(link::handshake_msg_len(prefix).is_ok(), (1..=256).contains(&len));
        let mut buf = prefix.to_vec();
        buf.extend_from_slice(&rest);
        match link::split_transport_frame(&buf) {
            Ok(Some(_)) => prop_assert!(false, "a frame needs at least 1040 bytes"),
            Ok(None) => prop_assert!(ok),
            Err(_) => prop_assert!(!ok),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn transport_open_rejects_garbage(
        frame in proptest::collection::vec(any::<u8>(), 0..3000),
        cells in 1usize..3,
    ) {
        let (_ti, mut tr) = transport_pair();
        let mut out = vec![0u8; 64 * 1024];
        prop_assert!(tr.open_frame(&frame, &mut out).is_err());
        // Random frames of a valid length are rejected as well.
        let mut f = vec![0u8; cells * CELL_LEN + 16];
        for (i, b) in f.iter_mut().enumerate() {
            *b = frame.get(i % frame.len().max(1)).copied().unwrap_or(0);
        }
        let (_ti, mut tr) = transport_pair();
        prop_assert!(tr.open_frame(&f, &mut out).is_err());
    }

    #[test]
    fn handshake_readers_reject_garbage(msg in proptest::collection::vec(any::<u8>(), 0..300)) {
        let id = RelayId([5; 32]);
        let key = X25519Secret::generate();
        let resp = Responder::new(&id, &key).unwrap();
        let mut out = Vec::new();
        // 48 random bytes could only pass by forging the AEAD tag.
        prop_assert!(resp.read_msg1(&msg, 0, &mut out).is_err());
        let mut m1 = Vec::new();
        let init = Initiator::start(&id, &key.public(), None, &mut m1).unwrap();
        prop_assert!(init.read_msg2(&msg, 0, &mut out).is_err());
    }
}
