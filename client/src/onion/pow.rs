//! Proof of work for introductions under load (issue 13; the idea of Tor proposal 327, "hs_pow").
//!
//! A service under an INTRODUCE flood cannot tell a real client from an attacker, but it can
//! make every introduction cost CPU time and serve the costlier ones first. With `pow = true`
//! in its `[[onion_service]]` table:
//!
//! 1. its descriptor carries [`PowParams`]: the puzzle scheme, a random 32-byte seed (replaced
//!    every [`SEED_LIFETIME_SECS`]), the effort it suggests and when the seed expires;
//! 2. a client solves the puzzle for an effort `E` ([`solve`]) and puts the solution in the
//!    encrypted part of INTRODUCE1 ([`PowSolution::to_extension`]); on a retry it doubles the
//!    effort ([`client_effort`]), up to [`MAX_CLIENT_EFFORT`];
//! 3. the service checks it ([`PowVerifier::verify`]: the seed is the current or the previous
//!    one, the hash meets `E`, the (seed, nonce) pair was not used before), and puts the
//!    accepted introduction in an [`IntroQueue`] ordered by effort, from which its driver takes
//!    rendezvous work at a bounded rate (Tor's `HiddenServicePoWQueueRate`/`Burst`);
//! 4. every [`UPDATE_PERIOD_SECS`] it recomputes the suggested effort from the queue's
//!    statistics ([`EffortController::update`]) and publishes a new descriptor when it changed.
//!
//! # The puzzle (scheme 1, `sha256-v1`)
//!
//! ```text
//! h = SHA-256("allium/v1/hs-pow" | 0x00 | u8(scheme) | seed[32] | auth_key[32] | nonce[16] | u32be(E))
//! valid  ⇔  u64be(h[0..8]) × E × 1024 ≤ 2^64 − 1
//! ```
//!
//! `auth_key` is the introduction point's auth key, so a solution is good at one introduction
//! point only. A try costs one hash, so `E` asks for about `E × 1024` hashes (a few tenths of a
//! millisecond each unit on one core; Tor's Equi-X units are of the same order), and checking
//! costs one hash. Effort 0 means no proof. Unlike Tor's Equi-X (whose `equix` crate is
//! LGPL-3.0-only, a licence this MIT/Apache workspace does not take on without its owner), a
//! plain hash puzzle is cheaper on GPUs than on CPUs; the scheme byte is an open code, so a
//! memory-hard scheme can be added beside it.
//!
//! # The suggested effort
//!
//! Every [`UPDATE_PERIOD_SECS`], with the queue's statistics for the period
//! ([`QueueStats`]):
//! - under pressure (the queue dropped an introduction, for lack of room or because it waited
//!   longer than [`QUEUE_MAX_AGE_MS`], or introductions are still waiting at the update): the
//!   new effort is the largest of the old one plus one, the mean effort of the introductions
//!   served, and the highest effort dropped, so that a client paying it would have been served;
//! - otherwise: two thirds of the old one (rounded down), so it decays to 0 when the load is gone.
//!
//! Byte layouts: docs/protocol/96-onion-services.md, "Proof of work".

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};

use allium_crypto::RelayId;
use allium_directory::hs::PowParams;
use allium_proto::relaymsg::HsExtension;
use rand::{Rng, RngExt as _};

/// The hash puzzle described in the module docs.
pub const SCHEME_SHA256_V1: u8 = 1;
/// Hashes one unit of effort asks for, on average.
pub const WORK_PER_EFFORT: u128 = 1024;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of the seed a solution names (its head).
pub const SEED_HEAD_LEN: usize = 4;
/// A seed is replaced after this long (Tor rotates its seed every few hours).
pub const SEED_LIFETIME_SECS: u64 = 2 * 3600;
/// The suggested effort is recomputed this often (Tor's `HS_UPDATE_PERIOD`, 5 minutes).
pub const UPDATE_PERIOD_SECS: u64 = 300;
/// Most effort a client spends on one introduction (Tor's client cap, 10 000).
pub const MAX_CLIENT_EFFORT: u32 = 10_000;
/// Effort of a client's first retry when the descriptor suggests less.
pub const MIN_RETRY_EFFORT: u32 = 8;
/// Highest effort the service ever suggests.
pub const MAX_SUGGESTED_EFFORT: u32 = MAX_CLIENT_EFFORT;
/// Default rate at which queued introductions are served, per second (Tor's
/// `HiddenServicePoWQueueRate`).
pub const DEFAULT_QUEUE_RATE: u32 = 250;
/// Default burst of the same (Tor's `HiddenServicePoWQueueBurst`).
pub const DEFAULT_QUEUE_BURST: u32 = 2500;
/// An introduction that waited this long is dropped: its client gave up.
pub const QUEUE_MAX_AGE_MS: u64 = 30_000;
/// Most introductions queued, whatever the rate.
pub const QUEUE_MAX_LEN: usize = 16_384;
/// Most (seed, nonce) pairs remembered per seed; past it the seed is replaced early.
pub const MAX_NONCES_PER_SEED: usize = 65_536;

