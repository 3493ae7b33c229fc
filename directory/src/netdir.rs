//! `NetDir`: a verified consensus indexed for path selection.
//!
//! Built only from a [`VerifiedConsensus`], so everything in it has been checked against the
//! authorities. Lookups by identity use binary search (relays are sorted by identity); lookups
//! by link key use an index built once.

use std::collections::HashMap;
use std::net::IpAddr;

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
        if a.identity == b.identity {
            return true;
        }
        if a.family.binary_search(&b.identity).is_ok()
            && b.family.binary_search(&a.identity).is_ok()
        {
            return true;
        }
        if self.param_or_default(params::ENFORCE_DISTINCT_SUBNETS) != 0 {
            return a
                .addrs
                .iter()
                .any(|x| b.addrs.iter().any(|y| same_subnet(x.ip(), y.ip())));
        }
        false
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

/// Whether two addresses share an IPv4 /16 or an IPv6 /32.
pub fn same_subnet(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x.octets().get(..2) == y.octets().get(..2),
        (IpAddr::V6(x), IpAddr::V6(y)) => x.octets().get(..4) == y.octets().get(..4),
        _ => false,
    }
}
