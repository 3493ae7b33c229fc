//! The directory-authority role: accepts descriptors, tests reachability, votes on a schedule,
//! computes and co-signs the consensus, and serves everything over HTTP.
//!
//! Start one with [`start`] (binds `config.listen`) or [`start_with`] (a pre-bound listener, a
//! chosen reachability prober, scheduling on or off). The returned [`AuthorityHandle`] gives the
//! bound address and identity, can drive voting rounds by hand ([`AuthorityHandle::vote_phase`],
//! [`AuthorityHandle::compute_phase`], [`AuthorityHandle::publish_phase`], or [`run_round`] over
//! several authorities), and shuts the authority down.

pub mod compute;
pub mod config;
pub mod history;
pub mod keys;
pub mod limits;
mod probe;
pub mod reach;
mod round;
mod schedule;
mod serve;
mod server;
pub mod shared_random;
mod state;
pub mod store;
pub mod vote;

use std::net::SocketAddr;
use std::sync::Arc;

use allium_crypto::RelayId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{AuthorityConfig, AuthorityLimits, FlagThresholds};
pub use keys::AuthorityKeys;
pub use reach::{FakeReachability, LinkReachability, Reachability, TcpReachability};

use crate::authinfo::AuthorityInfo;
use crate::doc::{Consensus, Signed};
use crate::err::{DirError, Result};
use state::Inner;

/// How to start an authority.
pub struct StartOptions {
    /// A listener already bound (tests bind `127.0.0.1:0` first to learn every address);
    /// `None` binds `config.listen`.
    pub listener: Option<TcpListener>,
    /// The reachability prober (default: [`LinkReachability`], a real link handshake).
    pub reachability: Arc<dyn Reachability>,
    /// Run the voting schedule in the background (off in tests that drive rounds by hand).
    pub schedule: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            listener: None,
            reachability: Arc::new(LinkReachability),
            schedule: true,
        }
    }
}

/// A running authority.
pub struct AuthorityHandle {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Held while the authority runs: no second process may use the data directory.
    _lock: crate::datadir::DataDirLock,
}

impl std::fmt::Debug for AuthorityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityHandle")
            .field("addr", &self.addr)
            .field("identity", &self.identity())
            .finish()
    }
}

/// Start an authority with default options: bind `config.listen`, probe with the default
/// prober, run the schedule. Keys are read from `<data_dir>/keys/`.
pub async fn start(config: AuthorityConfig) -> Result<AuthorityHandle> {
    start_with(config, StartOptions::default()).await
}

/// Start an authority with explicit options.
pub async fn start_with(config: AuthorityConfig, opts: StartOptions) -> Result<AuthorityHandle> {
    config.validate()?;
    let lock = crate::datadir::DataDirLock::acquire(&config.data_dir)?;
    let keys = keys::load(&config.data_dir)?;
    let me = keys.identity();
    if !config.authorities.iter().any(|a| a.identity == me) {
        return Err(DirError::Config(format!(
            "this authority's identity {me} is not in its own [[authorities]] list"
        )));
    }
    let listener = match opts.listener {
        Some(l) => l,
        None => TcpListener::bind(config.listen)
            .await
            .map_err(|e| DirError::net_io(format!("binding {}", config.listen), e))?,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| DirError::net_io("local address", e))?;
    let inner = Arc::new(Inner::new(config, keys, opts.reachability)?);
    let (tx, rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(server::serve(
        inner.clone(),
        listener,
        rx.clone(),
    ))];
    if opts.schedule {
        inner
            .background_probing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tasks.push(tokio::spawn(probe::probe_loop(inner.clone(), rx.clone())));
        tasks.push(tokio::spawn(schedule::schedule_loop(inner.clone(), rx)));
    }
    tracing::info!(%addr, identity = %me, "directory authority started");
    Ok(AuthorityHandle {
        inner,
        addr,
        shutdown: tx,
        tasks,
        _lock: lock,
    })
}

