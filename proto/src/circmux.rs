//! The circuit scheduler of a link: per-circuit outgoing queues, drained lowest-EWMA first,
//! fairly between groups of circuits.
//!
//! Every circuit on a link keeps its own bounded queue of outgoing cells. When the link's writer
//! has room it asks [`CircuitMux::pop`] for the next cell, which comes from the circuit with the
//! smallest exponentially weighted moving average of cells recently sent (Tor's circuitmux EWMA
//! policy, `circuitmux_ewma.c` / tor-spec "circuit priority"). A bulk circuit's average grows with
//! every cell it sends, so a circuit that sends little (interactive traffic) goes first whenever
//! it has a cell queued, and two bulk circuits alternate. Old activity decays with a half-life
//! ([`MuxConfig::half_life`], 30 s by default), counted in whole ticks ([`MuxConfig::tick`]).
//!
//! Groups: a circuit may belong to a [`CircGroup`] (a relay puts every circuit that came from one
//! client address in one group, see [`CircuitMux::push_in`]). Each group keeps its own average
//! as well: a cell sent counts for its circuit and for its group. The mux first picks the group
//! with the smallest average, then within it the circuit with the smallest average. So two busy
//! groups share the link equally whatever their number of circuits (400 circuits of one address
//! get what one circuit of another address gets), and an interactive circuit of a big group
//! still goes before that group's bulk circuits. A circuit without a group is a group of its own
//! (with the same average as the circuit), so without groups the order is exactly the
//! per-circuit EWMA order.
//!
//! How the decay stays cheap: instead of scaling every circuit's average down at every tick,
//! a cell sent in tick `k` (counted from the epoch) adds `2^(k * tick / half_life)` to its
//! circuit's value and to its group's. All values share that scale, so comparing them compares
//! the true averages, and a value only changes when it sends. When the weight grows past
//! [`RESCALE_AT`], every value is divided by it and the epoch moves to the current tick (one pass
//! over the circuits and groups, every ~16 minutes with the defaults); idle circuits whose average
//! decayed below a hundredth of a cell are forgotten then.
//!
//! Selection: a heap of the groups that have cells queued, keyed by the group's value, and in
//! each group a heap of its circuits that have cells queued, keyed by the circuit's value. A pop
//! takes the top group and its top circuit and puts both back with their new values:
//! O(log G + log C) for G groups with cells queued (an ungrouped circuit counts as one) and C
//! circuits with cells queued in the chosen group. A push is O(1), plus the same when the
//! circuit's queue was empty. There is no per-circuit blocked state inside the mux: a circuit is
//! in its group's heap exactly while it has a cell queued, and a group is in the link's heap
//! exactly while one of its circuits is, so a pop never has to skip anything. A group whose
//! circuits are all held back by their own state (windows closed, reactor waiting elsewhere) has
//! nothing queued, is absent from the heap and costs the others nothing; it keeps its (decaying)
//! value, so coming back does not give it a head start over the groups that kept sending.
//!
//! Invariants (the writer relies on them):
//! - Cells of one circuit leave in the order they were pushed; cells without a circuit
//!   (link PADDING) leave before any circuit cell.
//! - At most [`MuxConfig::circ_cap`] cells wait per circuit and [`MuxConfig::total_cap`] in all;
//!   a push beyond either is refused and the cell handed back (the sender waits for room).
//!   Admission past the link's cap is per group, as the order is: a circuit whose group holds
//!   less than its fair share, `max(total_cap / G, reserve)` with G the groups with cells queued
//!   (its own included), may still queue, while the link holds less than twice the cap (or the
//!   group less than [`MuxConfig::reserve`] cells). So busy groups filling the link cannot keep a
//!   light group out of it, nor hold it to a trickle: with a reserve per circuit instead, a busy
//!   group of many circuits took all the room the writer freed and a light circuit only ever had
//!   its reserve queued (measured through the writer: 4 cells of each 32-cell frame with 20 busy
//!   circuits beside it, under 2 % with 400, instead of half). Link control (PADDING) has its
//!   own reserve. The link holds at most `2 * total_cap` plus `reserve` per group. An ungrouped
//!   circuit is a group: for it the reserve is per circuit, as before groups.
//! - A circuit's entry is dropped once its DESTROY has left, and idle entries are dropped on
//!   rescale, so the table holds only circuits that sent recently. A group is dropped with its
//!   last circuit, so there are never more groups than circuits.
//! - No allocation per cell: queues keep their capacity while the circuit lives, a group's heap
//!   while the group lives; the heaps and the slot tables grow only with the number of circuits
//!   and groups.
//!
//! Sans-IO: time comes in as an argument to [`CircuitMux::pop`]; pushes need no time.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::cell::{Cell, CellCmd, CircId};

