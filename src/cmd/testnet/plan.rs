//! One builder for every local test network: `allium testnet` (each node a child process) and
//! the whole-network tests in `tests/` (every node in-process) describe their network with
//! [`NetworkBuilder`] and start what its [`NetworkPlan`] says.
//!
//! A plan holds the authorities (keys generated, a listener already bound on 127.0.0.1 so every
//! address is known before any configuration is written), the relay configurations (the first
//! `exits` are exits) and the proxy configuration. Starting nodes is the caller's part; this
//! module does no network I/O beyond binding the authority listeners.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use allium_client::config::FallbackDir;
use allium_client::{AuthorityInfo, ProxyConfig};
use allium_crypto::RelayId;
use allium_directory::authority::AuthorityConfig;
use allium_relay::{ExitPolicy, RelayConfig};

/// Number of directory authorities in a test network.
pub const N_AUTHORITIES: usize = 3;

/// The shape of a test network.
#[derive(Clone, Debug)]
pub struct NetworkBuilder {
    relays: usize,
    exits: usize,
    exit_policy: ExitPolicy,
    voting_interval_secs: u64,
    fixed_relay_ports: bool,
    relay_port_base: Option<u16>,
    advertise_port_base: Option<u16>,
    socks_listen: SocketAddr,
    bandwidth_file: Option<PathBuf>,
}

/// How old a test network's bandwidth file may get before the authorities ignore it.
pub const TESTNET_BWFILE_MAX_AGE_SECS: u64 = 600;

impl Default for NetworkBuilder {
    fn default() -> Self {
        Self {
            relays: 6,
            exits: 2,
            exit_policy: ExitPolicy::accept_all(true),
            voting_interval_secs: 3600,
            fixed_relay_ports: false,
            relay_port_base: None,
            advertise_port_base: None,
            socks_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bandwidth_file: None,
        }
    }
}

/// One planned authority.
#[derive(Debug)]
pub struct PlannedAuthority {
    /// `auth<i>`.
    pub name: String,
    /// Its data directory (keys already in it).
    pub data_dir: PathBuf,
    /// Its identity.
    pub identity: RelayId,
    /// Its directory listener, bound on 127.0.0.1 (an in-process authority serves on it; a
    /// child process binds the same address after the parent drops it).
    pub listener: TcpListener,
    /// The listener's address.
    pub addr: SocketAddr,
}

/// One planned relay.
#[derive(Clone, Debug)]
pub struct PlannedRelay {
    /// `relay<i>`.
    pub name: String,
    /// Whether it is an exit.
    pub exit: bool,
    /// Its configuration.
    pub config: RelayConfig,
}

/// Everything needed to start a test network.
#[derive(Debug)]
pub struct NetworkPlan {
    /// The authorities.
    pub authorities: Vec<PlannedAuthority>,
    /// The relays, exits first.
    pub relays: Vec<PlannedRelay>,
    /// The proxy's configuration (data directory `<dir>/proxy`).
    pub proxy: ProxyConfig,
    voting_interval_secs: u64,
    bandwidth_file: Option<PathBuf>,
}

impl NetworkBuilder {
    /// 6 relays, 2 exits accepting every port (private destinations allowed), 1-hour voting
    /// interval (tests run rounds by hand), relay ports picked at start, SOCKS on
    /// 127.0.0.1:0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of relays (at least 3).
    pub fn relays(mut self, n: usize) -> Self {
        self.relays = n;
        self
    }

    /// How many of the relays are exits (at least 1, at most all).
    pub fn exits(mut self, n: usize) -> Self {
        self.exits = n;
        self
    }

    /// The exit policy of the exits.
    pub fn exit_policy(mut self, p: ExitPolicy) -> Self {
        self.exit_policy = p;
        self
    }

    /// The authorities' voting interval in seconds.
    pub fn voting_interval_secs(mut self, s: u64) -> Self {
        self.voting_interval_secs = s;
        self
    }

    /// Choose each relay's port now (a free one on 127.0.0.1), so its address is known before
    /// it starts (child processes); otherwise relays bind 127.0.0.1:0.
    pub fn fixed_relay_ports(mut self, yes: bool) -> Self {
        self.fixed_relay_ports = yes;
        self
    }

    /// Relay i listens on 127.0.0.1:(base + i) (`None`: as [`Self::fixed_relay_ports`] says).
    pub fn relay_port_base(mut self, base: Option<u16>) -> Self {
        self.relay_port_base = base;
        self
    }

