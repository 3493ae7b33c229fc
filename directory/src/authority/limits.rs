//! The authority's resource limits, as small sans-IO pieces (time passed in, no I/O) that the
//! HTTP server, the upload path and the prober consult:
//!
//! - [`Prefix`]: the network an address belongs to (/24 for IPv4, /48 for IPv6);
//! - [`TokenBucket`] and [`SourceLimiter`]: descriptor-upload (POST) rate per source address and
//!   per source prefix, in a map that never holds more than a configured number of sources;
//! - [`ConnLimiter`]: HTTP connections per address, per prefix and in total, with slots that
//!   only the configured authorities' addresses may use;
//! - [`probe_order`]: the fair order in which relays are probed;
//! - [`Limit`] and [`LimitLog`]: a counter per refusal, logged at most once a minute per kind.
//!
//! Every map here is bounded; docs/protocol/80-directory.md, "Authority limits", lists the
//! values and the status codes a refused peer sees.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use allium_crypto::RelayId;

/// The network an address belongs to: the first 24 bits of an IPv4 address, the first 48 of an
/// IPv6 one. An IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    /// An IPv4 /24.
    V4([u8; 3]),
    /// An IPv6 /48.
    V6([u8; 6]),
}

impl Prefix {
    /// The prefix of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => {
                let [a, b, c, _] = a.octets();
                Self::V4([a, b, c])
            }
            IpAddr::V6(a) => {
                if let Some(v4) = a.to_ipv4_mapped() {
                    return Self::of(IpAddr::V4(v4));
                }
                let [a0, a1, a2, a3, a4, a5, ..] = a.octets();
                Self::V6([a0, a1, a2, a3, a4, a5])
            }
        }
    }
}

/// Canonical form of an address for counting (IPv4-mapped IPv6 becomes IPv4).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

// ---- refusal counters -------------------------------------------------------------------

/// One kind of refusal or bound hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// A POST refused: its source address used up its token bucket.
    UploadRateAddr,
    /// A POST refused: its source prefix used up its token bucket.
    UploadRatePrefix,
    /// The table of upload sources was full; the least recently used source was forgotten.
    SourceTableFull,
    /// A descriptor refused: too many relays at one of its addresses.
    RelaysPerAddr,
    /// A descriptor refused: too many relays in one of its prefixes.
    RelaysPerPrefix,
    /// A descriptor refused: the relay table is full of relays that are not evictable.
    TableFull,
    /// A relay evicted (never reachable, newest first) to make room for a new one.
    Evicted,
    /// A connection refused: too many from its address.
    ConnPerAddr,
    /// A connection refused: too many from its prefix.
    ConnPerPrefix,
    /// A connection refused: every slot open to non-authorities is taken.
    ConnTotal,
    /// A vote refused: not for the current or the next period.
    VoteWrongPeriod,
    /// A vote refused: not by a configured authority.
    VoteUnknownAuthority,
    /// A vote refused: another vote by the same authority for the same period is held.
    VoteConflict,
    /// A vote upload refused: every vote-reading slot is busy.
    VoteBusy,
    /// Probes that did not fit in a probing pass's time budget.
    ProbeBudget,
    /// Probes that were cut off by the per-probe timeout.
    ProbeTimeout,
}

impl Limit {
    /// Every kind, in a fixed order.
    pub const ALL: [Self; 16] = [
        Self::UploadRateAddr,
        Self::UploadRatePrefix,
        Self::SourceTableFull,
        Self::RelaysPerAddr,
        Self::RelaysPerPrefix,
        Self::TableFull,
        Self::Evicted,
        Self::ConnPerAddr,
        Self::ConnPerPrefix,
        Self::ConnTotal,
        Self::VoteWrongPeriod,
        Self::VoteUnknownAuthority,
        Self::VoteConflict,
        Self::VoteBusy,
        Self::ProbeBudget,
        Self::ProbeTimeout,
    ];

    /// A short stable name (logs, test figures).
    pub fn name(self) -> &'static str {
        match self {
            Self::UploadRateAddr => "upload_rate_addr",
            Self::UploadRatePrefix => "upload_rate_prefix",
            Self::SourceTableFull => "source_table_full",
            Self::RelaysPerAddr => "relays_per_addr",
            Self::RelaysPerPrefix => "relays_per_prefix",
            Self::TableFull => "table_full",
            Self::Evicted => "evicted",
            Self::ConnPerAddr => "conn_per_addr",
            Self::ConnPerPrefix => "conn_per_prefix",
            Self::ConnTotal => "conn_total",
            Self::VoteWrongPeriod => "vote_wrong_period",
            Self::VoteUnknownAuthority => "vote_unknown_authority",
            Self::VoteConflict => "vote_conflict",
            Self::VoteBusy => "vote_busy",
            Self::ProbeBudget => "probe_budget",
            Self::ProbeTimeout => "probe_timeout",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|l| *l == self).unwrap_or(0)
    }
}

