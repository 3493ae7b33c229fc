//! Flow control v1: Tor's fixed SENDME windows with authenticated SENDMEs (design §4, Tor prop 289).
//!
//! Sans-IO counters; the circuit layer calls them and acts on the results:
//! - **Sender** (package window): check [`CircSendWindow::can_send`] before originating a DATA cell,
//!   then report it with [`CircSendWindow::note_data_sent`] and the cell's origin-layer tag. Every
//!   [`CIRC_SENDME_INC`]th cell's tag is remembered in a [`SendmeTags`] FIFO. On a circuit SENDME,
//!   [`CircSendWindow::on_sendme`] checks its tag against the oldest remembered one in constant time.
//! - **Receiver** (deliver window): [`CircRecvWindow::on_data_received`] with the tag of each DATA
//!   cell; it returns the tag to put in a SENDME once [`CIRC_SENDME_INC`] cells arrived; after
//!   sending that SENDME, [`CircRecvWindow::sendme_sent`] reopens the window.
//! - Streams use the same shape without tags: [`StreamWindow`] (send + receive halves).
//!
//! Every `Err` is a flow-control violation: destroy the circuit (design §4).

use std::collections::VecDeque;

use crate::consts::Tag;
use crate::err::{ProtoError, Result};

/// Circuit window: DATA cells in flight per circuit and direction (Tor: 1000).
pub const CIRC_WINDOW_START: u16 = 1000;
/// Circuit SENDME increment: one SENDME per this many DATA cells (Tor: 100).
pub const CIRC_SENDME_INC: u16 = 100;
/// Stream window: DATA cells in flight per stream and direction (Tor: 500).
pub const STREAM_WINDOW_START: u16 = 500;
/// Stream SENDME increment (Tor: 50).
pub const STREAM_SENDME_INC: u16 = 50;
/// Most SENDME tags that can be outstanding on a circuit (window / increment).
pub const MAX_PENDING_TAGS: usize = (CIRC_WINDOW_START / CIRC_SENDME_INC) as usize;

const _: () = assert!(CIRC_WINDOW_START.is_multiple_of(CIRC_SENDME_INC));
const _: () = assert!(STREAM_WINDOW_START.is_multiple_of(STREAM_SENDME_INC));

/// A package (send) window: how many more DATA cells may be sent before a SENDME arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWindow<const MAX: u16, const INC: u16> {
    window: u16,
}

impl<const MAX: u16, const INC: u16> Default for SendWindow<MAX, INC> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const MAX: u16, const INC: u16> SendWindow<MAX, INC> {
    /// A full window.
    pub fn new() -> Self {
        Self { window: MAX }
    }
    /// The current window.
    pub fn window(&self) -> u16 {
        self.window
    }
    /// True if a DATA cell may be sent now.
    pub fn can_send(&self) -> bool {
        self.window > 0
    }
    /// Count one DATA cell sent. Returns true if it is a cell whose SENDME the peer will send
    /// (every `INC`th cell), i.e. its tag must be remembered. Fails if the window is empty.
    pub fn take(&mut self) -> Result<bool> {
        let w = self
            .window
            .checked_sub(1)
            .ok_or(ProtoError::Flow("sent DATA with an empty package window"))?;
        self.window = w;
        Ok(w % INC == 0)
    }
    /// A SENDME arrived: open the window by `INC`. Fails if it would exceed `MAX`.
    pub fn put(&mut self) -> Result<()> {
        let w = self
            .window
            .checked_add(INC)
            .filter(|&w| w <= MAX)
            .ok_or(ProtoError::Flow(
                "SENDME would raise the package window above its maximum",
            ))?;
        self.window = w;
        Ok(())
    }
}

/// A deliver (receive) window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWindow<const MAX: u16, const INC: u16> {
    window: u16,
}

impl<const MAX: u16, const INC: u16> Default for RecvWindow<MAX, INC> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const MAX: u16, const INC: u16> RecvWindow<MAX, INC> {
    /// A full window.
    pub fn new() -> Self {
        Self { window: MAX }
    }
    /// The current window.
    pub fn window(&self) -> u16 {
        self.window
    }
    /// Count one DATA cell received. Returns true when this cell completes an increment of `INC`
    /// cells, so a SENDME is due: send it (once the data was delivered onwards) and call
    /// [`RecvWindow::sendme_sent`]. Fails if the window would go below 0.
    pub fn take(&mut self) -> Result<bool> {
        let w = self.window.checked_sub(1).ok_or(ProtoError::Flow(
            "DATA received with an empty deliver window",
        ))?;
        self.window = w;
        Ok(w % INC == 0)
    }
    /// A SENDME was sent: reopen the window by `INC`. Fails (a local bug) if it would exceed `MAX`.
    pub fn sendme_sent(&mut self) -> Result<()> {
        let w = self
            .window
            .checked_add(INC)
            .filter(|&w| w <= MAX)
            .ok_or(ProtoError::Flow("SENDME sent without enough DATA received"))?;
        self.window = w;
        Ok(())
    }
}

