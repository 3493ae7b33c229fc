//! The bandwidth scanner (`allium bwscan`), run by an authority operator beside the authority,
//! as Tor's sbws: on a schedule it measures every relay of the consensus by downloading an
//! object of a known size from a configured HTTP destination through a **two-hop circuit**
//! (the relay under test plus a fast helper: the relay first and a helper exit, or, for an exit,
//! a helper first and the relay as exit), and writes a bandwidth file
//! (`allium_directory::doc::bwfile`, docs/protocol/80-directory.md "Bandwidth file") that the
//! authority's `bandwidth_file` points at.
//!
//! The measurement is ordinary client traffic: a fresh client link (no static key), CREATE2 with
//! the ntor-v3 handshake, EXTEND2, BEGIN to the destination, DATA and SENDMEs, built by the same
//! code the proxy uses (`circ.rs`, `reactor.rs`). Nothing in it marks the scanner.
//!
//! Pure parts (pair choice, rate arithmetic, medians, the file) are separate functions tested
//! without a network; [`run`] and [`measure_once`] are the tokio driver.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::RelayId;
use allium_directory::NetDir;
use allium_directory::client::{AuthorityInfo, fetch_consensus};
use allium_directory::doc::bwfile::{BandwidthFile, BwLine};
use allium_proto::relaymsg::EndReason;
use serde::Deserialize;
use tokio::sync::watch;

use crate::circ::{self, StreamEvent};
use crate::core::CircParams;
use crate::err::ClientError;
use crate::link::Link;
use crate::path::{RelayInfo, compatible};
use crate::socks::wire::Target;

/// Failed samples retried (each with another helper) per relay and scan.
const MAX_EXTRA_ATTEMPTS: usize = 3;
/// Largest response header accepted from the destination.
const MAX_HEADER: usize = 8 * 1024;

fn default_object_path() -> String {
    "/bytes/{size}".to_owned()
}
fn default_object_size() -> u64 {
    4 * 1024 * 1024
}
fn default_interval() -> u64 {
    3600
}
fn default_samples() -> usize {
    3
}
fn default_timeout() -> u64 {
    60
}
fn default_log_level() -> String {
    "info".to_owned()
}

/// The scanner's configuration (TOML; `bwscan.example.toml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BwScanConfig {
    /// The network's authorities (as in relay and proxy configurations).
    pub authorities: Vec<AuthorityInfo>,
    /// Where the bandwidth file is written (the authority's `bandwidth_file`).
    pub output: PathBuf,
    /// The HTTP destination: host name or IP literal.
    pub destination_host: String,
    /// Its port.
    pub destination_port: u16,
    /// Request path; `{size}` is replaced by the object size in bytes.
    #[serde(default = "default_object_path")]
    pub object_path: String,
    /// Bytes downloaded per sample (default 4 MiB; test networks use a few hundred KiB).
    #[serde(default = "default_object_size")]
    pub object_size: u64,
    /// Seconds between the starts of two scans (default 3600).
    #[serde(default = "default_interval")]
    pub scan_interval_secs: u64,
    /// Downloads per relay per scan; the median counts (default 3).
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Longest time for one sample: circuit, stream and download (default 60 s).
    #[serde(default = "default_timeout")]
    pub sample_timeout_secs: u64,
    /// Preferred helper relays (identities, hex): the fast known relays paired with the relays
    /// under test. Default: the highest-weight suitable relays of the consensus.
    #[serde(default)]
    pub helpers: Vec<String>,
    /// Test networks: relays on one address may share a circuit when the consensus turns
    /// `enforce_distinct_subnets` off (as the proxy's `test_network`).
    #[serde(default)]
    pub test_network: bool,
    /// Log filter for the `allium bwscan` binary.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Local IP that the scanner's connections (to the authorities and to the relays it
    /// measures) bind to, as the proxy's `outbound_bind_address`. Default: none (the system's
    /// choice). `allium testnet` gives the scanner its own loopback address, so relays do not
    /// count its circuits against the proxy's.
    #[serde(default)]
    pub outbound_bind_address: Option<std::net::IpAddr>,
}

