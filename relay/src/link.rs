//! Links: one per Noise channel, with the table of circuits that use it. Links only route.
//!
//! Each link has a single reader task ([`run_reader`]) that decodes cells, looks up the circuit
//! id and `try_send`s the cell into that circuit's bounded inbound queue. The reader never awaits
//! another link, a circuit or a handshake: CREATE goes to the handshake pool (`crate::create`),
//! and a circuit whose queue is full (it broke its windows, or it is stalled) is destroyed with
//! reason RESOURCELIMIT. Only a circuit's reactor writes cells for it (`crate::reactor`), into
//! the link's [`ChannelSender`], which keeps a bounded queue per circuit and sends from the
//! circuit with the lowest EWMA of recent cells first (`allium_proto::circmux`): "the link is
//! full" for a reactor means its own circuit's queue on that link is full (or the whole link is),
//! and other circuits on the link keep going.
//!
//! Circuit ids: the link initiator allocates ids with the most significant bit set, the responder
//! with it clear. An id we allocated is not reused for [`ID_QUARANTINE`] after its circuit closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allium_crypto::{RelayId, X25519Public};
use allium_proto::cell::{Cell, CellCmd, CircId, DestroyReason};
use allium_proto::channel::{ChannelReceiver, ChannelSender};
use allium_proto::circmux::CircGroup;
use tokio::sync::{Notify, mpsc};

use crate::core::Side;
use crate::ctx::Ctx;
use crate::ratelimit::Credit;

/// How long an id we allocated stays unused after its circuit closed (design pitfall 15).
pub const ID_QUARANTINE: Duration = Duration::from_secs(60);
/// A link with no circuits and no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait to enqueue a detached DESTROY on a full link.
pub const DESTROY_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a link's outgoing cells go: a Noise channel, or (tests) an in-memory queue.
#[derive(Clone, Debug)]
pub enum CellSink {
    /// A real link.
    Channel(ChannelSender),
    /// An in-memory queue (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Mpsc(mpsc::Sender<Cell>),
    /// An in-memory scheduler that the test drains (tests of the per-group scheduling).
    #[cfg(test)]
    Mux(Arc<MemMux>),
}

/// A link's scheduler without a socket: the test pops cells as a link writer would.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct MemMux {
    pub(crate) mux: Mutex<allium_proto::circmux::CircuitMux>,
    /// Popped cells made room.
    pub(crate) room: Notify,
}

/// Result of a non-blocking enqueue.
#[derive(Debug)]
pub(crate) enum Enqueue {
    /// Queued.
    Done,
    /// The queue is full; here is the cell back.
    Full(Cell),
    /// The link is closed.
    Closed,
}

impl CellSink {
    /// Enqueue without waiting.
    pub(crate) fn try_enqueue(&self, cell: Cell) -> Enqueue {
        self.try_enqueue_in(cell, None)
    }

    /// Enqueue without waiting, scheduling the cell's circuit in `group` on this link (see
    /// [`ChannelSender::send_in`]; in-memory queues have no scheduler and ignore it).
    pub(crate) fn try_enqueue_in(&self, cell: Cell, group: Option<CircGroup>) -> Enqueue {
        match self {
            Self::Channel(s) => match s.try_send_in(cell, group) {
                Ok(None) => Enqueue::Done,
                Ok(Some(c)) => Enqueue::Full(c),
                Err(_) => Enqueue::Closed,
            },
            Self::Mpsc(s) => match s.try_send(cell) {
                Ok(()) => Enqueue::Done,
                Err(mpsc::error::TrySendError::Full(c)) => Enqueue::Full(c),
                Err(mpsc::error::TrySendError::Closed(_)) => Enqueue::Closed,
            },
            #[cfg(test)]
            Self::Mux(m) => match m.mux.lock() {
                Ok(mut mux) => match mux.push_in(cell, group) {
                    Ok(()) => Enqueue::Done,
                    Err(r) => Enqueue::Full(r.into_cell()),
                },
                Err(_) => Enqueue::Closed,
            },
        }
    }

    /// Enqueue, waiting for room (unbounded wait: callers bound it). `false` if the link closed.
    /// Dropping the future before it completes drops the cell.
    pub(crate) async fn send(&self, cell: Cell) -> bool {
        self.send_in(cell, None).await
    }

