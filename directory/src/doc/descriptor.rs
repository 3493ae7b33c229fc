//! Relay descriptors: what a relay says about itself, signed by its identity key.

use std::net::SocketAddr;

use allium_crypto::{RelayId, X25519Public};
use serde::{Deserialize, Serialize};

use super::policy::ExitPolicy;
use super::signed::{Document, Signed};
use crate::err::{DirError, Result};

/// Signature domain of relay descriptors.
pub const DOMAIN_RELAY_DESC: &str = "allium/v1/relay-desc";
/// Size cap of a signed descriptor envelope.
pub const MAX_DESC_LEN: usize = 8 * 1024;
/// The only descriptor format version.
pub const DESC_VERSION: u16 = 1;
/// Longest contact string, in bytes.
pub const MAX_CONTACT_LEN: usize = 256;
/// Longest nickname, in bytes (`[A-Za-z0-9]`, 1..=19 like Tor).
pub const MAX_NICKNAME_LEN: usize = 19;
/// Most family members.
pub const MAX_FAMILY: usize = 32;
/// Most protocol entries.
pub const MAX_PROTOCOLS: usize = 32;
/// Longest allowed lifetime `expires - published`.
pub const MAX_DESC_LIFETIME: u64 = 7 * 24 * 3600;

/// Protocol numbers used in [`RelayDescriptor::protocols`].
pub mod proto_ids {
    /// The link protocol (Noise XK, 1024-byte cells).
    pub const LINK: u8 = 1;
    /// The circuit handshake (ntor-v3 shape).
    pub const CIRCUIT: u8 = 2;
    /// Relay-cell crypto and messages.
    pub const RELAY: u8 = 3;
    /// Directory documents and BEGIN_DIR.
    pub const DIR: u8 = 4;
}

/// The protocol list every current relay advertises.
pub fn default_protocols() -> Vec<(u8, u16)> {
    vec![
        (proto_ids::LINK, 1),
        (proto_ids::CIRCUIT, 1),
        (proto_ids::RELAY, 1),
        (proto_ids::DIR, 1),
    ]
}

/// A relay descriptor (body of a `Signed<RelayDescriptor>`, signed by `identity`).
///
/// Field order is the wire order (postcard); see docs/protocol/80-directory.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayDescriptor {
    /// Format version, [`DESC_VERSION`].
    pub version: u16,
    /// Ed25519 identity (signs this descriptor).
    pub identity: RelayId,
    /// x25519 Noise static key of the link layer.
    pub link_key: X25519Public,
    /// x25519 ntor onion key.
    pub onion_key: X25519Public,
    /// Human-readable name, `[A-Za-z0-9]{1,19}`.
    pub nickname: String,
    /// Where the relay accepts links: 1 or 2 addresses (at most one IPv4 and one IPv6).
    pub addrs: Vec<SocketAddr>,
    /// Self-reported observed bandwidth, bytes per second.
    pub bandwidth_observed: u64,
    /// Exit policy.
    pub exit_policy: ExitPolicy,
    /// Relays run by the same operator (sorted, no duplicates, not including itself).
    pub family: Vec<RelayId>,
    /// Supported protocols `(protocol id, version)`, sorted, no duplicates.
    pub protocols: Vec<(u8, u16)>,
    /// Operator contact, at most 256 bytes.
    pub contact: String,
    /// Publication time, unix seconds.
    pub published: u64,
    /// Expiry time, unix seconds.
    pub expires: u64,
}

/// Whether `s` is a valid nickname.
pub fn valid_nickname(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NICKNAME_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn strictly_sorted<T: Ord>(v: &[T]) -> bool {
    v.windows(2).all(|w| matches!(w, [a, b] if a < b))
}

impl Document for RelayDescriptor {
    const DOMAIN: &'static str = DOMAIN_RELAY_DESC;
    const MAX_LEN: usize = MAX_DESC_LEN;
    const NAME: &'static str = "relay descriptor";

    fn check_body(&self) -> Result<()> {
        let bad = |why: &str| DirError::invalid(Self::NAME, why);
        if self.version != DESC_VERSION {
            return Err(bad("unsupported version"));
        }
        if !valid_nickname(&self.nickname) {
            return Err(bad("nickname must be 1-19 ASCII letters or digits"));
        }
        if self.addrs.is_empty() || self.addrs.len() > 2 {
            return Err(bad("must list 1 or 2 addresses"));
        }
        if let [a, b] = self.addrs.as_slice()
            && a.is_ipv4() == b.is_ipv4()
        {
            return Err(bad("at most one IPv4 and one IPv6 address"));
        }
        if self
            .addrs
            .iter()
            .any(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err(bad("address with port 0 or unspecified IP"));
        }
        self.exit_policy.check(Self::NAME)?;
        if self.family.len() > MAX_FAMILY || !strictly_sorted(&self.family) {
            return Err(bad("family must be sorted, unique, at most 32"));
        }
        if self.family.contains(&self.identity) {
            return Err(bad("family lists the relay itself"));
        }
        if self.protocols.len() > MAX_PROTOCOLS || !strictly_sorted(&self.protocols) {
            return Err(bad("protocols must be sorted, unique, at most 32"));
        }
        if self.contact.len() > MAX_CONTACT_LEN {
            return Err(bad("contact longer than 256 bytes"));
        }
        if self.expires <= self.published || self.expires - self.published > MAX_DESC_LIFETIME {
            return Err(bad("expires must be after published, by at most 7 days"));
        }
        Ok(())
    }
}

/// A descriptor whose signature (by its own identity) has been checked.
#[derive(Clone, Debug)]
pub struct VerifiedDescriptor {
    signed: Signed<RelayDescriptor>,
    desc: RelayDescriptor,
    digest: [u8; 32],
}

impl Signed<RelayDescriptor> {
    /// Check the self-signature over the received body, then decode it and check that the signer
    /// is the identity inside. Time is not checked here; see [`VerifiedDescriptor::check_valid_at`].
    pub fn verify(self) -> Result<VerifiedDescriptor> {
        let signer = match self.sigs() {
            [one] => one.signer,
            _ => {
                return Err(DirError::BadSignature {
                    object: RelayDescriptor::NAME,
                    why: "must carry exactly one signature",
                });
            }
        };
        if !self.has_valid_sig_by(&signer) {
            return Err(DirError::BadSignature {
                object: RelayDescriptor::NAME,
                why: "signature does not verify",
            });
        }
        let desc = self.decode_checked_body()?;
        if !desc.identity.ct_eq(&signer) {
            return Err(DirError::BadSignature {
                object: RelayDescriptor::NAME,
                why: "signed by a key other than its identity",
            });
        }
        let digest = self.digest();
        Ok(VerifiedDescriptor {
            signed: self,
            desc,
            digest,
        })
    }
}

impl VerifiedDescriptor {
    /// The descriptor.
    pub fn desc(&self) -> &RelayDescriptor {
        &self.desc
    }
    /// The signed envelope (for re-serving).
    pub fn signed(&self) -> &Signed<RelayDescriptor> {
        &self.signed
    }
    /// SHA-256 of the body bytes.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
    /// Reject a descriptor that has expired or is published more than `max_future` seconds ahead.
    pub fn check_valid_at(&self, now: u64, max_future: u64) -> Result<()> {
        if self.desc.expires <= now {
            return Err(DirError::NotValidNow {
                object: RelayDescriptor::NAME,
                why: "expired",
            });
        }
        if self.desc.published > now.saturating_add(max_future) {
            return Err(DirError::NotValidNow {
                object: RelayDescriptor::NAME,
                why: "published too far in the future",
            });
        }
        Ok(())
    }
}
