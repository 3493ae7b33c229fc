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

use allium_directory::dircache::{
    DirRequest, MAX_REQUEST_HEAD, parse_request, request_head_complete,
};
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
    /// A descriptor upload: its head and the `Content-Length` bytes that followed it.
    Upload {
        /// The request head.
        head: Vec<u8>,
        /// The descriptor.
        body: Vec<u8>,
    },
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
    /// An upload's head and body length, once its head is in (`buf` then collects the body,
    /// never beyond that length, itself bounded by the descriptor size limit).
    upload: Option<(Vec<u8>, usize)>,
}

impl RequestBuf {
    /// A stream opened at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            buf: Vec::new(),
            deadline: now.checked_add(DIR_REQUEST_TIMEOUT).unwrap_or(now),
            taken: false,
            upload: None,
        }
    }

    /// Take `bytes` from the client (never holds more than [`MAX_REQUEST_HEAD`] + 1 bytes).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Feed {
        if self.taken {
            return Feed::Ignored;
        }
        if self.upload.is_some() {
            return self.feed_body(bytes);
        }
        let room = (MAX_REQUEST_HEAD + 1).saturating_sub(self.buf.len());
        let (now, later) = bytes.split_at(room.min(bytes.len()));
        self.buf.extend_from_slice(now);
        match request_head_complete(&self.buf) {
            Some(n) if n <= MAX_REQUEST_HEAD => {
                let mut head = std::mem::take(&mut self.buf);
                let rest = head.split_off(n);
                if let Ok(DirRequest::HsUpload { len, .. }) = parse_request(&head) {
                    self.upload = Some((head, len));
                    let _ = self.feed_body(&rest);
                    return self.feed_body(later);
                }
                self.taken = true;
                Feed::Complete(head)
            }
            Some(_) => Feed::TooLong,
            None if self.buf.len() > MAX_REQUEST_HEAD => Feed::TooLong,
            None => Feed::More,
        }
    }

    /// Body bytes of an upload (the head is in): complete once `Content-Length` bytes came;
    /// bytes beyond it are ignored.
    fn feed_body(&mut self, bytes: &[u8]) -> Feed {
        let Some((_, want)) = &self.upload else {
            return Feed::Ignored;
        };
        let room = want.saturating_sub(self.buf.len());
        self.buf
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or(&[]));
        if self.buf.len() < *want {
            return Feed::More;
        }
        self.taken = true;
        match self.upload.take() {
            Some((head, _)) => Feed::Upload {
                head,
                body: std::mem::take(&mut self.buf),
            },
            None => Feed::Ignored,
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
    fn upload_body_follows_the_head_in_any_split() {
        use allium_crypto::hs::BlindedPublicKey;
        use allium_directory::dircache::encode_hs_upload;
        let key = BlindedPublicKey([5; 32]);
        let desc: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = encode_hs_upload(&key, &desc);
        let head_len = whole.len() - desc.len();
        whole.extend_from_slice(b"trailing bytes are ignored");
        for split in [
            1,
            10,
            head_len - 1,
            head_len,
            head_len + 1,
            500,
            whole.len() - 1,
        ] {
            let mut b = RequestBuf::new(Instant::now());
            let (a, c) = whole.split_at(split);
            let mut out = b.feed(a);
            if out == Feed::More {
                out = b.feed(c);
            }
            let want = Feed::Upload {
                head: whole[..head_len].to_vec(),
                body: desc.clone(),
            };
            assert_eq!(out, want, "split at {split}");
            assert_eq!(b.deadline(), None);
            assert_eq!(b.feed(b"more"), Feed::Ignored);
        }
        // Byte by byte too, and the body never grows past Content-Length.
        let mut b = RequestBuf::new(Instant::now());
        let mut got = None;
        for byte in &whole {
            match b.feed(std::slice::from_ref(byte)) {
                Feed::More => assert!(b.buf.len() <= desc.len().max(MAX_REQUEST_HEAD + 1)),
                Feed::Ignored => {}
                other => got = Some(other),
            }
        }
        assert!(matches!(got, Some(Feed::Upload { body, .. }) if body == desc));
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
