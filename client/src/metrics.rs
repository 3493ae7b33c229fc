//! The proxy's Prometheus metrics: counters the circuit manager and the front ends update, and
//! the page [`crate::ProxyHandle::metrics_text`] renders with `allium_proto::metrics`.
//!
//! Families (all prefixed `allium_`): `proxy_bytes_total{direction}` (bytes of guard-link
//! frames, counted by the channel once per frame), `proxy_cells_total{direction}` (the cells in
//! those frames), `link_queued_bytes`, `circuits_open`, `circuits_created_total`,
//! `circuit_build_failures_total`, `circuit_build_seconds` (histogram), `streams_open`,
//! `socks_requests_total{outcome}`, `http_tunnel_requests_total{outcome}`,
//! `dns_queries_total{rcode}`, `consensus_age_seconds`, `bootstrap_percent`,
//! `onion_connect_attempts_total`, `onion_connections_total{outcome}` (success or the failure's
//! reason), `onion_descriptor_fetches_total{result}`, `onion_connect_seconds` (histogram).
//! Labels carry only fixed words: never a destination, a credential or an address.

use std::sync::atomic::{AtomicU64, Ordering};

use allium_proto::metrics::{CIRCUIT_BUILD_BUCKETS, Exposition, Histogram, MetricType};

/// How a SOCKS (or HTTP CONNECT) request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The stream opened (or the name resolved).
    Success,
    /// The handshake was refused or broke off (not SOCKS, bad request, EOF).
    Refused,
    /// An HTTP request on the SOCKS port (answered with the 501 page), or a non-CONNECT method
    /// on the tunnel port.
    WrongProtocol,
    /// No exit allows the port.
    NoExit,
    /// The exit or the circuits failed the request.
    Failed,
    /// The handshake or the request timed out.
    Timeout,
}

impl Outcome {
    const ALL: [(Self, &'static str); 6] = [
        (Self::Success, "success"),
        (Self::Refused, "refused"),
        (Self::WrongProtocol, "wrong_protocol"),
        (Self::NoExit, "no_exit"),
        (Self::Failed, "failed"),
        (Self::Timeout, "timeout"),
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|(o, _)| *o == self).unwrap_or(0)
    }
}

/// DNS answer codes counted by name (RFC 1035 rcodes 0 to 5).
const RCODES: [&str; 6] = [
    "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused",
];

/// The proxy's counters.
#[derive(Debug)]
pub(crate) struct ClientMetrics {
    circuits_built: AtomicU64,
    build_failures: AtomicU64,
    build_seconds: Histogram,
    socks: [AtomicU64; 6],
    tunnel: [AtomicU64; 6],
    dns: [AtomicU64; 6],
    /// `valid-after` of the consensus in use (Unix seconds; 0: none yet).
    consensus_valid_after: AtomicU64,
    /// Directory fetches by source ([`DIR_SOURCES`]), and those that failed.
    dir_fetches: [AtomicU64; 3],
    dir_failures: [AtomicU64; 3],
    /// Onion-service client counters.
    pub(crate) onion: OnionCounters,
    /// The onion services' counters and status (issue 13).
    pub(crate) onion_service: crate::onion::svcdrv::ServiceMetrics,
}

