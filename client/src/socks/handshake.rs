//! The server side of the SOCKS handshake as one sans-IO state machine: bytes in; bytes to send,
//! and at the end one [`SocksRequest`] (or a refusal), out.
//!
//! It covers SOCKS5 (RFC 1928) with the no-authentication and username/password (RFC 1929)
//! methods, the CONNECT command and Tor's RESOLVE (`0xF0`) extension, and SOCKS4/4a CONNECT.
//! Every other command (BIND, UDP ASSOCIATE, RESOLVE_PTR) is refused with the matching reply.
//!
//! Invariants:
//! - [`ServerHandshake::handle`] never panics and never consumes a byte past the end of the
//!   request: whatever follows it in the input is stream data and stays the caller's.
//! - Partial input is buffered; the buffer never holds more than [`MAX_MESSAGE`] bytes (every
//!   message has a bounded length: 8-bit length fields, and a 255-byte cap on the two
//!   NUL-terminated SOCKS4 fields).
//! - A refusal carries the reply the client must get (if the protocol has one for it); the
//!   caller sends it and closes the connection.
//! - Credentials become the [`IsolationKey`] and nothing else; `Debug` output of every type
//!   here redacts them and the destination.

use std::net::SocketAddr;

use allium_proto::codec::Reader;
use allium_proto::err::ProtoError;

use super::wire::{
    self, AUTH_VERSION, AddrProblem, CMD_CONNECT, CMD_RESOLVE, MAX_HOST_LEN, MAX_SOCKS4_USER_LEN,
    SOCKS4, SOCKS5, Target, method, reply,
};
use crate::isolation::IsolationKey;

/// Longest message of the handshake: a SOCKS4a request (8 + 255 + 1 + 255 + 1 bytes).
pub const MAX_MESSAGE: usize = 8 + MAX_SOCKS4_USER_LEN + 1 + MAX_HOST_LEN + 1;

/// The SOCKS version a client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocksVersion {
    /// SOCKS4 or SOCKS4a.
    V4,
    /// SOCKS5.
    V5,
}

/// What the client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocksCommand {
    /// Open a stream to the target.
    Connect,
    /// Resolve the target's host name at an exit (Tor's SOCKS5 extension `0xF0`).
    Resolve,
}

/// A complete, accepted request. `Debug` redacts the target and the credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocksRequest {
    /// The version the client spoke (replies use it).
    pub version: SocksVersion,
    /// The command.
    pub command: SocksCommand,
    /// Where to.
    pub target: Target,
    /// The stream's isolation key: its credentials, or none.
    pub isolation: IsolationKey,
}

impl SocksRequest {
    /// The reply to send: SOCKS5 reply `code` with `bound` as the address (0.0.0.0:0 when
    /// `None`), or for SOCKS4 "granted" when `code` is 0 and "rejected" otherwise.
    pub fn reply(&self, code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
        match self.version {
            SocksVersion::V5 => wire::socks5_reply(code, bound),
            SocksVersion::V4 => wire::socks4_reply(code == reply::SUCCEEDED).to_vec(),
        }
    }
}

