//! The circuit handshake: ntor-v3 shape (torspec proposal 332) with x25519, HMAC/HKDF-SHA256 and
//! ChaCha20-Poly1305. Sans-IO: bytes in, keys and bytes out. Design §2; byte layout in
//! `docs/protocol/20-handshake.md`.
//!
//! Invariants:
//! - Every DH output is checked with `was_contributory()`; a low-order point is an error.
//! - The client compares AUTH in constant time (`Mac::verify_slice`) before deriving or using any key
//!   from the reply; the relay checks the identity with `ct_eq`.
//! - The client secret `x` is a `ReusableSecret` (used twice), the relay's `y` an `EphemeralSecret`
//!   (used once, consumed). Both are made with dalek's `random_from_rng`, from [`rand::rng()`] in
//!   production. The known-answer tests fix `x` and `y` by passing a test-only RNG that returns fixed
//!   bytes to the crate-private `*_with_rng` variants; no secret is ever built from raw bytes outside
//!   tests (dalek offers no such constructor for these types, by design).
//! - Secret intermediates (`Bx`, `Xb`, `si`, `seed`, `verify`, `K1`, the KDF output) live in `Zeroizing`
//!   buffers allocated at their final size, so they are wiped on drop and never reallocated.
//! - Every failure is the same opaque [`CryptoError::HandshakeFailed`]; callers answer with a silent
//!   DESTROY.
//! - CM and SM are opaque to this module. They MUST be free of side effects (no 0-RTT data): CM is
//!   neither forward-secret nor replay-protected. [`tlv`] encodes and parses their TLV lists.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit as _, Mac as _};
use rand::CryptoRng;
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, ReusableSecret, SharedSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::aead;
use crate::ct::ct_eq;
use crate::err::CryptoError;
use crate::keys::{KEY_LEN, RelayId, X25519Public, X25519Secret};

/// The protocol identifier. Change it whenever any encoding or meaning changes.
pub const PROTO: &[u8] = b"allium-ntor3-x25519-sha256-1";
/// The verification string (`VER`).
pub const VER: &[u8] = b"circuit extend";
/// Bytes the onionskin adds to the client message: `ID | B | X | cmlen u16 | … | CMt`.
pub const ONIONSKIN_OVERHEAD: usize = 3 * KEY_LEN + 2 + aead::TAG_LEN;
/// Bytes the reply adds to the server message: `Y | AUTH | smlen u16 | … | SMt`.
pub const REPLY_OVERHEAD: usize = 2 * KEY_LEN + 2 + aead::TAG_LEN;
/// Largest client or server message (the `u16` length field).
pub const MAX_HANDSHAKE_MSG: usize = u16::MAX as usize;

const T_KDF_PHASE1: &[u8] = b"allium-ntor3-x25519-sha256-1:kdf_phase1";
const T_KEY_SEED: &[u8] = b"allium-ntor3-x25519-sha256-1:key_seed";
const T_VERIFY: &[u8] = b"allium-ntor3-x25519-sha256-1:verify";
const T_KDF_FINAL: &[u8] = b"allium-ntor3-x25519-sha256-1:kdf_final";
const T_AUTH: &[u8] = b"allium-ntor3-x25519-sha256-1:auth_final";
const SERVER_STR: &[u8] = b"Server";
const ZERO_NONCE: [u8; aead::NONCE_LEN] = [0u8; aead::NONCE_LEN];

type HmacSha256 = Hmac<Sha256>;

const FAIL: CryptoError = CryptoError::HandshakeFailed;

/// The keys one hop shares with the client after a handshake.
///
/// Zeroized on drop; neither `Clone` nor `Copy` (a copy would mean two senders on one ratchet).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct HopKeys {
    forward: [u8; KEY_LEN],
    backward: [u8; KEY_LEN],
    binding: [u8; KEY_LEN],
}

