//! The authority's limits, each checked over real sockets on 127.x addresses: a flood source
//! (127.0.0.77) is refused while other sources and the authorities go on. Each test fails if
//! its limit is removed.

// Authorities on loopback sockets: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_directory::authority::limits::Limit;
use allium_directory::authority::{
    self, AuthorityConfig, AuthorityHandle, FakeReachability, StartOptions,
};
use allium_directory::doc::{Signed, Vote};
use allium_directory::{AuthorityInfo, now_unix, paths};
use common::{Net, Relay};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const FLOOD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 5, 5));

struct One {
    _dir: tempfile::TempDir,
    h: AuthorityHandle,
    reach: Arc<FakeReachability>,
}

/// One authority on 127.0.0.1 with the test-network settings, changed by `f`.
async fn one(f: impl FnOnce(&mut AuthorityConfig)) -> One {
    let reach = Arc::new(FakeReachability::all_up());
    one_with(f, reach.clone(), reach).await
}

/// The same with a chosen prober.
async fn one_with(
    f: impl FnOnce(&mut AuthorityConfig),
    prober: Arc<dyn authority::Reachability>,
    reach: Arc<FakeReachability>,
) -> One {
    let d = tempfile::tempdir().expect("tmp");
    let (_id, keys) = authority::keys::generate_for_test(d.path(), now_unix()).expect("keys");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let infos = vec![AuthorityInfo {
        identity: keys.identity(),
        dir_addr: addr,
    }];
    let mut cfg = common::config(d.path(), addr, &infos);
    f(&mut cfg);
    let h = authority::start_with(
        cfg,
        StartOptions {
            listener: Some(l),
            reachability: prober,
            schedule: false,
        },
    )
    .await
    .expect("start");
    One { _dir: d, h, reach }
}

/// A TCP connection from `from` (port chosen by the kernel).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(from, 0)).expect("bind source");
    s.connect(to).await.expect("connect")
}

