//! The proxy's configuration: TOML, with defaults for every key but `authorities`.
//!
//! See `proxy.example.toml` in the repository root for a documented example (a test loads it).
//! Unknown keys are rejected, so a misspelt key is an error instead of a silently ignored line.

use std::net::{IpAddr, SocketAddr};
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
    /// A local test network: relaxes the family and same-/16 path rules when its consensus sets
    /// `enforce_distinct_subnets` to 0 (every relay on one address); a test network whose relays
    /// sit on distinct loopback /16s keeps the parameter, and the rules, on.
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
    /// A used circuit with no stream left is closed after this long, even within
    /// `max_circuit_dirtiness` (default 60 s; the next stream takes a prebuilt circuit).
    #[serde(with = "secs")]
    pub circuit_idle_timeout: Duration,
    /// As `circuit_idle_timeout`, for circuits isolated by SOCKS credentials or an isolation
    /// token, whose key is often never used again (a scraper's fresh credentials per request):
    /// default 30 s. Applications that reuse credentials after a longer pause get a new circuit
    /// (and exit) then.
    #[serde(with = "secs")]
    pub isolated_circuit_idle_timeout: Duration,
    /// The most circuits kept open through one guard (default 1024, half a relay's default
    /// `max_circuits_per_link`). At the bound, idle circuits through that guard are closed to
    /// make room; if none is idle, the request fails (logged once).
    pub max_circuits_per_guard: usize,
    /// The most SOCKS connections served at once; further ones wait.
    pub max_socks_connections: usize,
    /// The most connections one local source address may hold open on each TCP client port
    /// (SOCKS, HTTP CONNECT, DNS): default 768, three quarters of `max_socks_connections`, so
    /// one program cannot take every slot. Further connections from it are closed at once.
    pub max_connections_per_source: usize,
    /// The most connections of one source address whose handshake (SOCKS request or HTTP head)
    /// is being read (default 64). Further ones wait their turn, in order, for at most
    /// `socks_handshake_timeout`, and are closed if it does not come.
    pub max_handshakes_per_source: usize,
    /// The most requests of one source address asking for a circuit at once (default 32); the
    /// others wait their turn, so that one program's burst does not queue ahead of every other
    /// program's requests for the circuit builds.
    pub max_circuit_requests_per_source: usize,
    /// The most queries of one source address in flight on the UDP DNS port (default 16); a
    /// query beyond it is answered REFUSED at once.
    pub max_dns_queries_per_source: usize,
    /// How long a SOCKS client may take to send its handshake and request.
    #[serde(with = "secs")]
    pub socks_handshake_timeout: Duration,
    /// How many primary guards to keep.
    pub primary_guards: usize,
    /// Log filter used by the `allium proxy` binary (e.g. `info`, `allium_client=debug`).
    pub log_level: String,
    /// Seconds between heartbeat log lines; 0 turns them off (default 21600, 6 hours).
    pub heartbeat_period_secs: u64,
    /// Allow running as root without dropping privileges (not recommended; see `user`).
    pub allow_root: bool,
    /// Started as root: bind the SOCKS port, then switch to this user (and its group) for good.
    pub user: Option<String>,
    /// Control port (Tor's `ControlPort`): a loopback `address:port` (default: none).
    pub control_port: Option<SocketAddr>,
    /// Control port on a Unix socket (Tor's `ControlSocket`; default: none).
    pub control_socket: Option<PathBuf>,
    /// Write `control_auth_cookie` into the data directory and accept it (Tor's
    /// `CookieAuthentication`; default false).
    pub cookie_authentication: bool,
    /// Accepted control passwords, hashed as `tor --hash-password` prints them (`16:...`).
    pub hashed_control_password: Vec<String>,
    /// Answer a SOCKS CONNECT at once, before the exit connected, so the application's first
    /// bytes ride right behind BEGIN (optimistic data: one circuit round trip to the first
    /// response byte instead of two). The cost: a refused or unreachable destination then shows
    /// as a closed connection, not as a SOCKS error code.
    pub socks_optimistic: bool,
    /// Where the HTTP CONNECT tunnel listener binds (Tor's `HTTPTunnelPort`); none by default.
    /// Port 0 picks a free port (see `ProxyHandle::http_tunnel_addr`).
    pub http_tunnel_port: Option<SocketAddr>,
    /// Where the DNS listener (UDP) binds (Tor's `DNSPort`); none by default. It answers A and
    /// AAAA queries by resolving at an exit. Port 0 picks a free port.
    pub dns_port: Option<SocketAddr>,
    /// Where the Prometheus metrics listener binds (`/metrics`); none by default. Only loopback
    /// addresses unless `metrics_allow_public` is set.
    pub metrics_address: Option<SocketAddr>,
    /// Allow `metrics_address` on a non-loopback address (the metrics reveal traffic volumes).
    pub metrics_allow_public: bool,
    /// Days a sampled guard is kept before it is dropped and replaced (Tor's
    /// `guard-lifetime-days`, 120; 1 to 3650).
    pub guard_lifetime_days: u64,
    /// Local IP that outgoing connections (guard links and directory fetches) bind to, as
    /// Tor's `OutboundBindAddress`; none by default (the system picks). Not derived from
    /// `socks_listen`, which is usually loopback and could not reach remote authorities.
    pub outbound_bind_address: Option<IpAddr>,
    /// Client authorization for onion services this proxy connects to (Tor's
    /// `ClientOnionAuthDir`): a directory of `*.auth_private` files, each with one line
    /// `<address>:descriptor:x25519:<64 hex digits of the x25519 secret key>`. None by default.
    #[serde(default)]
    pub onion_client_auth_dir: Option<PathBuf>,
    /// Directory caches to bootstrap from when no usable consensus is cached (Tor's fallback
    /// directories): `[[fallback_dirs]]` with `identity`, `link_key`, `onion_key` (64 hex digits
    /// each) and `or_addr`. The proxy asks them over BEGIN_DIR on a one-hop circuit before it
    /// falls back to the authorities' HTTP ports. Empty by default.
    pub fallback_dirs: Vec<FallbackDir>,
    /// Onion services this proxy runs (`[[onion_service]]` tables: `name`, `key_dir`, `ports`,
    /// optional `authorized_clients`). None by default.
    #[serde(default)]
    pub onion_service: Vec<OnionServiceConfig>,
}

