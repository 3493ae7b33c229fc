//! The authority's HTTP server (hyper HTTP/1.1 under an axum router).
//!
//! Every connection is admitted by the [`ConnLimiter`](super::limits::ConnLimiter): a cap per
//! address and per /24 or /48, a total, and slots reserved for the configured authorities'
//! addresses (so a client flood never takes the slots votes and signatures travel on). The
//! accept loop never waits for a slot: a refused connection gets a one-line 503 and is closed at
//! once, so the kernel's backlog never fills with connections waiting behind a flood. A client
//! must send a whole request head within `header_timeout_secs` (slowloris), heads are at most
//! 16 KiB, a connection is closed after `idle_timeout_secs` without a byte either way and after
//! [`CONN_LIFETIME`] in all, and bodies are capped and timed ([`read_body`]). POSTs from
//! non-authority addresses are rate-limited per address and prefix.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::limits::{Limit, Pool};
use super::round::MAX_DETACHED_LEN;
use super::serve::UploadError;
use super::state::Inner;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::descriptor::MAX_DESC_LEN;
use crate::err::DirError;
use crate::{now_unix, paths};

/// Longest life of one HTTP connection (bounds slow clients).
const CONN_LIFETIME: Duration = Duration::from_secs(120);
/// Deadline for reading a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 16 * 1024;

type App = Arc<Inner>;

/// The wall clock in unix milliseconds (token buckets).
#[allow(clippy::disallowed_methods)] // the HTTP server driver: the rate limiter's clock
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Serve until `shutdown` flips; connections still open are closed then.
#[allow(clippy::disallowed_methods)] // the HTTP server driver: accept back-off
pub(crate) async fn serve(inner: App, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let app = router(inner.clone());
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or a similar transient error: back off a little.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip();
        inner.note_accepted(ip);
        let authority = inner.is_authority_addr(ip);
        let admitted = inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open(ip, authority);
        let pool = match admitted {
            Ok(p) => p,
            Err(limit) => {
                inner
                    .limit_log
                    .hit(limit, now_unix(), "HTTP connection refused");
                refuse(&stream);
                continue;
            }
        };
        let guard = SlotGuard {
            inner: inner.clone(),
            ip,
            authority,
            pool,
        };
        let app = app.clone();
        let header_timeout = Duration::from_secs(inner.cfg.limits.header_timeout_secs);
        let idle = Duration::from_secs(inner.cfg.limits.idle_timeout_secs);
        conns.spawn(async move {
            let _guard = guard;
            serve_connection(app, stream, peer, header_timeout, idle).await;
        });
    }
}

/// Answer a refused connection with one line, without waiting, and close it.
fn refuse(stream: &TcpStream) {
    const MSG: &str = "too many connections from your address or network; try again later\n";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{MSG}",
        MSG.len()
    );
    let _ = stream.try_write(reply.as_bytes());
}

/// Gives a connection slot back when the connection ends.
struct SlotGuard {
    inner: App,
    ip: std::net::IpAddr,
    authority: bool,
    pool: Pool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close(self.ip, self.authority, self.pool);
    }
}

#[allow(clippy::disallowed_methods)] // the HTTP server driver: connection deadlines
async fn serve_connection(
    app: Router,
    stream: TcpStream,
    peer: SocketAddr,
    header_timeout: Duration,
    idle: Duration,
) {
    let _ = stream.set_nodelay(true);
    let io = LimitedIo {
        s: stream,
        deadline: Box::pin(tokio::time::sleep(CONN_LIFETIME)),
        idle_for: idle,
        idle: Box::pin(tokio::time::sleep(idle)),
    };
    let svc = TowerToHyperService::new(app);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        hyper::service::Service::call(&svc, req)
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
        tracing::trace!(error = %e, "HTTP connection ended");
    }
}

