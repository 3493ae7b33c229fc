//! One task per circuit: the reactor owns the circuit's [`ClientCircuit`] and does its I/O. It is
//! the only code that touches the core.
//!
//! - **In:** the circuit's inbound cells (a bounded queue fed by the link reader, which never
//!   waits), commands from the circuit's handles and stream tasks (open, data, consumed, end,
//!   close), and the core's next timeout.
//! - **Out:** cells to the guard link, in the order the core produced them (ratchet order by
//!   construction); events to the stream tasks' bounded queues, with `try_send` (a stream queue
//!   holds a full stream window, so an exit that respects the windows never fills it).
//! - **Backpressure** is per circuit and per stream: a stream's data waits in the reactor (one
//!   buffer per stream, its sender waits for it) until the windows open; the reactor waits only on
//!   the link writer, whose queue the writer drains 32 cells per frame.
//! - The reactor ends when the circuit is closed and its last cells (DESTROY) are queued on the
//!   link; its route on the link is removed, and every stream queue closes (the stream tasks
//!   reset their connections).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use allium_crypto::handshake::HopKeys;
use allium_crypto::relaycell::EndToEndRole;
use allium_proto::relaymsg::{Begin, EndReason, RelayMsg};
use tokio::sync::{mpsc, oneshot};

use crate::circ::{STREAM_QUEUE, Shared, StreamEvent};
use crate::core::{ClientCircuit, Event, StreamId, StreamTarget};
use crate::err::{CircError, ClientError};
use crate::link::{Link, Registration};
use allium_proto::cell::Cell;

/// Most inbound cells handled before the reactor flushes its output.
const INBOUND_BATCH: usize = 64;