/// Why a handshake was refused. Nothing sensitive inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The first byte is neither 4 nor 5: not a SOCKS client.
    #[error("not a SOCKS4 or SOCKS5 client (first byte {0:#04x})")]
    NotSocks(u8),
    /// The client offered neither no-authentication nor username/password.
    #[error("the client offered no acceptable SOCKS5 authentication method")]
    NoAcceptableMethod,
    /// The username/password message has a version other than 1.
    #[error("username/password sub-negotiation version {0} (expected 1)")]
    AuthVersion(u8),
    /// The request's version byte is not 5.
    #[error("SOCKS5 request with version {0}")]
    RequestVersion(u8),
    /// The request's reserved byte is not zero.
    #[error("SOCKS5 request with a non-zero reserved byte")]
    Reserved,
    /// Unknown address type.
    #[error("unsupported address type {0}")]
    AddressType(u8),
    /// The host name is empty, longer than 255 bytes, not UTF-8 or contains a NUL.
    #[error("malformed host name")]
    BadHost,
    /// SOCKS4 user id longer than 255 bytes.
    #[error("SOCKS4 user id too long")]
    UserTooLong,
    /// A command this proxy does not carry out (BIND, UDP ASSOCIATE, RESOLVE_PTR, ...).
    #[error("unsupported command {0:#04x}")]
    Command(u8),
    /// A message that cannot be read for another reason.
    #[error("malformed SOCKS message")]
    Malformed,
    /// The client spoke HTTP (`GET `, `CONNECT `, ...) to the SOCKS port: it was configured
    /// with this port as an HTTP proxy. The refusal's bytes are an HTTP 501 page saying so.
    #[error("an HTTP request on the SOCKS port (the application is configured for an HTTP proxy)")]
    HttpRequest,
    /// A `.allium.alt` name that is not a valid onion address (typo, wrong version, bad
    /// checksum). Refused with Tor's "invalid onion address" code `0xF6`; the name never leaves.
    #[error("a malformed onion address (.allium.alt): check it for typos")]
    BadOnionAddress,
    /// RESOLVE of a `.allium.alt` name: onion addresses have no IP address, and the name must
    /// never reach an exit's resolver.
    #[error("RESOLVE of an onion address (.allium.alt names have no IP address)")]
    OnionResolve,
}

/// SOCKS5 reply for a malformed onion address (Tor's extended code).
pub const REPLY_BAD_ONION_ADDRESS: u8 = 0xF6;

/// Check a request's target before it is accepted: every `*.allium.alt` name must be a valid
/// onion address, and is never resolved. `Ok(())` for every other target.
pub fn check_onion_target(target: &Target, command: SocksCommand) -> Result<(), HandshakeError> {
    let Target::Host(host, _) = target else {
        return Ok(());
    };
    if !allium_crypto::hs::is_hs_hostname(host) {
        return Ok(());
    }
    if allium_crypto::hs::HsAddress::parse(host).is_err() {
        return Err(HandshakeError::BadOnionAddress);
    }
    if command == SocksCommand::Resolve {
        return Err(HandshakeError::OnionResolve);
    }
    Ok(())
}

/// What one call of [`ServerHandshake::handle`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// How many input bytes belong to the handshake. After a request, the rest of the input
    /// (if any) is stream data: it was not looked at. After a refusal, the whole input counts
    /// as consumed (the connection closes).
    pub consumed: usize,
    /// Bytes to send to the client now, in order (method choice, authentication result, or a
    /// refusal's reply).
    pub send: Vec<u8>,
    /// Set once the handshake is over.
    pub outcome: Option<Outcome>,
}

/// How a handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A request to carry out; answer it with [`SocksRequest::reply`].
    Request(SocksRequest),
    /// Refused: send [`Progress::send`] (it holds the reply, if the protocol has one) and close.
    Refused(HandshakeError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for the first message: a SOCKS5 greeting `VER=5 NMETHODS METHODS` or a SOCKS4
    /// request `VN=4 ...`; the first byte tells which.
    Start,
    /// SOCKS5: username/password chosen; waiting for `VER ULEN UNAME PLEN PASSWD`.
    Auth,
    /// SOCKS5: waiting for `VER CMD RSV ATYP DST.ADDR DST.PORT`.
    Request(IsolationKey),
    /// Over (request given out or refused); consumes nothing more.
    Done,
}

/// The result of parsing the message the state waits for.
enum Step {
    /// The message is complete and `used` bytes long; go to `next`, send `send`.
    Next {
        used: usize,
        next: State,
        send: Vec<u8>,
    },
    /// The message is complete and `used` bytes long: the handshake is over.
    Finish {
        used: usize,
        send: Vec<u8>,
        outcome: Outcome,
    },
}

/// Why parsing stopped short of a complete message.
enum Stop {
    /// The message is incomplete: wait for more bytes.
    More,
    /// The message is unacceptable: send `reply` and close.
    Refuse(Vec<u8>, HandshakeError),
}