/// How often each kind of refusal is logged at most.
pub const LOG_EVERY_SECS: u64 = 60;

/// A counter per [`Limit`], and the time each was last logged.
#[derive(Debug, Default)]
pub struct LimitLog {
    counts: [AtomicU64; Limit::ALL.len()],
    logged_at: Mutex<[Option<u64>; Limit::ALL.len()]>,
}

impl LimitLog {
    /// Count `n` hits of `limit` at `now` (unix seconds). Returns the running total when this
    /// hit should be logged (the first hit, then at most once per [`LOG_EVERY_SECS`]).
    pub fn hit_n(&self, limit: Limit, n: u64, now: u64) -> Option<u64> {
        let i = limit.index();
        let total = self.counts.get(i)?.fetch_add(n, Ordering::Relaxed) + n;
        let mut at = self.logged_at.lock().unwrap_or_else(|e| e.into_inner());
        let slot = at.get_mut(i)?;
        match *slot {
            Some(t) if now < t.saturating_add(LOG_EVERY_SECS) => None,
            _ => {
                *slot = Some(now);
                Some(total)
            }
        }
    }

    /// Count one hit and log it (rate-limited) with `what` as context.
    pub fn hit(&self, limit: Limit, now: u64, what: &str) {
        self.hit_and_log(limit, 1, now, what);
    }

    /// Count `n` hits and log them (rate-limited).
    pub fn hit_and_log(&self, limit: Limit, n: u64, now: u64, what: &str) {
        if n == 0 {
            return;
        }
        if let Some(total) = self.hit_n(limit, n, now) {
            tracing::warn!(
                limit = limit.name(),
                total,
                "authority limit hit: {what} (logged at most once a minute)"
            );
        }
    }

