//! One circuit as a relay sees it: the hop crypto, the link on each side, and (at an exit) streams.
//!
//! Concurrency: all per-circuit state is behind one short `std::sync::Mutex` that is never held
//! across an `.await`. Forward cells are processed by the previous link's reader task, backward
//! cells by the next link's reader task. Every cell sent towards the client goes through
//! [`Circuit::send_backward`], so that the order in which the backward ratchet advances is the
//! order in which cells are queued on the link (the client peels them in that order).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use allium_crypto::X25519Secret;
use allium_crypto::handshake::relay_respond;
use allium_crypto::relaycell::{
    CellBody, FORWARD_MSG_OFFSET, Forward, MAX_DATA, RELAY_MSG_LEN, RelayHopCrypto, Tag,
};
use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created, DestroyReason, HTYPE_NTOR3};
use allium_proto::flowctl::{CircRecvWindow, CircSendWindow};
use allium_proto::relaymsg::{
    self, RelayCmd, RelayHeader, RelayMsg, Sendme, StreamIdRule, Truncated,
};
use tokio::sync::{Notify, oneshot};

use crate::ctx::Ctx;
use crate::exit::StreamEntry;
use crate::link::{Enqueue, InsertError, Link, Slot};

/// Most RELAY_EARLY cells a circuit may carry forward (tor-spec §5.6).
pub const MAX_RELAY_EARLY: u8 = 8;

/// Which side of a circuit a link is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Towards the client: cells from this link travel forward.
    Prev,
    /// Away from the client: cells from this link travel backward.
    Next,
}

/// The next hop of a circuit.
pub(crate) enum Next {
    /// None (we are the last hop).
    None,
    /// An EXTEND is being handled; no link chosen yet.
    Extending,
    /// CREATE sent on `link` under `id`; waiting for CREATED.
    Pending {
        link: Arc<Link>,
        id: u32,
        tx: Option<oneshot::Sender<Box<CellBody>>>,
    },
    /// Extended.
    Open { link: Arc<Link>, id: u32 },
}

/// The mutable state of a circuit.
pub(crate) struct CircInner {
    crypto: RelayHopCrypto,
    early: u8,
    pub(crate) next: Next,
    pub(crate) streams: HashMap<u16, StreamEntry>,
    pub(crate) send_win: CircSendWindow,
    recv_win: CircRecvWindow,
    /// A producer holds an already-encrypted backward cell and is waiting for room on the link.
    backward_busy: bool,
}

impl CircInner {
    /// How many DATA cells stream `sid` may send now: the smaller of the circuit and stream
    /// package windows (`None` if the stream is gone).
    fn stream_budget(&self, sid: u16) -> Option<usize> {
        let st = self.streams.get(&sid)?;
        Some(usize::from(
            self.send_win.window().min(st.win.send.window()),
        ))
    }
}

/// What a backward producer made under the circuit lock.
pub(crate) enum Produced {
    /// A cell to enqueue now.
    Cell(Cell),
    /// Several cells to enqueue now, in order (so the link writer can pack them into one frame).
    Batch(Vec<Cell>),
    /// A package window is empty.
    Blocked,
    /// Nothing to send (stream or hop gone).
    Closed,
    /// A crypto or flow-control failure: destroy the circuit.
    Destroy,
}

/// A protocol violation: the circuit must be destroyed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Violation;

impl<E: std::error::Error> From<E> for Violation {
    fn from(_: E) -> Self {
        Self
    }
}

/// Result of trying to originate a DATA cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataSend {
    /// Sent.
    Sent,
    /// A package window is empty: wait for `window_open`.
    Blocked,
    /// The stream or circuit is gone.
    Closed,
}

/// One circuit.
pub struct Circuit {
    pub(crate) prev: Arc<Link>,
    pub(crate) prev_id: u32,
    inner: Mutex<CircInner>,
    /// Signalled when a producer that had to wait for room on the previous link is done.
    backward_idle: Notify,
    /// Signalled when a SENDME opens a package window, and when the circuit closes.
    pub(crate) window_open: Notify,
    closed: AtomicBool,
}

impl std::fmt::Debug for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuit")
            .field("prev_id", &format_args!("{:#010x}", self.prev_id))
            .finish_non_exhaustive()
    }
}