impl BwScanConfig {
    /// Defaults for everything but the essentials.
    pub fn new(authorities: Vec<AuthorityInfo>, output: PathBuf, destination: SocketAddr) -> Self {
        Self {
            authorities,
            output,
            destination_host: destination.ip().to_string(),
            destination_port: destination.port(),
            object_path: default_object_path(),
            object_size: default_object_size(),
            scan_interval_secs: default_interval(),
            samples: default_samples(),
            sample_timeout_secs: default_timeout(),
            helpers: Vec::new(),
            test_network: false,
            log_level: default_log_level(),
            outbound_bind_address: None,
        }
    }

    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ClientError> {
        let c: Self = toml::from_str(text)
            .map_err(|e| ClientError::Config(format!("bandwidth scanner configuration: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ClientError::file(path, "reading", e))?;
        Self::from_toml(&text)
    }

    /// Check the values.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |m: &str| Err(ClientError::Config(m.to_owned()));
        if self.authorities.is_empty() {
            return bad("list the network's [[authorities]]");
        }
        if self.destination_port == 0 || self.destination_host.is_empty() {
            return bad(
                "destination_host and destination_port name the HTTP server to download from",
            );
        }
        if !self.object_path.starts_with('/') || !self.object_path.contains("{size}") {
            return bad("object_path must start with / and contain {size}");
        }
        if self.object_size < 1024 || self.object_size > 1 << 30 {
            return bad("object_size must be between 1 KiB and 1 GiB");
        }
        if self.samples == 0 || self.samples > 16 {
            return bad("samples must be between 1 and 16");
        }
        if self.scan_interval_secs == 0 || self.sample_timeout_secs == 0 {
            return bad("scan_interval_secs and sample_timeout_secs must be positive");
        }
        self.helper_ids()?;
        Ok(())
    }

    fn helper_ids(&self) -> Result<Vec<RelayId>, ClientError> {
        self.helpers
            .iter()
            .map(|h| {
                RelayId::from_hex(h).map_err(|e| ClientError::Config(format!("helpers: {h}: {e}")))
            })
            .collect()
    }

    fn target(&self) -> Target {
        match self.destination_host.parse::<IpAddr>() {
            Ok(ip) => Target::Ip(SocketAddr::new(ip, self.destination_port)),
            Err(_) => Target::Host(self.destination_host.clone(), self.destination_port),
        }
    }

    /// The HTTP request of one sample.
    pub fn request(&self) -> String {
        let path = self
            .object_path
            .replace("{size}", &self.object_size.to_string());
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.destination_host
        )
    }
}

/// The two hops of a measurement circuit, first hop first.
pub type Pair = [RelayInfo; 2];

/// Choose the circuit that measures `target`: an exit (that allows the destination port) is
/// measured in the exit position behind a non-exit helper when one exists; any other relay in
/// the first position before an exit helper. Helpers are the configured ones first, then the
/// fastest measured so far (`known`, kB/s), then by consensus weight (highest first, ties by
/// identity); never the target or a relay in `exclude` (helpers that failed), always
/// compatible with the target.
pub fn pick_pair(
    relays: &[RelayInfo],
    target: &RelayInfo,
    port: u16,
    helpers: &[RelayId],
    known: &BTreeMap<RelayId, u32>,
    exclude: &[RelayId],
    relaxed: bool,
) -> Option<Pair> {
    let rank = |r: &RelayInfo| {
        let preferred = helpers
            .iter()
            .position(|h| *h == r.id)
            .unwrap_or(usize::MAX);
        let speed = known.get(&r.id).copied().unwrap_or(0);
        (
            preferred,
            std::cmp::Reverse(speed),
            std::cmp::Reverse(r.weight),
            r.id,
        )
    };
    let mut cands: Vec<&RelayInfo> = relays
        .iter()
        .filter(|r| r.usable() && !exclude.contains(&r.id) && compatible(r, target, relaxed))
        .collect();
    cands.sort_by_key(|r| rank(r));
    let target_exits = target.is_exit_for(&[port]);
    if target_exits {
        // Prefer a non-exit first hop (it keeps exits' capacity for exiting), else any.
        let first = cands
            .iter()
            .find(|r| !r.is_exit_for(&[]))
            .or_else(|| cands.first())?;
        return Some([(*first).clone(), target.clone()]);
    }
    let exit = cands.iter().find(|r| r.is_exit_for(&[port]))?;
    Some([target.clone(), (*exit).clone()])
}

/// Kilobytes (1000 bytes) per second for `bytes` in `elapsed`, at least 1.
pub fn kbps(bytes: u64, elapsed: Duration) -> u32 {
    let ms = elapsed.as_millis().max(1);
    let v = u128::from(bytes) / ms; // bytes per ms = kB/s
    u32::try_from(v).unwrap_or(u32::MAX).max(1)
}

/// The low median of the samples.
pub fn median(samples: &mut [u32]) -> Option<u32> {
    samples.sort_unstable();
    samples.get(samples.len().checked_sub(1)? / 2).copied()
}

/// One relay's latest result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// Median of the samples, kB/s.
    pub kbps: u32,
    /// When (Unix seconds).
    pub at: u64,
    /// Nickname.
    pub nick: String,
}

