//! Stream isolation: streams whose SOCKS credentials differ never share a circuit
//! (Tor's `IsolateSOCKSAuth`).
//!
//! A circuit takes the isolation key of its first stream; afterwards only streams with an equal
//! key may use it. The key's `Debug` output never shows the credentials.

use std::fmt;

/// What a stream must share with the other streams of its circuit.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum IsolationKey {
    /// The SOCKS client used no authentication.
    NoAuth,
    /// SOCKS username/password (SOCKS5) or user id (SOCKS4, with an empty password).
    Credentials {
        /// Username (or SOCKS4 user id).
        user: Vec<u8>,
        /// Password.
        pass: Vec<u8>,
    },
    /// An embedding application's isolation token (`allium_client::IsolationToken`).
    Token(u64),
}

impl IsolationKey {
    /// The key for a SOCKS username/password pair.
    pub fn credentials(user: impl Into<Vec<u8>>, pass: impl Into<Vec<u8>>) -> Self {
        Self::Credentials {
            user: user.into(),
            pass: pass.into(),
        }
    }

    /// Whether the key belongs to one SOCKS client's credentials or one isolation token
    /// (rather than every unauthenticated stream): circuits with such a key are often never
    /// used again once their streams end, so they are closed sooner.
    pub fn is_per_client(&self) -> bool {
        matches!(self, Self::Credentials { .. } | Self::Token(_))
    }

    /// Whether a stream with key `self` may join a circuit whose key is `circuit`
    /// (`None`: the circuit has carried no stream yet, so it takes any key).
    pub fn compatible_with(&self, circuit: Option<&Self>) -> bool {
        circuit.is_none_or(|c| c == self)
    }
}

impl fmt::Debug for IsolationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAuth => f.write_str("IsolationKey::NoAuth"),
            Self::Credentials { .. } => f.write_str("IsolationKey::Credentials([redacted])"),
            Self::Token(t) => write!(f, "IsolationKey::Token({t})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let a = IsolationKey::credentials("alice", "pw");
        let a2 = IsolationKey::credentials("alice", "pw");
        let b = IsolationKey::credentials("alice", "other");
        let c = IsolationKey::credentials("bob", "pw");
        assert!(a.compatible_with(None));
        assert!(a.compatible_with(Some(&a2)));
        assert!(!a.compatible_with(Some(&b)));
        assert!(!a.compatible_with(Some(&c)));
        assert!(!a.compatible_with(Some(&IsolationKey::NoAuth)));
        assert!(IsolationKey::NoAuth.compatible_with(Some(&IsolationKey::NoAuth)));
        assert!(a.is_per_client() && IsolationKey::Token(7).is_per_client());
        assert!(!IsolationKey::NoAuth.is_per_client());
        // "ab"+"c" must differ from "a"+"bc" (no concatenation ambiguity).
        assert_ne!(
            IsolationKey::credentials("ab", "c"),
            IsolationKey::credentials("a", "bc")
        );
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("alice") && !dbg.contains("pw"));
    }
}
