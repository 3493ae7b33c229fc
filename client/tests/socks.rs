//! The SOCKS front end without a network: handshake timeout, connection cap, refused commands
//! and address types, and the reply when no circuit can be had.

// Socket tests: bounded real-time waits.
#![allow(clippy::disallowed_methods)]
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use allium_client::socks::client::{self, ClientRequest};
use allium_client::socks::wire::Target;
use allium_client::{AuthorityInfo, ProxyConfig, ProxyHandle};
use allium_crypto::RelayId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy whose only authority is a closed port: it never gets a consensus.
async fn lonely_proxy(dir: &std::path::Path, max_conns: usize) -> ProxyHandle {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let cfg = ProxyConfig {
        socks_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        authorities: vec![AuthorityInfo {
            identity: RelayId([7; 32]),
            dir_addr: addr,
        }],
        max_socks_connections: max_conns,
        socks_handshake_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    allium_client::start(cfg).await.unwrap()
}

async fn greet(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
}

async fn reply_code(s: &mut TcpStream) -> u8 {
    let mut rep = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut rep))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rep[0], 5);
    rep[1]
}

#[tokio::test]
async fn refused_requests_get_the_right_codes() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = lonely_proxy(dir.path(), 16).await;
    let a = proxy.socks_addr();
    assert_ne!(a.port(), 0);
    assert!(!proxy.is_ready());

    // No consensus, so no circuit: general failure, not a hang; for every form of request.
    let host = || Target::Host("example.com".into(), 80);
    for req in [
        ClientRequest::connect(host(), None),
        ClientRequest::connect(host(), Some(("u", "p"))),
        ClientRequest::resolve("example.com", None),
        ClientRequest::connect(Target::Ip("127.0.0.1:80".parse().unwrap()), None),
    ] {
        let err = client::request(a, req.clone(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.reply_code(), Some(0x01), "{req:?}: {err}");
    }
    let err = client::request(
        a,
        ClientRequest::socks4a(host(), "u"),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(0x5B), "SOCKS4a: {err}");

    // Hostile or unsupported requests the client codec will not write are sent as raw bytes.
    // BIND and RESOLVE_PTR: command not supported.
    for cmd in [2u8, 0xF1] {
        let mut s = TcpStream::connect(a).await.unwrap();
        greet(&mut s).await;
        s.write_all(&[5, cmd, 0, 1, 127, 0, 0, 1, 0, 80])
            .await
            .unwrap();
        assert_eq!(reply_code(&mut s).await, 0x07, "cmd {cmd:#x}");
    }

    // Unknown address type.
    let mut s = TcpStream::connect(a).await.unwrap();
    greet(&mut s).await;
    s.write_all(&[5, 1, 0, 9, 0, 0, 0]).await.unwrap();
    assert_eq!(reply_code(&mut s).await, 0x08);

    // Username/password is chosen when offered, and any pair is accepted.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(&[5, 2, 0, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 2]);
    s.write_all(&[1, 1, b'u', 1, b'p']).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [1, 0]);

    // No method we have: 0xFF, then closed.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(&[5, 1, 0x80]).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0xFF]);

    // Not SOCKS at all (a TLS ClientHello): closed.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));

    // HTTP: the "not an HTTP proxy" page, then a clean close.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut page = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut page))
        .await
        .unwrap()
        .unwrap();
    assert!(page.starts_with(b"HTTP/1.0 501 "));

    assert!(proxy.wait_ready(Duration::from_millis(50)).await.is_err());
    proxy.shutdown().await;
}

#[tokio::test]
async fn silent_clients_time_out_and_the_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = lonely_proxy(dir.path(), 1).await;
    let a = proxy.socks_addr();

    // A says nothing and holds the only slot.
    let silent = TcpStream::connect(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // B is accepted by the kernel but not served while A holds the slot.
    let mut b = TcpStream::connect(a).await.unwrap();
    b.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), b.read_exact(&mut m))
            .await
            .is_err(),
        "served beyond max_socks_connections"
    );
    // A's handshake timeout frees the slot; B is then served.
    tokio::time::timeout(Duration::from_secs(5), b.read_exact(&mut m))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m, [5, 0]);
    // And A was closed by the proxy.
    let mut silent = silent;
    let mut x = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut x))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    proxy.shutdown().await;
}
