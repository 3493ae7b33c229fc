//! Write the seed corpus (fuzz/corpus/<target>/) from real encodings. Run from fuzz/:
//! `cargo run --example gen_corpus`. Deterministic except for the handshake's ephemeral keys.

use std::fs;
use std::path::Path;

use allium_crypto::handshake::{client_start, relay_respond, tlv};
use allium_crypto::relaycell::RELAY_MSG_LEN;
use allium_fuzz::{OWN, onion_key, sample_consensus, sample_descriptor, sample_vote};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created, Destroy, DestroyReason};
use allium_proto::relaymsg::{
    AddrTtl, Begin, BeginFlags, Connected, Data, End, EndReason, Extend, Extended, LinkSpec,
    RelayMsg, Resolve, Resolved, ResolvedValue, Sendme, Target, Truncated,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

/// Two consensuses a period apart (relays 1..=n, then one gone, one new and one changed),
/// signed by one authority: seeds for the diff target.
fn consensus_pair(n: u8) -> (Vec<u8>, Vec<u8>) {
    use allium_crypto::X25519Secret;
    use allium_directory::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
    use allium_directory::doc::{Consensus, ConsensusEntry, ExitPolicy, Flags, Signed};
    let entry = |i: u8| ConsensusEntry {
        identity: allium_fuzz::identity(i).public(),
        link_key: X25519Secret::from_bytes([i; 32]).public(),
        onion_key: X25519Secret::from_bytes([i ^ 0x55; 32]).public(),
        nickname: format!("relay{i}"),
        addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + u16::from(i)))],
        flags: Flags(0b11),
        weight: 100 * u32::from(i),
        exit: ExitPolicy::reject_all(),
        family: vec![],
        measured: false,
    };
    let auth = allium_fuzz::identity(200);
    let make = |va: u64, ids: &[u8], bump: Option<u8>| {
        let mut relays: Vec<ConsensusEntry> = ids.iter().map(|&i| entry(i)).collect();
        for r in &mut relays {
            if Some(r.nickname.as_str()) == bump.map(|b| format!("relay{b}")).as_deref() {
                r.weight += 7;
                r.flags = Flags(0b111);
            }
        }
        relays.sort_by_key(|e| e.identity);
        let c = Consensus {
            version: CONSENSUS_VERSION,
            method: CONSENSUS_METHOD,
            valid_after: va,
            fresh_until: va + 3600,
            valid_until: va + 10_800,
            voters: vec![auth.public()],
            params: std::collections::BTreeMap::new(),
            relays,
            shared_rand: None,
            bandwidth_weights: std::collections::BTreeMap::new(),
        };
        Signed::sign(&c, &auth).expect("sign").to_bytes()
    };
    let old: Vec<u8> = (1..=n).collect();
    let mut new: Vec<u8> = (2..=n).collect();
    new.push(n + 1);
    (
        make(1_800_000_000, &old, None),
        make(1_800_003_600, &new, Some(n / 2 + 1)),
    )
}

/// Seeds for the `diff` target: `mode | [len u16] | base | rest`.
fn diff_seeds() {
    use allium_directory::dircache::{self, ArchiveConfig, DirArchive, DirRequest};
    let (old, new) = consensus_pair(4);
    let d = dircache::diff::compute(&old, &new).expect("diff");
    let framed = |mode: u8, a: &[u8], b: &[u8]| {
        let len = u16::try_from(a.len()).expect("small seed");
        [&[mode][..], &len.to_be_bytes(), a, b].concat()
    };
    write("diff", "apply", &framed(0, &old, &d));
    write("diff", "apply_fixed_base", &framed(1, &old, &d));
    write("diff", "compute", &framed(2, &old, &new));
    let mut a = DirArchive::new(ArchiveConfig::default());
    let certs = allium_directory::client::encode_cert_list(&[]);
    a.insert(&old, 1_800_000_000, &certs).expect("insert");
    a.insert(&new, 1_800_003_600, &certs).expect("insert");
    let have = DirRequest::Consensus {
        have: vec![dircache::consensus_digest(&old)],
    };
    for (name, req) in [
        ("request_have", have.clone()),
        ("request_certs", DirRequest::Certs),
    ] {
        let head = dircache::encode_request(&req);
        write("diff", name, &[&[3u8][..], &head].concat());
    }
    let resp = a.respond(&dircache::encode_request(&have), 1_800_003_600);
    write("diff", "response_diff", &[&[3u8][..], &resp].concat());
    let full = a.respond(
        &dircache::encode_request(&DirRequest::Consensus { have: vec![] }),
        1_800_003_600,
    );
    write("diff", "response_full", &[&[3u8][..], &full].concat());
}

