//! `NetDir`: a verified consensus indexed for path selection.
//!
//! Built only from a [`VerifiedConsensus`], so everything in it has been checked against the
//! authorities. Lookups by identity use binary search (relays are sorted by identity); lookups
//! by link key use an index built once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use allium_crypto::{RelayId, X25519Public};

use crate::doc::{Consensus, ConsensusEntry, Flags, VerifiedConsensus};

/// Parameter names and defaults that clients and relays read with [`NetDir::param`].
pub mod params {
    /// Circuit window start (cells).
    pub const CIRCWINDOW: (&str, i32) = ("circwindow", 1000);
    /// Whether guards are required for the first hop (1) or any Running relay may be first (0).
    pub const USE_GUARDS: (&str, i32) = ("use_guards", 1);
    /// Number of primary guards.
    pub const GUARD_N_PRIMARY: (&str, i32) = ("guard_n_primary", 3);
    /// Whether two relays in one /16 (IPv4) or /32 (IPv6) count as related (1) or not (0).
    /// Test networks on 127.0.0.1 set it to 0.
    pub const ENFORCE_DISTINCT_SUBNETS: (&str, i32) = ("enforce_distinct_subnets", 1);
}

/// A verified consensus with indexes.
#[derive(Clone, Debug)]
pub struct NetDir {
    verified: VerifiedConsensus,
    by_link: HashMap<X25519Public, usize>,
}

impl NetDir {
    /// Index a verified consensus.
    pub fn new(verified: VerifiedConsensus) -> Self {
        let by_link = verified
            .consensus()
            .relays
            .iter()
            .enumerate()
            .map(|(i, r)| (r.link_key, i))
            .collect();
        Self { verified, by_link }
    }
    /// The verified consensus it was built from.
    pub fn verified(&self) -> &VerifiedConsensus {
        &self.verified
    }
    /// The consensus.
    pub fn consensus(&self) -> &Consensus {
        self.verified.consensus()
    }
    /// Every relay, sorted by identity.
    pub fn relays(&self) -> &[ConsensusEntry] {
        &self.consensus().relays
    }
    /// Relays that have all of `flags`.
    pub fn relays_with(&self, flags: Flags) -> impl Iterator<Item = &ConsensusEntry> {
        self.relays()
            .iter()
            .filter(move |r| r.flags.contains(flags))
    }
    /// Running and Valid relays: the ones usable in circuits at all.
    pub fn usable(&self) -> impl Iterator<Item = &ConsensusEntry> {
        self.relays_with(Flags::RUNNING | Flags::VALID)
    }
    /// Running, Valid, Exit, not BadExit, and allowing `port`.
    pub fn exits_for_port(&self, port: u16) -> impl Iterator<Item = &ConsensusEntry> {
        self.usable().filter(move |r| {
            r.flags.contains(Flags::EXIT)
                && !r.flags.contains(Flags::BAD_EXIT)
                && r.exit.allows_port(port)
        })
    }
    /// A relay by identity.
    pub fn by_id(&self, id: &RelayId) -> Option<&ConsensusEntry> {
        let relays = self.relays();
        relays
            .binary_search_by(|r| r.identity.cmp(id))
            .ok()
            .and_then(|i| relays.get(i))
    }
    /// A relay by link (Noise static) key: tells a relay whether an incoming link is from a relay.
    pub fn by_link_key(&self, key: &X25519Public) -> Option<&ConsensusEntry> {
        self.by_link.get(key).and_then(|&i| self.relays().get(i))
    }
    /// A network parameter, or `default` when absent.
    pub fn param(&self, name: &str, default: i32) -> i32 {
        self.consensus()
            .params
            .get(name)
            .copied()
            .unwrap_or(default)
    }
    /// A parameter by its `(name, default)` pair from [`params`].
    pub fn param_or_default(&self, p: (&str, i32)) -> i32 {
        self.param(p.0, p.1)
    }
    /// Sum of weights of the relays with all of `flags`.
    pub fn total_weight(&self, flags: Flags) -> u64 {
        self.relays_with(flags).map(|r| u64::from(r.weight)).sum()
    }
    /// Whether two relays must not share a circuit: the same relay, family declared in both
    /// directions (as Tor does), or the same /16 (IPv4) or /32 (IPv6) when the
    /// `enforce_distinct_subnets` parameter is on.
    pub fn related(&self, a: &ConsensusEntry, b: &ConsensusEntry) -> bool {
        fn facts(e: &ConsensusEntry) -> RelationFacts<'_> {
            RelationFacts {
                id: e.identity,
                family: &e.family,
                addrs: &e.addrs,
            }
        }
        let subnets = self.param_or_default(params::ENFORCE_DISTINCT_SUBNETS) != 0;
        related_relays(facts(a), facts(b), subnets)
    }
    /// Start of validity.
    pub fn valid_after(&self) -> u64 {
        self.consensus().valid_after
    }
    /// When to start refetching.
    pub fn fresh_until(&self) -> u64 {
        self.consensus().fresh_until
    }
    /// End of validity.
    pub fn valid_until(&self) -> u64 {
        self.consensus().valid_until
    }
}

