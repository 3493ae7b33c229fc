#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod addr;
pub mod authinfo;
pub mod authority;
pub mod client;
pub mod datadir;
pub mod dircache;
pub mod doc;
pub mod err;
pub mod hs;
pub mod netdir;
pub mod paths;
pub mod time_fmt;

pub use authinfo::AuthorityInfo;
pub use client::{ConsensusCache, fetch_consensus, upload_descriptor};
pub use err::{DirError, Result};
pub use netdir::NetDir;

/// The current time in unix seconds (the only wall-clock read in this crate's API surface;
/// everything else takes `now` as a parameter).
#[allow(clippy::disallowed_methods)] // the wall clock for callers that have no `now` of their own
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
