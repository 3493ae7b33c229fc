//! Building this authority's vote: weights from the bandwidth scanner's measurements, flags
//! from measured bandwidth and uptime history, at most `max_relays_per_addr` relays per IP.
//! Pure functions (time passed in) except [`build_vote`], which reads the configured bandwidth
//! file; rules in docs/protocol/80-directory.md, "Flags".

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use allium_crypto::RelayId;

use super::compute::MAX_UNMEASURED_PARAM;
use super::config::AuthorityConfig;
use crate::doc::BandwidthFile;
use crate::doc::consensus::VOTE_VERSION;
use crate::doc::descriptor::proto_ids;
use crate::doc::{ConsensusEntry, Flags, VerifiedDescriptor, Vote, VoteEntry};

pub use super::history::RelayHistory;

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

/// Bandwidth measurements this authority votes: kilobytes/s by relay.
pub type Measurements = BTreeMap<RelayId, u32>;

/// One live relay as the vote sees it.
struct Candidate<'a> {
    d: &'a VerifiedDescriptor,
    h: RelayHistory,
    /// Self-reported, kB/s, capped by `max_weight_kbps`.
    advertised: u32,
    /// This authority's measurement, kB/s.
    measured: Option<u32>,
    /// Bandwidth credited for flags (bytes/s): the measurement (never above the self-reported
    /// value), else the self-reported value capped at `max_unmeasured_bw`.
    credited: u64,
    /// Beyond the per-address limit: listed as neither Running nor Valid.
    sybil: bool,
}

/// Mark every relay past the `max` best (highest credited bandwidth, then measured, then
/// identity) on one IP address as a sybil. `max == 0` means no limit.
fn limit_per_address(c: &mut [Candidate<'_>], max: usize) {
    if max == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| {
            c.get(i)
                .map(|x| (x.h.is_running(), x.measured.is_some(), x.credited))
        };
        key(b).cmp(&key(a)).then_with(|| {
            let id = |i: usize| c.get(i).map(|x| x.d.desc().identity);
            id(a).cmp(&id(b))
        })
    });
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    for i in order {
        let Some(cand) = c.get_mut(i) else { continue };
        let ips: Vec<IpAddr> = cand.d.desc().addrs.iter().map(|a| a.ip()).collect();
        if ips
            .iter()
            .any(|ip| per_ip.get(ip).copied().unwrap_or(0) >= max)
        {
            cand.sybil = true;
            continue;
        }
        for ip in ips {
            *per_ip.entry(ip).or_default() += 1;
        }
    }
}

/// Build the vote entries for the relays this authority knows (descriptors valid at `now`),
/// with `measured` the fresh measurements of the bandwidth scanner (kilobytes/s).
pub fn vote_entries(
    cfg: &AuthorityConfig,
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
    measured: &Measurements,
    now: u64,
) -> Vec<VoteEntry> {
    let th = &cfg.flags;
    let mut live: Vec<Candidate<'_>> = descs
        .values()
        .filter(|d| d.desc().expires > now)
        .map(|d| {
            let mut h = history.get(&d.desc().identity).copied().unwrap_or_default();
            h.decay_to(now, th.history_decay_interval_secs);
            let self_bw = d.desc().bandwidth_observed;
            let advertised = u32::try_from(self_bw / 1000)
                .unwrap_or(u32::MAX)
                .min(th.max_weight_kbps);
            let m = measured.get(&d.desc().identity).copied();
            let credited = match m {
                Some(kb) => (u64::from(kb) * 1000).min(self_bw),
                None => self_bw.min(cfg.max_unmeasured_bw),
            };
            Candidate {
                d,
                h,
                advertised,
                measured: m,
                credited,
                sybil: false,
            }
        })
        .collect();
    limit_per_address(&mut live, cfg.max_relays_per_addr);
    let running = |c: &Candidate<'_>| c.h.is_running() && !c.sybil;

    // Population statistics over Running relays.
    let sorted = |mut v: Vec<u64>| {
        v.sort_unstable();
        v
    };
    let bws = sorted(
        live.iter()
            .filter(|c| running(c))
            .map(|c| c.credited)
            .collect(),
    );
    let mtbfs = sorted(
        live.iter()
            .filter(|c| running(c))
            .map(|c| c.h.mtbf(now))
            .collect(),
    );
    let known = sorted(
        live.iter()
            .filter(|c| running(c))
            .map(|c| c.h.time_known(now))
            .collect(),
    );

    let fast_bw = th
        .fast_min_bandwidth
        .min(percentile(&bws, 1, 8).unwrap_or(u64::MAX));
    let stable_mtbf = th
        .stable_min_mtbf_secs
        .min(percentile(&mtbfs, 1, 2).unwrap_or(u64::MAX));
    let guard_known = th
        .guard_min_known_secs
        .min(percentile(&known, 1, 2).unwrap_or(u64::MAX));
    let fast_bws: Vec<u64> = bws.iter().copied().filter(|b| *b >= fast_bw).collect();
    let guard_bw = th
        .guard_min_bandwidth
        .min(percentile(&fast_bws, 3, 4).unwrap_or(u64::MAX));

    live.iter()
        .map(|c| {
            let desc = c.d.desc();
            let bw = c.credited;
            let is_running = running(c);
            let mut f = Flags::empty();
            f.set(Flags::RUNNING, is_running);
            f.set(Flags::VALID, supports_required_protocols(c.d) && !c.sybil);
            let valid = f.contains(Flags::VALID);
            let fast = is_running && bw >= fast_bw;
            f.set(Flags::FAST, fast);
            let stable = is_running && c.h.mtbf(now) >= stable_mtbf;
            f.set(Flags::STABLE, stable);
            f.set(
                Flags::GUARD,
                valid
                    && fast
                    && stable
                    && bw >= guard_bw
                    && c.h.wfu(now) >= th.guard_min_wfu_ppm
                    && c.h.time_known(now) >= guard_known,
            );
            f.set(
                Flags::HSDIR,
                valid && fast && stable && c.h.uptime(now) >= th.hsdir_min_uptime_secs,
            );
            let exit = !desc.exit_policy.is_reject_all()
                && th
                    .exit_ports
                    .iter()
                    .all(|p| desc.exit_policy.allows_port(*p));
            f.set(Flags::EXIT, exit);
            f.set(Flags::BAD_EXIT, cfg.bad_exits.contains(&desc.identity));
            VoteEntry {
                entry: ConsensusEntry {
                    identity: desc.identity,
                    link_key: desc.link_key,
                    onion_key: desc.onion_key,
                    nickname: desc.nickname.clone(),
                    addrs: desc.addrs.clone(),
                    flags: f,
                    weight: round_weight(c.measured.unwrap_or(c.advertised)),
                    exit: desc.exit_policy.summary_only(),
                    family: desc.family.clone(),
                    measured: c.measured.is_some(),
                },
                published: desc.published,
                advertised: round_weight(c.advertised),
                desc_digest: c.d.digest(),
            }
        })
        .collect()
}

