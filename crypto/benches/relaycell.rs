//! Relay-cell benchmarks: the relay forward step, the client's 3-hop build, the client's backward
//! peel, the relay's backward layer; plus the raw primitives the backend choice rests on.
//!
//! Throughput is reported per 1019-byte cell body.

mod common;

use std::hint::black_box;
use std::time::Duration;

use allium_crypto::HopKeys;
use allium_crypto::relaycell::{
    CELL_BODY_LEN, CellBody, ClientCircuitCrypto, Forward, RELAY_MSG_LEN, RelayHopCrypto,
};
use common::{CpuTime, now_ns};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const RELAY: u8 = 3;
const BATCH: u64 = 256;

fn keys(i: u8) -> HopKeys {
    HopKeys::dangerously_from_parts([i; 32], [i ^ 0x55; 32], [0; 32])
}

fn circuit(n: u8) -> (ClientCircuitCrypto, Vec<RelayHopCrypto>) {
    let mut c = ClientCircuitCrypto::new();
    let mut r = Vec::new();
    for i in 1..=n {
        c.add_hop(&keys(i)).expect("add hop");
        r.push(RelayHopCrypto::new(&keys(i)));
    }
    (c, r)
}

/// Time `op` over freshly prepared cells, preparing them outside the timed region.
fn prepared<P, O>(iters: u64, mut prep: P, mut op: O) -> Duration
where
    P: FnMut(&mut Vec<CellBody>),
    O: FnMut(&mut CellBody),
{
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut cells: Vec<CellBody> = Vec::with_capacity(BATCH as usize);
    while left > 0 {
        let n = left.min(BATCH);
        cells.clear();
        for _ in 0..n {
            cells.push([0u8; CELL_BODY_LEN]);
        }
        prep(&mut cells);
        let t = now_ns();
        for c in cells.iter_mut() {
            op(c);
        }
        total += Duration::from_nanos(now_ns().saturating_sub(t));
        left -= n;
    }
    total
}

fn bench_cells(c: &mut Criterion<CpuTime>) {
    let msg = [0x42u8; RELAY_MSG_LEN];
    let mut g = c.benchmark_group("relaycell");
    g.throughput(Throughput::Bytes(CELL_BODY_LEN as u64));

    // Relay forward step (the hot path of guards and middles): hop 1 of 3 passing a cell on.
    g.bench_function("relay_forward_step_pass", |b| {
        b.iter_custom(|iters| {
            let (mut client, mut relays) = circuit(3);
            prepared(
                iters,
                |cells| {
                    for cell in cells.iter_mut() {
                        client.encrypt_forward(2, RELAY, &msg, cell).expect("build");
                    }
                },
                |cell| {
                    let r = relays[0].decrypt_forward(RELAY, cell).expect("hop 1");
                    assert_eq!(r, Forward::Pass);
                },
            )
        })
    });

    // Relay forward step at the destination (the exit recognizes the cell).
    g.bench_function("relay_forward_step_recognized", |b| {
        b.iter_custom(|iters| {
            let (mut client, mut relays) = circuit(1);
            prepared(
                iters,
                |cells| {
                    for cell in cells.iter_mut() {
                        client.encrypt_forward(0, RELAY, &msg, cell).expect("build");
                    }
                },
                |cell| {
                    let r = relays[0].decrypt_forward(RELAY, cell).expect("hop 1");
                    assert!(matches!(r, Forward::Recognized { .. }));
                },
            )
        })
    });

    g.bench_function("client_build_forward_3hop", |b| {
        let (mut client, _) = circuit(3);
        let mut cell = [0u8; CELL_BODY_LEN];
        b.iter(|| {
            client
                .encrypt_forward(2, RELAY, black_box(&msg), &mut cell)
                .expect("build");
            black_box(&cell);
        })
    });

    g.bench_function("client_backward_peel_from_hop3", |b| {
        b.iter_custom(|iters| {
            let (mut client, mut relays) = circuit(3);
            prepared(
                iters,
                |cells| {
                    for cell in cells.iter_mut() {
                        relays[2]
                            .encrypt_backward(RELAY, &msg, cell)
                            .expect("origin");
                        relays[1].relay_backward(cell).expect("layer");
                        relays[0].relay_backward(cell).expect("layer");
                    }
                },
                |cell| {
                    let (hop, _) = client.decrypt_backward(RELAY, cell).expect("peel");
                    assert_eq!(hop, 2);
                },
            )
        })
    });

    g.bench_function("relay_backward_layer", |b| {
        let (_, mut relays) = circuit(1);
        let mut cell = [7u8; CELL_BODY_LEN];
        b.iter(|| {
            relays[0].relay_backward(&mut cell).expect("layer");
            black_box(&cell);
        })
    });

    g.bench_function("relay_backward_originate", |b| {
        let (_, mut relays) = circuit(1);
        let mut cell = [0u8; CELL_BODY_LEN];
        b.iter(|| {
            relays[0]
                .encrypt_backward(RELAY, black_box(&msg), &mut cell)
                .expect("originate");
            black_box(&cell);
        })
    });
    g.finish();
}

/// The primitives the backend choice rests on (1003-byte AEAD messages, 1019-byte keystream).
fn bench_primitives(c: &mut Criterion<CpuTime>) {
    let mut g = c.benchmark_group("primitives");
    let key = [9u8; 32];
    let nonce = [1u8; 12];

    g.throughput(Throughput::Bytes(1003));
    g.bench_function("ring_chacha20poly1305_seal_1003", |b| {
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        let mut buf = [0u8; 1003];
        b.iter(|| {
            let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("key"));
            let t = k
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([3u8]),
                    &mut buf,
                )
                .expect("seal");
            black_box(t.as_ref()[0]);
        })
    });
    g.bench_function("rustcrypto_chacha20poly1305_seal_1003", |b| {
        use chacha20poly1305::aead::{AeadInOut as _, KeyInit as _};
        let mut buf = [0u8; 1003];
        b.iter(|| {
            let k = chacha20poly1305::ChaCha20Poly1305::new((&key).into());
            let t = k
                .encrypt_inout_detached((&nonce).into(), &[3u8], (&mut buf[..]).into())
                .expect("seal");
            black_box(t);
        })
    });
    g.throughput(Throughput::Bytes(CELL_BODY_LEN as u64));
    g.bench_function("rustcrypto_chacha20_keystream_1019", |b| {
        use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
        let mut buf = [0u8; CELL_BODY_LEN];
        b.iter(|| {
            let mut c = chacha20::ChaCha20::new((&key).into(), (&nonce).into());
            c.apply_keystream(&mut buf);
            black_box(&buf);
        })
    });
    // The ratchet as in design §3.3 (one crate call for 96 bytes per cell) ...
    g.throughput(Throughput::Bytes(96));
    g.bench_function("chacha20_crate_96_bytes_one_cell_ratchet", |b| {
        use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
        b.iter(|| {
            let mut s = [0u8; 96];
            let mut c = chacha20::ChaCha20::new((&key).into(), (&[0u8; 12]).into());
            c.apply_keystream(&mut s);
            black_box(s);
        })
    });
    // ... and the ratchet step used (256 bytes = 4 blocks = keys for 3 cells).
    g.throughput(Throughput::Bytes(256));
    g.bench_function("chacha20_crate_256_bytes_three_cell_step", |b| {
        use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
        b.iter(|| {
            let mut s = [0u8; 256];
            let mut c = chacha20::ChaCha20::new((&key).into(), (&[0u8; 12]).into());
            c.apply_keystream(&mut s);
            black_box(s);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(CpuTime)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_cells, bench_primitives
}
criterion_main!(benches);
