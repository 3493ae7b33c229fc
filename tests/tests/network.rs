//! Whole-network tests over one shared network (3 authorities, 6 relays, a proxy) on loopback,
//! each authority and relay on its own address (`allium_tests`, module docs).
//!
//! Tests here must not damage the network; destructive tests live in `failures.rs`.

use std::sync::OnceLock;
use std::time::Duration;

use allium_client::socks::wire::Target;
use allium_tests::{
    EXIT_ONLY_NAME, GET_HELLO, Options, REFUSED_PORT, TestNet, http_exchange, httpd, socks,
    split_response,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const T: Duration = Duration::from_secs(60);

fn net() -> &'static TestNet {
    static NET: OnceLock<TestNet> = OnceLock::new();
    NET.get_or_init(|| {
        allium_tests::init_logging();
        TestNet::start(Options::default())
    })
}

#[test]
fn http_get_through_socks() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut s = socks::connect(net.socks, &host, port, None, T)
            .await
            .expect("SOCKS connect");
        let resp = http_exchange(&mut s, GET_HELLO, T)
            .await
            .expect("HTTP exchange");
        let (status, body) = split_response(&resp).expect("HTTP response");
        assert!(status.contains("200"), "status: {status}");
        assert_eq!(body, httpd::HELLO.as_bytes());
    });
}

const BIG: u64 = 20 * 1024 * 1024;

#[test]
fn download_20_mib_byte_exact() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut s = socks::connect(net.socks, &host, port, None, T)
            .await
            .expect("SOCKS connect");
        let req = format!("GET /bytes/{BIG} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = http_exchange(&mut s, req.as_bytes(), Duration::from_secs(120))
            .await
            .expect("download");
        let (status, body) = split_response(&resp).expect("HTTP response");
        assert!(status.contains("200"), "status: {status}");
        assert_eq!(body.len() as u64, BIG, "body length");
        let mut expect = vec![0u8; body.len()];
        httpd::fill_pattern(0, &mut expect);
        assert!(
            body == expect.as_slice(),
            "downloaded bytes differ from what the server sent"
        );
    });
}

#[test]
fn upload_20_mib_byte_exact() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut s = socks::connect(net.socks, &host, port, None, T)
            .await
            .expect("SOCKS connect");
        let head = format!(
            "POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write head");
        let mut h = httpd::Fnv64::default();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        let upload = async {
            while off < BIG {
                let n = (BIG - off).min(chunk.len() as u64) as usize;
                httpd::fill_pattern(off, &mut chunk[..n]);
                h.update(&chunk[..n]);
                s.write_all(&chunk[..n]).await?;
                off += n as u64;
            }
            let mut resp = Vec::new();
            s.read_to_end(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let resp = tokio::time::timeout(Duration::from_secs(120), upload)
            .await
            .expect("upload timed out")
            .expect("upload");
        let (status, body) = split_response(&resp).expect("HTTP response");
        assert!(status.contains("200"), "status: {status}");
        let body = String::from_utf8_lossy(body);
        assert_eq!(
            body.trim(),
            format!("{BIG} {:016x}", h.0),
            "server saw other bytes"
        );
    });
}

#[test]
fn fifty_concurrent_streams() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50u64 {
            let host = host.clone();
            let proxy = net.socks;
            tasks.spawn(async move {
                let len = 10_000 + i * 3_000;
                let mut s = socks::connect(proxy, &host, port, None, T)
                    .await
                    .expect("SOCKS connect");
                let req =
                    format!("GET /bytes/{len} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let resp = http_exchange(&mut s, req.as_bytes(), T)
                    .await
                    .expect("exchange");
                let (_, body) = split_response(&resp).expect("response");
                let mut expect = vec![0u8; len as usize];
                httpd::fill_pattern(0, &mut expect);
                assert!(body == expect.as_slice(), "stream {i}: wrong body");
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            r.expect("stream task");
            ok += 1;
        }
        assert_eq!(ok, 50);
    });
}

#[test]
fn exit_only_host_name_resolves_at_the_exit() {
    let net = net();
    // The name is unknown to this machine's resolver; only the exits' resolver maps it.
    let local = net
        .rt
        .block_on(tokio::net::lookup_host((EXIT_ONLY_NAME, 80)));
    assert!(
        local.map(|mut a| a.next().is_none()).unwrap_or(true),
        "the test name must not resolve locally"
    );
    net.rt.block_on(async {
        let mut s = socks::connect(net.socks, EXIT_ONLY_NAME, net.http.port(), None, T)
            .await
            .expect("CONNECT to a name only the exit knows");
        let resp = http_exchange(&mut s, GET_HELLO, T)
            .await
            .expect("HTTP exchange");
        assert!(resp.ends_with(httpd::HELLO.as_bytes()));
        let ip = socks::resolve(net.socks, EXIT_ONLY_NAME, None, T)
            .await
            .expect("Tor RESOLVE");
        assert_eq!(ip, std::net::IpAddr::from([127, 0, 0, 1]));
    });
}