    /// As [`CellSink::send`], in `group` (see [`CellSink::try_enqueue_in`]).
    pub(crate) async fn send_in(&self, cell: Cell, group: Option<CircGroup>) -> bool {
        match self {
            Self::Channel(s) => s.send_in(cell, group).await.is_ok(),
            Self::Mpsc(s) => s.send(cell).await.is_ok(),
            #[cfg(test)]
            Self::Mux(m) => {
                let mut cell = cell;
                loop {
                    let room = m.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    match self.try_enqueue_in(cell, group) {
                        Enqueue::Done => return true,
                        Enqueue::Closed => return false,
                        Enqueue::Full(c) => cell = c,
                    }
                    room.await;
                }
            }
        }
    }
}

/// Where a link's incoming cells come from.
#[derive(Debug)]
pub enum CellSource {
    /// A real link.
    Channel(ChannelReceiver),
    /// An in-memory queue (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Mpsc(mpsc::Receiver<Cell>),
}

impl CellSource {
    async fn recv(&mut self) -> Option<Cell> {
        match self {
            Self::Channel(r) => r.recv().await,
            Self::Mpsc(r) => r.recv().await,
        }
    }
}

/// Why a reactor must stop at once (signalled beside its queue, which may be full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillReason {
    /// Its inbound queue overflowed.
    QueueOverflow,
    /// The link on this side closed (also how shutdown reaches circuits).
    LinkClosed(Side),
}

/// A one-shot stop signal for a reactor.
#[derive(Debug, Default)]
pub(crate) struct Kill {
    reason: Mutex<Option<KillReason>>,
    notify: Notify,
}

impl Kill {
    /// Signal the reactor (the first reason wins).
    pub(crate) fn fire(&self, reason: KillReason) {
        let mut g = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(reason);
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Wait until signalled; returns (and consumes) the reason.
    pub(crate) async fn fired(&self) -> KillReason {
        loop {
            if let Some(r) = self.reason.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// What a link's table routes to: a circuit's queue and stop signal.
#[derive(Clone, Debug)]
pub(crate) struct CircHandle {
    pub(crate) tx: InboxTx,
    pub(crate) kill: Arc<Kill>,
    /// Bytes the circuit holds in its exit streams' queues (for the out-of-memory handler).
    pub(crate) queued: Arc<crate::dos::CircQueued>,
}

/// The sending end of a circuit's inbound queue (capped in cells; never waits).
pub(crate) type InboxTx = allium_proto::inbox::InboxTx<(Side, Cell)>;
/// The receiving end of a circuit's inbound queue (its reactor's).
pub(crate) type InboxRx = allium_proto::inbox::InboxRx<(Side, Cell)>;

/// A circuit's inbound queue holding at most `cap` cells, not accounted (tests).
#[cfg(test)]
pub(crate) fn inbox(cap: usize) -> (InboxTx, InboxRx) {
    allium_proto::inbox::inbox(cap)
}

/// A circuit's inbound queue as the relay makes it: capped at [`crate::ctx::Limits::inbound_queue`]
/// cells and counted in the DoS subsystem's queued-bytes account.
pub(crate) fn circuit_inbox(ctx: &Ctx) -> (InboxTx, InboxRx) {
    let unit = (allium_proto::cell::CELL_LEN + std::mem::size_of::<(Side, Cell)>()) as u64;
    allium_proto::inbox::inbox_accounted(ctx.limits.inbound_queue, Arc::clone(&ctx.dos.mem), unit)
}

/// The reader's one-entry route cache.
struct Cached {
    id: CircId,
    generation: u64,
    handle: CircHandle,
    side: Side,
}

#[derive(Clone, Debug)]
enum Entry {
    /// A CREATE for this id waits in the handshake pool.
    Creating,
    /// A circuit, and which side of it this link is.
    Circ(CircHandle, Side),
}

#[derive(Default)]
struct CircTable {
    map: HashMap<CircId, Entry>,
    /// Entries that are [`Entry::Creating`].
    creating: usize,
    quarantine: VecDeque<(CircId, Instant)>,
    quarantined: HashSet<CircId>,
}

impl CircTable {
    fn expire(&mut self, now: Instant) {
        while let Some(&(id, t)) = self.quarantine.front() {
            if now.saturating_duration_since(t) < ID_QUARANTINE {
                break;
            }
            self.quarantine.pop_front();
            self.quarantined.remove(&id);
        }
    }
}

/// One link to a peer (client or relay).
pub struct Link {
    pub(crate) sink: CellSink,
    /// We opened this link (our circuit ids have the MSB set).
    pub(crate) initiator: bool,
    /// The relay at the other end, when we opened the link to it (then it is authenticated).
    pub(crate) peer_relay: Option<RelayId>,
    /// The peer's Noise static key (for incoming links: look it up in the consensus).
    pub(crate) peer_static: Option<X25519Public>,
    /// The peer's IP address, once known (set by the listener and the link manager).
    peer_ip: std::sync::OnceLock<std::net::IpAddr>,
    table: Mutex<CircTable>,
    /// Bumped whenever a circuit leaves the table (invalidates the reader's lookup cache).
    generation: AtomicU64,
    closed: AtomicBool,
    max_circs: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("initiator", &self.initiator)
            .field("peer_relay", &self.peer_relay)
            .finish_non_exhaustive()
    }
}

/// Why a circuit could not be added to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertError {
    /// The id is already used.
    InUse,
    /// The per-link circuit limit is reached.
    Full,
    /// The link closed.
    Closed,
}

impl Link {
    /// A new link.
    pub(crate) fn new(
        sink: CellSink,
        initiator: bool,
        peer_relay: Option<RelayId>,
        peer_static: Option<X25519Public>,
        max_circs: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            sink,
            initiator,
            peer_relay,
            peer_static,
            peer_ip: std::sync::OnceLock::new(),
            table: Mutex::new(CircTable::default()),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            max_circs,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, CircTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the peer's IP address (the first value set stays).
    pub(crate) fn set_peer_ip(&self, ip: std::net::IpAddr) {
        let _ = self.peer_ip.set(ip);
    }

    /// The peer's IP address, if known.
    pub(crate) fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer_ip.get().copied()
    }

    /// Whether the link has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The circuit routed under `id`, and which side of it this link is.
    pub(crate) fn get(&self, id: CircId) -> Option<(CircHandle, Side)> {
        match self.table().map.get(&id)? {
            Entry::Circ(h, s) => Some((h.clone(), *s)),
            Entry::Creating => None,
        }
    }

    /// As [`Link::get`], through a one-entry cache kept by the reader task: bulk traffic on a
    /// link mostly belongs to the same circuit, so most cells skip the table lock (and no handle
    /// is cloned per cell).
    fn get_cached<'c>(&self, id: CircId, cache: &'c mut Option<Cached>) -> Option<&'c Cached> {
        let generation = self.generation.load(Ordering::Acquire);
        let hit = cache
            .as_ref()
            .is_some_and(|c| c.id == id && c.generation == generation);
        if !hit {
            let (handle, side) = self.get(id)?;
            *cache = Some(Cached {
                id,
                generation,
                handle,
                side,
            });
        }
        cache.as_ref()
    }