/// A weight as voted: two significant decimal digits (1234 -> 1200, 1250 -> 1300, 99 -> 99),
/// at least 1. A scanner's measurements of one relay wander by a few percent from scan to scan;
/// voted exactly, every new measurement changes the relay's consensus entry and so every
/// consensus diff (Tor's scanners round the same way; path selection cannot use the noise).
pub fn round_weight(w: u32) -> u32 {
    let mut unit = 1u32;
    while w / unit >= 100 {
        unit = unit.saturating_mul(10);
    }
    let r = (u64::from(w) + u64::from(unit / 2)) / u64::from(unit) * u64::from(unit);
    u32::try_from(r).unwrap_or(w / unit * unit).max(1)
}

/// The fresh measurements of the configured bandwidth file (empty, with a log line, when none
/// is configured, it cannot be read, or it is stale).
pub fn load_measurements(cfg: &AuthorityConfig, now: u64) -> Measurements {
    let Some(path) = &cfg.bandwidth_file else {
        return Measurements::new();
    };
    match BandwidthFile::load(path) {
        Ok(f) => {
            let m = f.fresh_measurements(now, cfg.bandwidth_file_max_age_secs);
            if m.is_empty() {
                tracing::warn!(
                    file = %path.display(),
                    timestamp = f.timestamp,
                    "the bandwidth file has no fresh measurement; voting unmeasured weights (is the bandwidth scanner running?)"
                );
            } else if f.skipped > 0 {
                tracing::info!(
                    skipped = f.skipped,
                    "bandwidth file: malformed lines skipped"
                );
            }
            m
        }
        Err(e) => {
            tracing::warn!(
                file = %path.display(),
                error = %e,
                "cannot use the bandwidth file; voting unmeasured weights"
            );
            Measurements::new()
        }
    }
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

/// Build the (unsigned) vote for the period starting at `valid_after`, with the measurements
/// of the configured bandwidth file ([`load_measurements`]).
pub fn build_vote(
    cfg: &AuthorityConfig,
    authority: RelayId,
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
    valid_after: u64,
    now: u64,
) -> Vote {
    let measured = load_measurements(cfg, now);
    build_vote_with(cfg, authority, descs, history, &measured, valid_after, now)
}

/// The network parameters this authority votes: the configured ones, plus `maxunmeasuredbw`
/// (kilobytes/s) from `max_unmeasured_bw` unless configured explicitly.
pub fn voted_params(cfg: &AuthorityConfig) -> BTreeMap<String, i32> {
    let mut p = cfg.params.clone();
    p.entry(MAX_UNMEASURED_PARAM.to_owned()).or_insert_with(|| {
        i32::try_from(cfg.max_unmeasured_bw / 1000)
            .unwrap_or(i32::MAX)
            .max(1)
    });
    p
}

/// [`build_vote`] with the measurements passed in (pure).
pub fn build_vote_with(
    cfg: &AuthorityConfig,
    authority: RelayId,
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
    measured: &Measurements,
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
        params: voted_params(cfg),
        relays: vote_entries(cfg, descs, history, measured, now),
        shared_rand: None,
    }
}

#[cfg(test)]
mod round_weight_tests {
    use super::round_weight;

    #[test]
    fn weights_keep_two_significant_digits() {
        assert_eq!(round_weight(0), 1);
        assert_eq!(round_weight(1), 1);
        assert_eq!(round_weight(99), 99);
        assert_eq!(round_weight(100), 100);
        assert_eq!(round_weight(1234), 1200);
        assert_eq!(round_weight(1250), 1300);
        assert_eq!(round_weight(987_654), 990_000);
        assert_eq!(round_weight(999), 1000);
        assert_eq!(round_weight(u32::MAX), 4_200_000_000);
        // Measurements a few percent apart vote the same weight.
        assert_eq!(round_weight(30_600), round_weight(31_400));
        for w in [5u32, 150, 7_777, 123_456, 40_000_000] {
            let r = round_weight(w);
            assert!(r.abs_diff(w) * 20 <= w, "{w} -> {r}: more than 5 % off");
        }
    }
}
