//! Uptime history of each relay, fed by the authority's own reachability probes: weighted mean
//! time between failures (MTBF) and weighted fractional uptime (WFU), as Tor's `rephist`
//! computes them for the Stable and Guard flags (docs/protocol/80-directory.md, "Uptime history").
//!
//! Invariants:
//! - Pure: every method takes `now` (Unix seconds); nothing here reads a clock.
//! - Counters are integers in thousandths (seconds × 1000, runs × 1000) so a record is `Eq`,
//!   persists exactly in `history.json` and decays identically on every machine.
//! - Decay happens at absolute epoch boundaries (`floor(t / decay_interval)`): each boundary
//!   crossed multiplies every counter by [`DECAY_ALPHA_PERMILLE`]/1000 (Tor: 0.95 every 12 h).
//! - Between two probes, the interval counts as up iff the earlier probe succeeded.

use serde::{Deserialize, Serialize};

/// Decay factor per interval, in thousandths (Tor's `STABILITY_ALPHA` 0.95).
pub const DECAY_ALPHA_PERMILLE: u64 = 950;
/// Default decay interval (Tor's `STABILITY_INTERVAL`, 12 hours).
pub const DEFAULT_DECAY_INTERVAL_SECS: u64 = 12 * 3600;
/// Fixed-point scale of the counters.
const SCALE: u64 = 1000;
/// After this many decay steps every counter is zero anyway (0.95^800 < 1e-17).
const MAX_DECAY_STEPS: u64 = 800;
/// WFU is reported in parts per million.
pub const WFU_SCALE: u64 = 1_000_000;

/// What the authority remembers about a relay's reachability (persisted in `history.json`;
/// fields added later default to zero, so older files keep loading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayHistory {
    /// First time a descriptor for this identity was accepted (Tor's time known, TK).
    pub first_seen: u64,
    /// Start of the current run of successful probes (`None` when the last probe failed).
    pub running_since: Option<u64>,
    /// Time of the last probe (0: never probed).
    pub last_probe: u64,
    /// Result of the last probe.
    pub last_ok: bool,
    /// Decayed sum of the lengths of completed runs (seconds × 1000).
    pub weighted_run_length: u64,
    /// Decayed number of completed runs (× 1000).
    pub total_run_weights: u64,
    /// Decayed time observed up (seconds × 1000).
    pub weighted_uptime: u64,
    /// Decayed time observed at all (seconds × 1000).
    pub total_weighted_time: u64,
    /// The decay epoch (`floor(t / interval)`) the counters are expressed at.
    pub decay_epoch: u64,
}

fn decay(v: u64, steps: u64) -> u64 {
    if steps >= MAX_DECAY_STEPS {
        return 0;
    }
    let mut x = u128::from(v);
    for _ in 0..steps {
        x = x * u128::from(DECAY_ALPHA_PERMILLE) / u128::from(SCALE);
        if x == 0 {
            break;
        }
    }
    u64::try_from(x).unwrap_or(u64::MAX)
}

impl RelayHistory {
    /// A record for a relay first seen at `now`.
    pub fn new(now: u64) -> Self {
        Self {
            first_seen: now,
            ..Self::default()
        }
    }

    /// Record a probe result with the default decay interval (12 h).
    pub fn record(&mut self, ok: bool, now: u64) {
        self.record_with(ok, now, DEFAULT_DECAY_INTERVAL_SECS);
    }

