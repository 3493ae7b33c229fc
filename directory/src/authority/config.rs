//! Authority configuration (TOML). See `authority.example.toml` in the repository root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use allium_crypto::RelayId;
use serde::{Deserialize, Deserializer};

use crate::authinfo::AuthorityInfo;
use crate::err::{DirError, Result};

/// Thresholds for flag assignment (docs/protocol/80-directory.md, "Flags").
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FlagThresholds {
    /// Fast: bandwidth at least this (bytes/s) always qualifies (Tor: 100 KB/s).
    pub fast_min_bandwidth: u64,
    /// Guard: bandwidth at least this (bytes/s) always qualifies (Tor: 2 MB/s).
    pub guard_min_bandwidth: u64,
    /// Stable: a weighted mean time between failures of at least this (seconds) always
    /// qualifies (Tor: 7 days). Also read under its former name `stable_min_uptime_secs`.
    #[serde(alias = "stable_min_uptime_secs")]
    pub stable_min_mtbf_secs: u64,
    /// Guard: known (first seen) at least this long always qualifies (Tor: 8 days).
    pub guard_min_known_secs: u64,
    /// Exit: the policy must allow every one of these ports.
    pub exit_ports: Vec<u16>,
    /// Weight cap (kilobytes/s) for self-reported bandwidth.
    pub max_weight_kbps: u32,
    /// Guard: weighted fractional uptime at least this, parts per million (Tor: 98%).
    pub guard_min_wfu_ppm: u64,
    /// HSDir: current uptime at least this (seconds; Tor's MinUptimeHidServDirectoryV2, 96 h).
    pub hsdir_min_uptime_secs: u64,
    /// Uptime-history decay: counters are multiplied by 0.95 every this many seconds
    /// (Tor: 12 hours).
    pub history_decay_interval_secs: u64,
}

impl Default for FlagThresholds {
    fn default() -> Self {
        Self {
            fast_min_bandwidth: 100 * 1000,
            guard_min_bandwidth: 2 * 1000 * 1000,
            stable_min_mtbf_secs: 7 * 24 * 3600,
            guard_min_known_secs: 8 * 24 * 3600,
            exit_ports: vec![80, 443],
            max_weight_kbps: 10_000_000,
            guard_min_wfu_ppm: 980_000,
            hsdir_min_uptime_secs: 96 * 3600,
            history_decay_interval_secs: super::history::DEFAULT_DECAY_INTERVAL_SECS,
        }
    }
}

fn de_hex_ids<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<RelayId>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| RelayId::from_hex(s).map_err(serde::de::Error::custom))
        .collect()
}

fn default_interval() -> u64 {
    3600
}
fn default_max_conns() -> usize {
    256
}
fn default_max_relays() -> usize {
    20_000
}
fn default_bwfile_max_age() -> u64 {
    3 * 24 * 3600
}
fn default_max_unmeasured_bw() -> u64 {
    20 * 1000
}
fn default_max_relays_per_addr() -> usize {
    2
}

/// The authority's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// Where keys, descriptors, votes and the consensus live. The signing key and certificate
    /// are read from `<data_dir>/keys/` (written there by `allium authority certify`).
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Every authority of the network, this one included.
    pub authorities: Vec<AuthorityInfo>,
    /// Seconds between consensus periods (default 3600; test networks use a few seconds).
    #[serde(default = "default_interval")]
    pub voting_interval_secs: u64,
    /// Accept relays on private/loopback addresses (test networks only).
    #[serde(default)]
    pub allow_private_addresses: bool,
    /// Flag thresholds.
    #[serde(default)]
    pub flags: FlagThresholds,
    /// Relays to mark BadExit (identities, hex).
    #[serde(default, deserialize_with = "de_hex_ids")]
    pub bad_exits: Vec<RelayId>,
    /// Network parameters this authority votes for.
    #[serde(default)]
    pub params: BTreeMap<String, i32>,
    /// Most simultaneous HTTP connections.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Most relay descriptors held.
    #[serde(default = "default_max_relays")]
    pub max_relays: usize,
    /// The bandwidth file written by the bandwidth scanner beside this authority
    /// (`allium bwscan`); its measurements are voted. None: this authority measures nothing.
    #[serde(default)]
    pub bandwidth_file: Option<PathBuf>,
    /// Measurements (and a whole bandwidth file) older than this many seconds are ignored
    /// (default 3 days).
    #[serde(default = "default_bwfile_max_age")]
    pub bandwidth_file_max_age_secs: u64,
    /// Weight cap for relays nobody measured, bytes/s (Tor's MaxUnmeasuredBw, 20 KB/s); voted
    /// as the `maxunmeasuredbw` parameter (kilobytes/s).
    #[serde(default = "default_max_unmeasured_bw")]
    pub max_unmeasured_bw: u64,
    /// At most this many relays per IP address are listed as Running (Tor's
    /// AuthDirMaxServersPerAddr, default 2; 0 = no limit): those with the highest measured
    /// bandwidth.
    #[serde(default = "default_max_relays_per_addr")]
    pub max_relays_per_addr: usize,
}

