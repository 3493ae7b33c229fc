//! Onion services end to end in the simulated overlay: the service and client logic of
//! `allium_client::onion` driving real client cores (as service and as client) against a real
//! relay core that is at once introduction point, rendezvous point and (as a map here) HSDir.
//! Simulated time, no sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use allium_client::core::{Event, StreamTarget};
use allium_client::onion::client::{self as hsclient, OnionError};
use allium_client::onion::intro::RendPoint;
use allium_client::onion::service::{DescUpload, IntroRefusal};
use allium_client::onion::{IntroId, IntroRelay, OnionService, keys};
use allium_crypto::hs::{BlindedPublicKey, HsAddress, TimePeriodParams};
use allium_crypto::relaycell::EndToEndRole;
use allium_crypto::{X25519Public, X25519Secret};
use allium_directory::hs::UncheckedHsDesc;
use allium_proto::relaymsg::{
    Begin, BeginFlags, EndReason, EstablishRendezvous, IntroduceStatus, RelayMsg, Target,
};
use allium_tests::sim::{Overlay, pattern_bytes};

const L: Duration = Duration::from_millis(20);
const TP: TimePeriodParams = TimePeriodParams::TESTNET;
const NOW: u64 = 1_800_000_000;
/// Circuits: three service introduction circuits, then per connection attempt a client
/// introduction circuit, a client rendezvous circuit and a service rendezvous circuit.
const N_INTRO: usize = 3;

/// The HSDir, as a map: keeps the highest revision per blinded key, as the relay's store does.
#[derive(Default)]
struct HsDir(HashMap<BlindedPublicKey, Vec<u8>>);

