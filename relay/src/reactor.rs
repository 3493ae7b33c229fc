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
//! - Fair sharing of the next link between clients: when the previous hop is a client (not a
//!   relay of the consensus), the circuit's cells go onto its next link in the scheduling group
//!   of the client's address (IPv6: its /64; [`crate::dos::AddrKey::sched_group`]), so all
//!   circuits from one address, over any number of links, share each outgoing link as one
//!   circuit would. Circuits whose previous hop is a relay stay ungrouped (a guard's clients
//!   are not lumped together at the middle). The address itself is never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use allium_proto::cell::{Cell, CellCmd, CircId, DestroyReason};
use allium_proto::circmux::CircGroup;
use allium_proto::relaymsg::EndReason;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::AbortHandle;

use crate::core::{CircError, CircuitCore, Event, Next, ResolveFailure, Side};
use crate::ctx::Ctx;
use crate::dirserve::{self, Feed, RequestBuf};
use crate::exit::{self, Io, WRITE_QUEUE, WriteItem};
use crate::hs::{PairGuard, PeerHandle, PeerMsg};
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

/// A directory stream being served (BEGIN_DIR): its request, then its response.
struct DirStream {
    req: RequestBuf,
    /// Response bytes the windows did not allow yet.
    pending: Option<Bytes>,
    /// Size of the whole response (for the counters).
    len: usize,
    _slot: DirSlot,
}

/// A relay-wide directory-stream permit that keeps the open-stream gauge.
struct DirSlot {
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for DirSlot {
    fn drop(&mut self) {
        self.ctx.stats.dir_stream_closed();
    }
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
        next_group: None,
        handle,
        inbox,
        io_tx,
        io_rx,
        streams: HashMap::new(),
        dirs: HashMap::new(),
        stalled: Some((Side::Prev, created)),
        attempt: 0,
        classified_with: netdir_id(ctx),
        last_active: now,
        hs: None,
        hs_rx: None,
        hs_peer: None,
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
    /// The scheduling group of this circuit's cells on its next link (its client's address),
    /// set with the next link; counted in `Stats::grouped_circuits` while set.
    next_group: Option<CircGroup>,
    handle: CircHandle,
    inbox: crate::link::InboxRx,
    io_tx: mpsc::Sender<Io>,
    io_rx: mpsc::Receiver<Io>,
    streams: HashMap<u16, StreamIo>,
    /// Directory streams, by stream id.
    dirs: HashMap<u16, DirStream>,
    /// A cell that found its link full: it goes first once there is room.
    stalled: Option<(Side, Cell)>,
    /// Extension attempts so far (a late answer for an older one is ignored).
    attempt: u64,
    /// The consensus the previous hop was last classified against (its address), while the core
    /// takes the previous hop for a client.
    classified_with: Option<usize>,
    /// When a cell or an I/O report last arrived (idle-circuit expiry, `dos.circuit_idle_timeout_secs`).
    last_active: Instant,
    /// The onion-service wiring, once the circuit takes a role ([`crate::hs`]).
    hs: Option<HsWire>,
    /// Messages from other circuits (while `hs` is set).
    hs_rx: Option<mpsc::Receiver<PeerMsg>>,
    /// The joined circuit's queue.
    hs_peer: Option<mpsc::Sender<PeerMsg>>,
}

/// A circuit's onion-service wiring at this relay.
struct HsWire {
    /// How other circuits reach this one (also its key in the tables).
    handle: PeerHandle,
    /// Keeps the joined pair counted.
    _pair: Option<Arc<PairGuard>>,
    /// A cell for the joined circuit that found its queue full: it goes first once there is
    /// room, and nothing is read meanwhile.
    stalled: Option<Cell>,
    /// When a circuit waiting under a cookie gives up.
    wait_until: Option<Instant>,
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
            if self.peer_stalled() {
                self.wait_for_peer(&kill).await;
                continue;
            }
            let deadline = self
                .core
                .poll_timeout()
                .into_iter()
                .chain(self.idle_deadline())
                .chain(self.dirs.values().filter_map(|d| d.req.deadline()))
                .chain(self.hs.as_ref().and_then(|h| h.wait_until))
                .min()
                .map(tokio::time::Instant::from_std);
            // Stop signals first; then exit I/O (bounded: one read per stream awaits its
            // go-ahead) so a busy inbound queue cannot starve the backward direction; then the
            // inbound queue; then the timer.
            tokio::select! {
                biased;
                r = kill.fired() => self.on_kill(r),
                () = hs_close(&self.hs) => self.core.destroy(CircError::Local),
                () = peer_gone(&self.hs_peer) => {
                    self.hs_peer = None;
                    self.core.join_closed();
                }
                Some(msg) = hs_recv(&mut self.hs_rx) => {
                    let now = coarse_now();
                    self.last_active = now;
                    self.on_peer_msg(msg, now);
                    self.drain_peer_msgs(now);
                }
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
            self.expire_dir_requests(now);
            self.expire_rend_wait(now);
        }
        self.finish();
    }

