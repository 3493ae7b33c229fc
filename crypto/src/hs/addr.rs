//! Onion-service addresses: `<label>.allium.alt`.
//!
//! `label = base32(A[32] | CHECKSUM[2] | VERSION[1])`, 35 bytes → exactly 56 characters of the
//! RFC 4648 alphabet in lower case, no padding, where `A` is the service's Ed25519 identity public key,
//! `VERSION = 0x01` and `CHECKSUM = SHA-256("allium-hs-address-checksum" | 0x00 | A | VERSION)[0..2]`.
//! SHA-256 rather than Tor's SHA3-256: it is the hash the rest of Allium uses; the checksum only
//! catches typing errors (the key itself authenticates the service).
//!
//! Why `.alt`: RFC 9476 reserves the top-level label `alt` for names that live outside the DNS. The
//! public DNS will never delegate it, so a name under it that escapes to a stub resolver is an NXDOMAIN
//! rather than a query that someone else can answer; and, unlike `.onion` (RFC 7686, Tor's), it says
//! "not DNS" without claiming Tor's namespace for addresses Tor cannot reach. The second label
//! `allium` names the namespace inside `.alt`, as RFC 9476 §2 advises (several systems share `.alt`).
//!
//! Parsing folds ASCII case (host names are case-insensitive, and browsers may send either) and
//! accepts extra leading labels (`www.<label>.allium.alt`), which are ignored as with `.onion`.
//! Everything else is checked: characters, length, version, checksum, and that `A` is a valid
//! Ed25519 point of prime order (so blinding it is well defined).

use std::fmt;
use std::str::FromStr;

use curve25519_dalek::edwards::CompressedEdwardsY;

use super::hash;
use crate::keys::{KEY_LEN, RelayId};

/// The address version byte this code produces and accepts.
pub const ADDR_VERSION: u8 = 1;
/// The domain suffix of every onion-service address, with its leading dot.
pub const ADDR_SUFFIX: &str = ".allium.alt";
/// Length of the base32 label.
pub const LABEL_LEN: usize = 56;
/// Domain string of the checksum hash.
pub const DOMAIN_CHECKSUM: &[u8] = b"allium-hs-address-checksum";

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const RAW_LEN: usize = KEY_LEN + 2 + 1;

/// Why a string is not a valid onion-service address. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// The name does not end in `.allium.alt`.
    #[error("not an onion-service address: the name must end in `.allium.alt`")]
    WrongSuffix,
    /// The label before `.allium.alt` is not 56 characters.
    #[error(
        "onion-service address label has {0} characters, expected 56; check that the address was \
         copied whole"
    )]
    WrongLength(usize),
    /// A character outside `a-z2-7`.
    #[error(
        "onion-service address contains a character outside a-z and 2-7; check for typing errors \
         (0, 1, 8 and 9 never occur)"
    )]
    BadCharacter,
    /// The version byte is not one this software knows.
    #[error(
        "onion-service address has version {0}, this software knows only version 1; upgrade \
         Allium or check the address"
    )]
    UnknownVersion(u8),
    /// The checksum does not match.
    #[error("onion-service address checksum does not match; the address has a typing error")]
    BadChecksum,
    /// The embedded key is not a valid Ed25519 public key of prime order.
    #[error("onion-service address does not contain a valid Ed25519 key")]
    BadKey,
}

/// A parsed, validated onion-service address: the service's Ed25519 identity public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HsAddress {
    key: [u8; KEY_LEN],
}

impl HsAddress {
    /// The address of the service whose identity public key is `key`. Fails if the key is not a
    /// valid prime-order Ed25519 point (such a key could never sign a verifiable descriptor).
    pub fn from_identity(key: &RelayId) -> Result<Self, AddrError> {
        check_key(&key.0)?;
        Ok(Self { key: key.0 })
    }

    /// The service's identity public key `A`.
    pub fn identity(&self) -> RelayId {
        RelayId(self.key)
    }

