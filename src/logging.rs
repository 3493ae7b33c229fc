//! Logging setup. Levels: `error` (a role cannot go on), `warn` (an operator should look),
//! `info` (lifecycle and progress), `debug` (per circuit/link events, never destinations or keys).

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. fast-socks5 logs credentials and targets at debug, so it is
/// always capped at `warn` (design pitfall 13).
pub(crate) fn init(filter: Option<&str>, configured: Option<&str>) {
    let base = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("ALLIUM_LOG").ok())
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let spec = format!("{base},fast_socks5=warn");
    let filter =
        EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info,fast_socks5=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
