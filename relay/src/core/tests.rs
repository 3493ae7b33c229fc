//! The core driven directly with simulated time: no tokio, no sockets.

// The epoch of simulated time: each test reads the clock once and only adds durations to it.
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_crypto::handshake::{HopKeys, client_start};
use allium_crypto::relaycell::{
    BACKWARD_MSG_OFFSET, CellBody, ClientCircuitCrypto, RELAY_MSG_LEN, RelayHopCrypto,
};
use allium_crypto::{RelayId, X25519Secret};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Destroy, DestroyReason};
use allium_proto::flowctl::{self, SENDME_INC_DEFAULT};
use allium_proto::relaymsg::{
    Begin, BeginFlags, Data, End, EndReason, Extend, LinkSpec, RelayMsg, Resolve, ResolvedValue,
    Sendme, Target, Truncate, Xoff, Xon,
};

use super::*;
use crate::policy::ExitPolicy;

const OWN: RelayId = RelayId([1; 32]);

struct Client {
    cc: ClientCircuitCrypto,
}

fn cfg(prev_is_client: bool, policy: ExitPolicy) -> CoreConfig {
    CoreConfig::new(OWN, prev_is_client, Arc::new(policy))
}

/// A core created through [`answer_create_body`], and the client that created it.
fn setup(cfg: CoreConfig) -> (CircuitCore, Client) {
    let onion = X25519Secret::generate();
    let (hs, skin) = client_start(&OWN, &onion.public(), &flowctl::cc_request()).unwrap();
    let create = Cell::create(
        CircId::random(true),
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    let (core, created) = answer_create_body(&create.body[..], &OWN, &[&onion], cfg).unwrap();
    let (keys, sm) = hs.finish(&created.hdata).unwrap();
    assert_eq!(flowctl::parse_cc_reply(&sm).unwrap(), Default::default());
    let mut cc = ClientCircuitCrypto::new();
    cc.add_hop(&keys).unwrap();
    (core, Client { cc })
}

fn exit() -> (CircuitCore, Client) {
    setup(cfg(false, ExitPolicy::accept_all(true)))
}

fn hop2_keys() -> HopKeys {
    HopKeys::dangerously_from_parts([4; 32], [5; 32], [6; 32])
}

impl Client {
    fn cell(&mut self, hop: usize, cmd: CellCmd, sid: u16, msg: &RelayMsg) -> Cell {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = msg.encode(sid, &mut buf).unwrap();
        let mut body: Box<CellBody> = Box::new([0u8; 1019]);
        self.cc
            .encrypt_forward(hop, cmd.0, &buf[..n], &mut body)
            .unwrap();
        Cell {
            circ_id: CircId::new(7),
            cmd,
            body,
        }
    }
    fn open(&mut self, mut cell: Cell) -> (usize, u16, RelayMsg) {
        assert_eq!(cell.cmd, CellCmd::RELAY);
        let (hop, _) = self
            .cc
            .decrypt_backward(cell.cmd.0, &mut cell.body)
            .unwrap();
        let (sid, msg) =
            RelayMsg::decode(&cell.body[BACKWARD_MSG_OFFSET..][..RELAY_MSG_LEN]).unwrap();
        (hop, sid, msg)
    }
}

fn transmit(core: &mut CircuitCore) -> Vec<(Side, Cell)> {
    std::iter::from_fn(|| core.poll_transmit()).collect()
}

fn events(core: &mut CircuitCore) -> Vec<Event> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

/// The relay messages the core sent to the client (all cells must go to `Prev`).
fn replies(core: &mut CircuitCore, cl: &mut Client) -> Vec<(u16, RelayMsg)> {
    transmit(core)
        .into_iter()
        .map(|(side, c)| {
            assert_eq!(side, Side::Prev);
            let (hop, sid, msg) = cl.open(c);
            assert_eq!(hop, 0);
            (sid, msg)
        })
        .collect()
}

fn destroy_reason(c: &Cell) -> DestroyReason {
    assert_eq!(c.cmd, CellCmd::DESTROY);
    Destroy::decode(&c.body[..]).unwrap().reason
}

fn assert_destroyed(core: &mut CircuitCore, sides: &[Side], reason: DestroyReason) {
    assert!(core.is_closed());
    let out = transmit(core);
    let got: Vec<Side> = out
        .iter()
        .filter(|(_, c)| c.cmd == CellCmd::DESTROY)
        .map(|(s, c)| {
            assert_eq!(destroy_reason(c), reason);
            *s
        })
        .collect();
    assert_eq!(got, sides);
    assert!(
        events(core)
            .iter()
            .any(|e| matches!(e, Event::Destroyed { reason: r } if *r == reason))
    );
}

fn begin(target: Target, port: u16) -> RelayMsg {
    RelayMsg::Begin(Begin {
        target,
        port,
        flags: BeginFlags::default(),
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn data(d: &[u8]) -> RelayMsg {
    RelayMsg::Data(Data { data: d.to_vec() })
}

fn extend_msg(id: RelayId) -> RelayMsg {
    RelayMsg::Extend(Extend {
        specs: vec![
            LinkSpec::Ed25519Id(id),
            LinkSpec::Ipv4("127.0.0.1:9".parse().unwrap()),
        ],
        htype: 1,
        hdata: vec![0; 100],
    })
}

/// Extend `core` to a fake next hop with [`hop2_keys`]; returns that hop's crypto.
fn extend_open(core: &mut CircuitCore, cl: &mut Client, now: Instant) -> RelayHopCrypto {
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(RelayId([5; 32])));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(core);
    assert!(matches!(ev.as_slice(), [Event::ExtendTo { .. }]), "{ev:?}");
    let created = Cell::created(
        CircId::new(9).unwrap(),
        &allium_proto::cell::Created { hdata: vec![3; 64] },
    )
    .unwrap();
    core.handle_cell(Side::Next, created, now).unwrap();
    let r = replies(core, cl);
    assert!(
        matches!(&r[..], [(0, RelayMsg::Extended(e))] if e.hdata == vec![3; 64]),
        "{r:?}"
    );
    assert_eq!(core.next(), Next::Open);
    cl.cc.add_hop(&hop2_keys()).unwrap();
    RelayHopCrypto::new(&hop2_keys())
}

#[test]
fn first_hop_refuses_begin_and_ignores_drop() {
    let (mut core, mut cl) = setup(cfg(true, ExitPolicy::accept_all(true)));
    let now = Instant::now();
    let c = cl.cell(0, CellCmd::RELAY, 0, &RelayMsg::Drop(Default::default()));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(!core.has_transmit());
    let c = cl.cell(0, CellCmd::RELAY, 1, &begin(Target::Ip(ip("8.8.8.8")), 80));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(1, RelayMsg::End(End::new(EndReason::TORPROTOCOL)))]
    );
    assert!(events(&mut core).is_empty());
}

/// A circuit whose previous hop was taken for a client (the relay had no consensus yet when the
/// CREATE came) accepts BEGIN once the driver learns the previous hop is a relay.
#[test]
fn begin_is_accepted_once_the_previous_hop_is_known_as_a_relay() {
    let (mut core, mut cl) = setup(cfg(true, ExitPolicy::accept_all(true)));
    let now = Instant::now();
    let c = cl.cell(0, CellCmd::RELAY, 1, &begin(Target::Ip(ip("8.8.8.8")), 80));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(1, RelayMsg::End(End::new(EndReason::TORPROTOCOL)))]
    );
    assert!(core.prev_is_client());
    core.note_prev_is_relay();
    assert!(!core.prev_is_client());
    let c = cl.cell(0, CellCmd::RELAY, 2, &begin(Target::Ip(ip("8.8.8.8")), 80));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(replies(&mut core, &mut cl).is_empty(), "BEGIN refused");
    let evs = events(&mut core);
    assert!(
        evs.iter()
            .any(|e| matches!(e, crate::core::Event::OpenStream { sid: 2, .. })),
        "{evs:?}"
    );
}

