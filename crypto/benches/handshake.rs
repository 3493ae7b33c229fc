//! Circuit handshake benchmark: client start + relay respond + client finish.

mod common;

use std::hint::black_box;
use std::time::Duration;

use allium_crypto::{IdentityKeypair, X25519Secret, client_start, relay_respond};
use common::CpuTime;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench_handshake(c: &mut Criterion<CpuTime>) {
    let id = IdentityKeypair::generate().public();
    let onion = X25519Secret::generate();
    let onion_pub = onion.public();
    let cm = [1u8, 1, 1];
    c.bench_function("handshake_full", |b| {
        b.iter(|| {
            let (st, skin) = client_start(&id, &onion_pub, &cm).expect("start");
            let (rk, reply) =
                relay_respond(&id, &[&onion], &skin, |_| vec![2, 1, 1]).expect("respond");
            let (ck, sm) = st.finish(&reply).expect("finish");
            black_box((rk, ck, sm));
        })
    });
    // The relay's share alone (a replayed onionskin is answered like a fresh one).
    let (_, skin) = client_start(&id, &onion_pub, &cm).expect("start");
    c.bench_function("handshake_relay_respond", |b| {
        b.iter(|| {
            let r = relay_respond(&id, &[&onion], black_box(&skin), |_| vec![2, 1, 1])
                .expect("respond");
            black_box(r);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(CpuTime)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_handshake
}
criterion_main!(benches);
