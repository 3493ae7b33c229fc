//! The onion-service driver: one tokio task per `[[onion_service]]` table, carrying out what
//! its [`OnionService`] state decides (issue 13). Every decision is in the state; this is I/O.
//!
//! - **Introduction points.** [`N_INTRO_POINTS`](super::service::N_INTRO_POINTS) circuits,
//!   each ending at a relay picked from the consensus (usable, Fast, Stable where the network has
//!   Stable relays, not one of our primary guards, not already an introduction point, weighted
//!   by consensus weight). Each sends the state's ESTABLISH_INTRO and waits
//!   [`INTRO_ESTABLISH_TIMEOUT`] for INTRO_ESTABLISHED. A circuit that fails or closes is
//!   reported to the state (which then wants a new point, with new keys) and replaced after a
//!   backoff that doubles from [`RETRY_MIN`] to [`RETRY_MAX`] while replacements keep failing.
//! - **Descriptors.** Whenever the state says one is due (points changed, a new time period,
//!   or [`REUPLOAD_SECS`](super::service::REUPLOAD_SECS) passed), the descriptors for the current
//!   and the next period go to every HSDir the period's ring names (`hsdir_n_replicas ×
//!   hsdir_spread_store`), [`UPLOAD_PARALLEL`] at a time, each over a BEGIN_DIR stream at the end
//!   of a circuit to that HSDir, tried [`UPLOAD_ATTEMPTS`] times. If no HSDir took a
//!   descriptor, the upload is due again after a backoff.
//! - **Introductions.** INTRODUCE2 is opened by the state (refusals counted by reason); an
//!   accepted one goes through a queue of [`REND_QUEUE`] to at most [`REND_BUILDS`] concurrent
//!   rendezvous builds, and at most [`REND_OPEN`] joined rendezvous circuits exist at once:
//!   what does not fit is dropped and counted (a flood costs the service bounded work).
//! - **Proof of work** (`pow = true`). An accepted INTRODUCE2 goes into the state's
//!   effort-ordered queue instead ([`OnionService::queue_introduce2`]); one task takes the
//!   costliest first at the queue's rate ([`OnionService::next_rendezvous`]), and only when
//!   the rendezvous queue has room, so what waits stays ordered by effort. The main loop calls
//!   [`OnionService::pow_tick`] at least every [`TICK`] (new seed, suggested effort), and a
//!   change makes a descriptor due. Counters: the queue's length and drops, the suggested effort.
//! - **Time periods** follow the consensus' `hsdir_interval` (`DirView`'s `period_params`,
//!   given to the state at every turn of the loop): the periods, blinded keys and rings of the
//!   descriptors are those the clients of that network compute.
//! - **Streams.** A BEGIN on a rendezvous circuit goes to the port map's local target (TCP
//!   connect within [`CONNECT_TIMEOUT`]), then is spliced exactly as a SOCKS stream is
//!   (`crate::stream::splice`); an unmapped port or a refused connection is ended with
//!   CONNECTREFUSED, a connect timeout with TIMEOUT.
//!
//! Services are not reconfigured on SIGHUP (the `onion_service` tables are not reloadable
//! keys): changing them needs a restart. Shutdown stops the task; its circuits close.
//!
//! Logs never carry the address, keys, or the local target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_crypto::RelayId;
use allium_crypto::relaycell::EndToEndRole;
use allium_proto::metrics::{Exposition, MetricType};
use allium_proto::relaymsg::{EndReason, RelayMsg};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::hsdir;
use super::service::{DescUpload, IntroRefusal, N_INTRO_POINTS, OnionService, RendezvousTask};
use super::{IntroId, IntroRelay};
use crate::circ::{Circuit, StreamEvent};
use crate::circmgr::CircMgr;
use crate::core::StreamId;
use crate::err::ClientError;
use crate::path::RelayInfo;
use crate::reactor::OnionEvent;

