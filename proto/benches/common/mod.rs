//! Set-up shared by the link benches (a subdirectory, so cargo does not take it for a bench).

use allium_crypto::{RelayId, X25519Secret};
use allium_proto::channel::{self, Channel};

/// Two ends of one real link over loopback TCP (Noise handshake, writer tasks): the client
/// side first, then the server side.
pub async fn loopback_link() -> (Channel, Channel) {
    let id = RelayId([8; 32]);
    let key = X25519Secret::generate();
    let pubkey = key.public();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        channel::accept(tcp, &id, &key).await.unwrap()
    });
    let client = channel::connect(addr, &id, &pubkey, None).await.unwrap();
    (client, server.await.unwrap())
}
