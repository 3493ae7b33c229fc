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

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::err::RelayError;

/// The relay's exit policy, as written in the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitPolicy {
    /// Accepted destination ports: `"80"`, `"6660-6669"` or `"*"` (all). Empty: not an exit.
    #[serde(default)]
    pub accept: Vec<String>,
    /// Allow private, loopback and link-local destinations (test networks only).
    #[serde(default)]
    pub allow_private: bool,
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
    pub fn accept_all(allow_private: bool) -> Self {
        Self {
            accept: vec!["*".to_owned()],
            allow_private,
        }
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
        if allium_directory::addr::is_allowed(addr, self.allow_private) {
            Ok(())
        } else {
            Err(Refusal::Address)
        }
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
        };
        assert_eq!(web.check(ip("8.8.8.8"), 22), Err(Refusal::Port));
        assert_eq!(web.check(ip("8.8.8.8"), 443), Ok(()));
    }
}
