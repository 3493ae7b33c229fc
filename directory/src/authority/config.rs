//! Authority configuration (TOML). See `authority.example.toml` in the repository root.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use allium_crypto::RelayId;
use serde::{Deserialize, Deserializer, Serialize};

use crate::authinfo::AuthorityInfo;
use crate::err::{DirError, Result};

/// Thresholds for flag assignment (docs/protocol/80-directory.md, "Flags").
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// Where keys, descriptors, votes and the consensus live. The signing key and certificate
    /// are read from `<data_dir>/keys/` (written there by `allium authority certify`).
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Local IP that this authority's outgoing connections bind to (reachability probes of
    /// relays; certificates, votes and signatures exchanged with the other authorities), as
    /// Tor's `OutboundBindAddress`, so the peers count them against this address. Default: none
    /// (the system's choice). `allium testnet` sets it to the listen IP (each node on its own
    /// loopback address).
    #[serde(default)]
    pub outbound_bind_address: Option<IpAddr>,
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
    /// Log filter used by the `allium authority` binary (e.g. `info`, `allium_directory=debug`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
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
    /// Rate limits, caps and timeouts against floods (`[limits]`).
    #[serde(default)]
    pub limits: AuthorityLimits,
    /// Where `allium authority` serves Prometheus metrics (`/metrics`); none by default.
    /// Loopback only unless `metrics_allow_public` is set.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// Allow `metrics_address` on a non-loopback address.
    #[serde(default)]
    pub metrics_allow_public: bool,
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
    /// Length of each phase (commit, reveal) of a shared-random protocol run, in voting rounds;
    /// 0 (the default) sizes the run to the onion-service time period (`hsdir_interval`, one new
    /// shared random value per period). Non-zero is for tests of the protocol on a network
    /// with a short voting interval: the value then changes within a period.
    #[serde(default)]
    pub shared_random_phase_rounds: u32,
}

/// Limits that keep one source from jamming the authority (docs/protocol/80-directory.md,
/// "Authority limits"). Every field has a default; a test network (one host, every relay on
/// one address) raises the per-address and per-prefix relay caps unless they are set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorityLimits {
    /// POSTs one source address may make at once (token-bucket burst).
    pub upload_burst: u32,
    /// POSTs a minute one source address may make once its burst is used.
    pub upload_per_min: u32,
    /// POSTs one source prefix (/24 or /48) may make at once.
    pub prefix_upload_burst: u32,
    /// POSTs a minute one source prefix may make once its burst is used.
    pub prefix_upload_per_min: u32,
    /// Most source addresses and prefixes whose upload rate is remembered.
    pub max_tracked_sources: usize,
    /// Most relays held whose descriptor names one address (default 4; 1024 when
    /// `allow_private_addresses` is on).
    pub max_relays_per_addr: Option<usize>,
    /// Most relays held whose descriptor names an address in one /24 or /48 (default 64; 4096
    /// when `allow_private_addresses` is on).
    pub max_relays_per_prefix: Option<usize>,
    /// Most simultaneous HTTP connections from one address (authorities exempt).
    pub max_connections_per_addr: usize,
    /// Most simultaneous HTTP connections from one /24 or /48 (authorities exempt).
    pub max_connections_per_prefix: usize,
    /// Of `max_connections`, slots only the configured authorities' addresses may use.
    pub reserved_authority_connections: usize,
    /// More source addresses to treat as authorities (when an authority connects from another
    /// address than its `dir_addr`).
    pub authority_source_addrs: Vec<std::net::IpAddr>,
    /// Seconds a client has to send a whole request head (slowloris bound).
    pub header_timeout_secs: u64,
    /// Seconds a connection may stay without reading or writing a byte.
    pub idle_timeout_secs: u64,
    /// Milliseconds one reachability probe may take (an address that drops packets costs no
    /// more than this).
    pub probe_timeout_ms: u64,
    /// Re-probes of known relays started per second, at most, by the background prober: each
    /// relay is re-probed every `max(voting_interval / 2, relays / probes_per_sec)` seconds (a
    /// probe is a whole link handshake). New relays are probed regardless.
    pub probes_per_sec: u32,
}