/// The bandwidth file for `results` at `now`.
pub fn bandwidth_file(results: &BTreeMap<RelayId, Measurement>, now: u64) -> BandwidthFile {
    let mut f = BandwidthFile {
        timestamp: now,
        ..BandwidthFile::default()
    };
    f.header.insert("software".into(), "allium-bwscan".into());
    f.header.insert(
        "software_version".into(),
        env!("CARGO_PKG_VERSION").to_owned(),
    );
    for (id, m) in results {
        f.relays.insert(
            *id,
            BwLine {
                bw: m.kbps,
                measured_at: m.at,
                nick: Some(m.nick.clone()),
            },
        );
    }
    f
}

/// Write `text` to `path` atomically (a temporary file renamed over it).
pub fn write_atomic(path: &Path, text: &str) -> Result<(), ClientError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| ClientError::file(&tmp, "writing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| ClientError::file(path, "writing", e))
}

/// Where the body starts in a response prefix, once the header is complete and says 200.
fn body_start(buf: &[u8]) -> Result<Option<usize>, ClientError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEADER {
            return Err(ClientError::Directory(
                "the measurement destination sent an oversized HTTP header".into(),
            ));
        }
        return Ok(None);
    };
    if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
        return Err(ClientError::Directory(
            "the measurement destination did not answer 200 OK; check object_path".into(),
        ));
    }
    Ok(Some(end + 4))
}

/// One sample: build the two-hop circuit, download the object, return its kB/s. The timer
/// runs from the request to the last byte (circuit and stream setup excluded).
#[allow(clippy::disallowed_methods)] // the measurement driver reads the clock to time downloads
pub async fn measure_once(cfg: &BwScanConfig, pair: &Pair) -> Result<u32, ClientError> {
    let [first, _] = pair;
    let timeout = Duration::from_secs(cfg.sample_timeout_secs);
    let link = Link::connect(first, timeout).await?;
    let params = CircParams {
        build_timeout: timeout,
        stream_timeout: timeout,
        max_streams: 1,
    };
    let result = async {
        let circ = circ::build_hops(Arc::clone(&link), pair, params).await?;
        let (sid, mut rx) = crate::stream::connect(&circ, &cfg.target()).await?;
        let stream =
            crate::core::StreamId::new(sid).ok_or(ClientError::NoPath("stream id zero"))?;
        let start = tokio::time::Instant::now();
        circ.send_data(stream, cfg.request().into_bytes()).await?;
        let mut header: Vec<u8> = Vec::new();
        let mut body: u64 = 0;
        let mut in_body = false;
        loop {
            let Some(ev) = rx.recv().await else {
                return Err(ClientError::Circuit(crate::err::CircError::Closed));
            };
            match ev {
                StreamEvent::Data(d) => {
                    let bytes = d.bytes();
                    if in_body {
                        body += bytes.len() as u64;
                    } else {
                        header.extend_from_slice(bytes);
                        if let Some(at) = body_start(&header)? {
                            in_body = true;
                            body = (header.len() - at) as u64;
                            header = Vec::new();
                        }
                    }
                    circ.consumed(stream, 1).await?;
                }
                StreamEvent::End(r) => {
                    r.map_err(ClientError::Stream)?;
                    break;
                }
                StreamEvent::Connected | StreamEvent::Resolved(_) => {}
            }
            if body >= cfg.object_size {
                break;
            }
        }
        let elapsed = start.elapsed();
        circ.end_stream(sid, EndReason::DONE).await;
        if body < cfg.object_size {
            return Err(ClientError::Directory(format!(
                "the measurement download ended after {body} of {} bytes",
                cfg.object_size
            )));
        }
        Ok(kbps(body, elapsed))
    };
    let r = tokio::time::timeout(timeout, result)
        .await
        .map_err(|_| ClientError::Timeout("a bandwidth measurement"))
        .and_then(|r| r);
    link.close();
    r
}