impl HopKeys {
    /// `CK_f`: the initial chain key of the forward (client → hop) ratchet.
    pub fn forward(&self) -> &[u8; KEY_LEN] {
        &self.forward
    }
    /// `CK_b`: the initial chain key of the backward (hop → client) ratchet.
    pub fn backward(&self) -> &[u8; KEY_LEN] {
        &self.backward
    }
    /// `KH`: a circuit-binding value, kept for later use (conflux, onion services). Not a cell key.
    pub fn binding(&self) -> &[u8; KEY_LEN] {
        &self.binding
    }
    /// Build hop keys from raw parts. Only for test vectors and benchmarks: two states built from the
    /// same parts would reuse (key, nonce) pairs.
    #[doc(hidden)]
    pub fn dangerously_from_parts(
        forward: [u8; KEY_LEN],
        backward: [u8; KEY_LEN],
        binding: [u8; KEY_LEN],
    ) -> Self {
        Self {
            forward,
            backward,
            binding,
        }
    }
    fn from_ks(ks: &[u8; 128]) -> (Zeroizing<[u8; KEY_LEN]>, Self) {
        let mut k_sm = Zeroizing::new([0u8; KEY_LEN]);
        let mut keys = Self {
            forward: [0; KEY_LEN],
            backward: [0; KEY_LEN],
            binding: [0; KEY_LEN],
        };
        k_sm.copy_from_slice(&ks[0..32]);
        keys.forward.copy_from_slice(&ks[32..64]);
        keys.backward.copy_from_slice(&ks[64..96]);
        keys.binding.copy_from_slice(&ks[96..128]);
        (k_sm, keys)
    }
}

impl fmt::Debug for HopKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HopKeys([redacted])")
    }
}

/// The client's state between sending the onionskin and receiving the reply. Not `Clone`.
pub struct ClientHandshake {
    x: ReusableSecret,
    big_x: [u8; KEY_LEN],
    id: [u8; KEY_LEN],
    big_b: [u8; KEY_LEN],
    bx: Zeroizing<[u8; KEY_LEN]>,
    cm_tag: [u8; aead::TAG_LEN],
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientHandshake([redacted])")
    }
}

/// `u64be(len s) || s`.
fn encap(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_be_bytes());
    out.extend_from_slice(s);
}

/// `KDF(t, s, L) = HKDF-SHA256(salt = t, ikm = s, info = t, L)`.
pub(crate) fn kdf(t: &[u8], s: &[u8], okm: &mut [u8]) -> Result<(), CryptoError> {
    Hkdf::<Sha256>::new(Some(t), s)
        .expand(t, okm)
        .map_err(|_| FAIL)
}

/// `H(t, m) = HMAC-SHA256(key = t, m)` over the concatenation of `parts`.
pub(crate) fn hmac_parts(t: &[u8], parts: &[&[u8]]) -> Result<HmacSha256, CryptoError> {
    let mut m = HmacSha256::new_from_slice(t).map_err(|_| FAIL)?;
    for p in parts {
        m.update(p);
    }
    Ok(m)
}

fn h(t: &[u8], m: &[u8]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    hmac32(t, &[m])
}

/// `H(t, parts)` as a zeroized 32-byte value.
pub(crate) fn hmac32(t: &[u8], parts: &[&[u8]]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let out = hmac_parts(t, parts)?.finalize().into_bytes();
    let mut z = Zeroizing::new([0u8; 32]);
    z.copy_from_slice(&out);
    Ok(z)
}

pub(crate) fn contributory(s: SharedSecret) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    if !s.was_contributory() {
        return Err(FAIL);
    }
    Ok(Zeroizing::new(s.to_bytes()))
}