    /// When the circuit expires if nothing happens: it has no stream, and the idle timeout is on.
    fn idle_deadline(&self) -> Option<Instant> {
        let t = self.ctx.dos.cfg.circuit_idle_timeout()?;
        // An introduction circuit idles by design (the registry bounds them).
        (self.core.n_streams() == 0
            && self.dirs.is_empty()
            && !self.core.is_closed()
            && self.core.hs_role() != crate::core::HsRole::Intro)
            .then(|| self.last_active + t)
    }

    /// Act on events and push cells until both are drained or a link is full.
    fn step_outputs(&mut self, now: Instant) {
        loop {
            self.push_out(now);
            if self.stalled.is_some() || self.peer_stalled() {
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
        let w = self.core.take_sendmes_withheld();
        if w > 0 {
            self.ctx.stats.note_sendmes_withheld(w);
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
            let (link, id, group) = match (side, &self.next) {
                (Side::Prev, _) => (&self.prev, self.prev_id, None),
                (Side::Next, Some((l, id))) => (l, *id, self.next_group),
                (Side::Next, None) => continue,
            };
            cell.circ_id = Some(id);
            match link.sink.try_enqueue_in(cell, group) {
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
        let group = match side {
            Side::Prev => None,
            Side::Next => self.next_group,
        };
        let send = link.sink.send_in(cell, group);
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
            Event::OpenDirStream { sid } => self.open_dir(sid, now),
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
            Event::StreamData { sid, data } if self.dirs.contains_key(&sid) => {
                self.core.data_consumed(sid, 1, now);
                self.dir_request(sid, data.bytes(), now);
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
            Event::StreamClosed { sid, .. } if self.dirs.contains_key(&sid) => {
                self.dirs.remove(&sid);
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
            Event::EstablishIntro { auth_key } => {
                let h = self.hs_wire().handle.clone();
                let ok = self.ctx.hs.register_intro(auth_key, &h);
                self.core.intro_registered(ok);
            }
            Event::Introduce1 { msg } => {
                let status = self.ctx.hs.introduce(msg, now);
                self.core.introduce_acked(status);
            }
            Event::EstablishRendezvous { cookie } => {
                let h = self.hs_wire().handle.clone();
                let ok = self.ctx.hs.establish_rendezvous(cookie, &h, now);
                if ok {
                    let ttl = self.ctx.hs.wait_ttl();
                    self.hs_wire().wait_until = Some(now.checked_add(ttl).unwrap_or(now));
                }
                self.core.rendezvous_registered(ok);
            }
            Event::Rendezvous1 {
                cookie,
                handshake_info,
            } => {
                let h = self.hs_wire().handle.clone();
                match self.ctx.hs.rendezvous1(&cookie, handshake_info, &h, now) {
                    Some((peer, pair)) => {
                        self.hs_peer = Some(peer.tx);
                        self.hs_wire()._pair = Some(pair);
                        self.core.rendezvous1_result(true);
                    }
                    None => self.core.rendezvous1_result(false),
                }
            }
            Event::JoinedCell { cell } => self.send_to_peer(cell, now),
        }
    }

    /// This circuit's onion-service wiring, made on first use.
    fn hs_wire(&mut self) -> &mut HsWire {
        let ctx = &self.ctx;
        let rx = &mut self.hs_rx;
        self.hs.get_or_insert_with(|| {
            let inbox = ctx.hs.inbox();
            *rx = Some(inbox.rx);
            HsWire {
                handle: inbox.handle,
                _pair: None,
                stalled: None,
                wait_until: None,
            }
        })
    }

    /// Whether a cell for the joined circuit waits for room in its queue.
    fn peer_stalled(&self) -> bool {
        self.hs.as_ref().is_some_and(|h| h.stalled.is_some())
    }

    /// A cell crosses to the joined circuit; a full queue stalls this circuit.
    fn send_to_peer(&mut self, cell: Cell, now: Instant) {
        let Some(tx) = &self.hs_peer else {
            self.core.join_closed();
            return;
        };
        match tx.try_send(PeerMsg::Cell(cell)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(PeerMsg::Cell(c))) => {
                self.hs_wire().stalled = Some(c);
                self.core.note_blocked(now);
            }
            Err(_) => {
                self.hs_peer = None;
                self.core.join_closed();
            }
        }
    }

    /// Stalled on the joined circuit's full queue: wait for room (still taking the joined
    /// circuit's own cells, so two circuits full towards each other both move), a stop signal,
    /// or the core's timeout (which destroys the circuit past the blocked cap).
    async fn wait_for_peer(&mut self, kill: &Kill) {
        let Some(tx) = self.hs_peer.clone() else {
            if let Some(h) = &mut self.hs {
                h.stalled = None;
            }
            self.core.join_closed();
            return;
        };
        let deadline = self.core.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            r = kill.fired() => self.on_kill(r),
            permit = tx.reserve() => {
                let cell = self.hs.as_mut().and_then(|h| h.stalled.take());
                match permit {
                    Ok(p) => {
                        if let Some(c) = cell {
                            p.send(PeerMsg::Cell(c));
                        }
                        self.core.note_unblocked();
                    }
                    Err(_) => {
                        self.hs_peer = None;
                        self.core.join_closed();
                    }
                }
            }
            Some(msg) = hs_recv(&mut self.hs_rx) => {
                let now = coarse_now();
                self.last_active = now;
                self.on_peer_msg(msg, now);
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                self.core.handle_timeout(coarse_now());
            }
        }
    }

    /// A message from another circuit at this relay.
    fn on_peer_msg(&mut self, msg: PeerMsg, _now: Instant) {
        match msg {
            PeerMsg::Introduce2(m) => {
                let _ = self.core.send_introduce2(m);
            }
            PeerMsg::Join {
                handshake_info,
                peer,
                pair,
            } => {
                if self.core.rendezvous_joined(handshake_info) {
                    self.hs_peer = Some(peer.tx);
                    let w = self.hs_wire();
                    w._pair = Some(pair);
                    w.wait_until = None;
                }
            }
            PeerMsg::Cell(c) => self.core.joined_cell(c),
        }
    }

    /// Take what else is queued from other circuits, up to a batch.
    fn drain_peer_msgs(&mut self, now: Instant) {
        for _ in 1..BATCH {
            let Some(msg) = self.hs_rx.as_mut().and_then(|rx| rx.try_recv().ok()) else {
                return;
            };
            self.on_peer_msg(msg, now);
        }
    }

    /// A circuit that waited under a cookie past its time is closed.
    fn expire_rend_wait(&mut self, now: Instant) {
        let due = self
            .hs
            .as_ref()
            .and_then(|h| h.wait_until)
            .is_some_and(|t| t <= now);
        if !due {
            return;
        }
        if let Some(h) = &mut self.hs {
            h.wait_until = None;
        }
        if self.core.hs_role() == crate::core::HsRole::RendWaiting {
            self.core.destroy(CircError::Local);
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

    /// BEGIN_DIR: accept (CONNECTED) within the limits, or refuse with END.
    fn open_dir(&mut self, sid: u16, now: Instant) {
        let permit = Arc::clone(&self.ctx.dir_slots).try_acquire_owned().ok();
        if let Err(reason) =
            dirserve::admit(self.ctx.cfg.dir_cache, self.dirs.len(), permit.is_some())
        {
            self.ctx.stats.note_dir_refused();
            self.core.stream_failed(sid, reason, now);
            return;
        }
        let Some(permit) = permit else {
            return;
        };
        self.ctx.stats.dir_stream_opened();
        let slot = DirSlot {
            ctx: Arc::clone(&self.ctx),
            _permit: permit,
        };
        self.core.stream_connected(sid, None, now);
        self.dirs.insert(
            sid,
            DirStream {
                req: RequestBuf::new(now),
                pending: None,
                len: 0,
                _slot: slot,
            },
        );
    }

    /// Request bytes of directory stream `sid`: once the head is complete, the archive answers.
    fn dir_request(&mut self, sid: u16, bytes: &[u8], now: Instant) {
        let Some(d) = self.dirs.get_mut(&sid) else {
            return;
        };
        let fed = d.req.feed(bytes);
        match fed {
            Feed::More | Feed::Ignored => {}
            Feed::TooLong => {
                self.ctx.stats.note_dir_refused();
                self.dirs.remove(&sid);
                self.core.stream_failed(sid, EndReason::TORPROTOCOL, now);
            }
            Feed::Complete(_) | Feed::Upload { .. } => {
                let (head, body) = match fed {
                    Feed::Complete(head) => (head, Vec::new()),
                    Feed::Upload { head, body } => (head, body),
                    _ => return,
                };
                let unix = allium_directory::now_unix();
                let resp =
                    crate::hsdir::respond(&self.ctx, &head, &body, unix).unwrap_or_else(|| {
                        self.ctx
                            .dir_archive
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .respond(&head, unix)
                    });
                d.len = resp.len();
                d.pending = Some(Bytes::from(resp));
                self.package_dir(sid, now);
            }
        }
    }

    /// Package a directory response as far as the windows allow; END DONE after the last byte.
    fn package_dir(&mut self, sid: u16, now: Instant) {
        let Some(d) = self.dirs.get_mut(&sid) else {
            return;
        };
        let Some(data) = d.pending.take() else {
            return;
        };
        let n = self.core.package(sid, &data, now);
        if n < data.len() {
            if self.core.stream_budget(sid).is_some() {
                d.pending = Some(data.slice(n..));
            } else {
                self.dirs.remove(&sid);
            }
            return;
        }
        let len = d.len as u64;
        self.dirs.remove(&sid);
        self.ctx.stats.note_dir_served(len);
        self.core.stream_eof(sid, now);
    }

    /// End the directory streams whose request did not come in time.
    fn expire_dir_requests(&mut self, now: Instant) {
        let late: Vec<u16> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.req.deadline().is_some_and(|t| t <= now))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in late {
            self.ctx.stats.note_dir_refused();
            self.dirs.remove(&sid);
            self.core.stream_failed(sid, EndReason::TIMEOUT, now);
        }
    }

    /// After input that may have opened windows: retry streams with pending bytes.
    fn retry_pending(&mut self, now: Instant) {
        let dirs: Vec<u16> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.pending.is_some())
            .map(|(sid, _)| *sid)
            .collect();
        for sid in dirs {
            if self.core.stream_budget(sid).unwrap_or(0) > 0 {
                self.package_dir(sid, now);
            }
        }
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
        self.set_next_group();
        // Nothing is stalled while I/O is handled: the CREATE goes out first on the new link.
        self.stalled = Some((Side::Next, cell));
    }

    /// Choose the circuit's scheduling group on its next link (see the module docs): its
    /// previous hop's address if that is a client, none if it is a relay.
    fn set_next_group(&mut self) {
        let group = if self.ctx.is_exempt_link(&self.prev) {
            None
        } else {
            self.prev
                .peer_ip()
                .map(|ip| crate::dos::AddrKey::of(ip).sched_group())
        };
        match (self.next_group.is_some(), group.is_some()) {
            (false, true) => self.ctx.stats.grouped_circuit_opened(),
            (true, false) => self.ctx.stats.grouped_circuit_closed(),
            _ => {}
        }
        self.next_group = group;
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
        self.dirs.clear();
        if let Some(h) = self.hs.take() {
            self.ctx.hs.remove_circuit(h.handle.key);
        }
        self.hs_rx = None;
        self.hs_peer = None;
        let stats = &self.ctx.stats;
        stats.circuit_closed();
        if self.next_group.is_some() {
            stats.grouped_circuit_closed();
        }
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

/// The close signal of an onion-service circuit (never, for others).
async fn hs_close(hs: &Option<HsWire>) {
    match hs {
        Some(h) => h.handle.close.notified().await,
        None => std::future::pending().await,
    }
}

/// The joined circuit's reactor ended (never, while not joined).
async fn peer_gone(peer: &Option<mpsc::Sender<PeerMsg>>) {
    match peer {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// The next message from another circuit (never, for a circuit without a role).
async fn hs_recv(rx: &mut Option<mpsc::Receiver<PeerMsg>>) -> Option<PeerMsg> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
