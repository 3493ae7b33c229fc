//! Onion-service crypto tests: addresses, blinding, periods, descriptor layers, client
//! authorization, the INTRODUCE handshake, and known-answer vectors (cross-checked for the address
//! and the blinded key by `tools/hs-vectors.py`).

use super::ntor::{self, IntroKeys};
use super::subcred::{
    AuthClientEntry, DescLayer, decrypt_layer, encrypt_layer, encrypt_layer_with_salt,
    open_client_entry,
};
use super::*;
use crate::handshake::tests::{FixedRng, h32};
use crate::keys::{IdentityKeypair, RelayId, X25519Secret};

/// The fixed inputs of every vector (also in `tools/hs-vectors.py` and the protocol doc).
const SEED: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
const PERIOD: TimePeriod = TimePeriod {
    number: 20787,
    length_minutes: 1440,
};

fn service() -> IdentityKeypair {
    IdentityKeypair::from_seed(&h32(SEED))
}

// ---------------------------------------------------------------------------------------------
// Addresses

#[test]
fn address_round_trip_and_forms() {
    let id = service().public();
    let addr = HsAddress::from_identity(&id).unwrap();
    let s = addr.to_string();
    assert_eq!(s.len(), 56 + ADDR_SUFFIX.len());
    assert!(s.ends_with(".allium.alt"));
    assert!(
        s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.')
    );
    assert_eq!(HsAddress::parse(&s).unwrap(), addr);
    assert_eq!(HsAddress::parse(&s).unwrap().identity(), id);
    // Case folds, a trailing dot and extra leading labels are accepted.
    assert_eq!(HsAddress::parse(&s.to_ascii_uppercase()).unwrap(), addr);
    assert_eq!(HsAddress::parse(&format!("{s}.")).unwrap(), addr);
    assert_eq!(HsAddress::parse(&format!("www.{s}")).unwrap(), addr);
    assert!(is_hs_hostname(&s));
    assert!(is_hs_hostname("anything.ALLIUM.alt"));
    assert!(!is_hs_hostname("example.com"));
    assert!(!is_hs_hostname("notallium.alt"));
    // Debug shows only a prefix.
    assert!(!format!("{addr:?}").contains(&addr.label()));
}

#[test]
fn address_errors_are_precise() {
    let addr = HsAddress::from_identity(&service().public()).unwrap();
    let label = addr.label();
    assert_eq!(
        HsAddress::parse(&format!("{label}.onion")),
        Err(AddrError::WrongSuffix)
    );
    assert_eq!(
        HsAddress::parse(&format!("{}.allium.alt", &label[1..])),
        Err(AddrError::WrongLength(55))
    );
    let mut bad = label.clone().into_bytes();
    bad[3] = b'1';
    assert_eq!(
        HsAddress::parse(&format!("{}.allium.alt", String::from_utf8(bad).unwrap())),
        Err(AddrError::BadCharacter)
    );
    // Change one character of the key part: the checksum no longer matches.
    let mut typo = label.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    assert_eq!(
        HsAddress::parse(&format!("{}.allium.alt", String::from_utf8(typo).unwrap())),
        Err(AddrError::BadChecksum)
    );
    // Version 2 with a correct checksum for version 2 is refused as unknown.
    let key = service().public().0;
    let mut raw = [0u8; 35];
    raw[..32].copy_from_slice(&key);
    let c = hash(addr::DOMAIN_CHECKSUM, &[&key, &[2]]);
    raw[32..34].copy_from_slice(&c[..2]);
    raw[34] = 2;
    let v2 = base32_for_test(&raw);
    assert_eq!(
        HsAddress::parse(&format!("{v2}.allium.alt")),
        Err(AddrError::UnknownVersion(2))
    );
    // A small-order point (the identity element) is not a service key.
    let mut ident = [0u8; 32];
    ident[0] = 1;
    assert_eq!(
        HsAddress::from_identity(&RelayId(ident)),
        Err(AddrError::BadKey)
    );
    // Non-ASCII input of the right byte length is refused without panicking.
    let weird = format!("{}é.allium.alt", &label[..54]);
    assert!(HsAddress::parse(&weird).is_err());
}

/// A second, bit-by-bit base32 encoder (so the test does not reuse the code under test).
fn base32_for_test(raw: &[u8]) -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    bits.chunks(5)
        .map(|c| alphabet[c.iter().fold(0usize, |a, &b| a * 2 + usize::from(b))] as char)
        .collect()
}

