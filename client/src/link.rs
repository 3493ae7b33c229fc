//! Links to guards: one Noise link per guard, shared by every circuit through it.
//!
//! A reader task per link takes cells off the [`ChannelReceiver`] and hands each to its circuit
//! (looked up by circuit id) *in the reader task itself*: the circuit decrypts and dispatches
//! under a short lock, so a cell costs no extra task switch. When the link closes, every circuit
//! on it fails at once, which closes their streams (SOCKS clients see a reset, never a hang).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_crypto::RelayId;
use allium_proto::cell::{Cell, CellCmd, CircId};
use allium_proto::channel::{self, ChannelReceiver, ChannelSender};

use crate::circ::Circuit;
use crate::err::ClientError;
use crate::path::RelayInfo;

/// An open link to a guard.
pub(crate) struct Link {
    /// Who is at the other end.
    pub(crate) relay: RelayId,
    pub(crate) sender: ChannelSender,
    circuits: Mutex<HashMap<u32, Arc<Circuit>>>,
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
        let addr = relay
            .connect_addr()
            .ok_or_else(|| ClientError::Link("guard has no address".into()))?;
        let ch = tokio::time::timeout(
            timeout,
            channel::connect(addr, &relay.id, &relay.link_key, None),
        )
        .await
        .map_err(|_| ClientError::Timeout("connecting to the guard"))?
        .map_err(|e| ClientError::Link(e.to_string()))?;
        let (sender, receiver) = ch.split();
        let link = Arc::new(Self {
            relay: relay.id,
            sender,
            circuits: Mutex::new(HashMap::new()),
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

    /// Pick an unused circuit id and register `make(id)` under it.
    pub(crate) fn register(
        &self,
        make: impl FnOnce(CircId) -> Arc<Circuit>,
    ) -> Result<Arc<Circuit>, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Link("link closed".into()));
        }
        let mut map = self
            .circuits
            .lock()
            .map_err(|_| ClientError::Link("internal lock poisoned".into()))?;
        let id = loop {
            let id = CircId::random(true);
            if !map.contains_key(&id.get()) {
                break id;
            }
        };
        let c = make(id);
        map.insert(id.get(), Arc::clone(&c));
        Ok(c)
    }

    /// Forget a circuit.
    pub(crate) fn unregister(&self, id: CircId) {
        if let Ok(mut m) = self.circuits.lock() {
            m.remove(&id.get());
        }
    }
}

/// Demultiplex cells by circuit id until the link closes, then fail every circuit on it.
async fn reader(link: Arc<Link>, mut rx: ChannelReceiver) {
    while let Some(cell) = rx.recv().await {
        let circ = link
            .circuits
            .lock()
            .ok()
            .and_then(|m| m.get(&cell.circ_id).cloned());
        let Some(circ) = circ else {
            // A cell for a circuit we already closed (e.g. its DESTROY crossed ours): drop it.
            continue;
        };
        if cell.cmd == CellCmd::DESTROY {
            circ.on_destroyed("the circuit was destroyed by a relay");
            link.unregister(circ.id);
            continue;
        }
        if let Err(why) = circ.handle_cell(cell) {
            tracing::debug!(circ = %circ.id, why, "closing circuit");
            circ.close_because(why);
        }
    }
    link.closed.store(true, Ordering::Release);
    tracing::debug!(guard = %link.relay, error = ?rx.error().map(ToString::to_string), "link closed");
    let circs: Vec<Arc<Circuit>> = link
        .circuits
        .lock()
        .map(|mut m| m.drain().map(|(_, c)| c).collect())
        .unwrap_or_default();
    for c in circs {
        c.on_destroyed("the link to the guard closed");
    }
}

/// Queue a cell on the link (without a wait when the queue has room), or fail if the link is
/// closed.
pub(crate) async fn send(link: &Link, cell: Cell) -> Result<(), ClientError> {
    let err = |e: allium_proto::LinkError| ClientError::Link(e.to_string());
    match link.sender.try_send(cell).map_err(err)? {
        None => Ok(()),
        Some(cell) => link.sender.send(cell).await.map_err(err),
    }
}
