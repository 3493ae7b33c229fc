//! `allium authority`.

use super::CmdResult;

/// Arguments of `allium authority`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run `allium authority`.
pub fn run(_args: Args) -> CmdResult {
    Err("not yet available".into())
}
