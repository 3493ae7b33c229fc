//! Relay messages: what a relay cell carries once the relay-cell crypto has recognised it (design §3.2).
//!
//! ```text
//! relay message region (939 bytes) = relay_cmd u8 | stream_id u16be | len u16be | data[len ≤ 934] | padding
//! ```
//!
//! The padding after `data` belongs to the relay-cell crypto (random bytes) and is ignored here.
//! Each command has one struct; unknown commands decode to [`Unrecognized`] with their body kept, so
//! the circuit layer decides what to do with them. The exact body layouts are in
//! `docs/protocol/60-relay-messages.md`.
//!
//! Stream-id rule: stream commands (BEGIN, BEGIN_DIR, DATA, END, CONNECTED, RESOLVE, RESOLVED)
//! need `stream_id != 0`; circuit commands (EXTEND, EXTENDED, TRUNCATE, TRUNCATED, DROP) need
//! `stream_id == 0`; SENDME may be either (0 = circuit-level). Encoding and decoding both enforce it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use allium_crypto::RelayId;

use crate::cell::DestroyReason;
use crate::codec::{Reader, Writer};
use crate::err::{ProtoError, Result};

pub use crate::consts::{MAX_DATA, RELAY_MSG_LEN, TAG_LEN, Tag};

/// Length of the relay header `relay_cmd u8 | stream_id u16 | len u16`.
pub const RELAY_HEADER_LEN: usize = 5;
/// Longest hostname accepted in BEGIN, RESOLVE and RESOLVED.
pub const MAX_HOSTNAME_LEN: usize = 255;

const _: () = assert!(RELAY_HEADER_LEN + MAX_DATA == RELAY_MSG_LEN);

/// A relay command (open newtype; Tor's numbers where Tor has the command).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayCmd(pub u8);

impl RelayCmd {
    /// Open a stream to a host and port (exit).
    pub const BEGIN: Self = Self(1);
    /// Stream data.
    pub const DATA: Self = Self(2);
    /// Close a stream.
    pub const END: Self = Self(3);
    /// Reply to BEGIN / BEGIN_DIR: the stream is open.
    pub const CONNECTED: Self = Self(4);
    /// Flow-control acknowledgement (design §4).
    pub const SENDME: Self = Self(5);
    /// Tear down the circuit after this hop.
    pub const TRUNCATE: Self = Self(8);
    /// The circuit was truncated after the sending hop.
    pub const TRUNCATED: Self = Self(9);
    /// Long-range padding; dropped by the recipient.
    pub const DROP: Self = Self(10);
    /// Resolve a hostname at the exit.
    pub const RESOLVE: Self = Self(11);
    /// Answers to RESOLVE.
    pub const RESOLVED: Self = Self(12);
    /// Open a stream to the relay's directory service.
    pub const BEGIN_DIR: Self = Self(13);
    /// Extend the circuit by one hop (Tor's EXTEND2 layout; only inside RELAY_EARLY).
    pub const EXTEND: Self = Self(14);
    /// Reply to EXTEND.
    pub const EXTENDED: Self = Self(15);
    /// Register this circuit as an onion service's introduction circuit (rend-spec-v3's number).
    pub const ESTABLISH_INTRO: Self = Self(32);
    /// Register this circuit as waiting at a rendezvous point under a cookie.
    pub const ESTABLISH_RENDEZVOUS: Self = Self(33);
    /// A client's introduction request, to the introduction point.
    pub const INTRODUCE1: Self = Self(34);
    /// The same request, from the introduction point to the service.
    pub const INTRODUCE2: Self = Self(35);
    /// The service's answer, to the rendezvous point (which joins the circuits).
    pub const RENDEZVOUS1: Self = Self(36);
    /// The service's answer, from the rendezvous point to the client.
    pub const RENDEZVOUS2: Self = Self(37);
    /// Reply to ESTABLISH_INTRO.
    pub const INTRO_ESTABLISHED: Self = Self(38);
    /// Reply to ESTABLISH_RENDEZVOUS.
    pub const RENDEZVOUS_ESTABLISHED: Self = Self(39);
    /// The introduction point's answer to INTRODUCE1.
    pub const INTRODUCE_ACK: Self = Self(40);
    /// Stream flow control: stop sending DATA on this stream (Tor prop 344's XOFF).
    pub const XOFF: Self = Self(43);
    /// Stream flow control: resume sending DATA, with a rate advisory (Tor prop 344's XON).
    pub const XON: Self = Self(44);

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "BEGIN",
            2 => "DATA",
            3 => "END",
            4 => "CONNECTED",
            5 => "SENDME",
            8 => "TRUNCATE",
            9 => "TRUNCATED",
            10 => "DROP",
            11 => "RESOLVE",
            12 => "RESOLVED",
            13 => "BEGIN_DIR",
            14 => "EXTEND",
            15 => "EXTENDED",
            32 => "ESTABLISH_INTRO",
            33 => "ESTABLISH_RENDEZVOUS",
            34 => "INTRODUCE1",
            35 => "INTRODUCE2",
            36 => "RENDEZVOUS1",
            37 => "RENDEZVOUS2",
            38 => "INTRO_ESTABLISHED",
            39 => "RENDEZVOUS_ESTABLISHED",
            40 => "INTRODUCE_ACK",
            43 => "XOFF",
            44 => "XON",
            _ => "UNKNOWN",
        }
    }

    /// Which stream ids this command may carry.
    pub fn stream_id_rule(self) -> StreamIdRule {
        match self {
            Self::BEGIN
            | Self::DATA
            | Self::END
            | Self::CONNECTED
            | Self::RESOLVE
            | Self::RESOLVED
            | Self::BEGIN_DIR
            | Self::XOFF
            | Self::XON => StreamIdRule::NonZero,
            Self::EXTEND
            | Self::EXTENDED
            | Self::TRUNCATE
            | Self::TRUNCATED
            | Self::DROP
            | Self::ESTABLISH_INTRO
            | Self::ESTABLISH_RENDEZVOUS
            | Self::INTRODUCE1
            | Self::INTRODUCE2
            | Self::RENDEZVOUS1
            | Self::RENDEZVOUS2
            | Self::INTRO_ESTABLISHED
            | Self::RENDEZVOUS_ESTABLISHED
            | Self::INTRODUCE_ACK => StreamIdRule::Zero,
            _ => StreamIdRule::Any,
        }
    }

    fn check_stream_id(self, stream_id: u16) -> Result<()> {
        let ok = match self.stream_id_rule() {
            StreamIdRule::Zero => stream_id == 0,
            StreamIdRule::NonZero => stream_id != 0,
            StreamIdRule::Any => true,
        };
        if ok {
            Ok(())
        } else {
            Err(ProtoError::Invalid {
                object: "relay message",
                problem: "stream id not allowed for this command",
            })
        }
    }
}