/// `K1 = KDF(PROTO|":kdf_phase1", Bx|ID|X|B|PROTO|ENCAP(VER), 32)`.
fn phase1_key(
    bx: &[u8; KEY_LEN],
    id: &[u8; KEY_LEN],
    big_x: &[u8; KEY_LEN],
    big_b: &[u8; KEY_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut si1 = Zeroizing::new(Vec::with_capacity(
        4 * KEY_LEN + PROTO.len() + 8 + VER.len(),
    ));
    si1.extend_from_slice(bx);
    si1.extend_from_slice(id);
    si1.extend_from_slice(big_x);
    si1.extend_from_slice(big_b);
    si1.extend_from_slice(PROTO);
    encap(&mut si1, VER);
    let mut k1 = Zeroizing::new([0u8; KEY_LEN]);
    kdf(T_KDF_PHASE1, &si1, &mut k1[..])?;
    Ok(k1)
}

/// The transcript values both sides derive after both DHs: `(seed, verify)`.
struct Final {
    seed: Zeroizing<[u8; 32]>,
    verify: Zeroizing<[u8; 32]>,
}

#[allow(clippy::too_many_arguments)]
fn final_secrets(
    xy: &[u8; KEY_LEN],
    xb: &[u8; KEY_LEN],
    id: &[u8; KEY_LEN],
    big_b: &[u8; KEY_LEN],
    big_x: &[u8; KEY_LEN],
    big_y: &[u8; KEY_LEN],
) -> Result<Final, CryptoError> {
    let mut si = Zeroizing::new(Vec::with_capacity(
        6 * KEY_LEN + PROTO.len() + 8 + VER.len(),
    ));
    for p in [xy, xb, id, big_b, big_x, big_y] {
        si.extend_from_slice(p);
    }
    si.extend_from_slice(PROTO);
    encap(&mut si, VER);
    Ok(Final {
        seed: h(T_KEY_SEED, &si)?,
        verify: h(T_VERIFY, &si)?,
    })
}

/// The AUTH MAC state: `H(PROTO|":auth_final", verify|ID|B|Y|X|CMt|ENCAP(SMc|SMt)|PROTO|"Server")`.
fn auth_mac(
    verify: &[u8; 32],
    id: &[u8; KEY_LEN],
    big_b: &[u8; KEY_LEN],
    big_y: &[u8; KEY_LEN],
    big_x: &[u8; KEY_LEN],
    cm_tag: &[u8; aead::TAG_LEN],
    sm_ct_and_tag: &[u8],
) -> Result<HmacSha256, CryptoError> {
    let len = (sm_ct_and_tag.len() as u64).to_be_bytes();
    hmac_parts(
        T_AUTH,
        &[
            verify,
            id,
            big_b,
            big_y,
            big_x,
            cm_tag,
            &len,
            sm_ct_and_tag,
            PROTO,
            SERVER_STR,
        ],
    )
}

fn key_schedule(seed: &[u8; 32]) -> Result<(Zeroizing<[u8; KEY_LEN]>, HopKeys), CryptoError> {
    let mut ks = Zeroizing::new([0u8; 128]);
    kdf(T_KDF_FINAL, seed, &mut ks[..])?;
    Ok(HopKeys::from_ks(&ks))
}

/// Start a handshake with a relay: returns the client state and the onionskin
/// `ID[32] | B[32] | X[32] | cmlen u16be | CMc[cmlen] | CMt[16]`.
///
/// `client_msg` (CM) must be free of side effects: it is neither forward-secret nor replay-protected.
pub fn client_start(
    relay_id: &RelayId,
    onion_key: &X25519Public,
    client_msg: &[u8],
) -> Result<(ClientHandshake, Vec<u8>), CryptoError> {
    client_start_with_rng(&mut rand::rng(), relay_id, onion_key, client_msg)
}

/// [`client_start`] with the randomness for `x` drawn from `rng` (fixed in known-answer tests).
pub(crate) fn client_start_with_rng<R: CryptoRng + ?Sized>(
    rng: &mut R,
    relay_id: &RelayId,
    onion_key: &X25519Public,
    client_msg: &[u8],
) -> Result<(ClientHandshake, Vec<u8>), CryptoError> {
    let cm_len = u16::try_from(client_msg.len()).map_err(|_| CryptoError::MessageTooLong {
        len: client_msg.len(),
        max: MAX_HANDSHAKE_MSG,
    })?;
    let x = ReusableSecret::random_from_rng(rng);
    let big_x = PublicKey::from(&x).to_bytes();
    let id = relay_id.0;
    let big_b = onion_key.0;
    let bx = contributory(x.diffie_hellman(&PublicKey::from(big_b)))?;
    let k1 = phase1_key(&bx, &id, &big_x, &big_b)?;

    let mut out = Vec::with_capacity(ONIONSKIN_OVERHEAD + client_msg.len());
    out.extend_from_slice(&id);
    out.extend_from_slice(&big_b);
    out.extend_from_slice(&big_x);
    out.extend_from_slice(&cm_len.to_be_bytes());
    let ct_start = out.len();
    out.extend_from_slice(client_msg);
    let mut ad = [0u8; 3 * KEY_LEN];
    ad[0..32].copy_from_slice(&id);
    ad[32..64].copy_from_slice(&big_b);
    ad[64..96].copy_from_slice(&big_x);
    let cm_tag = aead::seal(&k1, &ZERO_NONCE, &ad, out.get_mut(ct_start..).ok_or(FAIL)?)?;
    out.extend_from_slice(&cm_tag);
    Ok((
        ClientHandshake {
            x,
            big_x,
            id,
            big_b,
            bx,
            cm_tag,
        },
        out,
    ))
}

/// Split `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], CryptoError> {
    let (head, rest) = b.split_at_checked(n).ok_or(FAIL)?;
    *b = rest;
    Ok(head)
}

