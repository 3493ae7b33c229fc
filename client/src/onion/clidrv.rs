//! The onion-service client driver (issue 13): from a `.allium.alt` name, a port and a stream's
//! isolation key to an open stream on a rendezvous circuit. The tokio side of
//! [`super::client`], which decides everything; this module only carries it out on circuits
//! and bounds every wait.
//!
//! One connection attempt ([`connect`]):
//! 1. the descriptor, from the per-isolation [`DescCache`] or fetched: the HSDirs of the
//!    current period's ring (`fetch_candidates`, in a random order), each over a circuit
//!    ending at it ([`CircMgr::circuit_ending_at`]) and a BEGIN_DIR stream, at most
//!    [`HSDIR_TIMEOUT`] each, at most [`MAX_HSDIR_TRIES`] of them;
//! 2. a rendezvous circuit to a random usable relay (the circuit manager picks a guard outside
//!    its family), ESTABLISH_RENDEZVOUS, RENDEZVOUS_ESTABLISHED within [`STEP_TIMEOUT`];
//! 3. an introduction circuit to one of the descriptor's introduction points (which need not
//!    be in the consensus: [`CircMgr::circuit_ending_at_target`]), INTRODUCE1, INTRODUCE_ACK
//!    within [`STEP_TIMEOUT`]; on a failure or a refusal, the next introduction point;
//! 4. RENDEZVOUS2 on the rendezvous circuit within [`REND_TIMEOUT`], the handshake checked
//!    ([`super::client::PendingIntro::finish`]) and the end-to-end hop added (client role).
//!
//! Periods and blinded keys follow the consensus' `hsdir_interval` (`DirView`'s
//! `period_params`), as the services' do.
//!
//! **Proof of work.** When the descriptor carries puzzle parameters, each INTRODUCE1 carries a
//! proof for its introduction point at the effort of a [`PowRetry`] schedule, solved on
//! tokio's blocking threads (at most [`MAX_POW_SOLVERS`] at once for the whole proxy, each
//! within [`SOLVE_TIMEOUT`]; a solver whose connection is dropped stops within
//! [`super::pow::SOLVE_CHECK_EVERY`] hashes). An introduction that is refused, or whose
//! rendezvous does not come within [`REND_TIMEOUT_POW`] while retries remain, is made again
//! (new rendezvous point, raised effort), up to [`super::client::MAX_POW_ATTEMPTS`] in all.
//!
//! The joined rendezvous circuit is kept per (address, isolation key), so that further streams
//! to the same service from the same isolation group cost no introduction; it is closed when it
//! has carried no stream for the proxy's `isolated_circuit_idle_timeout`, or when it fails.
//! Concurrent requests for the same address and isolation key share one attempt: the first
//! runs it, the others wait for its outcome.
//!
//! Streams to a service name no host (the service knows who it is): BEGIN carries `0.0.0.0`
//! and the port. Addresses are never logged (not even at debug level).

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use allium_crypto::X25519Secret;
use allium_crypto::hs::HsAddress;
use allium_crypto::relaycell::EndToEndRole;
use allium_directory::hs::{HsDescContents, UncheckedHsDesc};
use allium_proto::relaymsg::{EstablishRendezvous, IntroduceStatus, RelayMsg};
use rand::RngExt as _;
use tokio::sync::mpsc;

use super::client::{
    self as hsclient, DescCache, DescLocation, IntroFailure, OnionError, PowRetry,
};
use super::hsdir;
use super::intro::RendPoint;
use super::pow::PowSolution;
use super::solvers::PowSolvers;
use crate::circ::{Circuit, StreamEvent};
use crate::circmgr::CircMgr;
use crate::core::StreamTarget;
use crate::dir::DirView;
use crate::err::ClientError;
use crate::isolation::IsolationKey;
use crate::path::RelayInfo;
use crate::reactor::OnionEvent;
use crate::socks::wire::Target;
use crate::stream;