impl fmt::Debug for RelayCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// Which stream ids a relay command may carry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StreamIdRule {
    /// Circuit-level: 0.
    Zero,
    /// Stream-level: not 0.
    NonZero,
    /// Either (SENDME, unknown commands).
    Any,
}

/// The 5-byte relay header, parsed without allocating (the hot path for DATA).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RelayHeader {
    /// The command.
    pub cmd: RelayCmd,
    /// The stream id (0 = circuit-level).
    pub stream_id: u16,
    /// The length of the data that follows (≤ [`MAX_DATA`]).
    pub len: u16,
}

impl RelayHeader {
    /// Parse the header at the start of `region` and return it with the `len` data bytes after it.
    /// Fails if `len > MAX_DATA` or `region` is too short; bytes after the data are padding and
    /// ignored. Does not apply the stream-id rule (see [`RelayCmd::stream_id_rule`]).
    pub fn parse(region: &[u8]) -> Result<(Self, &[u8])> {
        let mut r = Reader::for_object(region, "relay message");
        let cmd = RelayCmd(r.take_u8()?);
        let stream_id = r.take_u16()?;
        let len = r.take_u16()?;
        if usize::from(len) > MAX_DATA {
            return Err(ProtoError::TooLong {
                object: "relay message data",
                len: usize::from(len),
                max: MAX_DATA,
            });
        }
        let data = r.take(usize::from(len))?;
        Ok((
            Self {
                cmd,
                stream_id,
                len,
            },
            data,
        ))
    }
}

/// Write a DATA message with the first `min(data.len(), MAX_DATA, out.len() - 5)` bytes of `data`
/// into `out`, without allocating. Returns the bytes written (header + data); the number of data
/// bytes taken is the result minus [`RELAY_HEADER_LEN`] (0 written if `out` is shorter than a header).
/// `stream_id` must be non-zero (the caller's invariant; it is not checked here).
pub fn encode_data(stream_id: u16, data: &[u8], out: &mut [u8]) -> usize {
    let Some(room) = out.len().checked_sub(RELAY_HEADER_LEN) else {
        return 0;
    };
    let n = data.len().min(MAX_DATA).min(room);
    let (hdr, rest) = out.split_at_mut(RELAY_HEADER_LEN);
    hdr[0] = RelayCmd::DATA.0;
    hdr[1..3].copy_from_slice(&stream_id.to_be_bytes());
    // n ≤ MAX_DATA < u16::MAX
    hdr[3..5].copy_from_slice(&(n as u16).to_be_bytes());
    if let (Some(dst), Some(src)) = (rest.get_mut(..n), data.get(..n)) {
        dst.copy_from_slice(src);
    }
    RELAY_HEADER_LEN + n
}

/// BEGIN flags (Tor's bits).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BeginFlags(pub u32);

impl BeginFlags {
    /// The client accepts IPv6 addresses.
    pub const IPV6_OK: u32 = 1;
    /// The client does not want IPv4 addresses.
    pub const IPV4_NOT_OK: u32 = 2;
    /// The client prefers IPv6.
    pub const IPV6_PREFERRED: u32 = 4;
}

/// Where a BEGIN goes: a hostname (resolved by the exit) or an IP literal.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A DNS name: 1..=255 bytes of `[A-Za-z0-9._-]`.
    Hostname(String),
    /// An IP address literal.
    Ip(IpAddr),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destinations are sensitive (design §6.13).
        f.write_str("Target([redacted])")
    }
}

