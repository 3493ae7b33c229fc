//! The proxy's side of the control port: [`allium_control::ControlBackend`] over the circuit
//! manager, the traffic counters and the verified consensus.
//!
//! - Circuits: the manager's pool, each with a control id assigned the first time the control
//!   port sees it (`TIME_CREATED` is that moment: the control port asks once a second while a
//!   controller listens to CIRC events). Paths are `$FP~nick` with nicknames from the consensus.
//! - Traffic: cells read from and written to guard links, 1024 bytes each ([`TRAFFIC`]).
//! - The consensus (`ns/*`, nicknames): the verified copy the proxy keeps in its data directory,
//!   re-read and re-verified when the file changes.
//! - NEWNYM: [`crate::circmgr::CircMgr::newnym`]: no held circuit takes new streams.
//! - Streams are not listed: the proxy does not keep its clients' destinations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allium_control::args::quote;
use allium_control::{
    Bootstrap, CircState, CircuitStatus, ConfOption, ControlBackend, Now, OrConnStatus, Signal,
    StreamStatus, long_name,
};
use allium_crypto::RelayId;
use allium_directory::NetDir;
use allium_directory::client::{ConsensusCache, FetchRole};
use allium_proto::cell::CELL_LEN;
use tokio::sync::watch;

use crate::circmgr::CircMgr;
use crate::config::ProxyConfig;

/// Bytes of cells read from and written to guard links by this process.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) read: AtomicU64,
    pub(crate) written: AtomicU64,
}

impl Traffic {
    /// One cell read from a guard link.
    pub(crate) fn cell_read(&self) {
        self.read.fetch_add(CELL_LEN as u64, Ordering::Relaxed);
    }
    /// One cell written to a guard link.
    pub(crate) fn cell_written(&self) {
        self.written.fetch_add(CELL_LEN as u64, Ordering::Relaxed);
    }
}

/// The process's proxy traffic.
pub(crate) static TRAFFIC: Traffic = Traffic {
    read: AtomicU64::new(0),
    written: AtomicU64::new(0),
};

#[derive(Default)]
struct Ids {
    next: u64,
    /// (guard, circuit id on the guard link) → (control id, first seen).
    circs: HashMap<(RelayId, u32), (u64, SystemTime)>,
    links: HashMap<RelayId, u64>,
}

/// The verified consensus as last read from the data directory.
struct Consensus {
    modified: SystemTime,
    netdir: Arc<NetDir>,
}

/// The proxy's control backend.
pub(crate) struct ProxyControl {
    mgr: Arc<CircMgr>,
    cfg: Arc<ProxyConfig>,
    socks_addr: SocketAddr,
    ready: watch::Receiver<bool>,
    ids: Mutex<Ids>,
    consensus: Mutex<Option<Consensus>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn one(s: impl ToString) -> Vec<String> {
    vec![s.to_string()]
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s}")
    }
}

impl ProxyControl {
    pub(crate) fn new(
        mgr: Arc<CircMgr>,
        cfg: Arc<ProxyConfig>,
        socks_addr: SocketAddr,
        ready: watch::Receiver<bool>,
    ) -> Self {
        Self {
            mgr,
            cfg,
            socks_addr,
            ready,
            ids: Mutex::new(Ids::default()),
            consensus: Mutex::new(None),
        }
    }

    fn cache_path(&self) -> PathBuf {
        self.cfg.data_dir.join(crate::dir::CACHE_FILE)
    }

    /// The verified consensus the proxy holds on disk, if valid at `now`.
    fn netdir(&self, now: &Now) -> Option<Arc<NetDir>> {
        let path = self.cache_path();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        let mut g = self.consensus.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref()
            && c.modified == modified
            && c.netdir.valid_until() > unix(now.wall)
        {
            return Some(Arc::clone(&c.netdir));
        }
        let cache = ConsensusCache::open(
            Some(&path),
            self.cfg.authorities.clone(),
            FetchRole::Client,
            unix(now.wall),
        );
        let nd = Arc::new(cache.netdir(unix(now.wall))?);
        *g = Some(Consensus {
            modified,
            netdir: Arc::clone(&nd),
        });
        Some(nd)
    }

    fn name(&self, nd: Option<&NetDir>, id: &RelayId) -> String {
        let nick = nd.and_then(|n| n.by_id(id)).map(|e| e.nickname.as_str());
        long_name(id, nick)
    }