/// One HTTP/1.1 request from `from`; returns the status code and the body text.
async fn request_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = connect_from(from, to).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn relay_at(ip: [u8; 4], port: u16) -> Relay {
    let mut r = Relay::new(port);
    r.addr = SocketAddr::from((ip, port));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_uploads_rate_limited_per_source_address_and_prefix() {
    let a = one(|c| {
        c.limits.upload_burst = 3;
        c.limits.upload_per_min = 1;
        c.limits.prefix_upload_burst = 5;
        c.limits.prefix_upload_per_min = 1;
    })
    .await;
    let to = a.h.dir_addr();
    let now = now_unix();
    let mut statuses = Vec::new();
    for i in 0..10u16 {
        let r = relay_at([127, 10, 0, 1], 9000 + i);
        let (st, body) =
            request_from(FLOOD, to, "POST", paths::DESCRIPTOR, &r.signed(now, false)).await;
        if st == 429 {
            assert!(body.contains("too many uploads"), "{body}");
        }
        statuses.push(st);
    }
    assert_eq!(
        statuses,
        [vec![200; 3], vec![429; 7]].concat(),
        "burst of 3 from one address"
    );
    assert_eq!(a.h.limit_count(Limit::UploadRateAddr), 7);
    // A neighbour in the same /24 has its own address bucket but shares the prefix's 5.
    let neighbour = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 78));
    let mut ok = 0;
    for i in 0..4u16 {
        let r = relay_at([127, 11, 0, 1], 9100 + i);
        let (st, _) = request_from(
            neighbour,
            to,
            "POST",
            paths::DESCRIPTOR,
            &r.signed(now, false),
        )
        .await;
        ok += usize::from(st == 200);
    }
    assert_eq!(ok, 2, "the /24 had 2 of its 5 tokens left");
    assert!(a.h.limit_count(Limit::UploadRatePrefix) >= 2);
    // Another network is not affected.
    let r = relay_at([127, 12, 0, 1], 9200);
    let (st, _) = request_from(OTHER, to, "POST", paths::DESCRIPTOR, &r.signed(now, false)).await;
    assert_eq!(st, 200);
    // The authorities' own address is exempt.
    for i in 0..10u16 {
        let r = relay_at([127, 13, 0, 1], 9300 + i);
        allium_directory::upload_descriptor(to, &r.signed(now, false))
            .await
            .expect("from the authority address");
    }
    assert_eq!(a.h.descriptor_count(), 3 + 2 + 1 + 10);
    a.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_capped_per_descriptor_address_and_prefix() {
    let a = one(|c| {
        c.limits.max_relays_per_addr = Some(2);
        c.limits.max_relays_per_prefix = Some(3);
    })
    .await;
    let to = a.h.dir_addr();
    let now = now_unix();
    let up = |r: &Relay| {
        let b = r.signed(now, false);
        async move { allium_directory::upload_descriptor(to, &b).await }
    };
    up(&relay_at([127, 9, 0, 1], 1)).await.expect("1st at .1");
    let second = relay_at([127, 9, 0, 1], 2);
    up(&second).await.expect("2nd at .1");
    let err = up(&relay_at([127, 9, 0, 1], 3))
        .await
        .expect_err("3rd at .1");
    assert!(err.to_string().contains("429"), "{err}");
    // A relay already held may update its descriptor.
    allium_directory::upload_descriptor(to, &second.signed(now + 1, false))
        .await
        .expect("update of a held relay");
    up(&relay_at([127, 9, 0, 2], 1))
        .await
        .expect("3rd in the /24");
    let err = up(&relay_at([127, 9, 0, 3], 1))
        .await
        .expect_err("4th in the /24");
    assert!(err.to_string().contains("429"), "{err}");
    up(&relay_at([127, 9, 1, 1], 1)).await.expect("another /24");
    assert_eq!(a.h.limit_count(Limit::RelaysPerAddr), 1);
    assert_eq!(a.h.limit_count(Limit::RelaysPerPrefix), 1);
    assert_eq!(a.h.descriptor_count(), 4);
    a.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_table_evicts_unreachable_newcomers_never_reachable_relays() {
    let a = one(|c| c.max_relays = 3).await;
    let to = a.h.dir_addr();
    let now = now_unix();
    let honest: Vec<Relay> = (0..2).map(|i| relay_at([127, 20, i, 1], 9000)).collect();
    for r in &honest {
        allium_directory::upload_descriptor(to, &r.signed(now, false))
            .await
            .expect("honest");
    }
    // A vote phase probes both: reachable.
    a.h.vote_phase(Net::current_va()).await.expect("vote");
    let junk: Vec<Relay> = (0..5).map(|i| relay_at([127, 77, i, 1], 9000)).collect();
    for r in &junk {
        a.reach.set_down(r.id.public(), true);
    }
    for r in &junk {
        allium_directory::upload_descriptor(to, &r.signed(now, false))
            .await
            .expect("junk takes the place of older junk");
    }
    assert_eq!(a.h.descriptor_count(), 3);
    assert_eq!(a.h.limit_count(Limit::Evicted), 4);
    // The honest relays are still held.
    let b = allium_directory::client::http::request(
        to,
        "GET",
        paths::DESCRIPTORS,
        None,
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .expect("get")
    .body;
    let list: Vec<Vec<u8>> = postcard::from_bytes(&b).expect("list");
    for r in &honest {
        assert!(list.contains(&r.signed(now, false)), "honest relay evicted");
    }
    // Once everything held is reachable, a newcomer is refused instead.
    for r in &junk {
        a.reach.set_down(r.id.public(), false);
    }
    a.h.vote_phase(Net::current_va() + common::INTERVAL)
        .await
        .expect("vote");
    let err =
        allium_directory::upload_descriptor(to, &relay_at([127, 30, 0, 1], 1).signed(now, false))
            .await
            .expect_err("table full of reachable relays");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(a.h.limit_count(Limit::TableFull), 1);
    a.h.shutdown().await;
}

/// Open `n` connections from `from` that send half a request head and then nothing.
async fn half_open(from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        let mut s = connect_from(from, to).await;
        let _ = s
            .write_all(b"GET /allium/v1/consensus HTTP/1.1\r\nHost")
            .await;
        v.push(s);
    }
    v
}

/// Whether the server closed `s` (or answered it) within `within`; returns what it sent.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_capped_per_address_and_prefix_with_authority_slots_kept() {
    let a = one(|c| {
        c.max_connections = 12;
        c.limits.reserved_authority_connections = 4;
        c.limits.max_connections_per_addr = 3;
        c.limits.max_connections_per_prefix = 5;
    })
    .await;
    let to = a.h.dir_addr();
    let _held = half_open(FLOOD, to, 3).await;
    // The 4th from the flood address is answered 503 and closed at once.
    let mut s = connect_from(FLOOD, to).await;
    let got = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("refused at once");
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    // Its /24 has 2 more slots; then the prefix is full.
    let _more = half_open(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 78)), to, 2).await;
    let mut s = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 79)), to).await;
    let got = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("prefix full");
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    // Other networks still get in: fill the general pool (8 slots) to the last one.
    let _others = half_open(IpAddr::V4(Ipv4Addr::new(127, 0, 6, 1)), to, 2).await;
    let (st, _) = request_from(OTHER, to, "GET", paths::CERT, b"").await;
    assert_eq!(st, 200, "a client from another network is served");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _last = half_open(IpAddr::V4(Ipv4Addr::new(127, 0, 7, 1)), to, 1).await;
    let mut s = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 8, 1)), to).await;
    let got = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("general pool full");
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    // The authorities' address still has its reserved slots.
    let (st, _) = request_from(IpAddr::V4(Ipv4Addr::LOCALHOST), to, "GET", paths::CERT, b"").await;
    assert_eq!(st, 200, "an authority is served while the pool is full");
    assert!(a.h.limit_count(Limit::ConnPerAddr) >= 1);
    assert!(a.h.limit_count(Limit::ConnPerPrefix) >= 1);
    assert!(a.h.limit_count(Limit::ConnTotal) >= 1);
    a.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off() {
    let a = one(|c| {
        c.limits.header_timeout_secs = 1;
        c.limits.idle_timeout_secs = 60;
    })
    .await;
    let to = a.h.dir_addr();
    // Slowloris: a byte of the head every 300 ms, never finishing it (so never idle).
    let mut s = connect_from(FLOOD, to).await;
    let start = Instant::now();
    let mut closed = false;
    for b in
        b"GET /allium/v1/consensus HTTP/1.1\r\nHost: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
    {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        // hyper may answer 408 before closing; EOF follows.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slow head was not cut off");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "cut off after {took:?}");
    a.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let a = one(|c| {
        c.limits.header_timeout_secs = 60;
        c.limits.idle_timeout_secs = 1;
    })
    .await;
    let to = a.h.dir_addr();
    // Not a byte sent.
    let mut s = connect_from(FLOOD, to).await;
    let start = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some(),
        "idle connection kept open"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Keep-alive after an answered request: silence closes it too.
    let mut s = connect_from(OTHER, to).await;
    s.write_all(b"GET /allium/v1/cert HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("req");
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("closed after the keep-alive went idle");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    a.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_refused() {
    let a = one(|_| {}).await;
    let to = a.h.dir_addr();
    let mut s = connect_from(FLOOD, to).await;
    let mut head = b"GET /allium/v1/cert HTTP/1.1\r\nHost: x\r\n".to_vec();
    // Three 8 KiB headers: few headers (hyper's count limit is 100), a long head (24 KiB).
    for i in 0..3 {
        head.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(8192)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let _ = s.write_all(&head).await;
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(!got.starts_with("HTTP/1.1 200"), "{got}");
    a.h.shutdown().await;
}

/// A vote by authority `i` of `net` for `valid_after`, signed with its real signing key.
fn vote_by(net: &Net, i: usize, valid_after: u64, published: u64) -> Vec<u8> {
    let keys = authority::keys::load(net.dirs[i].path()).expect("keys");
    let v = Vote {
        version: 1,
        authority: keys.identity(),
        valid_after,
        fresh_until: valid_after + common::INTERVAL,
        valid_until: valid_after + 3 * common::INTERVAL,
        published,
        params: Default::default(),
        shared_rand: None,
        relays: vec![],
    };
    Signed::sign(&v, &keys.signing).expect("sign").to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_only_for_the_current_or_next_period() {
    let net = Net::start(3).await;
    let rs: Vec<Relay> = (0..3).map(|i| Relay::new(9600 + i)).collect();
    for r in &rs {
        allium_directory::client::upload_descriptor_to_all(
            &net.infos,
            &r.signed(now_unix(), false),
        )
        .await;
    }
    let va = Net::current_va();
    let to = net.infos[0].dir_addr;
    let post = |b: Vec<u8>| async move {
        allium_directory::client::http::request(
            to,
            "POST",
            paths::VOTE,
            Some(&b),
            4096,
            Duration::from_secs(10),
        )
        .await
        .expect("post")
    };
    // A round for the current period (the authorities learn each other's certificates).
    allium_directory::authority::run_round(&net.live(), va)
        .await
        .expect("round");
    let before = net.live()[0].current_consensus().expect("published");
    assert_eq!(before.sigs().len(), 3);
    // Authority 2 (its key stolen) floods votes for future periods, then for a past one.
    let now = now_unix();
    for k in 3..7 {
        let r = post(vote_by(&net, 2, va + k * common::INTERVAL, now)).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = post(vote_by(&net, 2, va - 2 * common::INTERVAL, now)).await;
    assert_eq!(r.status, 400);
    assert_eq!(net.live()[0].limit_count(Limit::VoteWrongPeriod), 5);
    // The next period is fine.
    let r = post(vote_by(&net, 2, va + common::INTERVAL, now)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The current period's votes are all still held: computing again gives the same body.
    net.live()[0].compute_phase(va).await.expect("recompute");
    net.live()[0].publish_phase(va).await.expect("republish");
    let after = net.live()[0].current_consensus().expect("published");
    assert_eq!(after.body(), before.body());
    // One vote per authority per period: a second, different one is refused.
    let r = post(vote_by(&net, 2, va + common::INTERVAL, now + 1)).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(net.live()[0].limit_count(Limit::VoteConflict) >= 1);
}

/// A prober for which some addresses drop every packet: their probes never finish by
/// themselves.
struct Blackholes {
    prefix: [u8; 2],
    up: Arc<FakeReachability>,
}

impl authority::Reachability for Blackholes {
    fn probe(
        &self,
        addr: SocketAddr,
        id: allium_crypto::RelayId,
        link_key: allium_crypto::X25519Public,
    ) -> authority::reach::ProbeFuture {
        match addr.ip() {
            IpAddr::V4(a) if a.octets()[..2] == self.prefix => Box::pin(std::future::pending()),
            _ => self.up.probe(addr, id, link_key),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_dropping_addresses_cost_bounded_time() {
    let up = Arc::new(FakeReachability::all_up());
    let a = one_with(
        |c| c.limits.probe_timeout_ms = 300,
        Arc::new(Blackholes {
            prefix: [127, 77],
            up: up.clone(),
        }),
        up,
    )
    .await;
    let to = a.h.dir_addr();
    let now = now_unix();
    // 100 junk relays at addresses that drop packets (4 per address), 3 honest relays.
    for i in 0..100u16 {
        let r = relay_at([127, 77, (i / 4) as u8, 1], 9000 + i);
        allium_directory::upload_descriptor(to, &r.signed(now, false))
            .await
            .expect("junk");
    }
    let honest: Vec<Relay> = (0..3)
        .map(|i| relay_at([127, 0, 20 + i, 1], 9000))
        .collect();
    for r in &honest {
        allium_directory::upload_descriptor(to, &r.signed(now, true))
            .await
            .expect("honest");
    }
    // 103 probes, 32 at a time, the 100 hanging ones cut off after 0.3 s: about 1.2 s. Without
    // the per-probe bound the pass would run until its budget (7.5 s) and reach nothing else.
    let va = Net::current_va();
    let start = Instant::now();
    a.h.vote_phase(va).await.expect("vote");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "vote phase took {took:?}");
    assert!(a.h.limit_count(Limit::ProbeTimeout) >= 100);
    a.h.compute_phase(va).await.expect("compute");
    assert!(a.h.publish_phase(va).await.expect("publish"));
    let c = a.h.current_consensus().expect("published");
    let body = c.dangerously_decode_unverified().expect("decode");
    assert_eq!(body.relays.len(), 3, "only the honest relays are listed");
    for r in &honest {
        assert!(body.relays.iter().any(|e| e.identity == r.id.public()));
    }
    a.h.shutdown().await;
}
