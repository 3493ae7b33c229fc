//! Whole-network test helpers: a complete Allium network in one process on loopback.
//!
//! [`TestNet::start`] plans the network with the same builder as `allium testnet`
//! ([`allium::cmd::testnet::NetworkBuilder`]) and starts every node in this process: 3 directory
//! authorities (voting driven by hand, so no test waits for a schedule), N relays (the first
//! `exits` of them exits whose policy allows loopback and every port but [`REFUSED_PORT`], with
//! a resolver that knows [`EXIT_ONLY_NAME`]), a SOCKS proxy, and an HTTP server
//! ([`allium::cmd::testnet::httpd`]). Every wait is bounded.
//!
//! The addresses are `allium testnet`'s ([`allium::cmd::testnet::plan`], "Addresses"): each
//! authority and relay listens on, and connects from, its own loopback address (relays in
//! distinct /16s, so the consensus keeps the /16 path rule on); the proxy, the HTTP server and
//! the tests themselves use 127.0.0.1. Where only 127.0.0.1 is routed to loopback every node
//! shares it ([`TestNet::layout`]).

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium::cmd::testnet::{AddressLayout, NetworkBuilder};
use allium_client::{ProxyConfig, ProxyHandle};
use allium_directory::authority::{self, AuthorityHandle, StartOptions};
use allium_relay::{ExitPolicy, RelayConfig, RelayHandle, StaticResolver, SystemResolver};

pub mod promtext;
pub mod sim;

pub use allium::cmd::testnet::httpd;
/// The SOCKS client: the client crate's codec and its async helpers.
pub use allium_client::socks::client as socks;

/// A host name that only the exits' resolver knows (it maps to 127.0.0.1).
pub const EXIT_ONLY_NAME: &str = "only-the-exit-knows.allium.test";
/// A request for the test page ([`httpd::HELLO`]), one per connection.
pub const GET_HELLO: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
/// The port the exit policy of [`TestNet`] exits refuses (every other port is accepted).
pub const REFUSED_PORT: u16 = 25;

/// Shape of a test network.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of relays.
    pub relays: usize,
    /// How many of them are exits.
    pub exits: usize,
    /// The relays' `circuit_stall_timeout_secs` (their default when `None`).
    pub circuit_stall_timeout_secs: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            relays: 6,
            exits: 2,
            circuit_stall_timeout_secs: None,
        }
    }
}

/// A running network. Drop it to stop everything.
pub struct TestNet {
    /// The runtime all nodes run on; tests call `net.rt.block_on(..)` (it is multi-threaded, so
    /// several tests may do so at once).
    pub rt: tokio::runtime::Runtime,
    /// Keeps the data directories alive.
    pub dir: tempfile::TempDir,
    /// The authorities.
    pub authorities: Vec<AuthorityHandle>,
    /// The relays (a slot is `None` once a test stopped that relay).
    pub relays: Mutex<Vec<Option<RelayHandle>>>,
    /// Their configurations, for restarts.
    pub relay_configs: Vec<RelayConfig>,
    /// The proxy's configuration (also the template of [`TestNet::proxy_config`]).
    pub proxy_config: ProxyConfig,
    /// The proxy.
    pub proxy: ProxyHandle,
    /// The SOCKS address of the proxy.
    pub socks: SocketAddr,
    /// The HTTP test server.
    pub http: SocketAddr,
    /// Where the nodes listen.
    pub layout: AddressLayout,
}

fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Run a voting round by hand for the period that starts now, on a network with a short voting
/// interval. A round on a loaded machine can outlast a 2-second period, and the authorities then
/// rightly refuse votes for a period that has passed; such a round is run again for the new
/// period (at most 5 times). Returns the round's `valid_after`.
pub async fn run_round_now(refs: &[&AuthorityHandle]) -> Result<u64, String> {
    let mut last = String::new();
    for _ in 0..5 {
        let va = allium_directory::now_unix();
        match authority::run_round(refs, va).await {
            Ok(()) => return Ok(va),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "5 voting rounds in a row failed, the last with: {last}"
    ))
}

