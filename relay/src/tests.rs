//! Driver tests: reactors, link routing and the handshake pool over in-memory links, a few exit
//! streams to loopback sockets, and two real relays over loopback. Circuit behaviour itself is
//! tested on the core (`core/tests.rs`) with simulated time.

// Driver tests over in-memory links and loopback sockets, in real time (the cores have their own
// simulated-time tests in `core/tests.rs`).
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::handshake::client_start;
use allium_crypto::relaycell::{BACKWARD_MSG_OFFSET, CellBody, ClientCircuitCrypto, RELAY_MSG_LEN};
use allium_crypto::{RelayId, X25519Public};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created, Destroy, DestroyReason};
use allium_proto::flowctl::{self, CircRecv, CongestionControl};
use allium_proto::relaymsg::{
    Begin, BeginFlags, End, EndReason, Extend, LinkSpec, RelayMsg, Resolve, ResolvedValue, Sendme,
    Target,
};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

use crate::config::RelayConfig;
use crate::ctx::{Ctx, Limits};
use crate::link::{CellSink, CellSource, Link, run_reader};
use crate::policy::ExitPolicy;
use crate::resolver::{StaticResolver, SystemResolver};

const T: Duration = Duration::from_secs(10);

struct TestRelay {
    ctx: Arc<Ctx>,
    _dir: tempfile::TempDir,
}

fn test_relay(policy: ExitPolicy) -> TestRelay {
    test_relay_with(policy, |_| {})
}

fn test_relay_with(policy: ExitPolicy, tweak: impl FnOnce(&mut RelayConfig)) -> TestRelay {
    test_relay_limits(policy, tweak, Limits::default())
}

fn test_relay_limits(
    policy: ExitPolicy,
    tweak: impl FnOnce(&mut RelayConfig),
    limits: Limits,
) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::for_test("t", dir.path());
    cfg.exit_policy = policy;
    tweak(&mut cfg);
    let keys = crate::keys::RelayKeys::load_or_create(dir.path()).unwrap();
    let resolver = StaticResolver::new(
        vec![(
            "only.the.exit".to_owned(),
            vec!["127.0.0.1".parse().unwrap()],
        )],
        SystemResolver::new(),
    );
    let ctx = Ctx::with_limits(
        cfg,
        keys,
        Arc::new(resolver),
        "127.0.0.1:1".parse().unwrap(),
        limits,
    );
    crate::create::spawn_workers(&ctx);
    TestRelay { ctx, _dir: dir }
}

/// The client end of an in-memory link to a relay.
struct MemLink {
    tx: mpsc::Sender<Cell>,
    rx: mpsc::Receiver<Cell>,
    link: Arc<Link>,
}

/// Attach an in-memory link; `as_relay` makes the relay believe the peer is a relay.
fn attach(ctx: &Arc<Ctx>, as_relay: bool) -> MemLink {
    attach_with_queue(ctx, as_relay, 2048)
}

/// As [`attach`], with a relay → peer queue of `out_cap` cells.
fn attach_with_queue(ctx: &Arc<Ctx>, as_relay: bool, out_cap: usize) -> MemLink {
    attach_full(
        ctx,
        as_relay.then_some(RelayId([9; 32])),
        false,
        out_cap,
        16,
    )
}

/// An in-memory link: `peer` makes the relay believe the peer is that relay; `initiator`: the
/// relay opened it (its circuit ids have the MSB set).
fn attach_full(
    ctx: &Arc<Ctx>,
    peer: Option<RelayId>,
    initiator: bool,
    out_cap: usize,
    max_circs: usize,
) -> MemLink {
    let (tx_in, rx_in) = mpsc::channel(8192);
    let (tx_out, rx_out) = mpsc::channel(out_cap);
    let link = Link::new(CellSink::Mpsc(tx_out), initiator, peer, None, max_circs);
    tokio::spawn(run_reader(
        Arc::clone(ctx),
        Arc::clone(&link),
        CellSource::Mpsc(rx_in),
    ));
    MemLink {
        tx: tx_in,
        rx: rx_out,
        link,
    }
}

impl MemLink {
    async fn recv(&mut self) -> Cell {
        tokio::time::timeout(T, self.rx.recv())
            .await
            .expect("timed out waiting for a cell")
            .expect("link closed")
    }
}

/// A minimal client circuit over some link (in-memory or real).
struct TestCirc {
    id: CircId,
    cc: ClientCircuitCrypto,
    early_left: u8,
    send_win: CongestionControl,
    recv_win: CircRecv,
}

/// The clock for the test client's congestion controller.
fn test_now() -> std::time::Instant {
    #[allow(clippy::disallowed_methods)] // a test driver: time enters here
    std::time::Instant::now()
}

fn relay_cell(
    tc: &mut TestCirc,
    hop: usize,
    cmd: CellCmd,
    sid: u16,
    msg: &RelayMsg,
) -> (Cell, [u8; 16]) {
    let mut buf = [0u8; RELAY_MSG_LEN];
    let n = msg.encode(sid, &mut buf).unwrap();
    let mut body: Box<CellBody> = Box::new([0u8; 1019]);
    let tag = tc
        .cc
        .encrypt_forward(hop, cmd.0, &buf[..n], &mut body)
        .unwrap();
    (
        Cell {
            circ_id: Some(tc.id),
            cmd,
            body,
        },
        tag,
    )
}

fn new_create(ctx: &Ctx) -> (allium_crypto::handshake::ClientHandshake, Vec<u8>) {
    client_start(
        &ctx.keys.id,
        &ctx.keys.onion_public(),
        &flowctl::cc_request(),
    )
    .unwrap()
}