fn relay_msgs() -> Vec<(u16, RelayMsg)> {
    let ttl = AddrTtl {
        addr: [93, 184, 216, 34].into(),
        ttl: 300,
    };
    vec![
        (
            1,
            RelayMsg::Begin(Begin {
                target: Target::Hostname("example.com".into()),
                port: 443,
                flags: BeginFlags(0),
            }),
        ),
        (
            2,
            RelayMsg::Begin(Begin {
                target: Target::Ip("2001:db8::1".parse().expect("ip")),
                port: 80,
                flags: BeginFlags(1),
            }),
        ),
        (
            1,
            RelayMsg::Data(Data {
                data: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            }),
        ),
        (1, RelayMsg::End(End::new(EndReason::DONE))),
        (
            1,
            RelayMsg::End(End {
                reason: EndReason::EXITPOLICY,
                addr: Some(ttl.clone()),
            }),
        ),
        (
            1,
            RelayMsg::Connected(Connected {
                addr: Some(ttl.clone()),
            }),
        ),
        (0, RelayMsg::Sendme(Sendme { tag: Some([7; 16]) })),
        (1, RelayMsg::Sendme(Sendme { tag: None })),
        (0, RelayMsg::Truncate(allium_proto::relaymsg::Truncate)),
        (
            0,
            RelayMsg::Truncated(Truncated {
                reason: DestroyReason(1),
            }),
        ),
        (0, RelayMsg::Drop(allium_proto::relaymsg::DropMsg)),
        (
            3,
            RelayMsg::Resolve(Resolve {
                hostname: "example.org".into(),
            }),
        ),
        (
            3,
            RelayMsg::Resolved(Resolved {
                answers: vec![
                    (ResolvedValue::Ip([1, 2, 3, 4].into()), 60),
                    (ResolvedValue::Hostname("a.example".into()), 60),
                ],
            }),
        ),
        (4, RelayMsg::BeginDir(allium_proto::relaymsg::BeginDir)),
        (
            0,
            RelayMsg::Extend(Extend {
                specs: vec![
                    LinkSpec::Ipv4("10.0.0.1:9001".parse().expect("addr")),
                    LinkSpec::Ipv6("[2001:db8::2]:9001".parse().expect("addr")),
                    LinkSpec::Ed25519Id(OWN),
                ],
                htype: 1,
                hdata: vec![5; 130],
            }),
        ),
        (0, RelayMsg::Extended(Extended { hdata: vec![6; 98] })),
    ]
}

