#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod api;
pub mod bwscan;
pub mod cbt;
mod circ;
mod circmgr;
pub mod config;
mod control;
pub mod core;
mod dir;
mod dirfetch;
pub mod dnsport;
pub mod err;
pub mod guard;
pub mod http_tunnel;
pub mod isolation;
mod link;
mod local_limits;
mod metrics;
pub mod onion;
pub mod path;
mod reactor;
pub mod socks;
mod stream;
pub mod vanguards;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_proto::cell::CircId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use allium_directory::client::AuthorityInfo;
pub use api::{Client, DataStream, IntoTarget, IsolationToken};
pub use config::ProxyConfig;
pub use err::{CircError, ClientError, ErrorKind, StreamError};

use crate::circmgr::CircMgr;
use crate::guard::GuardSet;

/// What [`ProxyHandle::circuits`] reports about one open circuit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitInfo {
    /// The relays, guard first, exit last.
    pub path: [allium_crypto::RelayId; 3],
    /// Open streams on it.
    pub streams: usize,
    /// Whether it has carried a stream (then it only takes streams with the same isolation key,
    /// until `max_circuit_dirtiness` passes).
    pub dirty: bool,
}

/// A running proxy. Dropping it stops the proxy's tasks; [`ProxyHandle::shutdown`] also
/// closes circuits and links cleanly.
#[derive(Debug)]
pub struct ProxyHandle {
    socks_addr: SocketAddr,
    http_tunnel_addr: Option<SocketAddr>,
    dns_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    mgr: Arc<CircMgr>,
    tasks: JoinSet<()>,
    /// Held while the proxy runs: no second process may use the data directory.
    _lock: allium_directory::datadir::DataDirLock,
}

impl ProxyHandle {
    /// The address the SOCKS5 listener is bound to (the real port when 0 was configured;
    /// `0.0.0.0:0` for an embedded [`Client`], which has no SOCKS port).
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks_addr
    }

    /// The address the HTTP CONNECT listener is bound to, if `http_tunnel_port` is configured.
    pub fn http_tunnel_addr(&self) -> Option<SocketAddr> {
        self.http_tunnel_addr
    }

    /// The address the DNS listeners (UDP and TCP, same port) are bound to, if `dns_port` is
    /// configured.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    /// The address the Prometheus metrics listener is bound to, if `metrics_address` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The Prometheus metrics page (text exposition format 0.0.4), as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.mgr, &self.ready)
    }

    /// Wait until a consensus is verified and at least one circuit is built.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let mut rx = self.ready.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Shutdown),
            Err(_) => Err(ClientError::Timeout(
                "bootstrapping (no verified consensus or no circuit yet; see the log for why)",
            )),
        }
    }

    /// Whether the proxy is ready (see [`ProxyHandle::wait_ready`]).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The open circuits held for streams (tests use it to find, say, the middle relay of the
    /// circuit carrying a stream).
    pub fn circuits(&self) -> Vec<CircuitInfo> {
        self.mgr.circuits()
    }

    /// The same as [`ProxyHandle::circuits`] (the name the whole-network tests use).
    pub fn debug_circuit_paths(&self) -> Vec<CircuitInfo> {
        self.mgr.circuits()
    }

    /// The circuit (its id on the guard link) carrying the stream of the SOCKS client whose
    /// local address is `client_addr`, while that stream is open. Streams of one isolation key
    /// share a circuit; streams of different keys never do.
    pub fn debug_stream_circuit(&self, client_addr: SocketAddr) -> Option<CircId> {
        self.mgr.peer_circuit(client_addr)
    }

    /// Apply the reloadable keys of `config` ([`config::RELOADABLE_KEYS`]): circuit build
    /// timeout, dirtiness, prebuilt circuits and SOCKS handshake timeout from now on, the number of
    /// primary guards at the next consensus. Other keys of `config` are ignored (they need a
    /// restart). An invalid configuration changes nothing.
    pub fn reconfigure(&self, config: &ProxyConfig) -> Result<(), ClientError> {
        config.validate()?;
        self.mgr.reconfigure(config);
        Ok(())
    }

    /// The configuration in force (as last reloaded).
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.mgr.config()
    }

    /// Circuits built since the proxy started.
    pub fn circuits_built(&self) -> u64 {
        self.mgr.circuits_built()
    }

    /// Bytes read from and written to guard links since the proxy started (whole Noise frames,
    /// counted once per frame).
    pub fn traffic(&self) -> (u64, u64) {
        (self.mgr.link_bytes.read(), self.mgr.link_bytes.written())
    }

    /// The proxy's control-port backend (circuits, traffic, consensus, NEWNYM), for
    /// `allium_control::start`.
    pub fn control_backend(&self) -> Arc<dyn allium_control::ControlBackend> {
        Arc::new(control::ProxyControl::new(
            Arc::clone(&self.mgr),
            self.mgr.config(),
            self.socks_addr,
            self.ready.clone(),
        ))
    }

    /// Directory fetches since start by source: `[guard, fallback, authority]`, each
    /// `(answered, failed)`. Guards and fallbacks are asked over BEGIN_DIR, authorities over HTTP.
    pub fn dir_fetches(&self) -> [(u64, u64); 3] {
        self.mgr.metrics.dir_fetches()
    }

    /// `valid-after` of the consensus in use (Unix seconds; 0: none).
    pub fn consensus_valid_after(&self) -> u64 {
        self.mgr.metrics.consensus_valid_after()
    }

    /// The onion services this proxy runs (`[[onion_service]]` tables) and how far each got:
    /// introduction points established, descriptors published and where.
    pub fn onion_services(&self) -> Vec<onion::OnionServiceStatus> {
        self.mgr.metrics.onion_service.status()
    }

    /// Number of open circuits held for streams.
    pub fn n_circuits(&self) -> usize {
        self.mgr.n_circuits()
    }

    /// Stop accepting SOCKS connections, close every circuit and link, and stop the tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        self.mgr.close_all().await;
        self.tasks.shutdown().await;
        tracing::info!("proxy stopped");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.tasks.abort_all();
        self.mgr.close_all_now();
    }
}

