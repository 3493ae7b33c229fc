//! Links to guards: one Noise link per guard, shared by every circuit through it.
//!
//! A link only routes. Its reader task decodes cells and hands each to its circuit's bounded
//! inbound queue (looked up by circuit id) with `try_send`: it never waits on a circuit, so one
//! slow circuit cannot hold up the others. A queue that is full means the relay sent that circuit
//! more than its windows allow: the route is dropped and the circuit's reactor destroys it
//! ([`crate::err::CircError::QueueOverflow`]). When the link closes, every route is dropped and
//! each circuit's reactor sees its queue end (its streams end with a reset, never a hang).
//!
//! Circuits write to the link through [`ChannelSender`]: each circuit has its own bounded queue
//! there, and the writer packs up to 32 queued cells into one frame, taking them from the circuit
//! that sent least recently (EWMA, `allium_proto::circmux`), so a bulk download does not hold up
//! another circuit's cells on the same guard link.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_crypto::RelayId;
use allium_proto::cell::{Cell, CircId};
use allium_proto::channel::{self, ChannelReceiver, ChannelSender};
use allium_proto::inbox::{InboxFull, InboxRx, InboxTx, inbox};
use tokio::net::{TcpSocket, TcpStream};

use crate::err::ClientError;
use crate::path::RelayInfo;

/// A circuit's route on its link.
struct Route {
    tx: InboxTx<Cell>,
    /// Set when the relay overran the circuit's queue.
    overflowed: Arc<AtomicBool>,
}

/// What a circuit gets when it registers on a link.
pub(crate) struct Registration {
    /// Its circuit id on the link.
    pub(crate) id: CircId,
    /// Its inbound cells, in link order.
    pub(crate) inbound: InboxRx<Cell>,
    /// Set (before the queue ends) if the relay overran the queue.
    pub(crate) overflowed: Arc<AtomicBool>,
}

/// A link's routing table: circuit id → the circuit's bounded inbound queue.
#[derive(Default)]
pub(crate) struct Router {
    routes: Mutex<HashMap<CircId, Route>>,
}

impl Router {
    /// Pick an unused circuit id and open a route for it, with an inbound queue of `cap` cells.
    pub(crate) fn register(&self, cap: usize) -> Result<Registration, ClientError> {
        let mut map = self
            .routes
            .lock()
            .map_err(|_| crate::err::CircError::NotReady("link routing table poisoned"))?;
        let id = loop {
            let id = CircId::random(true);
            if !map.contains_key(&id) {
                break id;
            }
        };
        let (tx, inbound) = inbox(cap);
        let overflowed = Arc::new(AtomicBool::new(false));
        map.insert(
            id,
            Route {
                tx,
                overflowed: Arc::clone(&overflowed),
            },
        );
        Ok(Registration {
            id,
            inbound,
            overflowed,
        })
    }

    /// Drop a circuit's route.
    pub(crate) fn unregister(&self, id: CircId) {
        if let Ok(mut m) = self.routes.lock() {
            m.remove(&id);
        }
    }

    /// Drop every route (the link closed).
    fn clear(&self) {
        if let Ok(mut m) = self.routes.lock() {
            m.clear();
        }
    }

    /// Hand `cell` to its circuit without waiting. A full queue drops the route (the circuit's
    /// reactor then destroys the circuit).
    pub(crate) fn route(&self, cell: Cell) {
        let Ok(mut map) = self.routes.lock() else {
            return;
        };
        // Decoding guarantees an id on every command but PADDING (which has no circuit).
        let Some(id) = cell.circ_id else {
            return;
        };
        let Some(route) = map.get(&id) else {
            // A cell for a circuit we already closed (e.g. its DESTROY crossed ours): drop it.
            return;
        };
        match route.tx.try_send(cell) {
            Ok(()) => {}
            Err(InboxFull::Full) => {
                // The circuit's reactor logs it once when it destroys the circuit.
                route.overflowed.store(true, Ordering::Release);
                map.remove(&id);
            }
            Err(InboxFull::Closed) => {
                map.remove(&id);
            }
        }
    }
}

/// An open link to a guard.
pub(crate) struct Link {
    /// Who is at the other end.
    pub(crate) relay: RelayId,
    pub(crate) sender: ChannelSender,
    router: Router,
    closed: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connect to `relay` (its first IPv4 address) with a fresh client link key.
    pub(crate) async fn connect(
        relay: &RelayInfo,
        timeout: Duration,
    ) -> Result<Arc<Self>, ClientError> {
        // From the outbound bind address of the directory task this runs in, if any.
        let bind = allium_directory::client::http::outbound_bind();
        Self::connect_counted(relay, timeout, None, bind).await
    }

