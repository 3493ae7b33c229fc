//! Link transport throughput: seal and open of one full 32-cell Noise frame (32 768 plaintext
//! bytes) through the sans-IO [`LinkTransport`], i.e. snow with the ring-backed ChaCha20-Poly1305.
//!
//! Run: `cargo bench -p allium-proto --bench link`. Criterion prints the throughput per frame in
//! GiB/s ("thrpt").
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;

use allium_crypto::{RelayId, X25519Secret};
use allium_proto::cell::{CELL_LEN, Cell, CellCmd, CircId};
use allium_proto::link::{Initiator, LinkTransport, MAX_CELLS_PER_FRAME, MAX_FRAME_LEN, Responder};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};

fn pair() -> (LinkTransport, LinkTransport) {
    let id = RelayId([7; 32]);
    let key = X25519Secret::generate();
    let mut m1 = Vec::new();
    let init = Initiator::start(&id, &key.public(), None, &mut m1).unwrap();
    let mut m2 = Vec::new();
    let wait = Responder::new(&id, &key)
        .unwrap()
        .read_msg1(&m1[2..], 0, &mut m2)
        .unwrap();
    let mut m3 = Vec::new();
    let (ti, _) = init.read_msg2(&m2[2..], 0, &mut m3).unwrap();
    let (tr, _) = wait.read_msg3(&m3[2..]).unwrap();
    (ti, tr)
}

fn bench_link(c: &mut Criterion) {
    let plain: Vec<u8> = (0..MAX_CELLS_PER_FRAME * CELL_LEN)
        .map(|i| i as u8)
        .collect();
    let mut g = c.benchmark_group("link_frame_32_cells");
    g.throughput(Throughput::Bytes(plain.len() as u64));

    // Seal only: the sealed frames are discarded.
    let (mut tx, _rx) = pair();
    let mut frame = vec![0u8; MAX_FRAME_LEN + 2];
    g.bench_function("seal", |b| {
        b.iter(|| black_box(tx.seal_frame(black_box(&plain), &mut frame).unwrap()))
    });

    // Open only: every frame is sealed in the (untimed) setup, opened in order in the routine.
    let (mut tx, mut rx) = pair();
    let mut out = vec![0u8; MAX_FRAME_LEN];
    g.bench_function("open", |b| {
        b.iter_batched_ref(
            || {
                let mut f = vec![0u8; MAX_FRAME_LEN + 2];
                let n = tx.seal_frame(&plain, &mut f).unwrap();
                f.truncate(n);
                f
            },
            |f| black_box(rx.open_frame(&f[2..], &mut out).unwrap()),
            BatchSize::SmallInput,
        )
    });

    // Seal then open: the whole link cost of moving one frame (counted once).
    let (mut tx, mut rx) = pair();
    let mut frame = vec![0u8; MAX_FRAME_LEN + 2];
    let mut out = vec![0u8; MAX_FRAME_LEN];
    g.bench_function("seal_and_open", |b| {
        b.iter(|| {
            let n = tx.seal_frame(black_box(&plain), &mut frame).unwrap();
            black_box(rx.open_frame(&frame[2..n], &mut out).unwrap())
        })
    });
    g.finish();
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat` (Linux), in nanoseconds.
/// Unlike wall time it is not inflated when other processes share the cores.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Throughput per CPU-second, printed as GB/s (10^9 bytes per second): `frames` seals alone, then
/// `frames` seal+open pairs on another link; open = pair − seal. Buffers are reused, as in the
/// channel driver.
fn cpu_time_report(frames: u32) {
    let plain: Vec<u8> = (0..MAX_CELLS_PER_FRAME * CELL_LEN)
        .map(|i| i as u8)
        .collect();
    let mut frame = vec![0u8; MAX_FRAME_LEN + 2];
    let mut out = vec![0u8; MAX_FRAME_LEN];
    let Some(t0) = thread_cpu_ns() else {
        println!("(no /proc/thread-self/schedstat: CPU-time report skipped)");
        return;
    };
    let (mut tx, _rx) = pair();
    for _ in 0..frames {
        black_box(tx.seal_frame(black_box(&plain), &mut frame).unwrap());
    }
    let t1 = thread_cpu_ns().unwrap_or(t0);
    let (mut tx, mut rx) = pair();
    let t1b = thread_cpu_ns().unwrap_or(t1);
    for _ in 0..frames {
        let n = tx.seal_frame(black_box(&plain), &mut frame).unwrap();
        black_box(rx.open_frame(&frame[2..n], &mut out).unwrap());
    }
    let t2 = thread_cpu_ns().unwrap_or(t1b);
    let seal = (t1 - t0).max(1);
    let both = (t2 - t1b).max(1);
    let open = both.saturating_sub(seal).max(1);
    let bytes = f64::from(frames) * plain.len() as f64;
    let per_frame = |ns: u64| ns as f64 / f64::from(frames) / 1e3;
    println!(
        "link CPU time, {frames} frames of 32 cells (32768 B): seal {:.2} GB/s ({:.1} us/frame), \
         open {:.2} GB/s ({:.1} us/frame), seal+open of the same frame {:.2} GB/s ({:.1} us/frame)",
        bytes / seal as f64,
        per_frame(seal),
        bytes / open as f64,
        per_frame(open),
        bytes / both as f64,
        per_frame(both),
    );
}

/// End to end over loopback TCP: 1024 cells (1 MiB) from a sender task through a real channel to
/// the receiver (batching, sealing, syscalls, opening, cell decoding).
fn bench_channel(c: &mut Criterion) {
    const CELLS: usize = 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut rx, _client_rx, _server_tx) = rt.block_on(async {
        let (client, server) = common::loopback_link().await;
        // The unused halves are kept alive: dropping every sender would close the link.
        let (tx, client_rx) = client.split();
        let (server_tx, rx) = server.split();
        (tx, rx, client_rx, server_tx)
    });
    let mut g = c.benchmark_group("channel_loopback");
    g.throughput(Throughput::Bytes((CELLS * CELL_LEN) as u64));
    g.sample_size(30);
    g.bench_function("1024_cells", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tx = tx.clone();
                let send = tokio::spawn(async move {
                    for i in 0..CELLS {
                        let mut cell = Cell::new_zeroed(CircId::new(0x8000_0001), CellCmd::RELAY);
                        cell.body[0] = i as u8;
                        tx.send(cell).await.unwrap();
                    }
                });
                for _ in 0..CELLS {
                    black_box(rx.recv().await.unwrap());
                }
                send.await.unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench_link, bench_channel);

fn main() {
    // A few seconds of work: enough frames to cross a rekey (every 4096 frames).
    cpu_time_report(20_000);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