impl From<ProtoError> for Stop {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Truncated { .. } => Self::More,
            // The readers used here fail only by running out of input; anything else is a
            // malformed message all the same: close.
            _ => Self::Refuse(Vec::new(), HandshakeError::Malformed),
        }
    }
}

/// The server side of one SOCKS handshake.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    state: State,
    /// The part of the current message received so far (at most [`MAX_MESSAGE`] bytes).
    buf: Vec<u8>,
    /// The HTTP CONNECT port to point HTTP clients at, if one is configured.
    http_tunnel: Option<SocketAddr>,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerHandshake {
    /// A handshake that has seen nothing yet.
    pub fn new() -> Self {
        Self {
            state: State::Start,
            buf: Vec::new(),
            http_tunnel: None,
        }
    }

    /// A handshake whose answer to an HTTP client names `http_tunnel` (the proxy's HTTP CONNECT
    /// port) as the address to configure instead.
    pub fn with_http_tunnel(mut self, http_tunnel: Option<SocketAddr>) -> Self {
        self.http_tunnel = http_tunnel;
        self
    }

    /// Whether the handshake is over (a request was given out or it was refused).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Take bytes received from the client. Consumes as much of `input` as belongs to the
    /// handshake (never more than up to the end of the request), and says what to send and
    /// whether the handshake is over. With the handshake over it consumes nothing.
    pub fn handle(&mut self, input: &[u8]) -> Progress {
        let mut progress = Progress::default();
        while self.state != State::Done {
            let rest = input.get(progress.consumed..).unwrap_or_default();
            if rest.is_empty() {
                break;
            }
            let before = self.buf.len();
            let room = MAX_MESSAGE.saturating_sub(before);
            let taken = rest.get(..room.min(rest.len())).unwrap_or_default();
            self.buf.extend_from_slice(taken);
            match self.parse() {
                Ok(Step::Next { used, next, send }) => {
                    progress.consumed += used.saturating_sub(before);
                    progress.send.extend_from_slice(&send);
                    self.buf.clear();
                    self.state = next;
                }
                Ok(Step::Finish {
                    used,
                    send,
                    outcome,
                }) => {
                    progress.consumed += used.saturating_sub(before);
                    progress.send.extend_from_slice(&send);
                    progress.outcome = Some(outcome);
                    self.finish();
                }
                Err(Stop::More) => {
                    progress.consumed += taken.len();
                    if self.buf.len() >= MAX_MESSAGE {
                        // Cannot happen: every message is bounded below MAX_MESSAGE and its
                        // parser refuses longer ones. Refuse rather than grow.
                        progress.outcome = Some(Outcome::Refused(HandshakeError::Malformed));
                        self.finish();
                    }
                }
                Err(Stop::Refuse(send, e)) => {
                    progress.consumed += taken.len();
                    progress.send.extend_from_slice(&send);
                    progress.outcome = Some(Outcome::Refused(e));
                    self.finish();
                }
            }
        }
        progress
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.buf = Vec::new();
    }

    fn parse(&self) -> Result<Step, Stop> {
        let buf = self.buf.as_slice();
        match &self.state {
            State::Start => match buf.first() {
                Some(&SOCKS5) => parse_greeting(buf),
                Some(&SOCKS4) => parse_socks4(buf),
                Some(b) if b.is_ascii_uppercase() => detect_http(buf, self.http_tunnel),
                Some(&other) => Err(Stop::Refuse(Vec::new(), HandshakeError::NotSocks(other))),
                None => Err(Stop::More),
            },
            State::Auth => parse_auth(buf),
            State::Request(iso) => parse_request(buf, iso),
            State::Done => Err(Stop::More),
        }
    }
}

/// HTTP methods whose request line, sent to a SOCKS port, gets the "not an HTTP proxy" page.
const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// The first bytes start with an upper-case letter: an HTTP request line, or not SOCKS at all.
/// Waits (at most 8 bytes) until one method and its space match or none can.
fn detect_http(buf: &[u8], http_tunnel: Option<SocketAddr>) -> Result<Step, Stop> {
    let mut could_match = false;
    for m in HTTP_METHODS {
        if buf.starts_with(m) {
            return Err(Stop::Refuse(
                not_an_http_proxy(http_tunnel),
                HandshakeError::HttpRequest,
            ));
        }
        could_match |= m.starts_with(buf);
    }
    match buf.first() {
        Some(&b) if !could_match => Err(Stop::Refuse(Vec::new(), HandshakeError::NotSocks(b))),
        _ => Err(Stop::More),
    }
}

