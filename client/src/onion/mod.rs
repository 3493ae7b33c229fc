//! Onion services in the proxy (issue 13): reaching a service by its `.allium.alt` address, and
//! running services from `[[onion_service]]` tables.
//!
//! Everything that decides is synchronous and clock-free, tested in memory (and end to end in
//! the simulated overlay, `tests/tests/onion_service.rs`):
//! - [`keys`]: key directories (identity 0600, stable address) and authorised-client keys;
//! - [`ports`]: the `"80 -> 127.0.0.1:8080"` port map;
//! - [`intro`]: the INTRODUCE plaintext (rendezvous point and cookie) and how the
//!   `allium_crypto::hs::ntor` handshake maps onto the INTRODUCE1 fields;
//! - [`service`]: [`OnionService`], the service's state (introduction points and their keys,
//!   descriptors per period, INTRODUCE2 → rendezvous, replay cache, port map);
//! - [`pow`]: proof of work for introductions under load (puzzle, INTRODUCE extension, the
//!   effort-ordered introduction queue and the suggested-effort rule);
//! - [`hsdir`]: the HSDir fetch and upload requests (BEGIN_DIR);
//! - [`client`]: descriptor location, verification and decryption, INTRODUCE1, the RENDEZVOUS2
//!   check, and a per-isolation descriptor cache;
//! - `solvers`: the client's proof-of-work solvers on blocking threads, bounded in number and
//!   time;
//! - `clidrv`: the client driver in the proxy (circuits, waits, kept rendezvous circuits) that
//!   the SOCKS, HTTP CONNECT and transparent front ends use for `.allium.alt` names.
//!
//! Byte layouts: docs/protocol/96-onion-services.md.

pub(crate) mod clidrv;
pub mod client;
pub mod hsdir;
pub mod intro;
pub mod keys;
pub mod ports;
pub mod pow;
pub mod service;
pub(crate) mod solvers;
pub(crate) mod svcdrv;

#[cfg(test)]
mod pow_tests;
#[cfg(test)]
mod tests;

pub use client::{DescCache, OnionError};
pub use ports::PortMapping;
pub use service::{IntroId, IntroRelay, OnionService};
pub use svcdrv::OnionServiceStatus;

/// Check the onion-service parts of a configuration at start: every `[[onion_service]]` key
/// directory gives a usable identity (created 0700/0600 if absent, its address written to
/// `KEY_DIR/hostname`), its `authorized_clients` keys parse, and `onion_client_auth_dir` reads.
/// Returns one service state per table, in order. Errors name the table and the file.
pub fn prepare_services(
    cfg: &crate::config::ProxyConfig,
) -> Result<Vec<(String, OnionService)>, crate::err::ClientError> {
    use crate::err::ClientError;
    let mut out = Vec::with_capacity(cfg.onion_service.len());
    for svc in &cfg.onion_service {
        let fail = |e: &dyn std::fmt::Display| {
            ClientError::Config(format!("[[onion_service]] {}: {e}", svc.name))
        };
        let (identity, _) = keys::load_or_create_identity(&svc.key_dir).map_err(|e| fail(&e))?;
        let auth = match &svc.authorized_clients {
            Some(dir) => keys::load_authorized_clients(dir).map_err(|e| fail(&e))?,
            None => Vec::new(),
        };
        let state = OnionService::new(
            identity,
            svc.ports.clone(),
            auth,
            allium_crypto::hs::TimePeriodParams::DEFAULT,
        )
        .map_err(|e| fail(&e))?;
        let mut state = state;
        if svc.pow {
            state.enable_pow(
                pow::PowConfig {
                    queue_rate: svc.pow_queue_rate,
                    queue_burst: svc.pow_queue_burst,
                },
                allium_directory::now_unix(),
            );
        }
        out.push((svc.name.clone(), state));
    }
    if let Some(dir) = &cfg.onion_client_auth_dir {
        keys::load_client_auth(dir)
            .map_err(|e| ClientError::Config(format!("onion_client_auth_dir: {e}")))?;
    }
    Ok(out)
}
