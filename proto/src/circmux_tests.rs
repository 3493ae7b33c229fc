//! Tests of the circuit scheduler, in simulated time.

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

const G1: CircGroup = CircGroup(1);
const G2: CircGroup = CircGroup(2);

/// Pops `n` cells, one per simulated millisecond from `t0`; counts them by circuit.
fn pop_counts(m: &mut CircuitMux, t0: Instant, n: u64) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let c = m.pop(t0 + Duration::from_millis(i)).unwrap();
        *counts.entry(circ_of(&c)).or_insert(0) += 1;
    }
    counts
}

/// The share of the cells of circuits `circs` in `counts`.
fn share(counts: &HashMap<u32, usize>, circs: impl IntoIterator<Item = u32>) -> f64 {
    let total: usize = counts.values().sum();
    let mine: usize = circs.into_iter().filter_map(|c| counts.get(&c)).sum();
    mine as f64 / total as f64
}

/// 50 busy circuits of one group against one busy ungrouped circuit, over 10 000 pops: the lone
/// circuit gets half the link. Without the group it gets 1/51 of it.
#[test]
fn one_busy_group_gets_what_one_busy_circuit_gets() {
    for grouped in [true, false] {
        let mut m = mux();
        let t0 = Instant::now();
        for n in 1..=50 {
            for _ in 0..250 {
                m.push_in(cell(n, 0), grouped.then_some(G1)).unwrap();
            }
        }
        for _ in 0..6000 {
            m.push(cell(100, 0)).unwrap();
        }
        let counts = pop_counts(&mut m, t0, 10_000);
        let lone = share(&counts, [100]);
        if grouped {
            assert!((0.45..=0.55).contains(&lone), "{lone}");
            assert_eq!(m.n_groups(), 1);
            assert_eq!(m.group_of(id(7)), Some(G1));
            assert_eq!(m.group_of(id(100)), None);
            assert_eq!(m.grouped_sent(), (10_000 - counts[&100]) as u64);
            // The group's average is the sum of its circuits'.
            let sum: f64 = (1..=50).map(|n| m.ewma(id(n))).sum();
            assert!((m.group_ewma(G1) - sum).abs() < 1e-6 * sum);
        } else {
            assert!(lone < 0.03, "{lone}");
            assert_eq!((m.n_groups(), m.grouped_sent()), (0, 0));
        }
    }
}

/// A group of 10 circuits, a group of 3 and an ungrouped circuit, all busy, get a third each.
#[test]
fn groups_of_different_sizes_share_equally() {
    let mut m = mux();
    let t0 = Instant::now();
    for n in 1..=10 {
        for _ in 0..1000 {
            m.push_in(cell(n, 0), Some(G1)).unwrap();
        }
    }
    for n in 11..=13 {
        for _ in 0..2000 {
            m.push_in(cell(n, 0), Some(G2)).unwrap();
        }
    }
    for _ in 0..4000 {
        m.push(cell(20, 0)).unwrap();
    }
    let counts = pop_counts(&mut m, t0, 9000);
    for part in [
        share(&counts, 1..=10),
        share(&counts, 11..=13),
        share(&counts, [20]),
    ] {
        assert!((part - 1.0 / 3.0).abs() < 0.01, "{counts:?}");
    }
    // Within a group, its circuits share equally too.
    let g2: Vec<usize> = (11..=13).map(|n| counts[&n]).collect();
    assert!(
        g2.iter().max().unwrap() - g2.iter().min().unwrap() <= 1,
        "{g2:?}"
    );
}

/// A group of 50 bulk circuits and one interactive circuit shares the link with an ungrouped
/// bulk circuit: the group gets every other cell, and the interactive circuit's cell is the
/// next its group sends, so it waits at most two pops.
#[test]
fn interactive_circuit_in_a_big_group_goes_before_its_bulk() {
    let mut m = mux();
    let t0 = Instant::now();
    let refill = |m: &mut CircuitMux| {
        for n in 1..=50 {
            while m.queued_for(id(n)) < 8 {
                m.push_in(cell(n, 0), Some(G1)).unwrap();
            }
        }
        while m.queued_for(id(100)) < 64 {
            m.push(cell(100, 0)).unwrap();
        }
    };
    let mut now = t0;
    let mut waited = Vec::new();
    let mut sent = HashMap::new();
    for _ in 0..200 {
        refill(&mut m);
        m.push_in(cell(60, 1), Some(G1)).unwrap();
        let mut pops = 0;
        loop {
            let c = m.pop(now).unwrap();
            pops += 1;
            if circ_of(&c) == 60 {
                break;
            }
        }
        waited.push(pops);
        for _ in 0..100 {
            refill(&mut m);
            let c = m.pop(now).unwrap();
            *sent.entry(circ_of(&c) == 100).or_insert(0usize) += 1;
        }
        now += Duration::from_millis(200);
    }
    assert!(waited[1..].iter().all(|&p| p <= 2), "{waited:?}");
    // Meanwhile the lone bulk circuit had half the link.
    assert!(sent[&true].abs_diff(sent[&false]) <= 200, "{sent:?}");
}

