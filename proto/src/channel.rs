//! The tokio driver of a link (design §1): connect / accept, then cells in and out.
//!
//! - [`connect`] and [`accept`] run the Noise XK handshake of [`crate::link`] under
//!   [`HANDSHAKE_TIMEOUT`] on a TCP socket with `TCP_NODELAY`.
//! - [`Channel::split`] gives a [`ChannelSender`] (cloneable; a bounded queue drained by one writer
//!   task that packs every queued cell, up to 32, into one Noise frame and one `write`) and a
//!   [`ChannelReceiver`] (reads and opens frames in the caller's task, no extra task switch).
//! - Any error (bad frame length, failed authentication, unknown cell command, I/O, write stall)
//!   closes the whole link: both halves see it closed.
//! - Link PADDING cells are dropped by the receiver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allium_crypto::{RelayId, X25519Public, X25519Secret};
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cell::{CELL_LEN, Cell, CellCmd};
use crate::err::LinkError;
use crate::link::{
    self, HandshakeInfo, Initiator, LEN_PREFIX, LinkOpener, LinkSealer, LinkTransport,
    MAX_CELLS_PER_FRAME, MAX_FRAME_LEN, MAX_HANDSHAKE_MSG_LEN, Responder,
};

pub use crate::link::HANDSHAKE_TIMEOUT;

/// Time allowed for the TCP connection in [`connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame write that makes no progress for this long closes the link.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Cells queued per link before [`ChannelSender::send`] waits.
pub const SEND_QUEUE_CELLS: usize = 256;
/// Clock differences above this are logged as a warning.
pub const CLOCK_SKEW_WARN_SECS: u64 = 3600;

// The channel is a tokio driver: it stamps its handshake with the wall clock.
#[allow(clippy::disallowed_methods)]
fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Open a link to the relay `peer_id` at `addr` whose Noise static key is `peer_link_key`.
/// Relays pass their link key as `our_static` so the peer recognises them; clients pass `None`.
pub async fn connect(
    addr: SocketAddr,
    peer_id: &RelayId,
    peer_link_key: &X25519Public,
    our_static: Option<&X25519Secret>,
) -> Result<Channel, LinkError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::ConnectTimeout)??;
    connect_over(tcp, peer_id, peer_link_key, our_static).await
}

/// Run the initiator handshake over an already connected socket (tests, proxies).
pub async fn connect_over(
    mut tcp: TcpStream,
    peer_id: &RelayId,
    peer_link_key: &X25519Public,
    our_static: Option<&X25519Secret>,
) -> Result<Channel, LinkError> {
    tcp.set_nodelay(true)?;
    let hs = async {
        let mut out = Vec::with_capacity(2 * MAX_HANDSHAKE_MSG_LEN);
        let init = Initiator::start(peer_id, peer_link_key, our_static, &mut out)?;
        tcp.write_all(&out).await?;
        let mut buf = [0u8; MAX_HANDSHAKE_MSG_LEN];
        let msg2 = read_handshake_msg(&mut tcp, &mut buf).await?;
        out.clear();
        let (t, info) = init.read_msg2(msg2, now_unix(), &mut out)?;
        tcp.write_all(&out).await?;
        Ok::<_, LinkError>((t, info))
    };
    let (t, info) = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
        .await
        .map_err(|_| LinkError::HandshakeTimeout)?
        .map_err(|e| match e {
            // A relay closes silently when message 1 fails (wrong identity or link key).
            LinkError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                LinkError::Handshake
            }
            other => other,
        })?;
    Ok(Channel::start(tcp, t, info))
}

