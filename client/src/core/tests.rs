//! The client core against the relays' side played in memory (real handshakes and relay-cell
//! crypto through `relay_respond` and `RelayHopCrypto`), with simulated time: no sockets, no
//! sleeps.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use allium_crypto::handshake::relay_respond;
use allium_crypto::relaycell::{FORWARD_MSG_OFFSET, Forward, RELAY_MSG_LEN, RelayHopCrypto, Tag};
use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created, DestroyReason};
use allium_proto::flowctl::{self, SENDME_INC_DEFAULT, XOFF_LIMIT, XOFF_THRESHOLD, XON_THRESHOLD};
use allium_proto::relaymsg::{
    Begin, BeginFlags, Connected, Data, End, EndReason, Extended, MAX_DATA, RelayMsg, Resolved,
    ResolvedValue, Sendme, Target, Truncated, Xoff, Xon,
};

use super::*;

struct Relay {
    id: IdentityKeypair,
    onion: X25519Secret,
}

/// What a relay saw: the hop that recognised a forward cell, its link command and message.
#[derive(Debug)]
struct Seen {
    hop: usize,
    cmd: CellCmd,
    sid: u16,
    msg: RelayMsg,
}

/// The client core and three relays in memory.
struct Net {
    relays: Vec<Relay>,
    hops: Vec<RelayHopCrypto>,
    client: ClientCircuit,
    now: Instant,
    /// Forward relay messages seen by the relays, in order.
    seen: Vec<Seen>,
    /// DESTROY cells the guard got from the client.
    destroys: usize,
    events: Vec<Event>,
    /// Answer BEGIN with CONNECTED and EXTEND with EXTENDED.
    auto: bool,
    /// The server message every relay answers with (congestion control agreed by default).
    sm: Vec<u8>,
    /// Tags of the backward DATA cells the exit sent, in order.
    data_tags: Vec<Tag>,
    /// Tags of the forward DATA cells the exit got, in order.
    fwd_data_tags: Vec<Tag>,
    to_client: VecDeque<Cell>,
}

/// The server message of a relay that agrees to congestion control with the default parameters.
fn cc_sm() -> Vec<u8> {
    flowctl::cc_reply(Default::default()).to_vec()
}

fn relays(n: usize) -> Vec<Relay> {
    (0..n)
        .map(|_| Relay {
            id: IdentityKeypair::generate(),
            onion: X25519Secret::generate(),
        })
        .collect()
}

fn target(r: &Relay, port: u16) -> HopTarget {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    HopTarget::new(r.id.public(), r.onion.public(), &[addr])
}

fn begin(host: &str, port: u16) -> StreamTarget {
    StreamTarget::Begin(Begin {
        target: Target::parse(host).unwrap(),
        port,
        flags: BeginFlags(BeginFlags::IPV6_OK),
    })
}

const CIRC: CircId = CircId::new(0x8000_1234).unwrap();

/// The start of simulated time (only ever advanced by the tests).
fn epoch() -> Instant {
    #[allow(clippy::disallowed_methods)] // a base for simulated time; never read again
    Instant::now()
}

impl Net {
    /// A net whose client builds (or starts building) a 3-hop circuit.
    fn new() -> Self {
        let relays = relays(3);
        let path = relays
            .iter()
            .enumerate()
            .map(|(i, r)| target(r, 9000 + i as u16))
            .collect();
        let now = epoch();
        let client = ClientCircuit::build(CIRC, path, CircParams::default(), now).unwrap();
        Self {
            relays,
            hops: Vec::new(),
            client,
            now,
            seen: Vec::new(),
            destroys: 0,
            events: Vec::new(),
            auto: true,
            sm: cc_sm(),
            data_tags: Vec::new(),
            fwd_data_tags: Vec::new(),
            to_client: VecDeque::new(),
        }
    }

    fn built() -> Self {
        let mut n = Self::new();
        n.drive();
        assert!(n.client.is_ready(), "{:?}", n.events);
        n.events.clear();
        n.seen.clear();
        n
    }