impl HsDir {
    fn store(&mut self, up: &DescUpload) {
        let rev = |b: &[u8]| {
            UncheckedHsDesc::parse(b)
                .expect("parses")
                .check(NOW)
                .expect("verifies")
                .revision()
        };
        let newer = self
            .0
            .get(&up.blinded)
            .is_none_or(|old| rev(&up.bytes) > rev(old));
        if newer {
            self.0.insert(up.blinded, up.bytes.clone());
        }
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

/// The relay all circuits end at, as a descriptor or an INTRODUCE names it.
fn shared_relay(o: &Overlay) -> (IntroRelay, RendPoint) {
    let r = &o.nets[0].relays[2];
    let t = r.target();
    (
        IntroRelay {
            id: r.id,
            link_key: X25519Secret::from_bytes([0x4C; 32]).public(),
            onion_key: t.onion_key,
            addrs: vec![r.addr],
        },
        RendPoint {
            id: r.id,
            onion_key: t.onion_key,
            addrs: vec![r.addr],
        },
    )
}

/// Set up the three introduction points on circuits `base..base+3` and publish.
fn start_service(
    o: &mut Overlay,
    svc: &mut OnionService,
    base: usize,
    dir: &mut HsDir,
    now: u64,
) -> Vec<IntroId> {
    let (relay, _) = shared_relay(o);
    let mut ids = Vec::new();
    for k in base..base + N_INTRO {
        let id = svc.add_intro_point(relay.clone());
        let binding = *o.nets[k].client.hop_binding(2).expect("three hops");
        let msg = svc.establish_intro(id, &binding).expect("ESTABLISH_INTRO");
        o.nets[k].client.send_onion_service(&msg).expect("sent");
        ids.push(id);
    }
    assert_eq!(svc.intro_points_wanted(), 0);
    o.run_until(Duration::from_secs(5), |o| {
        (base..base + N_INTRO).all(|k| {
            hs_msgs(o, k)
                .iter()
                .any(|m| matches!(m, RelayMsg::IntroEstablished(_)))
        })
    });
    for id in &ids {
        svc.intro_established(*id);
    }
    assert!(svc.descriptor_due(now));
    for up in svc.build_descriptors(now).expect("descriptors") {
        dir.store(&up);
    }
    ids
}

/// A connected rendezvous: the client's and the service's circuit and the stream on each.
struct Joined {
    client: usize,
    service: usize,
}

/// The whole client side plus the service's answer, on circuits `c_intro`, `c_rend`, `s_rend`.
/// `intro_circs` maps the service's intro circuits to its points.
#[allow(clippy::too_many_arguments)]
fn connect(
    o: &mut Overlay,
    svc: &mut OnionService,
    intro_circs: &[(usize, IntroId)],
    dir: &HsDir,
    addr: &HsAddress,
    client_key: Option<&X25519Secret>,
    circs: [usize; 3],
) -> Result<Joined, OnionError> {
    let [c_intro, c_rend, s_rend] = circs;
    let (_, rp) = shared_relay(o);
    // Fetch and open the descriptor.
    let loc = hsclient::descriptor_location(addr, &TP, NOW)?;
    let bytes = dir.0.get(&loc.blinded).ok_or(OnionError::DescNotFound)?;
    let contents = hsclient::open_descriptor(&loc, bytes, NOW, client_key)?;
    assert_eq!(contents.intro_points.len(), N_INTRO);
    // Rendezvous point first.
    let cookie = hsclient::new_cookie();
    o.nets[c_rend]
        .client
        .send_onion_service(&RelayMsg::EstablishRendezvous(EstablishRendezvous {
            cookie,
        }))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, c_rend)
            .iter()
            .any(|m| matches!(m, RelayMsg::RendezvousEstablished(_)))
    });
    // INTRODUCE1 through the second introduction point.
    let intro = hsclient::start_introduction(&loc, &contents, 1, rp.clone(), cookie)?;
    assert_eq!(intro.intro_point.id, rp.id);
    let before: Vec<usize> = intro_circs.iter().map(|(k, _)| n_intro2(o, *k)).collect();
    o.nets[c_intro]
        .client
        .send_onion_service(&RelayMsg::Introduce1(intro.introduce1.clone()))
        .expect("sent");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, c_intro)
            .iter()
            .any(|m| matches!(m, RelayMsg::IntroduceAck(_)))
    });
    let ack = hs_msgs(o, c_intro).into_iter().find_map(|m| match m {
        RelayMsg::IntroduceAck(a) => Some(a.status),
        _ => None,
    });
    assert_eq!(ack, Some(IntroduceStatus::SUCCESS));
    // The service: the INTRODUCE2 on whichever intro circuit the auth key named.
    let (k, id) = intro_circs
        .iter()
        .zip(before)
        .find(|((k, _), n)| n_intro2(o, *k) > *n)
        .map(|(x, _)| *x)
        .expect("an INTRODUCE2 arrived");
    let msg = hs_msgs(o, k)
        .into_iter()
        .filter_map(|m| match m {
            RelayMsg::Introduce2(i) => Some(i),
            _ => None,
        })
        .next_back()
        .expect("INTRODUCE2");
    let task = svc
        .handle_introduce2(id, &msg, NOW)
        .map_err(|_| OnionError::IntroFailed)?;
    // The same INTRODUCE2 again (a replay by the intro point): refused by the service.
    assert_eq!(
        svc.handle_introduce2(id, &msg, NOW).err(),
        Some(IntroRefusal::Replay)
    );
    assert_eq!(task.rend_point.id, rp.id, "the client's rendezvous point");
    let s = &mut o.nets[s_rend].client;
    s.send_onion_service(&task.rendezvous1).expect("sent");
    s.add_end_to_end(&task.keys, EndToEndRole::Service)
        .expect("virtual hop");
    o.run_until(Duration::from_secs(5), |o| {
        hs_msgs(o, c_rend)
            .iter()
            .any(|m| matches!(m, RelayMsg::Rendezvous2(_)))
    });
    let r2 = hs_msgs(o, c_rend)
        .into_iter()
        .find_map(|m| match m {
            RelayMsg::Rendezvous2(r) => Some(r),
            _ => None,
        })
        .expect("RENDEZVOUS2");
    let keys = intro.pending.finish(&r2)?;
    o.nets[c_rend]
        .client
        .add_end_to_end(&keys, EndToEndRole::Client)
        .expect("virtual hop");
    Ok(Joined {
        client: c_rend,
        service: s_rend,
    })
}

fn n_intro2(o: &Overlay, k: usize) -> usize {
    hs_msgs(o, k)
        .iter()
        .filter(|m| matches!(m, RelayMsg::Introduce2(_)))
        .count()
}

