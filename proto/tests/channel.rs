//! The tokio link driver over real sockets on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public, X25519Secret};
use allium_proto::cell::{CELL_LEN, Cell, CellCmd, CircId};
use allium_proto::channel::{self, Channel};
use allium_proto::err::LinkError;
use allium_proto::link::{self, Initiator, LinkTransport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Bound every test wait (no test should come near it).
const T: Duration = Duration::from_secs(20);

struct Relay {
    id: RelayId,
    key: X25519Secret,
}

fn relay(n: u8) -> Relay {
    Relay {
        id: RelayId([n; 32]),
        key: X25519Secret::generate(),
    }
}

/// Listen on 127.0.0.1:0 and accept one link as `r` in a task.
async fn serve_one(
    r: &Relay,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<Channel, LinkError>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let id = r.id;
    let key = X25519Secret::from_bytes(*r.key.secret_bytes());
    let h = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        channel::accept(tcp, &id, &key).await
    });
    (addr, h)
}

fn cell(circ: u32, n: u16) -> Cell {
    let mut c = Cell::new_zeroed(CircId::new(circ), CellCmd::RELAY);
    c.body[..2].copy_from_slice(&n.to_be_bytes());
    c.body[1018] = n as u8;
    c
}

#[tokio::test]
async fn cells_flow_both_ways() {
    let r = relay(1);
    let (addr, h) = serve_one(&r).await;
    let our = X25519Secret::generate();
    let client = tokio::time::timeout(
        T,
        channel::connect(addr, &r.id, &r.key.public(), Some(&our)),
    )
    .await
    .unwrap()
    .unwrap();
    let server = h.await.unwrap().unwrap();
    assert!(client.is_initiator() && !server.is_initiator());
    // The relay learns the initiator's static key (relay recognition via the consensus).
    assert_eq!(server.peer_static(), our.public());
    assert_eq!(client.peer_static(), r.key.public());

    let (ctx, mut crx) = client.split();
    let (stx, mut srx) = server.split();
    let circ = CircId::random(true).get();
    let up = tokio::spawn(async move {
        for i in 0..500u16 {
            ctx.send(cell(circ, i)).await.unwrap();
        }
        ctx
    });
    for i in 0..500u16 {
        let c = tokio::time::timeout(T, srx.recv()).await.unwrap().unwrap();
        assert_eq!(c, cell(circ, i));
    }
    let ctx = up.await.unwrap();
    // And back, with a padding cell in between that the receiver drops.
    stx.send(Cell::padding()).await.unwrap();
    for i in 0..300u16 {
        stx.send(cell(7, i)).await.unwrap();
    }
    for i in 0..300u16 {
        let c = tokio::time::timeout(T, crx.recv()).await.unwrap().unwrap();
        assert_eq!(c, cell(7, i));
    }
    // Invalid cells are refused locally.
    assert!(
        ctx.send(Cell::new_zeroed(None, CellCmd::RELAY))
            .await
            .is_err()
    );
    assert!(
        ctx.send(Cell::new_zeroed(CircId::new(1), CellCmd(9)))
            .await
            .is_err()
    );

    // Closing one side ends the other's receiver.
    ctx.close();
    assert!(tokio::time::timeout(T, srx.recv()).await.unwrap().is_none());
    assert!(tokio::time::timeout(T, crx.recv()).await.unwrap().is_none());
    tokio::time::timeout(T, stx.closed()).await.unwrap();
    assert!(matches!(stx.send(cell(7, 0)).await, Err(LinkError::Closed)));
}

#[tokio::test(flavor = "current_thread")]
async fn queued_cells_are_batched_into_full_frames() {
    let r = relay(1);
    let (addr, h) = serve_one(&r).await;
    let client = channel::connect(addr, &r.id, &r.key.public(), None)
        .await
        .unwrap();
    let server = h.await.unwrap().unwrap();
    let (ctx, _crx) = client.split();
    let (_stx, mut srx) = server.split();
    // On a current-thread runtime the writer task cannot run before we yield: all 128 cells (one
    // circuit's whole scheduler queue) are queued first, so they must leave in 128 / 32 = 4 frames.
    for i in 0..128u16 {
        assert!(ctx.try_send(cell(5, i)).unwrap().is_none());
    }
    assert!(
        ctx.try_send(cell(5, 999)).unwrap().is_some(),
        "one circuit's queue is bounded"
    );
    for i in 0..128u16 {
        let c = tokio::time::timeout(T, srx.recv()).await.unwrap().unwrap();
        assert_eq!(c, cell(5, i));
    }
    assert_eq!(srx.frames_received(), 4);
}

#[tokio::test]
async fn another_relays_identity_fails() {
    // Relay A runs; "M" advertises A's link key. Dialling M (prologue names M) must fail.
    let a = relay(1);
    let m_id = RelayId([2; 32]);
    let (addr, h) = serve_one(&a).await;
    let e = channel::connect(addr, &m_id, &a.key.public(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Handshake), "{e:?}");
    assert!(matches!(h.await.unwrap(), Err(LinkError::Handshake)));
}

