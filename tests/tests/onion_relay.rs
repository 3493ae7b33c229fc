//! Introduction and rendezvous points end to end, in memory: real client cores (as client and
//! as service) against real relay cores whose last hops are the same relay, wired by the
//! [`allium_tests::sim::Overlay`] harness, simulated time, no sockets.

use std::time::Duration;

use allium_client::core::{Event, StreamTarget};
use allium_crypto::IdentityKeypair;
use allium_crypto::handshake::HopKeys;
use allium_crypto::relaycell::EndToEndRole;
use allium_proto::cell::DestroyReason;
use allium_proto::relaymsg::{
    Begin, BeginFlags, EstablishIntro, EstablishRendezvous, Introduce, IntroduceStatus, RelayMsg,
    RendCookie, Rendezvous1, Target,
};
use allium_relay::core::HsRole;
use allium_relay::core::intro::IntroRegistry;
use allium_relay::core::rendezvous::RendezvousTable;
use allium_tests::sim::{Overlay, pattern_bytes};

const L: Duration = Duration::from_millis(20);
const SERVICE_INTRO: usize = 0;
const CLIENT_INTRO: usize = 1;
const CLIENT_REND: usize = 2;
const SERVICE_REND: usize = 3;
const CLIENT_INTRO_2: usize = 4;

fn auth() -> IdentityKeypair {
    IdentityKeypair::from_seed(&[0x5e; 32])
}

fn cookie() -> RendCookie {
    RendCookie([0xC0; 20])
}

/// Until hsdesc's INTRODUCE handshake lands, both ends share fixed end-to-end keys.
fn e2e_keys() -> HopKeys {
    HopKeys::dangerously_from_parts([0xA1; 32], [0xB2; 32], [0xC3; 32])
}

fn introduce() -> Introduce {
    Introduce {
        auth_key: auth().public(),
        extensions: vec![],
        client_key: [7; 32],
        encrypted: cookie()
            .0
            .iter()
            .chain([1u8; 100].iter())
            .copied()
            .collect(),
        mac: [9; 32],
    }
}

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

fn establish_intro(o: &mut Overlay, k: usize) {
    let binding = *o.nets[k].client.hop_binding(2).expect("three hops");
    let est = EstablishIntro::new_signed(&auth(), &binding, vec![]).expect("encodes");
    o.nets[k]
        .client
        .send_onion_service(&RelayMsg::EstablishIntro(est))
        .expect("sent");
}

fn ack(o: &Overlay, k: usize) -> Option<IntroduceStatus> {
    hs_msgs(o, k).into_iter().find_map(|m| match m {
        RelayMsg::IntroduceAck(a) => Some(a.status),
        _ => None,
    })
}

/// Intro and rendezvous, then the end-to-end hop on both ends.
fn rendezvous(o: &mut Overlay) {
    establish_intro(o, SERVICE_INTRO);
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, SERVICE_INTRO)
            .iter()
            .any(|m| matches!(m, RelayMsg::IntroEstablished(_)))
    });
    assert_eq!(o.last(SERVICE_INTRO).hs_role(), HsRole::Intro);
    let est = EstablishRendezvous { cookie: cookie() };
    o.nets[CLIENT_REND]
        .client
        .send_onion_service(&RelayMsg::EstablishRendezvous(est))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, CLIENT_REND)
            .iter()
            .any(|m| matches!(m, RelayMsg::RendezvousEstablished(_)))
    });
    o.nets[CLIENT_INTRO]
        .client
        .send_onion_service(&RelayMsg::Introduce1(introduce()))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| ack(o, CLIENT_INTRO).is_some());
    assert_eq!(ack(o, CLIENT_INTRO), Some(IntroduceStatus::SUCCESS));
    let got: Vec<Introduce> = hs_msgs(o, SERVICE_INTRO)
        .into_iter()
        .filter_map(|m| match m {
            RelayMsg::Introduce2(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![introduce()],
        "INTRODUCE2 carries INTRODUCE1 unchanged"
    );

    // The service answers at the rendezvous point and adds the end-to-end hop at once.
    let r1 = Rendezvous1 {
        cookie: cookie(),
        handshake_info: vec![0x42; 64],
    };
    let svc = &mut o.nets[SERVICE_REND].client;
    svc.send_onion_service(&RelayMsg::Rendezvous1(r1))
        .expect("sent");
    svc.add_end_to_end(&e2e_keys(), EndToEndRole::Service)
        .expect("virtual hop");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, CLIENT_REND)
            .iter()
            .any(|m| matches!(m, RelayMsg::Rendezvous2(r) if r.handshake_info == vec![0x42; 64]))
    });
    o.nets[CLIENT_REND]
        .client
        .add_end_to_end(&e2e_keys(), EndToEndRole::Client)
        .expect("virtual hop");
    assert_eq!(o.last(CLIENT_REND).hs_role(), HsRole::Joined);
    assert_eq!(o.last(SERVICE_REND).hs_role(), HsRole::Joined);
    assert_eq!(o.rend.joined(), 1);
}

