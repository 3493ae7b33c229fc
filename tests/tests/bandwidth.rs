//! Measured bandwidth end to end: a relay claims 10 GB/s while its real capacity is
//! rate-limited to 100 kB/s. After one bandwidth scan (two-hop circuits through every relay),
//! the authorities vote the measurements and the consensus weight of the liar follows its
//! measured capacity, not its claim; clients choose it no more than its measured share.

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allium::cmd::testnet::NetworkBuilder;
use allium_client::bwscan::{BwScanConfig, scan};
use allium_client::path::{
    Position, PositionWeights, RelayFlags, RelayInfo, choose_path_weighted, weighted_choice_by,
};
use allium_directory::NetDir;
use allium_directory::authority::{self, AuthorityHandle, StartOptions};
use allium_directory::client::fetch_consensus;
use allium_directory::doc::Flags;
use allium_tests::{exit_policy, httpd, start_relay};
use rand::SeedableRng as _;

/// The liar's claim: 10 GB/s.
const CLAIM: u64 = 10_000_000_000;
/// Its real capacity: 100 kB/s.
const RATE: u64 = 100_000;

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn info(e: &allium_directory::doc::ConsensusEntry) -> RelayInfo {
    RelayInfo {
        id: e.identity,
        link_key: e.link_key,
        onion_key: e.onion_key,
        addrs: e.addrs.clone(),
        flags: RelayFlags {
            running: e.has(Flags::RUNNING),
            valid: e.has(Flags::VALID),
            guard: e.has(Flags::GUARD),
            exit: e.has(Flags::EXIT),
            bad_exit: e.has(Flags::BAD_EXIT),
            fast: e.has(Flags::FAST),
            hsdir: e.has(Flags::HSDIR),
            stable: e.has(Flags::STABLE),
        },
        weight: u64::from(e.weight),
        family: e.family.clone(),
        exit_ports: e.exit.accept.iter().map(|r| (r.lo, r.hi)).collect(),
    }
}

