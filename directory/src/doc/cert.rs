//! Authority key certificates: an offline identity key certifies an online signing key.

use allium_crypto::{IdentityKeypair, RelayId};
use serde::{Deserialize, Serialize};

use super::signed::{Document, Signed};
use crate::err::{DirError, Result};

/// Signature domain of authority certificates.
pub const DOMAIN_AUTH_CERT: &str = "allium/v1/auth-cert";
/// Size cap of a signed certificate envelope.
pub const MAX_CERT_LEN: usize = 1024;
/// The only certificate format version.
pub const CERT_VERSION: u16 = 1;
/// Longest validity window of a certificate (about 6 months plus slack).
pub const MAX_CERT_LIFETIME: u64 = 190 * 24 * 3600;

/// Body of a `Signed<AuthCert>`, signed by `identity` (the offline key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthCert {
    /// Format version, [`CERT_VERSION`].
    pub version: u16,
    /// The authority's long-term identity.
    pub identity: RelayId,
    /// The medium-term online key that signs votes and consensuses.
    pub signing_key: RelayId,
    /// Start of validity, unix seconds.
    pub valid_after: u64,
    /// End of validity, unix seconds.
    pub expires: u64,
}

impl Document for AuthCert {
    const DOMAIN: &'static str = DOMAIN_AUTH_CERT;
    const MAX_LEN: usize = MAX_CERT_LEN;
    const NAME: &'static str = "authority certificate";

    fn check_body(&self) -> Result<()> {
        if self.version != CERT_VERSION {
            return Err(DirError::invalid(Self::NAME, "unsupported version"));
        }
        if self.expires <= self.valid_after || self.expires - self.valid_after > MAX_CERT_LIFETIME {
            return Err(DirError::invalid(
                Self::NAME,
                "validity window must be non-empty and at most 190 days",
            ));
        }
        if self.identity == self.signing_key {
            return Err(DirError::invalid(
                Self::NAME,
                "signing key must differ from the identity",
            ));
        }
        Ok(())
    }
}

/// Issue a certificate: `identity` certifies `signing` from `valid_after` to `expires`.
pub fn issue_cert(
    identity: &IdentityKeypair,
    signing: &RelayId,
    valid_after: u64,
    expires: u64,
) -> Result<Signed<AuthCert>> {
    let cert = AuthCert {
        version: CERT_VERSION,
        identity: identity.public(),
        signing_key: *signing,
        valid_after,
        expires,
    };
    Signed::sign(&cert, identity)
}

/// A certificate whose signature by its identity has been checked (its time window has not).
#[derive(Clone, Debug)]
pub struct VerifiedCert {
    signed: Signed<AuthCert>,
    cert: AuthCert,
}

impl Signed<AuthCert> {
    /// Check the identity's signature over the received body, then decode. The time window is
    /// checked by [`VerifiedCert::is_valid_at`] where it matters.
    pub fn verify(self) -> Result<VerifiedCert> {
        let signer = match self.sigs() {
            [one] => one.signer,
            _ => {
                return Err(DirError::BadSignature {
                    object: AuthCert::NAME,
                    why: "must carry exactly one signature",
                });
            }
        };
        if !self.has_valid_sig_by(&signer) {
            return Err(DirError::BadSignature {
                object: AuthCert::NAME,
                why: "signature does not verify",
            });
        }
        let cert = self.decode_checked_body()?;
        if !cert.identity.ct_eq(&signer) {
            return Err(DirError::BadSignature {
                object: AuthCert::NAME,
                why: "not signed by the identity it names",
            });
        }
        Ok(VerifiedCert { signed: self, cert })
    }
}

impl VerifiedCert {
    /// The certificate.
    pub fn cert(&self) -> &AuthCert {
        &self.cert
    }
    /// The signed envelope.
    pub fn signed(&self) -> &Signed<AuthCert> {
        &self.signed
    }
    /// The authority identity.
    pub fn identity(&self) -> RelayId {
        self.cert.identity
    }
    /// The certified signing key.
    pub fn signing_key(&self) -> RelayId {
        self.cert.signing_key
    }
    /// Whether `now` is inside `[valid_after, expires)`.
    pub fn is_valid_at(&self, now: u64) -> bool {
        self.cert.valid_after <= now && now < self.cert.expires
    }
}
