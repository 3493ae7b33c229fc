//! Client circuits: building (CREATE, then EXTEND twice), relay-cell crypto, flow control and
//! stream multiplexing.
//!
//! Concurrency model (no task switch per cell where it can be avoided):
//! - Backward cells are decrypted and dispatched by the link's reader task
//!   ([`Circuit::handle_cell`]) under a short `std` mutex. A DATA cell's boxed body moves, without
//!   a copy or allocation, into its stream's bounded queue (capacity ≥ the stream window, so a
//!   peer that respects flow control can never overflow it).
//! - Forward cells are encrypted by the task that has the data (the SOCKS stream's reader) and
//!   queued on the link while holding `send_lock`, which keeps the per-hop ratchets and the link
//!   order in step. Several cells are built per lock and handed to the link writer, which packs
//!   them into one Noise frame.
//! - Circuit SENDMEs that the reader decides to send go through a small per-circuit task (the
//!   reader never waits on the link).
//! - Any protocol or crypto failure destroys the circuit (DESTROY reason NONE), and every stream on
//!   it ends at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use allium_crypto::RelayId;
use allium_crypto::handshake;
use allium_crypto::relaycell::{BACKWARD_MSG_OFFSET, ClientCircuitCrypto, RELAY_MSG_LEN, Tag};
use allium_proto::cell::{
    Cell, CellBody, CellCmd, CircId, Create, Created, DestroyReason, HTYPE_NTOR3,
};
use allium_proto::flowctl::{
    CircRecvWindow, CircSendWindow, STREAM_WINDOW_START, StreamRecvWindow, StreamSendWindow,
};
use allium_proto::relaymsg::{
    self, End, EndReason, Extend, LinkSpec, RELAY_HEADER_LEN, RelayCmd, RelayHeader, RelayMsg,
    ResolvedValue, Sendme,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::err::ClientError;
use crate::isolation::IsolationKey;
use crate::link::{self, Link};
use crate::path::{Path, RelayInfo};

/// Most RELAY_EARLY cells a circuit may carry (docs/protocol/90-circuits.md).
const MAX_RELAY_EARLY: u8 = 8;
/// Most open streams per circuit (relays accept 512 by default); a busier isolation key gets
/// another circuit.
pub(crate) const MAX_STREAMS: usize = 500;
/// Capacity of a stream's event queue: a full stream window plus control events.
const STREAM_QUEUE: usize = STREAM_WINDOW_START as usize + 16;
/// Where the data of a backward DATA cell starts in the cell body.
pub(crate) const DATA_OFFSET: usize = BACKWARD_MSG_OFFSET + RELAY_HEADER_LEN;

/// What a stream task receives from its circuit.
pub(crate) enum StreamEvent {
    /// Stream data: `body[start..start + len]`. `sendme` is set when this cell completes a
    /// stream window increment: once the data is delivered, send a stream SENDME with that tag.
    Data {
        /// The decrypted cell body.
        body: Box<CellBody>,
        /// Length of the data at [`DATA_OFFSET`].
        len: usize,
        /// Tag for the stream SENDME that is now due, if any.
        sendme: Option<Tag>,
    },
    /// The exit connected.
    Connected,
    /// The exit resolved a name (empty: it failed).
    Resolved(Vec<IpAddr>),
    /// The exit ended the stream.
    End(EndReason),
}

struct StreamEntry {
    tx: mpsc::Sender<StreamEvent>,
    send_win: StreamSendWindow,
    recv_win: StreamRecvWindow,
    we_ended: bool,
    they_ended: bool,
}

struct CircState {
    crypto: ClientCircuitCrypto,
    early_left: u8,
    send_win: CircSendWindow,
    recv_win: CircRecvWindow,
    streams: HashMap<u16, StreamEntry>,
    next_stream: u16,
    pending: Option<oneshot::Sender<Result<Vec<u8>, ClientError>>>,
    ctl_tx: Option<mpsc::Sender<Tag>>,
}

/// How the circuit manager uses a circuit.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    /// When the first stream was attached (a circuit is "dirty" from then on).
    pub(crate) dirty_since: Option<Instant>,
    /// The isolation key of its streams.
    pub(crate) isolation: Option<IsolationKey>,
}

