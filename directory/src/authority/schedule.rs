//! When each phase of a voting round runs (the thin timer driver over `round`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::state::Inner;

/// The wall clock in unix milliseconds (the schedule's only clock read).
#[allow(clippy::disallowed_methods)] // the voting schedule driver: the authority's one clock
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The voting schedule. For the period starting at `va` (a multiple of the interval `I`, in
/// seconds) the authority votes at `va − I/2`, computes at `va − I/4` and publishes at `va`. Phase
/// times are kept in milliseconds so that short test-network intervals (2 s) keep three distinct
/// phases and no phase fires up to a second late.
#[allow(clippy::disallowed_methods)] // the voting schedule driver: the authority's one clock
pub(crate) async fn schedule_loop(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let i = inner.cfg.voting_interval_secs;
    let i_ms = i.saturating_mul(1000);
    loop {
        let now_ms = now_unix_ms();
        let mut va = super::next_valid_after(now_ms / 1000, i);
        // Too late to vote for the next period: aim at the one after.
        if now_ms > (va * 1000).saturating_sub(i_ms / 4) {
            va += i;
        }
        let va_ms = va * 1000;
        let phases: [(u64, u8); 3] = [(va_ms - i_ms / 2, 0), (va_ms - i_ms / 4, 1), (va_ms, 2)];
        for (at, phase) in phases {
            let wait = at.saturating_sub(now_unix_ms());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = shutdown.changed() => return,
            }
            let r = match phase {
                0 => inner.vote_phase(va).await,
                1 => inner.compute_phase(va).await,
                _ => inner.publish_phase(va).await.map(|_| ()),
            };
            if let Err(e) = r {
                tracing::warn!(valid_after = va, error = %e, "voting round step failed");
            }
        }
    }
}
