//! Sans-IO SOCKS request parsing and reply encoding, for the parts fast-socks5 does not cover:
//! Tor's RESOLVE (`0xF0`) extension, SOCKS4/4a, and the mapping from END reasons to reply codes.
//!
//! CONNECT requests are parsed here too (to know how many bytes to read), then handed to
//! fast-socks5's `read_command`, which parses them again and owns the reply state.
//!
//! Every function takes the bytes received so far and returns `Ok(None)` while the request is
//! incomplete. Nothing here panics on any input (a proptest checks it).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

/// Why a request is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SocksParseError {
    /// The version byte is not what this parser handles.
    #[error("unsupported SOCKS version {0}")]
    Version(u8),
    /// Unknown address type.
    #[error("unsupported address type")]
    AddressType,
    /// The host name is empty, too long, not UTF-8 or contains a NUL.
    #[error("malformed host name")]
    BadHost,
    /// SOCKS4 user id too long.
    #[error("SOCKS4 user id too long")]
    UserTooLong,
    /// Reserved byte not zero (tolerated by most servers; we reject).
    #[error("reserved byte is not zero")]
    Reserved,
}

/// A parsed SOCKS5 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks5Request {
    /// The command byte (CONNECT, RESOLVE, or anything else to be refused).
    pub cmd: u8,
    /// The target.
    pub target: Target,
}

fn host_from(bytes: &[u8]) -> Result<String, SocksParseError> {
    if bytes.is_empty() || bytes.len() > MAX_HOST_LEN || bytes.contains(&0) {
        return Err(SocksParseError::BadHost);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| SocksParseError::BadHost)
}

/// How many bytes the SOCKS5 request starting in `buf` occupies, once enough of it is there
/// to know (`Ok(None)`: read more). Used to read exactly the request and nothing after it.
pub fn socks5_request_len(buf: &[u8]) -> Result<Option<usize>, SocksParseError> {
    let Some(&atyp) = buf.get(3) else {
        return Ok(None);
    };
    match atyp {
        1 => Ok(Some(4 + 4 + 2)),
        4 => Ok(Some(4 + 16 + 2)),
        3 => Ok(buf.get(4).map(|&n| 4 + 1 + usize::from(n) + 2)),
        _ => Err(SocksParseError::AddressType),
    }
}

/// Parse a SOCKS5 request `VER CMD RSV ATYP DST.ADDR DST.PORT`. Returns the request and the
/// number of bytes it used.
pub fn parse_socks5_request(buf: &[u8]) -> Result<Option<(Socks5Request, usize)>, SocksParseError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 5 {
        return Err(SocksParseError::Version(ver));
    }
    let Some(len) = socks5_request_len(buf)? else {
        return Ok(None);
    };
    let Some(req) = buf.get(..len) else {
        return Ok(None);
    };
    let (head, rest) = req
        .split_at_checked(4)
        .ok_or(SocksParseError::AddressType)?;
    let (&[_, cmd, rsv, atyp], Some((addr, port))) = (
        <&[u8; 4]>::try_from(head).map_err(|_| SocksParseError::AddressType)?,
        rest.split_last_chunk::<2>(),
    ) else {
        return Ok(None);
    };
    if rsv != 0 {
        return Err(SocksParseError::Reserved);
    }
    let port = u16::from_be_bytes(*port);
    let target = match atyp {
        1 => {
            let o: [u8; 4] = addr.try_into().map_err(|_| SocksParseError::AddressType)?;
            Target::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        4 => {
            let o: [u8; 16] = addr.try_into().map_err(|_| SocksParseError::AddressType)?;
            Target::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        3 => {
            let name = addr.get(1..).ok_or(SocksParseError::BadHost)?;
            Target::Host(host_from(name)?, port)
        }
        _ => return Err(SocksParseError::AddressType),
    };
    Ok(Some((Socks5Request { cmd, target }, len)))
}

/// A parsed SOCKS4 or SOCKS4a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks4Request {
    /// Command: 1 CONNECT, 2 BIND (refused).
    pub cmd: u8,
    /// The target (a host name for SOCKS4a).
    pub target: Target,
    /// The user id (isolation key, with an empty password).
    pub user: Vec<u8>,
}

