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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use allium_crypto::RelayId;
use tokio::sync::{Notify, watch};

use crate::circ::{self, Circuit};
use crate::config::ProxyConfig;
use crate::dir::DirView;
use crate::err::ClientError;
use crate::guard::GuardSet;
use crate::isolation::IsolationKey;
use crate::link::Link;
use crate::path::{self, Path};

/// How long a relay that failed a circuit build (link, CREATE or EXTEND) is avoided.
const RELAY_RETRY: Duration = Duration::from_secs(60);
/// How many paths one circuit request tries.
const BUILD_ATTEMPTS: usize = 3;
/// How many recently requested ports are predicted.
const PREDICTED_PORTS: usize = 3;

/// Chooses, builds and retires circuits.
pub(crate) struct CircMgr {
    cfg: Arc<ProxyConfig>,
    dir: RwLock<Option<Arc<DirView>>>,
    guards: Mutex<GuardSet>,
    links: tokio::sync::Mutex<HashMap<RelayId, Arc<Link>>>,
    pool: Mutex<Vec<Arc<Circuit>>>,
    /// Serialises builds on demand; holds when the last one failed.
    build_lock: tokio::sync::Mutex<Option<Instant>>,
    predicted: Mutex<Vec<u16>>,
    relay_down: Mutex<HashMap<RelayId, Instant>>,
    wake: Notify,
    ready: watch::Sender<bool>,
    /// SOCKS client address → circuit id of its open stream (diagnostics and tests).
    by_peer: Mutex<HashMap<std::net::SocketAddr, u32>>,
}

impl std::fmt::Debug for CircMgr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircMgr").finish_non_exhaustive()
    }
}

