//! Limits per local source address on what the proxy's users can make it hold: the proxy's
//! local users are peers too (issue 12), and one program must not starve another.
//!
//! Every connection to a TCP client port (SOCKS, HTTP CONNECT, DNS over TCP) is counted against
//! its source IP address (not its port: one program opens many connections from one address,
//! and programs that want to be told apart bind their own loopback address, 127.0.0.x).
//!
//! | resource | limit (config key) | at the limit |
//! |---|---|---|
//! | open connections | `max_connections_per_source` (default 768; all sources: `max_socks_connections`, 1024) | the connection is closed at once |
//! | connections in their handshake (SOCKS request or HTTP head being read) | `max_handshakes_per_source` (64; each bounded by `socks_handshake_timeout`) | the connection waits its turn behind its own source's handshakes (FIFO per source), for at most `socks_handshake_timeout`, then is closed |
//! | requests waiting for a circuit that is not ready (queued for a build) | `max_circuit_requests_per_source` (32; all sources share the manager's parallel builds) | the request waits its turn behind its own source's requests (FIFO per source) |
//! | queries in flight on the UDP DNS port | `max_dns_queries_per_source` (16; all sources: 256) | the query is answered REFUSED at once |
//!
//! Open streams and the bytes they buffer follow from the connections: one connection carries
//! at most one stream, and a stream buffers a bounded amount (its circuit window, the upstream
//! and downstream batches, `TCP_NOTSENT_LOWAT` in the kernel), so a source holds at most
//! `max_connections_per_source` of each. Circuits a source holds are bounded the same way
//! (a circuit in use carries one of its streams; idle isolated circuits are closed after
//! `isolated_circuit_idle_timeout`, and first at `max_circuits_per_guard`).
//!
//! Handshakes queue rather than fail: a slow reader (slowloris) holds at most 64 handshakes and
//! its further connections only their connection slot, while an honest program whose
//! handshakes are slow because the machine is overloaded waits instead of being refused (the
//! 15-minute scraper run at load average 300-600 had 1,241 connections closed when this limit
//! refused instead of queueing).
//!
//! The circuit-request gate is what keeps the build queue fair: the manager's build slots are
//! taken first come first served, so without it a program with 500 requests waiting would put
//! every other program's request behind its 500 builds. With it, another source's request waits
//! behind at most `max_circuit_requests_per_source` of them.
//!
//! Each limit is logged (warn) the first time it is hit, with no address, and counted in
//! `allium_proxy_local_limit_hits_total{limit}`; what is held now is in
//! `allium_proxy_local_held{resource}` and `allium_proxy_local_sources`.
//!
//! [`SourceTable`] is the sans-IO core (counts and decisions); [`LocalLimits`] adds the lock,
//! the counters and the per-source queues.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use allium_proto::metrics::{Exposition, MetricType};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a local source can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    /// An open connection to a TCP client port.
    Connection,
    /// A connection whose request (SOCKS) or head (HTTP CONNECT) is not read yet.
    Handshake,
    /// A request waiting for a circuit.
    CircuitRequest,
    /// A query on the UDP DNS port being answered.
    DnsQuery,
}

impl Resource {
    /// Every resource, in the order of [`Resource::index`].
    pub(crate) const ALL: [Self; 4] = [
        Self::Connection,
        Self::Handshake,
        Self::CircuitRequest,
        Self::DnsQuery,
    ];

    fn index(self) -> usize {
        match self {
            Self::Connection => 0,
            Self::Handshake => 1,
            Self::CircuitRequest => 2,
            Self::DnsQuery => 3,
        }
    }

    /// The label in the metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Connection => "connections",
            Self::Handshake => "handshakes",
            Self::CircuitRequest => "circuit_requests",
            Self::DnsQuery => "dns_queries",
        }
    }

    /// The config key of its limit.
    fn key(self) -> &'static str {
        match self {
            Self::Connection => "max_connections_per_source",
            Self::Handshake => "max_handshakes_per_source",
            Self::CircuitRequest => "max_circuit_requests_per_source",
            Self::DnsQuery => "max_dns_queries_per_source",
        }
    }
}

/// The limits per source address (from the proxy config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PerSource {
    /// Open connections.
    pub(crate) connections: usize,
    /// Connections in their handshake.
    pub(crate) handshakes: usize,
    /// Requests waiting for a circuit.
    pub(crate) circuit_requests: usize,
    /// Queries in flight on the UDP DNS port.
    pub(crate) dns_queries: usize,
}

impl PerSource {
    /// The limit for `r`.
    pub(crate) fn of(&self, r: Resource) -> usize {
        match r {
            Resource::Connection => self.connections,
            Resource::Handshake => self.handshakes,
            Resource::CircuitRequest => self.circuit_requests,
            Resource::DnsQuery => self.dns_queries,
        }
    }