/// Run the responder handshake on an accepted socket, as relay `our_id` with link key
/// `our_link_key`. Look up [`Channel::peer_static`] in the consensus to tell relays from clients.
pub async fn accept(
    mut tcp: TcpStream,
    our_id: &RelayId,
    our_link_key: &X25519Secret,
) -> Result<Channel, LinkError> {
    tcp.set_nodelay(true)?;
    let hs = async {
        let resp = Responder::new(our_id, our_link_key)?;
        let mut buf = [0u8; MAX_HANDSHAKE_MSG_LEN];
        let msg1 = read_handshake_msg(&mut tcp, &mut buf).await?;
        let mut out = Vec::with_capacity(MAX_HANDSHAKE_MSG_LEN + LEN_PREFIX);
        let wait = resp.read_msg1(msg1, now_unix(), &mut out)?;
        tcp.write_all(&out).await?;
        let msg3 = read_handshake_msg(&mut tcp, &mut buf).await?;
        wait.read_msg3(msg3)
    };
    let (t, info) = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
        .await
        .map_err(|_| LinkError::HandshakeTimeout)??;
    Ok(Channel::start(tcp, t, info))
}

async fn read_handshake_msg<'b, S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &'b mut [u8; MAX_HANDSHAKE_MSG_LEN],
) -> Result<&'b [u8], LinkError> {
    let mut prefix = [0u8; 2];
    s.read_exact(&mut prefix).await?;
    let len = link::handshake_msg_len(prefix)?;
    let msg = buf.get_mut(..len).ok_or(LinkError::BadFrameLength(len))?;
    s.read_exact(msg).await?;
    Ok(msg)
}

/// The link's "closed" state, shared by both halves and the writer task: a cancellation token to
/// wait on, and a flag that the per-cell checks read with one atomic load (the token's own
/// `is_cancelled` takes a mutex).
#[derive(Clone, Debug)]
struct CloseSignal {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl CloseSignal {
    fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// An established link.
#[derive(Debug)]
pub struct Channel {
    peer_static: X25519Public,
    peer_addr: Option<SocketAddr>,
    info: HandshakeInfo,
    initiator: bool,
    sender: ChannelSender,
    receiver: ChannelReceiver,
}

impl Channel {
    fn start(tcp: TcpStream, t: LinkTransport, info: HandshakeInfo) -> Self {
        let skew = info.peer_unix_time.abs_diff(now_unix());
        if skew > CLOCK_SKEW_WARN_SECS {
            tracing::warn!(
                skew_secs = skew,
                "link peer's clock differs from ours by more than an hour; check this machine's clock"
            );
        }
        let peer_addr = tcp.peer_addr().ok();
        let peer_static = t.remote_static();
        let initiator = t.is_initiator();
        let (rd, wr) = tcp.into_split();
        // The two directions seal and open independently (no lock shared per frame).
        let (sealer, opener) = t.split();
        let closed = CloseSignal::new();
        let (tx, rx) = mpsc::channel(SEND_QUEUE_CELLS);
        let write_timeout_ms = Arc::new(AtomicU64::new(duration_ms(WRITE_TIMEOUT)));
        tokio::spawn(writer_task(
            wr,
            rx,
            sealer,
            closed.clone(),
            Arc::clone(&write_timeout_ms),
        ));
        Self {
            peer_static,
            peer_addr,
            info,
            initiator,
            sender: ChannelSender {
                tx,
                closed: closed.clone(),
                write_timeout_ms,
            },
            receiver: ChannelReceiver {
                rd,
                opener,
                closed,
                buf: BytesMut::with_capacity(2 * (MAX_FRAME_LEN + LEN_PREFIX)),
                // As long as a whole frame, tag included: the AEAD then opens in place here
                // instead of allocating a scratch copy of the frame.
                plain: vec![0u8; MAX_FRAME_LEN],
                plain_len: 0,
                plain_off: 0,
                error: None,
            },
        }
    }

    /// The peer's Noise static key: for links we accepted, the initiator's key (a relay's link key
    /// if it is in the consensus, otherwise a client's one-time key); for links we opened, the key
    /// we dialled.
    pub fn peer_static(&self) -> X25519Public {
        self.peer_static
    }

    /// The peer's socket address (sensitive: do not log it at info).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// What the peer sent in its handshake payload.
    pub fn handshake_info(&self) -> HandshakeInfo {
        self.info
    }

