//! Exit policy: which destination ports an exit connects to, and which addresses it never connects to.
//!
//! Semantics (docs/protocol/91-relay.md):
//! - `rules` lists Tor-style address-and-port rules (`accept 1.2.3.0/24:80`, `reject *:25`),
//!   read first, first match wins; `accept` lists port ranges, each read as `accept *:PORTS`
//!   after the rules; what no rule matches is refused. A relay that accepts nothing is not an
//!   exit and refuses every BEGIN. `exit_policy = "reduced"` is Tor's ReducedExitPolicy
//!   ([`REDUCED_PORTS`]). The descriptor carries the port summary
//!   ([`allium_directory::doc::policy::summarize`]) and, when there are address rules, the
//!   rules themselves.
//! - Every address a host name resolves to is checked; the connection is made only to allowed ones.
//! - Addresses are classified by the one classifier the authority uses too,
//!   [`allium_directory::addr::classify`]: [`AddrClass::Reserved`] (unspecified, 0/8, multicast,
//!   broadcast, 240/4, documentation ranges) is always refused; [`AddrClass::Internal`] (RFC 1918,
//!   unique-local, loopback, link-local, shared 100.64/10) is refused unless `allow_private` is
//!   set, which only a test network should do; IPv4 inside IPv6 is judged by its IPv4 address.
//! - The relay's own addresses (advertised and listening) are refused on every port when
//!   `reject_my_addresses` is set (the default; Tor's `ExitPolicyRejectMyAddresses`), so that a
//!   client cannot reach services bound to the exit's host, its own listener included. Only the
//!   test-network preset [`ExitPolicy::accept_all`]`(true)` turns it off, since there every relay
//!   and every destination share 127.0.0.1.

use std::fmt;
use std::net::IpAddr;

use allium_directory::doc::policy::{
    AddrPattern, ExitPolicy as DescPolicy, MAX_POLICY_RULES, PolicyRule, PortRange, summarize,
};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::err::RelayError;

/// Tor's ReducedExitPolicy: the ports of common services (web, mail submission and retrieval,
/// IRC, XMPP, SSH, DNS, VPNs, version control, ...), without SMTP 25 and the file-sharing
/// ports. `exit_policy = "reduced"` accepts them on every address.
pub const REDUCED_PORTS: &[&str] = &[
    "20-23",
    "43",
    "53",
    "79-81",
    "88",
    "110",
    "143",
    "194",
    "220",
    "389",
    "443",
    "464-465",
    "531",
    "543-544",
    "554",
    "563",
    "587",
    "636",
    "706",
    "749",
    "853",
    "873",
    "902-904",
    "981",
    "989-995",
    "1194",
    "1220",
    "1293",
    "1500",
    "1533",
    "1677",
    "1723",
    "1755",
    "1863",
    "2082-2083",
    "2086-2087",
    "2095-2096",
    "2102-2104",
    "3128",
    "3389",
    "3690",
    "4321",
    "4643",
    "5050",
    "5190",
    "5222-5223",
    "5228",
    "5900",
    "6660-6669",
    "6679",
    "6697",
    "8000",
    "8008",
    "8074",
    "8080",
    "8082",
    "8087-8088",
    "8232-8233",
    "8332-8333",
    "8443",
    "8888",
    "9418",
    "9999-10000",
    "11371",
    "19294",
    "19638",
    "50002",
    "64738",
];

/// The relay's exit policy, as written in the config file: a table, or a preset name
/// (`exit_policy = "reduced"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExitPolicy {
    /// Accepted destination ports: `"80"`, `"6660-6669"` or `"*"` (all), each read as the rule
    /// `accept *:PORTS` after `rules`.
    pub accept: Vec<String>,
    /// Address-and-port rules read before `accept`, first match wins (Tor's syntax:
    /// `accept 1.2.3.0/24:80`, `reject *:25`, `accept [2001:db8::]/32:443`, `reject *6:*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// Allow private, loopback and link-local destinations (test networks only).
    pub allow_private: bool,
    /// Refuse the relay's own addresses on every port (Tor's `ExitPolicyRejectMyAddresses`).
    /// Default: on.
    pub reject_my_addresses: bool,
    /// The relay's own addresses, filled in at start ([`ExitPolicy::with_my_addresses`]).
    #[serde(skip)]
    pub my_addresses: Vec<IpAddr>,
}

