//! Computing the consensus from votes: deterministic, so every authority that holds the same
//! votes produces byte-identical bodies (dir-spec §3.8, simplified; 80-directory.md "Voting").

use std::collections::BTreeMap;

use allium_crypto::{RelayId, X25519Public};

use crate::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
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
    let params = pvals
        .into_iter()
        .filter(|(_, vals)| majority(vals.len()))
        .filter_map(|(k, mut vals)| low_median(&mut vals).map(|m| (k.clone(), m)))
        .collect();

    // Relays: group vote entries by identity.
    let mut groups: BTreeMap<RelayId, Vec<&VoteEntry>> = BTreeMap::new();
    for v in &votes {
        for e in &v.relays {
            groups.entry(e.entry.identity).or_default().push(e);
        }
    }
    let mut relays = Vec::with_capacity(groups.len());
    for (_, entries) in groups {
        if let Some(e) = combine_relay(&entries, &majority) {
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
        relays,
    }
}

fn combine_relay(
    entries: &[&VoteEntry],
    majority: &impl Fn(usize) -> bool,
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
    let mut weights: Vec<u32> = agreeing.iter().map(|e| e.entry.weight).collect();
    let weight = low_median(&mut weights)?;
    // Descriptor-derived fields from the most recent descriptor (ties: larger digest).
    let newest = agreeing.iter().max_by(|a, b| {
        (a.published, a.entry.desc_digest).cmp(&(b.published, b.entry.desc_digest))
    })?;
    let mut e = newest.entry.clone();
    e.flags = flags;
    e.weight = weight;
    Some(e)
}