#[test]
fn address_encoding_matches_independent_base32() {
    let key = service().public().0;
    let addr = HsAddress::from_identity(&RelayId(key)).unwrap();
    let mut raw = [0u8; 35];
    raw[..32].copy_from_slice(&key);
    raw[32..34].copy_from_slice(&hash(addr::DOMAIN_CHECKSUM, &[&key, &[1]])[..2]);
    raw[34] = 1;
    assert_eq!(addr.label(), base32_for_test(&raw));
}

// ---------------------------------------------------------------------------------------------
// Time periods and blinding

#[test]
fn time_periods_turn_over_at_the_offset() {
    let p = TimePeriodParams::DEFAULT;
    assert_eq!(p.rotation_offset_minutes, 720);
    // 2026-11-30 11:59:59 UTC and 12:00:00 UTC straddle a boundary.
    let noon = 1_796_040_000u64; // 2026-11-30T12:00:00Z
    assert_eq!(noon % 86_400, 43_200);
    let before = p.period_at(noon - 1);
    let after = p.period_at(noon);
    assert_eq!(after.number, before.number + 1);
    assert_eq!(p.start_unix(after.number), noon);
    assert_eq!(before.next(), after);
    assert_eq!(after.prev(), before);
    // Consensus parameter: in range is used, out of range falls back to the default.
    assert_eq!(
        TimePeriodParams::from_consensus(Some(60)).length_minutes,
        60
    );
    assert_eq!(
        TimePeriodParams::from_consensus(Some(1)),
        TimePeriodParams::DEFAULT
    );
    assert_eq!(
        TimePeriodParams::from_consensus(Some(-5)),
        TimePeriodParams::DEFAULT
    );
    assert_eq!(
        TimePeriodParams::from_consensus(None),
        TimePeriodParams::DEFAULT
    );
    let t = TimePeriodParams::TESTNET;
    let q = t.period_at(noon + 7);
    assert!(t.start_unix(q.number) <= noon + 7 && noon + 7 < t.start_unix(q.number + 1));
    assert_eq!(q.length_minutes, 20);
}

#[test]
fn blinded_signatures_verify_under_the_blinded_key_only() {
    let id = service();
    let kp = BlindedKeypair::derive(&id, &PERIOD);
    let pubkey = BlindedPublicKey::derive(&id.public(), &PERIOD).unwrap();
    assert_eq!(kp.public(), pubkey, "h·a·B must equal h·A");
    assert_ne!(pubkey.0, id.public().0);
    let sig = kp.sign("allium/v1/test", b"body");
    pubkey.verify("allium/v1/test", b"body", &sig).unwrap();
    // The standard strict verifier agrees.
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pubkey.0).unwrap();
    let mut msg = b"allium/v1/test\0".to_vec();
    msg.extend_from_slice(b"body");
    vk.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .unwrap();
    assert!(pubkey.verify("allium/v1/test", b"bodz", &sig).is_err());
    assert!(pubkey.verify("allium/v1/other", b"body", &sig).is_err());
    assert!(id.public().verify("allium/v1/test", b"body", &sig).is_err());
    // Another period: another key, and this period's signature does not verify under it.
    let next = BlindedPublicKey::derive(&id.public(), &PERIOD.next()).unwrap();
    assert_ne!(next, pubkey);
    assert!(next.verify("allium/v1/test", b"body", &sig).is_err());
    // Another length with the same number is another period too.
    let other_len = TimePeriod {
        number: PERIOD.number,
        length_minutes: 60,
    };
    assert_ne!(
        BlindedPublicKey::derive(&id.public(), &other_len).unwrap(),
        pubkey
    );
    // Signing the same message in two periods uses unrelated nonces (R differs).
    let sig2 = BlindedKeypair::derive(&id, &PERIOD.next()).sign("allium/v1/test", b"body");
    assert_ne!(sig[..32], sig2[..32]);
}

#[test]
fn blinding_refuses_bad_keys() {
    let mut ident = [0u8; 32];
    ident[0] = 1;
    assert!(BlindedPublicKey::derive(&RelayId(ident), &PERIOD).is_err());
    assert!(BlindedPublicKey::derive(&RelayId([0xff; 32]), &PERIOD).is_err());
}

