//! `allium bwscan -c bwscan.toml`: the bandwidth scanner an authority operator runs beside the
//! authority (logic in `allium_client::bwscan`).

use std::path::PathBuf;

use super::CmdResult;

/// Arguments of `allium bwscan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Configuration file (TOML; see bwscan.example.toml).
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// Run scans until Ctrl-C.
pub fn run(args: Args) -> CmdResult {
    let cfg = allium_client::bwscan::BwScanConfig::load(&args.config)
        .map_err(|e| format!("{e}\n(see bwscan.example.toml for a documented example)"))?;
    let rt = super::runtime()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tracing::info!(output = %cfg.output.display(), "bandwidth scanner starting");
        let scanner = tokio::spawn(allium_client::bwscan::run(cfg, rx, None));
        super::wait_for_shutdown_signal().await;
        tracing::info!("interrupted; shutting down");
        let _ = tx.send(true);
        scanner.await??;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}