async fn create_circuit(ml: &mut MemLink, ctx: &Ctx) -> TestCirc {
    let (hs, skin) = new_create(ctx);
    let id = CircId::random(true);
    let cell = Cell::create(
        id,
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    ml.tx.send(cell).await.unwrap();
    let reply = ml.recv().await;
    assert_eq!(reply.cmd, CellCmd::CREATED, "expected CREATED");
    assert_eq!(reply.circ_id, Some(id));
    let created = Created::decode(&reply.body[..]).unwrap();
    let (keys, sm) = hs.finish(&created.hdata).unwrap();
    assert_eq!(flowctl::parse_cc_reply(&sm).unwrap(), Default::default());
    let mut cc = ClientCircuitCrypto::new();
    cc.add_hop(&keys).unwrap();
    TestCirc {
        id,
        cc,
        early_left: 8,
        send_win: CongestionControl::default(),
        recv_win: CircRecv::default(),
    }
}

/// A relay with `policy`, a client link (not from a relay) and one circuit created on it.
async fn one_hop(policy: ExitPolicy) -> (TestRelay, MemLink, TestCirc) {
    let r = test_relay(policy);
    let mut ml = attach(&r.ctx, false);
    let tc = create_circuit(&mut ml, &r.ctx).await;
    (r, ml, tc)
}

/// An EXTEND towards a relay nobody knows (identity `[5; 32]`, 127.0.0.1:9).
fn extend_to_unknown_relay() -> RelayMsg {
    RelayMsg::Extend(Extend {
        specs: vec![
            LinkSpec::Ed25519Id(RelayId([5; 32])),
            LinkSpec::Ipv4("127.0.0.1:9".parse().unwrap()),
        ],
        htype: 1,
        hdata: vec![0; 100],
    })
}

fn open_backward(tc: &mut TestCirc, mut cell: Cell) -> (usize, u16, RelayMsg, [u8; 16]) {
    assert_eq!(
        cell.cmd,
        CellCmd::RELAY,
        "expected RELAY, got {:?}",
        cell.cmd
    );
    let (hop, tag) = tc.cc.decrypt_backward(cell.cmd.0, &mut cell.body).unwrap();
    let region = &cell.body[BACKWARD_MSG_OFFSET..][..RELAY_MSG_LEN];
    let (sid, msg) = RelayMsg::decode(region).unwrap();
    (hop, sid, msg, tag)
}

fn assert_destroy(cell: &Cell, id: CircId) {
    assert_eq!(cell.cmd, CellCmd::DESTROY, "expected DESTROY");
    assert_eq!(cell.circ_id, Some(id));
    let d = Destroy::decode(&cell.body[..]).unwrap();
    assert_eq!(d.reason, DestroyReason::NONE);
}

#[tokio::test]
async fn create_created_round_trip_and_one_hop_begin_refused() {
    let (_r, mut ml, mut tc) = one_hop(ExitPolicy::accept_all(true)).await;
    assert_eq!(ml.link.n_circuits(), 1);
    // DROP is ignored; BEGIN from a client to its first hop is refused (no one-hop exits).
    let (c, _) = relay_cell(
        &mut tc,
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    ml.tx.send(c).await.unwrap();
    let begin = RelayMsg::Begin(Begin {
        target: Target::Hostname("example.com".into()),
        port: 80,
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &begin);
    ml.tx.send(c).await.unwrap();
    let reply = ml.recv().await;
    let (hop, sid, msg, _) = open_backward(&mut tc, reply);
    assert_eq!((hop, sid), (0, 1));
    assert_eq!(msg, RelayMsg::End(End::new(EndReason::TORPROTOCOL)));
}

#[tokio::test]
async fn bad_create_gets_destroy_and_no_state() {
    let r = test_relay(ExitPolicy::default());
    let mut ml = attach(&r.ctx, false);
    // Onionskin for another relay's identity.
    let (_, skin) = client_start(&RelayId([7; 32]), &r.ctx.keys.onion_public(), &[]).unwrap();
    let id = CircId::random(true);
    let cell = Cell::create(
        id,
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    ml.tx.send(cell).await.unwrap();
    assert_destroy(&ml.recv().await, id);
    assert_eq!(ml.link.n_circuits(), 0);
    // A circuit id with the wrong MSB (the relay's own half) is ignored; the link stays usable.
    let (_, skin) = new_create(&r.ctx);
    let bad_id = CircId::random(false);
    let cell = Cell::create(
        bad_id,
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    ml.tx.send(cell).await.unwrap();
    let _tc = create_circuit(&mut ml, &r.ctx).await;
    assert_eq!(ml.link.n_circuits(), 1);
}

#[tokio::test]
async fn extend_outside_relay_early_destroys() {
    let (_r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    let ext = extend_to_unknown_relay();
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 0, &ext);
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc.id);
    assert_eq!(ml.link.n_circuits(), 0);
}

#[tokio::test]
async fn extend_to_unknown_relay_truncates() {
    let (_r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    let ext = extend_to_unknown_relay();
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY_EARLY, 0, &ext);
    ml.tx.send(c).await.unwrap();
    let (hop, sid, msg, _) = open_backward(&mut tc, ml.recv().await);
    assert_eq!((hop, sid), (0, 0));
    assert!(matches!(msg, RelayMsg::Truncated(_)), "{msg:?}");
    // The circuit survives and can try again.
    assert_eq!(ml.link.n_circuits(), 1);
}

#[tokio::test]
async fn ninth_relay_early_destroys() {
    let (_r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    for _ in 0..8 {
        let (c, _) = relay_cell(
            &mut tc,
            0,
            CellCmd::RELAY_EARLY,
            0,
            &RelayMsg::Drop(Default::default()),
        );
        ml.tx.send(c).await.unwrap();
    }
    // Nothing comes back for 8 DROPs: prove it with a probe that answers (TRUNCATE -> TRUNCATED).
    let (c, _) = relay_cell(
        &mut tc,
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Truncate(Default::default()),
    );
    ml.tx.send(c).await.unwrap();
    let (_, _, msg, _) = open_backward(&mut tc, ml.recv().await);
    assert!(matches!(msg, RelayMsg::Truncated(_)));
    let (c, _) = relay_cell(
        &mut tc,
        0,
        CellCmd::RELAY_EARLY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc.id);
    assert_eq!(ml.link.n_circuits(), 0);
}

#[tokio::test]
async fn bad_tag_destroys_silently() {
    let (r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    let other = create_circuit(&mut ml, &r.ctx).await;
    let (mut c, _) = relay_cell(
        &mut tc,
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    c.body[100] ^= 1;
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc.id);
    assert_eq!(ml.link.n_circuits(), 1);
    assert!(ml.link.get(other.id).is_some());
    // A replay of a valid cell (counter mismatch) also destroys.
    let mut tc2 = other;
    let (c, _) = relay_cell(
        &mut tc2,
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    ml.tx.send(c.clone()).await.unwrap();
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc2.id);
    assert_eq!(ml.link.n_circuits(), 0);
}

#[tokio::test]
async fn destroy_frees_circuit_and_link_close_frees_all() {
    let r = test_relay(ExitPolicy::default());
    let mut ml = attach(&r.ctx, false);
    let tc = create_circuit(&mut ml, &r.ctx).await;
    let _tc2 = create_circuit(&mut ml, &r.ctx).await;
    assert_eq!(r.ctx.stats.open_circuits(), 2);
    let cid = tc.id;
    ml.tx
        .send(Cell::destroy(cid, DestroyReason::REQUESTED))
        .await
        .unwrap();
    // Wait for the reader to process it.
    for _ in 0..100 {
        if ml.link.n_circuits() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(ml.link.n_circuits(), 1);
    drop(ml.tx);
    tokio::time::timeout(T, async {
        while r.ctx.stats.open_circuits() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn per_link_circuit_limit() {
    let r = test_relay(ExitPolicy::default());
    let mut ml = attach(&r.ctx, false);
    for _ in 0..16 {
        create_circuit(&mut ml, &r.ctx).await;
    }
    let (_, skin) = new_create(&r.ctx);
    let id = CircId::random(true);
    ml.tx
        .send(
            Cell::create(
                id,
                &Create {
                    htype: 1,
                    hdata: skin,
                },
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let c = ml.recv().await;
    assert_eq!(c.cmd, CellCmd::DESTROY);
    assert_eq!(
        Destroy::decode(&c.body[..]).unwrap().reason,
        DestroyReason::RESOURCELIMIT
    );
    assert_eq!(r.ctx.stats.link_circuit_cap_refusals(), 1);
}

/// A TCP echo server that closes its write side when the client half-closes.
async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Receive backward cells until a non-flow-control message arrives, answering DATA with
/// SENDMEs as a client must; DATA bytes are appended to `got`.
async fn client_recv(
    ml: &mut MemLink,
    tc: &mut TestCirc,
    hop: usize,
    got: &mut Vec<u8>,
) -> Option<(u16, RelayMsg)> {
    loop {
        let cell = tokio::time::timeout(T, ml.rx.recv()).await.ok()??;
        if cell.cmd == CellCmd::DESTROY {
            return None;
        }
        let (h, sid, msg, tag) = open_backward(tc, cell);
        assert_eq!(h, hop);
        match msg {
            RelayMsg::Data(d) => {
                got.extend_from_slice(&d.data);
                if let Some(t) = tc.recv_win.on_data_received(&tag) {
                    let sm = RelayMsg::Sendme(Sendme { tag: Some(t) });
                    let (c, _) = relay_cell(tc, hop, CellCmd::RELAY, 0, &sm);
                    ml.tx.send(c).await.unwrap();
                }
            }
            RelayMsg::Sendme(s) if sid == 0 => {
                tc.send_win.on_sendme(s.tag.as_ref(), test_now()).unwrap();
            }
            RelayMsg::Xoff(_) | RelayMsg::Xon(_) => {}
            other => return Some((sid, other)),
        }
    }
}

#[tokio::test]
async fn exit_stream_round_trip_with_flow_control_and_half_close() {
    let r = test_relay(ExitPolicy::accept_all(true));
    let echo = echo_server().await;
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let begin = RelayMsg::Begin(Begin {
        target: Target::Hostname("only.the.exit".into()),
        port: echo.port(),
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 7, &begin);
    ml.tx.send(c).await.unwrap();
    let mut got = Vec::new();
    let (sid, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(sid, 7);
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");

    // 1.5 MB each way: far more than the initial congestion window.
    let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = 0;
    while sent < payload.len() {
        // Respect our package windows; collect the echo (and the exit's SENDMEs) meanwhile.
        while !tc.send_win.can_send() {
            let cell = ml.recv().await;
            let (_, sid, msg, tag) = open_backward(&mut tc, cell);
            match msg {
                RelayMsg::Sendme(s) if sid == 0 => {
                    tc.send_win.on_sendme(s.tag.as_ref(), test_now()).unwrap();
                }
                RelayMsg::Xoff(_) | RelayMsg::Xon(_) => {}
                RelayMsg::Data(d) => {
                    got.extend_from_slice(&d.data);
                    if let Some(t) = tc.recv_win.on_data_received(&tag) {
                        let sm = RelayMsg::Sendme(Sendme { tag: Some(t) });
                        let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 0, &sm);
                        ml.tx.send(c).await.unwrap();
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let n = (payload.len() - sent).min(934);
        let data = RelayMsg::Data(allium_proto::relaymsg::Data {
            data: payload[sent..sent + n].to_vec(),
        });
        let (c, tag) = relay_cell(&mut tc, 0, CellCmd::RELAY, 7, &data);
        tc.send_win.note_data_sent(&tag, test_now()).unwrap();
        ml.tx.send(c).await.unwrap();
        sent += n;
    }
    // Half-close: END DONE from the client; the echo server then closes, and the exit answers
    // END DONE after the last byte.
    let (c, _) = relay_cell(
        &mut tc,
        0,
        CellCmd::RELAY,
        7,
        &RelayMsg::End(End::new(EndReason::DONE)),
    );
    ml.tx.send(c).await.unwrap();
    let (sid, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(sid, 7);
    assert_eq!(msg, RelayMsg::End(End::new(EndReason::DONE)));
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    // The stream is gone; the circuit remains.
    tokio::time::timeout(T, async {
        while !r.ctx.stats.open_circuits() == 1 || ml.link.get(tc.id).is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn exit_policy_and_resolution_failures_end_the_stream() {
    // Strict exit: private destinations refused even though the port is accepted.
    let r = test_relay(ExitPolicy {
        accept: vec!["1-1000".into(), "1024-65535".into()],
        allow_private: false,
        ..ExitPolicy::default()
    });
    let echo = echo_server().await;
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let mut got = Vec::new();
    let cases: Vec<(Target, u16, EndReason)> = vec![
        (
            Target::Ip("127.0.0.1".parse().unwrap()),
            echo.port(),
            EndReason::EXITPOLICY,
        ),
        (
            Target::Hostname("only.the.exit".into()),
            echo.port(),
            EndReason::EXITPOLICY,
        ),
        (
            Target::Ip("8.8.8.8".parse().unwrap()),
            1010,
            EndReason::EXITPOLICY,
        ),
        (
            Target::Hostname("no-such-name.invalid".into()),
            80,
            EndReason::RESOLVEFAILED,
        ),
    ];
    for (i, (target, port, want)) in cases.into_iter().enumerate() {
        let sid = 100 + i as u16;
        let begin = RelayMsg::Begin(Begin {
            target,
            port,
            flags: BeginFlags::default(),
        });
        let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, sid, &begin);
        ml.tx.send(c).await.unwrap();
        let (s, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
        assert_eq!(s, sid);
        assert_eq!(msg, RelayMsg::End(End::new(want)), "case {i}");
    }
    // A non-exit refuses everything with EXITPOLICY.
    let r2 = test_relay(ExitPolicy::default());
    let mut ml2 = attach(&r2.ctx, true);
    let mut tc2 = create_circuit(&mut ml2, &r2.ctx).await;
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("8.8.8.8".parse().unwrap()),
        port: 443,
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc2, 0, CellCmd::RELAY, 1, &begin);
    ml2.tx.send(c).await.unwrap();
    let (_, msg) = client_recv(&mut ml2, &mut tc2, 0, &mut got).await.unwrap();
    assert_eq!(msg, RelayMsg::End(End::new(EndReason::EXITPOLICY)));
}

#[tokio::test]
async fn connect_refused_and_resolve() {
    let r = test_relay(ExitPolicy::accept_all(true));
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let mut got = Vec::new();
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.1".parse().unwrap()),
        port: closed,
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 3, &begin);
    ml.tx.send(c).await.unwrap();
    let (_, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(msg, RelayMsg::End(End::new(EndReason::CONNECTREFUSED)));

    let res = RelayMsg::Resolve(Resolve {
        hostname: "only.the.exit".into(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 4, &res);
    ml.tx.send(c).await.unwrap();
    let (sid, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(sid, 4);
    let RelayMsg::Resolved(r) = msg else {
        panic!("expected RESOLVED, got {msg:?}")
    };
    assert_eq!(
        r.answers,
        vec![(
            ResolvedValue::Ip("127.0.0.1".parse().unwrap()),
            crate::core::DNS_TTL
        )]
    );
}

async fn recv_ch(rx: &mut allium_proto::channel::ChannelReceiver) -> Cell {
    tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()
}

// ---- Two real relays over loopback: EXTEND, BEGIN at the second hop, data, DESTROY. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_extend_begin_and_destroy() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = crate::start(RelayConfig::for_test("A", dir_a.path()))
        .await
        .unwrap();
    let mut cfg_b = RelayConfig::for_test("B", dir_b.path());
    cfg_b.exit_policy = ExitPolicy::accept_all(true);
    let b = crate::start(cfg_b).await.unwrap();
    a.dangerously_add_known_relay(b.identity(), b.or_addr(), b.link_key());
    b.dangerously_add_known_relay(a.identity(), a.or_addr(), a.link_key());
    let echo = echo_server().await;

    // Client link to A.
    let ch = allium_proto::channel::connect(a.or_addr(), &a.identity(), &a.link_key(), None)
        .await
        .unwrap();
    let (tx, mut rx) = ch.split();

    // CREATE to A.
    let (hs, skin) = client_start(&a.identity(), &a.onion_key(), &flowctl::cc_request()).unwrap();
    let id = CircId::random(true);
    tx.send(
        Cell::create(
            id,
            &Create {
                htype: 1,
                hdata: skin,
            },
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let c = recv_ch(&mut rx).await;
    let (k1, _) = hs
        .finish(&Created::decode(&c.body[..]).unwrap().hdata)
        .unwrap();
    let mut tc = TestCirc {
        id,
        cc: ClientCircuitCrypto::new(),
        early_left: 8,
        send_win: CongestionControl::default(),
        recv_win: CircRecv::default(),
    };
    tc.cc.add_hop(&k1).unwrap();

    // EXTEND to B.
    let (hs2, skin2) = client_start(&b.identity(), &b.onion_key(), &flowctl::cc_request()).unwrap();
    let SocketAddr::V4(b4) = b.or_addr() else {
        panic!()
    };
    let ext = RelayMsg::Extend(Extend {
        specs: vec![LinkSpec::Ed25519Id(b.identity()), LinkSpec::Ipv4(b4)],
        htype: 1,
        hdata: skin2,
    });
    tc.early_left -= 1;
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY_EARLY, 0, &ext);
    tx.send(c).await.unwrap();
    let (hop, _, msg, _) = open_backward(&mut tc, recv_ch(&mut rx).await);
    assert_eq!(hop, 0);
    let RelayMsg::Extended(e) = msg else {
        panic!("expected EXTENDED, got {msg:?}")
    };
    let (k2, _) = hs2.finish(&e.hdata).unwrap();
    tc.cc.add_hop(&k2).unwrap();

    // BEGIN at B (its previous hop is relay A, so it is allowed).
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.1".parse().unwrap()),
        port: echo.port(),
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 1, CellCmd::RELAY_EARLY, 9, &begin);
    tx.send(c).await.unwrap();
    let (hop, sid, msg, _) = open_backward(&mut tc, recv_ch(&mut rx).await);
    assert_eq!((hop, sid), (1, 9));
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");

    let data = RelayMsg::Data(allium_proto::relaymsg::Data {
        data: b"hello through two hops".to_vec(),
    });
    let (c, _) = relay_cell(&mut tc, 1, CellCmd::RELAY, 9, &data);
    tx.send(c).await.unwrap();
    let (hop, sid, msg, _) = open_backward(&mut tc, recv_ch(&mut rx).await);
    assert_eq!((hop, sid), (1, 9));
    assert_eq!(msg, data);
    assert_eq!(b.stats().open_circuits(), 1);

    // DESTROY from the client propagates to B.
    tx.send(Cell::destroy(id, DestroyReason::REQUESTED))
        .await
        .unwrap();
    tokio::time::timeout(T, async {
        while b.stats().open_circuits() != 0 || a.stats().open_circuits() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();

    // Restart keeps the identity.
    let id_a = a.identity();
    a.shutdown().await;
    b.shutdown().await;
    let a2 = crate::start(RelayConfig::for_test("A", dir_a.path()))
        .await
        .unwrap();
    assert_eq!(a2.identity(), id_a);
    a2.shutdown().await;
    let _ = X25519Public([0; 32]);
}

#[tokio::test]
async fn previous_onion_key_accepted_after_rotation_only_once() {
    let r = test_relay(ExitPolicy::default());
    let mut ml = attach(&r.ctx, false);
    let old = r.ctx.keys.onion_public();
    r.ctx.keys.rotate_onion().unwrap();
    assert_ne!(old, r.ctx.keys.onion_public());
    let try_key = |key: X25519Public| {
        let (hs, skin) = client_start(&r.ctx.keys.id, &key, &flowctl::cc_request()).unwrap();
        let id = CircId::random(true);
        (
            hs,
            id,
            Cell::create(
                id,
                &Create {
                    htype: 1,
                    hdata: skin,
                },
            )
            .unwrap(),
        )
    };
    // The previous key still works.
    let (hs, id, cell) = try_key(old);
    ml.tx.send(cell).await.unwrap();
    let c = ml.recv().await;
    assert_eq!((c.cmd, c.circ_id), (CellCmd::CREATED, Some(id)));
    hs.finish(&Created::decode(&c.body[..]).unwrap().hdata)
        .unwrap();
    // After a second rotation it is gone.
    r.ctx.keys.rotate_onion().unwrap();
    let (_, id, cell) = try_key(old);
    ml.tx.send(cell).await.unwrap();
    assert_destroy(&ml.recv().await, id);
}

#[tokio::test]
async fn dropping_the_handle_closes_links() {
    let dir = tempfile::tempdir().unwrap();
    let a = crate::start(RelayConfig::for_test("A", dir.path()))
        .await
        .unwrap();
    let ch = allium_proto::channel::connect(a.or_addr(), &a.identity(), &a.link_key(), None)
        .await
        .unwrap();
    let (_tx, mut rx) = ch.split();
    drop(a);
    // The relay closes the link: the receiver ends promptly.
    assert!(tokio::time::timeout(T, rx.recv()).await.unwrap().is_none());
    // And the port is free again (the listener is gone).
}

/// A server that sends `data` and closes.
async fn source_server(data: Arc<Vec<u8>>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let data = Arc::clone(&data);
            tokio::spawn(async move {
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_link_queue_keeps_backward_order() {
    // A one-cell queue towards the client forces every producer onto the slow path; two
    // streams and the circuit SENDMEs compete for it. Any reordering would make the client's
    // backward decryption fail.
    let r = test_relay(ExitPolicy::accept_all(true));
    let data: Arc<Vec<u8>> = Arc::new((0..700_000u32).map(|i| (i % 253) as u8).collect());
    let src = source_server(Arc::clone(&data)).await;
    let mut ml = attach_with_queue(&r.ctx, true, 1);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    for sid in [1u16, 2] {
        let begin = RelayMsg::Begin(Begin {
            target: Target::Ip("127.0.0.1".parse().unwrap()),
            port: src.port(),
            flags: BeginFlags::default(),
        });
        let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, sid, &begin);
        ml.tx.send(c).await.unwrap();
    }
    let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut ended = 0;
    while ended < 2 {
        let cell = ml.recv().await;
        let (hop, sid, msg, tag) = open_backward(&mut tc, cell);
        assert_eq!(hop, 0);
        let i = usize::from(sid) - 1;
        match msg {
            RelayMsg::Connected(_) => {}
            RelayMsg::Data(d) => {
                got[i].extend_from_slice(&d.data);
                if let Some(t) = tc.recv_win.on_data_received(&tag) {
                    let sm = RelayMsg::Sendme(Sendme { tag: Some(t) });
                    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 0, &sm);
                    ml.tx.send(c).await.unwrap();
                }
            }
            RelayMsg::End(e) => {
                assert_eq!(e.reason, EndReason::DONE);
                ended += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got[0] == *data && got[1] == *data, "stream bytes differ");
}

#[tokio::test]
async fn pass_cell_without_next_hop_destroys() {
    let (_r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    tc.cc.add_hop(&hop2_keys()).unwrap();
    let (c, _) = relay_cell(
        &mut tc,
        1,
        CellCmd::RELAY,
        0,
        &RelayMsg::Drop(Default::default()),
    );
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc.id);
}

#[tokio::test]
async fn a_resetting_destination_costs_only_its_stream() {
    let r = test_relay(ExitPolicy::accept_all(true));
    let echo = echo_server().await;
    let rst = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                // Wait for the first bytes, then reset the connection.
                let mut b = [0u8; 1];
                let _ = s.readable().await;
                let _ = s.try_read(&mut b);
                let _ = s.set_zero_linger();
                drop(s);
            }
        });
        addr
    };
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let mut got = Vec::new();
    let data = |d: &[u8]| RelayMsg::Data(allium_proto::relaymsg::Data { data: d.to_vec() });
    let begin = |port| {
        RelayMsg::Begin(Begin {
            target: Target::Ip("127.0.0.1".parse().unwrap()),
            port,
            flags: BeginFlags::default(),
        })
    };
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &begin(echo.port()));
    ml.tx.send(c).await.unwrap();
    let (s, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(s, 1);
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");
    // Stream 2 (with optimistic data) goes to the destination that resets.
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 2, &begin(rst.port()));
    ml.tx.send(c).await.unwrap();
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 2, &data(b"boom"));
    ml.tx.send(c).await.unwrap();
    // It ends (the reset may even come before the connection completes).
    let e = loop {
        let (s, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
        assert_eq!(s, 2);
        match msg {
            RelayMsg::Connected(_) => {}
            RelayMsg::End(e) => break e,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        [EndReason::CONNRESET, EndReason::MISC, EndReason::DONE].contains(&e.reason),
        "{e:?}"
    );
    // The other stream on the same circuit still works.
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &data(b"still here"));
    ml.tx.send(c).await.unwrap();
    let cell = ml.recv().await;
    let (_, s, msg, _) = open_backward(&mut tc, cell);
    assert_eq!((s, msg), (1, data(b"still here")));
    assert!(ml.link.get(tc.id).is_some());
}

#[tokio::test]
async fn unexpected_or_forged_sendme_destroys() {
    let r = test_relay(ExitPolicy::accept_all(true));
    let mut ml = attach(&r.ctx, true);
    // No DATA was sent: a circuit SENDME is unexpected.
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let sm = RelayMsg::Sendme(Sendme { tag: Some([7; 16]) });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 0, &sm);
    ml.tx.send(c).await.unwrap();
    assert_destroy(&ml.recv().await, tc.id);

    // After 100 DATA cells, a SENDME with the wrong tag is a forgery.
    let data: Arc<Vec<u8>> = Arc::new(vec![0x5a; 100 * 934]);
    let src = source_server(data).await;
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.1".parse().unwrap()),
        port: src.port(),
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &begin);
    ml.tx.send(c).await.unwrap();
    let mut cells = 0;
    while cells < 100 {
        let (_, _, msg, _) = open_backward(&mut tc, ml.recv().await);
        if matches!(msg, RelayMsg::Data(_)) {
            cells += 1;
        }
    }
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 0, &sm);
    ml.tx.send(c).await.unwrap();
    loop {
        let c = ml.recv().await;
        if c.cmd == CellCmd::DESTROY {
            assert_destroy(&c, tc.id);
            break;
        }
    }
}

#[tokio::test]
async fn exit_stream_limits() {
    let r = test_relay_with(ExitPolicy::accept_all(true), |c| c.max_exit_streams = 1);
    let echo = echo_server().await;
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let mut got = Vec::new();
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.1".parse().unwrap()),
        port: echo.port(),
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &begin);
    ml.tx.send(c).await.unwrap();
    let (_, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 2, &begin);
    ml.tx.send(c).await.unwrap();
    let (s, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(
        (s, msg),
        (2, RelayMsg::End(End::new(EndReason::RESOURCELIMIT)))
    );
    // Ending stream 1 frees the slot.
    let end = RelayMsg::End(End::new(EndReason::MISC));
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 1, &end);
    ml.tx.send(c).await.unwrap();
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 3, &begin);
    ml.tx.send(c).await.unwrap();
    let (s, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(s, 3);
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");
}

// ---- Next hops over in-memory links, and the properties of the new shape. ----

/// Identity of the fake next relay.
const NEXT: RelayId = RelayId([9; 32]);

/// A link the relay believes it opened to relay [`NEXT`] (registered, so EXTEND reuses it), with
/// a relay → peer queue of `out_cap` cells.
fn attach_next(r: &TestRelay, out_cap: usize) -> MemLink {
    let ml = attach_full(&r.ctx, Some(NEXT), true, out_cap, 4096);
    r.ctx.links.register(NEXT, &ml.link);
    crate::add_known_relay(
        &r.ctx,
        NEXT,
        "127.0.0.1:9".parse().unwrap(),
        X25519Public([0; 32]),
    );
    ml
}

/// EXTEND `tc` (on `ml`) to [`NEXT`] over `nl`, answer the CREATE, and add the fake hop-2 keys.
/// Returns the circuit id the relay chose on `nl` and hop 2's relay crypto.
async fn extend_via(
    ml: &mut MemLink,
    tc: &mut TestCirc,
    nl: &mut MemLink,
) -> (CircId, allium_crypto::relaycell::RelayHopCrypto) {
    let ext = RelayMsg::Extend(Extend {
        specs: vec![
            LinkSpec::Ed25519Id(NEXT),
            LinkSpec::Ipv4("127.0.0.1:9".parse().unwrap()),
        ],
        htype: 1,
        hdata: vec![0; 100],
    });
    let (c, _) = relay_cell(tc, 0, CellCmd::RELAY_EARLY, 0, &ext);
    ml.tx.send(c).await.unwrap();
    let create = nl.recv().await;
    assert_eq!(create.cmd, CellCmd::CREATE);
    let next_id = create.circ_id.unwrap();
    // The relay is the initiator on this link: its ids have the MSB set.
    assert!(next_id.is_initiator_allocated());
    nl.tx
        .send(Cell::created(next_id, &Created { hdata: vec![1; 64] }).unwrap())
        .await
        .unwrap();
    let (hop, _, msg, _) = open_backward(tc, ml.recv().await);
    assert_eq!(hop, 0);
    assert!(matches!(msg, RelayMsg::Extended(_)), "{msg:?}");
    tc.cc.add_hop(&hop2_keys()).unwrap();
    (
        next_id,
        allium_crypto::relaycell::RelayHopCrypto::new(&hop2_keys()),
    )
}

fn hop2_keys() -> allium_crypto::handshake::HopKeys {
    allium_crypto::handshake::HopKeys::dangerously_from_parts([4; 32], [5; 32], [6; 32])
}

/// A backward DATA cell that hop 2 originates on stream `sid` under `next_id`.
fn hop2_data(
    hop2: &mut allium_crypto::relaycell::RelayHopCrypto,
    next_id: CircId,
    sid: u16,
    bytes: &[u8],
) -> Cell {
    let mut buf = [0u8; RELAY_MSG_LEN];
    let n = RelayMsg::Data(allium_proto::relaymsg::Data {
        data: bytes.to_vec(),
    })
    .encode(sid, &mut buf)
    .unwrap();
    let mut cell = Cell::new_zeroed(Some(next_id), CellCmd::RELAY);
    hop2.encrypt_backward(CellCmd::RELAY.0, &buf[..n], &mut cell.body)
        .unwrap();
    cell
}

#[tokio::test]
async fn middle_forwards_both_ways_and_propagates_destroy() {
    let (r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    let mut nl = attach_next(&r, 2048);
    let (next_id, mut hop2) = extend_via(&mut ml, &mut tc, &mut nl).await;

    // Forward: a cell for hop 2 passes through with the same command, re-addressed.
    let drop_msg = RelayMsg::Drop(Default::default());
    let (c, _) = relay_cell(&mut tc, 1, CellCmd::RELAY_EARLY, 0, &drop_msg);
    ml.tx.send(c).await.unwrap();
    let mut fwd = nl.recv().await;
    assert_eq!(
        (fwd.circ_id, fwd.cmd),
        (Some(next_id), CellCmd::RELAY_EARLY)
    );
    let f = hop2.decrypt_forward(fwd.cmd.0, &mut fwd.body).unwrap();
    assert!(matches!(
        f,
        allium_crypto::relaycell::Forward::Recognized { .. }
    ));

    // Backward: hop 2 originates a cell; the relay adds its layer; the client sees hop index 1.
    nl.tx
        .send(hop2_data(&mut hop2, next_id, 3, b"back"))
        .await
        .unwrap();
    let back = ml.recv().await;
    assert_eq!(back.circ_id, Some(tc.id));
    let (hop, sid, msg, _) = open_backward(&mut tc, back);
    assert_eq!((hop, sid), (1, 3));
    assert_eq!(
        msg,
        RelayMsg::Data(allium_proto::relaymsg::Data {
            data: b"back".to_vec()
        })
    );

    // DESTROY from the next hop reaches the client with reason NONE.
    nl.tx
        .send(Cell::destroy(next_id, DestroyReason::FINISHED))
        .await
        .unwrap();
    assert_destroy(&ml.recv().await, tc.id);
    wait_until(|| ml.link.n_circuits() == 0 && nl.link.n_circuits() == 0).await;
    // The id the relay chose on the next link is quarantined.
    assert!(nl.link.is_quarantined(next_id));
}

#[tokio::test]
async fn backward_relay_early_destroys_both_ways() {
    let (r, mut ml, mut tc) = one_hop(ExitPolicy::default()).await;
    let mut nl = attach_next(&r, 2048);
    let (next_id, _) = extend_via(&mut ml, &mut tc, &mut nl).await;
    nl.tx
        .send(Cell::new_zeroed(Some(next_id), CellCmd::RELAY_EARLY))
        .await
        .unwrap();
    assert_destroy(&ml.recv().await, tc.id);
    assert_destroy(&nl.recv().await, next_id);
    assert!(r.ctx.stats.protocol_violations() >= 1);
}

/// Wait (bounded) until `f` holds, letting the relay's tasks run.
async fn wait_until(mut f: impl FnMut() -> bool) {
    tokio::time::timeout(T, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("condition not reached in time");
}

#[tokio::test]
async fn quarantine_of_own_ids() {
    let r = test_relay(ExitPolicy::default());
    let ml = attach(&r.ctx, true);
    let (tx, _rx) = crate::link::inbox(1);
    let h = crate::link::CircHandle {
        tx,
        kill: Arc::default(),
        queued: Arc::default(),
    };
    let now = crate::link::coarse_now();
    let id = ml.link.allocate(h, now).unwrap();
    // The relay is the responder on this link: its ids have the MSB clear.
    assert!(!id.is_initiator_allocated());
    assert!(ml.link.remove(id, now));
    assert!(ml.link.is_quarantined(id));
}

/// Head-of-line blocking: a frozen client link (its queue is never drained) carries dozens of
/// circuits mid-transfer through the same next-hop link as an honest circuit. The honest one
/// keeps flowing, byte-exact; the frozen ones are destroyed once blocked past their cap; no
/// inbound queue overflows (memory stays within the windows).
#[tokio::test(start_paused = true)]
async fn frozen_link_does_not_stall_other_circuits() {
    const FROZEN: usize = 24;
    const PER_FROZEN: usize = 300;
    const HONEST_CELLS: usize = 3000;
    // Tokio's paused clock must see the handshake work: workers as runtime tasks.
    let limits = Limits {
        create_on_runtime: true,
        ..Limits::default()
    };
    let r = test_relay_limits(ExitPolicy::default(), |_| {}, limits);
    let mut nl = attach_next(&r, 8192);
    // The frozen client: a queue of 64 cells that nobody reads after the setup.
    let mut frozen = attach_full(&r.ctx, None, false, 64, 4096);
    let mut frozen_circs = Vec::new();
    for _ in 0..FROZEN {
        let mut tc = create_circuit(&mut frozen, &r.ctx).await;
        let (next_id, hop2) = extend_via(&mut frozen, &mut tc, &mut nl).await;
        frozen_circs.push((next_id, hop2));
    }
    let mut honest = attach(&r.ctx, false);
    let mut htc = create_circuit(&mut honest, &r.ctx).await;
    let (hid, mut hhop2) = extend_via(&mut honest, &mut htc, &mut nl).await;
    // From now on the frozen link is never read: fill its queue and beyond.
    for (next_id, hop2) in &mut frozen_circs {
        for i in 0..PER_FROZEN {
            let c = hop2_data(hop2, *next_id, 1, &[(i % 251) as u8; 400]);
            nl.tx.send(c).await.unwrap();
        }
    }
    // Meanwhile the honest circuit's transfer, interleaved on the same link, completes.
    let payload: Vec<u8> = (0..HONEST_CELLS * 498).map(|i| (i % 253) as u8).collect();
    let mut got = Vec::with_capacity(payload.len());
    let sender = {
        let tx = nl.tx.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            for chunk in payload.chunks(498) {
                tx.send(hop2_data(&mut hhop2, hid, 2, chunk)).await.unwrap();
            }
        })
    };
    while got.len() < payload.len() {
        let (hop, sid, msg, _) = open_backward(&mut htc, honest.recv().await);
        assert_eq!((hop, sid), (1, 2));
        let RelayMsg::Data(d) = msg else {
            panic!("unexpected {msg:?}")
        };
        got.extend_from_slice(&d.data);
    }
    sender.await.unwrap();
    assert!(got == payload, "honest bytes differ");
    assert_eq!(r.ctx.stats.queue_overflows(), 0);
    // Memory: what the frozen circuits hold is bounded by their inbound queues (and their
    // windows); it is all still queued, not lost, and no other queue grew.
    let mut held = 0;
    for (id, _) in &frozen_circs {
        if let Some((h, _)) = nl.link.get(*id) {
            let queued = h.tx.queued();
            assert!(queued <= crate::ctx::INBOUND_QUEUE_CELLS);
            held += queued;
        }
    }
    assert!(held <= FROZEN * PER_FROZEN, "{held}");
    // Past the cap, every frozen circuit is destroyed (DESTROY reason TIMEOUT to the next hop).
    tokio::time::sleep(crate::core::BLOCKED_CAP + Duration::from_secs(1)).await;
    wait_until(|| r.ctx.stats.blocked_destroys() == FROZEN as u64).await;
    let mut destroyed = std::collections::HashSet::new();
    while destroyed.len() < FROZEN {
        let c = nl.recv().await;
        assert_eq!(c.cmd, CellCmd::DESTROY);
        assert_eq!(
            Destroy::decode(&c.body[..]).unwrap().reason,
            DestroyReason::TIMEOUT
        );
        destroyed.insert(c.circ_id.unwrap());
    }
    assert!(frozen_circs.iter().all(|(id, _)| destroyed.contains(id)));
    // The honest circuit is still there.
    assert!(honest.link.get(htc.id).is_some());
    drop(frozen.rx);
}

/// A burst of CREATEs on a link beside a bulk transfer on an established circuit of the same
/// link: every cell of the transfer is forwarded while the CREATEs are queued or dropped, and
/// every CREATE is answered.
#[tokio::test]
async fn create_burst_does_not_stall_forwarding() {
    const CREATES: usize = 300;
    const CELLS: usize = 2000;
    let limits = Limits {
        create_queue: 16,
        ..Limits::default()
    };
    let r = test_relay_limits(ExitPolicy::default(), |_| {}, limits);
    let mut nl = attach_next(&r, 8192);
    let mut ml = attach_full(&r.ctx, None, false, 8192, 4096);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let (next_id, mut hop2) = extend_via(&mut ml, &mut tc, &mut nl).await;
    let mut creates = std::collections::HashSet::new();
    let tx = ml.tx.clone();
    let onion = r.ctx.keys.onion_public();
    let id = r.ctx.keys.id;
    let burst = tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..CREATES {
            let (_, skin) = client_start(&id, &onion, &flowctl::cc_request()).unwrap();
            let cid = CircId::random(true);
            ids.push(cid);
            tx.send(
                Cell::create(
                    cid,
                    &Create {
                        htype: 1,
                        hdata: skin,
                    },
                )
                .unwrap(),
            )
            .await
            .unwrap();
        }
        ids
    });
    let bulk = tokio::spawn(async move {
        for i in 0..CELLS {
            let c = hop2_data(&mut hop2, next_id, 5, &[(i % 256) as u8; 100]);
            nl.tx.send(c).await.unwrap();
        }
        nl
    });
    let mut data_cells = 0;
    let (mut created, mut refused) = (0, 0);
    while data_cells < CELLS || created + refused < CREATES {
        let c = ml.recv().await;
        match c.cmd {
            CellCmd::CREATED => {
                created += 1;
                creates.insert(c.circ_id.unwrap());
            }
            CellCmd::DESTROY => {
                assert_eq!(
                    Destroy::decode(&c.body[..]).unwrap().reason,
                    DestroyReason::RESOURCELIMIT
                );
                refused += 1;
                creates.insert(c.circ_id.unwrap());
            }
            CellCmd::RELAY => {
                assert_eq!(c.circ_id, Some(tc.id));
                let (hop, sid, msg, _) = open_backward(&mut tc, c);
                assert_eq!((hop, sid), (1, 5));
                let RelayMsg::Data(d) = msg else {
                    panic!("{msg:?}")
                };
                assert_eq!(d.data, vec![(data_cells % 256) as u8; 100]);
                data_cells += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let ids = burst.await.unwrap();
    let _nl = bulk.await.unwrap();
    assert!(ids.iter().all(|i| creates.contains(i)));
    assert_eq!(r.ctx.stats.creates_dropped(), refused as u64);
    assert!(created > 0);
}

/// A peer that sends beyond its windows gets only its own circuit destroyed (RESOURCELIMIT),
/// counted; another circuit on the same link keeps working.
#[tokio::test]
async fn overflowing_circuit_is_destroyed_alone() {
    let limits = Limits {
        inbound_queue: 256,
        ..Limits::default()
    };
    let r = test_relay_limits(ExitPolicy::default(), |_| {}, limits);
    let (mut ml, nl, bad, mut good) = stalled_beside_idle(&r, 400).await;
    let c = ml.recv().await;
    assert_eq!(c.cmd, CellCmd::DESTROY);
    assert_eq!(c.circ_id, Some(bad.id));
    assert_eq!(
        Destroy::decode(&c.body[..]).unwrap().reason,
        DestroyReason::RESOURCELIMIT
    );
    assert_eq!(r.ctx.stats.queue_overflows(), 1);
    // The other circuit on the link answers.
    assert_answers(&mut ml, &mut good).await;
    drop(nl.rx);
}

/// On one link from a client, two circuits: `bad` (returned third), extended to a next hop that
/// never reads so that its reactor blocks and stops pulling its queue, then sent `n` DROP
/// cells; and `good` (fourth), idle. Returns the client link and the next hop's link too.
async fn stalled_beside_idle(r: &TestRelay, n: usize) -> (MemLink, MemLink, TestCirc, TestCirc) {
    let mut nl = attach_next(r, 1);
    let mut ml = attach_full(&r.ctx, None, false, 8192, 4096);
    let mut bad = create_circuit(&mut ml, &r.ctx).await;
    let (_next_id, _) = extend_via(&mut ml, &mut bad, &mut nl).await;
    let good = create_circuit(&mut ml, &r.ctx).await;
    for _ in 0..n {
        let (c, _) = relay_cell(
            &mut bad,
            1,
            CellCmd::RELAY,
            0,
            &RelayMsg::Drop(Default::default()),
        );
        ml.tx.send(c).await.unwrap();
    }
    (ml, nl, bad, good)
}

/// `circ` on `ml` is alive: it answers TRUNCATE with TRUNCATED.
async fn assert_answers(ml: &mut MemLink, circ: &mut TestCirc) {
    let (c, _) = relay_cell(
        circ,
        0,
        CellCmd::RELAY,
        0,
        &RelayMsg::Truncate(Default::default()),
    );
    ml.tx.send(c).await.unwrap();
    let (_, _, msg, _) = open_backward(circ, ml.recv().await);
    assert!(matches!(msg, RelayMsg::Truncated(_)), "{msg:?}");
}

#[tokio::test]
async fn pending_creates_are_capped_per_link() {
    let r = test_relay(ExitPolicy::default());
    let ml = attach_full(&r.ctx, None, false, 64, 4096);
    let base = |i: u32| CircId::new(CircId::INITIATOR_BIT | i).unwrap();
    for i in 1..=4 {
        ml.link.reserve_peer_id(base(i), 4).unwrap();
    }
    assert_eq!(
        ml.link.reserve_peer_id(base(5), 4),
        Err(crate::link::InsertError::Full)
    );
    // An id in use is refused as such; a reservation given back makes room.
    assert_eq!(
        ml.link.reserve_peer_id(base(1), 8),
        Err(crate::link::InsertError::InUse)
    );
    ml.link.unreserve(base(2));
    ml.link.reserve_peer_id(base(5), 4).unwrap();
    assert_eq!(ml.link.n_circuits(), 4);
}

/// Send `data` on stream `sid` of a one-hop circuit and read the echo back.
async fn echo_through(ml: &mut MemLink, tc: &mut TestCirc, sid: u16, data: &[u8]) -> Vec<u8> {
    let msg = RelayMsg::Data(allium_proto::relaymsg::Data {
        data: data.to_vec(),
    });
    let (c, tag) = relay_cell(tc, 0, CellCmd::RELAY, sid, &msg);
    tc.send_win.note_data_sent(&tag, test_now()).unwrap();
    ml.tx.send(c).await.unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let cell = tokio::time::timeout(T, ml.rx.recv())
            .await
            .unwrap()
            .unwrap();
        let (_, s, msg, tag) = open_backward(tc, cell);
        match msg {
            RelayMsg::Data(d) => {
                assert_eq!(s, sid);
                let _ = tc.recv_win.on_data_received(&tag);
                got.extend_from_slice(&d.data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn reconfigure_applies_to_new_circuits_while_open_streams_keep_working() {
    let r = test_relay(ExitPolicy::accept_all(true));
    let echo = echo_server().await;
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.1".parse().unwrap()),
        port: echo.port(),
        flags: BeginFlags::default(),
    });
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 7, &begin);
    ml.tx.send(c).await.unwrap();
    let (sid, msg) = client_recv(&mut ml, &mut tc, 0, &mut Vec::new())
        .await
        .unwrap();
    assert_eq!(sid, 7);
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");
    assert_eq!(
        echo_through(&mut ml, &mut tc, 7, b"before").await,
        b"before"
    );

    // Reload: the echo port is no longer an exit port; new nickname and a bandwidth limit.
    let mut new = (*r.ctx.live()).clone();
    new.exit_policy = ExitPolicy {
        accept: vec!["1".into()],
        allow_private: true,
        ..ExitPolicy::default()
    };
    new.nickname = "Renamed".into();
    new.bandwidth_rate = 1_000_000;
    new.listen = "127.0.0.1:9".parse().unwrap(); // not reloadable: ignored
    assert!(r.ctx.reconfigure(&new), "the descriptor changed");
    assert!(!r.ctx.reconfigure(&new), "nothing changed the second time");
    assert_eq!(r.ctx.bucket.rate(), (1_000_000, new.effective_burst()));
    assert_ne!(r.ctx.live().listen, new.listen);
    let desc = crate::dirsync::build_descriptor(&r.ctx).unwrap();
    let desc =
        allium_directory::doc::Signed::<allium_directory::doc::RelayDescriptor>::from_bytes(&desc)
            .unwrap()
            .verify()
            .unwrap();
    assert_eq!(desc.desc().nickname, "Renamed");

    // The open stream keeps working on its circuit.
    assert_eq!(echo_through(&mut ml, &mut tc, 7, b"after").await, b"after");

    // A new circuit gets the new policy.
    let mut ml2 = attach(&r.ctx, true);
    let mut tc2 = create_circuit(&mut ml2, &r.ctx).await;
    let (c, _) = relay_cell(&mut tc2, 0, CellCmd::RELAY, 1, &begin);
    ml2.tx.send(c).await.unwrap();
    let (sid, msg) = client_recv(&mut ml2, &mut tc2, 0, &mut Vec::new())
        .await
        .unwrap();
    assert_eq!(sid, 1);
    assert_eq!(msg, RelayMsg::End(End::new(EndReason::EXITPOLICY)));
}

#[path = "dos_tests.rs"]
mod dos_tests;

/// A link opened for an EXTEND leaves from the relay's own address (its listen IP, the default
/// `outbound_bind_address`), so the next relay counts it against this relay, not against
/// whatever else shares the machine's default source address (a test network's proxy).
#[tokio::test]
async fn extend_links_leave_from_the_listen_address() {
    let (mine, next_ip) = (
        SocketAddr::from(([127, 31, 0, 1], 0)),
        SocketAddr::from(([127, 32, 0, 1], 0)),
    );
    if std::net::TcpListener::bind(mine).is_err() {
        eprintln!("skipped: this system routes only 127.0.0.1 to loopback");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::for_test("A", dir.path());
    cfg.listen = mine;
    let a = crate::start(cfg).await.unwrap();
    // The "next relay": a listener that only records who connects.
    let next = tokio::net::TcpListener::bind(next_ip).await.unwrap();
    let to = next.local_addr().unwrap();
    let ctx = Arc::clone(&a.ctx);
    let (id, key) = (RelayId([9; 32]), a.link_key());
    let extend = tokio::spawn(async move { ctx.links.get_or_connect(&ctx, id, to, key).await });
    let (_s, from) = tokio::time::timeout(T, next.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from.ip(), mine.ip());
    extend.abort();
}

#[path = "sched_tests.rs"]
mod sched_tests;
