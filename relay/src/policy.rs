//! Exit policy: which destination ports an exit connects to, and which addresses it never connects to.
//!
//! Semantics (docs/protocol/91-relay.md):
//! - `accept` lists port ranges; a relay with no ranges is not an exit and refuses every BEGIN.
//! - Every address a host name resolves to is checked; the connection is made only to allowed ones.
//! - Unspecified, multicast, broadcast and reserved addresses are always refused. Private (RFC 1918,
//!   ULA), loopback, link-local and shared (100.64/10) addresses are refused unless `allow_private`
//!   is set, which only a test network should do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
        match classify(addr) {
            AddrClass::Public => Ok(()),
            AddrClass::Private if self.allow_private => Ok(()),
            _ => Err(Refusal::Address),
        }
    }
}

/// Kinds of destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrClass {
    /// Globally routable.
    Public,
    /// Private, loopback, link-local, shared address space: allowed only with `allow_private`.
    Private,
    /// Unspecified, multicast, broadcast, reserved: never allowed.
    Never,
}

/// Classify an address.
pub fn classify(addr: IpAddr) -> AddrClass {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> AddrClass {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 || a.is_multicast() || a.is_broadcast() || o[0] >= 240 {
        AddrClass::Never
    } else if a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
    {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

fn classify_v6(a: Ipv6Addr) -> AddrClass {
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = a.segments();
    if a.is_unspecified() || a.is_multicast() {
        AddrClass::Never
    } else if s[0..6] == [0; 6] {
        // ::/96 (IPv4-compatible, deprecated) and ::1: treat by the embedded IPv4 address, except
        // that ::1 is loopback.
        if a.is_loopback() {
            AddrClass::Private
        } else {
            AddrClass::Never
        }
    } else if a.is_loopback() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80 {
        AddrClass::Private
    } else if (s[0] & 0xffc0) == 0xfec0 {
        // Deprecated site-local.
        AddrClass::Private
    } else if s[0] == 0x2002 {
        // 6to4: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        classify_v4(v4)
    } else if s[0] == 0x0064 && s[1] == 0xff9b {
        // NAT64 well-known prefix: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        classify_v4(v4)
    } else {
        AddrClass::Public
    }
}

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
    fn address_classes() {
        for a in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "100.128.0.1"] {
            assert_eq!(classify(ip(a)), AddrClass::Public, "{a}");
        }
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "2002:c0a8:0101::1",
            "64:ff9b::7f00:1",
        ] {
            assert_eq!(classify(ip(a)), AddrClass::Private, "{a}");
        }
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "ff02::1",
            "::ffff:0.0.0.0",
            "::7f00:1",
        ] {
            assert_eq!(classify(ip(a)), AddrClass::Never, "{a}");
        }
    }

    #[test]
    fn check_honours_allow_private() {
        let strict = ExitPolicy::accept_all(false);
        let test = ExitPolicy::accept_all(true);
        assert_eq!(strict.check(ip("127.0.0.1"), 80), Err(Refusal::Address));
        assert_eq!(test.check(ip("127.0.0.1"), 80), Ok(()));
        assert_eq!(test.check(ip("0.0.0.0"), 80), Err(Refusal::Address));
        assert_eq!(test.check(ip("224.0.0.1"), 80), Err(Refusal::Address));
        assert_eq!(strict.check(ip("8.8.8.8"), 53), Ok(()));
        let web = ExitPolicy {
            accept: vec!["80".into(), "443".into()],
            allow_private: false,
        };
        assert_eq!(web.check(ip("8.8.8.8"), 22), Err(Refusal::Port));
        assert_eq!(web.check(ip("8.8.8.8"), 443), Ok(()));
    }
}