#[test]
fn create_without_congestion_control_is_refused() {
    let onion = X25519Secret::generate();
    // An empty CM, and one that names an unknown algorithm.
    for cm in [&[][..], &[1, 1, 9][..]] {
        let (_, skin) = client_start(&OWN, &onion.public(), cm).unwrap();
        let cell = Cell::create(
            CircId::new(1).unwrap(),
            &Create {
                htype: 1,
                hdata: skin,
            },
        )
        .unwrap();
        let c = cfg(true, ExitPolicy::default());
        let e = answer_create_body(&cell.body[..], &OWN, &[&onion], c).unwrap_err();
        assert!(matches!(e, CreateError::NoCongestionControl), "{e:?}");
        assert_eq!(e.wire_reason(), DestroyReason::PROTOCOL);
    }
}

#[test]
fn create_failures_say_why() {
    let onion = X25519Secret::generate();
    let c = cfg(true, ExitPolicy::default());
    // An onionskin for another identity.
    let (_, skin) = client_start(&RelayId([7; 32]), &onion.public(), &[]).unwrap();
    let cell = Cell::create(
        CircId::new(1).unwrap(),
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    let e = answer_create_body(&cell.body[..], &OWN, &[&onion], c.clone()).unwrap_err();
    assert!(matches!(e, CreateError::Handshake(_)), "{e:?}");
    assert_eq!(e.wire_reason(), DestroyReason::NONE);
    let (_, skin) = client_start(&OWN, &onion.public(), &flowctl::cc_request()).unwrap();
    let cell = Cell::create(
        CircId::new(1).unwrap(),
        &Create {
            htype: 2,
            hdata: skin,
        },
    )
    .unwrap();
    let e = answer_create_body(&cell.body[..], &OWN, &[&onion], c).unwrap_err();
    assert!(matches!(e, CreateError::UnsupportedHtype(2)), "{e:?}");
    assert_eq!(e.wire_reason(), DestroyReason::PROTOCOL);
}

#[test]
fn extend_outside_relay_early_destroys() {
    let (mut core, mut cl) = exit();
    let c = cl.cell(0, CellCmd::RELAY, 0, &extend_msg(RelayId([5; 32])));
    let e = core.handle_cell(Side::Prev, c, Instant::now()).unwrap_err();
    assert!(matches!(e, CircError::Unexpected { .. }), "{e}");
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);
    assert!(core.close_error().is_some());
}

#[test]
fn extend_fails_then_succeeds_and_cells_pass_both_ways() {
    let (mut core, mut cl) = setup(cfg(true, ExitPolicy::default()));
    let now = Instant::now();
    // To ourselves: refused with TRUNCATED PROTOCOL.
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(OWN));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let r = replies(&mut core, &mut cl);
    assert!(matches!(&r[..], [(0, RelayMsg::Truncated(t))] if t.reason == DestroyReason::PROTOCOL));
    // The driver cannot reach the relay.
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(RelayId([5; 32])));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut core);
    let [
        Event::ExtendTo {
            relay,
            addrs,
            create,
        },
    ] = ev.as_slice()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(*relay, RelayId([5; 32]));
    assert_eq!(addrs, &vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]);
    assert_eq!(create.hdata, vec![0; 100]);
    core.extend_failed(DestroyReason::CONNECTFAILED, now);
    let r = replies(&mut core, &mut cl);
    assert!(
        matches!(&r[..], [(0, RelayMsg::Truncated(t))] if t.reason == DestroyReason::CONNECTFAILED),
        "{r:?}"
    );
    assert!(matches!(events(&mut core).as_slice(), [Event::NextClosed]));
    assert_eq!(core.next(), Next::Unextended);
    // Again, and this time CREATED comes back.
    let mut hop2 = extend_open(&mut core, &mut cl, now);
    // Forward: a cell for hop 2 passes with its command.
    let c = cl.cell(
        1,
        CellCmd::RELAY_EARLY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    let out = transmit(&mut core);
    let [(Side::Next, fwd)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(fwd.cmd, CellCmd::RELAY_EARLY);
    let mut body = fwd.body.clone();
    assert!(matches!(
        hop2.decrypt_forward(fwd.cmd.0, &mut body).unwrap(),
        allium_crypto::relaycell::Forward::Recognized { .. }
    ));
    // Backward: hop 2 originates; the client sees it from hop index 1.
    let mut buf = [0u8; RELAY_MSG_LEN];
    let end = RelayMsg::End(End::new(EndReason::DONE));
    let n = end.encode(3, &mut buf).unwrap();
    let mut cell = Cell::new_zeroed(CircId::new(9), CellCmd::RELAY);
    hop2.encrypt_backward(CellCmd::RELAY.0, &buf[..n], &mut cell.body)
        .unwrap();
    core.handle_cell(Side::Next, cell, now).unwrap();
    let out = transmit(&mut core);
    let [(Side::Prev, back)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(cl.open(back.clone()), (1, 3, end));
    // A second EXTEND on an extended circuit is a violation.
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(RelayId([6; 32])));
    assert!(core.handle_cell(Side::Prev, c, now).is_err());
    assert_destroyed(&mut core, &[Side::Prev, Side::Next], DestroyReason::NONE);
}

#[test]
fn extend_times_out_with_simulated_time() {
    let (mut core, mut cl) = exit();
    let t0 = Instant::now();
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(RelayId([5; 32])));
    core.handle_cell(Side::Prev, c, t0).unwrap();
    assert_eq!(core.poll_timeout(), Some(t0 + EXTEND_TIMEOUT));
    core.handle_timeout(t0 + EXTEND_TIMEOUT - Duration::from_millis(1));
    assert!(!core.has_transmit());
    core.handle_timeout(t0 + EXTEND_TIMEOUT);
    let out = transmit(&mut core);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].0, Side::Next);
    assert_eq!(destroy_reason(&out[0].1), DestroyReason::NONE);
    let (_, _, msg) = cl.open(out[1].1.clone());
    assert!(matches!(msg, RelayMsg::Truncated(t) if t.reason == DestroyReason::TIMEOUT));
    assert_eq!(core.poll_timeout(), None);
    assert!(!core.is_closed());
}

