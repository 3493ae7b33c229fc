//! The SOCKS listener: a connection semaphore, a handshake timeout, then one task per client.
//!
//! SOCKS5 authentication and CONNECT go through fast-socks5's protocol-level API only (design
//! §7): `Socks5ServerProtocol::start(..).negotiate_auth(..)`, `read_command`, `reply_success` /
//! `reply_error`. Because fast-socks5 cannot parse Tor's RESOLVE (`0xF0`), the request bytes are
//! read (exactly, never more) and parsed by [`super::wire`] first; CONNECT requests are then
//! replayed into fast-socks5 through [`Rewind`]. SOCKS4/4a is parsed by [`super::wire`] too.
//! Destinations and credentials are never logged.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use fast_socks5::server::{
    AuthMethodSuccessState as _, Socks5ServerProtocol, StandardAuthentication,
    StandardAuthenticationStarted,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::wire::{
    self, CMD_CONNECT, CMD_RESOLVE, Socks5Request, SocksParseError, Target, reply, reply_error,
    socks4_reply, socks5_reply,
};
use crate::circ::{Circuit, StreamEvent};
use crate::circmgr::CircMgr;
use crate::isolation::IsolationKey;
use crate::stream::{self, OpenError};

/// Most attempts to open one stream on different circuits.
const STREAM_ATTEMPTS: usize = 3;
/// Longest a SOCKS client waits for its reply once its request is read (circuit builds and
/// BEGIN included).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Accept SOCKS clients until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    mgr: Arc<CircMgr>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sem = Arc::new(Semaphore::new(mgr.config().max_socks_connections));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&sem).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let sock = match accepted {
            Ok((s, _peer)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!("accepting a SOCKS connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let mgr = Arc::clone(&mgr);
        tokio::spawn(async move {
            handle(mgr, sock).await;
            drop(permit);
        });
    }
}

async fn handle(mgr: Arc<CircMgr>, sock: TcpStream) {
    let t = mgr.config().socks_handshake_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout(t, sock.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    match first[0] {
        5 => socks5(mgr, sock).await,
        4 => socks4(mgr, sock).await,
        _ => tracing::debug!("not a SOCKS4 or SOCKS5 client; closing"),
    }
}

/// Errors during the SOCKS handshake (nothing sensitive inside).
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("socks: {0}")]
    Socks(#[from] fast_socks5::server::SocksServerError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("request: {0}")]
    Parse(#[from] SocksParseError),
}

async fn socks5_handshake(
    sock: &mut TcpStream,
) -> Result<(IsolationKey, Vec<u8>, Socks5Request), HandshakeError> {
    let started = Socks5ServerProtocol::start(&mut *sock)
        .negotiate_auth(StandardAuthentication::allow_no_auth(true))
        .await?;
    let iso = match started {
        StandardAuthenticationStarted::NoAuthentication(a) => {
            let _ = a.finish_auth();
            IsolationKey::NoAuth
        }
        StandardAuthenticationStarted::PasswordAuthentication(a) => {
            let (user, pass, a) = a.read_username_password().await?;
            let _ = a.accept().await?.finish_auth();
            IsolationKey::credentials(user, pass)
        }
    };
    // Read exactly the request: every form is at least 7 bytes; 5 tell the whole length.
    let mut buf = vec![0u8; 5];
    sock.read_exact(&mut buf).await?;
    let len = match wire::socks5_request_len(&buf) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(SocksParseError::AddressType.into()),
        Err(e) => {
            let _ = sock
                .write_all(&socks5_reply(reply::ADDRESS_TYPE_NOT_SUPPORTED, None))
                .await;
            return Err(e.into());
        }
    };
    buf.resize(len, 0);
    if let Some(rest) = buf.get_mut(5..) {
        sock.read_exact(rest).await?;
    }
    match wire::parse_socks5_request(&buf) {
        Ok(Some((req, _))) => Ok((iso, buf, req)),
        Ok(None) => Err(SocksParseError::AddressType.into()),
        Err(e) => {
            let _ = sock
                .write_all(&socks5_reply(reply::GENERAL_FAILURE, None))
                .await;
            Err(e.into())
        }
    }
}