/// Longest wait for INTRO_ESTABLISHED after sending ESTABLISH_INTRO.
pub const INTRO_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// First delay before replacing a failed introduction point or retrying a failed upload.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest such delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// HSDir uploads in flight at once (per service).
pub const UPLOAD_PARALLEL: usize = 4;
/// Tries per HSDir and descriptor (a new circuit each time).
pub const UPLOAD_ATTEMPTS: u32 = 3;
/// Accepted introductions waiting for a rendezvous build.
pub const REND_QUEUE: usize = 32;
/// Rendezvous circuits being built at once.
pub const REND_BUILDS: usize = 8;
/// Joined rendezvous circuits open at once (per service).
pub const REND_OPEN: usize = 256;
/// Longest time to connect to a local target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A relay that failed as an introduction point is not picked again for this long (unless no
/// other is left).
const INTRO_AVOID: Duration = Duration::from_secs(300);
/// The driver looks at its state at least this often (period changes, re-uploads).
const TICK: Duration = Duration::from_secs(30);

/// Why an introduction was not carried out, as `onion_service_introductions_total{outcome}`.
const INTRO_OUTCOMES: [&str; 7] = [
    "accepted",
    "unknown_point",
    "bad_handshake",
    "replay",
    "retired",
    "queue_full",
    "bad_pow",
];

fn refusal_index(r: IntroRefusal) -> usize {
    match r {
        IntroRefusal::UnknownPoint => 1,
        IntroRefusal::BadHandshake => 2,
        IntroRefusal::Replay => 3,
        IntroRefusal::Retired => 4,
        IntroRefusal::QueueFull => 5,
        IntroRefusal::Pow(_) => 6,
    }
}

/// How incoming streams ended up, as `onion_service_streams_total{outcome}`.
const STREAM_OUTCOMES: [&str; 4] = ["connected", "unknown_port", "refused", "timeout"];

/// What a running service reports (tests, [`crate::ProxyHandle::onion_services`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnionServiceStatus {
    /// The table's `name`.
    pub name: String,
    /// Introduction points established now.
    pub intro_points: usize,
    /// Descriptor uploads so far that at least one HSDir stored.
    pub descriptors_published: u64,
    /// Introduction points listed in the last descriptor published.
    pub published_intro_points: usize,
    /// Per blinded key of the last upload: the HSDirs that stored it.
    pub last_upload: Vec<(allium_crypto::hs::BlindedPublicKey, Vec<RelayId>)>,
    /// With proof of work on: the effort the service suggests now.
    pub pow_suggested_effort: Option<u32>,
    /// With proof of work on: introductions waiting in its queue.
    pub pow_queued: usize,
}

/// The onion-service counters of the proxy (all services together), and each service's
/// status.
#[derive(Debug, Default)]
pub(crate) struct ServiceMetrics {
    intro_established: AtomicU64,
    intro_failed: AtomicU64,
    intro_points: AtomicU64,
    uploads_ok: AtomicU64,
    uploads_failed: AtomicU64,
    introductions: [AtomicU64; 7],
    rend_open: AtomicU64,
    rend_failed: AtomicU64,
    streams: [AtomicU64; 4],
    pow_queued: AtomicU64,
    pow_dropped: AtomicU64,
    status: Mutex<Vec<OnionServiceStatus>>,
}

impl ServiceMetrics {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn intro(&self, i: usize) {
        if let Some(c) = self.introductions.get(i) {
            Self::bump(c);
        }
    }

