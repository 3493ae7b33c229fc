//! Shared helpers of the fuzz targets: sample documents (for the seed corpus) and the stateful
//! relay-circuit driver. Not part of the Allium workspace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_crypto::handshake::HopKeys;
use allium_crypto::relaycell::{CELL_BODY_LEN, ClientCircuitCrypto, RELAY_MSG_LEN, RelayHopCrypto};
use allium_crypto::{IdentityKeypair, RelayId, X25519Secret};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::{
    Consensus, ConsensusEntry, ExitPolicy as DocPolicy, Flags, PortRange, RelayDescriptor, Signed,
    Vote, VoteEntry,
};
use allium_proto::cell::{Cell, CellCmd, CircId};
use allium_proto::relaymsg::{
    Begin, BeginFlags, Data, End, EndReason, Extend, LinkSpec, RelayMsg, Resolve, Sendme, Target,
};
use allium_relay::core::{CircuitCore, CoreConfig, Event, Side};
use allium_relay::policy::ExitPolicy;

/// The relay identity every target uses.
pub const OWN: RelayId = RelayId([1; 32]);

/// The fixed onion key of the handshake target.
pub fn onion_key() -> X25519Secret {
    X25519Secret::from_bytes([9; 32])
}

/// A deterministic signing key.
pub fn identity(n: u8) -> IdentityKeypair {
    IdentityKeypair::from_seed(&[n; 32])
}

fn entry(n: u8) -> ConsensusEntry {
    let id = identity(n);
    ConsensusEntry {
        identity: id.public(),
        link_key: X25519Secret::from_bytes([n; 32]).public(),
        onion_key: X25519Secret::from_bytes([n.wrapping_add(100); 32]).public(),
        nickname: format!("relay{n}"),
        addrs: vec![SocketAddr::from(([127, 0, 0, n], 9000 + u16::from(n)))],
        flags: Flags(u16::from(n) & 0x1f),
        weight: 1000 * u32::from(n),
        exit: DocPolicy {
            accept: vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }],
            allow_private: n % 2 == 0,
            rules: Vec::new(),
        },
        family: Vec::new(),
        measured: n % 2 == 1,
    }
}

/// A signed relay descriptor, encoded.
pub fn sample_descriptor(n: u8) -> Vec<u8> {
    let id = identity(n);
    let d = RelayDescriptor {
        version: DESC_VERSION,
        identity: id.public(),
        link_key: X25519Secret::from_bytes([n; 32]).public(),
        onion_key: X25519Secret::from_bytes([n.wrapping_add(100); 32]).public(),
        nickname: format!("relay{n}"),
        addrs: vec![
            SocketAddr::from(([127, 0, 0, n], 9000)),
            "[::1]:9001".parse().expect("address"),
        ],
        bandwidth_observed: 1 << 20,
        exit_policy: DocPolicy {
            accept: vec![PortRange { lo: 1, hi: 65535 }],
            allow_private: false,
            rules: Vec::new(),
        },
        family: Vec::new(),
        protocols: default_protocols(),
        contact: "ops@example.invalid".into(),
        published: 1_800_000_000,
        expires: 1_800_000_000 + 86_400,
    };
    Signed::sign(&d, &id).expect("sign").to_bytes()
}

/// A signed vote with `n` relays, encoded.
pub fn sample_vote(n: u8) -> Vec<u8> {
    let auth = identity(200);
    let v = Vote {
        version: allium_directory::doc::consensus::VOTE_VERSION,
        authority: auth.public(),
        valid_after: 1_800_000_000,
        fresh_until: 1_800_003_600,
        valid_until: 1_800_010_800,
        published: 1_800_000_000,
        params: BTreeMap::from([("circwindow".to_string(), 1000)]),
        relays: (1..=n)
            .map(|i| VoteEntry {
                entry: entry(i),
                published: 1_799_999_000,
                advertised: 2000 * u32::from(i),
                desc_digest: [i; 32],
            })
            .collect(),
        // The shared-random part (a reveal-phase vote): commit, reveal and a current value.
        shared_rand: Some(allium_directory::doc::SrVote {
            commit: Some(allium_directory::doc::SrCommit {
                timestamp: 1_800_000_000,
                hashed_reveal: [n; 32],
            }),
            reveal: Some([n.wrapping_add(1); 32]),
            current: Some(allium_directory::doc::SrvValue {
                num_reveals: 3,
                value: [7; 32],
            }),
            previous: None,
        }),
    };
    let mut v = v;
    v.relays.sort_by_key(|e| e.entry.identity);
    Signed::sign(&v, &auth).expect("sign").to_bytes()
}

