//! Sizes shared with the relay-cell crypto (design §3.2), re-exported from
//! `allium_crypto::relaycell` so the two crates can never disagree.

pub use allium_crypto::relaycell::{
    CELL_BODY_LEN, CellBody, MAX_DATA, RELAY_MSG_LEN, TAG_LEN, Tag,
};