/// A client circuit.
pub(crate) struct Circuit {
    /// Circuit id on the guard link.
    pub(crate) id: CircId,
    link: Arc<Link>,
    send_lock: tokio::sync::Mutex<()>,
    state: Mutex<CircState>,
    notify: Notify,
    closed: AtomicBool,
    /// The exit (for port checks).
    pub(crate) exit: RelayInfo,
    /// The identities of the hops, guard first.
    pub(crate) hops: [RelayId; 3],
    /// Manager bookkeeping.
    pub(crate) usage: Mutex<Usage>,
}

impl std::fmt::Debug for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuit")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

type Violation = &'static str;

impl Circuit {
    fn new(id: CircId, link: Arc<Link>, path: &Path, ctl_tx: mpsc::Sender<Tag>) -> Self {
        Self {
            id,
            link,
            send_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(CircState {
                crypto: ClientCircuitCrypto::new(),
                early_left: MAX_RELAY_EARLY,
                send_win: CircSendWindow::new(),
                recv_win: CircRecvWindow::new(),
                streams: HashMap::new(),
                next_stream: 1,
                pending: None,
                ctl_tx: Some(ctl_tx),
            }),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            exit: path.exit.clone(),
            hops: [path.guard.id, path.middle.id, path.exit.id],
            usage: Mutex::new(Usage::default()),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, CircState>, ClientError> {
        self.state
            .lock()
            .map_err(|_| ClientError::Circuit("internal lock poisoned".into()))
    }

    /// Whether the circuit is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Number of open streams.
    pub(crate) fn n_streams(&self) -> usize {
        self.state.lock().map(|s| s.streams.len()).unwrap_or(0)
    }

    /// The circuit ended (DESTROY received, link lost, or we gave up on it): fail the pending
    /// handshake and every stream, and wake any sender waiting on a window.
    pub(crate) fn on_destroyed(&self, why: &'static str) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(circ = %self.id, why, "circuit closed");
        if let Ok(mut st) = self.state.lock() {
            if let Some(p) = st.pending.take() {
                let _ = p.send(Err(ClientError::Circuit(why.into())));
            }
            // Dropping the senders ends every stream task.
            st.streams.clear();
            st.ctl_tx = None;
        }
        self.notify.notify_waiters();
    }

    /// Close the circuit and tell the guard (DESTROY, reason NONE).
    pub(crate) fn close_with_destroy(&self) {
        self.close_because("closed by the client");
    }

    /// Close the circuit for `why` (kept for logs and errors) and tell the guard.
    pub(crate) fn close_because(&self, why: &'static str) {
        let was_closed = self.closed.load(Ordering::Acquire);
        self.on_destroyed(why);
        self.link.unregister(self.id);
        if !was_closed {
            let cell = Cell::destroy(self.id, DestroyReason::NONE);
            if let Ok(Some(cell)) = self.link.sender.try_send(cell)
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                let sender = self.link.sender.clone();
                rt.spawn(async move {
                    let _ = sender.send(cell).await;
                });
            }
        }
    }

    /// Handle a cell from the link (called in the link's reader task). An `Err` means: destroy
    /// the circuit.
    pub(crate) fn handle_cell(&self, cell: Cell) -> Result<(), Violation> {
        match cell.cmd {
            CellCmd::RELAY => self.handle_relay(cell),
            CellCmd::CREATED => {
                let created = Created::decode(&cell.body[..]).map_err(|_| "malformed CREATED")?;
                let mut st = self.state.lock().map_err(|_| "poisoned")?;
                let p = st.pending.take().ok_or("unexpected CREATED")?;
                let _ = p.send(Ok(created.hdata));
                Ok(())
            }
            CellCmd::RELAY_EARLY => Err("RELAY_EARLY travelling towards the client"),
            _ => Err("unexpected cell command"),
        }
    }

    fn handle_relay(&self, mut cell: Cell) -> Result<(), Violation> {
        let mut guard = self.state.lock().map_err(|_| "poisoned")?;
        let st = &mut *guard;
        let (hop, tag) = st
            .crypto
            .decrypt_backward(cell.cmd.0, &mut cell.body)
            .map_err(|_| "relay cell failed authentication")?;
        let last = st.crypto.n_hops().checked_sub(1).ok_or("no hops")?;
        let region = cell
            .body
            .get(BACKWARD_MSG_OFFSET..BACKWARD_MSG_OFFSET + RELAY_MSG_LEN)
            .ok_or("short cell")?;
        let (h, _) = RelayHeader::parse(region).map_err(|_| "malformed relay header")?;

        if h.cmd == RelayCmd::DATA {
            if hop != last || h.stream_id == 0 {
                return Err("DATA from a hop that is not the exit");
            }
            if let Some(t) = st
                .recv_win
                .on_data_received(&tag)
                .map_err(|_| "circuit window violated")?
            {
                // Reopen the window now, before the SENDME can reach the exit: more DATA may
                // arrive as soon as it does.
                st.recv_win
                    .sendme_sent()
                    .map_err(|_| "circuit window bug")?;
                let ctl = st.ctl_tx.as_ref().ok_or("closed")?;
                ctl.try_send(t).map_err(|_| "SENDME queue overflow")?;
            }
            let Some(s) = st.streams.get_mut(&h.stream_id) else {
                // Data for a stream we already closed: counted, then dropped.
                return Ok(());
            };
            if s.they_ended {
                return Err("DATA after END");
            }
            let due = s.recv_win.take().map_err(|_| "stream window violated")?;
            let ev = StreamEvent::Data {
                body: cell.body,
                len: usize::from(h.len),
                sendme: due.then_some(tag),
            };
            match s.tx.try_send(ev) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => Err("stream queue overflow"),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    st.streams.remove(&h.stream_id);
                    Ok(())
                }
            }
        } else {
            let (sid, msg) = RelayMsg::decode(region).map_err(|_| "malformed relay message")?;
            drop(guard);
            self.handle_control(hop, last, sid, msg)
        }
    }

    fn handle_control(
        &self,
        hop: usize,
        last: usize,
        sid: u16,
        msg: RelayMsg,
    ) -> Result<(), Violation> {
        let mut guard = self.state.lock().map_err(|_| "poisoned")?;
        let st = &mut *guard;
        if hop != last && !matches!(msg, RelayMsg::Drop(_) | RelayMsg::Truncated(_)) {
            return Err("relay message from an intermediate hop");
        }
        match msg {
            RelayMsg::Sendme(Sendme { tag }) if sid == 0 => {
                st.send_win
                    .on_sendme(tag.as_ref())
                    .map_err(|_| "bad circuit SENDME")?;
                drop(guard);
                self.notify.notify_waiters();
            }
            RelayMsg::Sendme(_) => {
                if let Some(s) = st.streams.get_mut(&sid) {
                    s.send_win.put().map_err(|_| "bad stream SENDME")?;
                    drop(guard);
                    self.notify.notify_waiters();
                }
            }
            RelayMsg::Connected(_) => {
                if let Some(s) = st.streams.get(&sid) {
                    let _ = s.tx.try_send(StreamEvent::Connected);
                }
            }
            RelayMsg::End(End { reason, .. }) => {
                if let Some(s) = st.streams.get_mut(&sid) {
                    s.they_ended = true;
                    let _ = s.tx.try_send(StreamEvent::End(reason));
                    if s.we_ended || reason != EndReason::DONE {
                        st.streams.remove(&sid);
                    }
                }
                drop(guard);
                self.notify.notify_waiters();
            }
            RelayMsg::Resolved(r) => {
                if let Some(s) = st.streams.remove(&sid) {
                    let addrs = r
                        .answers
                        .iter()
                        .filter_map(|(v, _ttl)| match v {
                            ResolvedValue::Ip(ip) => Some(*ip),
                            _ => None,
                        })
                        .collect();
                    let _ = s.tx.try_send(StreamEvent::Resolved(addrs));
                }
            }
            RelayMsg::Extended(e) => {
                let p = st.pending.take().ok_or("unexpected EXTENDED")?;
                let _ = p.send(Ok(e.hdata));
            }
            RelayMsg::Truncated(_) => {
                return Err("a relay could not extend the circuit (TRUNCATED)");
            }
            RelayMsg::Drop(_) => {}
            _ => return Err("unexpected relay command"),
        }
        Ok(())
    }

    /// Encrypt `msg` (an encoded relay message) for `hop` and queue it on the link, in order.
    async fn send_raw(
        &self,
        hop: usize,
        msg: &[u8],
        force_early: bool,
    ) -> Result<Tag, ClientError> {
        let _order = self.send_lock.lock().await;
        let (cell, tag) = {
            let mut st = self.lock()?;
            if self.is_closed() {
                return Err(ClientError::Circuit("circuit closed".into()));
            }
            let cmd = self.next_cmd(&mut st, hop, force_early)?;
            let mut cell = Cell::new_zeroed(self.id.get(), cmd);
            let tag = st
                .crypto
                .encrypt_forward(hop, cmd.0, msg, &mut cell.body)
                .map_err(|_| ClientError::Crypto)?;
            (cell, tag)
        };
        link::send(&self.link, cell).await?;
        Ok(tag)
    }

    fn next_cmd(
        &self,
        st: &mut CircState,
        hop: usize,
        force_early: bool,
    ) -> Result<CellCmd, ClientError> {
        if force_early || (hop > 0 && st.early_left > 0) {
            st.early_left = st
                .early_left
                .checked_sub(1)
                .ok_or_else(|| ClientError::Circuit("out of RELAY_EARLY cells".into()))?;
            Ok(CellCmd::RELAY_EARLY)
        } else {
            Ok(CellCmd::RELAY)
        }
    }

    /// Send a relay message to the last hop (or `hop`).
    pub(crate) async fn send_msg(
        &self,
        hop: Option<usize>,
        stream_id: u16,
        msg: &RelayMsg,
    ) -> Result<Tag, ClientError> {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = msg
            .encode(stream_id, &mut buf)
            .map_err(|e| ClientError::Circuit(format!("encoding relay message: {e}")))?;
        let hop = match hop {
            Some(h) => h,
            None => self.last_hop()?,
        };
        let force_early = matches!(msg, RelayMsg::Extend(_));
        self.send_raw(hop, buf.get(..n).unwrap_or_default(), force_early)
            .await
    }

    fn last_hop(&self) -> Result<usize, ClientError> {
        self.lock()?
            .crypto
            .n_hops()
            .checked_sub(1)
            .ok_or_else(|| ClientError::Circuit("circuit has no hops".into()))
    }

    /// Send as much of `data` as the windows allow (at least one cell, waiting for a window if
    /// needed) on stream `sid`; returns the number of bytes consumed. `scratch` is reused between
    /// calls so the data path does not allocate per call.
    pub(crate) async fn send_data(
        &self,
        sid: u16,
        data: &[u8],
        scratch: &mut Vec<Cell>,
    ) -> Result<usize, ClientError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let order = self.send_lock.lock().await;
            let consumed = self.build_data_cells(sid, data, scratch)?;
            if consumed == 0 {
                drop(order);
                notified.await;
                continue;
            }
            for cell in scratch.drain(..) {
                link::send(&self.link, cell).await?;
            }
            return Ok(consumed);
        }
    }

    fn build_data_cells(
        &self,
        sid: u16,
        data: &[u8],
        out: &mut Vec<Cell>,
    ) -> Result<usize, ClientError> {
        let mut guard = self.lock()?;
        if self.is_closed() {
            return Err(ClientError::Circuit("circuit closed".into()));
        }
        let st = &mut *guard;
        let last = st
            .crypto
            .n_hops()
            .checked_sub(1)
            .ok_or_else(|| ClientError::Circuit("circuit has no hops".into()))?;
        let mut off = 0;
        let mut msg = [0u8; RELAY_MSG_LEN];
        while off < data.len() && out.len() < 32 {
            let Some(s) = st.streams.get_mut(&sid) else {
                return Err(ClientError::Circuit("stream closed".into()));
            };
            if !st.send_win.can_send() || !s.send_win.can_send() {
                break;
            }
            let n = relaymsg::encode_data(sid, data.get(off..).unwrap_or_default(), &mut msg);
            let cmd = if st.early_left > 0 {
                st.early_left -= 1;
                CellCmd::RELAY_EARLY
            } else {
                CellCmd::RELAY
            };
            let mut cell = Cell::new_zeroed(self.id.get(), cmd);
            let tag = st
                .crypto
                .encrypt_forward(
                    last,
                    cmd.0,
                    msg.get(..n).unwrap_or_default(),
                    &mut cell.body,
                )
                .map_err(|_| ClientError::Crypto)?;
            st.send_win
                .note_data_sent(&tag)
                .map_err(|e| ClientError::Circuit(e.to_string()))?;
            s.send_win
                .take()
                .map_err(|e| ClientError::Circuit(e.to_string()))?;
            out.push(cell);
            off += n - RELAY_HEADER_LEN;
        }
        Ok(off)
    }

    /// Open a stream slot; returns its id and event queue.
    pub(crate) fn open_stream(&self) -> Result<(u16, mpsc::Receiver<StreamEvent>), ClientError> {
        let mut st = self.lock()?;
        if self.is_closed() {
            return Err(ClientError::Circuit("circuit closed".into()));
        }
        if st.streams.len() >= MAX_STREAMS {
            return Err(ClientError::Circuit(
                "too many streams on the circuit".into(),
            ));
        }
        let mut id = st.next_stream;
        while id == 0 || st.streams.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        st.next_stream = id.wrapping_add(1);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        st.streams.insert(
            id,
            StreamEntry {
                tx,
                send_win: StreamSendWindow::new(),
                recv_win: StreamRecvWindow::new(),
                we_ended: false,
                they_ended: false,
            },
        );
        Ok((id, rx))
    }

    /// A stream SENDME is due (the data of the cell with `tag` was delivered). The window is
    /// reopened before the SENDME leaves, since the exit may send more as soon as it arrives.
    pub(crate) async fn send_stream_sendme(&self, sid: u16, tag: Tag) -> Result<(), ClientError> {
        {
            let mut st = self.lock()?;
            match st.streams.get_mut(&sid) {
                Some(s) => s
                    .recv_win
                    .sendme_sent()
                    .map_err(|e| ClientError::Circuit(e.to_string()))?,
                None => return Ok(()),
            }
        }
        self.send_msg(None, sid, &RelayMsg::Sendme(Sendme { tag: Some(tag) }))
            .await
            .map(|_| ())
    }

    /// We will send no more data on `sid` (END DONE), or abort it (any other reason).
    pub(crate) async fn end_stream(&self, sid: u16, reason: EndReason) {
        let send = {
            let Ok(mut st) = self.lock() else { return };
            match st.streams.get_mut(&sid) {
                Some(s) => {
                    // END DONE once; an abort (any other reason) is sent even after our DONE,
                    // so the exit stops sending to a stream nobody reads.
                    let already = s.we_ended;
                    let abort = reason != EndReason::DONE;
                    s.we_ended = true;
                    if abort || s.they_ended {
                        st.streams.remove(&sid);
                    }
                    !already || abort
                }
                None => false,
            }
        };
        if send && !self.is_closed() {
            let _ = self
                .send_msg(None, sid, &RelayMsg::End(End::new(reason)))
                .await;
        }
        self.notify.notify_waiters();
    }

    /// Forget a stream without sending anything (RESOLVE answered, or the circuit is gone).
    pub(crate) fn forget_stream(&self, sid: u16) {
        if let Ok(mut st) = self.lock() {
            st.streams.remove(&sid);
        }
    }
}

