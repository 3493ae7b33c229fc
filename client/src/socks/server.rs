//! The SOCKS listener: a connection semaphore, a handshake timeout, then one task per client.
//!
//! This is a thin driver: the handshake is [`super::handshake::ServerHandshake`]. Bytes are
//! peeked from the socket, given to the state machine, and only the bytes it consumed are
//! then read out, so whatever the application sends after its request stays in the socket for
//! the stream. Requests are then carried out on circuits and streams; every reply code comes
//! from [`reply_code_for`]. Destinations and credentials are never logged.
//!
//! [`open_and_splice`] is the one stream-open path of the SOCKS and HTTP CONNECT ports (and
//! [`resolve`] of SOCKS RESOLVE): every request is a control-port stream
//! ([`crate::control::StreamTrack`]) from `NEW` to `CLOSED`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::handshake::{
    HandshakeError, MAX_MESSAGE, Outcome, ServerHandshake, SocksCommand, SocksRequest,
};
use super::wire::{Target, reply};
use crate::circ::{Circuit, StreamEvent};
use crate::circmgr::CircMgr;
use crate::control::{StreamTrack, control_target, stream_reason};
use crate::isolation::IsolationKey;
use crate::local_limits::{Admitted, LocalLimits, PerSource, Turn};
use crate::metrics::Outcome as Ended;
use crate::stream::{self, OpenError};

/// Unsent bytes the kernel may hold for an application's socket before a stream's downstream
/// writer waits (`TCP_NOTSENT_LOWAT`, Linux only). Without it an application that never reads
/// makes the kernel take megabytes per stream (about 2.9 MiB on Linux loopback with a 4 KiB
/// receive buffer) that all count as consumed, so no XOFF stops the exit and the circuits pull
/// that much through the guard link the proxy's other users share. Bytes in flight still grow
/// with the connection's window (a remote application over a LAN is not slowed down).
pub(crate) const APP_NOTSENT_LOWAT: u32 = 64 * 1024;

/// Keep at most [`APP_NOTSENT_LOWAT`] unsent bytes in the kernel for an application's socket
/// (best effort: a failure is logged at debug level and the kernel's default applies).
pub(crate) fn limit_unsent(sock: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(sock).set_tcp_notsent_lowat(APP_NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT on an application socket");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = sock;
}

/// Most attempts to open one stream on different circuits.
const STREAM_ATTEMPTS: usize = 3;
/// Longest a SOCKS client waits for its reply once its request is read (circuit builds and
/// BEGIN included).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Accept SOCKS clients until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    mgr: Arc<CircMgr>,
    shutdown: watch::Receiver<bool>,
) {
    let m = Arc::clone(&mgr);
    accept_client_port(listener, &mgr, "SOCKS", shutdown, move |sock, adm| {
        handle(Arc::clone(&m), sock, adm)
    })
    .await;
}

/// [`accept_loop`] for a port whose limits are the proxy's (`max_socks_connections` in all,
/// the per-source limits of the live configuration), with unsent data bounded on every
/// connection: the SOCKS and HTTP CONNECT ports.
pub(crate) async fn accept_client_port<F, Fut>(
    listener: TcpListener,
    mgr: &Arc<CircMgr>,
    port: &'static str,
    shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, Admitted) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let live = Arc::clone(mgr);
    accept_loop(
        listener,
        mgr.config().max_socks_connections,
        port,
        shutdown,
        Arc::clone(&mgr.local),
        move || PerSource::with_wait(&live.config()),
        move |sock, adm| {
            limit_unsent(&sock);
            serve(sock, adm)
        },
    )
    .await;
}