impl Target {
    /// Parse the host part of `host:port` as written on the wire: `[v6]`, a dotted IPv4 literal, or
    /// a hostname.
    pub fn parse(host: &str) -> Result<Self> {
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return inner
                .parse::<Ipv6Addr>()
                .map(|a| Self::Ip(IpAddr::V6(a)))
                .map_err(|_| bad("BEGIN target", "bad IPv6 literal"));
        }
        if let Ok(a) = host.parse::<Ipv4Addr>() {
            return Ok(Self::Ip(IpAddr::V4(a)));
        }
        check_hostname(host)?;
        Ok(Self::Hostname(host.to_owned()))
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        match self {
            Self::Hostname(h) => {
                check_hostname(h)?;
                w.write_all(h.as_bytes())
            }
            Self::Ip(IpAddr::V4(a)) => w.write_all(a.to_string().as_bytes()),
            Self::Ip(IpAddr::V6(a)) => {
                w.write_u8(b'[')?;
                w.write_all(a.to_string().as_bytes())?;
                w.write_u8(b']')
            }
        }
    }
}

fn bad(object: &'static str, problem: &'static str) -> ProtoError {
    ProtoError::Invalid { object, problem }
}

fn check_hostname(h: &str) -> Result<()> {
    if h.is_empty() || h.len() > MAX_HOSTNAME_LEN {
        return Err(bad("hostname", "length must be 1 to 255"));
    }
    if !h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err(bad(
            "hostname",
            "only letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

fn take_hostname(r: &mut Reader<'_>) -> Result<String> {
    let h = r.take_until(0)?;
    let h = std::str::from_utf8(h).map_err(|_| bad("hostname", "not ASCII"))?;
    check_hostname(h)?;
    Ok(h.to_owned())
}

/// BEGIN: `host ":" port "\0" flags u32` (host is a hostname, a dotted IPv4 or `[IPv6]`; port
/// decimal 1..=65535 without leading zeros).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Begin {
    /// The destination host.
    pub target: Target,
    /// The destination port (non-zero).
    pub port: u16,
    /// [`BeginFlags`].
    pub flags: BeginFlags,
}

impl Begin {
    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        if self.port == 0 {
            return Err(bad("BEGIN", "port 0"));
        }
        self.target.write(w)?;
        w.write_u8(b':')?;
        w.write_all(self.port.to_string().as_bytes())?;
        w.write_u8(0)?;
        w.write_u32(self.flags.0)
    }
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let hp = r.take_until(0)?;
        let hp = std::str::from_utf8(hp).map_err(|_| bad("BEGIN", "target not ASCII"))?;
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or(bad("BEGIN", "target without port"))?;
        if port.is_empty()
            || port.len() > 5
            || port.starts_with('0')
            || !port.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad("BEGIN", "bad port"));
        }
        let port: u16 = port.parse().map_err(|_| bad("BEGIN", "bad port"))?;
        let target = Target::parse(host)?;
        // Reject non-canonical IPv4/IPv6 spellings so each message has one byte form.
        let mut canon = [0u8; MAX_HOSTNAME_LEN + 2];
        let mut cw = Writer::new(&mut canon);
        target.write(&mut cw)?;
        let n = cw.position();
        if canon.get(..n) != Some(host.as_bytes()) {
            return Err(bad("BEGIN", "non-canonical address literal"));
        }
        let flags = BeginFlags(r.take_u32()?);
        Ok(Self {
            target,
            port,
            flags,
        })
    }
}

/// BEGIN_DIR: empty body.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BeginDir;

/// DATA: the bytes of a stream (owned; use [`RelayHeader::parse`] / [`encode_data`] on the hot
/// path to avoid the copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Data {
    /// 0..=934 bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Data({} bytes)", self.data.len())
    }
}

/// Why a stream ended (open code; Tor's numbers).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndReason(pub u8);

impl EndReason {
    /// Catch-all.
    pub const MISC: Self = Self(1);
    /// Could not resolve the hostname.
    pub const RESOLVEFAILED: Self = Self(2);
    /// The destination refused the connection.
    pub const CONNECTREFUSED: Self = Self(3);
    /// The exit policy forbids this destination.
    pub const EXITPOLICY: Self = Self(4);
    /// The circuit is being destroyed.
    pub const DESTROY: Self = Self(5);
    /// The stream closed normally.
    pub const DONE: Self = Self(6);
    /// Connecting timed out.
    pub const TIMEOUT: Self = Self(7);
    /// No route to the destination.
    pub const NOROUTE: Self = Self(8);
    /// The relay is hibernating.
    pub const HIBERNATING: Self = Self(9);
    /// Internal error at the relay.
    pub const INTERNAL: Self = Self(10);
    /// Out of resources.
    pub const RESOURCELIMIT: Self = Self(11);
    /// The connection was reset.
    pub const CONNRESET: Self = Self(12);
    /// Protocol violation.
    pub const TORPROTOCOL: Self = Self(13);
    /// BEGIN_DIR to a relay that is not a directory.
    pub const NOTDIRECTORY: Self = Self(14);

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "MISC",
            2 => "RESOLVEFAILED",
            3 => "CONNECTREFUSED",
            4 => "EXITPOLICY",
            5 => "DESTROY",
            6 => "DONE",
            7 => "TIMEOUT",
            8 => "NOROUTE",
            9 => "HIBERNATING",
            10 => "INTERNAL",
            11 => "RESOURCELIMIT",
            12 => "CONNRESET",
            13 => "TORPROTOCOL",
            14 => "NOTDIRECTORY",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// An address with a DNS TTL: `addr[4 or 16] | ttl u32` (the family is given by the length).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddrTtl {
    /// The address.
    pub addr: IpAddr,
    /// Seconds it may be cached.
    pub ttl: u32,
}