    /// Record a probe result at `now`, decaying with `decay_interval` seconds per step.
    /// A result older than the last one recorded is ignored (probes may finish out of order).
    pub fn record_with(&mut self, ok: bool, now: u64, decay_interval: u64) {
        if self.last_probe != 0 && now < self.last_probe {
            return;
        }
        self.decay_to(now, decay_interval);
        if self.last_probe != 0 {
            let elapsed = now.saturating_sub(self.last_probe).saturating_mul(SCALE);
            self.total_weighted_time = self.total_weighted_time.saturating_add(elapsed);
            if self.last_ok {
                self.weighted_uptime = self.weighted_uptime.saturating_add(elapsed);
            }
        }
        match (self.running_since, ok) {
            (Some(since), false) => {
                // A run ended: count it for MTBF.
                let run = now.saturating_sub(since).saturating_mul(SCALE);
                self.weighted_run_length = self.weighted_run_length.saturating_add(run);
                self.total_run_weights = self.total_run_weights.saturating_add(SCALE);
                self.running_since = None;
            }
            (None, true) => self.running_since = Some(now),
            _ => {}
        }
        self.last_probe = now;
        self.last_ok = ok;
    }

    /// Bring the counters to the decay epoch of `now` (no-op when already there or earlier).
    pub fn decay_to(&mut self, now: u64, decay_interval: u64) {
        let epoch = now / decay_interval.max(1);
        if epoch <= self.decay_epoch {
            return;
        }
        // A fresh record starts at the current epoch without decaying nothing.
        let steps = if self.decay_epoch == 0 && self.is_empty() {
            0
        } else {
            epoch - self.decay_epoch
        };
        self.weighted_run_length = decay(self.weighted_run_length, steps);
        self.total_run_weights = decay(self.total_run_weights, steps);
        self.weighted_uptime = decay(self.weighted_uptime, steps);
        self.total_weighted_time = decay(self.total_weighted_time, steps);
        self.decay_epoch = epoch;
    }

    fn is_empty(&self) -> bool {
        self.weighted_run_length == 0
            && self.total_run_weights == 0
            && self.weighted_uptime == 0
            && self.total_weighted_time == 0
    }

    /// Whether the relay counts as running (its last probe succeeded).
    pub fn is_running(&self) -> bool {
        self.last_ok && self.running_since.is_some()
    }

    /// Seconds of the current run (0 when down).
    pub fn uptime(&self, now: u64) -> u64 {
        self.running_since
            .filter(|_| self.last_ok)
            .map_or(0, |s| now.saturating_sub(s))
    }

    /// Seconds since first seen (time known).
    pub fn time_known(&self, now: u64) -> u64 {
        now.saturating_sub(self.first_seen)
    }

    /// Weighted mean time between failures, in seconds: the decayed completed runs plus the
    /// current run (weight 1), divided by their decayed count. 0 with no run at all.
    pub fn mtbf(&self, now: u64) -> u64 {
        let mut total = u128::from(self.weighted_run_length);
        let mut weights = u128::from(self.total_run_weights);
        if let Some(since) = self.running_since.filter(|_| self.last_ok) {
            total += u128::from(now.saturating_sub(since)) * u128::from(SCALE);
            weights += u128::from(SCALE);
        }
        if weights == 0 {
            return 0;
        }
        u64::try_from(total / weights).unwrap_or(u64::MAX)
    }