fn main() {
    diff_seeds();
    // link_frame: a minimal and a two-cell transport frame, a handshake prefix.
    let mut f = vec![0x04, 0x10];
    f.extend(vec![0u8; 1040]);
    write("link_frame", "one_cell", &f);
    let mut f2 = 2064u16.to_be_bytes().to_vec();
    f2.extend(vec![1u8; 2064]);
    f2.extend(&f);
    write("link_frame", "two_frames", &f2);
    write("link_frame", "handshake_prefix", &[0x00, 0x60]);

    // cell and handshake: a real CREATE/CREATED exchange.
    let key = onion_key();
    let (_hs, skin) = client_start(
        &OWN,
        &key.public(),
        &tlv::encode(&[(1, b"x")]).expect("tlv"),
    )
    .expect("client_start");
    let (_keys, reply) = relay_respond(&OWN, &[&key], &skin, |_| Vec::new()).expect("respond");
    let cid = CircId::new(0x8000_0007).expect("nonzero");
    write(
        "cell",
        "create",
        &Cell::create(
            cid,
            &Create {
                htype: 1,
                hdata: skin.clone(),
            },
        )
        .expect("cell")
        .to_bytes(),
    );
    write(
        "cell",
        "created",
        &Cell::created(
            cid,
            &Created {
                hdata: reply.clone(),
            },
        )
        .expect("cell")
        .to_bytes(),
    );
    let mut d = Cell::new_zeroed(Some(cid), CellCmd::DESTROY);
    Destroy {
        reason: DestroyReason(3),
    }
    .encode(&mut d.body);
    write("cell", "destroy", &d.to_bytes());
    write(
        "cell",
        "padding",
        &Cell::new_zeroed(None, CellCmd(0)).to_bytes(),
    );
    write(
        "handshake",
        "onionskin",
        &[[0u8].as_slice(), &skin].concat(),
    );
    write("handshake", "reply", &[[1u8].as_slice(), &reply].concat());
    write(
        "handshake",
        "tlv",
        &[
            [2u8].as_slice(),
            &tlv::encode(&[(1, b"abc"), (7, b"")]).expect("tlv"),
        ]
        .concat(),
    );

    // relay_msg: every message type, as the region decoder sees it and as cmd | body.
    for (i, (sid, m)) in relay_msgs().into_iter().enumerate() {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = m.encode(sid, &mut buf).expect("encode");
        write("relay_msg", &format!("msg{i:02}"), &buf[..n]);
        write("relay_msg", &format!("msg{i:02}_padded"), &buf);
        // relay_circuit: the same message sent by a client (op 0: raw region).
        let mut ops = vec![0u8, 0];
        ops.extend((n as u16).to_be_bytes());
        ops.extend(&buf[..n]);
        write("relay_circuit", &format!("raw{i:02}"), &ops);
    }

    // relay_circuit: open a stream at an exit, connect, data both ways, SENDME, END, timers.
    let exit_flow = [
        1u8, // previous hop is a relay (flags)
        2, 0, 1, // BEGIN on stream 1
        6, 1, 0, // stream 1 connected
        2, 1, 1, 4, b'h', b'e', b'l', b'l', b'o', b' ', b'w', b'o', b'r', b'l', b'd', b'!', b'!',
        b'!', b'!', b'!', // DATA
        6, 1, 4, 0, 8, b'r', b'e', b's', b'p', b'o', b'n', b's', b'e', // package
        6, 1, 3, 1, // data consumed
        2, 4, 0, // SENDME circuit
        5, 0, 100, // 1 s later
        2, 3, 1, 6, // END
        5, 255, 255, // much later
    ];
    write("relay_circuit", "exit_flow", &exit_flow);
    write(
        "relay_circuit",
        "extend",
        &[0u8, 2, 6, 0, 4, 0x40, 3, 0, 4, 1, 2, 3, 4, 5, 0, 200, 7, 1],
    );
    write(
        "relay_circuit",
        "resolve_begindir",
        &[0u8, 2, 5, 2, 2, 7, 3, 5, 1, 0, 6, 2, 1, 7],
    );

    // Documents.
    write("descriptor", "relay1", &sample_descriptor(1));
    write("descriptor", "relay7", &sample_descriptor(7));
    write("vote", "three_relays", &sample_vote(3));
    write("vote", "one_relay", &sample_vote(1));
    write("consensus", "three_relays", &sample_consensus(3));
    write("consensus", "one_relay", &sample_consensus(1));
    let auth = allium_fuzz::identity(200);
    let signing = allium_fuzz::identity(210);
    if let Ok(cert) = allium_directory::doc::issue_cert(
        &auth,
        &signing.public(),
        1_800_000_000,
        1_800_000_000 + 86_400 * 30,
    ) {
        write("auth_cert", "cert", &cert.to_bytes());
    }

    // SOCKS: the first byte is the piece size.
    write(
        "socks",
        "socks5_noauth_domain",
        &[
            &[255u8][..],
            &[5, 1, 0],
            &[5, 1, 0, 3, 11],
            b"example.com",
            &[0, 80],
        ]
        .concat(),
    );
    write(
        "socks",
        "socks5_userpass_ipv4",
        &[
            &[3u8][..],
            &[5, 1, 2],
            &[1, 4],
            b"user",
            &[4],
            b"pass",
            &[5, 1, 0, 1, 10, 0, 0, 1, 1, 187],
        ]
        .concat(),
    );
    write(
        "socks",
        "socks5_ipv6_resolve",
        &[
            &[7u8][..],
            &[5, 1, 0],
            &[5, 0xF0, 0, 4],
            &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            &[1, 187],
        ]
        .concat(),
    );
    write(
        "socks",
        "socks4a",
        &[
            &[255u8][..],
            &[4, 1, 0, 80, 0, 0, 0, 1],
            b"user\0example.com\0",
        ]
        .concat(),
    );
    write(
        "socks",
        "socks4",
        &[&[2u8][..], &[4, 1, 1, 187, 93, 184, 216, 34], b"\0"].concat(),
    );

    // HTTP headers as the directory client reads them (before the blank line).
    write("http_response", "ok", b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 4096\r\nConnection: close");
    write(
        "http_response",
        "not_found",
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 22",
    );
    write(
        "http_response",
        "chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
    );
    write(
        "http_response",
        "no_length",
        b"HTTP/1.1 503 Busy\r\nRetry-After: 10",
    );
    // bwfile: a scanner's output (three relays), the optional fields, and lines the reader skips.
    let mut bw = allium_directory::doc::BandwidthFile {
        timestamp: 1_796_112_000,
        ..Default::default()
    };
    bw.header.insert("software".into(), "allium".into());
    bw.header.insert("scanner_country".into(), "ZZ".into());
    for n in 1..=3u8 {
        bw.relays.insert(
            allium_fuzz::identity(n).public(),
            allium_directory::doc::bwfile::BwLine {
                bw: 250 * u32::from(n),
                measured_at: 1_796_111_000 + u64::from(n),
                nick: (n != 2).then(|| format!("relay{n}")),
            },
        );
    }
    write("bwfile", "three_relays", bw.to_text().as_bytes());
    let id = allium_fuzz::identity(4).public().to_hex();
    write(
        "bwfile",
        "odd_lines",
        format!(
            "1796112000\nversion=1.4.0\nfile_created=2026-11-30T00:00:00\n=====\n\
             node_id=${id} bw=99999999999 extra=1\nnode_id=${id} bw=5\nbw=7\n\n\
             node_id=$00 bw=1\n"
        )
        .as_bytes(),
    );
    write("bwfile", "empty", b"0\nversion=1.0.0\n=====\n");
}
