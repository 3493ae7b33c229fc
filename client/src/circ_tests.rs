//! The reactor over a real link (loopback) against a scripted fake relay that plays all three
//! hops: the client's handshakes, EXTENDs and BEGIN, then misbehaviour that must cost exactly
//! that circuit. The circuit rules themselves are tested without sockets in `core/tests.rs`;
//! these check that the driver carries them out (DESTROY on the wire, streams ended).

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use allium_proto::flowctl::{self, XOFF_LIMIT};

use allium_crypto::handshake::relay_respond;
use allium_crypto::relaycell::{FORWARD_MSG_OFFSET, Forward, RelayHopCrypto};
use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created};
use allium_proto::channel::{self, ChannelReceiver, ChannelSender};
use allium_proto::relaymsg::{Connected, EndReason, Extended, RELAY_MSG_LEN, RelayMsg};
use tokio::net::TcpListener;

use super::*;
use crate::path::{RelayFlags, RelayInfo};

struct FakeHop {
    id: IdentityKeypair,
    onion: X25519Secret,
}

/// How the fake exit misbehaves once the stream is open.
#[derive(Clone, Copy)]
enum Misbehave {
    /// Send more DATA than the XOFF limit allows, ignoring XOFF.
    OverrunWindow,
    /// Send a cell whose body was altered after encryption.
    Tamper,
    /// Send a backward RELAY_EARLY cell.
    BackwardEarly,
    /// Send END MISC (a normal stream end, not a circuit failure).
    EndStream,
}

fn info(h: &FakeHop, link: &X25519Secret, addr: SocketAddr) -> RelayInfo {
    RelayInfo {
        id: h.id.public(),
        link_key: link.public(),
        onion_key: h.onion.public(),
        addrs: vec![addr],
        flags: RelayFlags {
            running: true,
            valid: true,
            guard: true,
            exit: true,
            ..RelayFlags::default()
        },
        weight: 1,
        family: vec![],
        exit_ports: vec![(1, 65535)],
    }
}

/// Originate `msg` at hop `at` towards the client (layers of hops `at-1..0` added).
fn backward(
    hops: &mut [RelayHopCrypto],
    at: usize,
    circ: CircId,
    sid: u16,
    msg: &RelayMsg,
) -> Cell {
    let mut buf = [0u8; RELAY_MSG_LEN];
    let n = msg.encode(sid, &mut buf).unwrap();
    let mut cell = Cell::new_zeroed(Some(circ), CellCmd::RELAY);
    hops[at]
        .encrypt_backward(CellCmd::RELAY.0, &buf[..n], &mut cell.body)
        .unwrap();
    for h in hops[..at].iter_mut().rev() {
        h.relay_backward(&mut cell.body).unwrap();
    }
    cell
}

/// The fake relay: answers CREATE, EXTEND (playing the next hop itself) and BEGIN, then
/// misbehaves. Returns whether the client destroyed the circuit.
async fn fake_relay(
    tx: ChannelSender,
    mut rx: ChannelReceiver,
    keys: Vec<FakeHop>,
    how: Misbehave,
) -> bool {
    let mut hops: Vec<RelayHopCrypto> = Vec::new();
    while let Some(mut cell) = rx.recv().await {
        let id = cell.circ_id.expect("decoded non-PADDING cells carry an id");
        match cell.cmd {
            CellCmd::CREATE => {
                let c = Create::decode(&cell.body[..]).unwrap();
                let (k, reply) =
                    relay_respond(&keys[0].id.public(), &[&keys[0].onion], &c.hdata, |_| {
                        flowctl::cc_reply(Default::default()).to_vec()
                    })
                    .unwrap();
                hops.push(RelayHopCrypto::new(&k));
                tx.send(Cell::created(id, &Created { hdata: reply }).unwrap())
                    .await
                    .unwrap();
            }
            CellCmd::RELAY | CellCmd::RELAY_EARLY => {
                let mut at = None;
                for (i, h) in hops.iter_mut().enumerate() {
                    match h.decrypt_forward(cell.cmd.0, &mut cell.body).unwrap() {
                        Forward::Recognized { .. } => {
                            at = Some(i);
                            break;
                        }
                        Forward::Pass => {}
                    }
                }
                let at = at.expect("cell for one of our hops");
                let region = &cell.body[FORWARD_MSG_OFFSET..FORWARD_MSG_OFFSET + RELAY_MSG_LEN];
                let (sid, msg) = RelayMsg::decode(region).unwrap();
                match msg {
                    RelayMsg::Extend(e) => {
                        assert_eq!(cell.cmd, CellCmd::RELAY_EARLY, "EXTEND outside RELAY_EARLY");
                        let next = &keys[at + 1];
                        assert_eq!(e.relay_id(), Some(next.id.public()));
                        let (k, reply) =
                            relay_respond(&next.id.public(), &[&next.onion], &e.hdata, |_| {
                                flowctl::cc_reply(Default::default()).to_vec()
                            })
                            .unwrap();
                        let ext = RelayMsg::Extended(Extended { hdata: reply });
                        let c = backward(&mut hops, at, id, 0, &ext);
                        hops.push(RelayHopCrypto::new(&k));
                        tx.send(c).await.unwrap();
                    }
                    RelayMsg::EstablishRendezvous(_) => {
                        assert_eq!(at, 2, "onion-service requests go to the last hop");
                        let ok = RelayMsg::RendezvousEstablished(
                            allium_proto::relaymsg::RendezvousEstablished,
                        );
                        tx.send(backward(&mut hops, 2, id, 0, &ok)).await.unwrap();
                    }
                    RelayMsg::Begin(_) => {
                        assert_eq!(at, 2, "BEGIN must go to the exit");
                        let c = backward(
                            &mut hops,
                            2,
                            id,
                            sid,
                            &RelayMsg::Connected(Connected::default()),
                        );
                        tx.send(c).await.unwrap();
                        misbehave(&tx, &mut hops, id, sid, how).await;
                    }
                    _ => {}
                }
            }
            CellCmd::DESTROY => return true,
            _ => {}
        }
    }
    false
}

