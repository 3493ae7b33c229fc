//! Reachability tests: can the authority open a link to a relay's advertised address and does
//! the relay prove the advertised link key?
//!
//! The authority depends on the small [`Reachability`] trait so tests use a fake.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public};

/// A boxed future returned by [`Reachability::probe`].
pub type ProbeFuture = Pin<Box<dyn Future<Output = bool> + Send + 'static>>;

/// Timeout of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes a relay: `true` iff a link to `addr` completed and the peer proved `link_key` for `id`.
pub trait Reachability: Send + Sync + 'static {
    /// Probe one relay (implementations bound their own time).
    fn probe(&self, addr: SocketAddr, id: RelayId, link_key: X25519Public) -> ProbeFuture;
}

/// The real probe: a full link handshake (`allium_proto::channel::connect_over`), as a client
/// (no static key of ours), which succeeds only if the peer holds the advertised link key. The
/// connection leaves from the outbound bind address in force for the task that polls the probe
/// ([`crate::client::http::with_outbound_bind`]; the authority sets its `outbound_bind_address`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkReachability;

impl Reachability for LinkReachability {
    fn probe(&self, addr: SocketAddr, id: RelayId, link_key: X25519Public) -> ProbeFuture {
        Box::pin(async move {
            let bind = crate::client::http::outbound_bind();
            let r = tokio::time::timeout(PROBE_TIMEOUT, async {
                let tcp = crate::client::http::connect_from(addr, bind).await?;
                allium_proto::channel::connect_over(tcp, &id, &link_key, None).await
            })
            .await;
            match r {
                Ok(Ok(_channel)) => true,
                Ok(Err(e)) => {
                    tracing::debug!(relay = %id, error = %e, "reachability probe failed");
                    false
                }
                Err(_) => false,
            }
        })
    }
}

/// A TCP-connect-only probe: proves the port is open, not the link key (for diagnostics; the
/// authority uses [`LinkReachability`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpReachability;

impl Reachability for TcpReachability {
    fn probe(&self, addr: SocketAddr, _id: RelayId, _link_key: X25519Public) -> ProbeFuture {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            )
        })
    }
}

/// A fake for tests: relays are reachable unless their identity is marked down. It counts the
/// probes it was asked for.
#[derive(Debug, Default)]
pub struct FakeReachability {
    down: Mutex<BTreeSet<RelayId>>,
    probes: std::sync::atomic::AtomicU64,
}

impl FakeReachability {
    /// Everyone reachable.
    pub fn all_up() -> Self {
        Self::default()
    }
    /// Mark a relay reachable or not.
    pub fn set_down(&self, id: RelayId, down: bool) {
        let mut d = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down {
            d.insert(id);
        } else {
            d.remove(&id);
        }
    }
    /// How many probes were made so far.
    pub fn probes(&self) -> u64 {
        self.probes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Reachability for FakeReachability {
    fn probe(&self, _addr: SocketAddr, id: RelayId, _link_key: X25519Public) -> ProbeFuture {
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let up = !self
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id);
        Box::pin(async move { up })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The probe's connection leaves from the outbound bind address in force (the authority's
    /// `outbound_bind_address`), so relays count probes against the authority's own address.
    #[tokio::test]
    async fn link_probe_leaves_from_the_outbound_bind_address() {
        let (mine, relay_ip) = (
            std::net::SocketAddr::from(([127, 41, 0, 1], 0)),
            std::net::SocketAddr::from(([127, 42, 0, 1], 0)),
        );
        if std::net::TcpListener::bind(mine).is_err() {
            eprintln!("skipped: this system routes only 127.0.0.1 to loopback");
            return;
        }
        let relay = tokio::net::TcpListener::bind(relay_ip).await.unwrap();
        let to = relay.local_addr().unwrap();
        let probe = tokio::spawn(crate::client::http::with_outbound_bind(
            Some(mine.ip()),
            LinkReachability.probe(to, RelayId([1; 32]), X25519Public([2; 32])),
        ));
        let (s, from) = tokio::time::timeout(PROBE_TIMEOUT, relay.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from.ip(), mine.ip());
        // No handshake answer: the probe fails.
        drop(s);
        assert!(!probe.await.unwrap());
    }
}
