//! Learned circuit build timeout (Tor's "CBT", path-spec §2.4 "Learning timeouts").
//!
//! The client records how long each circuit build takes and, once it has [`CbtConfig::min_samples`]
//! of them, times builds out at the [`CbtConfig::quantile`] (80%) point of a Pareto distribution
//! fitted to them, instead of the fixed initial timeout (10 s). On a fast network that cuts the
//! wait for a build stuck on a slow or dead relay from 10 s to a small multiple of a typical
//! build; on a slow network it never goes above the configured bound.
//!
//! The fit, on the last [`CbtConfig::max_samples`] builds:
//! - `Xm` (the Pareto scale) is the count-weighted mean of the midpoints of the
//!   [`CbtConfig::n_modes`] fullest histogram bins ([`CbtConfig::bin`] wide) of completed builds;
//! - builds that timed out are right-censored at the timeout they hit, so the shape is the
//!   censored maximum-likelihood estimate
//!   `alpha = completed / (sum over completed of ln(max(x, Xm)/Xm) + sum over timed out of ln(max(t, Xm)/Xm))`;
//! - the timeout is the quantile `q`: `Xm / (1 - q)^(1/alpha)`, clamped to
//!   [`CbtConfig::min_timeout`] ..= [`CbtConfig::initial`].
//!
//! If [`CbtConfig::reset_timeouts`] of the last [`CbtConfig::recent`] builds timed out, the
//! network probably changed (a new uplink, a suspended laptop): the history is dropped and the
//! initial timeout applies again until enough new builds are seen.
//!
//! Sans-IO: durations in, a duration out. [`BuildTimes::to_state`] / [`BuildTimes::from_state`]
//! let the manager keep the history across restarts (`cbt.json` in the client's state dir).

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Parameters of the learned timeout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CbtConfig {
    /// Timeout until enough builds are recorded, and the upper bound of a learned one.
    pub initial: Duration,
    /// Lower bound of a learned timeout.
    pub min_timeout: Duration,
    /// Builds needed before the timeout is learned (Tor: 100).
    pub min_samples: usize,
    /// Builds kept (Tor: 1000).
    pub max_samples: usize,
    /// Histogram bin width (Tor: 10 ms).
    pub bin: Duration,
    /// Bins averaged for `Xm` (Tor: 10).
    pub n_modes: usize,
    /// The quantile the timeout sits at (Tor: 0.80).
    pub quantile: f64,
    /// Outcomes looked at for a network change (Tor: 20)...
    pub recent: usize,
    /// ...of which this many timed out resets the history (Tor: 18).
    pub reset_timeouts: usize,
}

impl Default for CbtConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            // Tor uses 10 ms; a build on a loaded machine can stall longer than that without
            // anything being wrong with the path.
            min_timeout: Duration::from_millis(500),
            min_samples: 100,
            max_samples: 1000,
            bin: Duration::from_millis(10),
            n_modes: 10,
            quantile: 0.80,
            recent: 20,
            reset_timeouts: 18,
        }
    }
}

/// One recorded build: milliseconds, and whether it was cut off by a timeout at that point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Build time, or the timeout it hit, in milliseconds.
    pub ms: u32,
    /// The build timed out after `ms`.
    pub timed_out: bool,
}

/// What is kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtState {
    /// Format version (1).
    pub version: u32,
    /// Recorded builds, oldest first.
    pub samples: Vec<Sample>,
}

/// Build-time history and the timeout learned from it.
#[derive(Debug, Clone)]
pub struct BuildTimes {
    cfg: CbtConfig,
    samples: VecDeque<Sample>,
    /// Outcomes of the last `cfg.recent` builds (true: timed out).
    recent: VecDeque<bool>,
    timeout: Duration,
    /// The fitted (Xm ms, alpha), once learned.
    fit: Option<(f64, f64)>,
}

impl BuildTimes {
    /// No history: the initial timeout.
    pub fn new(cfg: CbtConfig) -> Self {
        let cfg = CbtConfig {
            min_samples: cfg.min_samples.max(2),
            max_samples: cfg.max_samples.max(cfg.min_samples.max(2)),
            bin: cfg.bin.max(Duration::from_millis(1)),
            n_modes: cfg.n_modes.max(1),
            quantile: if cfg.quantile > 0.0 && cfg.quantile < 1.0 {
                cfg.quantile
            } else {
                0.80
            },
            recent: cfg.recent.max(1),
            reset_timeouts: cfg.reset_timeouts.clamp(1, cfg.recent.max(1)),
            min_timeout: cfg.min_timeout.min(cfg.initial),
            initial: cfg.initial,
        };
        Self {
            cfg,
            samples: VecDeque::new(),
            recent: VecDeque::new(),
            timeout: cfg.initial,
            fit: None,
        }
    }

    /// The timeout to use for the next build.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the timeout is learned (enough builds recorded) rather than the initial one.
    pub fn is_learned(&self) -> bool {
        self.fit.is_some()
    }