impl Circuit {
    pub(crate) fn new(prev: Arc<Link>, prev_id: u32, crypto: RelayHopCrypto) -> Self {
        Self {
            prev,
            prev_id,
            inner: Mutex::new(CircInner {
                crypto,
                early: 0,
                next: Next::None,
                streams: HashMap::new(),
                send_win: CircSendWindow::new(),
                recv_win: CircRecvWindow::new(),
                backward_busy: false,
            }),
            backward_idle: Notify::new(),
            window_open: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CircInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether the circuit has been destroyed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether the previous hop is a client (not a relay we know): then this relay is the first
    /// hop and refuses BEGIN (no one-hop exits).
    pub(crate) fn prev_is_client(&self, ctx: &Ctx) -> bool {
        !ctx.is_known_relay_link(&self.prev)
    }

    /// Process a RELAY / RELAY_EARLY cell arriving from the previous hop.
    pub(crate) async fn forward(self: &Arc<Self>, ctx: &Arc<Ctx>, mut cell: Cell) {
        enum Out {
            Pass(Arc<Link>, u32),
            Mine(Tag),
            Destroy,
        }
        let cmd = cell.cmd;
        let out = {
            let mut inner = self.lock();
            if self.is_closed() {
                return;
            }
            if cmd == CellCmd::RELAY_EARLY {
                inner.early = inner.early.saturating_add(1);
            }
            if inner.early > MAX_RELAY_EARLY {
                Out::Destroy
            } else {
                match inner.crypto.decrypt_forward(cmd.0, &mut cell.body) {
                    Err(_) => Out::Destroy,
                    Ok(Forward::Pass) => match &inner.next {
                        Next::Open { link, id } => Out::Pass(Arc::clone(link), *id),
                        _ => Out::Destroy,
                    },
                    Ok(Forward::Recognized { tag }) => Out::Mine(tag),
                }
            }
        };
        match out {
            Out::Pass(link, id) => {
                cell.circ_id = id;
                if !link.sink.send(cell).await {
                    self.destroy(ctx, None);
                }
            }
            Out::Mine(tag) => {
                if self.handle_msg(ctx, cmd, tag, cell).await.is_err() {
                    self.destroy(ctx, None);
                }
            }
            Out::Destroy => self.destroy(ctx, None),
        }
    }

    /// Handle a relay message addressed to this hop.
    async fn handle_msg(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        cmd: CellCmd,
        tag: Tag,
        cell: Cell,
    ) -> Result<(), Violation> {
        let region = cell.body.get(FORWARD_MSG_OFFSET..).ok_or(Violation)?;
        let (hdr, data) = RelayHeader::parse(region)?;
        let sid = hdr.stream_id;
        match (hdr.cmd.stream_id_rule(), sid) {
            (StreamIdRule::Zero, 0) | (StreamIdRule::Any, _) => {}
            (StreamIdRule::NonZero, s) if s != 0 => {}
            _ => return Err(Violation),
        }
        match hdr.cmd {
            RelayCmd::DATA => {
                let start = FORWARD_MSG_OFFSET + relaymsg::RELAY_HEADER_LEN;
                let len = usize::from(hdr.len);
                self.on_data(ctx, sid, tag, cell.body, start, len).await
            }
            RelayCmd::SENDME => {
                let RelayMsg::Sendme(Sendme { tag: sm_tag }) =
                    RelayMsg::decode_body(hdr.cmd, data)?
                else {
                    return Err(Violation);
                };
                self.on_sendme(sid, sm_tag.as_ref())
            }
            _ => {
                let msg = RelayMsg::decode_body(hdr.cmd, data)?;
                self.handle_control(ctx, cmd, sid, msg).await
            }
        }
    }

    async fn handle_control(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        cmd: CellCmd,
        sid: u16,
        msg: RelayMsg,
    ) -> Result<(), Violation> {
        match msg {
            RelayMsg::Begin(b) => crate::exit::on_begin(self, ctx, sid, b).await,
            RelayMsg::Resolve(r) => crate::exit::on_resolve(self, ctx, sid, r).await,
            RelayMsg::BeginDir(_) => {
                // Relays are not directory caches: clients fetch from the authorities.
                let end = relaymsg::End::new(relaymsg::EndReason::NOTDIRECTORY);
                self.send_msg(ctx, sid, &RelayMsg::End(end)).await;
                Ok(())
            }
            RelayMsg::End(e) => {
                crate::exit::on_end(self, ctx, sid, e.reason);
                Ok(())
            }
            RelayMsg::Extend(e) => crate::extend::on_extend(self, ctx, cmd, e),
            RelayMsg::Truncate(_) => {
                self.truncate(ctx);
                let t = Truncated {
                    reason: DestroyReason::REQUESTED,
                };
                self.send_msg(ctx, 0, &RelayMsg::Truncated(t)).await;
                Ok(())
            }
            RelayMsg::Drop(_) | RelayMsg::Unrecognized(_) => Ok(()),
            // Messages that only travel backward.
            _ => Err(Violation),
        }
    }

    async fn on_data(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        sid: u16,
        tag: Tag,
        body: Box<CellBody>,
        start: usize,
        len: usize,
    ) -> Result<(), Violation> {
        let sendme = {
            let mut inner = self.lock();
            let sendme = inner.recv_win.on_data_received(&tag)?;
            if sendme.is_some() {
                // The SENDME is sent right below; reopen the window now, under the same lock.
                inner.recv_win.sendme_sent()?;
            }
            if let Some(st) = inner.streams.get_mut(&sid) {
                st.push_data(body, start, len, tag)?;
            }
            sendme
        };
        if let Some(t) = sendme {
            let msg = RelayMsg::Sendme(Sendme { tag: Some(t) });
            self.send_msg(ctx, 0, &msg).await;
        }
        Ok(())
    }

    fn on_sendme(&self, sid: u16, tag: Option<&Tag>) -> Result<(), Violation> {
        {
            let mut inner = self.lock();
            if sid == 0 {
                inner.send_win.on_sendme(tag)?;
            } else if let Some(st) = inner.streams.get_mut(&sid) {
                st.win.on_sendme()?;
            }
        }
        self.window_open.notify_waiters();
        Ok(())
    }

    /// Process a RELAY / RELAY_EARLY cell that arrived from the next hop on `from` under `id`.
    pub(crate) async fn backward(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        from: &Arc<Link>,
        mut cell: Cell,
    ) {
        if cell.cmd != CellCmd::RELAY {
            // Backward RELAY_EARLY is a protocol violation (tor-spec §5.6).
            self.destroy(ctx, None);
            return;
        }
        let id = cell.circ_id;
        let prev_id = self.prev_id;
        self.send_backward(ctx, move |inner| {
            // Only the current next hop may send backward cells (not one dropped by TRUNCATE).
            if !matches!(&inner.next, Next::Open { link, id: nid } if Arc::ptr_eq(link, from) && *nid == id)
            {
                return Produced::Closed;
            }
            if inner.crypto.relay_backward(&mut cell.body).is_err() {
                return Produced::Destroy;
            }
            cell.circ_id = prev_id;
            Produced::Cell(cell)
        })
        .await;
    }

    /// Send one cell towards the client, built by `produce` under the circuit lock.
    ///
    /// Ordering: the backward ratchet advances inside `produce`, so the cell must reach the link
    /// queue before any cell produced after it. The common case enqueues without blocking while
    /// still holding the lock. If the link queue is full, this task marks the circuit's backward
    /// direction busy, waits for room outside the lock, and the other producers of this circuit
    /// wait (bounded) until it is done, so no cell overtakes another.
    pub(crate) async fn send_backward<F>(self: &Arc<Self>, ctx: &Arc<Ctx>, produce: F) -> DataSend
    where
        F: FnOnce(&mut CircInner) -> Produced,
    {
        enum Step {
            Wait,
            Slow(Vec<Cell>),
            Done(DataSend),
            Destroy(Option<Side>),
        }
        let mut produce = Some(produce);
        loop {
            let idle = self.backward_idle.notified();
            tokio::pin!(idle);
            let step = {
                let mut inner = self.lock();
                if self.is_closed() {
                    return DataSend::Closed;
                }
                if inner.backward_busy {
                    idle.as_mut().enable();
                    Step::Wait
                } else {
                    let Some(p) = produce.take() else {
                        return DataSend::Closed;
                    };
                    match p(&mut inner) {
                        Produced::Cell(cell) => match self.prev.sink.try_enqueue(cell) {
                            Enqueue::Done => Step::Done(DataSend::Sent),
                            Enqueue::Closed => Step::Destroy(Some(Side::Prev)),
                            Enqueue::Full(cell) => {
                                inner.backward_busy = true;
                                Step::Slow(vec![cell])
                            }
                        },
                        Produced::Batch(cells) => {
                            let mut step = Step::Done(DataSend::Sent);
                            let mut it = cells.into_iter();
                            while let Some(cell) = it.next() {
                                match self.prev.sink.try_enqueue(cell) {
                                    Enqueue::Done => {}
                                    Enqueue::Closed => {
                                        step = Step::Destroy(Some(Side::Prev));
                                        break;
                                    }
                                    Enqueue::Full(cell) => {
                                        inner.backward_busy = true;
                                        let mut rest = vec![cell];
                                        rest.extend(it);
                                        step = Step::Slow(rest);
                                        break;
                                    }
                                }
                            }
                            step
                        }
                        Produced::Blocked => Step::Done(DataSend::Blocked),
                        Produced::Closed => Step::Done(DataSend::Closed),
                        Produced::Destroy => Step::Destroy(None),
                    }
                }
            };
            match step {
                Step::Done(r) => return r,
                Step::Destroy(from) => {
                    self.destroy(ctx, from);
                    return DataSend::Closed;
                }
                Step::Wait => {
                    if tokio::time::timeout(crate::link::SEND_TIMEOUT, idle)
                        .await
                        .is_err()
                    {
                        self.destroy(ctx, None);
                        return DataSend::Closed;
                    }
                }
                Step::Slow(cells) => {
                    let mut ok = true;
                    for cell in cells {
                        ok = self.prev.sink.send(cell).await;
                        if !ok {
                            break;
                        }
                    }
                    self.lock().backward_busy = false;
                    self.backward_idle.notify_waiters();
                    if ok {
                        return DataSend::Sent;
                    }
                    self.destroy(ctx, Some(Side::Prev));
                    return DataSend::Closed;
                }
            }
        }
    }

    /// CREATED arrived from the next hop.
    pub(crate) fn on_created(self: &Arc<Self>, ctx: &Arc<Ctx>, cell: Cell) {
        let ok = {
            let mut inner = self.lock();
            match &mut inner.next {
                Next::Pending { tx, .. } => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(cell.body);
                    }
                    true
                }
                _ => false,
            }
        };
        if !ok {
            self.destroy(ctx, None);
        }
    }

