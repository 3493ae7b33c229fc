//! The proxy's configuration: TOML, with defaults for every key but `authorities`.
//!
//! See `proxy.example.toml` in the repository root for a documented example (a test loads it).
//! Unknown keys are rejected, so a misspelt key is an error instead of a silently ignored line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use allium_directory::client::AuthorityInfo;
use serde::{Deserialize, Serialize};

use crate::err::ClientError;

/// Configuration of `allium proxy` and of [`crate::start`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the SOCKS5 listener binds. Port 0 picks a free port (see `ProxyHandle::socks_addr`).
    pub socks_listen: SocketAddr,
    /// Directory for the guard state file and the consensus cache.
    pub data_dir: PathBuf,
    /// The directory authorities (at least one): identity and HTTP address of each
    /// (`[[authorities]]`: `identity`, `dir_addr`; `address` is accepted for `dir_addr`).
    pub authorities: Vec<AuthorityInfo>,
    /// A local test network: relaxes the family and same-/16 path rules (all relays share 127.0.0.0/16).
    pub test_network: bool,
    /// How long one circuit build may take before it is abandoned and retried on another path.
    #[serde(with = "secs")]
    pub circuit_build_timeout: Duration,
    /// Learn the build timeout from past build times (Tor's CBT), with `circuit_build_timeout`
    /// as the initial value and the upper bound. Off: always `circuit_build_timeout`.
    pub learn_circuit_build_timeout: bool,
    /// How many circuits to keep built ahead of demand.
    pub prebuilt_circuits: usize,
    /// A circuit takes no new streams this long after its first stream.
    #[serde(with = "secs")]
    pub max_circuit_dirtiness: Duration,
    /// The most SOCKS connections served at once; further ones wait.
    pub max_socks_connections: usize,
    /// How long a SOCKS client may take to send its handshake and request.
    #[serde(with = "secs")]
    pub socks_handshake_timeout: Duration,
    /// How many primary guards to keep.
    pub primary_guards: usize,
    /// Days a sampled guard is kept before it is dropped and replaced (Tor's
    /// `guard-lifetime-days`, 120; 1 to 3650).
    pub guard_lifetime_days: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            socks_listen: SocketAddr::from(([127, 0, 0, 1], 9150)),
            data_dir: PathBuf::from("allium-proxy"),
            authorities: Vec::new(),
            test_network: false,
            circuit_build_timeout: Duration::from_secs(10),
            learn_circuit_build_timeout: true,
            prebuilt_circuits: 2,
            max_circuit_dirtiness: Duration::from_secs(600),
            max_socks_connections: 1024,
            socks_handshake_timeout: Duration::from_secs(10),
            primary_guards: 3,
            guard_lifetime_days: crate::guard::GUARD_LIFETIME_DAYS,
        }
    }
}

impl ProxyConfig {
    /// Parse TOML text and validate it.
    pub fn from_toml_str(text: &str) -> Result<Self, ClientError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ClientError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ClientError::file(path, "reading", e))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            ClientError::Config(m) => ClientError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Check the values make sense together.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.authorities.is_empty() {
            return Err(ClientError::Config(
                "no authorities configured; add at least one [[authorities]] entry with `identity` and `dir_addr`"
                    .into(),
            ));
        }
        let nonzero = |d: Duration, what: &str| {
            if d.is_zero() {
                Err(ClientError::Config(format!(
                    "{what} must be greater than 0"
                )))
            } else {
                Ok(())
            }
        };
        nonzero(self.circuit_build_timeout, "circuit_build_timeout")?;
        nonzero(self.max_circuit_dirtiness, "max_circuit_dirtiness")?;
        nonzero(self.socks_handshake_timeout, "socks_handshake_timeout")?;
        if self.max_socks_connections == 0 {
            return Err(ClientError::Config(
                "max_socks_connections must be at least 1".into(),
            ));
        }
        if self.primary_guards == 0 || self.primary_guards > 20 {
            return Err(ClientError::Config(
                "primary_guards must be between 1 and 20".into(),
            ));
        }
        if !(1..=3650).contains(&self.guard_lifetime_days) {
            return Err(ClientError::Config(
                "guard_lifetime_days must be between 1 and 3650 (default 120)".into(),
            ));
        }
        if self.prebuilt_circuits > 64 {
            return Err(ClientError::Config(
                "prebuilt_circuits must be at most 64".into(),
            ));
        }
        Ok(())
    }
}

/// Durations in TOML as (possibly fractional) seconds.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Num {
            I(u64),
            F(f64),
        }
        match Num::deserialize(d)? {
            Num::I(i) => Ok(Duration::from_secs(i)),
            Num::F(f) => Duration::try_from_secs_f64(f)
                .map_err(|_| serde::de::Error::custom("expected a non-negative number of seconds")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTH: &str = r#"
        [[authorities]]
        identity = "0000000000000000000000000000000000000000000000000000000000000001"
        address = "127.0.0.1:7000"
    "#;

    #[test]
    fn defaults_apply() {
        let c = ProxyConfig::from_toml_str(AUTH).unwrap();
        assert_eq!(c.socks_listen, "127.0.0.1:9150".parse().unwrap());
        assert_eq!(c.max_circuit_dirtiness, Duration::from_secs(600));
        assert_eq!(c.authorities.len(), 1);
        assert_eq!(c.authorities[0].identity.0[31], 1);
        // Round trip through TOML.
        let text = toml::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_toml_str(&text).unwrap(), c);
        assert!(!c.test_network);
    }

    #[test]
    fn fractional_seconds_and_unknown_keys() {
        let c =
            ProxyConfig::from_toml_str(&format!("circuit_build_timeout = 2.5\n{AUTH}")).unwrap();
        assert_eq!(c.circuit_build_timeout, Duration::from_millis(2500));
        assert!(
            ProxyConfig::from_toml_str(&format!("socks_lisen = \"127.0.0.1:1\"\n{AUTH}")).is_err()
        );
        assert!(
            ProxyConfig::from_toml_str(&format!("circuit_build_timeout = -1\n{AUTH}")).is_err()
        );
    }

    #[test]
    fn validation() {
        assert!(ProxyConfig::from_toml_str("").is_err());
        let bad = AUTH.replace(
            "0000000000000000000000000000000000000000000000000000000000000001",
            "xyz",
        );
        assert!(ProxyConfig::from_toml_str(&bad).is_err());
        assert!(ProxyConfig::from_toml_str(&format!("max_socks_connections = 0\n{AUTH}")).is_err());
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy.example.toml");
        let c = ProxyConfig::load(&path).unwrap();
        let d = ProxyConfig::default();
        assert_eq!(c.socks_listen, d.socks_listen);
        assert_eq!(c.max_circuit_dirtiness, d.max_circuit_dirtiness);
        assert_eq!(c.circuit_build_timeout, d.circuit_build_timeout);
        assert_eq!(c.prebuilt_circuits, d.prebuilt_circuits);
        assert_eq!(c.max_socks_connections, d.max_socks_connections);
        assert_eq!(c.socks_handshake_timeout, d.socks_handshake_timeout);
        assert_eq!(c.primary_guards, d.primary_guards);
    }
}