fn make_data_dir(dir: &std::path::Path) -> Result<(), ClientError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ClientError::file(dir, "creating the data directory", e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// The proxy's metrics page now.
fn render_metrics(mgr: &CircMgr, ready: &watch::Receiver<bool>) -> String {
    let circuits = mgr.circuits();
    let view = metrics::View {
        bytes_read: mgr.link_bytes.read(),
        bytes_written: mgr.link_bytes.written(),
        cells_read: mgr.link_bytes.cells_read(),
        cells_written: mgr.link_bytes.cells_written(),
        queued_bytes: mgr.link_bytes.queued_bytes(),
        circuits_open: circuits.len(),
        streams_open: circuits.iter().map(|c| c.streams).sum(),
        has_dir: mgr.has_dir(),
        ready: *ready.borrow(),
    };
    let mut page = mgr.metrics.render(&view, allium_directory::now_unix());
    mgr.local.render(&mut page);
    page.finish()
}

/// Bind an extra client port (`what` names it in errors) and warn when it is not on loopback.
async fn bind_tcp(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), ClientError> {
    let l = TcpListener::bind(addr).await.map_err(|e| {
        ClientError::io(
            format!("binding the {what} {addr} (is another program using it? choose another port)"),
            e,
        )
    })?;
    let bound = l
        .local_addr()
        .map_err(|e| ClientError::io(format!("reading the {what} address"), e))?;
    if !bound.ip().is_loopback() {
        tracing::warn!(
            "the {what} {bound} is not on a loopback address: anyone who can reach it can use your circuits"
        );
    }
    Ok((l, bound))
}

/// Bind the DNS port: UDP, then TCP on the same port (RFC 1035 §4.2.2; RFC 7766: resolvers
/// retry there when an answer is truncated, and some only speak TCP). With port 0 the system
/// picks the UDP port, which may be taken over TCP: then another is picked (a few tries).
async fn bind_dns(
    addr: SocketAddr,
) -> Result<(tokio::net::UdpSocket, TcpListener, SocketAddr), ClientError> {
    const TRIES_FOR_PORT_0: usize = 8;
    let tries = if addr.port() == 0 {
        TRIES_FOR_PORT_0
    } else {
        1
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sock = tokio::net::UdpSocket::bind(addr).await.map_err(|e| {
            ClientError::io(
                format!("binding the DNS port (dns_port) {addr} (is another program using it? choose another port)"),
                e,
            )
        })?;
        let bound = sock
            .local_addr()
            .map_err(|e| ClientError::io("reading the DNS port address", e))?;
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "the DNS port {bound} is not on a loopback address: anyone who can reach it can use your circuits"
            );
        }
        match bind_tcp(bound, "DNS port over TCP (dns_port)").await {
            Ok((tcp, _)) => return Ok((sock, tcp, bound)),
            Err(_) if attempt < tries => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Start the proxy: bind the SOCKS port, then bootstrap in the background (fetch and verify the
/// consensus, build circuits). Must be called inside a tokio runtime.
pub async fn start(config: ProxyConfig) -> Result<ProxyHandle, ClientError> {
    start_with(config, true).await
}

/// [`start`], with or without the SOCKS port (the embeddable [`Client`] has none).
pub(crate) async fn start_with(
    config: ProxyConfig,
    with_socks: bool,
) -> Result<ProxyHandle, ClientError> {
    config.validate()?;
    // The addresses are in each KEY_DIR/hostname (not logged: logs are often shared).
    let services = onion::prepare_services(&config)?;
    let auths = config.authorities.clone();
    make_data_dir(&config.data_dir)?;
    let lock = allium_directory::datadir::DataDirLock::acquire(&config.data_dir)?;
    let mut guards = GuardSet::load(&config.data_dir)?;
    guards.set_lifetime_days(config.guard_lifetime_days);
    let socks = if with_socks {
        Some(bind_tcp(config.socks_listen, "SOCKS port").await?)
    } else {
        None
    };
    // Without a SOCKS port (an embedded client) the handle reports 0.0.0.0:0.
    let socks_addr = socks
        .as_ref()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |(_, a)| *a);
    let http_tunnel = match config.http_tunnel_port {
        Some(addr) => Some(bind_tcp(addr, "HTTP CONNECT tunnel port (http_tunnel_port)").await?),
        None => None,
    };
    let dns = match config.dns_port {
        Some(addr) => Some(bind_dns(addr).await?),
        None => None,
    };
    let cfg = Arc::new(config);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mgr = Arc::new(CircMgr::new(Arc::clone(&cfg), guards, ready_tx));

    let mut tasks = JoinSet::new();
    tasks.spawn(allium_directory::client::http::with_outbound_bind(
        cfg.outbound_bind_address,
        dir::run(Arc::clone(&mgr), auths, shutdown_rx.clone()),
    ));
    tasks.spawn(Arc::clone(&mgr).maintain(shutdown_rx.clone()));
    for (name, svc) in services {
        tasks.spawn(onion::svcdrv::run(
            name,
            svc,
            Arc::clone(&mgr),
            shutdown_rx.clone(),
        ));
    }
    let mut http_tunnel_addr = None;
    if let Some((l, addr)) = http_tunnel {
        tasks.spawn(http_tunnel::serve(l, Arc::clone(&mgr), shutdown_rx.clone()));
        tracing::info!("HTTP CONNECT tunnel listening on {addr}");
        http_tunnel_addr = Some(addr);
    }
    let mut dns_addr = None;
    if let Some((sock, tcp, addr)) = dns {
        tasks.spawn(dnsport::serve(sock, Arc::clone(&mgr), shutdown_rx.clone()));
        tasks.spawn(dnsport::serve_tcp(
            tcp,
            Arc::clone(&mgr),
            shutdown_rx.clone(),
        ));
        tracing::info!("DNS port listening on {addr} (UDP and TCP)");
        dns_addr = Some(addr);
    }
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics_address {
        let (m, r) = (Arc::clone(&mgr), ready_rx.clone());
        let render: allium_proto::metrics::Render = Arc::new(move || render_metrics(&m, &r));
        let (l, bound) = allium_proto::metrics::bind(addr, cfg.metrics_allow_public)
            .await
            .map_err(ClientError::Config)?;
        tasks.spawn(allium_proto::metrics::serve(l, render));
        metrics_addr = Some(bound);
    }
    match socks {
        Some((listener, _)) => {
            tasks.spawn(socks::server::serve(
                listener,
                Arc::clone(&mgr),
                shutdown_rx,
            ));
            tracing::info!("bootstrap 0%: SOCKS5 proxy listening on {socks_addr}");
        }
        None => tracing::info!("bootstrap 0%: embedded client starting"),
    }
    Ok(ProxyHandle {
        socks_addr,
        http_tunnel_addr,
        dns_addr,
        metrics_addr,
        ready: ready_rx,
        shutdown: shutdown_tx,
        mgr,
        tasks,
        _lock: lock,
    })
}