    /// Move cells both ways until nothing moves.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(c) = self.client.poll_transmit() {
                moved = true;
                self.relay_side(c);
            }
            while let Some(c) = self.to_client.pop_front() {
                moved = true;
                let _ = self.client.handle_cell(c, self.now);
            }
            while let Some(e) = self.client.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
            self.client.handle_timeout(self.now);
        }
        self.drive();
    }

    /// A backward cell carrying `msg` originated at hop `at`.
    fn backward(&mut self, at: usize, sid: u16, msg: &RelayMsg) -> Cell {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = msg.encode(sid, &mut buf).unwrap();
        let mut cell = Cell::new_zeroed(Some(CIRC), CellCmd::RELAY);
        let tag = self.hops[at]
            .encrypt_backward(CellCmd::RELAY.0, &buf[..n], &mut cell.body)
            .unwrap();
        if matches!(msg, RelayMsg::Data(_)) {
            self.data_tags.push(tag);
        }
        for h in self.hops[..at].iter_mut().rev() {
            h.relay_backward(&mut cell.body).unwrap();
        }
        cell
    }

    fn send_back(&mut self, at: usize, sid: u16, msg: &RelayMsg) {
        let c = self.backward(at, sid, msg);
        self.to_client.push_back(c);
    }

    fn data(&mut self, sid: StreamId, n: usize) {
        for _ in 0..n {
            let d = RelayMsg::Data(Data {
                data: vec![7u8; 100],
            });
            self.send_back(2, sid.get(), &d);
        }
    }

    fn relay_side(&mut self, mut cell: Cell) {
        assert_eq!(cell.circ_id, Some(CIRC));
        match cell.cmd {
            CellCmd::CREATE => {
                let c = Create::decode(&cell.body[..]).unwrap();
                let r = &self.relays[0];
                let sm = self.sm.clone();
                let (k, reply) =
                    relay_respond(&r.id.public(), &[&r.onion], &c.hdata, |_| sm).unwrap();
                self.hops.push(RelayHopCrypto::new(&k));
                let cid = CIRC;
                self.to_client
                    .push_back(Cell::created(cid, &Created { hdata: reply }).unwrap());
            }
            CellCmd::DESTROY => self.destroys += 1,
            CellCmd::RELAY | CellCmd::RELAY_EARLY => {
                let mut at = None;
                for (i, h) in self.hops.iter_mut().enumerate() {
                    if let Forward::Recognized { tag } =
                        h.decrypt_forward(cell.cmd.0, &mut cell.body).unwrap()
                    {
                        at = Some((i, tag));
                        break;
                    }
                }
                let (at, tag) = at.expect("a cell for one of the hops");
                let region = &cell.body[FORWARD_MSG_OFFSET..FORWARD_MSG_OFFSET + RELAY_MSG_LEN];
                let (sid, msg) = RelayMsg::decode(region).unwrap();
                if matches!(msg, RelayMsg::Data(_)) {
                    self.fwd_data_tags.push(tag);
                }
                if self.auto {
                    match &msg {
                        RelayMsg::Extend(e) => {
                            let next = &self.relays[at + 1];
                            assert_eq!(e.relay_id(), Some(next.id.public()));
                            let sm = self.sm.clone();
                            let (k, reply) =
                                relay_respond(&next.id.public(), &[&next.onion], &e.hdata, |_| sm)
                                    .unwrap();
                            self.send_back(at, 0, &RelayMsg::Extended(Extended { hdata: reply }));
                            self.hops.push(RelayHopCrypto::new(&k));
                        }
                        RelayMsg::Begin(_) | RelayMsg::BeginDir(_) => {
                            self.send_back(at, sid, &RelayMsg::Connected(Connected::default()));
                        }
                        _ => {}
                    }
                }
                self.seen.push(Seen {
                    hop: at,
                    cmd: cell.cmd,
                    sid,
                    msg,
                });
            }
            other => panic!("unexpected cell {other:?}"),
        }
    }

    fn open(&mut self) -> StreamId {
        let sid = self
            .client
            .begin_stream(&begin("example.com", 80), self.now)
            .unwrap();
        self.drive();
        assert_eq!(self.client.stream_state(sid), Some(StreamState::Open));
        sid
    }

    fn destroyed(&self) -> Option<&CircError> {
        self.events.iter().find_map(|e| match e {
            Event::Destroyed { reason } => Some(reason),
            _ => None,
        })
    }

    fn n_data(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::StreamData { .. }))
            .count()
    }

    fn sendmes(&self, sid: u16) -> Vec<Option<Tag>> {
        self.seen
            .iter()
            .filter_map(|s| match &s.msg {
                RelayMsg::Sendme(Sendme { tag }) if s.sid == sid => Some(*tag),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn builds_three_hops_with_extends_in_relay_early() {
    let mut n = Net::new();
    assert!(n.client.poll_timeout().is_some());
    n.drive();
    let hops: Vec<usize> = n
        .events
        .iter()
        .filter_map(|e| match e {
            Event::HopAdded { hop } => Some(*hop),
            _ => None,
        })
        .collect();
    assert_eq!(hops, vec![0, 1, 2]);
    assert!(matches!(n.events.last(), Some(Event::Built)));
    assert_eq!(n.client.n_hops(), 3);
    let extends: Vec<(usize, CellCmd)> = n
        .seen
        .iter()
        .filter(|s| matches!(s.msg, RelayMsg::Extend(_)))
        .map(|s| (s.hop, s.cmd))
        .collect();
    assert_eq!(
        extends,
        vec![(0, CellCmd::RELAY_EARLY), (1, CellCmd::RELAY_EARLY)]
    );
    assert_eq!(n.client.relay_early_left(), MAX_RELAY_EARLY - 2);
    assert_eq!(n.client.poll_timeout(), None, "no deadline once built");
}

#[test]
fn a_stream_is_refused_before_the_circuit_is_built() {
    let mut n = Net::new();
    let e = n
        .client
        .begin_stream(&begin("example.com", 80), n.now)
        .unwrap_err();
    assert!(matches!(e, CircError::NotReady(_)));
}

#[test]
fn relay_early_budget_then_relay_and_extend_fails_when_spent() {
    let mut n = Net::built();
    let sid = n.open();
    let data = vec![1u8; 10 * MAX_DATA];
    assert_eq!(n.client.package(sid, &data, n.now), data.len());
    n.drive();
    let cmds: Vec<CellCmd> = n.seen.iter().map(|s| s.cmd).collect();
    // BEGIN + 10 DATA to the exit: 6 RELAY_EARLY left after the build, then RELAY.
    assert_eq!(cmds.len(), 11);
    assert!(
        cmds[..6].iter().all(|c| *c == CellCmd::RELAY_EARLY),
        "{cmds:?}"
    );
    assert!(cmds[6..].iter().all(|c| *c == CellCmd::RELAY), "{cmds:?}");
    assert_eq!(n.client.relay_early_left(), 0);
    let extra = relays(1);
    let e = n.client.extend(target(&extra[0], 1), n.now).unwrap_err();
    assert!(matches!(e, CircError::EarlyExhausted), "{e:?}");
    assert!(
        !n.client.is_closed(),
        "a refused extend does not close the circuit"
    );
}

#[test]
fn cells_for_the_guard_are_never_relay_early() {
    let relays = relays(1);
    let now = epoch();
    let mut c =
        ClientCircuit::new(CIRC, target(&relays[0], 1), CircParams::default(), now).unwrap();
    let mut n = Net::new();
    n.relays = relays;
    std::mem::swap(&mut n.client, &mut c);
    n.drive();
    assert!(n.client.is_ready());
    assert!(
        !n.events.iter().any(|e| matches!(e, Event::Built)),
        "Built is for build() paths"
    );
    let sid = n.open();
    n.client.package(sid, b"hello", n.now);
    n.drive();
    assert!(
        n.seen.iter().all(|s| s.hop == 0 && s.cmd == CellCmd::RELAY),
        "{:?}",
        n.seen
    );
    assert_eq!(n.client.relay_early_left(), MAX_RELAY_EARLY);
}

#[test]
fn data_both_ways_and_no_stream_sendmes() {
    let mut n = Net::built();
    let sid = n.open();
    assert!(
        n.events
            .iter()
            .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
    );
    assert_eq!(n.client.package(sid, b"GET / HTTP/1.0\r\n\r\n", n.now), 18);
    n.drive();
    let got = n.seen.iter().find_map(|s| match &s.msg {
        RelayMsg::Data(d) => Some(d.data.clone()),
        _ => None,
    });
    assert_eq!(got.as_deref(), Some(&b"GET / HTTP/1.0\r\n\r\n"[..]));

    n.data(sid, 50);
    n.drive();
    assert_eq!(n.n_data(), 50);
    let bytes: usize = n
        .events
        .iter()
        .filter_map(|e| match e {
            Event::StreamData { data, .. } => Some(data.bytes().len()),
            _ => None,
        })
        .sum();
    assert_eq!(bytes, 100 * 50);
    n.client.consumed(sid, 50, n.now);
    n.drive();
    // Streams use XON/XOFF: no stream-level SENDME, ever.
    assert!(n.sendmes(sid.get()).is_empty());
}

#[test]
fn circuit_sendme_carries_the_tag_of_every_sendme_inc_th_cell() {
    let mut n = Net::built();
    let a = n.open();
    let b = n.open();
    n.data(a, 40);
    n.data(b, 30);
    n.drive();
    let inc = usize::from(SENDME_INC_DEFAULT);
    assert_eq!(
        n.sendmes(0),
        vec![Some(n.data_tags[inc - 1]), Some(n.data_tags[2 * inc - 1])]
    );
    assert_eq!(n.n_data(), 70);
}

#[test]
fn package_stops_at_xoff_and_xon_resumes() {
    let mut n = Net::built();
    let sid = n.open();
    let big = vec![0u8; 10 * MAX_DATA];
    assert_eq!(n.client.package(sid, &big[..MAX_DATA], n.now), MAX_DATA);
    n.send_back(2, sid.get(), &RelayMsg::Xoff(Xoff));
    n.drive();
    assert_eq!(n.client.stream_paused(sid), Some(true));
    assert!(!n.client.can_package(sid));
    assert_eq!(n.client.package(sid, &big, n.now), 0);
    n.send_back(2, sid.get(), &RelayMsg::Xon(Xon { rate_kib: 100 }));
    n.drive();
    assert_eq!(n.client.package(sid, &big, n.now), big.len());
    // A second XOFF without XON in between is a violation.
    n.send_back(2, sid.get(), &RelayMsg::Xoff(Xoff));
    n.send_back(2, sid.get(), &RelayMsg::Xoff(Xoff));
    n.drive();
    assert!(
        matches!(
            n.destroyed(),
            Some(CircError::FlowControl { what: "XOFF", .. })
        ),
        "{:?}",
        n.destroyed()
    );
}

#[test]
fn a_stream_sendme_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    n.send_back(2, sid.get(), &RelayMsg::Sendme(Sendme { tag: None }));
    n.drive();
    assert!(matches!(n.destroyed(), Some(CircError::Protocol(_))));
}

#[test]
fn congestion_window_and_authenticated_circuit_sendmes() {
    let mut n = Net::built();
    let streams: Vec<StreamId> = (0..3).map(|_| n.open()).collect();
    let big = vec![0u8; 500 * MAX_DATA];
    let mut total = 0;
    for s in &streams {
        total += n.client.package(*s, &big, n.now);
    }
    let cwnd = n.client.congestion().cwnd();
    assert_eq!(total, cwnd as usize * MAX_DATA);
    assert_eq!(n.client.congestion().budget(), 0);
    n.drive();
    assert_eq!(n.fwd_data_tags.len(), cwnd as usize);
    // The exit acknowledges with the tag of the 31st DATA cell: 31 cells leave flight, and slow
    // start grows the window by as much.
    let inc = usize::from(SENDME_INC_DEFAULT);
    let t = n.fwd_data_tags[inc - 1];
    n.now += Duration::from_millis(100);
    n.send_back(2, 0, &RelayMsg::Sendme(Sendme { tag: Some(t) }));
    n.drive();
    assert_eq!(n.client.congestion().budget(), 2 * inc as u32);
    assert_eq!(
        n.client.congestion().rtt_min(),
        Some(Duration::from_millis(100))
    );
    // A SENDME with a tag the client never sent destroys the circuit.
    n.send_back(
        2,
        0,
        &RelayMsg::Sendme(Sendme {
            tag: Some([9u8; 16]),
        }),
    );
    n.drive();
    assert!(
        matches!(
            n.destroyed(),
            Some(CircError::FlowControl {
                what: "circuit SENDME",
                ..
            })
        ),
        "{:?}",
        n.destroyed()
    );
}

#[test]
fn a_tampered_cell_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    let mut c = n.backward(2, sid.get(), &RelayMsg::Data(Data { data: vec![1; 10] }));
    c.body[100] ^= 1;
    let r = n.client.handle_cell(c, n.now);
    assert!(matches!(r, Err(CircError::Auth(_))));
    n.drive();
    assert_eq!(n.n_data(), 0);
    assert!(matches!(n.destroyed(), Some(CircError::Auth(_))));
    assert_eq!(n.destroys, 1);
    assert!(n.client.is_closed());
    assert_eq!(n.client.n_streams(), 0);
    // Later input is ignored, and later calls fail.
    assert!(
        n.client
            .begin_stream(&begin("a.example", 1), n.now)
            .is_err()
    );
    assert_eq!(n.client.package(sid, b"x", n.now), 0);
}

#[test]
fn a_replayed_cell_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    let c = n.backward(2, sid.get(), &RelayMsg::Data(Data { data: vec![1; 10] }));
    let copy = Cell {
        circ_id: c.circ_id,
        cmd: c.cmd,
        body: c.body.clone(),
    };
    n.client.handle_cell(c, n.now).unwrap();
    assert!(matches!(
        n.client.handle_cell(copy, n.now),
        Err(CircError::Auth(_))
    ));
}