    /// Number of circuits (and pending CREATEs) on the link.
    pub(crate) fn n_circuits(&self) -> usize {
        self.table().map.len()
    }

    /// Reserve a peer-chosen id for a CREATE waiting in the handshake pool; at most
    /// `max_creating` may wait per link, so one link's flood cannot push every other link's
    /// CREATEs out of the shared queue.
    pub(crate) fn reserve_peer_id(
        &self,
        id: CircId,
        max_creating: usize,
    ) -> Result<(), InsertError> {
        let mut t = self.table();
        if self.is_closed() {
            return Err(InsertError::Closed);
        }
        if t.map.contains_key(&id) {
            return Err(InsertError::InUse);
        }
        if t.map.len() >= self.max_circs || t.creating >= max_creating {
            return Err(InsertError::Full);
        }
        t.map.insert(id, Entry::Creating);
        t.creating += 1;
        Ok(())
    }

    /// Turn a reserved id into a routed circuit (the handshake succeeded). Fails if the
    /// reservation is gone (the link closed).
    pub(crate) fn install(&self, id: CircId, handle: CircHandle) -> Result<(), InsertError> {
        let mut t = self.table();
        if self.is_closed() {
            return Err(InsertError::Closed);
        }
        match t.map.get_mut(&id) {
            Some(e @ Entry::Creating) => {
                *e = Entry::Circ(handle, Side::Prev);
                t.creating = t.creating.saturating_sub(1);
                Ok(())
            }
            _ => Err(InsertError::Closed),
        }
    }

    /// Drop a reservation made for a CREATE that was refused.
    pub(crate) fn unreserve(&self, id: CircId) {
        let mut t = self.table();
        if matches!(t.map.get(&id), Some(Entry::Creating)) {
            t.map.remove(&id);
            t.creating = t.creating.saturating_sub(1);
        }
    }

