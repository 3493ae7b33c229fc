//! The one classifier of IP addresses: which are globally usable, which are internal to a host
//! or site, and which are never a valid peer or destination.
//!
//! Two callers apply it, each with its own switch (docs/protocol/80-directory.md and
//! 91-relay.md):
//! - the authority, on every address of an uploaded relay descriptor: [`AddrClass::Public`]
//!   accepted, [`AddrClass::Internal`] accepted only with `allow_private_addresses` (test
//!   networks), [`AddrClass::Reserved`] always refused;
//! - the exit (`allium_relay::ExitPolicy`), on every address it would connect to:
//!   [`AddrClass::Public`] allowed, [`AddrClass::Internal`] only with `exit_policy.allow_private`,
//!   [`AddrClass::Reserved`] never.
//!
//! The internal set follows Tor's `tor_addr_is_internal` (RFC 1918, loopback, link-local,
//! shared 100.64/10, IPv6 unique-local and site-local). Addresses that can never name a host on
//! the Internet (unspecified, "this network" 0/8, multicast, broadcast and 240/4, the
//! documentation ranges, deprecated IPv4-compatible IPv6) are reserved. An IPv4 address carried
//! in IPv6 (IPv4-mapped `::ffff:0:0/96`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`) is classified
//! by its IPv4 address, so that no internal address is reachable under an IPv6 disguise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address an IP address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// Globally routable: always usable.
    Public,
    /// Private (RFC 1918, unique-local, site-local), loopback, link-local or shared address
    /// space (100.64/10): usable only where a test network allows it.
    Internal,
    /// Unspecified, 0/8, multicast, broadcast, 240/4, documentation or deprecated
    /// IPv4-compatible IPv6: never usable.
    Reserved,
}

