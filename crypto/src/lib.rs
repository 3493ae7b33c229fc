#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod aead;
pub mod ct;
pub mod ctlauth;
pub mod err;
pub mod handshake;
pub mod hs;
pub mod keyfile;
pub mod keys;
pub mod relaycell;
pub mod rng;

pub use err::CryptoError;
pub use handshake::{ClientHandshake, HopKeys, client_start, relay_respond};
pub use keys::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