/// Parse `VN=4 CD DSTPORT[2] DSTIP[4] USERID NUL [HOST NUL]` (the host only when DSTIP is
/// `0.0.0.x`, x ≠ 0: SOCKS4a). Returns the request and the number of bytes it used.
pub fn parse_socks4_request(buf: &[u8]) -> Result<Option<(Socks4Request, usize)>, SocksParseError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 4 {
        return Err(SocksParseError::Version(ver));
    }
    let Some((head, rest)) = buf.split_first_chunk::<8>() else {
        return Ok(None);
    };
    let [_, cmd, p0, p1, a, b, c, d] = *head;
    let port = u16::from_be_bytes([p0, p1]);
    let Some(user_end) = rest.iter().position(|&x| x == 0) else {
        if rest.len() > MAX_SOCKS4_USER_LEN {
            return Err(SocksParseError::UserTooLong);
        }
        return Ok(None);
    };
    if user_end > MAX_SOCKS4_USER_LEN {
        return Err(SocksParseError::UserTooLong);
    }
    let user = rest.get(..user_end).unwrap_or_default().to_vec();
    let mut used = 8 + user_end + 1;
    let target = if a == 0 && b == 0 && c == 0 && d != 0 {
        let after = rest.get(user_end + 1..).unwrap_or_default();
        let Some(host_end) = after.iter().position(|&x| x == 0) else {
            if after.len() > MAX_HOST_LEN {
                return Err(SocksParseError::BadHost);
            }
            return Ok(None);
        };
        let host = host_from(after.get(..host_end).unwrap_or_default())?;
        used += host_end + 1;
        Target::Host(host, port)
    } else {
        Target::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port))
    };
    Ok(Some((Socks4Request { cmd, target, user }, used)))
}

/// A SOCKS5 reply `VER REP RSV ATYP BND.ADDR BND.PORT` with `addr` (0.0.0.0:0 when `None`).
pub fn socks5_reply(code: u8, addr: Option<SocketAddr>) -> Vec<u8> {
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut v = vec![5, code, 0];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            v.push(4);
            v.extend_from_slice(&ip.octets());
        }
    }
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

/// A SOCKS4 reply: `VN=0 CD (0x5A granted, 0x5B rejected) DSTPORT DSTIP`.
pub fn socks4_reply(granted: bool) -> [u8; 8] {
    [0, if granted { 0x5A } else { 0x5B }, 0, 0, 0, 0, 0, 0]
}

/// END reason codes (docs/protocol, relay messages).
pub mod end_reason {
    /// Catch-all.
    pub const MISC: u8 = 1;
    /// The exit could not resolve the name.
    pub const RESOLVEFAILED: u8 = 2;
    /// The destination refused the connection.
    pub const CONNECTREFUSED: u8 = 3;
    /// The exit policy refuses this destination.
    pub const EXITPOLICY: u8 = 4;
    /// The circuit is being destroyed.
    pub const DESTROY: u8 = 5;
    /// Orderly close.
    pub const DONE: u8 = 6;
    /// The connection attempt timed out.
    pub const TIMEOUT: u8 = 7;
    /// No route to the destination.
    pub const NOROUTE: u8 = 8;
}

/// The SOCKS5 reply code for a stream that ended with `reason` before CONNECTED.
pub fn reply_for_end_reason(reason: u8) -> u8 {
    match reason {
        end_reason::EXITPOLICY => reply::NOT_ALLOWED,
        end_reason::RESOLVEFAILED | end_reason::NOROUTE => reply::HOST_UNREACHABLE,
        end_reason::CONNECTREFUSED => reply::CONNECTION_REFUSED,
        end_reason::TIMEOUT => reply::TTL_EXPIRED,
        _ => reply::GENERAL_FAILURE,
    }
}

