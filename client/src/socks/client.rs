//! The client side of SOCKS, for tests, `allium testnet` and anything else that talks to a
//! SOCKS proxy: a sans-IO [`ClientHandshake`] (request encoding and reply parsing) and small
//! async helpers on top of it ([`handshake`], [`connect`], [`resolve`]).
//!
//! Supported: SOCKS5 with no authentication or username/password (RFC 1929), CONNECT and Tor's
//! RESOLVE (`0xF0`), any [`Target`] (host names are sent unresolved, ATYP 3); SOCKS4a CONNECT.
//!
//! Invariants: the handshake asks for exactly the bytes of the message it waits for
//! ([`ClientHandshake::bytes_needed`]), so a driver that reads only that many never reads
//! stream data; hostile replies are bounded (at most 4 + 1 + 255 + 2 bytes) and never panic.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use allium_proto::codec::{Reader, Writer};
use allium_proto::err::ProtoError;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::handshake::{SocksCommand, SocksVersion};
use super::wire::{
    self, AUTH_VERSION, AddrProblem, CMD_CONNECT, CMD_RESOLVE, MAX_HOST_LEN, MAX_SOCKS4_USER_LEN,
    SOCKS4, SOCKS5, Target, method, reply4,
};

/// What to ask a SOCKS proxy for.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientRequest {
    /// SOCKS5, or SOCKS4a.
    pub version: SocksVersion,
    /// CONNECT or RESOLVE (RESOLVE is SOCKS5 only).
    pub command: SocksCommand,
    /// Where to.
    pub target: Target,
    /// SOCKS5 username and password (RFC 1929); for SOCKS4a the user id (the password must be
    /// empty). `None`: no authentication.
    pub auth: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest")
            .field("version", &self.version)
            .field("command", &self.command)
            .field("target", &self.target)
            .field("auth", &self.auth.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl ClientRequest {
    /// A SOCKS5 CONNECT.
    pub fn connect(target: Target, auth: Option<(&str, &str)>) -> Self {
        Self {
            version: SocksVersion::V5,
            command: SocksCommand::Connect,
            target,
            auth: auth.map(|(u, p)| (u.as_bytes().to_vec(), p.as_bytes().to_vec())),
        }
    }

    /// A SOCKS5 RESOLVE (Tor's extension) of `host`.
    pub fn resolve(host: &str, auth: Option<(&str, &str)>) -> Self {
        Self {
            command: SocksCommand::Resolve,
            ..Self::connect(Target::Host(host.to_owned(), 0), auth)
        }
    }

    /// A SOCKS4a CONNECT (SOCKS4 for an IPv4 target) with user id `user` (may be empty).
    pub fn socks4a(target: Target, user: &str) -> Self {
        Self {
            version: SocksVersion::V4,
            command: SocksCommand::Connect,
            target,
            auth: Some((user.as_bytes().to_vec(), Vec::new())),
        }
    }
}

/// The proxy's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0 on success. Otherwise the SOCKS5 reply code, or for SOCKS4 the raw reply code
    /// (`0x5B` and up).
    pub code: u8,
    /// The address in a SOCKS5 reply (for RESOLVE: the answer), if it holds an IP address.
    pub addr: Option<SocketAddr>,
}