// ---------------------------------------------------------------------------------------------
// Subcredentials and descriptor layers

fn subcred_for(period: &TimePeriod) -> (BlindedPublicKey, Subcredential) {
    let id = service().public();
    let b = BlindedPublicKey::derive(&id, period).unwrap();
    (b, Subcredential::for_identity(&id, &b))
}

#[test]
fn layers_round_trip_and_refuse_every_wrong_input() {
    let (b, sc) = subcred_for(&PERIOD);
    let (b2, sc2) = subcred_for(&PERIOD.next());
    let cookie = DescCookie::from_bytes([7; 32]);
    let msg = b"intro points and more".to_vec();
    for layer in [DescLayer::Super, DescLayer::Inner] {
        let ct = encrypt_layer(layer, &b, &sc, 5, None, &msg).unwrap();
        assert_eq!(ct.len(), msg.len() + subcred::LAYER_OVERHEAD);
        assert_eq!(&*decrypt_layer(layer, &b, &sc, 5, None, &ct).unwrap(), &msg);
        let other = match layer {
            DescLayer::Super => DescLayer::Inner,
            DescLayer::Inner => DescLayer::Super,
        };
        assert!(decrypt_layer(other, &b, &sc, 5, None, &ct).is_err());
        assert!(decrypt_layer(layer, &b, &sc, 6, None, &ct).is_err());
        assert!(decrypt_layer(layer, &b, &sc2, 5, None, &ct).is_err());
        assert!(decrypt_layer(layer, &b2, &sc, 5, None, &ct).is_err());
        assert!(decrypt_layer(layer, &b, &sc, 5, Some(&cookie), &ct).is_err());
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 0x01;
            assert!(
                decrypt_layer(layer, &b, &sc, 5, None, &t).is_err(),
                "byte {i}"
            );
        }
        assert!(decrypt_layer(layer, &b, &sc, 5, None, &ct[..20]).is_err());
        assert!(decrypt_layer(layer, &b, &sc, 5, None, &[]).is_err());
        // With a cookie: only the same cookie opens it.
        let ct = encrypt_layer(layer, &b, &sc, 5, Some(&cookie), &msg).unwrap();
        assert!(decrypt_layer(layer, &b, &sc, 5, None, &ct).is_err());
        let wrong = DescCookie::from_bytes([8; 32]);
        assert!(decrypt_layer(layer, &b, &sc, 5, Some(&wrong), &ct).is_err());
        assert_eq!(
            &*decrypt_layer(layer, &b, &sc, 5, Some(&cookie), &ct).unwrap(),
            &msg
        );
    }
    // Fresh salt: two encryptions of the same plaintext differ.
    let a = encrypt_layer(DescLayer::Super, &b, &sc, 5, None, &msg).unwrap();
    let c = encrypt_layer(DescLayer::Super, &b, &sc, 5, None, &msg).unwrap();
    assert_ne!(a, c);
}

#[test]
fn client_auth_opens_for_authorised_clients_only() {
    let (_, sc) = subcred_for(&PERIOD);
    let eph = X25519Secret::generate();
    let alice = X25519Secret::generate();
    let bob = X25519Secret::generate();
    let mallory = X25519Secret::generate();
    let cookie = DescCookie::generate();
    let mut entries = vec![
        AuthClientEntry::for_client(&sc, &eph, &alice.public(), &cookie).unwrap(),
        AuthClientEntry::for_client(&sc, &eph, &bob.public(), &cookie).unwrap(),
    ];
    entries.extend((0..14).map(|_| AuthClientEntry::fake()));
    for c in [&alice, &bob] {
        let got = open_client_entry(&sc, c, &eph.public(), &entries).unwrap();
        assert_eq!(got.as_bytes(), cookie.as_bytes());
    }
    assert!(open_client_entry(&sc, &mallory, &eph.public(), &entries).is_err());
    // Wrong period's subcredential: alice's id no longer matches.
    let (_, sc2) = subcred_for(&PERIOD.next());
    assert!(open_client_entry(&sc2, &alice, &eph.public(), &entries).is_err());
    // A tampered cookie is refused.
    let mut t = entries.clone();
    t[0].cookie_ct[3] ^= 1;
    assert!(open_client_entry(&sc, &alice, &eph.public(), &t).is_err());
}

// ---------------------------------------------------------------------------------------------
// INTRODUCE handshake