/// A consensus with `n` relays signed by two authorities, encoded.
pub fn sample_consensus(n: u8) -> Vec<u8> {
    let (a, b) = (identity(200), identity(201));
    let mut voters = vec![a.public(), b.public()];
    voters.sort();
    let mut relays: Vec<ConsensusEntry> = (1..=n).map(entry).collect();
    relays.sort_by_key(|e| e.identity);
    let c = Consensus {
        version: allium_directory::doc::consensus::CONSENSUS_VERSION,
        method: allium_directory::doc::consensus::CONSENSUS_METHOD,
        valid_after: 1_800_000_000,
        fresh_until: 1_800_003_600,
        valid_until: 1_800_010_800,
        voters,
        params: BTreeMap::new(),
        relays,
        // Odd sizes carry shared random values, even ones the older form without them.
        shared_rand: (n % 2 == 1).then_some(allium_directory::doc::SharedRand {
            current: Some(allium_directory::doc::SrvValue {
                num_reveals: 2,
                value: [n; 32],
            }),
            previous: None,
        }),
        bandwidth_weights: BTreeMap::new(),
    };
    let mut s = Signed::sign(&c, &a).expect("sign");
    s.add_own_signature(&b);
    s.to_bytes()
}

/// Consume `n` bytes (fewer at the end of the input).
fn take<'a>(r: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = r.split_at(n.min(r.len()));
    *r = rest;
    head
}

fn byte(r: &mut &[u8]) -> u8 {
    take(r, 1).first().copied().unwrap_or(0)
}

fn u16be(r: &mut &[u8]) -> u16 {
    u16::from_be_bytes([byte(r), byte(r)])
}

/// A well-formed client message chosen by the fuzzer (reaches deep states quickly).
fn structured_msg(r: &mut &[u8]) -> (u16, RelayMsg) {
    let kind = byte(r);
    let sid = u16::from(byte(r) % 4);
    let msg = match kind % 9 {
        0 => RelayMsg::Begin(Begin {
            target: if kind & 0x80 == 0 {
                Target::Ip([127, 0, 0, 1].into())
            } else {
                Target::Hostname("example.com".into())
            },
            port: 80,
            flags: BeginFlags(u32::from(kind >> 4)),
        }),
        1 | 2 => {
            let len = usize::from(byte(r)) * 4;
            RelayMsg::Data(Data {
                data: take(r, len.min(498)).to_vec(),
            })
        }
        3 => RelayMsg::End(End::new(EndReason(byte(r)))),
        4 => RelayMsg::Sendme(Sendme { tag: None }),
        5 => RelayMsg::Resolve(Resolve {
            hostname: "example.org".into(),
        }),
        6 => RelayMsg::Extend(Extend {
            specs: vec![
                LinkSpec::Ipv4("127.0.0.2:9000".parse().expect("address")),
                LinkSpec::Ed25519Id(RelayId([2; 32])),
            ],
            htype: 1,
            hdata: take(r, 130).to_vec(),
        }),
        7 => RelayMsg::BeginDir(allium_proto::relaymsg::BeginDir),
        _ => RelayMsg::Drop(allium_proto::relaymsg::DropMsg),
    };
    (sid, msg)
}

