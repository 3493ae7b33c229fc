//! The per-source limits: the table alone, the circuit-request queues, and the accept loop of
//! the client ports on loopback (a second source address is 127.0.0.2).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::*;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn per(connections: usize, handshakes: usize, circuit_requests: usize) -> PerSource {
    PerSource {
        connections,
        handshakes,
        circuit_requests,
        dns_queries: 16,
    }
}

#[test]
fn the_table_counts_each_source_apart_and_forgets_idle_ones() {
    let mut t = SourceTable::default();
    for _ in 0..3 {
        assert!(t.try_take(A, Resource::Connection, 3));
    }
    assert!(
        !t.try_take(A, Resource::Connection, 3),
        "a fourth connection of A"
    );
    assert!(t.try_take(B, Resource::Connection, 3), "B is not A");
    assert!(
        t.try_take(A, Resource::Handshake, 1),
        "another resource has its own count"
    );
    assert!(!t.try_take(A, Resource::Handshake, 1));
    assert_eq!(t.held(A, Resource::Connection), 3);
    assert_eq!(t.total(Resource::Connection), 4);
    assert_eq!(t.sources(), 2);
    t.give_back(A, Resource::Connection);
    assert!(
        t.try_take(A, Resource::Connection, 3),
        "a slot given back is free again"
    );
    // A source refused while it holds nothing leaves no entry behind.
    let c = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    assert!(!t.try_take(c, Resource::Connection, 0));
    assert_eq!(t.sources(), 2);
    t.give_back(B, Resource::Connection);
    assert_eq!(t.sources(), 1);
    for _ in 0..3 {
        t.give_back(A, Resource::Connection);
    }
    t.give_back(A, Resource::Handshake);
    t.give_back(A, Resource::Handshake); // more than held: no underflow
    assert_eq!(t.sources(), 0);
}

#[tokio::test]
async fn slots_are_given_back_when_dropped_and_hits_counted() {
    let l = Arc::new(LocalLimits::default());
    let p = per(2, 1, 1);
    let wait = Duration::from_secs(5);
    let a1 = Admitted::admit(&l, A, &p).expect("first connection");
    let mut a1 = a1
        .wait_handshake(&p, wait)
        .await
        .expect("its handshake turn");
    let a2 = Admitted::admit(&l, A, &p).expect("second connection");
    let second = ready_now(a2.wait_handshake(&p, wait)).await;
    assert!(second.is_none(), "A's second handshake waits (limit 1)");
    assert_eq!(l.hits(Resource::Handshake), 1);
    assert_eq!(l.held(A, Resource::Handshake), 1);
    a1.handshake_done();
    let a2 = Admitted::admit(&l, A, &p).expect("the second was dropped while it waited");
    let a2 = ready_now(a2.wait_handshake(&p, wait))
        .await
        .flatten()
        .expect("the first one's handshake is done");
    assert!(
        Admitted::admit(&l, A, &p).is_none(),
        "a third connection of A (limit 2)"
    );
    assert_eq!(l.hits(Resource::Connection), 1);
    assert!(
        Admitted::admit(&l, B, &p).is_some(),
        "B is not held back by A"
    );
    drop(a1);
    drop(a2);
    assert_eq!(l.held(A, Resource::Connection), 0);
    assert_eq!(l.held(A, Resource::Handshake), 0);
    let page = {
        let mut e = Exposition::new();
        l.render(&mut e);
        e.finish()
    };
    assert!(page.contains("allium_proxy_local_limit_hits_total{limit=\"connections\"} 1"));
    assert!(page.contains("allium_proxy_local_limit_hits_total{limit=\"handshakes\"} 1"));
    assert!(page.contains("allium_proxy_local_sources 0"));
}

/// Whether `fut` is ready after the runtime ran everything else it could.
async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    tokio::pin!(fut);
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    tokio::select! {
        biased;
        v = &mut fut => Some(v),
        () = std::future::ready(()) => None,
    }
}

#[tokio::test]
async fn circuit_requests_take_turns_per_source() {
    let l = Arc::new(LocalLimits::default());
    let p = per(100, 100, 2);
    let t1 = l.circuit_request(A, &p).await;
    let t2 = l.circuit_request(A, &p).await;
    // A third request of A waits for one of A's turns; B's does not.
    let l2 = Arc::clone(&l);
    let third = tokio::spawn(async move { l2.circuit_request(A, &p).await });
    assert!(
        ready_now(l.circuit_request(B, &p)).await.is_some(),
        "B waits for A"
    );
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert!(!third.is_finished(), "A took more than 2 turns at once");
    assert_eq!(l.hits(Resource::CircuitRequest), 1);
    drop(t1);
    let t3 = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third request goes once a turn is given back")
        .expect("no panic");
    assert_eq!(l.held(A, Resource::CircuitRequest), 2);
    drop((t2, t3));
    assert_eq!(l.held(A, Resource::CircuitRequest), 0);
    assert!(
        l.gates.lock().map(|g| g.is_empty()).unwrap_or(false),
        "the queue of a source with no request left is forgotten"
    );
}

