//! The three long-running roles as seen by [`super::serve`]: how each reloads, what its
//! heartbeat says, and how each starts (privileges, listeners, then the signal loop).

use std::path::{Path, PathBuf};
use std::time::Duration;

use allium_client::{ProxyConfig, ProxyHandle};
use allium_directory::authority::{self, AuthorityConfig, AuthorityHandle};
use allium_relay::{RelayConfig, RelayHandle};

use super::heartbeat::bytes;
use super::privs::{self, Privileges};
use super::{Role, serve};
use crate::cmd::CmdResult;

impl Role for RelayHandle {
    type Config = RelayConfig;
    const NAME: &'static str = "relay";
    fn reloadable(&self) -> &'static [&'static str] {
        allium_relay::config::RELOADABLE_KEYS
    }
    fn load(&self, path: &Path) -> Result<RelayConfig, String> {
        RelayConfig::load(path).map_err(|e| e.to_string())
    }
    fn apply(&self, cfg: &RelayConfig) -> Result<(), String> {
        self.reconfigure(cfg).map_err(|e| e.to_string())
    }
    fn heartbeat(&self) -> String {
        let s = self.stats();
        let listed = match self.listed_in_consensus() {
            None => "no consensus yet",
            Some(true) => "listed in the consensus",
            Some(false) => "NOT listed in the consensus",
        };
        format!(
            "{} circuits open, {} created; {} read, {} written; {listed}",
            s.open_circuits(),
            s.total_circuits(),
            bytes(s.bytes_read()),
            bytes(s.bytes_written()),
        )
    }
    fn ops(cfg: &RelayConfig) -> (&str, u64) {
        (&cfg.log_level, cfg.heartbeat_period_secs)
    }
}

/// A running proxy, and the command-line override applied to every reloaded file.
#[derive(Debug)]
pub struct ProxyRole {
    /// The proxy.
    pub handle: ProxyHandle,
    /// `--socks-port`, if given.
    pub socks_port: Option<u16>,
}

/// Read a proxy configuration file and apply `--socks-port`.
pub fn load_proxy(path: &Path, socks_port: Option<u16>) -> Result<ProxyConfig, String> {
    let mut cfg = ProxyConfig::load(path).map_err(|e| e.to_string())?;
    if let Some(p) = socks_port {
        cfg.socks_listen.set_port(p);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

impl Role for ProxyRole {
    type Config = ProxyConfig;
    const NAME: &'static str = "proxy";
    fn reloadable(&self) -> &'static [&'static str] {
        allium_client::config::RELOADABLE_KEYS
    }
    fn load(&self, path: &Path) -> Result<ProxyConfig, String> {
        load_proxy(path, self.socks_port)
    }
    fn apply(&self, cfg: &ProxyConfig) -> Result<(), String> {
        self.handle.reconfigure(cfg).map_err(|e| e.to_string())
    }
    fn heartbeat(&self) -> String {
        let circs = self.handle.circuits();
        let streams: usize = circs.iter().map(|c| c.streams).sum();
        let (read, written) = self.handle.traffic();
        format!(
            "{} circuits open carrying {streams} streams, {} built since start; {} read, {} written; {}",
            circs.len(),
            self.handle.circuits_built(),
            bytes(read),
            bytes(written),
            if self.handle.is_ready() {
                "ready"
            } else {
                "still bootstrapping (no verified consensus or no circuit)"
            }
        )
    }
    fn ops(cfg: &ProxyConfig) -> (&str, u64) {
        (&cfg.log_level, cfg.heartbeat_period_secs)
    }
}

impl Role for AuthorityHandle {
    type Config = AuthorityConfig;
    const NAME: &'static str = "authority";
    fn reloadable(&self) -> &'static [&'static str] {
        authority::config::RELOADABLE_KEYS
    }
    fn load(&self, path: &Path) -> Result<AuthorityConfig, String> {
        AuthorityConfig::load(path).map_err(|e| format!("{e:#}"))
    }
    fn apply(&self, cfg: &AuthorityConfig) -> Result<(), String> {
        self.reconfigure(cfg);
        Ok(())
    }
    fn heartbeat(&self) -> String {
        format!(
            "{} relay descriptors held; {}",
            self.descriptor_count(),
            if self.current_consensus().is_some() {
                "serving a consensus"
            } else {
                "no consensus to serve yet"
            }
        )
    }
    fn ops(cfg: &AuthorityConfig) -> (&str, u64) {
        (&cfg.log_level, cfg.heartbeat_period_secs)
    }
}

/// The `log_level` of a role's file, if it reads (for setting up logging before the role
/// starts; errors are reported when the role loads it).
pub fn configured_log_level(role: &str, path: Option<&Path>) -> Option<String> {
    let path = path?;
    match role {
        "relay" => RelayConfig::load(path).ok().map(|c| c.log_level),
        "proxy" => ProxyConfig::load(path).ok().map(|c| c.log_level),
        "authority" => AuthorityConfig::load(path).ok().map(|c| c.log_level),
        _ => None,
    }
}

/// Switch user if `privs` says so (after the listeners are bound).
fn maybe_drop(p: &Privileges, data_dir: &Path) -> Result<(), String> {
    match p {
        Privileges::Keep => Ok(()),
        Privileges::DropTo(u) => privs::drop_to(u, data_dir),
    }
}