/// Warn (at most once a minute) that an application gave an IP literal.
fn warn_ip_literal(target: &Target) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    if !target.is_ip() {
        return;
    }
    let now = std::time::Instant::now();
    let due = LAST.lock().is_ok_and(|mut last| {
        let due = last.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(60));
        if due {
            *last = Some(now);
        }
        due
    });
    if due {
        tracing::warn!(
            "a SOCKS client asked for an IP address instead of a host name; the application may have \
             resolved the name itself and leaked it to its DNS server (address not logged). Use \
             socks5h:// or --socks5-hostname. (Shown at most once a minute.)"
        );
    } else {
        tracing::debug!("a SOCKS client asked for an IP address (address not logged)");
    }
}

async fn socks5(mgr: Arc<CircMgr>, mut sock: TcpStream) {
    let t = mgr.config().socks_handshake_timeout;
    let (iso, req_bytes, req) = match tokio::time::timeout(t, socks5_handshake(&mut sock)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!("SOCKS5 handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("SOCKS5 handshake timed out");
            return;
        }
    };
    match req.cmd {
        CMD_CONNECT => {
            let rewind = Rewind::new(req_bytes, &mut sock);
            let proto = match Socks5ServerProtocol::skip_auth_this_is_not_rfc_compliant(rewind)
                .read_command()
                .await
            {
                Ok((proto, _cmd, _addr)) => proto,
                Err(e) => {
                    tracing::debug!("SOCKS5 request rejected: {e}");
                    return;
                }
            };
            warn_ip_literal(&req.target);
            match open(&mgr, &req.target, &iso).await {
                Ok((circ, sid, rx)) => {
                    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                    if proto.reply_success(unspecified).await.is_err() {
                        circ.end_stream(sid, allium_proto::relaymsg::EndReason::MISC)
                            .await;
                        return;
                    }
                    let _peer = PeerGuard::new(&mgr, &sock, &circ);
                    stream::splice(circ, sid, rx, sock).await;
                }
                Err(code) => {
                    let _ = proto.reply_error(&reply_error(code)).await;
                }
            }
        }
        CMD_RESOLVE => {
            let r = resolve(&mgr, &req.target, &iso).await;
            let bytes = match r {
                Ok(ip) => socks5_reply(reply::SUCCEEDED, Some(SocketAddr::new(ip, 0))),
                Err(code) => socks5_reply(code, None),
            };
            let _ = sock.write_all(&bytes).await;
        }
        _ => {
            let _ = sock
                .write_all(&socks5_reply(reply::COMMAND_NOT_SUPPORTED, None))
                .await;
        }
    }
}

async fn socks4(mgr: Arc<CircMgr>, mut sock: TcpStream) {
    let t = mgr.config().socks_handshake_timeout;
    let read = async {
        let mut buf = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        loop {
            match wire::parse_socks4_request(&buf) {
                Ok(Some((req, _))) => return Ok(req),
                Ok(None) => {}
                Err(e) => return Err(HandshakeError::from(e)),
            }
            sock.read_exact(&mut byte).await?;
            buf.push(byte[0]);
        }
    };
    let Ok(Ok(req)) = tokio::time::timeout(t, read).await else {
        let _ = sock.write_all(&socks4_reply(false)).await;
        return;
    };
    if req.cmd != 1 {
        let _ = sock.write_all(&socks4_reply(false)).await;
        return;
    }
    warn_ip_literal(&req.target);
    let iso = if req.user.is_empty() {
        IsolationKey::NoAuth
    } else {
        IsolationKey::credentials(req.user, Vec::new())
    };
    match open(&mgr, &req.target, &iso).await {
        Ok((circ, sid, rx)) => {
            if sock.write_all(&socks4_reply(true)).await.is_err() {
                circ.end_stream(sid, allium_proto::relaymsg::EndReason::MISC)
                    .await;
                return;
            }
            let _peer = PeerGuard::new(&mgr, &sock, &circ);
            stream::splice(circ, sid, rx, sock).await;
        }
        Err(_) => {
            let _ = sock.write_all(&socks4_reply(false)).await;
        }
    }
}

