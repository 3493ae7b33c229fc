#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod cell;
pub mod channel;
pub mod circmux;
pub mod codec;
pub mod consts;
pub mod err;
pub mod flowctl;
pub mod inbox;
pub mod link;
#[cfg(feature = "openssl")]
mod link_cipher;
pub mod metrics;
pub mod relaymsg;

pub use cell::{Cell, CellCmd, CircId};
pub use channel::{Channel, ChannelReceiver, ChannelSender};
pub use err::{LinkError, ProtoError, Result};
pub use relaymsg::{RelayCmd, RelayMsg};
