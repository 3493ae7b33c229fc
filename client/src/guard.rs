//! Guards: a small, persistent set of first hops (a much reduced Tor guard-spec / prop 271).
//!
//! The state file `guards.json` in the data directory lists sampled guards in preference order.
//! The *primary* guards are the first `n` entries that the current consensus lists as Running,
//! Valid and Guard. When fewer than `n` are usable, new guards are sampled (weighted by
//! consensus weight) and appended; old entries are kept (up to [`MAX_SAMPLED`]) so that a guard
//! that comes back regains its place. Circuits use the first primary guard that is reachable and
//! compatible with the chosen exit.
//!
//! A sampled guard is kept at most [`GUARD_LIFETIME_DAYS`] days from when it was sampled (Tor's
//! `guard-lifetime-days`, 120), then dropped and replaced: a guard that has watched one client
//! for months learns its usage pattern, and a long-lived choice made under a hostile consensus
//! would otherwise never be revisited.

use std::path::{Path, PathBuf};

use allium_crypto::RelayId;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::err::ClientError;
use crate::path::{Position, PositionWeights, RelayInfo, weighted_choice_by};

/// Most sampled guards remembered in the state file.
pub const MAX_SAMPLED: usize = 30;
/// Largest state file we read.
const MAX_FILE_LEN: u64 = 1 << 20;
/// How long a sampled guard is kept, in days (Tor's `guard-lifetime-days`).
pub const GUARD_LIFETIME_DAYS: u64 = 120;
/// Path bias (Tor's path-spec, "Path bias detection"): circuits attempted through a guard
/// before its success rate is judged (`pb_mincircs`).
pub const PB_MIN_CIRCS: u32 = 150;
/// Below this build success rate (percent), a notice (`pb_noticepct`).
pub const PB_NOTICE_PCT: u32 = 70;
/// Below this build success rate (percent), a warning (`pb_warnpct`).
pub const PB_WARN_PCT: u32 = 50;
/// Below this build success rate (percent), the guard is dropped (`pb_extremepct`; Allium
/// drops it, as Tor does with `pb_dropguards` set).
pub const PB_EXTREME_PCT: u32 = 30;
/// Past this many attempts both counts are halved, so old history fades (`pb_scalecircs`).
pub const PB_SCALE_CIRCS: u32 = 300;

/// What the path-bias accounting of one guard says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathBiasVerdict {
    /// Too few attempts yet, or a success rate at or above [`PB_NOTICE_PCT`].
    Fine,
    /// Below [`PB_NOTICE_PCT`].
    Notice,
    /// Below [`PB_WARN_PCT`]: a guard failing this many circuits may be tagging or
    /// selectively failing them.
    Warn,
    /// Below [`PB_EXTREME_PCT`]: the guard is no longer used.
    Drop,
}

/// Circuit build attempts and successes through one guard (kept in memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathBias {
    /// Circuits whose first hop was built through the guard.
    pub attempts: u32,
    /// Of those, circuits that were built to the end.
    pub successes: u32,
}

impl PathBias {
    /// Count one circuit through the guard whose first hop was built, and whether the whole
    /// circuit was then built.
    pub fn record(&mut self, built: bool) {
        self.attempts = self.attempts.saturating_add(1);
        if built {
            self.successes = self.successes.saturating_add(1);
        }
        if self.attempts > PB_SCALE_CIRCS {
            self.attempts /= 2;
            self.successes /= 2;
        }
    }

    /// The verdict on the counts so far.
    pub fn verdict(&self) -> PathBiasVerdict {
        if self.attempts < PB_MIN_CIRCS {
            return PathBiasVerdict::Fine;
        }
        // successes / attempts < pct / 100, in integers.
        let below =
            |pct: u32| u64::from(self.successes) * 100 < u64::from(self.attempts) * u64::from(pct);
        if below(PB_EXTREME_PCT) {
            PathBiasVerdict::Drop
        } else if below(PB_WARN_PCT) {
            PathBiasVerdict::Warn
        } else if below(PB_NOTICE_PCT) {
            PathBiasVerdict::Notice
        } else {
            PathBiasVerdict::Fine
        }
    }
}

