//! Allium's cryptography: every primitive and key the rest of the workspace uses.
//!
//! - [`keys`]: Ed25519 identities and signing keys, x25519 link/onion keys, domain-separated signatures.
//! - [`keyfile`]: 0600 key files.
//! - [`ct`]: constant-time comparisons.
//! - [`rng`]: the one CSPRNG.
//! - [`handshake`]: the ntor-v3-shaped circuit handshake (design §2).
//! - [`relaycell`]: relay-cell crypto: per-hop AEAD, per-cell ratchet, filler (design §3).
//!
//! The symmetric backend (ChaCha20-Poly1305 from `ring`, raw ChaCha20 keystream from RustCrypto
//! `chacha20`) sits behind one private module, `aead`.
//!
//! Not in this crate: wire formats (see `allium-proto`), documents (see `allium-directory`).
#![forbid(unsafe_code)]

mod aead;
pub mod ct;
pub mod err;
pub mod handshake;
pub mod keyfile;
pub mod keys;
pub mod relaycell;
pub mod rng;

pub use err::CryptoError;
pub use handshake::{ClientHandshake, HopKeys, client_start, relay_respond};
pub use keys::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
