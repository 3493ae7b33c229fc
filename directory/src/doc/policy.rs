//! Exit policies (a port summary, and in descriptors the full address-and-port rules) and relay
//! flags.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::err::{DirError, Result};

/// At most this many port ranges in a policy (Tor's reduced exit policy needs 68).
pub const MAX_PORT_RANGES: usize = 128;
/// At most this many address-and-port rules in a descriptor's full policy.
pub const MAX_POLICY_RULES: usize = 128;

/// An inclusive port range `lo..=hi` with `1 <= lo <= hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// One port.
    pub fn single(p: u16) -> Self {
        Self { lo: p, hi: p }
    }
    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// An exit policy: the destination ports a relay will connect to for clients (the summary that
/// path selection reads). An empty `accept` list means "reject everything" (not an exit). Ranges
/// are sorted, disjoint and non-adjacent, so every policy has one form.
///
/// `allow_private` lets the exit connect to private, loopback and link-local addresses; only a
/// test network sets it (clients and exits ignore it otherwise; see 80-directory.md).
///
/// `rules` is the full policy when it has address rules (descriptors only; empty in a
/// consensus, and in descriptors whose policy is ports only): then `accept` must equal
/// [`summarize`]`(rules)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitPolicy {
    /// Accepted port ranges.
    pub accept: Vec<PortRange>,
    /// Whether private destinations are allowed (test networks only).
    pub allow_private: bool,
    /// The full policy, first matching rule wins, then reject (empty: `accept` is the policy).
    pub rules: Vec<PolicyRule>,
}

/// The addresses a [`PolicyRule`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddrPattern {
    /// Every address (`*`).
    Any,
    /// An IPv4 network: its address (host bits zero) and prefix length (0 to 32); `*4` is /0.
    V4([u8; 4], u8),
    /// An IPv6 network: its address (host bits zero) and prefix length (0 to 128); `*6` is /0.
    V6([u8; 16], u8),
}

fn prefix_match(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

fn host_bits_zero(a: &[u8], bits: u8) -> bool {
    let mut zero = vec![0u8; a.len()];
    // The network address with the host bits cleared must equal the address itself.
    for (i, (z, x)) in zero.iter_mut().zip(a).enumerate() {
        let start = i * 8;
        let keep = usize::from(bits).saturating_sub(start).min(8);
        let mask = if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        *z = x & mask;
    }
    zero == a
}

impl AddrPattern {
    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Self::Any, _) => true,
            (Self::V4(net, bits), IpAddr::V4(a)) => prefix_match(net, &a.octets(), *bits),
            (Self::V6(net, bits), IpAddr::V6(a)) => prefix_match(net, &a.octets(), *bits),
            _ => false,
        }
    }
    fn is_valid(&self) -> bool {
        match self {
            Self::Any => true,
            Self::V4(a, bits) => *bits <= 32 && host_bits_zero(a, *bits),
            Self::V6(a, bits) => *bits <= 128 && host_bits_zero(a, *bits),
        }
    }
}

impl fmt::Display for AddrPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::V4(_, 0) => f.write_str("*4"),
            Self::V6(_, 0) => f.write_str("*6"),
            Self::V4(a, 32) => write!(f, "{}", std::net::Ipv4Addr::from(*a)),
            Self::V4(a, bits) => write!(f, "{}/{bits}", std::net::Ipv4Addr::from(*a)),
            Self::V6(a, 128) => write!(f, "[{}]", std::net::Ipv6Addr::from(*a)),
            Self::V6(a, bits) => write!(f, "[{}]/{bits}", std::net::Ipv6Addr::from(*a)),
        }
    }
}

/// One rule of a full exit policy, written as Tor writes it: `accept 1.2.3.0/24:80`,
/// `reject *:25`, `accept [2001:db8::]/32:443-444`, `reject *6:*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRule {
    /// Accept (true) or reject.
    pub accept: bool,
    /// The destination addresses it applies to.
    pub addr: AddrPattern,
    /// The destination ports it applies to.
    pub ports: PortRange,
}

