//! The relay's denial-of-service defences (Tor's dos-spec as the starting point).
//!
//! Every decision here is sans-IO: it takes the time as an argument, so the limits are tested
//! with simulated time. The drivers (the OR listener in `lib.rs`, the link readers in
//! `crate::link`, the circuit reactors and the out-of-memory task [`run_oom`]) read the clock and
//! call in.
//!
//! - **Connections per client address** ([`AddrTable::try_connect`]): at most
//!   [`DosConfig::conn_max_concurrent`] open links from one address (Tor's
//!   `DoSConnectionMaxConcurrentCount`, 100) and a connection-rate bucket
//!   (`DoSConnectionConnectRate` 20/s, burst 40). Checked at `accept`, before the Noise
//!   handshake costs any CPU.
//! - **CREATE rate per client address** ([`AddrTable::try_create`]): a token bucket of
//!   [`DosConfig::create_rate`] per second and [`DosConfig::create_burst`] (Tor's 3 and 90),
//!   enforced once the address holds at least [`DosConfig::create_min_connections`] links (3).
//!   Refused with DESTROY RESOURCELIMIT before the handshake pool.
//! - **Onionskin replays** ([`ReplayCache`]): the client's ephemeral key of every CREATE that
//!   reaches the pool is remembered (bounded, for a window); a CREATE that repeats one is refused
//!   with DESTROY PROTOCOL without any Diffie-Hellman.
//! - **A global circuit cap** ([`DosConfig::max_circuits`]) and **idle-circuit expiry**
//!   ([`DosConfig::circuit_idle_timeout_secs`]), the latter applied by each circuit's reactor.
//! - **Queued bytes** ([`MemAccount`], [`run_oom`]): the bytes queued in circuit inboxes and exit
//!   stream queues are one atomic total, to which the cells waiting in every link's send queue
//!   are added at each check; above [`DosConfig::max_queued_bytes`] the circuits whose queues have held data
//!   longest are destroyed first until the total is under 90% of it (Tor's
//!   `circuits_handle_oom`).
//!
//! Exemption: a link whose peer's Noise static key is a relay's or authority's link key in the
//! current consensus (or a link we opened to a relay) is exempt from the per-address limits. An
//! address alone exempts nothing: a connection from a relay's address that would be refused is
//! let through the handshake only so its key can be checked, and closed if it is not the relay's.
//!
//! Every refusal is counted by [`Refusal`] in [`crate::Stats`] ([`crate::Stats::dos_rejections`],
//! `allium_dos_rejections_total{reason}` on the metrics page) and logged
//! at info the first time, then at most once a minute with the count since (no addresses).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The `[dos]` table of the relay configuration. Every key has Tor's default where Tor has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DosConfig {
    /// Most concurrent links from one client address (Tor's `DoSConnectionMaxConcurrentCount`,
    /// default 100). 0 turns the limit off.
    pub conn_max_concurrent: u32,
    /// New connections per second from one client address, sustained (Tor's
    /// `DoSConnectionConnectRate`, default 20). 0 turns the limit off.
    pub conn_rate: u32,
    /// New connections from one client address in a burst (Tor's `DoSConnectionConnectBurst`,
    /// default 40).
    pub conn_burst: u32,
    /// CREATEs per second from one client address, sustained (Tor's `DoSCircuitCreationRate`,
    /// default 3). 0 turns the limit off.
    pub create_rate: u32,
    /// CREATEs from one client address in a burst (Tor's `DoSCircuitCreationBurst`, default 90).
    pub create_burst: u32,
    /// The CREATE bucket is enforced once the address holds at least this many links (Tor's
    /// `DoSCircuitCreationMinConnections`, default 3).
    pub create_min_connections: u32,
    /// Client ephemeral keys remembered to refuse replayed CREATEs (default 65536; 0: off).
    pub replay_cache_entries: usize,
    /// Seconds a CREATE's ephemeral key is remembered (default 3600).
    pub replay_window_secs: u64,
    /// Most circuits open through this relay at once, as any hop (default 32768; 0: no cap).
    pub max_circuits: usize,
    /// A circuit with no stream and no cell for this many seconds is closed (DESTROY FINISHED);
    /// default 3600, Tor's client `CircuitIdleTimeout`, so no circuit a client still keeps for
    /// later use is closed under it. 0: never.
    pub circuit_idle_timeout_secs: u64,
    /// Most bytes queued in circuit queues over all circuits before the out-of-memory handler
    /// destroys the circuits holding the oldest queued data (Tor's `MaxMemInQueues`; default a
    /// fixed 128 MiB, half the relay's 256 MiB memory goal; 0: no cap).
    pub max_queued_bytes: u64,
    /// Most DATA cells an exit circuit's streams may hold unwritten before its circuit SENDMEs
    /// are withheld until the destinations drain (default 64, 32 KiB; 0: SENDMEs always go out
    /// on arrival). Bounds what a client can push into destinations that never read.
    pub exit_circuit_queue_cells: u32,
    /// Refused CREATEs per second one client link is answered at, sustained (default 10; 0:
    /// no pacing). Past it the link's reader stops reading until the next refusal is due, so a
    /// flood of CREATEs that are refused anyway (rate, replay, caps) waits in the peer's TCP
    /// buffers instead of costing the relay a decryption, a lookup and a DESTROY each.
    pub link_refusal_rate: u32,
    /// Refused CREATEs a client link is answered at once in a burst (default 100).
    pub link_refusal_burst: u32,
}

