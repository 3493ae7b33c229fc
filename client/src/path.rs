//! Path selection, as Tor does it: exit first, then a guard, then a middle.
//!
//! Works over an abstract list of [`RelayInfo`] (built from the consensus in `dir.rs`, or by
//! hand in tests), with the RNG passed in, so tests drive it with a seeded RNG.
//!
//! Rules (docs/protocol/95-client.md):
//! - the exit has the Exit flag, not BadExit, and its port policy allows every requested port;
//! - the guard is the first usable primary guard (see `guard.rs`);
//! - the middle is any Running, Valid relay;
//! - every hop has the Fast flag, and the Stable flag too when a requested port is a long-lived
//!   one ([`LONG_LIVED_PORTS`], Tor's list);
//! - choices are weighted by consensus weight times the position weight of the relay's class
//!   for that position (dir-spec §3.8.3: `Wee`/`Wed` for exits, `Wmg`/`Wmm`/`Wme`/`Wmd` for
//!   middles; [`PositionWeights`]);
//! - no relay twice; no two relays of one (mutually declared) family or sharing an IPv4 /16 or
//!   an IPv6 /32 (the directory's rule, `NetDir::related`), unless the network is a test network
//!   whose consensus turns `enforce_distinct_subnets` off (`relaxed`, `DirView::relaxed`), where
//!   only "no relay twice" holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use allium_crypto::{RelayId, X25519Public};
use allium_directory::netdir::{RelationFacts, related_relays};
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
    /// HSDir: stores onion-service descriptors (issue 13).
    pub hsdir: bool,
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
    /// What the directory's relatedness rule reads of this relay.
    fn facts(&self) -> RelationFacts<'_> {
        RelationFacts {
            id: self.id,
            family: &self.family,
            addrs: &self.addrs,
        }
    }
    /// The address to connect to: the first IPv4 address, else the first one.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| self.addrs.first())
            .copied()
    }
}

/// Whether `a` and `b` may be on one circuit. Always false for the same relay; with `relaxed`
/// false, also false for relays that are related by the directory's one rule
/// ([`allium_directory::netdir::related_relays`], as [`allium_directory::netdir::NetDir::related`]):
/// a mutually declared family, or a shared IPv4 /16 or IPv6 /32.
pub fn compatible(a: &RelayInfo, b: &RelayInfo, relaxed: bool) -> bool {
    if a.id == b.id {
        return false;
    }
    relaxed || !related_relays(a.facts(), b.facts(), true)
}

/// Ports whose streams live long: circuits for them use Stable relays only (Tor's
/// `LongLivedPorts`).
pub const LONG_LIVED_PORTS: [u16; 12] = [
    21, 22, 706, 1863, 5050, 5190, 5222, 5223, 6523, 6667, 6697, 8300,
];

/// Whether a circuit for `ports` needs Stable relays.
pub fn needs_stable(ports: &[u16]) -> bool {
    ports.iter().any(|p| LONG_LIVED_PORTS.contains(p))
}

/// A position in a circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// First hop.
    Guard,
    /// Second hop.
    Middle,
    /// Last hop.
    Exit,
}

/// Fixed-point scale of position weights (Tor's `bwweightscale`).
pub const WEIGHT_SCALE: u64 = 10_000;

/// The position weights of a consensus (dir-spec §3.8.3), in units of [`WEIGHT_SCALE`]: how
/// much of a relay's weight counts when it is chosen for each position, by its class (g: Guard
/// only, m: neither, e: Exit only, d: Guard and Exit; BadExit counts as not Exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionWeights {
    /// Guard position: guard-only, middle-only, guard+exit.
    pub wgg: u64,
    /// Guard position, relays without Guard (not chosen: guards need the flag).
    pub wgm: u64,
    /// Guard position, guard+exit relays.
    pub wgd: u64,
    /// Middle position, guard-only relays.
    pub wmg: u64,
    /// Middle position, relays with neither flag.
    pub wmm: u64,
    /// Middle position, exit-only relays.
    pub wme: u64,
    /// Middle position, guard+exit relays.
    pub wmd: u64,
    /// Exit position, guard-only relays (cannot exit; kept for completeness).
    pub weg: u64,
    /// Exit position, relays with neither flag (cannot exit).
    pub wem: u64,
    /// Exit position, exit-only relays.
    pub wee: u64,
    /// Exit position, guard+exit relays.
    pub wed: u64,
}