    /// The limits of a config, with how long a connection may wait for its handshake turn
    /// (`socks_handshake_timeout`).
    pub(crate) fn with_wait(c: &crate::config::ProxyConfig) -> (Self, std::time::Duration) {
        (Self::from_config(c), c.socks_handshake_timeout)
    }

    /// The limits of a config.
    pub(crate) fn from_config(c: &crate::config::ProxyConfig) -> Self {
        Self {
            connections: c.max_connections_per_source,
            handshakes: c.max_handshakes_per_source,
            circuit_requests: c.max_circuit_requests_per_source,
            dns_queries: c.max_dns_queries_per_source,
        }
    }
}

/// Counts of what each source holds (the sans-IO core). A source that holds nothing has no
/// entry, so the table is as large as the number of sources holding something.
#[derive(Debug, Default)]
pub(crate) struct SourceTable {
    by_ip: HashMap<IpAddr, [usize; 4]>,
}

impl SourceTable {
    /// Take one `r` for `ip` if it holds fewer than `limit`; whether it was taken.
    pub(crate) fn try_take(&mut self, ip: IpAddr, r: Resource, limit: usize) -> bool {
        let held = self.by_ip.entry(ip).or_default();
        let slot = &mut held[r.index()];
        if *slot >= limit {
            if held.iter().all(|&n| n == 0) {
                self.by_ip.remove(&ip);
            }
            return false;
        }
        *slot += 1;
        true
    }

    /// Give back one `r` of `ip`.
    pub(crate) fn give_back(&mut self, ip: IpAddr, r: Resource) {
        if let Some(held) = self.by_ip.get_mut(&ip) {
            let slot = &mut held[r.index()];
            *slot = slot.saturating_sub(1);
            if held.iter().all(|&n| n == 0) {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// How many `r` `ip` holds.
    #[cfg(test)]
    pub(crate) fn held(&self, ip: IpAddr, r: Resource) -> usize {
        self.by_ip.get(&ip).map_or(0, |h| h[r.index()])
    }

    /// How many `r` all sources hold.
    pub(crate) fn total(&self, r: Resource) -> usize {
        self.by_ip.values().map(|h| h[r.index()]).sum()
    }

    /// How many sources hold something.
    pub(crate) fn sources(&self) -> usize {
        self.by_ip.len()
    }
}

/// The per-source limits of one proxy: the table, the per-source circuit-request queues and the
/// counters of hits.
#[derive(Debug, Default)]
pub(crate) struct LocalLimits {
    table: Mutex<SourceTable>,
    /// One FIFO queue per source and resource ([`Resource::index`]) with turns waiting or held.
    gates: Mutex<HashMap<(IpAddr, usize), Arc<Semaphore>>>,
    hits: [AtomicU64; 4],
}

impl LocalLimits {
    /// Count a hit of `r`'s limit; the first one of each resource is logged.
    fn hit(&self, r: Resource, limit: usize) {
        if let Some(c) = self.hits.get(r.index())
            && c.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(
                limit,
                "a local source address reached {} ({}); the proxy's other users are not \
                 affected. Raise it in the proxy config if one program legitimately needs more \
                 (logged once; allium_proxy_local_limit_hits_total counts them)",
                r.key(),
                r.label(),
            );
        }
    }

    /// How often `r`'s limit was hit since start.
    pub(crate) fn hits(&self, r: Resource) -> u64 {
        self.hits
            .get(r.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// How many `r` `ip` holds now.
    #[cfg(test)]
    pub(crate) fn held(&self, ip: IpAddr, r: Resource) -> usize {
        self.table.lock().map_or(0, |t| t.held(ip, r))
    }

    /// Take one connection (or DNS query) for `ip` within `limits`, or count the hit.
    pub(crate) fn take(
        self: &Arc<Self>,
        ip: IpAddr,
        r: Resource,
        limits: &PerSource,
    ) -> Option<Slot> {
        let limit = limits.of(r);
        let taken = self
            .table
            .lock()
            .is_ok_and(|mut t| t.try_take(ip, r, limit));
        if !taken {
            self.hit(r, limit);
            return None;
        }
        Some(Slot {
            limits: Arc::clone(self),
            ip,
            r,
        })
    }

    /// Wait for a turn to ask for a circuit: at most `limits.circuit_requests` requests of `ip`
    /// at once, the others queued in order. A request that has to queue counts as a hit.
    pub(crate) async fn circuit_request(self: &Arc<Self>, ip: IpAddr, limits: &PerSource) -> Turn {
        self.turn(ip, Resource::CircuitRequest, limits).await
    }

    /// Wait for a turn to read a connection's handshake: at most `limits.handshakes` of `ip` at
    /// once, the others queued in order. A connection that has to queue counts as a hit.
    pub(crate) async fn handshake(self: &Arc<Self>, ip: IpAddr, limits: &PerSource) -> Turn {
        self.turn(ip, Resource::Handshake, limits).await
    }

    /// Wait for `ip`'s turn at `r` (one FIFO queue per source and resource).
    async fn turn(self: &Arc<Self>, ip: IpAddr, r: Resource, limits: &PerSource) -> Turn {
        let n = limits.of(r).max(1);
        let gate = {
            let mut g = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                g.entry((ip, r.index()))
                    .or_insert_with(|| Arc::new(Semaphore::new(n))),
            )
        };
        let permit = match Arc::clone(&gate).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.hit(r, n);
                // Never closed: `acquire_owned` only fails on a closed semaphore.
                Arc::clone(&gate).acquire_owned().await.ok()
            }
        };
        if let Ok(mut t) = self.table.lock() {
            // Counted for the metrics only: the semaphore is the limit.
            t.try_take(ip, r, usize::MAX);
        }
        Turn {
            limits: Arc::clone(self),
            ip,
            r,
            gate: Some(gate),
            permit,
        }
    }

    /// Add the families of the local limits to a metrics page.
    pub(crate) fn render(&self, e: &mut Exposition) {
        let f = e.family(
            "allium_proxy_local_limit_hits_total",
            MetricType::Counter,
            "Times a local source address reached a per-source limit (connections beyond it are \
             closed, DNS queries refused; handshakes and circuit requests wait their turn).",
        );
        for r in Resource::ALL {
            f.sample(&[("limit", r.label())], self.hits(r) as f64);
        }
        let (held, sources) = self
            .table
            .lock()
            .map(|t| (Resource::ALL.map(|r| t.total(r)), t.sources()))
            .unwrap_or_default();
        let f = e.family(
            "allium_proxy_local_held",
            MetricType::Gauge,
            "What local sources hold now, summed over sources.",
        );
        for (r, n) in Resource::ALL.iter().zip(held) {
            f.sample(&[("resource", r.label())], n as f64);
        }
        e.single(
            "allium_proxy_local_sources",
            MetricType::Gauge,
            "Local source addresses holding a connection, handshake, circuit request or DNS query now.",
            sources as f64,
        );
    }
}

/// One connection (or DNS query) held by a source; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    limits: Arc<LocalLimits>,
    ip: IpAddr,
    r: Resource,
}

