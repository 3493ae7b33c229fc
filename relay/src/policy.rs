//! Exit policy: which destination ports an exit connects to, and which addresses it never connects to.
//!
//! Semantics (docs/protocol/91-relay.md):
//! - `accept` lists port ranges; a relay with no ranges is not an exit and refuses every BEGIN.
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

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::err::RelayError;

/// The relay's exit policy, as written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitPolicy {
    /// Accepted destination ports: `"80"`, `"6660-6669"` or `"*"` (all). Empty: not an exit.
    #[serde(default)]
    pub accept: Vec<String>,
    /// Allow private, loopback and link-local destinations (test networks only).
    #[serde(default)]
    pub allow_private: bool,
    /// Refuse the relay's own addresses on every port (Tor's `ExitPolicyRejectMyAddresses`).
    /// Default: on.
    #[serde(default = "default_true")]
    pub reject_my_addresses: bool,
    /// The relay's own addresses, filled in at start ([`ExitPolicy::with_my_addresses`]).
    #[serde(skip)]
    pub my_addresses: Vec<IpAddr>,
}

fn default_true() -> bool {
    true
}

impl Default for ExitPolicy {
    /// Not an exit; private destinations refused; own addresses refused.
    fn default() -> Self {
        Self {
            accept: Vec::new(),
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
            allow_private,
            reject_my_addresses: !allow_private,
            my_addresses: Vec::new(),
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

    /// Check that every range parses.
    pub fn validate(&self) -> Result<(), RelayError> {
        for r in &self.accept {
            if parse_range(r).is_none() {
                return Err(RelayError::ConfigInvalid {
                    key: "exit_policy.accept",
                    why: format!("`{r}` is not a port (1-65535), a range `lo-hi` or `*`"),
                });
            }
        }
        Ok(())
    }

    /// The accepted port ranges, merged and sorted (what the descriptor publishes).
    pub fn port_ranges(&self) -> Vec<(u16, u16)> {
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

    /// Whether this relay is an exit at all.
    pub fn is_exit(&self) -> bool {
        !self.port_ranges().is_empty()
    }

    /// Whether `port` is accepted.
    pub fn port_allowed(&self, port: u16) -> bool {
        self.accept
            .iter()
            .filter_map(|s| parse_range(s))
            .any(|(lo, hi)| lo <= port && port <= hi)
    }

    /// Whether a connection to `addr:port` is allowed.
    pub fn check(&self, addr: IpAddr, port: u16) -> Result<(), Refusal> {
        if !self.port_allowed(port) {
            return Err(Refusal::Port);
        }
        self.check_addr(addr)
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
