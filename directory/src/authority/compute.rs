//! Computing the consensus from votes: deterministic, so every authority that holds the same
//! votes produces byte-identical bodies (dir-spec §3.8, simplified; 80-directory.md "Computing
//! the consensus"): flags by majority, weights from measured votes (self-reported bandwidth only
//! as an upper bound, unmeasured relays capped), then the position weights of dir-spec §3.8.3.

use std::collections::BTreeMap;

use allium_crypto::{RelayId, X25519Public};

use crate::doc::consensus::{
    BANDWIDTH_WEIGHT_NAMES, CONSENSUS_METHOD, CONSENSUS_VERSION, WEIGHT_SCALE,
};
use crate::doc::{Consensus, ConsensusEntry, Flags, Vote, VoteEntry};

/// The low median of a list (the lower of the two middle values when the count is even).
pub fn low_median<T: Ord + Copy>(values: &mut [T]) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    values.get((values.len() - 1) / 2).copied()
}

/// Combine votes into a consensus.
///
/// - `n_authorities`: the number of distinct *configured* authorities (not of votes).
/// - Votes must all be for `valid_after` and by distinct authorities (callers guarantee it;
///   votes for other periods or duplicates are ignored here too).
pub fn compute_consensus(votes: &[&Vote], n_authorities: usize, valid_after: u64) -> Consensus {
    // One vote per authority, for this period only, in identity order.
    let mut by_auth: BTreeMap<RelayId, &Vote> = BTreeMap::new();
    for v in votes {
        if v.valid_after == valid_after {
            by_auth.entry(v.authority).or_insert(v);
        }
    }
    let votes: Vec<&Vote> = by_auth.values().copied().collect();
    let majority = |count: usize| count * 2 > n_authorities;

    let mut fresh: Vec<u64> = votes.iter().map(|v| v.fresh_until).collect();
    let mut valid: Vec<u64> = votes.iter().map(|v| v.valid_until).collect();
    let fresh_until = low_median(&mut fresh).unwrap_or(valid_after.saturating_add(1));
    let valid_until = low_median(&mut valid)
        .unwrap_or(fresh_until)
        .max(fresh_until);

    // Parameters: a value needs a majority of all authorities to have voted the name; the value
    // is the low median of the votes.
    let mut pvals: BTreeMap<&String, Vec<i32>> = BTreeMap::new();
    for v in &votes {
        for (k, val) in &v.params {
            pvals.entry(k).or_default().push(*val);
        }
    }
    let params: BTreeMap<String, i32> = pvals
        .into_iter()
        .filter(|(_, vals)| majority(vals.len()))
        .filter_map(|(k, mut vals)| low_median(&mut vals).map(|m| (k.clone(), m)))
        .collect();
    let unmeasured_cap = params
        .get(MAX_UNMEASURED_PARAM)
        .map_or(DEFAULT_MAX_UNMEASURED_KBPS, |v| {
            u32::try_from(*v).unwrap_or(1).max(1)
        });
    let rule = WeightRule {
        n_authorities,
        unmeasured_cap,
    };

    // Relays: group vote entries by identity.
    let mut groups: BTreeMap<RelayId, Vec<&VoteEntry>> = BTreeMap::new();
    for v in &votes {
        for e in &v.relays {
            groups.entry(e.entry.identity).or_default().push(e);
        }
    }
    let mut relays = Vec::with_capacity(groups.len());
    for (_, entries) in groups {
        if let Some(e) = combine_relay(&entries, &majority, &rule) {
            relays.push(e);
        }
    }

    Consensus {
        version: CONSENSUS_VERSION,
        method: CONSENSUS_METHOD,
        valid_after,
        fresh_until,
        valid_until,
        voters: votes.iter().map(|v| v.authority).collect(),
        params,
        bandwidth_weights: bandwidth_weights(&relays),
        relays,
        shared_rand: super::shared_random::agreed_values(&votes, n_authorities),
    }
}

/// The consensus parameter capping unmeasured relays' weights (kilobytes/s).
pub const MAX_UNMEASURED_PARAM: &str = "maxunmeasuredbw";
/// Its default (Tor's MaxUnmeasuredBw, 20 KB/s).
pub const DEFAULT_MAX_UNMEASURED_KBPS: u32 = 20;

/// How a relay's weight is decided.
struct WeightRule {
    n_authorities: usize,
    unmeasured_cap: u32,
}

impl WeightRule {
    /// Enough measured votes: at least 3 (Tor's rule), or more than half of all configured
    /// authorities (so networks of 1-4 authorities can measure).
    fn enough_measured(&self, count: usize) -> bool {
        count >= 3 || count * 2 > self.n_authorities
    }
}

