//! Test vectors: decode hex → compare with the expected struct → re-encode → compare bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use allium_crypto::RelayId;
use allium_proto::cell::{
    CELL_BODY_LEN, CELL_LEN, Cell, CellCmd, CircId, Create, Created, Destroy, DestroyReason,
    HTYPE_NTOR3,
};
use allium_proto::relaymsg::{
    AddrTtl, Begin, BeginDir, BeginFlags, Connected, Data, DropMsg, End, EndReason, Extend,
    Extended, LinkSpec, MAX_DATA, RELAY_MSG_LEN, RelayCmd, RelayHeader, RelayMsg, Resolve,
    Resolved, ResolvedValue, Sendme, Target, Truncate, Truncated, Unrecognized, encode_data,
};
use allium_proto::{ProtoError, consts};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).unwrap()
}

/// Pad `prefix` with zeros to `len`.
fn padded(prefix: &[u8], len: usize) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.resize(len, 0);
    v
}

#[test]
fn constants_match_design() {
    assert_eq!(CELL_LEN, 1024);
    assert_eq!(CELL_BODY_LEN, 1019);
    assert_eq!(RELAY_MSG_LEN, 939);
    assert_eq!(MAX_DATA, 934);
    assert_eq!(consts::TAG_LEN, 16);
}

// ---------------------------------------------------------------- link cells

#[test]
fn create_cell_vector() {
    let wire = padded(&unhex("80000001 01 0001 0003 aabbcc"), CELL_LEN);
    let cell = Cell::decode(&wire).unwrap();
    assert_eq!(cell.circ_id, CircId::new(0x8000_0001));
    assert_eq!(cell.cmd, CellCmd::CREATE);
    let create = Create::decode(&cell.body[..]).unwrap();
    assert_eq!(
        create,
        Create {
            htype: HTYPE_NTOR3,
            hdata: vec![0xaa, 0xbb, 0xcc]
        }
    );
    let again = Cell::create(CircId::new(0x8000_0001).unwrap(), &create).unwrap();
    assert_eq!(again.to_bytes().to_vec(), wire);
}

#[test]
fn created_cell_vector() {
    let wire = padded(&unhex("00000007 02 0002 0102"), CELL_LEN);
    let cell = Cell::decode(&wire).unwrap();
    assert_eq!(cell.cmd, CellCmd::CREATED);
    let created = Created::decode(&cell.body[..]).unwrap();
    assert_eq!(created.hdata, vec![1, 2]);
    let again = Cell::created(CircId::new(7).unwrap(), &created).unwrap();
    assert_eq!(again.to_bytes().to_vec(), wire);
}

#[test]
fn destroy_cell_vector() {
    let wire = padded(&unhex("7fffffff 05 03"), CELL_LEN);
    let cell = Cell::decode(&wire).unwrap();
    assert_eq!(cell.cmd, CellCmd::DESTROY);
    let d = Destroy::decode(&cell.body[..]).unwrap();
    assert_eq!(d.reason, DestroyReason::REQUESTED);
    let again = Cell::destroy(CircId::new(0x7fff_ffff).unwrap(), d.reason);
    assert_eq!(again.to_bytes().to_vec(), wire);
    // Unknown reasons are kept.
    let d = Destroy::decode(&padded(&[200], CELL_BODY_LEN)).unwrap();
    assert_eq!(d.reason, DestroyReason(200));
}

#[test]
fn relay_and_padding_cells_round_trip() {
    for (circ, cmd) in [
        (0u32, CellCmd::PADDING),
        (5, CellCmd::RELAY),
        (0x8000_0005, CellCmd::RELAY_EARLY),
    ] {
        let mut c = Cell::new_zeroed(CircId::new(circ), cmd);
        for (i, b) in c.body.iter_mut().enumerate() {
            *b = i as u8;
        }
        let bytes = c.to_bytes();
        assert_eq!(
            &bytes[..5],
            &[
                (circ >> 24) as u8,
                (circ >> 16) as u8,
                (circ >> 8) as u8,
                circ as u8,
                cmd.0
            ]
        );
        assert_eq!(Cell::decode(&bytes).unwrap(), c);
    }
}

#[test]
fn unknown_link_cell_commands_are_errors() {
    for cmd in [6u8, 7, 128, 255] {
        let wire = padded(&[0, 0, 0, 1, cmd], CELL_LEN);
        assert_eq!(Cell::decode(&wire), Err(ProtoError::UnknownCellCmd(cmd)));
    }
}

