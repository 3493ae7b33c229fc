//! The end-to-end INTRODUCE handshake between an onion-service client and the service
//! (rend-spec-v3's hs-ntor shape, on x25519, HMAC/HKDF-SHA256 and ChaCha20-Poly1305).
//!
//! Inputs both sides know from the descriptor: the introduction point's auth key `AUTH` (Ed25519
//! public, 32 bytes), the service's per-descriptor encryption key `B` (x25519) and the
//! `subcredential` (which only those who know the address can compute). `PROTO =
//! "allium-hs-ntor-x25519-sha256-1"`, `KDF(t, s, L) = HKDF-SHA256(salt = t, ikm = s, info = t, L)`,
//! `H(t, m) = HMAC-SHA256(key = t, m)`.
//!
//! ```text
//! client:  x, X = x·G;  Bx = x·B
//!          K1 = KDF(PROTO|":intro_enc", Bx | AUTH | X | B | PROTO | subcredential, 32)
//!          encrypted = X[32] | ChaCha20-Poly1305(K1, 0^12, ad = u64be(len hdr) | hdr | X, plaintext) | tag[16]
//! service: Xb = b·X, opens the plaintext;  y, Y = y·G;  Xy = y·X
//!          si     = Xy | Xb | AUTH | B | X | Y | PROTO | subcredential
//!          seed   = H(PROTO|":key_seed", si);  verify = H(PROTO|":verify", si)
//!          AUTH_M = H(PROTO|":auth", verify | AUTH | B | Y | X | PROTO | "Server")
//!          keys   = KDF(PROTO|":kdf_final", seed, 96) = forward[32] | backward[32] | binding[32]
//!          reply  = Y[32] | AUTH_M[32]          (carried back in RENDEZVOUS1/RENDEZVOUS2)
//! client:  Yx = x·Y, Bx as before; recomputes si, checks AUTH_M in constant time, derives keys.
//! ```
//!
//! `hdr` is whatever cleartext part of INTRODUCE1 the cell layer wants authenticated (it is opaque
//! here; the cell code defines it). Every DH output is checked for contribution.
//!
//! **For the relay-cell layer:** the result is a [`HopKeys`]: `forward()` seeds the ratchet of cells
//! the *client* sends to the *service*, `backward()` the ratchet of cells from the service to the
//! client, exactly as for a hop where the client is the origin and the service the hop; `binding()`
//! is a value both ends share (not a cell key).
//!
//! **Replay:** the encrypted part is bound to a fresh `X`; the service must remember
//! [`replay_token`] of every INTRODUCE2 it accepted for the lifetime of its intro key and refuse a
//! repeat (the cache is the caller's: this module has no state).

use std::fmt;

use rand::CryptoRng;
use x25519_dalek::{EphemeralSecret, PublicKey, ReusableSecret, SharedSecret};
use zeroize::Zeroizing;

use super::subcred::Subcredential;
use super::{HsError, hash};
use crate::aead;
use crate::handshake::{self, HopKeys};
use crate::keys::{KEY_LEN, RelayId, X25519Public, X25519Secret};

/// The protocol identifier of this handshake.
pub const PROTO: &[u8] = b"allium-hs-ntor-x25519-sha256-1";
/// Bytes the encrypted part adds to the plaintext: `X | … | tag`.
pub const ENCRYPTED_OVERHEAD: usize = KEY_LEN + aead::TAG_LEN;
/// Length of the service's reply `Y | AUTH_M`.
pub const REPLY_LEN: usize = 2 * KEY_LEN;
/// Domain string of [`replay_token`].
pub const DOMAIN_REPLAY: &[u8] = b"allium-hs-intro-replay";

const T_INTRO_ENC: &[u8] = b"allium-hs-ntor-x25519-sha256-1:intro_enc";
const T_KEY_SEED: &[u8] = b"allium-hs-ntor-x25519-sha256-1:key_seed";
const T_VERIFY: &[u8] = b"allium-hs-ntor-x25519-sha256-1:verify";
const T_AUTH: &[u8] = b"allium-hs-ntor-x25519-sha256-1:auth";
const T_KDF_FINAL: &[u8] = b"allium-hs-ntor-x25519-sha256-1:kdf_final";
const SERVER_STR: &[u8] = b"Server";
const ZERO_NONCE: [u8; aead::NONCE_LEN] = [0u8; aead::NONCE_LEN];
const FAIL: HsError = HsError::HandshakeFailed;

/// The public inputs both sides take from the descriptor.
#[derive(Clone, Copy, Debug)]
pub struct IntroKeys<'a> {
    /// The introduction point's auth key (Ed25519 public).
    pub auth_key: &'a RelayId,
    /// The service's per-descriptor encryption key `B` (x25519 public).
    pub enc_key: &'a X25519Public,
    /// The subcredential of the period the descriptor belongs to.
    pub subcredential: &'a Subcredential,
}

