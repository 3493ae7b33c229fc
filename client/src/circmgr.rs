//! The circuit manager: which circuit a stream uses, building circuits (with timeouts and
//! retries on other paths), keeping a few ready ahead of demand, and retiring old ones.
//!
//! - A stream takes an open circuit whose exit allows its port, whose isolation key matches (or
//!   that has carried no stream yet), and that became dirty less than `max_circuit_dirtiness`
//!   ago. Otherwise a circuit is built for it (builds on demand for one isolation key are
//!   serialised, so a burst of streams shares the first new circuit instead of building one
//!   each; up to [`PARALLEL_BUILDS`] for different keys run at once).
//! - The maintenance task keeps, for each port used in the last [`PREDICTED_PORT_TTL`] (Tor's
//!   predicted ports), `prebuilt_circuits` clean circuits whose exit allows it (a circuit whose
//!   exit allows several of them counts for each), so that a new stream to a port in use never
//!   waits for a build; and it closes dirty circuits that carry no stream and are past
//!   `max_circuit_dirtiness`, or idle (no stream) for `circuit_idle_timeout` (60 s), or for
//!   `isolated_circuit_idle_timeout` (30 s) when their key is per-client SOCKS credentials or a
//!   token. Like Tor, a used circuit is kept for reuse while it is fresh; unlike Tor, an
//!   isolated one is not kept for the whole dirtiness window once idle: with fresh credentials
//!   per request (a scraper) thousands of one-stream circuits would otherwise stay open and
//!   reach the guard's per-link circuit limit.
//! - At most `max_circuits_per_guard` circuits (below a relay's `max_circuits_per_link`) are
//!   kept through one guard: at the bound the longest-idle ones through it are closed first; if
//!   every one carries a stream, the request fails with [`ClientError::GuardCircuitLimit`]
//!   (logged once). A guard that refuses a CREATE with RESOURCELIMIT gets our idle circuits
//!   through it closed, and the build is retried through it at once (it is not marked down
//!   unless nothing could be freed).
//! - Build timeout: learned from past build times ([`crate::cbt`], Tor's CBT) when
//!   `learn_circuit_build_timeout` is on, with `circuit_build_timeout` as the initial value and
//!   upper bound; the history is kept in `cbt.json` in the state directory. A learned timeout
//!   only cuts attempts short (the last attempt of a request always gets the full bound), and
//!   does not mark the stalled relay down (a fifth of builds hit it by design).
//! - Guards: the first primary guard that is not marked down. A relay at which a build failed
//!   or stalled (link, CREATE or EXTEND) is avoided in every position for [`RELAY_RETRY`],
//!   unless that leaves no path.
//!
//! The manager builds through a small [`CircBuilder`] trait (like Arti's
//! `AbstractCircBuilder`): [`LinkBuilder`] opens links and spawns circuit reactors; the unit
//! tests use a scripted fake with tokio's paused clock. Time enters through one function,
//! [`now`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use allium_crypto::RelayId;
use allium_proto::cell::{CircId, DestroyReason};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::cbt::{BuildTimes, CbtConfig, CbtState};
use crate::circ::{self, Circuit};
use crate::config::ProxyConfig;
use crate::control::BuildProgress;
use crate::core::CircParams;
use crate::dir::DirView;
use crate::err::{CircError, ClientError};
use crate::guard::GuardSet;
use crate::isolation::IsolationKey;
use crate::link::Link;
use crate::path::{self, Path, RelayInfo};

/// How long a relay that failed a circuit build (link, CREATE or EXTEND) is avoided.
const RELAY_RETRY: Duration = Duration::from_secs(60);
/// How many paths one circuit request tries.
const BUILD_ATTEMPTS: usize = 3;
/// A request queued behind builds on demand fails at once (without building) when this many of
/// them failed in a row while it waited: the network looks unreachable. One failed build is not
/// enough: with fresh credentials per request (a scraper) hundreds of requests queue behind each
/// build, and one refusal (a guard's CREATE rate limit) would fail them all.
pub(crate) const FAIL_FAST_AFTER: u32 = 2;
/// Builds on demand running at once (for requests with different isolation keys; requests with
/// the same key wait for one build). One at a time made a client with fresh credentials per
/// request (a scraper, 24 a second) wait behind every other request's build until it timed out.
pub(crate) const PARALLEL_BUILDS: usize = 8;
/// How many recently requested ports are predicted.
const PREDICTED_PORTS: usize = 3;
/// A port not requested for this long is no longer predicted (Tor: one hour).
pub(crate) const PREDICTED_PORT_TTL: Duration = Duration::from_secs(3600);
/// The build-time history file in the state directory.
const CBT_FILE: &str = "cbt.json";
/// Largest build-time history file read (1000 samples take about 30 KiB).
const CBT_MAX_FILE_LEN: u64 = 256 * 1024;
/// New build times recorded between two saves of the history.
const CBT_SAVE_EVERY: usize = 10;

/// The time now (tokio's clock, so that tests can pause it).
fn now() -> Instant {
    #[allow(clippy::disallowed_methods)] // the manager's driver is where time enters
    Instant::now()
}

/// What the manager needs of a circuit.
pub(crate) trait PooledCirc: Send + Sync + 'static {
    /// Whether it is gone.
    fn is_closed(&self) -> bool;
    /// Its open streams.
    fn n_streams(&self) -> usize;
    /// Its exit.
    fn exit(&self) -> &RelayInfo;
    /// Its relays, guard first.
    fn hops(&self) -> [RelayId; 3];
    /// Close it (DESTROY to the guard).
    fn close(&self);
}

impl PooledCirc for Circuit {
    fn is_closed(&self) -> bool {
        Self::is_closed(self)
    }
    fn n_streams(&self) -> usize {
        Self::n_streams(self)
    }
    fn exit(&self) -> &RelayInfo {
        &self.exit
    }
    fn hops(&self) -> [RelayId; 3] {
        self.hops
    }
    fn close(&self) {
        self.close_with_destroy();
    }
}

/// Builds circuits for the manager.
pub(crate) trait CircBuilder: Send + Sync + 'static {
    /// The circuits it builds.
    type Circ: PooledCirc;
    /// Build a circuit along `path`. `progress` holds the index of the hop being added (0
    /// guard, 1 middle, 2 exit; 3 when done), also when the future is dropped on a timeout.
    fn build<'a>(
        &'a self,
        path: &'a Path,
        progress: Arc<BuildProgress>,
    ) -> impl Future<Output = Result<Arc<Self::Circ>, ClientError>> + Send + 'a;
    /// Close every link (shutdown), waiting for links being connected.
    fn close_links(&self) -> impl Future<Output = ()> + Send + '_;
    /// Close the links not busy being connected, without waiting.
    fn close_links_now(&self);
}