impl Slot {
    /// The source address.
    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.limits.table.lock() {
            t.give_back(self.ip, self.r);
        }
    }
}

/// A source's turn at a queued resource (a handshake, a circuit request); the next in its
/// source's queue goes when dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    limits: Arc<LocalLimits>,
    ip: IpAddr,
    r: Resource,
    gate: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Ok(mut t) = self.limits.table.lock() {
            t.give_back(self.ip, self.r);
        }
        let gate = self.gate.take();
        let mut g = self.limits.gates.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this turn hold the queue: nobody of this source waits.
        if gate.is_some_and(|s| Arc::strong_count(&s) <= 2) {
            g.remove(&(self.ip, self.r.index()));
        }
    }
}

/// A connection let in by the per-source limits: its connection slot, and its turn to be read
/// until [`Admitted::handshake_done`].
#[derive(Debug)]
pub(crate) struct Admitted {
    conn: Slot,
    handshake: Option<Turn>,
}

impl Admitted {
    /// Let a connection from `ip` in (without its handshake turn yet), or count the hit.
    pub(crate) fn admit(limits: &Arc<LocalLimits>, ip: IpAddr, per: &PerSource) -> Option<Self> {
        let conn = limits.take(ip, Resource::Connection, per)?;
        Some(Self {
            conn,
            handshake: None,
        })
    }

    /// Wait for the connection's turn to be read (`None`: not within `wait`; close it).
    pub(crate) async fn wait_handshake(
        mut self,
        per: &PerSource,
        wait: std::time::Duration,
    ) -> Option<Self> {
        let limits = Arc::clone(&self.conn.limits);
        let turn = tokio::time::timeout(wait, limits.handshake(self.ip(), per)).await;
        self.handshake = Some(turn.ok()?);
        Some(self)
    }

    /// The request is read: the connection no longer counts as a handshake.
    pub(crate) fn handshake_done(&mut self) {
        self.handshake = None;
    }

    /// The source address.
    pub(crate) fn ip(&self) -> IpAddr {
        self.conn.ip()
    }
}

#[cfg(test)]
#[path = "local_limits_tests.rs"]
mod tests;