/// Weight past which all values are rescaled (2^30: with a 30 s half-life, every 15 minutes).
pub const RESCALE_AT: f64 = (1u64 << 30) as f64;
/// An idle circuit whose average is below this many cells is forgotten on rescale.
const FORGET_BELOW: f64 = 0.01;

/// Parameters of a [`CircuitMux`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxConfig {
    /// Time for a circuit's past activity to count half as much (Tor: 30 s).
    pub half_life: Duration,
    /// Granularity of the decay: cells sent within one tick weigh the same.
    pub tick: Duration,
    /// Most cells queued per circuit.
    pub circ_cap: usize,
    /// Most cells queued on the link in all (see [`MuxConfig::reserve`]).
    pub total_cap: usize,
    /// Cells a group (an ungrouped circuit: the circuit) may always queue, even when the link is
    /// at `total_cap` (see the module docs for the fair share it may queue beyond).
    pub reserve: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            half_life: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            circ_cap: 128,
            total_cap: 512,
            reserve: 4,
        }
    }
}

/// The scheduling group of a circuit: the circuits of one group share the link as much as one
/// circuit does against the other groups (see the module docs). An opaque key; a relay derives
/// it from the previous hop's client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CircGroup(pub u128);

/// Why a push was refused; the cell comes back with it.
#[derive(Debug)]
pub enum Refused {
    /// The circuit's own queue is full.
    CircuitFull(Cell),
    /// The link's queue is full.
    LinkFull(Cell),
}

impl Refused {
    /// The refused cell.
    pub fn into_cell(self) -> Cell {
        match self {
            Self::CircuitFull(c) | Self::LinkFull(c) => c,
        }
    }
}

/// A total order on the (finite, non-negative) values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A heap entry: smallest value first, ties by push order; the last field indexes a slot (in a
/// group's heap) or a group (in the link's heap).
type Entry = Reverse<(Key, u64, usize)>;

/// One circuit's state.
#[derive(Debug)]
struct Slot {
    id: CircId,
    queue: VecDeque<Cell>,
    /// Cells sent, weighted by when (see the module docs), in epoch units.
    value: f64,
    /// Whether the slot is in its group's heap (it is iff its queue is not empty).
    in_heap: bool,
    /// A free slot (its circuit was forgotten).
    free: bool,
    /// Index of its group in [`CircuitMux::groups`].
    group: usize,
}

/// One group's state.
#[derive(Debug)]
struct Group {
    /// `None`: the group of one ungrouped circuit.
    key: Option<CircGroup>,
    /// Cells its circuits sent, weighted as the circuits' values.
    value: f64,
    /// Its circuits with queued cells (it is in the link's heap iff this is not empty).
    heap: BinaryHeap<Entry>,
    /// Circuits remembered in this group; at 0 the group is forgotten.
    members: usize,
    /// Cells queued by its circuits.
    queued: usize,
    /// A free entry (the group was forgotten).
    free: bool,
}

/// The per-link scheduler (see the module docs).
#[derive(Debug)]
pub struct CircuitMux {
    cfg: MuxConfig,
    by_id: HashMap<CircId, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The named groups, by key.
    by_group: HashMap<CircGroup, usize>,
    groups: Vec<Group>,
    free_groups: Vec<usize>,
    /// Groups with queued cells, smallest value first; ties by push order.
    heap: BinaryHeap<Entry>,
    seq: u64,
    /// Cells without a circuit (link PADDING): sent first.
    control: VecDeque<Cell>,
    queued: usize,
    /// Cells sent from circuits of named groups (statistics).
    grouped_sent: u64,
    /// Start of tick 0, set by the first pop.
    epoch: Option<Instant>,
    /// The tick of the cached weight, and the weight of a cell sent in it.
    tick: u64,
    weight: f64,
}