    /// Relay i advertises 127.0.0.1:(base + i) instead of its listener (`None`: the listener).
    pub fn advertise_port_base(mut self, base: Option<u16>) -> Self {
        self.advertise_port_base = base;
        self
    }

    /// The proxy's SOCKS address.
    pub fn socks_listen(mut self, a: SocketAddr) -> Self {
        self.socks_listen = a;
        self
    }

    /// The bandwidth file every authority votes from (written by a bandwidth scanner).
    pub fn bandwidth_file(mut self, p: PathBuf) -> Self {
        self.bandwidth_file = Some(p);
        self
    }

    /// Generate keys under `dir`, bind the authority listeners and write nothing else: the
    /// plan for a network. `now` (Unix seconds) dates the authority certificates.
    pub fn plan(&self, dir: &Path, now: u64) -> Result<NetworkPlan, String> {
        if self.relays < 3 {
            return Err("a test network needs at least 3 relays (guard, middle, exit)".into());
        }
        if self.exits == 0 || self.exits > self.relays {
            return Err("a test network needs between 1 and all of its relays as exits".into());
        }
        let mut authorities = Vec::new();
        for i in 0..N_AUTHORITIES {
            let name = format!("auth{i}");
            let data_dir = dir.join(&name);
            let (id, _keys) = allium_directory::authority::keys::generate_for_test(&data_dir, now)
                .map_err(|e| format!("creating keys for {name}: {e}"))?;
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("binding a port for {name}: {e}"))?;
            let addr = listener
                .local_addr()
                .map_err(|e| format!("the address of {name}: {e}"))?;
            authorities.push(PlannedAuthority {
                name,
                data_dir,
                identity: id.public(),
                listener,
                addr,
            });
        }
        let infos: Vec<AuthorityInfo> = authorities.iter().map(PlannedAuthority::info).collect();
        // One authority entry type for every role's configuration.
        let relay_auths = infos.clone();
        let mut relays = Vec::new();
        for i in 0..self.relays {
            let exit = i < self.exits;
            let name = format!("relay{i}");
            let nickname = format!("{}{i}", if exit { "TestExit" } else { "TestRelay" });
            let mut config = RelayConfig::for_test(&nickname, dir.join(&name));
            let port_at = |base: u16| {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .filter(|&p| p != 0)
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                    .ok_or_else(|| format!("port base {base} + {i} is not a port"))
            };
            if let Some(base) = self.relay_port_base {
                config.listen = port_at(base)?;
            } else if self.fixed_relay_ports {
                config.listen = free_port().map_err(|e| format!("a port for {name}: {e}"))?;
            }
            if let Some(base) = self.advertise_port_base {
                config.advertised = Some(port_at(base)?);
            }
            config.contact = "allium testnet".into();
            // Metrics on a free loopback port (`allium testnet` fixes it in the file it writes).
            config.metrics_address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            config.authorities = relay_auths.clone();
            config.descriptor_publish_interval_secs = 60;
            // A throwaway local network runs as whoever starts it, root included.
            config.allow_root = true;
            config.exit_policy = if exit {
                self.exit_policy.clone()
            } else {
                ExitPolicy::default()
            };
            relays.push(PlannedRelay { name, exit, config });
        }
        let proxy = ProxyConfig {
            socks_listen: self.socks_listen,
            data_dir: dir.join("proxy"),
            authorities: infos,
            test_network: true,
            allow_root: true,
            // Every client port, on free ports (`allium testnet` fixes them before writing
            // the proxy's configuration).
            http_tunnel_port: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            dns_port: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            metrics_address: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..ProxyConfig::default()
        };
        Ok(NetworkPlan {
            authorities,
            relays,
            proxy,
            voting_interval_secs: self.voting_interval_secs,
            bandwidth_file: self.bandwidth_file.clone(),
        })
    }
}

/// How many relays a test network's proxy lists as fallback directory caches.
pub const N_FALLBACK_DIRS: usize = 3;

/// Fallback directory caches for a proxy: the first `n` relays of a consensus that carry the
/// Guard flag (the others if too few do), with their keys and OR address.
pub fn fallback_dirs_from(nd: &allium_directory::NetDir, n: usize) -> Vec<FallbackDir> {
    let guard = |e: &&allium_directory::doc::ConsensusEntry| {
        e.flags.contains(allium_directory::doc::Flags::GUARD)
    };
    let relays = nd.relays();
    relays
        .iter()
        .filter(guard)
        .chain(relays.iter().filter(|e| !guard(e)))
        .filter_map(|e| {
            Some(FallbackDir {
                identity: e.identity,
                link_key: e.link_key,
                onion_key: e.onion_key,
                or_addr: *e.addrs.first()?,
            })
        })
        .take(n)
        .collect()
}

