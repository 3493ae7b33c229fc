//! Tests of the archive, the responses and the diffs, on generated consensuses.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use allium_crypto::{IdentityKeypair, RelayId, X25519Public};
use proptest::prelude::*;

use super::http::MAX_RESPONSE_HEAD;
use super::*;
use crate::client::encode_cert_list;
use crate::doc::consensus::{BANDWIDTH_WEIGHT_NAMES, CONSENSUS_METHOD, CONSENSUS_VERSION};
use crate::doc::{Consensus, ConsensusEntry, ExitPolicy, Flags, PortRange, Signed};

/// A small deterministic generator (xorshift64*).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes32(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        b
    }
}

pub(crate) fn entry(rng: &mut Rng, i: u64) -> ConsensusEntry {
    let ip = Ipv4Addr::from(0x7f00_0000u32 | (rng.next() as u32 & 0x00ff_ffff));
    let exit = rng.below(4) == 0;
    ConsensusEntry {
        identity: RelayId(rng.bytes32()),
        link_key: X25519Public(rng.bytes32()),
        onion_key: X25519Public(rng.bytes32()),
        nickname: format!("relay{i}"),
        addrs: vec![SocketAddr::from((ip, 9001 + (i % 1000) as u16))],
        flags: Flags(0b1011_1111 & rng.next() as u16 | 0b11),
        weight: rng.below(50_000) as u32,
        exit: if exit {
            ExitPolicy::from_ranges(
                [PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }],
                true,
            )
        } else {
            ExitPolicy::reject_all()
        },
        family: Vec::new(),
        measured: rng.below(2) == 0,
    }
}

pub(crate) fn network(rng: &mut Rng, n: u64, valid_after: u64) -> Consensus {
    let mut relays: Vec<ConsensusEntry> = (0..n).map(|i| entry(rng, i)).collect();
    relays.sort_by_key(|r| r.identity);
    Consensus {
        version: CONSENSUS_VERSION,
        method: CONSENSUS_METHOD,
        valid_after,
        fresh_until: valid_after + 3600,
        valid_until: valid_after + 3 * 3600,
        voters: Vec::new(),
        params: BTreeMap::from([("circwindow".to_string(), 1000)]),
        relays,
        shared_rand: None,
        bandwidth_weights: BANDWIDTH_WEIGHT_NAMES
            .iter()
            .map(|n| (n.to_string(), rng.below(10_001) as i32))
            .collect(),
    }
}

/// The next period: `removed` relays gone, `added` new ones, `changed` with new flags,
/// weight or descriptor; a new timeline and new position weights.
pub(crate) fn churn(
    rng: &mut Rng,
    c: &Consensus,
    removed: usize,
    added: usize,
    changed: usize,
) -> Consensus {
    let mut n = c.clone();
    n.valid_after += 3600;
    n.fresh_until += 3600;
    n.valid_until += 3600;
    for _ in 0..removed.min(n.relays.len()) {
        let i = rng.below(n.relays.len() as u64) as usize;
        n.relays.remove(i);
    }
    for _ in 0..changed {
        if n.relays.is_empty() {
            break;
        }
        let i = rng.below(n.relays.len() as u64) as usize;
        let r = &mut n.relays[i];
        match rng.below(4) {
            0 => r.flags = Flags(r.flags.0 ^ (1 << rng.below(8))),
            1 => r.weight = rng.below(50_000) as u32,
            // A new descriptor: the relay moved to another port.
            2 => {
                r.addrs = vec![SocketAddr::from((
                    Ipv4Addr::LOCALHOST,
                    20_000 + rng.below(10_000) as u16,
                ))]
            }
            _ => {
                r.weight = rng.below(50_000) as u32;
                r.measured = !r.measured;
                r.exit.allow_private = !r.exit.allow_private;
            }
        }
    }
    for k in 0..added {
        n.relays.push(entry(rng, 100_000 + k as u64));
    }
    n.relays.sort_by_key(|r| r.identity);
    n.relays.dedup_by_key(|r| r.identity);
    for v in n.bandwidth_weights.values_mut() {
        *v = rng.below(10_001) as i32;
    }
    n
}

pub(crate) fn signers() -> Vec<IdentityKeypair> {
    (1..=3u8)
        .map(|i| IdentityKeypair::from_seed(&[i; 32]))
        .collect()
}

