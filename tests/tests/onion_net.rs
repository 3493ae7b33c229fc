//! Introduction and rendezvous points in REAL relays: a whole test network on loopback, and
//! client circuits driven by hand (the client crate's circuit core over real links) playing the
//! client and the service, so every relay message the relays see is the real wire. Checks the
//! INTRODUCE1 → INTRODUCE2 relay and ACK, the refused replay, the join (RENDEZVOUS1/2), data
//! both ways through the join byte-exact under the end-to-end layer, the counters, and that the
//! DESTROY of one joined circuit tears down the other.

// Whole-network tests: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_client::core::{CircParams, ClientCircuit, Event, HopTarget, StreamId, StreamTarget};
use allium_crypto::IdentityKeypair;
use allium_crypto::handshake::HopKeys;
use allium_crypto::relaycell::EndToEndRole;
use allium_proto::cell::{Cell, CircId};
use allium_proto::channel::{self, ChannelSender};
use allium_proto::relaymsg::{
    Begin, BeginFlags, EstablishIntro, EstablishRendezvous, Introduce, IntroduceStatus, RelayMsg,
    RendCookie, Rendezvous1, Target,
};
use allium_relay::RelayHandle;
use allium_tests::sim::pattern_bytes;
use allium_tests::{Options, TestNet};
use tokio::sync::{Notify, mpsc};

const WAIT: Duration = Duration::from_secs(30);

/// One client circuit over a real link, driven by the test.
struct RawCirc {
    circ: ClientCircuit,
    tx: ChannelSender,
    rx: mpsc::UnboundedReceiver<Option<Cell>>,
    events: Vec<Event>,
    received: HashMap<StreamId, Vec<u8>>,
    uploads: HashMap<StreamId, Vec<u8>>,
    link_closed: bool,
}

/// What a test needs of a relay to put it on a path.
#[derive(Clone)]
struct RelayInfo {
    target: HopTarget,
    id: allium_crypto::RelayId,
    addr: std::net::SocketAddr,
    link_key: allium_crypto::X25519Public,
}

fn info(r: &RelayHandle) -> RelayInfo {
    RelayInfo {
        target: HopTarget::new(r.identity(), r.onion_key(), &[r.or_addr()]),
        id: r.identity(),
        addr: r.or_addr(),
        link_key: r.link_key(),
    }
}

impl RawCirc {
    /// Connect to the first relay of `path` and start building along it.
    async fn start(path: &[&RelayInfo], n: u32, wake: &Arc<Notify>) -> Self {
        let first = path[0];
        let ch = channel::connect(first.addr, &first.id, &first.link_key, None)
            .await
            .expect("link to the first relay");
        let (tx, mut rx) = ch.split();
        let (qtx, qrx) = mpsc::unbounded_channel();
        let wake2 = Arc::clone(wake);
        tokio::spawn(async move {
            loop {
                let c = rx.recv().await;
                let end = c.is_none();
                if qtx.send(c).is_err() {
                    return;
                }
                wake2.notify_one();
                if end {
                    return;
                }
            }
        });
        let id = CircId::new(0x8000_0000 | n).expect("non-zero id");
        let targets = path.iter().map(|r| r.target.clone()).collect();
        let circ = ClientCircuit::build(id, targets, CircParams::default(), Instant::now())
            .expect("circuit start");
        Self {
            circ,
            tx,
            rx: qrx,
            events: Vec::new(),
            received: HashMap::new(),
            uploads: HashMap::new(),
            link_closed: false,
        }
    }