/// Buckets of the time to connect to an onion service (descriptor fetch, rendezvous and
/// introduction circuits, the service's circuit to the rendezvous point), in seconds.
pub(crate) const ONION_CONNECT_BUCKETS: &[f64] =
    &[0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

/// The onion-service client's counters (`crate::onion::clidrv`): connection attempts (a new
/// rendezvous; a stream on a kept rendezvous circuit is none), how they ended, HSDir fetches.
#[derive(Debug)]
pub(crate) struct OnionCounters {
    attempts: AtomicU64,
    succeeded: AtomicU64,
    failed: [AtomicU64; 8],
    fetches: [AtomicU64; 4],
    /// Proofs of work: solved, not found in time.
    pow_solves: [AtomicU64; 2],
    pow_retries: AtomicU64,
    connect_seconds: Histogram,
}

impl Default for OnionCounters {
    fn default() -> Self {
        Self {
            attempts: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: Default::default(),
            fetches: Default::default(),
            pow_solves: Default::default(),
            pow_retries: AtomicU64::new(0),
            connect_seconds: Histogram::new(ONION_CONNECT_BUCKETS),
        }
    }
}

impl OnionCounters {
    /// A connection attempt (a new rendezvous) started.
    pub(crate) fn attempted(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection attempt joined the rendezvous after `secs`.
    pub(crate) fn succeeded(&self, secs: f64) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        self.connect_seconds.observe(secs);
    }

    /// A connection attempt failed with `e`.
    pub(crate) fn failed(&self, e: &crate::onion::OnionError) {
        let label = crate::onion::clidrv::failure_label(e);
        let i = crate::onion::clidrv::FAILURE_LABELS
            .iter()
            .position(|l| *l == label);
        if let Some(c) = i.and_then(|i| self.failed.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An HSDir fetch ended so.
    pub(crate) fn desc_fetch(&self, r: crate::onion::clidrv::DescFetch) {
        let i = crate::onion::clidrv::DescFetch::ALL
            .iter()
            .position(|(x, _)| *x == r);
        if let Some(c) = i.and_then(|i| self.fetches.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A proof of work was solved (`ok`), or none was found within the solver's bounds.
    pub(crate) fn pow_solved(&self, ok: bool) {
        let i = usize::from(!ok);
        if let Some(c) = self.pow_solves.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An introduction was made again with a raised proof-of-work effort.
    pub(crate) fn pow_retried(&self) {
        self.pow_retries.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, e: &mut Exposition) {
        e.single(
            "allium_onion_connect_attempts_total",
            MetricType::Counter,
            "Connections to onion services attempted (new rendezvous; streams on a kept \
             rendezvous circuit are not counted).",
            self.attempts.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "allium_onion_connections_total",
            MetricType::Counter,
            "Connection attempts to onion services by how they ended: success, or the reason \
             they failed.",
        );
        e.sample(
            &[("outcome", "success")],
            self.succeeded.load(Ordering::Relaxed) as f64,
        );
        for (label, c) in crate::onion::clidrv::FAILURE_LABELS
            .iter()
            .zip(&self.failed)
        {
            e.sample(&[("outcome", label)], c.load(Ordering::Relaxed) as f64);
        }
        e.family(
            "allium_onion_descriptor_fetches_total",
            MetricType::Counter,
            "Onion-service descriptor fetches from HSDirs, by result.",
        );
        for ((_, label), c) in crate::onion::clidrv::DescFetch::ALL
            .iter()
            .zip(&self.fetches)
        {
            e.sample(&[("result", label)], c.load(Ordering::Relaxed) as f64);
        }
        e.family(
            "allium_onion_pow_solves_total",
            MetricType::Counter,
            "Onion-service proofs of work computed for introductions, by result (solved, or \
             not found within the solver's time and work bounds).",
        );
        for (label, c) in ["solved", "failed"].iter().zip(&self.pow_solves) {
            e.sample(&[("result", label)], c.load(Ordering::Relaxed) as f64);
        }
        e.single(
            "allium_onion_pow_retries_total",
            MetricType::Counter,
            "Introductions made again with a raised proof-of-work effort after one was refused \
             or not answered by a rendezvous.",
            self.pow_retries.load(Ordering::Relaxed) as f64,
        );
        e.histogram(
            "allium_onion_connect_seconds",
            "Time to connect to an onion service (descriptor to joined rendezvous), in seconds.",
            &self.connect_seconds.snapshot(),
        );
    }
}

/// Where a directory fetch went: a guard (BEGIN_DIR), a fallback cache (BEGIN_DIR), an
/// authority (HTTP), as `dir_fetches_total{source}` labels.
pub(crate) const DIR_SOURCES: [&str; 3] = ["guard", "fallback", "authority"];

impl Default for ClientMetrics {
    fn default() -> Self {
        Self {
            circuits_built: AtomicU64::new(0),
            build_failures: AtomicU64::new(0),
            build_seconds: Histogram::new(CIRCUIT_BUILD_BUCKETS),
            socks: Default::default(),
            tunnel: Default::default(),
            dns: Default::default(),
            consensus_valid_after: AtomicU64::new(0),
            dir_fetches: Default::default(),
            dir_failures: Default::default(),
            onion: OnionCounters::default(),
            onion_service: Default::default(),
        }
    }
}

impl ClientMetrics {
    /// A circuit was built in `secs`.
    pub(crate) fn circuit_built(&self, secs: f64) {
        self.circuits_built.fetch_add(1, Ordering::Relaxed);
        self.build_seconds.observe(secs);
    }

    /// A circuit build attempt failed or timed out.
    pub(crate) fn circuit_failed(&self) {
        self.build_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A SOCKS request ended so.
    pub(crate) fn socks(&self, o: Outcome) {
        if let Some(c) = self.socks.get(o.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An HTTP CONNECT request ended so.
    pub(crate) fn tunnel(&self, o: Outcome) {
        if let Some(c) = self.tunnel.get(o.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A DNS query was answered with `rcode` (nothing is counted for datagrams not answered).
    pub(crate) fn dns(&self, rcode: u8) {
        if let Some(c) = self.dns.get(usize::from(rcode)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A directory fetch from source `i` ([`DIR_SOURCES`]) ended (`ok`: a document came back,
    /// newer or not).
    pub(crate) fn dir_fetch(&self, i: usize, ok: bool) {
        let set = if ok {
            &self.dir_fetches
        } else {
            &self.dir_failures
        };
        if let Some(c) = set.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Directory fetches so far by source ([`DIR_SOURCES`] order): (succeeded, failed).
    pub(crate) fn dir_fetches(&self) -> [(u64, u64); 3] {
        let mut out = [(0, 0); 3];
        for (o, (a, b)) in out
            .iter_mut()
            .zip(self.dir_fetches.iter().zip(&self.dir_failures))
        {
            *o = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
        }
        out
    }

    /// `valid-after` of the consensus in use (0: none).
    pub(crate) fn consensus_valid_after(&self) -> u64 {
        self.consensus_valid_after.load(Ordering::Relaxed)
    }

    /// The consensus in use became valid at `valid_after` (Unix seconds).
    pub(crate) fn consensus(&self, valid_after: u64) {
        self.consensus_valid_after
            .store(valid_after, Ordering::Relaxed);
    }

    /// The metrics page. `now` is Unix seconds; the rest is what the caller reads from the
    /// circuit manager.
    pub(crate) fn render(&self, view: &View, now: u64) -> Exposition {
        let mut e = Exposition::new();
        e.family(
            "allium_proxy_bytes_total",
            MetricType::Counter,
            "Bytes read from and written to guard links (whole frames, framing included).",
        )
        .sample(&[("direction", "read")], view.bytes_read as f64)
        .sample(&[("direction", "written")], view.bytes_written as f64);
        e.family(
            "allium_proxy_cells_total",
            MetricType::Counter,
            "Cells read from and written to guard links.",
        )
        .sample(&[("direction", "read")], view.cells_read as f64)
        .sample(&[("direction", "written")], view.cells_written as f64);
        e.single(
            "allium_link_queued_bytes",
            MetricType::Gauge,
            "Bytes of cells waiting in the send queues of guard links, now.",
            view.queued_bytes as f64,
        );
        e.single(
            "allium_circuits_open",
            MetricType::Gauge,
            "Circuits currently held for streams.",
            view.circuits_open as f64,
        );
        e.single(
            "allium_circuits_created_total",
            MetricType::Counter,
            "Circuits built since start.",
            self.circuits_built.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "allium_circuit_build_failures_total",
            MetricType::Counter,
            "Circuit build attempts that failed or timed out.",
            self.build_failures.load(Ordering::Relaxed) as f64,
        );
        e.histogram(
            "allium_circuit_build_seconds",
            "Time to build a three-hop circuit, in seconds.",
            &self.build_seconds.snapshot(),
        );
        e.single(
            "allium_streams_open",
            MetricType::Gauge,
            "Streams currently open on the proxy's circuits.",
            view.streams_open as f64,
        );
        for (name, help, counters) in [
            (
                "allium_socks_requests_total",
                "SOCKS requests by how they ended.",
                &self.socks,
            ),
            (
                "allium_http_tunnel_requests_total",
                "HTTP CONNECT tunnel requests by how they ended.",
                &self.tunnel,
            ),
        ] {
            e.family(name, MetricType::Counter, help);
            for ((_, label), c) in Outcome::ALL.iter().zip(counters) {
                e.sample(&[("outcome", label)], c.load(Ordering::Relaxed) as f64);
            }
        }
        e.family(
            "allium_dns_queries_total",
            MetricType::Counter,
            "DNS port queries answered, by response code.",
        );
        for (label, c) in RCODES.iter().zip(&self.dns) {
            e.sample(&[("rcode", label)], c.load(Ordering::Relaxed) as f64);
        }
        for (name, help, counters) in [
            (
                "allium_dir_fetches_total",
                "Directory fetches that got an answer, by source (guard and fallback over \
                 BEGIN_DIR, authority over HTTP).",
                &self.dir_fetches,
            ),
            (
                "allium_dir_fetch_failures_total",
                "Directory fetches that failed, by source.",
                &self.dir_failures,
            ),
        ] {
            e.family(name, MetricType::Counter, help);
            for (label, c) in DIR_SOURCES.iter().zip(counters) {
                e.sample(&[("source", label)], c.load(Ordering::Relaxed) as f64);
            }
        }
        let va = self.consensus_valid_after.load(Ordering::Relaxed);
        e.single(
            "allium_consensus_age_seconds",
            MetricType::Gauge,
            "Seconds since the consensus in use became valid (NaN: no consensus yet).",
            if va == 0 {
                f64::NAN
            } else {
                now.saturating_sub(va) as f64
            },
        );
        let percent = match (view.has_dir, view.ready) {
            (_, true) => 100.0,
            (true, false) => 40.0,
            (false, false) => 10.0,
        };
        e.single(
            "allium_bootstrap_percent",
            MetricType::Gauge,
            "Bootstrap progress as the log reports it: 10 fetching the consensus, 40 consensus \
             held, 100 ready (a circuit is built).",
            percent,
        );
        self.onion.render(&mut e);
        self.onion_service.render(&mut e);
        e
    }
}

/// What the circuit manager says at render time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct View {
    pub(crate) bytes_read: u64,
    pub(crate) bytes_written: u64,
    pub(crate) cells_read: u64,
    pub(crate) cells_written: u64,
    pub(crate) queued_bytes: u64,
    pub(crate) circuits_open: usize,
    pub(crate) streams_open: usize,
    pub(crate) has_dir: bool,
    pub(crate) ready: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_valid_and_counts_show() {
        let m = ClientMetrics::default();
        m.circuit_built(0.3);
        m.circuit_failed();
        m.socks(Outcome::Success);
        m.socks(Outcome::Success);
        m.socks(Outcome::WrongProtocol);
        m.tunnel(Outcome::NoExit);
        m.dns(3);
        m.dns(200);
        m.onion.attempted();
        m.onion.attempted();
        m.onion.succeeded(1.5);
        m.onion.failed(&crate::onion::OnionError::MissingClientAuth);
        m.onion
            .desc_fetch(crate::onion::clidrv::DescFetch::NotFound);
        let view = View {
            bytes_read: 5000,
            bytes_written: 1042,
            cells_read: 9,
            cells_written: 2,
            queued_bytes: 2048,
            circuits_open: 2,
            streams_open: 1,
            has_dir: true,
            ready: false,
        };
        let e = m.render(&view, 1000);
        assert!(e.errors().is_empty(), "{:?}", e.errors());
        let page = e.finish();
        for line in [
            "allium_proxy_bytes_total{direction=\"read\"} 5000",
            "allium_proxy_bytes_total{direction=\"written\"} 1042",
            "allium_proxy_cells_total{direction=\"read\"} 9",
            "allium_proxy_cells_total{direction=\"written\"} 2",
            "allium_link_queued_bytes 2048",
            "allium_circuits_open 2",
            "allium_circuits_created_total 1",
            "allium_circuit_build_failures_total 1",
            "allium_circuit_build_seconds_bucket{le=\"0.5\"} 1",
            "allium_circuit_build_seconds_bucket{le=\"0.25\"} 0",
            "allium_circuit_build_seconds_count 1",
            "allium_streams_open 1",
            "allium_socks_requests_total{outcome=\"success\"} 2",
            "allium_socks_requests_total{outcome=\"wrong_protocol\"} 1",
            "allium_http_tunnel_requests_total{outcome=\"no_exit\"} 1",
            "allium_dns_queries_total{rcode=\"nxdomain\"} 1",
            "allium_consensus_age_seconds NaN",
            "allium_bootstrap_percent 40",
            "allium_onion_connect_attempts_total 2",
            "allium_onion_connections_total{outcome=\"success\"} 1",
            "allium_onion_connections_total{outcome=\"missing_client_auth\"} 1",
            "allium_onion_connections_total{outcome=\"timeout\"} 0",
            "allium_onion_descriptor_fetches_total{result=\"not_found\"} 1",
            "allium_onion_connect_seconds_bucket{le=\"2.5\"} 1",
            "allium_onion_connect_seconds_bucket{le=\"1\"} 0",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
        }
        m.consensus(400);
        let page = m.render(&view, 1000).finish();
        assert!(
            page.lines()
                .any(|l| l == "allium_consensus_age_seconds 600")
        );
    }
}
