//! The exit stream table's entries: [`StreamState`] and the per-stream windows.

use std::collections::VecDeque;
use std::time::Instant;

use allium_crypto::relaycell::Tag;
use allium_proto::flowctl::{STREAM_SENDME_INC, STREAM_WINDOW_START, StreamWindow};

/// Most SENDME tags a stream remembers: one per increment of its window.
const MAX_SENDME_TAGS: usize = (STREAM_WINDOW_START / STREAM_SENDME_INC) as usize;

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
    /// Package window (towards the client) and the deliver count of consumed cells.
    pub(crate) win: StreamWindow,
    /// How many more DATA cells the client may send before our next stream SENDME: cells that
    /// arrived but were not yet consumed by the destination count against it.
    pub(crate) credit: u16,
    /// DATA cells received so far, modulo the SENDME increment.
    arrived: u16,
    /// Tags of the received cells that complete an increment, oldest first: a stream SENDME
    /// echoes the tag of the cell whose consumption triggered it.
    sendme_tags: VecDeque<Tag>,
    /// Since when the destination has bytes the package windows do not allow.
    pub(crate) window_blocked_since: Option<Instant>,
}

impl Stream {
    pub(crate) fn new(state: StreamState) -> Self {
        Self {
            state,
            win: StreamWindow::new(),
            credit: STREAM_WINDOW_START,
            arrived: 0,
            sendme_tags: VecDeque::new(),
            window_blocked_since: None,
        }
    }

    /// A DATA cell with `tag` arrived: take one credit. False if the client overran its stream
    /// window.
    pub(crate) fn take_credit(&mut self, tag: &Tag) -> bool {
        let Some(c) = self.credit.checked_sub(1) else {
            return false;
        };
        self.credit = c;
        self.arrived = (self.arrived + 1) % STREAM_SENDME_INC;
        if self.arrived == 0 && self.sendme_tags.len() < MAX_SENDME_TAGS {
            self.sendme_tags.push_back(*tag);
        }
        true
    }

    /// The tag for the stream SENDME due now (the oldest increment's last cell).
    pub(crate) fn next_sendme_tag(&mut self) -> Option<Tag> {
        self.sendme_tags.pop_front()
    }

    /// A stream SENDME went out: the client may send another increment.
    pub(crate) fn sendme_sent(&mut self) {
        self.credit = self
            .credit
            .saturating_add(STREAM_SENDME_INC)
            .min(STREAM_WINDOW_START);
    }
}
