//! Relay configuration: a TOML file (see `relay.example.toml` in the repository root).
//!
//! Unknown keys are rejected so that a typo never silently weakens a setting. Values are checked
//! in [`RelayConfig::validate`], which [`crate::start`] calls.

use std::net::{IpAddr, SocketAddr};
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
    /// Local IP that outgoing connections (links to other relays for EXTEND, descriptor uploads,
    /// consensus fetches) bind to, as Tor's `OutboundBindAddress`. Default: the listen IP when `listen` is a specific
    /// address, none (the system's choice) when it is a wildcard.
    #[serde(default)]
    pub outbound_bind_address: Option<IpAddr>,
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
    /// Seconds between heartbeat log lines (uptime, circuits, traffic); 0 turns them off
    /// (default 21600, 6 hours, like Tor's `HeartbeatPeriod`).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_period_secs: u64,
    /// Allow running as root without dropping privileges (not recommended; see `user`).
    #[serde(default)]
    pub allow_root: bool,
    /// Started as root: bind the listeners, then switch to this user (and its group) for good.
    #[serde(default)]
    pub user: Option<String>,
    /// Control port (Tor's `ControlPort`): a loopback `address:port` (default: none).
    #[serde(default)]
    pub control_port: Option<SocketAddr>,
    /// Control port on a Unix socket (Tor's `ControlSocket`; default: none).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Write `control_auth_cookie` into the data directory and accept it (Tor's
    /// `CookieAuthentication`; default false).
    #[serde(default)]
    pub cookie_authentication: bool,
    /// Accepted control passwords, hashed as `tor --hash-password` prints them (`16:...`).
    #[serde(default)]
    pub hashed_control_password: Vec<String>,
    /// Where the Prometheus metrics listener binds (`/metrics`); none by default. Loopback
    /// only unless `metrics_allow_public` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<SocketAddr>,
    /// Allow `metrics_address` on a non-loopback address.
    #[serde(default)]
    pub metrics_allow_public: bool,
    /// Denial-of-service limits (`[dos]`; every key has a default, see `docs/OPERATING.md`).
    #[serde(default)]
    pub dos: crate::dos::DosConfig,
    /// TEST NETWORKS ONLY: publish this bandwidth (bytes/s) in the descriptor instead of the
    /// observed one, to play a relay that lies about its capacity (bandwidth-measurement tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_advertise_bandwidth: Option<u64>,
    /// Serve the directory (consensus and certificates) over BEGIN_DIR to circuits that end
    /// here (default true). Off: BEGIN_DIR is answered with END NOTDIRECTORY.
    #[serde(default = "default_true")]
    pub dir_cache: bool,
    /// Most directory streams served at once over all circuits (default 256); one circuit may
    /// have at most `crate::dirserve::MAX_DIR_STREAMS_PER_CIRCUIT`.
    #[serde(default = "default_max_dir_streams")]
    pub max_dir_streams: usize,
}

fn default_true() -> bool {
    true
}
fn default_max_dir_streams() -> usize {
    256
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
fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_PERIOD_SECS
}

/// Default seconds between heartbeat log lines (6 hours, Tor's `HeartbeatPeriod`).
pub const DEFAULT_HEARTBEAT_PERIOD_SECS: u64 = 6 * 3600;

/// Keys a running relay takes from a reloaded file ([`crate::RelayHandle::reconfigure`]; the
/// binary also applies `log_level` and `heartbeat_period_secs`). Every other key needs a restart.
pub const RELOADABLE_KEYS: &[&str] = &[
    "log_level",
    "heartbeat_period_secs",
    "nickname",
    "contact",
    "family",
    "exit_policy",
    "bandwidth_rate",
    "bandwidth_burst",
    "max_streams_per_circuit",
];

impl RelayConfig {
    /// The local IP outgoing connections bind to: `outbound_bind_address` if set,
    /// else the listen IP when it is a specific (non-wildcard) address.
    pub fn effective_outbound_bind(&self) -> Option<IpAddr> {
        self.outbound_bind_address.or_else(|| {
            let ip = self.listen.ip();
            (!ip.is_unspecified()).then_some(ip)
        })
    }

    /// A minimal configuration for tests: listen on `127.0.0.1:0`, no exit, no authorities.
    pub fn for_test(nickname: &str, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            nickname: nickname.to_owned(),
            contact: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertised: None,
            outbound_bind_address: None,
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
            heartbeat_period_secs: DEFAULT_HEARTBEAT_PERIOD_SECS,
            allow_root: false,
            user: None,
            control_port: None,
            control_socket: None,
            cookie_authentication: false,
            hashed_control_password: Vec::new(),
            metrics_address: None,
            metrics_allow_public: false,
            test_advertise_bandwidth: None,
            dos: crate::dos::DosConfig::default(),
            dir_cache: true,
            max_dir_streams: default_max_dir_streams(),
        }
    }

    /// The control-port keys of this configuration.
    pub fn control(&self) -> allium_control::ControlConfig {
        allium_control::ControlConfig {
            control_port: self.control_port,
            control_socket: self.control_socket.clone(),
            cookie_authentication: self.cookie_authentication,
            hashed_control_password: self.hashed_control_password.clone(),
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
        if let Err(why) =
            allium_proto::metrics::check_address(self.metrics_address, self.metrics_allow_public)
        {
            return Err(RelayError::ConfigInvalid {
                key: "metrics_address",
                why,
            });
        }
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
            || self.max_dir_streams == 0
            || self.circuit_stall_timeout_secs == 0
        {
            return Err(bad("max_*", "limits must be at least 1"));
        }
        if let Err((key, why)) = self.dos.validate() {
            return Err(bad(key, why));
        }
        if self.user.as_deref().is_some_and(str::is_empty) {
            return Err(bad("user", "give a user name, or remove the key"));
        }
        if let Err(e) = self.control().validate() {
            let allium_control::ControlError::Invalid { key, why } = e else {
                return Err(bad("control_port", &e.to_string()));
            };
            return Err(bad(key, &why));
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
    fn control_keys() {
        let base = "nickname = \"r1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n";
        let cfg = RelayConfig::from_toml_str(
            &format!(
                "{base}control_port = \"127.0.0.1:9051\"\ncookie_authentication = true\n\
                 hashed_control_password = [\"16:A7D7E322DED38B7B605F3362EDDC6642CCCD440E203A93B405A9911304\"]\n"
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let c = cfg.control();
        assert_eq!(c.control_port, Some("127.0.0.1:9051".parse().unwrap()));
        assert!(c.cookie_authentication && c.enabled());
        let s = RelayConfig::from_toml_str(
            &format!("{base}control_port = \"0.0.0.0:9051\"\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(s.contains("control_port") && s.contains("loopback"), "{s}");
        let s = RelayConfig::from_toml_str(
            &format!("{base}hashed_control_password = [\"hunter2\"]\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(s.contains("hashed_control_password"), "{s}");
        assert!(
            !RelayConfig::from_toml_str(base, Path::new("t.toml"))
                .unwrap()
                .control()
                .enabled()
        );
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
