//! One stream's state inside a [`super::ClientCircuit`].

use std::collections::VecDeque;
use std::time::Instant;

use allium_crypto::relaycell::Tag;
use allium_proto::flowctl::{
    STREAM_SENDME_INC, STREAM_WINDOW_START, StreamRecvWindow, StreamSendWindow,
};

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

/// Most stream SENDMEs that can be due at once (window / increment).
const MAX_DUE: usize = (STREAM_WINDOW_START / STREAM_SENDME_INC) as usize;

/// A stream's entry in the circuit's table.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) state: StreamState,
    pub(super) send: StreamSendWindow,
    pub(super) recv: StreamRecvWindow,
    /// DATA cells received so far.
    received: u64,
    /// DATA cells the application took so far (≤ `received`).
    consumed: u64,
    /// SENDMEs due once `consumed` passes the index: (index of the cell, its tag), oldest first.
    due: VecDeque<(u64, Tag)>,
}

impl Stream {
    pub(super) fn new(state: StreamState) -> Self {
        Self {
            state,
            send: StreamSendWindow::new(),
            recv: StreamRecvWindow::new(),
            received: 0,
            consumed: 0,
            due: VecDeque::with_capacity(MAX_DUE),
        }
    }

    /// Count a received DATA cell; remember its tag if it makes a SENDME due.
    pub(super) fn on_data(&mut self, due: bool, tag: Tag) {
        if due && self.due.len() < MAX_DUE {
            self.due.push_back((self.received, tag));
        }
        self.received = self.received.saturating_add(1);
    }

    /// The application took `cells` more cells; returns the tags of the SENDMEs now due.
    pub(super) fn on_consumed(&mut self, cells: usize) -> impl Iterator<Item = Tag> + '_ {
        let add = u64::try_from(cells).unwrap_or(u64::MAX);
        self.consumed = self.consumed.saturating_add(add).min(self.received);
        let consumed = self.consumed;
        std::iter::from_fn(move || {
            let (idx, _) = self.due.front()?;
            if *idx < consumed {
                self.due.pop_front().map(|(_, t)| t)
            } else {
                None
            }
        })
    }
}
