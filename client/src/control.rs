//! The proxy's side of the control port: [`allium_control::ControlBackend`] over the circuit
//! manager, the traffic counters and the verified consensus.
//!
//! - Circuits and streams: [`Events`], fed as things happen. The circuit manager launches a
//!   [`CircTrack`] per build (`LAUNCHED`); the circuit's reactor reports each hop through
//!   [`BuildProgress`] (`EXTENDED` with the path so far, `BUILT`) and its end (`CLOSED`); a
//!   failed build is `FAILED` then `CLOSED` with Tor's reason. Every SOCKS, HTTP CONNECT and DNS
//!   port request is a [`StreamTrack`] (`NEW`/`NEWRESOLVE`, `SENTCONNECT`/`SENTRESOLVE` with its
//!   circuit, `SUCCEEDED` or `FAILED`, then `CLOSED`). `circuit-status` and `stream-status` list
//!   what is live. Paths are `$FP~nick` with nicknames from the consensus. Destinations are shown
//!   on the (local, authenticated) control port as Tor shows them, and never logged.
//! - Traffic: bytes of the Noise frames read from and written to guard links
//!   ([`allium_proto::channel::LinkBytes`], counted once per frame).
//! - The consensus (`ns/*`, nicknames): the verified copy the proxy keeps in its data directory,
//!   re-read and re-verified when the file changes.
//! - NEWNYM: [`crate::circmgr::CircMgr::newnym`]: no held circuit takes new streams.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allium_control::args::quote;
use allium_control::{
    Bootstrap, CircState, CircuitStatus, ConfOption, ControlBackend, EventBus, Now, OrConnStatus,
    Signal, StreamStatus, long_name,
};
use allium_crypto::RelayId;
use allium_directory::NetDir;
use allium_directory::client::{ConsensusCache, FetchRole};
use tokio::sync::watch;

use crate::circmgr::CircMgr;
use crate::config::ProxyConfig;

/// Tor's circuit-event reason for why a circuit failed or closed (control-spec §4.1.1).
pub(crate) fn circ_reason(e: &crate::err::CircError) -> &'static str {
    use crate::err::CircError as E;
    match e {
        E::Auth(_)
        | E::Handshake { .. }
        | E::Protocol(_)
        | E::Malformed { .. }
        | E::FlowControl { .. }
        | E::QueueOverflow => "TORPROTOCOL",
        E::Destroyed(_) | E::Truncated { .. } => "DESTROYED",
        E::BuildTimeout { .. } => "TIMEOUT",
        E::LinkClosed => "OR_CONN_CLOSED",
        E::ClosedByClient | E::Closed => "FINISHED",
        _ => "INTERNAL",
    }
}

/// Tor's circuit-event reason for a failed build.
pub(crate) fn build_failure_reason(e: &crate::ClientError) -> &'static str {
    use crate::ClientError as E;
    match e {
        E::Circuit(c) => circ_reason(c),
        E::Link(_) | E::NoGuardAddress => "CONNECTFAILED",
        E::Timeout(_) => "TIMEOUT",
        E::NoPath(_) | E::NoExitForPort(_) => "NOPATH",
        E::Shutdown => "REQUESTED",
        _ => "INTERNAL",
    }
}

/// The wall-clock time for `TIME_CREATED`.
#[allow(clippy::disallowed_methods)] // a timestamp shown to controllers, taken where a build starts
fn wall_now() -> SystemTime {
    SystemTime::now()
}

/// The proxy's live circuits and streams as the control port shows them, and the bus their
/// events go out on. Always kept (a few map entries per circuit and stream); events are only
/// formatted while a controller listens.
#[derive(Default)]
pub(crate) struct Events {
    bus: EventBus,
    next_circ: AtomicU64,
    next_stream: AtomicU64,
    /// Live circuits with their hops and how many are built (paths are named when read).
    circs: Mutex<BTreeMap<u64, LiveCirc>>,
    streams: Mutex<BTreeMap<u64, StreamStatus>>,
    /// `$FP~nick` for a relay (set by the control backend, which holds the consensus).
    namer: OnceLock<Namer>,
}