#[test]
fn backward_relay_early_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    let mut c = n.backward(2, sid.get(), &RelayMsg::Data(Data { data: vec![1; 10] }));
    c.cmd = CellCmd::RELAY_EARLY;
    assert!(matches!(
        n.client.handle_cell(c, n.now),
        Err(CircError::Protocol(_))
    ));
    n.drive();
    assert_eq!(n.n_data(), 0);
    assert_eq!(n.destroys, 1);
}

#[test]
fn destroy_from_the_guard_ends_every_stream_without_an_answer() {
    let mut n = Net::built();
    n.open();
    n.open();
    let d = Cell::destroy(CIRC, DestroyReason::FINISHED);
    assert!(matches!(
        n.client.handle_cell(d, n.now),
        Err(CircError::Destroyed(DestroyReason::FINISHED))
    ));
    n.drive();
    assert_eq!(n.destroys, 0, "no DESTROY back");
    assert_eq!(n.client.n_streams(), 0);
    assert!(matches!(n.destroyed(), Some(CircError::Destroyed(_))));
}

#[test]
fn xoff_then_xon_and_ignoring_xoff_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    n.data(sid, XOFF_THRESHOLD as usize - 1);
    n.drive();
    assert!(!n.seen.iter().any(|s| matches!(s.msg, RelayMsg::Xoff(_))));
    n.data(sid, 1);
    n.drive();
    assert_eq!(
        n.seen
            .iter()
            .filter(|s| s.sid == sid.get() && matches!(s.msg, RelayMsg::Xoff(_)))
            .count(),
        1
    );
    // The application drains: XON once at most XON_THRESHOLD cells are left.
    n.now += Duration::from_secs(1);
    n.client
        .consumed(sid, (XOFF_THRESHOLD - XON_THRESHOLD - 1) as usize, n.now);
    n.drive();
    assert!(!n.seen.iter().any(|s| matches!(s.msg, RelayMsg::Xon(_))));
    n.client.consumed(sid, 1, n.now);
    n.drive();
    let rate = n.seen.iter().find_map(|s| match s.msg {
        RelayMsg::Xon(Xon { rate_kib }) => Some(rate_kib),
        _ => None,
    });
    let expect = (XOFF_THRESHOLD - XON_THRESHOLD) * MAX_DATA as u32 / 1024;
    assert!(rate.is_some_and(|r| r.abs_diff(expect) <= 1), "{rate:?}");
    // An exit that ignores the next XOFF is cut off at the limit.
    n.data(sid, (XOFF_LIMIT - XON_THRESHOLD) as usize + 1);
    n.drive();
    assert!(
        matches!(
            n.destroyed(),
            Some(CircError::FlowControl {
                what: "stream XOFF limit",
                ..
            })
        ),
        "{:?}",
        n.destroyed()
    );
    assert_eq!(n.destroys, 1);
}