pub(crate) fn router(inner: App) -> Router {
    Router::new()
        .route(paths::DESCRIPTOR, post(post_descriptor))
        .route(paths::CONSENSUS, get(get_consensus))
        .route(paths::CONSENSUS_Z, get(get_consensus_z))
        .route(paths::CONSENSUS_NEXT, get(get_consensus_next))
        .route(paths::DESCRIPTORS, get(get_descriptors))
        .route(paths::VOTE_CURRENT, get(get_vote_current))
        .route(paths::VOTE, post(post_vote))
        .route(paths::SIGNATURE, post(post_signature))
        .route(paths::CERT, get(get_cert))
        .route(paths::CERTS, get(get_certs))
        .with_state(inner)
}

fn line(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    let mut s = msg.to_string().replace(['\r', '\n'], " ");
    s.truncate(300);
    s.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        s,
    )
        .into_response()
}

fn octets(bytes: impl Into<axum::body::Bytes>) -> Response {
    let bytes: axum::body::Bytes = bytes.into();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response()
}

fn status_of(e: &DirError) -> StatusCode {
    match e {
        DirError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        DirError::NotNewer => StatusCode::CONFLICT,
        DirError::BadSignature { .. } => StatusCode::FORBIDDEN,
        DirError::Io { .. } | DirError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Read a request body of at most `max` bytes: refuse early on a large `Content-Length`,
/// stop reading as soon as the cap is passed, and give up after [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Vec<u8>, Response> {
    if let Some(cl) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && cl > max as u64
    {
        return Err(line(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body too large ({cl} bytes, at most {max})"),
        ));
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Err(_) => Err(line(
            StatusCode::REQUEST_TIMEOUT,
            "body not received in time",
        )),
        Ok(Err(_)) => Err(line(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body too large or unreadable (at most {max} bytes)"),
        )),
        Ok(Ok(b)) => Ok(b.to_vec()),
    }
}

/// The status a limit's refusal carries: 429 for rates and per-address or per-prefix caps
/// (the sender should slow down or spread out), 503 when the authority as a whole is full.
fn limit_status(l: Limit) -> StatusCode {
    match l {
        Limit::TableFull | Limit::ConnTotal | Limit::VoteBusy => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::TOO_MANY_REQUESTS,
    }
}

fn limit_reply(l: Limit) -> Response {
    let msg = match l {
        Limit::UploadRateAddr => "too many uploads from your address; try again in a minute",
        Limit::UploadRatePrefix => "too many uploads from your network; try again in a minute",
        Limit::RelaysPerAddr => "too many relays at this descriptor's address",
        Limit::RelaysPerPrefix => "too many relays in this descriptor's network (/24 or /48)",
        Limit::TableFull => "authority is full; try again later",
        _ => "busy; try again later",
    };
    line(limit_status(l), msg)
}

/// Charge one POST to the sender's address and prefix (authorities are exempt).
fn admit_post(app: &Inner, peer: SocketAddr) -> Result<(), Limit> {
    if app.is_authority_addr(peer.ip()) {
        return Ok(());
    }
    let (r, forgot) = app
        .sources
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(peer.ip(), now_unix_ms());
    let now = now_unix();
    if forgot {
        app.limit_log.hit(
            Limit::SourceTableFull,
            now,
            "upload-rate table full; forgot the least recently seen source",
        );
    }
    r.inspect_err(|&l| {
        app.limit_log
            .hit(l, now, "POST refused by the upload rate limit")
    })
}

async fn post_descriptor(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(l) = admit_post(&app, peer) {
        return limit_reply(l);
    }
    let bytes = match read_body(&headers, body, MAX_DESC_LEN).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match app.accept_descriptor_changed(&bytes, now_unix()) {
        Ok((id, changed)) => {
            let counter = if app.is_authority_addr(peer.ip()) {
                &app.desc_accepted_exempt
            } else {
                &app.desc_accepted_charged
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            app.spawn_probe(id, changed);
            line(StatusCode::OK, "accepted")
        }
        Err(UploadError::Dir(e)) => line(status_of(&e), e),
        Err(UploadError::Limited(l)) => limit_reply(l),
    }
}

async fn post_vote(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(l) = admit_post(&app, peer) {
        return limit_reply(l);
    }
    // Votes may be 8 MiB: read only a few at once, and keep the authorities' slots for them.
    let slots = if app.is_authority_addr(peer.ip()) {
        &app.big_uploads
    } else {
        &app.big_uploads_other
    };
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        app.limit_log.hit(
            Limit::VoteBusy,
            now_unix(),
            "vote upload refused: slots busy",
        );
        return limit_reply(Limit::VoteBusy);
    };
    let bytes = match read_body(&headers, body, MAX_CONSENSUS_LEN).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let app2 = app.clone();
    // Verifying a large vote is CPU work: keep it off the reactor.
    let r = tokio::task::spawn_blocking(move || app2.accept_vote(&bytes, now_unix())).await;
    match r {
        Ok(Ok(_)) => line(StatusCode::OK, "accepted"),
        Ok(Err(e)) => line(status_of(&e), e),
        Err(_) => line(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn post_signature(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(l) = admit_post(&app, peer) {
        return limit_reply(l);
    }
    let bytes = match read_body(&headers, body, MAX_DETACHED_LEN).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match app.accept_detached(&bytes, now_unix()) {
        Ok(()) => line(StatusCode::OK, "accepted"),
        Err(e) => line(status_of(&e), e),
    }
}

/// The 404 reason while no consensus is published: when the next voting period will publish
/// one (the schedule of `schedule_loop`: a period whose vote time has passed is skipped).
fn no_consensus_yet(app: &Inner, now: u64) -> String {
    let i = app.cfg.voting_interval_secs.max(1);
    let mut va = super::next_valid_after(now, i);
    if now.saturating_mul(4) > va.saturating_mul(4).saturating_sub(i) {
        va = va.saturating_add(i);
    }
    format!(
        "no consensus yet; the next voting period ends at {} (in {} s) and publishes one if a \
         majority of the authorities takes part",
        crate::time_fmt::rfc3339(va),
        va.saturating_sub(now)
    )
}

async fn get_consensus(State(app): State<App>) -> Response {
    match app.current_bytes(false) {
        Some(b) => octets(b),
        None => line(StatusCode::NOT_FOUND, no_consensus_yet(&app, now_unix())),
    }
}

async fn get_consensus_z(State(app): State<App>) -> Response {
    match app.current_bytes(true) {
        Some(b) => octets(b),
        None => line(StatusCode::NOT_FOUND, no_consensus_yet(&app, now_unix())),
    }
}

async fn get_consensus_next(State(app): State<App>) -> Response {
    match app.pending_bytes() {
        Some(b) => octets(b),
        None => line(StatusCode::NOT_FOUND, "no consensus being signed"),
    }
}

async fn get_descriptors(State(app): State<App>) -> Response {
    octets(app.descriptors_bytes())
}

async fn get_vote_current(State(app): State<App>) -> Response {
    match app.latest_own_vote_bytes() {
        Some(b) => octets(b),
        None => line(StatusCode::NOT_FOUND, "no vote yet"),
    }
}

async fn get_cert(State(app): State<App>) -> Response {
    octets(app.own_cert_bytes())
}

async fn get_certs(State(app): State<App>) -> Response {
    octets(app.certs_bytes())
}

// ---- connection deadlines --------------------------------------------------------------

/// A connection closed after [`CONN_LIFETIME`], or after `idle_for` without a byte either way.
struct LimitedIo {
    s: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle_for: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl LimitedIo {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection lifetime exceeded",
            ));
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
        }
        None
    }

    #[allow(clippy::disallowed_methods)] // the HTTP server driver: idle deadline
    fn active(&mut self) {
        let at = tokio::time::Instant::now() + self.idle_for;
        self.idle.as_mut().reset(at);
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.s).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.active();
        }
        r
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut self.s).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_shutdown(cx)
    }
}