impl AuthorityHandle {
    /// The bound HTTP address.
    pub fn dir_addr(&self) -> SocketAddr {
        self.addr
    }
    /// The authority's identity.
    pub fn identity(&self) -> RelayId {
        self.inner.keys.identity()
    }
    /// Identity and address, as clients configure it.
    pub fn info(&self) -> AuthorityInfo {
        AuthorityInfo {
            identity: self.identity(),
            dir_addr: self.addr,
        }
    }
    /// Phase 1 of a round: probe relays, build, sign, store and push this authority's vote for
    /// the period starting at `valid_after`.
    pub async fn vote_phase(&self, valid_after: u64) -> Result<()> {
        self.inner.vote_phase(valid_after).await
    }
    /// Phase 2: fetch missing votes, compute the consensus, sign it, push the detached signature.
    pub async fn compute_phase(&self, valid_after: u64) -> Result<()> {
        self.inner.compute_phase(valid_after).await
    }
    /// Phase 3: collect missing signatures; publish if more than half of the authorities
    /// signed. Returns whether a consensus for `valid_after` is now being served.
    pub async fn publish_phase(&self, valid_after: u64) -> Result<bool> {
        self.inner.publish_phase(valid_after).await
    }
    /// The consensus being served, if any.
    pub fn current_consensus(&self) -> Option<Signed<Consensus>> {
        self.inner.current_consensus()
    }
    /// The number of relay descriptors held.
    pub fn descriptor_count(&self) -> usize {
        self.inner.descriptor_count()
    }
    /// How often each limit refused something or was hit since start (non-zero counts, by
    /// name; see [`limits::Limit`]).
    pub fn limit_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.limit_log.snapshot()
    }
    /// Descriptors accepted so far: `(exempt, charged)`, i.e. uploaded from an authority's own
    /// address (exempt from the per-address limits) and from any other address.
    pub fn descriptor_upload_sources(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.desc_accepted_exempt.load(Relaxed),
            self.inner.desc_accepted_charged.load(Relaxed),
        )
    }
    /// The count of one limit.
    pub fn limit_count(&self, limit: limits::Limit) -> u64 {
        self.inner.limit_log.count(limit)
    }
    /// HTTP connections accepted since start from source address `ip` (the first 4096
    /// distinct addresses are counted).
    pub fn connections_from(&self, ip: std::net::IpAddr) -> u64 {
        self.inner
            .accepted_by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
    /// HTTP connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open_count()
    }
    /// Apply the reloadable keys of `new` ([`config::RELOADABLE_KEYS`]: flag thresholds,
    /// BadExit list, parameters, private addresses, descriptor cap) from the next vote on; the
    /// other keys of `new` are ignored (they need a restart). `new` should be validated.
    pub fn reconfigure(&self, new: &AuthorityConfig) {
        self.inner.reconfigure(new);
    }
    /// The configuration as last reloaded.
    pub fn config(&self) -> Arc<AuthorityConfig> {
        self.inner.live_cfg()
    }
    /// Stop serving and scheduling. The data directory keeps everything for a restart.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Drive one whole round over several in-process authorities (test networks): every vote
/// phase, then every compute phase, then every publish phase. Errors of single authorities are
/// returned after all phases ran.
pub async fn run_round(handles: &[&AuthorityHandle], valid_after: u64) -> Result<()> {
    let mut first_err = None;
    for h in handles {
        if let Err(e) = h.vote_phase(valid_after).await {
            first_err.get_or_insert(e);
        }
    }
    for h in handles {
        if let Err(e) = h.compute_phase(valid_after).await {
            first_err.get_or_insert(e);
        }
    }
    for h in handles {
        if let Err(e) = h.publish_phase(valid_after).await {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The start of the next voting period after `now`.
pub fn next_valid_after(now: u64, interval: u64) -> u64 {
    let i = interval.max(1);
    (now / i + 1) * i
}
