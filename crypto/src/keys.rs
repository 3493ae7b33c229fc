//! Long-term and medium-term keys: Ed25519 identities and signing keys, x25519 link and onion keys.
//!
//! Invariants:
//! - Secret key types are neither `Clone` nor `Copy`, zeroize on drop and print `[redacted]` in `Debug`.
//! - Every signature is domain-separated: it covers `DOMAIN || 0x00 || body` (see `docs/PROTOCOL.md`).
//! - Signatures are checked with `verify_strict` (no malleable or small-order keys).

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::err::CryptoError;
use crate::rng::fill_random;

/// Length of an Ed25519 public key, an x25519 public key and every secret scalar we store.
pub const KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIG_LEN: usize = 64;

/// An Ed25519 public identity (a relay's or an authority's), 32 bytes.
///
/// Public, so `Copy`; comparisons of identities that guard trust decisions should use [`RelayId::ct_eq`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelayId(pub [u8; KEY_LEN]);

impl RelayId {
    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Lower-case hex, the form shown to people.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, CryptoError> {
        let mut out = [0u8; KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| CryptoError::BadKey {
            what: "identity (expected 64 hex digits)",
        })?;
        Ok(Self(out))
    }
    /// Verify a domain-separated signature by this identity over `body`.
    pub fn verify(
        &self,
        domain: &str,
        body: &[u8],
        sig: &[u8; SIG_LEN],
    ) -> Result<(), CryptoError> {
        let vk =
            ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| CryptoError::BadKey {
                what: "ed25519 public key",
            })?;
        if domain.as_bytes().contains(&0) {
            // A NUL inside the domain would make the domain/body split ambiguous.
            return Err(CryptoError::BadSignature);
        }
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        let msg = signed_message(domain, body);
        vk.verify_strict(&msg, &sig)
            .map_err(|_| CryptoError::BadSignature)
    }
}

impl fmt::Debug for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayId({})", &self.to_hex()[..16])
    }
}
impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// `DOMAIN || 0x00 || body`: the exact bytes every Ed25519 signature in Allium covers.
fn signed_message(domain: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + body.len());
    m.extend_from_slice(domain.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// An Ed25519 secret key: a relay identity, an authority's offline identity or its online signing key.
pub struct IdentityKeypair {
    sk: SigningKey,
}

impl IdentityKeypair {
    /// A fresh key from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut seed[..]);
        Self {
            sk: SigningKey::from_bytes(&seed),
        }
    }
    /// From a 32-byte secret seed.
    pub fn from_seed(seed: &[u8; KEY_LEN]) -> Self {
        Self {
            sk: SigningKey::from_bytes(seed),
        }
    }
    /// The secret seed (for writing a key file).
    pub fn seed(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.sk.to_bytes())
    }
    /// The public identity.
    pub fn public(&self) -> RelayId {
        RelayId(self.sk.verifying_key().to_bytes())
    }
    /// Sign `DOMAIN || 0x00 || body`. `domain` must not contain NUL (such signatures never verify).
    pub fn sign(&self, domain: &str, body: &[u8]) -> [u8; SIG_LEN] {
        debug_assert!(!domain.contains('\0'), "NUL in signature domain");
        self.sk.sign(&signed_message(domain, body)).to_bytes()
    }
}

impl fmt::Debug for IdentityKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeypair")
            .field("public", &self.public())
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// An x25519 public key (a link key or an onion key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct X25519Public(pub [u8; KEY_LEN]);

impl X25519Public {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl fmt::Debug for X25519Public {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X25519Public({})", &hex::encode(self.0)[..16])
    }
}

/// A long-lived x25519 secret: a relay's link (Noise static) key or its ntor onion key.
///
/// The public key is computed once at construction (a relay matches it against every CREATE).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct X25519Secret {
    bytes: [u8; KEY_LEN],
    #[zeroize(skip)]
    public: X25519Public,
}

impl X25519Secret {
    /// A fresh key from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut bytes[..]);
        Self::from_bytes(*bytes)
    }
    /// From raw secret bytes (clamped when used).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let s = x25519_dalek::StaticSecret::from(bytes);
        let public = X25519Public(x25519_dalek::PublicKey::from(&s).to_bytes());
        Self { bytes, public }
    }
    /// The raw secret bytes (for writing a key file or handing to snow).
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
    /// The matching public key.
    pub fn public(&self) -> X25519Public {
        self.public
    }
    /// The x25519 secret as a dalek `StaticSecret` (zeroized on drop by dalek).
    pub fn to_static(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.bytes)
    }
}

impl fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X25519Secret")
            .field("public", &self.public())
            .field("secret", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "allium-test-doc-v1";

    #[test]
    fn sign_verify_round_trip() {
        let kp = IdentityKeypair::generate();
        let sig = kp.sign(DOMAIN, b"body");
        kp.public().verify(DOMAIN, b"body", &sig).unwrap();
        // Reloading from the seed gives the same key.
        let again = IdentityKeypair::from_seed(&kp.seed());
        assert_eq!(again.public(), kp.public());
        again
            .public()
            .verify(DOMAIN, b"body", &again.sign(DOMAIN, b"body"))
            .unwrap();
    }

    #[test]
    fn forged_signatures_are_rejected() {
        let kp = IdentityKeypair::generate();
        let sig = kp.sign(DOMAIN, b"body");
        // Another body.
        assert!(matches!(
            kp.public().verify(DOMAIN, b"bodz", &sig),
            Err(CryptoError::BadSignature)
        ));
        // Every single-bit change of the signature.
        for bit in 0..SIG_LEN * 8 {
            let mut bad = sig;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                kp.public().verify(DOMAIN, b"body", &bad).is_err(),
                "bit {bit}"
            );
        }
        // Another signer.
        let other = IdentityKeypair::generate();
        assert!(other.public().verify(DOMAIN, b"body", &sig).is_err());
        // All-zero signature and a small-order (identity) public key: verify_strict refuses.
        assert!(
            kp.public()
                .verify(DOMAIN, b"body", &[0u8; SIG_LEN])
                .is_err()
        );
        let mut ident = [0u8; KEY_LEN];
        ident[0] = 1;
        assert!(RelayId(ident).verify(DOMAIN, b"body", &sig).is_err());
    }

    #[test]
    fn wrong_domain_is_rejected() {
        let kp = IdentityKeypair::generate();
        let sig = kp.sign(DOMAIN, b"body");
        assert!(
            kp.public()
                .verify("allium-other-doc-v1", b"body", &sig)
                .is_err()
        );
        // Moving bytes between domain and body does not help: the 0x00 separator pins the split.
        let sig = kp.sign("ab", b"c");
        assert!(kp.public().verify("a", b"bc", &sig).is_err());
        assert!(kp.public().verify("abc", b"", &sig).is_err());
        // A domain containing NUL never verifies.
        let sig = kp.sk.sign(&signed_message("a\0b", b"c")).to_bytes();
        assert!(kp.public().verify("a\0b", b"c", &sig).is_err());
        // The signed bytes are exactly DOMAIN || 0x00 || body.
        assert_eq!(signed_message("ab", b"c"), b"ab\x00c");
    }

    #[test]
    fn hex_and_debug_do_not_leak_secrets() {
        let kp = IdentityKeypair::generate();
        let id = kp.public();
        assert_eq!(RelayId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(RelayId::from_hex("zz").is_err());
        let seed_hex = hex::encode(*kp.seed());
        assert!(!format!("{kp:?}").contains(&seed_hex));
        let x = X25519Secret::generate();
        assert!(!format!("{x:?}").contains(&hex::encode(x.secret_bytes())));
    }
}