#[test]
fn circuit_id_rules() {
    // PADDING needs circ id 0; everything else needs a non-zero id.
    assert!(Cell::decode(&padded(&[0, 0, 0, 1, 0], CELL_LEN)).is_err());
    for cmd in 1..=5u8 {
        assert!(Cell::decode(&padded(&[0, 0, 0, 0, cmd], CELL_LEN)).is_err());
    }
    for _ in 0..1000 {
        let i = CircId::random(true);
        assert!(i.is_initiator_allocated() && i.allocatable_by(true) && !i.allocatable_by(false));
        let r = CircId::random(false);
        assert!(!r.is_initiator_allocated() && r.get() != 0 && r.allocatable_by(false));
    }
    assert!(CircId::new(0).is_none());
}

#[test]
fn wrong_cell_lengths_are_rejected() {
    assert!(Cell::decode(&[0u8; CELL_LEN - 1]).is_err());
    assert!(matches!(
        Cell::decode(&padded(&[0, 0, 0, 1, 3], CELL_LEN + 1)),
        Err(ProtoError::TrailingBytes { count: 1, .. })
    ));
}

#[test]
fn create_created_destroy_reject_garbage() {
    // hlen beyond the body.
    assert!(Create::decode(&padded(&unhex("0001 ffff"), CELL_BODY_LEN)).is_err());
    assert!(Created::decode(&padded(&unhex("03fc"), CELL_BODY_LEN)).is_err());
    // Non-zero padding.
    let mut b = padded(&unhex("0001 0001 aa"), CELL_BODY_LEN);
    b[CELL_BODY_LEN - 1] = 1;
    assert!(Create::decode(&b).is_err());
    let mut b = padded(&[0], CELL_BODY_LEN);
    b[500] = 9;
    assert!(Destroy::decode(&b).is_err());
    // hdata too long to encode.
    let mut body = [0u8; CELL_BODY_LEN];
    let big = Create {
        htype: 1,
        hdata: vec![0; CELL_BODY_LEN - 3],
    };
    assert!(big.encode(&mut body).is_err());
    let max = Create {
        htype: 1,
        hdata: vec![7; CELL_BODY_LEN - 4],
    };
    max.encode(&mut body).unwrap();
    assert_eq!(Create::decode(&body).unwrap(), max);
}

// ---------------------------------------------------------------- relay messages

/// decode(hex) == (stream, msg), encode(msg) == hex, also when the region is padded to 939 bytes.
fn check_vector(hexstr: &str, stream: u16, msg: RelayMsg) {
    let wire = unhex(hexstr);
    let (sid, got) = RelayMsg::decode(&wire).unwrap();
    assert_eq!((sid, &got), (stream, &msg), "decode {hexstr}");
    let mut region = [0x5au8; RELAY_MSG_LEN];
    let n = msg.encode(stream, &mut region).unwrap();
    assert_eq!(
        hex::encode(&region[..n]),
        hex::encode(&wire),
        "encode {msg:?}"
    );
    // Trailing random padding in the region is ignored.
    let (sid2, again) = RelayMsg::decode(&region).unwrap();
    assert_eq!((sid2, again), (stream, msg));
}

#[test]
fn begin_vectors() {
    check_vector(
        "01 0001 0014 6578616d706c652e636f6d3a34343300 00000001",
        1,
        Begin {
            target: Target::Hostname("example.com".into()),
            port: 443,
            flags: BeginFlags(BeginFlags::IPV6_OK),
        }
        .into(),
    );
    check_vector(
        "01 0002 000d 5b3a3a315d3a383000 00000000",
        2,
        Begin {
            target: Target::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            port: 80,
            flags: BeginFlags(0),
        }
        .into(),
    );
    check_vector(
        "01 0003 0014 3139322e302e322e313a3635353335 00 00000000",
        3,
        Begin {
            target: Target::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            port: 65535,
            flags: BeginFlags(0),
        }
        .into(),
    );
}

#[test]
fn begin_rejects_bad_targets() {
    for bad in [
        "host:0443",   // leading zero
        "host:0",      // port 0
        "host:65536",  // out of range
        "host",        // no port
        "ho st:80",    // bad character
        ":80",         // empty host
        "[0:0::1]:80", // non-canonical IPv6
        "[::1:80",     // unbalanced
        "a:b:80",      // colon in host
    ] {
        let mut body = bad.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&[0, 0, 0, 0]);
        let mut wire = vec![1, 0, 1];
        wire.extend_from_slice(&(body.len() as u16).to_be_bytes());
        wire.extend_from_slice(&body);
        assert!(RelayMsg::decode(&wire).is_err(), "{bad} must be rejected");
    }
    // Missing flags.
    assert!(RelayMsg::decode(&unhex("01 0001 0005 613a383000")).is_err());
    // Hostname too long to encode.
    let m: RelayMsg = Begin {
        target: Target::Hostname("a".repeat(256)),
        port: 1,
        flags: BeginFlags(0),
    }
    .into();
    assert!(m.to_vec(1).is_err());
}

