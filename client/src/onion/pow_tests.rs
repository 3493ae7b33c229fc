//! Proof of work through the whole in-memory exchange: the descriptor carries the puzzle, the
//! client solves it into INTRODUCE1's encrypted part, the service checks it, queues by effort
//! and raises its suggested effort under load.

use std::net::SocketAddr;

use allium_crypto::hs::TimePeriodParams;
use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_proto::relaymsg::{HsExtension, RendCookie};

use super::client::{self, DescLocation};
use super::intro::{IntroPlaintext, PLAINTEXT_LEN, PLAINTEXT_LEN_V1, RendPoint};
use super::pow::{self, PowConfig, PowRefusal, PowSolution};
use super::service::{IntroId, IntroRefusal, IntroRelay, OnionService};
use allium_directory::hs::HsDescContents;

const NOW: u64 = 1_800_000_000;
const TP: TimePeriodParams = TimePeriodParams::TESTNET;

fn relay(n: u8) -> IntroRelay {
    IntroRelay {
        id: IdentityKeypair::from_seed(&[n; 32]).public(),
        link_key: X25519Secret::from_bytes([n.wrapping_add(1); 32]).public(),
        onion_key: X25519Secret::from_bytes([n.wrapping_add(2); 32]).public(),
        addrs: vec![SocketAddr::from(([127, 0, 0, n], 9000 + u16::from(n)))],
    }
}

fn rp() -> RendPoint {
    RendPoint {
        id: IdentityKeypair::from_seed(&[0x99; 32]).public(),
        onion_key: X25519Secret::from_bytes([0x98; 32]).public(),
        addrs: vec![
            SocketAddr::from(([10, 1, 2, 3], 443)),
            "[2001:db8::1]:9001".parse().expect("addr"),
        ],
    }
}

fn pow_service(rate: u32) -> (OnionService, Vec<IntroId>) {
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    let mut s = OnionService::new(IdentityKeypair::from_seed(&[0x22; 32]), ports, vec![], TP)
        .expect("service");
    s.enable_pow(
        PowConfig {
            queue_rate: rate,
            queue_burst: rate,
        },
        NOW,
    );
    let mut ids = Vec::new();
    while s.intro_points_wanted() > 0 {
        ids.push(s.add_intro_point(relay(ids.len() as u8 + 1)));
    }
    for id in &ids {
        s.intro_established(*id);
    }
    (s, ids)
}

/// What a client reads from `s`'s current descriptor.
fn fetch(s: &mut OnionService, now: u64) -> (DescLocation, HsDescContents) {
    let uploads = s.build_descriptors(now).expect("descriptors");
    let loc = client::descriptor_location(s.address(), &TP, now).expect("loc");
    let up = uploads
        .iter()
        .find(|u| u.blinded == loc.blinded)
        .expect("current period");
    let c = client::open_descriptor(&loc, &up.bytes, now, None).expect("opens");
    (loc, c)
}

fn intro1(
    loc: &DescLocation,
    c: &HsDescContents,
    sol: Option<&PowSolution>,
) -> allium_proto::relaymsg::Introduce {
    client::start_introduction_pow(loc, c, 0, rp(), client::new_cookie(), sol)
        .expect("introduction")
        .introduce1
}

#[test]
fn a_solved_introduction_is_accepted_and_bad_ones_refused() {
    let (mut s, ids) = pow_service(100);
    let (loc, c) = fetch(&mut s, NOW);
    let params = c
        .pow
        .clone()
        .expect("the descriptor asks for proof of work");
    assert_eq!(params.scheme, pow::SCHEME_SHA256_V1);
    assert_eq!(params.suggested_effort, 0);
    // Suggested effort 0: the first attempt carries none and is accepted at effort 0.
    assert!(client::solve_pow(&c, 0, 0).is_none());
    let acc = s
        .handle_introduce2_pow(ids[0], &intro1(&loc, &c, None), NOW)
        .expect("accepted");
    assert_eq!(acc.effort, 0);
    // A retry solves at a doubled effort; the service sees that effort.
    let sol = client::solve_pow(&c, 0, 1).expect("solved");
    assert_eq!(sol.effort, pow::client_effort(0, 1));
    let acc = s
        .handle_introduce2_pow(ids[0], &intro1(&loc, &c, Some(&sol)), NOW)
        .expect("accepted");
    assert_eq!(acc.effort, sol.effort);
    // The same solution in a fresh INTRODUCE1 (new handshake, so not an INTRODUCE replay).
    assert_eq!(
        s.handle_introduce2_pow(ids[0], &intro1(&loc, &c, Some(&sol)), NOW)
            .err(),
        Some(IntroRefusal::Pow(PowRefusal::Replay))
    );
    // A solution for another introduction point's auth key.
    let other = client::solve_pow(&c, 1, 1).expect("solved");
    assert_eq!(
        s.handle_introduce2_pow(ids[0], &intro1(&loc, &c, Some(&other)), NOW)
            .err(),
        Some(IntroRefusal::Pow(PowRefusal::Invalid))
    );
    // A seed the service never published.
    let mut forged = c.clone();
    if let Some(p) = forged.pow.as_mut() {
        p.seed = [0xEE; 32];
    }
    let stale = client::solve_pow(&forged, 0, 1).expect("solved");
    assert_eq!(
        s.handle_introduce2_pow(ids[0], &intro1(&loc, &c, Some(&stale)), NOW)
            .err(),
        Some(IntroRefusal::Pow(PowRefusal::StaleSeed))
    );
    // A malformed extension.
    let junk = PowSolution {
        solution: vec![1, 2, 3],
        ..sol
    };
    assert_eq!(
        s.handle_introduce2_pow(ids[0], &intro1(&loc, &c, Some(&junk)), NOW)
            .err(),
        Some(IntroRefusal::Pow(PowRefusal::Invalid))
    );
}