/// A request to a circuit's reactor.
pub(crate) enum Cmd {
    /// Open a stream.
    Begin {
        target: StreamTarget,
        reply: oneshot::Sender<Result<(StreamId, mpsc::Receiver<StreamEvent>), ClientError>>,
    },
    /// Send `data` on a stream; `done` gets the emptied buffer back once all of it is packaged.
    Data {
        sid: StreamId,
        data: Vec<u8>,
        done: oneshot::Sender<Vec<u8>>,
    },
    /// The application took `cells` DATA cells of a stream.
    Consumed { sid: StreamId, cells: usize },
    /// End or abort a stream.
    End { sid: StreamId, reason: EndReason },
    /// Close the circuit.
    Close,
    /// Onion-service events of this circuit go to `tx` from now on (before: logged, dropped).
    #[allow(dead_code)] // sent by the onion-service side of `Circuit` (circ.rs)
    OnionEvents { tx: mpsc::Sender<OnionEvent> },
    /// Send an onion-service request to the last hop.
    #[allow(dead_code)] // sent by the onion-service side of `Circuit` (circ.rs)
    OnionSend {
        msg: Box<RelayMsg>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Add the end-to-end hop after the rendezvous point.
    #[allow(dead_code)] // sent by the onion-service side of `Circuit` (circ.rs)
    EndToEnd {
        keys: Box<HopKeys>,
        role: EndToEndRole,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// Service role: accept an incoming stream (CONNECTED).
    #[allow(dead_code)] // sent by the onion-service side of `Circuit` (circ.rs)
    Accept {
        sid: StreamId,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    /// The handshake binding of hop `hop` (ESTABLISH_INTRO signs over it).
    #[allow(dead_code)] // sent by the onion-service side of `Circuit` (circ.rs)
    Binding {
        hop: usize,
        reply: oneshot::Sender<Option<[u8; 32]>>,
    },
}

/// What the owner of an onion-service circuit hears from its reactor (after
/// [`Cmd::OnionEvents`]).
#[allow(dead_code)] // read by the onion-service drivers (issue 13, steps 3-4), not yet wired in
#[derive(Debug)]
pub(crate) enum OnionEvent {
    /// An onion-service message from the last hop (INTRO_ESTABLISHED, INTRODUCE_ACK,
    /// INTRODUCE2, RENDEZVOUS_ESTABLISHED, RENDEZVOUS2).
    Msg(Box<RelayMsg>),
    /// Service role: the client opened stream `sid` through the end-to-end hop; its data comes
    /// on `rx`. Answer with `Circuit::accept_stream` or end it.
    Incoming {
        /// The stream.
        sid: StreamId,
        /// What the client asked for (its port selects the target).
        begin: Box<Begin>,
        /// The stream's events.
        rx: mpsc::Receiver<StreamEvent>,
    },
}

/// Data of a stream waiting for its windows to open.
struct Pending {
    data: Vec<u8>,
    off: usize,
    done: oneshot::Sender<Vec<u8>>,
}

/// A stream as the reactor sees it.
struct Slot {
    tx: mpsc::Sender<StreamEvent>,
    pending: Option<Pending>,
}

/// The reactor of one circuit.
pub(crate) struct Reactor {
    core: ClientCircuit,
    link: Arc<Link>,
    inbound: allium_proto::inbox::InboxRx<Cell>,
    overflowed: Arc<AtomicBool>,
    cmds: mpsc::Receiver<Cmd>,
    shared: Arc<Shared>,
    built: Option<oneshot::Sender<Result<(), CircError>>>,
    /// A one-hop circuit (directory fetches): built once its only hop is added (the core
    /// announces `Built` only after extending).
    one_hop: bool,
    slots: HashMap<StreamId, Slot>,
    n_pending: usize,
    /// Where onion-service events go, once someone asked for them.
    onion: Option<mpsc::Sender<OnionEvent>>,
}

impl Reactor {
    pub(crate) fn new(
        core: ClientCircuit,
        link: Arc<Link>,
        reg: Registration,
        cmds: mpsc::Receiver<Cmd>,
        shared: Arc<Shared>,
        built: oneshot::Sender<Result<(), CircError>>,
    ) -> Self {
        Self {
            core,
            link,
            inbound: reg.inbound,
            overflowed: reg.overflowed,
            cmds,
            shared,
            built: Some(built),
            one_hop: false,
            slots: HashMap::new(),
            n_pending: 0,
            onion: None,
        }
    }

    /// Make this the reactor of a one-hop circuit: it reports the build done when hop 0 is added.
    pub(crate) fn one_hop(mut self) -> Self {
        self.one_hop = true;
        self
    }

    /// Put the core's queued cells on the link, in order.
    async fn flush(&mut self) {
        while let Some(cell) = self.core.poll_transmit() {
            match self.link.sender.try_send(cell) {
                Ok(None) => {}
                Ok(Some(cell)) => {
                    if self.link.sender.send(cell).await.is_err() {
                        self.core.handle_link_closed();
                    }
                }
                Err(_) => self.core.handle_link_closed(),
            }
        }
    }

    fn dispatch_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::HopAdded { hop } => {
                    self.shared.progress.store(hop + 1, Ordering::Release);
                    if self.one_hop
                        && hop == 0
                        && let Some(b) = self.built.take()
                    {
                        let _ = b.send(Ok(()));
                    }
                }
                Event::Built => {
                    if let Some(b) = self.built.take() {
                        let _ = b.send(Ok(()));
                    }
                }
                Event::ExtendFailed { hop, error } => {
                    tracing::debug!(circ = %self.core.id(), hop, "extending failed: {error}");
                }
                Event::OnionService { msg } => {
                    let ev = OnionEvent::Msg(Box::new(msg));
                    if self
                        .onion
                        .as_ref()
                        .is_none_or(|tx| tx.try_send(ev).is_err())
                    {
                        // Nobody drives this circuit as an onion-service circuit, or its owner
                        // is behind (its queue is bounded): the message is dropped.
                        tracing::debug!(circ = %self.core.id(), "onion-service message dropped");
                    }
                }
                Event::IncomingStream { stream, begin } => self.incoming(stream, begin),
                Event::StreamConnected { stream } => self.deliver(stream, StreamEvent::Connected),
                Event::StreamData { stream, data } => {
                    self.deliver(stream, StreamEvent::Data(data));
                }
                Event::Resolved { stream, addrs } => {
                    self.deliver(stream, StreamEvent::Resolved(addrs));
                    self.drop_slot(stream);
                }
                Event::StreamEnded { stream, result } => {
                    let gone = self.core.stream_state(stream).is_none();
                    self.deliver(stream, StreamEvent::End(result));
                    if gone {
                        self.drop_slot(stream);
                    }
                }
                Event::Destroyed { reason } => {
                    if reason.is_relay_fault() {
                        tracing::info!(circ = %self.core.id(), "destroyed a circuit: {reason}");
                    } else {
                        tracing::debug!(circ = %self.core.id(), "circuit closed: {reason}");
                    }
                    self.shared.closed.store(true, Ordering::Release);
                    self.shared
                        .progress
                        .closed(crate::control::circ_reason(&reason));
                    if let Some(b) = self.built.take() {
                        let _ = b.send(Err(reason));
                    }
                    // Dropping the senders ends every stream task.
                    self.slots.clear();
                    self.n_pending = 0;
                }
            }
        }
        self.shared
            .n_streams
            .store(self.core.n_streams(), Ordering::Release);
    }

    /// Service role: hand an incoming stream to the onion-service layer, or refuse it.
    fn incoming(&mut self, sid: StreamId, begin: Begin) {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let ev = OnionEvent::Incoming {
            sid,
            begin: Box::new(begin),
            rx,
        };
        match self.onion.as_ref().map(|o| o.try_send(ev)) {
            Some(Ok(())) => {
                self.slots.insert(sid, Slot { tx, pending: None });
            }
            _ => self.core.close_stream(sid, EndReason::RESOURCELIMIT, now()),
        }
    }

    fn drop_slot(&mut self, sid: StreamId) {
        if let Some(s) = self.slots.remove(&sid)
            && s.pending.is_some()
        {
            self.n_pending = self.n_pending.saturating_sub(1);
        }
    }

