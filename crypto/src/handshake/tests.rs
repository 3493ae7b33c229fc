//! Handshake tests: round trips, every failure the relay and client must detect, TLVs, known-answer
//! vectors with fixed `x`, `y`, `b` (cross-checked by `tools/vectors/crosscheck.py`), and no-panic
//! properties on arbitrary input.

use std::convert::Infallible;

use proptest::prelude::*;
use rand::rand_core::{TryCryptoRng, TryRng};

use super::*;
use crate::keys::IdentityKeypair;

/// An "RNG" that returns fixed bytes: how the known-answer tests fix `x` and `y` (here and in
/// the onion-service tests).
pub(crate) struct FixedRng(pub(crate) Vec<u8>);

impl TryRng for FixedRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        assert!(self.0.len() >= dst.len(), "FixedRng exhausted");
        let rest = self.0.split_off(dst.len());
        dst.copy_from_slice(&self.0);
        self.0 = rest;
        Ok(())
    }
}
impl TryCryptoRng for FixedRng {}

/// 32 bytes from 64 hex digits.
pub(crate) fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

struct Relay {
    id: RelayId,
    onion: X25519Secret,
}

fn relay() -> Relay {
    Relay {
        id: IdentityKeypair::generate().public(),
        onion: X25519Secret::generate(),
    }
}

fn echo_sm(cm: &[u8]) -> Vec<u8> {
    let mut v = b"sm:".to_vec();
    v.extend_from_slice(cm);
    v
}

#[test]
fn round_trip() {
    let r = relay();
    for cm in [&b""[..], b"cm", &[7u8; 700][..]] {
        let (st, skin) = client_start(&r.id, &r.onion.public(), cm).unwrap();
        assert_eq!(skin.len(), ONIONSKIN_OVERHEAD + cm.len());
        let (rk, reply) = relay_respond(&r.id, &[&r.onion], &skin, |got| {
            assert_eq!(got, cm);
            echo_sm(got)
        })
        .unwrap();
        assert_eq!(reply.len(), REPLY_OVERHEAD + 3 + cm.len());
        let (ck, sm) = st.finish(&reply).unwrap();
        assert_eq!(sm, echo_sm(cm));
        assert_eq!(ck.forward(), rk.forward());
        assert_eq!(ck.backward(), rk.backward());
        assert_eq!(ck.binding(), rk.binding());
        assert_ne!(ck.forward(), ck.backward());
    }
}

#[test]
fn previous_onion_key_is_accepted() {
    let r = relay();
    let old = X25519Secret::generate();
    let (st, skin) = client_start(&r.id, &old.public(), b"").unwrap();
    // Either order of current and previous keys works.
    let (rk, reply) = relay_respond(&r.id, &[&r.onion, &old], &skin, echo_sm).unwrap();
    let (ck, _) = st.finish(&reply).unwrap();
    assert_eq!(ck.forward(), rk.forward());
    // A key that is neither current nor previous is refused.
    let (_, skin) = client_start(&r.id, &X25519Secret::generate().public(), b"").unwrap();
    assert!(relay_respond(&r.id, &[&r.onion, &old], &skin, echo_sm).is_err());
}

#[test]
fn wrong_identity_is_refused() {
    let r = relay();
    let other = IdentityKeypair::generate().public();
    let (_, skin) = client_start(&other, &r.onion.public(), b"").unwrap();
    assert!(matches!(
        relay_respond(&r.id, &[&r.onion], &skin, echo_sm),
        Err(CryptoError::HandshakeFailed)
    ));
}

#[test]
fn wrong_onion_key_is_refused() {
    let r = relay();
    let (_, skin) = client_start(&r.id, &X25519Secret::generate().public(), b"").unwrap();
    assert!(relay_respond(&r.id, &[&r.onion], &skin, echo_sm).is_err());
    // Claiming the right B but encrypting to another key fails at the CM tag.
    let (_, mut skin) = client_start(&r.id, &X25519Secret::generate().public(), b"x").unwrap();
    skin[32..64].copy_from_slice(r.onion.public().as_bytes());
    assert!(relay_respond(&r.id, &[&r.onion], &skin, echo_sm).is_err());
}

