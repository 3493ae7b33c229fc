//! The sans-IO relay circuit: [`CircuitCore`] and the CREATE answerer [`answer_create`].
//!
//! Nothing in this module performs I/O, takes a lock, spawns a task or reads a clock: cells,
//! driver inputs and `now` go in; cells to send (per [`Side`]), [`Event`]s and the next timeout
//! come out, in the style of quinn-proto. The tokio driver (`crate::reactor`) is the only code that
//! touches a core, and a test harness can drive one directly with simulated time.
//!
//! # Driving a core
//! ```text
//! loop {
//!     core.handle_cell(side, cell, now)       // every cell that arrived for this circuit
//!     core.handle_timeout(now)                // when poll_timeout() has passed
//!     core.package(sid, bytes, now)           // destination bytes (returns how much it took)
//!     core.stream_connected / stream_failed / stream_eof / data_consumed / resolved
//!     core.extend_failed(reason, now)         // the driver could not reach the next relay
//!     while let Some((side, cell)) = core.poll_transmit() { send on that side, in this order }
//!     while let Some(ev) = core.poll_event() { act on it }
//! }
//! ```
//!
//! # Invariants
//! - **Ratchet order.** Every backward cell is encrypted (its ratchet advanced) when it is put in
//!   the transmit queue, and [`CircuitCore::poll_transmit`] returns cells in that order: a driver
//!   that sends them in the order it polls them keeps the client's decryption in step.
//! - **Ids.** Cells from `poll_transmit` carry no circuit id (`circ_id: None`, which would encode
//!   as wire 0): the driver writes the id it uses on that side's link, so the core never knows
//!   either link's id. A cell for [`Side::Next`] while the driver has no next-hop id (the
//!   extension failed before a CREATE was sent) is dropped by the driver.
//! - **Destruction.** Any error returned by [`CircuitCore::handle_cell`] has already destroyed the
//!   circuit: DESTROY cells for the other side(s) are queued, [`Event::Destroyed`] is queued, and
//!   every later input is ignored. [`CircuitCore::close_error`] says why.
//! - **Bounded.** Cells the core originates for streams are bounded by the congestion window
//!   (at most [`allium_proto::flowctl::CWND_MAX`]); DATA from the client is bounded per stream by
//!   the XOFF limit (optimistic data held before the connection counts too); each input produces
//!   a bounded number of output cells. So the transmit queue holds at most the congestion window
//!   plus a few control cells, as long as the driver drains it before feeding more input. A
//!   SENDME that comes before its cells were sent, one too many, or with a wrong tag destroys
//!   the circuit; so does a stream-level SENDME (streams use XON/XOFF).
//! - **Circuit queue cap.** Circuit SENDMEs go out when their DATA arrives while the exit
//!   streams hold at most [`CoreConfig::circ_queue_cells`] unwritten cells; above that they are
//!   withheld, in order, and released as the destinations drain (or their streams close). The
//!   client's congestion window then neither grows nor reopens, so the cells a circuit can pin
//!   at the exit are bounded by the cap plus the window it had when the cap was reached (not a
//!   whole maximal window per stream). More withheld SENDMEs than a maximal window can owe is
//!   a violation.
//! - **Blocked cap.** The driver reports when the link it must write to is full
//!   ([`CircuitCore::note_blocked`]) and when it has room again ([`CircuitCore::note_unblocked`]);
//!   blocked for longer than [`CoreConfig::blocked_cap`], the circuit is destroyed at the next
//!   [`CircuitCore::handle_timeout`].
//!
//! Behaviour is specified in `docs/protocol/91-relay.md`.

mod circuit;
mod create;
mod err;
mod exit;
pub mod intro;
pub mod rendezvous;
mod stream;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::RelayId;
use allium_crypto::relaycell::CellBody;
use allium_proto::cell::{Cell, Create, DestroyReason};
use allium_proto::flowctl::CcParams;
use allium_proto::relaymsg::EndReason;
use allium_proto::relaymsg::{Introduce, RendCookie};

pub use circuit::{CircuitCore, HsRole, MAX_RELAY_EARLY, Next};
pub use create::{CreateError, answer_create, answer_create_body};
pub use err::CircError;
pub use stream::{HalfClose, StreamState};