impl Default for PositionWeights {
    /// Every weight 1: plain consensus weights (a consensus without position weights).
    fn default() -> Self {
        let w = WEIGHT_SCALE;
        Self {
            wgg: w,
            wgm: w,
            wgd: w,
            wmg: w,
            wmm: w,
            wme: w,
            wmd: w,
            weg: w,
            wem: w,
            wee: w,
            wed: w,
        }
    }
}

impl PositionWeights {
    /// From a consensus' `bandwidth_weights`: each value clamped to `0..=WEIGHT_SCALE`; an
    /// empty map (or a missing name) means 1.
    pub fn from_consensus(map: &BTreeMap<String, i32>) -> Self {
        let get = |k: &str| {
            map.get(k).map_or(WEIGHT_SCALE, |v| {
                u64::try_from(*v).unwrap_or(0).min(WEIGHT_SCALE)
            })
        };
        Self {
            wgg: get("Wgg"),
            wgm: get("Wgm"),
            wgd: get("Wgd"),
            wmg: get("Wmg"),
            wmm: get("Wmm"),
            wme: get("Wme"),
            wmd: get("Wmd"),
            weg: get("Weg"),
            wem: get("Wem"),
            wee: get("Wee"),
            wed: get("Wed"),
        }
    }

    /// The multiplier for `r` in `pos`.
    pub fn factor(&self, r: &RelayInfo, pos: Position) -> u64 {
        let guard = r.flags.guard;
        let exit = r.flags.exit && !r.flags.bad_exit;
        match (pos, guard, exit) {
            (Position::Guard, true, true) => self.wgd,
            (Position::Guard, true, false) => self.wgg,
            (Position::Guard, false, false) => self.wgm,
            (Position::Guard, false, true) => 0,
            (Position::Middle, true, true) => self.wmd,
            (Position::Middle, true, false) => self.wmg,
            (Position::Middle, false, true) => self.wme,
            (Position::Middle, false, false) => self.wmm,
            (Position::Exit, true, true) => self.wed,
            (Position::Exit, true, false) => self.weg,
            (Position::Exit, false, true) => self.wee,
            (Position::Exit, false, false) => self.wem,
        }
    }

    /// `r`'s selection weight in `pos`: consensus weight × position weight.
    pub fn weight(&self, r: &RelayInfo, pos: Position) -> u128 {
        u128::from(r.weight) * u128::from(self.factor(r, pos))
    }
}

/// Pick one element, weighted by `weight` (uniformly when every weight is 0).
pub fn weighted_choice<'a, R: Rng + ?Sized>(
    items: &[&'a RelayInfo],
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    weighted_choice_by(items, |r| u128::from(r.weight), rng)
}

/// Pick one element, weighted by `weight_of` (uniformly when every weight is 0).
pub fn weighted_choice_by<'a, R: Rng + ?Sized>(
    items: &[&'a RelayInfo],
    weight_of: impl Fn(&RelayInfo) -> u128,
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    if items.is_empty() {
        return None;
    }
    let weights: Vec<u128> = items.iter().map(|r| weight_of(r)).collect();
    let total: u128 = weights.iter().sum();
    if total == 0 {
        let i = rng.random_range(0..items.len());
        return items.get(i).copied();
    }
    let mut x = rng.random_range(0..total);
    for (r, w) in items.iter().zip(weights) {
        if x < w {
            return Some(r);
        }
        x -= w;
    }
    items.last().copied()
}

/// What every hop of a circuit for some ports must have: Fast always, Stable for long-lived
/// ports.
fn capable(r: &RelayInfo, stable: bool) -> bool {
    r.flags.fast && (!stable || r.flags.stable)
}

/// Choose an exit for `ports`, weighted by consensus weight (no position weights).
pub fn choose_exit<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    ports: &[u16],
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    choose_exit_weighted(relays, &PositionWeights::default(), ports, rng)
}

/// Choose an exit for `ports`: Fast (and Stable for long-lived ports), weighted by consensus
/// weight × exit-position weight.
pub fn choose_exit_weighted<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    weights: &PositionWeights,
    ports: &[u16],
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    let stable = needs_stable(ports);
    let cands: Vec<&RelayInfo> = relays
        .iter()
        .filter(|r| r.is_exit_for(ports) && capable(r, stable))
        .collect();
    weighted_choice_by(&cands, |r| weights.weight(r, Position::Exit), rng)
}

