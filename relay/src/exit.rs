//! The exit role: BEGIN, RESOLVE, END and the two tasks that move a stream's bytes.
//!
//! Per stream there is a reader task (destination → client: reads up to 32 cells' worth at a time
//! and originates DATA cells as the package windows allow) and a writer task (client → destination:
//! drains the queue of received DATA cell bodies, coalesces them into one write, then counts them
//! against the stream's deliver window and sends stream SENDMEs). A misbehaving destination only
//! ever costs its own stream: every wait is bounded and every error ends just that stream.
//!
//! Half-close: END with reason DONE is a FIN. When the destination closes its side, the exit sends
//! END DONE; when the client sends END DONE, the exit shuts down the socket's write side after
//! writing what was queued. The stream is gone once both have happened, or at once on any other
//! END reason.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::relaycell::{CellBody, MAX_DATA, Tag};
use allium_proto::flowctl::{STREAM_WINDOW_START, StreamWindow};
use allium_proto::relaymsg::{
    AddrTtl, Begin, Connected, End, EndReason, RelayMsg, Resolve, Resolved, ResolvedValue, Sendme,
    Target,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::AbortHandle;

use crate::circuit::{Circuit, DataSend, Violation};
use crate::ctx::Ctx;
use crate::policy::Refusal;
use crate::ratelimit::Credit;

/// Longest wait for name resolution.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a TCP connection to the destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the destination to accept queued bytes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the client to open a package window with a SENDME.
pub const WINDOW_TIMEOUT: Duration = Duration::from_secs(600);
/// TTL reported in CONNECTED and RESOLVED.
pub const DNS_TTL: u32 = 300;
/// The reader takes at most this many cells' worth of bytes per read.
const READ_CELLS: usize = 32;
/// The writer coalesces at most this many bytes per write.
const WRITE_COALESCE: usize = 64 * 1024;
/// Queue of received DATA cells per stream: the stream window plus slack for cells in flight.
const WRITE_QUEUE: usize = STREAM_WINDOW_START as usize + 16;

/// One received DATA cell waiting to be written to the destination.
#[derive(Debug)]
pub(crate) enum WriteItem {
    /// `body[start..start+len]` are the bytes; `tag` is the cell's origin-layer tag.
    Data {
        body: Box<CellBody>,
        start: usize,
        len: usize,
        tag: Tag,
    },
    /// The client sent END DONE: shut down the write side after what is queued.
    Fin,
}

/// A stream's entry in its circuit.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    pub(crate) win: StreamWindow,
    writer: mpsc::Sender<WriteItem>,
    reader_task: Option<AbortHandle>,
    writer_task: Option<AbortHandle>,
    /// We sent END DONE (the destination closed its side).
    sent_end: bool,
    /// The client sent END DONE.
    got_end: bool,
    /// Removed because both sides finished: let the writer drain instead of aborting it.
    graceful: bool,
    /// This stream's share of `max_exit_streams`.
    _slot: OwnedSemaphorePermit,
}

impl StreamEntry {
    fn new(writer: mpsc::Sender<WriteItem>, slot: OwnedSemaphorePermit) -> Self {
        Self {
            win: StreamWindow::new(),
            writer,
            reader_task: None,
            writer_task: None,
            sent_end: false,
            got_end: false,
            graceful: false,
            _slot: slot,
        }
    }

