//! Key blinding on Ed25519 and time periods (rend-spec-v3's mechanism; Allium's hash).
//!
//! For a time period `(N, L)` (number and length in minutes) and the service identity key `A = a·B`:
//!
//! ```text
//! h  = clamp(SHA-256("allium-hs-blind" | 0x00 | A | B | u64be(N) | u64be(L)))
//! A' = h·A                                  (the blinded public key)
//! a' = h·a mod ℓ                            (the blinded secret scalar)
//! p' = SHA-256("allium-hs-blind-nonce" | 0x00 | p | h)   (p = the identity key's nonce prefix)
//! ```
//!
//! `B` is the compressed Ed25519 base point, `clamp` is X25519/Ed25519 clamping (clear bits 0-2 and
//! 255, set bit 254). A signature made with `(a', p')` is an ordinary Ed25519 signature that verifies
//! under `A'` with the standard (strict) verifier, since `a'·B = h·a·B = h·A`. `A'` alone does not
//! reveal `A`: without `A` the factor `h` is unknown, and `h` changes every period.
//!
//! Why `p'` depends on `h` (Tor's derivation hashes only `p`): with a period-independent prefix, the
//! same message signed in two periods reuses the same nonce `r` with two related scalars whose ratio is
//! public (`h₂/h₁`), which yields `a`. Mixing `h` in gives each period its own nonces.
//!
//! Time periods: `N = floor((unix_minutes − offset) / L)`. Tor uses `L = 1440` and an offset of 12 h, so
//! periods turn over at 12:00 UTC, away from the midnight consensus; here the offset is `L/2`, which
//! is the same for the default and scales for short test-network periods. `L` is the consensus
//! parameter `hsdir_interval` ([`TimePeriodParams::from_consensus`]).

use std::fmt;

use curve25519_dalek::constants::ED25519_BASEPOINT_COMPRESSED;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Sha512;
use zeroize::Zeroizing;

use super::{HsError, hash};
use crate::keys::{IdentityKeypair, KEY_LEN, RelayId, SIG_LEN};

/// Domain string of the blinding factor.
pub const DOMAIN_BLIND: &[u8] = b"allium-hs-blind";
/// Domain string of the blinded nonce prefix.
pub const DOMAIN_BLIND_NONCE: &[u8] = b"allium-hs-blind-nonce";

/// How time is cut into periods: the period length and the rotation offset, in minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimePeriodParams {
    /// Period length `L` in minutes.
    pub length_minutes: u64,
    /// Offset of period boundaries from the unix epoch, in minutes (`L/2`).
    pub rotation_offset_minutes: u64,
}

impl TimePeriodParams {
    /// The name of the consensus parameter that sets the period length (minutes), as in Tor.
    pub const CONSENSUS_PARAM: &'static str = "hsdir_interval";
    /// The default: one-day periods turning over at 12:00 UTC (Tor's).
    pub const DEFAULT: Self = Self::with_length(1440);
    /// The test network's: 20-minute periods, so a test sees several turn-overs.
    pub const TESTNET: Self = Self::with_length(20);
    /// Smallest period length accepted from a consensus.
    pub const MIN_LENGTH: u64 = 5;
    /// Largest period length accepted from a consensus (ten days, Tor's bound).
    pub const MAX_LENGTH: u64 = 14_400;

    /// Periods of `length_minutes`, offset by half a period.
    pub const fn with_length(length_minutes: u64) -> Self {
        Self {
            length_minutes,
            rotation_offset_minutes: length_minutes / 2,
        }
    }

    /// From the consensus parameter `hsdir_interval` (absent or out of range: the default).
    pub fn from_consensus(value: Option<i32>) -> Self {
        match value.and_then(|v| u64::try_from(v).ok()) {
            Some(l) if (Self::MIN_LENGTH..=Self::MAX_LENGTH).contains(&l) => Self::with_length(l),
            _ => Self::DEFAULT,
        }
    }

    /// The time period containing `unix_secs`.
    pub fn period_at(&self, unix_secs: u64) -> TimePeriod {
        let minutes = (unix_secs / 60).saturating_sub(self.rotation_offset_minutes);
        TimePeriod {
            number: minutes / self.length_minutes.max(1),
            length_minutes: self.length_minutes,
        }
    }

    /// Unix time at which period `number` starts.
    pub fn start_unix(&self, number: u64) -> u64 {
        number
            .saturating_mul(self.length_minutes)
            .saturating_add(self.rotation_offset_minutes)
            .saturating_mul(60)
    }
}

