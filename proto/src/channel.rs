//! The tokio driver of a link (design §1): connect / accept, then cells in and out.
//!
//! - [`connect`] and [`accept`] run the Noise XK handshake of [`crate::link`] under
//!   [`HANDSHAKE_TIMEOUT`] on a TCP socket with `TCP_NODELAY`.
//! - [`Channel::split`] gives a [`ChannelSender`] (cloneable; per-circuit bounded queues in a
//!   [`CircuitMux`], drained by one writer task that takes the next cells lowest-EWMA circuit
//!   first, up to 32, into one Noise frame and one `write`; circuits sent with
//!   [`ChannelSender::send_in`] share the link per group) and a [`ChannelReceiver`] (reads and
//!   opens frames in the caller's task, no extra task switch).
//! - Fair sharing needs the queue to build up here, not in the kernel: link sockets get
//!   `TCP_NOTSENT_LOWAT` ([`NOTSENT_LOWAT`]), so the writer only hands the kernel more once its
//!   unsent backlog is small and the next cells are chosen as late as possible (the idea of Tor's
//!   KIST scheduler).
//! - Any error (bad frame length, failed authentication, unknown cell command, I/O, write stall)
//!   closes the whole link: both halves see it closed.
//! - Link PADDING cells are dropped by the receiver.
//! - Traffic: a link counts whole frames as they cross the socket (length prefix and tag
//!   included) into the [`LinkBytes`] given to [`Channel::count_into`], one relaxed atomic add
//!   per frame and direction (never per cell).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allium_crypto::{RelayId, X25519Public, X25519Secret};
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cell::{CELL_LEN, Cell, CellCmd};
use crate::circmux::{CircGroup, CircuitMux, MuxConfig};
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
/// Cells queued per link (all circuits) before [`ChannelSender::send`] waits (a group of
/// circuits under its fair share of it may still add to them, up to twice it: see
/// [`MuxConfig::reserve`]).
pub const SEND_QUEUE_CELLS: usize = 512;
/// Cells queued per circuit on a link before [`ChannelSender::send`] waits for that circuit.
pub const CIRC_QUEUE_CELLS: usize = 128;
/// Unsent bytes a link socket may hold in the kernel before the writer waits
/// (`TCP_NOTSENT_LOWAT`; Linux only, elsewhere the kernel's default applies).
pub const NOTSENT_LOWAT: u32 = 64 * 1024;
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

/// Bytes a node's links moved, counted per Noise frame (length prefix and tag included) as the
/// frame is written to or read from the socket. Shared by every link of a node.
#[derive(Debug, Default)]
pub struct LinkBytes {
    read: AtomicU64,
    written: AtomicU64,
    /// Cells in the frames read and written (every frame carries whole cells).
    cells_read: AtomicU64,
    cells_written: AtomicU64,
    /// Cells written from circuits scheduled in a group ([`ChannelSender::send_in`]).
    cells_written_grouped: AtomicU64,
    /// The send queues of the links that count here (for [`LinkBytes::queued_bytes`]).
    queues: std::sync::Mutex<Vec<std::sync::Weak<SendQueue>>>,
}

impl LinkBytes {
    /// Bytes of frames read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    /// Bytes of frames written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    /// Cells in the frames read so far.
    pub fn cells_read(&self) -> u64 {
        self.cells_read.load(Ordering::Relaxed)
    }
    /// Cells in the frames written so far.
    pub fn cells_written(&self) -> u64 {
        self.cells_written.load(Ordering::Relaxed)
    }
    /// Cells written from circuits that were scheduled in a group ([`ChannelSender::send_in`]):
    /// shows that per-group scheduling is in use.
    pub fn cells_written_grouped(&self) -> u64 {
        self.cells_written_grouped.load(Ordering::Relaxed)
    }
    /// Bytes of cells waiting in the send queues of the open links that count here, now
    /// (computed when asked: links pay nothing for it).
    pub fn queued_bytes(&self) -> u64 {
        let Ok(mut qs) = self.queues.lock() else {
            return 0;
        };
        let mut cells = 0usize;
        qs.retain(|w| match w.upgrade() {
            Some(q) => {
                cells += q.state.lock().map(|s| s.mux.len()).unwrap_or(0);
                true
            }
            None => false,
        });
        (cells * CELL_LEN) as u64
    }
    fn add_read(&self, n: usize, cells: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        self.cells_read.fetch_add(cells as u64, Ordering::Relaxed);
    }
    fn add_written(&self, n: usize, cells: usize, grouped: u64) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        self.cells_written
            .fetch_add(cells as u64, Ordering::Relaxed);
        if grouped > 0 {
            self.cells_written_grouped
                .fetch_add(grouped, Ordering::Relaxed);
        }
    }
}