use crate::policy::ExitPolicy;

/// Default longest time from EXTEND to CREATED.
pub const EXTEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Default longest time a circuit may stay unable to write before it is destroyed.
pub const BLOCKED_CAP: Duration = Duration::from_secs(30);
/// Default longest wait for the client to open a stream's package window.
pub const WINDOW_TIMEOUT: Duration = Duration::from_secs(600);
/// Default [`CoreConfig::circ_queue_cells`]: 64 cells (32 KiB), two SENDME increments.
pub const CIRC_QUEUE_CELLS: u32 = 64;
/// TTL reported in CONNECTED and RESOLVED.
pub const DNS_TTL: u32 = 300;
/// Most answers in one RESOLVED.
pub const MAX_RESOLVED_ANSWERS: usize = 8;
/// Most addresses of a resolved name the exit tries to connect to.
pub const MAX_CONNECT_ADDRS: usize = 4;

/// Which side of a circuit a cell comes from or goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Towards the client: cells from this side travel forward.
    Prev,
    /// Away from the client: cells from this side travel backward.
    Next,
}

/// What a core needs to know about its relay; no shared state.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This relay's identity (an EXTEND to it is refused).
    pub own_id: RelayId,
    /// The previous hop is a client, not a relay: this relay is the first hop and refuses BEGIN
    /// and RESOLVE (no one-hop exits).
    pub prev_is_client: bool,
    /// The exit policy.
    pub policy: Arc<ExitPolicy>,
    /// Most streams (and RESOLVE lookups) open on the circuit at once.
    pub max_streams: usize,
    /// Longest time from EXTEND to CREATED.
    pub extend_timeout: Duration,
    /// Longest time the circuit may stay unable to write before it is destroyed.
    pub blocked_cap: Duration,
    /// Longest time a stream may wait for the client to open a package window (then END
    /// TIMEOUT).
    pub window_timeout: Duration,
    /// Congestion-control parameters this relay offers in CREATED (the SENDME increment).
    pub cc: CcParams,
    /// Most DATA cells the circuit's exit streams may hold unwritten (over all its streams)
    /// while circuit SENDMEs still go out on arrival; above it they are withheld until the
    /// destinations drain, so a client cannot grow its window and push more into streams that
    /// do not drain. 0: SENDMEs always go out on arrival.
    pub circ_queue_cells: u32,
}

impl CoreConfig {
    /// Defaults for everything but the identity, the previous hop and the policy.
    pub fn new(own_id: RelayId, prev_is_client: bool, policy: Arc<ExitPolicy>) -> Self {
        Self {
            own_id,
            prev_is_client,
            policy,
            max_streams: 256,
            extend_timeout: EXTEND_TIMEOUT,
            blocked_cap: BLOCKED_CAP,
            window_timeout: WINDOW_TIMEOUT,
            cc: CcParams::default(),
            circ_queue_cells: CIRC_QUEUE_CELLS,
        }
    }
}

/// The bytes of one received DATA cell, still in the cell's box (no copy on the way through).
#[derive(Debug)]
pub struct DataChunk {
    body: Box<CellBody>,
    start: usize,
    len: usize,
}

impl DataChunk {
    /// The data bytes.
    pub fn bytes(&self) -> &[u8] {
        self.body
            .get(self.start..self.start.saturating_add(self.len))
            .unwrap_or(&[])
    }
}

/// Why a name could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveFailure {
    /// The name does not exist (or has no addresses).
    NotFound,
    /// The resolver did not answer in time.
    Timeout,
    /// Too many lookups in progress at this relay.
    Busy,
}

