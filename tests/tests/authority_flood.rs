//! Issue 10, "Must show": junk-descriptor and slowloris floods against the authorities, from
//! 127.0.0.77, leave the honest relays (each on its own address, 127.(N+1).0.1, as
//! `allium testnet` places them) probed and listed, the votes exchanged on time by the
//! authorities' own schedule, and a client bootstrapping.
//!
//! The honest nodes get through on their own merit: the relays bind their directory
//! connections to their listen address (`outbound_bind_address`'s default) and the client to
//! `CLIENT` (each its own /24), so none of them talks to the authorities from an authority's
//! address (127.100.0.1 to 127.102.0.1, which the per-address limits exempt); the authorities'
//! counters show every accepted descriptor charged to the limits.
//!
//! The network: 3 authorities on their real schedule (4 s periods, real link-handshake probes),
//! 4 relays, a proxy. The attacker uploads self-signed descriptors for relays "at" addresses that
//! drop packets (listeners on 127.77.K.1 that never answer), as fast as it can, and holds as many
//! half-sent requests open at every authority as it can. The figures are printed as one JSON
//! line (`cargo test -p allium-tests --test authority_flood -- --nocapture`), and written to
//! the file named by `ALLIUM_FLOOD_JSON` if set (bench/attack/authority_flood.py).

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allium::cmd::testnet::NetworkBuilder;
use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_directory::authority::{self, AuthorityHandle, StartOptions};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::{ExitPolicy, Flags, RelayDescriptor, Signed};
use allium_directory::{now_unix, paths};
use allium_tests::{GET_HELLO, http_exchange, httpd, socks, split_response, start_relay};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);
/// The client's address, for its SOCKS port and its directory connections.
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 60, 1);
const INTERVAL: u64 = 6;
const RELAYS: usize = 4;
/// How long the floods run once the network is up (`ALLIUM_FLOOD_SECS` for bigger runs).
fn flood_for() -> Duration {
    Duration::from_secs(env_or("ALLIUM_FLOOD_SECS", 18))
}
/// Slowloris connections the attacker tries to hold at each authority
/// (`ALLIUM_FLOOD_SLOWLORIS`).
fn slowloris_per_authority() -> usize {
    usize::try_from(env_or("ALLIUM_FLOOD_SLOWLORIS", 200)).unwrap_or(200)
}
/// Junk-descriptor uploaders per authority (`ALLIUM_FLOOD_UPLOADERS`).
fn uploaders_per_authority() -> usize {
    usize::try_from(env_or("ALLIUM_FLOOD_UPLOADERS", 1)).unwrap_or(1)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// Listeners that accept nothing (probes of them hang until the probe timeout).
const BLACKHOLES: u8 = 16;

/// Unix time with a fraction.
fn now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Default)]
struct Figures {
    junk_sent: AtomicU64,
    junk_accepted: AtomicU64,
    junk_429: AtomicU64,
    junk_503: AtomicU64,
    junk_other: AtomicU64,
    slow_opened: AtomicU64,
    slow_refused_503: AtomicU64,
    slow_closed_by_server: AtomicU64,
}

