//! One module per subcommand. Each has `Args` (clap) and `run(Args) -> CmdResult`.

pub mod authority;
pub mod bwscan;
pub mod config;
pub mod consensus;
pub mod keygen;
pub mod onion_address;
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

/// When this process started (GETINFO uptime).
#[allow(clippy::disallowed_methods)] // The binary: where the process's start time is read.
pub fn process_start() -> std::time::Instant {
    std::time::Instant::now()
}
