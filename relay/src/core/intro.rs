//! The introduction-point registry (rend-spec-v3 §3.1-3.2's role, Allium's rules): auth key →
//! the service's introduction circuit, and a replay cache of INTRODUCE1 encrypted parts per key.
//!
//! Sans-IO and generic over the driver's circuit handle `H` (a reactor's queue sender, or a
//! test harness index): the registry decides, the driver delivers. Invariants:
//! - one registration per auth key (a new ESTABLISH_INTRO for the key replaces the old one, whose
//!   handle is handed back so the driver can close that circuit) and per circuit;
//! - at most `max_registrations` keys; a full registry refuses new keys (a replacement is fine);
//! - each key's replay cache holds at most `replay_max` entries for at most `replay_ttl`: the
//!   oldest entry goes first when it is full, so memory is bounded whatever clients send.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use allium_crypto::RelayId;
use allium_crypto::ctlauth::hmac_sha256;
use allium_proto::relaymsg::{Introduce, IntroduceStatus};

/// A driver-chosen identifier of a circuit at this relay (unique while the circuit lives).
pub type CircKey = u64;

/// Default most introduction registrations at one relay.
pub const MAX_INTRO_REGISTRATIONS: usize = 4096;
/// Default replay-cache entries per auth key.
pub const REPLAY_CACHE_PER_KEY: usize = 4096;
/// Default time an INTRODUCE1 is remembered (a service rotates intro keys well before this
/// matters; Tor keeps its replay cache for the intro point's lifetime, bounded likewise).
pub const REPLAY_TTL: Duration = Duration::from_secs(3600);

/// Why an ESTABLISH_INTRO could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The registry holds its maximum of keys.
    #[error("introduction registry full ({max} keys)")]
    Full {
        /// The limit.
        max: usize,
    },
    /// This circuit is already an introduction circuit.
    #[error("circuit already registered as an introduction circuit")]
    CircuitTaken,
}

/// Bounded, time-limited set of digests of INTRODUCE1 encrypted parts.
#[derive(Debug)]
struct ReplayCache {
    seen: HashMap<[u8; 32], Instant>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl ReplayCache {
    fn new() -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((d, t)) = self.order.front().copied() {
            if now.saturating_duration_since(t) < ttl {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&d) == Some(&t) {
                self.seen.remove(&d);
            }
        }
    }

    /// Whether `digest` was seen (within the TTL); records it if not.
    fn check_and_insert(
        &mut self,
        digest: [u8; 32],
        now: Instant,
        max: usize,
        ttl: Duration,
    ) -> bool {
        self.expire(now, ttl);
        if self.seen.contains_key(&digest) {
            return true;
        }
        while self.order.len() >= max.max(1) {
            if let Some((d, t)) = self.order.pop_front()
                && self.seen.get(&d) == Some(&t)
            {
                self.seen.remove(&d);
            }
        }
        self.seen.insert(digest, now);
        self.order.push_back((digest, now));
        false
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

struct Entry<H> {
    circ: CircKey,
    handle: H,
    replay: ReplayCache,
}

/// The introduction-point registry of one relay.
pub struct IntroRegistry<H> {
    by_key: HashMap<RelayId, Entry<H>>,
    by_circ: HashMap<CircKey, RelayId>,
    max_registrations: usize,
    replay_max: usize,
    replay_ttl: Duration,
    replays_refused: u64,
}

impl<H> std::fmt::Debug for IntroRegistry<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntroRegistry")
            .field("registrations", &self.by_key.len())
            .field("replays_refused", &self.replays_refused)
            .finish_non_exhaustive()
    }
}

impl<H: Clone> IntroRegistry<H> {
    /// An empty registry with these limits.
    pub fn new(max_registrations: usize, replay_max: usize, replay_ttl: Duration) -> Self {
        Self {
            by_key: HashMap::new(),
            by_circ: HashMap::new(),
            max_registrations,
            replay_max,
            replay_ttl,
            replays_refused: 0,
        }
    }

    /// Register circuit `circ` (reached through `handle`) for `auth_key`, whose ESTABLISH_INTRO
    /// the circuit's core already verified. Returns the circuit this replaces, if any: the
    /// driver closes it. The replay cache of the key survives the replacement (a service that
    /// re-establishes must not reopen the door to old INTRODUCE1s).
    pub fn register(
        &mut self,
        auth_key: RelayId,
        circ: CircKey,
        handle: H,
    ) -> Result<Option<(CircKey, H)>, RegisterError> {
        if self.by_circ.contains_key(&circ) {
            return Err(RegisterError::CircuitTaken);
        }
        if let Some(e) = self.by_key.get_mut(&auth_key) {
            let old_circ = std::mem::replace(&mut e.circ, circ);
            let old_handle = std::mem::replace(&mut e.handle, handle);
            self.by_circ.remove(&old_circ);
            self.by_circ.insert(circ, auth_key);
            return Ok(Some((old_circ, old_handle)));
        }
        if self.by_key.len() >= self.max_registrations {
            return Err(RegisterError::Full {
                max: self.max_registrations,
            });
        }
        self.by_key.insert(
            auth_key,
            Entry {
                circ,
                handle,
                replay: ReplayCache::new(),
            },
        );
        self.by_circ.insert(circ, auth_key);
        Ok(None)
    }

    /// Circuit `circ` closed: forget its registration (if it still holds one).
    pub fn remove_circuit(&mut self, circ: CircKey) {
        if let Some(key) = self.by_circ.remove(&circ) {
            self.by_key.remove(&key);
        }
    }

    /// An INTRODUCE1 arrived on a client circuit: the service circuit's handle to send
    /// INTRODUCE2 to, or the failure status for the INTRODUCE_ACK. A replay (the same encrypted
    /// part under the same key within the TTL) is refused and counted.
    pub fn introduce(&mut self, msg: &Introduce, now: Instant) -> Result<H, IntroduceStatus> {
        let Some(e) = self.by_key.get_mut(&msg.auth_key) else {
            return Err(IntroduceStatus::UNKNOWN_SERVICE);
        };
        let digest = hmac_sha256(b"allium-hs-intro-replay", &[&msg.replay_material()]);
        if e.replay
            .check_and_insert(digest, now, self.replay_max, self.replay_ttl)
        {
            self.replays_refused += 1;
            return Err(IntroduceStatus::REPLAY);
        }
        Ok(e.handle.clone())
    }

    /// Number of registered keys.
    pub fn registrations(&self) -> usize {
        self.by_key.len()
    }

    /// Entries in all replay caches.
    pub fn replay_entries(&self) -> usize {
        self.by_key.values().map(|e| e.replay.len()).sum()
    }

    /// INTRODUCE1s refused as replays so far.
    pub fn replays_refused(&self) -> u64 {
        self.replays_refused
    }
}