async fn misbehave(
    tx: &ChannelSender,
    hops: &mut [RelayHopCrypto],
    id: CircId,
    sid: u16,
    how: Misbehave,
) {
    let data = RelayMsg::Data(allium_proto::relaymsg::Data {
        data: vec![7u8; 100],
    });
    match how {
        Misbehave::OverrunWindow => {
            for _ in 0..=XOFF_LIMIT {
                let c = backward(hops, 2, id, sid, &data);
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        }
        Misbehave::Tamper => {
            let mut c = backward(hops, 2, id, sid, &data);
            c.body[100] ^= 1;
            tx.send(c).await.unwrap();
        }
        Misbehave::BackwardEarly => {
            let mut c = backward(hops, 2, id, sid, &data);
            c.cmd = CellCmd::RELAY_EARLY;
            tx.send(c).await.unwrap();
        }
        Misbehave::EndStream => {
            let end = RelayMsg::End(allium_proto::relaymsg::End::new(EndReason::MISC));
            tx.send(backward(hops, 2, id, sid, &end)).await.unwrap();
        }
    }
}

/// Build a circuit through the fake relay, open a stream, let the exit misbehave; returns the
/// circuit, the stream's events and whether the fake relay saw a DESTROY.
async fn run(how: Misbehave) -> (Arc<Circuit>, Vec<&'static str>, bool) {
    use std::sync::atomic::Ordering;
    let keys: Vec<FakeHop> = (0..3)
        .map(|_| FakeHop {
            id: IdentityKeypair::generate(),
            onion: X25519Secret::generate(),
        })
        .collect();
    let link_key = X25519Secret::generate();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let infos: Vec<RelayInfo> = keys.iter().map(|k| info(k, &link_key, addr)).collect();
    let guard_id = keys[0].id.public();
    let relay = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let ch = channel::accept(tcp, &guard_id, &link_key).await.unwrap();
        let (tx, rx) = ch.split();
        fake_relay(tx, rx, keys, how).await
    });
    let link = Link::connect(&infos[0], Duration::from_secs(5))
        .await
        .unwrap();
    let path = Path {
        guard: infos[0].clone(),
        middle: infos[1].clone(),
        exit: infos[2].clone(),
    };
    let progress = Arc::new(crate::control::BuildProgress::default());
    let circ = build(link, &path, CircParams::default(), Arc::clone(&progress))
        .await
        .unwrap();
    assert_eq!(progress.load(Ordering::Acquire), 3);
    let target = crate::socks::wire::Target::Host("example.com".into(), 80);
    let (_sid, mut rx) = crate::stream::begin(&circ, &target).await.unwrap();
    let mut events = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        events.push(match ev {
            StreamEvent::Data(_) => "data",
            StreamEvent::End(_) => "end",
            StreamEvent::Connected => "connected",
            StreamEvent::Resolved(_) => "resolved",
        });
    }
    let destroyed = match how {
        // The circuit stays up; the fake relay would wait for more cells.
        Misbehave::EndStream => false,
        _ => tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .map(|r| r.unwrap())
            .unwrap_or(false),
    };
    (circ, events, destroyed)
}

