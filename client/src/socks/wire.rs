//! The SOCKS vocabulary shared by the server-side state machine ([`super::handshake`]), the
//! client-side codec ([`super::client`]) and the stream layer: version, command, method and
//! address-type numbers, reply codes, [`Target`], the address encoding, reply encoding, and the
//! mapping from END reasons to reply codes.
//!
//! Everything here reads with [`Reader`] and writes with [`Writer`] from `allium_proto::codec`;
//! nothing panics on any input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use allium_proto::codec::{Reader, Writer};
use allium_proto::err::ProtoError;

/// SOCKS version 4 (and 4a).
pub const SOCKS4: u8 = 4;
/// SOCKS version 5.
pub const SOCKS5: u8 = 5;
/// RFC 1929 username/password sub-negotiation version.
pub const AUTH_VERSION: u8 = 1;

/// SOCKS5 authentication methods (RFC 1928 §3).
pub mod method {
    /// No authentication.
    pub const NO_AUTH: u8 = 0x00;
    /// Username/password (RFC 1929).
    pub const USER_PASS: u8 = 0x02;
    /// No acceptable method.
    pub const NONE_ACCEPTABLE: u8 = 0xFF;
}

/// SOCKS5 address types (RFC 1928 §5).
pub mod atyp {
    /// IPv4, 4 bytes.
    pub const IPV4: u8 = 1;
    /// Domain name: a length byte, then the name.
    pub const DOMAIN: u8 = 3;
    /// IPv6, 16 bytes.
    pub const IPV6: u8 = 4;
}

/// SOCKS4 reply codes.
pub mod reply4 {
    /// Request granted.
    pub const GRANTED: u8 = 0x5A;
    /// Request rejected or failed.
    pub const REJECTED: u8 = 0x5B;
}

/// SOCKS5 CONNECT.
pub const CMD_CONNECT: u8 = 0x01;
/// Tor's SOCKS5 RESOLVE extension: resolve a host name at the exit.
pub const CMD_RESOLVE: u8 = 0xF0;
/// Tor's SOCKS5 RESOLVE_PTR extension (not supported: reply 0x07).
pub const CMD_RESOLVE_PTR: u8 = 0xF1;

/// SOCKS5 reply codes (RFC 1928 §6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired.
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Longest host name accepted (SOCKS5's length byte bounds it anyway; SOCKS4a needs a cap).
pub const MAX_HOST_LEN: usize = 255;
/// Longest SOCKS4 user id accepted.
pub const MAX_SOCKS4_USER_LEN: usize = 255;

/// Where a stream goes. `Debug` redacts it: destinations are never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A host name, passed unresolved to the exit.
    Host(String, u16),
    /// An IP literal.
    Ip(SocketAddr),
}

impl Target {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Host(_, p) => *p,
            Self::Ip(a) => a.port(),
        }
    }
    /// Whether the application gave an IP literal (it may have resolved the name locally).
    pub fn is_ip(&self) -> bool {
        matches!(self, Self::Ip(_))
    }
    /// `host:port` as sent in BEGIN (IPv6 in brackets).
    pub fn to_begin_string(&self) -> String {
        match self {
            Self::Host(h, p) => format!("{h}:{p}"),
            Self::Ip(a) => a.to_string(),
        }
    }
    /// The host part alone (for RESOLVE).
    pub fn host_string(&self) -> String {
        match self {
            Self::Host(h, _) => h.clone(),
            Self::Ip(a) => a.ip().to_string(),
        }
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Target([scrubbed])")
    }
}

/// Longest SOCKS5 reply: `VER REP RSV ATYP` + 16 address bytes + port.
pub const MAX_SOCKS5_REPLY: usize = 4 + 16 + 2;

/// Write `ATYP DST.ADDR DST.PORT` for `target` (a host name unresolved, as ATYP 3).
pub fn write_target(w: &mut Writer<'_>, target: &Target) -> Result<(), ProtoError> {
    match target {
        Target::Host(h, port) => {
            w.write_u8(atyp::DOMAIN)?;
            w.write_u8len(h.as_bytes())?;
            w.write_u16(*port)
        }
        Target::Ip(a) => write_addr(w, *a),
    }
}

fn write_addr(w: &mut Writer<'_>, a: SocketAddr) -> Result<(), ProtoError> {
    match a.ip() {
        IpAddr::V4(ip) => {
            w.write_u8(atyp::IPV4)?;
            w.write_all(&ip.octets())?;
        }
        IpAddr::V6(ip) => {
            w.write_u8(atyp::IPV6)?;
            w.write_all(&ip.octets())?;
        }
    }
    w.write_u16(a.port())
}

/// Why an address could not be read (beyond running out of input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrProblem {
    /// The address type is not 1, 3 or 4.
    AddressType(u8),
    /// The host name is empty, not UTF-8 or contains a NUL.
    BadHost,
}