#[test]
fn destroy_from_next_while_extending_truncates() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &extend_msg(RelayId([5; 32])));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let _ = events(&mut core);
    let d = Cell::destroy(CircId::new(9).unwrap(), DestroyReason::RESOURCELIMIT);
    core.handle_cell(Side::Next, d, now).unwrap();
    let r = replies(&mut core, &mut cl);
    assert!(
        matches!(&r[..], [(0, RelayMsg::Truncated(t))] if t.reason == DestroyReason::DESTROYED)
    );
    assert!(!core.is_closed());
}

#[test]
fn destroy_propagates_to_the_other_side_only() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let _ = extend_open(&mut core, &mut cl, now);
    let d = Cell::destroy(CircId::new(9).unwrap(), DestroyReason::FINISHED);
    core.handle_cell(Side::Next, d, now).unwrap();
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);
    // Later input is ignored.
    let c = cl.cell(0, CellCmd::RELAY, 0, &RelayMsg::Drop(Default::default()));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(!core.has_transmit());

    let (mut core, mut cl) = exit();
    let _ = extend_open(&mut core, &mut cl, now);
    let d = Cell::destroy(CircId::new(7).unwrap(), DestroyReason::REQUESTED);
    core.handle_cell(Side::Prev, d, now).unwrap();
    assert_destroyed(&mut core, &[Side::Next], DestroyReason::NONE);

    let (mut core, _) = exit();
    core.link_closed(Side::Prev);
    assert_destroyed(&mut core, &[], DestroyReason::NONE);
}

#[test]
fn truncate_drops_the_next_hop() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let _ = extend_open(&mut core, &mut cl, now);
    let c = cl.cell(0, CellCmd::RELAY, 0, &RelayMsg::Truncate(Truncate));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let out = transmit(&mut core);
    assert_eq!(out[0].0, Side::Next);
    assert_eq!(destroy_reason(&out[0].1), DestroyReason::NONE);
    let (_, _, msg) = cl.open(out[1].1.clone());
    assert!(matches!(msg, RelayMsg::Truncated(t) if t.reason == DestroyReason::REQUESTED));
    assert!(matches!(events(&mut core).as_slice(), [Event::NextClosed]));
    assert_eq!(core.next(), Next::Unextended);
}

#[test]
fn ninth_relay_early_destroys() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    for _ in 0..MAX_RELAY_EARLY {
        let c = cl.cell(
            0,
            CellCmd::RELAY_EARLY,
            0,
            &RelayMsg::Drop(Default::default()),
        );
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    let c = cl.cell(
        0,
        CellCmd::RELAY_EARLY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    let e = core.handle_cell(Side::Prev, c, now).unwrap_err();
    assert!(matches!(e, CircError::RelayEarlyBudget { max: 8 }), "{e}");
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);
}

#[test]
fn bad_tag_and_replay_destroy() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let mut c = cl.cell(0, CellCmd::RELAY, 0, &RelayMsg::Drop(Default::default()));
    c.body[100] ^= 1;
    let e = core.handle_cell(Side::Prev, c, now).unwrap_err();
    assert!(matches!(e, CircError::BadTag(_)), "{e}");
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);

    let (mut core, mut cl) = exit();
    let c = cl.cell(0, CellCmd::RELAY, 0, &RelayMsg::Drop(Default::default()));
    core.handle_cell(Side::Prev, c.clone(), now).unwrap();
    assert!(core.handle_cell(Side::Prev, c, now).is_err());
    assert!(core.is_closed());
}

#[test]
fn pass_without_next_hop_and_backward_relay_early_destroy() {
    let (mut core, mut cl) = exit();
    cl.cc.add_hop(&hop2_keys()).unwrap();
    let c = cl.cell(1, CellCmd::RELAY, 0, &RelayMsg::Drop(Default::default()));
    let e = core.handle_cell(Side::Prev, c, Instant::now()).unwrap_err();
    assert!(matches!(e, CircError::NoNextHop), "{e}");
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);

    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let _ = extend_open(&mut core, &mut cl, now);
    let e = core
        .handle_cell(
            Side::Next,
            Cell::new_zeroed(CircId::new(9), CellCmd::RELAY_EARLY),
            now,
        )
        .unwrap_err();
    assert!(matches!(e, CircError::BackwardRelayEarly));
    assert_destroyed(&mut core, &[Side::Prev, Side::Next], DestroyReason::NONE);
}

#[test]
fn backward_only_message_and_bad_stream_id_destroy() {
    let (mut core, mut cl) = exit();
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Truncated(allium_proto::relaymsg::Truncated {
            reason: DestroyReason::NONE,
        }),
    );
    assert!(matches!(
        core.handle_cell(Side::Prev, c, Instant::now()),
        Err(CircError::Unexpected { .. })
    ));
    let (mut core, mut cl) = exit();
    // DATA on stream 0: the encoder refuses it, so patch the stream id after encoding.
    let mut buf = [0u8; RELAY_MSG_LEN];
    let n = data(b"x").encode(1, &mut buf).unwrap();
    buf[1..3].copy_from_slice(&[0, 0]);
    let mut body: Box<CellBody> = Box::new([0u8; 1019]);
    cl.cc
        .encrypt_forward(0, CellCmd::RELAY.0, &buf[..n], &mut body)
        .unwrap();
    let c = Cell {
        circ_id: CircId::new(7),
        cmd: CellCmd::RELAY,
        body,
    };
    assert!(matches!(
        core.handle_cell(Side::Prev, c, Instant::now()),
        Err(CircError::StreamIdRule { .. })
    ));
}

