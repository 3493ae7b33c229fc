//! Operating a running role: configuration reload on SIGHUP, the heartbeat, running as root,
//! and the loop that waits for signals.
//!
//! Every long-running role (`authority`, `relay`, `proxy`) ends its `run` in [`serve`], which
//! waits for SIGINT/SIGTERM (stop), SIGHUP (reload the configuration file) and the heartbeat
//! timer. What a role can change while running is its crate's `RELOADABLE_KEYS`; see
//! docs/OPERATING.md for the list and the log lines.

pub mod heartbeat;
pub mod privs;
pub mod reload;
pub mod roles;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// What [`serve`] needs from a running role.
pub trait Role {
    /// The role's configuration.
    type Config: Serialize + DeserializeOwned;
    /// "relay", "proxy" or "authority".
    const NAME: &'static str;
    /// The keys that apply while running (the crate's `RELOADABLE_KEYS`).
    fn reloadable(&self) -> &'static [&'static str];
    /// Read, parse and validate the file as at start (command-line overrides included).
    fn load(&self, path: &Path) -> Result<Self::Config, String>;
    /// Put the reloadable keys of `cfg` in force (the others are ignored).
    fn apply(&self, cfg: &Self::Config) -> Result<(), String>;
    /// The role's part of the heartbeat line (circuits, traffic, consensus...).
    fn heartbeat(&self) -> String;
    /// `log_level` and `heartbeat_period_secs` of `cfg`.
    fn ops(cfg: &Self::Config) -> (&str, u64);
}

/// What one reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// No file to read (the role was started without one).
    NoFile,
    /// The file does not read, parse or validate: nothing changed.
    Broken(String),
    /// The file was read; this is what changed and what was refused.
    Done(reload::ReloadPlan),
}

/// Reload the configuration from `path` into a running role whose configuration is `running`
/// (a [`reload::snapshot`]): every change is logged, live keys are applied, the others are named
/// in a warning and keep their running value. Returns the new heartbeat period if it changed.
pub fn reload_role<R: Role>(
    role: &R,
    path: Option<&Path>,
    running: &mut Map<String, Value>,
) -> (ReloadOutcome, Option<u64>) {
    let Some(path) = path else {
        tracing::warn!(
            "reload requested, but the {} was started without a configuration file; nothing to reload",
            R::NAME
        );
        return (ReloadOutcome::NoFile, None);
    };
    tracing::info!("reload requested: reading {}", path.display());
    let checked = role.load(path).and_then(|cfg| {
        crate::logging::check_filter(R::ops(&cfg).0)
            .map_err(|e| format!("key `log_level`: {e}"))?;
        let snap = reload::snapshot(&cfg)?;
        Ok((cfg, snap))
    });
    let (cfg, snap) = match checked {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(
                "reload failed, the running configuration is kept: {e}; fix {} and send SIGHUP again",
                path.display()
            );
            return (ReloadOutcome::Broken(e), None);
        }
    };
    apply_checked(role, running, &cfg, &snap)
}