impl CircuitMux {
    /// An empty scheduler.
    pub fn new(cfg: MuxConfig) -> Self {
        let cfg = MuxConfig {
            half_life: cfg.half_life.max(Duration::from_millis(1)),
            tick: cfg.tick.max(Duration::from_millis(1)),
            circ_cap: cfg.circ_cap.max(1),
            total_cap: cfg.total_cap.max(1),
            reserve: cfg.reserve.min(cfg.circ_cap.max(1)),
        };
        Self {
            cfg,
            by_id: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_group: HashMap::new(),
            groups: Vec::new(),
            free_groups: Vec::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            control: VecDeque::new(),
            queued: 0,
            grouped_sent: 0,
            epoch: None,
            tick: 0,
            weight: 1.0,
        }
    }

    /// The parameters in use.
    pub fn config(&self) -> MuxConfig {
        self.cfg
    }

    /// Cells queued in all.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Cells queued for circuit `id`.
    pub fn queued_for(&self, id: CircId) -> usize {
        self.by_id
            .get(&id)
            .and_then(|&i| self.slots.get(i))
            .map_or(0, |s| s.queue.len())
    }

    /// Circuits the scheduler remembers (queued cells or recent activity).
    pub fn n_circuits(&self) -> usize {
        self.by_id.len()
    }

    /// Named groups the scheduler remembers (each has at least one circuit remembered;
    /// ungrouped circuits are not counted).
    pub fn n_groups(&self) -> usize {
        self.by_group.len()
    }

    /// Cells sent so far by circuits that belong to a named group.
    pub fn grouped_sent(&self) -> u64 {
        self.grouped_sent
    }

    /// The group circuit `id` is scheduled in (`None`: ungrouped, or not remembered).
    pub fn group_of(&self, id: CircId) -> Option<CircGroup> {
        let slot = self.slots.get(*self.by_id.get(&id)?)?;
        self.groups.get(slot.group)?.key
    }

    /// Whether a cell for `circ` (`None`: link control) would be accepted now (a circuit not
    /// seen yet: as an ungrouped one).
    pub fn has_room(&self, circ: Option<CircId>) -> bool {
        let link_full = self.queued >= self.cfg.total_cap;
        let Some(id) = circ else {
            return !link_full || self.control.len() < self.cfg.reserve;
        };
        match self.by_id.get(&id).and_then(|&i| self.slots.get(i)) {
            Some(s) => s.queue.len() < self.cfg.circ_cap && (!link_full || self.admits(s.group)),
            // A new circuit is a new group, with nothing queued.
            None => !link_full || self.admits(usize::MAX),
        }
    }

    /// With the link at its cap: whether group `gi` (an unknown index: a new group) may queue
    /// one more cell (see the module docs).
    fn admits(&self, gi: usize) -> bool {
        let mine = self.groups.get(gi).map_or(0, |g| g.queued);
        if mine < self.cfg.reserve {
            return true;
        }
        if self.queued >= 2 * self.cfg.total_cap {
            return false;
        }
        // The heap holds each group with cells queued once.
        let active = self.heap.len() + usize::from(mine == 0);
        mine < self.cfg.total_cap / active.max(1)
    }

    /// The current exponentially weighted cell count of circuit `id` (cells; decayed to the
    /// last tick seen by [`CircuitMux::pop`]).
    pub fn ewma(&self, id: CircId) -> f64 {
        self.by_id
            .get(&id)
            .and_then(|&i| self.slots.get(i))
            .map_or(0.0, |s| s.value / self.weight)
    }

    /// As [`CircuitMux::ewma`], for a named group (all its circuits together).
    pub fn group_ewma(&self, group: CircGroup) -> f64 {
        self.by_group
            .get(&group)
            .and_then(|&i| self.groups.get(i))
            .map_or(0.0, |g| g.value / self.weight)
    }

    /// Queue `cell` behind its circuit's earlier cells; refused (cell handed back) if its
    /// circuit's queue or the link's is full. A circuit first seen here is ungrouped; one seen
    /// with [`CircuitMux::push_in`] keeps its group.
    pub fn push(&mut self, cell: Cell) -> Result<(), Refused> {
        self.push_in(cell, None)
    }

