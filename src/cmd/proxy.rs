//! `allium proxy`: the client, a local SOCKS5 proxy. SIGHUP reloads the configuration file.

use std::path::PathBuf;

use super::CmdResult;

/// Arguments of `allium proxy`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Configuration file (TOML; see proxy.example.toml).
    /// Without it, every key has its default and no authority is known, which is an error.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// SOCKS port on the configured listen address (overrides `socks_listen`'s port).
    #[arg(long, value_name = "P")]
    pub socks_port: Option<u16>,
}

/// The log filter the proxy's configuration asks for, if the file reads.
pub fn configured_log_level(args: &Args) -> Option<String> {
    crate::ops::roles::configured_log_level("proxy", args.config.as_deref())
}

/// Run `allium proxy` until Ctrl-C or SIGTERM.
pub fn run(args: Args) -> CmdResult {
    crate::ops::roles::run_proxy(args.config, args.socks_port)
}
