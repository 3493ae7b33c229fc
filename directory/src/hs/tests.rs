//! Onion-service descriptor and hash-ring tests.

use std::collections::BTreeMap;

use allium_crypto::hs::{BlindedKeypair, BlindedPublicKey, HsAddress, Subcredential, TimePeriod};
use allium_crypto::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
use proptest::prelude::*;

use super::desc::{AUTH_CLIENT_BLOCK, MAX_HS_DESC_LEN};
use super::*;
use crate::doc::{Consensus, ConsensusEntry, ExitPolicy, Flags};

const PERIOD: TimePeriod = TimePeriod {
    number: 20787,
    length_minutes: 1440,
};
const NOW: u64 = 1_796_040_000;

struct Service {
    id: IdentityKeypair,
    blinded: BlindedKeypair,
    signing: IdentityKeypair,
    subcred: Subcredential,
}

fn service(period: &TimePeriod) -> Service {
    let id = IdentityKeypair::from_seed(&[9; 32]);
    let blinded = BlindedKeypair::derive(&id, period);
    let subcred = Subcredential::for_identity(&id.public(), &blinded.public());
    Service {
        id,
        blinded,
        signing: IdentityKeypair::generate(),
        subcred,
    }
}

fn contents(n: usize) -> HsDescContents {
    HsDescContents {
        version: 1,
        intro_points: (0..n)
            .map(|i| IntroPointInfo {
                relay_id: IdentityKeypair::from_seed(&[i as u8 + 1; 32]).public(),
                link_key: X25519Secret::from_bytes([i as u8 + 2; 32]).public(),
                onion_key: X25519Secret::from_bytes([i as u8 + 3; 32]).public(),
                addrs: vec![format!("127.0.0.{}:{}", i + 1, 9000 + i).parse().unwrap()],
                auth_key: IdentityKeypair::from_seed(&[i as u8 + 4; 32]).public(),
                enc_key: X25519Secret::from_bytes([i as u8 + 5; 32]).public(),
            })
            .collect(),
        pow: Some(PowParams {
            scheme: 1,
            seed: [0x5e; 32],
            suggested_effort: 100,
            expires: NOW + 7200,
        }),
    }
}

fn build(s: &Service, c: &HsDescContents, clients: &[X25519Public], revision: u64) -> Vec<u8> {
    HsDescBuilder {
        blinded: &s.blinded,
        signing_key: &s.signing,
        subcredential: &s.subcred,
        revision,
        lifetime_minutes: 180,
        cert_expires: NOW + 3 * 3600,
        contents: c,
        auth_clients: clients,
    }
    .build()
    .unwrap()
}

fn open(bytes: &[u8], s: &Service, client: Option<&X25519Secret>) -> crate::Result<HsDescContents> {
    UncheckedHsDesc::parse(bytes)?
        .check_for(&s.blinded.public(), NOW)?
        .decrypt(&s.subcred, client)
}

#[test]
fn round_trip() {
    let s = service(&PERIOD);
    let c = contents(3);
    let bytes = build(&s, &c, &[], 7);
    let v = UncheckedHsDesc::parse(&bytes).unwrap().check(NOW).unwrap();
    assert_eq!(v.revision(), 7);
    assert_eq!(v.lifetime_minutes(), 180);
    assert_eq!(v.blinded_key(), &s.blinded.public());
    assert_eq!(v.as_bytes(), &bytes[..]);
    assert_eq!(v.decrypt(&s.subcred, None).unwrap(), c);
    // A client with a key can read a descriptor without client authorization too.
    assert_eq!(
        open(&bytes, &s, Some(&X25519Secret::generate())).unwrap(),
        c
    );
}

#[test]
fn stored_descriptor_reveals_neither_identity_nor_address() {
    let s = service(&PERIOD);
    let bytes = build(&s, &contents(3), &[], 1);
    let a = s.id.public();
    let addr = HsAddress::from_identity(&a).unwrap();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&a.0), "identity key in the descriptor");
    assert!(
        !contains(addr.to_string().as_bytes()),
        "address in the descriptor"
    );
    assert!(
        !contains(addr.label().as_bytes()),
        "address label in the descriptor"
    );
    assert!(!contains(addr.label().to_ascii_uppercase().as_bytes()));
    assert!(
        !contains(&a.0[..16]),
        "half of the identity key in the descriptor"
    );
    assert!(
        !contains(s.subcred.as_bytes()),
        "subcredential in the descriptor"
    );
    // ... while the blinded key, which an HSDir needs, is there.
    assert!(contains(&s.blinded.public().0));
    // Nor do the plaintext intro point keys appear (they are encrypted).
    let c = contents(3);
    assert!(!contains(&c.intro_points[0].auth_key.0));
    assert!(!contains(&c.intro_points[0].relay_id.0));
}

