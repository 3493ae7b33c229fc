//! The proxy's proof-of-work solvers (issue 13): a client's proof for an introduction is CPU
//! work of up to a few seconds ([`super::pow::MAX_CLIENT_EFFORT`]), so it runs on tokio's
//! blocking threads, never on the async ones.
//!
//! Bounds: at most `n` solvers at once for the whole proxy (a semaphore whose permit goes into
//! the blocking thread, so a dropped connection frees it only once its solver has stopped);
//! each within a time limit that includes the wait for a free solver; and a solver whose
//! caller is gone (timed out, or the connection dropped) is told to stop and does within
//! [`super::pow::SOLVE_CHECK_EVERY`] hashes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// A bounded set of blocking-thread solvers.
#[derive(Debug)]
pub(crate) struct PowSolvers {
    sem: Arc<Semaphore>,
    timeout: Duration,
}

/// Tells a solver on a blocking thread to stop when its caller goes.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl PowSolvers {
    /// At most `n` solvers at once, each given `timeout` (the wait for a free one included).
    pub(crate) fn new(n: usize, timeout: Duration) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(n.max(1))),
            timeout,
        }
    }

    /// Run `work` on a blocking thread once a solver is free. `work` is given a `keep_going`
    /// to ask now and then; it answers `false` once the caller has stopped waiting. `None`:
    /// `work` found nothing, or not within the time limit.
    pub(crate) async fn run<T, F>(&self, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Fn() -> bool) -> Option<T> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
        let sem = Arc::clone(&self.sem);
        let job = async move {
            let permit = sem.acquire_owned().await.ok()?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                work(&|| !stop.load(Ordering::Relaxed))
            })
            .await
            .ok()
            .flatten()
        };
        tokio::time::timeout(self.timeout, job).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn solvers_are_bounded_in_number_and_time_and_stop_when_dropped() {
        let solvers = Arc::new(PowSolvers::new(1, Duration::from_secs(10)));
        let started = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        // A solver that never finds: it holds the only permit until told to stop.
        let busy = {
            let (solvers, started, stopped) = (
                Arc::clone(&solvers),
                Arc::clone(&started),
                Arc::clone(&stopped),
            );
            tokio::spawn(async move {
                solvers
                    .run(move |keep_going| {
                        started.store(true, Ordering::SeqCst);
                        while keep_going() {
                            std::thread::yield_now();
                        }
                        stopped.store(true, Ordering::SeqCst);
                        None::<u32>
                    })
                    .await
            })
        };
        while !started.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        // A second one, however easy, waits for the busy one and runs out of time.
        let short = PowSolvers {
            sem: Arc::clone(&solvers.sem),
            timeout: Duration::from_millis(50),
        };
        assert_eq!(short.run(|_| Some(7)).await, None, "bounded to one solver");
        assert!(!stopped.load(Ordering::SeqCst));
        // The busy one's connection goes: its solver stops and frees its place.
        busy.abort();
        assert!(busy.await.is_err());
        assert_eq!(solvers.run(|_| Some(7)).await, Some(7));
        assert!(
            stopped.load(Ordering::SeqCst),
            "the dropped solver was told to stop"
        );
    }
}
