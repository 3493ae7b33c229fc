//! Relays as directory caches (issue 11): after bootstrap a proxy fetches the consensus only
//! from its guards over BEGIN_DIR, never from an authority; with every authority down a fresh
//! proxy bootstraps from a fallback cache and a running one keeps asking its guard, calmly.
//!
//! Each test runs its own network with a 2-second voting interval (rounds run by hand), so
//! several consensus periods pass in a few seconds of real time.

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use allium_directory::authority::AuthorityHandle;
use allium_directory::now_unix;
use allium_tests::{GET_HELLO, Options, TestNet, http_exchange, socks};

/// The voting interval of these networks, seconds.
const INTERVAL: u64 = 2;
/// Index of each source in `ProxyHandle::dir_fetches`.
const GUARD: usize = 0;
const FALLBACK: usize = 1;
const AUTHORITY: usize = 2;

fn dir_served(net: &TestNet) -> u64 {
    net.relays
        .lock()
        .expect("lock")
        .iter()
        .flatten()
        .map(|r| r.stats().dir_requests_served())
        .sum()
}

/// Consensus diffs the relays served over BEGIN_DIR.
fn diffs_served(net: &TestNet) -> u64 {
    net.relays
        .lock()
        .expect("lock")
        .iter()
        .flatten()
        .map(|r| r.dir_cache_served().1)
        .sum()
}

/// One page through `socks_addr`: the proxy can still carry streams.
async fn fetch_hello(net: &TestNet, socks_addr: std::net::SocketAddr) {
    let (host, port) = net.http_target();
    let mut s = socks::connect(socks_addr, &host, port, None, Duration::from_secs(30))
        .await
        .expect("SOCKS connect");
    let resp = http_exchange(&mut s, GET_HELLO, Duration::from_secs(30))
        .await
        .expect("HTTP through the proxy");
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{resp:?}");
}

#[test]
fn after_bootstrap_the_proxy_fetches_only_from_its_guard() {
    allium_tests::init_logging();
    let net = TestNet::start_with_voting_interval(Options::default(), Some(INTERVAL));
    // A proxy whose directory connections leave from 127.0.0.2 and with no fallback caches:
    // its first bootstrap goes to the authorities (so the counter below sees it), and nothing
    // after that may.
    let me = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = net.proxy_config(data.path());
    cfg.outbound_bind_address = Some(me);
    cfg.fallback_dirs.clear();
    let proxy = net.rt.block_on(async {
        let p = allium_client::start(cfg).await.expect("proxy");
        p.wait_ready(Duration::from_secs(30)).await.expect("ready");
        p
    });
    let at_authorities = || -> u64 { net.authorities.iter().map(|a| a.connections_from(me)).sum() };
    let boot = at_authorities();
    assert!(boot >= 1, "the first bootstrap asked an authority");
    assert_eq!(proxy.dir_fetches()[AUTHORITY].0, 1);
    let va0 = proxy.consensus_valid_after();
    assert!(va0 > 0);
    let served0 = dir_served(&net);

    // Consensus periods pass: a round every INTERVAL seconds, until the proxy holds one at
    // least three periods newer and its guards have served diffs (a guard serves a diff only
    // from a consensus it held itself: one that fetched after the proxy did sends the whole
    // document that period, so the count depends on timing, not on whether diffs work).
    let refs: Vec<&AuthorityHandle> = net.authorities.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_va = va0;
    // The proxy may skip a period when a round lands just after its fetch, so three advances
    // of valid-after can take two fetches: wait for three fetches from a guard as well.
    while proxy.consensus_valid_after() < va0 + 3 * INTERVAL
        || diffs_served(&net) < 2
        || proxy.dir_fetches()[GUARD].0 < 3
    {
        assert!(
            Instant::now() < deadline,
            "the proxy's consensus did not advance or came whole every time: {} -> {} \
             (fetches {:?}, {} diffs)",
            va0,
            proxy.consensus_valid_after(),
            proxy.dir_fetches(),
            diffs_served(&net)
        );
        if now_unix() >= last_va + INTERVAL {
            last_va = net
                .rt
                .block_on(allium_tests::run_round_now(&refs))
                .expect("round");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetches = proxy.dir_fetches();
    assert_eq!(
        at_authorities(),
        boot,
        "no connection to an authority after bootstrap (fetches {fetches:?})"
    );
    assert_eq!(fetches[AUTHORITY], (1, 0), "{fetches:?}");
    assert_eq!(fetches[FALLBACK], (0, 0), "{fetches:?}");
    assert!(
        fetches[GUARD].0 >= 3,
        "each new consensus came from a guard over BEGIN_DIR: {fetches:?}"
    );
    assert!(
        dir_served(&net) >= served0 + 3,
        "the relays served the directory requests"
    );
    let diffs = diffs_served(&net);
    assert!(
        diffs >= 2,
        "the updates came as diffs from the consensus held ({diffs} diffs, fetches {fetches:?})"
    );
    net.rt.block_on(fetch_hello(&net, proxy.socks_addr()));
    net.rt.block_on(proxy.shutdown());
}

#[test]
fn with_every_authority_down_caches_keep_clients_going() {
    allium_tests::init_logging();
    let mut net = TestNet::start_with_voting_interval(Options::default(), Some(INTERVAL));
    assert!(
        !net.proxy_config.fallback_dirs.is_empty(),
        "the network's proxy configuration lists fallback caches"
    );
    let va0 = net.proxy.consensus_valid_after();
    let before = net.proxy.dir_fetches();
    for a in net.authorities.drain(..) {
        net.rt.block_on(a.shutdown());
    }

    // A fresh proxy bootstraps from a fallback cache, the authorities being unreachable.
    let data = tempfile::tempdir().expect("tempdir");
    let fresh = net
        .rt
        .block_on(net.start_proxy(data.path()))
        .expect("a fresh proxy bootstraps without authorities");
    let f = fresh.dir_fetches();
    assert!(f[FALLBACK].0 >= 1, "{f:?}");
    assert_eq!(f[AUTHORITY], (0, 0), "{f:?}");
    assert_eq!(fresh.consensus_valid_after(), va0);
    net.rt.block_on(fetch_hello(&net, fresh.socks_addr()));

    // The running proxy keeps asking its guard (which has nothing newer) past the consensus'
    // fresh-until and valid-until, backing off instead of storming, and stays usable.
    let watch = Duration::from_secs(4 * INTERVAL + 4);
    std::thread::sleep(watch);
    let after = net.proxy.dir_fetches();
    let asked = after[GUARD].0 - before[GUARD].0;
    assert!(
        asked >= 2,
        "the guard was asked again: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[GUARD].1, before[GUARD].1,
        "no failed fetch: {after:?}"
    );
    assert!(
        asked <= 8,
        "no storm: {asked} fetches in {watch:?} ({before:?} -> {after:?})"
    );
    assert_eq!(after[AUTHORITY], before[AUTHORITY], "{after:?}");
    assert_eq!(net.proxy.consensus_valid_after(), va0);
    assert!(net.proxy.is_ready());
    net.rt.block_on(fetch_hello(&net, net.socks));
    net.rt.block_on(fresh.shutdown());
}
