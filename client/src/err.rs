//! Errors of the client crate.
//!
//! Every message says what went wrong and, where a person can act, what to do. None carries a
//! SOCKS destination or credential.

use std::path::PathBuf;

/// An error from the client: configuration, bootstrap, circuits or streams.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration is invalid.
    #[error("invalid proxy configuration: {0}")]
    Config(String),
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
    /// A circuit could not be built or failed.
    #[error("circuit: {0}")]
    Circuit(String),
    /// A link to a relay failed.
    #[error("link: {0}")]
    Link(String),
    /// A cryptographic operation failed (no detail, by design).
    #[error("circuit cryptography failed")]
    Crypto,
    /// A timeout expired.
    #[error("timed out while {0}")]
    Timeout(&'static str),
    /// The proxy is shutting down.
    #[error("the proxy is shutting down")]
    Shutdown,
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
}