/// Open stream `sid` to 127.0.0.1:80 and connect it.
fn open_stream(core: &mut CircuitCore, cl: &mut Client, sid: u16, now: Instant) {
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        sid,
        &begin(Target::Ip(ip("127.0.0.1")), 80),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(core);
    assert!(
        matches!(&ev[..], [Event::OpenStream { sid: s, addrs }] if *s == sid && addrs.len() == 1),
        "{ev:?}"
    );
    assert_eq!(
        core.stream_state(sid),
        Some(StreamState::Connecting { client_done: false })
    );
    core.stream_connected(sid, Some("127.0.0.1:80".parse().unwrap()), now);
    let r = replies(core, cl);
    assert!(
        matches!(&r[..], [(s, RelayMsg::Connected(_))] if *s == sid),
        "{r:?}"
    );
    assert_eq!(core.stream_state(sid), Some(StreamState::Open));
}

#[test]
fn exit_stream_data_windows_and_half_close() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 7, now);
    // Client → destination: the bytes come out in the cell's box.
    let c = cl.cell(0, CellCmd::RELAY, 7, &data(b"hello"));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut core);
    let [Event::StreamData { sid: 7, data: d }] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(d.bytes(), b"hello");
    // 49 more, consumed: no stream SENDME ever (streams use XON/XOFF).
    for _ in 0..49 {
        let c = cl.cell(0, CellCmd::RELAY, 7, &data(b"x"));
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    assert_eq!(events(&mut core).len(), 49);
    core.data_consumed(7, 50, now);
    let r = replies(&mut core, &mut cl);
    assert!(
        r.iter()
            .all(|(s, m)| *s == 0 && matches!(m, RelayMsg::Sendme(_))),
        "{r:?}"
    );

    // Destination → client: limited by the congestion window (slow start's initial window).
    let cwnd = core.congestion().cwnd() as usize;
    let big = vec![0xab; (cwnd + 100) * 934];
    let took = core.package(7, &big, now);
    assert_eq!(took, cwnd * 934);
    assert_eq!(core.stream_budget(7), Some(0));
    assert_eq!(core.package(7, &big[took..], now), 0);
    let r = replies(&mut core, &mut cl);
    assert_eq!(r.len(), cwnd);
    assert!(
        r.iter()
            .all(|(s, m)| *s == 7 && matches!(m, RelayMsg::Data(d) if d.data.len() == 934))
    );

    // Half-close: the client finishes first, then the destination.
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        7,
        &RelayMsg::End(End::new(EndReason::DONE)),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::StreamEnd { sid: 7 }]
    ));
    assert_eq!(
        core.stream_state(7),
        Some(StreamState::HalfClosed(HalfClose::ClientFinished))
    );
    // The destination may still send (once the congestion window has room: `Some`, not `None`).
    assert_eq!(core.stream_budget(7), Some(0));
    // DATA from the client after its END DONE is a violation... (checked below on another
    // stream); here the destination finishes.
    core.stream_eof(7, now);
    let r = replies(&mut core, &mut cl);
    assert_eq!(r, vec![(7, RelayMsg::End(End::new(EndReason::DONE)))]);
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::StreamClosed {
            sid: 7,
            graceful: true
        }]
    ));
    assert_eq!(core.n_streams(), 0);

    // DATA after END DONE destroys.
    open_stream(&mut core, &mut cl, 8, now);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        8,
        &RelayMsg::End(End::new(EndReason::DONE)),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    let c = cl.cell(0, CellCmd::RELAY, 8, &data(b"late"));
    assert!(core.handle_cell(Side::Prev, c, now).is_err());
}

#[test]
fn congestion_window_limits_two_streams_and_sendmes_grow_it() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 1, now);
    open_stream(&mut core, &mut cl, 2, now);
    let cwnd = core.congestion().cwnd() as usize;
    let big = vec![1u8; cwnd * 934];
    assert_eq!(core.package(1, &big[..cwnd / 2 * 934], now), cwnd / 2 * 934);
    assert_eq!(core.package(2, &big, now), (cwnd - cwnd / 2) * 934);
    assert_eq!(core.stream_budget(1), Some(0));
    assert_eq!(core.stream_budget(2), Some(0));
    let mut tags = Vec::new();
    for (side, mut c) in transmit(&mut core) {
        assert_eq!(side, Side::Prev);
        let (_, tag) = cl.cc.decrypt_backward(c.cmd.0, &mut c.body).unwrap();
        tags.push(tag);
    }
    assert_eq!(tags.len(), cwnd);
    // A circuit SENDME must echo the tag of the SENDME_INC-th cell; in slow start it frees its
    // cells and grows the window by as much.
    let inc = usize::from(SENDME_INC_DEFAULT);
    let later = now + Duration::from_millis(80);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Sendme(Sendme {
            tag: Some(tags[inc - 1]),
        }),
    );
    core.handle_cell(Side::Prev, c, later).unwrap();
    assert_eq!(core.stream_budget(1), Some(2 * inc));
    assert_eq!(core.congestion().rtt_min(), Some(Duration::from_millis(80)));
    // A SENDME with the tag of a cell that did not complete an increment is a forgery.
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Sendme(Sendme {
            tag: Some(tags[2 * inc - 2]),
        }),
    );
    let e = core.handle_cell(Side::Prev, c, later).unwrap_err();
    assert!(matches!(e, CircError::Window(_)), "{e}");
}

