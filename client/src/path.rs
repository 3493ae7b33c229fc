//! Path selection, as Tor does it: exit first, then a guard, then a middle.
//!
//! Works over an abstract list of [`RelayInfo`] (built from the consensus in `dir.rs`, or by
//! hand in tests), with the RNG passed in, so tests drive it with a seeded RNG.
//!
//! Rules (docs/protocol/95-client.md):
//! - the exit has the Exit flag, not BadExit, and its port policy allows every requested port;
//! - the guard is the first usable primary guard (see `guard.rs`);
//! - the middle is any Running, Valid relay;
//! - choices are weighted by consensus weight;
//! - no relay twice; no two relays of one (mutually declared) family or sharing an IPv4 /16,
//!   unless the network is a test network (`relaxed`), where only "no relay twice" holds.

use std::net::{IpAddr, SocketAddr};

use allium_crypto::{RelayId, X25519Public};
use rand::{Rng, RngExt as _};

/// The consensus flags the client uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayFlags {
    /// Running.
    pub running: bool,
    /// Valid.
    pub valid: bool,
    /// Guard.
    pub guard: bool,
    /// Exit.
    pub exit: bool,
    /// BadExit.
    pub bad_exit: bool,
    /// Fast.
    pub fast: bool,
    /// Stable.
    pub stable: bool,
}

/// What path selection needs to know about one relay.
#[derive(Clone, Debug)]
pub struct RelayInfo {
    /// Ed25519 identity.
    pub id: RelayId,
    /// Noise static key of its link.
    pub link_key: X25519Public,
    /// Current ntor onion key.
    pub onion_key: X25519Public,
    /// Its addresses (first IPv4 one is used to connect).
    pub addrs: Vec<SocketAddr>,
    /// Consensus flags.
    pub flags: RelayFlags,
    /// Consensus weight.
    pub weight: u64,
    /// Relays it declares as family.
    pub family: Vec<RelayId>,
    /// Port ranges its exit policy accepts (empty: not an exit).
    pub exit_ports: Vec<(u16, u16)>,
}

impl RelayInfo {
    /// Usable at all: Running and Valid.
    pub fn usable(&self) -> bool {
        self.flags.running && self.flags.valid
    }
    /// Its exit policy accepts `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.exit_ports
            .iter()
            .any(|&(lo, hi)| lo <= port && port <= hi)
    }
    /// Can be the exit for all of `ports`.
    pub fn is_exit_for(&self, ports: &[u16]) -> bool {
        self.usable()
            && self.flags.exit
            && !self.flags.bad_exit
            && !self.exit_ports.is_empty()
            && ports.iter().all(|&p| self.allows_port(p))
    }
    /// The address to connect to: the first IPv4 address, else the first one.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| self.addrs.first())
            .copied()
    }
    fn ipv4_16s(&self) -> impl Iterator<Item = [u8; 2]> + '_ {
        self.addrs.iter().filter_map(|a| match a.ip() {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Some([o[0], o[1]])
            }
            IpAddr::V6(_) => None,
        })
    }
}

/// Whether `a` and `b` may be on one circuit. Always false for the same relay; with `relaxed`
/// false, also false for a mutually declared family or a shared IPv4 /16.
pub fn compatible(a: &RelayInfo, b: &RelayInfo, relaxed: bool) -> bool {
    if a.id == b.id {
        return false;
    }
    if relaxed {
        return true;
    }
    if a.family.contains(&b.id) && b.family.contains(&a.id) {
        return false;
    }
    !a.ipv4_16s().any(|x| b.ipv4_16s().any(|y| x == y))
}

/// Pick one element, weighted by `weight` (uniformly when every weight is 0).
pub fn weighted_choice<'a, R: Rng + ?Sized>(
    items: &[&'a RelayInfo],
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    if items.is_empty() {
        return None;
    }
    let total: u128 = items.iter().map(|r| u128::from(r.weight)).sum();
    if total == 0 {
        let i = rng.random_range(0..items.len());
        return items.get(i).copied();
    }
    let mut x = rng.random_range(0..total);
    for r in items {
        let w = u128::from(r.weight);
        if x < w {
            return Some(r);
        }
        x -= w;
    }
    items.last().copied()
}

/// Choose an exit for `ports`, weighted by consensus weight.
pub fn choose_exit<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    ports: &[u16],
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    let cands: Vec<&RelayInfo> = relays.iter().filter(|r| r.is_exit_for(ports)).collect();
    weighted_choice(&cands, rng)
}

/// Choose a middle relay compatible with every relay in `others`.
pub fn choose_middle<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    others: &[&RelayInfo],
    relaxed: bool,
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    let cands: Vec<&RelayInfo> = relays
        .iter()
        .filter(|r| r.usable() && others.iter().all(|o| compatible(r, o, relaxed)))
        .collect();
    weighted_choice(&cands, rng)
}

