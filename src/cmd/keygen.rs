//! `allium keygen`.

use super::CmdResult;

/// Arguments of `allium keygen`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium keygen`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
