//! The rendezvous-point table (rend-spec-v3 §3.4's role): cookie → the client circuit waiting
//! for a service, bounded and expiring, plus the count of joined circuit pairs.
//!
//! Sans-IO and generic over the driver's circuit handle `H`. Invariants:
//! - a cookie names one waiting circuit; a circuit waits under one cookie;
//! - at most `max_waiting` circuits wait, each at most `wait_ttl` (then [`RendezvousTable::expire`]
//!   hands it back for the driver to close);
//! - RENDEZVOUS1 takes the waiting circuit out of the table ([`RendezvousTable::take`]), so a
//!   cookie joins at most once; at most `max_joined` pairs are joined at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use allium_proto::relaymsg::RendCookie;

use super::intro::CircKey;

/// Default most circuits waiting at a rendezvous point.
pub const MAX_WAITING_COOKIES: usize = 4096;
/// Default longest wait for RENDEZVOUS1 (rend-spec: the client gives up well before).
pub const REND_WAIT_TTL: Duration = Duration::from_secs(120);
/// Default most joined circuit pairs.
pub const MAX_JOINED: usize = 8192;

/// Why a rendezvous step was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RendError {
    /// Too many circuits wait already.
    #[error("rendezvous table full ({max} waiting)")]
    Full {
        /// The limit.
        max: usize,
    },
    /// Another circuit waits under this cookie.
    #[error("rendezvous cookie in use")]
    CookieInUse,
    /// This circuit already waits under a cookie.
    #[error("circuit already waiting for a rendezvous")]
    CircuitTaken,
    /// No circuit waits under this cookie (never, expired or taken).
    #[error("no circuit waiting for this cookie")]
    UnknownCookie,
    /// Too many joined pairs.
    #[error("too many joined circuits ({max})")]
    TooManyJoined {
        /// The limit.
        max: usize,
    },
}

struct Waiting<H> {
    circ: CircKey,
    handle: H,
    since: Instant,
}

/// The rendezvous-point table of one relay.
pub struct RendezvousTable<H> {
    waiting: HashMap<RendCookie, Waiting<H>>,
    by_circ: HashMap<CircKey, RendCookie>,
    joined: usize,
    max_waiting: usize,
    wait_ttl: Duration,
    max_joined: usize,
}

impl<H> std::fmt::Debug for RendezvousTable<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousTable")
            .field("waiting", &self.waiting.len())
            .field("joined", &self.joined)
            .finish_non_exhaustive()
    }
}

impl<H> RendezvousTable<H> {
    /// An empty table with these limits.
    pub fn new(max_waiting: usize, wait_ttl: Duration, max_joined: usize) -> Self {
        Self {
            waiting: HashMap::new(),
            by_circ: HashMap::new(),
            joined: 0,
            max_waiting,
            wait_ttl,
            max_joined,
        }
    }

    /// ESTABLISH_RENDEZVOUS on circuit `circ`: wait under `cookie` from `now`. Expired entries
    /// are dropped first (their circuits come back from [`RendezvousTable::expire`]).
    pub fn establish(
        &mut self,
        cookie: RendCookie,
        circ: CircKey,
        handle: H,
        now: Instant,
    ) -> Result<(), RendError> {
        if self.by_circ.contains_key(&circ) {
            return Err(RendError::CircuitTaken);
        }
        if self.waiting.contains_key(&cookie) {
            return Err(RendError::CookieInUse);
        }
        if self.waiting.len() >= self.max_waiting {
            return Err(RendError::Full {
                max: self.max_waiting,
            });
        }
        self.waiting.insert(
            cookie,
            Waiting {
                circ,
                handle,
                since: now,
            },
        );
        self.by_circ.insert(circ, cookie);
        Ok(())
    }

    /// RENDEZVOUS1 names `cookie`: take the waiting circuit out of the table and count the new
    /// joined pair (undo with [`RendezvousTable::unjoin`] when either side closes).
    pub fn take(&mut self, cookie: &RendCookie, now: Instant) -> Result<(CircKey, H), RendError> {
        let fresh = self
            .waiting
            .get(cookie)
            .is_some_and(|w| now.saturating_duration_since(w.since) < self.wait_ttl);
        if !fresh {
            return Err(RendError::UnknownCookie);
        }
        if self.joined >= self.max_joined {
            return Err(RendError::TooManyJoined {
                max: self.max_joined,
            });
        }
        let w = self
            .waiting
            .remove(cookie)
            .ok_or(RendError::UnknownCookie)?;
        self.by_circ.remove(&w.circ);
        self.joined += 1;
        Ok((w.circ, w.handle))
    }

    /// A joined pair came apart (either side closed; call once per pair).
    pub fn unjoin(&mut self) {
        self.joined = self.joined.saturating_sub(1);
    }

    /// Circuit `circ` closed while waiting: forget it.
    pub fn remove_circuit(&mut self, circ: CircKey) {
        if let Some(c) = self.by_circ.remove(&circ) {
            self.waiting.remove(&c);
        }
    }

    /// Remove and return the circuits that waited longer than the TTL (the driver closes them).
    pub fn expire(&mut self, now: Instant) -> Vec<(CircKey, H)> {
        let ttl = self.wait_ttl;
        let old: Vec<RendCookie> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) >= ttl)
            .map(|(c, _)| *c)
            .collect();
        let mut out = Vec::with_capacity(old.len());
        for c in old {
            if let Some(w) = self.waiting.remove(&c) {
                self.by_circ.remove(&w.circ);
                out.push((w.circ, w.handle));
            }
        }
        out
    }

    /// When the oldest waiting circuit expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.waiting
            .values()
            .filter_map(|w| w.since.checked_add(self.wait_ttl))
            .min()
    }

    /// Circuits waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Joined pairs.
    pub fn joined(&self) -> usize {
        self.joined
    }

    /// How long a circuit may wait under a cookie.
    pub fn wait_ttl(&self) -> Duration {
        self.wait_ttl
    }
}