/// The HTTP response for an HTTP client that was pointed at the SOCKS port.
pub fn not_an_http_proxy(http_tunnel: Option<SocketAddr>) -> Vec<u8> {
    let advice = match http_tunnel {
        Some(a) => format!(
            "<p>This proxy also has an HTTP CONNECT tunnel port at <code>{a}</code>: use that \
             address as the HTTP/HTTPS proxy instead.</p>"
        ),
        None => "<p>To use Allium as an HTTP proxy, set <code>http_tunnel_port</code> in the \
                 proxy's configuration and point the application's HTTPS proxy setting at that \
                 port.</p>"
            .to_owned(),
    };
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>This is a SOCKS proxy, not an HTTP proxy</title></head>\n\
         <body><h1>This is a SOCKS proxy, not an HTTP proxy</h1>\n\
         <p>Your application sent an HTTP request to Allium's SOCKS port. Configure it to use \
         this address as a <b>SOCKS5</b> proxy (with host names resolved by the proxy: \
         <code>socks5h://</code>, \"Proxy DNS when using SOCKS v5\") instead of an HTTP \
         proxy.</p>\n{advice}\n</body></html>\n"
    );
    let mut out = format!(
        "HTTP/1.0 501 Allium is a SOCKS proxy, not an HTTP proxy\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// `VER=5 NMETHODS METHODS`: choose username/password if offered, else no authentication.
fn parse_greeting(buf: &[u8]) -> Result<Step, Stop> {
    let mut r = Reader::for_object(buf, "SOCKS5 greeting");
    let _ver = r.take_u8()?;
    let methods = r.take_u8len()?;
    let used = r.consumed();
    if methods.contains(&method::USER_PASS) {
        Ok(Step::Next {
            used,
            next: State::Auth,
            send: vec![SOCKS5, method::USER_PASS],
        })
    } else if methods.contains(&method::NO_AUTH) {
        Ok(Step::Next {
            used,
            next: State::Request(IsolationKey::NoAuth),
            send: vec![SOCKS5, method::NO_AUTH],
        })
    } else {
        Err(Stop::Refuse(
            vec![SOCKS5, method::NONE_ACCEPTABLE],
            HandshakeError::NoAcceptableMethod,
        ))
    }
}

/// RFC 1929 `VER=1 ULEN UNAME PLEN PASSWD`. Every pair is accepted: it is an isolation key,
/// not a secret this proxy checks.
fn parse_auth(buf: &[u8]) -> Result<Step, Stop> {
    let mut r = Reader::for_object(buf, "SOCKS5 username/password");
    let ver = r.take_u8()?;
    if ver != AUTH_VERSION {
        return Err(Stop::Refuse(
            vec![AUTH_VERSION, 1],
            HandshakeError::AuthVersion(ver),
        ));
    }
    let user = r.take_u8len()?;
    let pass = r.take_u8len()?;
    Ok(Step::Next {
        used: r.consumed(),
        next: State::Request(IsolationKey::credentials(user, pass)),
        send: vec![AUTH_VERSION, 0],
    })
}

fn refuse5(code: u8, e: HandshakeError) -> Stop {
    Stop::Refuse(wire::socks5_reply(code, None), e)
}

/// `VER=5 CMD RSV ATYP DST.ADDR DST.PORT`.
fn parse_request(buf: &[u8], iso: &IsolationKey) -> Result<Step, Stop> {
    let mut r = Reader::for_object(buf, "SOCKS5 request");
    let ver = r.take_u8()?;
    if ver != SOCKS5 {
        return Err(refuse5(
            reply::GENERAL_FAILURE,
            HandshakeError::RequestVersion(ver),
        ));
    }
    let cmd = r.take_u8()?;
    let rsv = r.take_u8()?;
    let target = match wire::read_target(&mut r)? {
        Ok(t) => t,
        Err(AddrProblem::AddressType(t)) => {
            return Err(refuse5(
                reply::ADDRESS_TYPE_NOT_SUPPORTED,
                HandshakeError::AddressType(t),
            ));
        }
        Err(AddrProblem::BadHost) => {
            return Err(refuse5(reply::GENERAL_FAILURE, HandshakeError::BadHost));
        }
    };
    let used = r.consumed();
    if rsv != 0 {
        return Err(refuse5(reply::GENERAL_FAILURE, HandshakeError::Reserved));
    }
    let command = match cmd {
        CMD_CONNECT => SocksCommand::Connect,
        CMD_RESOLVE => SocksCommand::Resolve,
        other => {
            return Err(refuse5(
                reply::COMMAND_NOT_SUPPORTED,
                HandshakeError::Command(other),
            ));
        }
    };
    match check_onion_target(&target, command) {
        Ok(()) => {}
        Err(e @ HandshakeError::BadOnionAddress) => {
            return Err(refuse5(REPLY_BAD_ONION_ADDRESS, e));
        }
        Err(e) => return Err(refuse5(reply::NOT_ALLOWED, e)),
    }
    Ok(Step::Finish {
        used,
        send: Vec::new(),
        outcome: Outcome::Request(SocksRequest {
            version: SocksVersion::V5,
            command,
            target,
            isolation: iso.clone(),
        }),
    })
}

/// A NUL-terminated field of at most `max` bytes: `Ok(None)` while no NUL has come and the
/// field can still be valid.
fn take_cstr<'a>(r: &mut Reader<'a>, max: usize) -> Result<Option<&'a [u8]>, ()> {
    let rest = r.peek(r.remaining()).unwrap_or_default();
    match rest.iter().position(|&b| b == 0) {
        Some(n) if n <= max => {
            let field = r.take(n).map_err(|_| ())?;
            r.take_u8().map_err(|_| ())?;
            Ok(Some(field))
        }
        Some(_) => Err(()),
        None if rest.len() > max => Err(()),
        None => Ok(None),
    }
}