/// Default for [`DosConfig::max_queued_bytes`].
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 128 * 1024 * 1024;

impl Default for DosConfig {
    fn default() -> Self {
        Self {
            conn_max_concurrent: 100,
            conn_rate: 20,
            conn_burst: 40,
            create_rate: 3,
            create_burst: 90,
            create_min_connections: 3,
            replay_cache_entries: 65536,
            replay_window_secs: 3600,
            max_circuits: 32768,
            circuit_idle_timeout_secs: 3600,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            exit_circuit_queue_cells: crate::core::CIRC_QUEUE_CELLS,
            link_refusal_rate: 10,
            link_refusal_burst: 100,
        }
    }
}

impl DosConfig {
    /// Check the values; `Err` names the key and says what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.conn_rate > 0 && self.conn_burst == 0 {
            return Err(("dos.conn_burst", "must be at least 1 when conn_rate is set"));
        }
        if self.create_rate > 0 && self.create_burst == 0 {
            return Err((
                "dos.create_burst",
                "must be at least 1 when create_rate is set",
            ));
        }
        if self.link_refusal_rate > 0 && self.link_refusal_burst == 0 {
            return Err((
                "dos.link_refusal_burst",
                "must be at least 1 when link_refusal_rate is set",
            ));
        }
        if self.replay_cache_entries > 0 && self.replay_window_secs == 0 {
            return Err((
                "dos.replay_window_secs",
                "must be at least 1 when the replay cache is on",
            ));
        }
        Ok(())
    }

    /// The idle timeout, if any.
    pub fn circuit_idle_timeout(&self) -> Option<Duration> {
        (self.circuit_idle_timeout_secs > 0)
            .then(|| Duration::from_secs(self.circuit_idle_timeout_secs))
    }
}

/// Why the relay refused something to protect itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A connection from an address that already holds the most concurrent links.
    ConnConcurrent,
    /// A connection from an address whose connection-rate bucket is empty.
    ConnRate,
    /// A connection from a relay's address whose key is not that relay's (it was over a limit).
    ConnNotRelay,
    /// A CREATE from an address whose CREATE bucket is empty.
    CreateRate,
    /// A CREATE whose onionskin repeats a recent one.
    CreateReplay,
    /// A CREATE while the relay holds the most circuits.
    CircuitCap,
    /// A circuit closed after being idle.
    CircuitIdle,
    /// A circuit destroyed by the out-of-memory handler.
    OutOfMemory,
}

impl Refusal {
    /// Every reason, in the order of the counters.
    pub const ALL: [Self; 8] = [
        Self::ConnConcurrent,
        Self::ConnRate,
        Self::ConnNotRelay,
        Self::CreateRate,
        Self::CreateReplay,
        Self::CircuitCap,
        Self::CircuitIdle,
        Self::OutOfMemory,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ConnConcurrent => "conn_concurrent",
            Self::ConnRate => "conn_rate",
            Self::ConnNotRelay => "conn_not_relay",
            Self::CreateRate => "create_rate",
            Self::CreateReplay => "create_replay",
            Self::CircuitCap => "circuit_cap",
            Self::CircuitIdle => "circuit_idle",
            Self::OutOfMemory => "out_of_memory",
        }
    }

    /// What the operator reads in the log.
    fn explain(self) -> &'static str {
        match self {
            Self::ConnConcurrent => {
                "a client address holds the most concurrent links (dos.conn_max_concurrent): \
                 further connections from it are closed at accept"
            }
            Self::ConnRate => {
                "a client address connects faster than dos.conn_rate/dos.conn_burst allow: \
                 its new connections are closed at accept"
            }
            Self::ConnNotRelay => {
                "a connection from a relay's address over the per-address limits did not \
                 present that relay's key: closed"
            }
            Self::CreateRate => {
                "a client address creates circuits faster than dos.create_rate/dos.create_burst \
                 allow: its CREATEs are refused with DESTROY (RESOURCELIMIT)"
            }
            Self::CreateReplay => {
                "a CREATE repeated a recent onionskin: refused with DESTROY (PROTOCOL) \
                 without a handshake"
            }
            Self::CircuitCap => {
                "the relay holds dos.max_circuits circuits: new CREATEs are refused with \
                 DESTROY (RESOURCELIMIT)"
            }
            Self::CircuitIdle => {
                "circuits with no stream and no traffic for dos.circuit_idle_timeout_secs are \
                 closed"
            }
            Self::OutOfMemory => {
                "queued cells exceed dos.max_queued_bytes: the circuits holding the oldest \
                 queued data are destroyed (RESOURCELIMIT)"
            }
        }
    }
}