    /// Queue a received DATA cell for the destination.
    pub(crate) fn push_data(
        &mut self,
        body: Box<CellBody>,
        start: usize,
        len: usize,
        tag: Tag,
    ) -> Result<(), Violation> {
        if self.got_end {
            // DATA after END DONE.
            return Err(Violation);
        }
        match self.writer.try_send(WriteItem::Data {
            body,
            start,
            len,
            tag,
        }) {
            Ok(()) => Ok(()),
            // More cells than the stream window allows.
            Err(mpsc::error::TrySendError::Full(_)) => Err(Violation),
            // The writer is gone (the stream is ending): drop the data.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }
}

impl Drop for StreamEntry {
    fn drop(&mut self) {
        if let Some(r) = &self.reader_task {
            r.abort();
        }
        if !self.graceful
            && let Some(w) = &self.writer_task
        {
            w.abort();
        }
    }
}

/// BEGIN from the client on stream `sid`.
pub(crate) async fn on_begin(
    circ: &Arc<Circuit>,
    ctx: &Arc<Ctx>,
    sid: u16,
    begin: Begin,
) -> Result<(), Violation> {
    let refuse = |reason| RelayMsg::End(End::new(reason));
    if circ.prev_is_client(ctx) {
        // No one-hop exit circuits.
        circ.send_msg(ctx, sid, &refuse(EndReason::TORPROTOCOL))
            .await;
        return Ok(());
    }
    if !ctx.policy.is_exit() || !ctx.policy.port_allowed(begin.port) {
        circ.send_msg(ctx, sid, &refuse(EndReason::EXITPOLICY))
            .await;
        return Ok(());
    }
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let slot = Arc::clone(&ctx.exit_slots).try_acquire_owned().ok();
    let full = {
        let mut inner = circ.lock();
        if inner.streams.contains_key(&sid) {
            return Err(Violation);
        }
        let full = slot.is_none() || inner.streams.len() >= ctx.cfg.max_streams_per_circuit;
        if let Some(slot) = slot
            && !full
        {
            inner.streams.insert(sid, StreamEntry::new(tx, slot));
        }
        full
    };
    if full {
        circ.send_msg(ctx, sid, &refuse(EndReason::RESOURCELIMIT))
            .await;
        return Ok(());
    }
    let task = tokio::spawn(run_stream(
        Arc::clone(circ),
        Arc::clone(ctx),
        sid,
        begin,
        rx,
    ));
    let mut inner = circ.lock();
    match inner.streams.get_mut(&sid) {
        Some(st) => st.reader_task = Some(task.abort_handle()),
        None => task.abort(),
    }
    Ok(())
}

/// RESOLVE from the client on stream `sid`: answer RESOLVED; the stream id is then free.
pub(crate) async fn on_resolve(
    circ: &Arc<Circuit>,
    ctx: &Arc<Ctx>,
    sid: u16,
    req: Resolve,
) -> Result<(), Violation> {
    if circ.prev_is_client(ctx) || !ctx.policy.is_exit() {
        let end = RelayMsg::End(End::new(EndReason::EXITPOLICY));
        circ.send_msg(ctx, sid, &end).await;
        return Ok(());
    }
    let Ok(slot) = Arc::clone(&ctx.resolve_slots).try_acquire_owned() else {
        let busy = RelayMsg::Resolved(Resolved {
            answers: vec![(ResolvedValue::TransientError, 0)],
        });
        circ.send_msg(ctx, sid, &busy).await;
        return Ok(());
    };
    let circ = Arc::clone(circ);
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let answers = match resolve(&ctx, &req.hostname).await {
            Ok(addrs) if !addrs.is_empty() => addrs
                .into_iter()
                .take(8)
                .map(|a| (ResolvedValue::Ip(a), DNS_TTL))
                .collect(),
            Ok(_) | Err(ResolveError::NotFound) => vec![(ResolvedValue::NontransientError, 0)],
            Err(ResolveError::Timeout) => vec![(ResolvedValue::TransientError, 0)],
        };
        drop(slot);
        let msg = RelayMsg::Resolved(Resolved { answers });
        circ.send_msg(&ctx, sid, &msg).await;
    });
    Ok(())
}

/// END from the client on stream `sid`.
pub(crate) fn on_end(circ: &Arc<Circuit>, _ctx: &Arc<Ctx>, sid: u16, reason: EndReason) {
    let mut inner = circ.lock();
    let remove = match inner.streams.get_mut(&sid) {
        None => false,
        Some(st) if reason == EndReason::DONE => {
            st.got_end = true;
            // Queue the FIN behind the data; a full queue means the client overran its window.
            let fin_ok = st.writer.try_send(WriteItem::Fin).is_ok();
            if st.sent_end {
                st.graceful = fin_ok;
                true
            } else {
                !fin_ok
            }
        }
        Some(_) => true,
    };
    if remove {
        inner.streams.remove(&sid);
    }
}

#[derive(Debug)]
enum ResolveError {
    NotFound,
    Timeout,
}

async fn resolve(ctx: &Ctx, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, ctx.resolver.resolve(host)).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(_)) => Err(ResolveError::NotFound),
        Err(_) => Err(ResolveError::Timeout),
    }
}