/// One proof of work, as it travels in the INTRODUCE1 encrypted part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowSolution {
    /// Puzzle scheme ([`SCHEME_SHA256_V1`]).
    pub scheme: u8,
    /// The nonce that solves it.
    pub nonce: [u8; NONCE_LEN],
    /// The effort it was solved for.
    pub effort: u32,
    /// The first bytes of the seed it was solved with.
    pub seed_head: [u8; SEED_HEAD_LEN],
    /// Scheme-specific solution bytes (none for [`SCHEME_SHA256_V1`]; at most 64).
    pub solution: Vec<u8>,
}

/// A proof-of-work extension that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed proof-of-work extension: {0}")]
pub struct BadPowExtension(pub &'static str);

/// Longest scheme-specific solution accepted.
pub const MAX_SOLUTION_LEN: usize = 64;

impl PowSolution {
    /// The extension (type [`HsExtension::POW`]):
    /// `scheme u8 | nonce[16] | u32be(effort) | seed_head[4] | solution`.
    pub fn to_extension(&self) -> HsExtension {
        let mut value = Vec::with_capacity(25 + self.solution.len());
        value.push(self.scheme);
        value.extend_from_slice(&self.nonce);
        value.extend_from_slice(&self.effort.to_be_bytes());
        value.extend_from_slice(&self.seed_head);
        value.extend_from_slice(&self.solution[..self.solution.len().min(MAX_SOLUTION_LEN)]);
        HsExtension {
            ty: HsExtension::POW,
            value,
        }
    }

    /// Parse the value of a [`HsExtension::POW`] extension.
    pub fn from_extension(ext: &HsExtension) -> Result<Self, BadPowExtension> {
        if ext.ty != HsExtension::POW {
            return Err(BadPowExtension("not a proof-of-work extension"));
        }
        let (scheme, r) = ext
            .value
            .split_first()
            .ok_or(BadPowExtension("truncated"))?;
        let (nonce, r) = r
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(BadPowExtension("truncated"))?;
        let (effort, r) = r
            .split_first_chunk::<4>()
            .ok_or(BadPowExtension("truncated"))?;
        let (seed_head, r) = r
            .split_first_chunk::<SEED_HEAD_LEN>()
            .ok_or(BadPowExtension("truncated"))?;
        if r.len() > MAX_SOLUTION_LEN {
            return Err(BadPowExtension("solution too long"));
        }
        Ok(Self {
            scheme: *scheme,
            nonce: *nonce,
            effort: u32::from_be_bytes(*effort),
            seed_head: *seed_head,
            solution: r.to_vec(),
        })
    }
}

fn seed_head(seed: &[u8; 32]) -> [u8; SEED_HEAD_LEN] {
    let mut h = [0u8; SEED_HEAD_LEN];
    h.copy_from_slice(&seed[..SEED_HEAD_LEN]);
    h
}

/// Whether `nonce` solves scheme 1 for `seed`, `auth_key` and `effort`.
fn meets(seed: &[u8; 32], auth_key: &RelayId, nonce: &[u8; NONCE_LEN], effort: u32) -> bool {
    let h = allium_crypto::hs::pow_hash(&[
        &[SCHEME_SHA256_V1],
        seed,
        auth_key.as_bytes(),
        nonce,
        &effort.to_be_bytes(),
    ]);
    let mut head = [0u8; 8];
    head.copy_from_slice(&h[..8]);
    u128::from(u64::from_be_bytes(head)) * u128::from(effort) * WORK_PER_EFFORT
        <= u128::from(u64::MAX)
}

/// The effort a client uses on its `retry`-th attempt (0: the first) at a service whose
/// descriptor suggests `suggested`: the suggestion first, then doubling from at least
/// [`MIN_RETRY_EFFORT`] on each retry (Tor's client does the same), never above
/// [`MAX_CLIENT_EFFORT`].
pub fn client_effort(suggested: u32, retry: u32) -> u32 {
    let first = suggested.min(MAX_CLIENT_EFFORT);
    if retry == 0 {
        return first;
    }
    let base = u64::from(first.max(MIN_RETRY_EFFORT));
    let e = base.saturating_mul(1u64 << retry.min(32));
    u32::try_from(e.min(u64::from(MAX_CLIENT_EFFORT))).unwrap_or(MAX_CLIENT_EFFORT)
}

/// Solve the puzzle of `params` for introduction point `auth_key` at `effort` (client side; the
/// driver runs it off the async threads, it takes about `effort` milliseconds). `None`: the
/// scheme is unknown, the effort is 0 (nothing to prove), or no nonce was found in `max_tries`
/// hashes (give [`max_tries_for`] for a failure chance below e^-40).
pub fn solve<R: Rng + ?Sized>(
    params: &PowParams,
    auth_key: &RelayId,
    effort: u32,
    max_tries: u64,
    rng: &mut R,
) -> Option<PowSolution> {
    solve_until(params, auth_key, effort, max_tries, rng, &|| true)
}

/// Hashes tried between two looks at the `keep_going` of [`solve_until`].
pub const SOLVE_CHECK_EVERY: u64 = 4096;

/// [`solve`] that gives up (`None`) as soon as `keep_going` says so; it is asked every
/// [`SOLVE_CHECK_EVERY`] hashes (the driver's solver stops when the connection it works for is
/// dropped).
pub fn solve_until<R: Rng + ?Sized>(
    params: &PowParams,
    auth_key: &RelayId,
    effort: u32,
    max_tries: u64,
    rng: &mut R,
    keep_going: &dyn Fn() -> bool,
) -> Option<PowSolution> {
    if params.scheme != SCHEME_SHA256_V1 || effort == 0 {
        return None;
    }
    let mut start = [0u8; NONCE_LEN];
    rng.fill(&mut start[..]);
    let mut n = u128::from_le_bytes(start);
    for i in 0..max_tries {
        if i % SOLVE_CHECK_EVERY == 0 && i > 0 && !keep_going() {
            return None;
        }
        let nonce = n.to_le_bytes();
        if meets(&params.seed, auth_key, &nonce, effort) {
            return Some(PowSolution {
                scheme: SCHEME_SHA256_V1,
                nonce,
                effort,
                seed_head: seed_head(&params.seed),
                solution: Vec::new(),
            });
        }
        n = n.wrapping_add(1);
    }
    None
}

/// Tries that find a solution at `effort` except with probability below e^-40.
pub fn max_tries_for(effort: u32) -> u64 {
    let t = u128::from(effort.max(1)) * WORK_PER_EFFORT * 40;
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Why a proof of work was refused (nothing goes back to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PowRefusal {
    /// Unknown scheme, malformed extension, or the nonce does not meet the effort claimed.
    #[error("invalid proof of work")]
    Invalid,
    /// The seed named is neither the current nor the previous one.
    #[error("proof of work for an unknown or expired seed")]
    StaleSeed,
    /// The same (seed, nonce) was accepted before.
    #[error("proof of work replayed")]
    Replay,
}

struct Seed {
    seed: [u8; 32],
    /// Unix time it stops being current.
    expires: u64,
    used: HashSet<[u8; NONCE_LEN]>,
}

/// The service's proof-of-work state: the current and previous seeds, the nonces used under
/// each, and the effort it suggests.
pub struct PowVerifier {
    current: Seed,
    previous: Option<Seed>,
    controller: EffortController,
}

impl std::fmt::Debug for PowVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowVerifier")
            .field("suggested_effort", &self.controller.suggested())
            .finish_non_exhaustive()
    }
}

impl PowVerifier {
    /// A fresh state at `now_unix`, suggesting effort 0.
    pub fn new<R: Rng + ?Sized>(now_unix: u64, rng: &mut R) -> Self {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed[..]);
        Self {
            current: Seed {
                seed,
                expires: now_unix.saturating_add(SEED_LIFETIME_SECS),
                used: HashSet::new(),
            },
            previous: None,
            controller: EffortController::new(now_unix),
        }
    }

    /// The parameters to publish in the descriptor.
    pub fn params(&self) -> PowParams {
        PowParams {
            scheme: SCHEME_SHA256_V1,
            seed: self.current.seed,
            suggested_effort: self.controller.suggested(),
            expires: self.current.expires,
        }
    }

    /// The effort suggested now.
    pub fn suggested_effort(&self) -> u32 {
        self.controller.suggested()
    }

    /// Replace the seed if it expired (or its nonce set is full): the current one becomes the
    /// previous one, still accepted until the new one expires. Returns whether it changed
    /// (a new descriptor is then due).
    pub fn rotate_if_due<R: Rng + ?Sized>(&mut self, now_unix: u64, rng: &mut R) -> bool {
        if now_unix < self.current.expires && self.current.used.len() < MAX_NONCES_PER_SEED {
            return false;
        }
        let mut seed = [0u8; 32];
        // A new seed whose head differs from the one it replaces (the head names the seed).
        loop {
            rng.fill(&mut seed[..]);
            if seed_head(&seed) != seed_head(&self.current.seed) {
                break;
            }
        }
        let new = Seed {
            seed,
            expires: now_unix.saturating_add(SEED_LIFETIME_SECS),
            used: HashSet::new(),
        };
        self.previous = Some(std::mem::replace(&mut self.current, new));
        true
    }

    /// Check the proof in an INTRODUCE2 for introduction point `auth_key` at `now_unix`;
    /// `None` (no proof) counts as effort 0. Returns the effort to queue it with.
    pub fn verify(
        &mut self,
        sol: Option<&PowSolution>,
        auth_key: &RelayId,
        now_unix: u64,
    ) -> Result<u32, PowRefusal> {
        let Some(sol) = sol else {
            return Ok(0);
        };
        if sol.scheme != SCHEME_SHA256_V1 || !sol.solution.is_empty() {
            return Err(PowRefusal::Invalid);
        }
        if sol.effort == 0 {
            return Ok(0);
        }
        let prev_ok = self
            .previous
            .as_ref()
            .is_some_and(|p| now_unix < p.expires.saturating_add(SEED_LIFETIME_SECS));
        let seed = if seed_head(&self.current.seed) == sol.seed_head {
            &mut self.current
        } else {
            match self.previous.as_mut() {
                Some(p) if prev_ok && seed_head(&p.seed) == sol.seed_head => p,
                _ => return Err(PowRefusal::StaleSeed),
            }
        };
        if seed.used.contains(&sol.nonce) {
            return Err(PowRefusal::Replay);
        }
        if seed.used.len() >= MAX_NONCES_PER_SEED {
            // Full: refuse rather than forget; the seed is replaced at the next rotation check.
            return Err(PowRefusal::StaleSeed);
        }
        if !meets(&seed.seed, auth_key, &sol.nonce, sol.effort) {
            return Err(PowRefusal::Invalid);
        }
        seed.used.insert(sol.nonce);
        Ok(sol.effort)
    }

    /// The effort controller (per-period update from the queue's statistics).
    pub fn controller_mut(&mut self) -> &mut EffortController {
        &mut self.controller
    }
}

