//! Client circuits as the rest of the crate sees them: a [`Circuit`] handle that talks to the
//! circuit's reactor task (`reactor.rs`), which alone owns the sans-IO
//! [`crate::core::ClientCircuit`].
//!
//! Building ([`build`]): register a route on the guard link, create the core along the path,
//! spawn the reactor, wait for [`crate::core::Event::Built`]. Dropping the last handle (or the
//! build future) closes the circuit.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use allium_crypto::RelayId;
use allium_crypto::handshake::HopKeys;
use allium_crypto::relaycell::EndToEndRole;
use allium_proto::cell::CircId;
use allium_proto::flowctl::{CWND_MAX, XOFF_LIMIT};
use allium_proto::relaymsg::{EndReason, RelayMsg};
use tokio::sync::{mpsc, oneshot};

use crate::control::BuildProgress;
use crate::core::{CircParams, ClientCircuit, DataCell, HopTarget, StreamId, StreamTarget};
use crate::err::{CircError, ClientError, StreamError};
use crate::link::Link;
use crate::path::{Path, RelayInfo};
use crate::reactor::{self, Cmd, OnionEvent};

/// Most open streams per circuit (relays accept 512 by default); a busier isolation key gets
/// another circuit.
pub(crate) const MAX_STREAMS: usize = 500;
/// Capacity of a circuit's inbound queue: a maximal congestion window of DATA plus a control
/// cell per stream each way and some slack. A relay that respects congestion control never
/// fills it.
pub(crate) const INBOUND_CAP: usize = CWND_MAX as usize + 2 * MAX_STREAMS + 64;
/// Capacity of a stream's event queue: the XOFF limit plus control events.
pub(crate) const STREAM_QUEUE: usize = XOFF_LIMIT as usize + 16;
/// Capacity of a circuit's onion-service event queue (INTRODUCE2 bursts beyond it are dropped;
/// the introduction layer's replay cache and PoW handle floods).
#[allow(dead_code)] // used by `Circuit::onion_events` (see there)
const ONION_QUEUE: usize = 64;
/// Capacity of a circuit's command queue (shared by its streams; each has at most one data
/// buffer in flight).
const CMD_CAP: usize = 256;

/// What a stream task receives from its circuit's reactor.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    /// The exit connected.
    Connected,
    /// Stream data. Report it with [`Circuit::consumed`] once written to the application.
    Data(DataCell),
    /// The exit resolved a name (possibly to nothing).
    Resolved(Vec<IpAddr>),
    /// The stream ended: `Ok` for the exit's END DONE, else why.
    End(Result<(), StreamError>),
}

/// State the reactor publishes for the circuit manager.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) closed: AtomicBool,
    pub(crate) n_streams: AtomicUsize,
    /// Hops added so far (the index of the hop being added, while building), reported to the
    /// control port for circuits the manager builds.
    pub(crate) progress: Arc<BuildProgress>,
}

/// A handle on a client circuit.
pub(crate) struct Circuit {
    /// Circuit id on the guard link.
    pub(crate) id: CircId,
    /// The exit (for port checks).
    pub(crate) exit: RelayInfo,
    /// The identities of the hops, guard first.
    pub(crate) hops: [RelayId; 3],
    cmd: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuit")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Circuit {
    /// Whether the circuit is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.cmd.is_closed()
    }

    /// The circuit's id on the control port (0 if it is not listed there).
    pub(crate) fn control_id(&self) -> u64 {
        self.shared.progress.control_id()
    }

    /// Number of open streams (as last published by the reactor).
    pub(crate) fn n_streams(&self) -> usize {
        self.shared.n_streams.load(Ordering::Acquire)
    }

    /// Close the circuit and tell the guard (DESTROY, reason NONE).
    pub(crate) fn close_with_destroy(&self) {
        if let Err(mpsc::error::TrySendError::Full(c)) = self.cmd.try_send(Cmd::Close)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let tx = self.cmd.clone();
            rt.spawn(async move {
                let _ = tx.send(c).await;
            });
        }
    }

    async fn send(&self, c: Cmd) -> Result<(), ClientError> {
        self.cmd
            .send(c)
            .await
            .map_err(|_| ClientError::Circuit(CircError::Closed))
    }

    /// Open a stream to `target`; returns its id and its event queue (the answer to BEGIN or
    /// RESOLVE comes there).
    pub(crate) async fn open_stream(
        &self,
        target: StreamTarget,
    ) -> Result<(StreamId, mpsc::Receiver<StreamEvent>), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Begin { target, reply: tx }).await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))?
    }

    /// Send `data` on stream `sid`, waiting while the windows are closed; returns the buffer
    /// (emptied) once all of it was packaged.
    pub(crate) async fn send_data(
        &self,
        sid: StreamId,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Data {
            sid,
            data,
            done: tx,
        })
        .await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))
    }

    /// The application took `cells` DATA cells of `sid` (stream SENDMEs may now be due).
    pub(crate) async fn consumed(&self, sid: StreamId, cells: usize) -> Result<(), ClientError> {
        self.send(Cmd::Consumed { sid, cells }).await
    }

    /// We will send no more data on `sid` (END DONE), or abort it (any other reason).
    pub(crate) async fn end_stream(&self, sid: u16, reason: EndReason) {
        if let Some(sid) = StreamId::new(sid) {
            let _ = self.send(Cmd::End { sid, reason }).await;
        }
    }
}

