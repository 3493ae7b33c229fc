//! `allium consensus`.

use super::CmdResult;

/// Arguments of `allium consensus`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium consensus`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
