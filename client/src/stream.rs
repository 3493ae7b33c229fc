//! Streams: BEGIN / RESOLVE on a circuit, then splicing a SOCKS connection to the stream.
//!
//! Upstream (application → exit) runs in its own task: it reads up to 16 cells' worth from the
//! socket per `read` and hands the buffer to the circuit's reactor ([`Circuit::send_data`]),
//! which packages it as congestion control and XON/XOFF allow (and, before CONNECTED, as
//! optimistic data up to its bound); the task waits until it is all taken (per-stream
//! backpressure). Downstream (exit → application) drains every queued DATA cell into one buffer,
//! writes it with one `write_all`, then reports the cells consumed (so a slow application makes
//! the core send XOFF, and XON once drained). A circuit failure, or an exit that refuses an
//! optimistically answered stream, ends the stream with a TCP reset, so the application never
//! mistakes a cut transfer for a complete one.

use std::net::IpAddr;
use std::sync::Arc;

use allium_proto::relaymsg::{Begin, BeginFlags, EndReason, MAX_DATA, Target as WireTarget};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};

use crate::circ::{Circuit, StreamEvent};
use crate::core::{StreamId, StreamTarget};
use crate::err::{ClientError, StreamError};
use crate::socks::wire::Target;

/// Bytes read from the application per `read` (16 full cells).
const UPSTREAM_BUF: usize = 16 * MAX_DATA;
/// Largest downstream batch written at once.
const DOWNSTREAM_BATCH: usize = 64 * 1024;

/// Why a stream could not be opened (the SOCKS front end's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Give the application this SOCKS5 reply code.
    Reply(u8),
    /// The circuit failed: try another one.
    Retry,
}

impl From<&ClientError> for OpenError {
    fn from(e: &ClientError) -> Self {
        if e.is_retriable() {
            Self::Retry
        } else {
            Self::Reply(e.socks_reply())
        }
    }
}

/// The BEGIN message for a SOCKS target.
pub(crate) fn wire_target(t: &Target) -> Result<Begin, StreamError> {
    let (target, port) = match t {
        Target::Host(h, p) => (
            WireTarget::parse(h).map_err(|e| StreamError::BadTarget(Some(e)))?,
            *p,
        ),
        Target::Ip(a) => (WireTarget::Ip(a.ip()), a.port()),
    };
    if port == 0 {
        return Err(StreamError::BadTarget(None));
    }
    Ok(Begin {
        target,
        port,
        flags: BeginFlags(BeginFlags::IPV6_OK),
    })
}

/// Send BEGIN for `target` and wait for CONNECTED (the circuit times the wait out). The error
/// keeps the exit's END reason; [`ClientError::socks_reply`] turns it into a reply code.
pub(crate) async fn connect(
    circ: &Arc<Circuit>,
    target: &Target,
) -> Result<(u16, mpsc::Receiver<StreamEvent>), ClientError> {
    let begin = wire_target(target)?;
    let (sid, mut rx) = circ.open_stream(StreamTarget::Begin(begin)).await?;
    match rx.recv().await {
        Some(StreamEvent::Connected) => Ok((sid.get(), rx)),
        Some(StreamEvent::End(Err(e))) => Err(e.into()),
        Some(_) => {
            circ.end_stream(sid.get(), EndReason::TORPROTOCOL).await;
            Err(StreamError::Unexpected.into())
        }
        None => Err(StreamError::Circuit(crate::err::CircError::Closed).into()),
    }
}

/// Send BEGIN for `target` without waiting for CONNECTED (optimistic data): the stream's events,
/// CONNECTED or an END, arrive on the receiver; the application's bytes may follow at once.
pub(crate) async fn begin_optimistic(
    circ: &Arc<Circuit>,
    target: &Target,
) -> Result<(u16, mpsc::Receiver<StreamEvent>), OpenError> {
    let opened = async {
        let begin = wire_target(target)?;
        let (sid, rx) = circ.open_stream(StreamTarget::Begin(begin)).await?;
        Ok::<_, ClientError>((sid.get(), rx))
    };
    opened.await.map_err(|e| {
        tracing::debug!(circ = %circ.id, "opening a stream failed: {e}");
        OpenError::from(&e)
    })
}

/// Send BEGIN for `target` and wait for CONNECTED.
pub(crate) async fn begin(
    circ: &Arc<Circuit>,
    target: &Target,
) -> Result<(u16, mpsc::Receiver<StreamEvent>), OpenError> {
    connect(circ, target).await.map_err(|e| {
        tracing::debug!(circ = %circ.id, "opening a stream failed: {e}");
        OpenError::from(&e)
    })
}

