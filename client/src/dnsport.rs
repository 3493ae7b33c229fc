//! The DNS port (Tor's `DNSPort`): a UDP DNS server that answers A and AAAA queries by
//! resolving the name at an exit (RESOLVE/RESOLVED, the path SOCKS RESOLVE uses), for programs
//! that only do DNS. Nothing is ever resolved locally.
//!
//! Two parts:
//! - the codec ([`parse_query`], [`Query::answer`], [`Query::error`], [`formerr`]): sans-IO, on
//!   `allium_proto::codec`, RFC 1035 §4. A query is one question (QDCOUNT 1, no answers or
//!   authority records; additional records such as an EDNS OPT are ignored). Names in the
//!   question may not use compression pointers (a query has nothing before it to point at).
//!   Labels are at most 63 bytes, the name at most 255; anything else is FORMERR.
//! - `serve`: the tokio UDP driver. At most `max_dns_queries_per_source` (16) queries in flight
//!   per source address ([`crate::local_limits`]: logged once, counted) and [`MAX_IN_FLIGHT`] in
//!   all; beyond that a query is answered REFUSED at once.
//! - `serve_tcp`: the same port over TCP (RFC 1035 §4.2.2, RFC 7766): each message is preceded
//!   by its length in two bytes. At most [`MAX_TCP_CONNECTIONS`] connections; each answers its
//!   queries in order, one at a time, with the same resolver path as UDP; a query longer than
//!   [`MAX_TCP_QUERY`] closes the connection, and so does [`TCP_IDLE`] without a whole query.
//!   Answers over TCP are not truncated to 512 bytes.
//!
//! Answers: A/AAAA of class IN are resolved (addresses of the other family are left out; a name
//! with none of the asked family gets an empty NOERROR answer). PTR gets REFUSED (a reverse
//! lookup would name the user's peers to the exit), every other type and class NOTIMP, opcodes
//! other than QUERY NOTIMP, garbage FORMERR (or nothing when not even the header reads). A name
//! the exit cannot resolve is NXDOMAIN; a network failure SERVFAIL. Names are never logged.
//! A `.allium.alt` name (an onion service) is answered NXDOMAIN at once, whatever the type: it
//! has no address and never reaches an exit's resolver (see [`Query::action`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use allium_proto::codec::Reader;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};

use crate::circmgr::CircMgr;
use crate::err::ClientError;
use crate::isolation::IsolationKey;
use crate::local_limits::Resource;
use crate::socks::wire::reply;

/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
pub const MAX_UDP_ANSWER: usize = 512;
/// Queries in flight in all.
pub const MAX_IN_FLIGHT: usize = 256;
/// TTL given to answers (the exit's TTLs are not kept by the resolve path).
pub const ANSWER_TTL: u32 = 60;
/// Most DNS-over-TCP connections at once (the next wait to be accepted).
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Longest query accepted over TCP (a query is one question; EDNS options fit easily).
pub const MAX_TCP_QUERY: usize = 4096;
/// Longest a TCP client may take to send a whole query (or stay idle between queries).
pub const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest answer over TCP (the two-byte length prefix's limit).
pub const MAX_TCP_ANSWER: usize = 65_535;
/// Longest a query waits for the exit.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Most attempts on different circuits.
const ATTEMPTS: usize = 3;

/// Record types.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Reverse pointer.
    pub const PTR: u16 = 12;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Any type.
    pub const ANY: u16 = 255;
}

/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response codes (RFC 1035 §4.1.1).
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// Format error.
    pub const FORMERR: u8 = 1;
    /// Server failure.
    pub const SERVFAIL: u8 = 2;
    /// Name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// Not implemented.
    pub const NOTIMP: u8 = 4;
    /// Refused.
    pub const REFUSED: u8 = 5;
}

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// A growable output buffer (answers are built whole, then sent; at most a few hundred bytes).
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    #[cfg(test)]
    fn write_u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn write_u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn write_u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn write_all(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// A parsed query. `Debug` redacts the name.
#[derive(Clone, PartialEq, Eq)]
pub struct Query {
    /// Transaction id.
    pub id: u16,
    /// Opcode (0: QUERY).
    pub opcode: u8,
    /// Recursion desired (echoed back).
    pub rd: bool,
    /// The name, labels joined by dots, lower-cased, without the final dot.
    pub name: String,
    /// The question's labels as received (echoed back in the answer).
    qname_wire: Vec<u8>,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("opcode", &self.opcode)
            .field("name", &"[redacted]")
            .field("qtype", &self.qtype)
            .field("qclass", &self.qclass)
            .finish()
    }
}