    /// True if we opened this link.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// Close the link (see [`ChannelSender::close`]).
    pub fn close(&self) {
        self.sender.close();
    }

    /// The two halves. The link stays open while any [`ChannelSender`] clone exists (dropping the
    /// last one flushes the queue and closes the link in both directions) and until either side
    /// closes it or an error occurs.
    pub fn split(self) -> (ChannelSender, ChannelReceiver) {
        (self.sender, self.receiver)
    }
}

/// The sending half: cheap to clone; all clones feed one bounded queue.
#[derive(Clone, Debug)]
pub struct ChannelSender {
    tx: mpsc::Sender<Cell>,
    closed: CloseSignal,
    /// Longest wait for one frame to be written, in milliseconds (shared with the writer task).
    write_timeout_ms: Arc<AtomicU64>,
}

impl ChannelSender {
    /// Set the longest wait for one frame to be written (default [`WRITE_TIMEOUT`]). A peer that
    /// reads nothing for this long loses the link: its writer stops and the link closes. Relays
    /// set it to their circuit stall timeout, so a peer that stops reading cannot hold the
    /// link's queued cells (and the circuits waiting behind them) for longer.
    pub fn set_write_timeout(&self, timeout: Duration) {
        self.write_timeout_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
    }

    /// Queue a cell, waiting while the queue is full. Fails if the link is closed, or if the cell
    /// breaks the link-cell rules (unknown command, circuit id 0 on a circuit command...).
    pub async fn send(&self, cell: Cell) -> Result<(), LinkError> {
        cell.check()?;
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        tokio::select! {
            r = self.tx.send(cell) => r.map_err(|_| LinkError::Closed),
            () = self.closed.cancelled() => Err(LinkError::Closed),
        }
    }

    /// Queue a cell without waiting; fails with [`LinkError::Closed`] if the link is closed and
    /// returns the cell back if the queue is full.
    pub fn try_send(&self, cell: Cell) -> Result<Option<Cell>, LinkError> {
        cell.check()?;
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        match self.tx.try_send(cell) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(c)) => Ok(Some(c)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LinkError::Closed),
        }
    }

    /// Close the link: no new cells are accepted, the cells already queued are flushed (bounded
    /// by [`WRITE_TIMEOUT`]), then the TCP connection is shut down. The receiver returns `None`.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// True once the link is closed (by either side, or by an error).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Wait until the link is closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }
}

/// The receiving half.
pub struct ChannelReceiver {
    rd: OwnedReadHalf,
    opener: LinkOpener,
    closed: CloseSignal,
    buf: BytesMut,
    plain: Vec<u8>,
    plain_len: usize,
    plain_off: usize,
    error: Option<LinkError>,
}