/// The tags of the DATA cells that will trigger SENDMEs, oldest first (design §4).
pub struct SendmeTags {
    tags: VecDeque<Tag>,
}

// Not derived: `CircSendWindow::new` goes through `Default`, and it should get the
// preallocated queue of `new` rather than one that grows on the first SENDMEs.
impl Default for SendmeTags {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SendmeTags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendmeTags({} pending)", self.tags.len())
    }
}

impl SendmeTags {
    /// Empty.
    pub fn new() -> Self {
        Self {
            tags: VecDeque::with_capacity(MAX_PENDING_TAGS),
        }
    }
    /// Number of tags waiting for a SENDME.
    pub fn len(&self) -> usize {
        self.tags.len()
    }
    /// True if none are waiting.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
    /// Remember a tag. Fails if [`MAX_PENDING_TAGS`] are already waiting.
    pub fn push(&mut self, tag: Tag) -> Result<()> {
        if self.tags.len() >= MAX_PENDING_TAGS {
            return Err(ProtoError::Flow("too many outstanding SENDME tags"));
        }
        self.tags.push_back(tag);
        Ok(())
    }
    /// Check a received SENDME tag against the oldest remembered one (constant time) and forget it.
    pub fn check(&mut self, tag: &Tag) -> Result<()> {
        let expected = self
            .tags
            .pop_front()
            .ok_or(ProtoError::Flow("SENDME without outstanding DATA"))?;
        if allium_crypto::ct::ct_eq(&expected, tag) {
            Ok(())
        } else {
            Err(ProtoError::Flow("SENDME tag mismatch"))
        }
    }
}

/// Circuit package window with the authenticated-SENDME tag FIFO.
#[derive(Debug, Default)]
pub struct CircSendWindow {
    window: SendWindow<CIRC_WINDOW_START, CIRC_SENDME_INC>,
    tags: SendmeTags,
}

impl CircSendWindow {
    /// A full window.
    pub fn new() -> Self {
        Self::default()
    }
    /// The current window.
    pub fn window(&self) -> u16 {
        self.window.window()
    }
    /// True if a DATA cell may be originated now.
    pub fn can_send(&self) -> bool {
        self.window.can_send()
    }
    /// Count one originated DATA cell whose origin-layer AEAD tag is `tag`.
    pub fn note_data_sent(&mut self, tag: &Tag) -> Result<()> {
        if self.window.take()? {
            self.tags.push(*tag)?;
        }
        Ok(())
    }
    /// A circuit-level SENDME arrived with `tag` (`None` if it carried none, which is an error).
    pub fn on_sendme(&mut self, tag: Option<&Tag>) -> Result<()> {
        let tag = tag.ok_or(ProtoError::Flow("circuit SENDME without a tag"))?;
        self.tags.check(tag)?;
        self.window.put()
    }
}

/// Circuit deliver window.
#[derive(Debug, Default)]
pub struct CircRecvWindow {
    window: RecvWindow<CIRC_WINDOW_START, CIRC_SENDME_INC>,
}

impl CircRecvWindow {
    /// A full window.
    pub fn new() -> Self {
        Self::default()
    }
    /// The current window.
    pub fn window(&self) -> u16 {
        self.window.window()
    }
    /// Count one DATA cell that arrived with origin-layer tag `tag`. Returns `Some(tag)` when a
    /// circuit SENDME carrying that tag is due: send it, then call [`CircRecvWindow::sendme_sent`].
    /// Fails if the deliver window would go below 0.
    pub fn on_data_received(&mut self, tag: &Tag) -> Result<Option<Tag>> {
        Ok(self.window.take()?.then_some(*tag))
    }
    /// A circuit SENDME was sent: reopen the window.
    pub fn sendme_sent(&mut self) -> Result<()> {
        self.window.sendme_sent()
    }
}

/// Stream package window (500/50).
pub type StreamSendWindow = SendWindow<STREAM_WINDOW_START, STREAM_SENDME_INC>;
/// Stream deliver window (500/50).
pub type StreamRecvWindow = RecvWindow<STREAM_WINDOW_START, STREAM_SENDME_INC>;

/// Both windows of one stream. Stream SENDMEs carry no tag (stream id ≠ 0, empty body).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamWindow {
    /// Package window.
    pub send: StreamSendWindow,
    /// Deliver window.
    pub recv: StreamRecvWindow,
}