/// Why a SOCKS exchange failed. Nothing sensitive inside.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocksClientError {
    /// The proxy answered with a non-zero reply code.
    #[error("SOCKS proxy replied with code {0:#04x}")]
    Reply(u8),
    /// The proxy violated the protocol.
    #[error("SOCKS protocol error: {0}")]
    Protocol(&'static str),
    /// The request cannot be encoded (a field too long, RESOLVE over SOCKS4, ...).
    #[error("cannot send this SOCKS request: {0}")]
    BadRequest(&'static str),
    /// The proxy did not answer in time.
    #[error("SOCKS proxy did not answer in time")]
    Timeout,
    /// I/O error.
    #[error("SOCKS I/O error: {0}")]
    Io(#[from] io::Error),
}

impl SocksClientError {
    /// The SOCKS reply code, if the proxy sent a refusal.
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            Self::Reply(c) => Some(*c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `VER METHOD`.
    Method,
    /// Waiting for `VER STATUS` of username/password.
    Auth,
    /// Waiting for the SOCKS5 reply.
    Reply5,
    /// Waiting for the 8-byte SOCKS4 reply.
    Reply4,
    /// Over.
    Done,
}

/// What one call of [`ClientHandshake::handle`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientProgress {
    /// Input bytes used; the rest is stream data.
    pub consumed: usize,
    /// Bytes to send to the proxy now.
    pub send: Vec<u8>,
    /// The reply, once it has come (the handshake is then over).
    pub reply: Option<Reply>,
}

/// The client side of one SOCKS handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    req: ClientRequest,
    state: State,
    /// The part of the current message received so far.
    buf: Vec<u8>,
    /// Bytes still missing from the current message (at least).
    needed: usize,
}

/// Longest message a proxy sends: a SOCKS5 reply with a 255-byte name.
const MAX_REPLY: usize = 4 + 1 + MAX_HOST_LEN + 2;

enum Parse<T> {
    Done(T, usize),
    More(usize),
}

fn parse<T>(
    buf: &[u8],
    object: &'static str,
    f: impl FnOnce(&mut Reader<'_>) -> Result<Result<T, SocksClientError>, ProtoError>,
) -> Result<Parse<T>, SocksClientError> {
    let mut r = Reader::for_object(buf, object);
    match f(&mut r) {
        Ok(v) => Ok(Parse::Done(v?, r.consumed())),
        Err(ProtoError::Truncated {
            needed, remaining, ..
        }) => Ok(Parse::More(needed.saturating_sub(remaining).max(1))),
        Err(_) => Err(SocksClientError::Protocol("malformed reply")),
    }
}

impl ClientHandshake {
    /// Start a handshake for `req`; returns it and the first bytes to send.
    pub fn new(req: ClientRequest) -> Result<(Self, Vec<u8>), SocksClientError> {
        let (first, state, needed) = match req.version {
            SocksVersion::V5 => {
                let m = if req.auth.is_some() {
                    method::USER_PASS
                } else {
                    method::NO_AUTH
                };
                (vec![SOCKS5, 1, m], State::Method, 2)
            }
            SocksVersion::V4 => (encode_socks4(&req)?, State::Reply4, 8),
        };
        if req.version == SocksVersion::V5 {
            // Check now that the request and credentials can be encoded.
            encode_socks5(&req)?;
            encode_auth(&req)?;
        }
        let hs = Self {
            req,
            state,
            buf: Vec::new(),
            needed,
        };
        Ok((hs, first))
    }

    /// How many more bytes the message being waited for needs, at least (0 once over). A
    /// driver that reads exactly this many at a time never reads past the handshake.
    pub fn bytes_needed(&self) -> usize {
        if self.state == State::Done {
            0
        } else {
            self.needed
        }
    }

    /// Whether the reply has come.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Take bytes received from the proxy.
    pub fn handle(&mut self, input: &[u8]) -> Result<ClientProgress, SocksClientError> {
        let mut progress = ClientProgress::default();
        while self.state != State::Done {
            let rest = input.get(progress.consumed..).unwrap_or_default();
            if rest.is_empty() {
                break;
            }
            let before = self.buf.len();
            let room = MAX_REPLY.saturating_sub(before);
            let taken = rest.get(..room.min(rest.len())).unwrap_or_default();
            self.buf.extend_from_slice(taken);
            match self.step(&mut progress)? {
                Parse::Done(next, used) => {
                    progress.consumed += used.saturating_sub(before);
                    self.buf.clear();
                    self.state = next;
                }
                Parse::More(n) => {
                    progress.consumed += taken.len();
                    self.needed = n;
                    if self.buf.len() >= MAX_REPLY {
                        return Err(SocksClientError::Protocol("reply too long"));
                    }
                }
            }
        }
        Ok(progress)
    }

    fn step(&mut self, progress: &mut ClientProgress) -> Result<Parse<State>, SocksClientError> {
        let buf = self.buf.as_slice();
        match self.state {
            State::Method => {
                let parsed = parse(buf, "SOCKS5 method choice", |r| {
                    Ok(match r.take_array::<2>()? {
                        [SOCKS5, m] => Ok(m),
                        _ => Err(SocksClientError::Protocol("not a SOCKS5 proxy")),
                    })
                })?;
                let Parse::Done(m, used) = parsed else {
                    return Ok(into_more(parsed));
                };
                let next = match (m, self.req.auth.is_some()) {
                    (method::NO_AUTH, false) => {
                        progress.send.extend(encode_socks5(&self.req)?);
                        self.needed = 4;
                        State::Reply5
                    }
                    (method::USER_PASS, true) => {
                        progress.send.extend(encode_auth(&self.req)?);
                        self.needed = 2;
                        State::Auth
                    }
                    (method::NONE_ACCEPTABLE, _) => {
                        return Err(SocksClientError::Protocol(
                            "the proxy accepts none of the offered authentication methods",
                        ));
                    }
                    _ => {
                        return Err(SocksClientError::Protocol(
                            "the proxy chose a method that was not offered",
                        ));
                    }
                };
                Ok(Parse::Done(next, used))
            }
            State::Auth => {
                let parsed = parse(buf, "SOCKS5 authentication status", |r| {
                    Ok(match r.take_array::<2>()? {
                        [AUTH_VERSION, 0] => Ok(()),
                        [AUTH_VERSION, _] => Err(SocksClientError::Protocol(
                            "the proxy refused the username/password",
                        )),
                        _ => Err(SocksClientError::Protocol("bad authentication reply")),
                    })
                })?;
                let Parse::Done((), used) = parsed else {
                    return Ok(into_more(parsed));
                };
                progress.send.extend(encode_socks5(&self.req)?);
                self.needed = 4;
                Ok(Parse::Done(State::Reply5, used))
            }
            State::Reply5 => {
                let parsed = parse(buf, "SOCKS5 reply", |r| {
                    let [ver, code, _rsv] = r.take_array::<3>()?;
                    if ver != SOCKS5 {
                        return Ok(Err(SocksClientError::Protocol("bad reply version")));
                    }
                    Ok(match wire::read_target(r)? {
                        Ok(Target::Ip(a)) => Ok(Reply {
                            code,
                            addr: Some(a),
                        }),
                        Ok(Target::Host(..)) | Err(AddrProblem::BadHost) => {
                            Ok(Reply { code, addr: None })
                        }
                        Err(AddrProblem::AddressType(_)) => {
                            Err(SocksClientError::Protocol("bad reply address type"))
                        }
                    })
                })?;
                self.finish(parsed, progress)
            }
            State::Reply4 => {
                let parsed = parse(buf, "SOCKS4 reply", |r| {
                    let [vn, cd, _, _, _, _, _, _] = r.take_array::<8>()?;
                    Ok(match (vn, cd) {
                        (0, reply4::GRANTED) => Ok(Reply {
                            code: 0,
                            addr: None,
                        }),
                        (0, cd) => Ok(Reply {
                            code: cd.max(1),
                            addr: None,
                        }),
                        _ => Err(SocksClientError::Protocol("bad SOCKS4 reply version")),
                    })
                })?;
                self.finish(parsed, progress)
            }
            State::Done => Ok(Parse::More(0)),
        }
    }

    fn finish(
        &mut self,
        parsed: Parse<Reply>,
        progress: &mut ClientProgress,
    ) -> Result<Parse<State>, SocksClientError> {
        match parsed {
            Parse::Done(reply, used) => {
                progress.reply = Some(reply);
                Ok(Parse::Done(State::Done, used))
            }
            Parse::More(n) => Ok(Parse::More(n)),
        }
    }
}

fn into_more<T>(p: Parse<T>) -> Parse<State> {
    match p {
        Parse::More(n) => Parse::More(n),
        Parse::Done(..) => Parse::More(1),
    }
}

fn encode_auth(req: &ClientRequest) -> Result<Vec<u8>, SocksClientError> {
    let Some((user, pass)) = &req.auth else {
        return Ok(Vec::new());
    };
    let mut buf = [0u8; 3 + 255 + 255];
    let mut w = Writer::for_object(&mut buf, "SOCKS5 username/password");
    w.write_u8(AUTH_VERSION)
        .and_then(|()| w.write_u8len(user))
        .and_then(|()| w.write_u8len(pass))
        .map_err(|_| SocksClientError::BadRequest("username or password longer than 255 bytes"))?;
    let n = w.position();
    Ok(buf.get(..n).unwrap_or_default().to_vec())
}

fn encode_socks5(req: &ClientRequest) -> Result<Vec<u8>, SocksClientError> {
    let cmd = match req.command {
        SocksCommand::Connect => CMD_CONNECT,
        SocksCommand::Resolve => CMD_RESOLVE,
    };
    let mut buf = [0u8; 4 + 1 + 255 + 2 + 16];
    let mut w = Writer::for_object(&mut buf, "SOCKS5 request");
    w.write_all(&[SOCKS5, cmd, 0])
        .and_then(|()| wire::write_target(&mut w, &req.target))
        .map_err(|_| SocksClientError::BadRequest("host name longer than 255 bytes"))?;
    let n = w.position();
    Ok(buf.get(..n).unwrap_or_default().to_vec())
}

fn encode_socks4(req: &ClientRequest) -> Result<Vec<u8>, SocksClientError> {
    if req.command != SocksCommand::Connect {
        return Err(SocksClientError::BadRequest("SOCKS4 has no RESOLVE"));
    }
    let user = match &req.auth {
        Some((u, p)) if p.is_empty() => u.as_slice(),
        Some(_) => return Err(SocksClientError::BadRequest("SOCKS4 has no password")),
        None => &[],
    };
    if user.len() > MAX_SOCKS4_USER_LEN || user.contains(&0) {
        return Err(SocksClientError::BadRequest("bad SOCKS4 user id"));
    }
    let mut v = vec![SOCKS4, CMD_CONNECT];
    match &req.target {
        Target::Ip(SocketAddr::V4(a)) => {
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(user);
            v.push(0);
        }
        Target::Ip(SocketAddr::V6(_)) => {
            return Err(SocksClientError::BadRequest("SOCKS4 has no IPv6"));
        }
        Target::Host(h, port) => {
            if h.is_empty() || h.len() > MAX_HOST_LEN || h.as_bytes().contains(&0) {
                return Err(SocksClientError::BadRequest("bad host name"));
            }
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, 1]);
            v.extend_from_slice(user);
            v.push(0);
            v.extend_from_slice(h.as_bytes());
            v.push(0);
        }
    }
    Ok(v)
}

