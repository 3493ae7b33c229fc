//! One stream's state inside a [`super::ClientCircuit`].

use std::time::Instant;

use allium_proto::flowctl::{StreamRecv, StreamSend};

/// Where a stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamState {
    /// BEGIN (or BEGIN_DIR) sent; waiting for CONNECTED until `deadline`.
    Connecting {
        /// When opening fails with a timeout.
        deadline: Instant,
    },
    /// RESOLVE sent; waiting for RESOLVED until `deadline`.
    Resolving {
        /// When resolving fails with a timeout.
        deadline: Instant,
    },
    /// Open both ways.
    Open,
    /// We sent END DONE (no more data from us); the exit may still send.
    LocalDone,
    /// The exit sent END DONE (no more data from it); we may still send.
    RemoteDone,
}

impl StreamState {
    /// Whether we may send DATA in this state.
    pub fn can_send(self) -> bool {
        matches!(self, Self::Open | Self::RemoteDone)
    }
    /// Whether the exit may send DATA in this state.
    pub fn can_receive(self) -> bool {
        matches!(self, Self::Open | Self::LocalDone)
    }
    /// The open deadline, while opening.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Self::Connecting { deadline } | Self::Resolving { deadline } => Some(deadline),
            _ => None,
        }
    }
}

/// Most DATA cells the client packages on a stream before CONNECTED (optimistic data, about
/// 60 KB: a request, not an upload).
pub const OPTIMISTIC_MAX: u32 = 64;

/// A stream's entry in the circuit's table.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) state: StreamState,
    /// Sending edge: paused by the exit's XOFF.
    pub(super) send: StreamSend,
    /// Receiving edge: cells delivered but not consumed, XOFF/XON.
    pub(super) recv: StreamRecv,
    /// Optimistic DATA cells it may still send before CONNECTED (0 for RESOLVE and BEGIN_DIR).
    pub(super) optimistic_left: u32,
}

impl Stream {
    pub(super) fn new(state: StreamState, optimistic: bool) -> Self {
        Self {
            state,
            send: StreamSend::new(),
            recv: StreamRecv::new(),
            optimistic_left: if optimistic { OPTIMISTIC_MAX } else { 0 },
        }
    }

    /// Whether DATA may be packaged now (flow control aside from the circuit's window).
    pub(super) fn can_send(&self) -> bool {
        let state_ok = match self.state {
            StreamState::Connecting { .. } => self.optimistic_left > 0,
            s => s.can_send(),
        };
        state_ok && self.send.can_send()
    }

    /// Count one DATA cell packaged.
    pub(super) fn note_sent(&mut self) {
        if matches!(self.state, StreamState::Connecting { .. }) {
            self.optimistic_left = self.optimistic_left.saturating_sub(1);
        }
    }
}