/// One time period: its number and length. Both go into every per-period hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimePeriod {
    /// Period number `N`.
    pub number: u64,
    /// Period length `L` in minutes.
    pub length_minutes: u64,
}

impl TimePeriod {
    /// The period after this one.
    pub fn next(&self) -> Self {
        Self {
            number: self.number.saturating_add(1),
            ..*self
        }
    }
    /// The period before this one.
    pub fn prev(&self) -> Self {
        Self {
            number: self.number.saturating_sub(1),
            ..*self
        }
    }
}

/// A blinded public key `A'` (public: it names the service's descriptors for one period).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlindedPublicKey(pub [u8; KEY_LEN]);

impl BlindedPublicKey {
    /// Blind the identity key `identity` for `period`.
    pub fn derive(identity: &RelayId, period: &TimePeriod) -> Result<Self, HsError> {
        let a = decompress(&identity.0, "onion-service identity key")?;
        let h = Scalar::from_bytes_mod_order(blinding_factor(identity, period));
        Ok(Self((h * a).compress().to_bytes()))
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Verify a domain-separated signature (`domain | 0x00 | body`) by this key, strictly.
    pub fn verify(&self, domain: &str, body: &[u8], sig: &[u8; SIG_LEN]) -> Result<(), HsError> {
        RelayId(self.0)
            .verify(domain, body, sig)
            .map_err(|_| HsError::BadSignature)
    }
}

impl fmt::Debug for BlindedPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlindedPublicKey({})", hex::encode(&self.0[..8]))
    }
}

/// The clamped blinding factor `h` for `identity` in `period` (public inputs, public output).
pub fn blinding_factor(identity: &RelayId, period: &TimePeriod) -> [u8; 32] {
    clamp_integer(hash(
        DOMAIN_BLIND,
        &[
            &identity.0,
            ED25519_BASEPOINT_COMPRESSED.as_bytes(),
            &period.number.to_be_bytes(),
            &period.length_minutes.to_be_bytes(),
        ],
    ))
}

fn decompress(bytes: &[u8; KEY_LEN], what: &'static str) -> Result<EdwardsPoint, HsError> {
    let p = CompressedEdwardsY(*bytes)
        .decompress()
        .ok_or(HsError::BadKey { what })?;
    if p.is_small_order() || !p.is_torsion_free() {
        return Err(HsError::BadKey { what });
    }
    Ok(p)
}

/// The blinded signing key of one period: `(a', p')` and `A'`. Zeroized on drop, never `Clone`.
pub struct BlindedKeypair {
    esk: ExpandedSecretKey,
    public: BlindedPublicKey,
    vk: VerifyingKey,
    period: TimePeriod,
}

impl BlindedKeypair {
    /// Blind the service identity key for `period`.
    pub fn derive(identity: &IdentityKeypair, period: &TimePeriod) -> Self {
        let seed = identity.seed();
        let base = ExpandedSecretKey::from(&*seed);
        let h_bytes = blinding_factor(&identity.public(), period);
        let h = Scalar::from_bytes_mod_order(h_bytes);
        let prefix = Zeroizing::new(hash(DOMAIN_BLIND_NONCE, &[&base.hash_prefix, &h_bytes]));
        let esk = ExpandedSecretKey {
            scalar: h * base.scalar,
            hash_prefix: *prefix,
        };
        let vk = VerifyingKey::from(&esk);
        Self {
            public: BlindedPublicKey(vk.to_bytes()),
            vk,
            esk,
            period: *period,
        }
    }
    /// `A'`.
    pub fn public(&self) -> BlindedPublicKey {
        self.public
    }
    /// The period this key belongs to.
    pub fn period(&self) -> TimePeriod {
        self.period
    }
    /// Sign `domain | 0x00 | body` (verifies with [`BlindedPublicKey::verify`]).
    pub fn sign(&self, domain: &str, body: &[u8]) -> [u8; SIG_LEN] {
        debug_assert!(!domain.contains('\0'), "NUL in signature domain");
        let mut m = Vec::with_capacity(domain.len() + 1 + body.len());
        m.extend_from_slice(domain.as_bytes());
        m.push(0);
        m.extend_from_slice(body);
        let sig: Signature = raw_sign::<Sha512>(&self.esk, &m, &self.vk);
        sig.to_bytes()
    }
}

impl fmt::Debug for BlindedKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlindedKeypair")
            .field("public", &self.public)
            .field("secret", &"[redacted]")
            .finish()
    }
}