/// Start a relay of a test network from its configuration.
pub async fn start_relay(cfg: RelayConfig) -> Result<RelayHandle, String> {
    let resolver = Arc::new(StaticResolver::new(
        vec![(
            EXIT_ONLY_NAME.to_owned(),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )],
        SystemResolver::new(),
    ));
    allium_relay::start_with_resolver(cfg, resolver)
        .await
        .map_err(|e| e.to_string())
}

/// The exit policy of [`TestNet`] exits: every port but [`REFUSED_PORT`], loopback allowed.
pub fn exit_policy() -> ExitPolicy {
    ExitPolicy {
        accept: vec![
            format!("1-{}", REFUSED_PORT - 1),
            format!("{}-65535", REFUSED_PORT + 1),
        ],
        allow_private: true,
        // Destinations are on 127.0.0.1, which is also every relay's address in the
        // single-address layout.
        reject_my_addresses: false,
        ..ExitPolicy::default()
    }
}

impl TestNet {
    /// Start a network; panics with a message if it cannot (tests cannot go on without one).
    pub fn start(opts: Options) -> Self {
        Self::start_with_voting_interval(opts, None)
    }

    /// [`TestNet::start`] with the authorities' voting interval set to `secs` (consensus
    /// periods then last that long: `fresh_until = valid_after + secs`; rounds are still run by
    /// hand with [`authority::run_round`]).
    pub fn start_with_voting_interval(opts: Options, secs: Option<u64>) -> Self {
        Self::start_with_authority_config(opts, secs, &|_| {})
    }

    /// [`TestNet::start_with_voting_interval`] with every authority's configuration passed
    /// through `tweak` before the authority starts.
    pub fn start_with_authority_config(
        opts: Options,
        secs: Option<u64>,
        tweak: &dyn Fn(&mut authority::AuthorityConfig),
    ) -> Self {
        match Self::try_start(opts, secs, tweak) {
            Ok(n) => n,
            Err(e) => panic!("could not start the test network: {e}"),
        }
    }

