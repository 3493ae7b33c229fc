//! Relay configuration: a TOML file (see `relay.example.toml` in the repository root).
//!
//! Unknown keys are rejected so that a typo never silently weakens a setting. Values are checked
//! in [`RelayConfig::validate`], which [`crate::start`] calls.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use allium_crypto::RelayId;
use allium_directory::AuthorityInfo;
use serde::{Deserialize, Serialize};

use crate::err::RelayError;
use crate::policy::ExitPolicy;

/// Default interval between descriptor uploads (Tor republishes at least every 18 h; we use 1 h so
/// a test network's authorities converge quickly).
pub const DEFAULT_PUBLISH_INTERVAL_SECS: u64 = 3600;
/// Default onion-key lifetime (design §2: rotate every 7 days, accept the previous key 7 more days).
pub const DEFAULT_ONION_KEY_ROTATION_SECS: u64 = 7 * 24 * 3600;

/// One directory authority the relay publishes to and fetches the consensus from: the shared
/// [`AuthorityInfo`] (identity and directory address). The name is kept for the callers that
/// build relay configurations.
pub type AuthorityConfig = AuthorityInfo;

/// The relay's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// A short name for people (1–19 ASCII letters or digits, as in Tor).
    pub nickname: String,
    /// Operator contact, published in the descriptor (at most 256 bytes).
    #[serde(default)]
    pub contact: String,
    /// Address the OR listener binds to. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Address published in the descriptor. Default: the bound address (which must then be a
    /// specific, non-wildcard address).
    #[serde(default)]
    pub advertised: Option<SocketAddr>,
    /// Directory for keys and state (created with mode 0700 if missing).
    pub data_dir: PathBuf,
    /// Exit policy. Default: not an exit.
    #[serde(default)]
    pub exit_policy: ExitPolicy,
    /// Sustained bandwidth limit in bytes per second (0 = unlimited).
    #[serde(default)]
    pub bandwidth_rate: u64,
    /// Burst size in bytes (default: twice the rate, at least 64 KiB).
    #[serde(default)]
    pub bandwidth_burst: u64,
    /// Identities (64 hex digits) of the other relays run by the same operator.
    #[serde(default)]
    pub family: Vec<String>,
    /// Directory authorities (`[[authorities]]`: `identity`, `dir_addr`).
    #[serde(default)]
    pub authorities: Vec<AuthorityInfo>,
    /// Log filter used by the `allium relay` binary (e.g. `info`, `allium_relay=debug`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Onion-key lifetime in seconds (default 7 days).
    #[serde(default)]
    pub onion_key_rotation_secs: Option<u64>,
    /// Seconds between descriptor uploads (default 3600).
    #[serde(default = "default_publish")]
    pub descriptor_publish_interval_secs: u64,
    /// Upper bound on simultaneous links (default 4096).
    #[serde(default = "default_max_links")]
    pub max_links: usize,
    /// Upper bound on circuits per link (default 2048).
    #[serde(default = "default_max_circs")]
    pub max_circuits_per_link: usize,
    /// Upper bound on streams per circuit (default 512).
    #[serde(default = "default_max_streams")]
    pub max_streams_per_circuit: usize,
    /// Upper bound on exit streams (open destination sockets) over all circuits (default 8192).
    #[serde(default = "default_max_exit_streams")]
    pub max_exit_streams: usize,
    /// Seconds a circuit may stay unable to write to the next link (its peer stopped reading)
    /// before it is destroyed (default 30). Only that circuit is affected.
    #[serde(default = "default_circuit_stall_timeout")]
    pub circuit_stall_timeout_secs: u64,
    /// TEST NETWORKS ONLY: publish this bandwidth (bytes/s) in the descriptor instead of the
    /// observed one, to play a relay that lies about its capacity (bandwidth-measurement tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_advertise_bandwidth: Option<u64>,
}

fn default_log_level() -> String {
    "info".to_owned()
}
fn default_publish() -> u64 {
    DEFAULT_PUBLISH_INTERVAL_SECS
}
fn default_max_links() -> usize {
    4096
}
fn default_max_circs() -> usize {
    2048
}
fn default_max_streams() -> usize {
    512
}
fn default_max_exit_streams() -> usize {
    8192
}
fn default_circuit_stall_timeout() -> u64 {
    30
}