/// Choose a middle relay compatible with every relay in `others` (no position weights).
pub fn choose_middle<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    others: &[&RelayInfo],
    relaxed: bool,
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    choose_middle_weighted(
        relays,
        &PositionWeights::default(),
        others,
        false,
        relaxed,
        rng,
    )
}

/// Choose a middle relay compatible with every relay in `others`: Fast (and Stable when
/// `stable`), weighted by consensus weight × middle-position weight.
pub fn choose_middle_weighted<'a, R: Rng + ?Sized>(
    relays: &'a [RelayInfo],
    weights: &PositionWeights,
    others: &[&RelayInfo],
    stable: bool,
    relaxed: bool,
    rng: &mut R,
) -> Option<&'a RelayInfo> {
    let cands: Vec<&RelayInfo> = relays
        .iter()
        .filter(|r| {
            r.usable() && capable(r, stable) && others.iter().all(|o| compatible(r, o, relaxed))
        })
        .collect();
    weighted_choice_by(&cands, |r| weights.weight(r, Position::Middle), rng)
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

/// [`choose_path_weighted`] without position weights (plain consensus weights).
pub fn choose_path<R: Rng + ?Sized>(
    relays: &[RelayInfo],
    guard_order: &[RelayId],
    avoid: &[RelayId],
    ports: &[u16],
    relaxed: bool,
    rng: &mut R,
) -> Result<Path, &'static str> {
    choose_path_weighted(
        relays,
        &PositionWeights::default(),
        guard_order,
        avoid,
        ports,
        relaxed,
        rng,
    )
}