impl AuthorityConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, authorities: Vec<AuthorityInfo>) -> Self {
        Self {
            data_dir,
            listen,
            authorities,
            voting_interval_secs: default_interval(),
            allow_private_addresses: false,
            flags: FlagThresholds::default(),
            bad_exits: Vec::new(),
            params: BTreeMap::new(),
            max_connections: default_max_conns(),
            max_relays: default_max_relays(),
            bandwidth_file: None,
            bandwidth_file_max_age_secs: default_bwfile_max_age(),
            max_unmeasured_bw: default_max_unmeasured_bw(),
            max_relays_per_addr: default_max_relays_per_addr(),
        }
    }

    /// Settings for a small local test network: short interval, private addresses, flag
    /// thresholds at zero so every reachable relay gets Fast/Stable/Guard/HSDir, history
    /// decaying every interval, and no per-address limit (every relay is on 127.0.0.1).
    pub fn for_test_network(mut self, voting_interval_secs: u64) -> Self {
        self.voting_interval_secs = voting_interval_secs;
        self.allow_private_addresses = true;
        self.flags.fast_min_bandwidth = 0;
        self.flags.guard_min_bandwidth = 0;
        self.flags.stable_min_mtbf_secs = 0;
        self.flags.guard_min_known_secs = 0;
        self.flags.guard_min_wfu_ppm = 0;
        self.flags.hsdir_min_uptime_secs = 0;
        self.flags.history_decay_interval_secs = voting_interval_secs;
        self.max_relays_per_addr = 0;
        self.params
            .insert("enforce_distinct_subnets".to_string(), 0);
        self
    }

    /// Parse TOML text and validate.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|source| DirError::ConfigParse { source })?;
        c.validate()?;
        Ok(c)
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DirError::io(path, e))?;
        Self::from_toml(&text).map_err(|e| DirError::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.authorities.is_empty() {
            return Err(DirError::Config(
                "list at least one [[authorities]] entry (this authority included)".into(),
            ));
        }
        if self.authorities.len() > crate::doc::consensus::MAX_VOTERS {
            return Err(DirError::Config("at most 16 authorities".into()));
        }
        let mut ids: Vec<RelayId> = self.authorities.iter().map(|a| a.identity).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != self.authorities.len() {
            return Err(DirError::Config(
                "an authority identity is listed twice".into(),
            ));
        }
        if self.voting_interval_secs < 2 || self.voting_interval_secs > 24 * 3600 {
            return Err(DirError::Config(
                "voting_interval_secs must be between 2 and 86400".into(),
            ));
        }
        if self.flags.history_decay_interval_secs == 0 {
            return Err(DirError::Config(
                "flags.history_decay_interval_secs must be positive".into(),
            ));
        }
        if self.flags.guard_min_wfu_ppm > super::history::WFU_SCALE {
            return Err(DirError::Config(
                "flags.guard_min_wfu_ppm is parts per million: at most 1000000".into(),
            ));
        }
        if self.max_connections == 0 || self.max_relays == 0 {
            return Err(DirError::Config(
                "max_connections and max_relays must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The configured identities.
    pub fn authority_ids(&self) -> Vec<RelayId> {
        self.authorities.iter().map(|a| a.identity).collect()
    }
}