struct Svc {
    auth: RelayId,
    enc: X25519Secret,
}

fn svc() -> Svc {
    Svc {
        auth: IdentityKeypair::from_seed(&[0x42; 32]).public(),
        enc: X25519Secret::from_bytes([0x24; 32]),
    }
}

#[test]
fn intro_round_trip_gives_both_sides_the_same_keys() {
    let s = svc();
    let (_, sc) = subcred_for(&PERIOD);
    let enc_pub = s.enc.public();
    let keys = IntroKeys {
        auth_key: &s.auth,
        enc_key: &enc_pub,
        subcredential: &sc,
    };
    let (client, enc) = ntor::client_start(&keys, b"header", b"rendezvous cookie etc").unwrap();
    let (pt, st) = ntor::service_open(&keys, &s.enc, b"header", &enc).unwrap();
    assert_eq!(&pt[..], b"rendezvous cookie etc");
    let (reply, svc_keys) = st.respond(&keys).unwrap();
    let cli_keys = client.finish(&keys, &reply).unwrap();
    assert_eq!(svc_keys.forward(), cli_keys.forward());
    assert_eq!(svc_keys.backward(), cli_keys.backward());
    assert_eq!(svc_keys.binding(), cli_keys.binding());
    assert_ne!(cli_keys.forward(), cli_keys.backward());
    assert_eq!(ntor::replay_token(&enc), ntor::replay_token(&enc));
}