/// Records which circuit a SOCKS client's stream uses, for as long as the stream lives.
struct PeerGuard<'a> {
    mgr: &'a CircMgr,
    peer: Option<SocketAddr>,
}

impl<'a> PeerGuard<'a> {
    fn new(mgr: &'a CircMgr, sock: &TcpStream, circ: &Circuit) -> Self {
        let peer = sock.peer_addr().ok();
        if let Some(p) = peer {
            mgr.note_peer(p, circ.id.get());
        }
        Self { mgr, peer }
    }
}

impl Drop for PeerGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.peer {
            self.mgr.forget_peer(p);
        }
    }
}

type Opened = (Arc<Circuit>, u16, tokio::sync::mpsc::Receiver<StreamEvent>);

/// Open a stream to `target`, retrying on another circuit when one fails under us; never
/// longer than [`OPEN_TIMEOUT`] in all.
async fn open(mgr: &CircMgr, target: &Target, iso: &IsolationKey) -> Result<Opened, u8> {
    tokio::time::timeout(OPEN_TIMEOUT, open_inner(mgr, target, iso))
        .await
        .unwrap_or(Err(reply::TTL_EXPIRED))
}

async fn open_inner(mgr: &CircMgr, target: &Target, iso: &IsolationKey) -> Result<Opened, u8> {
    let port = target.port();
    if !mgr.exit_exists(port) {
        return Err(if mgr.has_dir() {
            reply::NOT_ALLOWED
        } else {
            reply::GENERAL_FAILURE
        });
    }
    for _ in 0..STREAM_ATTEMPTS {
        let circ = match mgr.get_circuit(Some(port), iso).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("no circuit for a stream: {e}");
                return Err(reply::GENERAL_FAILURE);
            }
        };
        match stream::begin(&circ, target).await {
            Ok((sid, rx)) => return Ok((circ, sid, rx)),
            Err(OpenError::Reply(code)) => return Err(code),
            Err(OpenError::Retry) => continue,
        }
    }
    Err(reply::GENERAL_FAILURE)
}

/// Resolve `target` at an exit, within [`OPEN_TIMEOUT`].
async fn resolve(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
) -> Result<std::net::IpAddr, u8> {
    tokio::time::timeout(OPEN_TIMEOUT, resolve_inner(mgr, target, iso))
        .await
        .unwrap_or(Err(reply::TTL_EXPIRED))
}

async fn resolve_inner(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
) -> Result<std::net::IpAddr, u8> {
    if let Target::Ip(a) = target {
        return Ok(a.ip());
    }
    for _ in 0..STREAM_ATTEMPTS {
        let circ = mgr
            .get_circuit(None, iso)
            .await
            .map_err(|_| reply::GENERAL_FAILURE)?;
        match stream::resolve(&circ, &target.host_string()).await {
            Ok(v) => {
                // Prefer IPv4, as Tor does for SOCKS RESOLVE.
                let ip = v.iter().find(|a| a.is_ipv4()).or(v.first()).copied();
                return ip.ok_or(reply::HOST_UNREACHABLE);
            }
            Err(OpenError::Reply(code)) => return Err(code),
            Err(OpenError::Retry) => continue,
        }
    }
    Err(reply::GENERAL_FAILURE)
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go to `inner`.
pub(crate) struct Rewind<'a> {
    prefix: Vec<u8>,
    pos: usize,
    inner: &'a mut TcpStream,
}

impl<'a> Rewind<'a> {
    fn new(prefix: Vec<u8>, inner: &'a mut TcpStream) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Rewind<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
