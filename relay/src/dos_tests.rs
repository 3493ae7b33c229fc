//! Driver tests of the DoS limits (`crate::dos`): in-memory links for the CREATE-side limits,
//! and real sockets on distinct loopback addresses (the attacker on 127.0.0.77, the honest
//! client on 127.0.0.1) for the connection limits. Each fails if its limit is removed.

use super::*;
use crate::dos::{DosConfig, Refusal};

fn dos_relay(dos: DosConfig, limits: Limits) -> TestRelay {
    test_relay_limits(ExitPolicy::default(), move |c| c.dos = dos, limits)
}

fn create_cell(ctx: &Ctx) -> (CircId, Cell) {
    let (_, skin) = new_create(ctx);
    let id = CircId::random(true);
    let cell = Cell::create(
        id,
        &Create {
            htype: 1,
            hdata: skin,
        },
    )
    .unwrap();
    (id, cell)
}

fn destroy_reason(c: &Cell) -> DestroyReason {
    assert_eq!(c.cmd, CellCmd::DESTROY, "expected DESTROY, got {:?}", c.cmd);
    Destroy::decode(&c.body[..]).unwrap().reason
}

fn attacker() -> std::net::IpAddr {
    "127.0.0.77".parse().unwrap()
}

fn honest() -> std::net::IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// The CREATE bucket of an address refuses (DESTROY RESOURCELIMIT) once spent; another address
/// and a relay's link at the same address are not affected.
#[tokio::test]
async fn create_bucket_per_address_refuses_before_the_handshake_pool() {
    let dos = DosConfig {
        create_rate: 1,
        create_burst: 3,
        create_min_connections: 0,
        ..DosConfig::default()
    };
    let r = dos_relay(dos, Limits::default());
    let mut bad = attach(&r.ctx, false);
    bad.link.set_peer_ip(attacker());
    for _ in 0..3 {
        create_circuit(&mut bad, &r.ctx).await;
    }
    let (id, cell) = create_cell(&r.ctx);
    bad.tx.send(cell).await.unwrap();
    let c = bad.recv().await;
    assert_eq!(c.circ_id, Some(id));
    assert_eq!(destroy_reason(&c), DestroyReason::RESOURCELIMIT);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::CreateRate), 1);
    // Refused before the pool: nothing was queued or dropped there.
    assert_eq!(r.ctx.stats.creates_dropped(), 0);
    // The honest address still creates.
    let mut good = attach(&r.ctx, false);
    good.link.set_peer_ip(honest());
    create_circuit(&mut good, &r.ctx).await;
    // A relay's link from the attacker's address is exempt.
    let mut relay = attach(&r.ctx, true);
    relay.link.set_peer_ip(attacker());
    for _ in 0..4 {
        create_circuit(&mut relay, &r.ctx).await;
    }
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::CreateRate), 1);
}

/// A replayed onionskin is refused with DESTROY PROTOCOL without a handshake.
#[tokio::test]
async fn replayed_onionskin_is_refused() {
    let r = dos_relay(DosConfig::default(), Limits::default());
    let mut ml = attach(&r.ctx, false);
    let (hs_id, cell) = create_cell(&r.ctx);
    let mut again = cell.clone();
    ml.tx.send(cell).await.unwrap();
    let c = ml.recv().await;
    assert_eq!((c.cmd, c.circ_id), (CellCmd::CREATED, Some(hs_id)));
    let other = CircId::random(true);
    again.circ_id = Some(other);
    ml.tx.send(again).await.unwrap();
    let c = ml.recv().await;
    assert_eq!(c.circ_id, Some(other));
    assert_eq!(destroy_reason(&c), DestroyReason::PROTOCOL);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::CreateReplay), 1);
    assert_eq!(r.ctx.stats.total_circuits(), 1);
}

