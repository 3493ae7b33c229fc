#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod args;
pub mod auth;
pub mod backend;
pub mod config;
pub mod driver;
pub mod events;
pub mod framer;
pub mod logfeed;
pub mod reply;
pub mod session;

pub use backend::{
    Bootstrap, CircState, CircuitStatus, ConfOption, ControlBackend, Now, OrConnStatus, Signal,
    StreamStatus, fingerprint, long_name, ns_entry, ns_lookup,
};
pub use config::{ControlConfig, ControlError};
pub use driver::{ControlServer, Request, SetConfRequest, start};
pub use events::{Event, EventBus};
pub use session::SetConf;
