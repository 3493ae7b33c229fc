//! The SOCKS front end: a sans-IO parser for what fast-socks5 does not handle (`wire`), and
//! the listener (`server`).

pub(crate) mod server;
pub mod wire;