impl fmt::Debug for AddrTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AddrTtl([redacted], ttl {})", self.ttl)
    }
}

impl AddrTtl {
    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        write_ip(w, self.addr)?;
        w.write_u32(self.ttl)
    }
    /// Read the rest of `r` as nothing, or IPv4 + ttl (8 bytes), or IPv6 + ttl (20 bytes).
    fn read_opt(r: &mut Reader<'_>, object: &'static str) -> Result<Option<Self>> {
        let addr = match r.remaining() {
            0 => return Ok(None),
            8 => IpAddr::V4(Ipv4Addr::from(r.take_array::<4>()?)),
            20 => IpAddr::V6(Ipv6Addr::from(r.take_array::<16>()?)),
            _ => return Err(bad(object, "address must be 4 or 16 bytes plus a ttl")),
        };
        let ttl = r.take_u32()?;
        Ok(Some(Self { addr, ttl }))
    }
}

fn write_ip(w: &mut Writer<'_>, a: IpAddr) -> Result<()> {
    match a {
        IpAddr::V4(a) => w.write_all(&a.octets()),
        IpAddr::V6(a) => w.write_all(&a.octets()),
    }
}

/// END: `reason u8 [addr | ttl u32]` (the address only with EXITPOLICY, as in Tor).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct End {
    /// Why.
    pub reason: EndReason,
    /// The address that was refused, with a ttl (optional).
    pub addr: Option<AddrTtl>,
}

impl End {
    /// An END with a reason only.
    pub fn new(reason: EndReason) -> Self {
        Self { reason, addr: None }
    }
}

/// CONNECTED: empty, or `addr[4 or 16] | ttl u32`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Connected {
    /// The address the exit connected to, with a ttl (optional).
    pub addr: Option<AddrTtl>,
}

/// SENDME: empty (stream level) or `version u8 (=1) | tag[16]` (authenticated, mandatory at circuit
/// level: design §4).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sendme {
    /// The tag of the DATA cell that triggered this SENDME (`None` only for stream-level SENDMEs).
    pub tag: Option<Tag>,
}

impl fmt::Debug for Sendme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sendme(tagged: {})", self.tag.is_some())
    }
}

/// The SENDME version this crate writes and accepts.
pub const SENDME_VERSION: u8 = 1;

/// XOFF: the receiving edge's buffer towards its application is full; stop packaging DATA on
/// this stream until XON. Body: `version u8 (=0)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Xoff;

/// XON: resume packaging DATA on this stream. Body: `version u8 (=0) | rate u32` where `rate`
/// is the rate (KiB/s) at which the receiving edge's application drained its buffer, an advisory
/// for the sender (0 = no advice).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Xon {
    /// Drain rate advisory in KiB/s (0: none).
    pub rate_kib: u32,
}

/// The XON/XOFF version this crate writes and accepts.
pub const XON_VERSION: u8 = 0;

/// A link specifier in EXTEND: `type u8 | len u8 | value`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LinkSpec {
    /// Type 0: IPv4 address and port (6 bytes).
    Ipv4(SocketAddrV4),
    /// Type 1: IPv6 address and port (18 bytes).
    Ipv6(SocketAddrV6),
    /// Type 3: Ed25519 identity (32 bytes).
    Ed25519Id(RelayId),
    /// Any other type, kept as is.
    Unrecognized {
        /// The type.
        ty: u8,
        /// The value (≤ 255 bytes).
        value: Vec<u8>,
    },
}

impl LinkSpec {
    /// Type code of [`LinkSpec::Ipv4`].
    pub const TYPE_IPV4: u8 = 0;
    /// Type code of [`LinkSpec::Ipv6`].
    pub const TYPE_IPV6: u8 = 1;
    /// Type code of [`LinkSpec::Ed25519Id`].
    pub const TYPE_ED25519: u8 = 3;

    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        match self {
            Self::Ipv4(a) => {
                w.write_u8(Self::TYPE_IPV4)?;
                w.write_u8(6)?;
                w.write_all(&a.ip().octets())?;
                w.write_u16(a.port())
            }
            Self::Ipv6(a) => {
                w.write_u8(Self::TYPE_IPV6)?;
                w.write_u8(18)?;
                w.write_all(&a.ip().octets())?;
                w.write_u16(a.port())
            }
            Self::Ed25519Id(id) => {
                w.write_u8(Self::TYPE_ED25519)?;
                w.write_u8len(id.as_bytes())
            }
            Self::Unrecognized { ty, value } => {
                if matches!(*ty, Self::TYPE_IPV4 | Self::TYPE_IPV6 | Self::TYPE_ED25519) {
                    return Err(bad("link specifier", "known type written as unrecognized"));
                }
                w.write_u8(*ty)?;
                w.write_u8len(value)
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let ty = r.take_u8()?;
        let value = r.take_u8len()?;
        let mut v = Reader::for_object(value, "link specifier");
        let spec = match ty {
            Self::TYPE_IPV4 => {
                let ip = Ipv4Addr::from(v.take_array::<4>()?);
                Self::Ipv4(SocketAddrV4::new(ip, v.take_u16()?))
            }
            Self::TYPE_IPV6 => {
                let ip = Ipv6Addr::from(v.take_array::<16>()?);
                Self::Ipv6(SocketAddrV6::new(ip, v.take_u16()?, 0, 0))
            }
            Self::TYPE_ED25519 => Self::Ed25519Id(RelayId(v.take_array()?)),
            _ => Self::Unrecognized {
                ty,
                value: v.take_rest().to_vec(),
            },
        };
        v.should_be_exhausted()?;
        Ok(spec)
    }
}

/// EXTEND: `nspec u8 | nspec × (type u8 | len u8 | value) | htype u16 | hlen u16 | hdata`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Extend {
    /// Where and who the next hop is.
    pub specs: Vec<LinkSpec>,
    /// Handshake type (`cell::HTYPE_NTOR3`).
    pub htype: u16,
    /// The onionskin for the next hop.
    pub hdata: Vec<u8>,
}