/// Where one link counts its frames (set once by [`Channel::count_into`]).
type CounterSlot = Arc<std::sync::OnceLock<Arc<LinkBytes>>>;

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
    counters: CounterSlot,
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
        set_notsent_lowat(&tcp);
        let peer_static = t.remote_static();
        let initiator = t.is_initiator();
        let (rd, wr) = tcp.into_split();
        // The two directions seal and open independently (no lock shared per frame).
        let (sealer, opener) = t.split();
        let closed = CloseSignal::new();
        let (sender, queue) = ChannelSender::new(closed.clone(), MuxConfig::default());
        let counters = CounterSlot::default();
        tokio::spawn(writer_task(
            wr,
            queue,
            sealer,
            closed.clone(),
            Arc::clone(&sender.inner.write_timeout_ms),
            Arc::clone(&counters),
        ));
        Self {
            peer_static,
            peer_addr,
            info,
            initiator,
            sender,
            counters: Arc::clone(&counters),
            receiver: ChannelReceiver {
                rd,
                opener,
                closed,
                counters,
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

    /// Count this link's frames into `to` from now on (call it before the first cell moves).
    /// Returns false, changing nothing, if the link already counts somewhere.
    pub fn count_into(&self, to: &Arc<LinkBytes>) -> bool {
        if self.counters.set(Arc::clone(to)).is_err() {
            return false;
        }
        if let Ok(mut qs) = to.queues.lock() {
            // Forget closed links while here, so the list stays as long as the open ones.
            qs.retain(|w| w.strong_count() > 0);
            qs.push(Arc::downgrade(&self.sender.inner.queue));
        }
        true
    }

    /// The two halves. The link stays open while any [`ChannelSender`] clone exists (dropping the
    /// last one flushes the queue and closes the link in both directions) and until either side
    /// closes it or an error occurs.
    pub fn split(self) -> (ChannelSender, ChannelReceiver) {
        (self.sender, self.receiver)
    }
}

/// What the senders and the writer task share: the scheduler and two wake-ups.
#[derive(Debug)]
struct SendQueue {
    state: std::sync::Mutex<QueueState>,
    /// A cell was queued into an empty scheduler (the writer may be asleep).
    wake_writer: Notify,
    /// The writer took cells after a push was refused.
    room: Notify,
}

#[derive(Debug)]
struct QueueState {
    mux: CircuitMux,
    /// Some push was refused since the writer last woke the waiting senders.
    refused: bool,
}

impl SendQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `cell` (in `group`, see [`CircuitMux::push_in`]), or hand it back if its circuit's
    /// queue or the link's is full.
    fn try_push(&self, cell: Cell, group: Option<CircGroup>) -> Option<Cell> {
        let mut st = self.lock();
        let was_empty = st.mux.is_empty();
        match st.mux.push_in(cell, group) {
            Ok(()) => {
                drop(st);
                if was_empty {
                    self.wake_writer.notify_one();
                }
                None
            }
            Err(r) => {
                st.refused = true;
                Some(r.into_cell())
            }
        }
    }

    /// Move up to `max` cells, in scheduler order at `now`, into `batch`; returns how many of
    /// them came from grouped circuits.
    fn take_batch(&self, batch: &mut Vec<Cell>, max: usize, now: std::time::Instant) -> u64 {
        let mut st = self.lock();
        let grouped_before = st.mux.grouped_sent();
        while batch.len() < max {
            let Some(c) = st.mux.pop(now) else { break };
            batch.push(c);
        }
        let grouped = st.mux.grouped_sent() - grouped_before;
        let wake = std::mem::take(&mut st.refused) && !batch.is_empty();
        drop(st);
        if wake {
            self.room.notify_waiters();
        }
        grouped
    }
}

/// The sending half: cheap to clone; all clones feed one per-link scheduler.
#[derive(Clone, Debug)]
pub struct ChannelSender {
    inner: Arc<SenderInner>,
}

/// Shared by the clones of one [`ChannelSender`]; the last one dropped closes the link.
#[derive(Debug)]
struct SenderInner {
    queue: Arc<SendQueue>,
    closed: CloseSignal,
    /// Longest wait for one frame to be written, in milliseconds (shared with the writer task).
    write_timeout_ms: Arc<AtomicU64>,
}

