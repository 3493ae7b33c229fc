//! `allium proxy`.

use super::CmdResult;

/// Arguments of `allium proxy`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium proxy`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