/// What to do with a parsed query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resolve the name at an exit and answer addresses of this family.
    Resolve {
        /// AAAA (`true`) or A.
        v6: bool,
    },
    /// Answer at once with this rcode.
    Refuse(u8),
}

/// Why a datagram is not a query we can read: answer with [`formerr`] if the id is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// The transaction id, if the header was complete.
    pub id: Option<u16>,
}

/// Parse a query datagram.
pub fn parse_query(msg: &[u8]) -> Result<Query, Malformed> {
    let mut r = Reader::for_object(msg, "DNS query");
    let header: [u8; 12] = r.take_array().map_err(|_| Malformed { id: None })?;
    let [i0, i1, f0, f1, q0, q1, a0, a1, n0, n1, _, _] = header;
    let id = u16::from_be_bytes([i0, i1]);
    let bad = Malformed { id: Some(id) };
    let flags = u16::from_be_bytes([f0, f1]);
    let qd = u16::from_be_bytes([q0, q1]);
    let an = u16::from_be_bytes([a0, a1]);
    let ns = u16::from_be_bytes([n0, n1]);
    if flags & FLAG_QR != 0 || qd != 1 || an != 0 || ns != 0 {
        return Err(bad);
    }
    let start = r.consumed();
    let mut name = String::new();
    loop {
        let len = usize::from(r.take_u8().map_err(|_| bad)?);
        if len == 0 {
            break;
        }
        // 0xC0: a compression pointer; 0x40/0x80: reserved label types. None belong in a query.
        if len > 63 {
            return Err(bad);
        }
        let label = r.take(len).map_err(|_| bad)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // A dot or a control byte inside a label cannot be carried as a host name.
            if b == b'.' || !b.is_ascii_graphic() {
                return Err(bad);
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        if r.consumed().saturating_sub(start) > 255 {
            return Err(bad);
        }
    }
    let qname_wire = msg
        .get(start..r.consumed())
        .map(<[u8]>::to_vec)
        .ok_or(bad)?;
    let qtype = r.take_u16().map_err(|_| bad)?;
    let qclass = r.take_u16().map_err(|_| bad)?;
    // Additional records (EDNS) after the question are allowed and ignored.
    Ok(Query {
        id,
        opcode: ((flags >> 11) & 0x0F) as u8,
        rd: flags & FLAG_RD != 0,
        name,
        qname_wire,
        qtype,
        qclass,
    })
}

impl Query {
    /// What this query asks of us.
    pub fn action(&self) -> Action {
        if self.opcode != 0 {
            return Action::Refuse(rcode::NOTIMP);
        }
        if self.qclass != CLASS_IN {
            return Action::Refuse(rcode::NOTIMP);
        }
        match self.qtype {
            rtype::A | rtype::AAAA if self.name.is_empty() => Action::Refuse(rcode::REFUSED),
            // An onion-service name has no address and never goes to an exit's resolver.
            // NXDOMAIN, not REFUSED: the name does not exist in the DNS (RFC 9476 keeps `.alt`
            // out of it, as RFC 7686 §2 asks resolvers to answer NXDOMAIN for `.onion`), and a
            // stub resolver given REFUSED would try its next server, the public DNS.
            _ if allium_crypto::hs::is_hs_hostname(&self.name) => Action::Refuse(rcode::NXDOMAIN),
            rtype::A => Action::Resolve { v6: false },
            rtype::AAAA => Action::Resolve { v6: true },
            rtype::PTR => Action::Refuse(rcode::REFUSED),
            _ => Action::Refuse(rcode::NOTIMP),
        }
    }

    fn header(&self, w: &mut Out, rcode: u8, truncated: bool, ancount: u16) {
        let mut flags = FLAG_QR | FLAG_RA | (u16::from(self.opcode & 0x0F) << 11);
        if self.rd {
            flags |= FLAG_RD;
        }
        if truncated {
            flags |= FLAG_TC;
        }
        flags |= u16::from(rcode & 0x0F);
        w.write_u16(self.id);
        w.write_u16(flags & !FLAG_AA);
        w.write_u16(1);
        w.write_u16(ancount);
        w.write_u16(0);
        w.write_u16(0);
        w.write_all(&self.qname_wire);
        w.write_u16(self.qtype);
        w.write_u16(self.qclass);
    }

    /// An answer with no records and `rcode`.
    pub fn error(&self, rcode: u8) -> Vec<u8> {
        let mut w = Out::default();
        self.header(&mut w, rcode, false, 0);
        w.into_vec()
    }

    /// A NOERROR answer with the addresses of the asked family (others are left out), as many
    /// as fit in [`MAX_UDP_ANSWER`] bytes (TC set when some did not).
    pub fn answer(&self, addrs: &[IpAddr]) -> Vec<u8> {
        self.answer_within(addrs, MAX_UDP_ANSWER)
    }

    /// [`Query::answer`] with room for `limit` bytes (TC set when some records did not fit).
    pub fn answer_within(&self, addrs: &[IpAddr], limit: usize) -> Vec<u8> {
        let want_v6 = self.qtype == rtype::AAAA;
        let records: Vec<Vec<u8>> = addrs
            .iter()
            .filter(|a| a.is_ipv6() == want_v6)
            .map(|a| {
                let mut rr = Out::default();
                // A pointer to the question's name at offset 12.
                rr.write_u16(0xC00C);
                rr.write_u16(self.qtype);
                rr.write_u16(CLASS_IN);
                rr.write_u32(ANSWER_TTL);
                match a {
                    IpAddr::V4(v4) => {
                        rr.write_u16(4);
                        rr.write_all(&v4.octets());
                    }
                    IpAddr::V6(v6) => {
                        rr.write_u16(16);
                        rr.write_all(&v6.octets());
                    }
                }
                rr.into_vec()
            })
            .collect();
        let base = 12 + self.qname_wire.len() + 4;
        let mut size = base;
        let mut fit = 0usize;
        for rr in &records {
            if size + rr.len() > limit {
                break;
            }
            size += rr.len();
            fit += 1;
        }
        let mut w = Out::default();
        let count = u16::try_from(fit).unwrap_or(u16::MAX);
        self.header(&mut w, rcode::NOERROR, fit < records.len(), count);
        for rr in records.iter().take(fit) {
            w.write_all(rr);
        }
        w.into_vec()
    }
}

/// A FORMERR answer to a datagram whose header read but whose question did not.
pub fn formerr(id: u16) -> Vec<u8> {
    let mut w = Out::default();
    w.write_u16(id);
    w.write_u16(FLAG_QR | FLAG_RA | u16::from(rcode::FORMERR));
    for _ in 0..4 {
        w.write_u16(0);
    }
    w.into_vec()
}

/// The rcode for a failed resolution.
pub fn rcode_for(e: &ClientError) -> u8 {
    match e.socks_reply() {
        reply::HOST_UNREACHABLE => rcode::NXDOMAIN,
        reply::NOT_ALLOWED => rcode::REFUSED,
        _ => rcode::SERVFAIL,
    }
}

/// The answer to one message (answers at most `limit` bytes long): `None` means send nothing.
async fn answer(mgr: &CircMgr, msg: &[u8], limit: usize) -> Option<Vec<u8>> {
    let q = match parse_query(msg) {
        Ok(q) => q,
        Err(Malformed { id }) => return id.map(formerr),
    };
    match q.action() {
        Action::Refuse(code) => Some(q.error(code)),
        Action::Resolve { .. } => match resolve(mgr, &q.name).await {
            Ok(addrs) => Some(q.answer_within(&addrs, limit)),
            Err(e) => {
                tracing::debug!("a DNS port query failed: {e}");
                Some(q.error(rcode_for(&e)))
            }
        },
    }
}

/// Resolve `name` at an exit, retrying on another circuit when one fails under us.
async fn resolve(mgr: &CircMgr, name: &str) -> Result<Vec<IpAddr>, ClientError> {
    let target = format!("{}:0", crate::control::printable(name));
    let mut track = crate::control::StreamTrack::new(&mgr.control, target, true);
    let r = resolve_tracked(mgr, name, &mut track).await;
    match &r {
        Ok(_) => track.succeeded(),
        Err(e) => track.failed(match rcode_for(e) {
            rcode::NXDOMAIN => "RESOLVEFAILED",
            rcode::REFUSED => "EXITPOLICY",
            _ if matches!(e, ClientError::Timeout(_)) => "TIMEOUT",
            _ => "MISC",
        }),
    }
    r
}

async fn resolve_tracked(
    mgr: &CircMgr,
    name: &str,
    track: &mut crate::control::StreamTrack,
) -> Result<Vec<IpAddr>, ClientError> {
    let attempt = async {
        let mut last = ClientError::Timeout("resolving at an exit");
        for _ in 0..ATTEMPTS {
            let circ = mgr.get_circuit(None, &IsolationKey::NoAuth).await?;
            track.sent(circ.control_id());
            match crate::stream::lookup(&circ, name).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retriable() => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    };
    tokio::time::timeout(RESOLVE_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(ClientError::Timeout("resolving at an exit")))
}

/// Answer DNS queries on `sock` until shutdown.
pub(crate) async fn serve(sock: UdpSocket, mgr: Arc<CircMgr>, mut shutdown: watch::Receiver<bool>) {
    let sock = Arc::new(sock);
    let all = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; 4096];
    loop {
        let got = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = shutdown.changed() => return,
        };
        let (n, from): (usize, SocketAddr) = match got {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier answers surface here on some systems; go on.
                tracing::debug!("DNS port receive error: {e}");
                continue;
            }
        };
        let msg = buf.get(..n).unwrap_or_default().to_vec();
        let per = crate::local_limits::PerSource::from_config(&mgr.config());
        let taken = Arc::clone(&all).try_acquire_owned().ok().and_then(|p| {
            let slot = mgr.local.take(from.ip(), Resource::DnsQuery, &per)?;
            Some((p, slot))
        });
        let Some((permit, slot)) = taken else {
            if let Ok(q) = parse_query(&msg) {
                mgr.metrics.dns(rcode::REFUSED);
                let _ = sock.send_to(&q.error(rcode::REFUSED), from).await;
            }
            continue;
        };
        let (sock, mgr) = (Arc::clone(&sock), Arc::clone(&mgr));
        tokio::spawn(async move {
            if let Some(a) = answer(&mgr, &msg, MAX_UDP_ANSWER).await {
                // The rcode is the low nibble of the fourth byte.
                if let Some(flags) = a.get(3) {
                    mgr.metrics.dns(flags & 0x0F);
                }
                let _ = sock.send_to(&a, from).await;
            }
            drop(slot);
            drop(permit);
        });
    }
}