    /// Allocate a fresh id of ours routed to `handle` as its next side.
    pub(crate) fn allocate(&self, handle: CircHandle, now: Instant) -> Result<CircId, InsertError> {
        let mut t = self.table();
        if self.is_closed() {
            return Err(InsertError::Closed);
        }
        if t.map.len() >= self.max_circs {
            return Err(InsertError::Full);
        }
        t.expire(now);
        for _ in 0..64 {
            let id = CircId::random(self.initiator);
            if !t.map.contains_key(&id) && !t.quarantined.contains(&id) {
                t.map.insert(id, Entry::Circ(handle, Side::Next));
                return Ok(id);
            }
        }
        Err(InsertError::Full)
    }

    /// Remove `id`; quarantine it if we allocated it. Returns whether it was there.
    pub(crate) fn remove(&self, id: CircId, now: Instant) -> bool {
        let mut t = self.table();
        let was = t.map.remove(&id).is_some();
        self.generation.fetch_add(1, Ordering::Release);
        let ours = id.allocatable_by(self.initiator);
        if was && ours && t.quarantined.insert(id) {
            t.quarantine.push_back((id, now));
        }
        was
    }

    /// Whether `id` is currently quarantined (tests).
    #[cfg(test)]
    pub(crate) fn is_quarantined(&self, id: CircId) -> bool {
        self.table().quarantined.contains(&id)
    }

    /// Send a DESTROY for `id` without waiting: queued now if there is room, else by a small
    /// task that waits (bounded) behind what was already queued.
    pub(crate) fn send_destroy_detached(&self, id: CircId, reason: DestroyReason) {
        if self.is_closed() {
            return;
        }
        self.send_detached(Cell::destroy(id, reason));
    }

    /// Send a DESTROY for `id` if the link's queue has room now; else drop it (for refusals
    /// before a circuit exists, which a flooding peer must not turn into waiting tasks).
    pub(crate) fn try_send_destroy(&self, id: CircId, reason: DestroyReason) {
        if !self.is_closed() {
            let _ = self.sink.try_enqueue(Cell::destroy(id, reason));
        }
    }

    /// Queue `cell` without waiting, falling back to a small bounded task if the queue is full.
    pub(crate) fn send_detached(&self, cell: Cell) {
        let Enqueue::Full(cell) = self.sink.try_enqueue(cell) else {
            return;
        };
        let sink = self.sink.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DESTROY_SEND_TIMEOUT, sink.send(cell)).await;
        });
    }

    /// Close the underlying channel (its queued cells are flushed first).
    pub(crate) fn close_sink(&self) {
        if let CellSink::Channel(s) = &self.sink {
            s.close();
        }
    }

    /// Mark closed and stop every circuit routed here.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let entries: Vec<Entry> = {
            let mut t = self.table();
            t.creating = 0;
            t.map.drain().map(|(_, e)| e).collect()
        };
        self.generation.fetch_add(1, Ordering::Release);
        for e in entries {
            if let Entry::Circ(h, side) = e {
                h.kill.fire(KillReason::LinkClosed(side));
            }
        }
    }
}