    fn ns(&self, key: &str, now: &Now) -> Option<Result<String, String>> {
        let rest = key.strip_prefix("ns/")?;
        let Some(nd) = self.netdir(now) else {
            return Some(Err("no verified consensus yet".into()));
        };
        allium_control::ns_lookup(&nd, rest)
    }
}

impl ControlBackend for ProxyControl {
    fn role(&self) -> &'static str {
        "proxy"
    }

    fn getinfo(&self, key: &str, now: &Now) -> Option<Result<String, String>> {
        match key {
            "net/listeners/socks" => Some(Ok(quote(&self.socks_addr.to_string()))),
            "net/listeners/or" | "net/listeners/dir" => Some(Ok(String::new())),
            "fingerprint" => Some(Err("not running as a relay".into())),
            "exit-policy/full" => Some(Ok("reject *:*".into())),
            k if k.starts_with("ns/") => self.ns(k, now),
            _ => None,
        }
    }

    fn info_names(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("net/listeners/socks", "Bound addresses by type: SOCKS."),
            (
                "net/listeners/or",
                "Bound addresses by type: OR port (none at a proxy).",
            ),
            (
                "net/listeners/dir",
                "Bound addresses by type: directory (none at a proxy).",
            ),
            (
                "fingerprint",
                "Fingerprint (an error: a proxy is not a relay).",
            ),
            ("exit-policy/full", "Exit policy (a proxy exits nowhere)."),
            (
                "ns/all",
                "Router status info (v3 directory style) for all relays in the consensus.",
            ),
            (
                "ns/id/*",
                "Router status info (v3 directory style) for a relay by fingerprint.",
            ),
            (
                "ns/name/*",
                "Router status info (v3 directory style) for a relay by nickname.",
            ),
        ]
    }

    fn options(&self) -> Vec<ConfOption> {
        let c = &self.cfg;
        let d = ProxyConfig::default();
        let opt = |name, allium_key, kind, values: Vec<String>, defaults: Vec<String>| ConfOption {
            name,
            allium_key,
            kind,
            values,
            defaults,
        };
        vec![
            opt(
                "SocksPort",
                "socks_listen",
                "LineList",
                one(self.socks_addr),
                one(d.socks_listen),
            ),
            opt(
                "DataDirectory",
                "data_dir",
                "Filename",
                one(c.data_dir.display()),
                one(d.data_dir.display()),
            ),
            opt(
                "CircuitBuildTimeout",
                "circuit_build_timeout",
                "Interval",
                one(secs(c.circuit_build_timeout)),
                one(secs(d.circuit_build_timeout)),
            ),
            opt(
                "MaxCircuitDirtiness",
                "max_circuit_dirtiness",
                "Interval",
                one(secs(c.max_circuit_dirtiness)),
                one(secs(d.max_circuit_dirtiness)),
            ),
            opt(
                "NumPrimaryGuards",
                "primary_guards",
                "Integer",
                one(c.primary_guards),
                one(d.primary_guards),
            ),
            opt(
                "TestingTorNetwork",
                "test_network",
                "Boolean",
                one(u8::from(c.test_network)),
                one(0),
            ),
            opt(
                "PrebuiltCircuits",
                "prebuilt_circuits",
                "Integer",
                one(c.prebuilt_circuits),
                one(d.prebuilt_circuits),
            ),
            opt(
                "MaxSocksConnections",
                "max_socks_connections",
                "Integer",
                one(c.max_socks_connections),
                one(d.max_socks_connections),
            ),
            opt(
                "SocksHandshakeTimeout",
                "socks_handshake_timeout",
                "Interval",
                one(secs(c.socks_handshake_timeout)),
                one(secs(d.socks_handshake_timeout)),
            ),
            opt(
                "ControlPort",
                "control_port",
                "LineList",
                c.control_port.iter().map(ToString::to_string).collect(),
                vec![],
            ),
            opt(
                "ControlSocket",
                "control_socket",
                "LineList",
                c.control_socket
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                vec![],
            ),
            opt(
                "CookieAuthentication",
                "cookie_authentication",
                "Boolean",
                one(u8::from(c.cookie_authentication)),
                one(0),
            ),
            opt(
                "HashedControlPassword",
                "hashed_control_password",
                "LineList",
                c.hashed_control_password.clone(),
                vec![],
            ),
        ]
    }

    fn set_options(&self, changes: &[(&'static str, Vec<String>)]) -> Result<(), String> {
        let options = self.options();
        for (name, values) in changes {
            let Some(o) = options.iter().find(|o| o.name == *name) else {
                return Err(format!("{name} is not an option"));
            };
            let wanted = if values.is_empty() {
                &o.defaults
            } else {
                values
            };
            if *wanted != o.values {
                return Err(format!(
                    "{name} cannot be changed while the proxy runs; edit `{}` in the configuration \
                     file and restart",
                    o.allium_key
                ));
            }
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> Result<(), String> {
        match signal {
            Signal::NewNym => {
                self.mgr.newnym();
                tracing::info!("NEWNYM: new streams will use fresh circuits");
                Ok(())
            }
            Signal::Heartbeat => {
                tracing::info!(
                    "heartbeat: {} circuits held, {} bytes read, {} bytes written, ready: {}",
                    self.mgr.n_circuits(),
                    TRAFFIC.read.load(Ordering::Relaxed),
                    TRAFFIC.written.load(Ordering::Relaxed),
                    *self.ready.borrow()
                );
                Ok(())
            }
            // The proxy keeps no DNS cache (exits resolve), and is never dormant.
            Signal::ClearDnsCache | Signal::Active | Signal::Dormant => Ok(()),
            other => Err(format!(
                "signal {} is handled by the control driver",
                other.name()
            )),
        }
    }

    fn traffic(&self) -> (u64, u64) {
        (
            TRAFFIC.read.load(Ordering::Relaxed),
            TRAFFIC.written.load(Ordering::Relaxed),
        )
    }

    fn circuits(&self, now: &Now) -> Vec<CircuitStatus> {
        let circs = self.mgr.control_circuits();
        let nd = self.netdir(now);
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let ids = &mut *ids;
        ids.circs
            .retain(|k, _| circs.iter().any(|c| (c.hops[0], c.circ_id) == *k));
        circs
            .iter()
            .map(|c| {
                let (id, created) = *ids.circs.entry((c.hops[0], c.circ_id)).or_insert_with(|| {
                    ids.next += 1;
                    (ids.next, now.wall)
                });
                CircuitStatus {
                    id,
                    state: CircState::Built,
                    path: c.hops.iter().map(|h| self.name(nd.as_deref(), h)).collect(),
                    build_flags: vec!["NEED_CAPACITY"],
                    purpose: "GENERAL",
                    created,
                }
            })
            .collect()
    }

    fn streams(&self, _now: &Now) -> Vec<StreamStatus> {
        Vec::new()
    }

    fn orconns(&self, now: &Now) -> Vec<OrConnStatus> {
        let circs = self.mgr.control_circuits();
        let nd = self.netdir(now);
        let mut guards: Vec<(RelayId, u64)> = Vec::new();
        for c in &circs {
            match guards.iter_mut().find(|(g, _)| *g == c.hops[0]) {
                Some(e) => e.1 += 1,
                None => guards.push((c.hops[0], 1)),
            }
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let ids = &mut *ids;
        ids.links.retain(|g, _| guards.iter().any(|(x, _)| x == g));
        guards
            .into_iter()
            .map(|(g, n)| {
                let id = *ids.links.entry(g).or_insert_with(|| {
                    ids.next += 1;
                    ids.next
                });
                OrConnStatus {
                    id,
                    peer: self.name(nd.as_deref(), &g),
                    n_circs: Some(n),
                }
            })
            .collect()
    }

    fn bootstrap(&self) -> Bootstrap {
        if *self.ready.borrow() {
            Bootstrap {
                progress: 100,
                tag: "done",
                summary: "Done",
            }
        } else if self.mgr.has_dir() {
            Bootstrap {
                progress: 90,
                tag: "circuit_create",
                summary: "Establishing a Tor circuit",
            }
        } else {
            Bootstrap {
                progress: 20,
                tag: "requesting_status",
                summary: "Asking for networkstatus consensus",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_names() {
        assert_eq!(secs(Duration::from_secs(600)), "600");
        assert_eq!(secs(Duration::from_millis(2500)), "2.5");
        assert_eq!(allium_control::fingerprint(&RelayId([1; 32])).len(), 40);
    }
}