/// Answer DNS queries over TCP on `listener` until shutdown.
pub(crate) async fn serve_tcp(
    listener: tokio::net::TcpListener,
    mgr: Arc<CircMgr>,
    shutdown: watch::Receiver<bool>,
) {
    let port = "DNS-over-TCP";
    let local = Arc::clone(&mgr.local);
    let live = Arc::clone(&mgr);
    let per_source = move || {
        let per = crate::local_limits::PerSource::from_config(&live.config());
        (per, TCP_IDLE)
    };
    let serve = move |sock, mut adm: crate::local_limits::Admitted| {
        // A DNS connection has no handshake: each query is bounded by TCP_IDLE.
        adm.handshake_done();
        let mgr = Arc::clone(&mgr);
        async move {
            serve_tcp_conn(&mgr, sock).await;
            drop(adm);
        }
    };
    crate::socks::server::accept_loop(
        listener,
        MAX_TCP_CONNECTIONS,
        port,
        shutdown,
        local,
        per_source,
        serve,
    )
    .await;
}

/// Read one length-prefixed message: `Ok(None)` at a clean end between messages.
async fn read_tcp_message<S: tokio::io::AsyncRead + Unpin>(
    sock: &mut S,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let mut len = [0u8; 2];
    match sock.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = usize::from(u16::from_be_bytes(len));
    if n == 0 || n > MAX_TCP_QUERY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "DNS-over-TCP query length out of bounds",
        ));
    }
    let mut msg = vec![0u8; n];
    sock.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Answer one TCP client's queries in order until it closes, idles or misbehaves.