/// Run the handshake for `req` on `stream`, reading exactly the proxy's messages. A refusal is
/// [`SocksClientError::Reply`].
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    req: ClientRequest,
) -> Result<Reply, SocksClientError> {
    let (mut hs, first) = ClientHandshake::new(req)?;
    stream.write_all(&first).await?;
    let mut buf = [0u8; MAX_REPLY];
    loop {
        let n = hs.bytes_needed().clamp(1, MAX_REPLY);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        stream.read_exact(chunk).await?;
        let p = hs.handle(chunk)?;
        if !p.send.is_empty() {
            stream.write_all(&p.send).await?;
        }
        if let Some(reply) = p.reply {
            return match reply.code {
                0 => Ok(reply),
                code => Err(SocksClientError::Reply(code)),
            };
        }
    }
}

/// Connect to the proxy at `proxy` and run `req`, all within `timeout`.
pub async fn request(
    proxy: SocketAddr,
    req: ClientRequest,
    timeout: Duration,
) -> Result<(TcpStream, Reply), SocksClientError> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(proxy).await?;
        s.set_nodelay(true)?;
        let reply = handshake(&mut s, req).await?;
        Ok((s, reply))
    })
    .await
    .map_err(|_| SocksClientError::Timeout)?
}

/// Open a stream to `host:port` through the SOCKS5 proxy at `proxy`; the name is sent
/// unresolved (ATYP 3), so the exit resolves it.
pub async fn connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<TcpStream, SocksClientError> {
    let req = ClientRequest::connect(Target::Host(host.to_owned(), port), auth);
    Ok(request(proxy, req, timeout).await?.0)
}

/// Resolve `host` at an exit with Tor's RESOLVE (`0xF0`) extension.
pub async fn resolve(
    proxy: SocketAddr,
    host: &str,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<IpAddr, SocksClientError> {
    let (_, reply) = request(proxy, ClientRequest::resolve(host, auth), timeout).await?;
    reply.addr.map(|a| a.ip()).ok_or(SocksClientError::Protocol(
        "RESOLVE answered without an address",
    ))
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