#[test]
fn without_pow_a_solution_is_ignored() {
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    let mut s = OnionService::new(IdentityKeypair::from_seed(&[0x33; 32]), ports, vec![], TP)
        .expect("service");
    let id = s.add_intro_point(relay(1));
    s.intro_established(id);
    let (loc, c) = fetch(&mut s, NOW);
    assert!(c.pow.is_none());
    assert!(!s.pow_enabled());
    let fake = PowSolution {
        scheme: 1,
        nonce: [0; 16],
        effort: 5,
        seed_head: [0; 4],
        solution: vec![],
    };
    let acc = s
        .handle_introduce2_pow(id, &intro1(&loc, &c, Some(&fake)), NOW)
        .expect("accepted");
    assert_eq!(acc.effort, 0);
}

#[test]
fn queued_introductions_are_served_by_effort_and_load_raises_the_effort() {
    let (mut s, ids) = pow_service(2);
    let (loc, c) = fetch(&mut s, NOW);
    assert!(!s.descriptor_due(NOW));
    let t0 = 1_000_000u64;
    // Efforts 0, 16, 64, 32: served 64, 32, 16, 0 (rate 2 per second, burst 2).
    let mut c16 = c.clone();
    let mut queued = vec![];
    for (i, e) in [0u32, 16, 64, 32].into_iter().enumerate() {
        if let Some(p) = c16.pow.as_mut() {
            p.suggested_effort = e;
        }
        let sol = client::solve_pow(&c16, 0, 0);
        let cookie = RendCookie([i as u8; 20]);
        let m = client::start_introduction_pow(&loc, &c, 0, rp(), cookie, sol.as_ref())
            .expect("intro")
            .introduce1;
        assert_eq!(s.queue_introduce2(ids[0], &m, NOW, t0), Ok(None));
        queued.push(cookie);
    }
    assert_eq!(s.queued(), 4);
    let mut served = vec![];
    let mut now_ms = t0;
    while let Some(at) = s.next_rendezvous_at(now_ms) {
        now_ms = at;
        if let Some((id, task)) = s.next_rendezvous(now_ms) {
            assert_eq!(id, ids[0]);
            let allium_proto::relaymsg::RelayMsg::Rendezvous1(r1) = task.rendezvous1 else {
                panic!("not RENDEZVOUS1");
            };
            served.push(r1.cookie);
        }
    }
    assert_eq!(
        served,
        vec![queued[2], queued[3], queued[1], queued[0]],
        "highest effort first"
    );
    assert!(now_ms >= t0 + 1000, "the rate held the last two back");
    // Load: many effort-0 introductions pile up at 2 per second; at the update the suggested
    // effort rises and a new descriptor is due, carrying it.
    for i in 0..40u8 {
        let m = client::start_introduction_pow(&loc, &c, 0, rp(), RendCookie([i; 20]), None)
            .expect("intro")
            .introduce1;
        let _ = s.queue_introduce2(ids[0], &m, NOW + 1, now_ms);
    }
    let later = NOW + pow::UPDATE_PERIOD_SECS;
    assert!(s.pow_tick(later, now_ms + 1));
    assert!(s.suggested_effort().unwrap_or(0) >= 1);
    assert!(s.descriptor_due(later));
    let (_, c2) = fetch(&mut s, later);
    assert_eq!(
        c2.pow.as_ref().map(|p| p.suggested_effort),
        s.suggested_effort()
    );
    assert!(!s.pow_tick(later + 1, now_ms + 2), "nothing new");
    // Drained and quiet for a long while: it decays to 0 again.
    let mut t = later;
    let mut ms = now_ms + 2;
    for _ in 0..20 {
        while s.next_rendezvous(ms).is_some() {}
        t += pow::UPDATE_PERIOD_SECS;
        ms += pow::UPDATE_PERIOD_SECS * 1000;
        while s.next_rendezvous(ms).is_some() {}
        s.pow_tick(t, ms);
    }
    assert_eq!(s.suggested_effort(), Some(0));
}

