//! The authority's HTTP server (axum, HTTP/1.1): bounded connections, a lifetime per
//! connection, body-size caps checked before and while reading, one-line error replies.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::round::MAX_DETACHED_LEN;
use super::state::Inner;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::descriptor::MAX_DESC_LEN;
use crate::err::DirError;
use crate::{now_unix, paths};

/// Longest life of one HTTP connection (bounds slow clients).
const CONN_LIFETIME: Duration = Duration::from_secs(120);
/// Deadline for reading a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

type App = Arc<Inner>;

/// Serve until `shutdown` flips.
pub(crate) async fn serve(inner: App, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let limit = inner.cfg.max_connections;
    let app = router(inner);
    let listener = LimitedListener {
        inner: listener,
        sem: Arc::new(Semaphore::new(limit)),
    };
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "authority HTTP server stopped");
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

async fn post_descriptor(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match read_body(&headers, body, MAX_DESC_LEN).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match app.accept_descriptor(&bytes, now_unix()) {
        Ok(id) => {
            app.spawn_probe(id);
            line(StatusCode::OK, "accepted")
        }
        Err(e) => line(status_of(&e), e),
    }
}

async fn post_vote(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    // Votes may be 8 MiB: read only a few at once.
    let Ok(_slot) = app.big_uploads.clone().try_acquire_owned() else {
        return line(StatusCode::SERVICE_UNAVAILABLE, "busy; try again later");
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

async fn post_signature(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
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

// ---- bounded listener ----------------------------------------------------------------

struct LimitedListener {
    inner: TcpListener,
    sem: Arc<Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    #[allow(clippy::disallowed_methods)] // the HTTP server driver: accept back-off and connection lifetime
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.sem.clone().acquire_owned().await else {
                // The semaphore is never closed; wait and retry rather than panic.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match self.inner.accept().await {
                Ok((s, a)) => {
                    let _ = s.set_nodelay(true);
                    return (
                        LimitedIo {
                            s,
                            _permit: permit,
                            deadline: Box::pin(tokio::time::sleep(CONN_LIFETIME)),
                        },
                        a,
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding a slot of the connection semaphore, closed after [`CONN_LIFETIME`].
struct LimitedIo {
    s: TcpStream,
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl LimitedIo {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection lifetime exceeded")
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.s).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.s).poll_shutdown(cx)
    }
}
