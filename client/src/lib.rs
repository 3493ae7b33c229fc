//! Allium's client: bootstrap, path selection, guards, circuits, streams and the SOCKS5 proxy.
#![forbid(unsafe_code)]

pub mod config;
pub mod err;
pub mod guard;
pub mod isolation;
pub mod path;
pub mod socks;

pub use config::{AuthorityConfig, ProxyConfig};
pub use err::ClientError;
