//! The circuit manager: which circuit a stream uses, building circuits (with timeouts and
//! retries on other paths), keeping a few ready ahead of demand, and retiring old ones.
//!
//! - A stream takes an open circuit whose exit allows its port, whose isolation key matches (or
//!   that has carried no stream yet), and that became dirty less than `max_circuit_dirtiness`
//!   ago. Otherwise a circuit is built for it (builds on demand are serialised, so a burst of
//!   streams shares the first new circuit instead of building one each).
//! - The maintenance task keeps `prebuilt_circuits` clean circuits ready for the recently used
//!   ports, and closes dirty circuits that are past `max_circuit_dirtiness` and carry no stream.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use allium_crypto::RelayId;
use allium_proto::cell::CircId;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::circ::{self, Circuit};
use crate::config::ProxyConfig;
use crate::core::CircParams;
use crate::dir::DirView;
use crate::err::ClientError;
use crate::guard::GuardSet;
use crate::isolation::IsolationKey;
use crate::link::Link;
use crate::path::{self, Path, RelayInfo};

/// How long a relay that failed a circuit build (link, CREATE or EXTEND) is avoided.
const RELAY_RETRY: Duration = Duration::from_secs(60);
/// How many paths one circuit request tries.
const BUILD_ATTEMPTS: usize = 3;
/// How many recently requested ports are predicted.
const PREDICTED_PORTS: usize = 3;

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
        progress: Arc<AtomicUsize>,
    ) -> impl Future<Output = Result<Arc<Self::Circ>, ClientError>> + Send + 'a;
    /// Close every link (shutdown), waiting for links being connected.
    fn close_links(&self) -> impl Future<Output = ()> + Send + '_;
    /// Close the links not busy being connected, without waiting.
    fn close_links_now(&self);
}

/// The real builder: one link per guard, one reactor per circuit.
pub(crate) struct LinkBuilder {
    cfg: Arc<ProxyConfig>,
    links: tokio::sync::Mutex<HashMap<RelayId, Arc<Link>>>,
}

impl LinkBuilder {
    async fn link_for(&self, guard: &RelayInfo) -> Result<Arc<Link>, ClientError> {
        let mut links = self.links.lock().await;
        if let Some(l) = links.get(&guard.id).filter(|l| !l.is_closed()) {
            return Ok(Arc::clone(l));
        }
        links.retain(|_, l| !l.is_closed());
        let l = Link::connect(guard, self.cfg.circuit_build_timeout).await?;
        links.insert(guard.id, Arc::clone(&l));
        Ok(l)
    }
}

impl CircBuilder for LinkBuilder {
    type Circ = Circuit;

    async fn build<'a>(
        &'a self,
        path: &'a Path,
        progress: Arc<AtomicUsize>,
    ) -> Result<Arc<Circuit>, ClientError> {
        progress.store(0, Ordering::Release);
        let link = self.link_for(&path.guard).await?;
        let params = CircParams {
            build_timeout: self.cfg.circuit_build_timeout,
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
}

/// Chooses, builds and retires circuits.
pub(crate) struct CircMgr<B: CircBuilder = LinkBuilder> {
    cfg: Arc<ProxyConfig>,
    builder: B,
    dir: RwLock<Option<Arc<DirView>>>,
    guards: Mutex<GuardSet>,
    pool: Mutex<Vec<Entry<B::Circ>>>,
    /// Serialises builds on demand; holds whether the last one failed.
    build_lock: tokio::sync::Mutex<bool>,
    /// Builds on demand finished so far (a waiter compares it before and after queueing).
    builds_done: std::sync::atomic::AtomicU64,
    predicted: Mutex<Vec<u16>>,
    relay_down: Mutex<HashMap<RelayId, Instant>>,
    wake: Notify,
    ready: watch::Sender<bool>,
    /// SOCKS client address → circuit id of its open stream (diagnostics and tests).
    by_peer: Mutex<HashMap<std::net::SocketAddr, CircId>>,
}

impl<B: CircBuilder> std::fmt::Debug for CircMgr<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircMgr").finish_non_exhaustive()
    }
}