/// The real builder: one link per guard, one reactor per circuit.
pub(crate) struct LinkBuilder {
    cfg: LiveConfig,
    links: tokio::sync::Mutex<HashMap<RelayId, Arc<Link>>>,
    /// Where every guard link counts its frames.
    bytes: Arc<allium_proto::channel::LinkBytes>,
}

impl LinkBuilder {
    async fn link_for(&self, guard: &RelayInfo) -> Result<Arc<Link>, ClientError> {
        let mut links = self.links.lock().await;
        if let Some(l) = links.get(&guard.id).filter(|l| !l.is_closed()) {
            return Ok(Arc::clone(l));
        }
        links.retain(|_, l| !l.is_closed());
        let l = Link::connect_counted(
            guard,
            self.cfg.get().circuit_build_timeout,
            Some(&self.bytes),
            self.cfg.get().outbound_bind_address,
        )
        .await?;
        links.insert(guard.id, Arc::clone(&l));
        Ok(l)
    }
}

impl CircBuilder for LinkBuilder {
    type Circ = Circuit;

    async fn build<'a>(
        &'a self,
        path: &'a Path,
        progress: Arc<BuildProgress>,
    ) -> Result<Arc<Circuit>, ClientError> {
        progress.store(0, Ordering::Release);
        let link = self.link_for(&path.guard).await?;
        let params = CircParams {
            build_timeout: self.cfg.get().circuit_build_timeout,
            max_streams: circ::MAX_STREAMS,
            ..CircParams::default()
        };
        circ::build(link, path, params, progress).await
    }

    async fn close_links(&self) {
        let mut links = self.links.lock().await;
        for (_, l) in links.drain() {
            l.close();
        }
    }

    fn close_links_now(&self) {
        if let Ok(mut links) = self.links.try_lock() {
            for (_, l) in links.drain() {
                l.close();
            }
        }
    }
}

/// A circuit in the pool, with the manager's bookkeeping.
struct Entry<C> {
    circ: Arc<C>,
    /// When the first stream was attached (a circuit is "dirty" from then on).
    dirty_since: Option<Instant>,
    /// The isolation key of its streams.
    isolation: Option<IsolationKey>,
    /// When it was last seen carrying a stream (or was built, or claimed for a stream).
    last_active: Instant,
}

/// Chooses, builds and retires circuits.
/// The proxy's configuration as last reloaded, shared by the manager and the real builder.
#[derive(Clone, Debug)]
pub(crate) struct LiveConfig(Arc<RwLock<Arc<ProxyConfig>>>);

impl LiveConfig {
    pub(crate) fn new(cfg: Arc<ProxyConfig>) -> Self {
        Self(Arc::new(RwLock::new(cfg)))
    }
    /// The configuration in force.
    pub(crate) fn get(&self) -> Arc<ProxyConfig> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
    fn set(&self, cfg: ProxyConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
    }
}

pub(crate) struct CircMgr<B: CircBuilder = LinkBuilder> {
    cfg: LiveConfig,
    builder: B,
    dir: RwLock<Option<Arc<DirView>>>,
    guards: Mutex<GuardSet>,
    /// Layer-2 vanguards: the middle hop of every onion-service circuit (vanguards-lite).
    vanguards: Mutex<crate::vanguards::VanguardSet>,
    pool: Mutex<Vec<Entry<B::Circ>>>,
    /// Builds on demand that failed in a row (a success resets it).
    failed_in_row: std::sync::atomic::AtomicU32,
    /// One lock per isolation key with a build on demand running or queued: requests with the
    /// same key wait for the first build and share its circuit.
    key_locks: Mutex<HashMap<IsolationKey, Arc<tokio::sync::Mutex<()>>>>,
    /// At most [`PARALLEL_BUILDS`] builds on demand at once, across keys.
    build_slots: tokio::sync::Semaphore,
    /// Builds on demand finished so far (a waiter compares it before and after queueing).
    builds_done: std::sync::atomic::AtomicU64,
    /// Circuits built since start (the heartbeat reports it).
    built_total: std::sync::atomic::AtomicU64,
    /// Recently requested ports, most recent first, with when.
    predicted: Mutex<Vec<(u16, Instant)>>,
    /// Build times and the learned timeout, with the records not saved yet.
    cbt: Mutex<(BuildTimes, usize)>,
    relay_down: Mutex<HashMap<RelayId, Instant>>,
    wake: Notify,
    ready: watch::Sender<bool>,
    /// Counts installed consensuses: onion-service drivers wait on it to retry at once what
    /// failed for lack of relays, instead of waiting out a backoff.
    dir_gen: watch::Sender<u64>,
    /// SOCKS client address → circuit id of its open stream (diagnostics and tests).
    by_peer: Mutex<HashMap<std::net::SocketAddr, CircId>>,
    /// Requests refused at `max_circuits_per_guard` (the first is logged).
    guard_limit_hits: std::sync::atomic::AtomicU64,
    /// CREATEs a guard refused with RESOURCELIMIT (the first is logged).
    guard_refusals: std::sync::atomic::AtomicU64,
    /// Prometheus counters.
    pub(crate) metrics: Arc<crate::metrics::ClientMetrics>,
    /// What each local source address holds, against the per-source limits.
    pub(crate) local: Arc<crate::local_limits::LocalLimits>,
    /// Circuits and streams as the control port shows them, and their events.
    pub(crate) control: Arc<crate::control::Events>,
    /// Bytes of frames on guard links (the real builder's links count into it).
    pub(crate) link_bytes: Arc<allium_proto::channel::LinkBytes>,
    /// Onion-service client state: descriptors, kept rendezvous circuits, attempts.
    pub(crate) onion: crate::onion::clidrv::OnionClient,
}

impl<B: CircBuilder> std::fmt::Debug for CircMgr<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircMgr").finish_non_exhaustive()
    }
}

