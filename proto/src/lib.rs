//! Allium's wire protocol: the byte codec, link cells, relay messages, flow-control windows and the
//! Noise XK link.
//!
//! - [`codec`]: bounded [`codec::Reader`] / [`codec::Writer`].
//! - [`cell`]: 1024-byte link cells, circuit ids, CREATE / CREATED / DESTROY bodies.
//! - [`relaymsg`]: relay messages carried inside relay cells (`cmd | stream_id | len | data`).
//! - [`flowctl`]: SENDME windows and authenticated SENDME tags (sans-IO).
//! - [`link`]: the Noise_XK_25519_ChaChaPoly_SHA256 link, sans-IO.
//! - [`channel`]: the tokio driver of a link: connect / accept / send / receive cells.
//!
//! Not in this crate: relay-cell cryptography (`allium-crypto`), circuits as a whole, documents.
//! The wire formats are specified in `docs/protocol/{40-link,50-cells,60-relay-messages,70-flow-control}.md`.
#![forbid(unsafe_code)]

pub mod cell;
pub mod channel;
pub mod codec;
pub mod consts;
pub mod err;
pub mod flowctl;
pub mod link;
pub mod relaymsg;

pub use cell::{Cell, CellCmd, CircId};
pub use channel::{Channel, ChannelReceiver, ChannelSender};
pub use err::{LinkError, ProtoError, Result};
pub use relaymsg::{RelayCmd, RelayMsg};