#[test]
fn every_tampered_byte_is_refused() {
    let s = service(&PERIOD);
    let c = contents(1);
    let bytes = build(&s, &c, &[], 1);
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = bytes.clone();
            t[i] ^= bit;
            assert!(
                open(&t, &s, None).is_err(),
                "byte {i} bit {bit:#x} accepted"
            );
        }
    }
    assert!(open(&bytes[..bytes.len() - 1], &s, None).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(open(&longer, &s, None).is_err());
}

#[test]
fn wrong_period_expired_cert_and_foreign_signer_are_refused() {
    let s = service(&PERIOD);
    let next = service(&PERIOD.next());
    let bytes = build(&s, &contents(2), &[], 1);
    // Fetched under the next period's blinded key: refused before decrypting.
    let err = UncheckedHsDesc::parse(&bytes)
        .unwrap()
        .check_for(&next.blinded.public(), NOW)
        .unwrap_err();
    assert!(
        err.to_string().contains("another service or time period"),
        "{err}"
    );
    // The next period's subcredential does not decrypt it.
    let v = UncheckedHsDesc::parse(&bytes).unwrap().check(NOW).unwrap();
    assert!(v.decrypt(&next.subcred, None).is_err());
    // Another service's subcredential neither.
    let other = IdentityKeypair::from_seed(&[10; 32]);
    let sc = Subcredential::for_identity(&other.public(), &s.blinded.public());
    assert!(v.decrypt(&sc, None).is_err());
    // The certificate expires.
    let err = UncheckedHsDesc::parse(&bytes)
        .unwrap()
        .check(NOW + 3 * 3600 + 1)
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // A descriptor certified by another blinded key is refused even under that key.
    let mallory = Service {
        blinded: BlindedKeypair::derive(&IdentityKeypair::from_seed(&[11; 32]), &PERIOD),
        ..service(&PERIOD)
    };
    let forged = HsDescBuilder {
        blinded: &mallory.blinded,
        signing_key: &s.signing,
        subcredential: &s.subcred,
        revision: 2,
        lifetime_minutes: 180,
        cert_expires: NOW + 3600,
        contents: &contents(1),
        auth_clients: &[],
    }
    .build()
    .unwrap();
    assert!(
        UncheckedHsDesc::parse(&forged)
            .unwrap()
            .check_for(&s.blinded.public(), NOW)
            .is_err()
    );
}

#[test]
fn client_authorization() {
    let s = service(&PERIOD);
    let alice = X25519Secret::generate();
    let bob = X25519Secret::generate();
    let eve = X25519Secret::generate();
    let c = contents(2);
    let bytes = build(&s, &c, &[alice.public(), bob.public()], 1);
    assert_eq!(open(&bytes, &s, Some(&alice)).unwrap(), c);
    assert_eq!(open(&bytes, &s, Some(&bob)).unwrap(), c);
    let err = open(&bytes, &s, Some(&eve)).unwrap_err();
    assert!(err.to_string().contains("not authorised"), "{err}");
    let err = open(&bytes, &s, None).unwrap_err();
    assert!(err.to_string().contains("configure a client key"), "{err}");
}

#[test]
fn client_count_and_auth_use_do_not_change_the_size() {
    let s = service(&PERIOD);
    let c = contents(3);
    let none = build(&s, &c, &[], 1).len();
    let keys: Vec<X25519Public> = (0..AUTH_CLIENT_BLOCK)
        .map(|_| X25519Secret::generate().public())
        .collect();
    for n in [1, 3, AUTH_CLIENT_BLOCK] {
        assert_eq!(build(&s, &c, &keys[..n], 1).len(), none, "{n} clients");
    }
    let more: Vec<X25519Public> = (0..=AUTH_CLIENT_BLOCK)
        .map(|_| X25519Secret::generate().public())
        .collect();
    assert!(build(&s, &c, &more, 1).len() > none);
    // One to three intro points pad to the same size as well.
    assert_eq!(build(&s, &contents(1), &[], 1).len(), none);
}