/// The state file's name inside the data directory.
pub const STATE_FILE: &str = "guards.json";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct GuardRecord {
    /// Ed25519 identity, hex.
    id: String,
    /// When it was sampled (unix seconds).
    added: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct GuardFile {
    version: u16,
    guards: Vec<GuardRecord>,
}

/// The sampled guards, in preference order, and where they are kept.
#[derive(Debug)]
pub struct GuardSet {
    path: PathBuf,
    sampled: Vec<(RelayId, u64)>,
    /// How long a sampled guard is kept, in seconds.
    lifetime_secs: u64,
    /// Path-bias accounting per guard.
    bias: std::collections::HashMap<RelayId, PathBias>,
}

impl GuardSet {
    /// Load `dir/guards.json` (an absent file means no guards yet; a corrupt one is set aside
    /// as `guards.json.bad` with a warning).
    pub fn load(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join(STATE_FILE);
        let mut set = Self {
            path,
            sampled: Vec::new(),
            lifetime_secs: GUARD_LIFETIME_DAYS * 86_400,
            bias: std::collections::HashMap::new(),
        };
        if let Some(f) =
            load_state_file::<GuardFile>(&set.path, MAX_FILE_LEN, "guard", "sampling new guards")?
        {
            for g in f.guards.into_iter().take(MAX_SAMPLED) {
                if let Ok(id) = RelayId::from_hex(&g.id)
                    && !set.sampled.iter().any(|(x, _)| *x == id)
                {
                    set.sampled.push((id, g.added));
                }
            }
        }
        Ok(set)
    }

    /// Write the state file atomically (temporary file, then rename).
    pub fn save(&self) -> Result<(), ClientError> {
        let f = GuardFile {
            version: 1,
            guards: self
                .sampled
                .iter()
                .map(|(id, added)| GuardRecord {
                    id: id.to_hex(),
                    added: *added,
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&f)
            .map_err(|e| ClientError::Config(format!("encoding guard state: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| ClientError::file(&tmp, "writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| ClientError::file(&self.path, "writing", e))
    }

    /// Count a circuit whose first hop was built through `guard` (see [`PathBias::record`]).
    /// A guard whose verdict becomes [`PathBiasVerdict::Drop`] is removed from the sample
    /// (returns it; then call [`GuardSet::save`]); a warning is logged when it crosses
    /// [`PB_WARN_PCT`] or is dropped.
    pub fn note_circuit(&mut self, guard: RelayId, built: bool) -> PathBiasVerdict {
        let b = self.bias.entry(guard).or_default();
        let before = b.verdict();
        b.record(built);
        let after = b.verdict();
        let (successes, attempts) = (b.successes, b.attempts);
        if after != before {
            match after {
                PathBiasVerdict::Drop => tracing::warn!(
                    "guard {} built only {successes} of {attempts} circuits (below {PB_EXTREME_PCT}%); \
                     dropping it. If this repeats for every guard, the local network is failing circuits.",
                    guard.to_hex()
                ),
                PathBiasVerdict::Warn => tracing::warn!(
                    "guard {} built only {successes} of {attempts} circuits (below {PB_WARN_PCT}%); \
                     it may be failing circuits on purpose",
                    guard.to_hex()
                ),
                PathBiasVerdict::Notice => tracing::info!(
                    "guard {} built {successes} of {attempts} circuits (below {PB_NOTICE_PCT}%)",
                    guard.to_hex()
                ),
                PathBiasVerdict::Fine => {}
            }
        }
        if after == PathBiasVerdict::Drop {
            self.sampled.retain(|(id, _)| *id != guard);
            self.bias.remove(&guard);
        }
        after
    }

    /// The path-bias counts of `guard`, if any circuit went through it.
    pub fn path_bias(&self, guard: &RelayId) -> Option<PathBias> {
        self.bias.get(guard).copied()
    }

    fn is_usable_guard(relays: &[RelayInfo], id: &RelayId) -> bool {
        relays
            .iter()
            .any(|r| r.id == *id && r.usable() && r.flags.guard)
    }

    /// Keep sampled guards for `days` days (default [`GUARD_LIFETIME_DAYS`]; at least one).
    pub fn set_lifetime_days(&mut self, days: u64) {
        self.lifetime_secs = days.max(1).saturating_mul(86_400);
    }

    /// Drop the guards sampled more than the guard lifetime before `now_unix`. Returns whether
    /// any was dropped.
    pub fn expire(&mut self, now_unix: u64) -> bool {
        let before = self.sampled.len();
        let lifetime = self.lifetime_secs;
        self.sampled
            .retain(|(_, added)| now_unix.saturating_sub(*added) < lifetime);
        self.sampled.len() != before
    }

    /// Drop expired guards ([`GuardSet::expire`]), then make sure at least `n` sampled guards
    /// are usable in `relays`, sampling new ones if needed. Returns whether the sample changed
    /// (then call [`GuardSet::save`]).
    pub fn refresh<R: Rng + ?Sized>(
        &mut self,
        relays: &[RelayInfo],
        n: usize,
        now_unix: u64,
        rng: &mut R,
    ) -> bool {
        self.refresh_weighted(relays, &PositionWeights::default(), n, now_unix, rng)
    }

    /// [`GuardSet::refresh`], sampling new guards by consensus weight × guard-position weight
    /// (`Wgg` for Guard-only relays, `Wgd` for Guard+Exit ones; dir-spec §3.8.3).
    pub fn refresh_weighted<R: Rng + ?Sized>(
        &mut self,
        relays: &[RelayInfo],
        weights: &PositionWeights,
        n: usize,
        now_unix: u64,
        rng: &mut R,
    ) -> bool {
        let mut changed = self.expire(now_unix);
        loop {
            let usable = self
                .sampled
                .iter()
                .filter(|(id, _)| Self::is_usable_guard(relays, id))
                .count();
            if usable >= n {
                break;
            }
            let cands: Vec<&RelayInfo> = relays
                .iter()
                .filter(|r| {
                    r.usable() && r.flags.guard && !self.sampled.iter().any(|(id, _)| *id == r.id)
                })
                .collect();
            let Some(pick) =
                weighted_choice_by(&cands, |r| weights.weight(r, Position::Guard), rng)
            else {
                break;
            };
            if self.sampled.len() >= MAX_SAMPLED {
                // Forget the oldest entry that is not usable now.
                if let Some(pos) = self
                    .sampled
                    .iter()
                    .position(|(id, _)| !Self::is_usable_guard(relays, id))
                {
                    self.sampled.remove(pos);
                } else {
                    break;
                }
            }
            self.sampled.push((pick.id, now_unix));
            changed = true;
        }
        changed
    }

    /// The primary guards: the first `n` sampled guards usable in `relays`, in order.
    pub fn primary(&self, relays: &[RelayInfo], n: usize) -> Vec<RelayId> {
        self.sampled
            .iter()
            .filter(|(id, _)| Self::is_usable_guard(relays, id))
            .map(|(id, _)| *id)
            .take(n)
            .collect()
    }

    /// Every sampled guard, in order.
    pub fn sampled(&self) -> Vec<RelayId> {
        self.sampled.iter().map(|(id, _)| *id).collect()
    }
}

/// A versioned JSON state file (`{"version": 1, ...}`) of the data directory: `None` when absent.
/// One larger than `max_len`, unparsable or of another version is moved aside to `*.json.bad` with a warning
/// (`what` names the file, `then` says what happens instead), and also gives `None`.
pub(crate) fn load_state_file<T: serde::de::DeserializeOwned + StateVersion>(
    path: &std::path::Path,
    max_len: u64,
    what: &str,
    then: &str,
) -> Result<Option<T>, ClientError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClientError::file(path, "reading", e)),
    };
    let parsed = if meta.len() > max_len {
        None
    } else {
        let text =
            std::fs::read_to_string(path).map_err(|e| ClientError::file(path, "reading", e))?;
        serde_json::from_str::<T>(&text).ok()
    };
    match parsed {
        Some(f) if f.version() == 1 => Ok(Some(f)),
        _ => {
            let bad = path.with_extension("json.bad");
            tracing::warn!(
                "{what} state file {} is unreadable; moved it to {} and {then}",
                path.display(),
                bad.display()
            );
            let _ = std::fs::rename(path, &bad);
            Ok(None)
        }
    }
}

/// The format version a state file declares.
pub(crate) trait StateVersion {
    /// Its `version` field.
    fn version(&self) -> u16;
}

impl StateVersion for GuardFile {
    fn version(&self) -> u16 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::relay;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn net() -> Vec<RelayInfo> {
        (1..=12u8)
            .map(|i| relay(i, [10, i, 0, 1], i <= 8, i > 8, 100))
            .collect()
    }

    #[test]
    fn sampling_uses_guard_position_weights() {
        // Relays 1-4: Guard only; 5-8: Guard and Exit. Wgd = 0: only Guard-only relays sampled.
        let relays: Vec<RelayInfo> = (1..=8u8)
            .map(|i| relay(i, [10, i, 0, 1], true, i > 4, 100))
            .collect();
        let w = PositionWeights {
            wgd: 0,
            ..PositionWeights::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(8);
        let mut g = GuardSet::load(dir.path()).unwrap();
        assert!(g.refresh_weighted(&relays, &w, 4, 1000, &mut rng));
        let p = g.primary(&relays, 4);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|id| id.0[0] <= 4), "{p:?}");
    }

    #[test]
    fn persists_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let relays = net();
        let mut rng = StdRng::seed_from_u64(5);
        let mut g = GuardSet::load(dir.path()).unwrap();
        assert!(g.primary(&relays, 3).is_empty());
        assert!(g.refresh(&relays, 3, 1000, &mut rng));
        let first = g.primary(&relays, 3);
        assert_eq!(first.len(), 3);
        for id in &first {
            assert!(relays.iter().any(|r| r.id == *id && r.flags.guard));
        }
        g.save().unwrap();
        assert!(!g.refresh(&relays, 3, 1001, &mut rng), "nothing to add");

        let mut g2 = GuardSet::load(dir.path()).unwrap();
        assert_eq!(
            g2.primary(&relays, 3),
            first,
            "same guards, same order after restart"
        );
        assert!(!g2.refresh(&relays, 3, 2000, &mut rng));

        // The first guard leaves the consensus: a new one is sampled, the old one is kept.
        let gone = first[0];
        let fewer: Vec<RelayInfo> = relays.iter().filter(|r| r.id != gone).cloned().collect();
        assert!(g2.refresh(&fewer, 3, 3000, &mut rng));
        let p = g2.primary(&fewer, 3);
        assert_eq!(p.len(), 3);
        assert_eq!(&p[..2], &first[1..]);
        assert!(g2.sampled().contains(&gone));
        // It comes back and regains first place.
        assert_eq!(g2.primary(&relays, 3)[0], gone);
    }

    #[test]
    fn corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let g = GuardSet::load(dir.path()).unwrap();
        assert!(g.sampled().is_empty());
        assert!(dir.path().join("guards.json.bad").exists());
    }

    #[test]
    fn too_few_guards_is_not_a_loop() {
        let relays: Vec<RelayInfo> = (1..=3u8)
            .map(|i| relay(i, [10, i, 0, 1], i == 1, false, 1))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut g = GuardSet::load(dir.path()).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(g.refresh(&relays, 3, 0, &mut rng));
        assert_eq!(g.primary(&relays, 3), vec![relays[0].id]);
    }

    #[test]
    fn guards_expire_after_their_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let relays = net();
        let mut rng = StdRng::seed_from_u64(9);
        let mut g = GuardSet::load(dir.path()).unwrap();
        let t0 = 1_000_000;
        assert!(g.refresh(&relays, 3, t0, &mut rng));
        let first = g.sampled();
        assert!(g.sampled.iter().all(|(_, added)| *added == t0));
        let lifetime = GUARD_LIFETIME_DAYS * 86_400;
        // Just before the lifetime ends: kept.
        assert!(!g.refresh(&relays, 3, t0 + lifetime - 1, &mut rng));
        assert_eq!(g.sampled(), first);
        // At the end of the lifetime: dropped and replaced by fresh samples.
        assert!(g.refresh(&relays, 3, t0 + lifetime, &mut rng));
        // (A dropped guard may be sampled again; it then starts a new lifetime.)
        assert!(g.sampled.iter().all(|(_, added)| *added == t0 + lifetime));
        assert_eq!(g.primary(&relays, 3).len(), 3);
        // Expiry survives a restart (the sampling time is in the state file).
        g.save().unwrap();
        let mut g2 = GuardSet::load(dir.path()).unwrap();
        g2.set_lifetime_days(1);
        assert!(!g2.expire(t0 + lifetime + 86_399));
        assert!(g2.expire(t0 + lifetime + 86_400));
        assert!(g2.sampled().is_empty());
    }

    #[test]
    fn path_bias_thresholds_and_drop() {
        // Too few attempts: never judged, even at 0%.
        let mut b = PathBias::default();
        for _ in 0..PB_MIN_CIRCS - 1 {
            b.record(false);
        }
        assert_eq!(b.verdict(), PathBiasVerdict::Fine);
        // At the minimum, each band.
        let at = |succ: u32| PathBias {
            attempts: 200,
            successes: succ,
        };
        assert_eq!(at(140).verdict(), PathBiasVerdict::Fine);
        assert_eq!(at(139).verdict(), PathBiasVerdict::Notice);
        assert_eq!(at(100).verdict(), PathBiasVerdict::Notice);
        assert_eq!(at(99).verdict(), PathBiasVerdict::Warn);
        assert_eq!(at(60).verdict(), PathBiasVerdict::Warn);
        assert_eq!(at(59).verdict(), PathBiasVerdict::Drop);
        // Scaling keeps the counts bounded.
        let mut s = PathBias::default();
        for i in 0..10_000u32 {
            s.record(i % 10 != 0);
        }
        assert!(s.attempts <= PB_SCALE_CIRCS);
        assert_eq!(s.verdict(), PathBiasVerdict::Fine, "{s:?}");

        // A guard that fails most circuits is dropped from the sample; others stay.
        let dir = tempfile::tempdir().unwrap();
        let relays = net();
        let mut rng = StdRng::seed_from_u64(3);
        let mut g = GuardSet::load(dir.path()).unwrap();
        g.refresh(&relays, 3, 0, &mut rng);
        let p = g.primary(&relays, 3);
        let (bad, good) = (p[0], p[1]);
        let mut last = PathBiasVerdict::Fine;
        for i in 0..PB_MIN_CIRCS {
            last = g.note_circuit(bad, i % 4 == 0); // 25% success
            g.note_circuit(good, i % 10 != 0); // 90%
        }
        assert_eq!(last, PathBiasVerdict::Drop);
        assert!(!g.sampled().contains(&bad));
        assert!(g.sampled().contains(&good));
        assert_eq!(
            g.path_bias(&good).map(|b| b.verdict()),
            Some(PathBiasVerdict::Fine)
        );
        // A replacement is sampled on the next refresh.
        assert!(g.refresh(&relays, 3, 1, &mut rng));
        assert_eq!(g.primary(&relays, 3).len(), 3);
    }
}