fn take_key(b: &mut &[u8]) -> Result<[u8; KEY_LEN], CryptoError> {
    take(b, KEY_LEN)?.try_into().map_err(|_| FAIL)
}

fn take_tag(b: &mut &[u8]) -> Result<[u8; aead::TAG_LEN], CryptoError> {
    take(b, aead::TAG_LEN)?.try_into().map_err(|_| FAIL)
}

fn take_u16(b: &mut &[u8]) -> Result<usize, CryptoError> {
    let v: [u8; 2] = take(b, 2)?.try_into().map_err(|_| FAIL)?;
    Ok(usize::from(u16::from_be_bytes(v)))
}

impl ClientHandshake {
    /// Complete the handshake with the relay's reply `Y[32] | AUTH[32] | smlen u16be | SMc | SMt[16]`.
    /// Returns the hop keys and the decrypted server message (SM). AUTH is checked in constant time
    /// before any key is derived.
    pub fn finish(self, reply: &[u8]) -> Result<(HopKeys, Vec<u8>), CryptoError> {
        let mut r = reply;
        let big_y = take_key(&mut r)?;
        let auth = take(&mut r, 32)?;
        let sm_len = take_u16(&mut r)?;
        let sm_ct_and_tag = r;
        let sm_ct = take(&mut r, sm_len)?;
        let sm_tag = take_tag(&mut r)?;
        if !r.is_empty() {
            return Err(FAIL);
        }

        let yx = contributory(self.x.diffie_hellman(&PublicKey::from(big_y)))?;
        let fin = final_secrets(&yx, &self.bx, &self.id, &self.big_b, &self.big_x, &big_y)?;
        auth_mac(
            &fin.verify,
            &self.id,
            &self.big_b,
            &big_y,
            &self.big_x,
            &self.cm_tag,
            sm_ct_and_tag,
        )?
        .verify_slice(auth)
        .map_err(|_| FAIL)?;

        let (k_sm, keys) = key_schedule(&fin.seed)?;
        let mut sm = sm_ct.to_vec();
        aead::open(&k_sm, &ZERO_NONCE, &big_y, &sm_tag, &mut sm).map_err(|_| FAIL)?;
        Ok((keys, sm))
    }
}