/// One `[[onion_service]]` table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnionServiceConfig {
    /// A name for logs and the control port (not secret, not published).
    pub name: String,
    /// Where the service's identity key lives (created 0700 with a 0600 key if absent; the
    /// address stays the same as long as this directory does).
    pub key_dir: PathBuf,
    /// `"VIRTPORT -> ADDRESS:PORT"` mappings, at least one (e.g. `["80 -> 127.0.0.1:8080"]`).
    pub ports: Vec<crate::onion::PortMapping>,
    /// A directory of `*.auth` files with the x25519 public keys of the only clients allowed
    /// to read the descriptor (client authorization). None: every client who knows the address.
    #[serde(default)]
    pub authorized_clients: Option<PathBuf>,
    /// Ask clients for proof of work under load (Tor's `HiddenServicePoWDefensesEnabled`): the
    /// descriptor carries a puzzle seed and a suggested effort, and introductions are served
    /// highest effort first at `pow_queue_rate`. Off by default.
    #[serde(default)]
    pub pow: bool,
    /// With `pow`, introductions served per second (Tor's `HiddenServicePoWQueueRate`, 250).
    #[serde(default = "default_pow_queue_rate")]
    pub pow_queue_rate: u32,
    /// With `pow`, the burst of the same (Tor's `HiddenServicePoWQueueBurst`, 2500).
    #[serde(default = "default_pow_queue_burst")]
    pub pow_queue_burst: u32,
}

fn default_pow_queue_rate() -> u32 {
    crate::onion::pow::DEFAULT_QUEUE_RATE
}

fn default_pow_queue_burst() -> u32 {
    crate::onion::pow::DEFAULT_QUEUE_BURST
}

impl OnionServiceConfig {
    /// Check the table on its own (names are checked for uniqueness by [`ProxyConfig::validate`]).
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ClientError::Config(format!(
                "[[onion_service]] name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                self.name.chars().take(64).collect::<String>()
            )));
        }
        if self.ports.is_empty() {
            return Err(ClientError::Config(format!(
                "[[onion_service]] {}: `ports` is empty; add e.g. ports = [\"80 -> 127.0.0.1:8080\"]",
                self.name
            )));
        }
        if self.key_dir.as_os_str().is_empty() {
            return Err(ClientError::Config(format!(
                "[[onion_service]] {}: `key_dir` is empty",
                self.name
            )));
        }
        if self.pow_queue_rate == 0 || self.pow_queue_burst == 0 {
            return Err(ClientError::Config(format!(
                "[[onion_service]] {}: `pow_queue_rate` and `pow_queue_burst` must be at least 1 \
                 (defaults 250 and 2500)",
                self.name
            )));
        }
        Ok(())
    }
}