    fn stream(&self, i: usize) {
        if let Some(c) = self.streams.get(i) {
            Self::bump(c);
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut OnionServiceStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let i = match all.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                all.push(OnionServiceStatus {
                    name: name.to_owned(),
                    ..OnionServiceStatus::default()
                });
                all.len() - 1
            }
        };
        if let Some(s) = all.get_mut(i) {
            f(s);
        }
    }

    /// Each running service's status.
    pub(crate) fn status(&self) -> Vec<OnionServiceStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Add the onion-service families to the metrics page.
    pub(crate) fn render(&self, e: &mut Exposition) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        e.single(
            "allium_onion_service_intro_points",
            MetricType::Gauge,
            "Introduction points of the proxy's onion services established now.",
            get(&self.intro_points),
        );
        e.family(
            "allium_onion_service_intro_circuits_total",
            MetricType::Counter,
            "Introduction circuits by outcome: established, or failed (build, ESTABLISH_INTRO \
             refused or timed out).",
        )
        .sample(&[("outcome", "established")], get(&self.intro_established))
        .sample(&[("outcome", "failed")], get(&self.intro_failed));
        e.family(
            "allium_onion_service_descriptor_uploads_total",
            MetricType::Counter,
            "Descriptor uploads to one HSDir, by outcome.",
        )
        .sample(&[("outcome", "stored")], get(&self.uploads_ok))
        .sample(&[("outcome", "failed")], get(&self.uploads_failed));
        e.family(
            "allium_onion_service_introductions_total",
            MetricType::Counter,
            "INTRODUCE2 messages by outcome (accepted, or why refused or dropped).",
        );
        for (label, c) in INTRO_OUTCOMES.iter().zip(&self.introductions) {
            e.sample(&[("outcome", label)], get(c));
        }
        e.single(
            "allium_onion_service_rendezvous_circuits_open",
            MetricType::Gauge,
            "Rendezvous circuits joined to a client, open now.",
            get(&self.rend_open),
        );
        e.single(
            "allium_onion_service_rendezvous_failures_total",
            MetricType::Counter,
            "Rendezvous circuits that could not be built or joined.",
            get(&self.rend_failed),
        );
        e.family(
            "allium_onion_service_streams_total",
            MetricType::Counter,
            "Streams from clients by outcome (connected to the local target, unknown port, \
             local target refused, local target timed out).",
        );
        for (label, c) in STREAM_OUTCOMES.iter().zip(&self.streams) {
            e.sample(&[("outcome", label)], get(c));
        }
        e.single(
            "allium_onion_service_pow_queued",
            MetricType::Gauge,
            "Introductions waiting in the proof-of-work queues of the proxy's services.",
            get(&self.pow_queued),
        );
        e.single(
            "allium_onion_service_pow_queue_dropped_total",
            MetricType::Counter,
            "Introductions the proof-of-work queues dropped: no room for their effort, or \
             waited longer than 30 s.",
            get(&self.pow_dropped),
        );
        let effort = self
            .status()
            .iter()
            .filter_map(|s| s.pow_suggested_effort)
            .max()
            .unwrap_or(0);
        e.single(
            "allium_onion_service_pow_suggested_effort",
            MetricType::Gauge,
            "The highest proof-of-work effort the proxy's services suggest now (0: none, or \
             proof of work off).",
            f64::from(effort),
        );
    }
}

/// What the sub-tasks of a service tell its main loop.
enum DrvEvent {
    /// INTRO_ESTABLISHED arrived for this point.
    IntroUp,
    /// The point's circuit failed or closed (`established`: it had been up).
    IntroLost { id: IntroId, relay: RelayId },
    /// An upload round ended; `stored` HSDirs took a descriptor listing `points`
    /// introduction points.
    Uploaded {
        points: usize,
        stored: Vec<(allium_crypto::hs::BlindedPublicKey, Vec<RelayId>)>,
        any: bool,
    },
}

/// Everything a service's sub-tasks share.
struct Shared {
    name: String,
    svc: Mutex<OnionService>,
    mgr: Arc<CircMgr>,
    metrics: Arc<crate::metrics::ClientMetrics>,
    events: mpsc::Sender<DrvEvent>,
    rend: mpsc::Sender<RendezvousTask>,
    /// The proof-of-work queue's clock starts here.
    epoch: Instant,
    /// An introduction was put in the proof-of-work queue.
    queued: Notify,
    /// This service's share of the proof-of-work counters, as last shown.
    pow_shown: Mutex<PowShown>,
}

impl Shared {
    fn svc(&self) -> std::sync::MutexGuard<'_, OnionService> {
        self.svc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn m(&self) -> &ServiceMetrics {
        &self.metrics.onion_service
    }