#[test]
fn too_many_sendmes_and_stream_sendmes_destroy() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 1, now);
    let inc = usize::from(SENDME_INC_DEFAULT);
    let big = vec![1u8; inc * 934];
    assert_eq!(core.package(1, &big, now), inc * 934);
    let mut tags = Vec::new();
    for (_, mut c) in transmit(&mut core) {
        tags.push(cl.cc.decrypt_backward(c.cmd.0, &mut c.body).unwrap().1);
    }
    let sendme = RelayMsg::Sendme(Sendme {
        tag: Some(tags[inc - 1]),
    });
    let c = cl.cell(0, CellCmd::RELAY, 0, &sendme);
    core.handle_cell(Side::Prev, c, now).unwrap();
    // The same SENDME again: one more than the cells sent allow.
    let c = cl.cell(0, CellCmd::RELAY, 0, &sendme);
    let e = core.handle_cell(Side::Prev, c, now).unwrap_err();
    assert!(matches!(e, CircError::Window(_)), "{e}");
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);
    // A stream-level SENDME is a violation too.
    let (mut core, mut cl) = exit();
    open_stream(&mut core, &mut cl, 1, now);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        1,
        &RelayMsg::Sendme(Sendme { tag: None }),
    );
    assert!(core.handle_cell(Side::Prev, c, now).is_err());
}

#[test]
fn unexpected_sendme_destroys() {
    let (mut core, mut cl) = exit();
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Sendme(Sendme { tag: Some([7; 16]) }),
    );
    assert!(matches!(
        core.handle_cell(Side::Prev, c, Instant::now()),
        Err(CircError::Window(_))
    ));
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::NONE);
}

#[test]
fn xoff_xon_and_a_client_ignoring_xoff_destroys() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 3, now);
    for _ in 0..flowctl::EXIT_XOFF_THRESHOLD {
        let c = cl.cell(0, CellCmd::RELAY, 3, &data(b"y"));
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    // Nothing consumed yet: XOFF at the threshold (after the circuit SENDMEs of those cells).
    let r = replies(&mut core, &mut cl);
    assert_eq!(
        r.iter()
            .filter(|(s, m)| *s == 3 && *m == RelayMsg::Xoff(Xoff))
            .count(),
        1
    );
    // Draining to the exit's XON threshold sends XON with the drain rate.
    core.data_consumed(
        3,
        (flowctl::EXIT_XOFF_THRESHOLD - flowctl::EXIT_XON_THRESHOLD) as usize,
        now + Duration::from_secs(2),
    );
    let r = replies(&mut core, &mut cl);
    let expect = (flowctl::EXIT_XOFF_THRESHOLD - flowctl::EXIT_XON_THRESHOLD)
        * allium_crypto::relaycell::MAX_DATA as u32
        / 1024
        / 2;
    // (The circuit SENDMEs withheld above the circuit queue cap go out with it.)
    let xons: Vec<_> = r
        .iter()
        .filter(|(_, m)| !matches!(m, RelayMsg::Sendme(_)))
        .collect();
    assert!(
        matches!(&xons[..], [(3, RelayMsg::Xon(Xon { rate_kib }))] if rate_kib.abs_diff(expect) <= 1),
        "{r:?}"
    );
    // The exit stops a stream well before a client would (its destination socket buffers
    // too). The client's destination stops reading: the client may overshoot by up to a maximal
    // congestion window, then the circuit is destroyed.
    for _ in flowctl::EXIT_XON_THRESHOLD..flowctl::EXIT_XOFF_THRESHOLD + flowctl::CWND_MAX {
        let c = cl.cell(0, CellCmd::RELAY, 3, &data(b"y"));
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    let c = cl.cell(0, CellCmd::RELAY, 3, &data(b"y"));
    let e = core.handle_cell(Side::Prev, c, now).unwrap_err();
    assert!(matches!(e, CircError::Window(_)), "{e}");
}

#[test]
fn xoff_from_the_client_pauses_the_stream() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 5, now);
    let c = cl.cell(0, CellCmd::RELAY, 5, &RelayMsg::Xoff(Xoff));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(core.stream_budget(5), Some(0));
    assert_eq!(core.package(5, b"abc", now), 0);
    let c = cl.cell(0, CellCmd::RELAY, 5, &RelayMsg::Xon(Xon { rate_kib: 0 }));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(core.package(5, b"abc", now), 3);
}

#[test]
fn optimistic_data_waits_for_the_connection_and_dies_with_it() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    let begin = RelayMsg::Begin(Begin {
        target: Target::Hostname("dest.example".into()),
        port: 80,
        flags: BeginFlags::default(),
    });
    core.handle_cell(Side::Prev, cl.cell(0, CellCmd::RELAY, 9, &begin), now)
        .unwrap();
    for b in [&b"GET "[..], b"/ HTTP/1.0"] {
        let c = cl.cell(0, CellCmd::RELAY, 9, &data(b));
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    // Only the lookup: the bytes are held while resolving and connecting.
    let ev = events(&mut core);
    assert!(matches!(&ev[..], [Event::Resolve { sid: 9, .. }]), "{ev:?}");
    core.resolved(9, Ok(vec!["10.0.0.9".parse().unwrap()]), now);
    let ev = events(&mut core);
    assert!(
        matches!(&ev[..], [Event::OpenStream { sid: 9, .. }]),
        "{ev:?}"
    );
    core.stream_connected(9, None, now);
    // CONNECTED first, then the held bytes in order.
    let r = replies(&mut core, &mut cl);
    assert!(matches!(&r[..], [(9, RelayMsg::Connected(_))]), "{r:?}");
    let got: Vec<u8> = events(&mut core)
        .iter()
        .flat_map(|e| match e {
            Event::StreamData { sid: 9, data } => data.bytes().to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, b"GET / HTTP/1.0");
    // Data then END DONE before the connection: the destination gets the data, then EOF.
    core.handle_cell(Side::Prev, cl.cell(0, CellCmd::RELAY, 11, &begin), now)
        .unwrap();
    let c = cl.cell(0, CellCmd::RELAY, 11, &data(b"req"));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let end = RelayMsg::End(End::new(EndReason::DONE));
    core.handle_cell(Side::Prev, cl.cell(0, CellCmd::RELAY, 11, &end), now)
        .unwrap();
    assert!(
        events(&mut core)
            .iter()
            .all(|e| matches!(e, Event::Resolve { .. }))
    );
    core.resolved(11, Ok(vec!["10.0.0.9".parse().unwrap()]), now);
    let _ = events(&mut core);
    core.stream_connected(11, None, now);
    let ev = events(&mut core);
    assert!(
        matches!(&ev[..], [Event::StreamData { sid: 11, data }, Event::StreamEnd { sid: 11 }] if data.bytes() == b"req"),
        "{ev:?}"
    );
    assert_eq!(
        core.stream_state(11),
        Some(StreamState::HalfClosed(HalfClose::ClientFinished))
    );
    let _ = replies(&mut core, &mut cl);
    // A failed connection drops held bytes with END.
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("10.0.0.9".parse().unwrap()),
        port: 80,
        flags: BeginFlags::default(),
    });
    core.handle_cell(Side::Prev, cl.cell(0, CellCmd::RELAY, 10, &begin), now)
        .unwrap();
    let c = cl.cell(0, CellCmd::RELAY, 10, &data(b"lost"));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let _ = events(&mut core);
    core.stream_failed(10, EndReason::CONNECTREFUSED, now);
    let r = replies(&mut core, &mut cl);
    assert_eq!(
        r,
        vec![(10, RelayMsg::End(End::new(EndReason::CONNECTREFUSED)))]
    );
    assert!(
        !events(&mut core)
            .iter()
            .any(|e| matches!(e, Event::StreamData { .. }))
    );
}