#[test]
fn tampered_onionskin_is_refused_everywhere() {
    let r = relay();
    let (_, skin) = client_start(&r.id, &r.onion.public(), b"hello").unwrap();
    for i in 0..skin.len() {
        let mut bad = skin.clone();
        bad[i] ^= 0x01;
        let called = std::cell::Cell::new(false);
        let res = relay_respond(&r.id, &[&r.onion], &bad, |cm| {
            called.set(true);
            echo_sm(cm)
        });
        assert!(res.is_err(), "byte {i}");
        assert!(!called.get(), "CM handed out after tampering at byte {i}");
    }
    // Truncated or extended.
    assert!(relay_respond(&r.id, &[&r.onion], &skin[..skin.len() - 1], echo_sm).is_err());
    let mut long = skin.clone();
    long.push(0);
    assert!(relay_respond(&r.id, &[&r.onion], &long, echo_sm).is_err());
}

#[test]
fn tampered_reply_is_refused_everywhere() {
    let r = relay();
    let (_, skin) = client_start(&r.id, &r.onion.public(), b"cm").unwrap();
    let (_, reply) = relay_respond(&r.id, &[&r.onion], &skin, echo_sm).unwrap();
    for i in 0..reply.len() {
        // A fresh client state each time: `finish` consumes it.
        let (st, skin) = client_start(&r.id, &r.onion.public(), b"cm").unwrap();
        let (_, mut reply) = relay_respond(&r.id, &[&r.onion], &skin, echo_sm).unwrap();
        reply[i] ^= 0x80;
        assert!(st.finish(&reply).is_err(), "byte {i}");
    }
    // AUTH of another handshake (replayed reply) fails.
    let (st, _) = client_start(&r.id, &r.onion.public(), b"cm").unwrap();
    assert!(st.finish(&reply).is_err());
    // Truncated / extended.
    let (st, skin) = client_start(&r.id, &r.onion.public(), b"cm").unwrap();
    let (_, reply) = relay_respond(&r.id, &[&r.onion], &skin, echo_sm).unwrap();
    assert!(st.finish(&reply[..reply.len() - 1]).is_err());
    let (st, skin) = client_start(&r.id, &r.onion.public(), b"cm").unwrap();
    let (_, mut reply) = relay_respond(&r.id, &[&r.onion], &skin, echo_sm).unwrap();
    reply.push(0);
    assert!(st.finish(&reply).is_err());
}

/// Low-order points (RFC 7748 §5 / the usual blacklist) give an all-zero DH: an error everywhere.
#[test]
fn low_order_points_are_refused() {
    let low_order: [[u8; 32]; 3] = [
        [0u8; 32],
        {
            let mut p = [0u8; 32];
            p[0] = 1;
            p
        },
        h32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ];
    let r = relay();
    for p in low_order {
        // Client: B of low order.
        assert!(matches!(
            client_start(&r.id, &X25519Public(p), b""),
            Err(CryptoError::HandshakeFailed)
        ));
        // Relay: X of low order.
        let (_, mut skin) = client_start(&r.id, &r.onion.public(), b"").unwrap();
        skin[64..96].copy_from_slice(&p);
        assert!(relay_respond(&r.id, &[&r.onion], &skin, echo_sm).is_err());
        // Client: Y of low order.
        let (st, skin) = client_start(&r.id, &r.onion.public(), b"").unwrap();
        let (_, mut reply) = relay_respond(&r.id, &[&r.onion], &skin, echo_sm).unwrap();
        reply[..32].copy_from_slice(&p);
        assert!(st.finish(&reply).is_err());
    }
}

#[test]
fn client_message_length_is_bounded() {
    let r = relay();
    let big = vec![0u8; MAX_HANDSHAKE_MSG + 1];
    assert!(matches!(
        client_start(&r.id, &r.onion.public(), &big),
        Err(CryptoError::MessageTooLong { .. })
    ));
    let (_, skin) = client_start(&r.id, &r.onion.public(), b"").unwrap();
    assert!(
        relay_respond(&r.id, &[&r.onion], &skin, |_| vec![
            0u8;
            MAX_HANDSHAKE_MSG + 1
        ])
        .is_err()
    );
}

