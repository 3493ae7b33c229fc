//! The relay's side of the control port: [`allium_control::ControlBackend`] over the shared relay
//! state (traffic counters, links to relays, the consensus, the configuration).
//!
//! A relay originates no circuits, so `circuit-status` is empty (as at a Tor relay); the circuits
//! through it are counted in `allium/circuits/open` and `allium/circuits/total`. Options cannot be
//! changed while the relay runs: SETCONF accepts only the current value, anything else is 553 and
//! names the way (edit the file, SIGNAL RELOAD).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use allium_control::args::quote;
use allium_control::{
    Bootstrap, CircuitStatus, ConfOption, ControlBackend, Now, OrConnStatus, Signal, StreamStatus,
    fingerprint, long_name,
};
use allium_crypto::RelayId;

use crate::ctx::Ctx;
use crate::policy::ExitPolicy;

/// The relay's control backend.
pub(crate) struct RelayControl {
    ctx: Arc<Ctx>,
    or_addr: SocketAddr,
    /// Control ids of links to relays, by peer, assigned on first sight.
    conn_ids: Mutex<(u64, HashMap<RelayId, u64>)>,
}

impl RelayControl {
    pub(crate) fn new(ctx: Arc<Ctx>, or_addr: SocketAddr) -> Self {
        Self {
            ctx,
            or_addr,
            conn_ids: Mutex::new((0, HashMap::new())),
        }
    }

    fn nickname_of(&self, id: &RelayId) -> Option<String> {
        if *id == self.ctx.keys.id {
            return Some(self.ctx.cfg.nickname.clone());
        }
        self.ctx
            .netdir()
            .and_then(|nd| nd.by_id(id).map(|e| e.nickname.clone()))
    }

    fn ns(&self, key: &str) -> Option<Result<String, String>> {
        let rest = key.strip_prefix("ns/")?;
        let Some(nd) = self.ctx.netdir() else {
            return Some(Err("no consensus yet".into()));
        };
        allium_control::ns_lookup(&nd, rest)
    }
}

/// The exit policy in Tor's syntax, one rule per line.
pub(crate) fn tor_exit_policy(p: &ExitPolicy) -> Vec<String> {
    let mut v = Vec::new();
    if !p.allow_private && p.is_exit() {
        v.push("reject private:*".to_owned());
    }
    if !p.rules.is_empty() {
        // Address rules: the whole policy, in order, as the exit applies it.
        v.extend(p.full_rules().iter().map(ToString::to_string));
        v.push("reject *:*".to_owned());
        return v;
    }
    for (lo, hi) in p.port_ranges() {
        if lo == hi {
            v.push(format!("accept *:{lo}"));
        } else if (lo, hi) == (1, u16::MAX) {
            v.push("accept *:*".to_owned());
        } else {
            v.push(format!("accept *:{lo}-{hi}"));
        }
    }
    if v.last().map(String::as_str) != Some("accept *:*") {
        v.push("reject *:*".to_owned());
    }
    v
}

fn one(s: impl ToString) -> Vec<String> {
    vec![s.to_string()]
}