#[test]
fn exit_policy_resolution_and_resolve() {
    let strict = ExitPolicy {
        accept: vec!["1-1000".into(), "1024-65535".into()],
        allow_private: false,
        ..ExitPolicy::default()
    };
    let (mut core, mut cl) = setup(cfg(false, strict));
    let now = Instant::now();
    let cases = [
        (Target::Ip(ip("127.0.0.1")), 2000, EndReason::EXITPOLICY),
        (Target::Ip(ip("8.8.8.8")), 1010, EndReason::EXITPOLICY),
    ];
    for (i, (t, port, want)) in cases.into_iter().enumerate() {
        let sid = 100 + i as u16;
        let c = cl.cell(0, CellCmd::RELAY, sid, &begin(t, port));
        core.handle_cell(Side::Prev, c, now).unwrap();
        assert_eq!(
            replies(&mut core, &mut cl),
            vec![(sid, RelayMsg::End(End::new(want)))]
        );
    }
    // A name that resolves to a private address: refused after resolution.
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        5,
        &begin(Target::Hostname("only.the.exit".into()), 80),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut core);
    assert!(
        matches!(&ev[..], [Event::Resolve { sid: 5, hostname }] if hostname == "only.the.exit")
    );
    core.resolved(5, Ok(vec![ip("127.0.0.1")]), now);
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(5, RelayMsg::End(End::new(EndReason::EXITPOLICY)))]
    );
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::StreamClosed {
            sid: 5,
            graceful: false
        }]
    ));
    // Not found, timeout; a public answer opens the stream.
    for (sid, r, want) in [
        (6, Err(ResolveFailure::NotFound), EndReason::RESOLVEFAILED),
        (7, Err(ResolveFailure::Timeout), EndReason::TIMEOUT),
    ] {
        let c = cl.cell(
            0,
            CellCmd::RELAY,
            sid,
            &begin(Target::Hostname("x.example".into()), 80),
        );
        core.handle_cell(Side::Prev, c, now).unwrap();
        core.resolved(sid, r, now);
        assert_eq!(
            replies(&mut core, &mut cl),
            vec![(sid, RelayMsg::End(End::new(want)))]
        );
    }
    let _ = events(&mut core);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        8,
        &begin(Target::Hostname("x.example".into()), 80),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    core.resolved(8, Ok(vec![ip("127.0.0.1"), ip("9.9.9.9")]), now);
    let ev = events(&mut core);
    assert!(
        matches!(&ev[..], [Event::Resolve { .. }, Event::OpenStream { sid: 8, addrs }]
            if addrs == &vec!["9.9.9.9:80".parse::<SocketAddr>().unwrap()]),
        "{ev:?}"
    );
    // RESOLVE: answered with RESOLVED; the id is then free.
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        9,
        &RelayMsg::Resolve(Resolve {
            hostname: "a.b".into(),
        }),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::Resolve { sid: 9, .. }]
    ));
    core.resolved(9, Ok(vec![ip("9.9.9.9")]), now);
    let r = replies(&mut core, &mut cl);
    let [(9, RelayMsg::Resolved(res))] = &r[..] else {
        panic!("{r:?}")
    };
    assert_eq!(
        res.answers,
        vec![(ResolvedValue::Ip(ip("9.9.9.9")), DNS_TTL)]
    );
    assert_eq!(core.stream_state(9), None);

    // A non-exit refuses everything.
    let (mut core, mut cl) = setup(cfg(false, ExitPolicy::default()));
    let c = cl.cell(0, CellCmd::RELAY, 1, &begin(Target::Ip(ip("8.8.8.8")), 443));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(1, RelayMsg::End(End::new(EndReason::EXITPOLICY)))]
    );
}

#[test]
fn stream_limit_failure_and_begin_on_used_id() {
    let mut c = cfg(false, ExitPolicy::accept_all(true));
    c.max_streams = 1;
    let (mut core, mut cl) = setup(c);
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 1, now);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        2,
        &begin(Target::Ip(ip("127.0.0.1")), 80),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(2, RelayMsg::End(End::new(EndReason::RESOURCELIMIT)))]
    );
    // END (not DONE) frees the slot at once.
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        1,
        &RelayMsg::End(End::new(EndReason::MISC)),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::StreamClosed {
            sid: 1,
            graceful: false
        }]
    ));
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        3,
        &begin(Target::Ip(ip("127.0.0.1")), 80),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    core.stream_failed(3, EndReason::CONNECTREFUSED, now);
    let r = replies(&mut core, &mut cl);
    assert_eq!(
        r,
        vec![(3, RelayMsg::End(End::new(EndReason::CONNECTREFUSED)))]
    );
    // BEGIN on an id in use destroys.
    let _ = events(&mut core);
    open_stream(&mut core, &mut cl, 4, now);
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        4,
        &begin(Target::Ip(ip("127.0.0.1")), 80),
    );
    assert!(core.handle_cell(Side::Prev, c, now).is_err());
}

#[test]
fn blocked_past_the_cap_destroys() {
    let mut c = cfg(false, ExitPolicy::default());
    c.blocked_cap = Duration::from_secs(5);
    let (mut core, _) = setup(c);
    let t0 = Instant::now();
    core.note_blocked(t0);
    core.note_blocked(t0 + Duration::from_secs(1));
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    core.note_unblocked();
    assert_eq!(core.poll_timeout(), None);
    core.note_blocked(t0 + Duration::from_secs(2));
    core.handle_timeout(t0 + Duration::from_secs(6));
    assert!(!core.is_closed());
    core.handle_timeout(t0 + Duration::from_secs(7));
    assert!(matches!(
        core.close_error(),
        Some(CircError::Blocked { secs: 5 })
    ));
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::TIMEOUT);
}

