#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod cbt;
mod circ;
mod circmgr;
pub mod config;
pub mod core;
mod dir;
pub mod err;
pub mod guard;
pub mod isolation;
mod link;
pub mod path;
mod reactor;
pub mod socks;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_proto::cell::CircId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use allium_directory::client::AuthorityInfo;
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
    ready: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    mgr: Arc<CircMgr>,
    tasks: JoinSet<()>,
}

impl ProxyHandle {
    /// The address the SOCKS5 listener is bound to (the real port when 0 was configured).
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks_addr
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

/// Start the proxy: bind the SOCKS port, then bootstrap in the background (fetch and verify the
/// consensus, build circuits). Must be called inside a tokio runtime.
pub async fn start(config: ProxyConfig) -> Result<ProxyHandle, ClientError> {
    config.validate()?;
    let auths = config.authorities.clone();
    make_data_dir(&config.data_dir)?;
    let mut guards = GuardSet::load(&config.data_dir)?;
    guards.set_lifetime_days(config.guard_lifetime_days);
    let listener = TcpListener::bind(config.socks_listen).await.map_err(|e| {
        ClientError::io(
            format!(
                "binding the SOCKS port {} (is another proxy already using it? choose another port)",
                config.socks_listen
            ),
            e,
        )
    })?;
    let socks_addr = listener
        .local_addr()
        .map_err(|e| ClientError::io("reading the SOCKS address", e))?;
    if !socks_addr.ip().is_loopback() {
        tracing::warn!(
            "the SOCKS port {socks_addr} is not on a loopback address: anyone who can reach it can use your circuits"
        );
    }
    let cfg = Arc::new(config);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mgr = Arc::new(CircMgr::new(Arc::clone(&cfg), guards, ready_tx));

    let mut tasks = JoinSet::new();
    tasks.spawn(dir::run(Arc::clone(&mgr), auths, shutdown_rx.clone()));
    tasks.spawn(Arc::clone(&mgr).maintain(shutdown_rx.clone()));
    tasks.spawn(socks::server::serve(
        listener,
        Arc::clone(&mgr),
        shutdown_rx,
    ));
    tracing::info!("bootstrap 0%: SOCKS5 proxy listening on {socks_addr}");
    Ok(ProxyHandle {
        socks_addr,
        ready: ready_rx,
        shutdown: shutdown_tx,
        mgr,
        tasks,
    })
}