fn refuse4(e: HandshakeError) -> Stop {
    Stop::Refuse(wire::socks4_reply(false).to_vec(), e)
}

/// `VN=4 CD DSTPORT DSTIP USERID NUL [HOST NUL]`, the host only when DSTIP is `0.0.0.x`,
/// x ≠ 0 (SOCKS4a).
fn parse_socks4(buf: &[u8]) -> Result<Step, Stop> {
    let mut r = Reader::for_object(buf, "SOCKS4 request");
    let _ver = r.take_u8()?;
    let cmd = r.take_u8()?;
    let port = r.take_u16()?;
    let ip: [u8; 4] = r.take_array()?;
    let user = take_cstr(&mut r, MAX_SOCKS4_USER_LEN)
        .map_err(|()| refuse4(HandshakeError::UserTooLong))?
        .ok_or(Stop::More)?;
    let target = match ip {
        [0, 0, 0, x] if x != 0 => {
            let host = take_cstr(&mut r, MAX_HOST_LEN)
                .map_err(|()| refuse4(HandshakeError::BadHost))?
                .ok_or(Stop::More)?;
            let host = wire::host_from(host).map_err(|_| refuse4(HandshakeError::BadHost))?;
            Target::Host(host, port)
        }
        _ => Target::Ip(SocketAddr::from((ip, port))),
    };
    if cmd != CMD_CONNECT {
        return Err(refuse4(HandshakeError::Command(cmd)));
    }
    check_onion_target(&target, SocksCommand::Connect).map_err(refuse4)?;
    let isolation = if user.is_empty() {
        IsolationKey::NoAuth
    } else {
        IsolationKey::credentials(user, Vec::new())
    };
    Ok(Step::Finish {
        used: r.consumed(),
        send: Vec::new(),
        outcome: Outcome::Request(SocksRequest {
            version: SocksVersion::V4,
            command: SocksCommand::Connect,
            target,
            isolation,
        }),
    })
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
