//! The client circuit core: one circuit as a synchronous state machine, with no I/O, no tokio, no
//! locks and no clock reads (quinn-proto's shape; docs/protocol/90-circuits.md and 95-client.md).
//!
//! A [`ClientCircuit`] owns everything about one circuit: the per-hop relay-cell crypto
//! ([`allium_crypto::relaycell::ClientCircuitCrypto`]), the pending handshake of the hop being
//! added, the RELAY_EARLY budget, congestion control and stream XON/XOFF ([`allium_proto::flowctl`]) and
//! the stream table (each stream in an explicit [`StreamState`]). Its owner (the reactor in
//! `client/src/reactor.rs`, or a test harness) feeds it and drains it:
//!
//! | in | out |
//! | --- | --- |
//! | [`ClientCircuit::handle_cell`] (a cell from the guard link, and `now`) | [`ClientCircuit::poll_transmit`]: cells for the guard link, in order |
//! | [`ClientCircuit::extend`], [`ClientCircuit::begin_stream`], [`ClientCircuit::package`], [`ClientCircuit::consumed`], [`ClientCircuit::close_stream`], [`ClientCircuit::close`] | [`ClientCircuit::poll_event`]: [`Event`]s (hop added, built, stream connected, data, ended, destroyed...) |
//! | [`ClientCircuit::handle_timeout`] (`now`) | [`ClientCircuit::poll_timeout`]: when to call `handle_timeout` next |
//!
//! # Invariants
//! - **Ratchet order by construction.** Forward cells are encrypted in the order they are queued
//!   for [`ClientCircuit::poll_transmit`], and the owner must put them on the link in that order;
//!   backward cells must be handed in in link order. Nothing else touches the crypto.
//! - **Time enters only as arguments.** Build and stream-open deadlines are computed from the
//!   `now` passed in; [`ClientCircuit::poll_timeout`] says when the next one falls due.
//! - **Flow control bounds everything.** [`ClientCircuit::package`] never takes more than the
//!   congestion window allows (nor anything on a stream stopped by XOFF, nor more than
//!   [`OPTIMISTIC_MAX`] cells before CONNECTED); an exit that sends more DATA on a stream than
//!   its XOFF limit, a SENDME that does not match one of our cells, or a stream SENDME destroys
//!   the circuit. The transmit and event queues are thus bounded by the congestion window and the
//!   XOFF limit plus one control cell per stream.
//! - **A circuit fails once.** The first failure (bad cell, protocol violation, DESTROY, link
//!   loss, timeout, [`ClientCircuit::close`]) moves the circuit to closed: the transmit queue
//!   holds at most the DESTROY that tells the guard (none when the guard destroyed it or the link
//!   is gone), every stream is dropped, one [`Event::Destroyed`] carries the reason, and every
//!   later input is ignored. `handle_cell` returns that reason as its `Err` when the cell it was
//!   given caused the failure.
//! - **RELAY_EARLY.** At most [`MAX_RELAY_EARLY`] per circuit. Every EXTEND travels in RELAY_EARLY
//!   (an EXTEND when none is left fails with [`CircError::EarlyExhausted`]); other forward cells
//!   for hops after the guard use RELAY_EARLY while the budget lasts, then RELAY; cells for the
//!   guard itself use RELAY. A backward RELAY_EARLY destroys the circuit.
//! - **XON/XOFF follow delivery.** A stream's cells count as unconsumed until the application read
//!   them ([`ClientCircuit::consumed`]): XOFF goes out when too many wait, XON once they drained,
//!   so a slow reader stops its own stream. Circuit SENDMEs are sent as soon as the DATA arrives.
//! - Wire input is hostile: no panics and no unchecked indexing on it.

mod circuit;
mod stream;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use allium_crypto::relaycell::{BACKWARD_MSG_OFFSET, CellBody};
use allium_crypto::{RelayId, X25519Public};
use allium_proto::relaymsg::{Begin, LinkSpec, RELAY_HEADER_LEN, RelayMsg};

pub use crate::err::{CircError, StreamError};
pub use circuit::{ClientCircuit, MAX_RELAY_EARLY};
pub use stream::{OPTIMISTIC_MAX, StreamState};

/// Where the data of a backward DATA cell starts in the decrypted cell body.
pub const DATA_OFFSET: usize = BACKWARD_MSG_OFFSET + RELAY_HEADER_LEN;

/// A relay to add to a circuit: what the handshake and the EXTEND message need.
#[derive(Clone, Debug)]
pub struct HopTarget {
    /// The relay's Ed25519 identity.
    pub id: RelayId,
    /// Its current ntor onion key.
    pub onion_key: X25519Public,
    /// Link specifiers for EXTEND (the identity first, then its addresses); unused for the guard.
    pub specs: Vec<LinkSpec>,
}