/// A CONNECT to `host:port` must fail with SOCKS reply `code` (`what` names it).
fn assert_refused(host: &str, port: u16, code: u8, what: &str) {
    let net = net();
    net.rt.block_on(async {
        let err = socks::connect(net.socks, host, port, None, T)
            .await
            .expect_err("the stream must be refused");
        assert_eq!(err.reply_code(), Some(code), "expected '{what}', got {err}");
    });
}

#[test]
fn exit_policy_refusal_gives_not_allowed() {
    assert_refused("127.0.0.1", REFUSED_PORT, 0x02, "not allowed by ruleset");
}

/// With `socks_optimistic` (the default) the proxy answers CONNECT before the exit tried the
/// destination: a failure the exit reports (END) shows as a connection closed without data, not
/// as a SOCKS error code (the documented cost of saving a round trip).
fn assert_closed_without_data(host: &str, port: u16) {
    let net = net();
    net.rt.block_on(async {
        let mut s = socks::connect(net.socks, host, port, None, T)
            .await
            .expect("an optimistic CONNECT is answered at once");
        let _ = s.write_all(GET_HELLO).await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut buf))
            .await
            .expect("the connection must close");
        // A reset or an EOF, either way nothing from the destination.
        assert!(
            r.is_err() || buf.is_empty(),
            "{} bytes came back",
            buf.len()
        );
    });
}

#[test]
fn unknown_name_closes_the_optimistic_connection() {
    assert_closed_without_data("no-such-host.invalid", 80);
}

#[test]
fn closed_port_closes_the_optimistic_connection() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    assert_closed_without_data("127.0.0.1", port);
}

#[test]
fn different_credentials_get_different_circuits() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut a = socks::connect(net.socks, &host, port, Some(("alice", "1")), T)
            .await
            .expect("alice");
        let mut b = socks::connect(net.socks, &host, port, Some(("bob", "2")), T)
            .await
            .expect("bob");
        let mut a2 = socks::connect(net.socks, &host, port, Some(("alice", "1")), T)
            .await
            .expect("alice again");
        let ca = net
            .proxy
            .debug_stream_circuit(a.local_addr().expect("addr"))
            .expect("alice's circuit");
        let cb = net
            .proxy
            .debug_stream_circuit(b.local_addr().expect("addr"))
            .expect("bob's circuit");
        let ca2 = net
            .proxy
            .debug_stream_circuit(a2.local_addr().expect("addr"))
            .expect("alice's 2nd circuit");
        assert_ne!(
            ca, cb,
            "streams with different credentials shared a circuit"
        );
        assert_eq!(
            ca, ca2,
            "streams with the same credentials should share a circuit"
        );
        for s in [&mut a, &mut b, &mut a2] {
            let resp = http_exchange(s, GET_HELLO, T).await.expect("exchange");
            assert!(resp.ends_with(httpd::HELLO.as_bytes()));
        }
    });
}

#[test]
fn echo_one_mib_both_ways_at_once_byte_exact() {
    let net = net();
    net.rt.block_on(async {
        let port = allium_tests::spawn_echo().await.expect("echo server");
        let mut s = socks::connect(net.socks, "127.0.0.1", port, None, T)
            .await
            .expect("SOCKS connect");
        let payload: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&payload).await?;
            w.shutdown().await
        };
        let recv = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        };
        let (sent, got) = tokio::time::timeout(T, async { tokio::join!(send, recv) })
            .await
            .expect("the echo timed out");
        sent.expect("send");
        let got = got.expect("receive");
        assert!(
            got == payload,
            "echoed bytes differ ({} of {} bytes came back)",
            got.len(),
            payload.len()
        );
    });
}

#[test]
fn socks4a_and_socks4_carry_streams() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        for (target, user) in [
            (Target::Host(host.clone(), port), "four-a"),
            (Target::Ip(net.http), ""),
        ] {
            let req = socks::ClientRequest::socks4a(target, user);
            let (mut s, reply) = socks::request(net.socks, req, T)
                .await
                .expect("SOCKS4 request granted");
            assert_eq!(reply.code, 0);
            let resp = http_exchange(&mut s, GET_HELLO, T)
                .await
                .expect("HTTP exchange");
            assert!(resp.ends_with(httpd::HELLO.as_bytes()));
        }
    });
}