impl CircMgr<LinkBuilder> {
    pub(crate) fn new(cfg: Arc<ProxyConfig>, guards: GuardSet, ready: watch::Sender<bool>) -> Self {
        let builder = LinkBuilder {
            cfg: Arc::clone(&cfg),
            links: tokio::sync::Mutex::new(HashMap::new()),
        };
        Self::with_builder(cfg, guards, ready, builder)
    }
}

impl<B: CircBuilder> CircMgr<B> {
    pub(crate) fn with_builder(
        cfg: Arc<ProxyConfig>,
        guards: GuardSet,
        ready: watch::Sender<bool>,
        builder: B,
    ) -> Self {
        Self {
            cfg,
            builder,
            dir: RwLock::new(None),
            guards: Mutex::new(guards),
            pool: Mutex::new(Vec::new()),
            build_lock: tokio::sync::Mutex::new(false),
            builds_done: std::sync::atomic::AtomicU64::new(0),
            predicted: Mutex::new(Vec::new()),
            relay_down: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            ready,
            by_peer: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    pub(crate) fn has_dir(&self) -> bool {
        self.dir.read().map(|d| d.is_some()).unwrap_or(false)
    }

    /// Install a new relay list; refresh the guard sample.
    pub(crate) fn set_dir(&self, view: DirView) {
        if let Ok(mut g) = self.guards.lock() {
            let now = allium_directory::now_unix();
            if g.refresh(&view.relays, self.cfg.primary_guards, now, &mut rand::rng())
                && let Err(e) = g.save()
            {
                tracing::warn!("could not save the guard state: {e}");
            }
            if g.primary(&view.relays, 1).is_empty() {
                tracing::warn!("the consensus lists no usable guard; circuits cannot be built");
            }
        }
        if let Ok(mut d) = self.dir.write() {
            *d = Some(Arc::new(view));
        }
        self.wake.notify_one();
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

    fn note_port(&self, port: u16) {
        if let Ok(mut p) = self.predicted.lock() {
            p.retain(|&x| x != port);
            p.insert(0, port);
            p.truncate(PREDICTED_PORTS);
        }
    }

    /// Ports to build ahead for: all predicted ports if some exit allows them all, else the
    /// most recent one, else any exit.
    fn predicted_ports(&self, view: &DirView) -> Vec<u16> {
        let p = self.predicted.lock().map(|p| p.clone()).unwrap_or_default();
        let ok = |ports: &[u16]| view.relays.iter().any(|r| r.is_exit_for(ports));
        if !p.is_empty() && ok(&p) {
            p
        } else if let Some(&first) = p.first().filter(|&&f| ok(&[f])) {
            vec![first]
        } else {
            Vec::new()
        }
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
            .map(|g| g.primary(&view.relays, self.cfg.primary_guards))
            .unwrap_or_default();
        let avoid: Vec<RelayId> = self
            .relay_down
            .lock()
            .map(|mut m| {
                m.retain(|_, t| now.saturating_duration_since(*t) < RELAY_RETRY);
                m.keys().copied().collect()
            })
            .unwrap_or_default();
        let relaxed = self.cfg.test_network;
        let mut rng = rand::rng();
        path::choose_path(&view.relays, &primary, &avoid, ports, relaxed, &mut rng)
            .or_else(|_| {
                // Everything usable failed recently: try again rather than give up.
                path::choose_path(&view.relays, &primary, &[], ports, relaxed, &mut rng)
            })
            .map_err(ClientError::NoPath)
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
            let progress = Arc::new(AtomicUsize::new(0));
            let res = tokio::time::timeout(
                self.cfg.circuit_build_timeout,
                self.builder.build(&path, Arc::clone(&progress)),
            )
            .await;
            let failed_at = path
                .hops()
                .get(progress.load(Ordering::Acquire))
                .map(|r| r.id);
            match res {
                Ok(Ok(c)) => {
                    tracing::debug!(
                        ms = started.elapsed().as_secs_f64() * 1000.0,
                        "circuit built"
                    );
                    return Ok(c);
                }
                Ok(Err(e)) => {
                    tracing::debug!(attempt, "circuit build failed: {e}");
                    if !matches!(e, ClientError::NoPath(_) | ClientError::Shutdown)
                        && let Some(id) = failed_at
                    {
                        self.mark_down(id, now());
                    }
                    last = e;
                }
                Err(_) => {
                    tracing::debug!(attempt, "circuit build timed out");
                    if let Some(id) = failed_at {
                        self.mark_down(id, now());
                    }
                    last = ClientError::Timeout("building a circuit");
                }
            }
        }
        Err(last)
    }

    fn dirty_ok(&self, e: &Entry<B::Circ>, now: Instant) -> bool {
        e.dirty_since
            .is_none_or(|t| now.saturating_duration_since(t) < self.cfg.max_circuit_dirtiness)
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
        e.isolation.get_or_insert_with(|| iso.clone());
        let c = Arc::clone(&e.circ);
        drop(pool);
        self.wake.notify_one();
        Some(c)
    }

    /// A circuit for a stream to `port` (`None`: any exit, e.g. for RESOLVE) with isolation
    /// key `iso`.
    pub(crate) async fn get_circuit(
        &self,
        port: Option<u16>,
        iso: &IsolationKey,
    ) -> Result<Arc<B::Circ>, ClientError> {
        if let Some(p) = port {
            self.note_port(p);
        }
        if let Some(c) = self.find(port, iso, now()) {
            return Ok(c);
        }
        let seen = self.builds_done.load(Ordering::Acquire);
        let mut last_failed = self.build_lock.lock().await;
        if let Some(c) = self.find(port, iso, now()) {
            return Ok(c);
        }
        // A build that finished while we were queued failed: fail now rather than queue
        // behind one failing build after another.
        if *last_failed && self.builds_done.load(Ordering::Acquire) > seen {
            return Err(ClientError::RecentBuildFailed);
        }
        let ports: Vec<u16> = port.into_iter().collect();
        let r = self.build_one(&ports).await;
        *last_failed = r.is_err();
        self.builds_done.fetch_add(1, Ordering::AcqRel);
        let c = r?;
        if let Ok(mut p) = self.pool.lock() {
            p.push(Entry {
                circ: Arc::clone(&c),
                dirty_since: Some(now()),
                isolation: Some(iso.clone()),
            });
        }
        self.wake.notify_one();
        Ok(c)
    }

    /// Close idle circuits past their dirtiness limit at `now`; count clean ones.
    fn expire(&self, now: Instant) -> usize {
        let Ok(mut pool) = self.pool.lock() else {
            return 0;
        };
        pool.retain(|e| {
            if e.circ.is_closed() {
                return false;
            }
            if !self.dirty_ok(e, now) && e.circ.n_streams() == 0 {
                e.circ.close();
                return false;
            }
            true
        });
        pool.iter().filter(|e| e.dirty_since.is_none()).count()
    }

    /// Build the clean circuits missing at `now`; returns the first failure, if any.
    async fn top_up(&self, view: &DirView) -> Result<(), ClientError> {
        let clean = self.expire(now());
        let want = self
            .cfg
            .prebuilt_circuits
            .max(usize::from(!*self.ready.borrow()));
        if clean >= want {
            return Ok(());
        }
        let ports = self.predicted_ports(view);
        let builds = (clean..want).map(|_| self.build_one(&ports));
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
                if !announced && self.expire(now()) < self.cfg.prebuilt_circuits.max(1) {
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

    /// Number of open circuits in the pool (for tests and logs).
    pub(crate) fn n_circuits(&self) -> usize {
        self.pool
            .lock()
            .map(|p| p.iter().filter(|e| !e.circ.is_closed()).count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
#[path = "circmgr_tests.rs"]
mod tests;