/// A directory cache to bootstrap from (a relay: its keys and its OR address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FallbackToml", into = "FallbackToml")]
pub struct FallbackDir {
    /// The relay's identity.
    pub identity: allium_crypto::RelayId,
    /// Its link (Noise static) key.
    pub link_key: allium_crypto::X25519Public,
    /// Its ntor onion key (it rotates, by default weekly: a fallback list must be refreshed as
    /// often; an entry with an old key just fails and the next one is tried).
    pub onion_key: allium_crypto::X25519Public,
    /// Its OR (link) address.
    pub or_addr: SocketAddr,
}

/// The text form of [`FallbackDir`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackToml {
    identity: String,
    link_key: String,
    onion_key: String,
    or_addr: SocketAddr,
}

fn key32(what: &str, hex_text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out)
        .map_err(|_| format!("fallback_dirs: `{what}` {hex_text:?} is not 64 hex digits"))?;
    Ok(out)
}

impl TryFrom<FallbackToml> for FallbackDir {
    type Error = String;
    fn try_from(t: FallbackToml) -> Result<Self, String> {
        Ok(Self {
            identity: allium_crypto::RelayId(key32("identity", &t.identity)?),
            link_key: allium_crypto::X25519Public(key32("link_key", &t.link_key)?),
            onion_key: allium_crypto::X25519Public(key32("onion_key", &t.onion_key)?),
            or_addr: t.or_addr,
        })
    }
}

impl From<FallbackDir> for FallbackToml {
    fn from(f: FallbackDir) -> Self {
        Self {
            identity: f.identity.to_hex(),
            link_key: hex::encode(f.link_key.0),
            onion_key: hex::encode(f.onion_key.0),
            or_addr: f.or_addr,
        }
    }
}