    /// Originate a control message towards the client. Returns false if the circuit is gone.
    pub(crate) async fn send_msg(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        sid: u16,
        msg: &RelayMsg,
    ) -> bool {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let Ok(n) = msg.encode(sid, &mut buf) else {
            return false;
        };
        let Some(m) = buf.get(..n) else { return false };
        self.send_encoded(ctx, m, |_, _| Ok(())).await
    }

    /// Originate an encoded relay message; `after` runs under the circuit lock with the cell's tag.
    pub(crate) async fn send_encoded(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        msg: &[u8],
        after: impl FnOnce(&mut CircInner, &Tag) -> Result<(), Violation>,
    ) -> bool {
        let mut cell = Cell::new_zeroed(self.prev_id, CellCmd::RELAY);
        let r = self
            .send_backward(ctx, move |inner| {
                match inner
                    .crypto
                    .encrypt_backward(CellCmd::RELAY.0, msg, &mut cell.body)
                {
                    Ok(tag) if after(inner, &tag).is_ok() => Produced::Cell(cell),
                    _ => Produced::Destroy,
                }
            })
            .await;
        if r == DataSend::Sent {
            ctx.stats.note_written(allium_proto::cell::CELL_LEN as u64);
        }
        r == DataSend::Sent
    }

    /// Originate as many DATA cells on stream `sid` as `data` fills (at most `max_cells`) and both
    /// package windows allow, encrypted under one lock acquisition and queued back to back.
    /// Returns the number of bytes sent (0 unless `Sent`).
    pub(crate) async fn send_data_batch(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        sid: u16,
        data: &[u8],
        max_cells: usize,
    ) -> (usize, DataSend) {
        let wanted = data.chunks(MAX_DATA).take(max_cells).count();
        // Allocate outside the lock; unused cells are dropped.
        let mut cells: Vec<Cell> = (0..wanted)
            .map(|_| Cell::new_zeroed(self.prev_id, CellCmd::RELAY))
            .collect();
        let mut used = 0usize;
        let mut n_cells = 0usize;
        let r = self
            .send_backward(ctx, |inner| {
                let Some(allowed) = inner.stream_budget(sid) else {
                    return Produced::Closed;
                };
                let n = allowed.min(wanted);
                if n == 0 {
                    return Produced::Blocked;
                }
                let mut buf = [0u8; RELAY_MSG_LEN];
                for (chunk, cell) in data.chunks(MAX_DATA).zip(cells.iter_mut()).take(n) {
                    let len = relaymsg::encode_data(sid, chunk, &mut buf);
                    let msg = buf.get(..len).unwrap_or(&[]);
                    let Ok(tag) =
                        inner
                            .crypto
                            .encrypt_backward(CellCmd::RELAY.0, msg, &mut cell.body)
                    else {
                        return Produced::Destroy;
                    };
                    let a = inner.send_win.note_data_sent(&tag).is_ok();
                    let b = inner
                        .streams
                        .get_mut(&sid)
                        .is_some_and(|st| st.win.note_data_sent().is_ok());
                    if !(a && b) {
                        return Produced::Destroy;
                    }
                    used += chunk.len();
                }
                n_cells = n;
                cells.truncate(n);
                Produced::Batch(std::mem::take(&mut cells))
            })
            .await;
        if r == DataSend::Sent {
            ctx.stats
                .note_written((n_cells * allium_proto::cell::CELL_LEN) as u64);
            (used, r)
        } else {
            (0, r)
        }
    }