    fn deliver(&mut self, sid: StreamId, ev: StreamEvent) {
        let Some(slot) = self.slots.get(&sid) else {
            return;
        };
        match slot.tx.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Cannot happen while the XOFF limit holds (the queue holds that much); if it
                // does, abort the stream rather than wait or grow.
                self.drop_slot(sid);
                self.core.close_stream(sid, EndReason::RESOURCELIMIT, now());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Nobody reads the stream any more.
                self.drop_slot(sid);
                self.core.close_stream(sid, EndReason::MISC, now());
            }
        }
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        let now = now();
        match cmd {
            Cmd::Begin { target, reply } => {
                let r = self.core.begin_stream(&target, now).map(|sid| {
                    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                    self.slots.insert(sid, Slot { tx, pending: None });
                    (sid, rx)
                });
                let _ = reply.send(r.map_err(ClientError::from));
            }
            Cmd::Data { sid, data, done } => {
                let Some(slot) = self.slots.get_mut(&sid) else {
                    return; // dropping `done` tells the sender the stream is gone
                };
                let off = self.core.package(sid, &data, now);
                if off >= data.len() {
                    let _ = done.send(data);
                } else {
                    if slot.pending.is_none() {
                        self.n_pending += 1;
                    }
                    slot.pending = Some(Pending { data, off, done });
                }
            }
            Cmd::Consumed { sid, cells } => self.core.consumed(sid, cells, now),
            Cmd::End { sid, reason } => {
                self.core.close_stream(sid, reason, now);
                if self.core.stream_state(sid).is_none() || reason != EndReason::DONE {
                    self.drop_slot(sid);
                } else if let Some(slot) = self.slots.get_mut(&sid)
                    && slot.pending.take().is_some()
                {
                    self.n_pending = self.n_pending.saturating_sub(1);
                }
            }
            Cmd::Close => self.core.close(),
            Cmd::OnionEvents { tx } => self.onion = Some(tx),
            Cmd::OnionSend { msg, reply } => {
                let r = self.core.send_onion_service(&msg);
                let _ = reply.send(r.map_err(ClientError::from));
            }
            Cmd::EndToEnd { keys, role, reply } => {
                let r = self.core.add_end_to_end(&keys, role);
                let _ = reply.send(r.map_err(ClientError::from));
            }
            Cmd::Accept { sid, reply } => {
                let r = self.core.accept_stream(sid);
                let _ = reply.send(r.map_err(ClientError::from));
            }
            Cmd::Binding { hop, reply } => {
                let _ = reply.send(self.core.hop_binding(hop).copied());
            }
        }
    }

    /// Package waiting stream data whose windows opened.
    fn package_pending(&mut self) {
        if self.n_pending == 0 {
            return;
        }
        let now = now();
        for (sid, slot) in &mut self.slots {
            let Some(p) = slot.pending.as_mut() else {
                continue;
            };
            if !self.core.can_package(*sid) {
                continue;
            }
            let rest = p.data.get(p.off..).unwrap_or_default();
            p.off += self.core.package(*sid, rest, now);
            if p.off >= p.data.len()
                && let Some(p) = slot.pending.take()
            {
                self.n_pending = self.n_pending.saturating_sub(1);
                let _ = p.done.send(p.data);
            }
        }
    }

    fn on_inbound_end(&mut self) {
        if self.overflowed.load(Ordering::Acquire) {
            self.core.abort(CircError::QueueOverflow);
        } else {
            self.core.handle_link_closed();
        }
    }
}

/// The current time, for the core (the reactor is where time enters).
fn now() -> std::time::Instant {
    #[allow(clippy::disallowed_methods)] // the driver is where time enters
    tokio::time::Instant::now().into_std()
}

/// Drive the circuit until it is closed.
pub(crate) async fn run(mut r: Reactor) {
    let id = r.core.id();
    let mut batch: Vec<Cell> = Vec::with_capacity(INBOUND_BATCH);
    loop {
        r.package_pending();
        r.dispatch_events();
        r.flush().await;
        if r.core.is_closed() {
            // Report a failure that flushing itself found, and send what is left (DESTROY).
            r.dispatch_events();
            r.flush().await;
            break;
        }
        let deadline = r.core.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Take what is queued (bounded), then flush once: cells leave in batches.
            n = r.inbound.recv_many(&mut batch, INBOUND_BATCH) => {
                if n == 0 {
                    r.on_inbound_end();
                }
                let t = now();
                for cell in batch.drain(..) {
                    let _ = r.core.handle_cell(cell, t);
                }
            },
            cmd = r.cmds.recv() => match cmd {
                Some(cmd) => r.handle_cmd(cmd),
                // Every handle is gone: nobody can use the circuit.
                None => r.core.close(),
            },
            () = sleep => r.core.handle_timeout(now()),
        }
    }
    r.link.unregister(id);
    r.shared.closed.store(true, Ordering::Release);
    r.shared.progress.closed("FINISHED");
}