/// Weight and `measured` of one relay from the agreeing entries: the low median of the measured
/// votes when enough authorities measured it, never above the low median of the self-reported
/// values; otherwise that self-reported median capped at `maxunmeasuredbw`. At least 1.
fn combine_weight(agreeing: &[&VoteEntry], rule: &WeightRule) -> (u32, bool) {
    let mut advertised: Vec<u32> = agreeing.iter().map(|e| e.advertised).collect();
    let advertised = low_median(&mut advertised).unwrap_or(0);
    let mut measured: Vec<u32> = agreeing
        .iter()
        .filter(|e| e.entry.measured)
        .map(|e| e.entry.weight)
        .collect();
    if rule.enough_measured(measured.len())
        && let Some(m) = low_median(&mut measured)
    {
        (m.min(advertised).max(1), true)
    } else {
        (advertised.min(rule.unmeasured_cap).max(1), false)
    }
}

fn combine_relay(
    entries: &[&VoteEntry],
    majority: &impl Fn(usize) -> bool,
    rule: &WeightRule,
) -> Option<ConsensusEntry> {
    // The key pair listed by a majority of all configured authorities.
    let mut keys: BTreeMap<(X25519Public, X25519Public), usize> = BTreeMap::new();
    for e in entries {
        *keys
            .entry((e.entry.link_key, e.entry.onion_key))
            .or_default() += 1;
    }
    let (&(link_key, onion_key), _) = keys.iter().find(|(_, c)| majority(**c))?;
    let agreeing: Vec<&VoteEntry> = entries
        .iter()
        .copied()
        .filter(|e| e.entry.link_key == link_key && e.entry.onion_key == onion_key)
        .collect();

    // Flags: each bit by majority of the voters that list the relay (with these keys).
    let mut flags = Flags::empty();
    for bit in 0..16u16 {
        let f = Flags(1 << bit);
        let set = agreeing
            .iter()
            .filter(|e| e.entry.flags.contains(f))
            .count();
        flags.set(f, set * 2 > agreeing.len());
    }
    if !flags.contains(Flags::RUNNING) {
        return None;
    }
    let (weight, measured) = combine_weight(&agreeing, rule);
    // Descriptor-derived fields from the most recent descriptor (ties: larger digest).
    let newest = agreeing
        .iter()
        .max_by(|a, b| (a.published, a.desc_digest).cmp(&(b.published, b.desc_digest)))?;
    let mut e = newest.entry.clone();
    e.flags = flags;
    e.weight = weight;
    e.measured = measured;
    Some(e)
}

/// The position weights of dir-spec §3.8.3 (case analysis over the guard-only `G`, middle-only
/// `M`, exit-only `E` and guard-and-exit `D` weight totals; BadExit relays are not exits),
/// in units of [`WEIGHT_SCALE`]. Empty when a total needed as a divisor is zero: clients then
/// weight every position by plain consensus weight.
pub fn bandwidth_weights(relays: &[ConsensusEntry]) -> BTreeMap<String, i32> {
    let (mut g, mut m, mut e, mut d) = (0i64, 0i64, 0i64, 0i64);
    for r in relays {
        let w = i64::from(r.weight);
        let exit = r.flags.contains(Flags::EXIT) && !r.flags.contains(Flags::BAD_EXIT);
        match (r.flags.contains(Flags::GUARD), exit) {
            (true, true) => d += w,
            (true, false) => g += w,
            (false, true) => e += w,
            (false, false) => m += w,
        }
    }
    position_weights(g, m, e, d)
        .map(|pw| pw.to_map())
        .unwrap_or_default()
}

/// The seven free position weights; the others follow (dir-spec §3.8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionWeights {
    /// Guard-only relays in the guard position.
    pub wgg: i64,
    /// Guard+Exit relays in the guard position.
    pub wgd: i64,
    /// Guard-only relays in the middle position.
    pub wmg: i64,
    /// Exit-only relays in the middle position.
    pub wme: i64,
    /// Guard+Exit relays in the middle position.
    pub wmd: i64,
    /// Exit-only relays in the exit position.
    pub wee: i64,
    /// Guard+Exit relays in the exit position.
    pub wed: i64,
    /// Which case of the analysis applied (for tests and logs).
    pub case: &'static str,
}

impl PositionWeights {
    fn in_range(&self) -> bool {
        let w = i64::from(WEIGHT_SCALE);
        [
            self.wgg, self.wgd, self.wmg, self.wme, self.wmd, self.wee, self.wed,
        ]
        .iter()
        .all(|v| (0..=w).contains(v))
    }

    /// All 19 named weights, each clamped to `0..=WEIGHT_SCALE`.
    pub fn to_map(&self) -> BTreeMap<String, i32> {
        let w = i64::from(WEIGHT_SCALE);
        let c = |v: i64| i32::try_from(v.clamp(0, w)).unwrap_or(0);
        let mut out = BTreeMap::new();
        for name in BANDWIDTH_WEIGHT_NAMES {
            let v = match name {
                "Wgg" | "Wgm" => self.wgg,
                "Wgd" => self.wgd,
                "Wmg" | "Wbg" => self.wmg,
                "Wme" | "Wbe" => self.wme,
                "Wmd" | "Wbd" => self.wmd,
                "Wee" | "Wem" => self.wee,
                "Wed" | "Weg" => self.wed,
                // Wmm, Wbm and the directory weights Wdb, Web, Wgb, Wmb.
                _ => w,
            };
            out.insert(name.to_owned(), c(v));
        }
        out
    }
}