    /// Milliseconds on the proof-of-work queue's clock (monotonic).
    fn now_ms(&self) -> u64 {
        u64::try_from(now().saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

#[allow(clippy::disallowed_methods)] // the driver is where time enters
fn now() -> Instant {
    Instant::now()
}

#[allow(clippy::disallowed_methods)] // the driver is where time enters
async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Run the service `svc` (from the `[[onion_service]]` table `name`) until `shutdown`.
pub(crate) async fn run(
    name: String,
    svc: OnionService,
    mgr: Arc<CircMgr>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    let (rend_tx, rend_rx) = mpsc::channel(REND_QUEUE);
    let metrics = Arc::clone(&mgr.metrics);
    let sh = Arc::new(Shared {
        name: name.clone(),
        svc: Mutex::new(svc),
        mgr,
        metrics,
        events: ev_tx,
        rend: rend_tx,
        epoch: now(),
        queued: Notify::new(),
        pow_shown: Mutex::default(),
    });
    sh.m().update(&name, |_| {});
    let mut tasks = JoinSet::new();
    tasks.spawn(rendezvous_loop(Arc::clone(&sh), rend_rx));
    if sh.svc().pow_enabled() {
        tasks.spawn(pow_loop(Arc::clone(&sh)));
    }
    let mut intro_backoff = RETRY_MIN;
    let mut next_intro = now();
    let mut upload_backoff = RETRY_MIN;
    let mut next_upload = now();
    let mut uploading = false;
    let mut avoid: HashMap<RelayId, Instant> = HashMap::new();
    let mut established: usize = 0;
    let mut due_since: Option<Instant> = None;
    let mut dir_changes = sh.mgr.dir_changes();
    tracing::info!(service = %name, "onion service starting");
    loop {
        while tasks.try_join_next().is_some() {}
        let t = now();
        let mut wake = t + TICK;
        // The consensus' time periods (a change makes a descriptor due).
        if let Ok(view) = sh.mgr.dir_view() {
            sh.svc().set_period_params(view.hs.period_params);
        }
        // Proof of work: seed rotation and the suggested effort (a change makes a descriptor
        // due).
        let pow_effort = {
            let mut svc = sh.svc();
            svc.pow_tick(allium_directory::now_unix(), sh.now_ms());
            svc.suggested_effort()
        };
        sh.m()
            .update(&name, |s| s.pow_suggested_effort = pow_effort);
        // Introduction points.
        if t >= next_intro {
            let wanted = sh.svc().intro_points_wanted();
            for _ in 0..wanted {
                match pick_intro(&sh, &avoid, t) {
                    Some(relay) => {
                        let id = sh.svc().add_intro_point(IntroRelay {
                            id: relay.id,
                            link_key: relay.link_key,
                            onion_key: relay.onion_key,
                            addrs: relay.addrs.clone(),
                        });
                        tasks.spawn(intro_task(Arc::clone(&sh), relay, id));
                    }
                    None if !sh.mgr.has_dir() => {
                        // No consensus yet: look again soon.
                        next_intro = t + RETRY_MIN;
                        break;
                    }
                    None => {
                        // No relay left to pick: look again later.
                        tracing::warn!(service = %name, "no relay left for an introduction point");
                        next_intro = t + intro_backoff;
                        intro_backoff = (intro_backoff * 2).min(RETRY_MAX);
                        break;
                    }
                }
            }
        }
        if sh.svc().intro_points_wanted() > 0 {
            wake = wake.min(next_intro.max(t + RETRY_MIN / 4));
        }
        // Descriptors.
        let now_unix = allium_directory::now_unix();
        let due = sh.svc().descriptor_due(now_unix);
        if !due {
            due_since = None;
        } else if due_since.is_none() {
            due_since = Some(t);
        }
        // While introduction points are still being set up, wait for them (up to
        // INTRO_ESTABLISH_TIMEOUT) rather than publish a descriptor that changes at once.
        let settling = {
            let svc = sh.svc();
            let in_flight = N_INTRO_POINTS
                .saturating_sub(svc.intro_points_wanted())
                .saturating_sub(svc.n_established());
            in_flight > 0 && due_since.is_some_and(|d| t < d + INTRO_ESTABLISH_TIMEOUT)
        };
        if settling {
            wake = wake.min(t + RETRY_MIN);
        }
        if due && !settling && !uploading && t >= next_upload {
            // Bind the result first: a guard held in the scrutinee would live through the
            // arms, and locking again there deadlocks the driver.
            let (built, points) = {
                let mut svc = sh.svc();
                (svc.build_descriptors(now_unix), svc.n_established())
            };
            match built {
                Ok(ups) => {
                    uploading = true;
                    tasks.spawn(upload_round(Arc::clone(&sh), ups, points));
                }
                Err(e) => tracing::warn!(service = %name, "building a descriptor failed: {e}"),
            }
        }
        if !uploading && t < next_upload {
            wake = wake.min(next_upload);
        }
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(DrvEvent::IntroUp) => {
                    let n = sh.svc().n_established();
                    intro_backoff = RETRY_MIN;
                    set_share(&sh.m().intro_points, &mut established, n);
                    sh.m().update(&name, |s| s.intro_points = n);
                    tracing::info!(service = %name, established = n, "introduction point established");
                }
                Some(DrvEvent::IntroLost { id, relay }) => {
                    sh.svc().intro_lost(id);
                    let n = sh.svc().n_established();
                    set_share(&sh.m().intro_points, &mut established, n);
                    sh.m().update(&name, |s| s.intro_points = n);
                    avoid.retain(|_, at| now().saturating_duration_since(*at) < INTRO_AVOID);
                    avoid.insert(relay, now());
                    next_intro = now() + intro_backoff;
                    intro_backoff = (intro_backoff * 2).min(RETRY_MAX);
                }
                Some(DrvEvent::Uploaded { points, stored, any }) => {
                    uploading = false;
                    let n: usize = stored.iter().map(|(_, v)| v.len()).sum();
                    if any {
                        upload_backoff = RETRY_MIN;
                        tracing::info!(service = %name, hsdirs = n, "descriptors uploaded");
                        sh.m().update(&name, |s| {
                            s.descriptors_published += 1;
                            s.published_intro_points = points;
                            s.last_upload = stored;
                        });
                    } else {
                        sh.svc().descriptor_upload_failed();
                        next_upload = now() + upload_backoff;
                        upload_backoff = (upload_backoff * 2).min(RETRY_MAX);
                        tracing::warn!(
                            service = %name,
                            "no HSDir took the descriptor; retrying in {}s",
                            upload_backoff.as_secs()
                        );
                    }
                }
                None => break,
            },
            () = tokio::time::sleep_until(wake) => {}
            r = dir_changes.changed() => {
                if r.is_err() {
                    break;
                }
                // A new consensus: what failed for lack of relays (introduction points, an
                // upload with no HSDir to take it) is retried now, with the backoff reset.
                let t = now();
                if next_intro > t {
                    next_intro = t;
                    intro_backoff = RETRY_MIN;
                }
                if !uploading && next_upload > t {
                    next_upload = t;
                    upload_backoff = RETRY_MIN;
                }
            }
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
        }
    }
    tasks.shutdown().await;
    show_pow(&sh, true);
    set_share(&sh.m().intro_points, &mut established, 0);
    sh.m().update(&name, |s| s.intro_points = 0);
    tracing::info!(service = %name, "onion service stopped");
}

/// Set this service's share of a gauge that all services add to: from `*mine` to `n`.
fn set_share(g: &AtomicU64, mine: &mut usize, n: usize) {
    if n >= *mine {
        g.fetch_add((n - *mine) as u64, Ordering::Relaxed);
    } else {
        g.fetch_sub((*mine - n) as u64, Ordering::Relaxed);
    }
    *mine = n;
}

/// Pick a relay for a new introduction point, or `None` (no consensus, no candidate).
fn pick_intro(sh: &Shared, avoid: &HashMap<RelayId, Instant>, t: Instant) -> Option<RelayInfo> {
    let view = sh.mgr.dir_view().ok()?;
    let guards = sh.mgr.primary_guard_ids(&view);
    let taken = sh.svc().intro_relays();
    let base: Vec<RelayInfo> = view
        .relays
        .iter()
        .filter(|r| r.usable() && !guards.contains(&r.id) && !taken.contains(&r.id))
        .cloned()
        .collect();
    let stable = base.iter().any(|r| r.flags.stable);
    let relaxed = view.relaxed(sh.mgr.config().test_network);
    let fresh: Vec<RelayInfo> = base
        .iter()
        .filter(|r| {
            avoid
                .get(&r.id)
                .is_none_or(|at| t.saturating_duration_since(*at) >= INTRO_AVOID)
        })
        .cloned()
        .collect();
    let mut rng = rand::rng();
    for cands in [&fresh, &base] {
        if let Some(r) = crate::path::choose_middle_weighted(
            cands,
            &view.weights,
            &[],
            stable,
            relaxed,
            &mut rng,
        ) {
            return Some(r.clone());
        }
    }
    None
}

/// One introduction point: build, establish, then hand INTRODUCE2 to the state until the
/// circuit goes.
async fn intro_task(sh: Arc<Shared>, relay: RelayInfo, id: IntroId) {
    let up = establish(&sh, &relay, id).await;
    let ok = up.is_ok();
    match up {
        Ok((circ, rx)) => {
            ServiceMetrics::bump(&sh.m().intro_established);
            let _ = sh.events.send(DrvEvent::IntroUp).await;
            serve_intro(&sh, id, rx).await;
            drop(circ);
        }
        Err(e) => {
            ServiceMetrics::bump(&sh.m().intro_failed);
            tracing::debug!(service = %sh.name, "introduction point failed: {e}");
        }
    }
    if ok {
        tracing::info!(service = %sh.name, "an introduction circuit closed; replacing it");
    }
    let _ = sh
        .events
        .send(DrvEvent::IntroLost {
            id,
            relay: relay.id,
        })
        .await;
}

async fn establish(
    sh: &Shared,
    relay: &RelayInfo,
    id: IntroId,
) -> Result<(Arc<Circuit>, mpsc::Receiver<OnionEvent>), ClientError> {
    let circ = sh.mgr.circuit_ending_at(relay).await?;
    let mut rx = circ.onion_events().await?;
    let binding = circ.hop_binding(2).await?.ok_or(ClientError::NoPath(
        "the introduction circuit has no third hop",
    ))?;
    let msg = sh
        .svc()
        .establish_intro(id, &binding)
        .ok_or(ClientError::NoPath("the introduction point was dropped"))?;
    circ.send_onion_service(msg).await?;
    let wait = async {
        loop {
            match rx.recv().await {
                Some(OnionEvent::Msg(m)) if matches!(*m, RelayMsg::IntroEstablished(_)) => {
                    return Ok(());
                }
                Some(_) => {}
                None => return Err(ClientError::Circuit(crate::err::CircError::Closed)),
            }
        }
    };
    tokio::time::timeout(INTRO_ESTABLISH_TIMEOUT, wait)
        .await
        .map_err(|_| ClientError::Timeout("waiting for INTRO_ESTABLISHED"))??;
    sh.svc().intro_established(id);
    Ok((circ, rx))
}

async fn serve_intro(sh: &Shared, id: IntroId, mut rx: mpsc::Receiver<OnionEvent>) {
    while let Some(ev) = rx.recv().await {
        let OnionEvent::Msg(m) = ev else {
            // No streams on an introduction circuit; dropping the queue ends it.
            continue;
        };
        let RelayMsg::Introduce2(intro) = *m else {
            continue;
        };
        let now_unix = allium_directory::now_unix();
        let pow = sh.svc().pow_enabled();
        if pow {
            let r = sh.svc().queue_introduce2(id, &intro, now_unix, sh.now_ms());
            match r {
                Ok(_) => {
                    sh.m().intro(0);
                    sh.queued.notify_one();
                }
                Err(refusal) => {
                    sh.m().intro(refusal_index(refusal));
                    tracing::debug!(service = %sh.name, "INTRODUCE2 refused: {refusal}");
                }
            }
            if !sh.svc().has_intro_point(id) {
                return;
            }
            continue;
        }
        let r = sh.svc().handle_introduce2(id, &intro, now_unix);
        match r {
            Ok(task) => match sh.rend.try_send(task) {
                Ok(()) => sh.m().intro(0),
                Err(_) => sh.m().intro(5),
            },
            Err(refusal) => {
                sh.m().intro(refusal_index(refusal));
                tracing::debug!(service = %sh.name, "INTRODUCE2 refused: {refusal}");
            }
        }
        if !sh.svc().has_intro_point(id) {
            // Retired (its replay cache is full): close the circuit, a new point replaces it.
            return;
        }
    }
}

/// Send every descriptor to every HSDir its period's ring names; report which took it.
async fn upload_round(sh: Arc<Shared>, ups: Vec<DescUpload>, points: usize) {
    let mut jobs: Vec<(usize, RelayInfo, Arc<Vec<u8>>)> = Vec::new();
    let mut stored: Vec<(allium_crypto::hs::BlindedPublicKey, Vec<RelayId>)> = Vec::new();
    if let Ok(view) = sh.mgr.dir_view() {
        for (i, up) in ups.iter().enumerate() {
            stored.push((up.blinded, Vec::new()));
            let Some(req) = hsdir::upload_request(&up.blinded, &up.bytes) else {
                continue;
            };
            let req = Arc::new(req);
            let ring = view.hsdir_ring(&up.period);
            for hsdir in ring.upload_targets(&up.blinded, &view.hs.params) {
                if let Some(r) = view.relay(&hsdir) {
                    jobs.push((i, r.clone(), Arc::clone(&req)));
                }
            }
        }
    }
    let sem = Arc::new(Semaphore::new(UPLOAD_PARALLEL));
    let mut set = JoinSet::new();
    for (i, relay, req) in jobs {
        let (sh, sem) = (Arc::clone(&sh), Arc::clone(&sem));
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let ok = upload_one(&sh, &relay, &req).await;
            (i, relay.id, ok)
        });
    }
    let mut any = false;
    while let Some(r) = set.join_next().await {
        let Ok((i, id, ok)) = r else { continue };
        if ok {
            any = true;
            ServiceMetrics::bump(&sh.m().uploads_ok);
            if let Some((_, v)) = stored.get_mut(i) {
                v.push(id);
            }
        } else {
            ServiceMetrics::bump(&sh.m().uploads_failed);
        }
    }
    let _ = sh
        .events
        .send(DrvEvent::Uploaded {
            points,
            stored,
            any,
        })
        .await;
}