/// What the queue saw during one update period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Introductions taken out to be served.
    pub served: u64,
    /// Sum of their efforts.
    pub served_effort: u64,
    /// Introductions dropped (no room, or waited too long).
    pub dropped: u64,
    /// Highest effort among the dropped.
    pub max_dropped_effort: u32,
    /// Introductions still waiting at the end of the period.
    pub waiting: usize,
}

/// The suggested effort, updated once per [`UPDATE_PERIOD_SECS`] (rule in the module docs).
#[derive(Clone, Debug)]
pub struct EffortController {
    suggested: u32,
    next_update: u64,
}

impl EffortController {
    /// Suggesting 0, first update one period after `now_unix`.
    pub fn new(now_unix: u64) -> Self {
        Self {
            suggested: 0,
            next_update: now_unix.saturating_add(UPDATE_PERIOD_SECS),
        }
    }

    /// The effort suggested now.
    pub fn suggested(&self) -> u32 {
        self.suggested
    }

    /// Whether an update is due at `now_unix`.
    pub fn due(&self, now_unix: u64) -> bool {
        now_unix >= self.next_update
    }

    /// Unix time of the next update.
    pub fn next_update(&self) -> u64 {
        self.next_update
    }

    /// Apply the rule to one period's `stats`; returns the new suggestion.
    pub fn update(&mut self, stats: &QueueStats, now_unix: u64) -> u32 {
        self.next_update = now_unix.saturating_add(UPDATE_PERIOD_SECS);
        let pressure = stats.dropped > 0 || stats.waiting > 0;
        self.suggested = if pressure {
            let mean = stats
                .served_effort
                .checked_div(stats.served)
                .unwrap_or(0)
                .min(u64::from(u32::MAX)) as u32;
            self.suggested
                .saturating_add(1)
                .max(mean)
                .max(stats.max_dropped_effort)
                .min(MAX_SUGGESTED_EFFORT)
        } else {
            // Two thirds, rounded down (1 → 0).
            (u64::from(self.suggested) * 2 / 3) as u32
        };
        self.suggested
    }
}

