//! The two primitives of Tor's control-port authentication, for `allium-control`.
//!
//! - [`tor_s2k_sha1`]: the iterated and salted "secret to key" of RFC 2440 §3.6.1.3 with SHA-1, which
//!   Tor's `HashedControlPassword` (`16:` + hex of salt, count byte and digest) stores, so that the
//!   output of `tor --hash-password` is accepted as is. SHA-1 is used here only because that stored
//!   format demands it; nothing else in Allium uses it.
//! - [`hmac_sha256`]: the MAC of SAFECOOKIE authentication (control-spec, AUTHCHALLENGE).
//!
//! The password and the cookie are secrets: callers keep them in zeroizing buffers and compare
//! digests with [`crate::ct::ct_eq`].

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Salt length of the S2K specifier.
pub const S2K_SALT_LEN: usize = 8;
/// Digest length (SHA-1) of the S2K output.
pub const S2K_DIGEST_LEN: usize = 20;
/// The count byte Tor writes (`96`: 65536 bytes hashed).
pub const S2K_DEFAULT_COUNT: u8 = 96;

/// RFC 2440 iterated+salted S2K with SHA-1: hash `salt || secret` repeated until
/// `(16 + (c & 15)) << ((c >> 4) + 6)` bytes went in (all of them once at least).
pub fn tor_s2k_sha1(
    secret: &[u8],
    salt: &[u8; S2K_SALT_LEN],
    count_byte: u8,
) -> [u8; S2K_DIGEST_LEN] {
    let mut count = (16usize + usize::from(count_byte & 15)) << ((count_byte >> 4) + 6);
    let mut unit = Zeroizing::new(Vec::with_capacity(S2K_SALT_LEN + secret.len()));
    unit.extend_from_slice(salt);
    unit.extend_from_slice(secret);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    while count > 0 {
        let n = count.min(unit.len());
        let part = unit.get(..n).unwrap_or(&[]);
        ctx.update(part);
        count -= n;
        if n == 0 {
            break;
        }
    }
    let d = ctx.finish();
    let mut out = [0u8; S2K_DIGEST_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of every length, so this cannot fail.
    let Ok(mut m) = <Hmac<Sha256>>::new_from_slice(key) else {
        return [0u8; 32];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s2k_matches_tor_hash_password() {
        // `tor --hash-password "allium test"` (Tor 0.4.9.8).
        let stored = "A7D7E322DED38B7B605F3362EDDC6642CCCD440E203A93B405A9911304";
        let raw = hex::decode(stored).unwrap();
        let salt: [u8; 8] = raw[..8].try_into().unwrap();
        assert_eq!(raw[8], S2K_DEFAULT_COUNT);
        let d = tor_s2k_sha1(b"allium test", &salt, raw[8]);
        assert_eq!(&d[..], &raw[9..]);
        assert_ne!(&tor_s2k_sha1(b"allium tesT", &salt, raw[8])[..], &raw[9..]);
    }

    #[test]
    fn hmac_rfc4231_case2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