#[test]
fn queue_overflow_destroy_reason() {
    let (mut core, _) = exit();
    core.destroy(CircError::QueueOverflow { cap: 10 });
    assert_destroyed(&mut core, &[Side::Prev], DestroyReason::RESOURCELIMIT);
    assert!(CircError::QueueOverflow { cap: 1 }.is_violation());
    assert!(!CircError::LinkClosed.is_violation());
}

#[test]
fn circuit_sendme_echoes_the_tag_of_the_cell_that_completed_the_increment() {
    let (mut core, mut cl) = exit();
    let now = Instant::now();
    open_stream(&mut core, &mut cl, 2, now);
    let mut tags = Vec::new();
    let inc = usize::from(SENDME_INC_DEFAULT);
    for _ in 0..2 * inc {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = data(b"z").encode(2, &mut buf).unwrap();
        let mut body: Box<CellBody> = Box::new([0u8; 1019]);
        let tag = cl
            .cc
            .encrypt_forward(0, CellCmd::RELAY.0, &buf[..n], &mut body)
            .unwrap();
        tags.push(tag);
        let c = Cell {
            circ_id: CircId::new(7),
            cmd: CellCmd::RELAY,
            body,
        };
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    // The circuit SENDMEs went out on arrival, whatever the destination consumed.
    let r = replies(&mut core, &mut cl);
    assert_eq!(
        r,
        vec![
            (
                0,
                RelayMsg::Sendme(Sendme {
                    tag: Some(tags[inc - 1])
                })
            ),
            (
                0,
                RelayMsg::Sendme(Sendme {
                    tag: Some(tags[2 * inc - 1])
                })
            ),
        ]
    );
    core.data_consumed(2, 2 * inc, now);
    assert!(!core.has_transmit());
}

/// Past `circ_queue_cells` unwritten cells in the exit streams, circuit SENDMEs are withheld
/// (in order) until the destination drains, or its stream closes; with the cap off they all go
/// out on arrival.
#[test]
fn circuit_sendmes_are_withheld_while_the_exit_streams_hold_more_than_the_cap() {
    let inc = usize::from(SENDME_INC_DEFAULT);
    let sendmes = |r: &[(u16, RelayMsg)]| {
        r.iter()
            .filter(|(s, m)| *s == 0 && matches!(m, RelayMsg::Sendme(_)))
            .count()
    };
    let run = |cap: u32| {
        let mut c = cfg(false, ExitPolicy::accept_all(true));
        c.circ_queue_cells = cap;
        let (mut core, mut cl) = setup(c);
        let now = Instant::now();
        open_stream(&mut core, &mut cl, 5, now);
        // Eight increments into a destination that never reads.
        for _ in 0..8 * inc {
            let c = cl.cell(0, CellCmd::RELAY, 5, &data(b"w"));
            core.handle_cell(Side::Prev, c, now).unwrap();
        }
        let r = replies(&mut core, &mut cl);
        (core, cl, sendmes(&r))
    };
    // Cap off: all eight SENDMEs on arrival.
    let (core, _, n) = run(0);
    assert_eq!(n, 8);
    assert_eq!(core.sendmes_withheld(), 0);
    // Cap 64 cells: the SENDMEs of the first two increments (62 cells) go out; the others wait.
    let (mut core, mut cl, n) = run(64);
    assert_eq!(n, 2);
    assert_eq!(core.sendmes_withheld(), 6);
    assert_eq!(core.take_sendmes_withheld(), 6);
    assert_eq!(core.queued_cells(), 8 * inc as u32);
    let now = Instant::now();
    // Draining to just above the cap releases nothing; to the cap, all six in order.
    core.data_consumed(5, 8 * inc - 65, now);
    assert_eq!(sendmes(&replies(&mut core, &mut cl)), 0);
    core.data_consumed(5, 1, now);
    assert_eq!(sendmes(&replies(&mut core, &mut cl)), 6);
    assert_eq!(core.sendmes_withheld(), 0);
    // Filled again, then the stream is closed: its cells no longer count, the SENDMEs go out.
    for _ in 0..2 * inc {
        let c = cl.cell(0, CellCmd::RELAY, 5, &data(b"w"));
        core.handle_cell(Side::Prev, c, now).unwrap();
    }
    let _ = replies(&mut core, &mut cl);
    assert_eq!(core.sendmes_withheld(), 2);
    let end = cl.cell(
        0,
        CellCmd::RELAY,
        5,
        &RelayMsg::End(End::new(EndReason::MISC)),
    );
    core.handle_cell(Side::Prev, end, now).unwrap();
    assert_eq!(sendmes(&replies(&mut core, &mut cl)), 2);
    assert!(!core.is_closed());
}

#[test]
fn stream_waiting_too_long_for_a_window_ends_with_timeout() {
    let mut c = cfg(false, ExitPolicy::accept_all(true));
    c.window_timeout = Duration::from_secs(60);
    let (mut core, mut cl) = setup(c);
    let t0 = Instant::now();
    open_stream(&mut core, &mut cl, 4, t0);
    let cwnd = core.congestion().cwnd() as usize;
    let big = vec![2u8; (cwnd + 1) * 934];
    assert_eq!(core.package(4, &big, t0), cwnd * 934);
    let _ = replies(&mut core, &mut cl);
    assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    core.handle_timeout(t0 + Duration::from_secs(59));
    assert!(!core.has_transmit());
    core.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(4, RelayMsg::End(End::new(EndReason::TIMEOUT)))]
    );
    assert!(matches!(
        events(&mut core).as_slice(),
        [Event::StreamClosed {
            sid: 4,
            graceful: false
        }]
    ));
    assert!(!core.is_closed());
    assert_eq!(core.poll_timeout(), None);
}

