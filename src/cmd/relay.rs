//! `allium relay --config FILE`: run a relay until Ctrl-C.

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
    allium_relay::RelayConfig::load(&args.config)
        .ok()
        .map(|c| c.log_level)
}

/// Run `allium relay`.
pub fn run(args: Args) -> CmdResult {
    let cfg = allium_relay::RelayConfig::load(&args.config)?;
    if cfg.authorities.is_empty() {
        // As the proxy: without authorities the relay could never publish or learn the network.
        return Err(format!(
            "{}: no authorities configured; add at least one [[authorities]] entry with \
             `identity` and `dir_addr`\n(see relay.example.toml for a documented example \
             configuration)",
            args.config.display()
        )
        .into());
    }
    let rt = super::runtime()?;
    rt.block_on(async move {
        let handle = allium_relay::start(cfg).await?;
        tracing::info!(
            identity = %handle.identity(),
            or_addr = %handle.or_addr(),
            advertised = %handle.advertised_addr(),
            "relay running; stop with Ctrl-C or SIGTERM"
        );
        super::wait_for_shutdown_signal().await;
        tracing::info!("shutting down");
        handle.shutdown().await;
        Ok(())
    })
}
