//! Measured weights, the unmeasured cap, the per-address limit, flags from uptime history, and
//! the position weights of dir-spec §3.8.3, without a network.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use allium_crypto::{IdentityKeypair, RelayId};
use allium_directory::authority::AuthorityConfig;
use allium_directory::authority::compute::{
    bandwidth_weights, compute_consensus, low_median, position_weights,
};
use allium_directory::authority::vote::{Measurements, RelayHistory, build_vote_with};
use allium_directory::doc::consensus::{BANDWIDTH_WEIGHT_NAMES, WEIGHT_SCALE};
use allium_directory::doc::{BandwidthFile, Flags, Signed, VerifiedDescriptor, Vote};
use common::Relay;

const NOW: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

fn cfg() -> AuthorityConfig {
    let mut c = AuthorityConfig::new(
        PathBuf::from("/nonexistent"),
        "127.0.0.1:1".parse().expect("addr"),
        vec![],
    );
    c.allow_private_addresses = true;
    c
}

struct Setup {
    relays: Vec<Relay>,
    descs: BTreeMap<RelayId, VerifiedDescriptor>,
    hist: BTreeMap<RelayId, RelayHistory>,
}

/// `n` relays; relay i advertises `adv(i)` bytes/s, is on `addr(i)`, exits when `exit(i)`, and
/// has been up (probed every hour) for `up_days(i)` days.
fn setup(
    n: usize,
    adv: impl Fn(usize) -> u64,
    addr: impl Fn(usize) -> [u8; 4],
    exit: impl Fn(usize) -> bool,
    up_days: impl Fn(usize) -> u64,
) -> Setup {
    let mut relays = Vec::new();
    let mut descs = BTreeMap::new();
    let mut hist = BTreeMap::new();
    for i in 0..n {
        let mut r = Relay::new(9000 + i as u16);
        r.addr = SocketAddr::from((addr(i), 9000 + i as u16));
        let mut d = r.desc(NOW - 10, exit(i));
        d.bandwidth_observed = adv(i);
        let v = Signed::sign(&d, &r.id)
            .expect("sign")
            .verify()
            .expect("verify");
        descs.insert(d.identity, v);
        let start = NOW - up_days(i) * DAY;
        let mut h = RelayHistory::new(start);
        let mut t = start;
        while t <= NOW {
            h.record_with(true, t, 12 * 3600);
            t += 3600;
        }
        hist.insert(d.identity, h);
        relays.push(r);
    }
    Setup {
        relays,
        descs,
        hist,
    }
}

fn vote(c: &AuthorityConfig, s: &Setup, m: &Measurements, by: &IdentityKeypair) -> Vote {
    build_vote_with(c, by.public(), &s.descs, &s.hist, m, NOW, NOW)
}

fn entry<'a>(v: &'a Vote, r: &Relay) -> &'a allium_directory::doc::VoteEntry {
    v.relays
        .iter()
        .find(|e| e.entry.identity == r.id.public())
        .expect("listed")
}

#[test]
fn low_median_picks_lower_middle() {
    assert_eq!(low_median::<u32>(&mut []), None);
    assert_eq!(low_median(&mut [5]), Some(5));
    assert_eq!(low_median(&mut [9, 1]), Some(1));
    assert_eq!(low_median(&mut [30, 10, 20]), Some(20));
    assert_eq!(low_median(&mut [4, 1, 3, 2]), Some(2));
}