/// A free port on 127.0.0.1 (bound, then released).
///
/// The port is released before the node binds it, so it is taken below the kernel's ephemeral
/// range: a port the kernel hands out for an outgoing connection in the meantime (the nodes open
/// many) would otherwise take it first, and the node would fail to start.
///
/// A port is handed out at most once per process: a 1,000-relay network takes 3,000 ports from a
/// range of about 22,000, and without this ~200 of them would go twice (two nodes, one port).
pub fn free_port() -> std::io::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..64 {
        let a = free_port_once()?;
        if handed.insert(a.port()) {
            return Ok(a);
        }
    }
    free_port_once()
}

fn free_port_once() -> std::io::Result<SocketAddr> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST + 1000 {
        let span = u32::from(ephemeral_low - LOWEST);
        for _ in 0..200 {
            let port = LOWEST + (allium_crypto::rng::random_u32() % span) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr();
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl PlannedAuthority {
    /// Identity and directory address, as clients and relays list it.
    pub fn info(&self) -> AuthorityInfo {
        AuthorityInfo {
            identity: self.identity,
            dir_addr: self.addr,
        }
    }
}

impl NetworkPlan {
    /// Every authority's identity and address.
    pub fn authority_infos(&self) -> Vec<AuthorityInfo> {
        self.authorities
            .iter()
            .map(PlannedAuthority::info)
            .collect()
    }

    /// The configuration of authority `i` (for an in-process authority).
    pub fn authority_config(&self, i: usize) -> Option<AuthorityConfig> {
        let a = self.authorities.get(i)?;
        let mut cfg = AuthorityConfig::new(a.data_dir.clone(), a.addr, self.authority_infos())
            .for_test_network(self.voting_interval_secs);
        if let Some(p) = &self.bandwidth_file {
            cfg.bandwidth_file = Some(p.clone());
            cfg.bandwidth_file_max_age_secs = TESTNET_BWFILE_MAX_AGE_SECS;
        }
        Some(cfg)
    }

    /// The configuration file of authority `i` (for a child process): the same settings as
    /// [`Self::authority_config`], written as a TOML table (the authority's configuration type
    /// is read-only), so paths and values are quoted by the TOML writer.
    pub fn authority_toml(&self, i: usize) -> Result<String, String> {
        use toml::{Table, Value};
        fn table<const N: usize>(entries: [(&str, Value); N]) -> Table {
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        }
        let cfg = self
            .authority_config(i)
            .ok_or_else(|| format!("no authority {i}"))?;
        let auths = cfg
            .authorities
            .iter()
            .map(|a| {
                Value::Table(table([
                    ("identity", a.identity.to_hex().into()),
                    ("dir_addr", a.dir_addr.to_string().into()),
                ]))
            })
            .collect::<Vec<_>>();
        let int = |v: u64| {
            i64::try_from(v)
                .map(Value::Integer)
                .map_err(|e| e.to_string())
        };
        let params: Table = cfg
            .params
            .iter()
            .map(|(k, v)| (k.clone(), Value::Integer(i64::from(*v))))
            .collect();
        let bwfile = cfg.bandwidth_file.as_ref().map(|p| p.display().to_string());
        let mut cfg = table([
            ("data_dir", cfg.data_dir.display().to_string().into()),
            ("listen", cfg.listen.to_string().into()),
            ("voting_interval_secs", int(cfg.voting_interval_secs)?),
            (
                "allow_private_addresses",
                cfg.allow_private_addresses.into(),
            ),
            ("authorities", Value::Array(auths)),
            ("allow_root", true.into()),
            (
                "flags",
                Value::Table(table([
                    ("fast_min_bandwidth", int(cfg.flags.fast_min_bandwidth)?),
                    ("guard_min_bandwidth", int(cfg.flags.guard_min_bandwidth)?),
                    ("stable_min_mtbf_secs", int(cfg.flags.stable_min_mtbf_secs)?),
                    ("guard_min_known_secs", int(cfg.flags.guard_min_known_secs)?),
                    ("guard_min_wfu_ppm", int(cfg.flags.guard_min_wfu_ppm)?),
                    (
                        "hsdir_min_uptime_secs",
                        int(cfg.flags.hsdir_min_uptime_secs)?,
                    ),
                    (
                        "history_decay_interval_secs",
                        int(cfg.flags.history_decay_interval_secs)?,
                    ),
                ])),
            ),
            (
                "max_relays_per_addr",
                int(u64::try_from(cfg.max_relays_per_addr).unwrap_or(u64::MAX))?,
            ),
            (
                "bandwidth_file_max_age_secs",
                int(cfg.bandwidth_file_max_age_secs)?,
            ),
            ("params", Value::Table(params)),
        ]);
        if let Some(p) = bwfile {
            cfg.insert("bandwidth_file".to_owned(), p.into());
        }
        toml::to_string(&cfg).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn port_bases_set_listen_and_advertised_addresses() {
        // Not `tempfile_dir()`: that one is shared with (and wiped by) the other test.
        let dir =
            std::env::temp_dir().join(format!("allium-plan-bases-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let plan = NetworkBuilder::new()
            .relays(3)
            .exits(1)
            .relay_port_base(Some(40_080))
            .advertise_port_base(Some(40_150))
            .plan(&dir, 1_700_000_000)
            .unwrap();
        for (i, r) in (0u16..).zip(&plan.relays) {
            assert_eq!(
                r.config.listen,
                SocketAddr::from(([127, 0, 0, 1], 40_080 + i))
            );
            assert_eq!(
                r.config.advertised,
                Some(SocketAddr::from(([127, 0, 0, 1], 40_150 + i)))
            );
        }
        assert!(
            NetworkBuilder::new()
                .relays(3)
                .advertise_port_base(Some(65_534))
                .plan(&dir, 1_700_000_000)
                .is_err()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plan_shapes_the_network() {
        let dir = tempfile_dir();
        let plan = NetworkBuilder::new()
            .relays(4)
            .exits(1)
            .fixed_relay_ports(true)
            .plan(&dir, 1_700_000_000)
            .unwrap();
        assert_eq!(plan.authorities.len(), N_AUTHORITIES);
        assert_eq!(plan.relays.len(), 4);
        assert_eq!(plan.relays.iter().filter(|r| r.exit).count(), 1);
        assert!(plan.relays[0].exit && !plan.relays[0].config.exit_policy.accept.is_empty());
        assert!(plan.relays[1].config.exit_policy.accept.is_empty());
        assert!(plan.relays.iter().all(|r| r.config.listen.port() != 0));
        assert!(plan.relays.iter().all(|r| r.config.authorities.len() == 3));
        assert_eq!(plan.proxy.authorities, plan.authority_infos());
        assert!(plan.proxy.test_network);

        // The child-process file says what the in-process configuration says.
        for i in 0..N_AUTHORITIES {
            let direct = plan.authority_config(i).unwrap();
            let parsed = AuthorityConfig::from_toml(&plan.authority_toml(i).unwrap()).unwrap();
            assert_eq!(parsed.listen, direct.listen);
            assert_eq!(parsed.data_dir, direct.data_dir);
            assert_eq!(parsed.voting_interval_secs, 3600);
            assert!(parsed.allow_private_addresses);
            assert_eq!(parsed.flags, direct.flags);
            assert_eq!(parsed.params, direct.params);
            assert_eq!(parsed.max_relays_per_addr, direct.max_relays_per_addr);
            assert_eq!(parsed.bandwidth_file, direct.bandwidth_file);
            let ids = |c: &AuthorityConfig| {
                c.authorities
                    .iter()
                    .map(|a| (a.identity, a.dir_addr))
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(&parsed), ids(&direct));
        }
        assert!(plan.authority_config(3).is_none());
        // With a bandwidth scanner, every authority votes from its file.
        let bw = dir.join("bw");
        let plan = NetworkBuilder::new()
            .bandwidth_file(bw.clone())
            .plan(&dir.join("b"), 1_700_000_000)
            .unwrap();
        let parsed = AuthorityConfig::from_toml(&plan.authority_toml(0).unwrap()).unwrap();
        assert_eq!(parsed.bandwidth_file.as_deref(), Some(bw.as_path()));
        assert_eq!(
            parsed.bandwidth_file_max_age_secs,
            TESTNET_BWFILE_MAX_AGE_SECS
        );

        let bad = NetworkBuilder::new().relays(2).plan(&dir, 0);
        assert!(bad.unwrap_err().contains("at least 3"));
        let bad = NetworkBuilder::new().relays(3).exits(4).plan(&dir, 0);
        assert!(bad.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("allium-plan-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