    /// The fitted Pareto scale (ms) and shape, once learned.
    pub fn fit(&self) -> Option<(f64, f64)> {
        self.fit
    }

    /// Builds recorded.
    pub fn n_samples(&self) -> usize {
        self.samples.len()
    }

    /// A build finished after `took`.
    pub fn record_success(&mut self, took: Duration) {
        self.push(Sample {
            ms: ms(took),
            timed_out: false,
        });
        self.note_outcome(false);
    }

    /// A build was abandoned when its timeout `after` passed.
    pub fn record_timeout(&mut self, after: Duration) {
        self.push(Sample {
            ms: ms(after),
            timed_out: true,
        });
        self.note_outcome(true);
    }

    fn push(&mut self, s: Sample) {
        if self.samples.len() >= self.cfg.max_samples {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    fn note_outcome(&mut self, timed_out: bool) {
        if self.recent.len() >= self.cfg.recent {
            self.recent.pop_front();
        }
        self.recent.push_back(timed_out);
        let n_timeouts = self.recent.iter().filter(|&&t| t).count();
        if n_timeouts >= self.cfg.reset_timeouts {
            tracing::info!(
                timeouts = n_timeouts,
                of = self.recent.len(),
                "most recent circuit builds timed out; the network may have changed: \
                 forgetting build times and using the initial timeout again"
            );
            self.samples.clear();
            self.recent.clear();
            self.timeout = self.cfg.initial;
            self.fit = None;
            return;
        }
        self.recompute();
    }

    fn recompute(&mut self) {
        self.fit = None;
        self.timeout = self.cfg.initial;
        let completed = self.samples.iter().filter(|s| !s.timed_out).count();
        if self.samples.len() < self.cfg.min_samples || completed == 0 {
            return;
        }
        let Some(xm) = self.mode_ms() else { return };
        let denom: f64 = self
            .samples
            .iter()
            .map(|s| (f64::from(s.ms).max(xm) / xm).ln())
            .sum();
        if denom <= 0.0 || !denom.is_finite() {
            // Every build took about Xm: no spread to fit; keep the initial timeout.
            return;
        }
        let alpha = completed as f64 / denom;
        let t_ms = xm / (1.0 - self.cfg.quantile).powf(1.0 / alpha);
        if !t_ms.is_finite() {
            return;
        }
        let t = Duration::from_secs_f64((t_ms / 1000.0).clamp(0.0, 1e6));
        self.timeout = t.clamp(self.cfg.min_timeout, self.cfg.initial);
        self.fit = Some((xm, alpha));
    }

    /// `Xm`: the count-weighted mean midpoint of the fullest bins of completed builds.
    fn mode_ms(&self) -> Option<f64> {
        let bin_ms = u64::try_from(self.cfg.bin.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut bins: Vec<(u64, usize)> = Vec::new();
        let mut sorted: Vec<u64> = self
            .samples
            .iter()
            .filter(|s| !s.timed_out)
            .map(|s| u64::from(s.ms) / bin_ms)
            .collect();
        sorted.sort_unstable();
        for b in sorted {
            match bins.last_mut() {
                Some((last, n)) if *last == b => *n += 1,
                _ => bins.push((b, 1)),
            }
        }
        // Fullest first; among equals the faster bin.
        bins.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let top = bins.get(..self.cfg.n_modes.min(bins.len()))?;
        let total: usize = top.iter().map(|&(_, n)| n).sum();
        if total == 0 {
            return None;
        }
        let sum: f64 = top
            .iter()
            .map(|&(b, n)| (b as f64 + 0.5) * bin_ms as f64 * n as f64)
            .sum();
        Some(sum / total as f64)
    }

    /// The history to save.
    pub fn to_state(&self) -> CbtState {
        CbtState {
            version: 1,
            samples: self.samples.iter().copied().collect(),
        }
    }

    /// Restore a saved history (the newest `max_samples` builds of it; another version is
    /// ignored). The outcome window for network changes starts empty.
    pub fn from_state(cfg: CbtConfig, state: &CbtState) -> Self {
        let mut t = Self::new(cfg);
        if state.version == 1 {
            let skip = state.samples.len().saturating_sub(t.cfg.max_samples);
            t.samples.extend(state.samples.iter().skip(skip).copied());
            t.recompute();
        }
        t
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic Pareto(xm, alpha) draws by inverse transform on an even grid of quantiles.
    fn pareto_ms(xm: f64, alpha: f64, n: usize) -> Vec<Duration> {
        let mut v: Vec<Duration> = (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64;
                Duration::from_secs_f64(xm / (1.0 - u).powf(1.0 / alpha) / 1000.0)
            })
            .collect();
        // Interleave so that no prefix is sorted (the order must not matter).
        let mut out = Vec::with_capacity(n);
        while !v.is_empty() {
            out.push(v.remove(0));
            if let Some(x) = v.pop() {
                out.push(x);
            }
        }
        out
    }

    fn cfg() -> CbtConfig {
        CbtConfig {
            min_timeout: Duration::from_millis(10),
            ..CbtConfig::default()
        }
    }

    #[test]
    fn initial_timeout_until_enough_samples() {
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 99) {
            b.record_success(d);
        }
        assert_eq!(b.timeout(), Duration::from_secs(10));
        assert!(!b.is_learned());
        b.record_success(Duration::from_millis(210));
        assert!(b.is_learned());
        assert!(b.timeout() < Duration::from_secs(2), "{:?}", b.timeout());
    }

    #[test]
    fn learned_timeout_is_near_the_80th_percentile() {
        // Pareto with Xm 200 ms and alpha 3: the 80th percentile is 200 / 0.2^(1/3) = 342 ms.
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 1000) {
            b.record_success(d);
        }
        let t = b.timeout().as_secs_f64() * 1000.0;
        let (xm, alpha) = b.fit().unwrap();
        // The mode estimate sits on 10 ms bins at the start of the distribution.
        assert!((195.0..=240.0).contains(&xm), "xm {xm}");
        // Averaging the ten fullest bins puts Xm above the true scale, which raises alpha
        // (Tor's estimator does the same); the quantile comes out right regardless.
        assert!((2.0..=6.0).contains(&alpha), "alpha {alpha}");
        assert!((300.0..=420.0).contains(&t), "timeout {t} ms");
    }

    #[test]
    fn timeouts_are_censored_not_ignored() {
        // The same builds, but the slowest 20% were cut off at 400 ms: the fit must still put
        // the timeout near the true 80th percentile, not collapse towards the mode.
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 500) {
            if d > Duration::from_millis(400) {
                b.record_timeout(Duration::from_millis(400));
            } else {
                b.record_success(d);
            }
        }
        let t = b.timeout().as_secs_f64() * 1000.0;
        assert!((300.0..=420.0).contains(&t), "timeout {t} ms");
        // Dropping the builds that timed out instead would fit only the fast ones and pull the
        // timeout down, so that ever more builds time out.
        let mut naive = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 500) {
            if d <= Duration::from_millis(400) {
                naive.record_success(d);
            }
        }
        let naive_t = naive.timeout().as_secs_f64() * 1000.0;
        assert!(naive_t < t * 0.95, "naive {naive_t} vs censored {t}");
    }

    #[test]
    fn slow_network_stays_within_bounds() {
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(8000.0, 1.5, 200) {
            b.record_success(d);
        }
        assert_eq!(b.timeout(), Duration::from_secs(10));
        let mut fast = BuildTimes::new(CbtConfig {
            min_timeout: Duration::from_millis(250),
            ..cfg()
        });
        for d in pareto_ms(5.0, 3.0, 200) {
            fast.record_success(d);
        }
        assert_eq!(fast.timeout(), Duration::from_millis(250));
    }

    #[test]
    fn many_recent_timeouts_reset_the_history() {
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 300) {
            b.record_success(d);
        }
        assert!(b.is_learned());
        let learned = b.timeout();
        // 17 timeouts out of the last 20 are tolerated (a bad patch)...
        for i in 0..20 {
            if i % 7 == 0 {
                b.record_success(Duration::from_millis(250));
            } else {
                b.record_timeout(learned);
            }
        }
        assert!(b.is_learned());
        // ...18 in a row mean the network changed.
        for _ in 0..18 {
            b.record_timeout(learned);
        }
        assert!(!b.is_learned());
        // The history was dropped when the 18th timeout of a window came in; only the
        // timeouts after that are left.
        assert!(b.n_samples() < 18, "{}", b.n_samples());
        assert_eq!(b.timeout(), Duration::from_secs(10));
    }

    #[test]
    fn state_round_trips_and_is_bounded() {
        let mut b = BuildTimes::new(cfg());
        for d in pareto_ms(200.0, 3.0, 1500) {
            b.record_success(d);
        }
        assert_eq!(b.n_samples(), 1000);
        let state = b.to_state();
        let json = serde_json::to_string(&state).unwrap();
        let back: CbtState = serde_json::from_str(&json).unwrap();
        let r = BuildTimes::from_state(cfg(), &back);
        assert_eq!(r.timeout(), b.timeout());
        assert_eq!(r.n_samples(), 1000);
        // A bigger saved history is cut to the newest builds; another version is ignored.
        let mut big = back.clone();
        big.samples.extend(back.samples.iter().copied());
        assert_eq!(BuildTimes::from_state(cfg(), &big).n_samples(), 1000);
        big.version = 2;
        assert_eq!(BuildTimes::from_state(cfg(), &big).n_samples(), 0);
    }

    #[test]
    fn scaled_minimum_for_tests() {
        let mut b = BuildTimes::new(CbtConfig {
            min_samples: 10,
            ..cfg()
        });
        for d in pareto_ms(50.0, 2.0, 10) {
            b.record_success(d);
        }
        assert!(b.is_learned());
        assert!(b.timeout() < Duration::from_millis(500));
    }
}
