//! Onion-service proof of work over real cores in the simulated overlay: a service with proof of
//! work on publishes the puzzle, a client solves it into INTRODUCE1, a real introduction point
//! relays it, and the service checks the proof and queues the introduction by its effort; a proof
//! for a seed the service never published is refused. Simulated time, no sockets.

use std::time::Duration;

use allium_client::core::Event;
use allium_client::onion::client as hsclient;
use allium_client::onion::intro::RendPoint;
use allium_client::onion::pow::{self, PowConfig, PowRefusal};
use allium_client::onion::service::IntroRefusal;
use allium_client::onion::{IntroRelay, OnionService};
use allium_crypto::hs::TimePeriodParams;
use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_proto::relaymsg::{Introduce, IntroduceStatus, RelayMsg};
use allium_tests::sim::Overlay;

const L: Duration = Duration::from_millis(20);
const TP: TimePeriodParams = TimePeriodParams::TESTNET;
const NOW: u64 = 1_800_000_000;

fn hs_msgs(o: &Overlay, k: usize) -> Vec<RelayMsg> {
    o.nets[k]
        .client_events
        .iter()
        .filter_map(|e| match e {
            Event::OnionService { msg } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn intro2s(o: &Overlay, k: usize) -> Vec<Introduce> {
    hs_msgs(o, k)
        .into_iter()
        .filter_map(|m| match m {
            RelayMsg::Introduce2(i) => Some(i),
            _ => None,
        })
        .collect()
}

/// Send `m` as INTRODUCE1 on client circuit `k`, wait for the ACK, return the INTRODUCE2 the
/// service's circuit 0 got.
fn introduce(o: &mut Overlay, k: usize, m: &Introduce) -> Introduce {
    let before = intro2s(o, 0).len();
    o.nets[k]
        .client
        .send_onion_service(&RelayMsg::Introduce1(m.clone()))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| intro2s(o, 0).len() > before);
    let ack = hs_msgs(o, k).into_iter().find_map(|m| match m {
        RelayMsg::IntroduceAck(a) => Some(a.status),
        _ => None,
    });
    assert_eq!(ack, Some(IntroduceStatus::SUCCESS));
    intro2s(o, 0).pop().expect("INTRODUCE2")
}

#[test]
fn a_proof_of_work_travels_through_a_real_introduction_point() {
    let mut o = Overlay::new(3, 3, L);
    o.build();
    let r = &o.nets[0].relays[2];
    let t = r.target();
    let relay = IntroRelay {
        id: r.id,
        link_key: X25519Secret::from_bytes([0x4C; 32]).public(),
        onion_key: t.onion_key,
        addrs: vec![r.addr],
    };
    let rp = RendPoint {
        id: r.id,
        onion_key: t.onion_key,
        addrs: vec![r.addr],
    };
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    let mut svc = OnionService::new(IdentityKeypair::generate(), ports, vec![], TP).expect("svc");
    svc.enable_pow(PowConfig::default(), NOW);
    // One introduction point, on circuit 0.
    let id = svc.add_intro_point(relay);
    let binding = *o.nets[0].client.hop_binding(2).expect("three hops");
    let msg = svc.establish_intro(id, &binding).expect("ESTABLISH_INTRO");
    o.nets[0].client.send_onion_service(&msg).expect("sent");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, 0)
            .iter()
            .any(|m| matches!(m, RelayMsg::IntroEstablished(_)))
    });
    svc.intro_established(id);
    let uploads = svc.build_descriptors(NOW).expect("descriptors");
    let loc = hsclient::descriptor_location(svc.address(), &TP, NOW).expect("loc");
    let up = uploads
        .iter()
        .find(|u| u.blinded == loc.blinded)
        .expect("current period");
    let contents = hsclient::open_descriptor(&loc, &up.bytes, NOW, None).expect("opens");
    assert!(contents.pow.is_some(), "the descriptor carries the puzzle");

    // A retry's proof (effort doubled from the minimum) is accepted at that effort.
    let sol = hsclient::solve_pow(&contents, 0, 2).expect("solved");
    assert_eq!(sol.effort, pow::client_effort(0, 2));
    let cookie = hsclient::new_cookie();
    let intro =
        hsclient::start_introduction_pow(&loc, &contents, 0, rp.clone(), cookie, Some(&sol))
            .expect("INTRODUCE1");
    let m2 = introduce(&mut o, 1, &intro.introduce1);
    assert_eq!(svc.queue_introduce2(id, &m2, NOW, 0), Ok(None));
    let (from, task) = svc.next_rendezvous(0).expect("served");
    assert_eq!(from, id);
    let RelayMsg::Rendezvous1(r1) = task.rendezvous1 else {
        panic!("not RENDEZVOUS1");
    };
    assert_eq!(r1.cookie, cookie);

    // A proof for a seed the service never published: refused after the handshake opens.
    let mut forged = contents.clone();
    if let Some(p) = forged.pow.as_mut() {
        p.seed = [0xAB; 32];
    }
    let bad = hsclient::solve_pow(&forged, 0, 1).expect("solved");
    let intro = hsclient::start_introduction_pow(
        &loc,
        &contents,
        0,
        rp,
        hsclient::new_cookie(),
        Some(&bad),
    )
    .expect("INTRODUCE1");
    let m2 = introduce(&mut o, 2, &intro.introduce1);
    assert_eq!(
        svc.queue_introduce2(id, &m2, NOW, 10),
        Err(IntroRefusal::Pow(PowRefusal::StaleSeed))
    );
    assert_eq!(svc.queued(), 0);
}
