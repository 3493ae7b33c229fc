//! Credentials, descriptor-layer encryption and client authorization.
//!
//! ```text
//! credential    = SHA-256("allium-hs-credential" | 0x00 | A)
//! subcredential = SHA-256("allium-hs-subcredential" | 0x00 | credential | A')
//! ```
//!
//! Both are secret from anyone who does not know the address (an HSDir sees only `A'`).
//!
//! A descriptor layer (`layer` = "superencrypted" or "encrypted") is
//! `salt[16] | ChaCha20-Poly1305(key, nonce 0^12, ad = A' | u64be(revision), plaintext) | tag[16]` with
//! `key = HKDF-SHA256(salt = salt, ikm = A' | subcredential | u64be(revision) [| cookie], info =
//! "allium-hs-desc-" | layer, 32)`. The salt is fresh and random per layer, so each key encrypts one
//! message and nonce 0 is safe. The descriptor cookie enters only the inner layer, and only when
//! client authorization is on.
//!
//! Client authorization (one entry per authorised client, padded with fake entries): the service
//! makes one x25519 key pair `(e, E)` per descriptor; for client key `C`,
//! `client_id[8] | cookie_key[32] = HKDF-SHA256(salt = "allium-hs-client-auth", ikm = subcredential |
//! x25519(e, C), info = "allium-hs-client-auth", 40)` and the entry is
//! `client_id | ChaCha20-Poly1305(cookie_key, 0^12, ad = E | client_id, cookie)[32] | tag[16]`.
//! A client computes the same from `x25519(c, E)`, finds its `client_id` and opens the cookie.

use std::fmt;

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::blind::BlindedPublicKey;
use super::{HsError, hash};
use crate::aead;
use crate::ct::ct_eq;
use crate::keys::{KEY_LEN, RelayId, X25519Public, X25519Secret};
use crate::rng::fill_random;

/// Domain string of the credential.
pub const DOMAIN_CREDENTIAL: &[u8] = b"allium-hs-credential";
/// Domain string of the subcredential.
pub const DOMAIN_SUBCREDENTIAL: &[u8] = b"allium-hs-subcredential";
/// HKDF info prefix of a descriptor layer key (followed by the layer name).
pub const INFO_DESC_PREFIX: &[u8] = b"allium-hs-desc-";
/// HKDF salt and info of the client-authorization keys.
pub const INFO_CLIENT_AUTH: &[u8] = b"allium-hs-client-auth";
/// Length of a layer's random salt.
pub const SALT_LEN: usize = 16;
/// Bytes a layer adds to its plaintext (salt and tag).
pub const LAYER_OVERHEAD: usize = SALT_LEN + aead::TAG_LEN;
/// Length of a client identifier in a client-authorization entry.
pub const CLIENT_ID_LEN: usize = 8;

const ZERO_NONCE: [u8; aead::NONCE_LEN] = [0u8; aead::NONCE_LEN];

/// `credential = H(A)`. Secret from those who do not know the address.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Credential([u8; 32]);

impl Credential {
    /// The credential of the service with identity key `identity`.
    pub fn derive(identity: &RelayId) -> Self {
        Self(hash(DOMAIN_CREDENTIAL, &[&identity.0]))
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// `subcredential = H(credential | A')`: the per-period secret that keys the descriptor layers and
/// the INTRODUCE handshake.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Subcredential([u8; 32]);

impl Subcredential {
    /// The subcredential for `credential` and the blinded key of one period.
    pub fn derive(credential: &Credential, blinded: &BlindedPublicKey) -> Self {
        Self(hash(DOMAIN_SUBCREDENTIAL, &[&credential.0, &blinded.0]))
    }
    /// Shorthand: credential and subcredential from the identity key.
    pub fn for_identity(identity: &RelayId, blinded: &BlindedPublicKey) -> Self {
        Self::derive(&Credential::derive(identity), blinded)
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// From raw bytes (test vectors, or a value the caller derived and stored).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential([redacted])")
    }
}
impl fmt::Debug for Subcredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subcredential([redacted])")
    }
}

/// The descriptor cookie: a random 32-byte secret that keys the inner layer when client
/// authorization is on.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DescCookie([u8; 32]);