#[test]
fn builder_bounds() {
    let s = service(&PERIOD);
    let mk = |c: &HsDescContents, lifetime| {
        HsDescBuilder {
            blinded: &s.blinded,
            signing_key: &s.signing,
            subcredential: &s.subcred,
            revision: 1,
            lifetime_minutes: lifetime,
            cert_expires: NOW,
            contents: c,
            auth_clients: &[],
        }
        .build()
    };
    assert!(mk(&contents(0), 180).is_err());
    assert!(mk(&contents(21), 180).is_err());
    assert!(mk(&contents(20), 180).is_ok());
    assert!(mk(&contents(1), 0).is_err());
    assert!(mk(&contents(1), 721).is_err());
    assert!(UncheckedHsDesc::parse(&vec![0u8; MAX_HS_DESC_LEN + 1]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = UncheckedHsDesc::parse(&bytes).map(|u| u.check(NOW));
    }
}

// ---------------------------------------------------------------------------------------------
// The ring

fn relays(n: u8) -> Vec<RelayId> {
    (0..n).map(|i| RelayId([i; 32])).collect()
}

fn blinded(i: u32) -> BlindedPublicKey {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    BlindedKeypair::derive(&IdentityKeypair::from_seed(&seed), &PERIOD).public()
}

/// The reference: relays ordered by clockwise distance from just after `idx`.
fn reference(
    ring: &[RelayId],
    srv: &[u8; 32],
    b: &BlindedPublicKey,
    replicas: u8,
    spread: usize,
) -> Vec<RelayId> {
    let mut out = Vec::new();
    for r in 1..=u64::from(replicas) {
        let idx = hs_index(b, r, &PERIOD);
        let mut order: Vec<(bool, [u8; 32], RelayId)> = ring
            .iter()
            .map(|id| {
                let pos = hsdir_index(id, srv, &PERIOD);
                (pos <= idx, pos, *id) // false (after idx) sorts first
            })
            .collect();
        order.sort();
        out.extend(
            order
                .into_iter()
                .map(|(_, _, id)| id)
                .filter(|id| !out.contains(id))
                .take(spread)
                .collect::<Vec<_>>(),
        );
    }
    out
}

#[test]
fn ring_selection_matches_reference_including_wrap_around() {
    let rs = relays(12);
    let srv = [0x44; 32];
    let ring = HsDirRing::new(rs.iter().copied(), &srv, &PERIOD);
    assert_eq!(ring.len(), 12);
    let p = HsDirParams::default();
    let positions: Vec<[u8; 32]> = {
        let mut v: Vec<_> = rs.iter().map(|id| hsdir_index(id, &srv, &PERIOD)).collect();
        v.sort();
        v
    };
    let mut wrapped = 0;
    for i in 0..200 {
        let b = blinded(i);
        let up = ring.upload_targets(&b, &p);
        assert_eq!(up, reference(&rs, &srv, &b, 2, 4), "service {i}");
        assert_eq!(up.len(), 8);
        let fetch = ring.fetch_candidates(&b, &p);
        assert_eq!(fetch, reference(&rs, &srv, &b, 2, 3));
        assert!(
            fetch.iter().all(|f| up.contains(f)),
            "fetch outside upload set"
        );
        // Count the cases where a replica's picks wrap past the top of the ring.
        for r in 1..=2 {
            let idx = hs_index(&b, r, &PERIOD);
            let after = positions.iter().filter(|pos| **pos > idx).count();
            if after < 4 {
                wrapped += 1;
            }
        }
    }
    assert!(wrapped > 0, "no wrap-around case exercised");
}

#[test]
fn explicit_wrap_around() {
    // Put hs_index past every relay: the first relays of the ring are chosen.
    let rs = relays(6);
    let srv = [1; 32];
    let ring = HsDirRing::new(rs.iter().copied(), &srv, &PERIOD);
    let mut sorted: Vec<([u8; 32], RelayId)> = rs
        .iter()
        .map(|id| (hsdir_index(id, &srv, &PERIOD), *id))
        .collect();
    sorted.sort();
    let top = sorted.last().unwrap().0;
    let b = (0..5000)
        .map(blinded)
        .find(|b| hs_index(b, 1, &PERIOD) > top)
        .expect("some service lands past the top relay");
    let p = HsDirParams {
        n_replicas: 1,
        spread_store: 3,
        spread_fetch: 2,
    };
    let want: Vec<RelayId> = sorted.iter().take(3).map(|e| e.1).collect();
    assert_eq!(ring.upload_targets(&b, &p), want);
}

#[test]
fn small_rings_and_srv_and_period_move_positions() {
    let p = HsDirParams::default();
    let b = blinded(1);
    let ring = HsDirRing::new(relays(3), &[0; 32], &PERIOD);
    let up = ring.upload_targets(&b, &p);
    assert_eq!(up.len(), 3, "all relays, each once");
    let empty = HsDirRing::new(Vec::new(), &[0; 32], &PERIOD);
    assert!(empty.is_empty() && empty.upload_targets(&b, &p).is_empty());
    // Duplicates in the input collapse.
    assert_eq!(
        HsDirRing::new(vec![RelayId([1; 32]); 3], &[0; 32], &PERIOD).len(),
        1
    );
    let id = RelayId([7; 32]);
    assert_ne!(
        hsdir_index(&id, &[0; 32], &PERIOD),
        hsdir_index(&id, &[1; 32], &PERIOD)
    );
    assert_ne!(
        hsdir_index(&id, &[0; 32], &PERIOD),
        hsdir_index(&id, &[0; 32], &PERIOD.next())
    );
    assert_ne!(hs_index(&b, 1, &PERIOD), hs_index(&b, 2, &PERIOD));
    assert_ne!(hs_index(&b, 1, &PERIOD), hs_index(&b, 1, &PERIOD.next()));
    assert_ne!(disaster_srv(&PERIOD), disaster_srv(&PERIOD.next()));
}

fn entry(i: u8, flags: Flags) -> ConsensusEntry {
    ConsensusEntry {
        identity: RelayId([i; 32]),
        link_key: X25519Public([i; 32]),
        onion_key: X25519Public([i; 32]),
        nickname: format!("r{i}"),
        addrs: vec![format!("127.0.0.{i}:9000").parse().unwrap()],
        flags,
        weight: 100,
        exit: ExitPolicy::reject_all(),
        family: vec![],
        measured: false,
    }
}

#[test]
fn ring_from_consensus_uses_hsdir_relays_and_params() {
    let mut params = BTreeMap::new();
    params.insert("hsdir_n_replicas".to_string(), 3);
    params.insert("hsdir_spread_store".to_string(), 2);
    params.insert("hsdir_spread_fetch".to_string(), 0); // out of range: default
    let c = Consensus {
        version: 1,
        method: 2,
        valid_after: NOW,
        fresh_until: NOW + 3600,
        valid_until: NOW + 3 * 3600,
        voters: vec![],
        params,
        relays: (1..=10)
            .map(|i| {
                entry(
                    i,
                    if i % 2 == 0 {
                        Flags::RUNNING | Flags::HSDIR
                    } else {
                        Flags::RUNNING
                    },
                )
            })
            .collect(),
        shared_rand: None,
        bandwidth_weights: BTreeMap::new(),
    };
    let p = HsDirParams::from_consensus(&c);
    assert_eq!(
        p,
        HsDirParams {
            n_replicas: 3,
            spread_store: 2,
            spread_fetch: 3
        }
    );
    let ring = HsDirRing::from_consensus(&c, &disaster_srv(&PERIOD), &PERIOD);
    assert_eq!(ring.len(), 5);
    let up = ring.upload_targets(&blinded(3), &p);
    assert_eq!(up.len(), 5, "3 x 2 capped at the 5 HSDirs");
    assert!(up.iter().all(|id| id.0[0] % 2 == 0), "only HSDir relays");
}

#[test]
fn ring_known_answers() {
    // The same values are recomputed by tools/hs-vectors.py.
    let b = BlindedPublicKey(
        hex::decode("dfc3c2cda1ca398536cd762494f9ce442f241ad6c5f40f6238ce3624b2503d6f")
            .unwrap()
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        hex::encode(hs_index(&b, 1, &PERIOD)),
        "e8f53e81907d1031427b6b4b5bd9fa0976e4251e77a8fcdc1b8bcef96d01a0a5"
    );
    assert_eq!(
        hex::encode(hsdir_index(&RelayId([0x33; 32]), &[0x44; 32], &PERIOD)),
        "ba1a46e3be8dde792b70a6ca4a0757e1121e933d17c954a4e1058d75f6d9356c"
    );
}