struct Queued<T> {
    item: T,
    since_ms: u64,
}

/// Accepted introductions waiting for a rendezvous, highest effort first (oldest first within
/// one effort), bounded in length and age, served at a token-bucket rate.
///
/// Time is milliseconds on any clock that does not go back (the driver's monotonic clock).
pub struct IntroQueue<T> {
    map: BTreeMap<(u32, Reverse<u64>), Queued<T>>,
    seq: u64,
    capacity: usize,
    max_age_ms: u64,
    rate: u32,
    burst: u32,
    /// Tokens × 1000.
    tokens_milli: u64,
    last_ms: u64,
    stats: QueueStats,
    /// Dropped since the queue was made (for the operator's counter).
    dropped_total: u64,
}

impl<T> std::fmt::Debug for IntroQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntroQueue")
            .field("len", &self.map.len())
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

/// What [`IntroQueue::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T> {
    /// Queued; nothing was dropped.
    Queued,
    /// Queued, and the lowest-effort entry (returned) was dropped to make room.
    Evicted(T),
    /// Not queued: the queue is full of higher-or-equal efforts (the item comes back).
    Refused(T),
}

impl<T> IntroQueue<T> {
    /// A queue served at `rate` per second with bursts of `burst` (both at least 1), holding at
    /// most what it can serve in [`QUEUE_MAX_AGE_MS`] (at least 16, at most [`QUEUE_MAX_LEN`]).
    /// Starts with a full bucket at `now_ms`.
    pub fn new(rate: u32, burst: u32, now_ms: u64) -> Self {
        let rate = rate.max(1);
        let burst = burst.max(1);
        let capacity = (u64::from(rate) * QUEUE_MAX_AGE_MS / 1000)
            .max(u64::from(burst))
            .clamp(16, QUEUE_MAX_LEN as u64) as usize;
        Self::with_capacity(rate, burst, capacity, QUEUE_MAX_AGE_MS, now_ms)
    }

