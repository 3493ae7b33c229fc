//! Reachability self-test (as Tor's): before its first descriptor upload, and again whenever it
//! is asked to (an address change), the relay opens a full link handshake to its own advertised
//! address, as a client would. If that fails it warns, naming the address and what to check, and
//! keeps retrying until it succeeds.
//!
//! A relay that cannot reach itself is usually behind a NAT without port forwarding, behind a
//! firewall, or advertising the wrong address; the authorities would not list it either.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use allium_proto::channel;
use tokio::sync::Notify;

use crate::ctx::Ctx;

/// Bound on one self-test (TCP connect and link handshake).
pub(crate) const SELFTEST_TIMEOUT: Duration = Duration::from_secs(15);
/// First wait before testing again after a failure (doubles up to the publication interval).
const RETRY_FIRST: Duration = Duration::from_secs(20);

/// The outcome of the last self-test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// Not tested yet.
    Unknown,
    /// The last self-test completed a link handshake with this relay.
    Reachable,
    /// The last self-test failed.
    Unreachable,
}

/// Self-test state shared by the relay's tasks.
#[derive(Debug, Default)]
pub(crate) struct SelfTestState {
    /// 0 unknown, 1 reachable, 2 unreachable.
    status: AtomicU8,
    /// Test again now (the advertised address changed).
    pub(crate) retest: Notify,
}

impl SelfTestState {
    pub(crate) fn get(&self) -> Reachability {
        match self.status.load(Ordering::Relaxed) {
            1 => Reachability::Reachable,
            2 => Reachability::Unreachable,
            _ => Reachability::Unknown,
        }
    }
    fn set(&self, r: Reachability) {
        let v = match r {
            Reachability::Unknown => 0,
            Reachability::Reachable => 1,
            Reachability::Unreachable => 2,
        };
        self.status.store(v, Ordering::Relaxed);
    }
}

/// The warning for an unreachable advertised address: the address, the failure and what to
/// check.
pub(crate) fn unreachable_warning(addr: SocketAddr, why: &str, retry: Duration) -> String {
    format!(
        "reachability self-test failed: this relay cannot reach its own advertised address {addr} \
         ({why}); clients and authorities will not reach it either. Check port forwarding on \
         your router or NAT to port {port}, the firewall, and the `advertised` key of the \
         configuration. Testing again in {secs} s",
        port = addr.port(),
        secs = retry.as_secs()
    )
}

/// One self-test: a full link handshake to `ctx.advertised` that must reach this relay's own
/// identity and link key. Returns what went wrong, for the warning.
#[allow(clippy::disallowed_methods)] // Driver: bounds one network attempt in real time.
pub(crate) async fn test_once(ctx: &Ctx) -> Result<(), String> {
    let link_key = ctx.keys.link.public();
    let attempt = channel::connect(ctx.advertised, &ctx.keys.id, &link_key, None);
    match tokio::time::timeout(SELFTEST_TIMEOUT, attempt).await {
        Ok(Ok(ch)) => {
            ch.close();
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no handshake within {} s",
            SELFTEST_TIMEOUT.as_secs()
        )),
    }
}

/// Test once and record the result; logs success at info (first time) and failure at warn.
pub(crate) async fn test_and_log(ctx: &Ctx, retry: Duration) -> bool {
    let before = ctx.dir.selftest.get();
    match test_once(ctx).await {
        Ok(()) => {
            if before != Reachability::Reachable {
                tracing::info!(
                    "reachability self-test: the advertised address {} is reachable (link \
                     handshake to itself succeeded)",
                    ctx.advertised
                );
            }
            ctx.dir.selftest.set(Reachability::Reachable);
            true
        }
        Err(why) => {
            tracing::warn!("{}", unreachable_warning(ctx.advertised, &why, retry));
            ctx.dir.selftest.set(Reachability::Unreachable);
            false
        }
    }
}

/// The wait after a first failure: 20 s, at most the publication interval.
pub(crate) fn first_retry(ctx: &Ctx) -> Duration {
    RETRY_FIRST.min(publish_interval(ctx))
}

fn publish_interval(ctx: &Ctx) -> Duration {
    Duration::from_secs(ctx.cfg.descriptor_publish_interval_secs.max(1))
}

/// Retry task: after a failed test, test again with backoff (from 20 s, doubling, up to the
/// publication interval) until reachable; test again when asked to (address change).
#[allow(clippy::disallowed_methods)] // Driver task: its schedule is wall-clock time.
pub(crate) async fn run(ctx: std::sync::Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let cap = publish_interval(&ctx);
    let mut retry = first_retry(&ctx);
    loop {
        let wait = match ctx.dir.selftest.get() {
            Reachability::Unreachable => Some(retry),
            // Reachable or not tested yet (the publisher runs the first test): wait for a request.
            _ => None,
        };
        tokio::select! {
            () = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = ctx.dir.selftest.retest.notified() => retry = first_retry(&ctx),
            _ = shutdown.changed() => return,
        }
        let next = (retry * 2).min(cap);
        if test_and_log(&ctx, next).await {
            retry = first_retry(&ctx);
        } else {
            retry = next;
        }
    }
}

#[cfg(test)]
mod tests {
    // Loopback sockets: bounded real-time waits for the relay's own tasks.
    #![allow(clippy::disallowed_methods)]

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::RelayConfig;

    /// A log sink for one test (current-thread runtime, so every task logs into it).
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("sink")).into_owned()
        }
    }

    async fn wait_for(h: &crate::RelayHandle, want: Reachability) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while h.reachability() != want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("self-test finished");
    }

    #[tokio::test]
    async fn unreachable_advertised_address_is_named_in_a_warning() {
        let sink = Sink::default();
        let writer = sink.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(sub);

        // An address nobody listens on: bind a port, then free it.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = free.local_addr().expect("addr");
        drop(free);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = RelayConfig::for_test("Unreachable", dir.path());
        cfg.advertised = Some(dead);
        let h = crate::start(cfg).await.expect("start");
        wait_for(&h, Reachability::Unreachable).await;
        let log = sink.text();
        assert!(
            log.contains("WARN")
                && log.contains(&format!("cannot reach its own advertised address {dead}"))
                && log.contains("port forwarding")
                && log.contains("`advertised`"),
            "{log}"
        );
        h.shutdown().await;

        // The same relay advertising the address it listens on passes the test.
        let mut cfg = RelayConfig::for_test("Reachable", dir.path());
        cfg.advertised = None;
        let h = crate::start(cfg).await.expect("start");
        wait_for(&h, Reachability::Reachable).await;
        assert!(sink.text().contains(&format!(
            "the advertised address {} is reachable",
            h.advertised_addr()
        )));
        h.shutdown().await;
    }

    #[test]
    fn warning_text_says_what_to_check() {
        let w = unreachable_warning(
            "192.0.2.7:9001".parse().expect("addr"),
            "connection refused",
            Duration::from_secs(40),
        );
        assert!(w.contains("192.0.2.7:9001") && w.contains("connection refused"));
        assert!(w.contains("port 9001") && w.contains("firewall") && w.contains("in 40 s"));
    }
}
