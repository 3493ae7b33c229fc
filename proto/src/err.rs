//! Errors of this crate.
//!
//! [`ProtoError`] covers decoding and encoding of cells and relay messages and flow-control violations;
//! [`LinkError`] covers the Noise link and its tokio driver. Neither is ever sent to a peer: a peer only
//! sees a closed link, or a DESTROY with reason NONE (design §6.8).

use std::io;

/// A malformed or disallowed cell, relay message or flow-control event.
///
/// Every variant means the thing it was about must be rejected: on a link cell, close the link; on a
/// relay message or a flow-control event, destroy the circuit (or end the stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The input ended before a field was complete.
    #[error("truncated {object}: needed {needed} more bytes, {remaining} left")]
    Truncated {
        /// What was being read.
        object: &'static str,
        /// How many bytes the field needed.
        needed: usize,
        /// How many bytes were left.
        remaining: usize,
    },
    /// Bytes were left after the end of a message that must be consumed completely.
    #[error("{count} unexpected trailing bytes after {object}")]
    TrailingBytes {
        /// What was being read.
        object: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A field held a value that the protocol does not allow.
    #[error("invalid {object}: {problem}")]
    Invalid {
        /// What was being read or written.
        object: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A link cell carried a command this version does not know (the link must close).
    #[error("unknown link cell command {0}")]
    UnknownCellCmd(u8),
    /// The output buffer is too small for what was being written.
    #[error("no room to write {object}: needed {needed} bytes, {remaining} left")]
    NoRoom {
        /// What was being written.
        object: &'static str,
        /// How many bytes it needed.
        needed: usize,
        /// How many bytes were left in the buffer.
        remaining: usize,
    },
    /// A value is too long for its length field or for the space the protocol gives it.
    #[error("{object} too long: {len} bytes, at most {max}")]
    TooLong {
        /// What was too long.
        object: &'static str,
        /// Its length.
        len: usize,
        /// The largest allowed length.
        max: usize,
    },
    /// A flow-control rule was broken (design §4): destroy the circuit.
    #[error("flow control violation: {0}")]
    Flow(&'static str),
}

/// A failure of the Noise link or of its driver. Every one of them closes the link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A socket error (connection refused, reset, closed...).
    #[error("link I/O error: {0}")]
    Io(#[from] io::Error),
    /// The TCP connection could not be made within the connect timeout.
    #[error("TCP connect timed out; is the relay's address right and is it running?")]
    ConnectTimeout,
    /// The Noise handshake did not finish within the handshake timeout.
    #[error("link handshake timed out (the peer is too slow or is not an Allium relay)")]
    HandshakeTimeout,
    /// The Noise handshake failed: wrong identity or link key, another protocol version, or tampering.
    /// No further detail is available on purpose.
    #[error(
        "link handshake failed: the peer is not the relay we expected (check its identity and link key in the consensus) or speaks another protocol version"
    )]
    Handshake,
    /// A decrypted handshake payload was malformed or had an unsupported version.
    #[error("bad link handshake payload: {0}")]
    BadPayload(&'static str),
    /// A frame length prefix was out of bounds.
    #[error("bad link frame length {0}")]
    BadFrameLength(usize),
    /// A transport frame failed to authenticate (tampering, reordering or replay).
    #[error("link frame failed authentication")]
    Decrypt,
    /// Local misuse of the sans-IO API (a bug in the caller).
    #[error("link API misuse: {0}")]
    Misuse(&'static str),
    /// A cell in a frame could not be decoded.
    #[error("bad cell on link: {0}")]
    Cell(#[from] ProtoError),
    /// The link is closed.
    #[error("link closed")]
    Closed,
    /// The peer did not read our data for too long.
    #[error("link write timed out")]
    WriteTimeout,
}

/// Result with [`ProtoError`].
pub type Result<T> = std::result::Result<T, ProtoError>;