/// Keys a running proxy takes from a reloaded file ([`crate::ProxyHandle::reconfigure`]; the
/// binary applies `log_level` and `heartbeat_period_secs`); every other key needs a restart.
pub const RELOADABLE_KEYS: &[&str] = &[
    "log_level",
    "heartbeat_period_secs",
    "circuit_build_timeout",
    "max_circuit_dirtiness",
    "circuit_idle_timeout",
    "isolated_circuit_idle_timeout",
    "max_circuits_per_guard",
    "max_connections_per_source",
    "max_handshakes_per_source",
    "max_circuit_requests_per_source",
    "max_dns_queries_per_source",
    "prebuilt_circuits",
    "socks_handshake_timeout",
    "primary_guards",
];

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
            circuit_idle_timeout: Duration::from_secs(60),
            isolated_circuit_idle_timeout: Duration::from_secs(30),
            max_circuits_per_guard: 1024,
            max_socks_connections: 1024,
            max_connections_per_source: 768,
            max_handshakes_per_source: 64,
            max_circuit_requests_per_source: 32,
            max_dns_queries_per_source: 16,
            socks_handshake_timeout: Duration::from_secs(10),
            primary_guards: 3,
            log_level: "info".to_owned(),
            heartbeat_period_secs: 6 * 3600,
            allow_root: false,
            user: None,
            control_port: None,
            control_socket: None,
            cookie_authentication: false,
            hashed_control_password: Vec::new(),
            socks_optimistic: true,
            http_tunnel_port: None,
            dns_port: None,
            metrics_address: None,
            metrics_allow_public: false,
            guard_lifetime_days: crate::guard::GUARD_LIFETIME_DAYS,
            outbound_bind_address: None,
            fallback_dirs: Vec::new(),
            onion_service: Vec::new(),
            onion_client_auth_dir: None,
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

    /// The control-port keys of this configuration.
    pub fn control(&self) -> allium_control::ControlConfig {
        allium_control::ControlConfig {
            control_port: self.control_port,
            control_socket: self.control_socket.clone(),
            cookie_authentication: self.cookie_authentication,
            hashed_control_password: self.hashed_control_password.clone(),
        }
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
        nonzero(self.circuit_idle_timeout, "circuit_idle_timeout")?;
        nonzero(
            self.isolated_circuit_idle_timeout,
            "isolated_circuit_idle_timeout",
        )?;
        if self.max_circuits_per_guard < 8 {
            return Err(ClientError::Config(
                "max_circuits_per_guard must be at least 8 (default 1024)".into(),
            ));
        }
        if self.max_socks_connections == 0 {
            return Err(ClientError::Config(
                "max_socks_connections must be at least 1".into(),
            ));
        }
        for (v, key) in [
            (
                self.max_connections_per_source,
                "max_connections_per_source",
            ),
            (self.max_handshakes_per_source, "max_handshakes_per_source"),
            (
                self.max_circuit_requests_per_source,
                "max_circuit_requests_per_source",
            ),
            (
                self.max_dns_queries_per_source,
                "max_dns_queries_per_source",
            ),
        ] {
            if v == 0 {
                return Err(ClientError::Config(format!("{key} must be at least 1")));
            }
        }
        if self.primary_guards == 0 || self.primary_guards > 20 {
            return Err(ClientError::Config(
                "primary_guards must be between 1 and 20".into(),
            ));
        }
        self.control()
            .validate()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        allium_proto::metrics::check_address(self.metrics_address, self.metrics_allow_public)
            .map_err(ClientError::Config)?;
        if !(1..=3650).contains(&self.guard_lifetime_days) {
            return Err(ClientError::Config(
                "guard_lifetime_days must be between 1 and 3650 (default 120)".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut dirs = std::collections::BTreeSet::new();
        for svc in &self.onion_service {
            svc.validate()?;
            if !names.insert(&svc.name) {
                return Err(ClientError::Config(format!(
                    "two [[onion_service]] tables are named {}",
                    svc.name
                )));
            }
            if !dirs.insert(&svc.key_dir) {
                return Err(ClientError::Config(format!(
                    "[[onion_service]] {}: another service uses the same key_dir",
                    svc.name
                )));
            }
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
    fn onion_service_tables() {
        let text = format!(
            r#"onion_client_auth_dir = "/var/lib/allium/client_auth"
{AUTH}
[[onion_service]]
name = "web"
key_dir = "/var/lib/allium/onion/web"
ports = ["80 -> 127.0.0.1:8080", "443 -> [::1]:8443"]

[[onion_service]]
name = "ssh"
key_dir = "/var/lib/allium/onion/ssh"
ports = ["22 -> 127.0.0.1:22"]
authorized_clients = "/var/lib/allium/onion/ssh/authorized_clients"
"#
        );
        let c = ProxyConfig::from_toml_str(&text).unwrap();
        assert_eq!(c.onion_service.len(), 2);
        assert_eq!(c.onion_service[0].ports[1].virtual_port, 443);
        assert_eq!(c.onion_service[0].authorized_clients, None);
        assert!(c.onion_service[1].authorized_clients.is_some());
        assert!(c.onion_client_auth_dir.is_some());
        let again = toml::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_toml_str(&again).unwrap(), c);
        // Old files (no tables) still parse: none.
        assert!(
            ProxyConfig::from_toml_str(AUTH)
                .unwrap()
                .onion_service
                .is_empty()
        );
        for (bad, says) in [
            (
                text.replace("80 -> 127.0.0.1:8080", "80 127.0.0.1:8080"),
                "VIRTPORT",
            ),
            (
                text.replace("name = \"ssh\"", "name = \"web\""),
                "two [[onion_service]]",
            ),
            (
                text.replace("/onion/ssh\"\nports", "/onion/web\"\nports"),
                "same key_dir",
            ),
            (text.replace("[\"22 -> 127.0.0.1:22\"]", "[]"), "ports"),
            (text.replace("name = \"ssh\"", "name = \"a b\""), "letters"),
            (
                text.replace("name = \"ssh\"", "name = \"ssh\"\nport = 1"),
                "unknown",
            ),
        ] {
            let e = ProxyConfig::from_toml_str(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

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
        for key in [
            "max_connections_per_source",
            "max_handshakes_per_source",
            "max_circuit_requests_per_source",
            "max_dns_queries_per_source",
        ] {
            assert!(ProxyConfig::from_toml_str(&format!("{key} = 0\n{AUTH}")).is_err());
            let c = ProxyConfig::from_toml_str(&format!("{key} = 5\n{AUTH}")).unwrap();
            let per = crate::local_limits::PerSource::from_config(&c);
            assert!(
                [
                    per.connections,
                    per.handshakes,
                    per.circuit_requests,
                    per.dns_queries
                ]
                .contains(&5)
            );
        }
    }

    #[test]
    fn control_keys() {
        let c = ProxyConfig::from_toml_str(&format!(
            "control_port = \"[::1]:9051\"\ncookie_authentication = true\n{AUTH}"
        ))
        .unwrap();
        assert!(c.control().enabled() && c.cookie_authentication);
        let text = toml::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_toml_str(&text).unwrap(), c);
        let e = ProxyConfig::from_toml_str(&format!("control_port = \"192.0.2.1:9051\"\n{AUTH}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(!ProxyConfig::default().control().enabled());
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
