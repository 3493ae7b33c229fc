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

/// Run `allium relay`.
pub fn run(args: Args) -> CmdResult {
    let cfg = allium_relay::RelayConfig::load(&args.config)?;
    let rt = super::runtime()?;
    rt.block_on(async move {
        let handle = allium_relay::start(cfg).await?;
        tracing::info!(
            identity = %handle.identity(),
            or_addr = %handle.or_addr(),
            advertised = %handle.advertised_addr(),
            "relay running; press Ctrl-C to stop"
        );
        let stop = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        handle.shutdown().await;
        stop.map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
        Ok(())
    })
}