/// Connect to `to` from `from` (a loopback address).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the proxy closed `s` (EOF or reset; bounded wait).
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Wait (bounded) until `ip` holds `n` of `r` on the served side.
async fn wait_held(l: &LocalLimits, ip: IpAddr, r: Resource, n: usize) -> bool {
    let reached = async {
        while l.held(ip, r) != n {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reached)
        .await
        .is_ok()
}

/// A client port whose connections stay in their handshake (the served task never reads) or,
/// with `done`, finish it at once; with per-source limits `p` and `global` slots in all.
async fn port(
    p: PerSource,
    global: usize,
    done: bool,
    wait: Duration,
) -> (SocketAddr, Arc<LocalLimits>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let local = Arc::new(LocalLimits::default());
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let l = Arc::clone(&local);
    tokio::spawn(async move {
        let _tx = _tx;
        crate::socks::server::accept_loop(
            listener,
            global,
            "test",
            rx,
            l,
            move || (p, wait),
            move |sock, mut adm: Admitted| async move {
                if done {
                    adm.handshake_done();
                }
                // Hold the connection (and its slots) until the client goes.
                let mut sock = sock;
                let mut b = [0u8; 16];
                while matches!(sock.read(&mut b).await, Ok(n) if n > 0) {}
                drop(adm);
            },
        )
        .await;
    });
    (addr, local)
}

/// One program opening many connections: beyond its limit they are closed at once, and a
/// second program (another source address) is still served.
#[tokio::test]
async fn one_source_cannot_take_every_connection() {
    let (addr, local) = port(per(4, 100, 8), 6, true, Duration::from_secs(5)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(A, addr).await);
    }
    assert!(
        wait_held(&local, A, Resource::Connection, 4).await,
        "A's first 4 are served"
    );
    let mut fifth = connect_from(A, addr).await;
    assert!(
        closed_by_server(&mut fifth).await,
        "A's fifth connection is closed"
    );
    assert_eq!(local.hits(Resource::Connection), 1);
    let _other = connect_from(B, addr).await;
    assert!(
        wait_held(&local, B, Resource::Connection, 1).await,
        "B is served while A is at its limit"
    );
    assert_eq!(local.held(A, Resource::Connection), 4);
}

/// Connections that never send their request: beyond the handshake limit they wait their turn
/// (and are closed when it does not come within the handshake timeout, 200 ms here), while
/// another source's handshake is read at once.
#[tokio::test]
async fn one_source_cannot_hold_every_handshake() {
    let (addr, local) = port(per(100, 3, 8), 100, false, Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(A, addr).await);
    }
    assert!(wait_held(&local, A, Resource::Handshake, 3).await);
    let mut fourth = connect_from(A, addr).await;
    assert!(
        closed_by_server(&mut fourth).await,
        "A's fourth handshake got no turn and was closed"
    );
    assert_eq!(local.hits(Resource::Handshake), 1);
    assert_eq!(local.held(A, Resource::Handshake), 3);
    let _other = connect_from(B, addr).await;
    assert!(
        wait_held(&local, B, Resource::Handshake, 1).await,
        "B's handshake is let in"
    );
}

/// The UDP DNS port's queries in flight: beyond the source's limit a query is refused (the
/// driver answers REFUSED), counted and logged once; another source is not affected.
#[test]
fn dns_queries_are_bounded_per_source() {
    let l = Arc::new(LocalLimits::default());
    let p = PerSource {
        dns_queries: 16,
        ..per(1, 1, 1)
    };
    let held: Vec<Slot> = (0..16)
        .map(|_| l.take(A, Resource::DnsQuery, &p).expect("within the limit"))
        .collect();
    assert!(
        l.take(A, Resource::DnsQuery, &p).is_none(),
        "A's 17th query"
    );
    assert_eq!(l.hits(Resource::DnsQuery), 1);
    assert!(l.take(B, Resource::DnsQuery, &p).is_some(), "B is not A");
    drop(held);
    assert_eq!(l.held(A, Resource::DnsQuery), 0);
    assert!(l.take(A, Resource::DnsQuery, &p).is_some());
}
