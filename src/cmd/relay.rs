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
    let started = super::process_start();
    let rt = super::runtime()?;
    rt.block_on(async move {
        let control_cfg = cfg.control();
        let data_dir = cfg.data_dir.clone();
        let handle = allium_relay::start(cfg).await?;
        let control = allium_control::start(
            &control_cfg,
            &data_dir,
            Some(absolute(&args.config)),
            started,
            handle.control_backend(),
        )
        .await?;
        tracing::info!(
            identity = %handle.identity(),
            or_addr = %handle.or_addr(),
            advertised = %handle.advertised_addr(),
            "relay running; stop with Ctrl-C or SIGTERM"
        );
        super::wait_for_shutdown_or_controller(control.as_ref()).await;
        tracing::info!("shutting down");
        if let Some(c) = control {
            c.stop().await;
        }
        handle.shutdown().await;
        Ok(())
    })
}

/// `path` made absolute (GETINFO config-file), or as given if the working directory is unknown.
pub(super) fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
