//! `allium testnet`.

use super::CmdResult;

/// Arguments of `allium testnet`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium testnet`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
