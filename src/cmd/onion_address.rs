//! `allium onion-address KEYDIR`: print the `.allium.alt` address of an onion-service key
//! directory, creating the directory (0700) and its identity key (0600) if absent. The same
//! directory always gives the same address (it is the `key_dir` of an `[[onion_service]]`).

use std::path::PathBuf;

use allium_client::onion::keys;

use super::CmdResult;
use crate::outln;

/// Arguments of `allium onion-address`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The service's key directory (created with a new key if it does not exist).
    pub key_dir: PathBuf,
}

/// Print the address.
pub fn run(a: Args) -> CmdResult {
    let (_, addr) = keys::load_or_create_identity(&a.key_dir).map_err(|e| {
        format!(
            "cannot use onion-service key directory {}: {e}",
            a.key_dir.display()
        )
    })?;
    outln!("{addr}")?;
    Ok(())
}