impl Drop for SenderInner {
    fn drop(&mut self) {
        // As with the queue it replaces: the writer flushes what is queued, then shuts down.
        self.closed.cancel();
    }
}

impl ChannelSender {
    fn new(closed: CloseSignal, cfg: MuxConfig) -> (Self, Arc<SendQueue>) {
        let cfg = MuxConfig {
            circ_cap: CIRC_QUEUE_CELLS,
            total_cap: SEND_QUEUE_CELLS,
            ..cfg
        };
        let queue = Arc::new(SendQueue {
            state: std::sync::Mutex::new(QueueState {
                mux: CircuitMux::new(cfg),
                refused: false,
            }),
            wake_writer: Notify::new(),
            room: Notify::new(),
        });
        let inner = SenderInner {
            queue: Arc::clone(&queue),
            closed,
            write_timeout_ms: Arc::new(AtomicU64::new(duration_ms(WRITE_TIMEOUT))),
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            queue,
        )
    }

    /// Set the longest wait for one frame to be written (default [`WRITE_TIMEOUT`]). A peer that
    /// reads nothing for this long loses the link: its writer stops and the link closes. Relays
    /// set it to their circuit stall timeout, so a peer that stops reading cannot hold the
    /// link's queued cells (and the circuits waiting behind them) for longer.
    pub fn set_write_timeout(&self, timeout: Duration) {
        self.inner
            .write_timeout_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
    }

    /// Queue a cell, waiting while its circuit's queue (or the link's) is full. Fails if the link
    /// is closed, or if the cell breaks the link-cell rules (unknown command, circuit id 0 on a
    /// circuit command...).
    pub async fn send(&self, cell: Cell) -> Result<(), LinkError> {
        self.send_in(cell, None).await
    }

    /// As [`ChannelSender::send`], scheduling the cell's circuit in `group`: the circuits of one
    /// group share the link as one circuit does against the others (see
    /// [`CircuitMux::push_in`]; `None` leaves the circuit's group as it is, ungrouped for a new
    /// circuit). Pass the same group with every cell of the circuit.
    pub async fn send_in(&self, cell: Cell, group: Option<CircGroup>) -> Result<(), LinkError> {
        cell.check()?;
        let q = &self.inner.queue;
        let mut cell = cell;
        loop {
            if self.inner.closed.is_cancelled() {
                return Err(LinkError::Closed);
            }
            // Registered before the attempt, so a wake-up between the two is not lost.
            let room = q.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match q.try_push(cell, group) {
                None => return Ok(()),
                Some(c) => cell = c,
            }
            tokio::select! {
                () = room => {}
                () = self.inner.closed.cancelled() => return Err(LinkError::Closed),
            }
        }
    }

    /// Queue a cell without waiting; fails with [`LinkError::Closed`] if the link is closed and
    /// returns the cell back if its circuit's queue (or the link's) is full.
    pub fn try_send(&self, cell: Cell) -> Result<Option<Cell>, LinkError> {
        self.try_send_in(cell, None)
    }

    /// As [`ChannelSender::try_send`], in `group` (see [`ChannelSender::send_in`]).
    pub fn try_send_in(
        &self,
        cell: Cell,
        group: Option<CircGroup>,
    ) -> Result<Option<Cell>, LinkError> {
        cell.check()?;
        if self.inner.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        Ok(self.inner.queue.try_push(cell, group))
    }

    /// Close the link: no new cells are accepted, the cells already queued are flushed (bounded
    /// by [`WRITE_TIMEOUT`]), then the TCP connection is shut down. The receiver returns `None`.
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// True once the link is closed (by either side, or by an error).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Wait until the link is closed.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }
}

