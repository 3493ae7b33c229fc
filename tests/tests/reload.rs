//! A configuration reload on a running network: the path SIGHUP takes (`allium::ops::reload_role`
//! reading the rewritten file) changes live keys of every relay while a stream crosses them, and
//! the stream and its circuit carry on. On a network of its own (it changes its relays).

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use allium::ops::{ReloadOutcome, reload, reload_role};
use allium_relay::ExitPolicy;
use allium_tests::{Options, TestNet, socks};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const T: Duration = Duration::from_secs(60);

async fn echo(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut got = vec![0; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .expect("echo timed out")
        .expect("read");
    got
}

#[test]
fn reload_changes_live_keys_of_running_relays_and_open_circuits_carry_on() {
    allium_tests::init_logging();
    let net = TestNet::start(Options {
        relays: 3,
        exits: 1,
        ..Options::default()
    });
    net.rt.block_on(async {
        let port = allium_tests::spawn_echo().await.expect("echo server");
        let mut s = socks::connect(net.socks, "127.0.0.1", port, None, T)
            .await
            .expect("SOCKS connect");
        assert_eq!(
            echo(&mut s, b"before the reload").await,
            b"before the reload"
        );
        let local = s.local_addr().expect("local address");
        let circ = net
            .proxy
            .debug_stream_circuit(local)
            .expect("the stream's circuit");

        // Out of the network's mutex, so that no lock is held across the waits below.
        let relays: Vec<_> = net
            .relays
            .lock()
            .expect("lock")
            .iter_mut()
            .map(|r| r.take().expect("relay runs"))
            .collect();
        for (i, relay) in relays.iter().enumerate() {
            let running_cfg = net.relay_configs[i].clone();
            let mut running = reload::snapshot(&running_cfg).expect("snapshot");
            let before = relay.last_descriptor();

            // The file as an operator would edit it: live keys and one that needs a restart.
            let mut cfg = running_cfg.clone();
            cfg.nickname = format!("Reloaded{i}");
            cfg.bandwidth_rate = 50_000_000;
            cfg.exit_policy = ExitPolicy {
                accept: vec!["443".into()],
                allow_private: true,
                ..ExitPolicy::default()
            };
            cfg.listen = "127.0.0.1:1".parse().expect("address");
            let path = net.dir.path().join(format!("reload-{i}.toml"));
            std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write");

            let (outcome, _) = reload_role(relay, Some(&path), &mut running);
            let ReloadOutcome::Done(plan) = outcome else {
                panic!("reload failed: {outcome:?}");
            };
            let applied: Vec<&str> = plan.applied.iter().map(|c| c.key.as_str()).collect();
            assert_eq!(applied, ["bandwidth_rate", "exit_policy", "nickname"]);
            let refused: Vec<&str> = plan.refused.iter().map(|c| c.key.as_str()).collect();
            assert_eq!(refused, ["listen"]);
            let live = relay.config();
            assert_eq!(live.nickname, cfg.nickname);
            assert_eq!(live.exit_policy, cfg.exit_policy);
            assert_eq!(
                live.listen, running_cfg.listen,
                "listen must keep its running value"
            );

            // The descriptor is republished at once with the new nickname.
            let end = Instant::now() + T;
            loop {
                let now = relay.last_descriptor();
                if now != before
                    && now.as_deref().is_some_and(|d| {
                        d.windows(cfg.nickname.len())
                            .any(|w| w == cfg.nickname.as_bytes())
                    })
                {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "relay {i} did not republish its descriptor"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }

            // A broken file changes nothing.
            std::fs::write(&path, "nickname = [").expect("write");
            let (outcome, _) = reload_role(relay, Some(&path), &mut running);
            assert!(matches!(outcome, ReloadOutcome::Broken(_)), "{outcome:?}");
            assert_eq!(relay.config().nickname, cfg.nickname);
        }

        // The open stream, on the same circuit, carries on.
        assert_eq!(echo(&mut s, b"after the reload").await, b"after the reload");
        assert_eq!(net.proxy.debug_stream_circuit(local), Some(circ));
        for r in relays {
            r.shutdown().await;
        }
    });
}