fn connect_error_reason(e: &io::Error) -> EndReason {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => EndReason::CONNECTREFUSED,
        io::ErrorKind::TimedOut => EndReason::TIMEOUT,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => EndReason::NOROUTE,
        io::ErrorKind::ConnectionReset => EndReason::CONNRESET,
        _ => EndReason::MISC,
    }
}

/// Resolve, check the policy, connect. Errors are the END reason to send.
async fn open_destination(ctx: &Ctx, begin: &Begin) -> Result<TcpStream, EndReason> {
    let addrs = match &begin.target {
        Target::Ip(ip) => vec![*ip],
        Target::Hostname(h) => match resolve(ctx, h).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) | Err(ResolveError::NotFound) => return Err(EndReason::RESOLVEFAILED),
            Err(ResolveError::Timeout) => return Err(EndReason::TIMEOUT),
        },
    };
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| ctx.policy.check(**a, begin.port) != Err(Refusal::Address))
        .map(|a| SocketAddr::new(*a, begin.port))
        .take(4)
        .collect();
    if allowed.is_empty() {
        return Err(EndReason::EXITPOLICY);
    }
    let attempt = async {
        let mut last = EndReason::MISC;
        for a in &allowed {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = connect_error_reason(&e),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(EndReason::TIMEOUT),
    }
}

/// Send END with `reason` on stream `sid` and forget the stream.
async fn end_stream(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, sid: u16, reason: EndReason) {
    let present = circ.lock().streams.contains_key(&sid);
    if present {
        circ.send_msg(ctx, sid, &RelayMsg::End(End::new(reason)))
            .await;
    }
    circ.lock().streams.remove(&sid);
}