/// One descriptor to one HSDir, [`UPLOAD_ATTEMPTS`] tries.
async fn upload_one(sh: &Shared, relay: &RelayInfo, req: &[u8]) -> bool {
    let mut delay = RETRY_MIN;
    for attempt in 1..=UPLOAD_ATTEMPTS {
        let r = async {
            let circ = sh.mgr.circuit_ending_at(relay).await?;
            let resp = crate::dirfetch::exchange(&circ, req).await?;
            hsdir::upload_response(&resp).map_err(ClientError::Directory)
        };
        match r.await {
            Ok(()) => return true,
            Err(e) => {
                tracing::debug!(service = %sh.name, attempt, "descriptor upload to an HSDir failed: {e}");
            }
        }
        if attempt < UPLOAD_ATTEMPTS {
            sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
    false
}

/// This service's share of the proof-of-work gauges, as last added.
#[derive(Default)]
struct PowShown {
    queued: usize,
    dropped: u64,
}

/// Bring the proof-of-work counters up to the state's queue (`stopped`: the service is
/// stopping, its queue no longer counts).
fn show_pow(sh: &Shared, stopped: bool) {
    let (queued, dropped) = {
        let svc = sh.svc();
        (if stopped { 0 } else { svc.queued() }, svc.queue_dropped())
    };
    let m = sh.m();
    let mut shown = sh.pow_shown.lock().unwrap_or_else(|p| p.into_inner());
    set_share(&m.pow_queued, &mut shown.queued, queued);
    m.pow_dropped
        .fetch_add(dropped.saturating_sub(shown.dropped), Ordering::Relaxed);
    shown.dropped = shown.dropped.max(dropped);
    m.update(&sh.name, |s| s.pow_queued = queued);
}

/// With proof of work on: hand queued introductions to the rendezvous builders, costliest
/// first, at the queue's rate, each only once the rendezvous queue has room for it (so the
/// order by effort holds for everything not yet being built).
async fn pow_loop(sh: Arc<Shared>) {
    loop {
        let Ok(permit) = sh.rend.reserve().await else {
            break;
        };
        loop {
            let ms = sh.now_ms();
            let (next, at) = {
                let mut svc = sh.svc();
                let next = svc.next_rendezvous(ms);
                (next, svc.next_rendezvous_at(ms))
            };
            show_pow(&sh, false);
            if let Some((_, task)) = next {
                permit.send(task);
                break;
            }
            match at {
                Some(at) => {
                    tokio::select! {
                        () = sleep(Duration::from_millis(at.saturating_sub(ms).max(1))) => {}
                        () = sh.queued.notified() => {}
                    }
                }
                None => sh.queued.notified().await,
            }
        }
    }
}

/// Take accepted introductions off the queue: at most [`REND_BUILDS`] builds and
/// [`REND_OPEN`] joined circuits at once; the rest are dropped.
async fn rendezvous_loop(sh: Arc<Shared>, mut q: mpsc::Receiver<RendezvousTask>) {
    let builds = Arc::new(Semaphore::new(REND_BUILDS));
    let open = Arc::new(Semaphore::new(REND_OPEN));
    let mut set = JoinSet::new();
    while let Some(task) = q.recv().await {
        while set.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&open).try_acquire_owned() else {
            ServiceMetrics::bump(&sh.m().rend_failed);
            tracing::debug!(service = %sh.name, "rendezvous dropped: too many open");
            continue;
        };
        let Ok(build) = Arc::clone(&builds).acquire_owned().await else {
            return;
        };
        set.spawn(rendezvous(Arc::clone(&sh), task, build, slot));
    }
}

async fn rendezvous(
    sh: Arc<Shared>,
    task: RendezvousTask,
    build: tokio::sync::OwnedSemaphorePermit,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let RendezvousTask {
        rend_point,
        rendezvous1,
        keys,
    } = task;
    let joined = async {
        let circ = sh.mgr.circuit_ending_at_target(&rend_point).await?;
        let rx = circ.onion_events().await?;
        circ.send_onion_service(rendezvous1).await?;
        circ.add_end_to_end(keys, EndToEndRole::Service).await?;
        Ok::<_, ClientError>((circ, rx))
    };
    let (circ, mut rx) = match joined.await {
        Ok(x) => x,
        Err(e) => {
            ServiceMetrics::bump(&sh.m().rend_failed);
            tracing::debug!(service = %sh.name, "rendezvous failed: {e}");
            return;
        }
    };
    drop(build);
    sh.m().rend_open.fetch_add(1, Ordering::Relaxed);
    let mut streams = JoinSet::new();
    while let Some(ev) = rx.recv().await {
        while streams.try_join_next().is_some() {}
        if let OnionEvent::Incoming { sid, begin, rx } = ev {
            let target = sh.svc().target_for(begin.port);
            streams.spawn(serve_stream(
                Arc::clone(&sh),
                Arc::clone(&circ),
                sid,
                target,
                rx,
            ));
        }
    }
    sh.m().rend_open.fetch_sub(1, Ordering::Relaxed);
    // The circuit is gone: its streams end with it.
    streams.shutdown().await;
}

/// One client stream: connect to the local target, accept, splice.
async fn serve_stream(
    sh: Arc<Shared>,
    circ: Arc<Circuit>,
    sid: StreamId,
    target: Option<SocketAddr>,
    rx: mpsc::Receiver<StreamEvent>,
) {
    let Some(target) = target else {
        sh.m().stream(1);
        circ.end_stream(sid.get(), EndReason::CONNECTREFUSED).await;
        return;
    };
    let sock =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => {
                sh.m().stream(2);
                circ.end_stream(sid.get(), EndReason::CONNECTREFUSED).await;
                return;
            }
            Err(_) => {
                sh.m().stream(3);
                circ.end_stream(sid.get(), EndReason::TIMEOUT).await;
                return;
            }
        };
    if circ.accept_stream(sid).await.is_err() {
        return;
    }
    sh.m().stream(0);
    crate::stream::splice(circ, sid.get(), rx, sock).await;
}