/// How often a refusal reason is logged again after its first line.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// Refusal counters and their rate-limited log.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: [AtomicU64; Refusal::ALL.len()],
    /// Per reason: when it was last logged, and the count then.
    logged: Mutex<[Option<(Instant, u64)>; Refusal::ALL.len()]>,
}

impl Rejections {
    /// Count one refusal; log it if it is the first of its kind or the last line is old.
    pub fn note(&self, r: Refusal, now: Instant) {
        let total = self.counts[r.index()].fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut logged[r.index()];
        let since = match *slot {
            Some((t, _)) if now.saturating_duration_since(t) < LOG_EVERY => return,
            Some((_, n)) => total.saturating_sub(n),
            None => total,
        };
        *slot = Some((now, total));
        drop(logged);
        tracing::info!(
            reason = r.label(),
            refused = since,
            total,
            "{}",
            r.explain()
        );
    }

    /// Refusals of this kind so far.
    pub fn count(&self, r: Refusal) -> u64 {
        self.counts[r.index()].load(Ordering::Relaxed)
    }
}

/// A token bucket counted in thousandths of a token, refilled from the time passed in.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli: u64,
    last: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            milli: u64::from(burst) * 1000,
            last: now,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = elapsed
            .as_micros()
            .saturating_mul(u128::from(rate))
            .checked_div(1000)
            .unwrap_or(0);
        let add = u64::try_from(add).unwrap_or(u64::MAX);
        self.milli = self.milli.saturating_add(add).min(u64::from(burst) * 1000);
        self.last = now;
    }

    /// Take one token if there is one.
    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    fn is_full(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, burst, now);
        b.milli >= u64::from(burst) * 1000
    }
}

/// The key addresses are counted under: an IPv4 address, or an IPv6 /64 (one subscriber's
/// allocation, which an attacker gets whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let mut o = v6.octets();
                    o[8..].fill(0);
                    Self(IpAddr::V6(o.into()))
                }
            },
        }
    }

    /// The scheduling group of the circuits from this address on the relay's outgoing links
    /// ([`allium_proto::circmux`]): the address as an IPv6 number, an IPv4 address in its
    /// IPv4-mapped form. Distinct keys give distinct groups (an IPv6 key never is IPv4-mapped
    /// and has its low 64 bits clear).
    pub fn sched_group(self) -> allium_proto::circmux::CircGroup {
        let v6 = match self.0 {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        allium_proto::circmux::CircGroup(u128::from(v6))
    }
}

#[derive(Debug)]
struct AddrState {
    conns: u32,
    connect: Bucket,
    create: Bucket,
}

/// Most addresses tracked at once; past it, idle entries are pruned and, if that is not
/// enough, the new address is still served (its state starts full) but not remembered.
pub const MAX_TRACKED_ADDRS: usize = 1 << 17;
/// How often idle entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Paces the refused CREATEs of one client link (sans-IO; the link's reader owns it): a bucket
/// of [`DosConfig::link_refusal_rate`] per second and [`DosConfig::link_refusal_burst`]. While
/// it has tokens a refusal costs nothing more; once it is empty the reader pauses for as long
/// as the next token takes, so the link is read at the refusal rate and the rest of a flood
/// waits in the peer's own buffers (its sender blocks).
#[derive(Debug)]
pub(crate) struct RefusalPacer {
    bucket: Bucket,
    rate: u32,
    burst: u32,
}

impl RefusalPacer {
    /// A pacer with a full bucket.
    pub(crate) fn new(cfg: &DosConfig, now: Instant) -> Self {
        Self {
            bucket: Bucket::full(cfg.link_refusal_burst, now),
            rate: cfg.link_refusal_rate,
            burst: cfg.link_refusal_burst,
        }
    }

    /// A CREATE from this link was refused at `now`: how long the reader must stop reading,
    /// if at all.
    pub(crate) fn on_refusal(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0 || self.bucket.take(self.rate, self.burst, now) {
            return None;
        }
        // Microseconds until the bucket holds a whole token again; that token pays for this
        // refusal (the bucket restarts empty at the end of the pause).
        let missing = 1000u64.saturating_sub(self.bucket.milli);
        let pause =
            Duration::from_micros((missing.saturating_mul(1000) / u64::from(self.rate)).max(1));
        self.bucket.milli = 0;
        self.bucket.last = now.checked_add(pause).unwrap_or(now);
        Some(pause)
    }
}

/// Per-address state: concurrent links and the two buckets (sans-IO).
#[derive(Debug)]
pub struct AddrTable {
    cfg: DosConfig,
    map: HashMap<AddrKey, AddrState>,
    last_prune: Option<Instant>,
}

impl AddrTable {
    /// An empty table with these limits.
    pub fn new(cfg: DosConfig) -> Self {
        Self {
            cfg,
            map: HashMap::new(),
            last_prune: None,
        }
    }

    fn entry(&mut self, key: AddrKey, now: Instant) -> &mut AddrState {
        let (cb, kb) = (self.cfg.conn_burst, self.cfg.create_burst);
        self.map.entry(key).or_insert_with(|| AddrState {
            conns: 0,
            connect: Bucket::full(cb, now),
            create: Bucket::full(kb, now),
        })
    }

