//! Directory streams (BEGIN_DIR) at a relay: the admission rule and the request buffer of one
//! stream. The reactor (`crate::reactor`) owns them and does the I/O-free serving: the request
//! head goes to [`allium_directory::dircache::DirArchive::respond`], the response is packaged under
//! the stream's flow control, then END DONE.
//!
//! Limits (docs/protocol/91-relay.md, "Directory streams"): at most
//! [`MAX_DIR_STREAMS_PER_CIRCUIT`] on one circuit and `max_dir_streams` (relay configuration) in
//! all; a request head longer than [`MAX_REQUEST_HEAD`] ends the stream (END TORPROTOCOL), and so
//! does a stream that has not sent a complete head within [`DIR_REQUEST_TIMEOUT`] (END TIMEOUT).

use std::time::{Duration, Instant};

use allium_directory::dircache::{MAX_REQUEST_HEAD, request_head_complete};
use allium_proto::relaymsg::EndReason;

/// Most directory streams open at once on one circuit.
pub const MAX_DIR_STREAMS_PER_CIRCUIT: usize = 4;
/// Longest wait for a directory stream's complete request head.
pub const DIR_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a new directory stream may open: `enabled` is the `dir_cache` key, `on_circuit` the
/// directory streams already open on the circuit, `relay_slot` whether a relay-wide slot was
/// free. `Err` is the END reason to refuse it with.
pub(crate) fn admit(enabled: bool, on_circuit: usize, relay_slot: bool) -> Result<(), EndReason> {
    if !enabled {
        return Err(EndReason::NOTDIRECTORY);
    }
    if on_circuit >= MAX_DIR_STREAMS_PER_CIRCUIT || !relay_slot {
        return Err(EndReason::RESOURCELIMIT);
    }
    Ok(())
}

/// What the bytes fed so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Feed {
    /// No complete head yet.
    More,
    /// The complete request head (bytes after it are ignored).
    Complete(Vec<u8>),
    /// The head is longer than [`MAX_REQUEST_HEAD`]: end the stream.
    TooLong,
    /// The request was already taken; later bytes are ignored.
    Ignored,
}

/// The request side of one directory stream.
#[derive(Debug)]
pub(crate) struct RequestBuf {
    buf: Vec<u8>,
    deadline: Instant,
    taken: bool,
}

impl RequestBuf {
    /// A stream opened at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            buf: Vec::new(),
            deadline: now.checked_add(DIR_REQUEST_TIMEOUT).unwrap_or(now),
            taken: false,
        }
    }

    /// Take `bytes` from the client (never holds more than [`MAX_REQUEST_HEAD`] + 1 bytes).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Feed {
        if self.taken {
            return Feed::Ignored;
        }
        let room = (MAX_REQUEST_HEAD + 1).saturating_sub(self.buf.len());
        self.buf
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or(&[]));
        match request_head_complete(&self.buf) {
            Some(n) if n <= MAX_REQUEST_HEAD => {
                self.taken = true;
                let mut head = std::mem::take(&mut self.buf);
                head.truncate(n);
                Feed::Complete(head)
            }
            Some(_) => Feed::TooLong,
            None if self.buf.len() > MAX_REQUEST_HEAD => Feed::TooLong,
            None => Feed::More,
        }
    }

    /// When the stream times out, while it still waits for its request.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        (!self.taken).then_some(self.deadline)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests need some instant to start from
mod tests {
    use super::*;
    use allium_directory::dircache::{DirRequest, encode_request};

    #[test]
    fn admission_limits() {
        assert_eq!(admit(false, 0, true), Err(EndReason::NOTDIRECTORY));
        assert_eq!(admit(true, 0, true), Ok(()));
        assert_eq!(admit(true, MAX_DIR_STREAMS_PER_CIRCUIT - 1, true), Ok(()));
        assert_eq!(
            admit(true, MAX_DIR_STREAMS_PER_CIRCUIT, true),
            Err(EndReason::RESOURCELIMIT)
        );
        assert_eq!(admit(true, 0, false), Err(EndReason::RESOURCELIMIT));
    }

    #[test]
    fn request_in_pieces_then_ignored() {
        let now = Instant::now();
        let req = encode_request(&DirRequest::Certs);
        let mut b = RequestBuf::new(now);
        assert_eq!(b.deadline(), Some(now + DIR_REQUEST_TIMEOUT));
        let (a, c) = req.split_at(req.len() / 2);
        assert_eq!(b.feed(a), Feed::More);
        assert_eq!(b.feed(c), Feed::Complete(req.clone()));
        assert_eq!(b.deadline(), None, "no timeout once the request is in");
        assert_eq!(b.feed(&req), Feed::Ignored);
    }

    #[test]
    fn overlong_request_is_refused_without_growing() {
        let mut b = RequestBuf::new(Instant::now());
        let junk = vec![b'a'; 600];
        let mut out = Feed::More;
        for _ in 0..(MAX_REQUEST_HEAD / 600 + 2) {
            out = b.feed(&junk);
            assert!(b.buf.len() <= MAX_REQUEST_HEAD + 1);
            if out != Feed::More {
                break;
            }
        }
        assert_eq!(out, Feed::TooLong);
        // A head that completes beyond the limit is refused too.
        let mut b = RequestBuf::new(Instant::now());
        let mut long = vec![b'a'; MAX_REQUEST_HEAD - 2];
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(b.feed(&long), Feed::TooLong);
    }
}