    /// [`IntroQueue::new`] with an explicit capacity and age limit.
    pub fn with_capacity(
        rate: u32,
        burst: u32,
        capacity: usize,
        max_age_ms: u64,
        now_ms: u64,
    ) -> Self {
        let burst = burst.max(1);
        Self {
            map: BTreeMap::new(),
            seq: 0,
            capacity: capacity.clamp(1, QUEUE_MAX_LEN),
            max_age_ms,
            rate: rate.max(1),
            burst,
            tokens_milli: u64::from(burst) * 1000,
            last_ms: now_ms,
            stats: QueueStats::default(),
            dropped_total: 0,
        }
    }

    /// Number waiting.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Its capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Introductions dropped since the queue was made (no room, or waited too long).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    fn note_dropped(&mut self, effort: u32) {
        self.dropped_total = self.dropped_total.saturating_add(1);
        self.stats.dropped = self.stats.dropped.saturating_add(1);
        self.stats.max_dropped_effort = self.stats.max_dropped_effort.max(effort);
    }

    /// Queue `item` with `effort` at `now_ms`. When full, the lowest-effort entry goes (the
    /// newest of equal ones), or `item` itself if nothing queued has less effort.
    pub fn push(&mut self, item: T, effort: u32, now_ms: u64) -> Pushed<T> {
        let mut out = Pushed::Queued;
        if self.map.len() >= self.capacity {
            let lowest = self.map.first_key_value().map(|(k, _)| k.0);
            match lowest {
                Some(low) if low < effort => {
                    if let Some(((e, _), q)) = self.map.pop_first() {
                        self.note_dropped(e);
                        out = Pushed::Evicted(q.item);
                    }
                }
                _ => {
                    self.note_dropped(effort);
                    return Pushed::Refused(item);
                }
            }
        }
        self.seq = self.seq.wrapping_add(1);
        self.map.insert(
            (effort, Reverse(self.seq)),
            Queued {
                item,
                since_ms: now_ms,
            },
        );
        out
    }

    fn refill(&mut self, now_ms: u64) {
        let dt = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = u64::from(self.burst) * 1000;
        self.tokens_milli = self
            .tokens_milli
            .saturating_add(dt.saturating_mul(u64::from(self.rate)))
            .min(cap);
    }

    /// The next introduction to serve at `now_ms` (highest effort, oldest first), if the rate
    /// allows one now. Entries older than the age limit are dropped on the way.
    pub fn pop(&mut self, now_ms: u64) -> Option<(T, u32)> {
        self.refill(now_ms);
        if self.tokens_milli < 1000 {
            return None;
        }
        while let Some(((effort, _), q)) = self.map.pop_last() {
            if now_ms.saturating_sub(q.since_ms) > self.max_age_ms {
                self.note_dropped(effort);
                continue;
            }
            self.tokens_milli -= 1000;
            self.stats.served = self.stats.served.saturating_add(1);
            self.stats.served_effort = self.stats.served_effort.saturating_add(u64::from(effort));
            return Some((q.item, effort));
        }
        None
    }

    /// When [`IntroQueue::pop`] may give something: `None` if empty, else `now_ms` or the time
    /// the next token arrives.
    pub fn next_pop_at(&self, now_ms: u64) -> Option<u64> {
        if self.map.is_empty() {
            return None;
        }
        let dt = now_ms.saturating_sub(self.last_ms);
        let have = self
            .tokens_milli
            .saturating_add(dt.saturating_mul(u64::from(self.rate)));
        if have >= 1000 {
            Some(now_ms)
        } else {
            Some(now_ms.saturating_add((1000 - have).div_ceil(u64::from(self.rate))))
        }
    }

    /// Drop the entries that waited longer than the age limit at `now_ms`.
    pub fn trim_expired(&mut self, now_ms: u64) {
        let max_age = self.max_age_ms;
        let old: Vec<(u32, Reverse<u64>)> = self
            .map
            .iter()
            .filter(|(_, q)| now_ms.saturating_sub(q.since_ms) > max_age)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.map.remove(&k);
            self.note_dropped(k.0);
        }
    }

    /// The statistics since the last call (expired entries trimmed first; `waiting` is the
    /// length now), and start a new period.
    pub fn take_stats(&mut self, now_ms: u64) -> QueueStats {
        self.trim_expired(now_ms);
        let mut s = std::mem::take(&mut self.stats);
        s.waiting = self.map.len();
        s
    }
}