impl Default for AuthorityLimits {
    fn default() -> Self {
        Self {
            upload_burst: 10,
            upload_per_min: 2,
            prefix_upload_burst: 64,
            prefix_upload_per_min: 32,
            max_tracked_sources: 16_384,
            max_relays_per_addr: None,
            max_relays_per_prefix: None,
            max_connections_per_addr: 8,
            max_connections_per_prefix: 32,
            reserved_authority_connections: 32,
            authority_source_addrs: Vec::new(),
            header_timeout_secs: 10,
            idle_timeout_secs: 30,
            probe_timeout_ms: 10_000,
            probes_per_sec: 20,
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}
fn default_heartbeat() -> u64 {
    6 * 3600
}

/// Keys a running authority takes from a reloaded file ([`crate::authority::AuthorityHandle::reconfigure`]
/// applies the vote inputs; the binary applies `log_level` and `heartbeat_period_secs`). They count
/// from the next vote on. Every other key needs a restart.
pub const RELOADABLE_KEYS: &[&str] = &[
    "log_level",
    "heartbeat_period_secs",
    "flags",
    "bad_exits",
    "params",
    "allow_private_addresses",
    "max_relays",
];

impl AuthorityConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, authorities: Vec<AuthorityInfo>) -> Self {
        Self {
            data_dir,
            listen,
            outbound_bind_address: None,
            authorities,
            voting_interval_secs: default_interval(),
            allow_private_addresses: false,
            flags: FlagThresholds::default(),
            bad_exits: Vec::new(),
            params: BTreeMap::new(),
            max_connections: default_max_conns(),
            max_relays: default_max_relays(),
            limits: AuthorityLimits::default(),
            log_level: default_log_level(),
            heartbeat_period_secs: default_heartbeat(),
            allow_root: false,
            user: None,
            metrics_address: None,
            metrics_allow_public: false,
            bandwidth_file: None,
            bandwidth_file_max_age_secs: default_bwfile_max_age(),
            max_unmeasured_bw: default_max_unmeasured_bw(),
            max_relays_per_addr: default_max_relays_per_addr(),
            shared_random_phase_rounds: 0,
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
        // The test network's onion-service time period (20 minutes), which also sizes the
        // shared-random protocol runs.
        let tp = allium_crypto::hs::TimePeriodParams::TESTNET.length_minutes;
        self.params
            .entry(allium_crypto::hs::TimePeriodParams::CONSENSUS_PARAM.to_string())
            .or_insert(i32::try_from(tp).unwrap_or(i32::MAX));
        self
    }