    /// A new connection from `ip`: counted (and `Ok`) unless a limit refuses it. Every `Ok`
    /// must be matched by one [`AddrTable::disconnect`].
    pub fn try_connect(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.maybe_prune(now);
        let cfg = self.cfg.clone();
        let s = self.entry(AddrKey::of(ip), now);
        if cfg.conn_max_concurrent > 0 && s.conns >= cfg.conn_max_concurrent {
            return Err(Refusal::ConnConcurrent);
        }
        if cfg.conn_rate > 0 && !s.connect.take(cfg.conn_rate, cfg.conn_burst, now) {
            return Err(Refusal::ConnRate);
        }
        s.conns += 1;
        Ok(())
    }

    /// A connection counted by [`AddrTable::try_connect`] closed (or turned out exempt).
    pub fn disconnect(&mut self, ip: IpAddr) {
        if let Some(s) = self.map.get_mut(&AddrKey::of(ip)) {
            s.conns = s.conns.saturating_sub(1);
        }
    }

    /// Links from `ip` counted now.
    pub fn connections(&self, ip: IpAddr) -> u32 {
        self.map.get(&AddrKey::of(ip)).map_or(0, |s| s.conns)
    }

    /// A CREATE from a client link from `ip`: the bucket always pays; the refusal applies once
    /// the address holds [`DosConfig::create_min_connections`] links.
    pub fn try_create(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let cfg = self.cfg.clone();
        if cfg.create_rate == 0 {
            return Ok(());
        }
        let s = self.entry(AddrKey::of(ip), now);
        let had = s.create.take(cfg.create_rate, cfg.create_burst, now);
        if !had && s.conns >= cfg.create_min_connections {
            return Err(Refusal::CreateRate);
        }
        Ok(())
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.map.len()
    }

    fn maybe_prune(&mut self, now: Instant) {
        let due = self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
        if !due && self.map.len() < MAX_TRACKED_ADDRS {
            return;
        }
        self.last_prune = Some(now);
        let c = self.cfg.clone();
        // An entry with no link and both buckets full says nothing a fresh one would not.
        self.map.retain(|_, s| {
            s.conns > 0
                || !s.connect.is_full(c.conn_rate, c.conn_burst, now)
                || !s.create.is_full(c.create_rate, c.create_burst, now)
        });
        if self.map.len() >= MAX_TRACKED_ADDRS {
            // Still full of addresses with partly spent buckets: forget those without links
            // (they start over with full buckets, which only helps them by a burst).
            self.map.retain(|_, s| s.conns > 0);
        }
    }
}