fn built(n: usize) -> Overlay {
    let mut o = Overlay::new(n, 3, L);
    o.build();
    o
}

#[test]
fn introduce_is_relayed_and_a_replay_refused() {
    let mut o = built(5);
    rendezvous(&mut o);
    assert_eq!(o.intro.registrations(), 1);
    // The same INTRODUCE1 from another client circuit: refused, counted, not relayed.
    o.nets[CLIENT_INTRO_2]
        .client
        .send_onion_service(&RelayMsg::Introduce1(introduce()))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| ack(o, CLIENT_INTRO_2).is_some());
    assert_eq!(ack(&o, CLIENT_INTRO_2), Some(IntroduceStatus::REPLAY));
    assert_eq!(o.intro.replays_refused(), 1);
    let n2 = hs_msgs(&o, SERVICE_INTRO)
        .iter()
        .filter(|m| matches!(m, RelayMsg::Introduce2(_)))
        .count();
    assert_eq!(n2, 1);
    // An unknown auth key: refused with UNKNOWN_SERVICE.
    let mut o = built(3);
    let mut i = introduce();
    i.auth_key = IdentityKeypair::from_seed(&[1; 32]).public();
    o.nets[1]
        .client
        .send_onion_service(&RelayMsg::Introduce1(i))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| ack(o, 1).is_some());
    assert_eq!(ack(&o, 1), Some(IntroduceStatus::UNKNOWN_SERVICE));
}

#[test]
fn data_crosses_the_join_byte_exact_and_the_rendezvous_point_sees_only_ciphertext() {
    let mut o = built(4);
    rendezvous(&mut o);
    let target = StreamTarget::Begin(Begin {
        target: Target::Hostname("service.onion".to_owned()),
        port: 80,
        flags: BeginFlags::default(),
    });
    let sid = o.nets[CLIENT_REND].begin(target);
    o.run_until(Duration::from_secs(5), |o| {
        o.nets[SERVICE_REND]
            .client_events
            .iter()
            .any(|e| matches!(e, Event::IncomingStream { begin, .. } if begin.port == 80))
    });
    let ssid = o.nets[SERVICE_REND]
        .client_events
        .iter()
        .find_map(|e| match e {
            Event::IncomingStream { stream, .. } => Some(*stream),
            _ => None,
        })
        .expect("incoming stream");
    o.nets[SERVICE_REND]
        .client
        .accept_stream(ssid)
        .expect("accepted");
    o.run_until(Duration::from_secs(5), |o| {
        o.nets[CLIENT_REND]
            .client_events
            .iter()
            .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
    });
    let up = pattern_bytes(300_000);
    let down: Vec<u8> = pattern_bytes(400_000).into_iter().rev().collect();
    o.nets[CLIENT_REND].upload(sid, &up);
    o.nets[SERVICE_REND].upload(ssid, &down);
    o.run_until(Duration::from_secs(120), |o| {
        o.nets[SERVICE_REND].received.get(&ssid).map(Vec::len) == Some(up.len())
            && o.nets[CLIENT_REND].received.get(&sid).map(Vec::len) == Some(down.len())
    });
    assert_eq!(o.nets[SERVICE_REND].received[&ssid], up);
    assert_eq!(o.nets[CLIENT_REND].received[&sid], down);
    // The rendezvous relay recognised none of it (no stream there, every cell passed), and no
    // 16-byte run of either stream appears in what it handed across.
    assert_eq!(o.last(CLIENT_REND).n_streams(), 0);
    assert_eq!(o.last(SERVICE_REND).n_streams(), 0);
    assert!(o.crossed.len() > (up.len() + down.len()) / 934);
    for (_, body) in &o.crossed {
        for w in [&up[1000..1016], &down[5000..5016]] {
            assert!(!body.windows(16).any(|x| x == w), "plaintext at the RP");
        }
    }
}

