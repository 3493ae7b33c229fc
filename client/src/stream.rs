//! Streams: BEGIN / RESOLVE on a circuit, then splicing a SOCKS connection to the stream.
//!
//! Upstream (application → exit) runs in its own task: it reads up to 16 cells' worth from the
//! socket per `read` and builds the cells directly from that buffer ([`Circuit::send_data`]).
//! Downstream (exit → application) drains every queued DATA cell into one buffer and writes it
//! with one `write_all`, then sends the stream SENDMEs that became due (after delivery, so a
//! slow application closes the window). A circuit failure ends the stream with a TCP reset, so
//! the application never mistakes a cut transfer for a complete one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_proto::relaymsg::{
    Begin, BeginFlags, EndReason, MAX_DATA, RelayMsg, Resolve, Target as WireTarget,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};

use crate::circ::{Circuit, DATA_OFFSET, StreamEvent};
use crate::socks::wire::{Target, reply, reply_for_end_reason};

/// How long the exit may take to answer BEGIN or RESOLVE.
pub(crate) const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the application per `read` (16 full cells).
const UPSTREAM_BUF: usize = 16 * MAX_DATA;
/// Largest downstream batch written at once.
const DOWNSTREAM_BATCH: usize = 64 * 1024;

/// Why a stream could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Give the application this SOCKS5 reply code.
    Reply(u8),
    /// The circuit failed: try another one.
    Retry,
}

fn wire_target(t: &Target) -> Result<Begin, OpenError> {
    let (target, port) = match t {
        Target::Host(h, p) => (
            WireTarget::parse(h).map_err(|_| OpenError::Reply(reply::HOST_UNREACHABLE))?,
            *p,
        ),
        Target::Ip(a) => (WireTarget::Ip(a.ip()), a.port()),
    };
    if port == 0 {
        return Err(OpenError::Reply(reply::HOST_UNREACHABLE));
    }
    Ok(Begin {
        target,
        port,
        flags: BeginFlags(BeginFlags::IPV6_OK),
    })
}

/// Send BEGIN for `target` and wait for CONNECTED.
pub(crate) async fn begin(
    circ: &Arc<Circuit>,
    target: &Target,
) -> Result<(u16, mpsc::Receiver<StreamEvent>), OpenError> {
    let msg = RelayMsg::Begin(wire_target(target)?);
    let (sid, mut rx) = circ.open_stream().map_err(|_| OpenError::Retry)?;
    if circ.send_msg(None, sid, &msg).await.is_err() {
        circ.forget_stream(sid);
        return Err(OpenError::Retry);
    }
    match tokio::time::timeout(STREAM_TIMEOUT, rx.recv()).await {
        Ok(Some(StreamEvent::Connected)) => Ok((sid, rx)),
        Ok(Some(StreamEvent::End(r))) => {
            circ.forget_stream(sid);
            Err(OpenError::Reply(reply_for_end_reason(r.0)))
        }
        Ok(Some(_)) => {
            circ.end_stream(sid, EndReason::TORPROTOCOL).await;
            Err(OpenError::Reply(reply::GENERAL_FAILURE))
        }
        Ok(None) => Err(OpenError::Retry),
        Err(_) => {
            circ.end_stream(sid, EndReason::TIMEOUT).await;
            Err(OpenError::Reply(reply::TTL_EXPIRED))
        }
    }
}

/// Ask the exit to resolve `host`.
pub(crate) async fn resolve(circ: &Arc<Circuit>, host: &str) -> Result<Vec<IpAddr>, OpenError> {
    let msg = RelayMsg::Resolve(Resolve {
        hostname: host.to_owned(),
    });
    let (sid, mut rx) = circ.open_stream().map_err(|_| OpenError::Retry)?;
    if let Err(e) = circ.send_msg(None, sid, &msg).await {
        circ.forget_stream(sid);
        return Err(match e {
            crate::ClientError::Circuit(ref m) if m.starts_with("encoding") => {
                OpenError::Reply(reply::HOST_UNREACHABLE)
            }
            _ => OpenError::Retry,
        });
    }
    let r = match tokio::time::timeout(STREAM_TIMEOUT, rx.recv()).await {
        Ok(Some(StreamEvent::Resolved(v))) if !v.is_empty() => Ok(v),
        Ok(Some(StreamEvent::Resolved(_))) => Err(OpenError::Reply(reply::HOST_UNREACHABLE)),
        Ok(Some(StreamEvent::End(r))) => Err(OpenError::Reply(reply_for_end_reason(r.0))),
        Ok(Some(_)) => Err(OpenError::Reply(reply::GENERAL_FAILURE)),
        Ok(None) => Err(OpenError::Retry),
        Err(_) => Err(OpenError::Reply(reply::TTL_EXPIRED)),
    };
    circ.forget_stream(sid);
    r
}

/// Carry bytes both ways between `sock` and stream `sid` until both sides are done, or reset
/// the connection if the stream or circuit fails.
pub(crate) async fn splice(
    circ: Arc<Circuit>,
    sid: u16,
    mut rx: mpsc::Receiver<StreamEvent>,
    sock: TcpStream,
) {
    let (rd, mut wr) = sock.into_split();
    let stop = Arc::new(Notify::new());
    let up = tokio::spawn(upstream(Arc::clone(&circ), sid, rd, Arc::clone(&stop)));
    let mut out: Vec<u8> = Vec::new();
    let mut sendmes = Vec::with_capacity(8);
    let outcome: Result<(), &'static str> = 'outer: loop {
        let Some(mut ev) = rx.recv().await else {
            break Err("the stream or its circuit closed");
        };
        let mut end = None;
        loop {
            match ev {
                StreamEvent::Data { body, len, sendme } => {
                    if let Some(d) = body.get(DATA_OFFSET..DATA_OFFSET + len) {
                        out.extend_from_slice(d);
                    }
                    if let Some(t) = sendme {
                        sendmes.push(t);
                    }
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
        for t in sendmes.drain(..) {
            if let Err(e) = circ.send_stream_sendme(sid, t).await {
                tracing::debug!(circ = %circ.id, "stream SENDME failed: {e}");
                break 'outer Err("a stream SENDME could not be sent");
            }
        }
        match end {
            Some(EndReason::DONE) => {
                let _ = wr.shutdown().await;
                break Ok(());
            }
            Some(r) => {
                tracing::debug!(circ = %circ.id, reason = ?r, "the exit ended a stream");
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
    sid: u16,
    mut rd: OwnedReadHalf,
    stop: Arc<Notify>,
) -> OwnedReadHalf {
    tokio::select! {
        () = pump(&circ, sid, &mut rd) => {}
        () = stop.notified() => {}
    }
    rd
}

async fn pump(circ: &Circuit, sid: u16, rd: &mut OwnedReadHalf) {
    let mut buf = vec![0u8; UPSTREAM_BUF];
    let mut scratch = Vec::with_capacity(32);
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                circ.end_stream(sid, EndReason::DONE).await;
                return;
            }
            Ok(n) => n,
            Err(_) => {
                circ.end_stream(sid, EndReason::MISC).await;
                return;
            }
        };
        let mut off = 0;
        while off < n {
            match circ
                .send_data(sid, buf.get(off..n).unwrap_or_default(), &mut scratch)
                .await
            {
                Ok(c) => off += c,
                Err(_) => return,
            }
        }
    }
}
