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
//! in IPv6 (IPv4-mapped `::ffff:0:0/96`, IPv4-translated `::ffff:0:0:0/96`, 6to4 `2002::/16`,
//! NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, Teredo `2001::/32` with its inverted client
//! address) is classified by its IPv4 address, so that no internal address is reachable under an
//! IPv6 disguise (see [`classify_v6`]).

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

/// The most restrictive of two classes (`Reserved` over `Internal` over `Public`).
fn stricter(a: AddrClass, b: AddrClass) -> AddrClass {
    let rank = |c: AddrClass| match c {
        AddrClass::Public => 0,
        AddrClass::Internal => 1,
        AddrClass::Reserved => 2,
    };
    if rank(a) >= rank(b) { a } else { b }
}

/// The IPv4 address at bits `bit..bit + 32` of `a`, skipping the RFC 6052 "u" octet (bits
/// 64..72) when the range crosses it.
fn rfc6052_v4(a: Ipv6Addr, prefix_bits: u32) -> Ipv4Addr {
    let v = u128::from(a);
    let take = |start: u32, len: u32| -> u32 {
        // Bits numbered from the most significant (bit 0) of the address.
        let shifted = v >> (128 - start - len);
        (shifted & ((1u128 << len) - 1)) as u32
    };
    let raw = match prefix_bits {
        // /48: 16 bits before "u", 16 after.
        48 => (take(48, 16) << 16) | take(72, 16),
        // /56: 8 bits before "u", 24 after.
        56 => (take(56, 8) << 24) | take(72, 24),
        // /64: all 32 after "u".
        64 => take(72, 32),
        // /96 (and the default): the last 32 bits.
        _ => take(96, 32),
    };
    Ipv4Addr::from(raw)
}

/// Classify an IPv6 address.
///
/// Every transition range that carries an IPv4 address is judged by that address, so that an
/// exit policy or private-address rule cannot be bypassed under an IPv6 disguise:
/// - IPv4-mapped `::ffff:0:0/96` and IPv4-translated `::ffff:0:0:0/96` (RFC 2765): the last 32 bits;
/// - 6to4 `2002::/16`: bits 16..48;
/// - NAT64 well-known prefix `64:ff9b::/96` (RFC 6052): the last 32 bits;
/// - NAT64 local-use prefix `64:ff9b:1::/48` (RFC 8215): a site may embed the IPv4 address under
///   any RFC 6052 prefix length from /48 to /96. When bits 48..96 are zero the /96 form is
///   unambiguous and the last 32 bits decide; otherwise the address is never better than
///   [`AddrClass::Internal`] (the prefix is local-use, never global) and is as strict as the
///   strictest of its /48, /56 and /64 readings;
/// - Teredo `2001::/32` (RFC 4380): the client's IPv4 address is the last 32 bits inverted; the
///   stricter of it and the Teredo server's address (bits 32..64) decides.
pub fn classify_v6(a: Ipv6Addr) -> AddrClass {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = a.segments();
    let embedded = |hi: u16, lo: u16| {
        let [b0, b1] = hi.to_be_bytes();
        let [b2, b3] = lo.to_be_bytes();
        Ipv4Addr::new(b0, b1, b2, b3)
    };
    if [s0, s1, s2, s3, s4, s5] == [0, 0, 0, 0, 0, 0xffff] {
        // IPv4-mapped ::ffff:a.b.c.d.
        return classify_v4(embedded(s6, s7));
    }
    if [s0, s1, s2, s3, s4, s5] == [0, 0, 0, 0, 0xffff, 0] {
        // IPv4-translated ::ffff:0:a.b.c.d.
        return classify_v4(embedded(s6, s7));
    }
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
    } else if s0 == 0x0064 && s1 == 0xff9b && s2 == 0x0001 {
        // NAT64 local-use prefix 64:ff9b:1::/48.
        if [s3, s4, s5] == [0; 3] {
            classify_v4(rfc6052_v4(a, 96))
        } else {
            [48, 56, 64]
                .into_iter()
                .map(|p| classify_v4(rfc6052_v4(a, p)))
                .fold(AddrClass::Internal, stricter)
        }
    } else if s0 == 0x2001 && s1 == 0x0000 {
        // Teredo: server address, then the client's address with every bit inverted.
        let server = classify_v4(embedded(s2, s3));
        let client = classify_v4(embedded(!s6, !s7));
        stricter(server, client)
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
        ("64:ff9b:1::808:808", AddrClass::Public),
        // Teredo: server 65.54.227.120, client 8.8.8.8 (stored inverted).
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", AddrClass::Public),
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
        // IPv4-translated ::ffff:0:0:0/96.
        ("::ffff:0:8.8.8.8", AddrClass::Public),
        ("::ffff:0:127.0.0.1", AddrClass::Internal),
        ("::ffff:0:10.0.0.1", AddrClass::Internal),
        ("::ffff:0:0.0.0.0", AddrClass::Reserved),
        // NAT64 local-use 64:ff9b:1::/48, /96 form.
        ("64:ff9b:1::7f00:1", AddrClass::Internal),
        ("64:ff9b:1::c0a8:101", AddrClass::Internal),
        ("64:ff9b:1::e000:1", AddrClass::Reserved),
        // NAT64 local-use, other forms: judged by the strictest of the /48, /56 and /64
        // readings, never better than internal. 127.0.0.1 in the /48 form (0.0.1.0 at /56):
        ("64:ff9b:1:7f00:0:100::", AddrClass::Reserved),
        // 8.8.8.8 under all three readings: internal, the floor of a local-use prefix.
        ("64:ff9b:1:808:8:808:800:0", AddrClass::Internal),
        // /64 form carrying 224.0.0.1 after the u octet.
        ("64:ff9b:1:5:e0:0:1::", AddrClass::Reserved),
        // 6to4 with a reserved IPv4 address.
        ("2002:e000:0001::1", AddrClass::Reserved),
        // Teredo: client 127.0.0.1 (inverted 80ff:fffe), 10.0.0.1, 0.0.0.0; internal server.
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", AddrClass::Internal),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", AddrClass::Internal),
        ("2001:0:4136:e378:8000:63bf:ffff:ffff", AddrClass::Reserved),
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", AddrClass::Internal),
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