/// A service's proof-of-work settings (from its `[[onion_service]]` table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowConfig {
    /// Introductions served per second from the queue.
    pub queue_rate: u32,
    /// Burst of the same.
    pub queue_burst: u32,
}

impl Default for PowConfig {
    fn default() -> Self {
        Self {
            queue_rate: DEFAULT_QUEUE_RATE,
            queue_burst: DEFAULT_QUEUE_BURST,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: [u8; 32], effort: u32) -> PowParams {
        PowParams {
            scheme: SCHEME_SHA256_V1,
            seed,
            suggested_effort: effort,
            expires: 10_000,
        }
    }

    const AUTH: RelayId = RelayId([7; 32]);

    fn random_seed<R: Rng + ?Sized>(rng: &mut R) -> [u8; 32] {
        let mut s = [0u8; 32];
        rng.fill(&mut s[..]);
        s
    }

    #[test]
    fn a_valid_solution_is_accepted_once() {
        let mut rng = rand::rng();
        let mut v = PowVerifier::new(1000, &mut rng);
        let p = v.params();
        let sol = solve(&p, &AUTH, 4, max_tries_for(4), &mut rng).expect("solves");
        assert_eq!(sol.effort, 4);
        // Round trip through the extension.
        let ext = sol.to_extension();
        assert_eq!(ext.ty, HsExtension::POW);
        assert_eq!(ext.value.len(), 25);
        let back = PowSolution::from_extension(&ext).expect("parses");
        assert_eq!(back, sol);
        assert_eq!(v.verify(Some(&back), &AUTH, 1001), Ok(4));
        // Replay of the same (seed, nonce) refused.
        assert_eq!(v.verify(Some(&back), &AUTH, 1002), Err(PowRefusal::Replay));
        // No proof is effort 0.
        assert_eq!(v.verify(None, &AUTH, 1002), Ok(0));
    }

    #[test]
    fn a_wrong_solution_is_refused() {
        let mut rng = rand::rng();
        let mut v = PowVerifier::new(1000, &mut rng);
        let p = v.params();
        let sol = solve(&p, &AUTH, 4, max_tries_for(4), &mut rng).expect("solves");
        // For another introduction point.
        assert_eq!(
            v.verify(Some(&sol), &RelayId([8; 32]), 1001),
            Err(PowRefusal::Invalid)
        );
        // Claiming a higher effort than solved: find a nonce that meets 4 but not 4096.
        let mut hi = sol.clone();
        hi.effort = 4096;
        let ok_at_4096 = meets(&p.seed, &AUTH, &hi.nonce, 4096);
        if !ok_at_4096 {
            assert_eq!(v.verify(Some(&hi), &AUTH, 1001), Err(PowRefusal::Invalid));
        }
        // Altered nonce: fails unless it happens to meet effort 4 (chance 1/4).
        let mut fails = 0;
        for b in 0..=255u8 {
            let mut bad = sol.clone();
            bad.nonce[15] ^= 0x80;
            bad.nonce[0] = b;
            if v.verify(Some(&bad), &AUTH, 1001) == Err(PowRefusal::Invalid) {
                fails += 1;
            }
        }
        assert!(fails > 128, "only {fails} of 256 altered nonces refused");
        // Unknown scheme, stray solution bytes.
        let mut s2 = sol.clone();
        s2.scheme = 9;
        assert_eq!(v.verify(Some(&s2), &AUTH, 1001), Err(PowRefusal::Invalid));
        let mut s3 = sol.clone();
        s3.solution = vec![1];
        assert_eq!(v.verify(Some(&s3), &AUTH, 1001), Err(PowRefusal::Invalid));
        // The untouched one is still good.
        assert_eq!(v.verify(Some(&sol), &AUTH, 1001), Ok(4));
    }

    #[test]
    fn seeds_rotate_and_stale_ones_are_refused() {
        let mut rng = rand::rng();
        let t0 = 1_000_000;
        let mut v = PowVerifier::new(t0, &mut rng);
        let old = v.params();
        let s_old = solve(&old, &AUTH, 2, max_tries_for(2), &mut rng).expect("solves");
        assert!(!v.rotate_if_due(t0 + 10, &mut rng));
        assert!(v.rotate_if_due(t0 + SEED_LIFETIME_SECS, &mut rng));
        let cur = v.params();
        assert_ne!(cur.seed, old.seed);
        assert_eq!(cur.expires, t0 + 2 * SEED_LIFETIME_SECS);
        // The previous seed is still accepted.
        assert_eq!(
            v.verify(Some(&s_old), &AUTH, t0 + SEED_LIFETIME_SECS + 1),
            Ok(2)
        );
        // After a second rotation it is gone.
        assert!(v.rotate_if_due(t0 + 2 * SEED_LIFETIME_SECS, &mut rng));
        let s_old2 = solve(&old, &AUTH, 2, max_tries_for(2), &mut rng).expect("solves");
        assert_eq!(
            v.verify(Some(&s_old2), &AUTH, t0 + 2 * SEED_LIFETIME_SECS + 1),
            Err(PowRefusal::StaleSeed)
        );
        // A seed never published.
        let other = params(random_seed(&mut rng), 2);
        let s = solve(&other, &AUTH, 2, max_tries_for(2), &mut rng).expect("solves");
        if s.seed_head != seed_head(&v.params().seed) {
            assert_eq!(
                v.verify(Some(&s), &AUTH, t0 + 2 * SEED_LIFETIME_SECS + 1),
                Err(PowRefusal::StaleSeed)
            );
        }
    }

    #[test]
    fn malformed_extensions_are_refused() {
        let sol = PowSolution {
            scheme: 1,
            nonce: [1; 16],
            effort: 77,
            seed_head: [1, 2, 3, 4],
            solution: vec![],
        };
        let ext = sol.to_extension();
        // Byte layout.
        assert_eq!(ext.value[0], 1);
        assert_eq!(&ext.value[1..17], &[1; 16]);
        assert_eq!(&ext.value[17..21], &77u32.to_be_bytes());
        assert_eq!(&ext.value[21..25], &[1, 2, 3, 4]);
        for n in 0..25 {
            let cut = HsExtension {
                ty: HsExtension::POW,
                value: ext.value[..n].to_vec(),
            };
            assert!(PowSolution::from_extension(&cut).is_err());
        }
        let long = HsExtension {
            ty: HsExtension::POW,
            value: [ext.value.clone(), vec![0; 65]].concat(),
        };
        assert!(PowSolution::from_extension(&long).is_err());
        let other = HsExtension {
            ty: 9,
            value: ext.value,
        };
        assert!(PowSolution::from_extension(&other).is_err());
    }

    #[test]
    fn a_solver_stops_when_told() {
        let mut rng = rand::rng();
        let p = params(random_seed(&mut rng), 0);
        // An effort no one finds (about 2^52 hashes): only the stop ends it.
        let asked = std::cell::Cell::new(0u32);
        let keep_going = || {
            asked.set(asked.get() + 1);
            asked.get() < 3
        };
        let r = solve_until(&p, &AUTH, u32::MAX, u64::MAX, &mut rng, &keep_going);
        assert!(r.is_none());
        assert_eq!(asked.get(), 3, "asked every {SOLVE_CHECK_EVERY} hashes");
        // Left to run, the same solver finds an easy one.
        assert!(solve_until(&p, &AUTH, 2, max_tries_for(2), &mut rng, &|| true).is_some());
    }

    #[test]
    fn client_effort_doubles_and_is_bounded() {
        assert_eq!(client_effort(0, 0), 0);
        assert_eq!(client_effort(0, 1), 2 * MIN_RETRY_EFFORT);
        assert_eq!(client_effort(100, 0), 100);
        assert_eq!(client_effort(100, 1), 200);
        assert_eq!(client_effort(100, 2), 400);
        assert_eq!(client_effort(100, 60), MAX_CLIENT_EFFORT);
        assert_eq!(client_effort(u32::MAX, 0), MAX_CLIENT_EFFORT);
        // No solution for effort 0 or an unknown scheme.
        let mut rng = rand::rng();
        let mut p = params([3; 32], 0);
        assert!(solve(&p, &AUTH, 0, 100, &mut rng).is_none());
        p.scheme = 2;
        assert!(solve(&p, &AUTH, 5, 100_000, &mut rng).is_none());
    }

    #[test]
    fn the_queue_serves_highest_effort_first_and_drops_the_lowest() {
        let mut q = IntroQueue::with_capacity(1000, 1000, 4, 30_000, 0);
        assert_eq!(q.push("a", 5, 0), Pushed::Queued);
        assert_eq!(q.push("b", 50, 0), Pushed::Queued);
        assert_eq!(q.push("c", 5, 1), Pushed::Queued);
        assert_eq!(q.push("d", 20, 1), Pushed::Queued);
        // Full: effort 1 is refused, effort 30 evicts the newest effort-5 entry.
        assert_eq!(q.push("e", 1, 2), Pushed::Refused("e"));
        assert_eq!(q.push("f", 30, 2), Pushed::Evicted("c"));
        assert_eq!(q.len(), 4);
        let order: Vec<_> = std::iter::from_fn(|| q.pop(3)).collect();
        assert_eq!(order, vec![("b", 50), ("f", 30), ("d", 20), ("a", 5)]);
        let s = q.take_stats(4);
        assert_eq!(s.served, 4);
        assert_eq!(s.served_effort, 105);
        assert_eq!(s.dropped, 2);
        assert_eq!(s.max_dropped_effort, 5);
        assert_eq!(s.waiting, 0);
        // Equal efforts: oldest first.
        q.push("x", 7, 10);
        q.push("y", 7, 11);
        assert_eq!(q.pop(12), Some(("x", 7)));
        assert_eq!(q.pop(12), Some(("y", 7)));
    }

    #[test]
    fn the_queue_is_served_at_its_rate_and_drops_old_entries() {
        // 10 per second, burst 2.
        let mut q = IntroQueue::with_capacity(10, 2, 100, 5_000, 0);
        for i in 0..6 {
            q.push(i, 1, 0);
        }
        assert!(q.pop(0).is_some());
        assert!(q.pop(0).is_some());
        assert_eq!(q.pop(0), None, "burst spent");
        assert_eq!(q.next_pop_at(0), Some(100));
        assert_eq!(q.pop(99), None);
        assert!(q.pop(100).is_some());
        // Entries that waited longer than the age limit are dropped, not served.
        assert_eq!(q.pop(6_000), None);
        assert!(q.is_empty());
        assert_eq!(q.next_pop_at(6_000), None);
        let s = q.take_stats(6_000);
        assert_eq!((s.served, s.dropped), (3, 3));
        // The default sizing follows the rate.
        let d: IntroQueue<()> = IntroQueue::new(DEFAULT_QUEUE_RATE, DEFAULT_QUEUE_BURST, 0);
        assert_eq!(d.capacity(), 7_500);
    }

    #[test]
    fn the_suggested_effort_rises_under_load_and_decays_after() {
        let mut c = EffortController::new(0);
        assert!(!c.due(UPDATE_PERIOD_SECS - 1));
        assert!(c.due(UPDATE_PERIOD_SECS));
        // Drive a queue at 5/s with 20 arrivals/s, efforts from the current suggestion.
        let mut q = IntroQueue::with_capacity(5, 5, 50, 30_000, 0);
        let mut now_ms = 0u64;
        let mut history = vec![];
        for period in 1..=6u64 {
            let end = period * UPDATE_PERIOD_SECS * 1000;
            while now_ms < end {
                // Half the arrivals pay the suggestion, half pay nothing.
                let e = if (now_ms / 50).is_multiple_of(2) {
                    c.suggested()
                } else {
                    0
                };
                q.push((), e, now_ms);
                while q.pop(now_ms).is_some() {}
                now_ms += 50;
            }
            let s = q.take_stats(now_ms);
            history.push(c.update(&s, now_ms / 1000));
        }
        assert!(
            history.windows(2).all(|w| w[1] > w[0]),
            "rises under load: {history:?}"
        );
        // Load gone: it decays to 0.
        let mut quiet = vec![];
        for _ in 0..20 {
            now_ms += UPDATE_PERIOD_SECS * 1000;
            while q.pop(now_ms).is_some() {}
            let s = q.take_stats(now_ms);
            quiet.push(c.update(&s, now_ms / 1000));
        }
        assert!(quiet.windows(2).all(|w| w[1] <= w[0]), "{quiet:?}");
        assert_eq!(quiet.last(), Some(&0));
        // Drops of a high effort pull the suggestion up to it at once.
        let s = QueueStats {
            dropped: 3,
            max_dropped_effort: 900,
            ..QueueStats::default()
        };
        assert_eq!(c.update(&s, now_ms / 1000), 900);
        // Bounded.
        let s = QueueStats {
            dropped: 1,
            max_dropped_effort: u32::MAX,
            ..QueueStats::default()
        };
        assert_eq!(c.update(&s, now_ms / 1000), MAX_SUGGESTED_EFFORT);
    }
}
