//! One builder for every local test network: `allium testnet` (each node a child process) and
//! the whole-network tests in `tests/` (every node in-process) describe their network with
//! [`NetworkBuilder`] and start what its [`NetworkPlan`] says.
//!
//! A plan holds the authorities (keys generated, a listener already bound so every address is
//! known before any configuration is written), the relay configurations (the first `exits` are
//! exits) and the proxy configuration. Starting nodes is the caller's part; this module does no
//! network I/O beyond binding the authority listeners (and one probe bind, [`AddressLayout`]).
//!
//! # Addresses ([`AddressLayout::Distinct`], the default where the system allows it)
//!
//! Linux routes all of 127.0.0.0/8 to the loopback interface, so every node gets its own address
//! and the per-address and per-subnet rules apply as they would between machines:
//!
//! | node | address |
//! |---|---|
//! | proxy (SOCKS, HTTP CONNECT, DNS), test page, curl, honest clients | 127.0.0.1 |
//! | an attacker (the attack suite) | 127.0.0.77 (reserved) |
//! | relay `i` | 127.(1 + i % 99).(i / 99).1 ([`relay_ip`]) |
//! | authority `i` | 127.(100 + i).0.1 ([`authority_ip`]) |
//! | bandwidth scanner | 127.103.0.1 ([`BWSCAN_IP`]) |
//! | extra client proxies (`bench/scale.py`) | 127.x.255.0/24, never a relay's |
//!
//! The first 99 relays each have a /16 of their own; beyond that, relay `i` shares its /16 with
//! relays `i ± 99`. Relays and authorities listen on their own address and their outgoing
//! connections leave from it (`outbound_bind_address`), so a relay counts a peer's links,
//! CREATEs and uploads against that peer. The consensus keeps the /16 path rule on
//! (`enforce_distinct_subnets`, [`subnets_allow_paths`]).
//!
//! [`AddressLayout::Single`] is the old layout, every node on 127.0.0.1 (a system that routes only
//! 127.0.0.1 to loopback, such as macOS): the /16 rule and the authorities' per-address relay cap
//! are then off.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use allium_client::config::FallbackDir;
use allium_client::{AuthorityInfo, ProxyConfig};
use allium_crypto::RelayId;
use allium_directory::authority::AuthorityConfig;
use allium_relay::{ExitPolicy, RelayConfig};

/// Number of directory authorities in a test network.
pub const N_AUTHORITIES: usize = 3;

/// The loopback address of the proxy, the test page and honest clients (both layouts).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Reserved for an attacker (`bench/attack/run.py`): no node of a test network uses it.
pub const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);
/// The bandwidth scanner's source address in the distinct layout.
pub const BWSCAN_IP: Ipv4Addr = Ipv4Addr::new(127, 103, 0, 1);
/// How many /16s the relays are spread over in the distinct layout (127.1/16 to 127.99/16).
pub const RELAY_SUBNETS: usize = 99;
/// Most relays the distinct layout has addresses for (99 /16s times 255 values of the third
/// octet: 127.x.255.0/24 is left to extra clients).
pub const MAX_DISTINCT_RELAYS: usize = RELAY_SUBNETS * 255;

/// Where the nodes of a test network listen (module docs, "Addresses").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressLayout {
    /// Each authority and relay on its own loopback address, relays in distinct /16s.
    Distinct,
    /// Every node on 127.0.0.1 (the former layout): no per-address or /16 rule can tell nodes
    /// apart.
    Single,
}

impl AddressLayout {
    /// [`AddressLayout::Distinct`] if this system routes 127.1.0.1 to loopback (binding
    /// `127.1.0.1:0` works), else [`AddressLayout::Single`].
    pub fn detect() -> Self {
        if TcpListener::bind((Ipv4Addr::new(127, 1, 0, 1), 0)).is_ok() {
            Self::Distinct
        } else {
            Self::Single
        }
    }

    /// The address of relay `i`.
    pub fn relay(self, i: usize) -> Ipv4Addr {
        match self {
            Self::Distinct => relay_ip(i),
            Self::Single => CLIENT_IP,
        }
    }

    /// The address of authority `i`.
    pub fn authority(self, i: usize) -> Ipv4Addr {
        match self {
            Self::Distinct => authority_ip(i),
            Self::Single => CLIENT_IP,
        }
    }