/// Put `cfg` (whose snapshot is `snap`, its `log_level` checked) in force as a reload does:
/// log refused keys, apply the live ones, update `running`.
fn apply_checked<R: Role>(
    role: &R,
    running: &mut Map<String, Value>,
    cfg: &R::Config,
    snap: &Map<String, Value>,
) -> (ReloadOutcome, Option<u64>) {
    let plan = reload::plan(running, snap, role.reloadable());
    for c in &plan.refused {
        tracing::warn!(
            "reload: key `{}` cannot change while the {} runs; keeping {} (the file says {}); restart to apply it",
            c.key,
            R::NAME,
            c.old,
            c.new
        );
    }
    if plan.applied.is_empty() {
        if plan.refused.is_empty() {
            tracing::info!("reload: configuration unchanged");
        }
        return (ReloadOutcome::Done(plan), None);
    }
    if let Err(e) = role.apply(cfg) {
        tracing::warn!("reload failed, the running configuration is kept: {e}");
        return (ReloadOutcome::Broken(e), None);
    }
    let (level, period) = R::ops(cfg);
    if plan.applies("log_level") {
        match crate::logging::set_configured(level) {
            Ok(crate::logging::LevelChange::Overridden) => tracing::warn!(
                "reload: `log_level` changed in the file, but --log or ALLIUM_LOG sets the filter; they keep precedence"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("reload: `log_level`: {e}"),
        }
    }
    for c in &plan.applied {
        tracing::info!("reload: {} changed from {} to {}", c.key, c.old, c.new);
    }
    reload::merge(running, snap, &plan);
    let new_period = plan.applies("heartbeat_period_secs").then_some(period);
    (ReloadOutcome::Done(plan), new_period)
}

/// Apply a controller's SETCONF through the reload path: every option must be one of the
/// role's `RELOADABLE_KEYS` (else nothing changes and the answer names the key to edit); the
/// running configuration with the new values goes through the same checks and
/// [`Role::apply`] as a reloaded file. Returns the new heartbeat period if it changed.
pub fn setconf_role<R: Role>(
    role: &R,
    running: &mut Map<String, Value>,
    changes: &[allium_control::SetConf],
) -> Result<Option<u64>, String> {
    let live = role.reloadable();
    if let Some(c) = changes.iter().find(|c| !live.contains(&c.key)) {
        return Err(format!(
            "{} (`{}`) cannot change while the {} runs; edit `{}` in the configuration file and restart",
            c.name,
            c.key,
            R::NAME,
            c.key
        ));
    }
    let mut snap = running.clone();
    for c in changes {
        let v = reload::json_value(c.key, running.get(c.key), &c.values)
            .map_err(|e| format!("{} (`{}`): {e}", c.name, c.key))?;
        snap.insert(c.key.to_owned(), v);
    }
    let cfg: R::Config = serde_json::from_value(Value::Object(snap.clone()))
        .map_err(|e| format!("the new value does not fit: {e}"))?;
    crate::logging::check_filter(R::ops(&cfg).0).map_err(|e| format!("Log (`log_level`): {e}"))?;
    tracing::info!("control port: SETCONF of {} option(s)", changes.len());
    match apply_checked(role, running, &cfg, &snap) {
        (ReloadOutcome::Broken(e), _) => Err(e),
        (_, period) => Ok(period),
    }
}

/// The signals a role waits for, registered before it starts so that an early SIGHUP cannot
/// kill it (the default action of SIGHUP is to terminate).
#[derive(Debug)]
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Register SIGHUP, SIGTERM and SIGINT handlers (inside a tokio runtime).
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Run a started role until SIGINT or SIGTERM: reload on SIGHUP, log the heartbeat every
/// `heartbeat_period_secs` (0: never). `cfg` is the configuration the role started with.
#[allow(clippy::disallowed_methods)] // Driver: the heartbeat timer and uptime read tokio's clock.
pub async fn serve<R: Role>(
    role: &R,
    signals: Signals,
    path: Option<PathBuf>,
    cfg: &R::Config,
    control: Option<&allium_control::ControlServer>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut running = reload::snapshot(cfg)?;
    let mut setconf = control.and_then(allium_control::ControlServer::take_setconf);
    let started = tokio::time::Instant::now();
    let mut period = R::ops(cfg).1;
    let next = |from: tokio::time::Instant, p: u64| (p > 0).then(|| from + Duration::from_secs(p));
    let mut beat = next(started, period);
    loop {
        let timer = async {
            match beat {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            () = controller_stop(control) => break,
            Some(req) = async {
                match setconf.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let r = setconf_role(role, &mut running, &req.changes);
                if let Ok(Some(p)) = r {
                    period = p;
                    beat = next(tokio::time::Instant::now(), period);
                }
                let _ = req.reply.send(r.map(|_| ()));
            }
            _ = hup.recv() => {
                let (_, new_period) = reload_role(role, path.as_deref(), &mut running);
                if let Some(p) = new_period {
                    period = p;
                    beat = next(tokio::time::Instant::now(), period);
                }
            }
            () = timer => {
                tracing::info!(
                    "heartbeat: {} up {}; {}",
                    R::NAME,
                    heartbeat::uptime(started.elapsed()),
                    role.heartbeat()
                );
                beat = next(tokio::time::Instant::now(), period);
            }
        }
    }
    tracing::info!("shutting down");
    Ok(())
}

/// Resolves when a controller asks the process to stop (`SIGNAL SHUTDOWN`/`HALT`); never without
/// a control port.
async fn controller_stop(control: Option<&allium_control::ControlServer>) {
    match control {
        Some(c) => {
            let r = c.requested().await;
            tracing::info!("control port asked to stop ({r:?})");
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_client::ProxyConfig;
    use allium_control::SetConf;
    use std::sync::Mutex;

    /// A proxy role that records what it was asked to apply.
    #[derive(Default)]
    struct Fake {
        applied: Mutex<Vec<ProxyConfig>>,
    }

    impl Role for Fake {
        type Config = ProxyConfig;
        const NAME: &'static str = "proxy";
        fn reloadable(&self) -> &'static [&'static str] {
            allium_client::config::RELOADABLE_KEYS
        }
        fn load(&self, _path: &Path) -> Result<ProxyConfig, String> {
            Err("no file".into())
        }
        fn apply(&self, cfg: &ProxyConfig) -> Result<(), String> {
            // (A default ProxyConfig has no authorities: validation is the real role's job.)
            self.applied.lock().unwrap().push(cfg.clone());
            Ok(())
        }
        fn heartbeat(&self) -> String {
            String::new()
        }
        fn ops(cfg: &ProxyConfig) -> (&str, u64) {
            (&cfg.log_level, cfg.heartbeat_period_secs)
        }
    }

    fn change(name: &'static str, key: &'static str, v: &[&str]) -> SetConf {
        SetConf {
            name,
            key,
            kind: "Integer",
            values: v.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn setconf_goes_through_the_reload_path() {
        let role = Fake::default();
        let mut running = reload::snapshot(&ProxyConfig::default()).unwrap();
        // A live key: applied, and the running snapshot follows.
        let r = setconf_role(
            &role,
            &mut running,
            &[
                change("CircuitBuildTimeout", "circuit_build_timeout", &["30"]),
                change("NumPrimaryGuards", "primary_guards", &["2"]),
            ],
        );
        assert_eq!(r, Ok(None));
        let applied = role.applied.lock().unwrap().pop().unwrap();
        assert_eq!(applied.circuit_build_timeout, Duration::from_secs(30));
        assert_eq!(applied.primary_guards, 2);
        assert_eq!(running["circuit_build_timeout"], Value::from(30u64));
        // The heartbeat period changes the timer.
        let r = setconf_role(
            &role,
            &mut running,
            &[change(
                "heartbeat_period_secs",
                "heartbeat_period_secs",
                &["60"],
            )],
        );
        assert_eq!(r, Ok(Some(60)));
        // A key that needs a restart: refused by name, nothing applied.
        let before = role.applied.lock().unwrap().len();
        let e = setconf_role(
            &role,
            &mut running,
            &[
                change("CircuitBuildTimeout", "circuit_build_timeout", &["20"]),
                change("SocksPort", "socks_listen", &["127.0.0.1:9999"]),
            ],
        )
        .unwrap_err();
        assert!(
            e.contains("SocksPort (`socks_listen`) cannot change"),
            "{e}"
        );
        assert_eq!(role.applied.lock().unwrap().len(), before);
        assert_eq!(running["circuit_build_timeout"], Value::from(30u64));
        // A value of the wrong type: refused, nothing applied.
        let e = setconf_role(
            &role,
            &mut running,
            &[change("NumPrimaryGuards", "primary_guards", &["many"])],
        )
        .unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        // Tor's Log form for log_level.
        assert_eq!(
            reload::json_value("log_level", None, &["notice stderr".into()]),
            Ok(Value::String("info".into()))
        );
    }
}