/// Recently seen client ephemeral keys (X of the ntor-v3 onionskin), bounded in count and age.
#[derive(Debug)]
pub struct ReplayCache {
    cap: usize,
    window: Duration,
    seen: HashSet<[u8; 32]>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl ReplayCache {
    /// Remember at most `cap` keys for `window` each.
    pub fn new(cap: usize, window: Duration) -> Self {
        Self {
            cap,
            window,
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Record `key`; `false` if it was seen within the window (a replay).
    pub fn check_and_insert(&mut self, key: [u8; 32], now: Instant) -> bool {
        if self.cap == 0 {
            return true;
        }
        while let Some(&(k, t)) = self.order.front() {
            if now.saturating_duration_since(t) < self.window && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&k);
        }
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back((key, now));
        true
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Where the client's ephemeral key X sits in an ntor-v3 onionskin: after the relay's identity
/// and onion key.
const ONIONSKIN_X: std::ops::Range<usize> = 64..96;

/// The client ephemeral key of a CREATE body, if it has one.
pub fn create_ephemeral_key(body: &[u8]) -> Option<[u8; 32]> {
    let create = allium_proto::cell::Create::decode(body).ok()?;
    create.hdata.get(ONIONSKIN_X)?.try_into().ok()
}

/// The global account of queued bytes, and the coarse clock queues stamp their oldest item with
/// (advanced by [`run_oom`]'s ticker).
pub type MemAccount = allium_proto::inbox::QueueAccount;

/// Bytes a circuit holds outside its inbound queue (its exit streams' write queues), and since
/// when it has held any.
#[derive(Debug, Default)]
pub(crate) struct CircQueued {
    bytes: AtomicU64,
    since: AtomicU64,
}

impl CircQueued {
    /// Count `n` bytes held by this circuit in `acct` until the returned charge is dropped.
    pub(crate) fn charge(self: &Arc<Self>, acct: &Arc<MemAccount>, n: u64) -> Charge {
        if self.bytes.fetch_add(n, Ordering::Relaxed) == 0 {
            self.since
                .store(acct.clock_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        acct.bytes.fetch_add(n, Ordering::Relaxed);
        Charge {
            acct: Arc::clone(acct),
            circ: Arc::clone(self),
            n,
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Bytes counted in the global account (and their circuit's) while this lives.
#[derive(Debug)]
pub(crate) struct Charge {
    acct: Arc<MemAccount>,
    circ: Arc<CircQueued>,
    n: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.circ.bytes.fetch_sub(self.n, Ordering::Relaxed);
        self.acct.bytes.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// What the out-of-memory handler needs of one circuit: its queue's size and age, and how to
/// stop it.
pub(crate) struct Victim {
    pub(crate) probe: allium_proto::inbox::InboxProbe,
    pub(crate) exit: Arc<CircQueued>,
    pub(crate) kill: Weak<crate::link::Kill>,
}

/// Circuits the out-of-memory handler may destroy (weakly held: a finished circuit's entry is
/// pruned when seen dead).
#[derive(Default)]
pub(crate) struct Victims(Mutex<Vec<Victim>>);

impl std::fmt::Debug for Victims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Victims").finish_non_exhaustive()
    }
}

impl Victims {
    /// Register a new circuit's queue and stop signal.
    pub(crate) fn register_circuit(&self, h: &crate::link::CircHandle) {
        self.register(Victim {
            probe: h.tx.probe(),
            exit: Arc::clone(&h.queued),
            kill: Arc::downgrade(&h.kill),
        });
    }

    fn register(&self, v: Victim) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Amortised pruning: when the vector doubles past its live size.
        if g.len() >= 1024 && g.len().is_power_of_two() {
            g.retain(|v| v.kill.strong_count() > 0);
        }
        g.push(v);
    }
}

/// Pick circuits to destroy (sans-IO): given each candidate's queued bytes and the clock value
/// its queue last became non-empty at, the indexes of those holding the oldest data, in order,
/// until `total` minus what they hold is at most `goal`.
pub fn oom_choose(candidates: &[(u64, u64)], total: u64, goal: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates.get(i).is_some_and(|c| c.0 > 0))
        .collect();
    order.sort_by_key(|&i| candidates.get(i).map_or(u64::MAX, |c| c.1));
    let mut left = total;
    let mut out = Vec::new();
    for i in order {
        if left <= goal {
            break;
        }
        left = left.saturating_sub(candidates.get(i).map_or(0, |c| c.0));
        out.push(i);
    }
    out
}

/// The relay's DoS state, shared by the listener, the link readers and the reactors.
#[derive(Debug)]
pub struct Dos {
    /// The limits.
    pub cfg: DosConfig,
    addrs: Mutex<AddrTable>,
    replay: Mutex<ReplayCache>,
    /// Queued bytes.
    pub mem: Arc<MemAccount>,
    pub(crate) victims: Victims,
}

impl Dos {
    /// DoS state with these limits.
    pub fn new(cfg: DosConfig) -> Self {
        Self {
            addrs: Mutex::new(AddrTable::new(cfg.clone())),
            replay: Mutex::new(ReplayCache::new(
                cfg.replay_cache_entries,
                Duration::from_secs(cfg.replay_window_secs),
            )),
            cfg,
            mem: Arc::new(MemAccount::default()),
            victims: Victims::default(),
        }
    }

    fn addrs(&self) -> std::sync::MutexGuard<'_, AddrTable> {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection from `ip` at accept: a slot that keeps it counted until dropped, or why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<ConnSlot, Refusal> {
        self.addrs().try_connect(ip, now)?;
        Ok(ConnSlot {
            dos: Arc::clone(self),
            ip,
        })
    }

    /// A CREATE from a client link from `ip` (exempt links do not call this).
    pub(crate) fn check_create(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.addrs().try_create(ip, now)
    }

    /// Remember a CREATE's onionskin; `Err` if it repeats a recent one.
    pub(crate) fn check_replay(&self, body: &[u8], now: Instant) -> Result<(), Refusal> {
        let Some(x) = create_ephemeral_key(body) else {
            // Malformed: the handshake refuses it (cheaply, before any DH).
            return Ok(());
        };
        let fresh = self
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check_and_insert(x, now);
        if fresh {
            Ok(())
        } else {
            Err(Refusal::CreateReplay)
        }
    }

    /// Links from `ip` counted now (tests).
    #[cfg(test)]
    pub(crate) fn connections(&self, ip: IpAddr) -> u32 {
        self.addrs().connections(ip)
    }

    /// Run the out-of-memory check once: if queued bytes exceed the cap, destroy the circuits
    /// holding the oldest queued data until under 90% of it. Returns how many were destroyed.
    /// (Tests; the out-of-memory task adds the links' queues with [`Dos::handle_oom_with`].)
    #[cfg(test)]
    pub(crate) fn handle_oom(&self, counts: &Rejections, now: Instant) -> usize {
        self.handle_oom_with(counts, now, 0)
    }

    /// [`Dos::handle_oom`] with `link_queued` more bytes in the total: the cells waiting in the
    /// links' send queues (their writers), which the circuits feeding them hold memory with as
    /// surely as with their own queues. Destroying those circuits stops them feeding the links.
    pub(crate) fn handle_oom_with(
        &self,
        counts: &Rejections,
        now: Instant,
        link_queued: u64,
    ) -> usize {
        let max = self.cfg.max_queued_bytes;
        let total = self
            .mem
            .bytes
            .load(Ordering::Relaxed)
            .saturating_add(link_queued);
        if max == 0 || total <= max {
            return 0;
        }
        let goal = max / 10 * 9;
        let mut g = self.victims.0.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|v| v.kill.strong_count() > 0);
        let candidates: Vec<(u64, u64)> = g
            .iter()
            .map(|v| {
                let inbox = (v.probe.queued_bytes(), v.probe.nonempty_since());
                let exit = (v.exit.bytes(), v.exit.since.load(Ordering::Relaxed));
                // The oldest stamp among the queues that hold something.
                let since = [inbox, exit]
                    .iter()
                    .filter(|(bytes, _)| *bytes > 0)
                    .map(|&(_, since)| since)
                    .min()
                    .unwrap_or(u64::MAX);
                (inbox.0.saturating_add(exit.0), since)
            })
            .collect();
        let chosen = oom_choose(&candidates, total, goal);
        let kills: Vec<Arc<crate::link::Kill>> = chosen
            .iter()
            .filter_map(|&i| g.get(i).and_then(|v| v.kill.upgrade()))
            .collect();
        drop(g);
        for k in &kills {
            k.fire(crate::link::KillReason::QueueOverflow);
            counts.note(Refusal::OutOfMemory, now);
        }
        kills.len()
    }
}

/// A counted connection; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    dos: Arc<Dos>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.dos.addrs().disconnect(self.ip);
    }
}

/// What the listener decided at accept for a connection from `ip`: `Ok(Some(slot))` counted;
/// `Ok(None)` over a limit but from a relay's address, so the handshake must prove the relay's
/// key; `Err(())` refused (counted and logged here; the caller drops the socket).
pub(crate) fn admit_at_accept(
    ctx: &crate::ctx::Ctx,
    ip: IpAddr,
    now: Instant,
) -> Result<Option<ConnSlot>, ()> {
    match ctx.dos.admit(ip, now) {
        Ok(slot) => Ok(Some(slot)),
        Err(_) if ctx.is_listed_relay_addr(ip) => Ok(None),
        Err(r) => {
            ctx.stats.dos.note(r, now);
            Err(())
        }
    }
}

/// After the handshake: the slot to keep while the link is open (`Some(None)` for an exempt
/// peer, which is not counted), or `None` if the link must close (it was let through on a
/// relay's address and is not that relay).
pub(crate) fn admit_after_handshake(
    ctx: &crate::ctx::Ctx,
    slot: Option<ConnSlot>,
    peer_static: &allium_crypto::X25519Public,
) -> Option<Option<ConnSlot>> {
    if ctx.is_exempt_key(peer_static) {
        // Relays and authorities are not client connections: not counted.
        return Some(None);
    }
    if slot.is_none() {
        ctx.stats
            .dos
            .note(Refusal::ConnNotRelay, crate::link::coarse_now());
        return None;
    }
    Some(slot)
}

/// Check a CREATE arriving on `link` before it is queued: the global circuit cap, the
/// per-address bucket (client links only), the replay cache. `Err` gives the refusal and the
/// DESTROY reason to answer with.
pub(crate) fn admit_create(
    ctx: &crate::ctx::Ctx,
    link: &crate::link::Link,
    body: &[u8],
    now: Instant,
) -> Result<(), (Refusal, allium_proto::cell::DestroyReason)> {
    use allium_proto::cell::DestroyReason;
    let cap = ctx.dos.cfg.max_circuits;
    if cap > 0 && ctx.stats.open_circuits() >= cap as u64 {
        return Err((Refusal::CircuitCap, DestroyReason::RESOURCELIMIT));
    }
    if !ctx.is_exempt_link(link)
        && let Some(ip) = link.peer_ip()
    {
        ctx.dos
            .check_create(ip, now)
            .map_err(|r| (r, DestroyReason::RESOURCELIMIT))?;
    }
    ctx.dos
        .check_replay(body, now)
        .map_err(|r| (r, DestroyReason::PROTOCOL))
}

/// How often the out-of-memory task checks (and advances the queues' clock).
pub const OOM_TICK: Duration = Duration::from_millis(100);

/// The out-of-memory task: advances the coarse clock queues use and runs the check every
/// [`OOM_TICK`] until shutdown.
#[allow(clippy::disallowed_methods)] // Driver: the tick is where time enters.
pub(crate) async fn run_oom(ctx: Arc<crate::ctx::Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(OOM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = tokio::time::Instant::now();
        let ms = u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX);
        ctx.dos.mem.clock_ms.store(ms, Ordering::Relaxed);
        // The links' send queues count too (computed here, once a tick).
        let link_queued = ctx.link_bytes.queued_bytes();
        let n = ctx
            .dos
            .handle_oom_with(&ctx.stats.dos, now.into_std(), link_queued);
        if n > 0 {
            tracing::debug!(circuits = n, "out-of-memory handler destroyed circuits");
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests: one real instant as the origin of simulated time.
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn concurrent_connections_per_address_are_capped() {
        let cfg = DosConfig {
            conn_max_concurrent: 3,
            conn_rate: 0,
            ..DosConfig::default()
        };
        let mut t = AddrTable::new(cfg);
        let now = Instant::now();
        let a = ip("127.0.0.77");
        for _ in 0..3 {
            t.try_connect(a, now).unwrap();
        }
        assert_eq!(t.try_connect(a, now), Err(Refusal::ConnConcurrent));
        // Another address is not affected.
        t.try_connect(ip("127.0.0.1"), now).unwrap();
        t.disconnect(a);
        t.try_connect(a, now).unwrap();
        assert_eq!(t.connections(a), 3);
    }

    #[test]
    fn connection_rate_bucket_refills_with_time() {
        let cfg = DosConfig {
            conn_max_concurrent: 0,
            conn_rate: 20,
            conn_burst: 40,
            ..DosConfig::default()
        };
        let mut t = AddrTable::new(cfg);
        let t0 = Instant::now();
        let a = ip("10.1.2.3");
        for _ in 0..40 {
            t.try_connect(a, t0).unwrap();
        }
        assert_eq!(t.try_connect(a, t0), Err(Refusal::ConnRate));
        // 20 per second: one more after 50 ms, not before.
        assert_eq!(
            t.try_connect(a, t0 + Duration::from_millis(40)),
            Err(Refusal::ConnRate)
        );
        t.try_connect(a, t0 + Duration::from_millis(50)).unwrap();
        assert_eq!(
            t.try_connect(a, t0 + Duration::from_millis(60)),
            Err(Refusal::ConnRate)
        );
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let cfg = DosConfig {
            conn_max_concurrent: 2,
            conn_rate: 0,
            ..DosConfig::default()
        };
        let mut t = AddrTable::new(cfg);
        let now = Instant::now();
        t.try_connect(ip("2001:db8:1:2::1"), now).unwrap();
        t.try_connect(ip("2001:db8:1:2::ffff:1"), now).unwrap();
        assert_eq!(
            t.try_connect(ip("2001:db8:1:2:abcd::9"), now),
            Err(Refusal::ConnConcurrent)
        );
        t.try_connect(ip("2001:db8:1:3::1"), now).unwrap();
        assert_eq!(
            AddrKey::of(ip("::ffff:10.0.0.1")),
            AddrKey::of(ip("10.0.0.1"))
        );
    }

    /// One scheduling group per address key: an IPv6 /64 is one group, and no IPv4 address
    /// shares a group with an IPv6 prefix.
    #[test]
    fn sched_groups_follow_the_address_keys() {
        let g = |s: &str| AddrKey::of(ip(s)).sched_group();
        assert_eq!(g("10.0.0.1"), g("::ffff:10.0.0.1"));
        assert_ne!(g("10.0.0.1"), g("10.0.0.2"));
        assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:2:abcd::9"));
        assert_ne!(g("2001:db8:1:2::1"), g("2001:db8:1:3::1"));
        // ::/64 against 0.0.0.0, and an IPv6 prefix against the IPv4 address of its bits.
        assert_ne!(g("::1"), g("0.0.0.0"));
        assert_ne!(g("0:0:0:a00::1"), g("10.0.0.1"));
        assert_eq!(g("::1"), allium_proto::circmux::CircGroup(0));
    }

    #[test]
    fn refusal_pacer_pauses_a_link_past_its_burst_and_refills_with_time() {
        let cfg = DosConfig {
            link_refusal_rate: 4,
            link_refusal_burst: 3,
            ..DosConfig::default()
        };
        let t0 = Instant::now();
        let mut p = RefusalPacer::new(&cfg, t0);
        for _ in 0..3 {
            assert_eq!(p.on_refusal(t0), None);
        }
        // Empty: pause until the next token (a quarter second at 4 per second), which pays
        // for this refusal; so does every refusal after it until the bucket refills.
        let quarter = Duration::from_millis(250);
        assert_eq!(p.on_refusal(t0), Some(quarter));
        let t1 = t0 + quarter;
        assert_eq!(p.on_refusal(t1), Some(quarter));
        let t2 = t1 + quarter + Duration::from_millis(100);
        assert_eq!(p.on_refusal(t2), Some(Duration::from_millis(150)));
        // A quiet second later the burst is back.
        let t3 = t2 + Duration::from_millis(150) + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(p.on_refusal(t3), None);
        }
        assert_eq!(p.on_refusal(t3), Some(quarter));
        // Off: never a pause.
        let off = DosConfig {
            link_refusal_rate: 0,
            ..cfg
        };
        let mut p = RefusalPacer::new(&off, t0);
        assert!((0..1000).all(|_| p.on_refusal(t0).is_none()));
    }

    #[test]
    fn create_bucket_applies_from_the_minimum_connection_count() {
        let cfg = DosConfig {
            conn_rate: 0,
            ..DosConfig::default()
        };
        let mut t = AddrTable::new(cfg);
        let t0 = Instant::now();
        let a = ip("127.0.0.77");
        // Two links: the bucket empties but nothing is refused (Tor's MinConnections 3).
        t.try_connect(a, t0).unwrap();
        t.try_connect(a, t0).unwrap();
        for _ in 0..200 {
            t.try_create(a, t0).unwrap();
        }
        // The third link: the (empty) bucket is enforced.
        t.try_connect(a, t0).unwrap();
        assert_eq!(t.try_create(a, t0), Err(Refusal::CreateRate));
        // 3 per second: one token after 334 ms.
        assert_eq!(
            t.try_create(a, t0 + Duration::from_millis(300)),
            Err(Refusal::CreateRate)
        );
        t.try_create(a, t0 + Duration::from_millis(334)).unwrap();
        // A full burst after 30 s, and no more.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..90 {
            t.try_create(a, t1).unwrap();
        }
        assert_eq!(t.try_create(a, t1), Err(Refusal::CreateRate));
        // Another address is unaffected.
        let b = ip("127.0.0.1");
        for _ in 0..3 {
            t.try_connect(b, t1).unwrap();
        }
        t.try_create(b, t1).unwrap();
    }

    #[test]
    fn idle_entries_are_pruned() {
        let mut t = AddrTable::new(DosConfig::default());
        let t0 = Instant::now();
        for i in 0..100u8 {
            let a = IpAddr::from([10, 0, 0, i]);
            t.try_connect(a, t0).unwrap();
            t.disconnect(a);
        }
        t.try_connect(ip("10.9.9.9"), t0).unwrap();
        assert_eq!(t.tracked(), 101);
        // Buckets refill (40 at 20/s: 2 s; 90 at 3/s: 30 s); the open link's entry stays.
        t.try_connect(ip("10.9.9.9"), t0 + Duration::from_secs(31))
            .unwrap();
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn replays_are_refused_within_the_window_and_the_cache_is_bounded() {
        let mut c = ReplayCache::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(c.check_and_insert([1; 32], t0));
        assert!(!c.check_and_insert([1; 32], t0 + Duration::from_secs(9)));
        assert!(c.check_and_insert([2; 32], t0));
        assert!(c.check_and_insert([3; 32], t0));
        // Full: the oldest goes.
        assert!(c.check_and_insert([4; 32], t0));
        assert_eq!(c.len(), 3);
        assert!(c.check_and_insert([1; 32], t0 + Duration::from_secs(1)));
        // Past the window a key is forgotten.
        let mut c = ReplayCache::new(100, Duration::from_secs(10));
        assert!(c.check_and_insert([7; 32], t0));
        assert!(c.check_and_insert([7; 32], t0 + Duration::from_secs(10)));
    }

    #[test]
    fn the_ephemeral_key_is_read_from_the_onionskin() {
        let mut hdata = vec![0u8; 200];
        hdata[64..96].fill(0xab);
        let create = allium_proto::cell::Create {
            htype: allium_proto::cell::HTYPE_NTOR3,
            hdata,
        };
        let mut body: allium_proto::cell::CellBody = [0; allium_proto::cell::CELL_BODY_LEN];
        create.encode(&mut body).unwrap();
        assert_eq!(create_ephemeral_key(&body[..]), Some([0xab; 32]));
        assert_eq!(create_ephemeral_key(&[0, 2, 0, 10, 1, 2]), None);
    }

    #[test]
    fn oom_picks_the_oldest_queues_until_under_the_goal() {
        // (bytes, nonempty since)
        let c = [(100, 50), (0, 1), (300, 10), (200, 20), (50, 5)];
        // total 650, goal 400: oldest non-empty first: #4 (5) -> 600, #2 (10) -> 300.
        assert_eq!(oom_choose(&c, 650, 400), vec![4, 2]);
        assert_eq!(oom_choose(&c, 650, 650), Vec::<usize>::new());
    }

    #[test]
    fn refusals_are_counted_and_logged_once_a_minute() {
        let r = Rejections::default();
        let t0 = Instant::now();
        r.note(Refusal::CreateRate, t0);
        r.note(Refusal::CreateRate, t0 + Duration::from_secs(1));
        assert_eq!(r.count(Refusal::CreateRate), 2);
        assert_eq!(r.count(Refusal::ConnRate), 0);
        let logged = r.logged.lock().unwrap()[Refusal::CreateRate.index()];
        assert_eq!(logged, Some((t0, 1)));
    }

    #[test]
    fn relay_config_checks_its_dos_table() {
        let mut cfg = crate::RelayConfig::for_test("DosCfg", "/nonexistent");
        cfg.validate().unwrap();
        cfg.dos.create_burst = 0;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("dos.create_burst"), "{e}");
    }

    #[test]
    fn defaults_are_tors_and_validate() {
        let d = DosConfig::default();
        assert_eq!(
            (d.conn_max_concurrent, d.conn_rate, d.conn_burst),
            (100, 20, 40)
        );
        assert_eq!(
            (d.create_rate, d.create_burst, d.create_min_connections),
            (3, 90, 3)
        );
        d.validate().unwrap();
        let parsed: DosConfig = toml::from_str("create_rate = 5").unwrap();
        assert_eq!(parsed.create_rate, 5);
        assert_eq!(parsed.create_burst, 90);
    }
}