impl Extend {
    /// The Ed25519 identity, if exactly one identity specifier is present.
    pub fn relay_id(&self) -> Option<RelayId> {
        let mut ids = self.specs.iter().filter_map(|s| match s {
            LinkSpec::Ed25519Id(id) => Some(*id),
            _ => None,
        });
        match (ids.next(), ids.next()) {
            (Some(id), None) => Some(id),
            _ => None,
        }
    }

    /// The socket addresses given (IPv4 and IPv6).
    pub fn addrs(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
        self.specs.iter().filter_map(|s| match s {
            LinkSpec::Ipv4(a) => Some((*a).into()),
            LinkSpec::Ipv6(a) => Some((*a).into()),
            _ => None,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let n = u8::try_from(self.specs.len()).map_err(|_| ProtoError::TooLong {
            object: "EXTEND link specifiers",
            len: self.specs.len(),
            max: 255,
        })?;
        w.write_u8(n)?;
        for s in &self.specs {
            s.write(w)?;
        }
        w.write_u16(self.htype)?;
        w.write_u16len(&self.hdata)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let n = r.take_u8()?;
        // Each specifier takes ≥ 2 bytes: bounded by the input before any allocation.
        let mut specs = Vec::with_capacity(usize::from(n).min(r.remaining() / 2));
        for _ in 0..n {
            specs.push(LinkSpec::read(r)?);
        }
        let htype = r.take_u16()?;
        let hdata = r.take_u16len()?.to_vec();
        Ok(Self {
            specs,
            htype,
            hdata,
        })
    }
}

/// EXTENDED: `hlen u16 | hdata` (the CREATED reply of the new hop).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Extended {
    /// The handshake reply.
    pub hdata: Vec<u8>,
}

/// TRUNCATE: empty body.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Truncate;

/// TRUNCATED: `reason u8` (a [`DestroyReason`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Truncated {
    /// Why the circuit was truncated.
    pub reason: DestroyReason,
}

/// RESOLVE: `hostname "\0"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolve {
    /// The name to resolve (same character rules as [`Target::Hostname`]).
    pub hostname: String,
}

impl fmt::Debug for Resolve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolve([redacted])")
    }
}

/// One answer in RESOLVED.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ResolvedValue {
    /// Type 0x00: a hostname (answer to a reverse lookup).
    Hostname(String),
    /// Type 0x04 (4 bytes) or 0x06 (16 bytes): an address.
    Ip(IpAddr),
    /// Type 0xF0, empty value: transient error.
    TransientError,
    /// Type 0xF1, empty value: permanent error.
    NontransientError,
    /// Another type, kept as is.
    Unrecognized {
        /// The type.
        ty: u8,
        /// The value.
        value: Vec<u8>,
    },
}

impl ResolvedValue {
    const HOSTNAME: u8 = 0x00;
    const IPV4: u8 = 0x04;
    const IPV6: u8 = 0x06;
    const TRANSIENT: u8 = 0xF0;
    const NONTRANSIENT: u8 = 0xF1;
}

/// RESOLVED: a sequence of `type u8 | len u8 | value | ttl u32` until the end of the data.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `(answer, ttl)` pairs.
    pub answers: Vec<(ResolvedValue, u32)>,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resolved({} answers)", self.answers.len())
    }
}