/// Measure every usable relay of `nd` once (`cfg.samples` downloads each, median), updating
/// `results` and rewriting the bandwidth file after each relay. Non-exits go first (paired with
/// exit helpers), then exits (paired with the fastest non-exits measured so far). Relays that
/// fail keep their previous result (it ages out at the authority).
pub async fn scan(
    cfg: &BwScanConfig,
    nd: &NetDir,
    results: &mut BTreeMap<RelayId, Measurement>,
    shutdown: &watch::Receiver<bool>,
) -> Result<usize, ClientError> {
    let view = crate::dir::view_from(nd);
    let helpers = cfg.helper_ids()?;
    let mut measured = 0usize;
    let port = cfg.destination_port;
    let mut order: Vec<&RelayInfo> = view.relays.iter().filter(|r| r.usable()).collect();
    order.sort_by_key(|r| r.is_exit_for(&[port]));
    for target in order {
        if *shutdown.borrow() {
            break;
        }
        let known: BTreeMap<RelayId, u32> = results.iter().map(|(k, m)| (*k, m.kbps)).collect();
        // A failed sample may be the helper's fault: the next try uses another helper.
        let mut exclude: Vec<RelayId> = Vec::new();
        let mut samples = Vec::new();
        let mut attempts = 0;
        while samples.len() < cfg.samples && attempts < cfg.samples + MAX_EXTRA_ATTEMPTS {
            attempts += 1;
            let Some(pair) = pick_pair(
                &view.relays,
                target,
                port,
                &helpers,
                &known,
                &exclude,
                view.relaxed(cfg.test_network),
            ) else {
                tracing::info!(relay = %target.id, "no helper relay to pair with");
                break;
            };
            match measure_once(cfg, &pair).await {
                Ok(k) => samples.push(k),
                Err(e) => {
                    tracing::debug!(relay = %target.id, error = %e, "sample failed");
                    exclude.extend(pair.iter().map(|r| r.id).filter(|id| *id != target.id));
                }
            }
        }
        let Some(k) = median(&mut samples) else {
            tracing::info!(relay = %target.id, "every sample failed; not measured this scan");
            continue;
        };
        let nick = nd
            .by_id(&target.id)
            .map(|e| e.nickname.clone())
            .unwrap_or_default();
        let now = allium_directory::now_unix();
        results.insert(
            target.id,
            Measurement {
                kbps: k,
                at: now,
                nick,
            },
        );
        measured += 1;
        write_atomic(&cfg.output, &bandwidth_file(results, now).to_text())?;
        tracing::debug!(relay = %target.id, kbps = k, "measured");
    }
    Ok(measured)
}

/// Run scans on the schedule until `shutdown` turns true. `scans` (if given) counts completed
/// scans (tests and `allium testnet` wait on it).
pub async fn run(
    cfg: BwScanConfig,
    shutdown: watch::Receiver<bool>,
    scans: Option<watch::Sender<u64>>,
) -> Result<(), ClientError> {
    cfg.validate()?;
    let bind = cfg.outbound_bind_address;
    allium_directory::client::http::with_outbound_bind(bind, run_scans(cfg, shutdown, scans)).await
}