/// Accept connections on a client port until shutdown, at most `limit` served at once, each by
/// `serve` on its own task (with TCP_NODELAY set). `port` names the port in the warning an
/// accept failure leaves; after one (out of file descriptors and the like) the loop waits a
/// little instead of spinning. The SOCKS, HTTP CONNECT and DNS-over-TCP ports share it.
///
/// A connection whose source address already holds `per_source().0` connections is closed at
/// once ([`crate::local_limits`]): the global `limit` is a queue (further connections wait to be
/// accepted), so without the per-source limits one program could hold every slot and the others
/// would wait for as long as it keeps them. Handshakes beyond the source's limit wait their turn
/// (at most `per_source().1`, the handshake timeout) before `serve` runs.
#[allow(clippy::too_many_arguments)] // the three client ports call it alike
pub(crate) async fn accept_loop<F, Fut, L>(
    listener: TcpListener,
    limit: usize,
    port: &'static str,
    mut shutdown: watch::Receiver<bool>,
    local: Arc<LocalLimits>,
    per_source: L,
    serve: F,
) where
    F: Fn(TcpStream, Admitted) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    L: Fn() -> (PerSource, std::time::Duration),
{
    let serve = Arc::new(serve);
    let sem = Arc::new(Semaphore::new(limit));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&sem).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting a {port} connection failed: {e}");
                #[allow(clippy::disallowed_methods)] // the listener is a tokio driver
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (per, wait) = per_source();
        let Some(admitted) = Admitted::admit(&local, peer.ip(), &per) else {
            tracing::debug!("a {port} connection refused at a per-source limit");
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let serve = Arc::clone(&serve);
        tokio::spawn(async move {
            // Queued behind the source's other handshakes (never another source's).
            if let Some(admitted) = admitted.wait_handshake(&per, wait).await {
                serve(sock, admitted).await;
            } else {
                tracing::debug!("a {port} connection waited too long for its handshake turn");
            }
            drop(permit);
        });
    }
}

async fn handle(mgr: Arc<CircMgr>, mut sock: TcpStream, mut adm: Admitted) {
    let t = mgr.config().socks_handshake_timeout;
    let tunnel = mgr.config().http_tunnel_port.filter(|a| a.port() != 0);
    let read = tokio::time::timeout(t, read_request(&mut sock, tunnel)).await;
    adm.handshake_done();
    let req = match read {
        Ok(Ok(Ok(req))) => req,
        Ok(Ok(Err(e))) => {
            tracing::debug!("SOCKS request refused: {e}");
            mgr.metrics.socks(if e == HandshakeError::HttpRequest {
                Ended::WrongProtocol
            } else {
                Ended::Refused
            });
            if e == HandshakeError::HttpRequest {
                // The 501 page is sent: let the client read it instead of resetting.
                crate::http_tunnel::close_gently(sock).await;
            }
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("SOCKS handshake failed: {e}");
            mgr.metrics.socks(Ended::Refused);
            return;
        }
        Err(_) => {
            tracing::debug!("SOCKS handshake timed out");
            mgr.metrics.socks(Ended::Timeout);
            return;
        }
    };
    match req.command {
        SocksCommand::Connect => connect(&mgr, sock, &req).await,
        SocksCommand::Resolve => {
            let bytes = match resolve(&mgr, &req.target, &req.isolation, Some(adm.ip())).await {
                Ok(ip) => {
                    mgr.metrics.socks(Ended::Success);
                    req.reply(reply::SUCCEEDED, Some(SocketAddr::new(ip, 0)))
                }
                Err(f) => {
                    mgr.metrics.socks(outcome_of(&f));
                    req.reply(reply_code_for(&f), None)
                }
            };
            let _ = sock.write_all(&bytes).await;
        }
    }
}

/// Run the handshake on `sock` up to the request: peek, let the state machine consume, read
/// out exactly what it consumed, send what it says. A refusal's reply is sent here.
async fn read_request(
    sock: &mut TcpStream,
    http_tunnel: Option<SocketAddr>,
) -> io::Result<Result<SocksRequest, HandshakeError>> {
    let mut hs = ServerHandshake::new().with_http_tunnel(http_tunnel);
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let n = sock.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let p = hs.handle(buf.get(..n).unwrap_or_default());
        if p.consumed == 0 && p.outcome.is_none() {
            // The state machine always takes some of a non-empty input while it is not
            // done; never spin on a peek.
            return Err(io::Error::other("SOCKS handshake made no progress"));
        }
        if let Some(taken) = buf.get_mut(..p.consumed) {
            sock.read_exact(taken).await?;
        }
        if !p.send.is_empty() {
            sock.write_all(&p.send).await?;
        }
        match p.outcome {
            Some(Outcome::Request(r)) => return Ok(Ok(r)),
            Some(Outcome::Refused(e)) => return Ok(Err(e)),
            None => {}
        }
    }
}

/// Whether a request is for the onion-service namespace (`*.allium.alt`, valid or not).
pub(crate) fn is_onion_target(target: &Target) -> bool {
    matches!(target, Target::Host(h, _) if allium_crypto::hs::is_hs_hostname(h))
}