/// A request's hold on its isolation key's build lock; the map entry goes with the last holder.
struct KeyLock<'a, B: CircBuilder> {
    mgr: &'a CircMgr<B>,
    key: &'a IsolationKey,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a, B: CircBuilder> KeyLock<'a, B> {
    fn new(mgr: &'a CircMgr<B>, key: &'a IsolationKey) -> Self {
        let mut m = mgr.key_locks.lock().unwrap_or_else(|p| p.into_inner());
        let lock = Arc::clone(m.entry(key.clone()).or_default());
        drop(m);
        Self { mgr, key, lock }
    }
}

impl<B: CircBuilder> Drop for KeyLock<'_, B> {
    fn drop(&mut self) {
        let mut m = self.mgr.key_locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this holder left: nobody waits on the key.
        if Arc::strong_count(&self.lock) <= 2 {
            m.remove(self.key);
        }
    }
}

/// What the control port shows of one held circuit.
pub(crate) struct ControlCirc {
    /// Its relays, guard first.
    pub(crate) hops: [RelayId; 3],
}

impl CircMgr<LinkBuilder> {
    /// The open circuits in the pool (control port).
    pub(crate) fn control_circuits(&self) -> Vec<ControlCirc> {
        self.pool
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|e| !e.circ.is_closed())
                    .map(|e| ControlCirc { hops: e.circ.hops })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn new(cfg: Arc<ProxyConfig>, guards: GuardSet, ready: watch::Sender<bool>) -> Self {
        let live = LiveConfig::new(cfg);
        let bytes = Arc::new(allium_proto::channel::LinkBytes::default());
        let builder = LinkBuilder {
            cfg: live.clone(),
            links: tokio::sync::Mutex::new(HashMap::new()),
            bytes: Arc::clone(&bytes),
        };
        let mut mgr = Self::with_live(live, guards, ready, builder);
        mgr.link_bytes = bytes;
        mgr
    }
}