#[tokio::test]
async fn ignoring_xoff_destroys_the_circuit() {
    let (circ, events, destroyed) = run(Misbehave::OverrunWindow).await;
    assert!(circ.is_closed());
    assert!(destroyed, "the relay got no DESTROY");
    let n = events.iter().filter(|e| **e == "data").count();
    assert!(n <= XOFF_LIMIT as usize, "{n} cells delivered");
}

#[tokio::test]
async fn a_tampered_cell_destroys_the_circuit() {
    let (circ, events, destroyed) = run(Misbehave::Tamper).await;
    assert!(circ.is_closed());
    assert!(destroyed);
    assert!(events.is_empty(), "tampered data was delivered: {events:?}");
}

#[tokio::test]
async fn backward_relay_early_destroys_the_circuit() {
    let (circ, events, destroyed) = run(Misbehave::BackwardEarly).await;
    assert!(circ.is_closed());
    assert!(destroyed);
    assert!(events.is_empty());
}

#[tokio::test]
async fn end_closes_only_the_stream() {
    let (circ, events, _) = run(Misbehave::EndStream).await;
    assert_eq!(events, vec!["end"]);
    assert!(!circ.is_closed());
    assert_eq!(circ.n_streams(), 0);
    // The circuit still takes streams.
    let t = StreamTarget::Resolve("example.com".into());
    assert!(circ.open_stream(t).await.is_ok());
}

/// The onion-service commands reach the core and its events come back: ESTABLISH_RENDEZVOUS
/// goes to the last hop, RENDEZVOUS_ESTABLISHED reaches the subscriber, the end-to-end hop is
/// added, after which onion-service requests are refused; accepting a stream nobody opened
/// fails.
#[tokio::test]
async fn onion_service_commands_and_events_go_through_the_reactor() {
    use allium_crypto::relaycell::EndToEndRole;
    use allium_proto::relaymsg::{EstablishRendezvous, RendCookie};
    let keys: Vec<FakeHop> = (0..3)
        .map(|_| FakeHop {
            id: IdentityKeypair::generate(),
            onion: X25519Secret::generate(),
        })
        .collect();
    let link_key = X25519Secret::generate();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let infos: Vec<RelayInfo> = keys.iter().map(|k| info(k, &link_key, addr)).collect();
    let guard_id = keys[0].id.public();
    let (e2e_keys, _) = {
        let c = allium_crypto::client_start(&keys[2].id.public(), &keys[2].onion.public(), &[])
            .unwrap();
        relay_respond(&keys[2].id.public(), &[&keys[2].onion], &c.1, |_| {
            Vec::new()
        })
        .unwrap()
    };
    let _relay = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let ch = channel::accept(tcp, &guard_id, &link_key).await.unwrap();
        let (tx, rx) = ch.split();
        fake_relay(tx, rx, keys, Misbehave::EndStream).await
    });
    let link = Link::connect(&infos[0], Duration::from_secs(5))
        .await
        .unwrap();
    let circ = build_hops(link, &infos, CircParams::default())
        .await
        .unwrap();
    assert!(circ.hop_binding(2).await.unwrap().is_some());
    assert!(circ.hop_binding(3).await.unwrap().is_none());
    let mut events = circ.onion_events().await.unwrap();
    circ.send_onion_service(RelayMsg::EstablishRendezvous(EstablishRendezvous {
        cookie: RendCookie([5; 20]),
    }))
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Ok(Some(reactor::OnionEvent::Msg(m))) => {
            assert!(matches!(*m, RelayMsg::RendezvousEstablished(_)), "{m:?}");
        }
        other => panic!("expected RENDEZVOUS_ESTABLISHED, got {other:?}"),
    }
    // Not an onion-service request: refused, the circuit stays.
    assert!(
        circ.send_onion_service(RelayMsg::Drop(Default::default()))
            .await
            .is_err()
    );
    circ.add_end_to_end(e2e_keys, EndToEndRole::Client)
        .await
        .unwrap();
    let again = circ
        .send_onion_service(RelayMsg::EstablishRendezvous(EstablishRendezvous {
            cookie: RendCookie([6; 20]),
        }))
        .await;
    assert!(
        again.is_err(),
        "joined circuits take no onion-service requests"
    );
    let sid = crate::core::StreamId::new(1).unwrap();
    assert!(circ.accept_stream(sid).await.is_err(), "no such stream");
    assert!(!circ.is_closed());
}