/// Warn (at most once a minute) that an application gave an IP literal.
#[allow(clippy::disallowed_methods)] // a rate limit for a log line, in the tokio driver
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

/// CONNECT: open the stream, reply, then splice the socket to it. With `socks_optimistic` the
/// reply goes out as soon as BEGIN is queued, so the application's first bytes follow BEGIN.
/// A `.allium.alt` name goes to the onion-service client ([`open`]), never to an exit.
async fn connect(mgr: &CircMgr, sock: TcpStream, req: &SocksRequest) {
    warn_ip_literal(&req.target);
    let optimistic = mgr.config().socks_optimistic;
    let ok = req.reply(reply::SUCCEEDED, None);
    open_and_splice(
        mgr,
        sock,
        &req.target,
        &req.isolation,
        optimistic,
        Front::Socks,
        &ok,
        |f| req.reply(reply_code_for(f), None),
    )
    .await;
}

/// Which port a request came in on (its metrics, and how a refused connection is closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Front {
    /// The SOCKS port.
    Socks,
    /// The HTTP CONNECT tunnel port.
    Tunnel,
}

impl Front {
    fn record(self, mgr: &CircMgr, o: Ended) {
        match self {
            Self::Socks => mgr.metrics.socks(o),
            Self::Tunnel => mgr.metrics.tunnel(o),
        }
    }
}

/// Open a stream to `target` for a client of `front`, send it `ok` and splice the socket to
/// the stream; or, on failure, send it `fail(..)` (and, for HTTP, let it read that before the
/// close). The stream is on the control port from its request to its end.
#[allow(clippy::too_many_arguments)] // one call per front end; a struct would only rename them
pub(crate) async fn open_and_splice(
    mgr: &CircMgr,
    mut sock: TcpStream,
    target: &Target,
    iso: &IsolationKey,
    optimistic: bool,
    front: Front,
    ok: &[u8],
    fail: impl FnOnce(&Failure) -> Vec<u8>,
) {
    let src = sock.peer_addr().ok().map(|a| a.ip());
    match open(mgr, target, iso, optimistic, src).await {
        Ok(o) => {
            front.record(mgr, Ended::Success);
            if sock.write_all(ok).await.is_err() {
                o.circ
                    .end_stream(o.sid, allium_proto::relaymsg::EndReason::MISC)
                    .await;
                return;
            }
            let _peer = PeerGuard::new(mgr, &sock, &o.circ);
            // Held until the stream ends: then CLOSED.
            let _track = o.track;
            stream::splice(o.circ, o.sid, o.rx, sock).await;
        }
        Err(f) => {
            front.record(mgr, outcome_of(&f));
            let _ = sock.write_all(&fail(&f)).await;
            if front == Front::Tunnel {
                crate::http_tunnel::close_gently(sock).await;
            }
        }
    }
}

/// Why a request could not be carried out.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No exit in the consensus accepts the port (`has_dir`: whether a consensus is held).
    NoExit {
        /// Whether the proxy holds a consensus at all.
        has_dir: bool,
    },
    /// No circuit could be had.
    NoCircuit(crate::ClientError),
    /// The stream layer chose this SOCKS5 reply (END reason, RESOLVED error, exit timeout).
    Stream(u8),
    /// Circuits failed under the request [`STREAM_ATTEMPTS`] times.
    Exhausted,
    /// No answer within [`OPEN_TIMEOUT`].
    TimedOut,
    /// RESOLVED held no address.
    NoAddress,
    /// Reaching an onion service failed (its reply is Tor's extended code for why).
    Onion(crate::onion::OnionError),
}

/// The metrics outcome of a failure.
pub(crate) fn outcome_of(f: &Failure) -> Ended {
    match f {
        Failure::NoExit { .. } => Ended::NoExit,
        Failure::TimedOut | Failure::Onion(crate::onion::OnionError::Timeout) => Ended::Timeout,
        _ => Ended::Failed,
    }
}