/// Ask the exit to resolve `host`; the error keeps the exit's reason.
pub(crate) async fn lookup(circ: &Arc<Circuit>, host: &str) -> Result<Vec<IpAddr>, ClientError> {
    let (_sid, mut rx) = circ
        .open_stream(StreamTarget::Resolve(host.to_owned()))
        .await?;
    match rx.recv().await {
        Some(StreamEvent::Resolved(v)) if !v.is_empty() => Ok(v),
        Some(StreamEvent::Resolved(_)) => Err(StreamError::NoAddress.into()),
        Some(StreamEvent::End(Err(e))) => Err(e.into()),
        Some(_) => Err(StreamError::Unexpected.into()),
        None => Err(StreamError::Circuit(crate::err::CircError::Closed).into()),
    }
}

/// Ask the exit to resolve `host`.
pub(crate) async fn resolve(circ: &Arc<Circuit>, host: &str) -> Result<Vec<IpAddr>, OpenError> {
    lookup(circ, host).await.map_err(|e| OpenError::from(&e))
}

/// Carry bytes both ways between `sock` and stream `sid` until both sides are done, or reset
/// the connection if the stream or circuit fails.
pub(crate) async fn splice(
    circ: Arc<Circuit>,
    sid: u16,
    mut rx: mpsc::Receiver<StreamEvent>,
    sock: TcpStream,
) {
    let Some(stream) = StreamId::new(sid) else {
        return;
    };
    let (rd, mut wr) = sock.into_split();
    let stop = Arc::new(Notify::new());
    let up = tokio::spawn(upstream(Arc::clone(&circ), stream, rd, Arc::clone(&stop)));
    let mut out: Vec<u8> = Vec::new();
    let outcome: Result<(), &'static str> = loop {
        let Some(mut ev) = rx.recv().await else {
            break Err("the stream or its circuit closed");
        };
        let mut end = None;
        let mut cells = 0usize;
        loop {
            match ev {
                StreamEvent::Data(d) => {
                    out.extend_from_slice(d.bytes());
                    cells += 1;
                }
                StreamEvent::End(r) => {
                    end = Some(r);
                    break;
                }
                StreamEvent::Connected | StreamEvent::Resolved(_) => {}
            }
            if out.len() >= DOWNSTREAM_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(e) => ev = e,
                // Deliver what we have; the next recv() reports a loss.
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break Err("the application closed its connection");
            }
            out.clear();
        }
        if cells > 0 && circ.consumed(stream, cells).await.is_err() {
            break Err("the circuit closed");
        }
        match end {
            Some(Ok(())) => {
                let _ = wr.shutdown().await;
                break Ok(());
            }
            Some(Err(e)) => {
                tracing::debug!(circ = %circ.id, "the exit ended a stream: {e}");
                break Err("the exit ended the stream with an error");
            }
            None => {}
        }
    };
    match outcome {
        // The exit is done; finish when the application is (its EOF sends our END).
        Ok(()) => drop(up.await),
        Err(why) => {
            tracing::debug!(circ = %circ.id, why, "resetting a SOCKS connection");
            stop.notify_one();
            circ.end_stream(sid, EndReason::MISC).await;
            // Reset, not FIN: the application must not take a cut stream for a complete one.
            // (Dropping a write half alone would send a FIN.)
            if let Ok(rd) = up.await
                && let Ok(sock) = rd.reunite(wr)
            {
                let _ = sock.set_zero_linger();
                drop(sock);
            }
        }
    }
}

/// Application → exit, until EOF, an error, or `stop`. Returns the read half.
async fn upstream(
    circ: Arc<Circuit>,
    sid: StreamId,
    mut rd: OwnedReadHalf,
    stop: Arc<Notify>,
) -> OwnedReadHalf {
    tokio::select! {
        () = pump(&circ, sid, &mut rd) => {}
        () = stop.notified() => {}
    }
    rd
}

async fn pump(circ: &Circuit, sid: StreamId, rd: &mut OwnedReadHalf) {
    let mut buf = vec![0u8; UPSTREAM_BUF];
    loop {
        buf.resize(UPSTREAM_BUF, 0);
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                circ.end_stream(sid.get(), EndReason::DONE).await;
                return;
            }
            Ok(n) => n,
            Err(_) => {
                circ.end_stream(sid.get(), EndReason::MISC).await;
                return;
            }
        };
        buf.truncate(n);
        match circ.send_data(sid, buf).await {
            Ok(b) => buf = b,
            Err(_) => return,
        }
    }
}