async fn serve_tcp_conn<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mgr: &CircMgr,
    mut sock: S,
) {
    use tokio::io::AsyncWriteExt as _;
    loop {
        let msg = match tokio::time::timeout(TCP_IDLE, read_tcp_message(&mut sock)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::debug!("DNS-over-TCP connection closed: {e}");
                return;
            }
        };
        let Some(a) = answer(mgr, &msg, MAX_TCP_ANSWER).await else {
            // Not even a header: nothing sensible to say; close.
            return;
        };
        if let Some(flags) = a.get(3) {
            mgr.metrics.dns(flags & 0x0F);
        }
        let Ok(len) = u16::try_from(a.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(a.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&a);
        if sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as a stub resolver writes it.
    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut w = Out::default();
        w.write_u16(id);
        w.write_u16(FLAG_RD);
        w.write_u16(1);
        w.write_u16(0);
        w.write_u16(0);
        w.write_u16(0);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            w.write_u8(label.len() as u8);
            w.write_all(label.as_bytes());
        }
        w.write_u8(0);
        w.write_u16(qtype);
        w.write_u16(CLASS_IN);
        w.into_vec()
    }

    #[test]
    fn a_query_round_trip() {
        let msg = query(0xBEEF, "Example.COM.", rtype::A);
        let q = parse_query(&msg).unwrap();
        assert_eq!(q.id, 0xBEEF);
        assert_eq!(q.name, "example.com");
        assert!(q.rd);
        assert_eq!(q.action(), Action::Resolve { v6: false });
        assert!(!format!("{q:?}").contains("example"));
        let addrs: Vec<IpAddr> = vec![
            "93.184.216.34".parse().unwrap(),
            "2606:2800::1".parse().unwrap(),
            "10.1.2.3".parse().unwrap(),
        ];
        let a = q.answer(&addrs);
        let mut expect = msg.clone();
        // Header: QR RD RA, NOERROR, ANCOUNT 2.
        expect[2] = 0x81;
        expect[3] = 0x80;
        expect[7] = 2;
        for ip in [[93, 184, 216, 34], [10, 1, 2, 3]] {
            expect.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            expect.extend_from_slice(&ip);
        }
        assert_eq!(a, expect);
        // AAAA keeps only the IPv6 address.
        let q6 = parse_query(&query(1, "example.com", rtype::AAAA)).unwrap();
        let a6 = q6.answer(&addrs);
        assert_eq!(a6[7], 1);
        assert_eq!(a6.len(), query(1, "example.com", 28).len() + 12 + 16);
    }

    #[test]
    fn refusals() {
        let act = |name: &str, t: u16| parse_query(&query(7, name, t)).unwrap().action();
        assert_eq!(
            act("4.3.2.1.in-addr.arpa", rtype::PTR),
            Action::Refuse(rcode::REFUSED)
        );
        assert_eq!(
            act("example.com", rtype::ANY),
            Action::Refuse(rcode::NOTIMP)
        );
        assert_eq!(act("example.com", 15), Action::Refuse(rcode::NOTIMP));
        assert_eq!(act("", rtype::A), Action::Refuse(rcode::REFUSED));
        let onion = format!("{}.allium.alt", "a".repeat(56));
        for t in [rtype::A, rtype::AAAA, rtype::PTR, 15] {
            assert_eq!(act(&onion, t), Action::Refuse(rcode::NXDOMAIN));
            assert_eq!(act("www.Allium.Alt", t), Action::Refuse(rcode::NXDOMAIN));
        }
        let mut chaos = query(7, "version.bind", 16);
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert_eq!(
            parse_query(&chaos).unwrap().action(),
            Action::Refuse(rcode::NOTIMP)
        );
        let mut notify = query(7, "example.com", rtype::A);
        notify[2] |= 4 << 3;
        let q = parse_query(&notify).unwrap();
        assert_eq!(q.action(), Action::Refuse(rcode::NOTIMP));
        let e = q.error(rcode::NOTIMP);
        assert_eq!(e[3] & 0x0F, rcode::NOTIMP);
        assert_eq!((e[2] >> 3) & 0x0F, 4, "opcode echoed");
        assert_eq!(&e[4..8], &[0, 1, 0, 0]);
    }

    #[test]
    fn garbage_is_formerr() {
        assert_eq!(parse_query(&[]), Err(Malformed { id: None }));
        assert_eq!(parse_query(&[1, 2, 3]), Err(Malformed { id: None }));
        let bad = |m: &[u8]| assert_eq!(parse_query(m), Err(Malformed { id: Some(0x0102) }));
        let good = query(0x0102, "a.example", rtype::A);
        // Truncated anywhere after the header.
        for i in 12..good.len() {
            bad(&good[..i]);
        }
        // A response, two questions, answers in a query.
        let mut m = good.clone();
        m[2] |= 0x80;
        bad(&m);
        let mut m = good.clone();
        m[5] = 2;
        bad(&m);
        let mut m = good.clone();
        m[7] = 1;
        bad(&m);
        // A compression pointer in the question.
        let mut m = good[..12].to_vec();
        m.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        bad(&m);
        // A label of 64 bytes, a name over 255, a dot inside a label.
        bad(&query(0x0102, &"a".repeat(64), rtype::A));
        let long = vec!["abcdefghij"; 24].join(".");
        bad(&query(0x0102, &long, rtype::A));
        let mut m = good[..12].to_vec();
        m.extend_from_slice(&[3, b'a', b'.', b'b', 0, 0, 1, 0, 1]);
        bad(&m);
        let f = formerr(0x0102);
        assert_eq!(f, [1, 2, 0x80, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        // Trailing additional records (EDNS OPT) are fine.
        let mut m = good.clone();
        m[11] = 1;
        m.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        assert!(parse_query(&m).is_ok());
    }

    #[test]
    fn big_answers_are_truncated_to_512_bytes() {
        let q = parse_query(&query(9, "many.example", rtype::AAAA)).unwrap();
        let addrs: Vec<IpAddr> = (0..40u16)
            .map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i]))
            .collect();
        let a = q.answer(&addrs);
        assert!(a.len() <= MAX_UDP_ANSWER);
        assert_ne!(a[2] & 0x02, 0, "TC set");
        let n = u16::from_be_bytes([a[6], a[7]]) as usize;
        assert_eq!(a.len(), 12 + q.qname_wire.len() + 4 + n * 28);
        assert!(n > 10);
    }

    #[tokio::test]
    async fn tcp_framing_is_bounded() {
        use tokio::io::AsyncWriteExt as _;
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        let q = query(9, "example.com", rtype::A);
        w.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        w.write_all(&q).await.unwrap();
        w.write_all(&[0, 0]).await.unwrap();
        assert_eq!(read_tcp_message(&mut r).await.unwrap(), Some(q));
        assert!(read_tcp_message(&mut r).await.is_err(), "length 0");
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        w.write_all(&((MAX_TCP_QUERY + 1) as u16).to_be_bytes())
            .await
            .unwrap();
        assert!(read_tcp_message(&mut r).await.is_err(), "too long");
        let (w, mut r) = tokio::io::duplex(64);
        drop(w);
        assert_eq!(read_tcp_message(&mut r).await.unwrap(), None, "clean end");
        // Over TCP an answer is not cut to 512 bytes.
        let parsed = parse_query(&query(1, "example.com", rtype::A)).unwrap();
        let many: Vec<IpAddr> = (0..60u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let udp = parsed.answer(&many);
        let tcp = parsed.answer_within(&many, MAX_TCP_ANSWER);
        assert!(
            udp.len() <= MAX_UDP_ANSWER && udp[2] & 0x02 != 0,
            "TC over UDP"
        );
        assert_eq!(&tcp[6..8], &[0, 60]);
        assert_eq!(tcp[2] & 0x02, 0);
    }

    #[test]
    fn rcodes_for_failures() {
        use crate::err::StreamError;
        use allium_proto::relaymsg::EndReason;
        let e = ClientError::from(StreamError::Ended(EndReason::RESOLVEFAILED));
        assert_eq!(rcode_for(&e), rcode::NXDOMAIN);
        let e = ClientError::from(StreamError::Ended(EndReason::MISC));
        assert_eq!(rcode_for(&e), rcode::SERVFAIL);
    }
}