    /// The 56-character label (without `.allium.alt`).
    pub fn label(&self) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..KEY_LEN].copy_from_slice(&self.key);
        raw[KEY_LEN..KEY_LEN + 2].copy_from_slice(&checksum(&self.key, ADDR_VERSION));
        raw[KEY_LEN + 2] = ADDR_VERSION;
        base32_encode(&raw)
    }

    /// Parse an address (see the module docs for what is accepted).
    pub fn parse(name: &str) -> Result<Self, AddrError> {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let rest = lower
            .strip_suffix(ADDR_SUFFIX)
            .ok_or(AddrError::WrongSuffix)?;
        // The label is the last one before the suffix; earlier labels are ignored.
        let label = rest.rsplit('.').next().unwrap_or(rest);
        let n = label.chars().count();
        if n != LABEL_LEN {
            return Err(AddrError::WrongLength(n));
        }
        let raw = base32_decode(label.as_bytes()).ok_or(AddrError::BadCharacter)?;
        let (key, tail) = raw.split_at(KEY_LEN);
        let version = tail.get(2).copied().ok_or(AddrError::WrongLength(n))?;
        if version != ADDR_VERSION {
            return Err(AddrError::UnknownVersion(version));
        }
        let key: [u8; KEY_LEN] = key.try_into().map_err(|_| AddrError::WrongLength(n))?;
        if !crate::ct::ct_eq(tail.get(..2).unwrap_or(&[]), &checksum(&key, version)) {
            return Err(AddrError::BadChecksum);
        }
        check_key(&key)?;
        Ok(Self { key })
    }
}

impl fmt::Display for HsAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.label(), ADDR_SUFFIX)
    }
}

/// Addresses are public, but they are destinations: `Debug` prints only a short prefix so that an
/// accidental `{:?}` in a log line does not reveal which service a client visits.
impl fmt::Debug for HsAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HsAddress({}…)", self.label().get(..4).unwrap_or(""))
    }
}

impl FromStr for HsAddress {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        Self::parse(s)
    }
}

/// Whether a host name is in the onion-service namespace (`*.allium.alt`, any case, valid or not).
/// The SOCKS proxy uses this to keep such names away from exits and resolvers even when they fail to
/// parse.
pub fn is_hs_hostname(host: &str) -> bool {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    lower.ends_with(ADDR_SUFFIX) || lower == ADDR_SUFFIX.trim_start_matches('.')
}

fn checksum(key: &[u8; KEY_LEN], version: u8) -> [u8; 2] {
    let h = hash(DOMAIN_CHECKSUM, &[key, &[version]]);
    [h[0], h[1]]
}

fn check_key(key: &[u8; KEY_LEN]) -> Result<(), AddrError> {
    let p = CompressedEdwardsY(*key)
        .decompress()
        .ok_or(AddrError::BadKey)?;
    if p.is_small_order() || !p.is_torsion_free() {
        return Err(AddrError::BadKey);
    }
    Ok(())
}

/// RFC 4648 base32, lower case, no padding, for inputs whose bit length is a multiple of 5.
fn base32_encode(raw: &[u8; RAW_LEN]) -> String {
    let mut out = String::with_capacity(LABEL_LEN);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in raw {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            let idx = ((acc >> bits) & 31) as usize;
            out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'a')));
        }
        acc &= (1 << bits) - 1;
    }
    out
}

/// Decode exactly [`LABEL_LEN`] lower-case base32 characters into [`RAW_LEN`] bytes.
fn base32_decode(label: &[u8]) -> Option<[u8; RAW_LEN]> {
    if label.len() != LABEL_LEN {
        return None;
    }
    let mut out = [0u8; RAW_LEN];
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut n = 0usize;
    for &c in label {
        let v = match c {
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            *out.get_mut(n)? = (acc >> bits) as u8;
            n += 1;
            acc &= (1 << bits) - 1;
        }
    }
    (n == RAW_LEN && bits == 0).then_some(out)
}