/// BEGIN to `port` (no host name: the service knows who it is), the service's decision, and
/// for an accepted stream `up`/`down` carried both ways. Returns whether the stream connected.
fn stream(
    o: &mut Overlay,
    svc: &OnionService,
    j: &Joined,
    port: u16,
    up: &[u8],
    down: &[u8],
) -> bool {
    let sid = o.nets[j.client].begin(StreamTarget::Begin(Begin {
        target: Target::Ip(Ipv4Addr::UNSPECIFIED.into()),
        port,
        flags: BeginFlags::default(),
    }));
    let seen = o.nets[j.service]
        .client_events
        .iter()
        .filter(|e| matches!(e, Event::IncomingStream { .. }))
        .count();
    o.run_until(Duration::from_secs(5), |o| {
        o.nets[j.service]
            .client_events
            .iter()
            .filter(|e| matches!(e, Event::IncomingStream { .. }))
            .count()
            > seen
    });
    let (ssid, begin) = o.nets[j.service]
        .client_events
        .iter()
        .filter_map(|e| match e {
            Event::IncomingStream { stream, begin } => Some((*stream, begin.clone())),
            _ => None,
        })
        .next_back()
        .expect("incoming stream");
    assert_eq!(begin.port, port);
    let now = o.now();
    match svc.target_for(begin.port) {
        Some(target) => {
            assert_eq!(target, SocketAddr::from(([127, 0, 0, 1], 8080)));
            o.nets[j.service]
                .client
                .accept_stream(ssid)
                .expect("accepted");
        }
        None => {
            o.nets[j.service]
                .client
                .close_stream(ssid, EndReason::CONNECTREFUSED, now);
        }
    }
    o.run_until(Duration::from_secs(5), |o| {
        o.nets[j.client].client_events.iter().any(|e| {
            matches!(e, Event::StreamConnected { stream } | Event::StreamEnded { stream, .. } if *stream == sid)
        })
    });
    let connected = o.nets[j.client]
        .client_events
        .iter()
        .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid));
    if !connected {
        return false;
    }
    o.nets[j.client].upload(sid, up);
    o.nets[j.service].upload(ssid, down);
    o.run_until(Duration::from_secs(300), |o| {
        o.nets[j.service].received.get(&ssid).map(Vec::len) == Some(up.len())
            && o.nets[j.client].received.get(&sid).map(Vec::len) == Some(down.len())
    });
    assert_eq!(o.nets[j.service].received[&ssid], up, "client → service");
    assert_eq!(o.nets[j.client].received[&sid], down, "service → client");
    true
}

fn new_service(key_dir: &std::path::Path, auth: Vec<X25519Public>) -> OnionService {
    let (identity, _) = keys::load_or_create_identity(key_dir).expect("keys");
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    OnionService::new(identity, ports, auth, TP).expect("service")
}

#[test]
fn a_client_reaches_the_service_by_its_address_and_data_is_byte_exact_both_ways() {
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = tmp.path().join("svc");
    let mut o = Overlay::new(9, 3, L);
    o.build();
    let mut dir = HsDir::default();
    let mut svc = new_service(&kd, vec![]);
    let addr = *svc.address();
    let ids = start_service(&mut o, &mut svc, 0, &mut dir, NOW);
    let circs: Vec<(usize, IntroId)> = (0..N_INTRO).zip(ids).collect();
    // The stored descriptors name neither the identity nor the address.
    for bytes in dir.0.values() {
        assert!(!bytes.windows(32).any(|w| w == addr.identity().as_bytes()));
        assert!(
            !bytes
                .windows(24)
                .any(|w| w == &addr.label().as_bytes()[..24])
        );
    }
    let j = connect(&mut o, &mut svc, &circs, &dir, &addr, None, [3, 4, 5]).expect("joined");
    let up = pattern_bytes(200_000);
    let down: Vec<u8> = pattern_bytes(300_000).into_iter().rev().collect();
    assert!(
        stream(&mut o, &svc, &j, 80, &up, &down),
        "port 80 is mapped"
    );
    // An unmapped port: the service ends the stream, the client sees it refused.
    assert!(!stream(&mut o, &svc, &j, 22, &[], &[]));
    // The rendezvous relay saw only ciphertext.
    for (_, body) in &o.crossed {
        assert!(!body.windows(16).any(|x| x == &up[1000..1016]));
        assert!(!body.windows(16).any(|x| x == &down[5000..5016]));
    }

    // Restart: a new service from the same key directory has the same address; its new
    // descriptor replaces the old one at the HSDir (higher revision) and clients reach it.
    drop(svc);
    let mut svc2 = new_service(&kd, vec![]);
    assert_eq!(*svc2.address(), addr);
    let mut o2 = Overlay::new(6, 3, L);
    o2.build();
    // (Restarted two minutes later, in the same time period: the revision is the clock's.)
    let ids2 = start_service(&mut o2, &mut svc2, 0, &mut dir, NOW + 120);
    let circs2: Vec<(usize, IntroId)> = (0..N_INTRO).zip(ids2).collect();
    let j2 =
        connect(&mut o2, &mut svc2, &circs2, &dir, &addr, None, [3, 4, 5]).expect("joined again");
    assert!(stream(&mut o2, &svc2, &j2, 80, b"hello", b"world"));
}

