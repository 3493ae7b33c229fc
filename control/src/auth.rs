//! Authentication (control-spec §3.5, §3.21, §3.24): which methods PROTOCOLINFO offers, and
//! checking AUTHENTICATE against a cookie, a SAFECOOKIE challenge or a hashed password.
//!
//! Secrets (the cookie, passwords) stay in zeroizing buffers and are compared in constant time.
//! The SAFECOOKIE hashes are Tor's: HMAC-SHA256 keyed with the two constant strings below over
//! `cookie || client nonce || server nonce`.

use std::path::PathBuf;
use std::str::FromStr;

use allium_crypto::ct::ct_eq;
use allium_crypto::ctlauth::{S2K_DIGEST_LEN, S2K_SALT_LEN, hmac_sha256, tor_s2k_sha1};
use zeroize::Zeroizing;

/// Key of the server's SAFECOOKIE hash.
pub const SAFECOOKIE_SERVER_KEY: &[u8] =
    b"Tor safe cookie authentication server-to-controller hash";
/// Key of the controller's SAFECOOKIE hash.
pub const SAFECOOKIE_CLIENT_KEY: &[u8] =
    b"Tor safe cookie authentication controller-to-server hash";
/// Cookie length.
pub const COOKIE_LEN: usize = 32;
/// Server nonce length.
pub const NONCE_LEN: usize = 32;
/// Longest client nonce accepted.
pub const MAX_CLIENT_NONCE: usize = 1024;

/// A Tor `HashedControlPassword` value: `16:` then hex of salt (8 bytes), count byte, SHA-1 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct HashedPassword {
    salt: [u8; S2K_SALT_LEN],
    count: u8,
    digest: [u8; S2K_DIGEST_LEN],
}

impl std::fmt::Debug for HashedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashedPassword(..)")
    }
}

/// A malformed `hashed_control_password`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a hashed password: expected `16:` and 58 hex digits, as printed by `tor --hash-password`"
)]
pub struct BadHashedPassword;

impl FromStr for HashedPassword {
    type Err = BadHashedPassword;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.strip_prefix("16:").ok_or(BadHashedPassword)?;
        let raw = hex::decode(hexpart).map_err(|_| BadHashedPassword)?;
        if raw.len() != S2K_SALT_LEN + 1 + S2K_DIGEST_LEN {
            return Err(BadHashedPassword);
        }
        let (salt, rest) = raw.split_at(S2K_SALT_LEN);
        let (count, digest) = rest.split_first().ok_or(BadHashedPassword)?;
        Ok(Self {
            salt: salt.try_into().map_err(|_| BadHashedPassword)?,
            count: *count,
            digest: digest.try_into().map_err(|_| BadHashedPassword)?,
        })
    }
}

impl HashedPassword {
    /// Hash `password` with `salt` the way `tor --hash-password` does.
    pub fn new(password: &[u8], salt: [u8; S2K_SALT_LEN]) -> Self {
        let count = allium_crypto::ctlauth::S2K_DEFAULT_COUNT;
        Self {
            salt,
            count,
            digest: tor_s2k_sha1(password, &salt, count),
        }
    }

    /// Whether `password` matches.
    pub fn matches(&self, password: &[u8]) -> bool {
        ct_eq(
            &tor_s2k_sha1(password, &self.salt, self.count),
            &self.digest,
        )
    }

    /// The `16:...` form.
    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(29);
        raw.extend_from_slice(&self.salt);
        raw.push(self.count);
        raw.extend_from_slice(&self.digest);
        format!("16:{}", hex::encode_upper(raw))
    }
}

/// How controllers may authenticate.
#[derive(Default)]
pub struct AuthConfig {
    cookie: Option<(PathBuf, Zeroizing<[u8; COOKIE_LEN]>)>,
    passwords: Vec<HashedPassword>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("cookie_file", &self.cookie.as_ref().map(|c| &c.0))
            .field("passwords", &self.passwords.len())
            .finish()
    }
}

/// A SAFECOOKIE challenge issued on one connection.
#[derive(Debug)]
pub struct Challenge {
    client_nonce: Vec<u8>,
    server_nonce: [u8; NONCE_LEN],
}

impl AuthConfig {
    /// No authentication at all (method NULL): any controller that can connect is trusted.
    pub fn open() -> Self {
        Self::default()
    }

    /// Cookie authentication with the cookie stored at `path`, plus `passwords` (may be empty).
    pub fn new(
        cookie: Option<(PathBuf, [u8; COOKIE_LEN])>,
        passwords: Vec<HashedPassword>,
    ) -> Self {
        Self {
            cookie: cookie.map(|(p, c)| (p, Zeroizing::new(c))),
            passwords,
        }
    }