    /// How many DATA cells stream `sid` may send now (0 if blocked, `None` if gone).
    pub(crate) fn data_budget(&self, sid: u16) -> Option<usize> {
        let inner = self.lock();
        if self.is_closed() {
            return None;
        }
        inner.stream_budget(sid)
    }

    /// Drop the next hop (TRUNCATE), sending it a DESTROY.
    fn truncate(&self, _ctx: &Arc<Ctx>) {
        let next = std::mem::replace(&mut self.lock().next, Next::None);
        if let Next::Open { link, id } | Next::Pending { link, id, .. } = next {
            link.remove(id);
            link.send_destroy_detached(id, DestroyReason::NONE);
        }
    }

    /// Destroy the circuit: free its state, close its streams, and send DESTROY (reason NONE) on
    /// every side other than `from` (the side a DESTROY or link failure came from).
    pub(crate) fn destroy(self: &Arc<Self>, ctx: &Ctx, from: Option<Side>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (next, streams) = {
            let mut inner = self.lock();
            (
                std::mem::replace(&mut inner.next, Next::None),
                std::mem::take(&mut inner.streams),
            )
        };
        drop(streams);
        if from != Some(Side::Prev) {
            self.prev.remove(self.prev_id);
            self.prev
                .send_destroy_detached(self.prev_id, DestroyReason::NONE);
        }
        if let Next::Open { link, id } | Next::Pending { link, id, .. } = next {
            link.remove(id);
            if from != Some(Side::Next) {
                link.send_destroy_detached(id, DestroyReason::NONE);
            }
        }
        self.window_open.notify_waiters();
        self.backward_idle.notify_waiters();
        ctx.stats.circuit_closed();
    }
}