#[test]
fn the_plaintext_carries_encrypted_extensions_and_old_ones_still_parse() {
    let p = IntroPlaintext {
        cookie: RendCookie([0xC0; 20]),
        rend_point: rp(),
    };
    let sol = PowSolution {
        scheme: 1,
        nonce: [5; 16],
        effort: 1234,
        seed_head: [9, 8, 7, 6],
        solution: vec![],
    };
    let b = p.encode_with(&[sol.to_extension()]).expect("encodes");
    assert_eq!(b.len(), PLAINTEXT_LEN);
    // After the two addresses (86 + 7 + 19 = 112): n_ext, then type 2, length 25, value.
    assert_eq!(b[112], 1);
    assert_eq!(b[113], HsExtension::POW);
    assert_eq!(b[114], 25);
    assert_eq!(&b[115..140], &sol.to_extension().value[..]);
    assert!(b[140..].iter().all(|&x| x == 0));
    let (q, ext) = IntroPlaintext::decode_with(&b).expect("decodes");
    assert_eq!(q, p);
    assert_eq!(ext.len(), 1);
    assert_eq!(PowSolution::from_extension(&ext[0]), Ok(sol));
    // The first layout (128 bytes, zero padding) reads as no extensions.
    let old = p.encode().expect("encodes");
    let (q, ext) = IntroPlaintext::decode_with(&old[..PLAINTEXT_LEN_V1]).expect("decodes");
    assert_eq!((q, ext.len()), (p.clone(), 0));
    // Too many extension bytes: refused, not truncated.
    let big = HsExtension {
        ty: 9,
        value: vec![1; 80],
    };
    assert!(p.encode_with(&[big]).is_err());
    // An extension running past the end: refused.
    let mut cut = b.clone();
    cut[114] = 255;
    assert!(IntroPlaintext::decode_with(&cut).is_err());
}

fn cookie(i: u32) -> RendCookie {
    let mut c = [0u8; 20];
    c[..4].copy_from_slice(&i.to_be_bytes());
    RendCookie(c)
}

fn served_cookie(task: super::service::RendezvousTask) -> RendCookie {
    let allium_proto::relaymsg::RelayMsg::Rendezvous1(r1) = task.rendezvous1 else {
        panic!("not RENDEZVOUS1");
    };
    r1.cookie
}

#[test]
fn a_low_effort_flood_does_not_delay_a_costlier_introduction() {
    // Served at 10 per second (burst 10); the queue holds what it serves in 30 s (300).
    let (mut s, ids) = pow_service(10);
    let (loc, c) = fetch(&mut s, NOW);
    let mut ms = 5_000u64;
    // 250 introductions without proof within one second, through all three points.
    for i in 0..250u32 {
        let which = i as usize % ids.len();
        let m = client::start_introduction_pow(&loc, &c, which, rp(), cookie(i), None)
            .expect("intro")
            .introduce1;
        assert_eq!(s.queue_introduce2(ids[which], &m, NOW, ms), Ok(None));
        ms += 4;
    }
    // The rate lets the burst and one second's worth through; the rest of the flood waits.
    let mut early = 0;
    while s.next_rendezvous(ms).is_some() {
        early += 1;
    }
    assert!((10..=20).contains(&early), "{early} served at once");
    let waiting = s.queued();
    assert_eq!(waiting, 250 - early);
    // A client paying effort 16 arrives behind the whole flood.
    let sol = client::solve_pow(&c, 0, 1).expect("solved");
    assert_eq!(sol.effort, 16);
    let vip = cookie(0xFFFF_FFFF);
    let m = client::start_introduction_pow(&loc, &c, 0, rp(), vip, Some(&sol))
        .expect("intro")
        .introduce1;
    assert_eq!(s.queue_introduce2(ids[0], &m, NOW, ms), Ok(None));
    // It is the next one served, as soon as the rate allows one (within 1/rate), not after
    // the 25 s the flood ahead of it takes.
    let at = s.next_rendezvous_at(ms).expect("queued");
    assert!(at <= ms + 100, "served at +{} ms", at - ms);
    let (_, task) = s.next_rendezvous(at).expect("served");
    assert_eq!(served_cookie(task), vip);
    // Then the flood, oldest first.
    let (_, task) = s
        .next_rendezvous(at + 100)
        .expect("the flood goes on being served");
    assert_eq!(served_cookie(task), cookie(early as u32));
    assert_eq!(s.queued(), waiting - 1);
}