/// Run `allium relay -c FILE`.
pub fn run_relay(path: PathBuf) -> CmdResult {
    let started = crate::cmd::process_start();
    let cfg = RelayConfig::load(&path)?;
    if cfg.authorities.is_empty() {
        // As the proxy: without authorities the relay could never publish or learn the network.
        return Err(format!(
            "{}: no authorities configured; add at least one [[authorities]] entry with \
             `identity` and `dir_addr`\n(see relay.example.toml for a documented example \
             configuration)",
            path.display()
        )
        .into());
    }
    let p = privs::decide_for_me(cfg.allow_root, cfg.user.as_deref())?;
    crate::cmd::runtime()?.block_on(async move {
        let signals = super::Signals::new()?;
        let handle = allium_relay::start(cfg.clone()).await?;
        let control = allium_control::start(
            &cfg.control(),
            &cfg.data_dir,
            Some(crate::cmd::relay::absolute(&path)),
            started,
            handle.control_backend(),
        )
        .await?;
        maybe_drop(&p, &cfg.data_dir)?;
        tracing::info!(
            identity = %handle.identity(),
            or_addr = %handle.or_addr(),
            advertised = %handle.advertised_addr(),
            "relay running; stop with Ctrl-C or SIGTERM, reload the configuration with SIGHUP"
        );
        serve(&handle, signals, Some(path), &cfg, control.as_ref()).await?;
        if let Some(c) = control {
            c.stop().await;
        }
        handle.shutdown().await;
        Ok(())
    })
}

/// Run `allium proxy [-c FILE] [--socks-port P]`.
pub fn run_proxy(path: Option<PathBuf>, socks_port: Option<u16>) -> CmdResult {
    let started = crate::cmd::process_start();
    let hint = "(see proxy.example.toml for a documented example configuration)";
    let cfg = match &path {
        Some(p) => load_proxy(p, socks_port).map_err(|e| format!("{e}\n{hint}"))?,
        None => {
            let mut c = ProxyConfig::default();
            if let Some(p) = socks_port {
                c.socks_listen.set_port(p);
            }
            c.validate()
                .map_err(|e| format!("{e}\npass --config FILE {hint}"))?;
            c
        }
    };
    let p = privs::decide_for_me(cfg.allow_root, cfg.user.as_deref())?;
    crate::cmd::runtime()?.block_on(async move {
        let signals = super::Signals::new()?;
        let proxy = allium_client::start(cfg.clone()).await?;
        let control = allium_control::start(
            &cfg.control(),
            &cfg.data_dir,
            path.as_deref().map(crate::cmd::relay::absolute),
            started,
            proxy.control_backend(),
        )
        .await?;
        maybe_drop(&p, &cfg.data_dir)?;
        let role = ProxyRole {
            handle: proxy,
            socks_port,
        };
        let addr = role.handle.socks_addr();
        let ready = async {
            match role.handle.wait_ready(Duration::from_secs(120)).await {
                Ok(()) => tracing::info!(
                    "ready: point applications at socks5h://{addr} (for example: curl --socks5-hostname {addr} https://example.com/)"
                ),
                Err(e) => tracing::warn!("{e}; still trying in the background"),
            }
        };
        let result = {
            let served = serve(&role, signals, path, &cfg, control.as_ref());
            tokio::pin!(served);
            tokio::select! {
                () = ready => served.await,
                r = &mut served => r,
            }
        };
        if let Some(c) = control {
            c.stop().await;
        }
        role.handle.shutdown().await;
        result
    })
}

/// Run `allium authority --config FILE`.
pub fn run_authority(path: PathBuf) -> CmdResult {
    let cfg = AuthorityConfig::load(&path)?;
    allium_proto::metrics::check_address(cfg.metrics_address, cfg.metrics_allow_public)?;
    let p = privs::decide_for_me(cfg.allow_root, cfg.user.as_deref())?;
    crate::cmd::runtime()?.block_on(async move {
        let signals = super::Signals::new()?;
        let h = std::sync::Arc::new(authority::start(cfg.clone()).await?);
        let metrics_task = match cfg.metrics_address {
            Some(addr) => {
                let m = std::sync::Arc::clone(&h);
                let render: allium_proto::metrics::Render = std::sync::Arc::new(move || {
                    crate::cmd::authority::metrics_page(&m, allium_directory::now_unix()).finish()
                });
                Some(
                    allium_proto::metrics::spawn(addr, cfg.metrics_allow_public, render)
                        .await?
                        .1,
                )
            }
            None => None,
        };
        maybe_drop(&p, &cfg.data_dir)?;
        tracing::info!(
            addr = %h.dir_addr(),
            identity = %h.identity(),
            "authority running; stop with Ctrl-C or SIGTERM, reload the configuration with SIGHUP"
        );
        serve(h.as_ref(), signals, Some(path), &cfg, None).await?;
        if let Some(t) = metrics_task {
            t.abort();
            let _ = t.await;
        }
        match std::sync::Arc::try_unwrap(h) {
            Ok(h) => h.shutdown().await,
            Err(_) => tracing::warn!(
                "metrics still held the authority; stopping without a clean shutdown"
            ),
        }
        Ok(())
    })
}