/// Something the driver must do.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Connect stream `sid` to one of `addrs` (already allowed by the exit policy, in order);
    /// answer with [`CircuitCore::stream_connected`] or [`CircuitCore::stream_failed`].
    OpenStream {
        /// The stream.
        sid: u16,
        /// Candidate addresses, at most [`MAX_CONNECT_ADDRS`].
        addrs: Vec<SocketAddr>,
    },
    /// BEGIN_DIR on stream `sid` (this relay is the last hop): serve a directory stream.
    /// Accept it with [`CircuitCore::stream_connected`] (CONNECTED, no address) or refuse it
    /// with [`CircuitCore::stream_failed`]; the request arrives as [`Event::StreamData`], the
    /// response goes out with [`CircuitCore::package`], then [`CircuitCore::stream_eof`].
    OpenDirStream {
        /// The stream.
        sid: u16,
    },
    /// Resolve `hostname` for stream `sid`; answer with [`CircuitCore::resolved`].
    Resolve {
        /// The stream (a BEGIN with a host name, or a RESOLVE).
        sid: u16,
        /// The name (sensitive: do not log it).
        hostname: String,
    },
    /// Open (or reuse) a link to relay `relay`, at one of `addrs` that the directory lists for
    /// it, and send `create` there; answer a failure with [`CircuitCore::extend_failed`]. The
    /// CREATED is given to [`CircuitCore::handle_cell`] from [`Side::Next`].
    ExtendTo {
        /// The next relay's identity.
        relay: RelayId,
        /// The addresses the client gave.
        addrs: Vec<SocketAddr>,
        /// The CREATE to send.
        create: Create,
    },
    /// The next hop was dropped (TRUNCATE, failed or timed-out extension): forget its circuit
    /// id on its link. A DESTROY for it, if due, came through `poll_transmit` first.
    NextClosed,
    /// Bytes for the destination of stream `sid`; report them with
    /// [`CircuitCore::data_consumed`] once written.
    StreamData {
        /// The stream.
        sid: u16,
        /// The bytes.
        data: DataChunk,
    },
    /// The client finished sending on `sid` (END DONE): shut down the write side after the
    /// queued bytes.
    StreamEnd {
        /// The stream.
        sid: u16,
    },
    /// Stream `sid` is gone from the table. `graceful`: both sides finished, so let the queued
    /// bytes be written first; otherwise drop the connection now.
    StreamClosed {
        /// The stream.
        sid: u16,
        /// Whether queued bytes should still be written.
        graceful: bool,
    },
    /// A verified ESTABLISH_INTRO: register this circuit for `auth_key` in the relay's
    /// [`intro::IntroRegistry`], then answer with [`CircuitCore::intro_registered`].
    EstablishIntro {
        /// The service's introduction auth key.
        auth_key: allium_crypto::RelayId,
    },
    /// An INTRODUCE1 from a client: look its auth key up in the registry; on success hand the
    /// message to that circuit's [`CircuitCore::send_introduce2`]; answer this circuit with
    /// [`CircuitCore::introduce_acked`].
    Introduce1 {
        /// The request (its encrypted part is opaque to the relay).
        msg: Introduce,
    },
    /// ESTABLISH_RENDEZVOUS: put this circuit in the [`rendezvous::RendezvousTable`] under
    /// `cookie`, then answer with [`CircuitCore::rendezvous_registered`].
    EstablishRendezvous {
        /// The client's cookie.
        cookie: RendCookie,
    },
    /// RENDEZVOUS1 from a service: take the circuit waiting under `cookie`; give it
    /// `handshake_info` with [`CircuitCore::rendezvous_joined`] and answer this circuit with
    /// [`CircuitCore::rendezvous1_result`]. From then on the two circuits are joined.
    Rendezvous1 {
        /// The cookie.
        cookie: RendCookie,
        /// The service's handshake half, for RENDEZVOUS2.
        handshake_info: Vec<u8>,
    },
    /// A cell for the joined circuit (its end-to-end layer intact, this relay's layer off): give
    /// it to that circuit's [`CircuitCore::joined_cell`], in order, through a bounded queue.
    JoinedCell {
        /// The cell (no circuit id).
        cell: Cell,
    },
    /// The circuit is destroyed; `reason` went out in the DESTROY cells. Nothing follows.
    Destroyed {
        /// The reason sent.
        reason: DestroyReason,
    },
}

/// The END reason for a failed connection attempt, by I/O error kind.
pub fn connect_error_reason(kind: std::io::ErrorKind) -> EndReason {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused => EndReason::CONNECTREFUSED,
        K::TimedOut => EndReason::TIMEOUT,
        K::HostUnreachable | K::NetworkUnreachable => EndReason::NOROUTE,
        K::ConnectionReset | K::BrokenPipe => EndReason::CONNRESET,
        _ => EndReason::MISC,
    }
}