/// A client link whose CREATEs keep being refused (here replays) is read at
/// `link_refusal_rate` past `link_refusal_burst`: twelve refusals with a burst of 4 at 2 per
/// second take 3.5 (simulated) seconds to be answered; with the pacing off, none. A relay's
/// link is never paced.
#[tokio::test(start_paused = true)]
async fn refused_creates_pace_the_client_link() {
    async fn twelve_replays(link_refusal_rate: u32, as_relay: bool) -> (Duration, u64) {
        let dos = DosConfig {
            link_refusal_rate,
            link_refusal_burst: 4,
            ..DosConfig::default()
        };
        let limits = Limits {
            create_on_runtime: true,
            ..Limits::default()
        };
        let r = dos_relay(dos, limits);
        let mut ml = attach(&r.ctx, as_relay);
        ml.link.set_peer_ip(attacker());
        let (id, cell) = create_cell(&r.ctx);
        ml.tx.send(cell.clone()).await.unwrap();
        let c = ml.recv().await;
        assert_eq!((c.cmd, c.circ_id), (CellCmd::CREATED, Some(id)));
        let t0 = tokio::time::Instant::now();
        for _ in 0..12 {
            let mut again = cell.clone();
            again.circ_id = Some(CircId::random(true));
            ml.tx.send(again).await.unwrap();
        }
        for _ in 0..12 {
            assert_eq!(destroy_reason(&ml.recv().await), DestroyReason::PROTOCOL);
        }
        assert_eq!(r.ctx.stats.dos_rejections(Refusal::CreateReplay), 12);
        (t0.elapsed(), r.ctx.stats.link_pauses())
    }
    // Refusals 5 to 12 each pause the reader half a second, the last one after its DESTROY.
    let (paced, pauses) = twelve_replays(2, false).await;
    assert!(paced >= Duration::from_millis(3500), "{paced:?}");
    assert_eq!(pauses, 8);
    let (unpaced, pauses) = twelve_replays(0, false).await;
    assert!(unpaced < Duration::from_millis(100), "{unpaced:?}");
    assert_eq!(pauses, 0);
    let (relay, pauses) = twelve_replays(2, true).await;
    assert!(relay < Duration::from_millis(100), "{relay:?}");
    assert_eq!(pauses, 0);
}

/// Past `max_circuits` open circuits, CREATEs get DESTROY RESOURCELIMIT.
#[tokio::test]
async fn global_circuit_cap() {
    let dos = DosConfig {
        max_circuits: 2,
        ..DosConfig::default()
    };
    let r = dos_relay(dos, Limits::default());
    let mut ml = attach(&r.ctx, true);
    create_circuit(&mut ml, &r.ctx).await;
    create_circuit(&mut ml, &r.ctx).await;
    let (id, cell) = create_cell(&r.ctx);
    ml.tx.send(cell).await.unwrap();
    let c = ml.recv().await;
    assert_eq!(c.circ_id, Some(id));
    assert_eq!(destroy_reason(&c), DestroyReason::RESOURCELIMIT);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::CircuitCap), 1);
    assert_eq!(r.ctx.stats.open_circuits(), 2);
}

/// A circuit with no stream and no cell for the idle timeout is closed (DESTROY FINISHED); one
/// that keeps getting cells is not.
#[tokio::test(start_paused = true)]
async fn idle_circuits_expire() {
    let dos = DosConfig {
        circuit_idle_timeout_secs: 60,
        ..DosConfig::default()
    };
    let limits = Limits {
        create_on_runtime: true,
        ..Limits::default()
    };
    let r = dos_relay(dos, limits);
    let mut ml = attach(&r.ctx, false);
    let idle = create_circuit(&mut ml, &r.ctx).await;
    let mut busy = create_circuit(&mut ml, &r.ctx).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (c, _) = relay_cell(
            &mut busy,
            0,
            CellCmd::RELAY,
            0,
            &RelayMsg::Drop(Default::default()),
        );
        ml.tx.send(c).await.unwrap();
    }
    let c = ml.recv().await;
    assert_eq!(c.circ_id, Some(idle.id));
    assert_eq!(destroy_reason(&c), DestroyReason::FINISHED);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::CircuitIdle), 1);
    assert_eq!(r.ctx.stats.open_circuits(), 1);
}