/// Read and route cells from a link until it closes or the relay shuts down; then stop every
/// circuit that used it.
#[allow(clippy::disallowed_methods)] // Driver: the idle timer.
pub(crate) async fn run_reader(ctx: Arc<Ctx>, link: Arc<Link>, mut source: CellSource) {
    let mut credit = Credit::default();
    let mut shutdown = ctx.shutdown.subscribe();
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let mut active = false;
    let mut cache = None;
    let already_stopping = *shutdown.borrow_and_update();
    let mut unreported: u64 = 0;
    let mut pacer = crate::dos::RefusalPacer::new(&ctx.dos.cfg, coarse_now());
    loop {
        if already_stopping {
            break;
        }
        let cell = tokio::select! {
            biased;
            c = source.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = shutdown.changed() => break,
            () = &mut idle => {
                // No cell during a whole period and no circuit: close. (A link is closed after
                // between one and two idle periods.)
                if !active && link.n_circuits() == 0 {
                    tracing::debug!("closing idle link");
                    break;
                }
                active = false;
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                continue;
            }
        };
        active = true;
        // The bucket paces this link only (its own TCP pushes back); no other link waits.
        credit
            .spend(&ctx.bucket, allium_proto::cell::CELL_LEN as u64)
            .await;
        // Batch the shared counter update (one atomic per 64 cells, not per cell).
        unreported += 1;
        if unreported == 64 {
            ctx.stats
                .note_read(64 * allium_proto::cell::CELL_LEN as u64);
            unreported = 0;
        }
        match route_cell(&ctx, &link, cell, &mut cache) {
            Routed::Done => {}
            Routed::Close => {
                tracing::debug!("closing link after a protocol violation");
                break;
            }
            Routed::Refused => {
                // A client link whose CREATEs keep being refused is read at the refusal rate.
                if ctx.is_exempt_link(&link) {
                    continue;
                }
                if let Some(pause) = pacer.on_refusal(coarse_now()) {
                    ctx.stats.note_link_paused();
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
    }
    drop(cache);
    link.close_sink();
    link.close();
    ctx.links.forget(&link);
}

/// What routing one cell came to.
enum Routed {
    /// Routed (or dropped as harmless).
    Done,
    /// A CREATE refused before the handshake (DoS limits, caps, replay).
    Refused,
    /// A protocol violation: the link must close.
    Close,
}

/// Route one cell; never waits.
fn route_cell(ctx: &Arc<Ctx>, link: &Arc<Link>, cell: Cell, cache: &mut Option<Cached>) -> Routed {
    match cell.cmd {
        CellCmd::PADDING => Routed::Done,
        CellCmd::CREATE => {
            if on_create(ctx, link, cell) {
                Routed::Done
            } else {
                Routed::Refused
            }
        }
        CellCmd::CREATED | CellCmd::RELAY | CellCmd::RELAY_EARLY => {
            // Decoding guarantees an id on every command but PADDING.
            let Some(id) = cell.circ_id else {
                return Routed::Done;
            };
            if let Some(c) = link.get_cached(id, cache)
                && (c.side == Side::Next || cell.cmd != CellCmd::CREATED)
            {
                deliver(ctx, link, id, &c.handle, c.side, cell);
            }
            Routed::Done
        }
        CellCmd::DESTROY => {
            let Some(id) = cell.circ_id else {
                return Routed::Done;
            };
            if let Some((h, side)) = link.get(id) {
                // No more cells for this id from this link; the reactor hears the DESTROY.
                link.remove(id, coarse_now());
                deliver(ctx, link, id, &h, side, cell);
            }
            Routed::Done
        }
        _ => Routed::Close,
    }
}

/// Hand `cell` to its circuit's queue; a full queue destroys that circuit (only).
fn deliver(ctx: &Ctx, link: &Link, id: CircId, h: &CircHandle, side: Side, cell: Cell) {
    match h.tx.try_send((side, cell)) {
        Ok(()) => {}
        Err(allium_proto::inbox::InboxFull::Full) => {
            link.remove(id, coarse_now());
            ctx.stats.note_queue_overflow();
            h.kill.fire(KillReason::QueueOverflow);
        }
        // The reactor is gone: the circuit is being torn down.
        Err(allium_proto::inbox::InboxFull::Closed) => {}
    }
}

/// CREATE: check the id, reserve it and queue the handshake; never runs it here. `false` if it
/// was refused before the handshake (its DESTROY goes out only if the link has room: a peer
/// that floods CREATEs and does not read gets no task per refusal).
fn on_create(ctx: &Arc<Ctx>, link: &Arc<Link>, cell: Cell) -> bool {
    let Some(id) = cell.circ_id else { return true };
    // The peer allocates ids on this link; it is the initiator iff we are not.
    if !id.allocatable_by(!link.initiator) {
        return true;
    }
    let now = coarse_now();
    if let Err((refusal, reason)) = crate::dos::admit_create(ctx, link, &cell.body[..], now) {
        ctx.stats.dos.note(refusal, now);
        link.try_send_destroy(id, reason);
        return false;
    }
    match link.reserve_peer_id(id, ctx.limits.create_per_link) {
        Ok(()) => {
            crate::create::submit(ctx, Arc::clone(link), id, cell, now);
            true
        }
        Err(InsertError::Full) => {
            ctx.stats.note_create_dropped();
            if link.n_circuits() >= link.max_circs && ctx.stats.note_link_circuit_cap() {
                tracing::warn!(
                    max_circuits_per_link = link.max_circs,
                    "a link reached max_circuits_per_link; its new circuits are refused with \
                     RESOURCELIMIT (logged once; the count is in the relay's statistics). \
                     Raise the limit if honest clients hit it"
                );
            }
            link.try_send_destroy(id, DestroyReason::RESOURCELIMIT);
            false
        }
        Err(InsertError::InUse | InsertError::Closed) => true,
    }
}

/// The driver clock (tokio's, so tests can pause it).
#[allow(clippy::disallowed_methods)] // The driver is where time enters.
pub(crate) fn coarse_now() -> Instant {
    tokio::time::Instant::now().into_std()
}