    /// The count of one kind.
    pub fn count(&self, limit: Limit) -> u64 {
        self.counts
            .get(limit.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every non-zero count, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Limit::ALL
            .iter()
            .map(|l| (l.name(), self.count(*l)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

// ---- token buckets ----------------------------------------------------------------------

/// A token bucket: `burst` tokens, refilled at `per_min` tokens a minute. Time in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens held, in thousandths.
    milli: u64,
    /// When `milli` was last brought up to date.
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now_ms: u64) -> Self {
        Self {
            milli: u64::from(burst) * 1000,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, burst: u32, per_min: u32, now_ms: u64) {
        let cap = u64::from(burst) * 1000;
        let dt = now_ms.saturating_sub(self.at_ms);
        // per_min tokens per 60,000 ms = per_min thousandths per 60 ms; time not yet worth a
        // thousandth stays on the clock.
        let add = dt.saturating_mul(u64::from(per_min)) / 60;
        self.milli = self.milli.saturating_add(add);
        if self.milli >= cap || per_min == 0 {
            self.milli = self.milli.min(cap);
            self.at_ms = self.at_ms.max(now_ms);
        } else {
            self.at_ms += add * 60 / u64::from(per_min);
        }
    }

    /// Whether a token is available now (without taking it).
    pub fn check(&mut self, burst: u32, per_min: u32, now_ms: u64) -> bool {
        self.refill(burst, per_min, now_ms);
        self.milli >= 1000
    }

    /// Take a token if one is available.
    pub fn take(&mut self, burst: u32, per_min: u32, now_ms: u64) -> bool {
        let ok = self.check(burst, per_min, now_ms);
        if ok {
            self.milli -= 1000;
        }
        ok
    }

    /// Whether the bucket is full at `now_ms` (forgetting it loses nothing).
    pub fn is_full(&self, burst: u32, per_min: u32, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(burst, per_min, now_ms);
        b.milli >= u64::from(burst) * 1000
    }
}

/// Rates of a [`SourceLimiter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRates {
    /// Burst per source address.
    pub addr_burst: u32,
    /// Refill per source address, tokens a minute.
    pub addr_per_min: u32,
    /// Burst per source prefix.
    pub prefix_burst: u32,
    /// Refill per source prefix, tokens a minute.
    pub prefix_per_min: u32,
    /// Most sources (addresses plus prefixes) remembered.
    pub max_sources: usize,
}

/// Token buckets per source address and per source prefix.
#[derive(Debug)]
pub struct SourceLimiter {
    rates: SourceRates,
    addrs: HashMap<IpAddr, TokenBucket>,
    prefixes: HashMap<Prefix, TokenBucket>,
}

impl SourceLimiter {
    /// An empty limiter.
    pub fn new(rates: SourceRates) -> Self {
        Self {
            rates,
            addrs: HashMap::new(),
            prefixes: HashMap::new(),
        }
    }

    /// Sources remembered (addresses plus prefixes).
    pub fn len(&self) -> usize {
        self.addrs.len() + self.prefixes.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take a token for one POST from `ip` at `now_ms`: both the address's and the prefix's
    /// bucket must have one (neither is charged when the other refuses). Returns the refusal.
    /// The second value tells whether the table was full and a source was forgotten.
    pub fn take(&mut self, ip: IpAddr, now_ms: u64) -> (Result<(), Limit>, bool) {
        let ip = canonical(ip);
        let p = Prefix::of(ip);
        let r = self.rates;
        let mut evicted = false;
        let need = usize::from(!self.addrs.contains_key(&ip))
            + usize::from(!self.prefixes.contains_key(&p));
        if need > 0 && self.len() + need > r.max_sources {
            evicted = self.make_room(need, now_ms);
        }
        let mut a = *self
            .addrs
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(r.addr_burst, now_ms));
        let mut q = *self
            .prefixes
            .entry(p)
            .or_insert_with(|| TokenBucket::full(r.prefix_burst, now_ms));
        let result = if !a.check(r.addr_burst, r.addr_per_min, now_ms) {
            Err(Limit::UploadRateAddr)
        } else if !q.check(r.prefix_burst, r.prefix_per_min, now_ms) {
            Err(Limit::UploadRatePrefix)
        } else {
            a.take(r.addr_burst, r.addr_per_min, now_ms);
            q.take(r.prefix_burst, r.prefix_per_min, now_ms);
            Ok(())
        };
        self.addrs.insert(ip, a);
        self.prefixes.insert(p, q);
        (result, evicted)
    }

    /// Forget full buckets (they hold no information); if that frees fewer than `need`
    /// entries, forget the least recently used ones. Returns whether a non-full bucket (a
    /// source that was being limited) had to be forgotten.
    fn make_room(&mut self, need: usize, now_ms: u64) -> bool {
        let r = self.rates;
        self.addrs
            .retain(|_, b| !b.is_full(r.addr_burst, r.addr_per_min, now_ms));
        self.prefixes
            .retain(|_, b| !b.is_full(r.prefix_burst, r.prefix_per_min, now_ms));
        let mut forced = false;
        while self.len() + need > r.max_sources && !self.is_empty() {
            let oldest_addr = self.addrs.iter().min_by_key(|(_, b)| b.at_ms);
            let oldest_prefix = self.prefixes.iter().min_by_key(|(_, b)| b.at_ms);
            match (oldest_addr, oldest_prefix) {
                (Some((ka, ba)), Some((_, bp))) if ba.at_ms <= bp.at_ms => {
                    let k = *ka;
                    self.addrs.remove(&k);
                }
                (_, Some((kp, _))) => {
                    let k = *kp;
                    self.prefixes.remove(&k);
                }
                (Some((ka, _)), None) => {
                    let k = *ka;
                    self.addrs.remove(&k);
                }
                (None, None) => break,
            }
            forced = true;
        }
        forced
    }
}

// ---- connection slots -------------------------------------------------------------------

/// Caps of a [`ConnLimiter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnCaps {
    /// Most connections in total.
    pub total: usize,
    /// Of `total`, slots only the authorities' addresses may use.
    pub reserved: usize,
    /// Most connections from one non-authority address.
    pub per_addr: usize,
    /// Most connections from one non-authority prefix.
    pub per_prefix: usize,
}

/// Which pool a connection slot came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The slots open to everyone.
    General,
    /// The slots reserved for authorities.
    Reserved,
}

/// Connection counts: per address and per prefix for everyone but the authorities, a general
/// pool of `total - reserved` slots, and `reserved` slots for the authorities' addresses (which
/// use the general pool too once their own is full). A client flood therefore never takes the
/// slots authorities use to push and fetch votes and signatures.
#[derive(Debug)]
pub struct ConnLimiter {
    caps: ConnCaps,
    per_addr: HashMap<IpAddr, usize>,
    per_prefix: HashMap<Prefix, usize>,
    general: usize,
    reserved: usize,
}

impl ConnLimiter {
    /// No connections yet.
    pub fn new(caps: ConnCaps) -> Self {
        let reserved = caps.reserved.min(caps.total);
        Self {
            caps: ConnCaps { reserved, ..caps },
            per_addr: HashMap::new(),
            per_prefix: HashMap::new(),
            general: 0,
            reserved: 0,
        }
    }

