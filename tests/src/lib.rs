//! Whole-network test helpers: a complete Allium network in one process on 127.0.0.1.
//!
//! [`TestNet::start`] starts 3 directory authorities (voting driven by hand, so no test waits for a
//! schedule), N relays (the first `exits` of them exits whose policy allows loopback, with a
//! resolver that knows [`EXIT_ONLY_NAME`]), a SOCKS proxy, and an HTTP server
//! ([`allium::cmd::testnet::httpd`]). Every wait is bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_client::{ProxyConfig, ProxyHandle};
use allium_directory::AuthorityInfo;
use allium_directory::authority::{self, AuthorityConfig, AuthorityHandle, StartOptions};
use allium_relay::{ExitPolicy, RelayConfig, RelayHandle, StaticResolver, SystemResolver};

pub use allium::cmd::testnet::{httpd, socks};

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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            relays: 6,
            exits: 2,
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
    /// The proxy.
    pub proxy: ProxyHandle,
    /// The SOCKS address of the proxy.
    pub socks: SocketAddr,
    /// The HTTP test server.
    pub http: SocketAddr,
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

/// Start a relay of a test network from its configuration.
pub async fn start_relay(cfg: RelayConfig) -> Result<RelayHandle, String> {
    let resolver = Arc::new(StaticResolver::new(
        vec![(
            EXIT_ONLY_NAME.to_owned(),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )],
        SystemResolver,
    ));
    allium_relay::start_with_resolver(cfg, resolver)
        .await
        .map_err(|e| e.to_string())
}

fn relay_config(
    i: usize,
    exit: bool,
    dir: &Path,
    auths: &[AuthorityInfo],
) -> Result<RelayConfig, String> {
    let nickname = format!("{}{i}", if exit { "Exit" } else { "Relay" });
    let mut cfg = RelayConfig::for_test(&nickname, dir.join(format!("relay{i}")));
    cfg.authorities = auths
        .iter()
        .map(|a| allium_relay::AuthorityConfig {
            identity: a.identity,
            dir_addr: a.dir_addr,
        })
        .collect();
    cfg.exit_policy = if exit {
        ExitPolicy {
            accept: vec![
                format!("1-{}", REFUSED_PORT - 1),
                format!("{}-65535", REFUSED_PORT + 1),
            ],
            allow_private: true,
        }
    } else {
        ExitPolicy::default()
    };
    Ok(cfg)
}

impl TestNet {
    /// Start a network; panics with a message if it cannot (tests cannot go on without one).
    pub fn start(opts: Options) -> Self {
        match Self::try_start(opts) {
            Ok(n) => n,
            Err(e) => panic!("could not start the test network: {e}"),
        }
    }

    fn try_start(opts: Options) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let now = allium_directory::now_unix();

        // Authorities: bind first so that every configuration can list every address.
        let (authorities, infos) = rt.block_on(async {
            let mut listeners = Vec::new();
            let mut infos = Vec::new();
            let mut dirs = Vec::new();
            for i in 0..3 {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let adir = dir.path().join(format!("auth{i}"));
                let (id, _) =
                    authority::keys::generate_for_test(&adir, now).map_err(|e| e.to_string())?;
                infos.push(AuthorityInfo {
                    identity: id.public(),
                    dir_addr: l.local_addr().map_err(|e| e.to_string())?,
                });
                listeners.push(l);
                dirs.push(adir);
            }
            let mut handles = Vec::new();
            for (l, adir) in listeners.into_iter().zip(dirs) {
                let cfg = AuthorityConfig::new(
                    adir,
                    l.local_addr().map_err(|e| e.to_string())?,
                    infos.clone(),
                )
                .for_test_network(3600);
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
            Ok::<_, String>((handles, infos))
        })?;

        let mut relay_configs = Vec::new();
        let mut relays = Vec::new();
        for i in 0..opts.relays {
            let cfg = relay_config(i, i < opts.exits, dir.path(), &infos)?;
            relays.push(Some(rt.block_on(start_relay(cfg.clone()))?));
            relay_configs.push(cfg);
        }
        let n = opts.relays;
        wait_until(
            "every authority to hold every descriptor",
            Duration::from_secs(30),
            || authorities.iter().all(|a| a.descriptor_count() >= n),
        )?;
        rt.block_on(async {
            let refs: Vec<&AuthorityHandle> = authorities.iter().collect();
            authority::run_round(&refs, now)
                .await
                .map_err(|e| e.to_string())
        })?;
        for r in relays.iter().flatten() {
            r.refetch_consensus();
        }
        wait_until(
            "every relay to hold the consensus",
            Duration::from_secs(30),
            || relays.iter().flatten().all(|r| r.has_consensus()),
        )?;

        let (proxy, http) = rt.block_on(async {
            let (http, task) = httpd::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| e.to_string())?;
            drop(task); // the server task runs on until the runtime stops
            let cfg = ProxyConfig {
                socks_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                data_dir: dir.path().join("proxy"),
                authorities: infos.clone(),
                test_network: true,
                ..ProxyConfig::default()
            };
            let proxy = allium_client::start(cfg).await.map_err(|e| e.to_string())?;
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
            proxy,
            socks,
            http,
        })
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
