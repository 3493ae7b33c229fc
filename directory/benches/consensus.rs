//! Consensus computation from 10,000 relay descriptors, and consensus size per relay.
//! Run by hand: `cargo bench -p allium-directory --bench consensus`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use allium_crypto::{IdentityKeypair, RelayId, X25519Secret};
use allium_directory::authority::compute::compute_consensus;
use allium_directory::authority::config::AuthorityConfig;
use allium_directory::authority::vote::{RelayHistory, build_vote};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::{
    Consensus, ExitPolicy, PortRange, RelayDescriptor, Signed, VerifiedDescriptor, Vote,
};
use criterion::{Criterion, criterion_group, criterion_main};

const N: usize = 10_000;
const NOW: u64 = 1_800_000_000;

fn descriptors() -> (Vec<Vec<u8>>, BTreeMap<RelayId, VerifiedDescriptor>) {
    let mut raw = Vec::with_capacity(N);
    let mut map = BTreeMap::new();
    for i in 0..N {
        let id = IdentityKeypair::generate();
        let r = allium_crypto::rng::random_u32();
        let ip = Ipv4Addr::from(0x0b00_0000u32 | (r & 0x00ff_ffff)); // 11.x.y.z, public
        let exit = i % 4 == 0;
        let d = RelayDescriptor {
            version: DESC_VERSION,
            identity: id.public(),
            link_key: X25519Secret::generate().public(),
            onion_key: X25519Secret::generate().public(),
            nickname: format!("Relay{i}"),
            addrs: vec![SocketAddr::from((ip, 9001))],
            bandwidth_observed: u64::from(r % 50_000_000),
            exit_policy: if exit {
                ExitPolicy::from_ranges(
                    [
                        PortRange { lo: 80, hi: 80 },
                        PortRange { lo: 443, hi: 443 },
                        PortRange { lo: 8080, hi: 8443 },
                    ],
                    false,
                )
            } else {
                ExitPolicy::reject_all()
            },
            family: vec![],
            protocols: default_protocols(),
            contact: format!("operator{i} <ops@example.invalid>"),
            published: NOW - 100,
            expires: NOW + 86400,
        };
        let s = Signed::sign(&d, &id).unwrap();
        raw.push(s.to_bytes());
        let v = s.verify().unwrap();
        map.insert(d.identity, v);
    }
    (raw, map)
}

fn history(descs: &BTreeMap<RelayId, VerifiedDescriptor>) -> BTreeMap<RelayId, RelayHistory> {
    descs
        .keys()
        .enumerate()
        .map(|(i, k)| {
            (
                *k,
                RelayHistory {
                    first_seen: NOW - (i as u64 % 30) * 86400,
                    running_since: Some(NOW - (i as u64 % 20) * 86400),
                    last_probe: NOW,
                    last_ok: i % 10 != 0,
                    ..RelayHistory::default()
                },
            )
        })
        .collect()
}

fn cfg() -> AuthorityConfig {
    AuthorityConfig::new(
        PathBuf::from("/nonexistent"),
        "127.0.0.1:1".parse().unwrap(),
        vec![],
    )
}

fn zlib(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn bench(c: &mut Criterion) {
    let (raw, descs) = descriptors();
    let hist = history(&descs);
    let cfg = cfg();
    let auths: Vec<IdentityKeypair> = (0..3).map(|_| IdentityKeypair::generate()).collect();
    let votes: Vec<Vote> = auths
        .iter()
        .map(|a| build_vote(&cfg, a.public(), &descs, &hist, NOW, NOW))
        .collect();

    // Sizes.
    let refs: Vec<&Vote> = votes.iter().collect();
    let cons = compute_consensus(&refs, 3, NOW);
    let mut signed = Signed::sign(&cons, &auths[0]).unwrap();
    signed.add_own_signature(&auths[1]);
    signed.add_own_signature(&auths[2]);
    let bytes = signed.to_bytes();
    let z = zlib(&bytes);
    let n = cons.relays.len() as f64;
    let vote_bytes = Signed::sign(&votes[0], &auths[0]).unwrap().to_bytes();
    eprintln!(
        "consensus: {} relays, {} bytes raw ({:.1} B/relay), {} bytes zlib ({:.1} B/relay); vote {} bytes; descriptor ~{} bytes",
        cons.relays.len(),
        bytes.len(),
        bytes.len() as f64 / n,
        z.len(),
        z.len() as f64 / n,
        vote_bytes.len(),
        raw[0].len()
    );

    let mut g = c.benchmark_group("authority_10k");
    g.sample_size(10);
    g.bench_function("verify_10k_descriptors", |b| {
        b.iter(|| {
            for r in &raw {
                black_box(
                    Signed::<RelayDescriptor>::from_bytes(r)
                        .unwrap()
                        .verify()
                        .unwrap(),
                );
            }
        })
    });
    g.bench_function("build_and_sign_vote", |b| {
        b.iter(|| {
            let v = build_vote(&cfg, auths[0].public(), &descs, &hist, NOW, NOW);
            black_box(Signed::sign(&v, &auths[0]).unwrap().to_bytes())
        })
    });
    g.bench_function("compute_and_sign_consensus_from_3_votes", |b| {
        b.iter(|| {
            let c = compute_consensus(&refs, 3, NOW);
            black_box(Signed::<Consensus>::sign(&c, &auths[0]).unwrap().to_bytes())
        })
    });
    g.bench_function("full_round_one_authority", |b| {
        // Own vote from descriptors, parse + verify-decode the two other votes, compute, sign,
        // compress for serving.
        let other: Vec<Vec<u8>> = votes[1..]
            .iter()
            .zip(&auths[1..])
            .map(|(v, a)| Signed::sign(v, a).unwrap().to_bytes())
            .collect();
        b.iter(|| {
            let mine = build_vote(&cfg, auths[0].public(), &descs, &hist, NOW, NOW);
            let mine_s = Signed::sign(&mine, &auths[0]).unwrap();
            let mut vs = vec![mine];
            for (o, a) in other.iter().zip(&auths[1..]) {
                let s = Signed::<Vote>::from_bytes(o).unwrap();
                assert!(s.has_valid_sig_by(&a.public()));
                vs.push(s.dangerously_decode_unverified().unwrap());
            }
            let refs: Vec<&Vote> = vs.iter().collect();
            let c = compute_consensus(&refs, 3, NOW);
            let s = Signed::<Consensus>::sign(&c, &auths[0]).unwrap();
            black_box((mine_s, zlib(&s.to_bytes())))
        })
    });
    g.bench_function("zlib_compress_consensus", |b| {
        b.iter(|| black_box(zlib(&bytes)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
