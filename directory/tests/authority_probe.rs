//! Reachability probes triggered by descriptor uploads: a relay re-uploading an unchanged
//! descriptor while reachable is not probed again (each probe is a whole link handshake); a
//! new relay, or one whose address changed, is.

// Authorities on loopback sockets: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use allium_directory::{now_unix, upload_descriptor};
use common::{Net, Relay};

/// Wait (bounded) until the fake prober has been asked for `n` probes.
async fn wait_probes(net: &Net, n: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while net.reach.probes() < n {
        assert!(
            tokio::time::Instant::now() < end,
            "only {} probes, expected {n}",
            net.reach.probes()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// One thread: the authority's upload handlers and the probe tasks they spawn run in order, so
// a probe spawned by the second upload would be counted before the third upload's.
#[tokio::test]
async fn unchanged_reupload_is_not_probed_again_but_a_new_address_is() {
    let net = Net::start(1).await;
    let mut r = Relay::new(9400);
    let addr = net.infos[0].dir_addr;
    let now = now_unix();
    upload_descriptor(addr, &r.signed(now, false))
        .await
        .expect("first upload");
    wait_probes(&net, 1).await;
    // The same address and keys, published later: reachable a moment ago, not due.
    upload_descriptor(addr, &r.signed(now + 1, false))
        .await
        .expect("second upload");
    upload_descriptor(addr, &r.signed(now + 2, false))
        .await
        .expect("third upload");
    // A new address: probed at once.
    r.addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9401));
    upload_descriptor(addr, &r.signed(now + 3, false))
        .await
        .expect("upload with a new address");
    wait_probes(&net, 2).await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(net.reach.probes(), 2, "unchanged re-uploads were probed");
}

#[tokio::test]
async fn a_relay_whose_last_probe_failed_is_probed_on_upload() {
    let net = Net::start(1).await;
    let r = Relay::new(9410);
    let addr = net.infos[0].dir_addr;
    let now = now_unix();
    net.reach.set_down(r.id.public(), true);
    upload_descriptor(addr, &r.signed(now, false))
        .await
        .expect("first upload");
    wait_probes(&net, 1).await;
    net.reach.set_down(r.id.public(), false);
    upload_descriptor(addr, &r.signed(now + 1, false))
        .await
        .expect("second upload");
    wait_probes(&net, 2).await;
}