impl DescCookie {
    /// A fresh random cookie.
    pub fn generate() -> Self {
        let mut c = [0u8; 32];
        fill_random(&mut c);
        Self(c)
    }
    /// From raw bytes (tests).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DescCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DescCookie([redacted])")
    }
}

/// Which descriptor layer a key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescLayer {
    /// The middle ("superencrypted") layer: readable by anyone who knows the address.
    Super,
    /// The inner ("encrypted") layer: also needs the cookie when client authorization is on.
    Inner,
}

impl DescLayer {
    fn name(self) -> &'static [u8] {
        match self {
            Self::Super => b"superencrypted",
            Self::Inner => b"encrypted",
        }
    }
}

fn layer_key(
    layer: DescLayer,
    blinded: &BlindedPublicKey,
    subcred: &Subcredential,
    revision: u64,
    cookie: Option<&DescCookie>,
    salt: &[u8; SALT_LEN],
) -> Result<Zeroizing<[u8; KEY_LEN]>, HsError> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(3 * 32 + 8));
    ikm.extend_from_slice(&blinded.0);
    ikm.extend_from_slice(&subcred.0);
    ikm.extend_from_slice(&revision.to_be_bytes());
    if let Some(c) = cookie {
        ikm.extend_from_slice(&c.0);
    }
    let mut info = Vec::with_capacity(INFO_DESC_PREFIX.len() + 16);
    info.extend_from_slice(INFO_DESC_PREFIX);
    info.extend_from_slice(layer.name());
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    Hkdf::<Sha256>::new(Some(salt), &ikm)
        .expand(&info, &mut key[..])
        .map_err(|_| HsError::DecryptFailed)?;
    Ok(key)
}

fn layer_ad(blinded: &BlindedPublicKey, revision: u64) -> [u8; 40] {
    let mut ad = [0u8; 40];
    ad[..32].copy_from_slice(&blinded.0);
    ad[32..].copy_from_slice(&revision.to_be_bytes());
    ad
}

/// Encrypt one descriptor layer with a fresh random salt: `salt | ciphertext | tag`.
pub fn encrypt_layer(
    layer: DescLayer,
    blinded: &BlindedPublicKey,
    subcred: &Subcredential,
    revision: u64,
    cookie: Option<&DescCookie>,
    plaintext: &[u8],
) -> Result<Vec<u8>, HsError> {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt);
    encrypt_layer_with_salt(layer, blinded, subcred, revision, cookie, &salt, plaintext)
}