#[test]
fn data_for_a_closed_stream_is_dropped_but_counts_for_circuit_sendmes() {
    let mut n = Net::built();
    let s = n.open();
    n.client.close_stream(s, EndReason::MISC, n.now);
    n.drive();
    n.data(s, 1200);
    n.drive();
    // A circuit SENDME per SENDME_INC cells, whatever stream the data was for.
    assert!(n.destroyed().is_none(), "{:?}", n.destroyed());
    assert_eq!(n.sendmes(0).len(), 1200 / usize::from(SENDME_INC_DEFAULT));
    assert_eq!(n.n_data(), 0, "data for a closed stream is dropped");
}

#[test]
fn build_timeout_destroys_the_half_built_circuit() {
    let mut n = Net::new();
    // The guard answers CREATE; the middle never answers the EXTEND.
    n.auto = false;
    n.drive();
    assert_eq!(n.client.n_hops(), 1);
    let t = n.client.poll_timeout().unwrap();
    assert_eq!(t, n.now + CircParams::default().build_timeout);
    n.advance(Duration::from_secs(9));
    assert!(!n.client.is_closed());
    n.advance(Duration::from_secs(1));
    assert!(n.events.iter().any(|e| matches!(
        e,
        Event::ExtendFailed {
            hop: 1,
            error: CircError::BuildTimeout { hop: 1 }
        }
    )));
    assert!(matches!(
        n.destroyed(),
        Some(CircError::BuildTimeout { hop: 1 })
    ));
    assert_eq!(n.destroys, 1);
    assert_eq!(n.client.poll_timeout(), None);
}

