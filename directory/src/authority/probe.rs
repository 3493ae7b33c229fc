//! Reachability on the authority state: forget expired descriptors, probe every relay before a
//! vote (bounded concurrency and time), probe a new relay soon after its upload.

use std::sync::Arc;
use std::time::Duration;

use allium_crypto::RelayId;
use futures::StreamExt as _;

use super::state::{Inner, PROBE_CONCURRENCY};
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

    /// Probe every relay, with at most [`PROBE_CONCURRENCY`] probes at once and an overall
    /// budget of `clamp(interval / 8, 5 s, 10 min)`; relays not reached in time keep their
    /// previous result.
    #[allow(clippy::disallowed_methods)] // the reachability driver bounds its probes in real time
    pub(super) async fn probe_all(&self, now: u64) {
        let targets: Vec<_> = self
            .lock()
            .descs
            .values()
            .map(|d| {
                let x = d.desc();
                (x.identity, x.addrs.first().copied(), x.link_key)
            })
            .collect();
        let budget = Duration::from_secs((self.cfg.voting_interval_secs / 8).clamp(5, 600));
        let deadline = tokio::time::Instant::now() + budget;
        let mut stream = futures::stream::iter(targets)
            .map(|(id, addr, lk)| {
                let reach = self.reach.clone();
                async move {
                    let ok = match addr {
                        Some(a) => reach.probe(a, id, lk).await,
                        None => false,
                    };
                    (id, ok)
                }
            })
            .buffer_unordered(PROBE_CONCURRENCY);
        let mut results = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, stream.next()).await {
            results.push(r);
        }
        drop(stream);
        let mut st = self.lock();
        for (id, ok) in results {
            st.history
                .entry(id)
                .or_insert(RelayHistory {
                    first_seen: now,
                    ..RelayHistory::default()
                })
                .record_with(ok, now, self.cfg.flags.history_decay_interval_secs);
        }
        let ids: Vec<RelayId> = st.descs.keys().copied().collect();
        st.history.retain(|k, _| ids.contains(k));
        let h = st.history.clone();
        drop(st);
        let _ = self.store.save_history(&h);
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
            let ok = me.reach.probe(addr, id, lk).await;
            let now = now_unix();
            if let Some(h) = me.lock().history.get_mut(&id) {
                h.record_with(ok, now, me.cfg.flags.history_decay_interval_secs);
            }
            drop(permit);
        });
    }
}
