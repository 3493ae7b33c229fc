//! Reachability on the authority state: forget expired descriptors, probe relays in a fair
//! order (bounded concurrency, time per probe and time per pass), spread over the period by a
//! background prober, probe a new relay soon after its upload.
//!
//! A probe is a whole link handshake (four X25519 operations on each side), so its rate is
//! what an authority's reachability testing costs: each relay is probed at most once per
//! [`reprobe_interval`] (half the voting interval, longer on large networks with short
//! intervals so that an authority starts at most `[limits] probes_per_sec` re-probes a second),
//! and a descriptor upload triggers a probe only when the relay is new, its address or link key
//! changed, its last probe failed, or it is due anyway ([`probe_on_upload`]). Tor tests each
//! relay once per 1,280 s (`REACHABILITY_TEST_CYCLE_PERIOD`) whatever the network's size.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public};
use futures::StreamExt as _;
use tokio::sync::watch;

use super::limits::{Limit, Prefix, ProbeTarget, probe_order};
use super::state::{Inner, PROBE_CONCURRENCY, State};
use super::vote::RelayHistory;
use crate::client::http::with_outbound_bind;
use crate::now_unix;

/// Seconds between two probes of one relay by one authority: half the voting interval, or
/// `relays / probes_per_sec` when that is longer (a 1,000-relay network with a 2-second
/// interval and 20 probes a second: every 50 s instead of every second, 20 handshakes a second
/// instead of 1,000). Never 0.
pub fn reprobe_interval(voting_interval: u64, relays: usize, probes_per_sec: u32) -> u64 {
    let relays = u64::try_from(relays).unwrap_or(u64::MAX);
    (voting_interval / 2)
        .max(relays.div_ceil(u64::from(probes_per_sec.max(1))))
        .max(1)
}

/// Whether a descriptor upload should trigger a probe of its relay: it is new (no history, or
/// never probed), its address or link key changed (`changed`), its last probe failed, or its
/// last probe is at least `max_age` seconds old. A relay re-uploading an unchanged descriptor
/// while reachable waits for its turn in the background passes.
pub fn probe_on_upload(h: Option<&RelayHistory>, changed: bool, now: u64, max_age: u64) -> bool {
    match h {
        _ if changed => true,
        None => true,
        Some(h) => h.last_probe == 0 || !h.last_ok || h.last_probe.saturating_add(max_age) <= now,
    }
}

/// Which relays one pass probes, from `targets` in [`probe_order`]: every relay never probed,
/// then at most `max_reprobes` of the others (all of them when `None`).
fn cap_reprobes(ordered: Vec<(RelayId, bool)>, max_reprobes: Option<usize>) -> Vec<RelayId> {
    let mut reprobes = 0usize;
    ordered
        .into_iter()
        .filter(|(_, never)| {
            if *never {
                return true;
            }
            reprobes += 1;
            max_reprobes.is_none_or(|m| reprobes <= m)
        })
        .map(|(id, _)| id)
        .collect()
}

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

    /// This authority's [`reprobe_interval`] for the relays it holds now.
    pub(super) fn reprobe_age(&self) -> u64 {
        let n = self.lock().descs.len();
        reprobe_interval(
            self.cfg.voting_interval_secs,
            n,
            self.cfg.limits.probes_per_sec,
        )
    }

    /// The probing pass before a vote. When the background prober runs, only relays not probed
    /// in the last [`reprobe_interval`] are probed (the rest were, spread over the period);
    /// otherwise every relay is. The pass has a budget of `clamp(interval / 8, 5 s, 10 min)`,
    /// and never more than the quarter interval between the vote and the compute phase.
    pub(super) async fn probe_all(&self, now: u64) {
        let i = self.cfg.voting_interval_secs;
        let max_age = self
            .background_probing
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.reprobe_age());
        let i_ms = i.saturating_mul(1000);
        let budget = Duration::from_millis((i_ms / 8).clamp(5_000, 600_000).min(i_ms / 4));
        self.probe_pass(now, budget, max_age, None).await;
    }

    /// One probing pass: relays in [`probe_order`] (never probed first, then least recently
    /// probed, random among equals, taking turns between prefixes), skipping those probed less
    /// than `max_age` seconds ago, at most [`PROBE_CONCURRENCY`] at once, each cut off after
    /// `probe_timeout_ms`, the pass after `budget`; besides the relays never probed, at most
    /// `max_reprobes` relays (when given). Relays not reached keep their previous result and
    /// come first next time.
    #[allow(clippy::disallowed_methods)] // the reachability driver bounds its probes in real time
    pub(super) async fn probe_pass(
        &self,
        now: u64,
        budget: Duration,
        max_age: Option<u64>,
        max_reprobes: Option<usize>,
    ) {
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
            let never: std::collections::BTreeSet<RelayId> = targets
                .iter()
                .filter(|t| t.last_probe.is_none())
                .map(|t| t.id)
                .collect();
            let ordered = probe_order(targets)
                .into_iter()
                .map(|id| (id, never.contains(&id)))
                .collect();
            cap_reprobes(ordered, max_reprobes)
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
                let bind = self.cfg.outbound_bind_address;
                async move {
                    let r = match addr {
                        Some(a) => tokio::time::timeout(
                            timeout,
                            with_outbound_bind(bind, reach.probe(a, id, lk)),
                        )
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
        let probed_any = !results.is_empty();
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
        if probed_any {
            let h = st.history.clone();
            drop(st);
            let _ = self.store.save_history(&h);
        } else {
            drop(st);
        }
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

    /// Probe one relay soon after its descriptor arrived, when [`probe_on_upload`] says so
    /// (`changed`: its address or link key differs from the descriptor it replaced; skipped
    /// when many probes run).
    pub(crate) fn spawn_probe(self: &Arc<Self>, id: RelayId, changed: bool) {
        let max_age = self.reprobe_age();
        if !probe_on_upload(self.lock().history.get(&id), changed, now_unix(), max_age) {
            return;
        }
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
            let probe =
                with_outbound_bind(me.cfg.outbound_bind_address, me.reach.probe(addr, id, lk));
            let ok = tokio::time::timeout(timeout, probe).await.unwrap_or(false);
            let now = now_unix();
            if let Some(h) = me.lock().history.get_mut(&id) {
                h.record_with(ok, now, me.cfg.flags.history_decay_interval_secs);
            }
            drop(permit);
        });
    }
}

