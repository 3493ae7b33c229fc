//! Logging setup. Levels: `error` (a role cannot go on), `warn` (an operator should look),
//! `info` (lifecycle and progress), `debug` (per circuit/link events, never destinations or keys).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Install the global subscriber. No dependency of ours logs SOCKS credentials or targets (the
/// SOCKS parser is our own), so the filter is the operator's as given.
pub(crate) fn init(filter: Option<&str>, configured: Option<&str>) {
    let base = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("ALLIUM_LOG").ok())
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        // Log events for control-port controllers (NOTICE/WARN/... events).
        .with(allium_control::logfeed::layer())
        .try_init();
}