    /// The bandwidth scanner's source address (`None`: the system's choice, 127.0.0.1).
    pub fn bwscan(self) -> Option<Ipv4Addr> {
        match self {
            Self::Distinct => Some(BWSCAN_IP),
            Self::Single => None,
        }
    }
}

/// Relay `i`'s address in the distinct layout: 127.(1 + i % 99).(i / 99).1 (wrapping after
/// [`MAX_DISTINCT_RELAYS`]; [`NetworkBuilder::plan`] refuses more relays than that).
pub fn relay_ip(i: usize) -> Ipv4Addr {
    let b = 1 + (i % RELAY_SUBNETS) as u8;
    let c = ((i / RELAY_SUBNETS) % 255) as u8;
    Ipv4Addr::new(127, b, c, 1)
}

/// Authority `i`'s address in the distinct layout: 127.(100 + i).0.1.
pub fn authority_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 100u8.saturating_add(i as u8), 0, 1)
}

/// The rule for `enforce_distinct_subnets` in a test network: on exactly when the /16 path rule
/// still leaves a circuit, that is when some exit and two other relays sit in three different
/// IPv4 /16s (`relays`: each relay's address and whether it is an exit). Every relay of a test
/// network can be a guard (the flag thresholds are zero), so that is the whole condition. With
/// every relay on one address it is off, and clients fall back to "no relay twice".
pub fn subnets_allow_paths(relays: &[(IpAddr, bool)]) -> bool {
    let subnet = |ip: &IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            (4u8, u32::from(a) << 8 | u32::from(b))
        }
        IpAddr::V6(v6) => {
            let [a, b, ..] = v6.segments();
            (6u8, u32::from(a) << 16 | u32::from(b))
        }
    };
    let subnets: BTreeSet<_> = relays.iter().map(|(ip, _)| subnet(ip)).collect();
    subnets.len() >= 3 && relays.iter().any(|(_, exit)| *exit)
}