/// Answer a client's onionskin. `onion_keys` are the current and previous onion keys (any order);
/// the one whose public key equals the onionskin's `B` is used. `server_msg` receives the decrypted
/// client message (CM) and returns the server message (SM). Returns the hop keys and the reply
/// `Y[32] | AUTH[32] | smlen u16be | SMc | SMt[16]`.
///
/// Any failure (wrong identity, unknown onion key, low-order point, bad CM tag, malformed input, SM too
/// long) is [`CryptoError::HandshakeFailed`]: drop the CREATE and answer DESTROY, with no detail.
pub fn relay_respond(
    own_id: &RelayId,
    onion_keys: &[&X25519Secret],
    onionskin: &[u8],
    server_msg: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<(HopKeys, Vec<u8>), CryptoError> {
    relay_respond_with_rng(&mut rand::rng(), own_id, onion_keys, onionskin, server_msg)
}

/// [`relay_respond`] with the randomness for `y` drawn from `rng` (fixed in known-answer tests).
pub(crate) fn relay_respond_with_rng<R: CryptoRng + ?Sized>(
    rng: &mut R,
    own_id: &RelayId,
    onion_keys: &[&X25519Secret],
    onionskin: &[u8],
    server_msg: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<(HopKeys, Vec<u8>), CryptoError> {
    let mut r = onionskin;
    let id = take_key(&mut r)?;
    let big_b = take_key(&mut r)?;
    let big_x = take_key(&mut r)?;
    let cm_len = take_u16(&mut r)?;
    let cm_ct = take(&mut r, cm_len)?;
    let cm_tag = take_tag(&mut r)?;
    if !r.is_empty() {
        return Err(FAIL);
    }
    if !ct_eq(&id, own_id.as_bytes()) {
        return Err(FAIL);
    }
    let b = onion_keys
        .iter()
        .find(|k| k.public().ct_eq(&X25519Public(big_b)))
        .ok_or(FAIL)?
        .to_static();

    let xb = contributory(b.diffie_hellman(&PublicKey::from(big_x)))?;
    drop(b);
    let k1 = phase1_key(&xb, &id, &big_x, &big_b)?;
    let mut ad = [0u8; 3 * KEY_LEN];
    ad[0..32].copy_from_slice(&id);
    ad[32..64].copy_from_slice(&big_b);
    ad[64..96].copy_from_slice(&big_x);
    let mut cm = Zeroizing::new(cm_ct.to_vec());
    aead::open(&k1, &ZERO_NONCE, &ad, &cm_tag, &mut cm).map_err(|_| FAIL)?;
    drop(k1);

    let sm = Zeroizing::new(server_msg(&cm));
    let sm_len = u16::try_from(sm.len()).map_err(|_| FAIL)?;

    let y = EphemeralSecret::random_from_rng(rng);
    let big_y = PublicKey::from(&y).to_bytes();
    let xy = contributory(y.diffie_hellman(&PublicKey::from(big_x)))?;
    let fin = final_secrets(&xy, &xb, &id, &big_b, &big_x, &big_y)?;
    let (k_sm, keys) = key_schedule(&fin.seed)?;

    let mut out = Vec::with_capacity(REPLY_OVERHEAD + sm.len());
    out.extend_from_slice(&big_y);
    out.extend_from_slice(&[0u8; 32]); // AUTH, filled below
    out.extend_from_slice(&sm_len.to_be_bytes());
    let sm_start = out.len();
    out.extend_from_slice(&sm);
    let sm_tag = aead::seal(
        &k_sm,
        &ZERO_NONCE,
        &big_y,
        out.get_mut(sm_start..).ok_or(FAIL)?,
    )?;
    out.extend_from_slice(&sm_tag);
    let auth = auth_mac(
        &fin.verify,
        &id,
        &big_b,
        &big_y,
        &big_x,
        &cm_tag,
        out.get(sm_start..).ok_or(FAIL)?,
    )?
    .finalize()
    .into_bytes();
    out.get_mut(32..64).ok_or(FAIL)?.copy_from_slice(&auth);
    Ok((keys, out))
}

/// TLV lists carried in CM and SM: `(type u8 | len u8 | value[len])*`.
///
/// Parsing rejects a truncated entry; the caller ignores types it does not know (prop 332 §A.2).
pub mod tlv {
    use crate::err::CryptoError;

    /// Largest value of one entry.
    pub const MAX_VALUE_LEN: usize = u8::MAX as usize;

    /// Iterate over the entries of a TLV list, yielding `Err` once at the first malformed entry.
    pub fn iter(mut data: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), CryptoError>> {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed || data.is_empty() {
                return None;
            }
            let parsed = (|| {
                let (&ty, rest) = data.split_first()?;
                let (&len, rest) = rest.split_first()?;
                let (value, rest) = rest.split_at_checked(usize::from(len))?;
                Some((ty, value, rest))
            })();
            match parsed {
                Some((ty, value, rest)) => {
                    data = rest;
                    Some(Ok((ty, value)))
                }
                None => {
                    failed = true;
                    Some(Err(CryptoError::MalformedTlv))
                }
            }
        })
    }

    /// Parse a whole TLV list.
    pub fn parse(data: &[u8]) -> Result<Vec<(u8, &[u8])>, CryptoError> {
        iter(data).collect()
    }

    /// Encode a TLV list. Fails if a value is longer than [`MAX_VALUE_LEN`].
    pub fn encode(entries: &[(u8, &[u8])]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(entries.iter().map(|(_, v)| 2 + v.len()).sum());
        for (ty, value) in entries {
            let len = u8::try_from(value.len()).map_err(|_| CryptoError::MessageTooLong {
                len: value.len(),
                max: MAX_VALUE_LEN,
            })?;
            out.push(*ty);
            out.push(len);
            out.extend_from_slice(value);
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests;