fn default_true() -> bool {
    true
}

/// The table form of the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyTable {
    #[serde(default)]
    accept: Vec<String>,
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    allow_private: bool,
    #[serde(default = "default_true")]
    reject_my_addresses: bool,
}

impl<'de> Deserialize<'de> for ExitPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExitPolicy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a table (accept, rules, allow_private, reject_my_addresses) or a preset name",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExitPolicy, E> {
                ExitPolicy::preset(v).ok_or_else(|| {
                    E::custom(format!(
                        "unknown exit_policy preset `{v}`: use \"reduced\" (Tor's \
                         ReducedExitPolicy), \"reject\" (not an exit), or a table"
                    ))
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<ExitPolicy, A::Error> {
                let t = PolicyTable::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(ExitPolicy {
                    accept: t.accept,
                    rules: t.rules,
                    allow_private: t.allow_private,
                    reject_my_addresses: t.reject_my_addresses,
                    my_addresses: Vec::new(),
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for ExitPolicy {
    /// Not an exit; private destinations refused; own addresses refused.
    fn default() -> Self {
        Self {
            accept: Vec::new(),
            rules: Vec::new(),
            allow_private: false,
            reject_my_addresses: true,
            my_addresses: Vec::new(),
        }
    }
}

/// Why a destination was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The port is not accepted.
    Port,
    /// The address is of a refused kind.
    Address,
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let s = s.trim();
    if s == "*" {
        return Some((1, u16::MAX));
    }
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let p = s.parse().ok()?;
            (p, p)
        }
    };
    (lo >= 1 && lo <= hi).then_some((lo, hi))
}

impl ExitPolicy {
    /// A policy accepting every port; `allow_private` as given (test networks use `true`).
    ///
    /// `accept_all(true)` is the test-network preset: it also turns `reject_my_addresses` off,
    /// since a test network's relays and destinations share one loopback address.
    pub fn accept_all(allow_private: bool) -> Self {
        Self {
            accept: vec!["*".to_owned()],
            rules: Vec::new(),
            allow_private,
            reject_my_addresses: !allow_private,
            my_addresses: Vec::new(),
        }
    }

    /// Tor's ReducedExitPolicy ([`REDUCED_PORTS`] on every address; private destinations and
    /// the relay's own addresses refused).
    pub fn reduced() -> Self {
        Self {
            accept: REDUCED_PORTS.iter().map(|&p| p.to_owned()).collect(),
            ..Self::default()
        }
    }

    /// The policy a preset name stands for: `reduced`, or `reject` (not an exit).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "reduced" => Some(Self::reduced()),
            "reject" => Some(Self::default()),
            _ => None,
        }
    }

    /// The whole policy as rules: `rules`, then `accept *:PORTS` for each `accept` entry
    /// (entries that do not parse are skipped; [`ExitPolicy::validate`] refuses them).
    pub fn full_rules(&self) -> Vec<PolicyRule> {
        let mut v: Vec<PolicyRule> = self
            .rules
            .iter()
            .filter_map(|r| PolicyRule::parse(r).ok())
            .collect();
        v.extend(
            self.accept
                .iter()
                .filter_map(|s| parse_range(s))
                .map(|(lo, hi)| PolicyRule {
                    accept: true,
                    addr: AddrPattern::Any,
                    ports: PortRange { lo, hi },
                }),
        );
        v
    }

    /// What the descriptor publishes: the port summary, with the full rules when the policy
    /// has address rules.
    pub fn descriptor_policy(&self) -> DescPolicy {
        if self.rules.is_empty() {
            DescPolicy::from_ranges(
                self.port_ranges()
                    .into_iter()
                    .map(|(lo, hi)| PortRange { lo, hi }),
                self.allow_private,
            )
        } else {
            DescPolicy::from_rules(self.full_rules(), self.allow_private)
        }
    }

    /// This policy, knowing the relay's own addresses (unspecified ones are skipped; refused
    /// anyway). They are refused when `reject_my_addresses` is set.
    pub fn with_my_addresses(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        for a in addrs {
            let a = canonical(a);
            if !a.is_unspecified() && !self.my_addresses.contains(&a) {
                self.my_addresses.push(a);
            }
        }
        self
    }

    /// Whether `addr` is one of the relay's own addresses (IPv4-mapped forms included).
    pub fn is_my_address(&self, addr: IpAddr) -> bool {
        self.my_addresses.contains(&canonical(addr))
    }

    /// Check that every range and rule parses, and that the descriptor can carry them.
    pub fn validate(&self) -> Result<(), RelayError> {
        for r in &self.accept {
            if parse_range(r).is_none() {
                return Err(RelayError::ConfigInvalid {
                    key: "exit_policy.accept",
                    why: format!("`{r}` is not a port (1-65535), a range `lo-hi` or `*`"),
                });
            }
        }
        for r in &self.rules {
            PolicyRule::parse(r).map_err(|why| RelayError::ConfigInvalid {
                key: "exit_policy.rules",
                why,
            })?;
        }
        if !self.rules.is_empty() && self.rules.len() + self.accept.len() > MAX_POLICY_RULES {
            return Err(RelayError::ConfigInvalid {
                key: "exit_policy.rules",
                why: format!(
                    "at most {MAX_POLICY_RULES} rules and accept entries together (a descriptor \
                     carries no more)"
                ),
            });
        }
        Ok(())
    }

    /// The accepted port ranges for most destinations, merged and sorted (the summary the
    /// descriptor publishes and clients choose exits by).
    pub fn port_ranges(&self) -> Vec<(u16, u16)> {
        if !self.rules.is_empty() {
            return summarize(&self.full_rules())
                .into_iter()
                .map(|r| (r.lo, r.hi))
                .collect();
        }
        let mut v: Vec<(u16, u16)> = self.accept.iter().filter_map(|s| parse_range(s)).collect();
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        out
    }

    /// Whether this relay is an exit at all (it accepts some port on some address).
    pub fn is_exit(&self) -> bool {
        if self.rules.is_empty() {
            return !self.port_ranges().is_empty();
        }
        self.full_rules().iter().any(|r| r.accept)
    }

    /// Whether `port` may be accepted for some destination (checked before a host name is
    /// resolved): some accept rule covers it before a `reject *` rule for it.
    pub fn port_allowed(&self, port: u16) -> bool {
        if self.rules.is_empty() {
            return self
                .accept
                .iter()
                .filter_map(|s| parse_range(s))
                .any(|(lo, hi)| lo <= port && port <= hi);
        }
        for r in self.full_rules().iter().filter(|r| r.ports.contains(port)) {
            if r.accept {
                return true;
            }
            if r.addr == AddrPattern::Any {
                return false;
            }
        }
        false
    }

    /// Whether a connection to `addr:port` is allowed: the port, the address classes and own
    /// addresses, then the first matching rule.
    pub fn check(&self, addr: IpAddr, port: u16) -> Result<(), Refusal> {
        if !self.port_allowed(port) {
            return Err(Refusal::Port);
        }
        self.check_addr(addr)?;
        if self.rules.is_empty() {
            return Ok(());
        }
        match self.full_rules().iter().find(|r| r.matches(addr, port)) {
            Some(r) if r.accept => Ok(()),
            _ => Err(Refusal::Address),
        }
    }

    /// Whether `addr` is an allowed destination (ignoring ports).
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), Refusal> {
        if self.reject_my_addresses && self.is_my_address(addr) {
            return Err(Refusal::Address);
        }
        if allium_directory::addr::is_allowed(addr, self.allow_private) {
            Ok(())
        } else {
            Err(Refusal::Address)
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into its IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

pub use allium_directory::addr::{AddrClass, classify};

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_merge() {
        let p = ExitPolicy {
            accept: vec!["443".into(), "80".into(), "81-90".into(), "100-200".into()],
            allow_private: false,
            ..ExitPolicy::default()
        };
        p.validate().unwrap();
        assert_eq!(p.port_ranges(), vec![(80, 90), (100, 200), (443, 443)]);
        assert!(p.port_allowed(85));
        assert!(!p.port_allowed(91));
        assert!(p.port_allowed(443));
        assert!(!p.port_allowed(0));
        for bad in ["0", "90-80", "x", "70000", "", "1-"] {
            let p = ExitPolicy {
                accept: vec![bad.into()],
                allow_private: false,
                ..ExitPolicy::default()
            };
            assert!(p.validate().is_err(), "{bad}");
        }
        assert_eq!(
            ExitPolicy::accept_all(false).port_ranges(),
            vec![(1, 65535)]
        );
        assert!(!ExitPolicy::default().is_exit());
        assert!(!ExitPolicy::default().port_allowed(80));
    }

    #[test]
    fn check_honours_allow_private() {
        let strict = ExitPolicy::accept_all(false);
        let test = ExitPolicy::accept_all(true);
        assert_eq!(strict.check(ip("127.0.0.1"), 80), Err(Refusal::Address));
        assert_eq!(test.check(ip("127.0.0.1"), 80), Ok(()));
        assert_eq!(test.check(ip("0.0.0.0"), 80), Err(Refusal::Address));
        assert_eq!(test.check(ip("224.0.0.1"), 80), Err(Refusal::Address));
        assert_eq!(test.check(ip("192.0.2.1"), 80), Err(Refusal::Address));
        assert_eq!(
            strict.check(ip("::ffff:10.0.0.1"), 80),
            Err(Refusal::Address)
        );
        assert_eq!(test.check(ip("::ffff:10.0.0.1"), 80), Ok(()));
        assert_eq!(
            strict.check(ip("64:ff9b::7f00:1"), 80),
            Err(Refusal::Address)
        );
        assert_eq!(strict.check(ip("2001:4860:4860::8888"), 80), Ok(()));
        assert_eq!(strict.check(ip("8.8.8.8"), 53), Ok(()));
        let web = ExitPolicy {
            accept: vec!["80".into(), "443".into()],
            allow_private: false,
            ..ExitPolicy::default()
        };
        assert_eq!(web.check(ip("8.8.8.8"), 22), Err(Refusal::Port));
        assert_eq!(web.check(ip("8.8.8.8"), 443), Ok(()));
    }

    #[test]
    fn address_rules_are_enforced_first_match() {
        let p = ExitPolicy {
            rules: vec![
                "reject 1.2.3.0/24:*".into(),
                "accept 5.6.7.0/24:22".into(),
                "reject *:25".into(),
                "accept [2a00:1450::]/32:993".into(),
            ],
            accept: vec!["80".into(), "443".into(), "25".into()],
            ..ExitPolicy::default()
        };
        p.validate().unwrap();
        assert!(p.is_exit());
        assert_eq!(p.check(ip("8.8.8.8"), 80), Ok(()));
        assert_eq!(p.check(ip("1.2.3.4"), 80), Err(Refusal::Address));
        assert_eq!(p.check(ip("::ffff:1.2.3.4"), 443), Err(Refusal::Address));
        assert_eq!(p.check(ip("5.6.7.8"), 22), Ok(()));
        assert_eq!(p.check(ip("8.8.8.8"), 22), Err(Refusal::Address));
        assert!(p.port_allowed(22), "accepted for one network");
        assert!(
            !p.port_allowed(25),
            "`reject *:25` comes before `accept *:25`"
        );
        assert_eq!(p.check(ip("8.8.8.8"), 25), Err(Refusal::Port));
        assert_eq!(p.check(ip("2a00:1450::1"), 993), Ok(()));
        assert_eq!(p.check(ip("2a00:1451::1"), 993), Err(Refusal::Address));
        assert_eq!(p.check(ip("8.8.8.8"), 8080), Err(Refusal::Port));
        // Address classes still apply before the rules.
        assert_eq!(p.check(ip("10.0.0.1"), 80), Err(Refusal::Address));
        // The summary keeps 80 and 443 (a /24 reject leaves them usable), not 22, 25 or 993.
        assert_eq!(p.port_ranges(), vec![(80, 80), (443, 443)]);
        let d = p.descriptor_policy();
        assert_eq!(d.rules.len(), 7);
        assert!(d.allows(ip("5.6.7.8"), 22) && !d.allows(ip("1.2.3.4"), 80));
        // Without rules nothing changes: the descriptor carries the summary only.
        let old = ExitPolicy {
            accept: vec!["80".into()],
            ..ExitPolicy::default()
        };
        assert!(old.descriptor_policy().rules.is_empty());
        let bad = ExitPolicy {
            rules: vec!["accept 1.2.3.4/24:80".into()],
            ..ExitPolicy::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("exit_policy.rules"), "{e}");
    }

    #[test]
    fn reduced_preset_and_old_tables_parse() {
        #[derive(Deserialize)]
        struct Cfg {
            exit_policy: ExitPolicy,
        }
        let c: Cfg = toml::from_str("exit_policy = \"reduced\"").unwrap();
        assert_eq!(c.exit_policy, ExitPolicy::reduced());
        c.exit_policy.validate().unwrap();
        let ports: usize = c
            .exit_policy
            .port_ranges()
            .iter()
            .map(|&(lo, hi)| usize::from(hi - lo) + 1)
            .sum();
        assert_eq!(ports, 102, "Tor's ReducedExitPolicy accepts 102 ports");
        assert_eq!(c.exit_policy.port_ranges().len(), 68);
        for (port, ok) in [
            (80, true),
            (443, true),
            (22, true),
            (6667, true),
            (25, false),
        ] {
            assert_eq!(c.exit_policy.port_allowed(port), ok, "{port}");
        }
        assert!(c.exit_policy.reject_my_addresses && !c.exit_policy.allow_private);
        let d = c.exit_policy.descriptor_policy();
        assert_eq!(d.accept.len(), 68);
        assert!(d.rules.is_empty(), "ports only: the summary is the policy");
        let none: Cfg = toml::from_str("exit_policy = \"reject\"").unwrap();
        assert!(!none.exit_policy.is_exit());
        let e = toml::from_str::<Cfg>("exit_policy = \"open\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("reduced"), "{e}");
        // An old table keeps parsing; unknown keys are still refused.
        let old: Cfg =
            toml::from_str("[exit_policy]\naccept = [\"80\", \"443\"]\nallow_private = true")
                .unwrap();
        assert_eq!(old.exit_policy.port_ranges(), vec![(80, 80), (443, 443)]);
        assert!(old.exit_policy.rules.is_empty() && old.exit_policy.reject_my_addresses);
        assert!(toml::from_str::<Cfg>("[exit_policy]\nacept = [\"80\"]").is_err());
        let with_rules: Cfg =
            toml::from_str("[exit_policy]\nrules = [\"reject *:25\", \"accept *:*\"]").unwrap();
        assert!(with_rules.exit_policy.port_allowed(80));
        assert!(!with_rules.exit_policy.port_allowed(25));
        // Serialising and reading back gives the same policy.
        let text = toml::to_string(&Cfg2 {
            exit_policy: with_rules.exit_policy.clone(),
        })
        .unwrap();
        let back: Cfg = toml::from_str(&text).unwrap();
        assert_eq!(back.exit_policy, with_rules.exit_policy);
    }

    #[derive(Serialize)]
    struct Cfg2 {
        exit_policy: ExitPolicy,
    }

    #[test]
    fn own_addresses_refused_on_every_port() {
        let p = ExitPolicy::accept_all(false).with_my_addresses([
            ip("203.0.114.5"),
            ip("2a01:4f8::5"),
            ip("0.0.0.0"),
        ]);
        assert!(p.reject_my_addresses);
        for port in [1, 80, 443, 9001] {
            assert_eq!(p.check(ip("203.0.114.5"), port), Err(Refusal::Address));
            assert_eq!(
                p.check(ip("::ffff:203.0.114.5"), port),
                Err(Refusal::Address)
            );
            assert_eq!(p.check(ip("2a01:4f8::5"), port), Err(Refusal::Address));
        }
        assert_eq!(p.check(ip("203.0.114.6"), 80), Ok(()));
        assert_eq!(p.check(ip("2a01:4f8::6"), 80), Ok(()));
        // The switch turns it off; the config default is on.
        let off = ExitPolicy {
            reject_my_addresses: false,
            ..p.clone()
        };
        assert_eq!(off.check(ip("203.0.114.5"), 80), Ok(()));
        let parsed: ExitPolicy = toml::from_str("accept = [\"*\"]").unwrap();
        assert!(parsed.reject_my_addresses);
        assert!(ExitPolicy::default().reject_my_addresses);
    }
}
