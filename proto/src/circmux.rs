//! The circuit scheduler of a link: per-circuit outgoing queues, drained lowest-EWMA first.
//!
//! Every circuit on a link keeps its own bounded queue of outgoing cells. When the link's writer
//! has room it asks [`CircuitMux::pop`] for the next cell, which comes from the circuit with the
//! smallest exponentially weighted moving average of cells recently sent (Tor's circuitmux EWMA
//! policy, `circuitmux_ewma.c` / tor-spec "circuit priority"). A bulk circuit's average grows with
//! every cell it sends, so a circuit that sends little (interactive traffic) goes first whenever
//! it has a cell queued, and two bulk circuits alternate. Old activity decays with a half-life
//! ([`MuxConfig::half_life`], 30 s by default), counted in whole ticks ([`MuxConfig::tick`]).
//!
//! How the decay stays cheap: instead of scaling every circuit's average down at every tick,
//! a cell sent in tick `k` (counted from the epoch) adds `2^(k * tick / half_life)` to its
//! circuit's value. All values share that scale, so comparing them compares the true averages,
//! and a circuit's value only changes when it sends. When the weight grows past
//! [`RESCALE_AT`], every value is divided by it and the epoch moves to the current tick (one pass
//! over the circuits, every ~16 minutes with the defaults); idle circuits whose average decayed
//! below a hundredth of a cell are forgotten then.
//!
//! Invariants (the writer relies on them):
//! - Cells of one circuit leave in the order they were pushed; cells without a circuit
//!   (link PADDING) leave before any circuit cell.
//! - At most [`MuxConfig::circ_cap`] cells wait per circuit and [`MuxConfig::total_cap`] in all;
//!   a push beyond either is refused and the cell handed back (the sender waits for room). A
//!   circuit with fewer than [`MuxConfig::reserve`] cells queued (and link control) may exceed
//!   the link's cap, so that bulk circuits filling the link cannot keep a light one out of it:
//!   the link holds at most `total_cap + reserve` per circuit.
//! - A circuit's entry is dropped once its DESTROY has left, and idle entries are dropped on
//!   rescale, so the table holds only circuits that sent recently.
//! - No allocation per cell: queues keep their capacity while the circuit lives; the heap and
//!   the slot table grow only with the number of circuits.
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
    /// Cells a circuit may always queue, even when the link is at `total_cap`.
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

/// One circuit's state.
#[derive(Debug)]
struct Slot {
    id: CircId,
    queue: VecDeque<Cell>,
    /// Cells sent, weighted by when (see the module docs), in epoch units.
    value: f64,
    /// Whether the slot is in the heap (it is iff its queue is not empty).
    in_heap: bool,
    /// A free slot (its circuit was forgotten).
    free: bool,
}

/// The per-link scheduler (see the module docs).
#[derive(Debug)]
pub struct CircuitMux {
    cfg: MuxConfig,
    by_id: HashMap<CircId, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Circuits with queued cells, smallest value first; ties by push order.
    heap: BinaryHeap<Reverse<(Key, u64, usize)>>,
    seq: u64,
    /// Cells without a circuit (link PADDING): sent first.
    control: VecDeque<Cell>,
    queued: usize,
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
            heap: BinaryHeap::new(),
            seq: 0,
            control: VecDeque::new(),
            queued: 0,
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

    /// Whether a cell for `circ` (`None`: link control) would be accepted now.
    pub fn has_room(&self, circ: Option<CircId>) -> bool {
        let mine = match circ {
            Some(id) => self.queued_for(id),
            None => self.control.len(),
        };
        if self.queued >= self.cfg.total_cap && mine >= self.cfg.reserve {
            return false;
        }
        circ.is_none() || mine < self.cfg.circ_cap
    }

    /// The current exponentially weighted cell count of circuit `id` (cells; decayed to the
    /// last tick seen by [`CircuitMux::pop`]).
    pub fn ewma(&self, id: CircId) -> f64 {
        self.by_id
            .get(&id)
            .and_then(|&i| self.slots.get(i))
            .map_or(0.0, |s| s.value / self.weight)
    }

