//! Reachability on the authority state: forget expired descriptors, probe relays in a fair
//! order (bounded concurrency, time per probe and time per pass), spread over the period by a
//! background prober, probe a new relay soon after its upload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public};
use futures::StreamExt as _;
use tokio::sync::watch;

use super::limits::{Limit, Prefix, ProbeTarget, probe_order};
use super::state::{Inner, PROBE_CONCURRENCY, State};
use super::vote::RelayHistory;
use crate::now_unix;

impl Inner {
    /// Forget descriptors that have expired (memory and disk).
    pub(super) fn prune_expired(&self, now: u64) {
        let gone: Vec<RelayId> = {
            let mut st = self.lock();
            let gone: Vec<RelayId> = st
                .descs
                .iter()
                .filter(|(_, d)| d.desc().expires <= now)
                .map(|(k, _)| *k)
                .collect();
            for id in &gone {
                st.descs.remove(id);
                st.history.remove(id);
            }
            if !gone.is_empty() {
                st.descs_reply = None;
            }
            gone
        };
        for id in &gone {
            self.store.remove_descriptor(id);
        }
    }

    /// The probing pass before a vote. When the background prober runs, only relays not probed
    /// in the last half interval are probed (the rest were, spread over the period); otherwise
    /// every relay is. The pass has a budget of `clamp(interval / 8, 5 s, 10 min)`, and never
    /// more than the quarter interval between the vote and the compute phase.
    pub(super) async fn probe_all(&self, now: u64) {
        let i = self.cfg.voting_interval_secs;
        let max_age = self
            .background_probing
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(i / 2);
        let i_ms = i.saturating_mul(1000);
        let budget = Duration::from_millis((i_ms / 8).clamp(5_000, 600_000).min(i_ms / 4));
        self.probe_pass(now, budget, max_age).await;
    }

    /// One probing pass: relays in [`probe_order`] (never probed first, then least recently
    /// probed, random among equals, taking turns between prefixes), skipping those probed less
    /// than `max_age` seconds ago, at most [`PROBE_CONCURRENCY`] at once, each cut off after
    /// `probe_timeout_ms`, the pass after `budget`. Relays not reached keep their previous
    /// result and come first next time.
    #[allow(clippy::disallowed_methods)] // the reachability driver bounds its probes in real time
    pub(super) async fn probe_pass(&self, now: u64, budget: Duration, max_age: Option<u64>) {
        let ordered: Vec<(RelayId, Option<SocketAddr>, X25519Public)> = {
            let st = self.lock();
            let targets: Vec<ProbeTarget> = st
                .descs
                .values()
                .filter_map(|d| {
                    let x = d.desc();
                    let last = st
                        .history
                        .get(&x.identity)
                        .map(|h| h.last_probe)
                        .filter(|t| *t > 0);
                    if let (Some(age), Some(t)) = (max_age, last)
                        && t.saturating_add(age) > now
                    {
                        return None;
                    }
                    let prefix = x
                        .addrs
                        .first()
                        .map_or(Prefix::V4([0; 3]), |a| Prefix::of(a.ip()));
                    Some(ProbeTarget {
                        id: x.identity,
                        prefix,
                        last_probe: last,
                        tiebreak: allium_crypto::rng::random_u64(),
                    })
                })
                .collect();
            probe_order(targets)
                .into_iter()
                .filter_map(|id| {
                    st.descs.get(&id).map(|d| {
                        let x = d.desc();
                        (id, x.addrs.first().copied(), x.link_key)
                    })
                })
                .collect()
        };
        let total = ordered.len();
        if total == 0 {
            return;
        }
        let timeout = Duration::from_millis(self.cfg.limits.probe_timeout_ms);
        let deadline = tokio::time::Instant::now() + budget;
        let mut stream = futures::stream::iter(ordered)
            .map(|(id, addr, lk)| {
                let reach = self.reach.clone();
                async move {
                    let r = match addr {
                        Some(a) => tokio::time::timeout(timeout, reach.probe(a, id, lk))
                            .await
                            .ok(),
                        None => Some(false),
                    };
                    (id, r)
                }
            })
            .buffer_unordered(PROBE_CONCURRENCY);
        let mut results = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, stream.next()).await {
            results.push(r);
        }
        drop(stream);
        let timed_out = results.iter().filter(|(_, r)| r.is_none()).count();
        let unreached = total - results.len();
        let mut st = self.lock();
        for (id, r) in results {
            if !st.descs.contains_key(&id) {
                continue; // evicted or expired meanwhile
            }
            st.history
                .entry(id)
                .or_insert(RelayHistory {
                    first_seen: now,
                    ..RelayHistory::default()
                })
                .record_with(
                    r.unwrap_or(false),
                    now,
                    self.live_cfg().flags.history_decay_interval_secs,
                );
        }
        let State { descs, history, .. } = &mut *st;
        history.retain(|k, _| descs.contains_key(k));
        let h = st.history.clone();
        drop(st);
        let _ = self.store.save_history(&h);
        self.limit_log.hit_and_log(
            Limit::ProbeTimeout,
            timed_out as u64,
            now,
            "reachability probes cut off by probe_timeout_ms",
        );
        self.limit_log.hit_and_log(
            Limit::ProbeBudget,
            unreached as u64,
            now,
            "relays left unprobed when the pass's time budget ran out (probed first next pass)",
        );
    }

    /// Probe one relay soon after its descriptor arrived (skipped when many probes run).
    pub(crate) fn spawn_probe(self: &Arc<Self>, id: RelayId) {
        let Ok(permit) = self.probe_slots.clone().try_acquire_owned() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let target = me.lock().descs.get(&id).map(|d| {
                let x = d.desc();
                (x.addrs.first().copied(), x.link_key)
            });
            let Some((Some(addr), lk)) = target else {
                return;
            };
            let timeout = Duration::from_millis(me.cfg.limits.probe_timeout_ms);
            let ok = tokio::time::timeout(timeout, me.reach.probe(addr, id, lk))
                .await
                .unwrap_or(false);
            let now = now_unix();
            if let Some(h) = me.lock().history.get_mut(&id) {
                h.record_with(ok, now, me.cfg.flags.history_decay_interval_secs);
            }
            drop(permit);
        });
    }
}

/// The background prober (with the schedule): every `clamp(interval / 8, 1 s, 5 min)` a pass
/// over the relays not probed in the last half interval, within that tick, so probing is spread
/// over the whole period instead of bunched before the vote.
#[allow(clippy::disallowed_methods)] // the reachability driver: its tick
pub(crate) async fn probe_loop(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let i = inner.cfg.voting_interval_secs;
    let tick = Duration::from_millis((i * 1000 / 8).clamp(1000, 300_000));
    loop {
        let started = tokio::time::Instant::now();
        let now = now_unix();
        inner.prune_expired(now);
        tokio::select! {
            _ = inner.probe_pass(now, tick, Some(i / 2)) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + tick) => {}
            _ = shutdown.changed() => return,
        }
    }
}