#[tokio::test]
async fn wrong_link_key_fails() {
    let a = relay(1);
    let (addr, h) = serve_one(&a).await;
    let wrong: X25519Public = X25519Secret::generate().public();
    let e = channel::connect(addr, &a.id, &wrong, None)
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Handshake), "{e:?}");
    assert!(matches!(h.await.unwrap(), Err(LinkError::Handshake)));
}

#[tokio::test]
async fn connection_refused_is_an_io_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = relay(1);
    let e = channel::connect(addr, &r.id, &r.key.public(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Io(_)), "{e:?}");
}

/// A hand-driven initiator: handshake with the sans-IO API over a raw socket, then write raw bytes.
async fn raw_initiator(addr: SocketAddr, r: &Relay) -> (TcpStream, LinkTransport) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    let init = Initiator::start(&r.id, &r.key.public(), None, &mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut prefix = [0u8; 2];
    tcp.read_exact(&mut prefix).await.unwrap();
    let mut m2 = vec![0u8; link::handshake_msg_len(prefix).unwrap()];
    tcp.read_exact(&mut m2).await.unwrap();
    out.clear();
    let (t, _) = init.read_msg2(&m2, 0, &mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    (tcp, t)
}

async fn expect_closed_with(
    r: &Relay,
    bytes: impl FnOnce(&mut LinkTransport) -> Vec<u8>,
) -> LinkError {
    let (addr, h) = serve_one(r).await;
    let (mut tcp, mut t) = raw_initiator(addr, r).await;
    let server = h.await.unwrap().unwrap();
    let (_stx, mut srx) = server.split();
    // One good frame first, so the link is known to work.
    let mut frame = vec![0u8; 2 * CELL_LEN];
    let n = t.seal_frame(&cell(9, 1).to_bytes(), &mut frame).unwrap();
    tcp.write_all(&frame[..n]).await.unwrap();
    assert_eq!(
        tokio::time::timeout(T, srx.recv()).await.unwrap().unwrap(),
        cell(9, 1)
    );
    let bad = bytes(&mut t);
    tcp.write_all(&bad).await.unwrap();
    assert!(tokio::time::timeout(T, srx.recv()).await.unwrap().is_none());
    // The server closed the TCP connection.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, tcp.read_to_end(&mut rest))
        .await
        .unwrap();
    let e = srx.error().expect("closed because of an error");
    assert!(!e.to_string().is_empty());
    match e {
        LinkError::BadFrameLength(n) => LinkError::BadFrameLength(*n),
        LinkError::Decrypt => LinkError::Decrypt,
        LinkError::Cell(c) => LinkError::Cell(c.clone()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn short_frame_length_closes_the_link() {
    let r = relay(1);
    let e = expect_closed_with(&r, |_| vec![0x00, 0x05, 1, 2, 3, 4, 5]).await;
    assert!(matches!(e, LinkError::BadFrameLength(5)));
}

#[tokio::test]
async fn oversized_frame_length_closes_the_link() {
    let r = relay(1);
    let e = expect_closed_with(&r, |_| vec![0xff, 0xff]).await;
    assert!(matches!(e, LinkError::BadFrameLength(65535)));
    let e = expect_closed_with(&r, |_| vec![0x04, 0x11]).await;
    assert!(matches!(e, LinkError::BadFrameLength(1041)));
}

#[tokio::test]
async fn tampered_frame_closes_the_link() {
    let r = relay(1);
    let e = expect_closed_with(&r, |t| {
        let mut frame = vec![0u8; 3 * CELL_LEN];
        let n = t
            .seal_frame(
                &[cell(9, 2).to_bytes(), cell(9, 3).to_bytes()].concat(),
                &mut frame,
            )
            .unwrap();
        frame[n - 1] ^= 0x80;
        frame.truncate(n);
        frame
    })
    .await;
    assert!(matches!(e, LinkError::Decrypt));
}

#[tokio::test]
async fn unknown_cell_command_closes_the_link() {
    let r = relay(1);
    let e = expect_closed_with(&r, |t| {
        let mut c = cell(9, 2).to_bytes();
        c[4] = 6;
        let mut frame = vec![0u8; 2 * CELL_LEN];
        let n = t.seal_frame(&c, &mut frame).unwrap();
        frame.truncate(n);
        frame
    })
    .await;
    assert!(matches!(e, LinkError::Cell(_)));
}

#[tokio::test(start_paused = true)]
async fn silent_peer_hits_the_handshake_timeout() {
    let r = relay(1);
    let (addr, h) = serve_one(&r).await;
    // Connect and say nothing; paused time auto-advances to the 10 s deadline.
    let _tcp = TcpStream::connect(addr).await.unwrap();
    let res = h.await.unwrap();
    assert!(matches!(res, Err(LinkError::HandshakeTimeout)), "{res:?}");
}

#[tokio::test]
async fn garbage_handshake_is_rejected() {
    let r = relay(1);
    let (addr, h) = serve_one(&r).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // Length prefix above the 256-byte handshake bound.
    tcp.write_all(&[0x01, 0x01]).await.unwrap();
    assert!(matches!(
        h.await.unwrap(),
        Err(LinkError::BadFrameLength(257))
    ));
}