impl ControlBackend for RelayControl {
    fn role(&self) -> &'static str {
        "relay"
    }

    fn getinfo(&self, key: &str, _now: &Now) -> Option<Result<String, String>> {
        let ok = |s: String| Some(Ok(s));
        match key {
            "fingerprint" => ok(fingerprint(&self.ctx.keys.id)),
            "allium/identity" => ok(hex::encode_upper(self.ctx.keys.id.0)),
            "address" => ok(self.ctx.advertised.ip().to_string()),
            "net/listeners/or" => ok(quote(&self.or_addr.to_string())),
            "net/listeners/socks" | "net/listeners/dir" => ok(String::new()),
            "exit-policy/full" => ok(tor_exit_policy(&self.ctx.cfg.exit_policy).join("\n")),
            "allium/circuits/open" => ok(self.ctx.stats.open_circuits().to_string()),
            "allium/circuits/total" => ok(self.ctx.stats.total_circuits().to_string()),
            "allium/consensus/valid-after" => match self.ctx.netdir() {
                Some(nd) => ok(allium_control::backend::iso_time(
                    UNIX_EPOCH + Duration::from_secs(nd.valid_after()),
                )),
                None => Some(Err("no consensus yet".into())),
            },
            k if k.starts_with("ns/") => self.ns(k),
            _ => None,
        }
    }

    fn info_names(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "fingerprint",
                "Fingerprint: the first 20 bytes of the relay's identity, in hex.",
            ),
            (
                "allium/identity",
                "The relay's whole Ed25519 identity (64 hex digits).",
            ),
            ("address", "IP address of this relay (the advertised one)."),
            ("net/listeners/or", "Bound addresses by type: OR port."),
            (
                "net/listeners/socks",
                "Bound addresses by type: SOCKS (none at a relay).",
            ),
            (
                "net/listeners/dir",
                "Bound addresses by type: directory (none at a relay).",
            ),
            (
                "exit-policy/full",
                "The relay's exit policy in Tor's syntax.",
            ),
            ("allium/circuits/open", "Circuits open through this relay."),
            (
                "allium/circuits/total",
                "Circuits created through this relay since start.",
            ),
            (
                "allium/consensus/valid-after",
                "When the current consensus became valid.",
            ),
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
        // The configuration as last reloaded (SIGHUP or SETCONF), so GETCONF shows what runs.
        let live = self.ctx.live();
        let c = &*live;
        let d = crate::RelayConfig::for_test("x", "");
        let opt = |name, allium_key, kind, values: Vec<String>, defaults: Vec<String>| ConfOption {
            name,
            allium_key,
            kind,
            values,
            defaults,
        };
        let ctl = c.control();
        vec![
            opt("Nickname", "nickname", "String", one(&c.nickname), vec![]),
            opt("ContactInfo", "contact", "String", one(&c.contact), one("")),
            opt("ORPort", "listen", "LineList", one(self.or_addr), vec![]),
            opt(
                "Address",
                "advertised",
                "String",
                one(self.ctx.advertised),
                vec![],
            ),
            opt(
                "DataDirectory",
                "data_dir",
                "Filename",
                one(c.data_dir.display()),
                vec![],
            ),
            opt(
                "ExitPolicy",
                "exit_policy",
                "LineList",
                one(tor_exit_policy(&c.exit_policy).join(",")),
                one(tor_exit_policy(&d.exit_policy).join(",")),
            ),
            opt(
                "ExitRelay",
                "exit_policy",
                "Boolean",
                one(u8::from(c.exit_policy.is_exit())),
                one(0),
            ),
            opt(
                "BandwidthRate",
                "bandwidth_rate",
                "DataSize",
                one(c.bandwidth_rate),
                one(0),
            ),
            opt(
                "BandwidthBurst",
                "bandwidth_burst",
                "DataSize",
                one(c.effective_burst()),
                one(d.effective_burst()),
            ),
            // Tor's limit for relayed traffic only; 0 (unset) means BandwidthRate applies, which
            // is always so here: every byte a relay moves is relayed.
            opt(
                "RelayBandwidthRate",
                "(bandwidth_rate applies)",
                "DataSize",
                one(0),
                one(0),
            ),
            opt(
                "RelayBandwidthBurst",
                "(bandwidth_burst applies)",
                "DataSize",
                one(0),
                one(0),
            ),
            // Allium relays serve no directory: Tor's DirPort 0.
            opt("DirPort", "(no directory port)", "LineList", one(0), one(0)),
            opt("MyFamily", "family", "LineList", c.family.clone(), vec![]),
            opt(
                "Log",
                "log_level",
                "LineList",
                one(allium_control::backend::tor_log_line(&c.log_level)),
                one("notice stderr"),
            ),
            opt(
                "ControlPort",
                "control_port",
                "LineList",
                ctl.control_port.iter().map(ToString::to_string).collect(),
                vec![],
            ),
            opt(
                "ControlSocket",
                "control_socket",
                "LineList",
                ctl.control_socket
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                vec![],
            ),
            opt(
                "CookieAuthentication",
                "cookie_authentication",
                "Boolean",
                one(u8::from(ctl.cookie_authentication)),
                one(0),
            ),
            opt(
                "HashedControlPassword",
                "hashed_control_password",
                "LineList",
                ctl.hashed_control_password.clone(),
                vec![],
            ),
            opt(
                "DescriptorPublishInterval",
                "descriptor_publish_interval_secs",
                "Interval",
                one(c.descriptor_publish_interval_secs),
                one(d.descriptor_publish_interval_secs),
            ),
            opt(
                "MaxLinks",
                "max_links",
                "Integer",
                one(c.max_links),
                one(d.max_links),
            ),
            opt(
                "MaxCircuitsPerLink",
                "max_circuits_per_link",
                "Integer",
                one(c.max_circuits_per_link),
                one(d.max_circuits_per_link),
            ),
            opt(
                "MaxStreamsPerCircuit",
                "max_streams_per_circuit",
                "Integer",
                one(c.max_streams_per_circuit),
                one(d.max_streams_per_circuit),
            ),
            opt(
                "MaxExitStreams",
                "max_exit_streams",
                "Integer",
                one(c.max_exit_streams),
                one(d.max_exit_streams),
            ),
            opt(
                "CircuitStallTimeout",
                "circuit_stall_timeout_secs",
                "Interval",
                one(c.circuit_stall_timeout_secs),
                one(d.circuit_stall_timeout_secs),
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
                if o.allium_key.starts_with('(') {
                    return Err(format!("{name} is fixed in Allium {}", o.allium_key));
                }
                return Err(format!(
                    "{name} cannot be changed while the relay runs; edit `{}` in the configuration \
                     file and send SIGNAL RELOAD",
                    o.allium_key
                ));
            }
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> Result<(), String> {
        match signal {
            Signal::Heartbeat => {
                let s = &self.ctx.stats;
                tracing::info!(
                    "heartbeat: {} circuits open ({} since start), {} bytes read, {} bytes written, consensus: {}",
                    s.open_circuits(),
                    s.total_circuits(),
                    s.bytes_read(),
                    s.bytes_written(),
                    if self.ctx.netdir().is_some() {
                        "yes"
                    } else {
                        "not yet"
                    },
                );
                Ok(())
            }
            // A relay originates no client circuits and keeps no DNS cache (its resolver asks
            // the system each time): nothing to renew or clear.
            Signal::NewNym | Signal::ClearDnsCache | Signal::Active | Signal::Dormant => Ok(()),
            other => Err(format!(
                "signal {} is handled by the control driver",
                other.name()
            )),
        }
    }

    fn traffic(&self) -> (u64, u64) {
        (self.ctx.link_bytes.read(), self.ctx.link_bytes.written())
    }

    fn circuits(&self, _now: &Now) -> Vec<CircuitStatus> {
        Vec::new()
    }

    fn streams(&self, _now: &Now) -> Vec<StreamStatus> {
        Vec::new()
    }

    fn orconns(&self, _now: &Now) -> Vec<OrConnStatus> {
        let peers = self.ctx.links.open_peers();
        let mut ids = self.conn_ids.lock().unwrap_or_else(|p| p.into_inner());
        let (next, map) = &mut *ids;
        map.retain(|id, _| peers.iter().any(|(p, _)| p == id));
        peers
            .into_iter()
            .map(|(id, n)| {
                let cid = *map.entry(id).or_insert_with(|| {
                    *next += 1;
                    *next
                });
                OrConnStatus {
                    id: cid,
                    peer: long_name(&id, self.nickname_of(&id).as_deref()),
                    n_circs: Some(n),
                }
            })
            .collect()
    }

    fn bootstrap(&self) -> Bootstrap {
        if self.ctx.netdir().is_some() {
            Bootstrap {
                progress: 100,
                tag: "done",
                summary: "Done",
            }
        } else {
            Bootstrap {
                progress: 25,
                tag: "loading_status",
                summary: "Loading networkstatus consensus",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // test code: the time for the backend's snapshots

    use std::time::{Instant, SystemTime};

    use super::*;

    #[tokio::test]
    async fn backend_answers_from_relay_state() {
        let dir = tempfile::tempdir().unwrap();
        let relay = crate::start(crate::RelayConfig::for_test("CtlTest", dir.path()))
            .await
            .unwrap();
        let b = relay.control_backend();
        let now = Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        };
        let info = |k: &str| b.getinfo(k, &now);
        assert_eq!(
            info("fingerprint").unwrap().unwrap(),
            fingerprint(&relay.identity())
        );
        assert_eq!(
            info("allium/identity").unwrap().unwrap(),
            hex::encode_upper(relay.identity().0)
        );
        assert_eq!(
            info("net/listeners/or").unwrap().unwrap(),
            format!("\"{}\"", relay.or_addr())
        );
        assert_eq!(info("address").unwrap().unwrap(), "127.0.0.1");
        assert_eq!(info("exit-policy/full").unwrap().unwrap(), "reject *:*");
        assert!(info("ns/all").unwrap().is_err(), "no consensus yet");
        assert!(info("no/such/key").is_none());
        let opts = b.options();
        let nick = opts.iter().find(|o| o.name == "Nickname").unwrap();
        assert_eq!(nick.values, vec!["CtlTest"]);
        let log = opts.iter().find(|o| o.name == "Log").unwrap();
        assert_eq!(log.values, vec!["notice stderr"]);
        assert!(
            b.set_options(&[("Nickname", vec!["CtlTest".into()])])
                .is_ok()
        );
        let e = b
            .set_options(&[("Nickname", vec!["Other".into()])])
            .unwrap_err();
        assert!(e.contains("`nickname`"), "{e}");
        assert!(
            b.set_options(&[("BandwidthRate", vec![])]).is_ok(),
            "already the default"
        );
        assert_eq!(b.bootstrap().tag, "loading_status");
        assert!(b.circuits(&now).is_empty() && b.orconns(&now).is_empty());
        assert!(b.signal(Signal::NewNym).is_ok() && b.signal(Signal::Heartbeat).is_ok());
        assert_eq!(b.traffic(), (0, 0));
        // GETCONF shows the configuration in force after a live change (SETCONF or SIGHUP).
        let mut changed = (*relay.config()).clone();
        changed.bandwidth_rate = 5_000_000;
        relay.reconfigure(&changed).unwrap();
        let rate = b
            .options()
            .into_iter()
            .find(|o| o.name == "BandwidthRate")
            .unwrap();
        assert_eq!(rate.values, vec!["5000000"]);
        relay.shutdown().await;
    }

    #[test]
    fn exit_policy_in_tor_syntax() {
        assert_eq!(tor_exit_policy(&ExitPolicy::default()), vec!["reject *:*"]);
        assert_eq!(
            tor_exit_policy(&ExitPolicy::accept_all(true)),
            vec!["accept *:*"]
        );
        let p = ExitPolicy {
            accept: vec!["443".into(), "80".into(), "6660-6669".into()],
            allow_private: false,
            ..ExitPolicy::default()
        };
        assert_eq!(
            tor_exit_policy(&p),
            vec![
                "reject private:*",
                "accept *:80",
                "accept *:443",
                "accept *:6660-6669",
                "reject *:*"
            ]
        );
        let r = ExitPolicy {
            rules: vec!["reject 1.2.3.0/24:*".into()],
            accept: vec!["80".into()],
            ..ExitPolicy::default()
        };
        assert_eq!(
            tor_exit_policy(&r),
            vec![
                "reject private:*",
                "reject 1.2.3.0/24:*",
                "accept *:80",
                "reject *:*"
            ]
        );
    }
}