/// [`run`]'s loop, inside the outbound bind address's scope.
#[allow(clippy::disallowed_methods)] // the scan driver sleeps between scans
async fn run_scans(
    cfg: BwScanConfig,
    mut shutdown: watch::Receiver<bool>,
    scans: Option<watch::Sender<u64>>,
) -> Result<(), ClientError> {
    let mut results = BTreeMap::new();
    let mut done = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let now = allium_directory::now_unix();
        match fetch_consensus(&cfg.authorities, now).await {
            Ok(v) => {
                let nd = NetDir::new(v);
                match scan(&cfg, &nd, &mut results, &shutdown).await {
                    Ok(n) => {
                        done += 1;
                        tracing::info!(measured = n, "bandwidth scan done");
                        if let Some(s) = &scans {
                            let _ = s.send(done);
                        }
                    }
                    Err(e) => tracing::warn!("bandwidth scan failed: {e}"),
                }
            }
            Err(e) => tracing::info!("no consensus to scan yet ({e}); retrying"),
        }
        let next = if done == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(cfg.scan_interval_secs)
        };
        tokio::select! {
            () = tokio::time::sleep_until(started + next) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::path::tests::relay;

    #[test]
    fn pairs_put_the_target_in_the_right_position() {
        let none = BTreeMap::new();
        // 1, 2: exits; 3, 4, 5: non-exits. Weights: 2 > 1, 5 > 4 > 3.
        let relays = vec![
            relay(1, [10, 1, 0, 1], false, true, 100),
            relay(2, [10, 2, 0, 1], false, true, 900),
            relay(3, [10, 3, 0, 1], true, false, 10),
            relay(4, [10, 4, 0, 1], true, false, 20),
            relay(5, [10, 5, 0, 1], true, false, 30),
        ];
        // A non-exit is measured first, with the heaviest exit.
        let p = pick_pair(&relays, &relays[2], 80, &[], &none, &[], false).unwrap();
        assert_eq!((p[0].id, p[1].id), (relays[2].id, relays[1].id));
        // The heaviest exit is measured as exit, behind the heaviest non-exit.
        let p = pick_pair(&relays, &relays[1], 80, &[], &none, &[], false).unwrap();
        assert_eq!((p[0].id, p[1].id), (relays[4].id, relays[1].id));
        // A helper measured fast beats consensus weight.
        let known = BTreeMap::from([(relays[2].id, 5000), (relays[4].id, 100)]);
        let p = pick_pair(&relays, &relays[1], 80, &[], &known, &[], false).unwrap();
        assert_eq!(p[0].id, relays[2].id);
        // Failed helpers are skipped.
        let p = pick_pair(&relays, &relays[2], 80, &[], &none, &[relays[1].id], false).unwrap();
        assert_eq!(p[1].id, relays[0].id);
        // Configured helpers come first.
        let p = pick_pair(&relays, &relays[3], 80, &[relays[0].id], &none, &[], false).unwrap();
        assert_eq!(p[1].id, relays[0].id);
        // An exit that does not allow the port is measured as a first hop.
        let p = pick_pair(&relays, &relays[3], 22, &[], &none, &[], false);
        assert!(p.is_none(), "no exit allows 22");
        // Never the target twice; same-/16 relays are no helpers unless relaxed.
        let mut same = relays.clone();
        same[1].addrs = relays[2].addrs.clone();
        let p = pick_pair(&same, &same[2], 80, &[], &none, &[], false).unwrap();
        assert_eq!(p[1].id, same[0].id);
        let p = pick_pair(&same, &same[2], 80, &[], &none, &[], true).unwrap();
        assert_eq!(p[1].id, same[1].id);
    }

    #[test]
    fn rates_and_medians() {
        assert_eq!(kbps(1_000_000, Duration::from_secs(1)), 1000);
        assert_eq!(kbps(512 * 1024, Duration::from_millis(250)), 2097);
        assert_eq!(kbps(0, Duration::from_secs(1)), 1);
        assert_eq!(kbps(u64::MAX, Duration::ZERO), u32::MAX);
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [5, 1, 9]), Some(5));
        assert_eq!(median(&mut [5, 1, 9, 7]), Some(5));
    }

    #[test]
    fn file_and_header_parsing() {
        let mut r = BTreeMap::new();
        r.insert(
            RelayId([1; 32]),
            Measurement {
                kbps: 42,
                at: 90,
                nick: "r1".into(),
            },
        );
        let f = bandwidth_file(&r, 100);
        let back = BandwidthFile::parse(f.to_text().as_bytes()).unwrap();
        assert_eq!(
            back.fresh_measurements(100, 50).get(&RelayId([1; 32])),
            Some(&42)
        );
        assert_eq!(body_start(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert_eq!(
            body_start(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nxyz").unwrap(),
            Some(25)
        );
        assert!(body_start(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(body_start(&vec![b'a'; MAX_HEADER + 1]).is_err());
    }

    #[test]
    fn example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bwscan.example.toml");
        let c = BwScanConfig::load(&p).unwrap();
        assert_eq!(c.object_size, 4 * 1024 * 1024);
        assert!(matches!(c.target(), Target::Host(..)));
    }

    #[test]
    fn config_parses_and_validates() {
        let text = r#"
            output = "/tmp/bw"
            destination_host = "127.0.0.1"
            destination_port = 8080
            object_size = 262144
            [[authorities]]
            identity = "1111111111111111111111111111111111111111111111111111111111111111"
            dir_addr = "127.0.0.1:7000"
        "#;
        let c = BwScanConfig::from_toml(text).unwrap();
        assert_eq!(c.samples, 3);
        assert_eq!(
            c.request(),
            "GET /bytes/262144 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        assert!(matches!(c.target(), Target::Ip(_)));
        let bad = text.replace("262144", "5");
        assert!(BwScanConfig::from_toml(&bad).is_err());
        let bad = format!("unknown_key = 1\n{text}");
        assert!(BwScanConfig::from_toml(&bad).is_err());
    }
}