/// The fast-socks5 reply value for a SOCKS5 code.
pub fn reply_error(code: u8) -> fast_socks5::ReplyError {
    use fast_socks5::ReplyError as R;
    match code {
        reply::NOT_ALLOWED => R::ConnectionNotAllowed,
        reply::NETWORK_UNREACHABLE => R::NetworkUnreachable,
        reply::HOST_UNREACHABLE => R::HostUnreachable,
        reply::CONNECTION_REFUSED => R::ConnectionRefused,
        reply::TTL_EXPIRED => R::TtlExpired,
        reply::COMMAND_NOT_SUPPORTED => R::CommandNotSupported,
        reply::ADDRESS_TYPE_NOT_SUPPORTED => R::AddressTypeNotSupported,
        _ => R::GeneralFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_domain() {
        let mut req = vec![5, 1, 0, 3, 11];
        req.extend_from_slice(b"example.com");
        req.extend_from_slice(&443u16.to_be_bytes());
        for cut in 0..req.len() {
            assert_eq!(
                parse_socks5_request(&req[..cut]).unwrap(),
                None,
                "cut {cut}"
            );
        }
        req.push(0xAA); // trailing data is not part of the request
        let (r, used) = parse_socks5_request(&req).unwrap().unwrap();
        assert_eq!(used, req.len() - 1);
        assert_eq!(r.cmd, CMD_CONNECT);
        assert_eq!(r.target, Target::Host("example.com".into(), 443));
        assert_eq!(r.target.to_begin_string(), "example.com:443");
        assert!(!r.target.is_ip());
    }

    #[test]
    fn resolve_extension() {
        // Tor's RESOLVE: CMD 0xF0, domain, port ignored.
        let mut req = vec![5, 0xF0, 0, 3, 9];
        req.extend_from_slice(b"only.test");
        req.extend_from_slice(&[0, 0]);
        let (r, used) = parse_socks5_request(&req).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(r.cmd, CMD_RESOLVE);
        assert_eq!(r.target.host_string(), "only.test");
    }

    #[test]
    fn ip_targets() {
        let req = [5, 1, 0, 1, 127, 0, 0, 1, 0, 80];
        let (r, _) = parse_socks5_request(&req).unwrap().unwrap();
        assert_eq!(r.target, Target::Ip("127.0.0.1:80".parse().unwrap()));
        assert!(r.target.is_ip());
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[1, 0]);
        let (r, _) = parse_socks5_request(&v6).unwrap().unwrap();
        assert_eq!(r.target.to_begin_string(), "[::1]:256");
        assert_eq!(format!("{:?}", r.target), "Target([scrubbed])");
    }

    #[test]
    fn malformed() {
        assert_eq!(
            parse_socks5_request(&[4, 1, 0, 1]),
            Err(SocksParseError::Version(4))
        );
        assert_eq!(
            parse_socks5_request(&[5, 1, 0, 9]),
            Err(SocksParseError::AddressType)
        );
        assert_eq!(
            parse_socks5_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(SocksParseError::BadHost)
        );
        assert_eq!(
            parse_socks5_request(&[5, 1, 1, 1, 1, 2, 3, 4, 0, 80]),
            Err(SocksParseError::Reserved)
        );
        let bad_utf8 = [5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80];
        assert_eq!(
            parse_socks5_request(&bad_utf8),
            Err(SocksParseError::BadHost)
        );
    }

    #[test]
    fn socks4_and_4a() {
        let req = [4, 1, 0, 80, 10, 0, 0, 1, b'u', 0];
        let (r, used) = parse_socks4_request(&req).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(r.user, b"u");
        assert_eq!(r.target, Target::Ip("10.0.0.1:80".parse().unwrap()));
        let mut a = vec![4, 1, 1, 187, 0, 0, 0, 1, 0];
        a.extend_from_slice(b"host.example\0");
        for cut in 0..a.len() {
            assert_eq!(parse_socks4_request(&a[..cut]).unwrap(), None);
        }
        let (r, used) = parse_socks4_request(&a).unwrap().unwrap();
        assert_eq!(used, a.len());
        assert_eq!(r.target, Target::Host("host.example".into(), 443));
        assert!(r.user.is_empty());
        let long = [vec![4, 1, 0, 80, 1, 2, 3, 4], vec![b'x'; 300]].concat();
        assert_eq!(
            parse_socks4_request(&long),
            Err(SocksParseError::UserTooLong)
        );
    }

    #[test]
    fn replies() {
        assert_eq!(socks5_reply(0, None), vec![5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        let r = socks5_reply(0, Some("1.2.3.4:0".parse().unwrap()));
        assert_eq!(r, vec![5, 0, 0, 1, 1, 2, 3, 4, 0, 0]);
        assert_eq!(socks5_reply(4, Some("[::1]:0".parse().unwrap())).len(), 22);
        assert_eq!(socks4_reply(true)[1], 0x5A);
        assert_eq!(socks4_reply(false)[1], 0x5B);
    }

    #[test]
    fn end_reason_mapping() {
        assert_eq!(reply_for_end_reason(end_reason::EXITPOLICY), 0x02);
        assert_eq!(reply_for_end_reason(end_reason::RESOLVEFAILED), 0x04);
        assert_eq!(reply_for_end_reason(end_reason::NOROUTE), 0x04);
        assert_eq!(reply_for_end_reason(end_reason::CONNECTREFUSED), 0x05);
        assert_eq!(reply_for_end_reason(end_reason::TIMEOUT), 0x06);
        assert_eq!(reply_for_end_reason(end_reason::MISC), 0x01);
        assert_eq!(reply_for_end_reason(end_reason::DESTROY), 0x01);
        assert_eq!(reply_for_end_reason(200), 0x01);
        for code in 1..=8u8 {
            assert_eq!(reply_error(code).as_u8(), code);
        }
        assert_eq!(reply_error(0).as_u8(), 1, "never a success by accident");
    }

    proptest! {
        #[test]
        fn socks5_parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(Some((_, used))) = parse_socks5_request(&buf) {
                prop_assert!(used <= buf.len());
            }
            let _ = socks5_request_len(&buf);
        }

        #[test]
        fn socks4_parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(Some((_, used))) = parse_socks4_request(&buf) {
                prop_assert!(used <= buf.len());
            }
        }

        #[test]
        fn socks5_domain_round_trip(host in "[a-z0-9.-]{1,255}", port in any::<u16>(), cmd in prop_oneof![Just(1u8), Just(0xF0u8)]) {
            let mut req = vec![5, cmd, 0, 3, host.len() as u8];
            req.extend_from_slice(host.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
            let (r, used) = parse_socks5_request(&req).unwrap().unwrap();
            prop_assert_eq!(used, req.len());
            prop_assert_eq!(r.cmd, cmd);
            prop_assert_eq!(r.target, Target::Host(host, port));
        }
    }
}