/// Longest one HSDir may take: circuit, BEGIN_DIR and the whole response.
pub const HSDIR_TIMEOUT: Duration = Duration::from_secs(20);
/// Most HSDirs asked for one descriptor.
pub const MAX_HSDIR_TRIES: usize = 6;
/// Longest a circuit and its answer (RENDEZVOUS_ESTABLISHED, INTRODUCE_ACK) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the wait for RENDEZVOUS2 after the introduction was acknowledged (the service
/// builds a circuit to our rendezvous point meanwhile).
pub const REND_TIMEOUT: Duration = Duration::from_secs(30);
/// Most rendezvous points tried for one attempt (a relay that cannot be reached, or refuses).
const MAX_REND_TRIES: usize = 3;
/// Most joined rendezvous circuits kept at once (the oldest idle one goes first).
pub const MAX_JOINED: usize = 64;
/// How often a kept rendezvous circuit is checked for idleness.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// The wait for RENDEZVOUS2 when the service asks for proof of work and another introduction
/// at a higher effort remains: a service under load serves costlier introductions first, so a
/// rendezvous that has not come by then is better asked for again with more work.
pub const REND_TIMEOUT_POW: Duration = Duration::from_secs(15);
/// Proof-of-work solvers running at once in the proxy (each holds a blocking thread).
pub const MAX_POW_SOLVERS: usize = 2;
/// Longest one proof of work may take, waiting for a solver included (the largest effort,
/// [`super::pow::MAX_CLIENT_EFFORT`], takes a few seconds on one core).
pub const SOLVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A kept rendezvous circuit.
struct Joined {
    circ: Arc<Circuit>,
    /// When it last carried a stream, or was joined.
    last_used: tokio::time::Instant,
}

type Key = (String, IsolationKey);

/// One connection attempt that others may wait for: the first to take the lock runs it and
/// leaves the outcome; a waiter that finds an outcome takes it instead of trying again. A
/// cancelled runner leaves none, and the next waiter runs the attempt itself.
#[derive(Default)]
struct Attempt {
    outcome: tokio::sync::Mutex<Option<Result<(), OnionError>>>,
}

/// The onion-service client state of a proxy: descriptors, kept rendezvous circuits and
/// attempts in progress.
pub(crate) struct OnionClient {
    descs: Mutex<DescCache>,
    joined: Arc<Mutex<HashMap<Key, Joined>>>,
    attempts: Mutex<HashMap<Key, Arc<Attempt>>>,
    /// Keys the isolation groups of the descriptor cache (per process, never shown).
    group_hasher: std::hash::RandomState,
    /// Proof-of-work solvers ([`MAX_POW_SOLVERS`], [`SOLVE_TIMEOUT`]).
    solvers: PowSolvers,
}

impl Default for OnionClient {
    fn default() -> Self {
        Self {
            descs: Mutex::default(),
            joined: Arc::default(),
            attempts: Mutex::default(),
            group_hasher: std::hash::RandomState::new(),
            solvers: PowSolvers::new(MAX_POW_SOLVERS, SOLVE_TIMEOUT),
        }
    }
}

impl std::fmt::Debug for OnionClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnionClient([redacted])")
    }
}

impl OnionClient {
    fn group(&self, iso: &IsolationKey) -> u64 {
        self.group_hasher.hash_one(iso)
    }