#[test]
fn measured_median_bounded_by_advertised_and_unmeasured_capped() {
    // Relay 0 claims 10 GB/s, relay 1 honest 2 MB/s, relay 2 unmeasured, 3 MB/s claimed.
    let s = setup(
        3,
        |i| [10_000_000_000, 2_000_000, 3_000_000][i],
        |i| [11, 0, 0, i as u8 + 1],
        |_| false,
        |_| 10,
    );
    let c = cfg();
    let auths: Vec<IdentityKeypair> = (0..3).map(|_| IdentityKeypair::generate()).collect();
    let liar = s.relays[0].id.public();
    let honest = s.relays[1].id.public();
    // Three scanners measure the liar at 300, 500, 100 kB/s and the honest one at 5000 (above
    // its claim of 2000).
    let ms: Vec<Measurements> = [(300, 5000), (500, 5000), (100, 5000)]
        .iter()
        .map(|&(a, b)| BTreeMap::from([(liar, a), (honest, b)]))
        .collect();
    let votes: Vec<Vote> = (0..3).map(|i| vote(&c, &s, &ms[i], &auths[i])).collect();
    let e = entry(&votes[0], &s.relays[0]);
    assert!(e.entry.measured);
    assert_eq!(e.entry.weight, 300);
    assert_eq!(
        e.advertised, 10_000_000,
        "self-reported, capped at max_weight_kbps"
    );
    assert_eq!(votes[0].params.get("maxunmeasuredbw"), Some(&20));

    let refs: Vec<&Vote> = votes.iter().collect();
    let cons = compute_consensus(&refs, 3, NOW);
    let get = |id: RelayId| cons.relays.iter().find(|r| r.identity == id).expect("in");
    let l = get(liar);
    assert!(l.measured);
    assert_eq!(l.weight, 300, "low median of 100, 300, 500");
    let h = get(honest);
    assert!(h.measured);
    assert_eq!(h.weight, 2000, "the self-reported value is an upper bound");
    let u = get(s.relays[2].id.public());
    assert!(!u.measured);
    assert_eq!(u.weight, 20, "unmeasured: capped at maxunmeasuredbw");

    // One measured vote out of three configured authorities is not enough: capped.
    let votes1 = [
        vote(&c, &s, &ms[0], &auths[0]),
        vote(&c, &s, &Measurements::new(), &auths[1]),
        vote(&c, &s, &Measurements::new(), &auths[2]),
    ];
    let refs1: Vec<&Vote> = votes1.iter().collect();
    let cons1 = compute_consensus(&refs1, 3, NOW);
    let l1 = cons1
        .relays
        .iter()
        .find(|r| r.identity == liar)
        .expect("in");
    assert!(!l1.measured);
    assert_eq!(l1.weight, 20);

    // A different cap voted by the majority applies.
    let mut c2 = cfg();
    c2.max_unmeasured_bw = 50_000;
    let votes2: Vec<Vote> = (0..3)
        .map(|i| vote(&c2, &s, &Measurements::new(), &auths[i]))
        .collect();
    let refs2: Vec<&Vote> = votes2.iter().collect();
    let cons2 = compute_consensus(&refs2, 3, NOW);
    assert!(cons2.relays.iter().all(|r| r.weight == 50 && !r.measured));
}

#[test]
fn unmeasured_liar_gets_no_fast_or_guard_from_its_claim() {
    // Ten honest relays measured at 1 MB/s; one unmeasured liar claiming 1 GB/s.
    let s = setup(
        11,
        |i| if i == 10 { 1_000_000_000 } else { 1_000_000 },
        |i| [11, 0, i as u8, 1],
        |_| false,
        |_| 30,
    );
    let c = cfg();
    let m: Measurements = s.relays[..10]
        .iter()
        .map(|r| (r.id.public(), 1000))
        .collect();
    let v = vote(&c, &s, &m, &IdentityKeypair::generate());
    let liar = entry(&v, &s.relays[10]);
    assert!(liar.entry.flags.contains(Flags::RUNNING));
    assert!(!liar.entry.flags.contains(Flags::FAST), "20 kB/s credited");
    assert!(!liar.entry.flags.contains(Flags::GUARD));
    let honest = entry(&v, &s.relays[0]);
    for f in [Flags::FAST, Flags::STABLE, Flags::GUARD, Flags::HSDIR] {
        assert!(honest.entry.flags.contains(f), "{f:?}");
    }
}

#[test]
fn at_most_two_relays_per_address_keep_the_best_measured() {
    // Four relays on 11.0.0.1, one elsewhere.
    let s = setup(
        5,
        |_| 5_000_000,
        |i| if i < 4 { [11, 0, 0, 1] } else { [12, 0, 0, 1] },
        |_| false,
        |_| 10,
    );
    let mut c = cfg();
    let m: Measurements = s
        .relays
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.public(), [100, 400, 300, 200, 50][i]))
        .collect();
    let v = vote(&c, &s, &m, &IdentityKeypair::generate());
    let running: Vec<bool> = s
        .relays
        .iter()
        .map(|r| entry(&v, r).entry.flags.contains(Flags::RUNNING))
        .collect();
    assert_eq!(running, [false, true, true, false, true]);
    assert!(!entry(&v, &s.relays[0]).entry.flags.contains(Flags::VALID));
    // Dropped from the consensus.
    let cons = compute_consensus(&[&v], 1, NOW);
    assert_eq!(cons.relays.len(), 3);
    // 0 = no limit.
    c.max_relays_per_addr = 0;
    let v = vote(&c, &s, &m, &IdentityKeypair::generate());
    assert!(
        v.relays
            .iter()
            .all(|e| e.entry.flags.contains(Flags::RUNNING))
    );
}

