//! Onion-service directory documents (issue 13): the three-layer descriptor and the HSDir hash ring.
//! Crypto (blinding, subcredentials, layer keys, client authorization) is in
//! [`allium_crypto::hs`]; byte layouts in `docs/protocol/96-onion-services.md`.
//!
//! - [`desc`]: build, parse, verify and decrypt descriptors. Parse first, verify second
//!   ([`UncheckedHsDesc::check`]), decrypt third ([`VerifiedHsDesc::decrypt`]). A stored descriptor
//!   names only the blinded key, never the identity key or the address.
//! - [`ring`]: `hs_index`, `hsdir_index` and which HSDirs store and serve a descriptor.

pub mod desc;
pub mod ring;

#[cfg(test)]
mod tests;

pub use desc::{
    HsDescBuilder, HsDescContents, IntroPointInfo, PowParams, UncheckedHsDesc, VerifiedHsDesc,
};
pub use ring::{
    HsDirParams, HsDirRing, SrvChoice, consensus_srv, disaster_srv, hs_index, hsdir_index,
    period_srv, srv_choice,
};