/// A circuit in a named group of its own is scheduled exactly as an ungrouped one: the same
/// pseudo-random pushes and pops, across a rescale, give the same cells in the same order.
#[test]
fn singleton_groups_order_like_ungrouped_circuits() {
    fn run(grouped: bool) -> Vec<(u32, u8)> {
        let mut m = mux();
        let t0 = Instant::now();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut out = Vec::new();
        let mut tags = [0u8; 21];
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_millis(step * 150);
            for _ in 0..next() % 4 {
                let n = (next() % 20 + 1) as u32;
                let g = grouped.then_some(CircGroup(u128::from(n) << 64));
                let t = &mut tags[n as usize];
                *t = t.wrapping_add(1);
                m.push_in(cell(n, *t), g).unwrap();
            }
            for _ in 0..next() % 4 {
                if let Some(c) = m.pop(now) {
                    out.push((circ_of(&c), c.body[0]));
                }
            }
        }
        out
    }
    let ungrouped = run(false);
    // 50 minutes of simulated time: at least two rescales happened.
    assert!(ungrouped.len() > 20_000);
    assert_eq!(ungrouped, run(true));
}

/// A group is forgotten with its last circuit: DESTROY, or idle past a rescale. Over hours of
/// churn with circuits in 5000 different groups, only the recent ones are remembered.
#[test]
fn groups_are_forgotten_with_their_last_circuit() {
    let mut m = mux();
    let t0 = Instant::now();
    for n in 1..=3 {
        m.push_in(cell(n, 0), Some(G1)).unwrap();
    }
    while m.pop(t0).is_some() {}
    for n in 1..=3 {
        assert_eq!(m.n_groups(), 1);
        m.push_in(Cell::destroy(id(n), DestroyReason::NONE), Some(G1))
            .unwrap();
        while m.pop(t0).is_some() {}
    }
    assert_eq!((m.n_groups(), m.n_circuits()), (0, 0));
    assert_eq!(m.group_ewma(G1), 0.0);

    let mut max_groups = 0;
    for n in 1..=20_000u32 {
        let now = t0 + Duration::from_millis(u64::from(n) * 1800);
        let g = Some(CircGroup(u128::from(n % 5000)));
        for _ in 0..5 {
            m.push_in(cell(n, 0), g).unwrap();
        }
        if n % 2 == 0 {
            m.push_in(Cell::destroy(id(n), DestroyReason::NONE), g)
                .unwrap();
        }
        while m.pop(now).is_some() {}
        max_groups = max_groups.max(m.n_groups());
    }
    // As for circuits (`table_stays_bounded_over_hours_of_churn`): a few hundred, not 5000.
    assert!(max_groups < 1000, "{max_groups}");
    assert!(m.groups.len() < 1000, "{}", m.groups.len());
}

/// A group whose circuits have nothing queued (held back by their own windows) is out of the
/// heap and takes nothing from the others; it keeps its history, so coming back it does not
/// overtake a group that sent less. A circuit forgotten while idle comes back in its group
/// (the group travels with every push).
#[test]
fn idle_group_keeps_its_history_and_its_circuits() {
    let mut m = mux();
    let t0 = Instant::now();
    for n in 1..=5 {
        for _ in 0..200 {
            m.push_in(cell(n, 0), Some(G1)).unwrap();
        }
    }
    for _ in 0..10 {
        m.push_in(cell(9, 0), Some(G2)).unwrap();
    }
    // G2 has 10 cells, G1 1000: the two alternate until G2 is empty, then G1 alone.
    let order: Vec<u32> = std::iter::from_fn(|| m.pop(t0))
        .map(|c| circ_of(&c))
        .collect();
    assert_eq!(order.len(), 1010);
    assert!(
        order[..20].iter().filter(|&&c| c == 9).count() == 10,
        "{order:?}"
    );
    // G1 is idle now. A new circuit of G1 starts with no history of its own, but its group's
    // history puts it after G2's busy circuit.
    m.push_in(cell(6, 0), Some(G1)).unwrap();
    m.push_in(cell(9, 1), Some(G2)).unwrap();
    assert_eq!(circ_of(&m.pop(t0).unwrap()), 9);
    assert_eq!(circ_of(&m.pop(t0).unwrap()), 6);
    assert!(m.pop(t0).is_none());
    // An hour later every circuit has been forgotten, and with them the groups.
    let later = t0 + Duration::from_secs(3600);
    m.push(cell(50, 0)).unwrap();
    m.pop(later).unwrap();
    assert_eq!(m.n_groups(), 0);
    assert_eq!(m.group_of(id(1)), None);
    m.push_in(cell(1, 0), Some(G1)).unwrap();
    assert_eq!(m.group_of(id(1)), Some(G1));
}