/// The background prober (with the schedule): every `clamp(interval / 8, 1 s, 5 min)` a pass
/// over the relays not probed in the last [`reprobe_interval`], within that tick, re-probing at
/// most `probes_per_sec` relays per second of tick, so probing is spread over the whole
/// period instead of bunched before the vote.
#[allow(clippy::disallowed_methods)] // the reachability driver: its tick
pub(crate) async fn probe_loop(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let i = inner.cfg.voting_interval_secs;
    let tick = Duration::from_millis((i * 1000 / 8).clamp(1000, 300_000));
    loop {
        let started = tokio::time::Instant::now();
        let now = now_unix();
        inner.prune_expired(now);
        let max_age = inner.reprobe_age();
        let per_sec = usize::try_from(inner.cfg.limits.probes_per_sec).unwrap_or(usize::MAX);
        let cap = per_sec.saturating_mul(usize::try_from(tick.as_secs().max(1)).unwrap_or(1));
        tokio::select! {
            _ = inner.probe_pass(now, tick, Some(max_age), Some(cap)) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + tick) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> RelayId {
        RelayId([b; 32])
    }

    #[test]
    fn reprobe_interval_is_half_the_interval_on_small_networks() {
        assert_eq!(reprobe_interval(3600, 7000, 20), 1800);
        assert_eq!(reprobe_interval(2, 20, 20), 1);
        assert_eq!(reprobe_interval(60, 200, 20), 30);
        // Never 0, even with a 1-second interval and no relays.
        assert_eq!(reprobe_interval(1, 0, 20), 1);
    }

    #[test]
    fn reprobe_interval_bounds_the_probe_rate_on_large_networks() {
        // 1,000 relays, 2-second interval: every 50 s (20 probes a second), not every second.
        assert_eq!(reprobe_interval(2, 1000, 20), 50);
        assert_eq!(reprobe_interval(2, 200, 20), 10);
        assert_eq!(reprobe_interval(2, 1001, 20), 51);
        // probes_per_sec 0 is treated as 1, not a division by zero.
        assert_eq!(reprobe_interval(2, 30, 0), 30);
        for n in [1usize, 10, 999, 5000, 100_000] {
            let age = reprobe_interval(2, n, 20);
            // n relays each probed once per `age` seconds: at most 20 a second (+1 rounding).
            assert!(n as u64 <= 20 * age, "{n} relays every {age} s");
        }
    }

    #[test]
    fn upload_probes_only_new_changed_failed_or_due_relays() {
        let up = RelayHistory {
            first_seen: 100,
            running_since: Some(100),
            last_probe: 1000,
            last_ok: true,
            ..RelayHistory::default()
        };
        // A reachable relay re-uploading the same address and key: no probe until due.
        assert!(!probe_on_upload(Some(&up), false, 1010, 50));
        assert!(!probe_on_upload(Some(&up), false, 1049, 50));
        assert!(probe_on_upload(Some(&up), false, 1050, 50));
        // A new address or link key: probe now.
        assert!(probe_on_upload(Some(&up), true, 1010, 50));
        // Unknown or never probed: probe.
        assert!(probe_on_upload(None, false, 1010, 50));
        let never = RelayHistory {
            last_probe: 0,
            ..up
        };
        assert!(probe_on_upload(Some(&never), false, 1010, 50));
        // Last probe failed: probe again on upload (it may have come back).
        let down = RelayHistory {
            last_ok: false,
            running_since: None,
            ..up
        };
        assert!(probe_on_upload(Some(&down), false, 1010, 50));
    }

    #[test]
    fn a_pass_reprobes_at_most_the_cap_but_every_new_relay() {
        let ordered = vec![
            (id(1), true),
            (id(2), true),
            (id(3), false),
            (id(4), false),
            (id(5), false),
        ];
        assert_eq!(
            cap_reprobes(ordered.clone(), Some(1)),
            vec![id(1), id(2), id(3)]
        );
        assert_eq!(cap_reprobes(ordered.clone(), Some(0)), vec![id(1), id(2)]);
        assert_eq!(cap_reprobes(ordered.clone(), None).len(), 5);
        assert_eq!(cap_reprobes(ordered, Some(10)).len(), 5);
    }
}
