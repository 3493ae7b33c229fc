//! Cost of the link scheduler per cell: one `pop` and one `push` of the same cell (a backlogged
//! link in steady state), with every circuit ungrouped and with circuits in groups
//! ([`CircuitMux::push_in`]).
//!
//! Run: `cargo bench -p allium-proto --bench circmux`. Criterion prints the time per cell.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
// Simulated time from a fixed origin; the clock is read once.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use allium_proto::cell::{Cell, CellCmd, CircId};
use allium_proto::circmux::{CircGroup, CircuitMux, MuxConfig};
use criterion::{Criterion, criterion_group};

/// `circuits` circuits with 8 cells queued each; circuit `n` is in group `group(n)`.
fn filled(circuits: u32, group: &dyn Fn(u32) -> Option<CircGroup>) -> CircuitMux {
    let mut m = CircuitMux::new(MuxConfig {
        circ_cap: 64,
        total_cap: 1 << 20,
        ..MuxConfig::default()
    });
    for n in 1..=circuits {
        for _ in 0..8 {
            let c = Cell::new_zeroed(CircId::new(n), CellCmd::RELAY);
            m.push_in(c, group(n)).unwrap();
        }
    }
    m
}

fn bench_mux(c: &mut Criterion) {
    let mut g = c.benchmark_group("circmux_pop_push");
    type Case = (&'static str, u32, Box<dyn Fn(u32) -> Option<CircGroup>>);
    let cases: Vec<Case> = vec![
        ("ungrouped_100", 100, Box::new(|_| None)),
        ("ungrouped_1000", 1000, Box::new(|_| None)),
        (
            "100_in_10_groups",
            100,
            Box::new(|n| Some(CircGroup(u128::from(n % 10)))),
        ),
        (
            "1000_in_1_group_and_1_alone",
            1001,
            Box::new(|n| (n <= 1000).then_some(CircGroup(1))),
        ),
    ];
    for (name, circuits, group) in cases {
        let mut m = filled(circuits, &*group);
        let mut now = Instant::now();
        g.bench_function(name, |b| {
            b.iter(|| {
                now += Duration::from_micros(100);
                let cell = m.pop(now).unwrap();
                let n = cell.circ_id.unwrap().get();
                m.push_in(black_box(cell), group(n)).unwrap();
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench_mux);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
