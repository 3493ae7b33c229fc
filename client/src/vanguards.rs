//! Vanguards-lite (Tor proposal 333): a small, slowly rotating set of second hops for every
//! onion-service circuit.
//!
//! An onion service (or a client of one) can be made to build circuits at will: an attacker
//! who runs relays and keeps asking for introductions waits until one of its relays is the
//! *middle* hop of such a circuit, then learns the first hop, the guard, from the connection
//! (a "guard discovery" attack); from the guard, watching or compelling it reveals the
//! service's address. With fresh random middles, that takes minutes to hours. Pinning the
//! second hop to one of [`N_VANGUARDS`] relays, each kept for a random
//! [`MIN_LIFETIME_SECS`]..=[`MAX_LIFETIME_SECS`] (1 to 12 days), means the attacker must first
//! run or compromise one of those few relays, and a compromised one is rotated away within days.
//!
//! Vanguards are chosen among Running, Valid, Fast and Stable relays, weighted as middles (when
//! fewer than [`N_VANGUARDS`] such relays exist, Fast ones fill the set, then any usable ones:
//! small test networks). One is replaced as soon as it expires or the consensus no longer lists it
//! as usable. The set is kept in `vanguards.json` in the data directory beside `guards.json`, so a
//! restart does not draw a new set (which would hand an attacker a fresh chance).

use std::path::{Path, PathBuf};

use allium_crypto::RelayId;
use rand::{Rng, RngExt as _};
use serde::{Deserialize, Serialize};

use crate::err::ClientError;
use crate::path::{Position, PositionWeights, RelayInfo, compatible, weighted_choice_by};

