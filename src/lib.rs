//! The `allium` binary's command-line front end: one module per subcommand.
//!
//! Not in this crate: protocol logic (see the workspace crates).

pub mod cmd;
pub mod logging;
pub mod ops;
pub mod out;

use clap::{Parser, Subcommand};

/// Allium: an onion-routing anonymity overlay.
#[derive(Parser, Debug)]
#[command(name = "allium", version, about, long_about = None)]
pub struct Cli {
    /// Log filter, e.g. `info` or `allium_relay=debug` (also read from `ALLIUM_LOG`).
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create relay or authority keys.
    Keygen(cmd::keygen::Args),
    /// Run a directory authority, or issue its signing-key certificate.
    Authority(cmd::authority::Args),
    /// Run a relay.
    Relay(cmd::relay::Args),
    /// Run the client: a local SOCKS5 proxy.
    Proxy(cmd::proxy::Args),
    /// Show a consensus.
    Consensus(cmd::consensus::Args),
    /// Check a configuration file without starting anything.
    Config(cmd::config::Args),
    /// Measure relays' bandwidth for an authority (the bandwidth scanner).
    Bwscan(cmd::bwscan::Args),
    /// Print the `.allium.alt` address of an onion-service key directory (creating its key).
    OnionAddress(cmd::onion_address::Args),
    /// Run a whole local network (authorities, relays, a proxy) on 127.0.0.1.
    Testnet(cmd::testnet::Args),
}

/// Parse the command line, run the subcommand, and map errors to an exit code with a message.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Precedence: --log, then ALLIUM_LOG, then the role's configuration file, then `info`.
    let configured = match &cli.command {
        Command::Relay(a) => cmd::relay::configured_log_level(a),
        Command::Proxy(a) => cmd::proxy::configured_log_level(a),
        Command::Authority(a) => ops::roles::configured_log_level("authority", a.config.as_deref()),
        _ => None,
    };
    logging::init(cli.log.as_deref(), configured.as_deref());
    let result = match cli.command {
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Authority(a) => cmd::authority::run(a),
        Command::Relay(a) => cmd::relay::run(a),
        Command::Proxy(a) => cmd::proxy::run(a),
        Command::Consensus(a) => cmd::consensus::run(a),
        Command::Config(a) => cmd::config::run(a),
        Command::Testnet(a) => cmd::testnet::run(a),
        Command::Bwscan(a) => cmd::bwscan::run(a),
        Command::OnionAddress(a) => cmd::onion_address::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): nothing more to say.
        Err(e) if out::is_broken_pipe(e.as_ref()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("allium: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