/// Over `max_queued_bytes`, the out-of-memory handler destroys the circuit whose queue holds the
/// oldest data (RESOURCELIMIT); a circuit with nothing queued is left alone.
#[tokio::test]
async fn oom_handler_destroys_the_circuit_with_the_oldest_queue() {
    let dos = DosConfig {
        max_queued_bytes: 50_000,
        ..DosConfig::default()
    };
    let r = dos_relay(dos, Limits::default());
    // The next hop never reads: the circuit's reactor blocks and its queue fills.
    let (mut ml, nl, bad, mut good) = stalled_beside_idle(&r, 200).await;
    let mem = Arc::clone(&r.ctx.dos.mem);
    wait_until(|| mem.bytes.load(std::sync::atomic::Ordering::Relaxed) > 50_000).await;
    assert_eq!(r.ctx.dos.handle_oom(&r.ctx.stats.dos, test_now()), 1);
    let c = ml.recv().await;
    assert_eq!(c.circ_id, Some(bad.id));
    assert_eq!(destroy_reason(&c), DestroyReason::RESOURCELIMIT);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::OutOfMemory), 1);
    // Its queue is gone from the account, and the other circuit answers.
    wait_until(|| mem.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0).await;
    assert_eq!(r.ctx.dos.handle_oom(&r.ctx.stats.dos, test_now()), 0);
    assert_answers(&mut ml, &mut good).await;
    drop(nl.rx);
}

/// The cells waiting in the links' send queues count towards `max_queued_bytes`: circuit queues
/// under the cap alone, plus a full link queue over it, get the oldest circuit destroyed.
#[tokio::test]
async fn oom_handler_counts_the_links_send_queues() {
    let dos = DosConfig {
        max_queued_bytes: 1_000_000,
        ..DosConfig::default()
    };
    let r = dos_relay(dos, Limits::default());
    let (mut ml, nl, bad, mut good) = stalled_beside_idle(&r, 200).await;
    let mem = Arc::clone(&r.ctx.dos.mem);
    wait_until(|| mem.bytes.load(std::sync::atomic::Ordering::Relaxed) > 50_000).await;
    assert!(mem.bytes.load(std::sync::atomic::Ordering::Relaxed) < 1_000_000);
    assert_eq!(
        r.ctx.dos.handle_oom_with(&r.ctx.stats.dos, test_now(), 0),
        0
    );
    assert_eq!(
        r.ctx
            .dos
            .handle_oom_with(&r.ctx.stats.dos, test_now(), 1_000_000),
        1
    );
    let c = ml.recv().await;
    assert_eq!(c.circ_id, Some(bad.id));
    assert_eq!(destroy_reason(&c), DestroyReason::RESOURCELIMIT);
    assert_eq!(r.ctx.stats.dos_rejections(Refusal::OutOfMemory), 1);
    assert_answers(&mut ml, &mut good).await;
    drop(nl.rx);
}

/// A TCP connection from `from` to `to`.
async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the relay closed `s` (EOF or reset) within the test timeout.
async fn closed_by_relay(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn socket_relay(dos: DosConfig) -> (crate::RelayHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::for_test("DosSock", dir.path());
    cfg.dos = dos;
    (crate::start(cfg).await.unwrap(), dir)
}

async fn honest_link_works(h: &crate::RelayHandle) {
    let ch = tokio::time::timeout(
        T,
        allium_proto::channel::connect(h.or_addr(), &h.identity(), &h.link_key(), None),
    )
    .await
    .expect("honest link timed out")
    .expect("honest link refused");
    ch.close();
}

/// The attacker's address holds at most `conn_max_concurrent` connections; further ones are
/// closed at accept, before any handshake; the honest address still gets a link.
#[tokio::test]
async fn concurrent_connections_per_address_over_sockets() {
    let dos = DosConfig {
        conn_max_concurrent: 3,
        conn_rate: 0,
        ..DosConfig::default()
    };
    let (h, _dir) = socket_relay(dos).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(attacker(), h.or_addr()).await);
    }
    let mut extra = connect_from(attacker(), h.or_addr()).await;
    assert!(closed_by_relay(&mut extra).await, "4th connection kept");
    assert_eq!(h.stats().dos_rejections(Refusal::ConnConcurrent), 1);
    assert_eq!(h.ctx.dos.connections(attacker()), 3);
    honest_link_works(&h).await;
    // A closed connection frees its count.
    drop(held.pop());
    let ctx = Arc::clone(&h.ctx);
    wait_until(|| ctx.dos.connections(attacker()) == 2).await;
    let mut again = connect_from(attacker(), h.or_addr()).await;
    let got = tokio::time::timeout(Duration::from_millis(300), async {
        use tokio::io::AsyncReadExt as _;
        let mut b = [0u8; 1];
        again.read(&mut b).await
    })
    .await;
    assert!(got.is_err(), "a connection within the limit was closed");
    h.shutdown().await;
}

