//! One task per circuit: the reactor owns the circuit's [`CircuitCore`], its exit streams' I/O
//! handles and its timer, and is the only code that touches the core.
//!
//! - It drains its inbound queue in batches (`recv_many`), feeds each cell to the core, and
//!   pushes the core's output to the link writer queues in the order the core produced it, so
//!   the backward ratchet order holds by construction.
//! - Backpressure is per circuit: when the link it must write to is full, the reactor waits for
//!   room on that link and meanwhile stops pulling its own inbound queue and its exit sockets'
//!   reads. No other circuit waits for it. Blocked past the core's cap, the circuit is destroyed.
//! - Time enters here (`coarse_now`, tokio's clock) and is passed to the core.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use allium_proto::cell::{Cell, CellCmd, CircId, DestroyReason};
use allium_proto::relaymsg::EndReason;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::AbortHandle;

use crate::core::{CircError, CircuitCore, Event, Next, ResolveFailure, Side};
use crate::ctx::Ctx;
use crate::exit::{self, Io, WRITE_QUEUE, WriteItem};
use crate::link::{CircHandle, Enqueue, InsertError, Kill, KillReason, Link, coarse_now};

/// Most inbound cells handled per batch.
const BATCH: usize = 64;
/// Capacity of the queue from a circuit's I/O tasks to its reactor.
const IO_QUEUE: usize = 64;

/// The driver-side handles of one exit stream (its state lives in the core).
struct StreamIo {
    /// The write queue (None once closed).
    writer: Option<mpsc::Sender<WriteItem>>,
    /// The write queue's receiving end, until the connection is made.
    writer_rx: Option<mpsc::Receiver<WriteItem>>,
    /// Go-ahead for the read pump.
    more: Option<mpsc::Sender<()>>,
    /// Destination bytes the windows did not allow yet.
    pending: Option<Bytes>,
    /// The destination closed while bytes were pending.
    eof: bool,
    tasks: Vec<AbortHandle>,
    writer_task: Option<AbortHandle>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(w) = &self.writer_task {
            w.abort();
        }
    }
}

/// Start the reactor of a circuit just created on `prev` under `prev_id` (reserved there);
/// `created` is its first cell out.
pub(crate) fn spawn(
    ctx: &Arc<Ctx>,
    core: CircuitCore,
    prev: Arc<Link>,
    prev_id: CircId,
    created: Cell,
    now: Instant,
) {
    let (tx, inbox) = crate::link::circuit_inbox(ctx);
    let handle = CircHandle {
        tx,
        kill: Arc::new(Kill::default()),
        queued: Arc::default(),
    };
    if prev.install(prev_id, handle.clone()).is_err() {
        return;
    }
    ctx.stats.circuit_opened();
    ctx.dos.victims.register_circuit(&handle);
    let (io_tx, io_rx) = mpsc::channel(IO_QUEUE);
    let r = Reactor {
        ctx: Arc::clone(ctx),
        core,
        prev,
        prev_id,
        next: None,
        handle,
        inbox,
        io_tx,
        io_rx,
        streams: HashMap::new(),
        stalled: Some((Side::Prev, created)),
        attempt: 0,
        classified_with: netdir_id(ctx),
        last_active: now,
    };
    tokio::spawn(r.run());
}

struct Reactor {
    ctx: Arc<Ctx>,
    core: CircuitCore,
    prev: Arc<Link>,
    prev_id: CircId,
    /// The next hop's link and our id on it (kept after NextClosed until replaced, so a DESTROY
    /// queued before it still goes out).
    next: Option<(Arc<Link>, CircId)>,
    handle: CircHandle,
    inbox: crate::link::InboxRx,
    io_tx: mpsc::Sender<Io>,
    io_rx: mpsc::Receiver<Io>,
    streams: HashMap<u16, StreamIo>,
    /// A cell that found its link full: it goes first once there is room.
    stalled: Option<(Side, Cell)>,
    /// Extension attempts so far (a late answer for an older one is ignored).
    attempt: u64,
    /// The consensus the previous hop was last classified against (its address), while the core
    /// takes the previous hop for a client.
    classified_with: Option<usize>,
    /// When a cell or an I/O report last arrived (idle-circuit expiry, `dos.circuit_idle_timeout_secs`).
    last_active: Instant,
}

/// Which consensus the relay holds now (its address; `None`: none yet).
fn netdir_id(ctx: &Ctx) -> Option<usize> {
    ctx.netdir().map(|nd| Arc::as_ptr(&nd) as usize)
}