/// Choose a full path: an exit allowing `ports`, then the first of `guard_order` (identities in
/// preference order, normally the primary guards) that is usable, has the Guard flag and is
/// compatible with the exit, then a middle compatible with both. Every hop is Fast, and Stable
/// when a port is long-lived; exit and middle are weighted by `weights`. Relays in `avoid`
/// (recently failed) are used in no position.
pub fn choose_path_weighted<R: Rng + ?Sized>(
    relays: &[RelayInfo],
    weights: &PositionWeights,
    guard_order: &[RelayId],
    avoid: &[RelayId],
    ports: &[u16],
    relaxed: bool,
    rng: &mut R,
) -> Result<Path, &'static str> {
    let stable = needs_stable(ports);
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
        let exit = choose_exit_weighted(relays, weights, ports, rng)
            .ok_or("no Fast exit relay (Stable for long-lived ports) allows this port")?;
        let guard = guard_order.iter().find_map(|id| {
            relays.iter().find(|r| {
                r.id == *id
                    && r.usable()
                    && r.flags.guard
                    && capable(r, stable)
                    && compatible(r, exit, relaxed)
            })
        });
        let Some(guard) = guard else { continue };
        let Some(middle) =
            choose_middle_weighted(relays, weights, &[guard, exit], stable, relaxed, rng)
        else {
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
                hsdir: false,
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
    fn same_ipv6_32_excluded_unless_relaxed() {
        let v6 = |i: u8, s: &str| {
            let mut r = relay(i, [10, i, 0, 1], true, false, 1);
            r.addrs = vec![SocketAddr::new(s.parse().unwrap(), 9001)];
            r
        };
        let a = v6(1, "2001:db8:1::1");
        let b = v6(2, "2001:db8:ffff::2");
        let c = v6(3, "2001:db9::3");
        assert!(!compatible(&a, &b, false), "one IPv6 /32");
        assert!(compatible(&a, &b, true));
        assert!(compatible(&a, &c, false), "different /32s");
        // A dual-stack relay is related through either address.
        let mut d = relay(4, [10, 40, 0, 1], true, false, 1);
        d.addrs
            .push(SocketAddr::new("2001:db9:5::5".parse().unwrap(), 9001));
        assert!(!compatible(&c, &d, false));
        let e = relay(5, [10, 40, 7, 7], true, false, 1);
        assert!(!compatible(&d, &e, false));
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

    /// Fixed seed, many draws: each relay's share in the exit and middle positions matches
    /// consensus weight × position weight of its class.
    #[test]
    fn position_weights_shape_choices() {
        // g1, g2: guard only; m1, m2: neither; e1, e2: exit only; d: guard and exit.
        let relays = vec![
            relay(1, [10, 1, 0, 1], true, false, 100),
            relay(2, [10, 2, 0, 1], true, false, 300),
            relay(3, [10, 3, 0, 1], false, false, 200),
            relay(4, [10, 4, 0, 1], false, false, 200),
            relay(5, [10, 5, 0, 1], false, true, 100),
            relay(6, [10, 6, 0, 1], false, true, 100),
            relay(7, [10, 7, 0, 1], true, true, 400),
        ];
        let map: BTreeMap<String, i32> = [
            ("Wee", 10_000),
            ("Wed", 2_000),
            ("Wmg", 5_000),
            ("Wmm", 10_000),
            ("Wme", 0),
            ("Wmd", 3_000),
            ("Wgg", 5_000),
            ("Wgd", 7_000),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_string(), *v))
        .collect();
        let w = PositionWeights::from_consensus(&map);
        assert_eq!(w.wem, WEIGHT_SCALE, "missing names count as 1");
        let n = 40_000u32;
        let mut rng = StdRng::seed_from_u64(2026);
        let mut exits = [0u32; 7];
        let mut middles = [0u32; 7];
        for _ in 0..n {
            let e = choose_exit_weighted(&relays, &w, &[80], &mut rng).unwrap();
            exits[usize::from(e.id.0[0] - 1)] += 1;
            let m = choose_middle_weighted(&relays, &w, &[], false, true, &mut rng).unwrap();
            middles[usize::from(m.id.0[0] - 1)] += 1;
        }
        let share = |c: u32| f64::from(c) / f64::from(n);
        let close = |got: f64, want: f64, what: &str| {
            assert!((got - want).abs() < 0.015, "{what}: {got:.4} vs {want:.4}");
        };
        // Exit: e1, e2 100×1, d 400×0.2 (unweighted, d would get 2/3).
        close(share(exits[4]), 100.0 / 280.0, "e1 as exit");
        close(share(exits[5]), 100.0 / 280.0, "e2 as exit");
        close(share(exits[6]), 80.0 / 280.0, "d as exit");
        assert_eq!(exits[..4].iter().sum::<u32>(), 0, "non-exits never exit");
        // Middle: g 0.5, m 1, e 0, d 0.3; total 50+150+200+200+120 = 720.
        close(share(middles[0]), 50.0 / 720.0, "g1 as middle");
        close(share(middles[1]), 150.0 / 720.0, "g2 as middle");
        close(share(middles[2]), 200.0 / 720.0, "m1 as middle");
        close(share(middles[6]), 120.0 / 720.0, "d as middle");
        assert_eq!(middles[4] + middles[5], 0, "Wme = 0: exits are no middles");
        // Guard-position factors by class.
        assert_eq!(w.factor(&relays[0], Position::Guard), 5_000);
        assert_eq!(w.factor(&relays[6], Position::Guard), 7_000);
        assert_eq!(w.factor(&relays[4], Position::Guard), 0);
        // BadExit counts as not an exit.
        let mut bad = relays[6].clone();
        bad.flags.bad_exit = true;
        assert_eq!(w.factor(&bad, Position::Middle), 5_000);
        // Out-of-range values are clamped.
        let wild = PositionWeights::from_consensus(
            &[("Wee".to_string(), -5), ("Wed".to_string(), 99_999)]
                .into_iter()
                .collect(),
        );
        assert_eq!((wild.wee, wild.wed), (0, WEIGHT_SCALE));
        assert_eq!(
            PositionWeights::from_consensus(&BTreeMap::new()),
            PositionWeights::default()
        );
    }

    #[test]
    fn fast_every_hop_and_stable_for_long_lived_ports() {
        let mut relays = net();
        // Relays 2.. are not Fast except a few; relay index 4 (exit, not Stable).
        for (i, r) in relays.iter_mut().enumerate() {
            r.flags.fast = i % 2 == 0;
            r.flags.stable = i != 4;
            if r.flags.exit {
                r.exit_ports = vec![(1, 65535)];
            }
        }
        let g = guards(&relays);
        let mut rng = StdRng::seed_from_u64(11);
        let mut exit4_used = false;
        for _ in 0..400 {
            let p = choose_path(&relays, &g, &[], &[80], false, &mut rng).unwrap();
            assert!(p.hops().iter().all(|h| h.flags.fast), "every hop Fast");
            exit4_used |= p.exit.id == relays[4].id;
            let p = choose_path(&relays, &g, &[], &[22], false, &mut rng).unwrap();
            assert!(
                p.hops().iter().all(|h| h.flags.fast && h.flags.stable),
                "long-lived port: every hop Stable"
            );
        }
        assert!(exit4_used, "a non-Stable exit serves short-lived ports");
        assert!(needs_stable(&[443, 6667]) && !needs_stable(&[80, 443]));
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