/// A live circuit: its status, its hops, and how many of them are built.
type LiveCirc = (CircuitStatus, [RelayId; 3], usize);

/// Names a relay as `$FP~nick`.
type Namer = Box<dyn Fn(&RelayId) -> String + Send + Sync>;

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    fn name(&self, id: &RelayId) -> String {
        match self.namer.get() {
            Some(n) => n(id),
            None => long_name(id, None),
        }
    }

    /// The bus controllers subscribe to.
    pub(crate) fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// A circuit build starts along `hops` (guard first): `LAUNCHED`.
    pub(crate) fn launch(self: &Arc<Self>, hops: [RelayId; 3]) -> Arc<CircTrack> {
        let id = self.next_circ.fetch_add(1, Ordering::Relaxed) + 1;
        let status = CircuitStatus {
            id,
            state: CircState::Launched,
            path: Vec::new(),
            build_flags: vec!["NEED_CAPACITY"],
            purpose: "GENERAL",
            created: wall_now(),
        };
        if self.bus.has_listeners() {
            self.bus
                .publish("CIRC", format!("CIRC {}", status.line(CircState::Launched)));
        }
        if let Ok(mut m) = self.circs.lock() {
            m.insert(id, (status, hops, 0));
        }
        Arc::new(CircTrack {
            events: Arc::clone(self),
            id,
            hops,
            state: Mutex::new(Track::Building(0)),
        })
    }

    /// Record circuit `id`'s new state and path, and publish the event (with ` REASON=..`).
    fn circ_event(
        &self,
        id: u64,
        state: CircState,
        path_len: usize,
        hops: &[RelayId; 3],
        reason: Option<&str>,
    ) {
        let mut m = self.circs.lock().unwrap_or_else(|p| p.into_inner());
        let Some((c, _, built)) = m.get_mut(&id) else {
            return;
        };
        c.state = state;
        c.path = hops.iter().take(path_len).map(|h| self.name(h)).collect();
        *built = path_len;
        let mut line = format!("CIRC {}", c.line(state));
        if state == CircState::Closed {
            m.remove(&id);
        }
        drop(m);
        if let Some(r) = reason {
            line.push_str(" REASON=");
            line.push_str(r);
        }
        if self.bus.has_listeners() {
            self.bus.publish("CIRC", line);
        }
    }

    /// Live circuits, oldest first (`circuit-status`).
    pub(crate) fn circuits(&self) -> Vec<CircuitStatus> {
        let live: Vec<_> = self
            .circs
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        // Named now: nicknames come from the consensus held now (a circuit may predate it).
        live.into_iter()
            .map(|(mut c, hops, built)| {
                c.path = hops.iter().take(built).map(|h| self.name(h)).collect();
                c
            })
            .collect()
    }

    /// Live streams, oldest first (`stream-status`).
    pub(crate) fn streams(&self) -> Vec<StreamStatus> {
        self.streams
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn stream_event(&self, s: &StreamStatus, purpose: &str, reason: Option<&str>) {
        if !self.bus.has_listeners() {
            return;
        }
        let mut line = format!("STREAM {}", s.line());
        if let Some(r) = reason {
            line.push_str(" REASON=");
            line.push_str(r);
        }
        line.push_str(" PURPOSE=");
        line.push_str(purpose);
        self.bus.publish("STREAM", line);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Track {
    /// Hops added so far.
    Building(usize),
    Built,
    /// FAILED or CLOSED was published.
    Done,
}

/// One circuit's control-port life, from launch to close.
pub(crate) struct CircTrack {
    events: Arc<Events>,
    id: u64,
    hops: [RelayId; 3],
    state: Mutex<Track>,
}

impl std::fmt::Debug for CircTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircTrack")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CircTrack {
    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` hops are built: `EXTENDED` with the path so far, or `BUILT` at the last one.
    fn hops_done(&self, n: usize) {
        let mut st = self.lock();
        let Track::Building(k) = *st else {
            return;
        };
        if n <= k {
            return;
        }
        if n >= self.hops.len() {
            *st = Track::Built;
            drop(st);
            self.events
                .circ_event(self.id, CircState::Built, self.hops.len(), &self.hops, None);
        } else {
            *st = Track::Building(n);
            drop(st);
            self.events
                .circ_event(self.id, CircState::Extended, n, &self.hops, None);
        }
    }

    /// The build failed: `FAILED`, then `CLOSED`, both with `reason`.
    pub(crate) fn failed(&self, reason: &str) {
        let mut st = self.lock();
        let Track::Building(k) = *st else {
            return;
        };
        *st = Track::Done;
        drop(st);
        for state in [CircState::Failed, CircState::Closed] {
            self.events
                .circ_event(self.id, state, k, &self.hops, Some(reason));
        }
    }

    /// The circuit's reactor ended: `CLOSED` if it was built (a build that fails is reported by
    /// [`CircTrack::failed`] with the builder's reason).
    fn closed(&self, reason: &str) {
        let mut st = self.lock();
        if *st != Track::Built {
            return;
        }
        *st = Track::Done;
        drop(st);
        self.events.circ_event(
            self.id,
            CircState::Closed,
            self.hops.len(),
            &self.hops,
            Some(reason),
        );
    }
}

impl Drop for CircTrack {
    fn drop(&mut self) {
        // Nobody reported the end (a build abandoned by its caller): report it now.
        let st = *self.lock();
        match st {
            Track::Done => {}
            Track::Built => self.closed("FINISHED"),
            Track::Building(_) => self.failed("REQUESTED"),
        }
    }
}

/// How far a circuit build got: the index of the hop being added (0 guard, 1 middle, 2 exit; 3
/// when built), read by the circuit manager to tell which relay failed, and, for circuits the
/// manager builds, reported to the control port as it happens ([`CircTrack`]).
#[derive(Debug, Default)]
pub(crate) struct BuildProgress {
    hops: AtomicUsize,
    track: Option<Arc<CircTrack>>,
}

impl BuildProgress {
    /// Progress reported to the control port as circuit `track`.
    pub(crate) fn tracked(track: Arc<CircTrack>) -> Self {
        Self {
            hops: AtomicUsize::new(0),
            track: Some(track),
        }
    }

    /// `n` hops are built.
    pub(crate) fn store(&self, n: usize, order: Ordering) {
        self.hops.store(n, order);
        if let Some(t) = &self.track {
            t.hops_done(n);
        }
    }

    /// Hops built so far.
    pub(crate) fn load(&self, order: Ordering) -> usize {
        self.hops.load(order)
    }

    /// The circuit ended (its reactor stopped) for `reason` (Tor's word).
    pub(crate) fn closed(&self, reason: &str) {
        if let Some(t) = &self.track {
            t.closed(reason);
        }
    }

    /// The circuit's control id (0 for circuits the control port does not list).
    pub(crate) fn control_id(&self) -> u64 {
        self.track.as_ref().map_or(0, |t| t.id)
    }
}

/// Tor's stream-event reason for a failed request.
pub(crate) fn stream_reason(f: &crate::socks::server::Failure) -> &'static str {
    use crate::socks::server::Failure as F;
    use crate::socks::wire::reply;
    match f {
        F::NoExit { .. } => "EXITPOLICY",
        F::NoCircuit(_) => "NOROUTE",
        F::Stream(reply::HOST_UNREACHABLE) | F::NoAddress => "RESOLVEFAILED",
        F::Stream(reply::CONNECTION_REFUSED) => "CONNECTREFUSED",
        F::Stream(reply::NOT_ALLOWED) => "EXITPOLICY",
        F::Stream(reply::TTL_EXPIRED) | F::TimedOut => "TIMEOUT",
        F::Exhausted => "DESTROY",
        F::Stream(_) => "MISC",
        F::Onion(crate::onion::OnionError::Timeout) => "TIMEOUT",
        F::Onion(_) => "NOROUTE",
    }
}

/// A target as the control port shows it: `host:port` (IPv6 in brackets; a resolve has port
/// 0). Any character a control line cannot carry (space, control characters, non-ASCII) becomes
/// `?`, so a hostile host name cannot forge event lines.
pub(crate) fn control_target(t: &crate::socks::wire::Target) -> String {
    printable(&t.to_begin_string())
}

/// `s` with every character but printable ASCII replaced by `?`.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// One application stream (SOCKS CONNECT or RESOLVE, HTTP CONNECT, DNS port query) as the
/// control port shows it: `NEW` when created, then the steps; `CLOSED` when dropped.
pub(crate) struct StreamTrack {
    events: Arc<Events>,
    status: StreamStatus,
    purpose: &'static str,
    reason: Option<&'static str>,
}

impl std::fmt::Debug for StreamTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The target is left out: Debug output may reach a log.
        f.debug_struct("StreamTrack")
            .field("id", &self.status.id)
            .field("status", &self.status.status)
            .finish_non_exhaustive()
    }
}

impl StreamTrack {
    /// A new stream to `target` (`host:port`; a resolve has port 0): `NEW` or `NEWRESOLVE`.
    pub(crate) fn new(events: &Arc<Events>, target: String, resolve: bool) -> Self {
        let id = events.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let t = Self {
            events: Arc::clone(events),
            status: StreamStatus {
                id,
                status: if resolve { "NEWRESOLVE" } else { "NEW" },
                circ_id: 0,
                target,
            },
            purpose: if resolve { "DNS_REQUEST" } else { "USER" },
            reason: None,
        };
        t.publish();
        t
    }

    fn publish(&self) {
        if let Ok(mut m) = self.events.streams.lock() {
            m.insert(self.status.id, self.status.clone());
        }
        self.events
            .stream_event(&self.status, self.purpose, self.reason);
    }

    /// The request went out on circuit `circ` (control id): `SENTCONNECT` or `SENTRESOLVE`.
    pub(crate) fn sent(&mut self, circ: u64) {
        self.status.circ_id = circ;
        self.status.status = if self.purpose == "DNS_REQUEST" {
            "SENTRESOLVE"
        } else {
            "SENTCONNECT"
        };
        self.publish();
    }

    /// The exit connected (or resolved): `SUCCEEDED`.
    pub(crate) fn succeeded(&mut self) {
        self.status.status = "SUCCEEDED";
        self.publish();
    }

    /// The request failed for `reason` (Tor's word): `FAILED`; `CLOSED` follows on drop.
    pub(crate) fn failed(&mut self, reason: &'static str) {
        self.status.status = "FAILED";
        self.reason = Some(reason);
        self.publish();
    }
}

impl Drop for StreamTrack {
    fn drop(&mut self) {
        if let Ok(mut m) = self.events.streams.lock() {
            m.remove(&self.status.id);
        }
        self.status.status = "CLOSED";
        let reason = self.reason.unwrap_or("DONE");
        self.events
            .stream_event(&self.status, self.purpose, Some(reason));
    }
}

#[derive(Default)]
struct Ids {
    next: u64,
    links: HashMap<RelayId, u64>,
}

/// The verified consensus as last read from the data directory.
struct Consensus {
    modified: SystemTime,
    netdir: Arc<NetDir>,
}

/// The proxy's control backend.
pub(crate) struct ProxyControl {
    mgr: Arc<CircMgr>,
    socks_addr: SocketAddr,
    ready: watch::Receiver<bool>,
    ids: Mutex<Ids>,
    disk: Arc<DiskConsensus>,
}

/// The verified consensus in the proxy's data directory, re-read when the file changes.
struct DiskConsensus {
    cfg: Arc<ProxyConfig>,
    cur: Mutex<Option<Consensus>>,
}

impl DiskConsensus {
    /// The verified consensus on disk, if valid at `wall`.
    fn netdir(&self, wall: SystemTime) -> Option<Arc<NetDir>> {
        let path = self.cfg.data_dir.join(crate::dir::CACHE_FILE);
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        let mut g = self.cur.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref()
            && c.modified == modified
            && c.netdir.valid_until() > unix(wall)
        {
            return Some(Arc::clone(&c.netdir));
        }
        let cache = ConsensusCache::open(
            Some(&path),
            self.cfg.authorities.clone(),
            FetchRole::Client,
            unix(wall),
        );
        let nd = Arc::new(cache.netdir(unix(wall))?);
        *g = Some(Consensus {
            modified,
            netdir: Arc::clone(&nd),
        });
        Some(nd)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn one(s: impl ToString) -> Vec<String> {
    vec![s.to_string()]
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s}")
    }
}

impl ProxyControl {
    pub(crate) fn new(
        mgr: Arc<CircMgr>,
        cfg: Arc<ProxyConfig>,
        socks_addr: SocketAddr,
        ready: watch::Receiver<bool>,
    ) -> Self {
        let disk = Arc::new(DiskConsensus {
            cfg,
            cur: Mutex::new(None),
        });
        let names = Arc::clone(&disk);
        // Events name relays as they happen, with the consensus held then.
        let _ = mgr.control.namer.set(Box::new(move |id: &RelayId| {
            let nd = names.netdir(wall_now());
            long_name(
                id,
                nd.as_deref()
                    .and_then(|n| n.by_id(id))
                    .map(|e| e.nickname.as_str()),
            )
        }));
        Self {
            mgr,
            socks_addr,
            ready,
            ids: Mutex::new(Ids::default()),
            disk,
        }
    }

    /// The verified consensus the proxy holds on disk, if valid at `now`.
    fn netdir(&self, now: &Now) -> Option<Arc<NetDir>> {
        self.disk.netdir(now.wall)
    }

    fn name(&self, nd: Option<&NetDir>, id: &RelayId) -> String {
        let nick = nd.and_then(|n| n.by_id(id)).map(|e| e.nickname.as_str());
        long_name(id, nick)
    }

    fn ns(&self, key: &str, now: &Now) -> Option<Result<String, String>> {
        let rest = key.strip_prefix("ns/")?;
        let Some(nd) = self.netdir(now) else {
            return Some(Err("no verified consensus yet".into()));
        };
        allium_control::ns_lookup(&nd, rest)
    }
}

impl ControlBackend for ProxyControl {
    fn role(&self) -> &'static str {
        "proxy"
    }

    fn getinfo(&self, key: &str, now: &Now) -> Option<Result<String, String>> {
        match key {
            "net/listeners/socks" => Some(Ok(quote(&self.socks_addr.to_string()))),
            "net/listeners/or" | "net/listeners/dir" => Some(Ok(String::new())),
            "fingerprint" => Some(Err("not running as a relay".into())),
            "exit-policy/full" => Some(Ok("reject *:*".into())),
            k if k.starts_with("ns/") => self.ns(k, now),
            _ => None,
        }
    }

    fn info_names(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("net/listeners/socks", "Bound addresses by type: SOCKS."),
            (
                "net/listeners/or",
                "Bound addresses by type: OR port (none at a proxy).",
            ),
            (
                "net/listeners/dir",
                "Bound addresses by type: directory (none at a proxy).",
            ),
            (
                "fingerprint",
                "Fingerprint (an error: a proxy is not a relay).",
            ),
            ("exit-policy/full", "Exit policy (a proxy exits nowhere)."),
            (
                "ns/all",
                "Router status info (v3 directory style) for all relays in the consensus.",
            ),
            (
                "ns/id/*",
                "Router status info (v3 directory style) for a relay by fingerprint.",
            ),
            (
                "ns/name/*",
                "Router status info (v3 directory style) for a relay by nickname.",
            ),
        ]
    }

    fn options(&self) -> Vec<ConfOption> {
        // The configuration as last reloaded (SIGHUP or SETCONF), so GETCONF shows what runs.
        let live = self.mgr.config();
        let c = &*live;
        let d = ProxyConfig::default();
        let opt = |name, allium_key, kind, values: Vec<String>, defaults: Vec<String>| ConfOption {
            name,
            allium_key,
            kind,
            values,
            defaults,
        };
        vec![
            opt(
                "SocksPort",
                "socks_listen",
                "LineList",
                one(self.socks_addr),
                one(d.socks_listen),
            ),
            opt(
                "DataDirectory",
                "data_dir",
                "Filename",
                one(c.data_dir.display()),
                one(d.data_dir.display()),
            ),
            opt(
                "CircuitBuildTimeout",
                "circuit_build_timeout",
                "Interval",
                one(secs(c.circuit_build_timeout)),
                one(secs(d.circuit_build_timeout)),
            ),
            opt(
                "MaxCircuitDirtiness",
                "max_circuit_dirtiness",
                "Interval",
                one(secs(c.max_circuit_dirtiness)),
                one(secs(d.max_circuit_dirtiness)),
            ),
            opt(
                "NumPrimaryGuards",
                "primary_guards",
                "Integer",
                one(c.primary_guards),
                one(d.primary_guards),
            ),
            opt(
                "TestingTorNetwork",
                "test_network",
                "Boolean",
                one(u8::from(c.test_network)),
                one(0),
            ),
            opt(
                "PrebuiltCircuits",
                "prebuilt_circuits",
                "Integer",
                one(c.prebuilt_circuits),
                one(d.prebuilt_circuits),
            ),
            opt(
                "MaxSocksConnections",
                "max_socks_connections",
                "Integer",
                one(c.max_socks_connections),
                one(d.max_socks_connections),
            ),
            opt(
                "SocksHandshakeTimeout",
                "socks_handshake_timeout",
                "Interval",
                one(secs(c.socks_handshake_timeout)),
                one(secs(d.socks_handshake_timeout)),
            ),
            opt(
                "ControlPort",
                "control_port",
                "LineList",
                c.control_port.iter().map(ToString::to_string).collect(),
                vec![],
            ),
            opt(
                "ControlSocket",
                "control_socket",
                "LineList",
                c.control_socket
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                vec![],
            ),
            opt(
                "CookieAuthentication",
                "cookie_authentication",
                "Boolean",
                one(u8::from(c.cookie_authentication)),
                one(0),
            ),
            opt(
                "HashedControlPassword",
                "hashed_control_password",
                "LineList",
                c.hashed_control_password.clone(),
                vec![],
            ),
        ]
    }

    fn set_options(&self, changes: &[(&'static str, Vec<String>)]) -> Result<(), String> {
        let options = self.options();
        for (name, values) in changes {
            let Some(o) = options.iter().find(|o| o.name == *name) else {
                return Err(format!("{name} is not an option"));
            };
            let wanted = if values.is_empty() {
                &o.defaults
            } else {
                values
            };
            if *wanted != o.values {
                return Err(format!(
                    "{name} cannot be changed while the proxy runs; edit `{}` in the configuration \
                     file and restart",
                    o.allium_key
                ));
            }
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> Result<(), String> {
        match signal {
            Signal::NewNym => {
                self.mgr.newnym();
                tracing::info!("NEWNYM: new streams will use fresh circuits");
                Ok(())
            }
            Signal::Heartbeat => {
                tracing::info!(
                    "heartbeat: {} circuits held, {} bytes read, {} bytes written, ready: {}",
                    self.mgr.n_circuits(),
                    self.mgr.link_bytes.read(),
                    self.mgr.link_bytes.written(),
                    *self.ready.borrow()
                );
                Ok(())
            }
            // The proxy keeps no DNS cache (exits resolve), and is never dormant.
            Signal::ClearDnsCache | Signal::Active | Signal::Dormant => Ok(()),
            other => Err(format!(
                "signal {} is handled by the control driver",
                other.name()
            )),
        }
    }

    fn traffic(&self) -> (u64, u64) {
        (self.mgr.link_bytes.read(), self.mgr.link_bytes.written())
    }

    fn circuits(&self, _now: &Now) -> Vec<CircuitStatus> {
        self.mgr.control.circuits()
    }

    fn streams(&self, _now: &Now) -> Vec<StreamStatus> {
        self.mgr.control.streams()
    }

    fn events(&self) -> Option<&EventBus> {
        Some(self.mgr.control.bus())
    }

    fn orconns(&self, now: &Now) -> Vec<OrConnStatus> {
        let circs = self.mgr.control_circuits();
        let nd = self.netdir(now);
        let mut guards: Vec<(RelayId, u64)> = Vec::new();
        for c in &circs {
            match guards.iter_mut().find(|(g, _)| *g == c.hops[0]) {
                Some(e) => e.1 += 1,
                None => guards.push((c.hops[0], 1)),
            }
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let ids = &mut *ids;
        ids.links.retain(|g, _| guards.iter().any(|(x, _)| x == g));
        guards
            .into_iter()
            .map(|(g, n)| {
                let id = *ids.links.entry(g).or_insert_with(|| {
                    ids.next += 1;
                    ids.next
                });
                OrConnStatus {
                    id,
                    peer: self.name(nd.as_deref(), &g),
                    n_circs: Some(n),
                }
            })
            .collect()
    }

    fn bootstrap(&self) -> Bootstrap {
        if *self.ready.borrow() {
            Bootstrap {
                progress: 100,
                tag: "done",
                summary: "Done",
            }
        } else if self.mgr.has_dir() {
            Bootstrap {
                progress: 90,
                tag: "circuit_create",
                summary: "Establishing a Tor circuit",
            }
        } else {
            Bootstrap {
                progress: 20,
                tag: "requesting_status",
                summary: "Asking for networkstatus consensus",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(
        rx: &mut tokio::sync::broadcast::Receiver<Arc<allium_control::Event>>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e.body.clone());
        }
        out
    }

    fn state_and_tail(line: &str) -> (String, String) {
        let mut f = line.split(' ');
        let _ = (f.next(), f.next());
        let state = f.next().unwrap_or("").to_owned();
        (state, f.collect::<Vec<_>>().join(" "))
    }

    #[test]
    fn circuit_events_follow_the_build() {
        let ev = Arc::new(Events::default());
        let mut rx = ev.bus().subscribe();
        let hops = [RelayId([1; 32]), RelayId([2; 32]), RelayId([3; 32])];
        let fp = |i: usize| long_name(&hops[i], None);
        // Built, then closed by its reactor.
        let t = ev.launch(hops);
        let p = BuildProgress::tracked(Arc::clone(&t));
        assert_eq!(p.control_id(), 1);
        assert_eq!(ev.circuits()[0].state, CircState::Launched);
        p.store(0, Ordering::Release);
        p.store(1, Ordering::Release);
        p.store(1, Ordering::Release);
        p.store(2, Ordering::Release);
        assert_eq!(ev.circuits()[0].path.len(), 2);
        p.store(3, Ordering::Release);
        assert_eq!(ev.circuits()[0].state, CircState::Built);
        p.closed("DESTROYED");
        assert!(ev.circuits().is_empty());
        let got: Vec<(String, String)> =
            bodies(&mut rx).iter().map(|l| state_and_tail(l)).collect();
        let states: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            states,
            ["LAUNCHED", "EXTENDED", "EXTENDED", "BUILT", "CLOSED"]
        );
        assert!(
            got[0]
                .1
                .starts_with("BUILD_FLAGS=NEED_CAPACITY PURPOSE=GENERAL")
        );
        assert!(got[1].1.starts_with(&format!("{} BUILD_FLAGS", fp(0))));
        assert!(got[2].1.starts_with(&format!("{},{} BUILD", fp(0), fp(1))));
        assert!(
            got[3]
                .1
                .starts_with(&format!("{},{},{} BUILD", fp(0), fp(1), fp(2)))
        );
        assert!(got[4].1.ends_with(" REASON=DESTROYED"));
        drop(p);
        drop(t);
        assert!(bodies(&mut rx).is_empty(), "reported once");

        // A build that fails at the middle: FAILED then CLOSED, with the reason, once.
        let t = ev.launch(hops);
        let p = BuildProgress::tracked(Arc::clone(&t));
        p.store(1, Ordering::Release);
        p.closed("FINISHED"); // the reactor stopped first: left to the manager
        t.failed("TIMEOUT");
        t.failed("TIMEOUT");
        drop(p);
        drop(t);
        let got: Vec<(String, String)> =
            bodies(&mut rx).iter().map(|l| state_and_tail(l)).collect();
        let states: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(states, ["LAUNCHED", "EXTENDED", "FAILED", "CLOSED"]);
        assert!(got[2].1.starts_with(&format!("{} BUILD", fp(0))));
        assert!(got[2].1.ends_with(" REASON=TIMEOUT") && got[3].1.ends_with(" REASON=TIMEOUT"));

        // A build abandoned by its caller is still reported when the last handle goes.
        let t = ev.launch(hops);
        drop(t);
        let states: Vec<String> = bodies(&mut rx)
            .iter()
            .map(|l| state_and_tail(l).0)
            .collect();
        assert_eq!(states, ["LAUNCHED", "FAILED", "CLOSED"]);
        assert!(ev.circuits().is_empty());
    }

    #[test]
    fn stream_events_and_status() {
        let ev = Arc::new(Events::default());
        let mut rx = ev.bus().subscribe();
        let target = crate::socks::wire::Target::Host("example.com".into(), 443);
        let mut s = StreamTrack::new(&ev, control_target(&target), false);
        s.sent(7);
        assert_eq!(ev.streams()[0].line(), "1 SENTCONNECT 7 example.com:443");
        s.succeeded();
        drop(s);
        assert!(ev.streams().is_empty());
        let mut r = StreamTrack::new(&ev, format!("{}:0", printable("bad\r\n650 CIRC")), true);
        r.failed("RESOLVEFAILED");
        drop(r);
        assert_eq!(
            bodies(&mut rx),
            [
                "STREAM 1 NEW 0 example.com:443 PURPOSE=USER",
                "STREAM 1 SENTCONNECT 7 example.com:443 PURPOSE=USER",
                "STREAM 1 SUCCEEDED 7 example.com:443 PURPOSE=USER",
                "STREAM 1 CLOSED 7 example.com:443 REASON=DONE PURPOSE=USER",
                "STREAM 2 NEWRESOLVE 0 bad??650?CIRC:0 PURPOSE=DNS_REQUEST",
                "STREAM 2 FAILED 0 bad??650?CIRC:0 REASON=RESOLVEFAILED PURPOSE=DNS_REQUEST",
                "STREAM 2 CLOSED 0 bad??650?CIRC:0 REASON=RESOLVEFAILED PURPOSE=DNS_REQUEST",
            ]
        );
        assert_eq!(printable("a b\r\nc\u{e9}"), "a?b??c?");
    }

    #[test]
    fn durations_and_names() {
        assert_eq!(secs(Duration::from_secs(600)), "600");
        assert_eq!(secs(Duration::from_millis(2500)), "2.5");
        assert_eq!(allium_control::fingerprint(&RelayId([1; 32])).len(), 40);
    }
}
