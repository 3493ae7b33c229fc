//! Operating an authority: the data-directory lock and live reconfiguration.

mod common;

use allium_directory::authority::{self, StartOptions};
use allium_directory::{client, now_unix};
use common::{Net, Relay, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_authority_on_the_same_data_dir_is_refused() {
    let net = Net::start(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let err = authority::start_with(
        config(net.dirs[0].path(), addr, &net.infos),
        StartOptions {
            listener: Some(listener),
            reachability: net.reach.clone(),
            schedule: false,
        },
    )
    .await
    .expect_err("a second authority on the same data directory must not start");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "data directory {} is in use by another allium process (pid {})",
            net.dirs[0].path().display(),
            std::process::id()
        )),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_applies_reloadable_keys_and_ignores_the_others() {
    let net = Net::start(1).await;
    let h = net.live()[0];
    let started = h.config();
    let mut new = (*started).clone();
    new.max_relays = 1;
    new.listen = "127.0.0.1:1".parse().expect("address");
    new.voting_interval_secs = started.voting_interval_secs + 60;
    h.reconfigure(&new);
    let live = h.config();
    assert_eq!(live.max_relays, 1);
    assert_eq!(live.listen, started.listen, "listen needs a restart");
    assert_eq!(live.voting_interval_secs, started.voting_interval_secs);

    // The new descriptor cap is in force for the next uploads.
    let now = now_unix();
    let addr = h.dir_addr();
    client::upload_descriptor(addr, &Relay::new(9100).signed(now, false))
        .await
        .expect("the first relay fits");
    let second = client::upload_descriptor(addr, &Relay::new(9101).signed(now, false)).await;
    assert!(
        second.is_err(),
        "the reloaded max_relays = 1 must refuse a second relay"
    );
    assert_eq!(h.descriptor_count(), 1);
}