    fn try_start(
        opts: Options,
        interval: Option<u64>,
        tweak: &dyn Fn(&mut authority::AuthorityConfig),
    ) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let now = allium_directory::now_unix();
        let mut builder = NetworkBuilder::new();
        if let Some(secs) = interval {
            builder = builder.voting_interval_secs(secs);
        }
        let plan = builder
            .relays(opts.relays)
            .exits(opts.exits)
            .exit_policy(exit_policy())
            .plan(dir.path(), now)?;
        let configs = (0..plan.authorities.len())
            .map(|i| {
                let mut c = plan
                    .authority_config(i)
                    .ok_or("no authority configuration")?;
                tweak(&mut c);
                Ok::<_, &str>(c)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layout = plan.layout;
        let allium::cmd::testnet::NetworkPlan {
            authorities: planned,
            relays: planned_relays,
            proxy: mut proxy_config,
            ..
        } = plan;

        let authorities = rt.block_on(async {
            let mut handles = Vec::new();
            for (a, cfg) in planned.into_iter().zip(configs) {
                a.listener
                    .set_nonblocking(true)
                    .map_err(|e| e.to_string())?;
                let l = tokio::net::TcpListener::from_std(a.listener).map_err(|e| e.to_string())?;
                let opts = StartOptions {
                    listener: Some(l),
                    schedule: false,
                    ..StartOptions::default()
                };
                handles.push(
                    authority::start_with(cfg, opts)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok::<_, String>(handles)
        })?;

        let mut relay_configs = Vec::new();
        let mut relays = Vec::new();
        for mut r in planned_relays {
            if let Some(t) = opts.circuit_stall_timeout_secs {
                r.config.circuit_stall_timeout_secs = t;
            }
            relays.push(Some(rt.block_on(start_relay(r.config.clone()))?));
            relay_configs.push(r.config);
        }
        let n = opts.relays;
        wait_until(
            "every authority to hold every descriptor",
            Duration::from_secs(30),
            || authorities.iter().all(|a| a.descriptor_count() >= n),
        )?;
        rt.block_on(async {
            let refs: Vec<&AuthorityHandle> = authorities.iter().collect();
            // With a short voting interval the round must be for the period now (waiting for the
            // descriptors may have taken longer than one period).
            if interval.is_some() {
                run_round_now(&refs).await.map(|_| ())
            } else {
                authority::run_round(&refs, now)
                    .await
                    .map_err(|e| e.to_string())
            }
        })?;
        for r in relays.iter().flatten() {
            r.refetch_consensus();
        }
        wait_until(
            "every relay to hold the consensus",
            Duration::from_secs(30),
            || relays.iter().flatten().all(|r| r.has_consensus()),
        )?;

        // The proxy's fallback directory caches, from the consensus the relays now hold.
        let infos: Vec<_> = authorities.iter().map(AuthorityHandle::info).collect();
        let nd = rt
            .block_on(allium_directory::fetch_consensus(
                &infos,
                allium_directory::now_unix(),
            ))
            .map_err(|e| e.to_string())?;
        proxy_config.fallback_dirs = allium::cmd::testnet::fallback_dirs_from(
            &allium_directory::NetDir::new(nd),
            allium::cmd::testnet::N_FALLBACK_DIRS,
        );
        let (proxy, http) = rt.block_on(async {
            let (http, task) = httpd::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| e.to_string())?;
            drop(task); // the server task runs on until the runtime stops
            let proxy = allium_client::start(proxy_config.clone())
                .await
                .map_err(|e| e.to_string())?;
            proxy
                .wait_ready(Duration::from_secs(30))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((proxy, http))
        })?;
        let socks = proxy.socks_addr();
        Ok(Self {
            rt,
            dir,
            authorities,
            relays: Mutex::new(relays),
            relay_configs,
            proxy_config,
            proxy,
            socks,
            http,
            layout,
        })
    }

    /// The configuration of another proxy on this network, with its data in `data_dir`.
    pub fn proxy_config(&self, data_dir: &Path) -> ProxyConfig {
        // The network's proxy holds its fixed-port listeners: another proxy goes without them.
        ProxyConfig {
            data_dir: data_dir.to_path_buf(),
            http_tunnel_port: None,
            dns_port: None,
            control_port: None,
            metrics_address: None,
            ..self.proxy_config.clone()
        }
    }

    /// Start another proxy on this network (data in `data_dir`) and wait until it is ready.
    pub async fn start_proxy(&self, data_dir: &Path) -> Result<ProxyHandle, String> {
        let proxy = allium_client::start(self.proxy_config(data_dir))
            .await
            .map_err(|e| e.to_string())?;
        proxy
            .wait_ready(Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        Ok(proxy)
    }

    /// The HTTP server's host (an IP literal) and port.
    pub fn http_target(&self) -> (String, u16) {
        (self.http.ip().to_string(), self.http.port())
    }
}

/// Send an HTTP/1.1 request on `stream` and read the whole response (bounded by `timeout`).
pub async fn http_exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::time::timeout(timeout, async {
        stream.write_all(request).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok(out)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP exchange timed out"))?
}

/// Start an echo server on 127.0.0.1 (each connection gets back what it sends, then EOF after
/// the client's EOF) on the current runtime; returns its port.
pub async fn spawn_echo() -> std::io::Result<u16> {
    use tokio::io::AsyncWriteExt as _;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(port)
}

/// Split an HTTP response into (status line, body).
pub fn split_response(resp: &[u8]) -> Option<(String, &[u8])> {
    let p = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..p]).into_owned();
    let status = head.lines().next()?.to_owned();
    Some((status, &resp[p + 4..]))
}

/// Install a log subscriber for a test binary once (filter from `ALLIUM_TEST_LOG`, default off).
pub fn init_logging() {
    if let Ok(f) = std::env::var("ALLIUM_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}