    /// Move everything that can move now; whether anything did.
    async fn step(&mut self) -> bool {
        let now = Instant::now();
        let mut progress = false;
        while let Ok(c) = self.rx.try_recv() {
            progress = true;
            match c {
                Some(cell) => {
                    let _ = self.circ.handle_cell(cell, now);
                }
                None => {
                    self.link_closed = true;
                    self.circ.handle_link_closed();
                }
            }
        }
        if self.circ.poll_timeout().is_some_and(|t| t <= now) {
            self.circ.handle_timeout(now);
        }
        while let Some(ev) = self.circ.poll_event() {
            progress = true;
            match ev {
                Event::StreamData { stream, data } => {
                    self.received
                        .entry(stream)
                        .or_default()
                        .extend_from_slice(data.bytes());
                    self.circ.consumed(stream, 1, now);
                }
                other => self.events.push(other),
            }
        }
        for (sid, buf) in &mut self.uploads {
            if !buf.is_empty() {
                let n = self.circ.package(*sid, buf, now);
                if n > 0 {
                    buf.drain(..n);
                    progress = true;
                }
            }
        }
        while let Some(cell) = self.circ.poll_transmit() {
            progress = true;
            if !self.link_closed && self.tx.send(cell).await.is_err() {
                self.link_closed = true;
            }
        }
        progress
    }

    fn hs_msgs(&self) -> Vec<RelayMsg> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::OnionService { msg } => Some(msg.clone()),
                _ => None,
            })
            .collect()
    }

    fn ack(&self) -> Option<IntroduceStatus> {
        self.hs_msgs().into_iter().find_map(|m| match m {
            RelayMsg::IntroduceAck(a) => Some(a.status),
            _ => None,
        })
    }

    fn built(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Built))
    }

    fn send(&mut self, msg: &RelayMsg) {
        self.circ.send_onion_service(msg).expect("sent");
    }
}

/// Drive every circuit until `done` holds (panics after [`WAIT`]).
async fn pump(
    circs: &mut [&mut RawCirc],
    wake: &Notify,
    mut done: impl FnMut(&[&mut RawCirc]) -> bool,
) {
    let end = Instant::now() + WAIT;
    loop {
        let mut progress = false;
        for c in circs.iter_mut() {
            progress |= c.step().await;
        }
        if done(circs) {
            return;
        }
        if Instant::now() >= end {
            let evs: Vec<String> = circs
                .iter()
                .map(|c| format!("{:?} closed={:?}", c.events, c.circ.closed_reason()))
                .collect();
            panic!("not reached within {WAIT:?}: {evs:#?}");
        }
        if !progress {
            let _ = tokio::time::timeout(Duration::from_millis(20), wake.notified()).await;
        }
    }
}

fn auth() -> IdentityKeypair {
    IdentityKeypair::from_seed(&[0x5e; 32])
}

fn cookie() -> RendCookie {
    RendCookie([0xC0; 20])
}

/// Both ends share fixed end-to-end keys (the INTRODUCE handshake is the client crate's part).
fn e2e_keys() -> HopKeys {
    HopKeys::dangerously_from_parts([0xA1; 32], [0xB2; 32], [0xC3; 32])
}

fn introduce() -> Introduce {
    Introduce {
        auth_key: auth().public(),
        extensions: vec![],
        client_key: [7; 32],
        encrypted: vec![0x33; 120],
        mac: [9; 32],
    }
}