    /// Queue `cell` behind its circuit's earlier cells; refused (cell handed back) if its
    /// circuit's queue or the link's is full.
    pub fn push(&mut self, cell: Cell) -> Result<(), Refused> {
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
            Some(&i) => i,
            None => self.new_slot(id),
        };
        let Some(slot) = self.slots.get_mut(idx) else {
            return Err(Refused::LinkFull(cell));
        };
        if link_full && slot.queue.len() >= self.cfg.reserve {
            // A new slot stays (empty, not in the heap) until the next rescale forgets it.
            return Err(Refused::LinkFull(cell));
        }
        if slot.queue.len() >= self.cfg.circ_cap {
            return Err(Refused::CircuitFull(cell));
        }
        slot.queue.push_back(cell);
        self.queued += 1;
        if !slot.in_heap {
            slot.in_heap = true;
            let key = Key(slot.value);
            self.seq += 1;
            self.heap.push(Reverse((key, self.seq, idx)));
        }
        Ok(())
    }

    fn new_slot(&mut self, id: CircId) -> usize {
        let slot = Slot {
            id,
            queue: VecDeque::new(),
            value: 0.0,
            in_heap: false,
            free: false,
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

    /// The next cell to send at `now`: link control cells first, then the head of the circuit
    /// with the lowest EWMA, which is charged one cell.
    pub fn pop(&mut self, now: Instant) -> Option<Cell> {
        if let Some(c) = self.control.pop_front() {
            self.queued -= 1;
            return Some(c);
        }
        self.advance(now);
        let Reverse((_, _, idx)) = self.heap.pop()?;
        let weight = self.weight;
        let slot = self.slots.get_mut(idx)?;
        let cell = slot.queue.pop_front()?;
        self.queued -= 1;
        slot.value += weight;
        if slot.queue.is_empty() {
            slot.in_heap = false;
            if cell.cmd == CellCmd::DESTROY {
                // The circuit is over on this link: forget it (a new one may reuse the id).
                let id = slot.id;
                self.forget(idx, id);
            }
        } else {
            let key = Key(slot.value);
            self.seq += 1;
            self.heap.push(Reverse((key, self.seq, idx)));
        }
        Some(cell)
    }

    fn forget(&mut self, idx: usize, id: CircId) {
        self.by_id.remove(&id);
        if let Some(s) = self.slots.get_mut(idx) {
            s.queue = VecDeque::new();
            s.free = true;
            s.value = 0.0;
        }
        self.free.push(idx);
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
    /// there; forget idle circuits whose average fell below [`FORGET_BELOW`].
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
        let mut entries = std::mem::take(&mut self.heap).into_vec();
        for Reverse((key, _, idx)) in &mut entries {
            if let Some(s) = self.slots.get(*idx) {
                *key = Key(s.value);
            }
        }
        self.heap = BinaryHeap::from(entries);
        self.epoch = Some(now);
        self.tick = 0;
        self.weight = 1.0;
    }
}

#[cfg(test)]
mod tests {
    // A fixed origin for simulated time; the clock itself is never read again.
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::cell::DestroyReason;

    fn id(n: u32) -> CircId {
        CircId::new(n).unwrap()
    }

    fn cell(n: u32, tag: u8) -> Cell {
        let mut c = Cell::new_zeroed(Some(id(n)), CellCmd::RELAY);
        c.body[0] = tag;
        c
    }

    fn mux() -> CircuitMux {
        CircuitMux::new(MuxConfig {
            circ_cap: 10_000,
            total_cap: 100_000,
            ..MuxConfig::default()
        })
    }

    fn circ_of(c: &Cell) -> u32 {
        c.circ_id.unwrap().get()
    }

    #[test]
    fn two_backlogged_circuits_share_equally() {
        let mut m = mux();
        let t0 = Instant::now();
        for _ in 0..1000 {
            m.push(cell(1, 0)).unwrap();
            m.push(cell(2, 0)).unwrap();
        }
        let mut counts = [0usize; 3];
        for i in 0..1000u64 {
            let c = m.pop(t0 + Duration::from_millis(i)).unwrap();
            counts[circ_of(&c) as usize] += 1;
        }
        assert!(counts[1].abs_diff(counts[2]) <= 1, "{counts:?}");
    }

    #[test]
    fn interactive_cell_overtakes_a_bulk_backlog() {
        let mut m = mux();
        let t0 = Instant::now();
        // A bulk circuit keeps its queue full for 100 simulated seconds; an interactive one
        // sends one cell every 200 ms. Each interactive cell must go out next.
        let mut now = t0;
        let mut waited = Vec::new();
        for _ in 0..500 {
            while m.queued_for(id(1)) < 64 {
                m.push(cell(1, 0)).unwrap();
            }
            m.push(cell(2, 1)).unwrap();
            let mut pops = 0;
            loop {
                let c = m.pop(now).unwrap();
                pops += 1;
                if circ_of(&c) == 2 {
                    break;
                }
            }
            waited.push(pops);
            // The link carries 100 bulk cells between two interactive cells.
            for _ in 0..100 {
                while m.queued_for(id(1)) < 64 {
                    m.push(cell(1, 0)).unwrap();
                }
                assert_eq!(circ_of(&m.pop(now).unwrap()), 1);
            }
            now += Duration::from_millis(200);
        }
        // At the very start neither has a history (the bulk circuit queued first goes first);
        // from then on the interactive cell is always next.
        assert!(waited[0] <= 2);
        assert!(waited[1..].iter().all(|&p| p == 1), "{waited:?}");
    }

    #[test]
    fn order_within_a_circuit_is_kept_and_control_goes_first() {
        let mut m = mux();
        let t0 = Instant::now();
        for tag in 0..50u8 {
            m.push(cell(7, tag)).unwrap();
            m.push(cell(9, tag)).unwrap();
        }
        m.push(Cell::padding()).unwrap();
        assert_eq!(m.pop(t0).unwrap().cmd, CellCmd::PADDING);
        let mut next = [0u8; 10];
        while let Some(c) = m.pop(t0) {
            let k = circ_of(&c) as usize;
            assert_eq!(c.body[0], next[k]);
            next[k] += 1;
        }
        assert_eq!((next[7], next[9]), (50, 50));
        assert!(m.is_empty());
    }

    #[test]
    fn history_decays_with_the_half_life() {
        let mut m = mux();
        let t0 = Instant::now();
        // Circuit 1 sent 1000 cells at t0, circuit 2 sent 10.
        for _ in 0..1000 {
            m.push(cell(1, 0)).unwrap();
        }
        for _ in 0..10 {
            m.push(cell(2, 0)).unwrap();
        }
        while m.pop(t0).is_some() {}
        assert!((m.ewma(id(1)) - 1000.0).abs() < 1e-6);
        // Right away, circuit 2 is preferred.
        m.push(cell(1, 0)).unwrap();
        m.push(cell(2, 0)).unwrap();
        assert_eq!(circ_of(&m.pop(t0).unwrap()), 2);
        assert_eq!(circ_of(&m.pop(t0).unwrap()), 1);
        // Five half-lives later circuit 1 counts for 1001/32 ≈ 31 cells; circuit 2 sends 40
        // then, and now circuit 1 is preferred.
        let later = t0 + 5 * Duration::from_secs(30);
        for _ in 0..40 {
            m.push(cell(2, 0)).unwrap();
        }
        for _ in 0..40 {
            assert_eq!(circ_of(&m.pop(later).unwrap()), 2);
        }
        let e1 = m.ewma(id(1));
        assert!((e1 - 1001.0 / 32.0).abs() < 0.01, "{e1}");
        m.push(cell(1, 0)).unwrap();
        m.push(cell(2, 0)).unwrap();
        assert_eq!(circ_of(&m.pop(later).unwrap()), 1);
    }

    #[test]
    fn caps_refuse_and_hand_the_cell_back() {
        let mut m = CircuitMux::new(MuxConfig {
            circ_cap: 3,
            total_cap: 5,
            reserve: 1,
            ..MuxConfig::default()
        });
        for _ in 0..3 {
            m.push(cell(1, 0)).unwrap();
        }
        assert!(!m.has_room(Some(id(1))));
        assert!(matches!(m.push(cell(1, 4)), Err(Refused::CircuitFull(c)) if c.body[0] == 4));
        m.push(cell(2, 0)).unwrap();
        m.push(cell(3, 0)).unwrap();
        // The link is at its cap: circuits 2 and 3 have their reserve queued already...
        assert!(!m.has_room(Some(id(2))));
        assert!(matches!(m.push(cell(2, 0)), Err(Refused::LinkFull(_))));
        // ...but a circuit with nothing queued still gets its one reserved cell in, and so does
        // one control cell.
        assert!(m.has_room(Some(id(4))));
        m.push(cell(4, 0)).unwrap();
        assert!(matches!(m.push(cell(4, 0)), Err(Refused::LinkFull(_))));
        m.push(Cell::padding()).unwrap();
        assert!(matches!(m.push(Cell::padding()), Err(Refused::LinkFull(_))));
        assert_eq!(m.len(), 7);
        m.pop(Instant::now()).unwrap();
        m.pop(Instant::now()).unwrap();
        m.pop(Instant::now()).unwrap();
        assert!(m.has_room(Some(id(2))));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn table_stays_bounded_over_hours_of_churn() {
        let mut m = mux();
        let t0 = Instant::now();
        // 20 000 circuits over ten simulated hours, each sends 5 cells and half end with a
        // DESTROY; the table may only hold the recently active ones.
        let mut max_known = 0;
        for n in 1..=20_000u32 {
            let now = t0 + Duration::from_millis(u64::from(n) * 1800);
            for _ in 0..5 {
                m.push(cell(n, 0)).unwrap();
            }
            if n % 2 == 0 {
                m.push(Cell::destroy(id(n), DestroyReason::NONE)).unwrap();
            }
            while m.pop(now).is_some() {}
            max_known = max_known.max(m.n_circuits());
        }
        // Idle circuits are forgotten once their average is below 0.01 cells: about
        // log2(500) = 9 half-lives = 270 s = 150 circuits at this rate; rescales happen every
        // 15 min, so up to ~650 are remembered, never the 20 000.
        assert!(max_known < 1000, "{max_known}");
        assert!(m.slots.len() < 1000, "{}", m.slots.len());
    }

    #[test]
    fn rescale_keeps_the_order() {
        let mut m = mux();
        let t0 = Instant::now();
        let hl = Duration::from_secs(30);
        m.push(cell(3, 0)).unwrap();
        m.pop(t0).unwrap();
        // 29 half-lives on (weight 2^29, no rescale yet) circuit 1 sends 30 cells, circuit 2 10.
        let t1 = t0 + 29 * hl;
        for _ in 0..30 {
            m.push(cell(1, 0)).unwrap();
        }
        for _ in 0..10 {
            m.push(cell(2, 0)).unwrap();
        }
        while m.pop(t1).is_some() {}
        assert!((m.ewma(id(1)) - 30.0).abs() < 1e-6);
        // Two more half-lives: the weight passes 2^30 and everything is rescaled. The averages
        // are 7.5 and 2.5 cells, circuit 3 (idle since t0) is forgotten, the order holds.
        let t2 = t1 + 2 * hl;
        m.push(cell(1, 0)).unwrap();
        m.push(cell(2, 0)).unwrap();
        assert_eq!(circ_of(&m.pop(t2).unwrap()), 2);
        assert_eq!(circ_of(&m.pop(t2).unwrap()), 1);
        assert_eq!(m.tick, 0);
        assert!((m.ewma(id(1)) - 8.5).abs() < 1e-6, "{}", m.ewma(id(1)));
        assert_eq!(m.n_circuits(), 2);
    }
}