#[test]
fn guards_persist_across_proxy_restarts() {
    let net = net();
    net.rt.block_on(async {
        let data = tempfile::tempdir().expect("temp dir");
        let proxy = net.start_proxy(data.path()).await.expect("first proxy");
        let first: Vec<_> = proxy.circuits().iter().map(|c| c.path[0]).collect();
        proxy.shutdown().await;
        let state = std::fs::read_to_string(data.path().join("guards.json")).expect("guards.json");
        // A circuit's guard is the first primary guard that is not its exit: one of the first two
        // sampled guards (every relay of the test network runs).
        let sampled = allium_client::guard::GuardSet::load(data.path())
            .expect("guard state")
            .sampled();
        let first_two = &sampled[..2.min(sampled.len())];
        for g in &first {
            assert!(
                first_two.contains(g),
                "a circuit used a guard that is not primary"
            );
        }
        for _ in 0..2 {
            let proxy = net.start_proxy(data.path()).await.expect("restarted proxy");
            let again: Vec<_> = proxy.circuits().iter().map(|c| c.path[0]).collect();
            assert!(!again.is_empty(), "the restarted proxy built no circuit");
            // Every circuit still uses one of the guards the first run chose.
            for g in &again {
                assert!(first_two.contains(g), "a new guard after a restart");
            }
            proxy.shutdown().await;
        }
        assert_eq!(
            std::fs::read_to_string(data.path().join("guards.json")).expect("guards.json"),
            state,
            "the guard sample changed across restarts"
        );
    });
}

#[test]
fn data_sent_with_the_request_reaches_the_destination() {
    // Greeting, request and the HTTP request in one write (optimistic data): the proxy must
    // parse the handshake without swallowing what follows it.
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        let mut s = tokio::net::TcpStream::connect(net.socks)
            .await
            .expect("connect");
        let mut first = vec![5, 1, 0, 5, 1, 0, 3, host.len() as u8];
        first.extend_from_slice(host.as_bytes());
        first.extend_from_slice(&port.to_be_bytes());
        first.extend_from_slice(GET_HELLO);
        s.write_all(&first).await.expect("write");
        let mut head = [0u8; 12];
        tokio::time::timeout(T, s.read_exact(&mut head))
            .await
            .expect("reply in time")
            .expect("reply");
        assert_eq!(head[..4], [5, 0, 5, 0], "method choice, then success");
        let mut rest = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .expect("response in time")
            .expect("response");
        assert!(
            rest.ends_with(httpd::HELLO.as_bytes()),
            "the request sent with the handshake was lost"
        );
    });
}

/// Every authority and relay listens on its own loopback address, the relays in distinct /16s;
/// the consensus lists those addresses and keeps the /16 path rule on; and the authorities see
/// each relay's uploads, and each other's votes, come from that node's own address (relays and
/// authorities bind their outgoing connections), not from 127.0.0.1.
#[test]
fn nodes_listen_on_and_connect_from_distinct_addresses() {
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    let net = net();
    if net.layout != allium::cmd::testnet::AddressLayout::Distinct {
        eprintln!("skipped: this system routes only 127.0.0.1 to loopback");
        return;
    }
    let relay_ips: Vec<IpAddr> = net.relay_configs.iter().map(|c| c.listen.ip()).collect();
    let auth_ips: Vec<IpAddr> = net.authorities.iter().map(|a| a.dir_addr().ip()).collect();
    let subnet = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets()[..2].to_vec(),
        IpAddr::V6(v6) => v6.octets()[..4].to_vec(),
    };
    let all: BTreeSet<IpAddr> = relay_ips.iter().chain(&auth_ips).copied().collect();
    assert_eq!(
        all.len(),
        relay_ips.len() + auth_ips.len(),
        "one address per node"
    );
    assert!(!all.contains(&IpAddr::from([127, 0, 0, 1])));
    let subnets: BTreeSet<Vec<u8>> = relay_ips.iter().map(subnet).collect();
    assert_eq!(subnets.len(), relay_ips.len(), "one /16 per relay");

    let infos: Vec<_> = net.authorities.iter().map(|a| a.info()).collect();
    let nd = net
        .rt
        .block_on(allium_directory::fetch_consensus(
            &infos,
            allium_directory::now_unix(),
        ))
        .map(allium_directory::NetDir::new)
        .expect("consensus");
    assert_eq!(nd.param("enforce_distinct_subnets", 0), 1);
    let relays = net.relays.lock().expect("relays");
    for r in relays.iter().flatten() {
        let at = r.advertised_addr();
        assert!(relay_ips.contains(&at.ip()));
        let listed = nd.by_id(&r.identity()).expect("listed");
        assert_eq!(listed.addrs.first(), Some(&at), "listed at its own address");
    }
    drop(relays);

    for (i, a) in net.authorities.iter().enumerate() {
        for (c, ip) in net.relay_configs.iter().zip(&relay_ips) {
            assert!(
                a.connections_from(*ip) >= 1,
                "authority {i} saw no upload from {}'s address {ip}",
                c.nickname
            );
        }
        for (j, ip) in auth_ips.iter().enumerate() {
            if i != j {
                assert!(
                    a.connections_from(*ip) >= 1,
                    "authority {i} saw nothing from authority {j}'s address {ip}"
                );
            }
        }
    }
}
