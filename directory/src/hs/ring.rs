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
//! Which shared random value a period uses ([`period_srv`], rend-spec-v3 §2.2.4's rule): the
//! authorities start a new protocol run at every multiple of the period length since the epoch,
//! half a period before a period starts (see `authority::shared_random`), and a period uses the
//! value that was current when it started. With a consensus valid after `va`, whose latest run
//! switch is `S = floor(va / L) * L`: a period starting in `[S, S + L)` uses the consensus'
//! *current* value, one starting in `[S - L, S)` its *previous* value. Between the SRV switch
//! and the period switch, the running period uses the previous value and the next one the
//! current value; between the period switch and the SRV switch the running period uses the
//! current value. Any other period, or a value the consensus lacks, gets [`disaster_srv`] (Tor's
//! fallback when the authorities fail to agree: predictable, so a relay that can choose its
//! identity key can aim at a service's positions one period ahead).

use std::collections::BTreeSet;

use allium_crypto::RelayId;
use allium_crypto::hs::{BlindedPublicKey, TimePeriod, TimePeriodParams};
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

/// Which of a consensus' two shared random values a period uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrvChoice {
    /// `shared-rand-current-value`.
    Current,
    /// `shared-rand-previous-value`.
    Previous,
}

/// The rule of the module docs: which value of a consensus valid after `valid_after` the ring of
/// `period` uses (`None`: neither; the period is too far from the consensus).
pub fn srv_choice(period: &TimePeriod, valid_after: u64) -> Option<SrvChoice> {
    let tp = TimePeriodParams::with_length(period.length_minutes.max(1));
    let run = tp.length_minutes.saturating_mul(60);
    let switch = valid_after / run * run;
    let start = tp.start_unix(period.number);
    if (switch..switch.saturating_add(run)).contains(&start) {
        Some(SrvChoice::Current)
    } else if (switch.saturating_sub(run)..switch).contains(&start) && switch >= run {
        Some(SrvChoice::Previous)
    } else {
        None
    }
}

/// The shared random value the ring of `period` uses, given a consensus valid after
/// `valid_after` that carries `current` and `previous` (each possibly absent): the one
/// [`srv_choice`] picks, or [`disaster_srv`] when that one is absent or none applies.
pub fn period_srv(
    period: &TimePeriod,
    valid_after: u64,
    current: Option<&[u8; 32]>,
    previous: Option<&[u8; 32]>,
) -> [u8; 32] {
    let v = match srv_choice(period, valid_after) {
        Some(SrvChoice::Current) => current,
        Some(SrvChoice::Previous) => previous,
        None => None,
    };
    v.copied().unwrap_or_else(|| disaster_srv(period))
}

/// [`period_srv`] with the values of consensus `c`.
pub fn consensus_srv(c: &Consensus, period: &TimePeriod) -> [u8; 32] {
    let sr = c.shared_rand.as_ref();
    period_srv(
        period,
        c.valid_after,
        sr.and_then(|s| s.current.as_ref()).map(|v| &v.value),
        sr.and_then(|s| s.previous.as_ref()).map(|v| &v.value),
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

#[cfg(test)]
mod srv_rule_tests {
    use super::*;
    use crate::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
    use crate::doc::{SharedRand, SrvValue};
    use std::collections::BTreeMap;

    const TP: TimePeriodParams = TimePeriodParams::DEFAULT;
    /// 00:00 UTC: an SRV switch (a multiple of the one-day run).
    const MIDNIGHT: u64 = 1_800_000_000 - 1_800_000_000 % 86_400;

    #[test]
    fn between_srv_switch_and_period_switch_the_running_period_uses_the_previous_value() {
        // 06:00: the running period started at 12:00 yesterday, before the switch.
        let now = MIDNIGHT + 6 * 3600;
        let running = TP.period_at(now);
        assert_eq!(TP.start_unix(running.number), MIDNIGHT - 12 * 3600);
        assert_eq!(srv_choice(&running, now), Some(SrvChoice::Previous));
        assert_eq!(srv_choice(&running.next(), now), Some(SrvChoice::Current));
        // 18:00: the running period started at 12:00 today, after the switch.
        let now = MIDNIGHT + 18 * 3600;
        let running = TP.period_at(now);
        assert_eq!(srv_choice(&running, now), Some(SrvChoice::Current));
        assert_eq!(srv_choice(&running.next(), now), None, "not drawn yet");
        let before = TimePeriod {
            number: running.number - 1,
            ..running
        };
        assert_eq!(srv_choice(&before, now), Some(SrvChoice::Previous));
        // The same period keeps the same value across the switch: current before, previous
        // after.
        let p = TP.period_at(MIDNIGHT - 3600);
        assert_eq!(srv_choice(&p, MIDNIGHT - 3600), Some(SrvChoice::Current));
        assert_eq!(srv_choice(&p, MIDNIGHT + 3600), Some(SrvChoice::Previous));
    }

    #[test]
    fn the_test_network_period_follows_the_same_rule() {
        let tp = TimePeriodParams::TESTNET;
        let now = MIDNIGHT + 60; // a 20-minute run switched at MIDNIGHT
        let p = tp.period_at(now);
        assert_eq!(srv_choice(&p, now), Some(SrvChoice::Previous));
        let now = MIDNIGHT + 11 * 60; // after the period switch at +10 minutes
        let p = tp.period_at(now);
        assert_eq!(srv_choice(&p, now), Some(SrvChoice::Current));
    }

    fn consensus(va: u64, shared_rand: Option<SharedRand>) -> Consensus {
        Consensus {
            version: CONSENSUS_VERSION,
            method: CONSENSUS_METHOD,
            valid_after: va,
            fresh_until: va + 3600,
            valid_until: va + 3 * 3600,
            voters: Vec::new(),
            params: BTreeMap::new(),
            relays: Vec::new(),
            bandwidth_weights: BTreeMap::new(),
            shared_rand,
        }
    }

    #[test]
    fn absent_values_give_the_disaster_value() {
        let now = MIDNIGHT + 6 * 3600;
        let running = TP.period_at(now);
        assert_eq!(
            consensus_srv(&consensus(now, None), &running),
            disaster_srv(&running)
        );
        let cur = SrvValue {
            num_reveals: 3,
            value: [1; 32],
        };
        let prev = SrvValue {
            num_reveals: 3,
            value: [2; 32],
        };
        let only_current = consensus(
            now,
            Some(SharedRand {
                current: Some(cur),
                previous: None,
            }),
        );
        // The running period needs the previous value, which is absent.
        assert_eq!(
            consensus_srv(&only_current, &running),
            disaster_srv(&running)
        );
        assert_eq!(consensus_srv(&only_current, &running.next()), [1; 32]);
        let both = consensus(
            now,
            Some(SharedRand {
                current: Some(cur),
                previous: Some(prev),
            }),
        );
        assert_eq!(consensus_srv(&both, &running), [2; 32]);
        // The ring moves with the value.
        let ids: Vec<RelayId> = (1..=8u8).map(|i| RelayId([i; 32])).collect();
        let a = HsDirRing::new(ids.clone(), &consensus_srv(&both, &running), &running);
        let b = HsDirRing::new(ids, &disaster_srv(&running), &running);
        assert_ne!(a.ring, b.ring);
    }
}