/// What the relatedness rule ([`related_relays`]) reads of a relay, so that the client's own
/// relay records (`allium_client`'s path selection) apply the same rule as [`NetDir::related`].
#[derive(Clone, Copy, Debug)]
pub struct RelationFacts<'a> {
    /// Identity.
    pub id: RelayId,
    /// The relays it declares as family.
    pub family: &'a [RelayId],
    /// Its addresses.
    pub addrs: &'a [SocketAddr],
}

/// Whether two relays must not share a circuit: the same identity; each declares the other as
/// family (one-sided claims count for nothing, as in Tor); or, with `distinct_subnets`, some
/// address of one shares an IPv4 /16 or an IPv6 /32 with some address of the other (Tor's
/// `EnforceDistinctSubnets`).
pub fn related_relays(a: RelationFacts<'_>, b: RelationFacts<'_>, distinct_subnets: bool) -> bool {
    if a.id == b.id {
        return true;
    }
    if a.family.contains(&b.id) && b.family.contains(&a.id) {
        return true;
    }
    distinct_subnets
        && a.addrs
            .iter()
            .any(|x| b.addrs.iter().any(|y| same_subnet(x.ip(), y.ip())))
}

/// Whether two addresses share an IPv4 /16 or an IPv6 /32 (an IPv4-mapped IPv6 address counts
/// as its IPv4 address).
pub fn same_subnet(a: IpAddr, b: IpAddr) -> bool {
    match (a.to_canonical(), b.to_canonical()) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x.octets().get(..2) == y.octets().get(..2),
        (IpAddr::V6(x), IpAddr::V6(y)) => x.octets().get(..4) == y.octets().get(..4),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(id: u8, family: &'a [RelayId], addrs: &'a [SocketAddr]) -> RelationFacts<'a> {
        RelationFacts {
            id: RelayId([id; 32]),
            family,
            addrs,
        }
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn related_by_identity_family_or_subnet() {
        let a4 = [sa("198.51.7.1:9001")];
        let b4 = [sa("198.51.200.9:9001")];
        let c4 = [sa("198.52.0.1:9001")];
        let (a, b, c) = (facts(1, &[], &a4), facts(2, &[], &b4), facts(3, &[], &c4));
        assert!(related_relays(a, a, false), "the same relay");
        assert!(related_relays(a, b, true), "one IPv4 /16");
        assert!(!related_relays(a, b, false), "subnets not enforced");
        assert!(!related_relays(a, c, true));
        // IPv6: the /32 rule.
        let a6 = [sa("[2001:67c:1::1]:9001")];
        let b6 = [sa("[2001:67c:ffff::2]:9001")];
        let c6 = [sa("[2001:67d::3]:9001")];
        let (x, y, z) = (facts(4, &[], &a6), facts(5, &[], &b6), facts(6, &[], &c6));
        assert!(related_relays(x, y, true), "one IPv6 /32");
        assert!(!related_relays(x, z, true));
        assert!(!related_relays(y, x, false));
        // Dual stack: either address relates; a mapped address counts as IPv4.
        let d = [sa("203.0.114.1:1"), sa("[2001:67d:9::9]:1")];
        assert!(related_relays(facts(7, &[], &d), z, true));
        let m = [sa("[::ffff:198.51.99.9]:1")];
        assert!(related_relays(facts(8, &[], &m), a, true));
        // Family counts only when declared both ways.
        let fa = [RelayId([3; 32])];
        let fc = [RelayId([1; 32])];
        assert!(!related_relays(facts(1, &fa, &a4), c, true), "one-sided");
        assert!(related_relays(
            facts(1, &fa, &a4),
            facts(3, &fc, &c4),
            false
        ));
    }
}
