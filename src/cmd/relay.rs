//! `allium relay`.

use super::CmdResult;

/// Arguments of `allium relay`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium relay`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