    /// Open a connection from `ip` (`authority`: one of the configured authorities'
    /// addresses). Give the returned pool back to [`ConnLimiter::close`].
    pub fn open(&mut self, ip: IpAddr, authority: bool) -> Result<Pool, Limit> {
        let ip = canonical(ip);
        let general_cap = self.caps.total - self.caps.reserved;
        if authority {
            if self.reserved < self.caps.reserved {
                self.reserved += 1;
                return Ok(Pool::Reserved);
            }
            if self.general < general_cap {
                self.general += 1;
                return Ok(Pool::General);
            }
            return Err(Limit::ConnTotal);
        }
        let p = Prefix::of(ip);
        if self.per_addr.get(&ip).copied().unwrap_or(0) >= self.caps.per_addr {
            return Err(Limit::ConnPerAddr);
        }
        if self.per_prefix.get(&p).copied().unwrap_or(0) >= self.caps.per_prefix {
            return Err(Limit::ConnPerPrefix);
        }
        if self.general >= general_cap {
            return Err(Limit::ConnTotal);
        }
        self.general += 1;
        *self.per_addr.entry(ip).or_insert(0) += 1;
        *self.per_prefix.entry(p).or_insert(0) += 1;
        Ok(Pool::General)
    }

    /// Close a connection opened with [`ConnLimiter::open`].
    pub fn close(&mut self, ip: IpAddr, authority: bool, pool: Pool) {
        let ip = canonical(ip);
        match pool {
            Pool::Reserved => self.reserved = self.reserved.saturating_sub(1),
            Pool::General => self.general = self.general.saturating_sub(1),
        }
        if authority {
            return;
        }
        if let Some(n) = self.per_addr.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_addr.remove(&ip);
            }
        }
        let p = Prefix::of(ip);
        if let Some(n) = self.per_prefix.get_mut(&p) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_prefix.remove(&p);
            }
        }
    }

    /// Open connections (both pools).
    pub fn open_count(&self) -> usize {
        self.general + self.reserved
    }
}

// ---- probe order ------------------------------------------------------------------------

/// A relay as the prober sees it.
#[derive(Clone, Copy, Debug)]
pub struct ProbeTarget {
    /// The relay.
    pub id: RelayId,
    /// The prefix of the address probed.
    pub prefix: Prefix,
    /// When it was last probed (`None`: never).
    pub last_probe: Option<u64>,
    /// A random tie-breaker (fresh for every pass).
    pub tiebreak: u64,
}