/// A circuit moves to another group only once its queue is empty; its cells keep their order.
#[test]
fn regroup_waits_for_an_empty_queue() {
    let mut m = mux();
    let t0 = Instant::now();
    for tag in 0..3 {
        m.push(cell(1, tag)).unwrap();
    }
    m.push_in(cell(1, 3), Some(G1)).unwrap();
    assert_eq!(m.group_of(id(1)), None);
    let tags: Vec<u8> = std::iter::from_fn(|| m.pop(t0))
        .map(|c| c.body[0])
        .collect();
    assert_eq!(tags, [0, 1, 2, 3]);
    m.push_in(cell(1, 4), Some(G1)).unwrap();
    assert_eq!(m.group_of(id(1)), Some(G1));
    m.push_in(cell(2, 0), Some(G1)).unwrap();
    // Within G1, circuit 2 (no history) goes before circuit 1 (4 cells).
    assert_eq!(circ_of(&m.pop(t0).unwrap()), 2);
    assert_eq!(m.pop(t0).unwrap().body[0], 4);
    // A plain push leaves the circuit in its group.
    m.push(cell(1, 5)).unwrap();
    assert_eq!(m.group_of(id(1)), Some(G1));
    assert_eq!(m.n_groups(), 1);
    // Moving away from a group it was the last member of forgets that group.
    m.pop(t0).unwrap();
    m.push_in(cell(2, 1), Some(G2)).unwrap();
    m.push_in(cell(1, 6), Some(G2)).unwrap();
    assert_eq!((m.n_groups(), m.group_of(id(1))), (1, Some(G2)));
}

/// Push cells for circuit `n` (in `group`) until refused; returns how many were taken.
fn fill(m: &mut CircuitMux, n: u32, group: Option<CircGroup>) -> usize {
    let mut taken = 0;
    while m.push_in(cell(n, 0), group).is_ok() {
        taken += 1;
    }
    taken
}

/// Admission follows the groups too: with the link at its cap, filled by one group's eight
/// circuits, a light circuit may still queue up to half the cap (its fair share with two
/// groups active), not only its 4-cell reserve; past that it waits.
#[test]
fn a_light_group_may_queue_its_fair_share_past_the_cap() {
    let mut m = CircuitMux::new(MuxConfig {
        circ_cap: 128,
        total_cap: 64,
        reserve: 4,
        ..MuxConfig::default()
    });
    // Round robin, as eight busy senders would: 8 cells each fill the link; G1 then holds its
    // whole fair share (the cap), and every circuit has its reserve: nothing more gets in.
    let mut open = true;
    while open {
        open = false;
        for n in 1..=8 {
            open |= m.push_in(cell(n, 0), Some(G1)).is_ok();
        }
    }
    assert_eq!(m.len(), 64);
    assert!(!m.has_room(Some(id(1))));
    assert!(m.has_room(Some(id(100))));
    assert_eq!(fill(&mut m, 100, None), 32);
    assert!(!m.has_room(Some(id(100))));
    assert_eq!(m.len(), 96);
    // The writer takes a frame's worth: the light circuit's cells are half of it.
    let t0 = Instant::now();
    let lone = (0..32)
        .filter(|_| circ_of(&m.pop(t0).unwrap()) == 100)
        .count();
    assert_eq!(lone, 16);
}

/// However the groups come and go, the link holds at most twice its cap (plus the per-circuit
/// reserve, 0 here): groups that each take their fair share one after another would otherwise
/// pile up the cap times the harmonic number of their count.
#[test]
fn fair_share_admission_stays_under_twice_the_cap() {
    let mut m = CircuitMux::new(MuxConfig {
        circ_cap: 128,
        total_cap: 64,
        reserve: 0,
        ..MuxConfig::default()
    });
    let mut taken = Vec::new();
    for n in 1..=200u32 {
        taken.push(fill(&mut m, n, Some(CircGroup(u128::from(n)))));
    }
    assert_eq!(m.len(), 128, "{taken:?}");
    // The first filled the link, the second took its half, the third its third...
    assert_eq!(taken[..3], [64, 32, 21]);
    assert!(taken[10..].iter().all(|&t| t == 0), "{taken:?}");
}

/// The reserve is per group: 400 busy circuits of one group stop at the link's cap (with a
/// reserve per circuit they would hold 1600 cells and every light group would be held to its
/// reserve), and a lone circuit still queues up to its own cap. 400 ungrouped circuits keep
/// their reserve each.
#[test]
fn many_circuits_of_one_group_share_one_reserve() {
    let round_robin = |m: &mut CircuitMux, group: Option<CircGroup>| {
        let mut open = true;
        while open {
            open = false;
            for n in 1..=400 {
                open |= m.push_in(cell(n, 0), group).is_ok();
            }
        }
    };
    let mut m = CircuitMux::new(MuxConfig::default());
    round_robin(&mut m, Some(G1));
    assert_eq!(m.len(), 512);
    assert_eq!(fill(&mut m, 1000, None), 128);
    let mut m = CircuitMux::new(MuxConfig::default());
    round_robin(&mut m, None);
    assert_eq!(m.len(), 1600);
}