impl Resolved {
    fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        for (v, ttl) in &self.answers {
            match v {
                ResolvedValue::Hostname(h) => {
                    check_hostname(h)?;
                    w.write_u8(ResolvedValue::HOSTNAME)?;
                    w.write_u8len(h.as_bytes())?;
                }
                ResolvedValue::Ip(IpAddr::V4(a)) => {
                    w.write_u8(ResolvedValue::IPV4)?;
                    w.write_u8len(&a.octets())?;
                }
                ResolvedValue::Ip(IpAddr::V6(a)) => {
                    w.write_u8(ResolvedValue::IPV6)?;
                    w.write_u8len(&a.octets())?;
                }
                ResolvedValue::TransientError => {
                    w.write_u8(ResolvedValue::TRANSIENT)?;
                    w.write_u8(0)?;
                }
                ResolvedValue::NontransientError => {
                    w.write_u8(ResolvedValue::NONTRANSIENT)?;
                    w.write_u8(0)?;
                }
                ResolvedValue::Unrecognized { ty, value } => {
                    if matches!(
                        *ty,
                        ResolvedValue::HOSTNAME
                            | ResolvedValue::IPV4
                            | ResolvedValue::IPV6
                            | ResolvedValue::TRANSIENT
                            | ResolvedValue::NONTRANSIENT
                    ) {
                        return Err(bad("RESOLVED", "known type written as unrecognized"));
                    }
                    w.write_u8(*ty)?;
                    w.write_u8len(value)?;
                }
            }
            w.write_u32(*ttl)?;
        }
        Ok(())
    }

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut answers = Vec::new();
        while r.remaining() > 0 {
            let ty = r.take_u8()?;
            let value = r.take_u8len()?;
            let mut v = Reader::for_object(value, "RESOLVED answer");
            let val = match ty {
                ResolvedValue::HOSTNAME => {
                    let h = std::str::from_utf8(v.take_rest())
                        .map_err(|_| bad("hostname", "not ASCII"))?;
                    check_hostname(h)?;
                    ResolvedValue::Hostname(h.to_owned())
                }
                ResolvedValue::IPV4 => ResolvedValue::Ip(IpAddr::V4(v.take_array::<4>()?.into())),
                ResolvedValue::IPV6 => ResolvedValue::Ip(IpAddr::V6(v.take_array::<16>()?.into())),
                ResolvedValue::TRANSIENT => ResolvedValue::TransientError,
                ResolvedValue::NONTRANSIENT => ResolvedValue::NontransientError,
                _ => ResolvedValue::Unrecognized {
                    ty,
                    value: v.take_rest().to_vec(),
                },
            };
            v.should_be_exhausted()?;
            let ttl = r.take_u32()?;
            answers.push((val, ttl));
        }
        Ok(Self { answers })
    }
}

/// DROP: empty body (long-range padding; the recipient drops it).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DropMsg;

/// A relay message with a command this version does not know; its body is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct Unrecognized {
    /// The command.
    pub cmd: RelayCmd,
    /// The `len` data bytes.
    pub body: Vec<u8>,
}

impl fmt::Debug for Unrecognized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unrecognized({:?}, {} bytes)", self.cmd, self.body.len())
    }
}

/// Any relay message.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum RelayMsg {
    /// BEGIN (1).
    Begin(Begin),
    /// DATA (2).
    Data(Data),
    /// END (3).
    End(End),
    /// CONNECTED (4).
    Connected(Connected),
    /// SENDME (5).
    Sendme(Sendme),
    /// TRUNCATE (8).
    Truncate(Truncate),
    /// TRUNCATED (9).
    Truncated(Truncated),
    /// DROP (10).
    Drop(DropMsg),
    /// RESOLVE (11).
    Resolve(Resolve),
    /// RESOLVED (12).
    Resolved(Resolved),
    /// BEGIN_DIR (13).
    BeginDir(BeginDir),
    /// EXTEND (14).
    Extend(Extend),
    /// EXTENDED (15).
    Extended(Extended),
    /// XOFF (43).
    Xoff(Xoff),
    /// XON (44).
    Xon(Xon),
    /// ESTABLISH_INTRO (32).
    EstablishIntro(EstablishIntro),
    /// ESTABLISH_RENDEZVOUS (33).
    EstablishRendezvous(EstablishRendezvous),
    /// INTRODUCE1 (34).
    Introduce1(Introduce),
    /// INTRODUCE2 (35): the same body as INTRODUCE1.
    Introduce2(Introduce),
    /// RENDEZVOUS1 (36).
    Rendezvous1(Rendezvous1),
    /// RENDEZVOUS2 (37).
    Rendezvous2(Rendezvous2),
    /// INTRO_ESTABLISHED (38).
    IntroEstablished(IntroEstablished),
    /// RENDEZVOUS_ESTABLISHED (39).
    RendezvousEstablished(RendezvousEstablished),
    /// INTRODUCE_ACK (40).
    IntroduceAck(IntroduceAck),
    /// Any other command.
    Unrecognized(Unrecognized),
}

impl RelayMsg {
    /// The command of this message.
    pub fn cmd(&self) -> RelayCmd {
        match self {
            Self::Begin(_) => RelayCmd::BEGIN,
            Self::Data(_) => RelayCmd::DATA,
            Self::End(_) => RelayCmd::END,
            Self::Connected(_) => RelayCmd::CONNECTED,
            Self::Sendme(_) => RelayCmd::SENDME,
            Self::Truncate(_) => RelayCmd::TRUNCATE,
            Self::Truncated(_) => RelayCmd::TRUNCATED,
            Self::Drop(_) => RelayCmd::DROP,
            Self::Resolve(_) => RelayCmd::RESOLVE,
            Self::Resolved(_) => RelayCmd::RESOLVED,
            Self::BeginDir(_) => RelayCmd::BEGIN_DIR,
            Self::Extend(_) => RelayCmd::EXTEND,
            Self::Extended(_) => RelayCmd::EXTENDED,
            Self::Xoff(_) => RelayCmd::XOFF,
            Self::Xon(_) => RelayCmd::XON,
            Self::EstablishIntro(_) => RelayCmd::ESTABLISH_INTRO,
            Self::EstablishRendezvous(_) => RelayCmd::ESTABLISH_RENDEZVOUS,
            Self::Introduce1(_) => RelayCmd::INTRODUCE1,
            Self::Introduce2(_) => RelayCmd::INTRODUCE2,
            Self::Rendezvous1(_) => RelayCmd::RENDEZVOUS1,
            Self::Rendezvous2(_) => RelayCmd::RENDEZVOUS2,
            Self::IntroEstablished(_) => RelayCmd::INTRO_ESTABLISHED,
            Self::RendezvousEstablished(_) => RelayCmd::RENDEZVOUS_ESTABLISHED,
            Self::IntroduceAck(_) => RelayCmd::INTRODUCE_ACK,
            Self::Unrecognized(u) => u.cmd,
        }
    }

