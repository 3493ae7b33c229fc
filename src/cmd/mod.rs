//! One module per subcommand. Each has `Args` (clap) and `run(Args) -> CmdResult`.

pub mod authority;
pub mod consensus;
pub mod keygen;
pub mod proxy;
pub mod relay;
pub mod testnet;

/// The error a subcommand returns: a message for the person at the terminal.
pub type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Build a multi-threaded tokio runtime for a long-running role.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Wait for Ctrl-C (SIGINT) or SIGTERM: how every long-running role is stopped.
pub async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Wait for Ctrl-C, SIGTERM, or a controller's SIGNAL SHUTDOWN/HALT (or its owning controller
/// leaving) on the control port.
pub async fn wait_for_shutdown_or_controller(control: Option<&allium_control::ControlServer>) {
    match control {
        Some(c) => {
            tokio::select! {
                () = wait_for_shutdown_signal() => {}
                r = c.requested() => tracing::info!("control port asked to stop ({r:?})"),
            }
        }
        None => wait_for_shutdown_signal().await,
    }
}

/// When this process started (GETINFO uptime).
#[allow(clippy::disallowed_methods)] // The binary: where the process's start time is read.
pub fn process_start() -> std::time::Instant {
    std::time::Instant::now()
}