#[test]
fn destroy_on_one_side_tears_down_the_other() {
    let mut o = built(4);
    rendezvous(&mut o);
    o.nets[CLIENT_REND].client.close();
    o.run_until(Duration::from_secs(5), |o| {
        o.nets[SERVICE_REND].client.is_closed()
    });
    assert!(o.last(SERVICE_REND).is_closed());
    assert_eq!(o.rend.joined(), 0);
    assert!(o.joined.is_empty());
}

#[test]
fn limits_and_bad_requests_are_refused() {
    // An ESTABLISH_INTRO MACed for another circuit is refused: no registration, destroyed.
    let mut o = built(2);
    let other = *o.nets[1].client.hop_binding(2).expect("hop");
    let est = EstablishIntro::new_signed(&auth(), &other, vec![]).expect("encodes");
    o.nets[0]
        .client
        .send_onion_service(&RelayMsg::EstablishIntro(est))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| o.nets[0].client.is_closed());
    assert_eq!(o.intro.registrations(), 0);

    // One registration allowed: a second key is refused (RESOURCELIMIT); the same key from a
    // new circuit replaces the old one, which is closed.
    let mut o = Overlay::with_limits(
        3,
        3,
        L,
        IntroRegistry::new(1, 16, Duration::from_secs(60)),
        RendezvousTable::new(1, Duration::from_secs(30), 1),
    );
    o.build();
    establish_intro(&mut o, 0);
    o.run_until(Duration::from_secs(5), |o| o.intro.registrations() == 1);
    let binding = *o.nets[1].client.hop_binding(2).expect("hop");
    let other_key = IdentityKeypair::from_seed(&[0x77; 32]);
    let est = EstablishIntro::new_signed(&other_key, &binding, vec![]).expect("encodes");
    o.nets[1]
        .client
        .send_onion_service(&RelayMsg::EstablishIntro(est))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| o.nets[1].client.is_closed());
    assert_eq!(
        o.nets[1].destroyed.get(&2).copied(),
        Some(DestroyReason::RESOURCELIMIT)
    );
    establish_intro(&mut o, 2);
    o.run_until(Duration::from_secs(5), |o| o.nets[0].client.is_closed());
    assert_eq!(o.intro.registrations(), 1);
    assert_eq!(o.last(2).hs_role(), HsRole::Intro);

    // One waiting cookie allowed; it expires; RENDEZVOUS1 for an unknown cookie is refused.
    let mut o = Overlay::with_limits(
        3,
        3,
        L,
        IntroRegistry::new(1, 16, Duration::from_secs(60)),
        RendezvousTable::new(1, Duration::from_secs(30), 1),
    );
    o.build();
    for k in [0, 1] {
        o.nets[k]
            .client
            .send_onion_service(&RelayMsg::EstablishRendezvous(EstablishRendezvous {
                cookie: RendCookie([k as u8; 20]),
            }))
            .expect("sent");
    }
    o.run_until(Duration::from_secs(5), |o| o.nets[1].client.is_closed());
    assert_eq!(o.rend.waiting(), 1);
    o.nets[2]
        .client
        .send_onion_service(&RelayMsg::Rendezvous1(Rendezvous1 {
            cookie: RendCookie([9; 20]),
            handshake_info: vec![],
        }))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| o.nets[2].client.is_closed());
    assert_eq!(o.rend.joined(), 0);
    let later = o.now() + Duration::from_secs(31);
    assert_eq!(o.rend.expire(later), vec![(0, 0)]);
}

#[test]
fn an_introduction_circuit_is_no_exit_and_no_directory() {
    let mut o = built(1);
    establish_intro(&mut o, 0);
    o.run_until(Duration::from_secs(5), |o| o.intro.registrations() == 1);
    let targets = [
        StreamTarget::Begin(Begin {
            target: Target::Hostname("example.com".to_owned()),
            port: 80,
            flags: BeginFlags::default(),
        }),
        StreamTarget::BeginDir,
    ];
    let sids: Vec<_> = targets.into_iter().map(|t| o.nets[0].begin(t)).collect();
    o.run_until(Duration::from_secs(5), |o| {
        sids.iter().all(|sid| {
            o.nets[0]
                .client_events
                .iter()
                .any(|e| matches!(e, Event::StreamEnded { stream, .. } if stream == sid))
        })
    });
    assert_eq!(o.last(0).n_streams(), 0, "the intro point opened no stream");
    assert!(!o.nets[0].client.is_closed(), "the introduction stays up");
    assert_eq!(o.intro.registrations(), 1);
}
