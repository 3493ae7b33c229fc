//! State shared by every task of one relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public};
use allium_directory::NetDir;
use allium_directory::dircache::{ArchiveConfig, DirArchive};
use allium_proto::channel;
use tokio::sync::{Notify, watch};

use crate::config::RelayConfig;
use crate::keys::RelayKeys;
use crate::link::{CellSink, CellSource, Link};
use crate::policy::ExitPolicy;
use crate::ratelimit::TokenBucket;
use crate::resolver::Resolver;

/// Counters for the descriptor's observed bandwidth and for tests.
#[derive(Debug, Default)]
pub struct Stats {
    read: AtomicU64,
    written: AtomicU64,
    circuits: AtomicU64,
    circuits_total: AtomicU64,
    queue_overflows: AtomicU64,
    blocked_destroys: AtomicU64,
    creates_dropped: AtomicU64,
    violations: AtomicU64,
    /// CREATEs refused because their link carried `max_circuits_per_link` circuits.
    link_cap_refusals: AtomicU64,
    /// Refusals of the DoS subsystem, by reason.
    pub(crate) dos: crate::dos::Rejections,
    dir_open: AtomicU64,
    dir_served: AtomicU64,
    dir_refused: AtomicU64,
    dir_bytes: AtomicU64,
    /// Circuit SENDMEs an exit withheld because the circuit's streams held more than
    /// `dos.exit_circuit_queue_cells` unwritten cells.
    sendmes_withheld: AtomicU64,
    /// Times a client link's reader paused because its refused CREATEs outran
    /// `dos.link_refusal_rate`.
    link_pauses: AtomicU64,
    /// Circuits open now that are scheduled under their client address's group on their next
    /// link (`allium_proto::circmux` groups).
    grouped: AtomicU64,
}