impl CircMgr<LinkBuilder> {
    /// A one-hop circuit to one of the primary guards (in order; a guard that fails is skipped),
    /// for directory fetches over BEGIN_DIR. Returns the circuit and its guard's identity.
    pub(crate) async fn dir_circuit(&self) -> Result<(Arc<Circuit>, RelayId), ClientError> {
        let view = self.view()?;
        let n = self.cfg.get().primary_guards;
        let primary = self
            .guards
            .lock()
            .map(|g| g.primary(&view.relays, n))
            .unwrap_or_default();
        let timeout = self.cfg.get().circuit_build_timeout;
        let mut last = ClientError::NoPath("no usable guard for a directory fetch");
        for id in primary {
            let Some(guard) = view.relays.iter().find(|r| r.id == id) else {
                continue;
            };
            let built = async {
                let link = self.builder.link_for(guard).await?;
                crate::dirfetch::one_hop(link, guard, timeout).await
            };
            match built.await {
                Ok(c) => return Ok((c, id)),
                Err(e) => {
                    tracing::debug!("directory circuit to a guard failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// A three-hop circuit whose last hop is `last` (an HSDir, an introduction point or a
    /// rendezvous point, for onion services): a primary guard and a middle relay compatible
    /// with both, within the build timeout, up to [`BUILD_ATTEMPTS`] tries. It stays out of the
    /// pool: its owner alone uses it, and dropping it closes it.
    #[allow(dead_code)] // for the onion-service drivers (issue 13, steps 3-4), not yet wired in
    pub(crate) async fn circuit_ending_at(
        &self,
        last: &RelayInfo,
    ) -> Result<Arc<Circuit>, ClientError> {
        let mut err = ClientError::NoPath("no attempt made");
        for attempt in 1..=BUILD_ATTEMPTS {
            let view = self.view()?;
            let (guard, middle) = self.onion_hops(&view, last)?;
            let guard = &guard;
            let (limit, _) = self.build_timeout(attempt);
            let built = async {
                let link = self.builder.link_for(guard).await?;
                let params = CircParams {
                    build_timeout: limit,
                    max_streams: circ::MAX_STREAMS,
                    ..CircParams::default()
                };
                circ::build_hops(link, &[guard.clone(), middle, last.clone()], params).await
            };
            match tokio::time::timeout(limit, built).await {
                Ok(Ok(c)) => {
                    self.built_total.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
                Ok(Err(e)) => {
                    tracing::debug!(attempt, "onion-service circuit build failed: {e}");
                    err = e;
                }
                Err(_) => err = ClientError::Timeout("building a circuit"),
            }
        }
        Err(err)
    }
}

impl CircMgr<LinkBuilder> {
    /// A three-hop circuit whose last hop is `last` as a client named it (a rendezvous point,
    /// which may be absent from our consensus): as [`CircMgr::circuit_ending_at`], with the
    /// relay's consensus entry (family, addresses for relatedness) when it is listed with the
    /// same onion key, and only the target's identity, key and addresses otherwise.
    pub(crate) async fn circuit_ending_at_target(
        &self,
        last: &crate::core::HopTarget,
    ) -> Result<Arc<Circuit>, ClientError> {
        let view = self.view()?;
        let mut addrs = Vec::new();
        for s in &last.specs {
            match s {
                allium_proto::relaymsg::LinkSpec::Ipv4(a) => {
                    addrs.push(std::net::SocketAddr::V4(*a))
                }
                allium_proto::relaymsg::LinkSpec::Ipv6(a) => {
                    addrs.push(std::net::SocketAddr::V6(*a))
                }
                _ => {}
            }
        }
        let relay = match view.relay(&last.id) {
            Some(r) if r.onion_key == last.onion_key => RelayInfo { addrs, ..r.clone() },
            _ => RelayInfo {
                id: last.id,
                // Only the first hop's link key is used; this relay is never first.
                link_key: last.onion_key,
                onion_key: last.onion_key,
                addrs,
                flags: crate::path::RelayFlags::default(),
                weight: 0,
                family: Vec::new(),
                exit_ports: Vec::new(),
            },
        };
        self.circuit_ending_at(&relay).await
    }
}

impl<B: CircBuilder> CircMgr<B> {
    /// The consensus view in use (onion-service drivers pick relays from it).
    pub(crate) fn dir_view(&self) -> Result<Arc<DirView>, ClientError> {
        self.view()
    }

    /// Our primary guards in `view` (an onion service never uses them as its last hops).
    pub(crate) fn primary_guard_ids(&self, view: &DirView) -> Vec<RelayId> {
        self.guards
            .lock()
            .map(|g| g.primary(&view.relays, self.cfg.get().primary_guards))
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn with_builder(
        cfg: Arc<ProxyConfig>,
        guards: GuardSet,
        ready: watch::Sender<bool>,
        builder: B,
    ) -> Self {
        Self::with_live(LiveConfig::new(cfg), guards, ready, builder)
    }

    fn with_live(
        cfg: LiveConfig,
        guards: GuardSet,
        ready: watch::Sender<bool>,
        builder: B,
    ) -> Self {
        let cbt = load_cbt(&cfg.get());
        let vanguards =
            crate::vanguards::VanguardSet::load(&cfg.get().data_dir).unwrap_or_else(|e| {
                tracing::warn!(
                    "could not read the vanguard state ({e}); keeping vanguards in memory"
                );
                crate::vanguards::VanguardSet::in_memory()
            });
        Self {
            cfg,
            builder,
            dir: RwLock::new(None),
            guards: Mutex::new(guards),
            vanguards: Mutex::new(vanguards),
            pool: Mutex::new(Vec::new()),
            failed_in_row: std::sync::atomic::AtomicU32::new(0),
            key_locks: Mutex::new(HashMap::new()),
            build_slots: tokio::sync::Semaphore::new(PARALLEL_BUILDS),
            builds_done: std::sync::atomic::AtomicU64::new(0),
            built_total: std::sync::atomic::AtomicU64::new(0),
            predicted: Mutex::new(Vec::new()),
            cbt: Mutex::new((cbt, 0)),
            relay_down: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            ready,
            dir_gen: watch::Sender::new(0),
            by_peer: Mutex::new(HashMap::new()),
            guard_limit_hits: std::sync::atomic::AtomicU64::new(0),
            guard_refusals: std::sync::atomic::AtomicU64::new(0),
            metrics: Arc::default(),
            local: Arc::default(),
            control: Arc::default(),
            link_bytes: Arc::default(),
            onion: Default::default(),
        }
    }

    /// Circuits built since start.
    pub(crate) fn circuits_built(&self) -> u64 {
        self.built_total.load(Ordering::Relaxed)
    }

    /// The configuration in force (as last reloaded).
    pub(crate) fn config(&self) -> Arc<ProxyConfig> {
        self.cfg.get()
    }

    /// Take the reloadable keys of `new` (`config::RELOADABLE_KEYS`); the others are ignored.
    pub(crate) fn reconfigure(&self, new: &ProxyConfig) {
        let mut merged = (*self.cfg.get()).clone();
        merged.circuit_build_timeout = new.circuit_build_timeout;
        merged.max_circuit_dirtiness = new.max_circuit_dirtiness;
        merged.circuit_idle_timeout = new.circuit_idle_timeout;
        merged.isolated_circuit_idle_timeout = new.isolated_circuit_idle_timeout;
        merged.max_circuits_per_guard = new.max_circuits_per_guard;
        merged.max_connections_per_source = new.max_connections_per_source;
        merged.max_handshakes_per_source = new.max_handshakes_per_source;
        merged.max_circuit_requests_per_source = new.max_circuit_requests_per_source;
        merged.max_dns_queries_per_source = new.max_dns_queries_per_source;
        merged.prebuilt_circuits = new.prebuilt_circuits;
        merged.socks_handshake_timeout = new.socks_handshake_timeout;
        merged.primary_guards = new.primary_guards;
        merged.log_level = new.log_level.clone();
        merged.heartbeat_period_secs = new.heartbeat_period_secs;
        self.cfg.set(merged);
        // The pool may now want more (or fewer) clean circuits.
        self.wake.notify_one();
    }

    /// Drop expired or unlisted vanguards and draw new ones (vanguards-lite), saving the set
    /// when it changed.
    fn refresh_vanguards(&self, view: &DirView) {
        if let Ok(mut v) = self.vanguards.lock() {
            let now = allium_directory::now_unix();
            if v.refresh(&view.relays, &view.weights, now, &mut rand::rng())
                && let Err(e) = v.save()
            {
                tracing::warn!("could not save the vanguard state: {e}");
            }
        }
    }

    /// The first two hops of an onion-service circuit (introduction, rendezvous or HSDir, for a
    /// client or a service) ending at `last`: a primary guard compatible with it, and one of
    /// the layer-2 vanguards compatible with both (never another middle: see
    /// [`crate::vanguards`]). Every onion-service circuit builder calls this.
    pub(crate) fn onion_hops(
        &self,
        view: &DirView,
        last: &RelayInfo,
    ) -> Result<(RelayInfo, RelayInfo), ClientError> {
        let relaxed = view.relaxed(self.cfg.get().test_network);
        let primary = self
            .guards
            .lock()
            .map(|g| g.primary(&view.relays, self.cfg.get().primary_guards))
            .unwrap_or_default();
        let guard = primary
            .iter()
            .filter_map(|id| view.relays.iter().find(|r| r.id == *id))
            .find(|g| path::compatible(g, last, relaxed))
            .ok_or(ClientError::NoPath(
                "no primary guard may share a circuit with this relay",
            ))?;
        let mut v = self
            .vanguards
            .lock()
            .map_err(|_| ClientError::NoPath("vanguard state unavailable"))?;
        let now = allium_directory::now_unix();
        // Expiry is checked at every use, not only when a consensus arrives.
        if v.refresh(&view.relays, &view.weights, now, &mut rand::rng())
            && let Err(e) = v.save()
        {
            tracing::warn!("could not save the vanguard state: {e}");
        }
        let middle = v
            .choose_middle(&view.relays, &[guard, last], relaxed, &mut rand::rng())
            .cloned()
            .ok_or(ClientError::NoPath(
                "no vanguard may share an onion-service circuit with this guard and relay",
            ))?;
        Ok((guard.clone(), middle))
    }

    /// [`CircMgr::onion_hops`] for a last hop named by a [`crate::core::HopTarget`] (a
    /// rendezvous point as a client named it): its consensus entry when listed, else what the
    /// target says (identity and addresses, no family) for the compatibility rules. Returns the
    /// guard, the vanguard and the last hop as a [`RelayInfo`].
    #[allow(dead_code)] // for the onion-service drivers' HopTarget circuits (issue 13)
    pub(crate) fn onion_hops_for_target(
        &self,
        view: &DirView,
        target: &crate::core::HopTarget,
    ) -> Result<(RelayInfo, RelayInfo, RelayInfo), ClientError> {
        use allium_proto::relaymsg::LinkSpec;
        let last = match view.relays.iter().find(|r| r.id == target.id) {
            Some(r) => r.clone(),
            None => RelayInfo {
                id: target.id,
                link_key: allium_crypto::X25519Public([0; 32]),
                onion_key: target.onion_key,
                addrs: target
                    .specs
                    .iter()
                    .filter_map(|s| match s {
                        LinkSpec::Ipv4(a) => Some(std::net::SocketAddr::V4(*a)),
                        LinkSpec::Ipv6(a) => Some(std::net::SocketAddr::V6(*a)),
                        _ => None,
                    })
                    .collect(),
                flags: path::RelayFlags::default(),
                weight: 0,
                family: Vec::new(),
                exit_ports: Vec::new(),
            },
        };
        let (guard, middle) = self.onion_hops(view, &last)?;
        Ok((guard, middle, last))
    }

    /// The current layer-2 vanguards.
    #[cfg(test)]
    pub(crate) fn vanguard_ids(&self) -> Vec<RelayId> {
        self.vanguards.lock().map(|v| v.ids()).unwrap_or_default()
    }

    pub(crate) fn has_dir(&self) -> bool {
        self.dir.read().map(|d| d.is_some()).unwrap_or(false)
    }

    /// Install a new relay list; refresh the guard sample.
    pub(crate) fn set_dir(&self, view: DirView) {
        if let Ok(mut g) = self.guards.lock() {
            let now = allium_directory::now_unix();
            let (relays, w, n) = (&view.relays, &view.weights, self.cfg.get().primary_guards);
            if g.refresh_weighted(relays, w, n, now, &mut rand::rng())
                && let Err(e) = g.save()
            {
                tracing::warn!("could not save the guard state: {e}");
            }
            if g.primary(&view.relays, 1).is_empty() {
                tracing::warn!("the consensus lists no usable guard; circuits cannot be built");
            }
        }
        self.refresh_vanguards(&view);
        if let Ok(mut d) = self.dir.write() {
            *d = Some(Arc::new(view));
        }
        self.dir_gen.send_modify(|g| *g = g.wrapping_add(1));
        self.wake.notify_one();
    }

    /// Changes whenever a new consensus is installed.
    pub(crate) fn dir_changes(&self) -> watch::Receiver<u64> {
        self.dir_gen.subscribe()
    }

    /// Forget the relay list (the consensus became too old to use); new circuits wait for the
    /// next one.
    pub(crate) fn clear_dir(&self) {
        if let Ok(mut d) = self.dir.write() {
            *d = None;
        }
    }

    fn view(&self) -> Result<Arc<DirView>, ClientError> {
        self.dir
            .read()
            .ok()
            .and_then(|d| d.clone())
            .ok_or(ClientError::NoPath(
                "no usable consensus (none fetched yet, or the last one expired more than 24 hours ago)",
            ))
    }

    /// Whether some exit in the consensus allows `port`.
    pub(crate) fn exit_exists(&self, port: u16) -> bool {
        self.view()
            .map(|v| v.relays.iter().any(|r| r.is_exit_for(&[port])))
            .unwrap_or(false)
    }

    fn note_port(&self, port: u16, now: Instant) {
        if let Ok(mut p) = self.predicted.lock() {
            p.retain(|&(x, _)| x != port);
            p.insert(0, (port, now));
            p.truncate(PREDICTED_PORTS);
        }
    }

    /// The ports requested in the last [`PREDICTED_PORT_TTL`] that some exit allows, most
    /// recent first.
    fn predicted_ports(&self, view: &DirView, now: Instant) -> Vec<u16> {
        let Ok(mut p) = self.predicted.lock() else {
            return Vec::new();
        };
        p.retain(|&(_, t)| now.saturating_duration_since(t) < PREDICTED_PORT_TTL);
        p.iter()
            .map(|&(port, _)| port)
            .filter(|&port| view.relays.iter().any(|r| r.is_exit_for(&[port])))
            .collect()
    }

    /// The builds that bring every predicted port to `want` clean circuits whose exit allows
    /// it (and the pool to `want` clean circuits in all): each entry is the port set one build's
    /// exit must allow. Ports share a build when some exit allows them together.
    fn plan_prebuilds(&self, view: &DirView, ports: &[u16], want: usize) -> Vec<Vec<u16>> {
        let Ok(pool) = self.pool.lock() else {
            return Vec::new();
        };
        let clean: Vec<&Entry<B::Circ>> = pool
            .iter()
            .filter(|e| e.dirty_since.is_none() && !e.circ.is_closed())
            .collect();
        let n_clean = clean.len();
        let mut deficit: Vec<(u16, usize)> = ports
            .iter()
            .map(|&p| {
                let have = clean
                    .iter()
                    .filter(|e| e.circ.exit().allows_port(p))
                    .count();
                (p, want.saturating_sub(have))
            })
            .collect();
        drop(clean);
        drop(pool);
        let mut plan = Vec::new();
        // Each round plans one build and lowers at least one deficit: bounded by their sum.
        while deficit.iter().any(|&(_, d)| d > 0) {
            let needy: Vec<u16> = deficit
                .iter()
                .filter(|&&(_, d)| d > 0)
                .map(|&(p, _)| p)
                .collect();
            let together = view.relays.iter().any(|r| r.is_exit_for(&needy));
            let set = if together {
                needy
            } else {
                needy.into_iter().take(1).collect()
            };
            for (p, d) in &mut deficit {
                if set.contains(p) {
                    *d = d.saturating_sub(1);
                }
            }
            plan.push(set);
        }
        let total_clean = n_clean + plan.len();
        for _ in total_clean..want {
            plan.push(Vec::new());
        }
        plan
    }

    /// The timeout for attempt `attempt` (1-based) of a build, and whether it is learned.
    fn build_timeout(&self, attempt: usize) -> (Duration, bool) {
        let cfg = self.cfg.get();
        let bound = cfg.circuit_build_timeout;
        if !cfg.learn_circuit_build_timeout || attempt >= BUILD_ATTEMPTS {
            return (bound, false);
        }
        match self.cbt.lock() {
            Ok(c) if c.0.is_learned() => (c.0.timeout().min(bound), true),
            _ => (bound, false),
        }
    }

    /// Record a build outcome (`Ok(took)`, or `Err(timeout)` hit) and save the history now and
    /// then.
    fn record_build(&self, outcome: Result<Duration, Duration>) {
        if !self.cfg.get().learn_circuit_build_timeout {
            return;
        }
        let state = {
            let Ok(mut c) = self.cbt.lock() else { return };
            match outcome {
                Ok(took) => c.0.record_success(took),
                Err(after) => c.0.record_timeout(after),
            }
            c.1 += 1;
            if c.1 < CBT_SAVE_EVERY {
                return;
            }
            c.1 = 0;
            c.0.to_state()
        };
        save_cbt(&self.cfg.get(), &state);
    }

    /// The current build timeout (learned or fixed) of a first attempt.
    #[cfg(test)]
    pub(crate) fn current_build_timeout(&self) -> Duration {
        self.build_timeout(1).0
    }

    fn choose_path(
        &self,
        view: &DirView,
        ports: &[u16],
        now: Instant,
    ) -> Result<Path, ClientError> {
        let primary = self
            .guards
            .lock()
            .map(|g| g.primary(&view.relays, self.cfg.get().primary_guards))
            .unwrap_or_default();
        let avoid: Vec<RelayId> = self
            .relay_down
            .lock()
            .map(|mut m| {
                m.retain(|_, t| now.saturating_duration_since(*t) < RELAY_RETRY);
                m.keys().copied().collect()
            })
            .unwrap_or_default();
        let relaxed = view.relaxed(self.cfg.get().test_network);
        let mut rng = rand::rng();
        let w = &view.weights;
        path::choose_path_weighted(&view.relays, w, &primary, &avoid, ports, relaxed, &mut rng)
            .or_else(|_| {
                // Everything usable failed recently: try again rather than give up.
                path::choose_path_weighted(&view.relays, w, &primary, &[], ports, relaxed, &mut rng)
            })
            .map_err(ClientError::NoPath)
    }

    /// Count a circuit through `guard` for path bias; a dropped guard is saved at once.
    fn note_path_bias(&self, guard: RelayId, built: bool) {
        let Ok(mut g) = self.guards.lock() else {
            return;
        };
        if g.note_circuit(guard, built) == crate::guard::PathBiasVerdict::Drop
            && let Err(e) = g.save()
        {
            tracing::warn!("could not save the guard state after dropping a guard: {e}");
        }
    }

    fn mark_down(&self, id: RelayId, now: Instant) {
        if let Ok(mut m) = self.relay_down.lock() {
            m.insert(id, now);
        }
    }

    /// Build one circuit whose exit allows `ports`, trying up to [`BUILD_ATTEMPTS`] paths.
    async fn build_one(&self, ports: &[u16]) -> Result<Arc<B::Circ>, ClientError> {
        let mut last = ClientError::NoPath("no attempt made");
        for attempt in 1..=BUILD_ATTEMPTS {
            let view = self.view()?;
            let started = now();
            let path = self.choose_path(&view, ports, started)?;
            self.make_room(path.guard.id, started)?;
            let track = self.control.launch(path.hops().map(|r| r.id));
            let progress = Arc::new(BuildProgress::tracked(Arc::clone(&track)));
            let (limit, learned) = self.build_timeout(attempt);
            let res =
                tokio::time::timeout(limit, self.builder.build(&path, Arc::clone(&progress))).await;
            let reached = progress.load(Ordering::Acquire);
            let failed_at = path.hops().get(reached).map(|r| r.id);
            // Path bias: every circuit whose first hop was built counts for its guard.
            if (reached >= 1 || matches!(res, Ok(Ok(_))))
                && let Some(guard) = path.hops().first().map(|r| r.id)
            {
                self.note_path_bias(guard, matches!(res, Ok(Ok(_))));
            }
            match res {
                Ok(Ok(c)) => {
                    let took = now().saturating_duration_since(started);
                    tracing::debug!(ms = took.as_secs_f64() * 1000.0, "circuit built");
                    self.record_build(Ok(took));
                    self.built_total.fetch_add(1, Ordering::Relaxed);
                    self.metrics.circuit_built(took.as_secs_f64());
                    return Ok(c);
                }
                Ok(Err(e)) => {
                    track.failed(crate::control::build_failure_reason(&e));
                    self.metrics.circuit_failed();
                    tracing::debug!(attempt, "circuit build failed: {e}");
                    // The guard itself refused for lack of room (our link to it may be at its
                    // per-link cap): free our idle circuits through it rather than mark it down.
                    let refused_by_guard = reached == 0
                        && matches!(
                            e,
                            ClientError::Circuit(CircError::Destroyed(
                                DestroyReason::RESOURCELIMIT
                            ))
                        );
                    let freed_room = refused_by_guard && self.guard_refused(path.guard.id) > 0;
                    if !freed_room
                        && !matches!(e, ClientError::NoPath(_) | ClientError::Shutdown)
                        && let Some(id) = failed_at
                    {
                        self.mark_down(id, now());
                    }
                    last = e;
                }
                Err(_) => {
                    tracing::debug!(
                        attempt,
                        ms = limit.as_millis(),
                        learned,
                        "circuit build timed out"
                    );
                    self.record_build(Err(limit));
                    track.failed("TIMEOUT");
                    self.metrics.circuit_failed();
                    if !learned && let Some(id) = failed_at {
                        self.mark_down(id, now());
                    }
                    last = ClientError::Timeout("building a circuit");
                }
            }
        }
        Err(last)
    }

    /// Make room for one more circuit through `guard`: at `max_circuits_per_guard`, close the
    /// circuits through it that carry no stream, longest idle first; fail if none is idle.
    fn make_room(&self, guard: RelayId, now: Instant) -> Result<(), ClientError> {
        let limit = self.cfg.get().max_circuits_per_guard;
        let Ok(mut pool) = self.pool.lock() else {
            return Ok(());
        };
        pool.retain(|e| !e.circ.is_closed());
        let through = |e: &Entry<B::Circ>| e.circ.hops().first() == Some(&guard);
        let n = pool.iter().filter(|e| through(e)).count();
        if n < limit {
            return Ok(());
        }
        let mut idle: Vec<(Instant, usize)> = pool
            .iter()
            .enumerate()
            .filter(|(_, e)| through(e) && e.circ.n_streams() == 0)
            .map(|(i, e)| (e.last_active, i))
            .collect();
        idle.sort_unstable();
        let excess = n + 1 - limit;
        let mut doomed: Vec<usize> = idle.iter().take(excess).map(|&(_, i)| i).collect();
        let freed = doomed.len();
        doomed.sort_unstable_by(|a, b| b.cmp(a));
        for i in doomed {
            if i < pool.len() {
                pool.swap_remove(i).circ.close();
            }
        }
        drop(pool);
        let idlest_secs = idle
            .first()
            .map_or(0, |(t, _)| now.saturating_duration_since(*t).as_secs());
        tracing::debug!(
            freed,
            idlest_secs,
            "closed idle circuits at max_circuits_per_guard"
        );
        if freed >= excess {
            return Ok(());
        }
        if self.guard_limit_hits.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                limit,
                "max_circuits_per_guard reached: every circuit through the guard carries a \
                 stream, so new requests fail until some end (logged once). Fewer concurrent \
                 isolated streams, or a higher max_circuits_per_guard (below the relays' \
                 max_circuits_per_link), avoid it"
            );
        }
        Err(ClientError::GuardCircuitLimit { limit })
    }

    /// The guard refused a CREATE with RESOURCELIMIT (our link to it may be at its per-link
    /// circuit cap): close our circuits through it that carry no stream. Returns how many.
    fn guard_refused(&self, guard: RelayId) -> usize {
        let mut freed = 0usize;
        if let Ok(mut pool) = self.pool.lock() {
            pool.retain(|e| {
                let idle = !e.circ.is_closed()
                    && e.circ.n_streams() == 0
                    && e.circ.hops().first() == Some(&guard);
                if idle {
                    e.circ.close();
                    freed += 1;
                }
                !idle && !e.circ.is_closed()
            });
        }
        if self.guard_refusals.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                freed,
                "a guard refused a circuit for lack of resources (RESOURCELIMIT); closed our \
                 idle circuits through it and retrying (logged once)"
            );
        }
        freed
    }

    /// Requests refused at `max_circuits_per_guard`, and CREATEs guards refused with
    /// RESOURCELIMIT, since start.
    #[cfg(test)]
    pub(crate) fn limit_counts(&self) -> (u64, u64) {
        (
            self.guard_limit_hits.load(Ordering::Relaxed),
            self.guard_refusals.load(Ordering::Relaxed),
        )
    }

    fn dirty_ok(&self, e: &Entry<B::Circ>, now: Instant) -> bool {
        e.dirty_since
            .is_none_or(|t| now.saturating_duration_since(t) < self.cfg.get().max_circuit_dirtiness)
    }

    /// Find a usable circuit for `port` (`None`: any exit) and `iso` at `now`, and claim it.
    fn find(&self, port: Option<u16>, iso: &IsolationKey, now: Instant) -> Option<Arc<B::Circ>> {
        let mut pool = self.pool.lock().ok()?;
        pool.retain(|e| !e.circ.is_closed());
        let fits = |e: &Entry<B::Circ>| {
            port.is_none_or(|p| e.circ.exit().allows_port(p))
                && self.dirty_ok(e, now)
                && e.circ.n_streams() < circ::MAX_STREAMS
                && iso.compatible_with(e.isolation.as_ref())
        };
        // Prefer a circuit already used with this key; keep clean ones for other keys.
        let pos = pool
            .iter()
            .position(|e| fits(e) && e.isolation.as_ref() == Some(iso))
            .or_else(|| pool.iter().position(fits))?;
        let e = pool.get_mut(pos)?;
        e.dirty_since.get_or_insert(now);
        e.last_active = now;
        e.isolation.get_or_insert_with(|| iso.clone());
        let c = Arc::clone(&e.circ);
        drop(pool);
        self.wake.notify_one();
        Some(c)
    }

    /// An open circuit for a stream to `port` with isolation key `iso`, claimed, if one is
    /// there now (never builds or waits).
    pub(crate) fn ready_circuit(
        &self,
        port: Option<u16>,
        iso: &IsolationKey,
    ) -> Option<Arc<B::Circ>> {
        if let Some(p) = port {
            self.note_port(p, now());
        }
        self.find(port, iso, now())
    }

    /// A circuit for a stream to `port` (`None`: any exit, e.g. for RESOLVE) with isolation
    /// key `iso`.
    pub(crate) async fn get_circuit(
        &self,
        port: Option<u16>,
        iso: &IsolationKey,
    ) -> Result<Arc<B::Circ>, ClientError> {
        if let Some(p) = port {
            self.note_port(p, now());
        }
        if let Some(c) = self.find(port, iso, now()) {
            return Ok(c);
        }
        let seen = self.builds_done.load(Ordering::Acquire);
        let key = KeyLock::new(self, iso);
        let _same_key = key.lock.lock().await;
        let Ok(_slot) = self.build_slots.acquire().await else {
            return Err(ClientError::RecentBuildFailed); // never closed
        };
        if let Some(c) = self.find(port, iso, now()) {
            return Ok(c);
        }
        // The builds that finished while we were queued failed, FAIL_FAST_AFTER in a row:
        // fail now rather than queue behind one failing build after another.
        if self.failed_in_row.load(Ordering::Acquire) >= FAIL_FAST_AFTER
            && self.builds_done.load(Ordering::Acquire) > seen
        {
            return Err(ClientError::RecentBuildFailed);
        }
        let ports: Vec<u16> = port.into_iter().collect();
        let r = self.build_one(&ports).await;
        if r.is_err() {
            self.failed_in_row.fetch_add(1, Ordering::AcqRel);
        } else {
            self.failed_in_row.store(0, Ordering::Release);
        }
        self.builds_done.fetch_add(1, Ordering::AcqRel);
        let c = r?;
        if let Ok(mut p) = self.pool.lock() {
            p.push(Entry {
                circ: Arc::clone(&c),
                dirty_since: Some(now()),
                isolation: Some(iso.clone()),
                last_active: now(),
            });
        }
        self.wake.notify_one();
        Ok(c)
    }

    /// Close the used circuits without a stream that are past their dirtiness limit or idle
    /// for longer than their idle timeout at `now`; count clean ones.
    fn expire(&self, now: Instant) -> usize {
        let cfg = self.cfg.get();
        let Ok(mut pool) = self.pool.lock() else {
            return 0;
        };
        pool.retain_mut(|e| {
            if e.circ.is_closed() {
                return false;
            }
            if e.circ.n_streams() > 0 {
                e.last_active = now;
                return true;
            }
            if e.dirty_since.is_none() {
                return true;
            }
            let idle_limit = if e
                .isolation
                .as_ref()
                .is_some_and(IsolationKey::is_per_client)
            {
                cfg.isolated_circuit_idle_timeout
            } else {
                cfg.circuit_idle_timeout
            };
            let idle = now.saturating_duration_since(e.last_active);
            if !self.dirty_ok(e, now) || idle >= idle_limit {
                e.circ.close();
                return false;
            }
            true
        });
        pool.iter().filter(|e| e.dirty_since.is_none()).count()
    }

    /// Build the clean circuits missing at `now`; returns the first failure, if any.
    async fn top_up(&self, view: &DirView) -> Result<(), ClientError> {
        self.expire(now());
        let want = self
            .cfg
            .get()
            .prebuilt_circuits
            .max(usize::from(!*self.ready.borrow()));
        let ports = self.predicted_ports(view, now());
        let plan = self.plan_prebuilds(view, &ports, want);
        if plan.is_empty() {
            return Ok(());
        }
        let builds = plan.iter().map(|ports| self.build_one(ports));
        let results = futures::future::join_all(builds).await;
        let mut failed = Ok(());
        let mut built = 0usize;
        if let Ok(mut p) = self.pool.lock() {
            for r in results {
                match r {
                    Ok(c) => {
                        built += 1;
                        p.push(Entry {
                            circ: c,
                            dirty_since: None,
                            isolation: None,
                            last_active: now(),
                        });
                    }
                    Err(e) => failed = Err(e),
                }
            }
        }
        // Ready once every circuit of this round is in the pool (so a caller that waited for
        // readiness sees all of them).
        if built > 0 && !*self.ready.borrow() {
            tracing::info!("bootstrap 100%: ready; circuits are built");
            let _ = self.ready.send(true);
        }
        failed
    }

    /// Keep circuits ready ahead of demand and retire old ones, until shutdown.
    #[allow(clippy::disallowed_methods)] // the manager's driver loop: the one place its time enters
    pub(crate) async fn maintain(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        let mut announced = false;
        loop {
            let mut wait = Duration::from_secs(5);
            if let Ok(view) = self.view() {
                if !announced && self.expire(now()) < self.cfg.get().prebuilt_circuits.max(1) {
                    tracing::info!("bootstrap 60%: building circuits");
                    announced = true;
                }
                match self.top_up(&view).await {
                    Ok(()) => backoff = Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(
                            "could not build a circuit ({e}); retrying in {}s",
                            backoff.as_secs()
                        );
                        wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn drain_pool(&self) {
        let circs: Vec<Arc<B::Circ>> = self
            .pool
            .lock()
            .map(|mut p| p.drain(..).map(|e| e.circ).collect())
            .unwrap_or_default();
        for c in circs {
            c.close();
        }
    }

    /// Close every circuit, and every link not busy being connected, without waiting (drop).
    pub(crate) fn close_all_now(&self) {
        self.drain_pool();
        self.builder.close_links_now();
    }

    /// Close every circuit and link (shutdown).
    pub(crate) async fn close_all(&self) {
        self.drain_pool();
        self.builder.close_links().await;
    }

    /// Remember that the SOCKS client at `peer` has a stream on circuit `circ` (until
    /// [`CircMgr::forget_peer`]).
    pub(crate) fn note_peer(&self, peer: std::net::SocketAddr, circ: CircId) {
        if let Ok(mut m) = self.by_peer.lock() {
            m.insert(peer, circ);
        }
    }

    /// The stream of the SOCKS client at `peer` ended.
    pub(crate) fn forget_peer(&self, peer: std::net::SocketAddr) {
        if let Ok(mut m) = self.by_peer.lock() {
            m.remove(&peer);
        }
    }

    /// The circuit id carrying the stream of the SOCKS client at `peer`.
    pub(crate) fn peer_circuit(&self, peer: std::net::SocketAddr) -> Option<CircId> {
        self.by_peer.lock().ok().and_then(|m| m.get(&peer).copied())
    }

    /// The open circuits (for tests and diagnostics).
    pub(crate) fn circuits(&self) -> Vec<crate::CircuitInfo> {
        self.pool
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|e| !e.circ.is_closed())
                    .map(|e| crate::CircuitInfo {
                        path: e.circ.hops(),
                        streams: e.circ.n_streams(),
                        dirty: e.dirty_since.is_some(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// NEWNYM (control port): take every circuit out of the pool, so new streams get fresh
    /// circuits. Idle ones close now; busy ones close when their last stream ends (their streams
    /// hold the only references). Fresh circuits are built at once.
    pub(crate) fn newnym(&self) {
        let old: Vec<Entry<B::Circ>> = self
            .pool
            .lock()
            .map(|mut p| p.drain(..).collect())
            .unwrap_or_default();
        for e in &old {
            if e.circ.n_streams() == 0 {
                e.circ.close();
            }
        }
        drop(old);
        if let Ok(mut m) = self.by_peer.lock() {
            m.clear();
        }
        self.wake.notify_one();
    }

    /// Number of open circuits in the pool (for tests and logs).
    pub(crate) fn n_circuits(&self) -> usize {
        self.pool
            .lock()
            .map(|p| p.iter().filter(|e| !e.circ.is_closed()).count())
            .unwrap_or(0)
    }
}

/// The saved build-time history in `cfg.data_dir`, or none (absent, unreadable or too big: a
/// fresh history; a damaged file only costs the learning, so it is logged, not fatal).
fn load_cbt(cfg: &ProxyConfig) -> BuildTimes {
    let cbt_cfg = CbtConfig {
        initial: cfg.circuit_build_timeout,
        ..CbtConfig::default()
    };
    let path = cfg.data_dir.join(CBT_FILE);
    let fresh = || BuildTimes::new(cbt_cfg);
    if !cfg.learn_circuit_build_timeout {
        return fresh();
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.len() <= CBT_MAX_FILE_LEN => {}
        Ok(_) => {
            tracing::warn!(
                "{} is too big; starting a new build-time history",
                path.display()
            );
            return fresh();
        }
        Err(_) => return fresh(),
    }
    let parsed = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<CbtState>(&t).ok());
    match parsed {
        Some(state) => BuildTimes::from_state(cbt_cfg, &state),
        None => {
            tracing::warn!(
                "{} is unreadable; starting a new build-time history",
                path.display()
            );
            fresh()
        }
    }
}

/// Write the build-time history atomically (temporary file, then rename); failures are logged.
fn save_cbt(cfg: &ProxyConfig, state: &CbtState) {
    let path = cfg.data_dir.join(CBT_FILE);
    let tmp = path.with_extension("json.tmp");
    let res = serde_json::to_string(state)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        tracing::debug!(
            "could not save the build-time history to {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
#[path = "circmgr_tests.rs"]
mod tests;