/// The attacker's connection-rate bucket: a burst, then refusals; the honest address is not
/// affected.
#[tokio::test]
async fn connection_rate_per_address_over_sockets() {
    let dos = DosConfig {
        conn_max_concurrent: 0,
        conn_rate: 1,
        conn_burst: 2,
        ..DosConfig::default()
    };
    let (h, _dir) = socket_relay(dos).await;
    let _a = connect_from(attacker(), h.or_addr()).await;
    let _b = connect_from(attacker(), h.or_addr()).await;
    let mut c = connect_from(attacker(), h.or_addr()).await;
    assert!(
        closed_by_relay(&mut c).await,
        "3rd connection in a burst of 2 kept"
    );
    assert_eq!(h.stats().dos_rejections(Refusal::ConnRate), 1);
    honest_link_works(&h).await;
    h.shutdown().await;
}

/// A destination that never reads: the cells queued for it at the exit are counted in the
/// queued-bytes account (the exit sends XOFF at the stream's threshold, so they stay bounded),
/// and over `max_queued_bytes` the out-of-memory handler destroys that circuit, which frees them.
#[tokio::test]
async fn never_reading_destination_is_counted_and_reclaimed() {
    let dos = DosConfig {
        max_queued_bytes: 64 * 1024,
        ..DosConfig::default()
    };
    let r = test_relay_limits(
        ExitPolicy::accept_all(true),
        move |c| c.dos = dos,
        Limits::default(),
    );
    // A destination with a tiny receive buffer that accepts and never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let dest = sock.local_addr().unwrap();
    let l = sock.listen(8).unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(s);
    });
    // From a relay's link: an exit refuses BEGIN on a one-hop circuit from a client.
    let mut ml = attach(&r.ctx, true);
    let mut tc = create_circuit(&mut ml, &r.ctx).await;
    let begin = RelayMsg::Begin(Begin {
        target: Target::Ip("127.0.0.2".parse().unwrap()),
        port: dest.port(),
        flags: BeginFlags::default(),
    });
    let (c, _) = relay_cell(&mut tc, 0, CellCmd::RELAY, 3, &begin);
    ml.tx.send(c).await.unwrap();
    let mut got = Vec::new();
    let (sid, msg) = client_recv(&mut ml, &mut tc, 0, &mut got).await.unwrap();
    assert_eq!(sid, 3);
    assert!(matches!(msg, RelayMsg::Connected(_)), "{msg:?}");
    // Upload until the exit says XOFF, respecting the circuit window.
    let mut xoff = false;
    let mut sent = 0;
    while !xoff && sent < 20_000 {
        while tc.send_win.can_send() && sent < 20_000 {
            let data = RelayMsg::Data(allium_proto::relaymsg::Data { data: vec![7; 498] });
            let (c, tag) = relay_cell(&mut tc, 0, CellCmd::RELAY, 3, &data);
            tc.send_win.note_data_sent(&tag, test_now()).unwrap();
            ml.tx.send(c).await.unwrap();
            sent += 1;
        }
        let cell = ml.recv().await;
        let (_, sid, msg, _) = open_backward(&mut tc, cell);
        match msg {
            RelayMsg::Sendme(s) if sid == 0 => {
                tc.send_win.on_sendme(s.tag.as_ref(), test_now()).unwrap();
            }
            RelayMsg::Xoff(_) => xoff = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(xoff, "no XOFF after {sent} cells");
    let mem = Arc::clone(&r.ctx.dos.mem);
    wait_until(|| mem.bytes.load(std::sync::atomic::Ordering::Relaxed) > 64 * 1024).await;
    // Bounded: what the stream may hold before XOFF, plus one circuit window in flight.
    let held = mem.bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(held < 4 * 1024 * 1024, "{held} bytes held for one stream");
    assert_eq!(r.ctx.dos.handle_oom(&r.ctx.stats.dos, test_now()), 1);
    loop {
        let c = ml.recv().await;
        if c.cmd == CellCmd::DESTROY {
            assert_eq!(destroy_reason(&c), DestroyReason::RESOURCELIMIT);
            break;
        }
    }
    wait_until(|| mem.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0).await;
    hold.abort();
}