/// Ask the kernel to keep at most [`NOTSENT_LOWAT`] unsent bytes for this socket (best effort).
fn set_notsent_lowat(tcp: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT on a link socket");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
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
    counters: CounterSlot,
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
            if let Some(c) = self.counters.get() {
                c.add_read(used, n / CELL_LEN);
            }
            self.plain_len = n;
            self.plain_off = 0;
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The writer clock: tokio's, so that tests can pause it.
#[allow(clippy::disallowed_methods)] // The writer task is a driver: time enters here.
fn writer_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: W,
    queue: Arc<SendQueue>,
    mut sealer: LinkSealer,
    closed: CloseSignal,
    write_timeout_ms: Arc<AtomicU64>,
    counters: CounterSlot,
) {
    // One slot per cell of a frame, zeroed once per link (every slot used is overwritten).
    let mut plain = vec![[0u8; CELL_LEN]; MAX_CELLS_PER_FRAME];
    let mut frame = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
    let mut batch: Vec<Cell> = Vec::with_capacity(MAX_CELLS_PER_FRAME);
    let result: Result<(), LinkError> = async {
        loop {
            // Closing: flush what is already queued, then shut down.
            let closing = closed.is_cancelled();
            let grouped = queue.take_batch(&mut batch, MAX_CELLS_PER_FRAME, writer_now());
            if batch.is_empty() {
                if closing {
                    break;
                }
                tokio::select! {
                    biased;
                    () = queue.wake_writer.notified() => {}
                    () = closed.cancelled() => {}
                }
                continue;
            }
            let cells = batch.len();
            let out = (&mut plain[..], &mut frame[..], &mut sealer, &mut wr);
            let n = write_batch(&mut batch, out, &write_timeout_ms).await?;
            if let Some(c) = counters.get() {
                c.add_written(n, cells, grouped);
            }
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "link writer stopped");
    }
    closed.cancel();
    // Senders waiting for room see the link closed.
    queue.room.notify_waiters();
}

/// Where a batch goes: the per-cell plaintext slots, the frame buffer, the sealer and the socket.
type FrameOut<'a, W> = (
    &'a mut [[u8; CELL_LEN]],
    &'a mut [u8],
    &'a mut LinkSealer,
    &'a mut W,
);