#[test]
fn data_vectors() {
    check_vector(
        "02 0007 0002 6869",
        7,
        Data {
            data: b"hi".to_vec(),
        }
        .into(),
    );
    // encode_data, the zero-allocation path, writes the same bytes.
    let mut out = [0u8; RELAY_MSG_LEN];
    let n = encode_data(7, b"hi", &mut out);
    assert_eq!(hex::encode(&out[..n]), "02000700026869");
    let (h, d) = RelayHeader::parse(&out).unwrap();
    assert_eq!(
        h,
        RelayHeader {
            cmd: RelayCmd::DATA,
            stream_id: 7,
            len: 2
        }
    );
    assert_eq!(d, b"hi");
    // At most MAX_DATA bytes are taken, and never more than `out` holds.
    let big = vec![0xeeu8; 5000];
    assert_eq!(encode_data(1, &big, &mut out), RELAY_MSG_LEN);
    let (h, d) = RelayHeader::parse(&out).unwrap();
    assert_eq!((h.len as usize, d.len()), (MAX_DATA, MAX_DATA));
    let mut small = [0u8; 10];
    assert_eq!(encode_data(1, &big, &mut small), 10);
    assert_eq!(encode_data(1, &big, &mut [0u8; 4]), 0);
    // Too much data in the struct form is an error.
    let m: RelayMsg = Data {
        data: vec![0; MAX_DATA + 1],
    }
    .into();
    assert!(m.to_vec(1).is_err());
}

#[test]
fn end_connected_vectors() {
    check_vector("03 0007 0001 06", 7, End::new(EndReason::DONE).into());
    check_vector(
        "03 0005 0009 04 0a000001 0000012c",
        5,
        End {
            reason: EndReason::EXITPOLICY,
            addr: Some(AddrTtl {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                ttl: 300,
            }),
        }
        .into(),
    );
    check_vector("04 0001 0000", 1, Connected::default().into());
    check_vector(
        "04 0001 0008 c0000201 0000003c",
        1,
        Connected {
            addr: Some(AddrTtl {
                addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                ttl: 60,
            }),
        }
        .into(),
    );
    check_vector(
        "04 0001 0014 00000000000000000000000000000001 00000001",
        1,
        Connected {
            addr: Some(AddrTtl {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                ttl: 1,
            }),
        }
        .into(),
    );
    // Trailing bytes after the reason, or an address of the wrong size.
    assert!(RelayMsg::decode(&unhex("03 0007 0002 06ff")).is_err());
    assert!(RelayMsg::decode(&unhex("04 0001 0005 0102030405")).is_err());
}

#[test]
fn sendme_vectors() {
    let tag: [u8; 16] = core::array::from_fn(|i| i as u8);
    check_vector(
        "05 0000 0011 01 000102030405060708090a0b0c0d0e0f",
        0,
        Sendme { tag: Some(tag) }.into(),
    );
    check_vector("05 0003 0000", 3, Sendme { tag: None }.into());
    // Unknown version, short tag, trailing bytes.
    assert!(RelayMsg::decode(&unhex("05 0000 0011 02 000102030405060708090a0b0c0d0e0f")).is_err());
    assert!(RelayMsg::decode(&unhex("05 0000 0002 0100")).is_err());
    assert!(
        RelayMsg::decode(&unhex(
            "05 0000 0012 01 000102030405060708090a0b0c0d0e0f ff"
        ))
        .is_err()
    );
}

#[test]
fn xon_xoff_vectors() {
    use allium_proto::relaymsg::{Xoff, Xon};
    check_vector("2b 0007 0001 00", 7, Xoff.into());
    check_vector("2c 0007 0005 00 00000c80", 7, Xon { rate_kib: 3200 }.into());
    // Unknown version, short or long bodies, stream 0.
    assert!(RelayMsg::decode(&unhex("2b 0007 0001 01")).is_err());
    assert!(RelayMsg::decode(&unhex("2b 0007 0000")).is_err());
    assert!(RelayMsg::decode(&unhex("2c 0007 0004 00 000c80")).is_err());
    assert!(RelayMsg::decode(&unhex("2c 0007 0006 00 00000c80 00")).is_err());
    assert!(RelayMsg::decode(&unhex("2b 0000 0001 00")).is_err());
}