/// The SOCKS5 reply code for a failure (SOCKS4 replies "rejected" for every one). The one
/// place where reply codes are chosen; docs/protocol/95-client.md has the table.
pub(crate) fn reply_code_for(f: &Failure) -> u8 {
    if let Failure::NoCircuit(e) = f {
        tracing::debug!("no circuit for a SOCKS request: {e}");
    }
    match f {
        Failure::NoExit { has_dir: true } => reply::NOT_ALLOWED,
        Failure::NoExit { has_dir: false } => reply::GENERAL_FAILURE,
        Failure::NoCircuit(e) => e.socks_reply(),
        Failure::Stream(code) => *code,
        Failure::Exhausted => reply::GENERAL_FAILURE,
        Failure::TimedOut => reply::TTL_EXPIRED,
        Failure::NoAddress => reply::HOST_UNREACHABLE,
        Failure::Onion(e) => e.socks_reply(),
    }
}

/// Records which circuit a SOCKS client's stream uses, for as long as the stream lives.
pub(crate) struct PeerGuard<'a> {
    mgr: &'a CircMgr,
    peer: Option<SocketAddr>,
}

impl<'a> PeerGuard<'a> {
    pub(crate) fn new(mgr: &'a CircMgr, sock: &TcpStream, circ: &Circuit) -> Self {
        let peer = sock.peer_addr().ok();
        if let Some(p) = peer {
            mgr.note_peer(p, circ.id);
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

/// An open stream: its circuit, id and event queue, and its control-port record.
pub(crate) struct Opened {
    pub(crate) circ: Arc<Circuit>,
    pub(crate) sid: u16,
    pub(crate) rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    pub(crate) track: StreamTrack,
}

/// Open a stream to `target`, retrying on another circuit when one fails under us; never
/// longer than [`OPEN_TIMEOUT`] in all. `optimistic`: do not wait for CONNECTED. `src`: the
/// local source address, whose circuit requests take turns ([`circuit_turn`]).
pub(crate) async fn open(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
    optimistic: bool,
    src: Option<IpAddr>,
) -> Result<Opened, Failure> {
    let mut track = StreamTrack::new(&mgr.control, control_target(target), false);
    let opened = tokio::time::timeout(
        OPEN_TIMEOUT,
        open_inner(mgr, target, iso, optimistic, src, &mut track),
    )
    .await
    .unwrap_or(Err(Failure::TimedOut));
    match opened {
        Ok((circ, sid, rx)) => {
            track.succeeded();
            Ok(Opened {
                circ,
                sid,
                rx,
                track,
            })
        }
        Err(f) => {
            track.failed(stream_reason(&f));
            Err(f)
        }
    }
}

/// Wait for `src`'s turn to ask the manager for a circuit that is not ready (no source: no
/// turn): at most `max_circuit_requests_per_source` of one source at once, so that one
/// program's burst does not queue ahead of every other program's requests for the builds.
async fn circuit_turn(mgr: &CircMgr, src: Option<IpAddr>) -> Option<Turn> {
    let ip = src?;
    let per = PerSource::from_config(&mgr.config());
    Some(mgr.local.circuit_request(ip, &per).await)
}

async fn open_inner(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
    optimistic: bool,
    src: Option<IpAddr>,
    track: &mut StreamTrack,
) -> Result<(Arc<Circuit>, u16, tokio::sync::mpsc::Receiver<StreamEvent>), Failure> {
    if let Target::Host(host, port) = target
        && is_onion_target(target)
    {
        // An onion service: the rendezvous client, never an exit.
        let (circ, sid, rx) = crate::onion::clidrv::open_stream(mgr, host, *port, iso, optimistic)
            .await
            .map_err(|e| match e {
                crate::ClientError::Onion(e) => Failure::Onion(e),
                e => Failure::Stream(e.socks_reply()),
            })?;
        track.sent(circ.control_id());
        return Ok((circ, sid, rx));
    }
    let port = target.port();
    if !mgr.exit_exists(port) {
        return Err(Failure::NoExit {
            has_dir: mgr.has_dir(),
        });
    }
    for _ in 0..STREAM_ATTEMPTS {
        let got = match mgr.ready_circuit(Some(port), iso) {
            Some(c) => Ok(c),
            None => {
                let _turn = circuit_turn(mgr, src).await;
                mgr.get_circuit(Some(port), iso).await
            }
        };
        let circ = match got {
            Ok(c) => c,
            Err(e) => return Err(Failure::NoCircuit(e)),
        };
        track.sent(circ.control_id());
        let opened = if optimistic {
            stream::begin_optimistic(&circ, target).await
        } else {
            stream::begin(&circ, target).await
        };
        match opened {
            Ok((sid, rx)) => return Ok((circ, sid, rx)),
            Err(OpenError::Reply(code)) => return Err(Failure::Stream(code)),
            Err(OpenError::Retry) => continue,
        }
    }
    Err(Failure::Exhausted)
}

/// Resolve `target` at an exit, within [`OPEN_TIMEOUT`].
async fn resolve(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
    src: Option<IpAddr>,
) -> Result<std::net::IpAddr, Failure> {
    let mut track = StreamTrack::new(&mgr.control, control_target(target), true);
    let r = tokio::time::timeout(
        OPEN_TIMEOUT,
        resolve_inner(mgr, target, iso, src, &mut track),
    )
    .await
    .unwrap_or(Err(Failure::TimedOut));
    match &r {
        Ok(_) => track.succeeded(),
        Err(f) => track.failed(stream_reason(f)),
    }
    r
}

async fn resolve_inner(
    mgr: &CircMgr,
    target: &Target,
    iso: &IsolationKey,
    src: Option<IpAddr>,
    track: &mut StreamTrack,
) -> Result<std::net::IpAddr, Failure> {
    if let Target::Ip(a) = target {
        return Ok(a.ip());
    }
    if is_onion_target(target) {
        // An onion service has no address, and its name never goes to an exit's resolver.
        return Err(Failure::NoAddress);
    }
    for _ in 0..STREAM_ATTEMPTS {
        let got = match mgr.ready_circuit(None, iso) {
            Some(c) => Ok(c),
            None => {
                let _turn = circuit_turn(mgr, src).await;
                mgr.get_circuit(None, iso).await
            }
        };
        let circ = got.map_err(Failure::NoCircuit)?;
        track.sent(circ.control_id());
        match stream::resolve(&circ, &target.host_string()).await {
            Ok(v) => {
                // Prefer IPv4, as Tor does for SOCKS RESOLVE.
                let ip = v.iter().find(|a| a.is_ipv4()).or(v.first()).copied();
                return ip.ok_or(Failure::NoAddress);
            }
            Err(OpenError::Reply(code)) => return Err(Failure::Stream(code)),
            Err(OpenError::Retry) => continue,
        }
    }
    Err(Failure::Exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An application that never reads (4 KiB receive buffer, as in the attack suite): its
    /// socket takes a few tens of KiB from the proxy, not the megabytes the kernel would queue
    /// otherwise (which count as consumed, so no XOFF would stop the exit).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn an_application_that_never_reads_holds_little_in_the_kernel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = tokio::net::TcpSocket::new_v4().unwrap();
        app.set_recv_buffer_size(4096).unwrap();
        let _never_reads = app.connect(listener.local_addr().unwrap()).await.unwrap();
        let (sock, _) = listener.accept().await.unwrap();
        limit_unsent(&sock);
        let buf = vec![0u8; 64 * 1024];
        let mut taken = 0usize;
        while taken < 64 << 20 {
            match sock.try_write(&buf) {
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let room = tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        sock.writable(),
                    );
                    if room.await.is_err() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            taken > 0 && taken <= 4 * APP_NOTSENT_LOWAT as usize,
            "{taken} bytes queued in the kernel for an application that never reads"
        );
    }

    #[test]
    fn reply_codes_come_from_one_table() {
        assert_eq!(reply_code_for(&Failure::NoExit { has_dir: true }), 0x02);
        assert_eq!(reply_code_for(&Failure::NoExit { has_dir: false }), 0x01);
        let e = crate::ClientError::NoPath("no exit");
        assert_eq!(reply_code_for(&Failure::NoCircuit(e)), 0x01);
        assert_eq!(reply_code_for(&Failure::Stream(0x05)), 0x05);
        assert_eq!(reply_code_for(&Failure::Exhausted), 0x01);
        assert_eq!(reply_code_for(&Failure::TimedOut), 0x06);
        assert_eq!(reply_code_for(&Failure::NoAddress), 0x04);
        let e = crate::onion::OnionError::MissingClientAuth;
        assert_eq!(reply_code_for(&Failure::Onion(e)), 0xF4);
        let t = crate::onion::OnionError::Timeout;
        assert_eq!(outcome_of(&Failure::Onion(t)), Ended::Timeout);
    }
}