impl RelayConfig {
    /// A minimal configuration for tests: listen on `127.0.0.1:0`, no exit, no authorities.
    pub fn for_test(nickname: &str, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            nickname: nickname.to_owned(),
            contact: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertised: None,
            data_dir: data_dir.into(),
            exit_policy: ExitPolicy::default(),
            bandwidth_rate: 0,
            bandwidth_burst: 0,
            family: Vec::new(),
            authorities: Vec::new(),
            log_level: default_log_level(),
            onion_key_rotation_secs: None,
            descriptor_publish_interval_secs: DEFAULT_PUBLISH_INTERVAL_SECS,
            max_links: default_max_links(),
            max_circuits_per_link: default_max_circs(),
            max_streams_per_circuit: default_max_streams(),
            max_exit_streams: default_max_exit_streams(),
            circuit_stall_timeout_secs: default_circuit_stall_timeout(),
            test_advertise_bandwidth: None,
        }
    }

    /// Parse TOML text. `origin` names the file in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, RelayError> {
        let cfg: Self = toml::from_str(text).map_err(|e| RelayError::ConfigParse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and parse a TOML file.
    pub fn load(path: &Path) -> Result<Self, RelayError> {
        let text = std::fs::read_to_string(path).map_err(|source| RelayError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Check values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), RelayError> {
        let bad = |key, why: &str| RelayError::ConfigInvalid {
            key,
            why: why.to_owned(),
        };
        let n = &self.nickname;
        if n.is_empty() || n.len() > 19 || !n.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("nickname", "use 1 to 19 ASCII letters or digits"));
        }
        if self.contact.len() > 256 {
            return Err(bad("contact", "at most 256 bytes"));
        }
        if let Some(a) = self.advertised
            && (a.ip().is_unspecified() || a.port() == 0)
        {
            return Err(bad(
                "advertised",
                "must be a specific address with a non-zero port",
            ));
        }
        self.family_ids()?;
        self.exit_policy.validate()?;
        if self.descriptor_publish_interval_secs == 0 {
            return Err(bad(
                "descriptor_publish_interval_secs",
                "must be at least 1",
            ));
        }
        if self.onion_key_rotation_secs == Some(0) {
            return Err(bad("onion_key_rotation_secs", "must be at least 1"));
        }
        if self.max_links == 0
            || self.max_circuits_per_link == 0
            || self.max_streams_per_circuit == 0
            || self.max_exit_streams == 0
            || self.circuit_stall_timeout_secs == 0
        {
            return Err(bad("max_*", "limits must be at least 1"));
        }
        if self.bandwidth_rate != 0 && self.bandwidth_burst != 0 && self.bandwidth_burst < 1024 {
            return Err(bad(
                "bandwidth_burst",
                "must be at least 1024 bytes (one cell)",
            ));
        }
        Ok(())
    }

    /// The family identities, parsed.
    pub fn family_ids(&self) -> Result<Vec<RelayId>, RelayError> {
        self.family
            .iter()
            .map(|h| {
                RelayId::from_hex(h).map_err(|_| RelayError::ConfigInvalid {
                    key: "family",
                    why: format!("`{h}` is not a relay identity (64 hex digits)"),
                })
            })
            .collect()
    }

    /// Effective onion-key lifetime.
    pub fn onion_rotation(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.onion_key_rotation_secs
                .unwrap_or(DEFAULT_ONION_KEY_ROTATION_SECS),
        )
    }

    /// Effective burst: the configured value, or twice the rate (at least 64 KiB).
    pub fn effective_burst(&self) -> u64 {
        if self.bandwidth_burst != 0 {
            self.bandwidth_burst
        } else {
            self.bandwidth_rate.saturating_mul(2).max(64 * 1024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads() {
        let text = include_str!("../../relay.example.toml");
        let cfg = RelayConfig::from_toml_str(text, Path::new("relay.example.toml")).unwrap();
        assert_eq!(cfg.nickname, "ExampleRelay");
        assert!(cfg.exit_policy.is_exit());
        assert!(!cfg.exit_policy.allow_private);
        assert_eq!(cfg.authorities.len(), 1);
        assert_eq!(cfg.family_ids().unwrap().len(), 1);
        assert_eq!(cfg.bandwidth_rate, 10 * 1024 * 1024);
        assert_eq!(cfg.onion_rotation().as_secs(), 7 * 24 * 3600);
        assert!(cfg.exit_policy.port_allowed(443));
        assert!(!cfg.exit_policy.port_allowed(25));
    }

    #[test]
    fn minimal_config_defaults() {
        let text = "nickname = \"r1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n";
        let cfg = RelayConfig::from_toml_str(text, Path::new("t.toml")).unwrap();
        assert!(!cfg.exit_policy.is_exit());
        assert_eq!(cfg.descriptor_publish_interval_secs, 3600);
        assert_eq!(cfg.log_level, "info");
        assert_eq!(cfg.effective_burst(), 64 * 1024);
    }

    #[test]
    fn errors_name_file_and_key() {
        let text = "nickname = \"r1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\nbandwith_rate = 5\n";
        let err = RelayConfig::from_toml_str(text, Path::new("my.toml")).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("my.toml"), "{s}");
        assert!(s.contains("bandwith_rate"), "{s}");

        let text = "nickname = \"bad name!\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n";
        let s = RelayConfig::from_toml_str(text, Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("nickname"), "{s}");

        let text =
            "nickname = \"r\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/x\"\nfamily = [\"zz\"]\n";
        let s = RelayConfig::from_toml_str(text, Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("family"), "{s}");

        let text = "nickname = \"r\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/x\"\n\
                    [[authorities]]\nidentity = \"zz\"\ndir_addr = \"127.0.0.1:1\"\n";
        let s = RelayConfig::from_toml_str(text, Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("authorit") && s.contains("64 hex digits"), "{s}");

        let text = "nickname = \"r\"\nlisten = \"nope\"\ndata_dir = \"/x\"\n";
        let s = RelayConfig::from_toml_str(text, Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("listen"), "{s}");
    }
}