impl HopTarget {
    /// A target with the identity specifier and one address specifier per address.
    pub fn new(id: RelayId, onion_key: X25519Public, addrs: &[SocketAddr]) -> Self {
        let mut specs = Vec::with_capacity(addrs.len() + 1);
        specs.push(LinkSpec::Ed25519Id(id));
        for a in addrs {
            match a {
                SocketAddr::V4(a4) => specs.push(LinkSpec::Ipv4(*a4)),
                SocketAddr::V6(a6) => specs.push(LinkSpec::Ipv6(*a6)),
            }
        }
        Self {
            id,
            onion_key,
            specs,
        }
    }
}

/// What a new stream asks the exit for.
#[derive(Clone, Debug)]
pub enum StreamTarget {
    /// Connect to a host (name or address) and port (RELAY BEGIN).
    Begin(Begin),
    /// Open a directory stream to the last hop (RELAY BEGIN_DIR).
    BeginDir,
    /// Resolve a host name (RELAY RESOLVE); the stream ends with the answer.
    Resolve(String),
}

/// A stream id on a circuit (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(NonZeroU16);

impl StreamId {
    /// The id for `v`, unless it is 0.
    pub fn new(v: u16) -> Option<Self> {
        NonZeroU16::new(v).map(Self)
    }
    /// Its wire value.
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The payload of one backward DATA cell, without a copy: the decrypted cell body and the data
/// length at [`DATA_OFFSET`].
pub struct DataCell {
    body: Box<CellBody>,
    len: usize,
}

impl DataCell {
    pub(crate) fn new(body: Box<CellBody>, len: usize) -> Self {
        Self { body, len }
    }
    /// The data bytes.
    pub fn bytes(&self) -> &[u8] {
        self.body
            .get(DATA_OFFSET..DATA_OFFSET.saturating_add(self.len))
            .unwrap_or_default()
    }
    /// Number of data bytes.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }
    /// Whether it carries no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for DataCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataCell({} bytes)", self.len)
    }
}

/// Something the owner of a [`ClientCircuit`] must act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Hop `hop` (0 = guard) finished its handshake; the circuit now has `hop + 1` hops.
    HopAdded {
        /// 0-based index of the new hop.
        hop: usize,
    },
    /// Every hop of the path given to [`ClientCircuit::build`] was added.
    Built,
    /// Adding hop `hop` failed (TRUNCATED, a bad handshake reply, or the build timed out). An
    /// [`Event::Destroyed`] follows: the circuit is not used further.
    ExtendFailed {
        /// 0-based index of the hop that could not be added.
        hop: usize,
        /// Why.
        error: CircError,
    },
    /// The exit connected a stream opened with [`StreamTarget::Begin`] or
    /// [`StreamTarget::BeginDir`].
    StreamConnected {
        /// The stream.
        stream: StreamId,
    },
    /// Data for a stream, in order. Report it with [`ClientCircuit::consumed`] once the
    /// application took it.
    StreamData {
        /// The stream.
        stream: StreamId,
        /// The data.
        data: DataCell,
    },
    /// The answer to [`StreamTarget::Resolve`] (the stream is gone afterwards).
    Resolved {
        /// The stream.
        stream: StreamId,
        /// The addresses (may be empty: the name did not resolve to an address).
        addrs: Vec<IpAddr>,
    },
    /// The exit ended a stream (`Ok`: END DONE, a clean end of its data), or opening it failed
    /// (its END reason, or [`StreamError::OpenTimeout`]).
    StreamEnded {
        /// The stream.
        stream: StreamId,
        /// How it ended.
        result: Result<(), StreamError>,
    },
    /// An onion-service message from the last hop (INTRO_ESTABLISHED, INTRODUCE_ACK,
    /// INTRODUCE2, RENDEZVOUS_ESTABLISHED, RENDEZVOUS2): the onion-service layer acts on it.
    OnionService {
        /// The message.
        msg: RelayMsg,
    },
    /// Service role: the client opened stream `stream` through the end-to-end hop. It is open
    /// for data at once; answer with [`ClientCircuit::accept_stream`] (CONNECTED) or
    /// [`ClientCircuit::close_stream`] (END).
    IncomingStream {
        /// The stream.
        stream: StreamId,
        /// What the client asked for (the port selects the service's target).
        begin: Begin,
    },
    /// The circuit is gone, and with it every stream.
    Destroyed {
        /// Why.
        reason: CircError,
    },
}

/// Limits and timeouts of a circuit.
#[derive(Clone, Copy, Debug)]
pub struct CircParams {
    /// Longest time from creation (or from an [`ClientCircuit::extend`]) until the hop (or the
    /// whole path given to [`ClientCircuit::build`]) is added.
    pub build_timeout: Duration,
    /// Longest wait for CONNECTED or RESOLVED after BEGIN or RESOLVE.
    pub stream_timeout: Duration,
    /// Most open streams.
    pub max_streams: usize,
}

impl Default for CircParams {
    fn default() -> Self {
        Self {
            build_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(30),
            max_streams: 500,
        }
    }
}
