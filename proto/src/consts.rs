//! Sizes shared with the relay-cell crypto of `allium_crypto::relaycell` (design §3.2).
//!
//! These mirror the crypto crate's constants; `tests` in this crate pin them to the values of
//! design §3.2 so a divergence fails loudly.

/// Body of a link cell: `CELL_LEN - 5`.
pub const CELL_BODY_LEN: usize = 1019;
/// A link cell body.
pub type CellBody = [u8; CELL_BODY_LEN];
/// Length of an AEAD tag (and of a SENDME tag).
pub const TAG_LEN: usize = 16;
/// An AEAD tag.
pub type Tag = [u8; TAG_LEN];
/// The relay-message region of a relay cell: 5-byte relay header + [`MAX_DATA`].
pub const RELAY_MSG_LEN: usize = 939;
/// Largest relay message payload (`len` field) at any hop, in both directions.
pub const MAX_DATA: usize = 934;
