//! `allium relay --config FILE`: run a relay until Ctrl-C or SIGTERM; SIGHUP reloads the file.

use std::path::PathBuf;

use super::CmdResult;

/// Arguments of `allium relay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The relay's configuration file (TOML; see relay.example.toml for every key).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

/// The log filter the relay's configuration asks for, if the file reads (used before logging is
/// set up; errors are reported later by [`run`]).
pub fn configured_log_level(args: &Args) -> Option<String> {
    crate::ops::roles::configured_log_level("relay", Some(&args.config))
}

/// Run `allium relay`.
pub fn run(args: Args) -> CmdResult {
    crate::ops::roles::run_relay(args.config)
}

/// `path` made absolute (GETINFO config-file), or as given if the working directory is unknown.
pub(crate) fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