#[test]
fn a_client_refused_under_load_retries_with_more_work_and_is_served_first() {
    use super::client::{IntroFailure, MAX_POW_ATTEMPTS, PowRetry};
    // Served at 1 per second: the queue holds 30 (its floor is 16, its size 30 s of service).
    let (mut s, ids) = pow_service(1);
    // The client's copy of the descriptor was fetched before the load: it suggests 0.
    let (loc, c) = fetch(&mut s, NOW);
    let ms = 1_000u64;
    // A flood paying effort 8 fills the queue.
    let mut paid = c.clone();
    if let Some(p) = paid.pow.as_mut() {
        p.suggested_effort = 8;
    }
    for i in 0..30u32 {
        let sol = client::solve_pow(&paid, 0, 0).expect("solved");
        let m = client::start_introduction_pow(&loc, &c, 0, rp(), cookie(i), Some(&sol))
            .expect("intro")
            .introduce1;
        assert_eq!(s.queue_introduce2(ids[0], &m, NOW, ms), Ok(None));
    }
    // First attempt: the descriptor's effort, 0 (no proof); the full queue drops it, so no
    // rendezvous ever comes.
    let mut retry = PowRetry::new(&c);
    assert!(retry.enabled());
    assert_eq!(retry.effort(), 0);
    assert!(client::solve_pow(&c, 0, retry.attempt()).is_none());
    let me = cookie(1_000_000);
    let m = client::start_introduction_pow(&loc, &c, 0, rp(), me, None)
        .expect("intro")
        .introduce1;
    assert_eq!(
        s.queue_introduce2(ids[0], &m, NOW, ms),
        Err(IntroRefusal::QueueFull)
    );
    // The client introduces again, paying more than the flood.
    assert!(retry.after_failure(IntroFailure::NoRendezvous));
    assert_eq!(retry.effort(), pow::client_effort(0, 1));
    assert!(retry.effort() > 8);
    let sol = client::solve_pow(&c, 0, retry.attempt()).expect("solved");
    assert_eq!(sol.effort, retry.effort());
    let m = client::start_introduction_pow(&loc, &c, 0, rp(), me, Some(&sol))
        .expect("intro")
        .introduce1;
    assert_eq!(
        s.queue_introduce2(ids[0], &m, NOW, ms),
        Ok(Some(ids[0])),
        "an effort-8 introduction made room"
    );
    let (_, task) = s.next_rendezvous(ms).expect("served");
    assert_eq!(served_cookie(task), me, "served before the flood");
    // The schedule ends after MAX_POW_ATTEMPTS introductions.
    let mut n = 2;
    while retry.after_failure(IntroFailure::Refused) {
        n += 1;
    }
    assert_eq!(n, MAX_POW_ATTEMPTS);
}

#[test]
fn the_retry_schedule_raises_the_effort_only_where_work_can_help() {
    use super::client::{IntroFailure, MAX_POW_ATTEMPTS, PowRetry};
    let (mut s, _) = pow_service(10);
    let (_, mut c) = fetch(&mut s, NOW);
    if let Some(p) = c.pow.as_mut() {
        p.suggested_effort = 100;
    }
    let mut r = PowRetry::new(&c);
    let mut efforts = vec![r.effort()];
    // An unreachable introduction point is no reason to pay more.
    assert!(!r.after_failure(IntroFailure::Unreachable));
    assert_eq!(r.effort(), 100);
    while r.after_failure(IntroFailure::NoRendezvous) {
        efforts.push(r.effort());
    }
    assert_eq!(efforts, vec![100, 200, 400]);
    assert_eq!(efforts.len() as u32, MAX_POW_ATTEMPTS);
    // No puzzle in the descriptor (or one this client does not know): one introduction, no
    // proof.
    for pow in [
        None,
        c.pow
            .clone()
            .map(|p| allium_directory::hs::PowParams { scheme: 9, ..p }),
    ] {
        let mut plain = c.clone();
        plain.pow = pow;
        let mut r = PowRetry::new(&plain);
        assert!(!r.enabled());
        assert_eq!(r.effort(), 0);
        assert!(!r.after_failure(IntroFailure::Refused));
        assert!(!r.after_failure(IntroFailure::NoRendezvous));
    }
}