#[test]
fn stream_open_timeout_sends_end_timeout() {
    let mut n = Net::built();
    n.auto = false;
    let sid = n
        .client
        .begin_stream(&begin("example.com", 443), n.now)
        .unwrap();
    n.drive();
    assert!(matches!(
        n.client.stream_state(sid),
        Some(StreamState::Connecting { .. })
    ));
    n.advance(Duration::from_secs(29));
    assert!(n.client.stream_state(sid).is_some());
    n.advance(Duration::from_secs(1));
    assert!(n.client.stream_state(sid).is_none());
    assert!(n.events.iter().any(|e| matches!(
        e,
        Event::StreamEnded { stream, result: Err(StreamError::OpenTimeout) } if *stream == sid
    )));
    assert!(n.seen.iter().any(|s| matches!(
        &s.msg,
        RelayMsg::End(End {
            reason: EndReason::TIMEOUT,
            ..
        })
    )));
    assert!(!n.client.is_closed());
}

#[test]
fn end_reason_of_a_refused_stream_is_kept_and_the_circuit_stays() {
    let mut n = Net::built();
    n.auto = false;
    let sid = n
        .client
        .begin_stream(&begin("example.com", 22), n.now)
        .unwrap();
    n.drive();
    n.send_back(
        2,
        sid.get(),
        &RelayMsg::End(End::new(EndReason::CONNECTREFUSED)),
    );
    n.drive();
    assert!(n.events.iter().any(|e| matches!(
        e,
        Event::StreamEnded {
            result: Err(StreamError::Ended(EndReason::CONNECTREFUSED)),
            ..
        }
    )));
    assert_eq!(n.client.n_streams(), 0);
    assert!(!n.client.is_closed());
    n.auto = true;
    n.open();
}