    /// [`Link::connect`], counting the link's frames into `bytes` (the proxy's traffic), from
    /// the local address `bind` when given (the config's `outbound_bind_address`).
    pub(crate) async fn connect_counted(
        relay: &RelayInfo,
        timeout: Duration,
        bytes: Option<&Arc<channel::LinkBytes>>,
        bind: Option<IpAddr>,
    ) -> Result<Arc<Self>, ClientError> {
        let addr = relay.connect_addr().ok_or(ClientError::NoGuardAddress)?;
        let ch = tokio::time::timeout(timeout, async {
            let tcp = connect_tcp(addr, bind).await?;
            channel::connect_over(tcp, &relay.id, &relay.link_key, None).await
        })
        .await
        .map_err(|_| ClientError::Timeout("connecting to the guard"))?
        .map_err(ClientError::Link)?;
        if let Some(b) = bytes {
            ch.count_into(b);
        }
        let (sender, receiver) = ch.split();
        let link = Arc::new(Self {
            relay: relay.id,
            sender,
            router: Router::default(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(reader(Arc::clone(&link), receiver));
        tracing::debug!(guard = %relay.id, "link open");
        Ok(link)
    }

    /// Whether the link is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.sender.is_closed()
    }

    /// Close the link (its circuits fail).
    pub(crate) fn close(&self) {
        self.sender.close();
    }

    /// Open a route for a new circuit (see [`Router::register`]).
    pub(crate) fn register(&self, cap: usize) -> Result<Registration, ClientError> {
        if self.is_closed() {
            return Err(crate::err::CircError::LinkClosed.into());
        }
        self.router.register(cap)
    }

    /// Drop a circuit's route.
    pub(crate) fn unregister(&self, id: CircId) {
        self.router.unregister(id);
    }
}

/// Route cells by circuit id until the link closes, then drop every route.
async fn reader(link: Arc<Link>, mut rx: ChannelReceiver) {
    while let Some(cell) = rx.recv().await {
        link.router.route(cell);
    }
    link.closed.store(true, Ordering::Release);
    tracing::debug!(guard = %link.relay, error = ?rx.error().map(ToString::to_string), "link closed");
    link.router.clear();
}

/// A TCP connection to `addr`, from `bind` (port chosen by the system) when given and of the
/// same address family (Tor's `OutboundBindAddress`).
async fn connect_tcp(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    match bind {
        Some(ip) if ip.is_ipv4() == addr.is_ipv4() => {
            let sock = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

#[cfg(test)]
mod tests {
    use allium_proto::cell::CellCmd;

    use super::*;

    fn cell(id: CircId) -> Cell {
        Cell::new_zeroed(Some(id), CellCmd::RELAY)
    }

    #[tokio::test]
    async fn guard_connections_leave_from_the_outbound_bind_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let bind: IpAddr = "127.0.0.77".parse().unwrap();
        let _c = connect_tcp(addr, Some(bind)).await.unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), bind);
        // No bind address, or one of the other family: the system picks.
        let _c = connect_tcp(addr, Some("::1".parse().unwrap()))
            .await
            .unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 1]));
    }

    #[tokio::test]
    async fn a_full_queue_costs_only_its_own_circuit() {
        let r = Router::default();
        let mut slow = r.register(2).unwrap();
        let mut busy = r.register(8).unwrap();
        for _ in 0..3 {
            r.route(cell(slow.id));
        }
        for _ in 0..5 {
            r.route(cell(busy.id));
        }
        assert!(slow.overflowed.load(Ordering::Acquire));
        assert!(!busy.overflowed.load(Ordering::Acquire));
        // The slow circuit gets what fitted, then the end of its queue; later cells are dropped.
        r.route(cell(slow.id));
        assert!(slow.inbound.recv().await.is_some());
        assert!(slow.inbound.recv().await.is_some());
        assert!(slow.inbound.recv().await.is_none());
        for _ in 0..5 {
            assert!(busy.inbound.try_recv().is_ok());
        }
        assert!(busy.inbound.try_recv().is_err());
        assert_ne!(slow.id, busy.id);
    }

    #[test]
    fn circuit_ids_are_random_initiator_ids_and_never_collide() {
        let r = Router::default();
        let regs: Vec<Registration> = (0..2000).map(|_| r.register(1).unwrap()).collect();
        let ids: Vec<u32> = regs.iter().map(|g| g.id.get()).collect();
        assert!(
            regs.iter().all(|g| g.id.allocatable_by(true)),
            "role bit set"
        );
        let distinct: std::collections::HashSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "no id twice on one link");
        // Not a counter: consecutive ids are not neighbours, and they spread over the space.
        let neighbours = ids
            .windows(2)
            .filter(|w| w[1].wrapping_sub(w[0]) <= 16)
            .count();
        assert!(neighbours < 5, "{neighbours} near-sequential ids");
        let low = ids
            .iter()
            .filter(|&&i| i & 0x7fff_ffff < 0x4000_0000)
            .count();
        assert!(
            (800..1200).contains(&low),
            "{low} of 2000 in the lower half"
        );
    }

    #[tokio::test]
    async fn unknown_circuits_are_dropped_and_clear_ends_every_queue() {
        let r = Router::default();
        let mut a = r.register(4).unwrap();
        r.route(cell(CircId::new(a.id.get() ^ 1).unwrap()));
        assert!(a.inbound.try_recv().is_err(), "a cell for another circuit");
        r.clear();
        assert!(a.inbound.recv().await.is_none());
        assert!(!a.overflowed.load(Ordering::Acquire));
    }
}
