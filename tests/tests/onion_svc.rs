//! The onion-service driver of the proxy on a whole test network: a proxy with an
//! `[[onion_service]]` table establishes its three introduction points at real relays and
//! publishes its descriptor to the HSDirs the ring names; what those HSDirs hold names neither
//! the service's identity key nor its address. Restarted on the same key directory, the service
//! keeps its address and replaces its descriptor with a newer revision.

// Whole-network tests: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allium_client::config::OnionServiceConfig;
use allium_client::onion::client as hsclient;
use allium_client::onion::{OnionServiceStatus, keys};
use allium_client::{ProxyConfig, ProxyHandle};
use allium_crypto::RelayId;
use allium_crypto::hs::{BlindedPublicKey, HsAddress, TimePeriodParams};
use allium_directory::hs::HsDirParams;
use allium_directory::hs::UncheckedHsDesc;
use allium_tests::promtext;
use allium_tests::{Options, TestNet, init_logging};

const WAIT: Duration = Duration::from_secs(60);

fn service_config(net: &TestNet, data: &std::path::Path, key_dir: &std::path::Path) -> ProxyConfig {
    let mut cfg = net.proxy_config(data);
    cfg.socks_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.onion_service = vec![OnionServiceConfig {
        name: "web".into(),
        key_dir: key_dir.to_path_buf(),
        ports: vec![format!("80 -> {}", net.http).parse().expect("port map")],
        authorized_clients: None,
        pow: false,
        pow_queue_rate: allium_client::onion::pow::DEFAULT_QUEUE_RATE,
        pow_queue_burst: allium_client::onion::pow::DEFAULT_QUEUE_BURST,
    }];
    cfg
}

