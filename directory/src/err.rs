//! Errors of the directory crate.
//!
//! Errors that end up in an HTTP reply are one line and carry no key material.

/// An error from decoding, verifying, fetching or serving a directory document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// A document is larger than its size cap; it was not parsed.
    #[error("{object} too large ({len} bytes, at most {max})")]
    TooLarge {
        /// Which document.
        object: &'static str,
        /// Its length (or a lower bound).
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A document's bytes do not decode, or are not in their one canonical form.
    #[error("malformed {object}: {why}")]
    Malformed {
        /// Which document.
        object: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A document decodes but breaks a rule (bounds, field values).
    #[error("invalid {object}: {why}")]
    Invalid {
        /// Which document.
        object: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A signature is missing, forged, by the wrong key, or made for another document type.
    #[error("{object}: {why}")]
    BadSignature {
        /// Which document.
        object: &'static str,
        /// What is wrong (no crypto detail).
        why: &'static str,
    },
    /// A document is outside its validity window.
    #[error("{object} is not valid now: {why}")]
    NotValidNow {
        /// Which document.
        object: &'static str,
        /// Stale, not yet valid, ...
        why: &'static str,
    },
    /// A consensus is not newer than the one already held: the same period again (nothing newer
    /// published yet), or an older one (a rollback, refused).
    #[error("{}", rollback_text(*got, *held))]
    Rollback {
        /// The offered consensus' valid-after.
        got: u64,
        /// The held consensus' valid-after.
        held: u64,
    },
    /// A descriptor is not newer than the one already held.
    #[error("descriptor not newer than the one held")]
    NotNewer,
    /// A network operation failed in the operating system (connect, bind, read, write).
    #[error("{what}: {source}")]
    NetIo {
        /// What we were doing.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A peer broke the HTTP exchange (a response we cannot read).
    #[error("{what}: {why}")]
    Net {
        /// What we were doing.
        what: String,
        /// What went wrong.
        why: &'static str,
    },
    /// A network operation did not finish in time.
    #[error("{what}: timed out")]
    Timeout {
        /// What we were doing.
        what: String,
    },
    /// An HTTP peer answered with an error status.
    #[error("{what}: HTTP {status}: {reason}")]
    HttpStatus {
        /// What we were doing.
        what: String,
        /// The status code.
        status: u16,
        /// The first line of the body.
        reason: String,
    },
    /// No authority gave an acceptable answer.
    #[error("no acceptable consensus from any authority (last error: {last})")]
    NoConsensus {
        /// The last error seen.
        #[source]
        last: Box<Self>,
    },
    /// Another process holds the data directory.
    #[error(transparent)]
    DataDirLocked(#[from] crate::datadir::DataDirLockError),
    /// A configuration value is wrong (the message names the key and what to do).
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration text does not parse as TOML of the expected shape.
    #[error("configuration: {source}")]
    ConfigParse {
        /// The TOML error (it names the line and key).
        #[source]
        source: toml::de::Error,
    },
    /// A configuration file is wrong: which file, and why.
    #[error("{path}: {source}")]
    ConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong in it.
        #[source]
        source: Box<Self>,
    },
    /// A key file or key operation failed.
    #[error(transparent)]
    Crypto(#[from] allium_crypto::CryptoError),
    /// Reading or writing the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An internal invariant broke (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// The message of [`DirError::Rollback`]: only an older consensus is called a rollback.
fn rollback_text(got: u64, held: u64) -> String {
    if got == held {
        format!(
            "no newer consensus yet (the one offered is the one held, valid-after {})",
            crate::time_fmt::rfc3339(held)
        )
    } else {
        format!(
            "consensus rolled back: valid-after {} is older than the held {}; refused",
            crate::time_fmt::rfc3339(got),
            crate::time_fmt::rfc3339(held)
        )
    }
}

impl DirError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn net(what: impl Into<String>, why: &'static str) -> Self {
        Self::Net {
            what: what.into(),
            why,
        }
    }
    pub(crate) fn net_io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::NetIo {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn invalid(object: &'static str, why: impl Into<String>) -> Self {
        Self::Invalid {
            object,
            why: why.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = DirError> = std::result::Result<T, E>;
