//! `allium proxy`: the client, a local SOCKS5 proxy.

use std::path::PathBuf;
use std::time::Duration;

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

/// Run `allium proxy` until Ctrl-C.
pub fn run(args: Args) -> CmdResult {
    let hint = "(see proxy.example.toml for a documented example configuration)";
    let mut cfg = match &args.config {
        Some(path) => allium_client::ProxyConfig::load(path).map_err(|e| format!("{e}\n{hint}"))?,
        None => allium_client::ProxyConfig::default(),
    };
    if let Some(p) = args.socks_port {
        cfg.socks_listen.set_port(p);
    }
    cfg.validate()
        .map_err(|e| format!("{e}\npass --config FILE {hint}"))?;
    let started = super::process_start();
    let rt = super::runtime()?;
    rt.block_on(async move {
        let control_cfg = cfg.control();
        let data_dir = cfg.data_dir.clone();
        let proxy = allium_client::start(cfg).await?;
        let control = allium_control::start(
            &control_cfg,
            &data_dir,
            args.config.as_deref().map(super::relay::absolute),
            started,
            proxy.control_backend(),
        )
        .await?;
        let addr = proxy.socks_addr();
        tokio::select! {
            r = proxy.wait_ready(Duration::from_secs(120)) => match r {
                Ok(()) => tracing::info!(
                    "ready: point applications at socks5h://{addr} (for example: curl --socks5-hostname {addr} https://example.com/)"
                ),
                Err(e) => tracing::warn!("{e}; still trying in the background"),
            },
            () = super::wait_for_shutdown_or_controller(control.as_ref()) => {
                tracing::info!("interrupted; shutting down");
                if let Some(c) = control {
                    c.stop().await;
                }
                proxy.shutdown().await;
                return Ok(());
            }
        }
        super::wait_for_shutdown_or_controller(control.as_ref()).await;
        tracing::info!("interrupted; shutting down");
        if let Some(c) = control {
            c.stop().await;
        }
        proxy.shutdown().await;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}