#[test]
fn half_close_both_ways() {
    let mut n = Net::built();
    let sid = n.open();
    n.send_back(2, sid.get(), &RelayMsg::End(End::new(EndReason::DONE)));
    n.drive();
    assert_eq!(n.client.stream_state(sid), Some(StreamState::RemoteDone));
    assert!(
        n.events
            .iter()
            .any(|e| matches!(e, Event::StreamEnded { result: Ok(()), .. }))
    );
    // We may still send; the exit may not.
    assert_eq!(n.client.package(sid, b"tail", n.now), 4);
    n.client.close_stream(sid, EndReason::DONE, n.now);
    n.drive();
    assert_eq!(n.client.stream_state(sid), None);
    let ends = n
        .seen
        .iter()
        .filter(|s| matches!(s.msg, RelayMsg::End(_)))
        .count();
    assert_eq!(ends, 1);

    let sid = n.open();
    n.client.close_stream(sid, EndReason::DONE, n.now);
    assert_eq!(n.client.stream_state(sid), Some(StreamState::LocalDone));
    assert_eq!(n.client.package(sid, b"x", n.now), 0);
    n.data(sid, 1);
    n.drive();
    assert_eq!(n.n_data(), 1, "the exit may still send after our END DONE");
    n.send_back(2, sid.get(), &RelayMsg::End(End::new(EndReason::DONE)));
    n.drive();
    assert_eq!(n.client.stream_state(sid), None);
}

#[test]
fn data_after_end_done_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    n.send_back(2, sid.get(), &RelayMsg::End(End::new(EndReason::DONE)));
    n.data(sid, 1);
    n.drive();
    assert!(matches!(n.destroyed(), Some(CircError::Protocol(_))));
}

#[test]
fn resolve_answers_and_forgets_the_stream() {
    let mut n = Net::built();
    let sid = n
        .client
        .begin_stream(&StreamTarget::Resolve("example.com".into()), n.now)
        .unwrap();
    n.drive();
    let ip = IpAddr::from([192, 0, 2, 1]);
    let r = RelayMsg::Resolved(Resolved {
        answers: vec![(ResolvedValue::Ip(ip), 60)],
    });
    n.send_back(2, sid.get(), &r);
    n.drive();
    assert!(
        n.events
            .iter()
            .any(|e| matches!(e, Event::Resolved { addrs, .. } if addrs == &vec![ip]))
    );
    assert_eq!(n.client.n_streams(), 0);
}