/// Wait (bounded) until the service has 3 introduction points and has published a descriptor
/// `after` publications; its status then.
fn wait_published(proxy: &ProxyHandle, after: u64) -> OnionServiceStatus {
    let end = Instant::now() + WAIT;
    loop {
        let st = proxy.onion_services();
        if let Some(s) = st.first()
            && s.intro_points == 3
            && s.published_intro_points == 3
            && s.descriptors_published > after
        {
            return s.clone();
        }
        assert!(
            Instant::now() < end,
            "no descriptor with 3 introduction points within {WAIT:?}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The descriptor each HSDir in `stored` serves for `blinded`.
fn fetch_all(net: &TestNet, blinded: &BlindedPublicKey, hsdirs: &[RelayId]) -> Vec<Vec<u8>> {
    let relays = net.relays.lock().expect("relays");
    hsdirs
        .iter()
        .map(|id| {
            let r = relays
                .iter()
                .flatten()
                .find(|r| r.identity() == *id)
                .expect("the HSDir is one of the network's relays");
            r.hsdir_descriptor(blinded)
                .expect("the HSDir serves the descriptor it accepted")
        })
        .collect()
}

fn revision(bytes: &[u8]) -> u64 {
    UncheckedHsDesc::parse(bytes)
        .expect("parses")
        .check(allium_directory::now_unix())
        .expect("verifies")
        .revision()
}

/// Every descriptor of the last upload is on as many HSDirs as the ring names, none of them
/// names the identity key or the address, and the current period's one opens to `n_intro`
/// introduction points. Returns the current period's revision.
fn check_published(
    net: &TestNet,
    st: &OnionServiceStatus,
    addr: &HsAddress,
    n_hsdirs: usize,
) -> u64 {
    assert_eq!(st.last_upload.len(), 2, "current and next period: {st:?}");
    let now = allium_directory::now_unix();
    // The network's own periods (`hsdir_interval`), as the service and the clients take them.
    let tp = TimePeriodParams::from_consensus(
        consensus(net)
            .params
            .get(TimePeriodParams::CONSENSUS_PARAM)
            .copied(),
    );
    assert_eq!(tp, TimePeriodParams::TESTNET, "the test network's periods");
    let loc = hsclient::descriptor_location(addr, &tp, now).expect("loc");
    let want = n_hsdirs
        .min(usize::from(HsDirParams::default().n_replicas) * HsDirParams::default().spread_store);
    let mut rev = None;
    for (blinded, hsdirs) in &st.last_upload {
        let mut distinct = hsdirs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), hsdirs.len(), "distinct HSDirs");
        assert_eq!(hsdirs.len(), want, "every HSDir the ring names took it");
        for bytes in fetch_all(net, blinded, hsdirs) {
            assert!(
                !bytes.windows(32).any(|w| w == addr.identity().as_bytes()),
                "the stored descriptor contains the identity key"
            );
            let label = addr.label();
            for needle in [addr.to_string(), label.clone(), label.to_uppercase()] {
                assert!(
                    !bytes.windows(24).any(|w| w == &needle.as_bytes()[..24]),
                    "the stored descriptor contains the address"
                );
            }
            if *blinded == loc.blinded {
                let c = hsclient::open_descriptor(&loc, &bytes, now, None).expect("opens");
                assert_eq!(c.intro_points.len(), 3, "the descriptor lists 3 points");
                rev = Some(revision(&bytes));
            }
        }
    }
    rev.expect("a descriptor for the current period")
}

fn consensus(net: &TestNet) -> allium_directory::doc::Consensus {
    let infos: Vec<_> = net.authorities.iter().map(|a| a.info()).collect();
    let nd = net
        .rt
        .block_on(allium_directory::fetch_consensus(
            &infos,
            allium_directory::now_unix(),
        ))
        .expect("consensus");
    allium_directory::NetDir::new(nd).consensus().clone()
}

fn n_hsdirs(net: &TestNet) -> usize {
    consensus(net)
        .relays
        .iter()
        .filter(|e| {
            e.flags.contains(allium_directory::doc::Flags::HSDIR)
                && e.flags.contains(allium_directory::doc::Flags::RUNNING)
                && e.flags.contains(allium_directory::doc::Flags::VALID)
        })
        .count()
}

#[test]
fn a_proxy_runs_its_onion_service_and_republishes_after_a_restart() {
    init_logging();
    let net = TestNet::start(Options {
        relays: 7,
        ..Options::default()
    });
    let hsdirs = n_hsdirs(&net);
    assert!(hsdirs >= 3, "the test network has HSDirs");
    let data = net.dir.path().join("svc-proxy");
    let key_dir = net.dir.path().join("svc-keys");
    let cfg = service_config(&net, &data, &key_dir);
    let intro_regs = || -> u64 {
        net.relays
            .lock()
            .expect("relays")
            .iter()
            .flatten()
            .map(|r| r.hs_counts().intro_registrations)
            .sum()
    };

    let proxy = net
        .rt
        .block_on(async {
            let p = allium_client::start(cfg.clone()).await?;
            p.wait_ready(Duration::from_secs(30)).await?;
            Ok::<_, allium_client::ClientError>(p)
        })
        .expect("the service's proxy starts");
    let (_, addr) = keys::load_or_create_identity(&key_dir).expect("keys");
    let st = wait_published(&proxy, 0);
    assert_eq!(
        intro_regs(),
        3,
        "three relays act as its introduction points"
    );
    let rev1 = check_published(&net, &st, &addr, hsdirs);
    let page = promtext::check(&proxy.metrics_text()).expect("valid metrics page");
    assert_eq!(
        promtext::value(&page, "allium_onion_service_intro_points", &[]),
        Some(3.0)
    );
    assert!(
        promtext::value(
            &page,
            "allium_onion_service_descriptor_uploads_total",
            &[("outcome", "stored")]
        )
        .is_some_and(|v| v >= (2 * hsdirs.min(8)) as f64)
    );

    // Restart on the same key directory (once the clock has moved past the old revision, as
    // any real restart has).
    net.rt.block_on(proxy.shutdown());
    let end = Instant::now() + WAIT;
    let mut last = rev1;
    // The service may have re-published since `st`: take the newest revision the HSDirs hold.
    for (blinded, ids) in &st.last_upload {
        for b in fetch_all(&net, blinded, ids) {
            last = last.max(revision(&b));
        }
    }
    while allium_directory::now_unix() <= last {
        assert!(Instant::now() < end, "the clock stood still");
        std::thread::sleep(Duration::from_millis(20));
    }
    let proxy = net
        .rt
        .block_on(async {
            let p = allium_client::start(cfg.clone()).await?;
            p.wait_ready(Duration::from_secs(30)).await?;
            Ok::<_, allium_client::ClientError>(p)
        })
        .expect("the service's proxy starts again");
    let (_, addr2) = keys::load_or_create_identity(&key_dir).expect("keys");
    assert_eq!(addr2, addr, "same address after a restart");
    let st2 = wait_published(&proxy, 0);
    let rev2 = check_published(&net, &st2, &addr, hsdirs);
    assert!(
        rev2 > last,
        "a fresh descriptor: revision {rev2} after {last}"
    );
    net.rt.block_on(proxy.shutdown());
}