/// Read `ATYP DST.ADDR DST.PORT`. `Ok(Err(..))`: the bytes are complete but unacceptable;
/// `Err(Truncated)`: more input is needed.
pub fn read_target(r: &mut Reader<'_>) -> Result<Result<Target, AddrProblem>, ProtoError> {
    let t = r.take_u8()?;
    Ok(match t {
        atyp::IPV4 => {
            let o: [u8; 4] = r.take_array()?;
            Ok(Target::Ip(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(o)),
                r.take_u16()?,
            )))
        }
        atyp::IPV6 => {
            let o: [u8; 16] = r.take_array()?;
            Ok(Target::Ip(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)),
                r.take_u16()?,
            )))
        }
        atyp::DOMAIN => {
            let name = r.take_u8len()?;
            let port = r.take_u16()?;
            host_from(name).map(|h| Target::Host(h, port))
        }
        other => Err(AddrProblem::AddressType(other)),
    })
}

/// A host name from the wire: 1–255 bytes of UTF-8 without NUL.
pub fn host_from(bytes: &[u8]) -> Result<String, AddrProblem> {
    if bytes.is_empty() || bytes.len() > MAX_HOST_LEN || bytes.contains(&0) {
        return Err(AddrProblem::BadHost);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| AddrProblem::BadHost)
}

/// A SOCKS5 reply `VER REP RSV ATYP BND.ADDR BND.PORT` with `addr` (0.0.0.0:0 when `None`).
pub fn socks5_reply(code: u8, addr: Option<SocketAddr>) -> Vec<u8> {
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut buf = [0u8; MAX_SOCKS5_REPLY];
    let mut w = Writer::for_object(&mut buf, "SOCKS5 reply");
    let written = w
        .write_all(&[SOCKS5, code, 0])
        .and_then(|()| write_addr(&mut w, addr))
        .map(|()| w.position());
    match written {
        Ok(n) => buf.get(..n).unwrap_or_default().to_vec(),
        // Cannot happen (the buffer fits the longest reply); never answer success by accident.
        Err(_) => vec![
            SOCKS5,
            reply::GENERAL_FAILURE,
            0,
            atyp::IPV4,
            0,
            0,
            0,
            0,
            0,
            0,
        ],
    }
}

/// A SOCKS4 reply: `VN=0 CD (0x5A granted, 0x5B rejected) DSTPORT DSTIP`.
pub fn socks4_reply(granted: bool) -> [u8; 8] {
    let code = if granted {
        reply4::GRANTED
    } else {
        reply4::REJECTED
    };
    [0, code, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Result<Target, AddrProblem>, ProtoError> {
        read_target(&mut Reader::new(bytes))
    }

    #[test]
    fn targets_round_trip() {
        for t in [
            Target::Host("example.com".into(), 443),
            Target::Ip("127.0.0.1:80".parse().unwrap()),
            Target::Ip("[::1]:256".parse().unwrap()),
        ] {
            let mut buf = [0u8; 300];
            let mut w = Writer::new(&mut buf);
            write_target(&mut w, &t).unwrap();
            let n = w.position();
            assert_eq!(read(&buf[..n]).unwrap().unwrap(), t);
            for cut in 0..n {
                assert!(matches!(
                    read(&buf[..cut]),
                    Err(ProtoError::Truncated { .. })
                ));
            }
        }
        assert_eq!(
            Target::Ip("[::1]:256".parse().unwrap()).to_begin_string(),
            "[::1]:256"
        );
        assert_eq!(
            format!("{:?}", Target::Host("secret".into(), 1)),
            "Target([scrubbed])"
        );
    }

    #[test]
    fn bad_targets() {
        assert_eq!(read(&[9]).unwrap(), Err(AddrProblem::AddressType(9)));
        assert_eq!(read(&[3, 0, 0, 80]).unwrap(), Err(AddrProblem::BadHost));
        assert_eq!(
            read(&[3, 2, 0xff, 0xfe, 0, 80]).unwrap(),
            Err(AddrProblem::BadHost)
        );
        assert_eq!(
            read(&[3, 2, b'a', 0, 0, 80]).unwrap(),
            Err(AddrProblem::BadHost)
        );
        let long = Target::Host("x".repeat(256), 1);
        let mut buf = [0u8; 300];
        assert!(write_target(&mut Writer::new(&mut buf), &long).is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(socks5_reply(0, None), vec![5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        let r = socks5_reply(0, Some("1.2.3.4:0".parse().unwrap()));
        assert_eq!(r, vec![5, 0, 0, 1, 1, 2, 3, 4, 0, 0]);
        let r6 = socks5_reply(4, Some("[::1]:7".parse().unwrap()));
        assert_eq!(r6.len(), MAX_SOCKS5_REPLY);
        assert_eq!(r6[..4], [5, 4, 0, 4]);
        assert_eq!(r6[20..], [0, 7]);
        assert_eq!(socks4_reply(true), [0, 0x5A, 0, 0, 0, 0, 0, 0]);
        assert_eq!(socks4_reply(false)[1], 0x5B);
    }
}
