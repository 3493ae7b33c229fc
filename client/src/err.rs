//! Errors of the client crate.
//!
//! Three layers, each a `#[non_exhaustive]` enum that keeps its cause as a `#[source]`:
//! - [`CircError`]: why a circuit failed, or why a call on one was refused (the sans-IO core and
//!   the reactor produce it);
//! - [`StreamError`]: why a stream could not be opened or ended abnormally; it keeps the exit's
//!   END reason ([`EndReason`]) untouched;
//! - [`ClientError`]: everything the crate returns.
//!
//! [`ClientError::kind`] sorts an error into an [`ErrorKind`], and [`ClientError::socks_reply`] is
//! the one place where an error becomes a SOCKS5 reply code. Nothing is classified by its message
//! text. Every message says what went wrong and, where a person can act, what to do. None carries
//! a SOCKS destination, a credential or key material.

use std::path::PathBuf;
use std::sync::Arc;

use allium_crypto::CryptoError;
use allium_proto::ProtoError;
use allium_proto::cell::DestroyReason;
use allium_proto::relaymsg::EndReason;

/// SOCKS5 reply codes (RFC 1928 §6) that [`ClientError::socks_reply`] returns.
pub use crate::socks::wire::reply as socks_code;

/// Why a circuit failed, or why an operation on it was refused. `Clone` (its crypto sources are
/// shared) so that the reason a circuit died can be reported to each of its streams.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CircError {
    /// A relay sent a cell that fails authentication (altered, replayed, reordered or forged).
    #[error("a relay cell failed authentication; the circuit was destroyed")]
    Auth(#[source] Arc<CryptoError>),
    /// The circuit handshake with a hop failed (wrong key, or a forged reply).
    #[error("the circuit handshake with hop {hop} failed")]
    Handshake {
        /// 0-based hop index (0 = guard).
        hop: usize,
        /// The crypto error.
        #[source]
        source: Arc<CryptoError>,
    },
    /// Local cell crypto failed (e.g. a counter ran out).
    #[error("circuit cryptography failed")]
    Crypto(#[source] Arc<CryptoError>),
    /// A relay broke the protocol (an unexpected or misplaced message).
    #[error("a relay broke the circuit protocol: {0}")]
    Protocol(&'static str),
    /// A relay sent a message that does not parse.
    #[error("a relay sent a malformed {what}")]
    Malformed {
        /// What did not parse.
        what: &'static str,
        /// The parse error.
        #[source]
        source: ProtoError,
    },
    /// A relay broke a flow-control window or sent a wrong SENDME.
    #[error("a relay broke flow control ({what})")]
    FlowControl {
        /// Which window.
        what: &'static str,
        /// The violation.
        #[source]
        source: ProtoError,
    },
    /// A relay sent more cells than the circuit's queue holds (it ignored the windows).
    #[error("a relay overran the circuit's queue")]
    QueueOverflow,
    /// A relay destroyed the circuit.
    #[error("a relay destroyed the circuit (reason {})", .0.name())]
    Destroyed(DestroyReason),
    /// A relay could not extend the circuit (TRUNCATED).
    #[error("hop {hop} could not extend the circuit (reason {})", reason.name())]
    Truncated {
        /// The hop that answered TRUNCATED (0-based).
        hop: usize,
        /// Its reason.
        reason: DestroyReason,
    },
    /// The circuit was not built in time.
    #[error("building the circuit timed out at hop {hop}")]
    BuildTimeout {
        /// The hop being added when time ran out (0 = guard).
        hop: usize,
    },
    /// The link to the guard closed.
    #[error("the link to the guard closed")]
    LinkClosed,
    /// The client closed the circuit.
    #[error("the circuit was closed by the client")]
    ClosedByClient,
    /// The circuit is closed: the operation cannot run.
    #[error("the circuit is closed")]
    Closed,
    /// The circuit is not in a state for this operation (e.g. extend while extending, a stream
    /// on an unbuilt circuit).
    #[error("the circuit is not ready for this: {0}")]
    NotReady(&'static str),
    /// The circuit has no RELAY_EARLY cell left for an EXTEND.
    #[error("the circuit has used all its RELAY_EARLY cells")]
    EarlyExhausted,
    /// The circuit carries its maximum number of streams.
    #[error("the circuit carries too many streams")]
    TooManyStreams,
    /// A message we built does not encode (e.g. a host name too long for a relay cell).
    #[error("the request does not fit in a relay message")]
    Encode(#[source] ProtoError),
}

impl CircError {
    /// Whether a relay misbehaved (a bad or forged cell, a protocol or window violation): worth
    /// an `info` line, where ordinary circuit ends are `debug`.
    pub fn is_relay_fault(&self) -> bool {
        matches!(
            self,
            Self::Auth(_)
                | Self::Protocol(_)
                | Self::Malformed { .. }
                | Self::FlowControl { .. }
                | Self::QueueOverflow
        )
    }

    /// The hop a build failure is attributed to, if this error says.
    pub fn failed_hop(&self) -> Option<usize> {
        match self {
            Self::Handshake { hop, .. } | Self::BuildTimeout { hop } => Some(*hop),
            Self::Truncated { hop, .. } => Some(hop + 1),
            _ => None,
        }
    }
}

/// Why a stream could not be opened, or ended abnormally.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The exit ended the stream with this reason (refused, unreachable, exit policy, ...).
    #[error("the exit ended the stream (reason {})", .0.name())]
    Ended(EndReason),
    /// The exit did not answer BEGIN or RESOLVE in time.
    #[error("the exit did not answer in time")]
    OpenTimeout,
    /// The destination cannot be put in a relay message (bad host name, port 0).
    #[error("the destination is not a valid host name or address")]
    BadTarget(#[source] Option<ProtoError>),
    /// RESOLVE got an answer with no address.
    #[error("the exit could not resolve the name")]
    NoAddress,
    /// The exit answered with a message that does not belong there.
    #[error("the exit answered with an unexpected message")]
    Unexpected,
    /// The circuit carrying the stream failed.
    #[error("the stream's circuit failed")]
    Circuit(#[source] CircError),
}

/// The kind of a [`ClientError`]: what the caller may do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad configuration: fix it.
    Config,
    /// A local file or socket failed.
    Io,
    /// No verified consensus, or a directory failure.
    Directory,
    /// No path (no exit for the port, no guard...).
    NoPath,
    /// No exit allows the port.
    ExitPolicy,
    /// A circuit failed: another circuit may work.
    Circuit,
    /// The exit ended the stream with this reason.
    StreamEnded(EndReason),
    /// The destination is malformed.
    BadTarget,
    /// Something took too long.
    Timeout,
    /// A local bound on circuits is reached: retry once some streams have ended.
    ResourceLimit,
    /// The proxy is stopping.
    Shutdown,
    /// Anything else.
    Other,
}

/// An error from the client: configuration, bootstrap, circuits or streams.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration is invalid.
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    /// Another process holds the data directory.
    #[error(transparent)]
    DataDirLocked(#[from] allium_directory::datadir::DataDirLockError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The consensus could not be fetched or verified.
    #[error("directory: {0}")]
    Directory(String),
    /// No usable path exists in the current consensus.
    #[error("no usable path: {0}")]
    NoPath(&'static str),
    /// No exit in the consensus allows the port.
    #[error("no exit relay allows port {0}; choose another port or wait for a new consensus")]
    NoExitForPort(u16),
    /// A circuit could not be built or failed.
    #[error("circuit: {0}")]
    Circuit(#[from] CircError),
    /// A stream could not be opened or failed.
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    /// A link to a relay failed.
    #[error("link to a guard failed: {0}")]
    Link(#[source] allium_proto::LinkError),
    /// A guard has no address to connect to.
    #[error("the guard has no usable address (a bad consensus entry)")]
    NoGuardAddress,
    /// Building a circuit failed just now for another stream that waited on the same build.
    #[error("building a circuit failed just now; see the log for why")]
    RecentBuildFailed,
    /// `max_circuits_per_guard` circuits are open through the guard and every one carries a
    /// stream.
    #[error(
        "{limit} circuits are open through the guard and all carry streams \
         (max_circuits_per_guard); retry when some streams have ended"
    )]
    GuardCircuitLimit {
        /// The bound in force.
        limit: usize,
    },
    /// A timeout expired.
    #[error("timed out while {0}")]
    Timeout(&'static str),
    /// The proxy is shutting down.
    #[error("the proxy is shutting down")]
    Shutdown,
    /// Reaching an onion service failed.
    #[error("onion service: {0}")]
    Onion(crate::onion::OnionError),
}

impl ClientError {
    /// Wrap an I/O error with what we were doing.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
    /// An I/O error on a file.
    pub(crate) fn file(path: &std::path::Path, action: &str, source: std::io::Error) -> Self {
        let p: PathBuf = path.to_path_buf();
        Self::io(format!("{action} {}", p.display()), source)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(_) | Self::DataDirLocked(_) => ErrorKind::Config,
            Self::Io { .. } => ErrorKind::Io,
            Self::Directory(_) => ErrorKind::Directory,
            Self::NoPath(_) => ErrorKind::NoPath,
            Self::NoExitForPort(_) => ErrorKind::ExitPolicy,
            Self::Circuit(c) => circ_kind(c),
            Self::Stream(s) => match s {
                StreamError::Ended(r) => ErrorKind::StreamEnded(*r),
                StreamError::OpenTimeout => ErrorKind::Timeout,
                StreamError::BadTarget(_) | StreamError::NoAddress => ErrorKind::BadTarget,
                StreamError::Unexpected => ErrorKind::Other,
                StreamError::Circuit(c) => circ_kind(c),
            },
            Self::Link(_) | Self::NoGuardAddress | Self::RecentBuildFailed => ErrorKind::Circuit,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::GuardCircuitLimit { .. } => ErrorKind::ResourceLimit,
            Self::Shutdown => ErrorKind::Shutdown,
            Self::Onion(crate::onion::OnionError::Timeout) => ErrorKind::Timeout,
            Self::Onion(crate::onion::OnionError::BadAddress(_)) => ErrorKind::BadTarget,
            Self::Onion(_) => ErrorKind::Other,
        }
    }

    /// Whether another circuit may succeed where this one failed (the stream is retried).
    pub fn is_retriable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Circuit)
    }

    /// The SOCKS5 reply code (RFC 1928) for this error: the one place where errors become reply
    /// codes. An exit's END reason survives: refused → 0x05, unreachable → 0x04, exit policy →
    /// 0x02, timeout → 0x06.
    pub fn socks_reply(&self) -> u8 {
        use socks_code as c;
        if let Self::Onion(e) = self {
            // Tor's extended codes for onion services (0xF0-0xF7).
            return e.socks_reply();
        }
        match self.kind() {
            ErrorKind::StreamEnded(r) => match r {
                EndReason::EXITPOLICY => c::NOT_ALLOWED,
                EndReason::RESOLVEFAILED | EndReason::NOROUTE => c::HOST_UNREACHABLE,
                EndReason::CONNECTREFUSED => c::CONNECTION_REFUSED,
                EndReason::TIMEOUT => c::TTL_EXPIRED,
                _ => c::GENERAL_FAILURE,
            },
            ErrorKind::ExitPolicy => c::NOT_ALLOWED,
            ErrorKind::BadTarget => c::HOST_UNREACHABLE,
            ErrorKind::Timeout => c::TTL_EXPIRED,
            _ => c::GENERAL_FAILURE,
        }
    }
}

fn circ_kind(c: &CircError) -> ErrorKind {
    match c {
        CircError::Encode(_) => ErrorKind::BadTarget,
        _ => ErrorKind::Circuit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_survive_to_the_socks_reply() {
        let r = |e: EndReason| ClientError::from(StreamError::Ended(e)).socks_reply();
        assert_eq!(r(EndReason::CONNECTREFUSED), socks_code::CONNECTION_REFUSED);
        assert_eq!(r(EndReason::EXITPOLICY), socks_code::NOT_ALLOWED);
        assert_eq!(r(EndReason::RESOLVEFAILED), socks_code::HOST_UNREACHABLE);
        assert_eq!(r(EndReason::NOROUTE), socks_code::HOST_UNREACHABLE);
        assert_eq!(r(EndReason::TIMEOUT), socks_code::TTL_EXPIRED);
        assert_eq!(r(EndReason::MISC), socks_code::GENERAL_FAILURE);
    }

    #[test]
    fn kinds_map_to_replies() {
        assert_eq!(
            ClientError::from(StreamError::OpenTimeout).socks_reply(),
            socks_code::TTL_EXPIRED
        );
        assert_eq!(
            ClientError::NoExitForPort(25).socks_reply(),
            socks_code::NOT_ALLOWED
        );
        assert_eq!(
            ClientError::from(StreamError::BadTarget(None)).socks_reply(),
            socks_code::HOST_UNREACHABLE
        );
        let enc = CircError::Encode(ProtoError::Invalid {
            object: "host name",
            problem: "too long",
        });
        assert_eq!(
            ClientError::from(enc).socks_reply(),
            socks_code::HOST_UNREACHABLE
        );
        let dead = ClientError::from(CircError::Destroyed(DestroyReason::PROTOCOL));
        assert_eq!(dead.socks_reply(), socks_code::GENERAL_FAILURE);
        assert!(dead.is_retriable());
        assert!(!ClientError::from(StreamError::Ended(EndReason::MISC)).is_retriable());
    }

    #[test]
    fn sources_are_kept() {
        use std::error::Error as _;
        let e = ClientError::from(StreamError::Circuit(CircError::Auth(Arc::new(
            CryptoError::CellAuthFailed,
        ))));
        let s = e.source().expect("stream error");
        let s = s.source().expect("circuit error");
        let s = s.source().expect("crypto error");
        assert_eq!(s.to_string(), CryptoError::CellAuthFailed.to_string());
    }
}