/// The order of a probing pass: relays never probed first, then the least recently probed,
/// in random order among equals, and taking turns between prefixes — the first relay of every
/// prefix, then the second of every prefix, and so on — so that any number of relays in one
/// prefix delay a relay of another prefix by at most one probe per prefix.
pub fn probe_order(mut targets: Vec<ProbeTarget>) -> Vec<RelayId> {
    // `None` (never probed) sorts before every `Some`.
    targets.sort_by_key(|t| (t.last_probe, t.tiebreak));
    let mut rank_in_prefix: HashMap<Prefix, usize> = HashMap::new();
    let mut keyed: Vec<(usize, usize, RelayId)> = targets
        .iter()
        .enumerate()
        .map(|(pos, t)| {
            let r = rank_in_prefix.entry(t.prefix).or_insert(0);
            let k = (*r, pos, t.id);
            *r += 1;
            k
        })
        .collect();
    // Round `r` holds the r-th relay of every prefix, in the order of their priority.
    keyed.sort_unstable_by_key(|(round, pos, _)| (*round, *pos));
    keyed.into_iter().map(|(_, _, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn prefixes_are_24_and_48_bits() {
        assert_eq!(Prefix::of(v4(1, 2, 3, 4)), Prefix::of(v4(1, 2, 3, 200)));
        assert_ne!(Prefix::of(v4(1, 2, 3, 4)), Prefix::of(v4(1, 2, 4, 4)));
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().expect("v6");
        let b: Ipv6Addr = "2001:db8:1:ffff::9".parse().expect("v6");
        let c: Ipv6Addr = "2001:db8:2::1".parse().expect("v6");
        assert_eq!(Prefix::of(IpAddr::V6(a)), Prefix::of(IpAddr::V6(b)));
        assert_ne!(Prefix::of(IpAddr::V6(a)), Prefix::of(IpAddr::V6(c)));
        let mapped = IpAddr::V6(Ipv4Addr::new(1, 2, 3, 9).to_ipv6_mapped());
        assert_eq!(Prefix::of(mapped), Prefix::of(v4(1, 2, 3, 4)));
        assert_eq!(canonical(mapped), v4(1, 2, 3, 9));
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let mut b = TokenBucket::full(3, 0);
        assert!(b.take(3, 6, 0));
        assert!(b.take(3, 6, 0));
        assert!(b.take(3, 6, 0));
        assert!(!b.take(3, 6, 0), "burst used up");
        // 6 a minute: one every 10 s.
        assert!(!b.take(3, 6, 9_999));
        assert!(b.take(3, 6, 10_000));
        assert!(!b.take(3, 6, 10_001));
        assert!(b.is_full(3, 6, 10_000 + 30_000));
    }

    fn rates() -> SourceRates {
        SourceRates {
            addr_burst: 5,
            addr_per_min: 1,
            prefix_burst: 8,
            prefix_per_min: 2,
            max_sources: 100,
        }
    }

    #[test]
    fn uploads_limited_per_address_then_per_prefix() {
        let mut l = SourceLimiter::new(rates());
        let flood = v4(10, 0, 0, 77);
        let ok = (0..100).filter(|_| l.take(flood, 1000).0.is_ok()).count();
        assert_eq!(ok, 5, "one address gets its burst and no more");
        assert_eq!(l.take(flood, 1000).0, Err(Limit::UploadRateAddr));
        // Its neighbours share the prefix budget: 3 more fit in the /24's burst of 8.
        let ok = (1..=50u8)
            .filter(|i| l.take(v4(10, 0, 0, *i), 1000).0.is_ok())
            .count();
        assert_eq!(ok, 3);
        assert_eq!(
            l.take(v4(10, 0, 0, 200), 1000).0,
            Err(Limit::UploadRatePrefix)
        );
        // Another prefix is untouched.
        assert!(l.take(v4(10, 0, 1, 1), 1000).0.is_ok());
        // A refusal by the prefix does not charge the address.
        let mut l = SourceLimiter::new(SourceRates {
            prefix_burst: 1,
            ..rates()
        });
        assert!(l.take(v4(1, 1, 1, 1), 0).0.is_ok());
        assert_eq!(l.take(v4(1, 1, 1, 2), 0).0, Err(Limit::UploadRatePrefix));
        assert!(l.take(v4(1, 1, 1, 2), 30_000).0.is_ok(), "prefix refilled");
    }

    #[test]
    fn source_table_is_bounded() {
        let mut l = SourceLimiter::new(SourceRates {
            max_sources: 10,
            ..rates()
        });
        let mut forced = 0;
        for i in 0..=255u8 {
            let (_, f) = l.take(v4(10, i, 0, 1), u64::from(i));
            forced += usize::from(f);
            assert!(l.len() <= 10, "{} sources held", l.len());
        }
        assert!(forced > 0);
        // A source still being limited is remembered while idle ones come and go: the flood
        // address used its burst and stays limited.
        let mut l = SourceLimiter::new(SourceRates {
            max_sources: 10,
            ..rates()
        });
        let flood = v4(9, 9, 9, 9);
        for _ in 0..5 {
            assert!(l.take(flood, 0).0.is_ok());
        }
        assert_eq!(l.take(flood, 0).0, Err(Limit::UploadRateAddr));
    }

    fn caps() -> ConnCaps {
        ConnCaps {
            total: 10,
            reserved: 3,
            per_addr: 2,
            per_prefix: 3,
        }
    }

    #[test]
    fn connections_capped_per_address_prefix_and_total() {
        let mut c = ConnLimiter::new(caps());
        let a = v4(127, 0, 0, 77);
        assert!(c.open(a, false).is_ok());
        assert!(c.open(a, false).is_ok());
        assert_eq!(c.open(a, false), Err(Limit::ConnPerAddr));
        assert!(c.open(v4(127, 0, 0, 78), false).is_ok());
        assert_eq!(c.open(v4(127, 0, 0, 79), false), Err(Limit::ConnPerPrefix));
        // Closing frees the slot.
        c.close(a, false, Pool::General);
        assert!(c.open(a, false).is_ok());
        // Fill the general pool (7 slots) from distinct prefixes.
        for i in 1..=4u8 {
            assert!(c.open(v4(10, i, 0, 1), false).is_ok());
        }
        assert_eq!(c.open(v4(10, 9, 0, 1), false), Err(Limit::ConnTotal));
        assert_eq!(c.open_count(), 7);
    }

    #[test]
    fn authorities_keep_reserved_slots() {
        let mut c = ConnLimiter::new(caps());
        for i in 0..7u8 {
            assert!(c.open(v4(10, i, 0, 1), false).is_ok());
        }
        assert_eq!(c.open(v4(10, 99, 0, 1), false), Err(Limit::ConnTotal));
        let auth = v4(127, 0, 0, 1);
        for _ in 0..3 {
            assert_eq!(c.open(auth, true), Ok(Pool::Reserved));
        }
        assert_eq!(c.open(auth, true), Err(Limit::ConnTotal));
        c.close(auth, true, Pool::Reserved);
        assert_eq!(c.open(auth, true), Ok(Pool::Reserved));
        // With the general pool free, authorities overflow into it.
        let mut c = ConnLimiter::new(caps());
        for _ in 0..3 {
            assert_eq!(c.open(auth, true), Ok(Pool::Reserved));
        }
        assert_eq!(c.open(auth, true), Ok(Pool::General));
    }

    fn id(n: u8) -> RelayId {
        RelayId([n; 32])
    }

    #[test]
    fn probe_order_is_fair_between_prefixes() {
        let junk = Prefix::of(v4(127, 77, 0, 1));
        let mut targets: Vec<ProbeTarget> = (0..20_000u32)
            .map(|i| ProbeTarget {
                id: RelayId({
                    let mut b = [0xEE; 32];
                    b[..4].copy_from_slice(&i.to_be_bytes());
                    b
                }),
                prefix: junk,
                last_probe: None,
                tiebreak: u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            })
            .collect();
        for n in 1..=5u8 {
            targets.push(ProbeTarget {
                id: id(n),
                prefix: Prefix::of(v4(127, 0, n, 1)),
                // Honest relays were probed recently; the junk never was.
                last_probe: Some(1000),
                tiebreak: u64::from(n),
            });
        }
        let order = probe_order(targets);
        assert_eq!(order.len(), 20_005);
        let honest_pos: Vec<usize> = (1..=5u8)
            .map(|n| order.iter().position(|x| *x == id(n)).expect("present"))
            .collect();
        // Each honest relay is in the first round: at most one junk probe before each.
        assert!(honest_pos.iter().all(|p| *p < 6), "{honest_pos:?}");
    }

    #[test]
    fn probe_order_new_then_least_recent() {
        let p = Prefix::of(v4(1, 1, 1, 1));
        let t = |n: u8, last: Option<u64>, tb: u64| ProbeTarget {
            id: id(n),
            prefix: p,
            last_probe: last,
            tiebreak: tb,
        };
        let order = probe_order(vec![
            t(1, Some(50), 0),
            t(2, None, 9),
            t(3, Some(10), 0),
            t(4, None, 1),
        ]);
        assert_eq!(order, vec![id(4), id(2), id(3), id(1)]);
        // Ties are broken by the random key.
        let a = probe_order(vec![t(1, Some(5), 2), t(2, Some(5), 1)]);
        let b = probe_order(vec![t(1, Some(5), 1), t(2, Some(5), 2)]);
        assert_eq!(a, vec![id(2), id(1)]);
        assert_eq!(b, vec![id(1), id(2)]);
    }

    #[test]
    fn limit_log_counts_every_hit_and_logs_once_a_minute() {
        let l = LimitLog::default();
        assert_eq!(l.hit_n(Limit::ConnPerAddr, 1, 100), Some(1));
        assert_eq!(l.hit_n(Limit::ConnPerAddr, 1, 130), None);
        assert_eq!(l.hit_n(Limit::ConnPerAddr, 3, 159), None);
        assert_eq!(l.hit_n(Limit::ConnPerAddr, 1, 160), Some(6));
        assert_eq!(l.hit_n(Limit::TableFull, 1, 160), Some(1));
        assert_eq!(l.count(Limit::ConnPerAddr), 6);
        assert_eq!(l.snapshot(), vec![("table_full", 1), ("conn_per_addr", 6)]);
    }
}