/// [`encrypt_layer`] with a given salt. Only for test vectors: a repeated salt repeats a key.
#[doc(hidden)]
pub fn encrypt_layer_with_salt(
    layer: DescLayer,
    blinded: &BlindedPublicKey,
    subcred: &Subcredential,
    revision: u64,
    cookie: Option<&DescCookie>,
    salt: &[u8; SALT_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, HsError> {
    let key = layer_key(layer, blinded, subcred, revision, cookie, salt)?;
    let mut out = Vec::with_capacity(LAYER_OVERHEAD + plaintext.len());
    out.extend_from_slice(salt);
    out.extend_from_slice(plaintext);
    let body = out.get_mut(SALT_LEN..).ok_or(HsError::DecryptFailed)?;
    let tag = aead::seal(&key, &ZERO_NONCE, &layer_ad(blinded, revision), body)
        .map_err(|_| HsError::DecryptFailed)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypt one descriptor layer. Any failure (wrong address, period, revision, cookie, altered bytes)
/// is the same [`HsError::DecryptFailed`].
pub fn decrypt_layer(
    layer: DescLayer,
    blinded: &BlindedPublicKey,
    subcred: &Subcredential,
    revision: u64,
    cookie: Option<&DescCookie>,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsError> {
    const FAIL: HsError = HsError::DecryptFailed;
    let (salt, rest) = ciphertext.split_at_checked(SALT_LEN).ok_or(FAIL)?;
    let ct_len = rest.len().checked_sub(aead::TAG_LEN).ok_or(FAIL)?;
    let (ct, tag) = rest.split_at(ct_len);
    let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| FAIL)?;
    let tag: [u8; aead::TAG_LEN] = tag.try_into().map_err(|_| FAIL)?;
    let key = layer_key(layer, blinded, subcred, revision, cookie, &salt)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    aead::open(
        &key,
        &ZERO_NONCE,
        &layer_ad(blinded, revision),
        &tag,
        &mut buf[..],
    )
    .map_err(|_| FAIL)?;
    Ok(buf)
}

/// One client-authorization entry of the superencrypted layer (56 bytes on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthClientEntry {
    /// Identifies the entry to its client (looks random to everyone else).
    pub client_id: [u8; CLIENT_ID_LEN],
    /// The descriptor cookie, encrypted to the client.
    pub cookie_ct: [u8; 32],
    /// Its Poly1305 tag.
    pub cookie_tag: [u8; 16],
}

impl AuthClientEntry {
    /// A fake entry: random bytes, indistinguishable from a real one without a client key.
    pub fn fake() -> Self {
        let mut e = Self {
            client_id: [0; CLIENT_ID_LEN],
            cookie_ct: [0; 32],
            cookie_tag: [0; 16],
        };
        fill_random(&mut e.client_id);
        fill_random(&mut e.cookie_ct);
        fill_random(&mut e.cookie_tag);
        e
    }

    /// The real entry for the client with public key `client`, under the descriptor's ephemeral
    /// secret `eph`.
    pub fn for_client(
        subcred: &Subcredential,
        eph: &X25519Secret,
        client: &X25519Public,
        cookie: &DescCookie,
    ) -> Result<Self, HsError> {
        let eph_pub = eph.public();
        let (client_id, key) = client_keys(subcred, &eph.to_static(), client)?;
        let mut ct = cookie.0;
        let tag = aead::seal(&key, &ZERO_NONCE, &entry_ad(&eph_pub, &client_id), &mut ct)
            .map_err(|_| HsError::DecryptFailed)?;
        Ok(Self {
            client_id,
            cookie_ct: ct,
            cookie_tag: tag,
        })
    }
}

fn entry_ad(eph_pub: &X25519Public, client_id: &[u8; CLIENT_ID_LEN]) -> [u8; 40] {
    let mut ad = [0u8; 40];
    ad[..32].copy_from_slice(&eph_pub.0);
    ad[32..].copy_from_slice(client_id);
    ad
}

fn client_keys(
    subcred: &Subcredential,
    secret: &StaticSecret,
    peer: &X25519Public,
) -> Result<([u8; CLIENT_ID_LEN], Zeroizing<[u8; KEY_LEN]>), HsError> {
    let shared = secret.diffie_hellman(&PublicKey::from(peer.0));
    if !shared.was_contributory() {
        return Err(HsError::DecryptFailed);
    }
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(&subcred.0);
    ikm[32..].copy_from_slice(shared.as_bytes());
    let mut okm = Zeroizing::new([0u8; CLIENT_ID_LEN + KEY_LEN]);
    Hkdf::<Sha256>::new(Some(INFO_CLIENT_AUTH), &ikm[..])
        .expand(INFO_CLIENT_AUTH, &mut okm[..])
        .map_err(|_| HsError::DecryptFailed)?;
    let mut id = [0u8; CLIENT_ID_LEN];
    id.copy_from_slice(&okm[..CLIENT_ID_LEN]);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&okm[CLIENT_ID_LEN..]);
    Ok((id, key))
}

/// The client side: find this client's entry among `entries` and open the cookie. Fails with
/// [`HsError::DecryptFailed`] when no entry is for this client (an unauthorised client).
pub fn open_client_entry(
    subcred: &Subcredential,
    client_secret: &X25519Secret,
    eph_pub: &X25519Public,
    entries: &[AuthClientEntry],
) -> Result<DescCookie, HsError> {
    let (id, key) = client_keys(subcred, &client_secret.to_static(), eph_pub)?;
    let entry = entries
        .iter()
        .find(|e| ct_eq(&e.client_id, &id))
        .ok_or(HsError::DecryptFailed)?;
    let mut cookie = DescCookie(entry.cookie_ct);
    aead::open(
        &key,
        &ZERO_NONCE,
        &entry_ad(eph_pub, &id),
        &entry.cookie_tag,
        &mut cookie.0,
    )
    .map_err(|_| HsError::DecryptFailed)?;
    Ok(cookie)
}