#[test]
fn tlv_parse_and_encode() {
    let enc = tlv::encode(&[(1, b"\x01"), (200, b""), (2, &[9u8; 255])]).unwrap();
    let parsed = tlv::parse(&enc).unwrap();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[0], (1, &b"\x01"[..]));
    assert_eq!(parsed[1], (200, &b""[..]));
    assert_eq!(parsed[2].1.len(), 255);
    assert!(tlv::parse(b"").unwrap().is_empty());
    // Malformed: truncated header or value.
    assert!(matches!(
        tlv::parse(b"\x01"),
        Err(CryptoError::MalformedTlv)
    ));
    assert!(tlv::parse(b"\x01\x02\x00").is_err());
    assert!(tlv::parse(&[1, 1, 5, 7, 3, 0xff]).is_err());
    // Too long a value cannot be encoded.
    assert!(tlv::encode(&[(1, &[0u8; 256])]).is_err());
    // The iterator stops after the first error.
    let items: Vec<_> = tlv::iter(&[1, 0, 2, 9]).collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok() && items[1].is_err());
}

// ---- Known-answer vectors (fixed x, y, b). Recomputed independently by tools/vectors/crosscheck.py.

/// Ed25519 identity seed; ID is its public key.
const KAT_ID_SEED: &str = "1111111111111111111111111111111111111111111111111111111111111111";
/// The ID derived from the seed.
const KAT_ID: &str = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737";
/// Relay onion secret b.
const KAT_B_SECRET: &str = "4041424344454647484940414243444546474849404142434445464748494041";
/// Client ephemeral x.
const KAT_X_SECRET: &str = "8081828384858687888980818283848586878889808182838485868788898081";
/// Relay ephemeral y.
const KAT_Y_SECRET: &str = "c0c1c2c3c4c5c6c7c8c9c0c1c2c3c4c5c6c7c8c9c0c1c2c3c4c5c6c7c8c9c0c1";
/// CM: TLV type 1 (value 0x01), type 0x7f (value "allium").
const KAT_CM: &str = "0101017f06616c6c69756d";
/// SM: TLV type 1 (value 0x02).
const KAT_SM: &str = "010102";
const KAT_ONIONSKIN: &str = concat!(
    "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737",
    "2be60d36010ca44e64016080e9ef9b467827f1e7ec3cd9e9be4ce22f49651818",
    "5778b0241db33a4198fada92d153e6fab1d65ed721f04842dcab90299b4be809",
    "000b44d7c70c240bee4e3e2c2769ed5b5982373a3b2634ed3da99d60ad",
);
const KAT_REPLY: &str = concat!(
    "f67d5638b3e99e4f38213a03325c577097c0ef825f646656f212fff163e7e618",
    "e074a1c12660fec88368bc48c8b45e6ed562c571787bd9306ae5d5ecaf9aacc9",
    "0003613b36c3743e560e570831ec7d84684f79a0e7",
);
const KAT_KEY_FORWARD: &str = "df06557e363f0123e775fafaf34c939b8504b2f95f9fc02a5b89437b0f8c2146";
const KAT_KEY_BACKWARD: &str = "8a2540683e7cf7b78c091fbeab27e4e46ef3fc7e502cc62113dd1bb5542c56c5";
const KAT_KEY_BINDING: &str = "0e6db336351089f1fed1d8937301f727ac615881ed12f67a5147af9b834f19e0";