/// The life of one stream: connect, then copy destination → client (this task) while a writer
/// task copies client → destination.
async fn run_stream(
    circ: Arc<Circuit>,
    ctx: Arc<Ctx>,
    sid: u16,
    begin: Begin,
    rx: mpsc::Receiver<WriteItem>,
) {
    let tcp = match open_destination(&ctx, &begin).await {
        Ok(t) => t,
        Err(reason) => {
            end_stream(&circ, &ctx, sid, reason).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let (rd, wr) = tcp.into_split();
    let connected = RelayMsg::Connected(Connected {
        addr: peer.map(|p| AddrTtl {
            addr: p.ip(),
            ttl: DNS_TTL,
        }),
    });
    if !circ.send_msg(&ctx, sid, &connected).await {
        return;
    }
    let writer = tokio::spawn(run_writer(Arc::clone(&circ), Arc::clone(&ctx), sid, rx, wr));
    {
        let mut inner = circ.lock();
        match inner.streams.get_mut(&sid) {
            Some(st) => st.writer_task = Some(writer.abort_handle()),
            None => {
                writer.abort();
                return;
            }
        }
    }
    run_reader(&circ, &ctx, sid, rd).await;
}

/// Destination → client.
async fn run_reader(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, sid: u16, mut rd: OwnedReadHalf) {
    // Small streams keep a small buffer; it grows to READ_CELLS cells once a read fills it.
    let mut buf = vec![0u8; 4 * MAX_DATA];
    let mut credit = Credit::default();
    loop {
        // Wait until at least one cell may be sent, and read no more than the windows allow.
        let budget = match circ.data_budget(sid) {
            None => return,
            Some(0) => {
                if !wait_for_window(circ, ctx, sid).await {
                    return;
                }
                continue;
            }
            Some(n) => n.min(READ_CELLS),
        };
        let want = (budget * MAX_DATA).min(buf.len());
        let Some(dst) = buf.get_mut(..want) else {
            return;
        };
        let n = match rd.read(dst).await {
            Ok(0) => {
                finish_reading(circ, ctx, sid).await;
                return;
            }
            Ok(n) => n,
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::ConnectionReset => EndReason::CONNRESET,
                    _ => EndReason::MISC,
                };
                end_stream(circ, ctx, sid, reason).await;
                return;
            }
        };
        if n == buf.len() && buf.len() < READ_CELLS * MAX_DATA {
            buf.resize(READ_CELLS * MAX_DATA, 0);
        }
        credit.spend(&ctx.bucket, n as u64).await;
        let Some(data) = buf.get(..n) else { return };
        let mut off = 0;
        while let Some(rest) = data.get(off..).filter(|r| !r.is_empty()) {
            match circ.send_data_batch(ctx, sid, rest, READ_CELLS).await {
                (used, DataSend::Sent) => off += used,
                (_, DataSend::Closed) => return,
                (_, DataSend::Blocked) => {
                    if !wait_for_window(circ, ctx, sid).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Wait (bounded) until a package window of stream `sid` opens. Returns false if the stream is
/// gone (or was ended because the client never opened the window).
async fn wait_for_window(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, sid: u16) -> bool {
    let notified = circ.window_open.notified();
    tokio::pin!(notified);
    // Register first, then re-check, so a SENDME between the check and the wait is not missed.
    notified.as_mut().enable();
    match circ.data_budget(sid) {
        None => false,
        Some(0) => {
            if tokio::time::timeout(WINDOW_TIMEOUT, notified)
                .await
                .is_err()
            {
                end_stream(circ, ctx, sid, EndReason::TIMEOUT).await;
                return false;
            }
            true
        }
        Some(_) => true,
    }
}

/// The destination closed its side: send END DONE; forget the stream if the client already had.
async fn finish_reading(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, sid: u16) {
    let end = RelayMsg::End(End::new(EndReason::DONE));
    if !circ.send_msg(ctx, sid, &end).await {
        return;
    }
    let mut inner = circ.lock();
    let remove = match inner.streams.get_mut(&sid) {
        Some(st) => {
            st.sent_end = true;
            if st.got_end {
                st.graceful = true;
                // This task is the reader: do not abort ourselves mid-way.
                st.reader_task = None;
                true
            } else {
                false
            }
        }
        None => false,
    };
    if remove {
        inner.streams.remove(&sid);
    }
}

/// Client → destination.
async fn run_writer(
    circ: Arc<Circuit>,
    ctx: Arc<Ctx>,
    sid: u16,
    mut rx: mpsc::Receiver<WriteItem>,
    mut wr: OwnedWriteHalf,
) {
    let mut out: Vec<u8> = Vec::new();
    let mut tags: Vec<Tag> = Vec::with_capacity(64);
    loop {
        let Some(first) = rx.recv().await else {
            // The stream was removed after both sides finished (or the circuit closed).
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
            return;
        };
        let mut fin = false;
        let mut item = Some(first);
        while let Some(it) = item.take() {
            match it {
                WriteItem::Data {
                    body,
                    start,
                    len,
                    tag,
                } => {
                    if let Some(d) = body.get(start..start.saturating_add(len)) {
                        out.extend_from_slice(d);
                    }
                    tags.push(tag);
                }
                WriteItem::Fin => {
                    fin = true;
                    break;
                }
            }
            if out.len() < WRITE_COALESCE {
                item = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let reason = match e.kind() {
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                            EndReason::CONNRESET
                        }
                        _ => EndReason::MISC,
                    };
                    detach_writer(&circ, sid);
                    end_stream(&circ, &ctx, sid, reason).await;
                    return;
                }
                Err(_) => {
                    detach_writer(&circ, sid);
                    end_stream(&circ, &ctx, sid, EndReason::TIMEOUT).await;
                    return;
                }
            }
            out.clear();
        }
        if !tags.is_empty() {
            // Count the delivered cells; send a stream SENDME for each completed increment.
            let mut due: Vec<Tag> = Vec::new();
            let ok = {
                let mut inner = circ.lock();
                match inner.streams.get_mut(&sid) {
                    Some(st) => {
                        let mut ok = true;
                        for t in &tags {
                            match st.win.on_data_received() {
                                Ok(true) => {
                                    ok &= st.win.sendme_sent().is_ok();
                                    due.push(*t);
                                }
                                Ok(false) => {}
                                Err(_) => ok = false,
                            }
                        }
                        ok
                    }
                    None => true,
                }
            };
            tags.clear();
            if !ok {
                circ.destroy(&ctx, None);
                return;
            }
            for t in due {
                let sm = RelayMsg::Sendme(Sendme { tag: Some(t) });
                if !circ.send_msg(&ctx, sid, &sm).await {
                    return;
                }
            }
        }
        if fin {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
            return;
        }
    }
}

/// The writer task is about to end the stream itself: make sure removing the entry does not abort
/// it half-way through sending END.
fn detach_writer(circ: &Circuit, sid: u16) {
    if let Some(st) = circ.lock().streams.get_mut(&sid) {
        st.writer_task = None;
    }
}