impl Stats {
    pub(crate) fn note_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn note_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn circuit_opened(&self) {
        self.circuits.fetch_add(1, Ordering::Relaxed);
        self.circuits_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn grouped_circuit_opened(&self) {
        self.grouped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn grouped_circuit_closed(&self) {
        let _ = self
            .grouped
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
    }
    pub(crate) fn circuit_closed(&self) {
        let _ = self
            .circuits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
    }
    pub(crate) fn note_link_paused(&self) {
        self.link_pauses.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn note_sendmes_withheld(&self, n: u64) {
        self.sendmes_withheld.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn note_queue_overflow(&self) {
        self.queue_overflows.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn note_blocked_destroy(&self) {
        self.blocked_destroys.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn note_create_dropped(&self) {
        self.creates_dropped.fetch_add(1, Ordering::Relaxed);
    }
    /// A CREATE was refused because its link is at `max_circuits_per_link`; true the first
    /// time (the caller logs it once).
    pub(crate) fn note_link_circuit_cap(&self) -> bool {
        self.link_cap_refusals.fetch_add(1, Ordering::Relaxed) == 0
    }
    /// CREATEs refused (RESOURCELIMIT) because their link carried `max_circuits_per_link`
    /// circuits (also counted in [`Stats::creates_dropped`]).
    pub fn link_circuit_cap_refusals(&self) -> u64 {
        self.link_cap_refusals.load(Ordering::Relaxed)
    }
    pub(crate) fn note_violation(&self) {
        self.violations.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dir_stream_opened(&self) {
        self.dir_open.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dir_stream_closed(&self) {
        let _ = self
            .dir_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
    }
    pub(crate) fn note_dir_served(&self, bytes: u64) {
        self.dir_served.fetch_add(1, Ordering::Relaxed);
        self.dir_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn note_dir_refused(&self) {
        self.dir_refused.fetch_add(1, Ordering::Relaxed);
    }
    /// Directory (BEGIN_DIR) streams open now.
    pub fn dir_streams_open(&self) -> u64 {
        self.dir_open.load(Ordering::Relaxed)
    }
    /// Directory requests answered in full since start.
    pub fn dir_requests_served(&self) -> u64 {
        self.dir_served.load(Ordering::Relaxed)
    }
    /// Directory streams refused (limits, or `dir_cache = false`), cut for a request that was
    /// too long, or timed out waiting for one.
    pub fn dir_streams_refused(&self) -> u64 {
        self.dir_refused.load(Ordering::Relaxed)
    }
    /// Bytes of directory responses (head and body) served since start.
    pub fn dir_bytes_served(&self) -> u64 {
        self.dir_bytes.load(Ordering::Relaxed)
    }
    /// Circuits destroyed because their inbound queue overflowed (the peer sent beyond its
    /// windows, or the circuit was stalled).
    pub fn queue_overflows(&self) -> u64 {
        self.queue_overflows.load(Ordering::Relaxed)
    }
    /// Circuits destroyed because the link they write to stayed full past the cap.
    pub fn blocked_destroys(&self) -> u64 {
        self.blocked_destroys.load(Ordering::Relaxed)
    }
    /// CREATEs refused with RESOURCELIMIT because the handshake queue was full or they waited
    /// too long in it.
    pub fn creates_dropped(&self) -> u64 {
        self.creates_dropped.load(Ordering::Relaxed)
    }
    /// Pauses of client links' readers for refused CREATEs past `dos.link_refusal_rate`.
    pub fn link_pauses(&self) -> u64 {
        self.link_pauses.load(Ordering::Relaxed)
    }
    /// Circuit SENDMEs withheld at this exit (`dos.exit_circuit_queue_cells`).
    pub fn sendmes_withheld(&self) -> u64 {
        self.sendmes_withheld.load(Ordering::Relaxed)
    }
    /// Circuits destroyed for a protocol violation (bad tag, window, RELAY_EARLY, ...).
    pub fn protocol_violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }
    /// Connections, CREATEs and circuits refused or closed by the DoS subsystem for `reason`.
    pub fn dos_rejections(&self, reason: crate::dos::Refusal) -> u64 {
        self.dos.count(reason)
    }
    /// Bytes read from links and destinations so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    /// Bytes of cells this relay originated so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    /// Circuits currently open through this relay (as any hop).
    pub fn open_circuits(&self) -> u64 {
        self.circuits.load(Ordering::Relaxed)
    }
    /// Circuits created since start.
    pub fn total_circuits(&self) -> u64 {
        self.circuits_total.load(Ordering::Relaxed)
    }
    /// Circuits open now whose previous hop is a client and which are scheduled under that
    /// client address's group on their next link.
    pub fn grouped_circuits(&self) -> u64 {
        self.grouped.load(Ordering::Relaxed)
    }
}

/// A relay this relay can extend to: from the consensus, or (tests) added by hand.
#[derive(Clone, Debug)]
pub(crate) struct KnownRelay {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) link_key: X25519Public,
}

/// Limits of the circuit layer that are not (yet) configuration keys: constants by default,
/// settable by tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Capacity of a circuit's inbound queue, in cells.
    pub(crate) inbound_queue: usize,
    /// Longest time a circuit may be unable to write before it is destroyed.
    pub(crate) blocked_cap: Duration,
    /// Longest time from EXTEND to CREATED.
    pub(crate) extend_timeout: Duration,
    /// CREATEs waiting for a handshake worker, at most.
    pub(crate) create_queue: usize,
    /// Longest time a CREATE may wait for a worker.
    pub(crate) create_max_delay: Duration,
    /// Handshake workers.
    pub(crate) create_workers: usize,
    /// CREATEs from one link waiting for a worker, at most.
    pub(crate) create_per_link: usize,
    /// Run the handshake workers as tasks on the runtime instead of low-priority threads (tests
    /// with tokio's paused clock, which must see every piece of work to advance time correctly).
    pub(crate) create_on_runtime: bool,
}

/// A circuit's inbound queue: a maximal congestion window each way plus room for control
/// cells (SENDMEs, XON/XOFF, stream ENDs, ...). A peer that respects congestion control never
/// fills it.
pub const INBOUND_QUEUE_CELLS: usize = 2 * allium_proto::flowctl::CWND_MAX as usize + 512;
/// Most CREATEs waiting for a handshake worker; beyond it the oldest is refused.
pub const CREATE_QUEUE_LEN: usize = 1024;
/// Longest time a CREATE may wait for a handshake worker (Tor's `MaxOnionQueueDelay`).
pub const CREATE_MAX_DELAY: Duration = Duration::from_millis(1750);
/// Handshake workers.
pub const CREATE_WORKERS: usize = 2;
/// Most CREATEs from one link waiting for a worker (further ones are refused at once).
pub const CREATE_PER_LINK: usize = 128;

impl Default for Limits {
    fn default() -> Self {
        Self {
            inbound_queue: INBOUND_QUEUE_CELLS,
            blocked_cap: crate::core::BLOCKED_CAP,
            extend_timeout: crate::core::EXTEND_TIMEOUT,
            create_queue: CREATE_QUEUE_LEN,
            create_max_delay: CREATE_MAX_DELAY,
            create_workers: CREATE_WORKERS,
            create_per_link: CREATE_PER_LINK,
            create_on_runtime: false,
        }
    }
}

/// The relay's shared state.
pub struct Ctx {
    pub(crate) keys: RelayKeys,
    /// The configuration the relay started with (keys that need a restart are read here).
    pub(crate) cfg: RelayConfig,
    /// The configuration as last reloaded: the keys in `config::RELOADABLE_KEYS` are read here
    /// (descriptor fields, stream limit); the others equal `cfg`'s.
    pub(crate) live: RwLock<Arc<RelayConfig>>,
    /// The exit policy new circuits get (replaced on reload; open circuits keep theirs).
    pub(crate) policy: RwLock<Arc<ExitPolicy>>,
    pub(crate) limits: Limits,
    /// CREATEs waiting for the handshake workers.
    pub(crate) creates: crate::create::CreateQueue,
    pub(crate) resolver: Arc<dyn Resolver>,
    pub(crate) bucket: TokenBucket,
    pub(crate) netdir: RwLock<Option<Arc<NetDir>>>,
    pub(crate) extra_relays: RwLock<HashMap<RelayId, KnownRelay>>,
    pub(crate) links: LinkManager,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) stats: Stats,
    /// Per-address limits, the replay cache, the circuit registry for the out-of-memory handler.
    pub(crate) dos: Arc<crate::dos::Dos>,
    /// Bytes of frames on every link (counted per frame by the channel): the control port's
    /// `traffic/*` and BW events and the `/metrics` byte counters.
    pub(crate) link_bytes: Arc<allium_proto::channel::LinkBytes>,
    /// Wakes the consensus task early (e.g. an unknown relay asked us to extend).
    pub(crate) refetch: Notify,
    /// The address published in the descriptor.
    pub(crate) advertised: SocketAddr,
    /// Descriptor publication state.
    pub(crate) dir: crate::dirsync::DirState,
    /// One permit per open exit stream.
    pub(crate) exit_slots: Arc<tokio::sync::Semaphore>,
    /// One permit per name resolution in progress (RESOLVE).
    pub(crate) resolve_slots: Arc<tokio::sync::Semaphore>,
    /// The directory documents this relay serves over BEGIN_DIR (filled by the consensus task).
    pub(crate) dir_archive: RwLock<DirArchive>,
    /// One permit per directory stream being served.
    pub(crate) dir_slots: Arc<tokio::sync::Semaphore>,
    /// The introduction registry and rendezvous table shared by the circuit reactors.
    pub(crate) hs: Arc<crate::hs::HsState>,
    /// The onion-service descriptors this relay keeps as an HSDir.
    pub(crate) hsdir: Mutex<allium_directory::dircache::HsDescStore>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("id", &self.keys.id)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(crate) fn new(
        cfg: RelayConfig,
        keys: RelayKeys,
        resolver: Arc<dyn Resolver>,
        advertised: SocketAddr,
    ) -> Arc<Self> {
        let limits = Limits {
            blocked_cap: Duration::from_secs(cfg.circuit_stall_timeout_secs),
            ..Limits::default()
        };
        Self::with_limits(cfg, keys, resolver, advertised, limits)
    }

    pub(crate) fn with_limits(
        cfg: RelayConfig,
        keys: RelayKeys,
        resolver: Arc<dyn Resolver>,
        advertised: SocketAddr,
        limits: Limits,
    ) -> Arc<Self> {
        let bucket = TokenBucket::new(
            cfg.bandwidth_rate,
            cfg.effective_burst(),
            crate::link::coarse_now(),
        );
        let (shutdown, _) = watch::channel(false);
        Arc::new(Self {
            policy: RwLock::new(Arc::new(
                cfg.exit_policy
                    .clone()
                    .with_my_addresses([advertised.ip(), cfg.listen.ip()]),
            )),
            live: RwLock::new(Arc::new(cfg.clone())),
            limits,
            creates: crate::create::CreateQueue::default(),
            keys,
            resolver,
            bucket,
            netdir: RwLock::new(None),
            extra_relays: RwLock::new(HashMap::new()),
            links: LinkManager::default(),
            shutdown,
            stats: Stats::default(),
            dos: Arc::new(crate::dos::Dos::new(cfg.dos.clone())),
            link_bytes: Arc::default(),
            refetch: Notify::new(),
            advertised,
            dir: crate::dirsync::DirState::default(),
            exit_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_exit_streams)),
            resolve_slots: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_RESOLVES)),
            dir_archive: RwLock::new(DirArchive::new(ArchiveConfig::default())),
            dir_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_dir_streams)),
            hs: Arc::new(crate::hs::HsState::new(crate::hs::HsLimits::default())),
            hsdir: Mutex::new(allium_directory::dircache::HsDescStore::default()),
            cfg,
        })
    }

    /// The exit policy for new circuits.
    pub(crate) fn exit_policy(&self) -> Arc<ExitPolicy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The configuration as last reloaded.
    pub(crate) fn live(&self) -> Arc<RelayConfig> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Take the reloadable keys of `new` (`config::RELOADABLE_KEYS`); the others are ignored.
    /// Returns whether the descriptor changed (then it should be republished).
    pub(crate) fn reconfigure(&self, new: &RelayConfig) -> bool {
        let old = self.live();
        let mut merged = (*old).clone();
        merged.nickname = new.nickname.clone();
        merged.contact = new.contact.clone();
        merged.family = new.family.clone();
        merged.exit_policy = new.exit_policy.clone();
        merged.bandwidth_rate = new.bandwidth_rate;
        merged.bandwidth_burst = new.bandwidth_burst;
        merged.max_streams_per_circuit = new.max_streams_per_circuit;
        merged.log_level = new.log_level.clone();
        merged.heartbeat_period_secs = new.heartbeat_period_secs;
        let descriptor_changed = merged.nickname != old.nickname
            || merged.contact != old.contact
            || merged.family != old.family
            || merged.exit_policy != old.exit_policy
            || merged.bandwidth_rate != old.bandwidth_rate;
        if merged.exit_policy != old.exit_policy {
            *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(
                merged
                    .exit_policy
                    .clone()
                    .with_my_addresses([self.advertised.ip(), merged.listen.ip()]),
            );
        }
        if (merged.bandwidth_rate, merged.bandwidth_burst)
            != (old.bandwidth_rate, old.bandwidth_burst)
        {
            self.bucket
                .set_rate(merged.bandwidth_rate, merged.effective_burst());
        }
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        descriptor_changed
    }

    /// The current consensus, if any.
    pub(crate) fn netdir(&self) -> Option<Arc<NetDir>> {
        match self.netdir.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn set_netdir(&self, nd: NetDir) {
        let nd = Some(Arc::new(nd));
        match self.netdir.write() {
            Ok(mut g) => *g = nd,
            Err(p) => *p.into_inner() = nd,
        }
    }

    /// Find a relay by identity: consensus first, then hand-added entries.
    pub(crate) fn lookup_relay(&self, id: &RelayId) -> Option<KnownRelay> {
        if let Some(nd) = self.netdir()
            && let Some(e) = nd.by_id(id)
        {
            return Some(KnownRelay {
                addrs: e.addrs.clone(),
                link_key: e.link_key,
            });
        }
        let g = match self.extra_relays.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(id).cloned()
    }

    /// Whether the peer of `link` is a relay: we opened the link to it, or its Noise static key is
    /// a relay's link key (consensus or hand-added entries).
    pub(crate) fn is_known_relay_link(&self, link: &Link) -> bool {
        if link.peer_relay.is_some() {
            return true;
        }
        let Some(key) = link.peer_static else {
            return false;
        };
        if self
            .netdir()
            .is_some_and(|nd| nd.by_link_key(&key).is_some())
        {
            return true;
        }
        let known = match self.extra_relays.read() {
            Ok(g) => g.values().any(|r| r.link_key.ct_eq(&key)),
            Err(p) => p.into_inner().values().any(|r| r.link_key.ct_eq(&key)),
        };
        if !known {
            // Maybe our consensus is older than the peer's: fetch a fresh one soon.
            self.refetch.notify_one();
        }
        known
    }

    /// Whether `key` is the link key of a relay or authority in the current consensus (or of a
    /// hand-added relay, tests only): such peers are exempt from the per-address DoS limits.
    pub(crate) fn is_exempt_key(&self, key: &X25519Public) -> bool {
        if self
            .netdir()
            .is_some_and(|nd| nd.by_link_key(key).is_some())
        {
            return true;
        }
        let g = match self.extra_relays.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.values().any(|r| r.link_key.ct_eq(key))
    }

    /// Whether `link` is exempt from the per-address DoS limits: we opened it to a relay, or the
    /// peer's key is listed ([`Ctx::is_exempt_key`]).
    pub(crate) fn is_exempt_link(&self, link: &Link) -> bool {
        link.peer_relay.is_some() || link.peer_static.is_some_and(|k| self.is_exempt_key(&k))
    }

    /// Whether `ip` is an address of a relay in the current consensus (or hand-added).
    pub(crate) fn is_listed_relay_addr(&self, ip: std::net::IpAddr) -> bool {
        if self.netdir().is_some_and(|nd| nd.has_relay_at(ip)) {
            return true;
        }
        let g = match self.extra_relays.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.values().any(|r| r.addrs.iter().any(|a| a.ip() == ip))
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Outgoing (and authenticated incoming) links to relays, by identity, so EXTENDs reuse them.
#[derive(Default)]
pub(crate) struct LinkManager {
    by_id: Mutex<HashMap<RelayId, Arc<Link>>>,
    connecting: Mutex<HashMap<RelayId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Most RESOLVE lookups in progress at once (further ones get a transient error).
pub const MAX_PENDING_RESOLVES: usize = 256;

/// Longest time to open a link for an EXTEND.
pub const EXTEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl LinkManager {
    fn get_open(&self, id: &RelayId) -> Option<Arc<Link>> {
        let g = match self.by_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(id).filter(|l| !l.is_closed()).cloned()
    }

    /// Remember a link to relay `id` unless an open one is already known.
    pub(crate) fn register(&self, id: RelayId, link: &Arc<Link>) {
        let mut g = match self.by_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let keep = g.get(&id).is_some_and(|l| !l.is_closed());
        if !keep {
            g.insert(id, Arc::clone(link));
        }
    }

    /// Forget a closed link.
    pub(crate) fn forget(&self, link: &Arc<Link>) {
        let mut g = match self.by_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.retain(|_, l| !Arc::ptr_eq(l, link));
    }

    /// The relays we hold an open link to, with the circuits on each (control port).
    pub(crate) fn open_peers(&self) -> Vec<(RelayId, u64)> {
        let g = match self.by_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.iter()
            .filter(|(_, l)| !l.is_closed())
            .map(|(id, l)| (*id, u64::try_from(l.n_circuits()).unwrap_or(u64::MAX)))
            .collect()
    }

    /// Close every link (shutdown).
    pub(crate) fn close_all(&self) {
        let g = match self.by_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for l in g.values() {
            l.close_sink();
        }
    }

    /// An open link to relay `id`, reusing one if possible, else connecting to `addr` with our
    /// link key so the peer recognises us as a relay.
    pub(crate) async fn get_or_connect(
        &self,
        ctx: &Arc<Ctx>,
        id: RelayId,
        addr: SocketAddr,
        link_key: X25519Public,
    ) -> Option<Arc<Link>> {
        if let Some(l) = self.get_open(&id) {
            return Some(l);
        }
        let gate = {
            let mut g = match self.connecting.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            Arc::clone(g.entry(id).or_default())
        };
        let _one_at_a_time = gate.lock().await;
        if let Some(l) = self.get_open(&id) {
            return Some(l);
        }
        // From the relay's own address (`outbound_bind_address`, by default the listen IP), so
        // the next relay counts this link against this relay's address.
        let bind = ctx.cfg.effective_outbound_bind();
        let res = tokio::time::timeout(EXTEND_CONNECT_TIMEOUT, async {
            let tcp = allium_directory::client::http::connect_from(addr, bind).await?;
            channel::connect_over(tcp, &id, &link_key, Some(&ctx.keys.link)).await
        })
        .await;
        {
            let mut g = match self.connecting.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.remove(&id);
        }
        let ch = match res {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "link to next relay failed");
                return None;
            }
            Err(_) => return None,
        };
        let peer_static = ch.peer_static();
        ch.count_into(&ctx.link_bytes);
        let (tx, rx) = ch.split();
        // A peer that stops reading loses the link after the circuit stall timeout.
        tx.set_write_timeout(ctx.limits.blocked_cap);
        let link = Link::new(
            CellSink::Channel(tx),
            true,
            Some(id),
            Some(peer_static),
            ctx.cfg.max_circuits_per_link,
        );
        link.set_peer_ip(addr.ip());
        self.register(id, &link);
        tokio::spawn(crate::link::run_reader(
            Arc::clone(ctx),
            Arc::clone(&link),
            CellSource::Channel(rx),
        ));
        Some(link)
    }
}