/// Classify an address.
pub fn classify(addr: IpAddr) -> AddrClass {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

/// Whether `addr` is not globally usable ([`AddrClass::Internal`] or [`AddrClass::Reserved`]).
pub fn is_internal(addr: IpAddr) -> bool {
    classify(addr) != AddrClass::Public
}

/// Whether `addr` may be used where internal addresses are allowed iff `allow_internal`.
pub fn is_allowed(addr: IpAddr, allow_internal: bool) -> bool {
    match classify(addr) {
        AddrClass::Public => true,
        AddrClass::Internal => allow_internal,
        AddrClass::Reserved => false,
    }
}

/// Classify an IPv4 address.
pub fn classify_v4(a: Ipv4Addr) -> AddrClass {
    let [o0, o1, o2, _] = a.octets();
    let documentation = matches!((o0, o1, o2), (192, 0, 2) | (198, 51, 100) | (203, 0, 113));
    if o0 == 0 || a.is_multicast() || o0 >= 240 || documentation {
        // 0/8 includes the unspecified address; 240/4 includes broadcast.
        AddrClass::Reserved
    } else if a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || (o0 == 100 && (o1 & 0xc0) == 64)
    {
        AddrClass::Internal
    } else {
        AddrClass::Public
    }
}

/// Classify an IPv6 address.
pub fn classify_v6(a: Ipv6Addr) -> AddrClass {
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let [s0, s1, s2, s3, s4, s5, s6, s7] = a.segments();
    let embedded = |hi: u16, lo: u16| {
        let [b0, b1] = hi.to_be_bytes();
        let [b2, b3] = lo.to_be_bytes();
        Ipv4Addr::new(b0, b1, b2, b3)
    };
    if a.is_loopback() {
        AddrClass::Internal
    } else if [s0, s1, s2, s3, s4, s5] == [0; 6] {
        // The unspecified address and the deprecated IPv4-compatible ::/96.
        AddrClass::Reserved
    } else if a.is_multicast() || (s0 == 0x2001 && s1 == 0x0db8) {
        // ff00::/8 and the documentation prefix 2001:db8::/32.
        AddrClass::Reserved
    } else if (s0 & 0xfe00) == 0xfc00 || (s0 & 0xffc0) == 0xfe80 || (s0 & 0xffc0) == 0xfec0 {
        // Unique-local fc00::/7, link-local fe80::/10, deprecated site-local fec0::/10.
        AddrClass::Internal
    } else if s0 == 0x2002 {
        // 6to4: judge the embedded IPv4 address.
        classify_v4(embedded(s1, s2))
    } else if s0 == 0x0064 && s1 == 0xff9b && [s2, s3, s4, s5] == [0; 4] {
        // NAT64 well-known prefix: judge the embedded IPv4 address.
        classify_v4(embedded(s6, s7))
    } else {
        AddrClass::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row: an address and its class.
    const TABLE: &[(&str, AddrClass)] = &[
        // IPv4 public.
        ("8.8.8.8", AddrClass::Public),
        ("1.1.1.1", AddrClass::Public),
        ("100.63.255.255", AddrClass::Public),
        ("100.128.0.1", AddrClass::Public),
        ("172.15.255.255", AddrClass::Public),
        ("172.32.0.1", AddrClass::Public),
        ("192.0.3.1", AddrClass::Public),
        ("223.255.255.255", AddrClass::Public),
        // IPv4 internal: RFC 1918, loopback, link-local, shared 100.64/10.
        ("10.1.2.3", AddrClass::Internal),
        ("172.16.0.1", AddrClass::Internal),
        ("172.31.255.255", AddrClass::Internal),
        ("192.168.1.1", AddrClass::Internal),
        ("127.0.0.1", AddrClass::Internal),
        ("127.255.0.9", AddrClass::Internal),
        ("169.254.1.1", AddrClass::Internal),
        ("100.64.0.1", AddrClass::Internal),
        ("100.127.255.255", AddrClass::Internal),
        // IPv4 reserved: 0/8, multicast, 240/4, broadcast, documentation.
        ("0.0.0.0", AddrClass::Reserved),
        ("0.1.2.3", AddrClass::Reserved),
        ("224.0.0.1", AddrClass::Reserved),
        ("239.255.255.255", AddrClass::Reserved),
        ("240.0.0.1", AddrClass::Reserved),
        ("255.255.255.255", AddrClass::Reserved),
        ("192.0.2.1", AddrClass::Reserved),
        ("198.51.100.7", AddrClass::Reserved),
        ("203.0.113.200", AddrClass::Reserved),
        // IPv6 public.
        ("2001:4860:4860::8888", AddrClass::Public),
        ("2a00:1450::1", AddrClass::Public),
        ("2002:0808:0808::1", AddrClass::Public),
        ("64:ff9b::808:808", AddrClass::Public),
        ("64:ff9b:1::7f00:1", AddrClass::Public),
        // IPv6 internal: loopback, unique-local, link-local, site-local.
        ("::1", AddrClass::Internal),
        ("fc00::1", AddrClass::Internal),
        ("fd12:3456::1", AddrClass::Internal),
        ("fe80::1", AddrClass::Internal),
        ("febf::1", AddrClass::Internal),
        ("fec0::1", AddrClass::Internal),
        // IPv6 reserved: unspecified, IPv4-compatible, multicast, documentation.
        ("::", AddrClass::Reserved),
        ("::7f00:1", AddrClass::Reserved),
        ("::8.8.8.8", AddrClass::Reserved),
        ("ff02::1", AddrClass::Reserved),
        ("ff0e::1", AddrClass::Reserved),
        ("2001:db8::1", AddrClass::Reserved),
        // IPv4 inside IPv6: classified by the IPv4 address.
        ("::ffff:8.8.8.8", AddrClass::Public),
        ("::ffff:127.0.0.1", AddrClass::Internal),
        ("::ffff:192.168.0.1", AddrClass::Internal),
        ("::ffff:100.64.0.1", AddrClass::Internal),
        ("::ffff:0.0.0.0", AddrClass::Reserved),
        ("::ffff:224.0.0.1", AddrClass::Reserved),
        ("2002:c0a8:0101::1", AddrClass::Internal),
        ("2002:7f00:1::", AddrClass::Internal),
        ("64:ff9b::7f00:1", AddrClass::Internal),
        ("64:ff9b::a00:1", AddrClass::Internal),
        ("64:ff9b::e000:1", AddrClass::Reserved),
    ];

    #[test]
    fn classification_table() {
        for (s, want) in TABLE {
            let ip: IpAddr = s.parse().expect("address in table");
            assert_eq!(classify(ip), *want, "{s}");
            assert_eq!(is_internal(ip), *want != AddrClass::Public, "{s}");
        }
    }

    #[test]
    fn allowed_follows_the_switch() {
        for (s, class) in TABLE {
            let ip: IpAddr = s.parse().expect("address in table");
            assert_eq!(is_allowed(ip, false), *class == AddrClass::Public, "{s}");
            assert_eq!(is_allowed(ip, true), *class != AddrClass::Reserved, "{s}");
        }
    }
}
