//! The HSDir hash ring (rend-spec-v3 §2.2.3's mechanism; Allium's hashes).
//!
//! ```text
//! hs_index(A', replica, period)  = SHA-256("allium-hs-store-at-idx" | 0x00 | A' | u64be(replica)
//!                                          | u64be(period_length) | u64be(period_number))
//! hsdir_index(ID, srv, period)   = SHA-256("allium-hs-node-idx" | 0x00 | ID | srv
//!                                          | u64be(period_number) | u64be(period_length))
//! ```
//!
//! Relays with the HSDir flag sit on a ring of 256-bit positions ordered as big-endian integers. For
//! each replica `1..=hsdir_n_replicas`, a descriptor is stored on the first `hsdir_spread_store`
//! relays whose position is strictly after `hs_index` (wrapping past the top of the ring), skipping
//! relays already chosen for an earlier replica; a client fetches from any of the first
//! `hsdir_spread_fetch` of each replica. The shared random value `srv` moves every relay each period,
//! so no relay can choose its position next to a given service in advance.
//!
//! The consensus carries no shared random value yet; until it does, callers pass
//! [`disaster_srv`] (Tor's fallback when the authorities fail to agree on one: predictable, so a
//! relay that can choose its identity key can aim at a service's positions one period ahead).

use std::collections::BTreeSet;

use allium_crypto::RelayId;
use allium_crypto::hs::{BlindedPublicKey, TimePeriod};
use sha2::{Digest as _, Sha256};

use crate::doc::{Consensus, Flags};

/// Domain string of `hs_index`.
pub const DOMAIN_STORE_AT: &[u8] = b"allium-hs-store-at-idx";
/// Domain string of `hsdir_index`.
pub const DOMAIN_NODE_IDX: &[u8] = b"allium-hs-node-idx";
/// Domain string of the fallback shared random value.
pub const DOMAIN_DISASTER_SRV: &[u8] = b"allium-hs-shared-random-disaster";

fn h(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(domain);
    d.update([0u8]);
    for p in parts {
        d.update(p);
    }
    d.finalize().into()
}

/// Where replica `replica` (1-based) of the descriptor for `blinded` goes in `period`.
pub fn hs_index(blinded: &BlindedPublicKey, replica: u64, period: &TimePeriod) -> [u8; 32] {
    h(
        DOMAIN_STORE_AT,
        &[
            &blinded.0,
            &replica.to_be_bytes(),
            &period.length_minutes.to_be_bytes(),
            &period.number.to_be_bytes(),
        ],
    )
}

/// Where relay `relay` sits on the ring in `period`, given the shared random value `srv`.
pub fn hsdir_index(relay: &RelayId, srv: &[u8; 32], period: &TimePeriod) -> [u8; 32] {
    h(
        DOMAIN_NODE_IDX,
        &[
            &relay.0,
            srv,
            &period.number.to_be_bytes(),
            &period.length_minutes.to_be_bytes(),
        ],
    )
}

/// The fallback shared random value of a period: `SHA-256("allium-hs-shared-random-disaster" | 0x00 |
/// u64be(period_length) | u64be(period_number))`.
pub fn disaster_srv(period: &TimePeriod) -> [u8; 32] {
    h(
        DOMAIN_DISASTER_SRV,
        &[
            &period.length_minutes.to_be_bytes(),
            &period.number.to_be_bytes(),
        ],
    )
}

/// Replication parameters, from the consensus (Tor's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HsDirParams {
    /// `hsdir_n_replicas`: how many ring positions per descriptor (default 2, 1..=16).
    pub n_replicas: u8,
    /// `hsdir_spread_store`: relays per replica a service uploads to (default 4, 1..=128).
    pub spread_store: usize,
    /// `hsdir_spread_fetch`: relays per replica a client may fetch from (default 3, 1..=128).
    pub spread_fetch: usize,
}

impl Default for HsDirParams {
    fn default() -> Self {
        Self {
            n_replicas: 2,
            spread_store: 4,
            spread_fetch: 3,
        }
    }
}

impl HsDirParams {
    /// Read the three parameters from a consensus' `params`; absent or out-of-range values fall back
    /// to the defaults.
    pub fn from_consensus(c: &Consensus) -> Self {
        let d = Self::default();
        let get = |name: &str, lo: i32, hi: i32| {
            c.params
                .get(name)
                .copied()
                .filter(|v| (lo..=hi).contains(v))
        };
        Self {
            n_replicas: get("hsdir_n_replicas", 1, 16)
                .and_then(|v| u8::try_from(v).ok())
                .unwrap_or(d.n_replicas),
            spread_store: get("hsdir_spread_store", 1, 128)
                .and_then(|v| usize::try_from(v).ok())
                .unwrap_or(d.spread_store),
            spread_fetch: get("hsdir_spread_fetch", 1, 128)
                .and_then(|v| usize::try_from(v).ok())
                .unwrap_or(d.spread_fetch),
        }
    }
}

/// The ring of one period: HSDir relays sorted by `hsdir_index`.
#[derive(Clone, Debug)]
pub struct HsDirRing {
    period: TimePeriod,
    ring: Vec<([u8; 32], RelayId)>,
}

impl HsDirRing {
    /// The ring over `relays` (duplicates are dropped).
    pub fn new(
        relays: impl IntoIterator<Item = RelayId>,
        srv: &[u8; 32],
        period: &TimePeriod,
    ) -> Self {
        let unique: BTreeSet<RelayId> = relays.into_iter().collect();
        let mut ring: Vec<([u8; 32], RelayId)> = unique
            .into_iter()
            .map(|id| (hsdir_index(&id, srv, period), id))
            .collect();
        ring.sort();
        Self {
            period: *period,
            ring,
        }
    }

    /// The ring over the consensus relays with the HSDir flag.
    pub fn from_consensus(c: &Consensus, srv: &[u8; 32], period: &TimePeriod) -> Self {
        Self::new(
            c.relays
                .iter()
                .filter(|r| r.has(Flags::HSDIR))
                .map(|r| r.identity),
            srv,
            period,
        )
    }

    /// Number of relays on the ring.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The relays a service uploads the descriptor for `blinded` to: `n_replicas × spread_store`
    /// distinct relays (fewer when the ring is smaller), replica by replica, in ring order.
    pub fn upload_targets(&self, blinded: &BlindedPublicKey, p: &HsDirParams) -> Vec<RelayId> {
        self.select(blinded, p.n_replicas, p.spread_store)
    }

    /// The relays a client may fetch the descriptor for `blinded` from (`n_replicas ×
    /// spread_fetch`); the client picks among them at random.
    pub fn fetch_candidates(&self, blinded: &BlindedPublicKey, p: &HsDirParams) -> Vec<RelayId> {
        self.select(blinded, p.n_replicas, p.spread_fetch)
    }

    fn select(&self, blinded: &BlindedPublicKey, replicas: u8, spread: usize) -> Vec<RelayId> {
        let n = self.ring.len();
        let mut out: Vec<RelayId> = Vec::with_capacity(usize::from(replicas) * spread);
        for replica in 1..=u64::from(replicas) {
            let idx = hs_index(blinded, replica, &self.period);
            // First position strictly after `idx`; `n` means "wrap to the start".
            let start = self.ring.partition_point(|(pos, _)| pos <= &idx);
            let mut taken = 0;
            for step in 0..n {
                if taken == spread {
                    break;
                }
                let Some((_, id)) = self.ring.get((start + step) % n) else {
                    break;
                };
                if !out.contains(id) {
                    out.push(*id);
                    taken += 1;
                }
            }
        }
        out
    }
}