/// The onion-service side of a circuit (issue 13): its requests, events, the end-to-end hop
/// and incoming streams.
#[allow(dead_code)] // for the onion-service drivers (issue 13, steps 3-4), not yet wired in
impl Circuit {
    /// Onion-service events of this circuit (its messages, incoming streams) come on the
    /// returned queue from now on; ask before sending the first onion-service request.
    pub(crate) async fn onion_events(&self) -> Result<mpsc::Receiver<OnionEvent>, ClientError> {
        let (tx, rx) = mpsc::channel(ONION_QUEUE);
        self.send(Cmd::OnionEvents { tx }).await?;
        Ok(rx)
    }

    /// Send an onion-service request (ESTABLISH_INTRO, INTRODUCE1, ESTABLISH_RENDEZVOUS,
    /// RENDEZVOUS1) to the last hop.
    pub(crate) async fn send_onion_service(&self, msg: RelayMsg) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::OnionSend {
            msg: Box::new(msg),
            reply: tx,
        })
        .await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))?
    }

    /// Add the end-to-end hop after the rendezvous point (the client after RENDEZVOUS2, the
    /// service after sending RENDEZVOUS1).
    pub(crate) async fn add_end_to_end(
        &self,
        keys: HopKeys,
        role: EndToEndRole,
    ) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::EndToEnd {
            keys: Box::new(keys),
            role,
            reply: tx,
        })
        .await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))?
    }

    /// Service role: accept incoming stream `sid` (CONNECTED goes to the client).
    pub(crate) async fn accept_stream(&self, sid: StreamId) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Accept { sid, reply: tx }).await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))?
    }

    /// The handshake binding of hop `hop` (0: first), `None` if it has no such hop.
    pub(crate) async fn hop_binding(&self, hop: usize) -> Result<Option<[u8; 32]>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Binding { hop, reply: tx }).await?;
        rx.await
            .map_err(|_| ClientError::Circuit(CircError::Closed))
    }
}

impl Drop for Circuit {
    fn drop(&mut self) {
        // The reactor also closes the circuit when every handle is gone (its command queue
        // ends); this only makes it prompt.
        let _ = self.cmd.try_send(Cmd::Close);
    }
}

/// The build targets for `path`, guard first.
pub(crate) fn hop_targets(path: &Path) -> Vec<HopTarget> {
    path.hops()
        .iter()
        .map(|r| HopTarget::new(r.id, r.onion_key, &r.addrs))
        .collect()
}

/// Build a three-hop circuit along `path` through `link` (a link to `path.guard`). The core
/// times the build out after `params.build_timeout`; dropping the future closes the half-built
/// circuit. `progress` ends up holding the index of the hop being added when the build stopped
/// (3 when done), so the caller can tell which relay failed.
pub(crate) async fn build(
    link: Arc<Link>,
    path: &Path,
    params: CircParams,
    progress: Arc<BuildProgress>,
) -> Result<Arc<Circuit>, ClientError> {
    let shared = Arc::new(Shared {
        progress,
        ..Shared::default()
    });
    let reg = link.register(INBOUND_CAP)?;
    let id = reg.id;
    #[allow(clippy::disallowed_methods)] // the driver is where time enters
    let now = tokio::time::Instant::now().into_std();
    let core = match ClientCircuit::build(id, hop_targets(path), params, now) {
        Ok(c) => c,
        Err(e) => {
            link.unregister(id);
            return Err(e.into());
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(CMD_CAP);
    let (built_tx, built_rx) = oneshot::channel();
    let circ = Arc::new(Circuit {
        id,
        exit: path.exit.clone(),
        hops: [path.guard.id, path.middle.id, path.exit.id],
        cmd: cmd_tx,
        shared: Arc::clone(&shared),
    });
    tokio::spawn(reactor::run(reactor::Reactor::new(
        core, link, reg, cmd_rx, shared, built_tx,
    )));
    match built_rx.await {
        Ok(Ok(())) => Ok(circ),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CircError::Closed.into()),
    }
}

/// Build a circuit along `hops` (one or more, first hop first) through `link` (a link to the
/// first hop), as [`build`] does for three. The bandwidth scanner (`bwscan.rs`) uses two hops;
/// the handle's `hops` then repeats the last relay.
pub(crate) async fn build_hops(
    link: Arc<Link>,
    hops: &[RelayInfo],
    params: CircParams,
) -> Result<Arc<Circuit>, ClientError> {
    let (Some(first), Some(last)) = (hops.first(), hops.last()) else {
        return Err(CircError::NotReady("empty path").into());
    };
    let ids = [
        first.id,
        hops.get(1).unwrap_or(last).id,
        hops.get(2).unwrap_or(last).id,
    ];
    let shared = Arc::new(Shared::default());
    let reg = link.register(INBOUND_CAP)?;
    let id = reg.id;
    #[allow(clippy::disallowed_methods)] // the driver is where time enters
    let now = tokio::time::Instant::now().into_std();
    let targets = hops
        .iter()
        .map(|r| HopTarget::new(r.id, r.onion_key, &r.addrs))
        .collect();
    let core = match ClientCircuit::build(id, targets, params, now) {
        Ok(c) => c,
        Err(e) => {
            link.unregister(id);
            return Err(e.into());
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(CMD_CAP);
    let (built_tx, built_rx) = oneshot::channel();
    let circ = Arc::new(Circuit {
        id,
        exit: last.clone(),
        hops: ids,
        cmd: cmd_tx,
        shared: Arc::clone(&shared),
    });
    let mut r = reactor::Reactor::new(core, link, reg, cmd_rx, shared, built_tx);
    if hops.len() == 1 {
        r = r.one_hop();
    }
    tokio::spawn(reactor::run(r));
    match built_rx.await {
        Ok(Ok(())) => Ok(circ),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CircError::Closed.into()),
    }
}

#[cfg(test)]
#[path = "circ_tests.rs"]
mod tests;
