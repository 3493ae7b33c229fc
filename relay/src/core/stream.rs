//! The exit stream table's entries: [`StreamState`] and the per-stream flow control.

use std::collections::VecDeque;
use std::time::Instant;

use allium_proto::flowctl::{EXIT_XOFF_THRESHOLD, EXIT_XON_THRESHOLD, StreamRecv, StreamSend};

use super::DataChunk;

/// Where an exit stream is in its life. Exactly one state at a time (no flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// A RESOLVE is being answered; the id is freed once RESOLVED is sent.
    Lookup,
    /// BEGIN with a host name: the driver is resolving it ([`super::Event::Resolve`]).
    Resolving {
        /// The destination port.
        port: u16,
        /// The client already sent END DONE (optimistic data then FIN).
        client_done: bool,
    },
    /// The driver is connecting ([`super::Event::OpenStream`]).
    Connecting {
        /// The client already sent END DONE.
        client_done: bool,
    },
    /// Connected; bytes flow both ways.
    Open,
    /// One direction has finished; the other still flows.
    HalfClosed(HalfClose),
}

/// Which direction of a half-closed stream has finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfClose {
    /// The client sent END DONE: no more DATA from it; the destination may still send.
    ClientFinished,
    /// The destination closed its side and END DONE went to the client; the client may still
    /// send.
    DestinationFinished,
}

impl StreamState {
    /// Whether DATA from the client is acceptable in this state.
    pub fn accepts_client_data(self) -> bool {
        match self {
            Self::Resolving { client_done, .. } | Self::Connecting { client_done } => !client_done,
            Self::Open | Self::HalfClosed(HalfClose::DestinationFinished) => true,
            Self::Lookup | Self::HalfClosed(HalfClose::ClientFinished) => false,
        }
    }

    /// Whether the destination may still send (the core packages its bytes).
    pub fn destination_may_send(self) -> bool {
        matches!(
            self,
            Self::Open | Self::HalfClosed(HalfClose::ClientFinished)
        )
    }
}

/// One exit stream in a circuit's table.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) state: StreamState,
    /// Sending edge (towards the client): paused by the client's XOFF.
    pub(crate) send: StreamSend,
    /// Receiving edge (from the client): unconsumed cells, XOFF/XON.
    pub(crate) recv: StreamRecv,
    /// Optimistic data: DATA that arrived before the destination was connected, in order. Its
    /// cells count as unconsumed in `recv`, so the XOFF limit bounds it.
    pub(crate) early: VecDeque<DataChunk>,
    /// Since when the destination has bytes the client's flow control does not let out.
    pub(crate) window_blocked_since: Option<Instant>,
}

impl Stream {
    pub(crate) fn new(state: StreamState) -> Self {
        Self {
            state,
            send: StreamSend::new(),
            recv: StreamRecv::with_thresholds(EXIT_XOFF_THRESHOLD, EXIT_XON_THRESHOLD),
            early: VecDeque::new(),
            window_blocked_since: None,
        }
    }
}