#[test]
fn stable_and_guard_follow_uptime_history() {
    // Relay 0: up 30 days. Relay 1: flaps every hour (MTBF 1 h, WFU 50%). Relay 2: new (1 day).
    let mut s = setup(3, |_| 5_000_000, |i| [11, i as u8, 0, 1], |_| false, |_| 30);
    let flapper = s.relays[1].id.public();
    let mut h = RelayHistory::new(NOW - 30 * DAY);
    let mut t = NOW - 30 * DAY;
    let mut up = true;
    while t <= NOW {
        h.record_with(up, t, 12 * 3600);
        up = !up;
        t += 3600;
    }
    if !h.is_running() {
        h.record_with(true, NOW, 12 * 3600);
    }
    s.hist.insert(flapper, h);
    let newbie = s.relays[2].id.public();
    let mut n = RelayHistory::new(NOW - DAY);
    n.record_with(true, NOW - DAY, 12 * 3600);
    n.record_with(true, NOW, 12 * 3600);
    s.hist.insert(newbie, n);
    let c = cfg();
    let m: Measurements = s.relays.iter().map(|r| (r.id.public(), 5000)).collect();
    let v = vote(&c, &s, &m, &IdentityKeypair::generate());
    let f = |i: usize| entry(&v, &s.relays[i]).entry.flags;
    assert!(f(0).contains(Flags::STABLE | Flags::GUARD | Flags::HSDIR));
    assert!(f(1).contains(Flags::RUNNING));
    assert!(
        !f(1).contains(Flags::STABLE),
        "MTBF 1 h is below the median"
    );
    assert!(!f(1).contains(Flags::GUARD));
    assert!(!f(1).contains(Flags::HSDIR), "up for less than 96 h");
    assert!(
        f(2).contains(Flags::STABLE),
        "its one run is 1 day: median MTBF"
    );
    assert!(
        !f(2).contains(Flags::GUARD),
        "known for 1 day, below the median"
    );
    assert!(!f(2).contains(Flags::HSDIR));
}

fn check_sums(w: &allium_directory::authority::compute::PositionWeights) {
    let s = i64::from(WEIGHT_SCALE);
    for v in [w.wgg, w.wgd, w.wmg, w.wme, w.wmd, w.wee, w.wed] {
        assert!((0..=s).contains(&v), "{w:?}");
    }
    // Each relay class is used in some position with total weight about 1.
    assert!((w.wgg + w.wmg - s).abs() <= 1, "{w:?}");
    assert!((w.wee + w.wme - s).abs() <= 1, "{w:?}");
    assert!((w.wgd + w.wmd + w.wed - s).abs() <= 2, "{w:?}");
}