    /// Weighted fractional uptime in parts per million: decayed time up over decayed time
    /// observed, the interval since the last probe counting as the last probe said. 0 when
    /// nothing has been observed for a positive time yet.
    pub fn wfu(&self, now: u64) -> u64 {
        let since_last = if self.last_probe == 0 {
            0
        } else {
            u128::from(now.saturating_sub(self.last_probe)) * u128::from(SCALE)
        };
        let up = u128::from(self.weighted_uptime) + if self.last_ok { since_last } else { 0 };
        let total = u128::from(self.total_weighted_time) + since_last;
        if total == 0 {
            return 0;
        }
        u64::try_from(up * u128::from(WFU_SCALE) / total).unwrap_or(WFU_SCALE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn runs_and_failures_give_mtbf() {
        let mut h = RelayHistory::new(1000);
        // Up for 10 h, down 1 h, up 20 h, down: runs of 10 h and 20 h (no decay: long interval).
        let iv = 1_000_000 * H;
        h.record_with(true, 1000, iv);
        h.record_with(false, 1000 + 10 * H, iv);
        h.record_with(true, 1000 + 11 * H, iv);
        h.record_with(false, 1000 + 31 * H, iv);
        assert_eq!(h.mtbf(1000 + 32 * H), 15 * H);
        // A current run counts with weight 1.
        h.record_with(true, 1000 + 32 * H, iv);
        assert_eq!(h.mtbf(1000 + 32 * H + 45 * H), (10 + 20 + 45) * H / 3);
        assert!(h.is_running());
        assert_eq!(h.uptime(1000 + 33 * H), H);
        assert_eq!(RelayHistory::new(5).mtbf(10), 0);
    }

    #[test]
    fn wfu_counts_intervals_by_earlier_result() {
        let iv = 1_000_000 * H;
        let mut h = RelayHistory::new(0);
        h.record_with(true, 100, iv);
        assert_eq!(h.wfu(100), 0, "nothing observed for a positive time");
        h.record_with(true, 200, iv); // 100 s up
        h.record_with(false, 300, iv); // 100 s up (earlier probe ok)
        h.record_with(true, 500, iv); // 200 s down
        assert_eq!(h.wfu(500), WFU_SCALE / 2);
        // 100 more seconds since the last (ok) probe count as up: 300 / 500.
        assert_eq!(h.wfu(600), 600_000);
    }

    #[test]
    fn decay_halves_old_history_weight() {
        // Interval 10 s: old downtime fades so recent uptime dominates.
        let iv = 10;
        let mut h = RelayHistory::new(0);
        h.record_with(false, 5, iv);
        h.record_with(true, 1005, iv); // 1000 s down
        let before = h.wfu(1005);
        assert_eq!(before, 0);
        for t in (1015..=2005).step_by(10) {
            h.record_with(true, t, iv);
        }
        let w = h.wfu(2005);
        // Undecayed it would be exactly 50%; with decay the recent uptime weighs more.
        assert!(w > 900_000, "{w}");
        // Much later, with no probe, counters decay when the next result arrives.
        let mut g = h;
        g.record_with(true, 2005 + 10 * MAX_DECAY_STEPS, iv);
        assert_eq!(
            g.weighted_uptime, g.total_weighted_time,
            "old history forgotten"
        );
        assert_eq!(g.wfu(2005 + 10 * MAX_DECAY_STEPS), WFU_SCALE);
    }

    #[test]
    fn decay_is_per_epoch_and_exact() {
        let mut h = RelayHistory {
            weighted_run_length: 1_000_000,
            total_run_weights: 2000,
            decay_epoch: 3,
            ..RelayHistory::default()
        };
        h.decay_to(35, 10); // epoch 3: nothing
        assert_eq!(h.weighted_run_length, 1_000_000);
        h.decay_to(52, 10); // epoch 5: two steps
        assert_eq!(h.weighted_run_length, 902_500);
        assert_eq!(h.total_run_weights, 1805);
        assert_eq!(h.mtbf(52), 500);
        h.decay_to(40, 10); // going back never re-decays
        assert_eq!(h.decay_epoch, 5);
    }

    #[test]
    fn out_of_order_results_ignored() {
        let mut h = RelayHistory::new(0);
        h.record_with(true, 100, 50);
        let snap = h;
        h.record_with(false, 90, 50);
        assert_eq!(h, snap);
    }

    #[test]
    fn persists_through_json_and_old_files_load() {
        let mut h = RelayHistory::new(7);
        h.record_with(true, 10, 5);
        h.record_with(false, 100, 5);
        h.record_with(true, 150, 5);
        let text = serde_json::to_string(&h).expect("json");
        let back: RelayHistory = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, h);
        assert_eq!(back.mtbf(200), h.mtbf(200));
        // A file written before the uptime counters existed.
        let old = r#"{"first_seen":5,"running_since":9,"last_probe":9,"last_ok":true}"#;
        let o: RelayHistory = serde_json::from_str(old).expect("old format");
        assert_eq!(o.first_seen, 5);
        assert_eq!(o.weighted_run_length, 0);
        assert_eq!(o.mtbf(19), 10);
    }
}