#[test]
fn intro_refuses_tampering_and_wrong_keys() {
    let s = svc();
    let (_, sc) = subcred_for(&PERIOD);
    let (_, sc_next) = subcred_for(&PERIOD.next());
    let enc_pub = s.enc.public();
    let keys = IntroKeys {
        auth_key: &s.auth,
        enc_key: &enc_pub,
        subcredential: &sc,
    };
    let (client, enc) = ntor::client_start(&keys, b"hdr", b"payload").unwrap();
    // Every byte of the encrypted part, and the header, are authenticated.
    for i in 0..enc.len() {
        let mut t = enc.clone();
        t[i] ^= 0x80;
        assert!(
            ntor::service_open(&keys, &s.enc, b"hdr", &t).is_err(),
            "byte {i}"
        );
    }
    assert!(ntor::service_open(&keys, &s.enc, b"hdR", &enc).is_err());
    assert!(ntor::service_open(&keys, &s.enc, b"hdr", &enc[..40]).is_err());
    // Wrong subcredential (wrong period or address), wrong auth key, wrong service key.
    let wrong_sc = IntroKeys {
        subcredential: &sc_next,
        ..keys
    };
    assert!(ntor::service_open(&wrong_sc, &s.enc, b"hdr", &enc).is_err());
    let other_auth = IdentityKeypair::from_seed(&[0x43; 32]).public();
    let wrong_auth = IntroKeys {
        auth_key: &other_auth,
        ..keys
    };
    assert!(ntor::service_open(&wrong_auth, &s.enc, b"hdr", &enc).is_err());
    let other = X25519Secret::from_bytes([0x25; 32]);
    assert!(ntor::service_open(&keys, &other, b"hdr", &enc).is_err());
    // A low-order X is refused.
    let mut low = enc.clone();
    low[..32].copy_from_slice(&[0u8; 32]);
    assert!(ntor::service_open(&keys, &s.enc, b"hdr", &low).is_err());
    // A tampered reply is refused by the client; so is a reply of the wrong length.
    let (_, st) = ntor::service_open(&keys, &s.enc, b"hdr", &enc).unwrap();
    let (reply, _) = st.respond(&keys).unwrap();
    for i in [0usize, 31, 32, 63] {
        let (c2, _) = ntor::client_start(&keys, b"hdr", b"payload").unwrap();
        let mut r = reply;
        r[i] ^= 1;
        assert!(c2.finish(&keys, &r).is_err());
    }
    assert!(client.finish(&keys, &reply[..63]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Known-answer vectors (the same numbers are in docs/protocol/96-onion-services.md; the address
// and the blinded key are recomputed independently by tools/hs-vectors.py).

/// Compare a list of named hex values with the expected ones, all at once (a failure shows every
/// value, which is how the vectors were recorded).
fn check_vectors(got: &[(&str, String)], want: &[(&str, &str)]) {
    let got: Vec<(&str, &str)> = got.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(got, want);
}

#[test]
fn known_answer_address_blinding_subcredential() {
    let id = service();
    let addr = HsAddress::from_identity(&id.public()).unwrap();
    let b = BlindedPublicKey::derive(&id.public(), &PERIOD).unwrap();
    let cred = Credential::derive(&id.public());
    let sc = Subcredential::derive(&cred, &b);
    let layer = encrypt_layer_with_salt(DescLayer::Super, &b, &sc, 1, None, &[0x11; 16], b"allium")
        .unwrap();
    check_vectors(
        &[
            ("A", hex::encode(id.public().0)),
            ("address", addr.to_string()),
            (
                "h",
                hex::encode(blind::blinding_factor(&id.public(), &PERIOD)),
            ),
            ("A'", hex::encode(b.0)),
            ("credential", hex::encode(cred.as_bytes())),
            ("subcredential", hex::encode(sc.as_bytes())),
            ("layer", hex::encode(layer)),
        ],
        &[
            (
                "A",
                "4fd099ccd47d7893dfe9ec24414ecb0d9b5420232aad30d91c465be33cbe65c4",
            ),
            (
                "address",
                "j7ijttgupv4jhx7j5qsectwlbwnviibdfkwtbwi4izn6gpf6mxcczvyb.allium.alt",
            ),
            (
                "h",
                "00e4e8e7a037c2cf7f1f920d2b48a225bf62e3c3024f6ca22c56a9a04e094674",
            ),
            (
                "A'",
                "dfc3c2cda1ca398536cd762494f9ce442f241ad6c5f40f6238ce3624b2503d6f",
            ),
            (
                "credential",
                "8100c902e18af194c6053ac05fe0b57b771848ae642d4d28e7c7803ecf20afd7",
            ),
            (
                "subcredential",
                "5b67ec131ace8fc3f1bb2cd8de1d32145ac8d9dcbbf642427aac1f54d3c9620a",
            ),
            (
                "layer",
                "111111111111111111111111111111114424ee35e0a203167cbd3b9cd3465f0c40bd77b08b08",
            ),
        ],
    );
}

#[test]
fn known_answer_intro_handshake() {
    let s = svc();
    let (_, sc) = subcred_for(&PERIOD);
    let enc_pub = s.enc.public();
    let keys = IntroKeys {
        auth_key: &s.auth,
        enc_key: &enc_pub,
        subcredential: &sc,
    };
    let x = [0x01u8; 32];
    let y = [0x02u8; 32];
    let (client, enc) =
        ntor::client_start_with_rng(&mut FixedRng(x.to_vec()), &keys, b"hdr", b"hello").unwrap();
    let (_, st) = ntor::service_open(&keys, &s.enc, b"hdr", &enc).unwrap();
    let (reply, sk) = st
        .respond_with_rng(&mut FixedRng(y.to_vec()), &keys)
        .unwrap();
    let ck = client.finish(&keys, &reply).unwrap();
    assert_eq!(sk.forward(), ck.forward());
    check_vectors(
        &[
            ("AUTH", hex::encode(s.auth.0)),
            ("B", hex::encode(enc_pub.0)),
            ("encrypted", hex::encode(&enc)),
            ("reply", hex::encode(reply)),
            ("forward", hex::encode(ck.forward())),
            ("backward", hex::encode(ck.backward())),
            ("binding", hex::encode(ck.binding())),
        ],
        &[
            (
                "AUTH",
                "2152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db12",
            ),
            (
                "B",
                "04bcd2e0d00f2cce5fe8f1c6c2fbec5c07fa56e3aa5c88a5689975d88b3fce05",
            ),
            (
                "encrypted",
                "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209b95e57598b8191b900d9f030cf7d00f37e5335c17e",
            ),
            (
                "reply",
                "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59618d59bb4a4f2f302be5877615d0a4ba6e751e84fb0601a1cb5e5a7a77ad2a17",
            ),
            (
                "forward",
                "69cdeba660a3c1bba4b2d0216b16b8acdc399cecd771745d929aa9dddcb082f7",
            ),
            (
                "backward",
                "ce36a04de3ad5f48d4c23fa3bd3f1e1d98005cf3908ff5fbe5aad30708bd3078",
            ),
            (
                "binding",
                "ab4ef5dece91df1b1645c7cc62b169f69334a6921a948f32e4756cde8bfb1c3a",
            ),
        ],
    );
}