    /// As [`CircuitMux::push`], with the circuit's group: `Some` puts the circuit in that group
    /// (from this cell on if it is new, once its queue is empty if it was in another group),
    /// `None` leaves it where it is. Passing the group with every cell costs one comparison and
    /// keeps it right after the circuit was forgotten for being idle.
    pub fn push_in(&mut self, cell: Cell, group: Option<CircGroup>) -> Result<(), Refused> {
        let link_full = self.queued >= self.cfg.total_cap;
        let Some(id) = cell.circ_id else {
            if link_full && self.control.len() >= self.cfg.reserve {
                return Err(Refused::LinkFull(cell));
            }
            self.control.push_back(cell);
            self.queued += 1;
            return Ok(());
        };
        let idx = match self.by_id.get(&id) {
            Some(&i) => {
                if let Some(g) = group {
                    self.regroup(i, g);
                }
                i
            }
            None => self.new_slot(id, group),
        };
        let Some(slot) = self.slots.get(idx) else {
            return Err(Refused::LinkFull(cell));
        };
        if link_full && !self.admits(slot.group) {
            // A new slot stays (empty, not in a heap) until the next rescale forgets it.
            return Err(Refused::LinkFull(cell));
        }
        let Some(slot) = self.slots.get_mut(idx) else {
            return Err(Refused::LinkFull(cell));
        };
        if slot.queue.len() >= self.cfg.circ_cap {
            return Err(Refused::CircuitFull(cell));
        }
        slot.queue.push_back(cell);
        self.queued += 1;
        let Some(g) = self.groups.get_mut(slot.group) else {
            return Ok(());
        };
        g.queued += 1;
        if !slot.in_heap {
            slot.in_heap = true;
            let key = Key(slot.value);
            self.seq += 1;
            if g.heap.is_empty() {
                self.heap
                    .push(Reverse((Key(g.value), self.seq, slot.group)));
            }
            g.heap.push(Reverse((key, self.seq, idx)));
        }
        Ok(())
    }

    fn new_slot(&mut self, id: CircId, group: Option<CircGroup>) -> usize {
        let gi = self.join_group(group);
        let slot = Slot {
            id,
            queue: VecDeque::new(),
            value: 0.0,
            in_heap: false,
            free: false,
            group: gi,
        };
        let idx = if let Some(i) = self.free.pop()
            && let Some(s) = self.slots.get_mut(i)
        {
            *s = slot;
            i
        } else {
            self.slots.push(slot);
            self.slots.len() - 1
        };
        self.by_id.insert(id, idx);
        idx
    }

    /// The index of group `key` (a new group of one for `None`), counting one more member.
    fn join_group(&mut self, key: Option<CircGroup>) -> usize {
        if let Some(k) = key
            && let Some(&gi) = self.by_group.get(&k)
            && let Some(g) = self.groups.get_mut(gi)
        {
            g.members += 1;
            return gi;
        }
        let group = Group {
            key,
            value: 0.0,
            heap: BinaryHeap::new(),
            members: 1,
            queued: 0,
            free: false,
        };
        let gi = if let Some(i) = self.free_groups.pop()
            && let Some(g) = self.groups.get_mut(i)
        {
            *g = group;
            i
        } else {
            self.groups.push(group);
            self.groups.len() - 1
        };
        if let Some(k) = key {
            self.by_group.insert(k, gi);
        }
        gi
    }

    /// One member of group `gi` is gone; forget the group with its last one.
    fn leave_group(&mut self, gi: usize) {
        let Some(g) = self.groups.get_mut(gi) else {
            return;
        };
        g.members = g.members.saturating_sub(1);
        if g.members > 0 {
            return;
        }
        // Its circuits were all idle (a forgotten circuit has nothing queued): not in the heap.
        if let Some(k) = g.key.take() {
            self.by_group.remove(&k);
        }
        g.heap = BinaryHeap::new();
        g.value = 0.0;
        g.free = true;
        self.free_groups.push(gi);
    }

    /// Move circuit `idx` into group `key` if it is elsewhere and has nothing queued (its cells
    /// queued in its old group's heap stay there until sent; the move waits for the next push).
    fn regroup(&mut self, idx: usize, key: CircGroup) {
        let Some(slot) = self.slots.get(idx) else {
            return;
        };
        let old = slot.group;
        if slot.in_heap || self.groups.get(old).is_some_and(|g| g.key == Some(key)) {
            return;
        }
        self.leave_group(old);
        let gi = self.join_group(Some(key));
        if let Some(s) = self.slots.get_mut(idx) {
            s.group = gi;
        }
    }

