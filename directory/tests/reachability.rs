//! The real reachability probe against real link listeners (allium-proto) on 127.0.0.1.

use std::net::SocketAddr;

use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_directory::authority::{LinkReachability, Reachability};

async fn listener(id: &IdentityKeypair, link: X25519Secret) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let my_id = id.public();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = allium_proto::channel::accept(tcp, &my_id, &link).await;
        }
    });
    addr
}

#[tokio::test]
async fn link_probe_proves_the_link_key() {
    let id = IdentityKeypair::generate();
    let link = X25519Secret::generate();
    let link_pub = link.public();
    let addr = listener(&id, link).await;
    let probe = LinkReachability;
    assert!(probe.probe(addr, id.public(), link_pub).await);
    // Wrong advertised link key: the handshake fails.
    let other = X25519Secret::generate().public();
    assert!(!probe.probe(addr, id.public(), other).await);
    // Nobody listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    assert!(!probe.probe(closed, id.public(), link_pub).await);
}