impl PolicyRule {
    /// Whether the rule applies to `ip:port`.
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.ports.contains(port) && self.addr.contains(ip)
    }
    /// Parse `accept|reject ADDR:PORTS` (ADDR: `*`, `*4`, `*6`, an IPv4 address or network
    /// `a.b.c.d/len`, an IPv6 one in brackets `[..]` or `[..]/len`; PORTS: `*`, `N` or `N-M`).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        let (verb, rest) = text.split_once(char::is_whitespace).ok_or_else(|| {
            format!("`{text}`: expected `accept ADDR:PORTS` or `reject ADDR:PORTS`")
        })?;
        let accept = match verb {
            "accept" => true,
            "reject" => false,
            _ => return Err(format!("`{text}`: a rule starts with `accept` or `reject`")),
        };
        let rest = rest.trim();
        let (addr, ports) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}`: expected ADDR:PORTS"))?;
        let ports = parse_ports(ports)
            .ok_or_else(|| format!("`{text}`: ports must be `*`, `N` or `N-M` within 1-65535"))?;
        let addr = parse_addr(addr).ok_or_else(|| {
            format!(
                "`{text}`: the address must be `*`, `*4`, `*6`, `a.b.c.d[/len]` or `[v6][/len]` \
                 with the host bits zero"
            )
        })?;
        Ok(Self {
            accept,
            addr,
            ports,
        })
    }
    fn is_valid(&self) -> bool {
        self.addr.is_valid() && self.ports.lo >= 1 && self.ports.lo <= self.ports.hi
    }
}

impl fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.accept { "accept" } else { "reject" };
        let PortRange { lo, hi } = self.ports;
        if (lo, hi) == (1, u16::MAX) {
            write!(f, "{verb} {}:*", self.addr)
        } else if lo == hi {
            write!(f, "{verb} {}:{lo}", self.addr)
        } else {
            write!(f, "{verb} {}:{lo}-{hi}", self.addr)
        }
    }
}

fn parse_ports(s: &str) -> Option<PortRange> {
    let s = s.trim();
    if s == "*" {
        return Some(PortRange {
            lo: 1,
            hi: u16::MAX,
        });
    }
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => {
            let p = s.parse().ok()?;
            (p, p)
        }
    };
    (lo >= 1 && lo <= hi).then_some(PortRange { lo, hi })
}

fn parse_addr(s: &str) -> Option<AddrPattern> {
    let s = s.trim();
    match s {
        "*" => return Some(AddrPattern::Any),
        "*4" => return Some(AddrPattern::V4([0; 4], 0)),
        "*6" => return Some(AddrPattern::V6([0; 16], 0)),
        _ => {}
    }
    let (net, bits) = match s.rsplit_once('/') {
        Some((n, b)) if !n.ends_with(':') => (n, Some(b.parse::<u8>().ok()?)),
        _ => (s, None),
    };
    let pat = if let Some(v6) = net.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        let a: std::net::Ipv6Addr = v6.parse().ok()?;
        AddrPattern::V6(a.octets(), bits.unwrap_or(128))
    } else {
        let a: std::net::Ipv4Addr = net.parse().ok()?;
        AddrPattern::V4(a.octets(), bits.unwrap_or(32))
    };
    pat.is_valid().then_some(pat)
}

/// The port summary of a full policy: the ports it accepts for most IPv4 destinations, which is
/// what a client choosing an exit reads (Tor's policy summary, in spirit). For each port, the
/// rules that cover it are read in order, keeping only accept rules for every IPv4 address (`*`,
/// `*4`) and reject rules for `*` or an IPv4 network of prefix /0 to /7: an accept for one
/// network does not make the port usable for most destinations, and a reject of a smaller
/// network leaves it usable for most (a client sent there gets END EXITPOLICY and tries another
/// exit). The first rule kept decides; a port no rule decides is rejected. Sorted, merged ranges.
pub fn summarize(rules: &[PolicyRule]) -> Vec<PortRange> {
    // Every port boundary of every rule splits 1..=65535 into segments decided alike.
    let mut cuts: Vec<u32> = vec![1, 65536];
    for r in rules {
        cuts.push(u32::from(r.ports.lo));
        cuts.push(u32::from(r.ports.hi) + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut ranges = Vec::new();
    for w in cuts.windows(2) {
        let (Some(&lo), Some(&next)) = (w.first(), w.get(1)) else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u16::try_from(lo), u16::try_from(next - 1)) else {
            continue;
        };
        let decided = rules.iter().find(|r| {
            r.ports.contains(lo)
                && match r.addr {
                    AddrPattern::Any => true,
                    AddrPattern::V4(_, bits) => bits == 0 || !r.accept && bits < 8,
                    AddrPattern::V6(..) => false,
                }
        });
        if decided.is_some_and(|r| r.accept) {
            ranges.push(PortRange { lo, hi });
        }
    }
    ExitPolicy::from_ranges(ranges, false).accept
}

impl ExitPolicy {
    /// The policy of a non-exit.
    pub fn reject_all() -> Self {
        Self::default()
    }
    /// Accept every port.
    pub fn accept_all() -> Self {
        Self {
            accept: vec![PortRange { lo: 1, hi: 65535 }],
            allow_private: false,
            rules: Vec::new(),
        }
    }
    /// Build a normalised policy from arbitrary ranges (sorted, merged; invalid ranges dropped).
    pub fn from_ranges(ranges: impl IntoIterator<Item = PortRange>, allow_private: bool) -> Self {
        let mut v: Vec<PortRange> = ranges
            .into_iter()
            .filter(|r| r.lo >= 1 && r.lo <= r.hi)
            .collect();
        v.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(r.hi);
                }
                _ => out.push(r),
            }
        }
        Self {
            accept: out,
            allow_private,
            rules: Vec::new(),
        }
    }
    /// A policy from full rules: the summary computed by [`summarize`], the rules kept.
    pub fn from_rules(rules: Vec<PolicyRule>, allow_private: bool) -> Self {
        Self {
            accept: summarize(&rules),
            allow_private,
            rules,
        }
    }
    /// Whether the full policy (the rules if any, else the port summary) accepts `ip:port`.
    /// Address classes (private, reserved) are judged separately, by [`crate::addr`].
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        if self.rules.is_empty() {
            return self.allows_port(port);
        }
        self.rules
            .iter()
            .find(|r| r.matches(ip, port))
            .is_some_and(|r| r.accept)
    }
    /// The same policy without its full rules (what a consensus carries).
    pub fn summary_only(&self) -> Self {
        Self {
            accept: self.accept.clone(),
            allow_private: self.allow_private,
            rules: Vec::new(),
        }
    }
    /// Whether the relay exits to `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.accept.iter().any(|r| r.contains(port))
    }
    /// Whether it accepts no port at all.
    pub fn is_reject_all(&self) -> bool {
        self.accept.is_empty()
    }
    /// Check the normal form.
    pub(crate) fn check(&self, object: &'static str) -> Result<()> {
        if self.accept.len() > MAX_PORT_RANGES {
            return Err(DirError::invalid(object, "too many exit port ranges"));
        }
        let normal = Self::from_ranges(self.accept.iter().copied(), self.allow_private);
        if normal.accept != self.accept {
            return Err(DirError::invalid(
                object,
                "exit policy ranges must be sorted, merged, with 1 <= lo <= hi",
            ));
        }
        if self.rules.len() > MAX_POLICY_RULES {
            return Err(DirError::invalid(object, "too many exit policy rules"));
        }
        if !self.rules.iter().all(PolicyRule::is_valid) {
            return Err(DirError::invalid(
                object,
                "exit policy rule with a bad prefix, host bits set, or a bad port range",
            ));
        }
        if !self.rules.is_empty() && summarize(&self.rules) != self.accept {
            return Err(DirError::invalid(
                object,
                "exit policy port summary does not match its rules",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ExitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.accept.is_empty() {
            return f.write_str("reject *");
        }
        f.write_str("accept ")?;
        for (i, r) in self.accept.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.lo == r.hi {
                write!(f, "{}", r.lo)?;
            } else {
                write!(f, "{}-{}", r.lo, r.hi)?;
            }
        }
        if self.allow_private {
            f.write_str(" (private allowed)")?;
        }
        Ok(())
    }
}

/// Relay flags as a bit set (`u16`). Unknown bits are kept, so newer authorities can add flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flags(pub u16);

impl Flags {
    /// Reachable by the authority's link handshake.
    pub const RUNNING: Self = Self(1 << 0);
    /// A well-formed, acceptable descriptor.
    pub const VALID: Self = Self(1 << 1);
    /// Enough bandwidth for general use.
    pub const FAST: Self = Self(1 << 2);
    /// Long enough uptime for long-lived streams.
    pub const STABLE: Self = Self(1 << 3);
    /// Suitable as an entry guard.
    pub const GUARD: Self = Self(1 << 4);
    /// Exits to common ports.
    pub const EXIT: Self = Self(1 << 5);
    /// Known to misbehave as an exit: never use it as one.
    pub const BAD_EXIT: Self = Self(1 << 6);
    /// Suitable as an onion-service directory (Fast, Stable and up long enough).
    pub const HSDIR: Self = Self(1 << 7);

    /// Every flag with its name, in bit order.
    pub const ALL: [(Self, &'static str); 8] = [
        (Self::RUNNING, "Running"),
        (Self::VALID, "Valid"),
        (Self::FAST, "Fast"),
        (Self::STABLE, "Stable"),
        (Self::GUARD, "Guard"),
        (Self::EXIT, "Exit"),
        (Self::BAD_EXIT, "BadExit"),
        (Self::HSDIR, "HSDir"),
    ];

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// Whether all flags in `other` are set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Set or clear `other`.
    pub fn set(&mut self, other: Self, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }
    /// Union.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// Names of the set flags.
    pub fn names(self) -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|(fl, _)| self.contains(*fl))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({})", self.names().join(" "))
    }
}
impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(lines: &[&str]) -> Vec<PolicyRule> {
        lines
            .iter()
            .map(|l| PolicyRule::parse(l).unwrap())
            .collect()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_print_and_match() {
        for text in [
            "accept 1.2.3.0/24:80",
            "reject *:25",
            "accept [2001:db8::]/32:443-444",
            "reject *6:*",
            "accept *4:80",
            "accept 9.9.9.9:53",
            "reject [::1]:*",
        ] {
            let r = PolicyRule::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r = PolicyRule::parse("accept 1.2.3.0/24:80").unwrap();
        assert!(r.matches(ip("1.2.3.77"), 80));
        assert!(r.matches(ip("::ffff:1.2.3.77"), 80), "IPv4-mapped");
        assert!(!r.matches(ip("1.2.4.1"), 80));
        assert!(!r.matches(ip("1.2.3.77"), 81));
        let r = PolicyRule::parse("accept [2001:db8::]/33:443").unwrap();
        assert!(r.matches(ip("2001:db8:7fff::1"), 443));
        assert!(!r.matches(ip("2001:db8:8000::1"), 443));
        assert!(!r.matches(ip("1.2.3.4"), 443));
        for bad in [
            "accept 1.2.3.1/24:80",
            "accept 1.2.3.0/33:80",
            "allow *:80",
            "accept *:0",
            "accept *:90-80",
            "accept 1.2.3.4",
            "accept [::1]/129:80",
            "reject 2001:db8:::80",
            "accept",
        ] {
            assert!(PolicyRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summary_keeps_ports_open_for_most_destinations() {
        let p = ExitPolicy::from_rules(
            rules(&[
                "reject 10.0.0.0/8:*",
                "reject 1.2.3.0/24:80",
                "accept 5.6.7.0/24:22",
                "reject *:25",
                "reject 0.0.0.0/1:8080",
                "accept *:80",
                "accept *:8080",
                "accept *4:443",
                "accept *6:993",
            ]),
            false,
        );
        assert_eq!(
            p.accept,
            vec![PortRange::single(80), PortRange::single(443)],
            "a /24 reject leaves 80; an accept for one /24 adds nothing; a /1 reject removes 8080"
        );
        p.check("test").unwrap();
        assert!(p.allows(ip("8.8.8.8"), 80));
        assert!(!p.allows(ip("1.2.3.4"), 80));
        assert!(p.allows(ip("5.6.7.8"), 22));
        assert!(!p.allows(ip("8.8.8.8"), 22));
        assert!(!p.allows(ip("8.8.8.8"), 25));
        assert!(!p.allows(ip("1.1.1.1"), 8080), "in 0.0.0.0/1");
        assert!(p.allows(ip("200.1.1.1"), 8080));
        assert!(p.allows(ip("2001:db8::1"), 993));
        assert!(!p.allows(ip("8.8.8.8"), 993));
        // A mismatched summary, host bits or too many rules are rejected.
        let mut bad = p.clone();
        bad.accept.push(PortRange::single(9999));
        assert!(bad.check("test").is_err());
        let mut bad = p.clone();
        bad.rules.push(PolicyRule {
            accept: true,
            addr: AddrPattern::V4([1, 2, 3, 4], 8),
            ports: PortRange::single(7),
        });
        assert!(bad.check("test").is_err());
        let many = vec![PolicyRule::parse("reject 1.0.0.0/8:*").unwrap(); MAX_POLICY_RULES + 1];
        assert!(ExitPolicy::from_rules(many, false).check("test").is_err());
        // Without rules the summary is the policy.
        let ports = ExitPolicy::from_ranges([PortRange::single(80)], false);
        assert!(ports.allows(ip("1.2.3.4"), 80) && !ports.allows(ip("1.2.3.4"), 81));
        assert_eq!(ports.summary_only(), ports);
        assert!(p.summary_only().rules.is_empty());
    }

    #[test]
    fn rule_wire_form_is_byte_exact() {
        // accept(1) ‖ V4 variant(1) ‖ 1.2.3.0 ‖ prefix 24 ‖ lo 80 ‖ hi 80
        let r = PolicyRule::parse("accept 1.2.3.0/24:80").unwrap();
        assert_eq!(
            postcard::to_allocvec(&r).unwrap(),
            [1, 1, 1, 2, 3, 0, 24, 80, 80]
        );
        // reject(0) ‖ Any(0) ‖ lo 25 ‖ hi 25
        let r = PolicyRule::parse("reject *:25").unwrap();
        assert_eq!(postcard::to_allocvec(&r).unwrap(), [0, 0, 25, 25]);
        // accept ‖ V6(2) ‖ 16 bytes ‖ 32 ‖ lo 443 (varint bb 03) ‖ hi 65535 (ff ff 03)
        let r = PolicyRule::parse("accept [2001:db8::]/32:443-65535").unwrap();
        let mut want = vec![1, 2, 0x20, 0x01, 0x0d, 0xb8];
        want.extend([0; 12]);
        want.extend([32, 0xbb, 0x03, 0xff, 0xff, 0x03]);
        assert_eq!(postcard::to_allocvec(&r).unwrap(), want);
    }
}