/// Vanguards in the set (Tor's `guard-hs-l2-number`).
pub const N_VANGUARDS: usize = 4;
/// Shortest lifetime of a vanguard (Tor's `guard-hs-l2-lifetime-min`: 1 day).
pub const MIN_LIFETIME_SECS: u64 = 86_400;
/// Longest lifetime of a vanguard (Tor's `guard-hs-l2-lifetime-max`: 12 days).
pub const MAX_LIFETIME_SECS: u64 = 12 * 86_400;
/// The state file's name inside the data directory.
pub const STATE_FILE: &str = "vanguards.json";
/// Largest state file read.
const MAX_FILE_LEN: u64 = 64 * 1024;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct VanguardRecord {
    /// Ed25519 identity, hex.
    id: String,
    /// When it is replaced (unix seconds).
    expires: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct VanguardFile {
    version: u16,
    vanguards: Vec<VanguardRecord>,
}

/// The layer-2 vanguards and where they are kept.
#[derive(Debug, Clone)]
pub struct VanguardSet {
    path: Option<PathBuf>,
    set: Vec<(RelayId, u64)>,
}

/// How well a relay fits as a vanguard: 2 = Fast and Stable, 1 = Fast, 0 = usable, None = not.
fn tier(r: &RelayInfo) -> Option<u8> {
    if !r.usable() {
        return None;
    }
    Some(match (r.flags.fast, r.flags.stable) {
        (true, true) => 2,
        (true, false) => 1,
        _ => 0,
    })
}

impl VanguardSet {
    /// An empty set kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            set: Vec::new(),
        }
    }

    /// Load `dir/vanguards.json` (absent: an empty set; unreadable or corrupt: set aside as
    /// `vanguards.json.bad` with a warning, and an empty set).
    pub fn load(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join(STATE_FILE);
        let mut out = Self {
            path: Some(path.clone()),
            set: Vec::new(),
        };
        if let Some(f) = crate::guard::load_state_file::<VanguardFile>(
            &path,
            MAX_FILE_LEN,
            "vanguard",
            "choosing new vanguards",
        )? {
            for v in f.vanguards.into_iter().take(N_VANGUARDS) {
                if let Ok(id) = RelayId::from_hex(&v.id)
                    && !out.set.iter().any(|(x, _)| *x == id)
                {
                    out.set.push((id, v.expires));
                }
            }
        }
        Ok(out)
    }

    /// Write the state file atomically (nothing for an in-memory set).
    pub fn save(&self) -> Result<(), ClientError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = VanguardFile {
            version: 1,
            vanguards: self
                .set
                .iter()
                .map(|(id, expires)| VanguardRecord {
                    id: id.to_hex(),
                    expires: *expires,
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&f)
            .map_err(|e| ClientError::Config(format!("encoding vanguard state: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| ClientError::file(&tmp, "writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| ClientError::file(path, "writing", e))
    }

    /// The vanguards and when each expires (unix seconds).
    pub fn entries(&self) -> &[(RelayId, u64)] {
        &self.set
    }

    /// The vanguards' identities.
    pub fn ids(&self) -> Vec<RelayId> {
        self.set.iter().map(|(id, _)| *id).collect()
    }

    /// Drop the vanguards expired at `now_unix` or no longer usable in `relays`, then draw new
    /// ones (weighted as middles, best tier first, each with a lifetime drawn uniformly from
    /// 1 to 12 days) until there are [`N_VANGUARDS`] or no candidate is left. Returns whether
    /// the set changed (then call [`VanguardSet::save`]).
    pub fn refresh<R: Rng + ?Sized>(
        &mut self,
        relays: &[RelayInfo],
        weights: &PositionWeights,
        now_unix: u64,
        rng: &mut R,
    ) -> bool {
        let before = self.set.len();
        self.set.retain(|(id, expires)| {
            now_unix < *expires && relays.iter().any(|r| r.id == *id && tier(r).is_some())
        });
        let mut changed = self.set.len() != before;
        while self.set.len() < N_VANGUARDS {
            let free: Vec<&RelayInfo> = relays
                .iter()
                .filter(|r| tier(r).is_some() && !self.set.iter().any(|(id, _)| *id == r.id))
                .collect();
            let Some(best) = free.iter().filter_map(|r| tier(r)).max() else {
                break;
            };
            let cands: Vec<&RelayInfo> =
                free.into_iter().filter(|r| tier(r) == Some(best)).collect();
            let Some(pick) =
                weighted_choice_by(&cands, |r| weights.weight(r, Position::Middle), rng)
                    .or_else(|| cands.first().copied())
            else {
                break;
            };
            let lifetime = rng.random_range(MIN_LIFETIME_SECS..=MAX_LIFETIME_SECS);
            self.set.push((pick.id, now_unix.saturating_add(lifetime)));
            changed = true;
        }
        changed
    }

    /// The middle hop of an onion-service circuit: a vanguard listed as usable in `relays` and
    /// compatible with every relay in `others` (the guard and the last hop), chosen uniformly.
    /// `None`: no vanguard fits (the circuit is not built with another middle: that would undo
    /// the protection).
    pub fn choose_middle<'a, R: Rng + ?Sized>(
        &self,
        relays: &'a [RelayInfo],
        others: &[&RelayInfo],
        relaxed: bool,
        rng: &mut R,
    ) -> Option<&'a RelayInfo> {
        let cands: Vec<&RelayInfo> = self
            .set
            .iter()
            .filter_map(|(id, _)| relays.iter().find(|r| r.id == *id))
            .filter(|r| tier(r).is_some() && others.iter().all(|o| compatible(r, o, relaxed)))
            .collect();
        if cands.is_empty() {
            return None;
        }
        cands.get(rng.random_range(0..cands.len())).copied()
    }
}

impl crate::guard::StateVersion for VanguardFile {
    fn version(&self) -> u16 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::relay;

    fn net(n: u8) -> Vec<RelayInfo> {
        (1..=n)
            .map(|i| {
                let mut r = relay(i, [10, i, 0, 1], i % 3 == 0, false, 100);
                r.flags.fast = true;
                r.flags.stable = true;
                r
            })
            .collect()
    }

    const T0: u64 = 1_800_000_000;