/// Two cores wired in memory, as a harness would: the client's EXTEND at hop 1 becomes a CREATE
/// answered by [`answer_create`] at hop 2, whose CREATED goes back into hop 1; then a stream at
/// hop 2 carries bytes both ways through hop 1.
#[test]
fn two_cores_in_memory_extend_and_stream() {
    let now = Instant::now();
    let (mut hop1, mut cl) = setup(cfg(true, ExitPolicy::default()));
    let id2 = RelayId([2; 32]);
    let onion2 = X25519Secret::generate();
    let (hs, skin) = client_start(&id2, &onion2.public(), &flowctl::cc_request()).unwrap();
    let ext = RelayMsg::Extend(Extend {
        specs: vec![
            LinkSpec::Ed25519Id(id2),
            LinkSpec::Ipv4("127.0.0.2:9001".parse().unwrap()),
        ],
        htype: 1,
        hdata: skin,
    });
    let c = cl.cell(0, CellCmd::RELAY_EARLY, 0, &ext);
    hop1.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut hop1);
    let [Event::ExtendTo { create, .. }] = &ev[..] else {
        panic!("{ev:?}")
    };
    let cfg2 = CoreConfig::new(id2, false, Arc::new(ExitPolicy::accept_all(true)));
    let (mut hop2, created) = answer_create(create, &id2, &[&onion2], cfg2).unwrap();
    let created = Cell::created(CircId::new(9).unwrap(), &created).unwrap();
    hop1.handle_cell(Side::Next, created, now).unwrap();
    let r = replies(&mut hop1, &mut cl);
    let [(0, RelayMsg::Extended(e))] = &r[..] else {
        panic!("{r:?}")
    };
    let (keys, _) = hs.finish(&e.hdata).unwrap();
    cl.cc.add_hop(&keys).unwrap();

    // Move every cell between the two cores until both are quiet; return what reached the
    // client.
    fn pump(hop1: &mut CircuitCore, hop2: &mut CircuitCore, now: Instant) -> Vec<Cell> {
        let mut to_client = Vec::new();
        loop {
            let mut moved = false;
            while let Some((side, c)) = hop1.poll_transmit() {
                moved = true;
                match side {
                    Side::Prev => to_client.push(c),
                    Side::Next => hop2.handle_cell(Side::Prev, c, now).unwrap(),
                }
            }
            while let Some((side, c)) = hop2.poll_transmit() {
                moved = true;
                assert_eq!(side, Side::Prev);
                hop1.handle_cell(Side::Next, c, now).unwrap();
            }
            if !moved {
                return to_client;
            }
        }
    }

    let c = cl.cell(1, CellCmd::RELAY, 5, &begin(Target::Ip(ip("10.0.0.1")), 80));
    hop1.handle_cell(Side::Prev, c, now).unwrap();
    assert!(pump(&mut hop1, &mut hop2, now).is_empty());
    let ev = events(&mut hop2);
    assert!(
        matches!(&ev[..], [Event::OpenStream { sid: 5, .. }]),
        "{ev:?}"
    );
    hop2.stream_connected(5, None, now);
    let c = cl.cell(1, CellCmd::RELAY, 5, &data(b"ping"));
    hop1.handle_cell(Side::Prev, c, now).unwrap();
    let back = pump(&mut hop1, &mut hop2, now);
    let ev = events(&mut hop2);
    assert!(matches!(&ev[..], [Event::StreamData { sid: 5, data }] if data.bytes() == b"ping"));
    assert_eq!(hop2.package(5, b"pong", now), 4);
    let mut back2 = pump(&mut hop1, &mut hop2, now);
    let mut all = back;
    all.append(&mut back2);
    let msgs: Vec<(usize, u16, RelayMsg)> = all.into_iter().map(|c| cl.open(c)).collect();
    assert_eq!(
        msgs,
        vec![
            (
                1,
                5,
                RelayMsg::Connected(allium_proto::relaymsg::Connected { addr: None })
            ),
            (1, 5, data(b"pong")),
        ]
    );
}

#[test]
fn begin_dir_opens_a_directory_stream_at_the_last_hop_only() {
    use allium_proto::relaymsg::BeginDir;
    // A one-hop circuit from a client: BEGIN_DIR is served (unlike BEGIN).
    let (mut core, mut cl) = setup(cfg(true, ExitPolicy::default()));
    let now = Instant::now();
    let c = cl.cell(0, CellCmd::RELAY, 3, &RelayMsg::BeginDir(BeginDir));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut core);
    assert!(
        matches!(&ev[..], [Event::OpenDirStream { sid: 3 }]),
        "{ev:?}"
    );
    core.stream_connected(3, None, now);
    let r = replies(&mut core, &mut cl);
    assert!(
        matches!(&r[..], [(3, RelayMsg::Connected(c))] if c.addr.is_none()),
        "{r:?}"
    );
    // The request arrives as stream data; the client finishes; the response then END DONE.
    let c = cl.cell(0, CellCmd::RELAY, 3, &data(b"request"));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let c = cl.cell(
        0,
        CellCmd::RELAY,
        3,
        &RelayMsg::End(End::new(EndReason::DONE)),
    );
    core.handle_cell(Side::Prev, c, now).unwrap();
    let ev = events(&mut core);
    assert!(
        matches!(
            &ev[..],
            [
                Event::StreamData { sid: 3, .. },
                Event::StreamEnd { sid: 3 }
            ]
        ),
        "{ev:?}"
    );
    assert_eq!(core.package(3, b"response", now), 8);
    core.stream_eof(3, now);
    let r = replies(&mut core, &mut cl);
    assert!(
        matches!(&r[..], [(3, RelayMsg::Data(d)), (3, RelayMsg::End(e))]
            if d.data == b"response" && e.reason == EndReason::DONE),
        "{r:?}"
    );
    assert_eq!(
        core.n_streams(),
        0,
        "the stream is forgotten after both ENDs"
    );
    // A second BEGIN_DIR on an id in use is a violation; a refused one gets the driver's END.
    let c = cl.cell(0, CellCmd::RELAY, 4, &RelayMsg::BeginDir(BeginDir));
    core.handle_cell(Side::Prev, c, now).unwrap();
    let _ = events(&mut core);
    core.stream_failed(4, EndReason::RESOURCELIMIT, now);
    let r = replies(&mut core, &mut cl);
    assert_eq!(
        r,
        vec![(4, RelayMsg::End(End::new(EndReason::RESOURCELIMIT)))]
    );

    // A middle hop (the circuit is extended) answers NOTDIRECTORY and opens nothing.
    let (mut core, mut cl) = exit();
    let _hop2 = extend_open(&mut core, &mut cl, now);
    let c = cl.cell(0, CellCmd::RELAY, 5, &RelayMsg::BeginDir(BeginDir));
    core.handle_cell(Side::Prev, c, now).unwrap();
    assert!(events(&mut core).is_empty());
    assert_eq!(
        replies(&mut core, &mut cl),
        vec![(5, RelayMsg::End(End::new(EndReason::NOTDIRECTORY)))]
    );
}