    /// The shared-random run schedule of this configuration: phases of
    /// `shared_random_phase_rounds` rounds, or half the time period voted as `hsdir_interval`.
    pub fn shared_random_schedule(&self) -> super::shared_random::SrSchedule {
        let tp = allium_crypto::hs::TimePeriodParams::from_consensus(
            self.params
                .get(allium_crypto::hs::TimePeriodParams::CONSENSUS_PARAM)
                .copied(),
        );
        super::shared_random::SrSchedule::new(
            &tp,
            self.voting_interval_secs,
            self.shared_random_phase_rounds,
        )
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
        if self.shared_random_phase_rounds > 10_000 {
            return Err(DirError::Config(
                "shared_random_phase_rounds must be at most 10000 (0: follow the time period)"
                    .into(),
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
        let l = &self.limits;
        if l.upload_burst == 0
            || l.prefix_upload_burst == 0
            || l.max_tracked_sources < 2
            || l.max_connections_per_addr == 0
            || l.max_connections_per_prefix == 0
            || l.max_relays_per_addr == Some(0)
            || l.max_relays_per_prefix == Some(0)
        {
            return Err(DirError::Config(
                "[limits]: bursts, caps and max_tracked_sources must be positive".into(),
            ));
        }
        if l.reserved_authority_connections >= self.max_connections {
            return Err(DirError::Config(
                "[limits] reserved_authority_connections must be below max_connections".into(),
            ));
        }
        if !(1..=600).contains(&l.header_timeout_secs)
            || !(1..=3600).contains(&l.idle_timeout_secs)
            || !(100..=60_000).contains(&l.probe_timeout_ms)
            || !(1..=100_000).contains(&l.probes_per_sec)
        {
            return Err(DirError::Config(
                "[limits]: header_timeout_secs 1-600, idle_timeout_secs 1-3600, \
                 probe_timeout_ms 100-60000, probes_per_sec 1-100000"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Most relays held per descriptor address (see [`AuthorityLimits::max_relays_per_addr`]).
    pub fn relays_per_addr(&self) -> usize {
        self.limits
            .max_relays_per_addr
            .unwrap_or(if self.allow_private_addresses {
                1024
            } else {
                4
            })
    }

    /// Most relays held per descriptor prefix (see [`AuthorityLimits::max_relays_per_prefix`]).
    pub fn relays_per_prefix(&self) -> usize {
        self.limits
            .max_relays_per_prefix
            .unwrap_or(if self.allow_private_addresses {
                4096
            } else {
                64
            })
    }

    /// The source addresses treated as authorities: every configured authority's directory
    /// address, plus `limits.authority_source_addrs`.
    pub fn authority_addrs(&self) -> Vec<std::net::IpAddr> {
        let mut v: Vec<std::net::IpAddr> = self
            .authorities
            .iter()
            .map(|a| super::limits::canonical(a.dir_addr.ip()))
            .chain(
                self.limits
                    .authority_source_addrs
                    .iter()
                    .map(|ip| super::limits::canonical(*ip)),
            )
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The configured identities.
    pub fn authority_ids(&self) -> Vec<RelayId> {
        self.authorities.iter().map(|a| a.identity).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> AuthorityConfig {
        let text = include_str!("../../../authority.example.toml");
        AuthorityConfig::from_toml(text).expect("example parses")
    }

    #[test]
    fn example_limits_are_the_defaults() {
        let c = example();
        let d = AuthorityLimits::default();
        assert_eq!(
            c.limits,
            AuthorityLimits {
                max_relays_per_addr: Some(4),
                max_relays_per_prefix: Some(64),
                ..d
            }
        );
        assert_eq!(c.relays_per_addr(), 4);
        assert_eq!(c.relays_per_prefix(), 64);
    }

    #[test]
    fn relay_caps_default_by_network_kind() {
        let mut c = example();
        c.limits.max_relays_per_addr = None;
        c.limits.max_relays_per_prefix = None;
        assert_eq!((c.relays_per_addr(), c.relays_per_prefix()), (4, 64));
        c.allow_private_addresses = true;
        assert_eq!((c.relays_per_addr(), c.relays_per_prefix()), (1024, 4096));
    }

    #[test]
    fn bad_limits_are_refused() {
        let base = example();
        let cases: [fn(&mut AuthorityConfig); 6] = [
            |c| c.limits.upload_burst = 0,
            |c| c.limits.max_connections_per_addr = 0,
            |c| c.limits.max_relays_per_addr = Some(0),
            |c| c.limits.reserved_authority_connections = c.max_connections,
            |c| c.limits.header_timeout_secs = 0,
            |c| c.limits.probe_timeout_ms = 10,
        ];
        for f in cases {
            let mut c = base.clone();
            f(&mut c);
            let e = c.validate().expect_err("refused");
            assert!(e.to_string().contains("limits"), "{e}");
        }
        assert!(
            AuthorityConfig::from_toml(
                &include_str!("../../../authority.example.toml")
                    .replace("[limits]\n", "[limits]\nno_such_key = 1\n")
            )
            .is_err(),
            "unknown keys in [limits] are refused"
        );
    }

    #[test]
    fn authority_addrs_include_extra_sources() {
        let mut c = example();
        let before = c.authority_addrs().len();
        c.limits.authority_source_addrs = vec![
            "198.51.100.7".parse().expect("ip"),
            "::ffff:198.51.100.7".parse().expect("ip"),
        ];
        assert_eq!(c.authority_addrs().len(), before + 1);
    }
}