impl Reactor {
    /// A circuit created before this relay knew its previous hop as a relay (say, the first
    /// consensus arrived after the CREATE) would refuse every BEGIN for its lifetime: look again
    /// whenever the relay holds a newer consensus.
    fn reclassify_prev(&mut self) {
        if !self.core.prev_is_client() {
            return;
        }
        let now_with = netdir_id(&self.ctx);
        if now_with != self.classified_with {
            self.classified_with = now_with;
            if self.ctx.is_known_relay_link(&self.prev) {
                self.core.note_prev_is_relay();
            }
        }
    }

    async fn run(mut self) {
        let mut batch: Vec<(Side, Cell)> = Vec::with_capacity(BATCH);
        let kill = Arc::clone(&self.handle.kill);
        loop {
            let now = coarse_now();
            self.step_outputs(now);
            if self.core.is_closed() {
                break;
            }
            if self.stalled.is_some() {
                self.wait_for_room(&kill).await;
                continue;
            }
            let idle_at = self.idle_deadline();
            let deadline = match (self.core.poll_timeout(), idle_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(tokio::time::Instant::from_std);
            // Stop signals first; then exit I/O (bounded: one read per stream awaits its
            // go-ahead) so a busy inbound queue cannot starve the backward direction; then the
            // inbound queue; then the timer.
            tokio::select! {
                biased;
                r = kill.fired() => self.on_kill(r),
                Some(io) = self.io_rx.recv() => {
                    self.last_active = coarse_now();
                    self.on_io(io, self.last_active);
                }
                n = self.inbox.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        self.core.destroy(CircError::Local);
                    }
                    let now = coarse_now();
                    self.last_active = now;
                    self.reclassify_prev();
                    for (side, cell) in batch.drain(..) {
                        if let Err(e) = self.core.handle_cell(side, cell, now) {
                            tracing::debug!(error = %e, "circuit violation");
                        }
                    }
                    self.retry_pending(now);
                }
                () = sleep_until(deadline), if deadline.is_some() => {}
            }
            // Timeouts are due whichever branch ran (a busy queue does not postpone them).
            let now = coarse_now();
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
            }
            if self.idle_deadline().is_some_and(|t| t <= now) {
                self.ctx
                    .stats
                    .dos
                    .note(crate::dos::Refusal::CircuitIdle, now);
                self.core.destroy(CircError::Local);
            }
        }
        self.finish();
    }

    /// When the circuit expires if nothing happens: it has no stream, and the idle timeout is on.
    fn idle_deadline(&self) -> Option<Instant> {
        let t = self.ctx.dos.cfg.circuit_idle_timeout()?;
        (self.core.n_streams() == 0 && !self.core.is_closed()).then(|| self.last_active + t)
    }

    /// Act on events and push cells until both are drained or a link is full.
    fn step_outputs(&mut self, now: Instant) {
        loop {
            self.push_out(now);
            if self.stalled.is_some() {
                return;
            }
            match self.core.poll_event() {
                Some(ev) => self.on_event(ev, now),
                None => {
                    if !self.core.has_transmit() {
                        break;
                    }
                }
            }
        }
        let n = self.core.take_originated();
        if n > 0 {
            self.ctx
                .stats
                .note_written(n * allium_proto::cell::CELL_LEN as u64);
        }
    }

    /// The link and id for `side`, if there is one.
    fn route(&self, side: Side) -> Option<(Arc<Link>, CircId)> {
        match side {
            Side::Prev => Some((Arc::clone(&self.prev), self.prev_id)),
            Side::Next => self.next.as_ref().map(|(l, id)| (Arc::clone(l), *id)),
        }
    }

    /// Push the stalled cell, then the core's output, until a link is full.
    fn push_out(&mut self, now: Instant) {
        loop {
            let Some((side, mut cell)) = self.stalled.take().or_else(|| self.core.poll_transmit())
            else {
                return;
            };
            // Borrowed, not cloned: this runs once per cell.
            let (link, id) = match (side, &self.next) {
                (Side::Prev, _) => (&self.prev, self.prev_id),
                (Side::Next, Some((l, id))) => (l, *id),
                (Side::Next, None) => continue,
            };
            cell.circ_id = Some(id);
            match link.sink.try_enqueue(cell) {
                Enqueue::Done => {}
                Enqueue::Full(c) => {
                    self.stalled = Some((side, c));
                    self.core.note_blocked(now);
                    return;
                }
                Enqueue::Closed => self.core.link_closed(side),
            }
        }
    }

    /// Blocked: wait for room on the stalled cell's link (not reading anything meanwhile),
    /// a stop signal, or the core's timeout (which destroys the circuit past the cap).
    async fn wait_for_room(&mut self, kill: &Kill) {
        let Some((side, cell)) = self.stalled.take() else {
            return;
        };
        let Some((link, _)) = self.route(side) else {
            return;
        };
        let send = link.sink.send(cell);
        tokio::pin!(send);
        loop {
            let deadline = self.core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                ok = &mut send => {
                    if ok {
                        self.core.note_unblocked();
                    } else {
                        self.core.link_closed(side);
                    }
                    return;
                }
                r = kill.fired() => {
                    self.on_kill(r);
                    return;
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.core.handle_timeout(coarse_now());
                    if self.core.is_closed() {
                        return;
                    }
                }
            }
        }
    }

    fn on_kill(&mut self, r: KillReason) {
        match r {
            KillReason::QueueOverflow => self.core.destroy(CircError::QueueOverflow {
                cap: self.ctx.limits.inbound_queue,
            }),
            KillReason::LinkClosed(side) => self.core.link_closed(side),
        }
    }

    fn on_event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::OpenStream { sid, addrs } => {
                let Ok(slot) = Arc::clone(&self.ctx.exit_slots).try_acquire_owned() else {
                    self.core.stream_failed(sid, EndReason::RESOURCELIMIT, now);
                    return;
                };
                let (wtx, wrx) = mpsc::channel(WRITE_QUEUE);
                let task = tokio::spawn(exit::connect(sid, addrs, self.io_tx.clone()));
                self.streams.insert(
                    sid,
                    StreamIo {
                        writer: Some(wtx),
                        writer_rx: Some(wrx),
                        more: None,
                        pending: None,
                        eof: false,
                        tasks: vec![task.abort_handle()],
                        writer_task: None,
                        _slot: slot,
                    },
                );
            }
            Event::Resolve { sid, hostname } => {
                let Ok(slot) = Arc::clone(&self.ctx.resolve_slots).try_acquire_owned() else {
                    self.core.resolved(sid, Err(ResolveFailure::Busy), now);
                    return;
                };
                tokio::spawn(exit::resolve(
                    Arc::clone(&self.ctx),
                    sid,
                    hostname,
                    slot,
                    self.io_tx.clone(),
                ));
            }
            Event::ExtendTo {
                relay,
                addrs,
                create,
            } => {
                self.attempt += 1;
                // Anything for an earlier next hop went out before this EXTEND was read.
                self.next = None;
                tokio::spawn(exit::extend(
                    Arc::clone(&self.ctx),
                    Arc::clone(&self.prev),
                    self.attempt,
                    relay,
                    addrs,
                    create,
                    self.io_tx.clone(),
                ));
            }
            Event::NextClosed => {
                // Stop routing the old id here; `next` stays until replaced so a DESTROY queued
                // before this event still reaches it.
                if let Some((link, id)) = &self.next {
                    link.remove(*id, now);
                }
            }
            Event::StreamData { sid, data } => {
                if let Some(w) = self.streams.get(&sid).and_then(|s| s.writer.as_ref()) {
                    // Bounded by the stream window the core enforces; cannot be full.
                    let _ = w.try_send(exit::WriteItem::charged(
                        data,
                        &self.handle.queued,
                        &self.ctx.dos.mem,
                    ));
                }
            }
            Event::StreamEnd { sid } => {
                if let Some(w) = self.streams.get(&sid).and_then(|s| s.writer.as_ref()) {
                    let _ = w.try_send(WriteItem::Fin);
                }
            }
            Event::StreamClosed { sid, graceful } => {
                if let Some(mut st) = self.streams.remove(&sid)
                    && graceful
                {
                    // Let the writer finish what is queued: closing the queue ends it.
                    st.writer = None;
                    st.writer_task = None;
                }
            }
            Event::Destroyed { .. } => {}
        }
    }

    fn on_io(&mut self, io: Io, now: Instant) {
        match io {
            Io::Resolved { sid, result } => self.core.resolved(sid, result, now),
            Io::ConnectFailed { sid, reason } | Io::Failed { sid, reason } => {
                self.core.stream_failed(sid, reason, now);
            }
            Io::Connected { sid, tcp } => {
                if !matches!(
                    self.core.stream_state(sid),
                    Some(crate::core::StreamState::Connecting { .. })
                ) {
                    return;
                }
                self.core.stream_connected(sid, tcp.peer_addr().ok(), now);
                let Some(st) = self.streams.get_mut(&sid) else {
                    return;
                };
                let Some(wrx) = st.writer_rx.take() else {
                    return;
                };
                let (rd, wr) = tcp.into_split();
                let (more_tx, more_rx) = mpsc::channel(1);
                let w = tokio::spawn(exit::write_pump(sid, wrx, wr, self.io_tx.clone()));
                let r = tokio::spawn(exit::read_pump(
                    Arc::clone(&self.ctx),
                    sid,
                    rd,
                    self.io_tx.clone(),
                    more_rx,
                ));
                st.more = Some(more_tx);
                st.writer_task = Some(w.abort_handle());
                st.tasks.push(r.abort_handle());
            }
            Io::Read { sid, data } => {
                if let Some(st) = self.streams.get_mut(&sid) {
                    st.pending = Some(data);
                }
                self.package(sid, now);
            }
            Io::Eof { sid } => {
                let pending = self
                    .streams
                    .get_mut(&sid)
                    .map(|st| {
                        st.eof = true;
                        st.pending.is_some()
                    })
                    .unwrap_or(false);
                if !pending {
                    self.core.stream_eof(sid, now);
                }
            }
            Io::Written { sid, cells } => self.core.data_consumed(sid, cells, now),
            Io::Extend {
                attempt,
                link,
                create,
            } => self.on_extend_link(attempt, link, create, now),
        }
    }

    /// Package a stream's pending bytes as far as the windows allow; give the read pump its
    /// go-ahead once they are all taken.
    fn package(&mut self, sid: u16, now: Instant) {
        let Some(st) = self.streams.get_mut(&sid) else {
            return;
        };
        let Some(data) = st.pending.take() else {
            return;
        };
        let n = self.core.package(sid, &data, now);
        if n < data.len() {
            if self.core.stream_budget(sid).is_some() {
                st.pending = Some(data.slice(n..));
            }
            return;
        }
        if st.eof {
            self.core.stream_eof(sid, now);
        } else if let Some(m) = &st.more {
            let _ = m.try_send(());
        }
    }

    /// After input that may have opened windows: retry streams with pending bytes.
    fn retry_pending(&mut self, now: Instant) {
        let waiting: Vec<u16> = self
            .streams
            .iter()
            .filter(|(_, s)| s.pending.is_some())
            .map(|(sid, _)| *sid)
            .collect();
        for sid in waiting {
            if self.core.stream_budget(sid).unwrap_or(0) > 0 {
                self.package(sid, now);
            }
        }
    }

    fn on_extend_link(
        &mut self,
        attempt: u64,
        link: Result<Arc<Link>, DestroyReason>,
        create: allium_proto::cell::Create,
        now: Instant,
    ) {
        if attempt != self.attempt || !matches!(self.core.next(), Next::Extending { .. }) {
            return;
        }
        let link = match link {
            Ok(l) => l,
            Err(reason) => {
                self.core.extend_failed(reason, now);
                return;
            }
        };
        let id = match link.allocate(self.handle.clone(), now) {
            Ok(id) => id,
            Err(InsertError::Full) => {
                self.core.extend_failed(DestroyReason::RESOURCELIMIT, now);
                return;
            }
            Err(_) => {
                self.core.extend_failed(DestroyReason::CONNECTFAILED, now);
                return;
            }
        };
        let Ok(cell) = Cell::create(id, &create) else {
            link.remove(id, now);
            self.core.extend_failed(DestroyReason::PROTOCOL, now);
            return;
        };
        self.next = Some((link, id));
        // Nothing is stalled while I/O is handled: the CREATE goes out first on the new link.
        self.stalled = Some((Side::Next, cell));
    }

    /// The circuit is destroyed: send what is left (DESTROYs without waiting), unroute, count.
    fn finish(mut self) {
        let now = coarse_now();
        let leftovers = self
            .stalled
            .take()
            .into_iter()
            .chain(std::iter::from_fn(|| self.core.poll_transmit()));
        let leftovers: Vec<(Side, Cell)> = leftovers.collect();
        for (side, mut cell) in leftovers {
            if cell.cmd != CellCmd::DESTROY {
                continue;
            }
            if let Some((link, id)) = self.route(side) {
                cell.circ_id = Some(id);
                link.send_detached(cell);
            }
        }
        self.prev.remove(self.prev_id, now);
        if let Some((link, id)) = &self.next {
            link.remove(*id, now);
        }
        self.streams.clear();
        let stats = &self.ctx.stats;
        stats.circuit_closed();
        if let Some(e) = self.core.close_error() {
            match e {
                CircError::Blocked { .. } => stats.note_blocked_destroy(),
                // Counted by the link reader that saw the overflow.
                CircError::QueueOverflow { .. } => {}
                e if e.is_violation() => stats.note_violation(),
                _ => {}
            }
            if e.is_violation() {
                tracing::info!(reason = e.kind(), "circuit destroyed: {e}");
            } else {
                tracing::debug!(reason = e.kind(), "circuit closed");
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