#[test]
fn a_name_too_long_is_an_encode_error_and_opens_nothing() {
    let mut n = Net::built();
    let e = n
        .client
        .begin_stream(&StreamTarget::Resolve("a".repeat(2000)), n.now)
        .unwrap_err();
    assert!(matches!(e, CircError::Encode(_)), "{e:?}");
    assert_eq!(n.client.n_streams(), 0);
    assert!(!n.client.is_closed());
}

#[test]
fn truncated_during_the_build_fails_the_extend() {
    let mut n = Net::new();
    n.auto = false;
    n.drive();
    n.send_back(
        0,
        0,
        &RelayMsg::Truncated(Truncated {
            reason: DestroyReason::CONNECTFAILED,
        }),
    );
    n.drive();
    assert!(
        n.events
            .iter()
            .any(|e| matches!(e, Event::ExtendFailed { hop: 1, .. }))
    );
    let d = n.destroyed().unwrap();
    assert!(matches!(
        d,
        CircError::Truncated {
            hop: 0,
            reason: DestroyReason::CONNECTFAILED
        }
    ));
    assert_eq!(d.failed_hop(), Some(1));
}

#[test]
fn a_forged_handshake_reply_fails_the_build() {
    let mut n = Net::new();
    n.auto = false;
    n.drive();
    // The middle's answer comes from a relay with another onion key.
    let imposter = relays(1);
    let ext = n.seen.iter().find_map(|s| match &s.msg {
        RelayMsg::Extend(e) => Some(e.hdata.clone()),
        _ => None,
    });
    assert!(ext.is_some());
    let r = relay_respond(
        &imposter[0].id.public(),
        &[&imposter[0].onion],
        &ext.unwrap(),
        |_| vec![],
    );
    assert!(r.is_err(), "the onionskin names another relay");
    // Reply with garbage of the right shape.
    n.send_back(
        0,
        0,
        &RelayMsg::Extended(Extended {
            hdata: vec![0u8; 98],
        }),
    );
    n.drive();
    assert!(
        matches!(n.destroyed(), Some(CircError::Handshake { hop: 1, .. })),
        "{:?}",
        n.destroyed()
    );
}

#[test]
fn a_message_from_an_intermediate_hop_destroys_the_circuit() {
    let mut n = Net::built();
    let sid = n.open();
    n.send_back(1, sid.get(), &RelayMsg::Connected(Connected::default()));
    n.drive();
    assert!(matches!(n.destroyed(), Some(CircError::Protocol(_))));
}

#[test]
fn link_loss_and_client_close() {
    let mut n = Net::built();
    n.client.handle_link_closed();
    n.drive();
    assert!(matches!(n.destroyed(), Some(CircError::LinkClosed)));
    assert_eq!(n.destroys, 0);

    let mut n = Net::built();
    n.client.close();
    n.drive();
    assert!(matches!(n.destroyed(), Some(CircError::ClosedByClient)));
    assert_eq!(n.destroys, 1);
    n.client.close();
    n.drive();
    assert_eq!(n.destroys, 1, "closed once");
}

#[test]
fn stream_ids_are_unique_and_bounded() {
    let mut n = Net::built();
    n.auto = false;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..CircParams::default().max_streams {
        let id = n
            .client
            .begin_stream(&begin("example.com", 80), n.now)
            .unwrap();
        assert!(ids.insert(id));
        while n.client.poll_transmit().is_some() {}
    }
    assert!(matches!(
        n.client.begin_stream(&begin("example.com", 80), n.now),
        Err(CircError::TooManyStreams)
    ));
}