#[test]
fn liar_weighted_by_measured_capacity() {
    allium_tests::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let bwfile = dir.path().join("bandwidth");
    let now = allium_directory::now_unix();
    let plan = NetworkBuilder::new()
        .relays(5)
        .exits(2)
        .exit_policy(exit_policy())
        .plan(dir.path(), now)
        .expect("plan");
    let infos = plan.authority_infos();
    let configs: Vec<_> = (0..plan.authorities.len())
        .map(|i| {
            let mut c = plan.authority_config(i).expect("config");
            c.bandwidth_file = Some(bwfile.clone());
            c
        })
        .collect();
    let allium::cmd::testnet::NetworkPlan {
        authorities: planned,
        relays: planned_relays,
        ..
    } = plan;

    let auths: Vec<AuthorityHandle> = rt.block_on(async {
        let mut v = Vec::new();
        for (a, cfg) in planned.into_iter().zip(configs) {
            a.listener.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(a.listener).expect("listener");
            let opts = StartOptions {
                listener: Some(l),
                schedule: false,
                ..StartOptions::default()
            };
            v.push(authority::start_with(cfg, opts).await.expect("authority"));
        }
        v
    });
    // Relay 4 (a non-exit) lies and is rate-limited.
    let mut relays = Vec::new();
    let mut liar_nick = String::new();
    for (i, mut r) in planned_relays.into_iter().enumerate() {
        if i == 4 {
            r.config.test_advertise_bandwidth = Some(CLAIM);
            r.config.bandwidth_rate = RATE;
            r.config.bandwidth_burst = RATE;
            liar_nick = r.config.nickname.clone();
        }
        relays.push(rt.block_on(start_relay(r.config)).expect("relay"));
    }
    wait_until("every descriptor", Duration::from_secs(30), || {
        auths.iter().all(|a| a.descriptor_count() >= 5)
    });
    let refs: Vec<&AuthorityHandle> = auths.iter().collect();
    rt.block_on(authority::run_round(&refs, now))
        .expect("round 1");

    // Before any measurement: everyone unmeasured, capped at 20 kB/s.
    let nd = NetDir::new(
        rt.block_on(fetch_consensus(&infos, now))
            .expect("consensus 1"),
    );
    let liar = nd
        .relays()
        .iter()
        .find(|r| r.nickname == liar_nick)
        .expect("liar listed")
        .identity;
    assert_eq!(nd.relays().len(), 5);
    assert!(nd.relays().iter().all(|r| !r.measured && r.weight == 20));

    // Relays extend and open streams with the consensus they hold: scan once they have it.
    wait_until(
        "every relay holds the consensus",
        Duration::from_secs(30),
        || relays.iter().all(|r| r.listed_in_consensus().is_some()),
    );

    // One scan.
    let (http, _task) = rt
        .block_on(httpd::spawn(SocketAddr::from(([127, 0, 0, 1], 0))))
        .expect("httpd");
    let mut cfg = BwScanConfig::new(infos.clone(), bwfile.clone(), http);
    cfg.object_size = 256 * 1024;
    cfg.samples = 1;
    cfg.sample_timeout_secs = 20;
    cfg.test_network = true;
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut results = BTreeMap::new();
    let started = Instant::now();
    let n = rt
        .block_on(scan(&cfg, &nd, &mut results, &stop_rx))
        .expect("scan");
    eprintln!(
        "scan: {n} relays in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        results
            .values()
            .map(|m| (&m.nick, m.kbps))
            .collect::<Vec<_>>()
    );
    assert_eq!(n, 5, "every relay measured");
    let liar_measured = results.get(&liar).expect("liar measured").kbps;
    assert!(
        liar_measured < 400,
        "rate-limited to 100 kB/s (256 KiB with a 100 kB burst), measured {liar_measured}"
    );

    // The next period votes the measurements.
    let va2 = now + 1;
    rt.block_on(authority::run_round(&refs, va2))
        .expect("round 2");
    let nd2 = NetDir::new(
        rt.block_on(fetch_consensus(&infos, va2))
            .expect("consensus 2"),
    );
    assert_eq!(nd2.valid_after(), va2);
    let l = nd2.by_id(&liar).expect("liar listed");
    assert!(l.measured, "three authorities voted the measurement");
    assert_eq!(
        l.weight,
        authority::vote::round_weight(liar_measured),
        "weight = measured (two significant digits), not the 10 GB/s claim"
    );
    assert!(nd2.relays().iter().all(|r| r.measured));
    assert_eq!(nd2.consensus().bandwidth_weights.len(), 19);

    // Clients: the liar is chosen as middle no more often than its measured weight share
    // among each path's middle candidates (everyone usable and Fast but that path's guard and
    // exit), and far less than its claim would give it.
    let relays_info: Vec<RelayInfo> = nd2.relays().iter().map(info).collect();
    let w = PositionWeights::from_consensus(&nd2.consensus().bandwidth_weights);
    let guards: Vec<_> = relays_info
        .iter()
        .filter(|r| r.flags.guard && r.id != liar)
        .map(|r| r.id)
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let paths = 5000u32;
    let mut as_middle = 0u32;
    let mut expected = 0f64;
    let mut expected_if_claimed = 0f64;
    for _ in 0..paths {
        let p = choose_path_weighted(&relays_info, &w, &guards, &[], &[80], true, &mut rng)
            .expect("path");
        as_middle += u32::from(p.middle.id == liar);
        let cands: Vec<&RelayInfo> = relays_info
            .iter()
            .filter(|r| r.usable() && r.flags.fast && r.id != p.guard.id && r.id != p.exit.id)
            .collect();
        let total: f64 = cands
            .iter()
            .map(|r| w.weight(r, Position::Middle) as f64)
            .sum();
        let mine = |weight: u64| {
            let mut r = (*cands.iter().find(|r| r.id == liar).expect("candidate")).clone();
            r.weight = weight;
            w.weight(&r, Position::Middle) as f64
        };
        let m = mine(u64::from(l.weight));
        expected += m / total;
        let c = mine(CLAIM / 1000);
        expected_if_claimed += c / (total - m + c);
    }
    let got = f64::from(as_middle) / f64::from(paths);
    let share = expected / f64::from(paths);
    let claimed = expected_if_claimed / f64::from(paths);
    eprintln!(
        "liar: weight {} kB/s; chosen as middle {got:.4}, measured share {share:.4}, share its claim would get {claimed:.4}",
        l.weight
    );
    assert!(got <= share * 1.15 + 0.01, "middle {got} vs share {share}");
    assert!(
        claimed > 0.9 && got < 0.2,
        "the claim would win nearly every path"
    );
    let cands: Vec<&RelayInfo> = relays_info.iter().filter(|r| r.flags.guard).collect();
    let mut picked = 0;
    for _ in 0..paths {
        let g =
            weighted_choice_by(&cands, |r| w.weight(r, Position::Guard), &mut rng).expect("guard");
        picked += usize::from(g.id == liar);
    }
    let gshare = picked as f64 / f64::from(paths);
    assert!(gshare < 0.05, "liar sampled as guard {gshare}");
    drop(relays);
    drop(auths);
}
