//! Errors of the crypto crate.
//!
//! Crypto failures carry no detail that could serve as an oracle; callers turn them into a silent
//! DESTROY (reason NONE) or a closed link.

use std::path::PathBuf;

/// An error from a cryptographic operation or from key handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key's bytes are malformed.
    #[error("malformed {what}")]
    BadKey {
        /// Which key.
        what: &'static str,
    },
    /// A signature did not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// A handshake failed (bad MAC, non-contributory DH, wrong identity or onion key, malformed data).
    #[error("circuit handshake failed")]
    HandshakeFailed,
    /// A relay cell failed authentication, or arrived out of order, replayed or altered.
    #[error("relay cell authentication failed")]
    CellAuthFailed,
    /// A per-circuit cell counter reached its limit; the circuit must be destroyed.
    #[error("cell counter exhausted; circuit must be destroyed")]
    CounterExhausted,
    /// A message does not fit in a relay cell.
    #[error("relay message too long ({len} bytes, at most {max})")]
    MessageTooLong {
        /// Requested length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
    /// The hop index is outside the circuit.
    #[error("no such hop on this circuit")]
    NoSuchHop,
    /// A circuit already has `MAX_HOPS` hops.
    #[error("a circuit has at most {max} hops")]
    TooManyHops {
        /// Maximum allowed.
        max: usize,
    },
    /// A TLV list (handshake extension fields) is truncated or malformed.
    #[error("malformed TLV list in a handshake message")]
    MalformedTlv,
    /// A key file is group- or world-readable.
    #[error(
        "key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}` and retry"
    )]
    InsecureKeyFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFileIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A passphrase-protected key file did not open: wrong passphrase, or the file was altered.
    #[error(
        "key file {path}: wrong passphrase (or the file was altered); try again, or use the right \
         --passphrase-file"
    )]
    KeyFilePassphrase {
        /// The file.
        path: PathBuf,
    },
    /// A key file has the wrong size or format.
    #[error("key file {path} is malformed: {why}")]
    KeyFileMalformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}