/// A digest of an INTRODUCE encrypted part, for the service's replay cache.
pub fn replay_token(encrypted: &[u8]) -> [u8; 32] {
    hash(DOMAIN_REPLAY, &[encrypted])
}

// The circuit handshake's primitives (`crate::handshake`), with this module's one error.

fn kdf(t: &[u8], s: &[u8], okm: &mut [u8]) -> Result<(), HsError> {
    handshake::kdf(t, s, okm).map_err(|_| FAIL)
}

fn mac32(t: &[u8], parts: &[&[u8]]) -> Result<Zeroizing<[u8; 32]>, HsError> {
    handshake::hmac32(t, parts).map_err(|_| FAIL)
}

fn contributory(s: SharedSecret) -> Result<Zeroizing<[u8; KEY_LEN]>, HsError> {
    handshake::contributory(s).map_err(|_| FAIL)
}

fn intro_key(
    bx: &[u8; KEY_LEN],
    keys: &IntroKeys<'_>,
    big_x: &[u8; KEY_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>, HsError> {
    let mut si1 = Zeroizing::new(Vec::with_capacity(5 * KEY_LEN + PROTO.len()));
    si1.extend_from_slice(bx);
    si1.extend_from_slice(&keys.auth_key.0);
    si1.extend_from_slice(big_x);
    si1.extend_from_slice(&keys.enc_key.0);
    si1.extend_from_slice(PROTO);
    si1.extend_from_slice(keys.subcredential.as_bytes());
    let mut k1 = Zeroizing::new([0u8; KEY_LEN]);
    kdf(T_INTRO_ENC, &si1, &mut k1[..])?;
    Ok(k1)
}

fn intro_ad(header: &[u8], big_x: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(8 + header.len() + KEY_LEN);
    ad.extend_from_slice(&(header.len() as u64).to_be_bytes());
    ad.extend_from_slice(header);
    ad.extend_from_slice(big_x);
    ad
}

/// `(keys, AUTH_M)` from both DH outputs and the transcript.
fn finish(
    xy: &[u8; KEY_LEN],
    xb: &[u8; KEY_LEN],
    keys: &IntroKeys<'_>,
    big_x: &[u8; KEY_LEN],
    big_y: &[u8; KEY_LEN],
) -> Result<(HopKeys, Zeroizing<[u8; 32]>), HsError> {
    let mut si = Zeroizing::new(Vec::with_capacity(7 * KEY_LEN + PROTO.len()));
    for p in [xy, xb, &keys.auth_key.0, &keys.enc_key.0, big_x, big_y] {
        si.extend_from_slice(p);
    }
    si.extend_from_slice(PROTO);
    si.extend_from_slice(keys.subcredential.as_bytes());
    let seed = mac32(T_KEY_SEED, &[&si])?;
    let verify = mac32(T_VERIFY, &[&si])?;
    let auth = mac32(
        T_AUTH,
        &[
            &verify[..],
            &keys.auth_key.0,
            &keys.enc_key.0,
            big_y,
            big_x,
            PROTO,
            SERVER_STR,
        ],
    )?;
    let mut ks = Zeroizing::new([0u8; 3 * KEY_LEN]);
    kdf(T_KDF_FINAL, &seed[..], &mut ks[..])?;
    let mut f = Zeroizing::new([0u8; KEY_LEN]);
    let mut b = Zeroizing::new([0u8; KEY_LEN]);
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    f.copy_from_slice(&ks[0..32]);
    b.copy_from_slice(&ks[32..64]);
    k.copy_from_slice(&ks[64..96]);
    // Fresh output of this handshake's key schedule, turned into exactly one `HopKeys`: the
    // (key, nonce) reuse the constructor's name warns about cannot happen.
    Ok((HopKeys::dangerously_from_parts(*f, *b, *k), auth))
}

/// The client's state between sending INTRODUCE1 and receiving RENDEZVOUS2. Not `Clone`.
pub struct ClientIntro {
    x: ReusableSecret,
    big_x: [u8; KEY_LEN],
    bx: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for ClientIntro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIntro([redacted])")
    }
}

/// Client: encrypt `plaintext` (the INTRODUCE1 encrypted part's contents) to the service.
/// Returns the state to keep and the encrypted part `X | ciphertext | tag`.
pub fn client_start(
    keys: &IntroKeys<'_>,
    header: &[u8],
    plaintext: &[u8],
) -> Result<(ClientIntro, Vec<u8>), HsError> {
    client_start_with_rng(&mut rand::rng(), keys, header, plaintext)
}

/// [`client_start`] with `x` drawn from `rng` (fixed in known-answer tests).
pub(crate) fn client_start_with_rng<R: CryptoRng + ?Sized>(
    rng: &mut R,
    keys: &IntroKeys<'_>,
    header: &[u8],
    plaintext: &[u8],
) -> Result<(ClientIntro, Vec<u8>), HsError> {
    let x = ReusableSecret::random_from_rng(rng);
    let big_x = PublicKey::from(&x).to_bytes();
    let bx = contributory(x.diffie_hellman(&PublicKey::from(keys.enc_key.0)))?;
    let k1 = intro_key(&bx, keys, &big_x)?;
    let mut out = Vec::with_capacity(ENCRYPTED_OVERHEAD + plaintext.len());
    out.extend_from_slice(&big_x);
    out.extend_from_slice(plaintext);
    let body = out.get_mut(KEY_LEN..).ok_or(FAIL)?;
    let tag = aead::seal(&k1, &ZERO_NONCE, &intro_ad(header, &big_x), body).map_err(|_| FAIL)?;
    out.extend_from_slice(&tag);
    Ok((ClientIntro { x, big_x, bx }, out))
}

impl ClientIntro {
    /// Client: complete the handshake with the service's reply `Y | AUTH_M` (from RENDEZVOUS2).
    /// AUTH_M is compared in constant time before any key is returned.
    pub fn finish(self, keys: &IntroKeys<'_>, reply: &[u8]) -> Result<HopKeys, HsError> {
        if reply.len() != REPLY_LEN {
            return Err(FAIL);
        }
        let (y, auth) = reply.split_at(KEY_LEN);
        let big_y: [u8; KEY_LEN] = y.try_into().map_err(|_| FAIL)?;
        let yx = contributory(self.x.diffie_hellman(&PublicKey::from(big_y)))?;
        let (hop, expect) = finish(&yx, &self.bx, keys, &self.big_x, &big_y)?;
        if !crate::ct::ct_eq(&expect[..], auth) {
            return Err(FAIL);
        }
        Ok(hop)
    }
}

/// The service's state after opening an INTRODUCE2: it may still refuse (replay, proof of work,
/// policy) before answering. Not `Clone`.
pub struct ServiceIntro {
    big_x: [u8; KEY_LEN],
    xb: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for ServiceIntro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceIntro([redacted])")
    }
}

