//! Logging setup. Levels: `error` (a role cannot go on), `warn` (an operator should look),
//! `info` (lifecycle and progress; Tor's "notice"), `debug` (per circuit/link events, never
//! destinations or keys).
//!
//! The filter sits behind a reload handle so that a configuration reload (SIGHUP) can change the
//! role's `log_level` while it runs. A filter given with `--log` or `ALLIUM_LOG` wins over the
//! file, at start and on reload.

use std::sync::OnceLock;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The reload handle, and whether the filter in force came from the configuration file.
struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    from_config: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Dependencies that log what Allium's own logs never may: hickory (the exit's DNS resolver) logs
/// every queried name at debug level, which at an exit is a user's destination.
const PRIVATE_BELOW_WARN: &[&str] = &["hickory_proto", "hickory_resolver", "hickory_net"];

/// A filter that holds the dependencies in [`PRIVATE_BELOW_WARN`] at `warn` whatever the
/// operator's filter says, installed beside it (and in the log-privacy test beside its own).
pub fn privacy_filter() -> Targets {
    PRIVATE_BELOW_WARN
        .iter()
        .fold(Targets::new().with_default(Level::TRACE), |t, target| {
            t.with_target(*target, Level::WARN)
        })
}

/// Install the global subscriber: the operator's filter (reloadable) and [`privacy_filter`], so
/// no dependency's debug output carries a destination (the SOCKS parser is our own).
pub(crate) fn init(filter: Option<&str>, configured: Option<&str>) {
    let from_env = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("ALLIUM_LOG").ok());
    // Without --log/ALLIUM_LOG the file decides (its `log_level` defaults to `info`).
    let from_config = from_env.is_none();
    let base = from_env
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(layer)
        .with(privacy_filter())
        .with(fmt)
        // Log events for control-port controllers (NOTICE/WARN/... events).
        .with(allium_control::logfeed::layer())
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed {
            handle,
            from_config,
        });
    }
}

/// Check that `level` is a filter `init` and [`set_configured`] accept.
pub fn check_filter(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| {
        format!("`{level}` is not a log filter ({e}); use e.g. `info` or `allium_relay=debug`")
    })
}

/// What became of a new `log_level` from the configuration file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `--log` or `ALLIUM_LOG` set the filter; the file's level does not apply.
    Overridden,
    /// No subscriber of ours is installed (tests).
    NotInstalled,
}

/// Put the configuration file's new `log_level` in force (a reload).
pub(crate) fn set_configured(level: &str) -> Result<LevelChange, String> {
    check_filter(level)?;
    let Some(inst) = INSTALLED.get() else {
        return Ok(LevelChange::NotInstalled);
    };
    if !inst.from_config {
        return Ok(LevelChange::Overridden);
    }
    let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    inst.handle
        .reload(f)
        .map_err(|e| format!("could not change the log filter: {e}"))?;
    Ok(LevelChange::Applied)
}
