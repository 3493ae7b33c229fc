//! The SOCKS front end, in three parts:
//!
//! - [`handshake`]: the server side of the handshake as one sans-IO state machine on
//!   `allium_proto::codec` (SOCKS5 with no-auth and username/password, CONNECT, Tor's RESOLVE;
//!   SOCKS4/4a). Bytes in; bytes to send and one parsed request out.
//! - `server`: the tokio listener. It only moves bytes between the socket and the state
//!   machine, then hands the request to circuits and streams.
//! - [`client`]: the client side (request encoding, reply parsing, small async helpers), used
//!   by the whole-network tests and `allium testnet`.
//!
//! [`wire`] holds what they share: codes, [`wire::Target`], address and reply encoding.
//!
//! Why not fast-socks5 (which the design card names): it cannot parse Tor's RESOLVE command nor
//! SOCKS4a, so with it every request was parsed twice, by our parser and again by fast-socks5
//! behind a rewind adapter that replayed the bytes. One state machine parses each byte once,
//! never reads past the request (bytes the application sends after it stay stream data), is
//! tested without sockets byte by byte, and its refusals are chosen in one place. Nothing else
//! that fast-socks5 does is needed here, so the dependency is gone.

pub mod client;
pub mod handshake;
pub(crate) mod server;
pub mod wire;
