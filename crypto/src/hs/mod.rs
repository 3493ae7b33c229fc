//! Onion-service cryptography (issue 13): addresses, key blinding, time periods, credentials and
//! subcredentials, descriptor-layer encryption and client authorization, and the end-to-end
//! INTRODUCE handshake. Mechanisms follow Tor's rend-spec-v3; the constructions are Allium's own
//! (SHA-256 / HKDF-SHA256 / ChaCha20-Poly1305 instead of SHA3 / SHAKE / AES), so nothing here is
//! wire-compatible with Tor. Byte layouts and test vectors: `docs/protocol/96-onion-services.md`.
//!
//! - [`addr`]: `<56 base32 chars>.allium.alt`, the service's Ed25519 identity key plus a checksum
//!   and a version byte.
//! - [`blind`]: per-time-period key blinding on Ed25519 (`A' = h·A`, `a' = h·a mod ℓ`), signing
//!   with the blinded key, and [`TimePeriod`] arithmetic.
//! - [`subcred`]: `credential = H(A)`, `subcredential = H(credential | A')`, the descriptor layer
//!   keys and the client-authorization cookie wrapping.
//! - [`ntor`]: the INTRODUCE1/RENDEZVOUS handshake (rend-spec's hs-ntor shape on x25519 +
//!   HKDF-SHA256 + ChaCha20-Poly1305), ending in a [`crate::handshake::HopKeys`].
//!
//! Invariants:
//! - Every hash has its own domain string (`DOMAIN_*` constants), so no two constructions can
//!   produce the same input bytes.
//! - Secret scalars, nonce prefixes, DH outputs and derived keys are zeroized on drop; nothing
//!   secret is `Copy` or printed by `Debug`.
//! - Every failure of a decryption or handshake step is one opaque error; callers give a peer no
//!   detail.

pub mod addr;
pub mod blind;
pub mod ntor;
pub mod subcred;

#[cfg(test)]
mod tests;

pub use addr::{ADDR_SUFFIX, AddrError, HsAddress, is_hs_hostname};
pub use blind::{BlindedKeypair, BlindedPublicKey, TimePeriod, TimePeriodParams};
pub use subcred::{Credential, DescCookie, Subcredential};

/// Errors of the onion-service crypto other than address parsing.
///
/// Decryption and handshake failures carry no detail (they could serve as an oracle).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsError {
    /// A key's bytes are not a usable key (not a point, small order, or with a torsion component).
    #[error("malformed {what}")]
    BadKey {
        /// Which key.
        what: &'static str,
    },
    /// A signature by a blinded or descriptor-signing key did not verify.
    #[error("onion-service signature verification failed")]
    BadSignature,
    /// A descriptor layer did not decrypt: wrong address, wrong time period, altered bytes, or (for
    /// the inner layer) a client that is not authorised.
    #[error("onion-service descriptor layer did not decrypt")]
    DecryptFailed,
    /// The INTRODUCE handshake failed (bad tag or AUTH, non-contributory DH, malformed data).
    #[error("onion-service introduction handshake failed")]
    HandshakeFailed,
    /// A message is too long for its length field.
    #[error("onion-service message too long ({len} bytes, at most {max})")]
    TooLong {
        /// Requested length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
}

/// `SHA-256(domain || 0x00 || parts...)`: the one hash construction of this module.
pub(crate) fn hash(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(domain);
    h.update([0u8]);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Domain of the onion-service proof-of-work hash.
pub const DOMAIN_HS_POW: &[u8] = b"allium/v1/hs-pow";

/// `SHA-256("allium/v1/hs-pow" || 0x00 || parts...)`: the one hash of the onion-service proof of
/// work (its puzzle and check live in the client crate, `onion::pow`; the layout is in
/// docs/protocol/96-onion-services.md, "Proof of work").
pub fn pow_hash(parts: &[&[u8]]) -> [u8; 32] {
    hash(DOMAIN_HS_POW, parts)
}