impl StreamWindow {
    /// Full windows.
    pub fn new() -> Self {
        Self::default()
    }
    /// True if a DATA cell may be sent on the stream.
    pub fn can_send(&self) -> bool {
        self.send.can_send()
    }
    /// Count a DATA cell sent on the stream.
    pub fn note_data_sent(&mut self) -> Result<()> {
        self.send.take().map(|_| ())
    }
    /// A stream SENDME arrived.
    pub fn on_sendme(&mut self) -> Result<()> {
        self.send.put()
    }
    /// Count a DATA cell received on the stream. Returns true when a stream SENDME is due: send it
    /// (once the data was delivered to the application), then call [`StreamWindow::sendme_sent`].
    pub fn on_data_received(&mut self) -> Result<bool> {
        self.recv.take()
    }
    /// A stream SENDME was sent: reopen the deliver window.
    pub fn sendme_sent(&mut self) -> Result<()> {
        self.recv.sendme_sent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u32) -> Tag {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_be_bytes());
        t
    }

    #[test]
    fn circuit_send_window_records_every_100th_tag() {
        let mut w = CircSendWindow::new();
        for i in 1..=CIRC_WINDOW_START as u32 {
            assert!(w.can_send());
            w.note_data_sent(&tag(i)).unwrap();
        }
        assert!(!w.can_send());
        assert_eq!(w.tags.len(), 10);
        // Sending past the window is a violation.
        assert_eq!(
            w.note_data_sent(&tag(0)),
            Err(ProtoError::Flow("sent DATA with an empty package window"))
        );
        // SENDMEs must carry the tags of cells 100, 200, ... in order.
        w.on_sendme(Some(&tag(100))).unwrap();
        assert_eq!(w.window(), 100);
        w.on_sendme(Some(&tag(200))).unwrap();
        assert_eq!(w.window(), 200);
        assert_eq!(
            w.on_sendme(Some(&tag(400))),
            Err(ProtoError::Flow("SENDME tag mismatch"))
        );
    }

    #[test]
    fn circuit_sendme_without_tag_or_without_data_is_rejected() {
        let mut w = CircSendWindow::new();
        assert!(w.on_sendme(None).is_err());
        assert_eq!(
            w.on_sendme(Some(&tag(1))),
            Err(ProtoError::Flow("SENDME without outstanding DATA"))
        );
    }

    #[test]
    fn send_window_overflow_is_an_error() {
        let mut w = StreamSendWindow::new();
        assert!(w.put().is_err(), "SENDME on a full window must fail");
        for _ in 0..STREAM_SENDME_INC {
            w.take().unwrap();
        }
        w.put().unwrap();
        assert_eq!(w.window(), STREAM_WINDOW_START);
        assert!(w.put().is_err());
    }

    #[test]
    fn receive_window_underflow_is_an_error() {
        let mut w = CircRecvWindow::new();
        let mut due = Vec::new();
        for i in 1..=CIRC_WINDOW_START as u32 {
            if let Some(t) = w.on_data_received(&tag(i)).unwrap() {
                due.push(t);
            }
        }
        assert_eq!(due.len(), 10);
        assert_eq!(due[0], tag(100));
        assert_eq!(due[9], tag(1000));
        assert_eq!(w.window(), 0);
        assert_eq!(
            w.on_data_received(&tag(1001)),
            Err(ProtoError::Flow(
                "DATA received with an empty deliver window"
            ))
        );
    }

    #[test]
    fn receive_window_reopens_after_sendme() {
        let mut w = CircRecvWindow::new();
        assert!(w.sendme_sent().is_err(), "no SENDME is due yet");
        for i in 1..=5000u32 {
            if w.on_data_received(&tag(i)).unwrap().is_some() {
                w.sendme_sent().unwrap();
            }
        }
        assert_eq!(w.window(), CIRC_WINDOW_START);
    }

    #[test]
    fn sender_and_receiver_agree_on_tags() {
        let mut s = CircSendWindow::new();
        let mut r = CircRecvWindow::new();
        for i in 1..=10_000u32 {
            assert!(s.can_send());
            s.note_data_sent(&tag(i)).unwrap();
            if let Some(t) = r.on_data_received(&tag(i)).unwrap() {
                r.sendme_sent().unwrap();
                s.on_sendme(Some(&t)).unwrap();
            }
        }
        assert!(s.tags.is_empty());
    }

    #[test]
    fn stream_window_cycle() {
        let mut w = StreamWindow::new();
        let mut sendmes = 0;
        for _ in 0..STREAM_WINDOW_START {
            w.note_data_sent().unwrap();
            if w.on_data_received().unwrap() {
                sendmes += 1;
            }
        }
        assert!(!w.can_send());
        assert!(w.note_data_sent().is_err());
        assert_eq!(sendmes, 10);
        assert!(w.on_data_received().is_err());
        w.sendme_sent().unwrap();
        w.on_sendme().unwrap();
        assert!(w.can_send());
    }

    #[test]
    fn tag_fifo_is_bounded() {
        let mut t = SendmeTags::new();
        for i in 0..MAX_PENDING_TAGS as u32 {
            t.push(tag(i)).unwrap();
        }
        assert!(t.push(tag(99)).is_err());
        t.check(&tag(0)).unwrap();
        assert!(t.check(&tag(2)).is_err());
    }
}