#[test]
fn known_answer_vector() {
    let id_kp = IdentityKeypair::from_seed(&h32(KAT_ID_SEED));
    let id = id_kp.public();
    assert_eq!(id.to_hex(), KAT_ID);
    let b = X25519Secret::from_bytes(h32(KAT_B_SECRET));
    let cm = hex::decode(KAT_CM).unwrap();
    let sm = hex::decode(KAT_SM).unwrap();
    let (st, skin) = client_start_with_rng(
        &mut FixedRng(hex::decode(KAT_X_SECRET).unwrap()),
        &id,
        &b.public(),
        &cm,
    )
    .unwrap();
    let (rk, reply) = relay_respond_with_rng(
        &mut FixedRng(hex::decode(KAT_Y_SECRET).unwrap()),
        &id,
        &[&b],
        &skin,
        |got| {
            assert_eq!(got, &cm[..]);
            sm.clone()
        },
    )
    .unwrap();
    let (ck, got_sm) = st.finish(&reply).unwrap();
    assert_eq!(got_sm, sm);
    let show = [
        ("KAT_ONIONSKIN", hex::encode(&skin)),
        ("KAT_REPLY", hex::encode(&reply)),
        ("KAT_KEY_FORWARD", hex::encode(ck.forward())),
        ("KAT_KEY_BACKWARD", hex::encode(ck.backward())),
        ("KAT_KEY_BINDING", hex::encode(ck.binding())),
    ];
    for (name, v) in &show {
        println!("{name} = {v}");
    }
    assert_eq!(hex::encode(&skin), KAT_ONIONSKIN);
    assert_eq!(hex::encode(&reply), KAT_REPLY);
    assert_eq!(hex::encode(ck.forward()), KAT_KEY_FORWARD);
    assert_eq!(hex::encode(ck.backward()), KAT_KEY_BACKWARD);
    assert_eq!(hex::encode(ck.binding()), KAT_KEY_BINDING);
    assert_eq!(rk.forward(), ck.forward());
}

/// RFC 7748 §5.2 and §6.1 x25519 vectors, through the dalek API the handshake uses.
#[test]
fn rfc7748_x25519_vectors() {
    let k = h32("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
    let u = h32("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
    assert_eq!(
        hex::encode(x25519_dalek::x25519(k, u)),
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    );
    // §6.1 Diffie-Hellman.
    let a = X25519Secret::from_bytes(h32(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let b = X25519Secret::from_bytes(h32(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    assert_eq!(
        hex::encode(a.public().as_bytes()),
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    );
    assert_eq!(
        hex::encode(b.public().as_bytes()),
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    );
    let shared = a.to_static().diffie_hellman(&PublicKey::from(b.public().0));
    assert_eq!(
        hex::encode(shared.as_bytes()),
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    );
    // A ReusableSecret drawn from fixed bytes is the same scalar (what the KAT relies on).
    let x = ReusableSecret::random_from_rng(&mut FixedRng(
        hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap(),
    ));
    assert_eq!(PublicKey::from(&x).to_bytes(), a.public().0);
}

/// RFC 5869 test cases 1 and 3 (HKDF-SHA256), through the same `Hkdf` API as `kdf`.
#[test]
fn rfc5869_hkdf_vectors() {
    let ikm = [0x0bu8; 22];
    let salt = hex::decode("000102030405060708090a0b0c").unwrap();
    let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
    let mut okm = [0u8; 42];
    Hkdf::<Sha256>::new(Some(&salt), &ikm)
        .expand(&info, &mut okm)
        .unwrap();
    assert_eq!(
        hex::encode(okm),
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
    let mut okm = [0u8; 42];
    Hkdf::<Sha256>::new(None, &ikm)
        .expand(&[], &mut okm)
        .unwrap();
    assert_eq!(
        hex::encode(okm),
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    );
    // `kdf` is HKDF with salt = info = the tweak.
    let mut a = [0u8; 32];
    kdf(b"t", b"s", &mut a).unwrap();
    let mut b = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"t"), b"s")
        .expand(b"t", &mut b)
        .unwrap();
    assert_eq!(a, b);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn relay_respond_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let r = relay();
        prop_assert!(relay_respond(&r.id, &[&r.onion], &bytes, echo_sm).is_err());
    }

    #[test]
    fn relay_respond_with_valid_prefix_never_panics(cut in 0usize..140, junk in proptest::collection::vec(any::<u8>(), 0..40)) {
        let r = relay();
        let (_, mut skin) = client_start(&r.id, &r.onion.public(), b"0123456789").unwrap();
        skin.truncate(cut.min(skin.len()));
        skin.extend_from_slice(&junk);
        let _ = relay_respond(&r.id, &[&r.onion], &skin, echo_sm);
    }

    #[test]
    fn finish_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let r = relay();
        let (st, _) = client_start(&r.id, &r.onion.public(), b"").unwrap();
        prop_assert!(st.finish(&bytes).is_err());
    }

    #[test]
    fn tlv_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = tlv::parse(&bytes);
    }
}