/// Closes a half-built circuit if its build future is dropped (timeout) or fails.
struct BuildGuard(Option<Arc<Circuit>>);

impl Drop for BuildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.close_with_destroy();
        }
    }
}

fn link_specs(r: &RelayInfo) -> Vec<LinkSpec> {
    let mut v = vec![LinkSpec::Ed25519Id(r.id)];
    for a in &r.addrs {
        match a {
            std::net::SocketAddr::V4(a4) => v.push(LinkSpec::Ipv4(*a4)),
            std::net::SocketAddr::V6(a6) => v.push(LinkSpec::Ipv6(*a6)),
        }
    }
    v
}

impl Circuit {
    async fn await_reply(
        rx: oneshot::Receiver<Result<Vec<u8>, ClientError>>,
    ) -> Result<Vec<u8>, ClientError> {
        rx.await
            .map_err(|_| ClientError::Circuit("circuit closed during the handshake".into()))?
    }

    fn set_pending(&self) -> Result<oneshot::Receiver<Result<Vec<u8>, ClientError>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock()?;
        if self.is_closed() {
            return Err(ClientError::Circuit("circuit closed".into()));
        }
        st.pending = Some(tx);
        Ok(rx)
    }
}

/// Build a three-hop circuit along `path` through `link` (a link to `path.guard`). The caller
/// bounds the time; dropping the future closes the half-built circuit. `progress` holds the
/// index of the hop being added (0 guard, 1 middle, 2 exit; 3 when done), so the caller can
/// tell which relay failed or timed out.
pub(crate) async fn build(
    link: Arc<Link>,
    path: &Path,
    progress: &AtomicUsize,
) -> Result<Arc<Circuit>, ClientError> {
    progress.store(0, Ordering::Release);
    let (ctl_tx, ctl_rx) = mpsc::channel(32);
    let circ = link.register(|id| Arc::new(Circuit::new(id, Arc::clone(&link), path, ctl_tx)))?;
    let mut guard = BuildGuard(Some(Arc::clone(&circ)));

    // CREATE to the guard.
    let g = &path.guard;
    let (hs, skin) =
        handshake::client_start(&g.id, &g.onion_key, &[]).map_err(|_| ClientError::Crypto)?;
    let rx = circ.set_pending()?;
    let cell = Cell::create(
        circ.id,
        &Create {
            htype: HTYPE_NTOR3,
            hdata: skin,
        },
    )
    .map_err(|e| ClientError::Circuit(e.to_string()))?;
    link::send(&link, cell).await?;
    let reply = Circuit::await_reply(rx).await?;
    let (keys, _sm) = hs.finish(&reply).map_err(|_| ClientError::Crypto)?;
    circ.lock()?
        .crypto
        .add_hop(&keys)
        .map_err(|_| ClientError::Crypto)?;

    // EXTEND to the middle, then to the exit.
    for (i, r) in [&path.middle, &path.exit].into_iter().enumerate() {
        progress.store(i + 1, Ordering::Release);
        let (hs, skin) =
            handshake::client_start(&r.id, &r.onion_key, &[]).map_err(|_| ClientError::Crypto)?;
        let rx = circ.set_pending()?;
        let ext = RelayMsg::Extend(Extend {
            specs: link_specs(r),
            htype: HTYPE_NTOR3,
            hdata: skin,
        });
        circ.send_msg(Some(i), 0, &ext).await?;
        let reply = Circuit::await_reply(rx).await?;
        let (keys, _sm) = hs.finish(&reply).map_err(|_| ClientError::Crypto)?;
        circ.lock()?
            .crypto
            .add_hop(&keys)
            .map_err(|_| ClientError::Crypto)?;
    }
    progress.store(3, Ordering::Release);
    guard.0 = None;
    tokio::spawn(sendme_task(Arc::clone(&circ), ctl_rx));
    Ok(circ)
}

/// Sends the circuit SENDMEs the reader found due, in order (the reader already reopened the
/// window for each).
async fn sendme_task(circ: Arc<Circuit>, mut rx: mpsc::Receiver<Tag>) {
    while let Some(tag) = rx.recv().await {
        let msg = RelayMsg::Sendme(Sendme { tag: Some(tag) });
        if circ.send_msg(None, 0, &msg).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
#[path = "circ_tests.rs"]
mod tests;