pub(crate) fn sign(c: &Consensus, keys: &[IdentityKeypair]) -> Vec<u8> {
    let mut s = Signed::sign(c, &keys[0]).unwrap();
    for k in &keys[1..] {
        s.add_own_signature(k);
    }
    s.to_bytes()
}

fn certs() -> Vec<u8> {
    encode_cert_list(&[])
}

fn get(a: &DirArchive, req: &DirRequest, now: u64) -> Vec<u8> {
    let head = encode_request(req);
    assert_eq!(request_head_complete(&head), Some(head.len()));
    let r = a.respond(&head, now);
    assert_eq!(response_complete(&r).unwrap(), Some(r.len()));
    r
}

fn head_of(r: &[u8]) -> String {
    let end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    String::from_utf8(r[..end].to_vec()).unwrap()
}

#[test]
fn empty_archive_answers_404() {
    let a = DirArchive::new(ArchiveConfig::default());
    let r = get(&a, &DirRequest::Consensus { have: vec![] }, 0);
    let e = parse_consensus_response(&r, None).unwrap_err().to_string();
    assert!(e.contains("404") && e.contains("no consensus yet"), "{e}");
    let r = get(&a, &DirRequest::Certs, 0);
    assert!(parse_certs_response(&r).is_err());
    assert_eq!(a.latest_digest(), None);
}

