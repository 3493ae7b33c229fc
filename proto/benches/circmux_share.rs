//! Share of a link that one busy circuit gets beside many busy circuits of another client, over
//! a real channel on loopback TCP (writer task, Noise frames, `TCP_NOTSENT_LOWAT`), with the
//! receiver reading at a fixed rate so that the queue builds up at the sender, where the
//! scheduler works. Runs each case for a few seconds and prints one JSON object per case.
//!
//! Run: `cargo bench -p allium-proto --bench circmux_share [-- SECS RATE_CELLS_PER_S]`.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]
// A measuring driver: real time and sleeps are the point.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use allium_proto::cell::{Cell, CellCmd, CircId};
use allium_proto::circmux::CircGroup;

/// The lone circuit's id (the busy client's are 1..=n).
const LONE: u32 = 100_000;

async fn case(busy: u32, grouped: bool, secs: f64, rate: f64) -> (f64, u64) {
    let (client, server) = common::loopback_link().await;
    let (tx, _client_rx) = client.split();
    let (_server_tx, mut rx) = server.split();
    let mut senders = Vec::new();
    for circ in (1..=busy).chain([LONE]) {
        let tx = tx.clone();
        // The busy client's circuits share a group when `grouped`; the lone one has its own.
        let group = grouped.then_some(CircGroup(if circ == LONE { 2 } else { 1 }));
        senders.push(tokio::spawn(async move {
            loop {
                let cell = Cell::new_zeroed(CircId::new(circ), CellCmd::RELAY);
                if tx.send_in(cell, group).await.is_err() {
                    return;
                }
            }
        }));
    }
    let start = Instant::now();
    let warmup = Duration::from_secs_f64(secs / 3.0);
    let end = Duration::from_secs_f64(secs);
    let (mut lone, mut all, mut read) = (0u64, 0u64, 0u64);
    while start.elapsed() < end {
        let c = rx.recv().await.unwrap();
        read += 1;
        // Read at `rate` cells per second.
        let due = start + Duration::from_secs_f64(read as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if start.elapsed() >= warmup {
            all += 1;
            lone += u64::from(c.circ_id.map(|i| i.get()) == Some(LONE));
        }
    }
    for s in senders {
        s.abort();
    }
    tx.close();
    (lone as f64 / all.max(1) as f64, all)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(6.0);
    let rate: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for busy in [50, 400] {
        for grouped in [false, true] {
            let (share, cells) = rt.block_on(case(busy, grouped, secs, rate));
            println!(
                "{{\"busy_circuits\": {busy}, \"grouped\": {grouped}, \"lone_share\": {share:.4}, \
                 \"cells_counted\": {cells}, \"secs\": {secs}, \"read_rate_cells_per_s\": {rate}}}"
            );
        }
    }
}