impl std::fmt::Debug for ChannelReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReceiver")
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl ChannelReceiver {
    /// The next cell from the peer, or `None` once the link is closed (by either side or by an
    /// error; see [`ChannelReceiver::error`]). Cancel-safe. PADDING cells are dropped here.
    pub async fn recv(&mut self) -> Option<Cell> {
        loop {
            if self.error.is_some() {
                return None;
            }
            match self.next_buffered_cell() {
                Ok(Some(c)) if c.cmd == CellCmd::PADDING => continue,
                Ok(Some(c)) => return Some(c),
                Ok(None) => {}
                Err(e) => {
                    self.fail(e);
                    return None;
                }
            }
            if self.closed.is_cancelled() {
                return None;
            }
            // Always leave room for at least two whole frames, so that one read can take all
            // the peer has sent (BytesMut moves the partial frame to the front when it can).
            self.buf.reserve(2 * (MAX_FRAME_LEN + LEN_PREFIX));
            let read = tokio::select! {
                r = self.rd.read_buf(&mut self.buf) => r,
                () = self.closed.cancelled() => return None,
            };
            match read {
                Ok(0) => {
                    self.fail(LinkError::Closed);
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(e.into());
                    return None;
                }
            }
        }
    }

    /// Noise frames opened so far on this link (statistics; each frame holds 1 to 32 cells).
    pub fn frames_received(&self) -> u64 {
        self.opener.frames_received()
    }

    /// Why the link closed, if it closed because of an error seen by this receiver.
    pub fn error(&self) -> Option<&LinkError> {
        self.error.as_ref()
    }

    /// Close the link (as [`ChannelSender::close`]).
    pub fn close(&self) {
        self.closed.cancel();
    }

    fn fail(&mut self, e: LinkError) {
        tracing::debug!(error = %e, "link closed");
        self.error = Some(e);
        self.closed.cancel();
    }

    /// Decode the next cell of the current plaintext, or open the next complete frame in `buf`.
    fn next_buffered_cell(&mut self) -> Result<Option<Cell>, LinkError> {
        loop {
            if self.plain_off < self.plain_len {
                let end = self.plain_off + CELL_LEN;
                let bytes = self
                    .plain
                    .get(self.plain_off..end)
                    .ok_or(LinkError::Misuse("plaintext bounds"))?;
                self.plain_off = end;
                return Ok(Some(Cell::decode(bytes)?));
            }
            let Some((frame, used)) = link::split_transport_frame(&self.buf)? else {
                return Ok(None);
            };
            let n = self.opener.open_frame(frame, &mut self.plain)?;
            self.buf.advance(used);
            self.plain_len = n;
            self.plain_off = 0;
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Cell>,
    mut sealer: LinkSealer,
    closed: CloseSignal,
    write_timeout_ms: Arc<AtomicU64>,
) {
    // One slot per cell of a frame, zeroed once per link (every slot used is overwritten).
    let mut plain = vec![[0u8; CELL_LEN]; MAX_CELLS_PER_FRAME];
    let mut frame = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
    let result: Result<(), LinkError> = async {
        loop {
            let first = tokio::select! {
                biased;
                c = rx.recv() => c,
                () = closed.cancelled() => None,
            };
            let Some(first) = first else { break };
            let out = (&mut plain[..], &mut frame[..], &mut sealer, &mut wr);
            write_batch(first, &mut rx, out, &write_timeout_ms).await?;
        }
        // Closing: flush what is already queued, then shut down.
        rx.close();
        while let Some(c) = rx.recv().await {
            let out = (&mut plain[..], &mut frame[..], &mut sealer, &mut wr);
            write_batch(c, &mut rx, out, &write_timeout_ms).await?;
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "link writer stopped");
    }
    closed.cancel();
}

/// Where a batch goes: the per-cell plaintext slots, the frame buffer, the sealer and the socket.
type FrameOut<'a, W> = (
    &'a mut [[u8; CELL_LEN]],
    &'a mut [u8],
    &'a mut LinkSealer,
    &'a mut W,
);

async fn write_batch<W: AsyncWrite + Unpin>(
    first: Cell,
    rx: &mut mpsc::Receiver<Cell>,
    out: FrameOut<'_, W>,
    write_timeout_ms: &AtomicU64,
) -> Result<(), LinkError> {
    let (plain, frame, sealer, wr) = out;
    let limit = Duration::from_millis(write_timeout_ms.load(Ordering::Relaxed));
    // `first` and then whatever is already queued, up to one frame's worth of cells.
    let mut n = 0;
    let mut next = Some(first);
    while let Some(c) = next.take() {
        let Some(slot) = plain.get_mut(n) else { break };
        c.encode_into(slot);
        n += 1;
        if n < plain.len() {
            next = rx.try_recv().ok();
        }
    }
    let plain = plain
        .get(..n)
        .ok_or(LinkError::Misuse("frame bounds"))?
        .as_flattened();
    let n = sealer.seal_frame(plain, frame)?;
    let bytes = frame.get(..n).ok_or(LinkError::Misuse("frame bounds"))?;
    tokio::time::timeout(limit, wr.write_all(bytes))
        .await
        .map_err(|_| LinkError::WriteTimeout)??;
    Ok(())
}
