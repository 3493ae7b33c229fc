//! Whole-network tests that damage their network (stop relays), each on a network of its own.

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use allium_tests::{GET_HELLO, Options, TestNet, http_exchange, socks, start_relay};
use tokio::io::AsyncReadExt as _;

const T: Duration = Duration::from_secs(60);

#[test]
fn restarted_relay_keeps_its_identity() {
    allium_tests::init_logging();
    let net = TestNet::start(Options {
        relays: 3,
        exits: 1,
        ..Options::default()
    });
    let cfg = net.relay_configs[1].clone();
    let old = net.relays.lock().expect("lock")[1]
        .take()
        .expect("relay 1 runs");
    let id = old.identity();
    net.rt.block_on(old.shutdown());
    let again = net.rt.block_on(start_relay(cfg)).expect("restart");
    assert_eq!(
        again.identity(),
        id,
        "a restarted relay must keep its identity key"
    );
    net.rt.block_on(again.shutdown());
}

#[test]
fn killing_the_middle_relay_fails_the_stream_promptly_and_the_next_one_works() {
    allium_tests::init_logging();
    let net = TestNet::start(Options {
        relays: 6,
        exits: 2,
        ..Options::default()
    });
    let (host, port) = net.http_target();
    net.rt.block_on(async {
        // A long download on a circuit whose path we learn from the proxy.
        let mut s = socks::connect(net.socks, &host, port, Some(("victim", "x")), T)
            .await
            .expect("SOCKS connect");
        use tokio::io::AsyncWriteExt as _;
        s.write_all(b"GET /bytes/1000000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        while got < 1 << 20 {
            let n = tokio::time::timeout(T, s.read(&mut buf))
                .await
                .expect("data flows")
                .expect("read");
            assert!(n > 0, "stream ended early");
            got += n;
        }
        let paths = net.proxy.debug_circuit_paths();
        let middle = paths
            .iter()
            .find(|p| p.streams > 0)
            .and_then(|p| p.path.get(1).copied())
            .expect("a circuit with a stream and three hops");
        let idx = net
            .relays
            .lock()
            .expect("lock")
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.identity() == middle))
            .expect("the middle is one of our relays");
        let relay = net.relays.lock().expect("lock")[idx]
            .take()
            .expect("running");
        let killed_at = Instant::now();
        relay.shutdown().await;

        // The stream must end promptly (error or EOF), not hang.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the stream did not end within 10 s of killing the middle relay"
        );
        let took = killed_at.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}");

        // The next stream succeeds on a new circuit avoiding the dead relay.
        let mut s2 = socks::connect(net.socks, &host, port, Some(("victim", "x")), T)
            .await
            .expect("a new stream after the failure");
        let resp = http_exchange(&mut s2, GET_HELLO, T)
            .await
            .expect("HTTP exchange on the new circuit");
        assert!(resp.ends_with(allium_tests::httpd::HELLO.as_bytes()));
    });
}