#[test]
fn extend_vectors() {
    let id = RelayId([0x11; 32]);
    let wire = format!(
        "0e 0000 0033 02 03 20 {} 00 06 7f000001 2329 0001 0004 deadbeef",
        "11".repeat(32)
    );
    let ext = Extend {
        specs: vec![
            LinkSpec::Ed25519Id(id),
            LinkSpec::Ipv4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9001)),
        ],
        htype: 1,
        hdata: unhex("deadbeef"),
    };
    assert_eq!(ext.relay_id(), Some(id));
    assert_eq!(
        ext.addrs().collect::<Vec<_>>(),
        vec!["127.0.0.1:9001".parse().unwrap()]
    );
    check_vector(&wire, 0, ext.into());
    // IPv6 and an unknown specifier type (kept).
    check_vector(
        "0e 0000 001d 02 01 12 20010db8000000000000000000000001 01bb 09 02 abcd 0001 0000",
        0,
        Extend {
            specs: vec![
                LinkSpec::Ipv6("[2001:db8::1]:443".parse().unwrap()),
                LinkSpec::Unrecognized {
                    ty: 9,
                    value: vec![0xab, 0xcd],
                },
            ],
            htype: 1,
            hdata: vec![],
        }
        .into(),
    );
    // Known types with the wrong length; specifier count larger than present; hlen too long.
    assert!(RelayMsg::decode(&unhex("0e 0000 000b 01 00 05 7f00000123 0001 0000")).is_err());
    assert!(RelayMsg::decode(&unhex("0e 0000 0005 05 0001 0000")).is_err());
    assert!(RelayMsg::decode(&unhex("0e 0000 0005 00 0001 0009")).is_err());
}

#[test]
fn other_circuit_message_vectors() {
    check_vector(
        "0f 0000 0005 0003 aabbcc",
        0,
        Extended {
            hdata: vec![0xaa, 0xbb, 0xcc],
        }
        .into(),
    );
    check_vector("08 0000 0000", 0, Truncate.into());
    check_vector(
        "09 0000 0001 03",
        0,
        Truncated {
            reason: DestroyReason::REQUESTED,
        }
        .into(),
    );
    check_vector("0a 0000 0000", 0, DropMsg.into());
    check_vector("0d 0002 0000", 2, BeginDir.into());
    // Empty bodies must be empty.
    assert!(RelayMsg::decode(&unhex("08 0000 0001 00")).is_err());
    assert!(RelayMsg::decode(&unhex("0d 0002 0001 00")).is_err());
}

#[test]
fn resolve_vectors() {
    check_vector(
        "0b 0009 0004 612e6200",
        9,
        Resolve {
            hostname: "a.b".into(),
        }
        .into(),
    );
    check_vector(
        "0c 0009 0019 04 04 01020304 00000e10 f0 00 00000000 00 03 612e62 00000005",
        9,
        Resolved {
            answers: vec![
                (
                    ResolvedValue::Ip(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))),
                    3600,
                ),
                (ResolvedValue::TransientError, 0),
                (ResolvedValue::Hostname("a.b".into()), 5),
            ],
        }
        .into(),
    );
    // Truncated answer, IPv4 answer with 3 bytes, missing NUL.
    assert!(RelayMsg::decode(&unhex("0c 0009 0003 04 04 01")).is_err());
    assert!(RelayMsg::decode(&unhex("0c 0009 0009 04 03 010203 00000000")).is_err());
    assert!(RelayMsg::decode(&unhex("0b 0009 0003 612e62")).is_err());
}

#[test]
fn unknown_relay_commands_are_preserved() {
    check_vector(
        "c8 0004 0003 010203",
        4,
        Unrecognized {
            cmd: RelayCmd(200),
            body: vec![1, 2, 3],
        }
        .into(),
    );
    // A known command can't be smuggled as Unrecognized.
    let m: RelayMsg = Unrecognized {
        cmd: RelayCmd::DATA,
        body: vec![],
    }
    .into();
    assert!(m.to_vec(1).is_err());
}

#[test]
fn stream_id_rules() {
    // DATA on stream 0, EXTEND on a stream, BEGIN on stream 0.
    assert!(RelayMsg::decode(&unhex("02 0000 0001 00")).is_err());
    assert!(RelayMsg::decode(&unhex("08 0001 0000")).is_err());
    let m: RelayMsg = Data { data: vec![] }.into();
    assert!(m.to_vec(0).is_err());
    let m: RelayMsg = Truncate.into();
    assert!(m.to_vec(3).is_err());
}

#[test]
fn relay_header_bounds() {
    // len 935 > MAX_DATA.
    let mut region = [0u8; RELAY_MSG_LEN + 10];
    region[..5].copy_from_slice(&unhex("02 0001 03a7"));
    assert!(matches!(
        RelayHeader::parse(&region),
        Err(ProtoError::TooLong { len: 935, .. })
    ));
    // len larger than the region.
    assert!(RelayHeader::parse(&unhex("02 0001 0005 0102")).is_err());
    assert!(RelayHeader::parse(&unhex("02 00")).is_err());
    // The largest message fills the 939-byte region exactly.
    let m: RelayMsg = Data {
        data: vec![9; MAX_DATA],
    }
    .into();
    let mut out = [0u8; RELAY_MSG_LEN];
    assert_eq!(m.encode(1, &mut out).unwrap(), RELAY_MSG_LEN);
    assert_eq!(RelayMsg::decode(&out).unwrap(), (1, m));
}
