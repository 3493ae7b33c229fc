//! A small whole network on loopback (3 authorities, 5 relays, the proxy): the client
//! bootstraps, builds 3-hop circuits and carries SOCKS streams. The full suite lives in
//! `tests/`; this one guards the client crate's own behaviour.
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_client::ProxyConfig;
use allium_directory::authority::{self, AuthorityConfig, FakeReachability, StartOptions};
use allium_directory::{AuthorityInfo, now_unix};
use allium_relay::{ExitPolicy, RelayConfig, RelayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INTERVAL: u64 = 60;

struct Net {
    _dirs: Vec<tempfile::TempDir>,
    infos: Vec<AuthorityInfo>,
    auths: Vec<authority::AuthorityHandle>,
    relays: Vec<RelayHandle>,
}

async fn start_net(n_relays: usize, n_exits: usize) -> Net {
    let now = now_unix();
    let mut dirs = Vec::new();
    let mut listeners = Vec::new();
    let mut infos = Vec::new();
    for _ in 0..3 {
        let d = tempfile::tempdir().unwrap();
        let (_id, keys) = authority::keys::generate_for_test(d.path(), now).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        infos.push(AuthorityInfo {
            identity: keys.identity(),
            dir_addr: l.local_addr().unwrap(),
        });
        dirs.push(d);
        listeners.push(l);
    }
    let reach = Arc::new(FakeReachability::all_up());
    let mut auths = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let addr = l.local_addr().unwrap();
        let cfg = AuthorityConfig::new(dirs[i].path().to_path_buf(), addr, infos.clone())
            .for_test_network(INTERVAL);
        let h = authority::start_with(
            cfg,
            StartOptions {
                listener: Some(l),
                reachability: reach.clone(),
                schedule: false,
            },
        )
        .await
        .unwrap();
        auths.push(h);
    }
    let mut relays = Vec::new();
    for i in 0..n_relays {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = RelayConfig::for_test(&format!("relay{i}"), d.path());
        cfg.authorities = infos
            .iter()
            .map(|a| allium_relay::AuthorityConfig {
                identity: a.identity,
                dir_addr: a.dir_addr,
            })
            .collect();
        if i < n_exits {
            // Every port but the top of the range, so a test can ask for a refused port.
            cfg.exit_policy = ExitPolicy {
                accept: vec!["1-61000".into()],
                allow_private: true,
            };
        }
        relays.push(allium_relay::start(cfg).await.unwrap());
        dirs.push(d);
    }
    // Every authority has every descriptor, then one voting round.
    for _ in 0..200 {
        if auths.iter().all(|a| a.descriptor_count() >= n_relays) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let va = authority::next_valid_after(now_unix(), INTERVAL) - INTERVAL;
    let refs: Vec<&authority::AuthorityHandle> = auths.iter().collect();
    authority::run_round(&refs, va).await.unwrap();
    for r in &relays {
        r.refetch_consensus();
    }
    for _ in 0..200 {
        if relays.iter().all(RelayHandle::has_consensus) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Net {
        _dirs: dirs,
        infos,
        auths,
        relays,
    }
}

/// A proxy on `net` that has built its first circuits.
async fn start_ready_proxy(net: &Net, data: &std::path::Path) -> allium_client::ProxyHandle {
    let proxy = allium_client::start(proxy_config(net, data)).await.unwrap();
    proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    proxy
}

fn proxy_config(net: &Net, data: &std::path::Path) -> ProxyConfig {
    ProxyConfig {
        socks_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.to_path_buf(),
        authorities: net.infos.clone(),
        test_network: true,
        ..ProxyConfig::default()
    }
}

/// An echo server; returns its port.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// SOCKS5 CONNECT (optionally with username/password); returns the stream and the reply code.
async fn socks_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    match auth {
        None => s.write_all(&[5, 1, 0]).await.unwrap(),
        Some(_) => s.write_all(&[5, 1, 2]).await.unwrap(),
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    if let Some((u, p)) = auth {
        assert_eq!(m, [5, 2]);
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(p.len() as u8);
        a.extend_from_slice(p.as_bytes());
        s.write_all(&a).await.unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(r, [1, 0]);
    } else {
        assert_eq!(m, [5, 0]);
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    (s, rep[1])
}

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALLIUM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A server that sends bytes until the connection breaks; returns its port.
async fn firehose_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_middle_fails_the_stream_promptly() {
    init_log();
    let mut net = start_net(6, 2).await;
    let data = tempfile::tempdir().unwrap();
    let proxy = start_ready_proxy(&net, data.path()).await;
    let socks = proxy.socks_addr();
    let port = firehose_server().await;

    let (mut s, code) = socks_connect(socks, "localhost", port, None).await;
    assert_eq!(code, 0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    while got < 1 << 20 {
        got += s.read(&mut buf).await.unwrap();
    }
    let circ = proxy
        .circuits()
        .into_iter()
        .find(|c| c.streams > 0)
        .expect("the circuit carrying the stream");
    let middle = circ.path[1];
    let idx = net
        .relays
        .iter()
        .position(|r| r.identity() == middle)
        .unwrap();
    net.relays.remove(idx).shutdown().await;

    // The stream ends promptly (reset or EOF), well before the firehose would stop.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream hung after its middle relay died");

    // The next stream works, on a circuit without the dead relay.
    let echo = echo_server().await;
    let (mut s, code) = socks_connect(socks, "localhost", echo, None).await;
    assert_eq!(code, 0);
    s.write_all(b"again").await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"again");
    let c = proxy
        .circuits()
        .into_iter()
        .find(|c| c.streams > 0)
        .unwrap();
    assert!(!c.path.contains(&middle));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_persist_across_restarts() {
    init_log();
    let net = start_net(6, 2).await;
    let data = tempfile::tempdir().unwrap();
    let proxy = start_ready_proxy(&net, data.path()).await;
    let first: Vec<_> = proxy.circuits().iter().map(|c| c.path[0]).collect();
    proxy.shutdown().await;
    let state = std::fs::read_to_string(data.path().join("guards.json")).unwrap();
    assert!(
        state.contains(&first[0].to_hex()),
        "guard not in the state file"
    );

    for _ in 0..2 {
        let proxy = start_ready_proxy(&net, data.path()).await;
        let again: Vec<_> = proxy.circuits().iter().map(|c| c.path[0]).collect();
        // Every circuit uses a primary guard sampled by the first run (the first one unless
        // it was the exit).
        for g in &again {
            assert!(state.contains(&g.to_hex()), "a new guard after a restart");
        }
        assert!(again.contains(&first[0]) || first.iter().any(|g| again.contains(g)));
        proxy.shutdown().await;
    }
    assert_eq!(
        std::fs::read_to_string(data.path().join("guards.json")).unwrap(),
        state,
        "the guard sample changed across restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_three_hop_circuits() {
    init_log();
    let net = start_net(5, 2).await;
    let data = tempfile::tempdir().unwrap();
    let proxy = start_ready_proxy(&net, data.path()).await;
    let socks = proxy.socks_addr();
    let port = echo_server().await;

    // One stream, 1 MiB each way, byte-exact.
    let (mut s, code) = socks_connect(socks, "localhost", port, None).await;
    assert_eq!(code, 0);
    let payload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .unwrap();
    assert!(
        got == payload,
        "echoed bytes differ ({} of {})",
        got.len(),
        payload.len()
    );

    // Concurrent streams share circuits.
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        tasks.push(tokio::spawn(async move {
            let (mut s, code) = socks_connect(socks, "localhost", port, None).await;
            assert_eq!(code, 0);
            let msg = format!("hello {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg.as_bytes());
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
    }

    // Isolation: other credentials, a working stream on another circuit.
    let before = proxy.n_circuits();
    let (mut s, code) = socks_connect(socks, "localhost", port, Some(("alice", "pw"))).await;
    assert_eq!(code, 0);
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert!(proxy.n_circuits() >= before);

    // Refused by the destination: connection refused (0x05) or the exit's reason mapped.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let (_s, code) = socks_connect(socks, "localhost", closed_port, None).await;
    assert_eq!(code, 0x05);

    // A name nobody resolves: host unreachable.
    let (_s, code) = socks_connect(socks, "no-such-host.invalid", port, None).await;
    assert_eq!(code, 0x04);

    // No exit allows the port: not allowed by ruleset.
    let (_s, code) = socks_connect(socks, "localhost", 65000, None).await;
    assert_eq!(code, 0x02);

    // Tor's RESOLVE extension, answered by the exit.
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let mut req = vec![5, 0xF0, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&[0, 0]);
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[..4], [5, 0, 0, 1]);
    assert_eq!(rep[4..8], [127, 0, 0, 1]);

    // SOCKS4a.
    let mut s = TcpStream::connect(socks).await.unwrap();
    let mut req = vec![4, 1];
    req.extend_from_slice(&port.to_be_bytes());
    req.extend_from_slice(&[0, 0, 0, 1]);
    req.extend_from_slice(b"user\0localhost\0");
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 8];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[1], 0x5A);
    s.write_all(b"four").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"four");

    // Different credentials never share a circuit.
    let keyed: Vec<_> = proxy
        .circuits()
        .into_iter()
        .filter(|c| c.streams > 0)
        .collect();
    assert!(keyed.len() >= 2, "{keyed:?}");

    proxy.shutdown().await;
    for r in net.relays {
        r.shutdown().await;
    }
    for a in net.auths {
        a.shutdown().await;
    }
}

/// Rough figures (run by hand: `cargo test --release -p allium-client --test network -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark, run by hand"]
async fn bulk_throughput() {
    init_log();
    let net = start_net(5, 2).await;
    let data = tempfile::tempdir().unwrap();
    let proxy = allium_client::start(proxy_config(&net, data.path()))
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    println!("bootstrap to ready: {:?}", t0.elapsed());
    let socks = proxy.socks_addr();
    let port = firehose_server().await;
    let echo = echo_server().await;

    // Time to first byte on a ready circuit.
    let t = std::time::Instant::now();
    let (mut s, code) = socks_connect(socks, "localhost", echo, None).await;
    assert_eq!(code, 0);
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    println!("connect + first echoed byte: {:?}", t.elapsed());

    // Download.
    let (mut s, code) = socks_connect(socks, "localhost", port, None).await;
    assert_eq!(code, 0);
    let total = 200usize << 20;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    let t = std::time::Instant::now();
    while got < total {
        got += s.read(&mut buf).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "download: {:.1} MiB/s",
        got as f64 / secs / (1 << 20) as f64
    );
    drop(s);

    // Upload (to a sink that discards).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = l.local_addr().unwrap().port();
    let done = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    });
    let (mut s, code) = socks_connect(socks, "localhost", sink_port, None).await;
    assert_eq!(code, 0);
    let chunk = vec![0xa5u8; 256 * 1024];
    let t = std::time::Instant::now();
    for _ in 0..(total / chunk.len()) {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let n = done.await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "upload: {:.1} MiB/s ({n} bytes)",
        n as f64 / secs / (1 << 20) as f64
    );

    // 8 isolated circuits in parallel.
    let per = 50usize << 20;
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(async move {
            let user = format!("u{i}");
            let (mut s, code) = socks_connect(socks, "localhost", port, Some((&user, "p"))).await;
            assert_eq!(code, 0);
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            while got < per {
                got += s.read(&mut buf).await.unwrap();
            }
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "8 circuits: {:.1} MiB/s aggregate",
        total as f64 / secs / (1 << 20) as f64
    );
    proxy.shutdown().await;

    // Circuit build + first byte, with nothing built ahead.
    let data = tempfile::tempdir().unwrap();
    let cfg = ProxyConfig {
        prebuilt_circuits: 0,
        ..proxy_config(&net, data.path())
    };
    let proxy = allium_client::start(cfg).await.unwrap();
    proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    let socks = proxy.socks_addr();
    let mut times = Vec::new();
    for i in 0..20 {
        let user = format!("build{i}");
        let t = std::time::Instant::now();
        let (mut s, code) = socks_connect(socks, "localhost", echo, Some((&user, "p"))).await;
        assert_eq!(code, 0);
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "new circuit + first byte, median: {:?}",
        times[times.len() / 2]
    );
    proxy.shutdown().await;
}