impl CircMgr {
    pub(crate) fn new(cfg: Arc<ProxyConfig>, guards: GuardSet, ready: watch::Sender<bool>) -> Self {
        Self {
            cfg,
            dir: RwLock::new(None),
            guards: Mutex::new(guards),
            links: tokio::sync::Mutex::new(HashMap::new()),
            pool: Mutex::new(Vec::new()),
            build_lock: tokio::sync::Mutex::new(None),
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

    fn view(&self) -> Result<Arc<DirView>, ClientError> {
        self.dir
            .read()
            .ok()
            .and_then(|d| d.clone())
            .ok_or(ClientError::NoPath("no consensus yet"))
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

    fn choose_path(&self, view: &DirView, ports: &[u16]) -> Result<Path, ClientError> {
        let primary = self
            .guards
            .lock()
            .map(|g| g.primary(&view.relays, self.cfg.primary_guards))
            .unwrap_or_default();
        let now = Instant::now();
        let avoid: Vec<RelayId> = self
            .relay_down
            .lock()
            .map(|mut m| {
                m.retain(|_, t| now.duration_since(*t) < RELAY_RETRY);
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

    fn mark_down(&self, id: RelayId) {
        if let Ok(mut m) = self.relay_down.lock() {
            m.insert(id, Instant::now());
        }
    }

    async fn link_for(&self, guard: &path::RelayInfo) -> Result<Arc<Link>, ClientError> {
        let mut links = self.links.lock().await;
        if let Some(l) = links.get(&guard.id).filter(|l| !l.is_closed()) {
            return Ok(Arc::clone(l));
        }
        links.retain(|_, l| !l.is_closed());
        let l = Link::connect(guard, self.cfg.circuit_build_timeout).await?;
        links.insert(guard.id, Arc::clone(&l));
        Ok(l)
    }

    /// Build one circuit whose exit allows `ports`, trying up to [`BUILD_ATTEMPTS`] paths.
    async fn build_one(&self, ports: &[u16]) -> Result<Arc<Circuit>, ClientError> {
        let mut last = ClientError::NoPath("no attempt made");
        for attempt in 1..=BUILD_ATTEMPTS {
            let view = self.view()?;
            let path = self.choose_path(&view, ports)?;
            let started = Instant::now();
            let progress = AtomicUsize::new(0);
            let res = tokio::time::timeout(self.cfg.circuit_build_timeout, async {
                let link = self.link_for(&path.guard).await?;
                circ::build(link, &path, &progress).await
            })
            .await;
            let failed_at = path
                .hops()
                .get(progress.load(Ordering::Acquire))
                .map(|r| r.id);
            match res {
                Ok(Ok(c)) => {
                    tracing::debug!(
                        circ = %c.id,
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
                        self.mark_down(id);
                    }
                    last = e;
                }
                Err(_) => {
                    tracing::debug!(attempt, "circuit build timed out");
                    if let Some(id) = failed_at {
                        self.mark_down(id);
                    }
                    last = ClientError::Timeout("building a circuit");
                }
            }
        }
        Err(last)
    }

    fn dirty_ok(&self, c: &Circuit, now: Instant) -> bool {
        c.usage.lock().is_ok_and(|u| {
            u.dirty_since
                .is_none_or(|t| now.duration_since(t) < self.cfg.max_circuit_dirtiness)
        })
    }

    /// Find a usable circuit for `port` (`None`: any exit) and `iso`, and claim it.
    fn find(&self, port: Option<u16>, iso: &IsolationKey) -> Option<Arc<Circuit>> {
        let now = Instant::now();
        let mut pool = self.pool.lock().ok()?;
        pool.retain(|c| !c.is_closed());
        let fits = |c: &Arc<Circuit>| {
            port.is_none_or(|p| c.exit.allows_port(p))
                && self.dirty_ok(c, now)
                && c.n_streams() < circ::MAX_STREAMS
                && c.usage
                    .lock()
                    .is_ok_and(|u| iso.compatible_with(u.isolation.as_ref()))
        };
        // Prefer a circuit already used with this key; keep clean ones for other keys.
        let used = pool.iter().find(|c| {
            fits(c)
                && c.usage
                    .lock()
                    .is_ok_and(|u| u.isolation.as_ref() == Some(iso))
        });
        let chosen = used.or_else(|| pool.iter().find(|c| fits(c))).cloned()?;
        drop(pool);
        if let Ok(mut u) = chosen.usage.lock() {
            u.dirty_since.get_or_insert(now);
            u.isolation.get_or_insert_with(|| iso.clone());
        }
        self.wake.notify_one();
        Some(chosen)
    }

    /// A circuit for a stream to `port` (`None`: any exit, e.g. for RESOLVE) with isolation
    /// key `iso`.
    pub(crate) async fn get_circuit(
        &self,
        port: Option<u16>,
        iso: &IsolationKey,
    ) -> Result<Arc<Circuit>, ClientError> {
        if let Some(p) = port {
            self.note_port(p);
        }
        if let Some(c) = self.find(port, iso) {
            return Ok(c);
        }
        let waiting_since = Instant::now();
        let mut last_failure = self.build_lock.lock().await;
        if let Some(c) = self.find(port, iso) {
            return Ok(c);
        }
        // A build that another stream waited on failed while we were queued: fail now rather
        // than queue behind one failing build after another.
        if last_failure.is_some_and(|t| t >= waiting_since) {
            return Err(ClientError::Circuit(
                "building a circuit failed just now; see the log for why".into(),
            ));
        }
        let ports: Vec<u16> = port.into_iter().collect();
        let c = match self.build_one(&ports).await {
            Ok(c) => c,
            Err(e) => {
                *last_failure = Some(Instant::now());
                return Err(e);
            }
        };
        if let Ok(mut u) = c.usage.lock() {
            u.dirty_since = Some(Instant::now());
            u.isolation = Some(iso.clone());
        }
        if let Ok(mut p) = self.pool.lock() {
            p.push(Arc::clone(&c));
        }
        self.wake.notify_one();
        Ok(c)
    }

    /// Close idle circuits past their dirtiness limit; count clean ones.
    fn expire(&self) -> usize {
        let now = Instant::now();
        let Ok(mut pool) = self.pool.lock() else {
            return 0;
        };
        pool.retain(|c| {
            if c.is_closed() {
                return false;
            }
            if !self.dirty_ok(c, now) && c.n_streams() == 0 {
                c.close_with_destroy();
                return false;
            }
            true
        });
        pool.iter()
            .filter(|c| c.usage.lock().is_ok_and(|u| u.dirty_since.is_none()))
            .count()
    }

    /// Keep circuits ready ahead of demand and retire old ones, until shutdown.
    pub(crate) async fn maintain(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        let mut announced = false;
        loop {
            let mut wait = Duration::from_secs(5);
            if let Ok(view) = self.view() {
                let clean = self.expire();
                let want = self
                    .cfg
                    .prebuilt_circuits
                    .max(usize::from(!*self.ready.borrow()));
                if clean < want {
                    if !announced {
                        tracing::info!("bootstrap 60%: building circuits");
                        announced = true;
                    }
                    let ports = self.predicted_ports(&view);
                    let builds = (clean..want).map(|_| self.build_one(&ports));
                    let results = futures::future::join_all(builds).await;
                    let mut failed = None;
                    for r in results {
                        match r {
                            Ok(c) => {
                                if let Ok(mut p) = self.pool.lock() {
                                    p.push(c);
                                }
                                if !*self.ready.borrow() {
                                    tracing::info!("bootstrap 100%: ready; circuits are built");
                                    let _ = self.ready.send(true);
                                }
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    if let Some(e) = failed {
                        tracing::warn!(
                            "could not build a circuit ({e}); retrying in {}s",
                            backoff.as_secs()
                        );
                        wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    } else {
                        backoff = Duration::from_secs(1);
                        continue;
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

    /// Close every circuit, and every link not busy being connected, without waiting (drop).
    pub(crate) fn close_all_now(&self) {
        let circs: Vec<Arc<Circuit>> = self
            .pool
            .lock()
            .map(|mut p| p.drain(..).collect())
            .unwrap_or_default();
        for c in circs {
            c.close_with_destroy();
        }
        if let Ok(mut links) = self.links.try_lock() {
            for (_, l) in links.drain() {
                l.close();
            }
        }
    }

    /// Close every circuit and link (shutdown).
    pub(crate) async fn close_all(&self) {
        let circs: Vec<Arc<Circuit>> = self
            .pool
            .lock()
            .map(|mut p| p.drain(..).collect())
            .unwrap_or_default();
        for c in circs {
            c.close_with_destroy();
        }
        let mut links = self.links.lock().await;
        for (_, l) in links.drain() {
            l.close();
        }
    }

    /// Remember that the SOCKS client at `peer` has a stream on circuit `circ` (until
    /// [`CircMgr::forget_peer`]).
    pub(crate) fn note_peer(&self, peer: std::net::SocketAddr, circ: u32) {
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
    pub(crate) fn peer_circuit(&self, peer: std::net::SocketAddr) -> Option<u32> {
        self.by_peer.lock().ok().and_then(|m| m.get(&peer).copied())
    }

    /// The open circuits (for tests and diagnostics).
    pub(crate) fn circuits(&self) -> Vec<crate::CircuitInfo> {
        self.pool
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|c| !c.is_closed())
                    .map(|c| crate::CircuitInfo {
                        path: c.hops,
                        streams: c.n_streams(),
                        dirty: c.usage.lock().is_ok_and(|u| u.dirty_since.is_some()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of open circuits in the pool (for tests and logs).
    pub(crate) fn n_circuits(&self) -> usize {
        self.pool
            .lock()
            .map(|p| p.iter().filter(|c| !c.is_closed()).count())
            .unwrap_or(0)
    }
}
