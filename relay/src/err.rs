//! Errors of the relay crate.
//!
//! Errors here are for the operator (start-up, configuration, keys). Errors caused by peers never
//! leave the circuit or link they concern: they become a silent DESTROY, an END or a closed link.

use std::path::PathBuf;

/// An error that stops the relay from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration file could not be read.
    #[error("cannot read relay config {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has a bad key or value.
    #[error("invalid relay config {path}: {message}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said (it names the line and the key).
        message: String,
    },
    /// A configuration value is well-formed but not acceptable.
    #[error("invalid relay config: key `{key}`: {why}")]
    ConfigInvalid {
        /// The key.
        key: &'static str,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// A key could not be loaded or created.
    #[error("relay keys: {0}")]
    Keys(#[from] allium_crypto::CryptoError),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The OR listener could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        /// The requested address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the data directory.
    #[error(transparent)]
    DataDirLocked(#[from] allium_directory::datadir::DataDirLockError),
    /// Building or signing the descriptor failed.
    #[error("descriptor: {0}")]
    Descriptor(String),
}