    /// Write `cmd | stream_id | len | data` at the start of `out` and return the bytes written.
    /// Fails if the data would exceed [`MAX_DATA`] or `out`, if a field is invalid, or if
    /// `stream_id` breaks the stream-id rule of the command.
    pub fn encode(&self, stream_id: u16, out: &mut [u8]) -> Result<usize> {
        let cmd = self.cmd();
        cmd.check_stream_id(stream_id)?;
        let limit = out.len().min(RELAY_MSG_LEN);
        let out = out.get_mut(..limit).unwrap_or_default();
        let mut w = Writer::for_object(out, "relay message");
        w.write_u8(cmd.0)?;
        w.write_u16(stream_id)?;
        w.write_nested_u16len(|w| self.write_body(w))?;
        Ok(w.position())
    }

    /// Encode into a new `Vec` (convenience for tests and cold paths).
    pub fn to_vec(&self, stream_id: u16) -> Result<Vec<u8>> {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = self.encode(stream_id, &mut buf)?;
        Ok(buf.get(..n).unwrap_or_default().to_vec())
    }

    fn write_body(&self, w: &mut Writer<'_>) -> Result<()> {
        match self {
            Self::Begin(b) => b.write(w),
            Self::Data(d) => {
                if d.data.len() > MAX_DATA {
                    return Err(ProtoError::TooLong {
                        object: "DATA",
                        len: d.data.len(),
                        max: MAX_DATA,
                    });
                }
                w.write_all(&d.data)
            }
            Self::End(e) => {
                w.write_u8(e.reason.0)?;
                match &e.addr {
                    Some(a) => a.write(w),
                    None => Ok(()),
                }
            }
            Self::Connected(c) => match &c.addr {
                Some(a) => a.write(w),
                None => Ok(()),
            },
            Self::Sendme(s) => match &s.tag {
                Some(t) => {
                    w.write_u8(SENDME_VERSION)?;
                    w.write_all(t)
                }
                None => Ok(()),
            },
            Self::Truncate(_) | Self::Drop(_) | Self::BeginDir(_) => Ok(()),
            Self::Truncated(t) => w.write_u8(t.reason.0),
            Self::Resolve(r) => {
                check_hostname(&r.hostname)?;
                w.write_all(r.hostname.as_bytes())?;
                w.write_u8(0)
            }
            Self::Resolved(r) => r.write(w),
            Self::Extend(e) => e.write(w),
            Self::Extended(e) => w.write_u16len(&e.hdata),
            Self::Xoff(_) => w.write_u8(XON_VERSION),
            Self::Xon(x) => {
                w.write_u8(XON_VERSION)?;
                w.write_u32(x.rate_kib)
            }
            Self::EstablishIntro(m) => m.write(w),
            Self::EstablishRendezvous(m) => w.write_all(&m.cookie.0),
            Self::Introduce1(m) | Self::Introduce2(m) => m.write(w),
            Self::Rendezvous1(m) => {
                w.write_all(&m.cookie.0)?;
                write_handshake_info(w, &m.handshake_info)
            }
            Self::Rendezvous2(m) => write_handshake_info(w, &m.handshake_info),
            Self::IntroEstablished(m) => write_extensions(w, &m.extensions),
            Self::RendezvousEstablished(_) => Ok(()),
            Self::IntroduceAck(m) => {
                w.write_u16(m.status.0)?;
                write_extensions(w, &m.extensions)
            }
            Self::Unrecognized(u) => {
                if u.cmd.name() != "UNKNOWN" {
                    return Err(bad(
                        "relay message",
                        "known command written as unrecognized",
                    ));
                }
                w.write_all(&u.body)
            }
        }
    }

    /// Decode the relay message at the start of `region` (normally the 939-byte region the
    /// relay-cell crypto exposes; bytes after `len` are padding). Returns `(stream_id, message)`.
    /// Unknown commands give [`RelayMsg::Unrecognized`]; a malformed known one is an error.
    pub fn decode(region: &[u8]) -> Result<(u16, Self)> {
        let (h, data) = RelayHeader::parse(region)?;
        h.cmd.check_stream_id(h.stream_id)?;
        let msg = Self::decode_body(h.cmd, data)?;
        Ok((h.stream_id, msg))
    }