#[test]
fn full_document_and_certs_round_trip() {
    let keys = signers();
    let mut rng = Rng::new(1);
    let c = network(&mut rng, 50, 1_800_000_000);
    let raw = sign(&c, &keys);
    let mut a = DirArchive::new(ArchiveConfig::default());
    a.insert(&raw, c.valid_after, &certs()).unwrap();
    assert_eq!(a.latest_digest(), Some(consensus_digest(&raw)));
    let r = get(&a, &DirRequest::Consensus { have: vec![] }, c.valid_after);
    assert!(head_of(&r).contains("Content-Encoding: deflate"));
    assert!(!head_of(&r).contains("X-Diff-From"));
    assert_eq!(parse_consensus_response(&r, None).unwrap(), raw);
    // Unknown digests get the full document too.
    let r = get(
        &a,
        &DirRequest::Consensus {
            have: vec![[9; 32]],
        },
        c.valid_after,
    );
    assert_eq!(parse_consensus_response(&r, Some(b"other")).unwrap(), raw);
    let r = get(&a, &DirRequest::Certs, c.valid_after);
    assert_eq!(parse_certs_response(&r).unwrap(), certs());
    // The latest digest gets "not modified".
    let r = get(
        &a,
        &DirRequest::Consensus {
            have: vec![consensus_digest(&raw)],
        },
        c.valid_after,
    );
    assert!(head_of(&r).starts_with("HTTP/1.0 304"));
    assert_eq!(parse_consensus_response(&r, Some(&raw)).unwrap(), raw);
    assert_eq!(
        a.stats()
            .not_modified
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn compressed_body_is_shared_not_recomputed() {
    let keys = signers();
    let mut rng = Rng::new(2);
    let c = network(&mut rng, 20, 1_800_000_000);
    let raw = sign(&c, &keys);
    let mut a = DirArchive::new(ArchiveConfig::default());
    a.insert(&raw, c.valid_after, &certs()).unwrap();
    let r1 = get(&a, &DirRequest::Consensus { have: vec![] }, 0);
    let p1 = a.docs_z_ptr();
    let r2 = get(&a, &DirRequest::Consensus { have: vec![] }, 0);
    assert_eq!(r1, r2);
    assert_eq!(p1, a.docs_z_ptr());
    assert!(p1.is_some());
}

#[test]
fn bad_requests_get_400_and_inserts_are_checked() {
    let keys = signers();
    let mut rng = Rng::new(3);
    let c = network(&mut rng, 5, 1_800_000_000);
    let raw = sign(&c, &keys);
    let mut a = DirArchive::new(ArchiveConfig::default());
    assert!(a.insert(b"junk", c.valid_after, &certs()).is_err());
    assert!(a.insert(&raw, c.valid_after + 1, &certs()).is_err());
    assert!(a.insert(&raw, c.valid_after, b"junk").is_err());
    a.insert(&raw, c.valid_after, &certs()).unwrap();
    let r = a.respond(b"GET / HTTP/1.0\r\nUser-Agent: curl\r\n\r\n", 0);
    assert!(head_of(&r).starts_with("HTTP/1.0 400"));
    // An older consensus after a newer one is a rollback.
    let older = Consensus {
        valid_after: c.valid_after - 3600,
        fresh_until: c.fresh_until - 3600,
        valid_until: c.valid_until - 3600,
        ..c.clone()
    };
    let e = a
        .insert(&sign(&older, &keys), older.valid_after, &certs())
        .unwrap_err();
    assert!(matches!(e, crate::DirError::Rollback { .. }), "{e}");
    // The same bytes again are fine.
    a.insert(&raw, c.valid_after, &certs()).unwrap();
    assert_eq!(a.len(), 1);
}

#[test]
fn diffs_are_served_and_apply() {
    let keys = signers();
    let mut rng = Rng::new(4);
    let c0 = network(&mut rng, 200, 1_800_000_000);
    let c1 = churn(&mut rng, &c0, 2, 2, 10);
    let c2 = churn(&mut rng, &c1, 2, 2, 10);
    let (r0, r1, r2) = (sign(&c0, &keys), sign(&c1, &keys), sign(&c2, &keys));
    let mut a = DirArchive::new(ArchiveConfig::default());
    for (r, c) in [(&r0, &c0), (&r1, &c1), (&r2, &c2)] {
        a.insert(r, c.valid_after, &certs()).unwrap();
    }
    let now = c2.valid_after;
    let full = get(&a, &DirRequest::Consensus { have: vec![] }, now);
    for base in [&r0, &r1] {
        let req = DirRequest::Consensus {
            have: vec![consensus_digest(base)],
        };
        let r = get(&a, &req, now);
        assert!(head_of(&r).contains("X-Diff-From"), "{}", head_of(&r));
        assert!(r.len() * 4 < full.len(), "{} vs {}", r.len(), full.len());
        assert_eq!(parse_consensus_response(&r, Some(base)).unwrap(), r2);
        // Applied to anything else, the diff is refused.
        assert!(parse_consensus_response(&r, Some(&r2)).is_err());
        assert!(parse_consensus_response(&r, None).is_err());
    }
    // Too old at `now`: the full document instead.
    let req = DirRequest::Consensus {
        have: vec![consensus_digest(&r0)],
    };
    let r = get(&a, &req, c0.valid_after + a_cfg_max_age() + 1);
    assert!(!head_of(&r).contains("X-Diff-From"));
    assert_eq!(parse_consensus_response(&r, Some(&r0)).unwrap(), r2);
}

fn a_cfg_max_age() -> u64 {
    ArchiveConfig::default().max_age
}

#[test]
fn archive_keeps_a_bounded_history() {
    let keys = signers();
    let mut rng = Rng::new(5);
    let cfg = ArchiveConfig {
        max_age: 4 * 3600,
        max_docs: 3,
    };
    let mut a = DirArchive::new(cfg);
    let mut c = network(&mut rng, 10, 1_800_000_000);
    let mut raws = Vec::new();
    for _ in 0..6 {
        let raw = sign(&c, &keys);
        a.insert(&raw, c.valid_after, &certs()).unwrap();
        raws.push(raw);
        assert!(a.len() <= 3);
        c = churn(&mut rng, &c, 1, 1, 1);
    }
    assert_eq!(a.len(), 3);
    // A base that fell out of the archive gets the full document.
    let r = get(
        &a,
        &DirRequest::Consensus {
            have: vec![consensus_digest(&raws[0])],
        },
        c.valid_after,
    );
    assert!(!head_of(&r).contains("X-Diff-From"));
    let r = get(
        &a,
        &DirRequest::Consensus {
            have: vec![consensus_digest(&raws[4])],
        },
        c.valid_after,
    );
    assert!(head_of(&r).contains("X-Diff-From"));
    // Age: a gap of more than max_age drops everything older.
    let mut later = c.clone();
    later.valid_after += 5 * 3600;
    later.fresh_until += 5 * 3600;
    later.valid_until += 5 * 3600;
    a.insert(&sign(&later, &keys), later.valid_after, &certs())
        .unwrap();
    assert_eq!(a.len(), 1);
}

#[test]
fn one_period_diff_is_small_at_1000_relays() {
    let keys = signers();
    let mut rng = Rng::new(6);
    let c0 = network(&mut rng, 1000, 1_800_000_000);
    // A busy hour: 1% of relays leave, 1% join, 5% change flags, weight or descriptor.
    let c1 = churn(&mut rng, &c0, 10, 10, 50);
    let (r0, r1) = (sign(&c0, &keys), sign(&c1, &keys));
    let full = compress(&r1).len();
    let d = diff::compute(&r0, &r1).unwrap();
    let dz = compress(&d).len();
    assert_eq!(diff::apply(&r0, &d).unwrap(), r1);
    assert!(dz * 20 < full, "diff {dz} B vs full {full} B");
}

#[test]
fn consensus_is_under_150_bytes_per_relay_compressed() {
    // Issue 11's goal. Each entry carries three 32-byte keys no compressor shrinks (96 B); the
    // rest (nickname, address, flags, weight, exit summary) must fit in the remaining 54 B.
    let keys = signers();
    let mut rng = Rng::new(11);
    let c = network(&mut rng, 1000, 1_800_000_000);
    let z = compress(&sign(&c, &keys)).len();
    let per_relay = z as f64 / 1000.0;
    assert!(per_relay < 150.0, "{per_relay:.1} B per relay compressed");
    assert!(
        per_relay > 96.0,
        "{per_relay:.1} B per relay: below the keys alone?"
    );
}

#[test]
fn response_head_fits_its_bound() {
    let r = super::http::ok_response(super::http::Body::Diff(b"x", [0xff; 32]));
    assert!(head_of(&r).len() + 4 < MAX_RESPONSE_HEAD);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random churn: applying the diff gives exactly the new envelope.
    #[test]
    fn apply_reproduces_the_target(
        seed in any::<u64>(),
        n in 0u64..80,
        removed in 0usize..10,
        added in 0usize..10,
        changed in 0usize..20,
    ) {
        let keys = signers();
        let mut rng = Rng::new(seed);
        let c0 = network(&mut rng, n, 1_800_000_000);
        let c1 = churn(&mut rng, &c0, removed, added, changed);
        let (r0, r1) = (sign(&c0, &keys[..2]), sign(&c1, &keys));
        let d = diff::compute(&r0, &r1).unwrap();
        prop_assert_eq!(diff::apply(&r0, &d).unwrap(), r1.clone());
        // The reverse direction too (relays come back, signatures drop).
        let back = diff::compute(&r1, &r0).unwrap();
        prop_assert_eq!(diff::apply(&r1, &back).unwrap(), r0);
    }

    /// A tampered diff never yields anything but the exact target: it is refused, or (when
    /// the change happens to copy equal bytes) still gives the target.
    #[test]
    fn tampered_diffs_are_refused(
        seed in any::<u64>(),
        n in 1u64..40,
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in any::<usize>(),
    ) {
        let keys = signers();
        let mut rng = Rng::new(seed);
        let c0 = network(&mut rng, n, 1_800_000_000);
        let c1 = churn(&mut rng, &c0, 1, 1, 3);
        let (r0, r1) = (sign(&c0, &keys), sign(&c1, &keys));
        let d = diff::compute(&r0, &r1).unwrap();
        let mut t = d.clone();
        for (at, x) in &flips {
            let i = at % t.len();
            t[i] ^= x;
        }
        if let Ok(out) = diff::apply(&r0, &t) {
            prop_assert_eq!(out, r1.clone());
        }
        // Truncation is always refused.
        let short = &d[..cut % d.len()];
        prop_assert!(diff::apply(&r0, short).is_err());
        // Wrong base: refused.
        prop_assert!(diff::apply(&r1, &d).is_err());
    }

    /// The request and response parsers take any bytes without panicking.
    #[test]
    fn parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_request(&bytes);
        let _ = request_head_complete(&bytes);
        let _ = response_complete(&bytes);
        let _ = parse_consensus_response(&bytes, Some(b"x"));
        let _ = parse_certs_response(&bytes);
        let _ = diff::apply(b"base", &bytes);
        let a = DirArchive::new(ArchiveConfig::default());
        let r = a.respond(&bytes, 0);
        prop_assert!(response_complete(&r).unwrap().is_some());
    }
}
