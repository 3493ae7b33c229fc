//! Links: one per Noise channel, with the table of circuits that use it.
//!
//! Each link has a single reader task ([`run_reader`]) that processes every incoming cell inline:
//! it decrypts or relays the cell and pushes it onto the other link's bounded queue, with no task
//! switch and no allocation on the forwarding path (the cell's box travels on).
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
use tokio::sync::mpsc;

use crate::circuit::{Circuit, Side};
use crate::ctx::Ctx;
use crate::ratelimit::Credit;

/// How long an id we allocated stays unused after its circuit closed (design pitfall 15).
pub const ID_QUARANTINE: Duration = Duration::from_secs(60);
/// A link with no circuits and no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait to enqueue one cell on a link before the link is considered stuck.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a link's outgoing cells go: a Noise channel, or (tests) an in-memory queue.
#[derive(Clone, Debug)]
pub enum CellSink {
    /// A real link.
    Channel(ChannelSender),
    /// An in-memory queue (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Mpsc(mpsc::Sender<Cell>),
}

impl CellSink {
    /// Enqueue a cell; `false` if the link is closed or stuck.
    pub async fn send(&self, cell: Cell) -> bool {
        match self {
            // Fast path: a non-blocking enqueue (no timer, no waiter registration) when there is
            // room, which is the common case.
            Self::Channel(s) => match s.try_send(cell) {
                Ok(None) => true,
                Ok(Some(cell)) => matches!(
                    tokio::time::timeout(SEND_TIMEOUT, s.send(cell)).await,
                    Ok(Ok(()))
                ),
                Err(_) => false,
            },
            Self::Mpsc(s) => matches!(
                tokio::time::timeout(SEND_TIMEOUT, s.send(cell)).await,
                Ok(Ok(()))
            ),
        }
    }
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
        match self {
            Self::Channel(s) => match s.try_send(cell) {
                Ok(None) => Enqueue::Done,
                Ok(Some(c)) => Enqueue::Full(c),
                Err(_) => Enqueue::Closed,
            },
            Self::Mpsc(s) => match s.try_send(cell) {
                Ok(()) => Enqueue::Done,
                Err(mpsc::error::TrySendError::Full(c)) => Enqueue::Full(c),
                Err(mpsc::error::TrySendError::Closed(_)) => Enqueue::Closed,
            },
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

/// A circuit's entry in a link's table.
#[derive(Clone)]
pub(crate) struct Slot {
    pub(crate) circ: Arc<Circuit>,
    pub(crate) side: Side,
}

#[derive(Default)]
struct CircTable {
    map: HashMap<u32, Slot>,
    quarantine: VecDeque<(u32, Instant)>,
    quarantined: HashSet<u32>,
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
            table: Mutex::new(CircTable::default()),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            max_circs,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, CircTable> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether the link has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The circuit using `id` on this link.
    pub(crate) fn get(&self, id: u32) -> Option<Slot> {
        self.table().map.get(&id).cloned()
    }

    /// The circuit using `id`, through a one-entry cache kept by the reader task: bulk traffic on
    /// a link mostly belongs to the same circuit, so most cells skip the table lock.
    fn get_cached(&self, id: u32, cache: &mut Option<(u32, u64, Slot)>) -> Option<Slot> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((cid, g, slot)) = cache
            && *cid == id
            && *g == generation
        {
            return Some(slot.clone());
        }
        let slot = self.get(id)?;
        *cache = Some((id, generation, slot.clone()));
        Some(slot)
    }

    /// Number of circuits on the link.
    pub(crate) fn n_circuits(&self) -> usize {
        self.table().map.len()
    }

    /// Insert a circuit under an id chosen by the peer. Fails if the id is taken or the link full.
    pub(crate) fn insert_peer_id(&self, id: u32, slot: Slot) -> Result<(), InsertError> {
        let mut t = self.table();
        if self.is_closed() {
            return Err(InsertError::Closed);
        }
        if t.map.contains_key(&id) {
            return Err(InsertError::InUse);
        }
        if t.map.len() >= self.max_circs {
            return Err(InsertError::Full);
        }
        t.map.insert(id, slot);
        Ok(())
    }

    /// Allocate a fresh id of ours for `slot`.
    pub(crate) fn allocate(&self, slot: Slot) -> Result<u32, InsertError> {
        let mut t = self.table();
        if self.is_closed() {
            return Err(InsertError::Closed);
        }
        if t.map.len() >= self.max_circs {
            return Err(InsertError::Full);
        }
        t.expire(Instant::now());
        for _ in 0..64 {
            let id = CircId::random(self.initiator).get();
            if !t.map.contains_key(&id) && !t.quarantined.contains(&id) {
                t.map.insert(id, slot);
                return Ok(id);
            }
        }
        Err(InsertError::Full)
    }

    /// Remove `id`; quarantine it if we allocated it. Returns the slot that was there.
    pub(crate) fn remove(&self, id: u32) -> Option<Slot> {
        let mut t = self.table();
        let slot = t.map.remove(&id);
        self.generation.fetch_add(1, Ordering::Release);
        let ours = CircId::new(id).is_some_and(|c| c.allocatable_by(self.initiator));
        if slot.is_some() && ours && t.quarantined.insert(id) {
            t.quarantine.push_back((id, Instant::now()));
        }
        slot
    }

    /// Whether `id` is currently quarantined (tests).
    #[cfg(test)]
    pub(crate) fn is_quarantined(&self, id: u32) -> bool {
        self.table().quarantined.contains(&id)
    }

    /// Send a DESTROY for `id` without waiting (it is queued behind what was already sent).
    pub(crate) fn send_destroy_detached(self: &Arc<Self>, id: u32, reason: DestroyReason) {
        let Some(cid) = CircId::new(id) else { return };
        if self.is_closed() {
            return;
        }
        let cell = Cell::destroy(cid, reason);
        let cell = match &self.sink {
            CellSink::Channel(s) => match s.try_send(cell) {
                Ok(Some(c)) => c,
                _ => return,
            },
            CellSink::Mpsc(s) => match s.try_send(cell) {
                Err(mpsc::error::TrySendError::Full(c)) => c,
                _ => return,
            },
        };
        let sink = self.sink.clone();
        tokio::spawn(async move {
            let _ = sink.send(cell).await;
        });
    }

    /// Close the underlying channel (its queued cells are flushed first).
    pub(crate) fn close_sink(&self) {
        if let CellSink::Channel(s) = &self.sink {
            s.close();
        }
    }

    /// Mark closed and take every circuit out of the table.
    fn close(&self) -> Vec<Slot> {
        self.closed.store(true, Ordering::Release);
        let mut t = self.table();
        t.map.drain().map(|(_, s)| s).collect()
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

/// Read and process cells from a link until it closes or the relay shuts down; then destroy
/// every circuit that used it.
pub(crate) async fn run_reader(ctx: Arc<Ctx>, link: Arc<Link>, mut source: CellSource) {
    let mut credit = Credit::default();
    let mut shutdown = ctx.shutdown.subscribe();
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let mut active = false;
    let mut cache: Option<(u32, u64, Slot)> = None;
    let already_stopping = *shutdown.borrow_and_update();
    let mut unreported: u64 = 0;
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
        if !handle_cell(&ctx, &link, cell, &mut cache).await {
            tracing::debug!("closing link after a protocol violation");
            break;
        }
    }
    drop(cache);
    link.close_sink();
    for slot in link.close() {
        slot.circ.destroy(&ctx, Some(slot.side));
    }
    ctx.links.forget(&link);
}

/// Process one cell. Returns `false` if the link must close.
pub(crate) async fn handle_cell(
    ctx: &Arc<Ctx>,
    link: &Arc<Link>,
    cell: Cell,
    cache: &mut Option<(u32, u64, Slot)>,
) -> bool {
    match cell.cmd {
        CellCmd::PADDING => true,
        CellCmd::CREATE => {
            crate::circuit::handle_create(ctx, link, cell).await;
            true
        }
        CellCmd::CREATED => {
            if let Some(slot) = link.get(cell.circ_id)
                && slot.side == Side::Next
            {
                slot.circ.on_created(ctx, cell);
            }
            true
        }
        CellCmd::RELAY | CellCmd::RELAY_EARLY => {
            if let Some(slot) = link.get_cached(cell.circ_id, cache) {
                match slot.side {
                    Side::Prev => slot.circ.forward(ctx, cell).await,
                    Side::Next => slot.circ.backward(ctx, link, cell).await,
                }
            }
            true
        }
        CellCmd::DESTROY => {
            if let Some(slot) = link.remove(cell.circ_id) {
                slot.circ.destroy(ctx, Some(slot.side));
            }
            true
        }
        _ => false,
    }
}