/// A chosen three-hop path.
#[derive(Clone, Debug)]
pub struct Path {
    /// First hop.
    pub guard: RelayInfo,
    /// Second hop.
    pub middle: RelayInfo,
    /// Last hop.
    pub exit: RelayInfo,
}

impl Path {
    /// The hops in order.
    pub fn hops(&self) -> [&RelayInfo; 3] {
        [&self.guard, &self.middle, &self.exit]
    }
}

/// Choose a full path: an exit allowing `ports`, then the first of `guard_order` (identities in
/// preference order, normally the primary guards) that is usable, has the Guard flag and is
/// compatible with the exit, then a middle compatible with both. Relays in `avoid` (recently
/// failed) are used in no position.
pub fn choose_path<R: Rng + ?Sized>(
    relays: &[RelayInfo],
    guard_order: &[RelayId],
    avoid: &[RelayId],
    ports: &[u16],
    relaxed: bool,
    rng: &mut R,
) -> Result<Path, &'static str> {
    let owned: Vec<RelayInfo>;
    let relays = if avoid.is_empty() {
        relays
    } else {
        owned = relays
            .iter()
            .filter(|r| !avoid.contains(&r.id))
            .cloned()
            .collect();
        &owned
    };
    // Try a few exits: with a small network the first exit may conflict with every guard.
    for _ in 0..8 {
        let exit = choose_exit(relays, ports, rng).ok_or("no exit relay allows this port")?;
        let guard = guard_order.iter().find_map(|id| {
            relays.iter().find(|r| {
                r.id == *id && r.usable() && r.flags.guard && compatible(r, exit, relaxed)
            })
        });
        let Some(guard) = guard else { continue };
        let Some(middle) = choose_middle(relays, &[guard, exit], relaxed, rng) else {
            continue;
        };
        return Ok(Path {
            guard: guard.clone(),
            middle: middle.clone(),
            exit: exit.clone(),
        });
    }
    Err("no combination of exit, guard and middle satisfies the path rules")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    pub(crate) fn relay(n: u8, ip: [u8; 4], guard: bool, exit: bool, weight: u64) -> RelayInfo {
        RelayInfo {
            id: RelayId([n; 32]),
            link_key: X25519Public([n; 32]),
            onion_key: X25519Public([n; 32]),
            addrs: vec![SocketAddr::from((ip, 9000 + u16::from(n)))],
            flags: RelayFlags {
                running: true,
                valid: true,
                guard,
                exit,
                bad_exit: false,
                fast: true,
                stable: true,
            },
            weight,
            family: vec![],
            exit_ports: if exit {
                vec![(80, 80), (443, 443)]
            } else {
                vec![]
            },
        }
    }

    fn net() -> Vec<RelayInfo> {
        let mut v = Vec::new();
        for i in 0..30u8 {
            v.push(relay(
                i + 1,
                [10, i, 0, 1],
                i % 3 == 0,
                i % 4 == 0,
                100 + u64::from(i),
            ));
        }
        v
    }

    fn guards(relays: &[RelayInfo]) -> Vec<RelayId> {
        relays
            .iter()
            .filter(|r| r.flags.guard)
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn paths_obey_rules() {
        let relays = net();
        let g = guards(&relays);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let p = choose_path(&relays, &g, &[], &[443], false, &mut rng).unwrap();
            let hops = p.hops();
            assert!(hops[0].flags.guard);
            assert!(p.exit.is_exit_for(&[443]));
            for (i, a) in hops.iter().enumerate() {
                for b in hops.iter().skip(i + 1) {
                    assert_ne!(a.id, b.id);
                    assert!(compatible(a, b, false));
                }
            }
        }
    }

    #[test]
    fn exit_port_respected() {
        let mut relays = net();
        // Only relay 5 allows 22.
        relays[4].flags.exit = true;
        relays[4].exit_ports = vec![(1, 65535)];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let e = choose_exit(&relays, &[22], &mut rng).unwrap();
            assert_eq!(e.id, relays[4].id);
        }
        assert!(choose_exit(&relays, &[0], &mut rng).is_none());
        relays[4].flags.bad_exit = true;
        assert!(choose_exit(&relays, &[22], &mut rng).is_none());
    }

    #[test]
    fn same_16_and_family_excluded_unless_relaxed() {
        let a = relay(1, [10, 1, 2, 3], true, false, 1);
        let b = relay(2, [10, 1, 9, 9], true, false, 1);
        let c = relay(3, [10, 2, 0, 1], true, false, 1);
        assert!(!compatible(&a, &b, false));
        assert!(compatible(&a, &b, true));
        assert!(compatible(&a, &c, false));
        let mut a2 = a.clone();
        let mut c2 = c.clone();
        a2.family = vec![c.id];
        assert!(compatible(&a2, &c2, false), "family needs both sides");
        c2.family = vec![a.id];
        assert!(!compatible(&a2, &c2, false));
        assert!(compatible(&a2, &c2, true));
        assert!(!compatible(&a, &a, true), "never the same relay twice");
    }

    #[test]
    fn test_network_paths_on_one_16() {
        let relays: Vec<RelayInfo> = (1..=4u8)
            .map(|i| relay(i, [127, 0, 0, 1], i <= 2, i >= 3, 10))
            .collect();
        let g = guards(&relays);
        let mut rng = StdRng::seed_from_u64(3);
        assert!(choose_path(&relays, &g, &[], &[80], false, &mut rng).is_err());
        for _ in 0..100 {
            let p = choose_path(&relays, &g, &[], &[80], true, &mut rng).unwrap();
            assert_eq!(p.guard.id, g[0], "first primary guard preferred");
            assert!(p.middle.id != p.guard.id && p.middle.id != p.exit.id);
        }
        // Avoiding the first guard falls back to the second.
        let p = choose_path(&relays, &g, &[g[0]], &[80], true, &mut rng).unwrap();
        assert_eq!(p.guard.id, g[1]);
        // Avoided relays are used in no position.
        for _ in 0..50 {
            let p = choose_path(&relays, &g, &[relays[2].id], &[80], true, &mut rng).unwrap();
            assert!(p.hops().iter().all(|h| h.id != relays[2].id));
            assert_eq!(p.exit.id, relays[3].id);
        }
    }

    #[test]
    fn weighting_roughly_respected() {
        let mut relays: Vec<RelayInfo> = (1..=3u8)
            .map(|i| relay(i, [10, i, 0, 1], false, true, 0))
            .collect();
        relays[0].weight = 100;
        relays[1].weight = 300;
        relays[2].weight = 600;
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            let e = choose_exit(&relays, &[80], &mut rng).unwrap();
            let i = relays.iter().position(|r| r.id == e.id).unwrap();
            counts[i] += 1;
        }
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
        assert!((2700..3300).contains(&counts[1]), "{counts:?}");
        assert!((5600..6400).contains(&counts[2]), "{counts:?}");
    }

    proptest::proptest! {
        /// Any relay list, any seed: either no path, or a path that keeps every rule.
        #[test]
        fn any_network_any_seed(
            spec in proptest::collection::vec(
                (0u8..4, 0u8..4, proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY, 0u64..1000, 0u8..40),
                0..25,
            ),
            seed in proptest::prelude::any::<u64>(),
            relaxed in proptest::bool::ANY,
            port in 1u16..100,
        ) {
            let mut relays: Vec<RelayInfo> = spec
                .iter()
                .enumerate()
                .map(|(i, &(a, b, guard, exit, running, w, fam))| {
                    let mut r = relay(i as u8 + 1, [10, a, b, 1], guard, exit, w);
                    r.flags.running = running;
                    r.exit_ports = if exit { vec![(1, 60)] } else { vec![] };
                    if fam < 25 {
                        r.family = vec![RelayId([fam + 1; 32])];
                    }
                    r
                })
                .collect();
            // Make some families mutual.
            for i in 0..relays.len() {
                let fam = relays[i].family.clone();
                for f in fam {
                    if let Some(j) = relays.iter().position(|r| r.id == f) {
                        let me = relays[i].id;
                        relays[j].family.push(me);
                    }
                }
            }
            let g = guards(&relays);
            let mut rng = StdRng::seed_from_u64(seed);
            if let Ok(p) = choose_path(&relays, &g, &[], &[port], relaxed, &mut rng) {
                let hops = p.hops();
                proptest::prop_assert!(hops[0].flags.guard && hops[0].usable());
                proptest::prop_assert!(hops[1].usable());
                proptest::prop_assert!(hops[2].is_exit_for(&[port]));
                for (i, a) in hops.iter().enumerate() {
                    for b in hops.iter().skip(i + 1) {
                        proptest::prop_assert!(compatible(a, b, relaxed));
                    }
                }
            }
        }
    }

    #[test]
    fn not_running_never_chosen() {
        let mut relays = net();
        for r in relays.iter_mut().skip(1) {
            r.flags.running = false;
        }
        let mut rng = StdRng::seed_from_u64(9);
        assert!(choose_middle(&relays, &[], false, &mut rng).is_some_and(|r| r.id == relays[0].id));
        assert!(choose_path(&relays, &guards(&relays), &[], &[80], false, &mut rng).is_err());
    }
}