/// `a / b` in integers, `None` when `b` is zero.
fn div(a: i64, b: i64) -> Option<i64> {
    (b != 0).then(|| a / b)
}

/// The case analysis of dir-spec §3.8.3 over the four totals. `None` when the total is zero or
/// the applicable case divides by a zero total.
pub fn position_weights(g: i64, m: i64, e: i64, d: i64) -> Option<PositionWeights> {
    let w = i64::from(WEIGHT_SCALE);
    let t = g + m + e + d;
    if t <= 0 {
        return None;
    }
    if 3 * e >= t && 3 * g >= t {
        // Case 1: neither guards nor exits scarce.
        let wee = div(w * (e + g + m), 3 * e)?;
        let wmg = div(w * (2 * g - e - m), 3 * g)?;
        return Some(PositionWeights {
            wgd: w / 3,
            wed: w / 3,
            wmd: w / 3,
            wee,
            wme: w - wee,
            wmg,
            wgg: w - wmg,
            case: "1",
        });
    }
    if 3 * e < t && 3 * g < t {
        // Case 2: both scarce.
        let r = e.min(g);
        let s = e.max(g);
        if r + d < s {
            // 2a: all of D to the scarcer class.
            let (wed, wgd) = if e < g { (w, 0) } else { (0, w) };
            return Some(PositionWeights {
                wgg: w,
                wee: w,
                wmg: 0,
                wme: 0,
                wmd: 0,
                wed,
                wgd,
                case: "2a",
            });
        }
        // 2b1: Wgg = 1, Wmd = Wgd.
        let b1 = (|| {
            let wed = div(w * (d - 2 * e + 4 * g - 2 * m), 3 * d)?;
            Some(PositionWeights {
                wee: div(w * (e - g + m), e)?,
                wed,
                wme: div(w * (g - m), e)?,
                wmg: 0,
                wgg: w,
                wmd: (w - wed) / 2,
                wgd: (w - wed) / 2,
                case: "2b1",
            })
        })();
        if let Some(b1) = b1.filter(PositionWeights::in_range) {
            return Some(b1);
        }
        // 2b2: Wgg = Wee = 1.
        let wed = div(w * (d - 2 * e + g + m), 3 * d)?;
        let wmd = div(w * (d - 2 * m + g + e), 3 * d)?;
        if wmd < 0 {
            // 2b3: too much middle bandwidth to balance.
            return Some(PositionWeights {
                wgg: w,
                wee: w,
                wed,
                wmd: 0,
                wme: 0,
                wmg: 0,
                wgd: w - wed,
                case: "2b3",
            });
        }
        return Some(PositionWeights {
            wgg: w,
            wee: w,
            wed,
            wmd,
            wme: 0,
            wmg: 0,
            wgd: w - wed - wmd,
            case: "2b2",
        });
    }
    // Case 3: exactly one of guards or exits scarce.
    let guard_scarce = 3 * g < t;
    let s = if guard_scarce { g } else { e };
    if 3 * (s + d) < t {
        // 3a: the scarce class and D both go to the scarce position.
        if guard_scarce {
            let wme = if e < m { 0 } else { div(w * (e - m), 2 * e)? };
            return Some(PositionWeights {
                wgg: w,
                wgd: w,
                wmd: 0,
                wed: 0,
                wmg: 0,
                wme,
                wee: w - wme,
                case: "3a (guards scarce)",
            });
        }
        let wmg = if g < m { 0 } else { div(w * (g - m), 2 * g)? };
        return Some(PositionWeights {
            wee: w,
            wed: w,
            wmd: 0,
            wgd: 0,
            wme: 0,
            wmg,
            wgg: w - wmg,
            case: "3a (exits scarce)",
        });
    }
    // 3b.
    if guard_scarce {
        let wgd = div(w * (d - 2 * g + e + m), 3 * d)?;
        let wee = div(w * (e + m), 2 * e)?;
        return Some(PositionWeights {
            wgg: w,
            wgd,
            wmg: 0,
            wee,
            wme: w - wee,
            wmd: (w - wgd) / 2,
            wed: (w - wgd) / 2,
            case: "3b (guards scarce)",
        });
    }
    let wed = div(w * (d - 2 * e + g + m), 3 * d)?;
    let wgg = div(w * (g + m), 2 * g)?;
    Some(PositionWeights {
        wee: w,
        wed,
        wme: 0,
        wgg,
        wmg: w - wgg,
        wmd: (w - wed) / 2,
        wgd: (w - wed) / 2,
        case: "3b (exits scarce)",
    })
}
