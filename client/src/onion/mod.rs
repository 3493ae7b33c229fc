//! Onion services in the proxy (issue 13): reaching a service by its `.allium.alt` address, and
//! running services from `[[onion_service]]` tables.
//!
//! Everything that decides is synchronous and clock-free, tested in memory (and end to end in
//! the simulated overlay, `tests/tests/onion_service.rs`):
//! - [`keys`]: key directories (identity 0600, stable address) and authorised-client keys;
//! - [`ports`]: the `"80 -> 127.0.0.1:8080"` port map;
//! - [`intro`]: the INTRODUCE plaintext (rendezvous point and cookie) and how the
//!   `allium_crypto::hs::ntor` handshake maps onto the INTRODUCE1 fields;
//! - [`service`]: [`OnionService`], the service's state (introduction points and their keys,
//!   descriptors per period, INTRODUCE2 → rendezvous, replay cache, port map);
//! - [`hsdir`]: the HSDir fetch and upload requests (BEGIN_DIR);
//! - [`client`]: descriptor location, verification and decryption, INTRODUCE1, the RENDEZVOUS2
//!   check, and a per-isolation descriptor cache.
//!
//! Byte layouts: docs/protocol/96-onion-services.md.

pub mod client;
pub mod hsdir;
pub mod intro;
pub mod keys;
pub mod ports;
pub mod service;

#[cfg(test)]
mod tests;

pub use client::{DescCache, OnionError};
pub use ports::PortMapping;
pub use service::{IntroId, IntroRelay, OnionService};