#[test]
fn position_weight_cases() {
    let s = i64::from(WEIGHT_SCALE);
    // Case 1: neither scarce. G=40 M=10 E=40 D=10.
    let w = position_weights(40, 10, 40, 10).expect("case 1");
    assert_eq!(w.case, "1");
    assert_eq!((w.wgd, w.wed, w.wmd), (s / 3, s / 3, s / 3));
    assert_eq!(w.wee, s * 90 / 120);
    assert_eq!(w.wmg, s * 30 / 120);
    check_sums(&w);
    // Case 2a: both scarce, R+D < S. G=20 M=70 E=5 D=5: exits rarer, D all to exits.
    let w = position_weights(20, 70, 5, 5).expect("2a");
    assert_eq!(w.case, "2a");
    assert_eq!((w.wgg, w.wee, w.wed, w.wgd, w.wmd), (s, s, s, 0, 0));
    let w = position_weights(5, 70, 20, 5).expect("2a");
    assert_eq!((w.wed, w.wgd), (0, s));
    // Case 2b1: both scarce, R+D >= S, balanced solution in range. G=30 M=10 E=25 D=35.
    let w = position_weights(30, 10, 25, 35).expect("2b");
    assert_eq!(w.case, "2b1");
    assert_eq!(w.wgg, s);
    assert_eq!(w.wmd, w.wgd);
    check_sums(&w);
    // Case 2b2: both scarce, the balanced solution out of range. G=10 M=30 E=30 D=30.
    let w = position_weights(10, 30, 30, 30).expect("2b2");
    assert_eq!(w.case, "2b2");
    assert_eq!((w.wgg, w.wee, w.wme, w.wmg), (s, s, 0, 0));
    assert!(w.wmd >= 0);
    // Case 2b3: too much middle. G=30 M=50 E=10 D=20.
    let w = position_weights(30, 50, 10, 20).expect("2b3");
    assert_eq!(w.case, "2b3");
    assert_eq!(w.wmd, 0);
    assert_eq!(w.wgd, s - w.wed);
    // Case 3a, guards scarce: G=10 M=30 E=55 D=5.
    let w = position_weights(10, 30, 55, 5).expect("3a");
    assert_eq!(w.case, "3a (guards scarce)");
    assert_eq!((w.wgg, w.wgd, w.wme), (s, s, s * 25 / 110));
    check_sums(&w);
    // Case 3a, exits scarce, and G < M: Wmg = 0.
    let w = position_weights(35, 55, 5, 5).expect("3a");
    assert_eq!(w.case, "3a (exits scarce)");
    assert_eq!((w.wee, w.wed, w.wmg), (s, s, 0));
    // Case 3b, guards scarce: G=20 M=20 E=40 D=20.
    let w = position_weights(20, 20, 40, 20).expect("3b");
    assert_eq!(w.case, "3b (guards scarce)");
    assert_eq!(w.wgg, s);
    assert_eq!(w.wed, w.wmd);
    check_sums(&w);
    // Case 3b, exits scarce: G=40 M=20 E=20 D=20.
    let w = position_weights(40, 20, 20, 20).expect("3b");
    assert_eq!(w.case, "3b (exits scarce)");
    assert_eq!(w.wee, s);
    assert_eq!(w.wgd, w.wmd);
    check_sums(&w);
    // Degenerate totals give no weights.
    assert!(position_weights(0, 0, 0, 0).is_none());
}

#[test]
fn consensus_carries_named_weights() {
    let s = setup(
        6,
        |_| 2_000_000,
        |i| [11, i as u8, 0, 1],
        |i| i % 2 == 0,
        |_| 30,
    );
    let c = cfg();
    let m: Measurements = s
        .relays
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.public(), 100 * (i as u32 + 1)))
        .collect();
    let v = vote(&c, &s, &m, &IdentityKeypair::generate());
    let cons = compute_consensus(&[&v], 1, NOW);
    let names: Vec<&str> = cons.bandwidth_weights.keys().map(String::as_str).collect();
    assert_eq!(names, BANDWIDTH_WEIGHT_NAMES);
    assert_eq!(cons.bandwidth_weights, bandwidth_weights(&cons.relays));
    assert_eq!(cons.bandwidth_weights["Wmm"], WEIGHT_SCALE);
    // The consensus with weights is a valid document (signs, verifies, decodes).
    let a = IdentityKeypair::generate();
    Signed::sign(&cons, &a).expect("consensus with weights is valid");
    let mut bad = cons.clone();
    bad.bandwidth_weights.insert("Wxx".into(), 1);
    assert!(Signed::sign(&bad, &a).is_err());
    let mut bad = cons;
    bad.bandwidth_weights.insert("Wgg".into(), WEIGHT_SCALE + 1);
    assert!(Signed::sign(&bad, &a).is_err());
}

#[test]
fn bandwidth_file_feeds_the_vote() {
    let s = setup(2, |_| 9_000_000, |i| [11, i as u8, 0, 1], |_| false, |_| 3);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bw");
    let text = format!(
        "{NOW}\nversion=1.0.0\n=====\nnode_id=${} bw=777\n",
        s.relays[0].id.public().to_hex()
    );
    std::fs::write(&path, text).expect("write");
    let mut c = cfg();
    c.bandwidth_file = Some(path.clone());
    let m = allium_directory::authority::vote::load_measurements(&c, NOW + 10);
    assert_eq!(m.get(&s.relays[0].id.public()), Some(&777));
    assert_eq!(m.len(), 1);
    // Stale file: nothing.
    c.bandwidth_file_max_age_secs = 5;
    assert!(allium_directory::authority::vote::load_measurements(&c, NOW + 10).is_empty());
    // Missing or garbage file: nothing (and no panic).
    std::fs::write(&path, b"\xff\xff").expect("write");
    assert!(allium_directory::authority::vote::load_measurements(&c, NOW).is_empty());
    assert!(BandwidthFile::load(&dir.path().join("missing")).is_err());
}