/// The authorities' per-address relay cap in the distinct layout (Tor's
/// `AuthDirMaxServersPerAddr` default): each relay has an address of its own, so only a second
/// node on one address (an attacker's Sybils) meets it.
pub const DISTINCT_MAX_RELAYS_PER_ADDR: usize = 2;

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
    layout: Option<AddressLayout>,
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
            layout: None,
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
    /// Its directory listener, bound on its own address (an in-process authority serves on it;
    /// a child process binds the same address after the parent drops it).
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
    /// Where the nodes listen.
    pub layout: AddressLayout,
    /// Whether the authorities vote `enforce_distinct_subnets` on ([`subnets_allow_paths`]).
    pub distinct_subnets: bool,
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

    /// Choose each relay's port now (a free one on its address), so its address is known before
    /// it starts (child processes); otherwise relays bind port 0 on their address.
    pub fn fixed_relay_ports(mut self, yes: bool) -> Self {
        self.fixed_relay_ports = yes;
        self
    }

    /// Relay i listens on port base + i of its address (`None`: as [`Self::fixed_relay_ports`]
    /// says).
    pub fn relay_port_base(mut self, base: Option<u16>) -> Self {
        self.relay_port_base = base;
        self
    }

    /// Relay i advertises port base + i of its address instead of its listener (`None`: the
    /// listener).
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

    /// Where the nodes listen (default: [`AddressLayout::detect`] when planning).
    pub fn address_layout(mut self, layout: AddressLayout) -> Self {
        self.layout = Some(layout);
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
        let layout = self.layout.unwrap_or_else(AddressLayout::detect);
        if layout == AddressLayout::Distinct && self.relays > MAX_DISTINCT_RELAYS {
            return Err(format!(
                "the distinct-address layout has addresses for {MAX_DISTINCT_RELAYS} relays"
            ));
        }
        let mut authorities = Vec::new();
        for i in 0..N_AUTHORITIES {
            let name = format!("auth{i}");
            let data_dir = dir.join(&name);
            let (id, _keys) = allium_directory::authority::keys::generate_for_test(&data_dir, now)
                .map_err(|e| format!("creating keys for {name}: {e}"))?;
            let ip = layout.authority(i);
            let listener = TcpListener::bind((ip, 0))
                .map_err(|e| format!("binding a port for {name} on {ip}: {e}"))?;
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
            let ip = layout.relay(i);
            let port_at = |base: u16| {
                u16::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .filter(|&p| p != 0)
                    .map(|p| SocketAddr::from((ip, p)))
                    .ok_or_else(|| format!("port base {base} + {i} is not a port"))
            };
            config.listen = SocketAddr::from((ip, 0));
            if let Some(base) = self.relay_port_base {
                config.listen = port_at(base)?;
            } else if self.fixed_relay_ports {
                config.listen =
                    free_port_on(ip).map_err(|e| format!("a port for {name} on {ip}: {e}"))?;
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
        let distinct_subnets = subnets_allow_paths(
            &relays
                .iter()
                .map(|r| (r.config.listen.ip(), r.exit))
                .collect::<Vec<_>>(),
        );
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
            layout,
            distinct_subnets,
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

/// A free port on 127.0.0.1 (bound, then released): [`free_port_on`] 127.0.0.1.
pub fn free_port() -> std::io::Result<SocketAddr> {
    free_port_on(CLIENT_IP)
}

/// A free port on `ip` (bound, then released).
///
/// The port is released before the node binds it, so it is taken below the kernel's ephemeral
/// range: a port the kernel hands out for an outgoing connection in the meantime (the nodes open
/// many) would otherwise take it first, and the node would fail to start.
///
/// A port is handed out at most once per process: a 1,000-relay network takes 3,000 ports from a
/// range of about 22,000, and without this ~200 of them would go twice (two nodes, one port).
pub fn free_port_on(ip: Ipv4Addr) -> std::io::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..64 {
        let a = free_port_once(ip)?;
        if handed.insert(a.port()) {
            return Ok(a);
        }
    }
    free_port_once(ip)
}

fn free_port_once(ip: Ipv4Addr) -> std::io::Result<SocketAddr> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST + 1000 {
        let span = u32::from(ephemeral_low - LOWEST);
        for _ in 0..200 {
            let port = LOWEST + (allium_crypto::rng::random_u32() % span) as u16;
            if let Ok(l) = TcpListener::bind((ip, port)) {
                return l.local_addr();
            }
        }
    }
    TcpListener::bind((ip, 0))?.local_addr()
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
        cfg.params.insert(
            "enforce_distinct_subnets".to_string(),
            i32::from(self.distinct_subnets),
        );
        if self.layout == AddressLayout::Distinct {
            // Probes and votes leave from the authority's own address, and each relay has an
            // address of its own.
            cfg.outbound_bind_address = Some(a.addr.ip());
            cfg.max_relays_per_addr = DISTINCT_MAX_RELAYS_PER_ADDR;
        }
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
        let bind = cfg.outbound_bind_address;
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
        if let Some(ip) = bind {
            cfg.insert("outbound_bind_address".to_owned(), ip.to_string().into());
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
        for layout in [AddressLayout::Distinct, AddressLayout::Single] {
            let plan = NetworkBuilder::new()
                .relays(3)
                .exits(1)
                .relay_port_base(Some(40_080))
                .advertise_port_base(Some(40_150))
                .address_layout(layout)
                .plan(&dir.join(format!("{layout:?}")), 1_700_000_000)
                .unwrap();
            for (i, r) in (0u16..).zip(&plan.relays) {
                let ip = layout.relay(usize::from(i));
                assert_eq!(r.config.listen, SocketAddr::from((ip, 40_080 + i)));
                assert_eq!(
                    r.config.advertised,
                    Some(SocketAddr::from((ip, 40_150 + i)))
                );
            }
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

    #[test]
    fn relay_addresses_spread_over_distinct_subnets() {
        let first: Vec<Ipv4Addr> = (0..RELAY_SUBNETS).map(relay_ip).collect();
        let subnets: BTreeSet<[u8; 2]> = first
            .iter()
            .map(|ip| [ip.octets()[0], ip.octets()[1]])
            .collect();
        assert_eq!(
            subnets.len(),
            RELAY_SUBNETS,
            "the first 99 relays: a /16 each"
        );
        assert_eq!(relay_ip(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(relay_ip(98), Ipv4Addr::new(127, 99, 0, 1));
        assert_eq!(relay_ip(99), Ipv4Addr::new(127, 1, 1, 1));
        let all: BTreeSet<Ipv4Addr> = (0..MAX_DISTINCT_RELAYS).map(relay_ip).collect();
        assert_eq!(
            all.len(),
            MAX_DISTINCT_RELAYS,
            "no two relays share an address"
        );
        let auths: Vec<Ipv4Addr> = (0..N_AUTHORITIES).map(authority_ip).collect();
        for ip in auths.iter().chain([&BWSCAN_IP]) {
            assert!(!all.contains(ip), "{ip} is also a relay's");
        }
        for reserved in [CLIENT_IP, ATTACKER_IP] {
            assert!(!all.contains(&reserved) && !auths.contains(&reserved));
            assert_ne!(reserved, BWSCAN_IP);
            assert_eq!(
                reserved.octets()[1],
                0,
                "reserved addresses stay in 127.0/16"
            );
        }
        assert!(all.iter().chain(&auths).all(|ip| ip.octets()[1] != 0));
        assert!(
            all.iter().all(|ip| ip.octets()[2] != 255),
            "127.x.255/24 is the clients'"
        );
    }

    #[test]
    fn the_subnet_rule_is_on_when_three_subnets_and_an_exit_allow_a_path() {
        let ip = |b: u8, c: u8| IpAddr::from([127, b, c, 1]);
        let one = IpAddr::from([127, 0, 0, 1]);
        assert!(!subnets_allow_paths(&[
            (one, true),
            (one, false),
            (one, false)
        ]));
        assert!(subnets_allow_paths(&[
            (ip(1, 0), true),
            (ip(2, 0), false),
            (ip(3, 0), false)
        ]));
        // Two /16s only (distinct addresses in them do not help).
        assert!(!subnets_allow_paths(&[
            (ip(1, 0), true),
            (ip(1, 1), false),
            (ip(2, 0), false),
            (ip(2, 1), false)
        ]));
        // No exit at all.
        assert!(!subnets_allow_paths(&[
            (ip(1, 0), false),
            (ip(2, 0), false),
            (ip(3, 0), false)
        ]));
    }

    #[test]
    fn the_layout_decides_addresses_and_the_subnet_rule() {
        let dir = std::env::temp_dir().join(format!("allium-plan-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Distinct: every authority and relay on its own address, the /16 rule and the
        // per-address relay cap on, outgoing connections from the authority's address.
        if AddressLayout::detect() == AddressLayout::Distinct {
            let plan = NetworkBuilder::new()
                .relays(5)
                .address_layout(AddressLayout::Distinct)
                .plan(&dir.join("d"), 1_700_000_000)
                .unwrap();
            assert_eq!(plan.layout, AddressLayout::Distinct);
            assert!(plan.distinct_subnets);
            for (i, r) in plan.relays.iter().enumerate() {
                assert_eq!(r.config.listen.ip(), IpAddr::V4(relay_ip(i)));
                assert_eq!(
                    r.config.effective_outbound_bind(),
                    Some(r.config.listen.ip())
                );
            }
            for i in 0..N_AUTHORITIES {
                assert_eq!(plan.authorities[i].addr.ip(), IpAddr::V4(authority_ip(i)));
                let c = AuthorityConfig::from_toml(&plan.authority_toml(i).unwrap()).unwrap();
                assert_eq!(c.params.get("enforce_distinct_subnets"), Some(&1));
                assert_eq!(c.outbound_bind_address, Some(IpAddr::V4(authority_ip(i))));
                assert_eq!(c.max_relays_per_addr, DISTINCT_MAX_RELAYS_PER_ADDR);
            }
        }
        // Single: everything on 127.0.0.1, the rule off, no per-address cap.
        let plan = NetworkBuilder::new()
            .address_layout(AddressLayout::Single)
            .plan(&dir.join("s"), 1_700_000_000)
            .unwrap();
        assert!(!plan.distinct_subnets);
        assert!(
            plan.relays
                .iter()
                .all(|r| r.config.listen.ip() == IpAddr::V4(CLIENT_IP))
        );
        for i in 0..N_AUTHORITIES {
            assert_eq!(plan.authorities[i].addr.ip(), IpAddr::V4(CLIENT_IP));
            let c = AuthorityConfig::from_toml(&plan.authority_toml(i).unwrap()).unwrap();
            assert_eq!(c.params.get("enforce_distinct_subnets"), Some(&0));
            assert_eq!(c.outbound_bind_address, None);
            assert_eq!(c.max_relays_per_addr, 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("allium-plan-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