    /// The next cell to send at `now`: link control cells first, then the head of the circuit
    /// with the lowest EWMA in the group with the lowest EWMA; both are charged one cell.
    pub fn pop(&mut self, now: Instant) -> Option<Cell> {
        if let Some(c) = self.control.pop_front() {
            self.queued -= 1;
            return Some(c);
        }
        self.advance(now);
        let weight = self.weight;
        // A group is in the heap iff it has a circuit with cells queued: the loop only guards
        // against a broken invariant (it would otherwise stall the link).
        let (gi, idx) = loop {
            let Reverse((_, _, gi)) = self.heap.pop()?;
            if let Some(Reverse((_, _, idx))) = self.groups.get_mut(gi).and_then(|g| g.heap.pop()) {
                break (gi, idx);
            }
        };
        let g = self.groups.get_mut(gi)?;
        let slot = self.slots.get_mut(idx)?;
        let cell = slot.queue.pop_front()?;
        self.queued -= 1;
        g.queued = g.queued.saturating_sub(1);
        slot.value += weight;
        g.value += weight;
        if g.key.is_some() {
            self.grouped_sent += 1;
        }
        self.seq += 1;
        if slot.queue.is_empty() {
            slot.in_heap = false;
        } else {
            g.heap.push(Reverse((Key(slot.value), self.seq, idx)));
        }
        if !g.heap.is_empty() {
            self.heap.push(Reverse((Key(g.value), self.seq, gi)));
        }
        if !slot.in_heap && cell.cmd == CellCmd::DESTROY {
            // The circuit is over on this link: forget it (a new one may reuse the id).
            let id = slot.id;
            self.forget(idx, id);
        }
        Some(cell)
    }

    fn forget(&mut self, idx: usize, id: CircId) {
        self.by_id.remove(&id);
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        s.queue = VecDeque::new();
        s.free = true;
        s.value = 0.0;
        let gi = s.group;
        self.free.push(idx);
        self.leave_group(gi);
    }

    /// Move the cached weight to the tick of `now`, rescaling everything when it grows large.
    fn advance(&mut self, now: Instant) {
        let epoch = *self.epoch.get_or_insert(now);
        let elapsed = now.saturating_duration_since(epoch);
        let tick =
            u64::try_from(elapsed.as_nanos() / self.cfg.tick.as_nanos().max(1)).unwrap_or(u64::MAX);
        if tick <= self.tick {
            return;
        }
        let per_tick = self.cfg.tick.as_secs_f64() / self.cfg.half_life.as_secs_f64();
        // Exact up to f64 precision, whatever the gap (a link idle for hours included).
        let exp = (tick as f64) * per_tick;
        if exp >= RESCALE_AT.log2() {
            self.rescale(now, exp);
        } else {
            self.tick = tick;
            self.weight = exp.exp2();
        }
    }

    /// Divide every value by the weight of the tick of `now` (`2^exp`) and restart the epoch
    /// there; forget idle circuits whose average fell below [`FORGET_BELOW`] (and the groups
    /// they leave empty).
    fn rescale(&mut self, now: Instant, exp: f64) {
        let factor = (-exp).exp2();
        let mut forget = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.free {
                continue;
            }
            s.value *= factor;
            if !s.in_heap && s.value < FORGET_BELOW {
                forget.push((i, s.id));
            }
        }
        for (i, id) in forget {
            self.forget(i, id);
        }
        for g in self.groups.iter_mut().filter(|g| !g.free) {
            g.value *= factor;
            if !g.heap.is_empty() {
                let mut entries = std::mem::take(&mut g.heap).into_vec();
                for Reverse((key, _, idx)) in &mut entries {
                    if let Some(s) = self.slots.get(*idx) {
                        *key = Key(s.value);
                    }
                }
                g.heap = BinaryHeap::from(entries);
            }
        }
        let mut entries = std::mem::take(&mut self.heap).into_vec();
        for Reverse((key, _, gi)) in &mut entries {
            if let Some(g) = self.groups.get(*gi) {
                *key = Key(g.value);
            }
        }
        self.heap = BinaryHeap::from(entries);
        self.epoch = Some(now);
        self.tick = 0;
        self.weight = 1.0;
    }
}

#[cfg(test)]
#[path = "circmux_tests.rs"]
mod tests;
