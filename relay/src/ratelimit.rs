//! Token-bucket bandwidth limiter shared by every link and exit stream of a relay.
//!
//! Readers take tokens in batches (a [`Credit`] per reader) so that the shared lock is touched at
//! most once per batch of cells, not once per cell. A rate of 0 means unlimited: then no lock is
//! ever taken.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shared bucket.
#[derive(Debug)]
pub struct TokenBucket {
    /// Bytes per second (0 = unlimited); changed live by [`TokenBucket::set_rate`].
    rate: AtomicU64,
    burst: AtomicU64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket with `rate` bytes/s (0 = unlimited) and `burst` bytes, initially full.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1);
        Self {
            rate: AtomicU64::new(rate),
            burst: AtomicU64::new(burst),
            state: Mutex::new(BucketState {
                tokens: burst,
                last: now,
            }),
        }
    }

    /// Whether this bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) == 0
    }

    /// Change the rate (bytes/s, 0 = unlimited) and burst of a running bucket (a configuration
    /// reload). Tokens above the new burst are dropped; readers see the change at their next
    /// refill.
    pub fn set_rate(&self, rate: u64, burst: u64) {
        let burst = burst.max(1);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.burst.store(burst, Ordering::Relaxed);
        self.rate.store(rate, Ordering::Relaxed);
        st.tokens = st.tokens.min(burst);
    }

    /// The current rate (bytes/s, 0 = unlimited) and burst.
    pub fn rate(&self) -> (u64, u64) {
        (
            self.rate.load(Ordering::Relaxed),
            self.burst.load(Ordering::Relaxed),
        )
    }

    fn burst(&self) -> u64 {
        self.burst.load(Ordering::Relaxed)
    }

    /// Take up to `want` tokens at time `now`. Returns how many were granted (possibly 0) and, if
    /// fewer than `want`, how long until `want` more would be available.
    pub fn take(&self, want: u64, now: Instant) -> (u64, Option<Duration>) {
        if self.is_unlimited() {
            return (want, None);
        }
        let Ok(mut st) = self.state.lock() else {
            return (want, None);
        };
        // Read under the lock, so a concurrent `set_rate` is seen whole.
        let (rate, burst) = self.rate();
        if rate == 0 {
            return (want, None);
        }
        let elapsed = now.saturating_duration_since(st.last);
        let add = (elapsed.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000)
            .min(u128::from(burst)) as u64;
        if add > 0 {
            st.tokens = st.tokens.saturating_add(add).min(burst);
            st.last = now;
        }
        let got = want.min(st.tokens);
        st.tokens -= got;
        if got == want {
            (got, None)
        } else {
            let missing = want - got;
            let nanos = u128::from(missing).saturating_mul(1_000_000_000) / u128::from(rate);
            let wait = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            (got, Some(wait.max(Duration::from_millis(1))))
        }
    }
}

/// A reader's local share of tokens, refilled from the bucket in batches.
#[derive(Debug, Default)]
pub struct Credit {
    have: u64,
}

/// Size of one refill from the shared bucket.
const BATCH: u64 = 32 * 1024;

impl Credit {
    /// Spend `n` bytes, waiting (in bounded sleeps) until the bucket grants them.
    #[allow(clippy::disallowed_methods)] // Driver: the bucket is paced by tokio's clock.
    pub async fn spend(&mut self, bucket: &TokenBucket, n: u64) {
        if bucket.is_unlimited() {
            return;
        }
        while self.have < n {
            let want = BATCH.max(n - self.have).min(bucket.burst().max(n));
            let (got, wait) = bucket.take(want, tokio::time::Instant::now().into_std());
            self.have = self.have.saturating_add(got);
            if self.have >= n {
                break;
            }
            if let Some(w) = wait {
                tokio::time::sleep(w.min(Duration::from_secs(1))).await;
            }
        }
        self.have -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // the epoch of the test clock (tokio paused time in the async test)
    fn bucket_refills_at_rate_and_caps_at_burst() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1000, 2000, t0);
        assert_eq!(b.take(1500, t0), (1500, None));
        let (got, wait) = b.take(1000, t0);
        assert_eq!(got, 500);
        assert_eq!(wait, Some(Duration::from_millis(500)));
        // After 1 s, 1000 new tokens.
        let (got, wait) = b.take(5000, t0 + Duration::from_secs(1));
        assert_eq!(got, 1000);
        assert!(wait.is_some());
        // After a long idle period, at most `burst`.
        let (got, _) = b.take(10_000, t0 + Duration::from_secs(100));
        assert_eq!(got, 2000);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the epoch of the test clock (tokio paused time in the async test)
    fn unlimited_never_waits() {
        let b = TokenBucket::new(0, 0, Instant::now());
        assert_eq!(b.take(u64::MAX, Instant::now()), (u64::MAX, None));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the epoch of the test clock
    fn set_rate_applies_to_a_running_bucket() {
        let t0 = Instant::now();
        let b = TokenBucket::new(0, 0, t0);
        assert!(b.is_unlimited());
        b.set_rate(1000, 1000);
        assert!(!b.is_unlimited());
        assert_eq!(b.rate(), (1000, 1000));
        // At most the new burst is granted, then the new rate paces.
        let (got, wait) = b.take(5000, t0);
        assert!(got <= 1000, "{got}");
        assert!(wait.is_some());
        let (got, _) = b.take(5000, t0 + Duration::from_secs(100));
        assert_eq!(got, 1000);
        b.set_rate(0, 0);
        assert_eq!(b.take(u64::MAX, t0), (u64::MAX, None));
    }

    #[tokio::test(start_paused = true)]
    #[allow(clippy::disallowed_methods)] // the epoch of the test clock (tokio paused time in the async test)
    async fn credit_spend_waits_for_tokens() {
        let b = TokenBucket::new(1024 * 100, 1024, tokio::time::Instant::now().into_std());
        let mut c = Credit::default();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            c.spend(&b, 1024).await;
        }
        // 9 KiB beyond the burst at 100 KiB/s: at least ~90 ms of (virtual) waiting.
        assert!(start.elapsed() >= Duration::from_millis(80));
    }
}