    fn kept(&self, key: &Key) -> Option<Arc<Circuit>> {
        let mut map = self.joined.lock().ok()?;
        match map.get_mut(key) {
            Some(j) if !j.circ.is_closed() => {
                j.last_used = now();
                Some(Arc::clone(&j.circ))
            }
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn forget(&self, key: &Key) {
        if let Ok(mut map) = self.joined.lock()
            && let Some(j) = map.remove(key)
        {
            j.circ.close_with_destroy();
        }
    }

    /// Keep `circ` for `key`; a task closes it once idle for `idle`.
    fn keep(&self, key: Key, circ: Arc<Circuit>, idle: Duration) {
        let Ok(mut map) = self.joined.lock() else {
            return;
        };
        if map.len() >= MAX_JOINED && !map.contains_key(&key) {
            // Drop the longest-unused one without streams (or, failing that, the oldest).
            let victim = map
                .iter()
                .filter(|(_, j)| j.circ.n_streams() == 0)
                .min_by_key(|(_, j)| j.last_used)
                .or_else(|| map.iter().min_by_key(|(_, j)| j.last_used))
                .map(|(k, _)| k.clone());
            if let Some(v) = victim
                && let Some(j) = map.remove(&v)
            {
                j.circ.close_with_destroy();
            }
        }
        let weak = Arc::downgrade(&circ);
        if let Some(old) = map.insert(
            key.clone(),
            Joined {
                circ,
                last_used: now(),
            },
        ) {
            old.circ.close_with_destroy();
        }
        drop(map);
        tokio::spawn(reap_when_idle(
            Arc::downgrade(&self.joined),
            key,
            weak,
            idle,
        ));
    }
}

/// Close the kept circuit of `key` (if it is still `circ`) once it carried no stream for
/// `idle`, or forget it once it is closed.
async fn reap_when_idle(
    map: Weak<Mutex<HashMap<Key, Joined>>>,
    key: Key,
    circ: Weak<Circuit>,
    idle: Duration,
) {
    loop {
        #[allow(clippy::disallowed_methods)] // the driver's idle check
        tokio::time::sleep(IDLE_CHECK.min(idle)).await;
        let (Some(map), Some(circ)) = (map.upgrade(), circ.upgrade()) else {
            return;
        };
        let Ok(mut m) = map.lock() else {
            return;
        };
        let Some(j) = m.get_mut(&key) else {
            return;
        };
        if !Arc::ptr_eq(&j.circ, &circ) {
            return;
        }
        if circ.is_closed() {
            m.remove(&key);
            return;
        }
        if circ.n_streams() > 0 {
            j.last_used = now();
        } else if now().saturating_duration_since(j.last_used) >= idle {
            m.remove(&key);
            circ.close_with_destroy();
            tracing::debug!("closed an idle onion-service rendezvous circuit");
            return;
        }
    }
}

fn now() -> tokio::time::Instant {
    #[allow(clippy::disallowed_methods)] // the driver is where time enters
    tokio::time::Instant::now()
}

fn unix_now() -> u64 {
    #[allow(clippy::disallowed_methods)] // descriptors are dated in wall-clock time
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Open a stream to port `port` of the onion service named `host` for a stream with isolation
/// key `iso`: on the kept rendezvous circuit if there is one, else after a new rendezvous.
/// `optimistic`: do not wait for CONNECTED. Returns the circuit, the stream id and its events.
/// A failure to reach the service is [`ClientError::Onion`]; a stream the service refused
/// keeps its END reason, as for an exit.
pub(crate) async fn open_stream(
    mgr: &CircMgr,
    host: &str,
    port: u16,
    iso: &IsolationKey,
    optimistic: bool,
) -> Result<(Arc<Circuit>, u16, mpsc::Receiver<StreamEvent>), ClientError> {
    let addr = HsAddress::parse(host)
        .map_err(|e| ClientError::Onion(OnionError::BadAddress(e.to_string())))?;
    if port == 0 {
        return Err(ClientError::Onion(OnionError::BadAddress(
            "port 0".to_owned(),
        )));
    }
    let key: Key = (addr.label(), iso.clone());
    let target = Target::Ip(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port));
    // A kept circuit may have died under us: then one fresh rendezvous.
    for _ in 0..2 {
        let circ = match mgr.onion.kept(&key) {
            Some(c) => c,
            None => joined_circuit(mgr, &addr, &key)
                .await
                .map_err(ClientError::Onion)?,
        };
        let opened = if optimistic {
            async {
                let begin = stream::wire_target(&target)?;
                let (sid, rx) = circ.open_stream(StreamTarget::Begin(begin)).await?;
                Ok::<_, ClientError>((sid.get(), rx))
            }
            .await
        } else {
            stream::connect(&circ, &target).await
        };
        match opened {
            Ok((sid, rx)) => return Ok((circ, sid, rx)),
            Err(e) if e.is_retriable() => mgr.onion.forget(&key),
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Onion(OnionError::RendFailed))
}

/// The joined rendezvous circuit for `key`, running or joining the attempt for it.
async fn joined_circuit(
    mgr: &CircMgr,
    addr: &HsAddress,
    key: &Key,
) -> Result<Arc<Circuit>, OnionError> {
    let attempt = {
        let mut map = mgr
            .onion
            .attempts
            .lock()
            .map_err(|_| OnionError::RendFailed)?;
        Arc::clone(map.entry(key.clone()).or_default())
    };
    let mut outcome = attempt.outcome.lock().await;
    if let Some(r) = outcome.as_ref() {
        // Someone else's attempt ended while we waited.
        r.clone()?;
        if let Some(c) = mgr.onion.kept(key) {
            return Ok(c);
        }
    }
    // Ours to run.
    mgr.metrics.onion.attempted();
    let started = now();
    let r = connect(mgr, addr, &key.1).await;
    match &r {
        Ok(c) => {
            mgr.metrics
                .onion
                .succeeded(now().saturating_duration_since(started).as_secs_f64());
            let idle = mgr.config().isolated_circuit_idle_timeout;
            mgr.onion.keep(key.clone(), Arc::clone(c), idle);
        }
        Err(e) => {
            mgr.metrics.onion.failed(e);
            tracing::info!("connecting to an onion service failed: {e}");
        }
    }
    *outcome = Some(r.as_ref().map(|_| ()).map_err(Clone::clone));
    drop(outcome);
    if let Ok(mut map) = mgr.onion.attempts.lock()
        && map.get(key).is_some_and(|a| Arc::ptr_eq(a, &attempt))
    {
        map.remove(key);
    }
    r
}

/// One whole connection attempt: descriptor, rendezvous point, introduction, join.
async fn connect(
    mgr: &CircMgr,
    addr: &HsAddress,
    iso: &IsolationKey,
) -> Result<Arc<Circuit>, OnionError> {
    let view = mgr.dir_view().map_err(|_| OnionError::DescNotFound)?;
    let group = mgr.onion.group(iso);
    let now_unix = unix_now();
    let loc = hsclient::descriptor_location(addr, &view.hs.period_params, now_unix)?;
    let cached = mgr
        .onion
        .descs
        .lock()
        .ok()
        .and_then(|c| c.get(addr, group, now_unix).cloned());
    let contents = match cached {
        Some(c) => c,
        None => {
            let (c, expires) = fetch_descriptor(mgr, &view, addr, &loc, now_unix).await?;
            if let Ok(mut cache) = mgr.onion.descs.lock() {
                cache.insert(addr, group, c.clone(), expires);
            }
            c
        }
    };
    let mut pow = PowRetry::new(&contents);
    loop {
        let (e, how) = match rendezvous(mgr, &view, &loc, &contents, &pow).await {
            Ok(c) => return Ok(c),
            Err(f) => f,
        };
        if let Some(how) = how
            && pow.after_failure(how)
        {
            mgr.metrics.onion.pow_retried();
            tracing::debug!(
                effort = pow.effort(),
                "introduction not served; introducing again with more proof of work"
            );
            continue;
        }
        if e == OnionError::IntroFailed
            && let Ok(mut cache) = mgr.onion.descs.lock()
        {
            // Perhaps the service moved its introduction points: fetch afresh next time.
            cache.remove(addr, group);
        }
        return Err(e);
    }
}

/// The proof of work for introduction point `which` at `pow`'s effort, solved by one of the
/// proxy's [`PowSolvers`]. `None`: no proof wanted, or none found in time (the introduction
/// then goes without one).
async fn solve(
    mgr: &CircMgr,
    contents: &HsDescContents,
    which: usize,
    pow: &PowRetry,
) -> Option<PowSolution> {
    if pow.effort() == 0 {
        return None;
    }
    let attempt = pow.attempt();
    let contents = contents.clone();
    let sol = mgr
        .onion
        .solvers
        .run(move |keep_going| hsclient::solve_pow_until(&contents, which, attempt, keep_going))
        .await;
    mgr.metrics.onion.pow_solved(sol.is_some());
    sol
}

/// The client-authorization key configured for `addr`, if any (read at each new connection,
/// so a key added to `onion_client_auth_dir` takes effect without a restart).
fn client_key(mgr: &CircMgr, addr: &HsAddress) -> Option<X25519Secret> {
    let dir = mgr.config().onion_client_auth_dir.clone()?;
    match super::keys::load_client_auth(&dir) {
        Ok(keys) => keys.into_iter().find(|(a, _)| a == addr).map(|(_, k)| k),
        Err(e) => {
            tracing::warn!("onion_client_auth_dir could not be read: {e}");
            None
        }
    }
}

/// Fetch and open the descriptor at `loc`; returns it and when the cached copy expires.
async fn fetch_descriptor(
    mgr: &CircMgr,
    view: &DirView,
    addr: &HsAddress,
    loc: &DescLocation,
    now_unix: u64,
) -> Result<(HsDescContents, u64), OnionError> {
    let ring = view.hsdir_ring(&loc.period);
    let order = {
        let mut rng = rand::rng();
        hsclient::fetch_order(&ring, loc, &view.hs.params, &mut rng)
    };
    let key = client_key(mgr, addr);
    let request = hsdir::fetch_request(&loc.blinded);
    let mut last = OnionError::DescNotFound;
    for id in order.iter().take(MAX_HSDIR_TRIES) {
        let Some(relay) = view.relay(id) else {
            continue;
        };
        let fetched = tokio::time::timeout(HSDIR_TIMEOUT, async {
            let circ = mgr
                .circuit_ending_at(relay)
                .await
                .map_err(|e| format!("no circuit to the HSDir: {e}"))?;
            crate::dirfetch::exchange(&circ, &request)
                .await
                .map_err(|e| format!("the fetch failed: {e}"))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
        let resp = match fetched {
            Ok(r) => r,
            Err(why) => {
                mgr.metrics.onion.desc_fetch(DescFetch::Failed);
                tracing::debug!("an HSDir fetch failed: {why}");
                continue;
            }
        };
        let bytes = match hsdir::fetch_response(&resp) {
            Ok(b) => b,
            Err(e) => {
                mgr.metrics.onion.desc_fetch(DescFetch::NotFound);
                last = e;
                continue;
            }
        };
        match hsclient::open_descriptor(loc, &bytes, now_unix, key.as_ref()) {
            Ok(contents) => {
                mgr.metrics.onion.desc_fetch(DescFetch::Found);
                return Ok((contents, cache_expiry(loc, &bytes, now_unix)));
            }
            // The descriptor verified under the service's blinded key: another HSDir's copy
            // would say the same.
            Err(e @ (OnionError::MissingClientAuth | OnionError::BadClientAuth)) => {
                mgr.metrics.onion.desc_fetch(DescFetch::Found);
                return Err(e);
            }
            Err(e) => {
                mgr.metrics.onion.desc_fetch(DescFetch::Invalid);
                tracing::debug!("an HSDir served an unusable descriptor: {e}");
                last = e;
            }
        }
    }
    Err(last)
}

/// Until when an opened descriptor may be used from the cache: its lifetime from now, within
/// its signing certificate.
fn cache_expiry(loc: &DescLocation, bytes: &[u8], now_unix: u64) -> u64 {
    UncheckedHsDesc::parse(bytes)
        .and_then(|d| d.check_for(&loc.blinded, now_unix))
        .map(|d| {
            now_unix
                .saturating_add(u64::from(d.lifetime_minutes()) * 60)
                .min(d.cert_expires())
        })
        .unwrap_or(now_unix)
}

/// Wait (at most `limit`) for the first onion-service message on `rx` that `pick` takes.
async fn wait_for<T>(
    rx: &mut mpsc::Receiver<OnionEvent>,
    limit: Duration,
    mut pick: impl FnMut(RelayMsg) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(limit, async {
        while let Some(ev) = rx.recv().await {
            if let OnionEvent::Msg(m) = ev
                && let Some(t) = pick(*m)
            {
                return Some(t);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// A random usable relay as rendezvous point (not `avoid`).
fn pick_rend_point<'a>(
    view: &'a DirView,
    avoid: &[allium_crypto::RelayId],
) -> Option<&'a RelayInfo> {
    let usable: Vec<&RelayInfo> = view
        .relays
        .iter()
        .filter(|r| r.usable() && !avoid.contains(&r.id))
        .collect();
    if usable.is_empty() {
        return None;
    }
    let i = rand::rng().random_range(0..usable.len());
    usable.get(i).copied()
}

/// Steps 2 to 4: a rendezvous point, the introduction (with the proof of work of `pow`'s
/// attempt), the join. A failure says how the introduction went, when it got that far.
async fn rendezvous(
    mgr: &CircMgr,
    view: &DirView,
    loc: &DescLocation,
    contents: &HsDescContents,
    pow: &PowRetry,
) -> Result<Arc<Circuit>, (OnionError, Option<IntroFailure>)> {
    // The rendezvous circuit, established.
    let mut tried = Vec::new();
    let mut rend = None;
    for _ in 0..MAX_REND_TRIES {
        let Some(rp) = pick_rend_point(view, &tried) else {
            break;
        };
        tried.push(rp.id);
        let cookie = hsclient::new_cookie();
        let established = tokio::time::timeout(STEP_TIMEOUT, async {
            let circ = mgr.circuit_ending_at(rp).await.ok()?;
            let mut rx = circ.onion_events().await.ok()?;
            circ.send_onion_service(RelayMsg::EstablishRendezvous(EstablishRendezvous {
                cookie,
            }))
            .await
            .ok()?;
            wait_for(&mut rx, STEP_TIMEOUT, |m| {
                matches!(m, RelayMsg::RendezvousEstablished(_)).then_some(())
            })
            .await?;
            Some((circ, rx))
        })
        .await
        .ok()
        .flatten();
        if let Some((circ, rx)) = established {
            let point = RendPoint {
                id: rp.id,
                onion_key: rp.onion_key,
                addrs: rp.addrs.clone(),
            };
            rend = Some((circ, rx, point, cookie));
            break;
        }
        tracing::debug!("a rendezvous point could not be established; trying another");
    }
    let (circ, mut rx, point, cookie) = rend.ok_or((OnionError::RendFailed, None))?;

    // Introduce through the introduction points, in a random order, until one acknowledges.
    let mut order: Vec<usize> = (0..contents.intro_points.len()).collect();
    {
        let mut rng = rand::rng();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
    }
    let mut pending = None;
    let mut refused = false;
    for which in order {
        let sol = solve(mgr, contents, which, pow).await;
        let intro = hsclient::start_introduction_pow(
            loc,
            contents,
            which,
            point.clone(),
            cookie,
            sol.as_ref(),
        )
        .map_err(|e| (e, None))?;
        let acked = tokio::time::timeout(STEP_TIMEOUT, async {
            let ic = mgr
                .circuit_ending_at_target(&intro.intro_point)
                .await
                .ok()?;
            let mut irx = ic.onion_events().await.ok()?;
            ic.send_onion_service(RelayMsg::Introduce1(intro.introduce1.clone()))
                .await
                .ok()?;
            let status = wait_for(&mut irx, STEP_TIMEOUT, |m| match m {
                RelayMsg::IntroduceAck(a) => Some(a.status),
                _ => None,
            })
            .await;
            // The introduction circuit is done with either way (dropped here).
            status
        })
        .await
        .ok()
        .flatten();
        match acked {
            Some(s) if s == IntroduceStatus::SUCCESS => {
                pending = Some(intro.pending);
                break;
            }
            Some(_) => {
                refused = true;
                tracing::debug!("an introduction point refused the introduction");
            }
            None => tracing::debug!("an introduction point did not answer"),
        }
    }
    let pending = pending.ok_or((
        OnionError::IntroFailed,
        Some(if refused {
            IntroFailure::Refused
        } else {
            IntroFailure::Unreachable
        }),
    ))?;

    // The service's RENDEZVOUS1, relayed as RENDEZVOUS2; sooner given up when a costlier
    // introduction may follow.
    let mut more = pow.clone();
    let wait = if more.after_failure(IntroFailure::NoRendezvous) {
        REND_TIMEOUT_POW
    } else {
        REND_TIMEOUT
    };
    let r2 = wait_for(&mut rx, wait, |m| match m {
        RelayMsg::Rendezvous2(r) => Some(r),
        _ => None,
    })
    .await
    .ok_or(if circ.is_closed() {
        (OnionError::RendFailed, None)
    } else {
        (OnionError::Timeout, Some(IntroFailure::NoRendezvous))
    })?;
    let keys = pending.finish(&r2).map_err(|e| (e, None))?;
    circ.add_end_to_end(keys, EndToEndRole::Client)
        .await
        .map_err(|_| (OnionError::RendFailed, None))?;
    Ok(circ)
}

/// How one HSDir fetch ended (`onion_descriptor_fetches_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DescFetch {
    /// A descriptor came back and verified.
    Found,
    /// The HSDir had none (or refused).
    NotFound,
    /// It served one that does not verify or decrypt.
    Invalid,
    /// No circuit, a broken stream, or a timeout.
    Failed,
}

impl DescFetch {
    /// Every value and its label.
    pub(crate) const ALL: [(Self, &'static str); 4] = [
        (Self::Found, "found"),
        (Self::NotFound, "not_found"),
        (Self::Invalid, "invalid"),
        (Self::Failed, "failed"),
    ];
}

/// The metrics label of a failed connection.
pub(crate) fn failure_label(e: &OnionError) -> &'static str {
    match e {
        OnionError::DescNotFound => "desc_not_found",
        OnionError::DescInvalid(_) => "desc_invalid",
        OnionError::MissingClientAuth => "missing_client_auth",
        OnionError::BadClientAuth => "bad_client_auth",
        OnionError::IntroFailed => "intro_failed",
        OnionError::RendFailed => "rend_failed",
        OnionError::BadAddress(_) => "bad_address",
        OnionError::Timeout => "timeout",
    }
}

/// Every failure label, in the order the metrics page lists them.
pub(crate) const FAILURE_LABELS: [&str; 8] = [
    "desc_not_found",
    "desc_invalid",
    "missing_client_auth",
    "bad_client_auth",
    "intro_failed",
    "rend_failed",
    "bad_address",
    "timeout",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_a_listed_label() {
        for e in [
            OnionError::DescNotFound,
            OnionError::DescInvalid(String::new()),
            OnionError::MissingClientAuth,
            OnionError::BadClientAuth,
            OnionError::IntroFailed,
            OnionError::RendFailed,
            OnionError::BadAddress(String::new()),
            OnionError::Timeout,
        ] {
            assert!(FAILURE_LABELS.contains(&failure_label(&e)), "{e:?}");
        }
    }
}