/// Answer a CREATE cell: run the handshake, register the circuit, reply CREATED (or DESTROY).
pub(crate) async fn handle_create(ctx: &Arc<Ctx>, link: &Arc<Link>, cell: Cell) {
    let id = cell.circ_id;
    let Some(cid) = CircId::new(id) else { return };
    // The peer allocates ids on this link; it is the initiator iff we are not.
    if !cid.allocatable_by(!link.initiator) || link.get(id).is_some() {
        return;
    }
    let reply_destroy = |reason| Cell::destroy(cid, reason);
    if link.n_circuits() >= ctx.cfg.max_circuits_per_link {
        let _ = link
            .sink
            .send(reply_destroy(DestroyReason::RESOURCELIMIT))
            .await;
        return;
    }
    let create = match Create::decode(&cell.body[..]) {
        Ok(c) if c.htype == HTYPE_NTOR3 => c,
        _ => {
            let _ = link.sink.send(reply_destroy(DestroyReason::PROTOCOL)).await;
            return;
        }
    };
    let result = {
        let onion = match ctx.keys.onion.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let keys: Vec<&X25519Secret> = std::iter::once(&onion.current)
            .chain(onion.previous.as_ref())
            .collect();
        // CM is a TLV list; no types are defined yet, so it is ignored. SM is empty.
        relay_respond(&ctx.keys.id, &keys, &create.hdata, |_cm| Vec::new())
    };
    let Ok((hop, reply)) = result else {
        let _ = link.sink.send(reply_destroy(DestroyReason::NONE)).await;
        return;
    };
    let circ = Arc::new(Circuit::new(
        Arc::clone(link),
        id,
        RelayHopCrypto::new(&hop),
    ));
    drop(hop);
    match link.insert_peer_id(
        id,
        Slot {
            circ,
            side: Side::Prev,
        },
    ) {
        Ok(()) => {}
        Err(InsertError::Full) => {
            let _ = link
                .sink
                .send(reply_destroy(DestroyReason::RESOURCELIMIT))
                .await;
            return;
        }
        Err(_) => return,
    }
    ctx.stats.circuit_opened();
    match Cell::created(cid, &Created { hdata: reply }) {
        Ok(c) => {
            let _ = link.sink.send(c).await;
        }
        Err(_) => {
            if let Some(slot) = link.remove(id) {
                slot.circ.destroy(ctx, None);
            }
        }
    }
}