/// Seal the cells of `batch` (at most one frame's worth; emptied) into one frame and write it;
/// returns the frame's length on the wire.
async fn write_batch<W: AsyncWrite + Unpin>(
    batch: &mut Vec<Cell>,
    out: FrameOut<'_, W>,
    write_timeout_ms: &AtomicU64,
) -> Result<usize, LinkError> {
    let (plain, frame, sealer, wr) = out;
    let limit = Duration::from_millis(write_timeout_ms.load(Ordering::Relaxed));
    let mut n = 0;
    for (c, slot) in batch.drain(..).zip(plain.iter_mut()) {
        c.encode_into(slot);
        n += 1;
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
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

    use super::*;
    use crate::cell::CircId;
    use allium_crypto::X25519Secret;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// Both ends of a link transport, handshaken in memory.
    fn transports() -> (LinkTransport, LinkTransport) {
        let id = RelayId([7; 32]);
        let key = X25519Secret::generate();
        let mut m1 = Vec::new();
        let init = Initiator::start(&id, &key.public(), None, &mut m1).unwrap();
        let mut m2 = Vec::new();
        let wait = Responder::new(&id, &key)
            .unwrap()
            .read_msg1(&m1[2..], 0, &mut m2)
            .unwrap();
        let mut m3 = Vec::new();
        let (ti, _) = init.read_msg2(&m2[2..], 0, &mut m3).unwrap();
        let (tr, _) = wait.read_msg3(&m3[2..]).unwrap();
        (ti, tr)
    }

    fn relay_cell(circ: u32, tag: u8) -> Cell {
        let mut c = Cell::new_zeroed(CircId::new(circ), CellCmd::RELAY);
        c.body[0] = tag;
        c
    }

    /// A sender whose writer task seals into a pipe that holds two frames; the test reads the
    /// pipe (`rd`) and opens the frames (`opener`) at the pace it wants.
    fn slow_link() -> (ChannelSender, LinkOpener, tokio::io::DuplexStream) {
        let (ti, tr) = transports();
        let (sealer, _) = ti.split();
        let (_, opener) = tr.split();
        let (wr, rd) = tokio::io::duplex(2 * (MAX_FRAME_LEN + LEN_PREFIX));
        let closed = CloseSignal::new();
        let (sender, queue) = ChannelSender::new(closed.clone(), MuxConfig::default());
        let timeout = Arc::clone(&sender.inner.write_timeout_ms);
        tokio::spawn(writer_task(
            wr,
            queue,
            sealer,
            closed.clone(),
            timeout,
            CounterSlot::default(),
        ));
        (sender, opener, rd)
    }

    /// Run a link whose peer reads one frame per 10 ms (simulated) through a pipe that holds
    /// two frames. Circuit 1 keeps its queue full if `bulk`; circuit 2 sends one cell every
    /// 200 ms. Returns circuit 2's per-cell delays (queued to read) and the bulk cells read.
    async fn interactive_delays(bulk: bool) -> (Vec<Duration>, usize) {
        let (sender, mut opener, mut rd) = slow_link();
        if bulk {
            let s = sender.clone();
            tokio::spawn(async move { while s.send(relay_cell(1, 0)).await.is_ok() {} });
        }
        const N: usize = 20;
        let sent_at = Arc::new(Mutex::new(vec![None::<Instant>; N]));
        {
            let s = sender.clone();
            let sent_at = Arc::clone(&sent_at);
            tokio::spawn(async move {
                for i in 0..N {
                    sent_at.lock().unwrap()[i] = Some(Instant::now());
                    s.send(relay_cell(2, i as u8)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
        let mut plain = vec![0u8; MAX_FRAME_LEN];
        let mut delays = Vec::new();
        let mut bulk_cells = 0;
        while delays.len() < N {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let n = tokio::select! {
                r = rd.read(&mut chunk) => r.unwrap(),
                () = tokio::time::sleep(Duration::from_millis(1)) => 0,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some((frame, used)) = link::split_transport_frame(&buf).unwrap() {
                let m = opener.open_frame(frame, &mut plain).unwrap();
                buf.advance(used);
                for c in plain[..m].chunks(CELL_LEN) {
                    let c = Cell::decode(c).unwrap();
                    match c.circ_id.unwrap().get() {
                        1 => bulk_cells += 1,
                        _ => {
                            let at = sent_at.lock().unwrap()[usize::from(c.body[0])].unwrap();
                            delays.push(at.elapsed());
                        }
                    }
                }
            }
        }
        sender.close();
        (delays, bulk_cells)
    }

    /// EWMA scheduling on a real writer: a bulk circuit that keeps 128 cells queued (four
    /// frames) does not delay an interactive circuit's cells by more than the frames already
    /// in flight. With one FIFO queue per link each of them would wait behind the backlog.
    #[tokio::test(start_paused = true)]
    async fn bulk_circuit_does_not_starve_an_interactive_one() {
        let (alone, _) = interactive_delays(false).await;
        let (shared, bulk_cells) = interactive_delays(true).await;
        // The bulk circuit did get the link (~32 cells per 10 ms over ~4 s).
        assert!(bulk_cells > 5000, "{bulk_cells}");
        let worst_alone = alone.iter().max().copied().unwrap();
        let worst = shared.iter().max().copied().unwrap();
        // Pipe (two frames) plus the frame being written: at most ~4 reads of 10 ms, whereas
        // the bulk backlog alone is four more frames.
        assert!(worst_alone <= Duration::from_millis(25), "{alone:?}");
        assert!(worst <= Duration::from_millis(45), "{shared:?}");
    }

    /// Through the real writer task, a peer reading one frame per 10 ms (simulated): 20 bulk
    /// circuits in one group and one ungrouped bulk circuit each get about half of the link;
    /// with the 20 ungrouped, the lone circuit gets about 1/21.
    #[tokio::test(start_paused = true)]
    async fn a_group_of_bulk_circuits_shares_the_writer_as_one() {
        async fn lone_share(grouped: bool) -> f64 {
            let (sender, mut opener, mut rd) = slow_link();
            for circ in 1..=21u32 {
                let s = sender.clone();
                let group = (grouped && circ <= 20).then_some(CircGroup(9));
                tokio::spawn(async move {
                    while s.send_in(relay_cell(circ, 0), group).await.is_ok() {}
                });
            }
            let mut buf = BytesMut::new();
            let mut chunk = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
            let mut plain = vec![0u8; MAX_FRAME_LEN];
            let (mut lone, mut all) = (0usize, 0usize);
            // Skip the first frames (queued before every circuit had cells in).
            let mut frames = 0;
            while frames < 300 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let n = rd.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                while let Some((frame, used)) = link::split_transport_frame(&buf).unwrap() {
                    let m = opener.open_frame(frame, &mut plain).unwrap();
                    buf.advance(used);
                    frames += 1;
                    if frames <= 20 {
                        continue;
                    }
                    for c in plain[..m].chunks(CELL_LEN) {
                        all += 1;
                        lone += usize::from(Cell::decode(c).unwrap().circ_id.unwrap().get() == 21);
                    }
                }
            }
            sender.close();
            lone as f64 / all as f64
        }
        let grouped = lone_share(true).await;
        assert!((0.45..=0.55).contains(&grouped), "{grouped}");
        let ungrouped = lone_share(false).await;
        assert!(ungrouped < 0.1, "{ungrouped}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_circuit_waits_without_blocking_the_others() {
        let (ti, _tr) = transports();
        let (sealer, _) = ti.split();
        // Nobody reads: the writer blocks on its first frames.
        let (wr, _rd) = tokio::io::duplex(MAX_FRAME_LEN + LEN_PREFIX);
        let closed = CloseSignal::new();
        let (sender, queue) = ChannelSender::new(closed.clone(), MuxConfig::default());
        let timeout = Arc::clone(&sender.inner.write_timeout_ms);
        tokio::spawn(writer_task(
            wr,
            queue,
            sealer,
            closed.clone(),
            timeout,
            CounterSlot::default(),
        ));
        let mut queued = 0;
        while sender.try_send(relay_cell(1, 0)).unwrap().is_none() {
            queued += 1;
            assert!(queued < 10 * CIRC_QUEUE_CELLS);
            tokio::task::yield_now().await;
        }
        // Circuit 1 is full (its cap plus what the writer took); circuit 2 still gets in.
        assert!(queued >= CIRC_QUEUE_CELLS);
        assert!(sender.try_send(relay_cell(2, 0)).unwrap().is_none());
        // A waiting send on the full circuit ends when the link closes.
        let s = sender.clone();
        let waiter = tokio::spawn(async move { s.send(relay_cell(1, 0)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        sender.close();
        assert!(matches!(waiter.await.unwrap(), Err(LinkError::Closed)));
        assert!(matches!(
            sender.try_send(relay_cell(3, 0)),
            Err(LinkError::Closed)
        ));
    }

    /// Frames are counted on both sides, once each: what one end writes, the other reads, and
    /// the count is the cells plus each frame's length prefix and tag.
    #[tokio::test]
    async fn link_bytes_count_whole_frames() {
        let id = RelayId([9; 32]);
        let key = X25519Secret::generate();
        let public = key.public();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            accept(tcp, &id, &key).await.unwrap()
        });
        let client = connect(addr, &id, &public, None).await.unwrap();
        let server = server.await.unwrap();
        let (sent, got) = (
            Arc::new(LinkBytes::default()),
            Arc::new(LinkBytes::default()),
        );
        assert!(client.count_into(&sent));
        assert!(!client.count_into(&got), "a link counts into one place");
        assert!(server.count_into(&got));
        let (tx, _crx) = client.split();
        let (_stx, mut rx) = server.split();
        const N: usize = 40;
        for i in 0..N {
            if i % 4 == 0 {
                tx.send_in(relay_cell(3, i as u8), Some(CircGroup(7)))
                    .await
                    .unwrap();
            } else {
                tx.send(relay_cell(1, i as u8)).await.unwrap();
            }
        }
        for _ in 0..N {
            rx.recv().await.unwrap();
        }
        let frames = rx.frames_received() as usize;
        assert!(frames >= 2, "{N} cells need at least two frames");
        let overhead = got.read() as usize - N * CELL_LEN;
        assert_eq!(overhead % frames, 0);
        assert!(overhead / frames >= LEN_PREFIX && overhead / frames <= LEN_PREFIX + 32);
        assert_eq!(sent.written(), got.read());
        assert_eq!(sent.read(), 0);
        assert_eq!(got.written(), 0);
        // Cells are counted once each, on both sides.
        assert_eq!(sent.cells_written(), N as u64);
        assert_eq!(got.cells_read(), N as u64);
        assert_eq!((sent.cells_read(), got.cells_written()), (0, 0));
        // The cells of the grouped circuit are counted apart as well.
        assert_eq!(sent.cells_written_grouped(), N as u64 / 4);
        assert_eq!(got.cells_written_grouped(), 0);
        assert_eq!(sent.queued_bytes(), 0, "everything was sent");
        // Cells queued and not yet taken by the writer (it cannot run: this test's runtime has
        // one thread and the loop does not yield) are counted when asked.
        let mut queued = 0;
        while tx.try_send(relay_cell(2, 0)).unwrap().is_none() {
            queued += 1;
        }
        assert_eq!(queued, CIRC_QUEUE_CELLS);
        assert_eq!(sent.queued_bytes(), (queued * CELL_LEN) as u64);
    }
}