#[test]
fn client_authorization_refuses_an_unauthorised_client() {
    let tmp = tempfile::tempdir().expect("tmp");
    let alice = X25519Secret::from_bytes([0xA1; 32]);
    let mallory = X25519Secret::from_bytes([0x3D; 32]);
    let mut o = Overlay::new(9, 3, L);
    o.build();
    let mut dir = HsDir::default();
    let mut svc = new_service(&tmp.path().join("svc"), vec![alice.public()]);
    let addr = *svc.address();
    let ids = start_service(&mut o, &mut svc, 0, &mut dir, NOW);
    let circs: Vec<(usize, IntroId)> = (0..N_INTRO).zip(ids).collect();
    assert_eq!(
        connect(&mut o, &mut svc, &circs, &dir, &addr, None, [3, 4, 5]).err(),
        Some(OnionError::MissingClientAuth)
    );
    assert_eq!(
        connect(
            &mut o,
            &mut svc,
            &circs,
            &dir,
            &addr,
            Some(&mallory),
            [3, 4, 5]
        )
        .err(),
        Some(OnionError::BadClientAuth)
    );
    assert_eq!(OnionError::BadClientAuth.socks_reply(), 0xF5);
    let j = connect(
        &mut o,
        &mut svc,
        &circs,
        &dir,
        &addr,
        Some(&alice),
        [6, 7, 8],
    )
    .expect("alice");
    assert!(stream(
        &mut o,
        &svc,
        &j,
        80,
        b"GET / HTTP/1.0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n"
    ));
}

#[test]
fn a_replayed_introduce_is_refused_at_the_intro_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut o = Overlay::new(9, 3, L);
    o.build();
    let mut dir = HsDir::default();
    let mut svc = new_service(&tmp.path().join("svc"), vec![]);
    let addr = *svc.address();
    start_service(&mut o, &mut svc, 0, &mut dir, NOW);
    let (_, rp) = shared_relay(&o);
    let loc = hsclient::descriptor_location(&addr, &TP, NOW).expect("loc");
    let contents = hsclient::open_descriptor(&loc, &dir.0[&loc.blinded], NOW, None).expect("opens");
    let intro = hsclient::start_introduction(&loc, &contents, 0, rp, hsclient::new_cookie())
        .expect("intro");
    for k in [3, 4] {
        o.nets[k]
            .client
            .send_onion_service(&RelayMsg::Introduce1(intro.introduce1.clone()))
            .expect("sent");
        o.run_until(Duration::from_secs(5), |o| {
            hs_msgs(o, k)
                .iter()
                .any(|m| matches!(m, RelayMsg::IntroduceAck(_)))
        });
    }
    let status = |o: &Overlay, k| {
        hs_msgs(o, k).into_iter().find_map(|m| match m {
            RelayMsg::IntroduceAck(a) => Some(a.status),
            _ => None,
        })
    };
    assert_eq!(status(&o, 3), Some(IntroduceStatus::SUCCESS));
    assert_eq!(status(&o, 4), Some(IntroduceStatus::REPLAY));
    assert_eq!(n_intro2(&o, 0), 1, "relayed once");
}

#[test]
fn onion_names_never_leave_in_a_begin_or_resolve() {
    let mut o = Overlay::new(1, 3, L);
    o.build();
    let id = allium_crypto::IdentityKeypair::from_seed(&[0x11; 32]).public();
    let name = HsAddress::from_identity(&id).expect("addr").to_string();
    for host in [
        name.clone(),
        name.to_uppercase(),
        "typo.allium.alt".to_owned(),
        format!("{name}."),
    ] {
        let now = o.nets[0].now;
        let c = &mut o.nets[0].client;
        let begin = StreamTarget::Begin(Begin {
            target: Target::Hostname(host.clone()),
            port: 80,
            flags: BeginFlags::default(),
        });
        assert!(c.begin_stream(&begin, now).is_err());
        assert!(c.begin_stream(&StreamTarget::Resolve(host), now).is_err());
        assert!(c.poll_transmit().is_none(), "nothing queued for the exit");
        assert_eq!(c.n_streams(), 0);
        assert!(!c.is_closed(), "the circuit stays usable");
    }
    // An ordinary name still goes out.
    let now = o.nets[0].now;
    let ok = StreamTarget::Begin(Begin {
        target: Target::Hostname("example.com".to_owned()),
        port: 80,
        flags: BeginFlags::default(),
    });
    assert!(o.nets[0].client.begin_stream(&ok, now).is_ok());
}

#[test]
fn onion_address_command_prints_a_stable_address_with_a_private_key() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = tmp.path().join("k");
    allium::cmd::onion_address::run(allium::cmd::onion_address::Args {
        key_dir: kd.clone(),
    })
    .expect("runs");
    let key = kd.join(keys::IDENTITY_FILE);
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read_to_string(kd.join(keys::HOSTNAME_FILE)).expect("hostname");
    allium::cmd::onion_address::run(allium::cmd::onion_address::Args {
        key_dir: kd.clone(),
    })
    .expect("runs again");
    let second = std::fs::read_to_string(kd.join(keys::HOSTNAME_FILE)).expect("hostname");
    assert_eq!(first, second);
    let addr = HsAddress::parse(first.trim()).expect("a valid address");
    assert_eq!(keys::load_or_create_identity(&kd).expect("keys").1, addr);
}