fn junk_descriptor(addr: SocketAddr, now: u64) -> Vec<u8> {
    let id = IdentityKeypair::generate();
    let d = RelayDescriptor {
        version: DESC_VERSION,
        identity: id.public(),
        link_key: X25519Secret::generate().public(),
        onion_key: X25519Secret::generate().public(),
        nickname: "junk".into(),
        addrs: vec![addr],
        bandwidth_observed: 10_000_000_000,
        exit_policy: ExitPolicy::reject_all(),
        family: vec![],
        protocols: default_protocols(),
        contact: String::new(),
        published: now,
        expires: now + 3 * 3600,
    };
    Signed::sign(&d, &id).expect("sign").to_bytes()
}

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// POST one body from `from`; the status code (0 when the exchange failed).
async fn post_from(from: Ipv4Addr, to: SocketAddr, path: &str, body: &[u8]) -> u16 {
    let Ok(mut s) = connect_from(from, to).await else {
        return 0;
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The attacker's descriptor flood against one authority, until `stop`.
async fn junk_flood(
    to: SocketAddr,
    holes: Vec<SocketAddr>,
    fig: Arc<Figures>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Some(hole) = holes.get(i % holes.len()).copied() else {
            return;
        };
        let body = junk_descriptor(hole, now_unix());
        fig.junk_sent.fetch_add(1, Ordering::Relaxed);
        let c = match post_from(ATTACKER, to, paths::DESCRIPTOR, &body).await {
            200 => &fig.junk_accepted,
            429 => &fig.junk_429,
            503 => &fig.junk_503,
            _ => &fig.junk_other,
        };
        c.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
}

/// One slowloris connection, reopened whenever the server closes it, until `stop`: half a
/// request head, then a byte every 500 ms.
async fn slowloris(to: SocketAddr, fig: Arc<Figures>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = connect_from(ATTACKER, to).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        fig.slow_opened.fetch_add(1, Ordering::Relaxed);
        let _ = s
            .write_all(b"GET /allium/v1/consensus HTTP/1.1\r\nX-A: ")
            .await;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    if buf.starts_with(b"HTTP/1.1 503") {
                        fig.slow_refused_503.fetch_add(1, Ordering::Relaxed);
                        // Refused: try again a second later.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    } else {
                        fig.slow_closed_by_server.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Ok(_) => {
                    fig.slow_closed_by_server.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    if s.write_all(b"a").await.is_err() {
                        fig.slow_closed_by_server.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

/// A consensus fetch from an address that is neither an authority's nor the attacker's.
async fn fetch_from_bystander(to: SocketAddr) -> u16 {
    let Ok(mut s) = connect_from(Ipv4Addr::new(127, 0, 9, 9), to).await else {
        return 0;
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        paths::CONSENSUS
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(out.get(..12).unwrap_or(&[]))
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn floods_from_one_address_leave_the_network_working() {
    allium_tests::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The attacker is another program: its own runtime, so its tasks do not queue in front of
    // the network's (the CPU is still shared).
    let attacker = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("attacker runtime");
    let dir = tempfile::tempdir().expect("tmp");
    rt.block_on(run(dir.path(), attacker.handle().clone()));
    attacker.shutdown_background();
}

async fn run(dir: &std::path::Path, attacker: tokio::runtime::Handle) {
    let t0 = Instant::now();
    let plan = NetworkBuilder::new()
        .relays(RELAYS)
        .exits(2)
        .exit_policy(allium_tests::exit_policy())
        .voting_interval_secs(INTERVAL)
        .plan(dir, now_unix())
        .expect("plan");
    let mut configs: Vec<_> = (0..plan.authorities.len())
        .map(|i| plan.authority_config(i).expect("config"))
        .collect();
    for c in &mut configs {
        c.max_relays = 64;
        c.max_connections = 64;
        let l = &mut c.limits;
        l.max_relays_per_addr = Some(4);
        l.max_relays_per_prefix = Some(16);
        l.upload_burst = 5;
        l.upload_per_min = 6;
        l.max_connections_per_addr = 8;
        l.max_connections_per_prefix = 16;
        l.reserved_authority_connections = 16;
        l.header_timeout_secs = 3;
        l.probe_timeout_ms = 1000;
    }
    let allium::cmd::testnet::NetworkPlan {
        authorities: planned,
        relays: planned_relays,
        proxy: proxy_config,
        ..
    } = plan;
    let mut auths: Vec<AuthorityHandle> = Vec::new();
    for (a, cfg) in planned.into_iter().zip(configs) {
        a.listener.set_nonblocking(true).expect("nonblocking");
        let l = TcpListener::from_std(a.listener).expect("listener");
        auths.push(
            authority::start_with(
                cfg,
                StartOptions {
                    listener: Some(l),
                    schedule: true,
                    ..StartOptions::default()
                },
            )
            .await
            .expect("authority"),
        );
    }
    let dir_addrs: Vec<SocketAddr> = auths.iter().map(|a| a.dir_addr()).collect();

    // Addresses that drop packets: listeners that never accept.
    let mut holes = Vec::new();
    let mut hole_listeners = Vec::new();
    for k in 0..BLACKHOLES {
        let l = TcpListener::bind((Ipv4Addr::new(127, 77, k, 1), 0))
            .await
            .expect("blackhole");
        holes.push(l.local_addr().expect("addr"));
        hole_listeners.push(l);
    }

    // The attack starts before the honest relays do.
    let fig = Arc::new(Figures::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut attack = tokio::task::JoinSet::new();
    for to in &dir_addrs {
        for _ in 0..uploaders_per_authority() {
            attack.spawn_on(
                junk_flood(*to, holes.clone(), fig.clone(), stop.clone()),
                &attacker,
            );
        }
        for _ in 0..slowloris_per_authority() {
            attack.spawn_on(slowloris(*to, fig.clone(), stop.clone()), &attacker);
        }
    }
    let flood_start = Instant::now();

    // Honest relays, each on the address the plan gave it (its own /16).
    let mut relays = Vec::new();
    let mut honest_ids = Vec::new();
    for r in planned_relays {
        let h = start_relay(r.config).await.expect("relay");
        honest_ids.push(h.identity());
        relays.push(h);
    }

    // Consensus periods as published by the authorities' own schedule: for each authority,
    // when each valid_after was first served and with how many signatures.
    let mut published: Vec<Vec<(u64, f64, usize)>> = vec![Vec::new(); auths.len()];
    let mut bystander_ok = 0u32;
    let mut bystander_tries = 0u32;
    let mut last_bystander = Instant::now();
    while flood_start.elapsed() < flood_for() {
        for (i, a) in auths.iter().enumerate() {
            if let Some(c) = a.current_consensus()
                && let Ok(b) = c.dangerously_decode_unverified()
                && published[i]
                    .last()
                    .is_none_or(|(va, _, _)| *va != b.valid_after)
            {
                let late = now_f64() - b.valid_after as f64;
                published[i].push((b.valid_after, late, c.sigs().len()));
            }
        }
        if last_bystander.elapsed() > Duration::from_secs(1) {
            last_bystander = Instant::now();
            bystander_tries += 1;
            // Served: the consensus, or 404 before the first one is published.
            if matches!(fetch_from_bystander(dir_addrs[0]).await, 200 | 404) {
                bystander_ok += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client bootstraps while the floods go on.
    let boot_start = Instant::now();
    let (http, _task) = httpd::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("httpd");
    let mut proxy_config = proxy_config;
    proxy_config.socks_listen = SocketAddr::from((CLIENT, 0));
    proxy_config.outbound_bind_address = Some(CLIENT.into());
    let proxy = allium_client::start(proxy_config).await.expect("proxy");
    proxy
        .wait_ready(Duration::from_secs(20))
        .await
        .expect("the client bootstraps during the flood");
    let mut s = socks::connect(
        proxy.socks_addr(),
        &http.ip().to_string(),
        http.port(),
        None,
        Duration::from_secs(20),
    )
    .await
    .expect("SOCKS connect through the network");
    let resp = http_exchange(&mut s, GET_HELLO, Duration::from_secs(20))
        .await
        .expect("HTTP through the network");
    let (status, body) = split_response(&resp).expect("response");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, httpd::HELLO.as_bytes());
    let bootstrap_secs = boot_start.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    attack.abort_all();
    while attack.join_next().await.is_some() {}

    // What the authorities list: every honest relay Running, no junk.
    let c = auths[0].current_consensus().expect("a consensus");
    let body = c.dangerously_decode_unverified().expect("decode");
    let listed_honest = honest_ids
        .iter()
        .filter(|id| {
            body.relays
                .iter()
                .any(|e| e.identity == **id && e.has(Flags::RUNNING))
        })
        .count();
    let listed_junk = body.relays.len() - listed_honest;
    let counts: Vec<Vec<(&'static str, u64)>> = auths.iter().map(|a| a.limit_counts()).collect();
    let held: Vec<usize> = auths.iter().map(|a| a.descriptor_count()).collect();
    let upload_sources: Vec<(u64, u64)> = auths
        .iter()
        .map(|a| a.descriptor_upload_sources())
        .collect();
    let figures = serde_json::json!({
        "flood_secs": flood_for().as_secs(),
        "interval_secs": INTERVAL,
        "junk": {
            "sent": fig.junk_sent.load(Ordering::Relaxed),
            "accepted": fig.junk_accepted.load(Ordering::Relaxed),
            "refused_429": fig.junk_429.load(Ordering::Relaxed),
            "refused_503_conn_cap": fig.junk_503.load(Ordering::Relaxed),
            "other": fig.junk_other.load(Ordering::Relaxed),
        },
        "slowloris": {
            "per_authority": slowloris_per_authority(),
            "uploaders_per_authority": uploaders_per_authority(),
            "opened": fig.slow_opened.load(Ordering::Relaxed),
            "refused_503": fig.slow_refused_503.load(Ordering::Relaxed),
            "closed_by_server": fig.slow_closed_by_server.load(Ordering::Relaxed),
        },
        "descriptors_held": held,
        "descriptors_accepted": upload_sources.iter().map(|(exempt, charged)| {
            serde_json::json!({"from_authority_addr_exempt": exempt, "charged": charged})
        }).collect::<Vec<_>>(),
        "honest_listed": listed_honest,
        "honest_total": honest_ids.len(),
        "junk_listed": listed_junk,
        "periods": published.iter().map(|p| p.iter().map(|(va, late, sigs)| {
            serde_json::json!({"valid_after": va, "seen_after_start_secs": late, "signatures": sigs})
        }).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "bystander_consensus_fetches": {"ok": bystander_ok, "tries": bystander_tries},
        "client_bootstrap_secs": bootstrap_secs,
        "limit_counts": counts.iter().map(|c| c.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<String, serde_json::Value>>()).collect::<Vec<_>>(),
        "total_secs": t0.elapsed().as_secs_f64(),
    });
    println!("authority_flood figures: {figures}");
    if let Ok(path) = std::env::var("ALLIUM_FLOOD_JSON") {
        let _ = std::fs::write(path, figures.to_string());
    }

    assert_eq!(
        listed_honest, RELAYS,
        "every honest relay listed: {figures}"
    );
    assert_eq!(listed_junk, 0, "no junk relay listed: {figures}");
    // Listed on their own merit: no descriptor came from an authority's (exempt) address, and
    // every authority took at least one from each honest relay through the limits.
    for (exempt, charged) in &upload_sources {
        assert_eq!(
            *exempt, 0,
            "an upload was exempt from the limits: {figures}"
        );
        assert!(
            *charged >= RELAYS as u64,
            "honest uploads missing: {figures}"
        );
    }
    // Votes exchanged on time: every authority published at least two periods during the
    // flood, each signed by all three, each within 1.5 s of its start.
    for p in &published {
        let full: Vec<_> = p.iter().filter(|(_, _, sigs)| *sigs == 3).collect();
        assert!(full.len() >= 2, "periods published under flood: {figures}");
        for (_, late, _) in &full {
            assert!(*late < 1.5, "a consensus was late: {figures}");
        }
    }
    assert_eq!(
        bystander_ok, bystander_tries,
        "a client from another address was refused: {figures}"
    );
    let accepted = fig.junk_accepted.load(Ordering::Relaxed);
    let sent = fig.junk_sent.load(Ordering::Relaxed);
    // Per authority: the burst (5) and 6 a minute over the flood and the bootstrap.
    let allowed = 3 * (5 + (flood_for().as_secs() + 10) * 6 / 60 + 1);
    assert!(
        accepted <= allowed,
        "junk accepted beyond the burst and refill ({allowed}): {figures}"
    );
    assert!(sent > 10 * accepted, "the flood did not flood: {figures}");
    for c in &counts {
        let get = |k: &str| c.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
        assert!(
            get("conn_per_addr") > 0,
            "slowloris never capped: {figures}"
        );
        assert!(
            get("upload_rate_addr") > 0,
            "uploads never limited: {figures}"
        );
    }
    drop(hole_listeners);
    for r in relays {
        r.shutdown().await;
    }
    for a in auths {
        a.shutdown().await;
    }
}