    /// Whether no method is required.
    pub fn is_open(&self) -> bool {
        self.cookie.is_none() && self.passwords.is_empty()
    }

    /// The PROTOCOLINFO `AUTH` line body: `METHODS=... [COOKIEFILE="..."]`.
    pub fn protocolinfo_auth(&self) -> String {
        let mut methods = Vec::new();
        if self.cookie.is_some() {
            methods.push("COOKIE");
            methods.push("SAFECOOKIE");
        }
        if !self.passwords.is_empty() {
            methods.push("HASHEDPASSWORD");
        }
        if methods.is_empty() {
            methods.push("NULL");
        }
        let mut s = format!("METHODS={}", methods.join(","));
        if let Some((path, _)) = &self.cookie {
            s.push_str(" COOKIEFILE=");
            s.push_str(&crate::args::quote(&path.to_string_lossy()));
        }
        s
    }

    /// Start SAFECOOKIE: the server hash to send, and the challenge to keep. `None` if cookie
    /// authentication is off.
    pub fn challenge(
        &self,
        client_nonce: &[u8],
        server_nonce: [u8; NONCE_LEN],
    ) -> Option<([u8; 32], Challenge)> {
        let (_, cookie) = self.cookie.as_ref()?;
        let server_hash = hmac_sha256(
            SAFECOOKIE_SERVER_KEY,
            &[&cookie[..], client_nonce, &server_nonce],
        );
        Some((
            server_hash,
            Challenge {
                client_nonce: client_nonce.to_vec(),
                server_nonce,
            },
        ))
    }

    /// Check an AUTHENTICATE credential (already hex-decoded or unquoted). With a pending
    /// SAFECOOKIE challenge only the controller's hash is accepted.
    pub fn check(&self, credential: &[u8], challenge: Option<&Challenge>) -> bool {
        if self.is_open() {
            return true;
        }
        if let Some(ch) = challenge {
            let Some((_, cookie)) = &self.cookie else {
                return false;
            };
            let expect = hmac_sha256(
                SAFECOOKIE_CLIENT_KEY,
                &[&cookie[..], &ch.client_nonce, &ch.server_nonce],
            );
            return ct_eq(credential, &expect);
        }
        if let Some((_, cookie)) = &self.cookie
            && ct_eq(credential, &cookie[..])
        {
            return true;
        }
        // Check every password (no early exit that would tell which one matched).
        self.passwords
            .iter()
            .fold(false, |ok, p| p.matches(credential) | ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tor_hash_password_output_is_accepted() {
        let p: HashedPassword = "16:A7D7E322DED38B7B605F3362EDDC6642CCCD440E203A93B405A9911304"
            .parse()
            .unwrap();
        assert!(p.matches(b"allium test"));
        assert!(!p.matches(b"allium"));
        assert_eq!(
            p.encode(),
            "16:A7D7E322DED38B7B605F3362EDDC6642CCCD440E203A93B405A9911304"
        );
        assert!("16:zz".parse::<HashedPassword>().is_err());
        assert!("A7D7E322".parse::<HashedPassword>().is_err());
        assert!("16:A7D7".parse::<HashedPassword>().is_err());
        let q = HashedPassword::new(b"pw", [7; 8]);
        assert!(q.encode().parse::<HashedPassword>().unwrap().matches(b"pw"));
    }

    #[test]
    fn methods_and_checks() {
        assert_eq!(AuthConfig::open().protocolinfo_auth(), "METHODS=NULL");
        assert!(AuthConfig::open().check(b"anything", None));
        let a = AuthConfig::new(
            Some((PathBuf::from("/d/control_auth_cookie"), [5; 32])),
            vec![HashedPassword::new(b"pw", [1; 8])],
        );
        assert_eq!(
            a.protocolinfo_auth(),
            "METHODS=COOKIE,SAFECOOKIE,HASHEDPASSWORD COOKIEFILE=\"/d/control_auth_cookie\""
        );
        assert!(a.check(&[5; 32], None));
        assert!(!a.check(&[6; 32], None));
        assert!(a.check(b"pw", None));
        assert!(!a.check(b"pw2", None));
        let (server_hash, ch) = a.challenge(b"client", [9; 32]).unwrap();
        let expect = hmac_sha256(
            SAFECOOKIE_SERVER_KEY,
            &[&[5u8; 32][..], b"client", &[9u8; 32]],
        );
        assert_eq!(server_hash, expect);
        let client = hmac_sha256(
            SAFECOOKIE_CLIENT_KEY,
            &[&[5u8; 32][..], b"client", &[9u8; 32]],
        );
        assert!(a.check(&client, Some(&ch)));
        // With a challenge pending, the raw cookie is no longer enough.
        assert!(!a.check(&[5; 32], Some(&ch)));
        assert!(!a.check(&server_hash, Some(&ch)));
    }
}