#[test]
fn intro_and_rendezvous_through_real_relays() {
    let net = TestNet::start(Options::default());
    let relays: Vec<RelayInfo> = {
        let g = net.relays.lock().expect("relays");
        g.iter().flatten().map(info).collect()
    };
    assert!(relays.len() >= 6);
    let (ip, rp) = (&relays[4], &relays[5]);
    let counts = |i: usize| {
        net.relays.lock().expect("relays")[i]
            .as_ref()
            .expect("running")
            .hs_counts()
    };
    net.rt.block_on(async {
        let wake = Arc::new(Notify::new());
        let mut svc_intro = RawCirc::start(&[&relays[0], &relays[1], ip], 1, &wake).await;
        let mut cli_intro = RawCirc::start(&[&relays[2], &relays[3], ip], 2, &wake).await;
        let mut cli_intro2 = RawCirc::start(&[&relays[1], &relays[2], ip], 3, &wake).await;
        let mut cli_rend = RawCirc::start(&[&relays[1], &relays[2], rp], 4, &wake).await;
        let mut svc_rend = RawCirc::start(&[&relays[3], &relays[0], rp], 5, &wake).await;
        {
            let mut all = [
                &mut svc_intro,
                &mut cli_intro,
                &mut cli_intro2,
                &mut cli_rend,
                &mut svc_rend,
            ];
            pump(&mut all, &wake, |c| c.iter().all(|c| c.built())).await;
        }

        // The service's introduction point.
        let binding = *svc_intro.circ.hop_binding(2).expect("three hops");
        let est = EstablishIntro::new_signed(&auth(), &binding, vec![]).expect("encodes");
        svc_intro.send(&RelayMsg::EstablishIntro(est));
        pump(&mut [&mut svc_intro], &wake, |c| {
            c[0].hs_msgs()
                .iter()
                .any(|m| matches!(m, RelayMsg::IntroEstablished(_)))
        })
        .await;

        // The client's rendezvous point.
        cli_rend.send(&RelayMsg::EstablishRendezvous(EstablishRendezvous {
            cookie: cookie(),
        }));
        pump(&mut [&mut cli_rend], &wake, |c| {
            c[0].hs_msgs()
                .iter()
                .any(|m| matches!(m, RelayMsg::RendezvousEstablished(_)))
        })
        .await;

        // INTRODUCE1 → INTRODUCE2 (unchanged) and ACK SUCCESS.
        cli_intro.send(&RelayMsg::Introduce1(introduce()));
        pump(&mut [&mut cli_intro, &mut svc_intro], &wake, |c| {
            c[0].ack().is_some()
                && c[1]
                    .hs_msgs()
                    .iter()
                    .any(|m| matches!(m, RelayMsg::Introduce2(_)))
        })
        .await;
        assert_eq!(cli_intro.ack(), Some(IntroduceStatus::SUCCESS));
        let got: Vec<Introduce> = svc_intro
            .hs_msgs()
            .into_iter()
            .filter_map(|m| match m {
                RelayMsg::Introduce2(i) => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![introduce()]);

        // The same INTRODUCE1 again (another circuit): REPLAY, not relayed.
        cli_intro2.send(&RelayMsg::Introduce1(introduce()));
        pump(&mut [&mut cli_intro2, &mut svc_intro], &wake, |c| {
            c[0].ack().is_some()
        })
        .await;
        assert_eq!(cli_intro2.ack(), Some(IntroduceStatus::REPLAY));

        // The service joins at the rendezvous point.
        svc_rend.send(&RelayMsg::Rendezvous1(Rendezvous1 {
            cookie: cookie(),
            handshake_info: vec![0x42; 64],
        }));
        svc_rend
            .circ
            .add_end_to_end(&e2e_keys(), EndToEndRole::Service)
            .expect("virtual hop");
        pump(&mut [&mut cli_rend, &mut svc_rend], &wake, |c| {
            c[0].hs_msgs().iter().any(
                |m| matches!(m, RelayMsg::Rendezvous2(r) if r.handshake_info == vec![0x42; 64]),
            )
        })
        .await;
        cli_rend
            .circ
            .add_end_to_end(&e2e_keys(), EndToEndRole::Client)
            .expect("virtual hop");

        // A stream through the join, data both ways.
        let target = StreamTarget::Begin(Begin {
            target: Target::Hostname("service.onion".to_owned()),
            port: 80,
            flags: BeginFlags::default(),
        });
        let sid = cli_rend
            .circ
            .begin_stream(&target, Instant::now())
            .expect("begin");
        pump(&mut [&mut cli_rend, &mut svc_rend], &wake, |c| {
            c[1].events
                .iter()
                .any(|e| matches!(e, Event::IncomingStream { begin, .. } if begin.port == 80))
        })
        .await;
        let ssid = svc_rend
            .events
            .iter()
            .find_map(|e| match e {
                Event::IncomingStream { stream, .. } => Some(*stream),
                _ => None,
            })
            .expect("incoming stream");
        svc_rend.circ.accept_stream(ssid).expect("accepted");
        pump(&mut [&mut cli_rend, &mut svc_rend], &wake, |c| {
            c[0].events
                .iter()
                .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
        })
        .await;
        let up = pattern_bytes(500_000);
        let down: Vec<u8> = pattern_bytes(700_000).into_iter().rev().collect();
        cli_rend.uploads.insert(sid, up.clone());
        svc_rend.uploads.insert(ssid, down.clone());
        pump(&mut [&mut cli_rend, &mut svc_rend], &wake, |c| {
            c[1].received.get(&ssid).map(Vec::len) == Some(up.len())
                && c[0].received.get(&sid).map(Vec::len) == Some(down.len())
        })
        .await;
        assert!(svc_rend.received[&ssid] == up, "upload corrupted");
        assert!(cli_rend.received[&sid] == down, "download corrupted");

        let ipc = counts(4);
        assert_eq!(ipc.intro_registrations, 1);
        assert_eq!(ipc.intro_registrations_total, 1);
        assert_eq!(ipc.introduce_replays_refused, 1);
        assert_eq!(counts(5).rend_joined, 1);

        // DESTROY of the client's side tears down the service's.
        cli_rend.circ.close();
        pump(&mut [&mut cli_rend, &mut svc_rend], &wake, |c| {
            c[1].circ.is_closed()
        })
        .await;
    });

    let end = Instant::now() + WAIT;
    loop {
        let rpc = counts(5);
        if rpc.rend_joined == 0 && rpc.rend_waiting == 0 {
            assert_eq!(rpc.rend_joins_total, 1);
            break;
        }
        assert!(
            Instant::now() < end,
            "the pair was never uncounted: {rpc:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let page = net.relays.lock().expect("relays")[5]
        .as_ref()
        .expect("running")
        .metrics_text();
    assert!(
        page.contains("allium_hs_rendezvous_joins_total 1"),
        "metrics: {page}"
    );
}

/// One directory exchange over a one-hop circuit to `relay`: BEGIN_DIR, `request`, and every
/// byte of the answer until the relay ends the stream.
async fn dir_exchange(relay: &RelayInfo, request: &[u8], n: u32) -> Vec<u8> {
    let wake = Arc::new(Notify::new());
    let mut c = RawCirc::start(&[relay], n, &wake).await;
    pump(&mut [&mut c], &wake, |c| c[0].circ.is_ready()).await;
    let sid = c
        .circ
        .begin_stream(&StreamTarget::BeginDir, Instant::now())
        .expect("BEGIN_DIR");
    pump(&mut [&mut c], &wake, |c| {
        c[0].events
            .iter()
            .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
    })
    .await;
    c.uploads.insert(sid, request.to_vec());
    pump(&mut [&mut c], &wake, |c| {
        c[0].events
            .iter()
            .any(|e| matches!(e, Event::StreamEnded { stream, .. } if *stream == sid))
    })
    .await;
    c.circ.close();
    let _ = c.step().await;
    c.received.remove(&sid).unwrap_or_default()
}

#[test]
fn descriptor_upload_and_fetch_at_a_real_hsdir() {
    use allium_crypto::X25519Secret;
    use allium_crypto::hs::{BlindedKeypair, HsAddress, Subcredential, TimePeriod};
    use allium_directory::dircache::{
        DirRequest, encode_hs_upload, encode_request, parse_hs_desc_response,
        parse_hs_upload_response,
    };
    use allium_directory::hs::{HsDescBuilder, HsDescContents, IntroPointInfo, UncheckedHsDesc};

    let net = TestNet::start(Options {
        relays: 3,
        exits: 1,
        ..Options::default()
    });
    let (hsdir, metrics) = {
        let g = net.relays.lock().expect("relays");
        let r = g[1].as_ref().expect("running");
        (info(r), r.metrics_text())
    };
    assert!(
        metrics.contains("allium_relay_flag{flag=\"HSDir\"} 1"),
        "the test network's relays are HSDirs: {metrics}"
    );
    let now = allium_directory::now_unix();
    let period = TimePeriod {
        number: now / 86_400,
        length_minutes: 1440,
    };
    let id = IdentityKeypair::from_seed(&[0x42; 32]);
    let blinded = BlindedKeypair::derive(&id, &period);
    let sub = Subcredential::for_identity(&id.public(), &blinded.public());
    let signing = IdentityKeypair::from_seed(&[0x43; 32]);
    let contents = HsDescContents {
        version: 1,
        intro_points: vec![IntroPointInfo {
            relay_id: hsdir.id,
            link_key: hsdir.link_key,
            onion_key: X25519Secret::from_bytes([3; 32]).public(),
            addrs: vec![hsdir.addr],
            auth_key: IdentityKeypair::from_seed(&[4; 32]).public(),
            enc_key: X25519Secret::from_bytes([5; 32]).public(),
        }],
        pow: None,
    };
    let build = |revision| {
        HsDescBuilder {
            blinded: &blinded,
            signing_key: &signing,
            subcredential: &sub,
            revision,
            lifetime_minutes: 180,
            cert_expires: now + 3 * 3600,
            contents: &contents,
            auth_clients: &[],
        }
        .build()
        .expect("descriptor builds")
    };
    let d2 = build(2);
    let key = blinded.public();
    net.rt.block_on(async {
        let get = encode_request(&DirRequest::HsDesc { blinded: key });
        let absent = dir_exchange(&hsdir, &get, 1).await;
        assert!(absent.starts_with(b"HTTP/1.0 404 "), "{absent:?}");

        let r = dir_exchange(&hsdir, &encode_hs_upload(&key, &d2), 2).await;
        parse_hs_upload_response(&r).expect("stored");
        // The same revision again: refused (409).
        let r = dir_exchange(&hsdir, &encode_hs_upload(&key, &d2), 3).await;
        assert!(
            r.starts_with(b"HTTP/1.0 409 "),
            "{}",
            String::from_utf8_lossy(&r)
        );
        // A forged one (a flipped byte): refused (400), the stored one stays.
        let mut forged = build(3);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let r = dir_exchange(&hsdir, &encode_hs_upload(&key, &forged), 4).await;
        assert!(
            r.starts_with(b"HTTP/1.0 400 "),
            "{}",
            String::from_utf8_lossy(&r)
        );

        let got = parse_hs_desc_response(&dir_exchange(&hsdir, &get, 5).await).expect("served");
        assert_eq!(got, d2, "served byte-exact");
        // What the HSDir holds cannot be linked to the service without its address: neither
        // the identity key nor the address is in it, and it verifies under the blinded key.
        let ident = id.public().0;
        assert!(!got.windows(ident.len()).any(|w| w == ident));
        let addr = HsAddress::from_identity(&id.public())
            .expect("address")
            .label();
        assert!(!got.windows(addr.len()).any(|w| w == addr.as_bytes()));
        let d = UncheckedHsDesc::parse(&got)
            .and_then(|u| u.check_for(&key, now))
            .expect("verifies");
        let _ = d
            .decrypt(&sub, None)
            .expect("decrypts with the subcredential");
    });
    let c = net.relays.lock().expect("relays")[1]
        .as_ref()
        .expect("running")
        .hsdir_counts();
    assert_eq!(c.stored, 1);
    assert_eq!(c.uploads_stored, 1);
    assert_eq!(c.uploads_refused, 2);
    assert_eq!(c.fetches_served, 1);
    assert_eq!(c.fetches_missed, 1);
}