#[test]
fn optimistic_data_is_bounded_before_connected() {
    let mut n = Net::built();
    n.auto = false;
    let sid = n
        .client
        .begin_stream(&begin("example.com", 80), n.now)
        .unwrap();
    // Before CONNECTED: the first bytes go right behind BEGIN, up to OPTIMISTIC_MAX cells.
    let big = vec![1u8; 100 * MAX_DATA];
    let took = n.client.package(sid, &big, n.now);
    assert_eq!(took, super::OPTIMISTIC_MAX as usize * MAX_DATA);
    assert_eq!(n.client.package(sid, &big, n.now), 0);
    n.drive();
    let kinds: Vec<&str> = n
        .seen
        .iter()
        .filter(|s| s.sid == sid.get())
        .map(|s| match s.msg {
            RelayMsg::Begin(_) => "begin",
            RelayMsg::Data(_) => "data",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds.first(), Some(&"begin"));
    assert_eq!(kinds.len(), 1 + super::OPTIMISTIC_MAX as usize);
    assert!(kinds[1..].iter().all(|k| *k == "data"));
    // RESOLVE streams take no data.
    let r = n
        .client
        .begin_stream(&StreamTarget::Resolve("example.com".into()), n.now)
        .unwrap();
    assert_eq!(n.client.package(r, b"x", n.now), 0);
}

#[test]
fn destroy_while_building_fails_the_extend() {
    let mut n = Net::new();
    n.auto = false;
    n.drive();
    let d = Cell::destroy(CIRC, DestroyReason::CONNECTFAILED);
    let _ = n.client.handle_cell(d, n.now);
    n.drive();
    assert!(n.events.iter().any(|e| matches!(
        e,
        Event::ExtendFailed {
            hop: 1,
            error: CircError::Destroyed(DestroyReason::CONNECTFAILED)
        }
    )));
    assert_eq!(n.destroys, 0);
}

#[test]
fn hop_targets_carry_the_identity_then_each_address() {
    let r = &relays(1)[0];
    let v4 = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 7), 443));
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let t = HopTarget::new(r.id.public(), r.onion.public(), &[v4, v6]);
    assert_eq!(t.specs.len(), 3);
    assert!(
        matches!(t.specs[0], allium_proto::relaymsg::LinkSpec::Ed25519Id(id) if id == r.id.public())
    );
    assert!(
        matches!(t.specs[1], allium_proto::relaymsg::LinkSpec::Ipv4(a) if SocketAddr::V4(a) == v4)
    );
    assert!(
        matches!(t.specs[2], allium_proto::relaymsg::LinkSpec::Ipv6(a) if SocketAddr::V6(a) == v6)
    );
}

#[test]
fn early_or_repeated_circuit_sendmes_destroy_the_circuit() {
    let inc = usize::from(SENDME_INC_DEFAULT);
    let is_sendme_violation = |n: &Net| {
        matches!(
            n.destroyed(),
            Some(CircError::FlowControl {
                what: "circuit SENDME",
                ..
            })
        )
    };
    // Too early: fewer than `sendme_inc` cells were sent.
    let mut n = Net::built();
    let sid = n.open();
    let some = vec![0u8; (inc - 1) * MAX_DATA];
    assert_eq!(n.client.package(sid, &some, n.now), some.len());
    n.drive();
    let t = n.fwd_data_tags[inc - 2];
    n.send_back(2, 0, &RelayMsg::Sendme(Sendme { tag: Some(t) }));
    n.drive();
    assert!(is_sendme_violation(&n), "{:?}", n.destroyed());
    // One too many: a single increment sent, acknowledged twice.
    let mut n = Net::built();
    let sid = n.open();
    let one = vec![0u8; inc * MAX_DATA];
    assert_eq!(n.client.package(sid, &one, n.now), one.len());
    n.drive();
    let t = n.fwd_data_tags[inc - 1];
    n.send_back(2, 0, &RelayMsg::Sendme(Sendme { tag: Some(t) }));
    n.drive();
    assert!(n.destroyed().is_none(), "{:?}", n.destroyed());
    n.send_back(2, 0, &RelayMsg::Sendme(Sendme { tag: Some(t) }));
    n.drive();
    assert!(is_sendme_violation(&n), "{:?}", n.destroyed());
}

#[test]
fn a_relay_without_congestion_control_fails_the_hop() {
    // A guard whose handshake reply lacks the congestion-control extension (or offers an
    // increment below the minimum) is not added: the build fails at hop 0.
    for sm in [Vec::new(), vec![1, 2, 1, 3]] {
        let mut n = Net::new();
        n.sm = sm;
        n.drive();
        assert!(
            n.events.iter().any(|e| matches!(
                e,
                Event::ExtendFailed {
                    hop: 0,
                    error: CircError::FlowControl { .. }
                }
            )),
            "{:?}",
            n.events
        );
        assert!(n.client.is_closed());
        assert_eq!(n.client.n_hops(), 0);
    }
}