/// Drive one relay circuit core with the operations encoded in `data` (see the README for the
/// format). Checks: no panic, a closed circuit stays closed, and the outbound queue stays bounded.
pub fn run_circuit(data: &[u8]) {
    let mut r = data;
    let flags = byte(&mut r);
    let keys = HopKeys::dangerously_from_parts([4; 32], [5; 32], [6; 32]);
    let cfg = CoreConfig::new(OWN, flags & 1 == 0, Arc::new(ExitPolicy::accept_all(true)));
    let mut core = CircuitCore::new(cfg, RelayHopCrypto::new(&keys));
    let mut client = ClientCircuitCrypto::new();
    client.add_hop(&keys).expect("one hop");
    let mut now = Instant::now();
    let mut was_closed = false;
    let mut ops = 0;
    while !r.is_empty() && ops < 4096 {
        ops += 1;
        let op = byte(&mut r);
        let cmd = if op & 0x80 == 0 {
            CellCmd::RELAY
        } else {
            CellCmd::RELAY_EARLY
        };
        match op % 8 {
            0 | 1 => {
                // A relay message region of the fuzzer's choosing, correctly encrypted.
                let len = usize::from(u16be(&mut r)) % (RELAY_MSG_LEN + 1);
                let msg = take(&mut r, len);
                let mut body = Box::new([0u8; CELL_BODY_LEN]);
                if client.encrypt_forward(0, cmd.0, msg, &mut body).is_ok() {
                    let cell = Cell {
                        circ_id: CircId::new(7),
                        cmd,
                        body,
                    };
                    let _ = core.handle_cell(Side::Prev, cell, now);
                }
            }
            2 | 3 => {
                let (sid, msg) = structured_msg(&mut r);
                let mut buf = [0u8; RELAY_MSG_LEN];
                if let Ok(n) = msg.encode(sid, &mut buf) {
                    let mut body = Box::new([0u8; CELL_BODY_LEN]);
                    if client
                        .encrypt_forward(0, cmd.0, &buf[..n], &mut body)
                        .is_ok()
                    {
                        let cell = Cell {
                            circ_id: CircId::new(7),
                            cmd,
                            body,
                        };
                        let _ = core.handle_cell(Side::Prev, cell, now);
                    }
                }
            }
            4 => {
                // A raw cell (any command, any body) from either side.
                let side = if op & 0x40 == 0 {
                    Side::Prev
                } else {
                    Side::Next
                };
                let ccmd = CellCmd(byte(&mut r));
                let mut body = Box::new([0u8; CELL_BODY_LEN]);
                let len = usize::from(u16be(&mut r)) % (CELL_BODY_LEN + 1);
                let src = take(&mut r, len);
                body[..src.len()].copy_from_slice(src);
                let cell = Cell {
                    circ_id: CircId::new(7),
                    cmd: ccmd,
                    body,
                };
                let _ = core.handle_cell(side, cell, now);
            }
            5 => {
                now += Duration::from_millis(u64::from(u16be(&mut r)) * 10);
                if core.poll_timeout().is_some_and(|t| t <= now) {
                    core.handle_timeout(now);
                }
            }
            6 => {
                // What an exit driver reports back.
                let sid = u16::from(byte(&mut r) % 4);
                match byte(&mut r) % 6 {
                    0 => core.stream_connected(
                        sid,
                        Some(SocketAddr::from(([127, 0, 0, 1], 80))),
                        now,
                    ),
                    1 => core.stream_failed(sid, EndReason(byte(&mut r)), now),
                    2 => core.stream_eof(sid, now),
                    3 => core.data_consumed(sid, usize::from(byte(&mut r)), now),
                    4 => {
                        let len = usize::from(u16be(&mut r)) % 4096;
                        let d = take(&mut r, len);
                        let _ = core.package(sid, d, now);
                    }
                    _ => core.extend_failed(allium_proto::cell::DestroyReason(byte(&mut r)), now),
                }
            }
            _ => match byte(&mut r) % 4 {
                0 => core.link_closed(Side::Prev),
                1 => core.link_closed(Side::Next),
                2 => core.note_blocked(now),
                _ => core.note_unblocked(),
            },
        }
        // Drain what the core wants done (a driver would send the cells and act on the events).
        let queued = core.transmit_len();
        assert!(queued <= 100_000, "outbound queue grew to {queued} cells");
        while let Some((_side, _cell)) = core.poll_transmit() {}
        while let Some(ev) = core.poll_event() {
            if let Event::StreamData { data, .. } = ev {
                assert!(data.bytes().len() <= RELAY_MSG_LEN);
            }
        }
        if was_closed {
            assert!(core.is_closed(), "a closed circuit reopened");
        }
        was_closed = core.is_closed();
    }
}