    /// Decode the body of a message whose header was already parsed. The whole of `data` must be
    /// consumed.
    pub fn decode_body(cmd: RelayCmd, data: &[u8]) -> Result<Self> {
        let mut r = Reader::for_object(data, cmd.name());
        let msg = match cmd {
            RelayCmd::BEGIN => Self::Begin(Begin::read(&mut r)?),
            RelayCmd::DATA => Self::Data(Data {
                data: r.take_rest().to_vec(),
            }),
            RelayCmd::END => {
                let reason = EndReason(r.take_u8()?);
                let addr = AddrTtl::read_opt(&mut r, "END")?;
                Self::End(End { reason, addr })
            }
            RelayCmd::CONNECTED => Self::Connected(Connected {
                addr: AddrTtl::read_opt(&mut r, "CONNECTED")?,
            }),
            RelayCmd::SENDME => {
                let tag = if r.remaining() == 0 {
                    None
                } else {
                    if r.take_u8()? != SENDME_VERSION {
                        return Err(bad("SENDME", "unsupported version"));
                    }
                    Some(r.take_array()?)
                };
                Self::Sendme(Sendme { tag })
            }
            RelayCmd::TRUNCATE => Self::Truncate(Truncate),
            RelayCmd::TRUNCATED => Self::Truncated(Truncated {
                reason: DestroyReason(r.take_u8()?),
            }),
            RelayCmd::DROP => Self::Drop(DropMsg),
            RelayCmd::RESOLVE => Self::Resolve(Resolve {
                hostname: take_hostname(&mut r)?,
            }),
            RelayCmd::RESOLVED => Self::Resolved(Resolved::read(&mut r)?),
            RelayCmd::BEGIN_DIR => Self::BeginDir(BeginDir),
            RelayCmd::EXTEND => Self::Extend(Extend::read(&mut r)?),
            RelayCmd::EXTENDED => Self::Extended(Extended {
                hdata: r.take_u16len()?.to_vec(),
            }),
            RelayCmd::XOFF => {
                if r.take_u8()? != XON_VERSION {
                    return Err(bad("XOFF", "unsupported version"));
                }
                Self::Xoff(Xoff)
            }
            RelayCmd::XON => {
                if r.take_u8()? != XON_VERSION {
                    return Err(bad("XON", "unsupported version"));
                }
                Self::Xon(Xon {
                    rate_kib: r.take_u32()?,
                })
            }
            RelayCmd::ESTABLISH_INTRO => Self::EstablishIntro(EstablishIntro::read(&mut r)?),
            RelayCmd::ESTABLISH_RENDEZVOUS => Self::EstablishRendezvous(EstablishRendezvous {
                cookie: RendCookie(r.take_array()?),
            }),
            RelayCmd::INTRODUCE1 => Self::Introduce1(Introduce::read(&mut r)?),
            RelayCmd::INTRODUCE2 => Self::Introduce2(Introduce::read(&mut r)?),
            RelayCmd::RENDEZVOUS1 => Self::Rendezvous1(Rendezvous1 {
                cookie: RendCookie(r.take_array()?),
                handshake_info: read_handshake_info(&mut r)?,
            }),
            RelayCmd::RENDEZVOUS2 => Self::Rendezvous2(Rendezvous2 {
                handshake_info: read_handshake_info(&mut r)?,
            }),
            RelayCmd::INTRO_ESTABLISHED => Self::IntroEstablished(IntroEstablished {
                extensions: read_extensions(&mut r)?,
            }),
            RelayCmd::RENDEZVOUS_ESTABLISHED => Self::RendezvousEstablished(RendezvousEstablished),
            RelayCmd::INTRODUCE_ACK => Self::IntroduceAck(IntroduceAck {
                status: IntroduceStatus(r.take_u16()?),
                extensions: read_extensions(&mut r)?,
            }),
            _ => Self::Unrecognized(Unrecognized {
                cmd,
                body: r.take_rest().to_vec(),
            }),
        };
        r.should_be_exhausted()?;
        Ok(msg)
    }
}

macro_rules! from_msg {
    ($($t:ident => $v:ident),* $(,)?) => {
        $(impl From<$t> for RelayMsg {
            fn from(m: $t) -> Self {
                Self::$v(m)
            }
        })*
    };
}
from_msg!(
    Begin => Begin, Data => Data, End => End, Connected => Connected, Sendme => Sendme,
    Truncate => Truncate, Truncated => Truncated, DropMsg => Drop, Resolve => Resolve,
    Resolved => Resolved, BeginDir => BeginDir, Extend => Extend, Extended => Extended,
    Xoff => Xoff, Xon => Xon, Unrecognized => Unrecognized,
    EstablishIntro => EstablishIntro, EstablishRendezvous => EstablishRendezvous,
    Rendezvous1 => Rendezvous1, Rendezvous2 => Rendezvous2, IntroEstablished => IntroEstablished,
    RendezvousEstablished => RendezvousEstablished, IntroduceAck => IntroduceAck,
);

mod hs;
pub use hs::{
    AUTH_KEY_ED25519, ESTABLISH_INTRO_SIG_DOMAIN, EstablishIntro, EstablishRendezvous, HsExtension,
    IntroEstablished, Introduce, IntroduceAck, IntroduceStatus, MAX_HS_EXTENSIONS, REND_COOKIE_LEN,
    RendCookie, Rendezvous1, Rendezvous2, RendezvousEstablished,
};
use hs::{read_extensions, read_handshake_info, write_extensions, write_handshake_info};