    #[test]
    fn the_set_has_four_with_lifetimes_in_range() {
        let relays = net(20);
        for _ in 0..50 {
            let mut v = VanguardSet::in_memory();
            assert!(v.refresh(&relays, &PositionWeights::default(), T0, &mut rand::rng()));
            assert_eq!(v.entries().len(), N_VANGUARDS);
            let mut ids = v.ids();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), N_VANGUARDS, "distinct");
            for (_, exp) in v.entries() {
                let life = exp - T0;
                assert!(
                    (MIN_LIFETIME_SECS..=MAX_LIFETIME_SECS).contains(&life),
                    "{life}"
                );
            }
            // Nothing to do at the same time.
            assert!(!v.refresh(
                &relays,
                &PositionWeights::default(),
                T0 + 1,
                &mut rand::rng()
            ));
        }
        // A tiny network fills what it can.
        let mut v = VanguardSet::in_memory();
        v.refresh(&net(2), &PositionWeights::default(), T0, &mut rand::rng());
        assert_eq!(v.entries().len(), 2);
    }

    #[test]
    fn stable_relays_are_preferred() {
        let mut relays = net(12);
        for r in relays.iter_mut().skip(5) {
            r.flags.stable = false;
        }
        let mut v = VanguardSet::in_memory();
        v.refresh(&relays, &PositionWeights::default(), T0, &mut rand::rng());
        for id in v.ids() {
            let r = relays.iter().find(|r| r.id == id).expect("listed");
            assert!(r.flags.stable);
        }
    }

    #[test]
    fn expired_and_unlisted_vanguards_are_replaced() {
        let mut relays = net(30);
        let mut v = VanguardSet::in_memory();
        let mut rng = rand::rng();
        v.refresh(&relays, &PositionWeights::default(), T0, &mut rng);
        let first = v.entries().to_vec();
        // One no longer Running: replaced at once, the others kept.
        let gone = first[0].0;
        if let Some(r) = relays.iter_mut().find(|r| r.id == gone) {
            r.flags.running = false;
        }
        assert!(v.refresh(&relays, &PositionWeights::default(), T0 + 10, &mut rng));
        assert_eq!(v.entries().len(), N_VANGUARDS);
        assert!(!v.ids().contains(&gone));
        for (id, exp) in &first[1..] {
            assert!(v.entries().contains(&(*id, *exp)));
        }
        // Advance the simulated clock hour by hour: each expires at its time and no later.
        let mut now = T0 + 10;
        let end = T0 + 40 * 86_400;
        while now < end {
            let before = v.entries().to_vec();
            now += 3600;
            v.refresh(&relays, &PositionWeights::default(), now, &mut rng);
            for (id, exp) in &before {
                // (An expired relay may be drawn again, with a new expiry.)
                let kept = v.entries().contains(&(*id, *exp));
                assert_eq!(
                    kept,
                    now < *exp,
                    "vanguard kept past or dropped before expiry"
                );
            }
            assert_eq!(v.entries().len(), N_VANGUARDS);
            for (_, exp) in v.entries() {
                assert!(*exp > now && *exp <= now + MAX_LIFETIME_SECS);
            }
        }
        // After 40 days none of the first set is left (12 days at most).
        assert!(
            first
                .iter()
                .all(|(id, exp)| !v.entries().contains(&(*id, *exp)))
        );
    }

    #[test]
    fn the_set_persists_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let relays = net(20);
        let mut v = VanguardSet::load(dir.path()).expect("loads");
        assert!(v.entries().is_empty());
        v.refresh(&relays, &PositionWeights::default(), T0, &mut rand::rng());
        v.save().expect("saves");
        let w = VanguardSet::load(dir.path()).expect("loads");
        assert_eq!(w.entries(), v.entries());
        // A corrupt file is set aside.
        std::fs::write(dir.path().join(STATE_FILE), "{not json").expect("write");
        let c = VanguardSet::load(dir.path()).expect("loads");
        assert!(c.entries().is_empty());
        assert!(dir.path().join("vanguards.json.bad").exists());
    }

    #[test]
    fn the_middle_is_a_compatible_vanguard() {
        let relays = net(20);
        let mut v = VanguardSet::in_memory();
        let mut rng = rand::rng();
        v.refresh(&relays, &PositionWeights::default(), T0, &mut rng);
        let ids = v.ids();
        let guard = relays.iter().find(|r| r.id == ids[0]).expect("listed");
        let last = relays.iter().find(|r| r.id == ids[1]).expect("listed");
        for _ in 0..100 {
            let m = v
                .choose_middle(&relays, &[guard, last], false, &mut rng)
                .expect("two vanguards left");
            assert!(ids.contains(&m.id));
            assert_ne!(m.id, guard.id);
            assert_ne!(m.id, last.id);
        }
        // No compatible vanguard: no middle (never a random one).
        let only: Vec<RelayInfo> = relays
            .iter()
            .filter(|r| r.id == ids[0] || r.id == ids[1])
            .cloned()
            .collect();
        assert!(
            v.choose_middle(&only, &[guard, last], false, &mut rng)
                .is_none()
        );
    }
}
