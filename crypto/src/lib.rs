//! Allium's cryptography: every primitive and key the rest of the workspace uses.
//!
//! - [`keys`]: Ed25519 identities and signing keys, x25519 link/onion keys, domain-separated signatures.
//! - [`keyfile`]: 0600 key files.
//! - [`ct`]: constant-time comparisons.
//! - [`rng`]: the one CSPRNG.
//!
//! Not in this crate: wire formats (see `allium-proto`), documents (see `allium-directory`).
#![forbid(unsafe_code)]

pub mod ct;
pub mod err;
pub mod keyfile;
pub mod keys;
pub mod rng;

pub use err::CryptoError;
pub use keys::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