/// Service: open the encrypted part of an INTRODUCE2 with the descriptor's secret `enc_secret`
/// (`b`). `keys.enc_key` must be its public key. Returns the plaintext and the state to answer with.
pub fn service_open(
    keys: &IntroKeys<'_>,
    enc_secret: &X25519Secret,
    header: &[u8],
    encrypted: &[u8],
) -> Result<(Zeroizing<Vec<u8>>, ServiceIntro), HsError> {
    if !enc_secret.public().ct_eq(keys.enc_key) {
        return Err(FAIL);
    }
    let (x, rest) = encrypted.split_at_checked(KEY_LEN).ok_or(FAIL)?;
    let ct_len = rest.len().checked_sub(aead::TAG_LEN).ok_or(FAIL)?;
    let (ct, tag) = rest.split_at(ct_len);
    let big_x: [u8; KEY_LEN] = x.try_into().map_err(|_| FAIL)?;
    let tag: [u8; aead::TAG_LEN] = tag.try_into().map_err(|_| FAIL)?;
    let xb = contributory(
        enc_secret
            .to_static()
            .diffie_hellman(&PublicKey::from(big_x)),
    )?;
    let k1 = intro_key(&xb, keys, &big_x)?;
    let mut pt = Zeroizing::new(ct.to_vec());
    aead::open(
        &k1,
        &ZERO_NONCE,
        &intro_ad(header, &big_x),
        &tag,
        &mut pt[..],
    )
    .map_err(|_| FAIL)?;
    Ok((pt, ServiceIntro { big_x, xb }))
}

impl ServiceIntro {
    /// Service: answer the introduction. Returns the reply `Y | AUTH_M` for RENDEZVOUS1 and the
    /// end-to-end keys.
    pub fn respond(self, keys: &IntroKeys<'_>) -> Result<([u8; REPLY_LEN], HopKeys), HsError> {
        self.respond_with_rng(&mut rand::rng(), keys)
    }

    /// [`ServiceIntro::respond`] with `y` drawn from `rng` (fixed in known-answer tests).
    pub(crate) fn respond_with_rng<R: CryptoRng + ?Sized>(
        self,
        rng: &mut R,
        keys: &IntroKeys<'_>,
    ) -> Result<([u8; REPLY_LEN], HopKeys), HsError> {
        let y = EphemeralSecret::random_from_rng(rng);
        let big_y = PublicKey::from(&y).to_bytes();
        let xy = contributory(y.diffie_hellman(&PublicKey::from(self.big_x)))?;
        let (hop, auth) = finish(&xy, &self.xb, keys, &self.big_x, &big_y)?;
        let mut reply = [0u8; REPLY_LEN];
        reply[..KEY_LEN].copy_from_slice(&big_y);
        reply[KEY_LEN..].copy_from_slice(&auth[..]);
        Ok((reply, hop))
    }
}
