//! Building this authority's vote: flags from reachability history and descriptors.
//! Pure functions (time passed in); rules in docs/protocol/80-directory.md, "Flags".

use std::collections::BTreeMap;

use allium_crypto::RelayId;
use serde::{Deserialize, Serialize};

use super::config::AuthorityConfig;
use crate::doc::consensus::VOTE_VERSION;
use crate::doc::descriptor::proto_ids;
use crate::doc::{ConsensusEntry, Flags, VerifiedDescriptor, Vote, VoteEntry};

/// What the authority remembers about a relay's reachability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHistory {
    /// First time a descriptor for this identity was accepted.
    pub first_seen: u64,
    /// Start of the current run of successful probes (`None` when the last probe failed).
    pub running_since: Option<u64>,
    /// Time of the last probe.
    pub last_probe: u64,
    /// Result of the last probe.
    pub last_ok: bool,
}

impl RelayHistory {
    /// Record a probe result.
    pub fn record(&mut self, ok: bool, now: u64) {
        self.last_probe = now;
        self.last_ok = ok;
        if ok {
            self.running_since.get_or_insert(now);
        } else {
            self.running_since = None;
        }
    }
}

/// The value at fraction `num/den` of an ascending-sorted list (index `floor(num*(n-1)/den)`).
fn percentile(sorted: &[u64], num: usize, den: usize) -> Option<u64> {
    if sorted.is_empty() || den == 0 {
        return None;
    }
    let idx = num.saturating_mul(sorted.len() - 1) / den;
    sorted.get(idx).copied()
}

/// Whether a descriptor advertises the protocols this network requires.
fn supports_required_protocols(d: &VerifiedDescriptor) -> bool {
    let p = &d.desc().protocols;
    [proto_ids::LINK, proto_ids::CIRCUIT, proto_ids::RELAY]
        .iter()
        .all(|id| p.iter().any(|(pid, ver)| pid == id && *ver >= 1))
}

/// Build the vote entries for the relays this authority knows (descriptors valid at `now`).
pub fn vote_entries(
    cfg: &AuthorityConfig,
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
    now: u64,
) -> Vec<VoteEntry> {
    let th = &cfg.flags;
    let live: Vec<(&VerifiedDescriptor, RelayHistory)> = descs
        .values()
        .filter(|d| d.desc().expires > now)
        .map(|d| {
            let h = history.get(&d.desc().identity).copied().unwrap_or_default();
            (d, h)
        })
        .collect();
    let running = |h: &RelayHistory| h.last_ok && h.running_since.is_some();

    // Population statistics over Running relays.
    let mut bws: Vec<u64> = live
        .iter()
        .filter(|(_, h)| running(h))
        .map(|(d, _)| d.desc().bandwidth_observed)
        .collect();
    bws.sort_unstable();
    let mut uptimes: Vec<u64> = live
        .iter()
        .filter_map(|(_, h)| h.running_since.filter(|_| h.last_ok))
        .map(|since| now.saturating_sub(since))
        .collect();
    uptimes.sort_unstable();
    let mut known: Vec<u64> = live
        .iter()
        .filter(|(_, h)| running(h))
        .map(|(_, h)| now.saturating_sub(h.first_seen))
        .collect();
    known.sort_unstable();

    let fast_bw = th
        .fast_min_bandwidth
        .min(percentile(&bws, 1, 8).unwrap_or(u64::MAX));
    let stable_up = th
        .stable_min_uptime_secs
        .min(percentile(&uptimes, 1, 2).unwrap_or(u64::MAX));
    let guard_known = th
        .guard_min_known_secs
        .min(percentile(&known, 1, 2).unwrap_or(u64::MAX));
    let mut fast_bws: Vec<u64> = bws.iter().copied().filter(|b| *b >= fast_bw).collect();
    fast_bws.sort_unstable();
    let guard_bw = th
        .guard_min_bandwidth
        .min(percentile(&fast_bws, 3, 4).unwrap_or(u64::MAX));

    live.iter()
        .map(|(d, h)| {
            let desc = d.desc();
            let bw = desc.bandwidth_observed;
            let is_running = running(h);
            let uptime = h.running_since.map(|s| now.saturating_sub(s)).unwrap_or(0);
            let known_for = now.saturating_sub(h.first_seen);
            let mut f = Flags::empty();
            f.set(Flags::RUNNING, is_running);
            f.set(Flags::VALID, supports_required_protocols(d));
            let fast = is_running && bw >= fast_bw;
            f.set(Flags::FAST, fast);
            let stable = is_running && uptime >= stable_up;
            f.set(Flags::STABLE, stable);
            let valid = f.contains(Flags::VALID);
            f.set(
                Flags::GUARD,
                valid && fast && stable && bw >= guard_bw && known_for >= guard_known,
            );
            let exit = !desc.exit_policy.is_reject_all()
                && th
                    .exit_ports
                    .iter()
                    .all(|p| desc.exit_policy.allows_port(*p));
            f.set(Flags::EXIT, exit);
            f.set(Flags::BAD_EXIT, cfg.bad_exits.contains(&desc.identity));
            let weight = u32::try_from(bw / 1000)
                .unwrap_or(u32::MAX)
                .min(th.max_weight_kbps)
                .max(1);
            VoteEntry {
                entry: ConsensusEntry {
                    identity: desc.identity,
                    link_key: desc.link_key,
                    onion_key: desc.onion_key,
                    nickname: desc.nickname.clone(),
                    addrs: desc.addrs.clone(),
                    flags: f,
                    weight,
                    exit: desc.exit_policy.clone(),
                    family: desc.family.clone(),
                    desc_digest: d.digest(),
                },
                published: desc.published,
            }
        })
        .collect()
}

/// The timeline of the period starting at `valid_after`: fresh for one interval, valid for
/// three (Tor's dir-spec §1.4, scaled).
pub fn timeline(valid_after: u64, interval: u64) -> (u64, u64, u64) {
    (
        valid_after,
        valid_after.saturating_add(interval),
        valid_after.saturating_add(interval.saturating_mul(3)),
    )
}

/// Build the (unsigned) vote for the period starting at `valid_after`.
pub fn build_vote(
    cfg: &AuthorityConfig,
    authority: RelayId,
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
    valid_after: u64,
    now: u64,
) -> Vote {
    let (va, fu, vu) = timeline(valid_after, cfg.voting_interval_secs);
    Vote {
        version: VOTE_VERSION,
        authority,
        valid_after: va,
        fresh_until: fu,
        valid_until: vu,
        published: now,
        params: cfg.params.clone(),
        relays: vote_entries(cfg, descs, history, now),
    }
}
