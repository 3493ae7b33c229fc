//! Allium relay: accepts links, answers CREATE, extends circuits, forwards relay cells both ways,
//! and (as an exit) opens TCP streams for clients under its exit policy.
//!
//! Entry point: [`start`] with a [`RelayConfig`]; it returns a [`RelayHandle`] once the OR port is
//! bound. Behaviour is specified in `docs/protocol/91-relay.md` and `90-circuits.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), allium_relay::RelayError> {
//! use allium_relay::{AuthorityConfig, ExitPolicy, RelayConfig};
//! // Listen on 127.0.0.1:0; the bound address is then also the advertised one.
//! let mut cfg = RelayConfig::for_test("MyExit", "/tmp/allium-relay-data");
//! cfg.exit_policy = ExitPolicy::accept_all(true); // a test network's exit
//! cfg.authorities = vec![AuthorityConfig {
//!     identity: allium_crypto::RelayId([0x22; 32]),
//!     dir_addr: "127.0.0.1:7000".parse().expect("address"),
//! }];
//! let relay = allium_relay::start(cfg).await?;
//! let (id, addr) = (relay.identity(), relay.or_addr());
//! # let _ = (id, addr);
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Modules, one concept each:
//! - [`core`]: the sans-IO circuit ([`core::CircuitCore`]) and CREATE answerer: cells, driver
//!   inputs and `now` in; cells, events and timeouts out. No tokio, no locks, no clock.
//! - `reactor`: one task per circuit that owns its core, its exit streams' I/O and its timer;
//!   `link`: per-link reader that only routes cells to circuit queues, and the circuit-id table;
//!   `create`: the bounded handshake pool; `exit`: resolution, connecting and the stream pumps;
//!   `dirsync`: descriptors, consensus, rotation.
//! - [`config`]: the TOML configuration; [`policy`]: exit-policy matching;
//!   [`ratelimit`]: the token bucket; [`keys`]: key files and onion-key rotation;
//!   [`resolver`]: pluggable name resolution at the exit.
//!
//! Ownership: a link reader decodes and routes; a circuit's reactor is the only code that
//! touches its core (and so the only one that encrypts for it); time enters in the reactors and
//! the handshake pool and is passed to the core.
//!
//! Not in this crate: path selection and circuit building (`allium-client`), wire formats
//! (`allium-proto`), cryptography (`allium-crypto`), documents (`allium-directory`).
#![forbid(unsafe_code)]

pub mod config;
mod control;
pub mod core;
mod create;
mod ctx;
mod dirserve;
mod dirsync;
pub mod dos;
pub mod err;
mod exit;
pub mod hs;
pub mod hsdir;
pub mod keys;
mod link;
mod metrics;
pub mod policy;
pub mod ratelimit;
mod reactor;
pub mod resolver;
pub mod selftest;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use config::{AuthorityConfig, RelayConfig};
pub use ctx::Stats;
pub use err::RelayError;
pub use policy::ExitPolicy;
pub use resolver::{Resolver, StaticResolver, SystemResolver};

use crate::ctx::{Ctx, KnownRelay};
use crate::link::{CellSink, CellSource, Link};

/// How long [`RelayHandle::shutdown`] waits for links to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    ctx: Arc<Ctx>,
    or_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    link_slots: Arc<Semaphore>,
    /// Held while the relay runs: no second process may use the data directory.
    _lock: allium_directory::datadir::DataDirLock,
}

impl RelayHandle {
    /// The relay's Ed25519 identity.
    pub fn identity(&self) -> RelayId {
        self.ctx.keys.id
    }
    /// The address the OR listener is bound to (the advertised one, unless configured otherwise).
    pub fn or_addr(&self) -> SocketAddr {
        self.or_addr
    }
    /// The address published in the descriptor.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.ctx.advertised
    }
    /// The relay's link (Noise static) public key.
    pub fn link_key(&self) -> X25519Public {
        self.ctx.keys.link.public()
    }
    /// The relay's current onion public key.
    pub fn onion_key(&self) -> X25519Public {
        self.ctx.keys.onion_public()
    }
    /// What this relay's directory cache served over BEGIN_DIR: (whole consensuses, diffs,
    /// "not modified" answers, certificate lists).
    pub fn dir_cache_served(&self) -> (u64, u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let a = self
            .ctx
            .dir_archive
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let s = a.stats();
        (
            s.full.load(Relaxed),
            s.diffs.load(Relaxed),
            s.not_modified.load(Relaxed),
            s.certs.load(Relaxed),
        )
    }

    /// Traffic and circuit counters.
    pub fn stats(&self) -> &Stats {
        &self.ctx.stats
    }
    /// Bytes read from and written to links so far (whole frames, counted per frame).
    pub fn link_traffic(&self) -> (u64, u64) {
        (self.ctx.link_bytes.read(), self.ctx.link_bytes.written())
    }
    /// The signed descriptor (envelope bytes) as last built for upload, if any yet.
    pub fn last_descriptor(&self) -> Option<Vec<u8>> {
        self.ctx
            .dir
            .last_descriptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Apply the reloadable keys of `config` ([`config::RELOADABLE_KEYS`]) to the running relay:
    /// the exit policy and stream limit for new circuits (open circuits keep theirs), the
    /// bandwidth rate and burst at once, and nickname, contact, family and policy in a descriptor
    /// republished now if any of them changed. Other keys of `config` are ignored: they need a
    /// restart. The configuration is validated first; an invalid one changes nothing.
    pub fn reconfigure(&self, config: &RelayConfig) -> Result<(), RelayError> {
        config.validate()?;
        if self.ctx.reconfigure(config) {
            self.ctx.dir.republish.notify_one();
        }
        Ok(())
    }
    /// The configuration as last reloaded.
    pub fn config(&self) -> Arc<RelayConfig> {
        self.ctx.live()
    }
    /// Whether the relay's own identity is listed in the consensus it holds (`None`: it holds
    /// none yet).
    pub fn listed_in_consensus(&self) -> Option<bool> {
        self.ctx
            .netdir()
            .map(|nd| nd.by_id(&self.ctx.keys.id).is_some())
    }
    /// The relay's control-port backend (GETINFO answers, links, traffic, consensus), for
    /// `allium_control::start`.
    pub fn control_backend(&self) -> Arc<dyn allium_control::ControlBackend> {
        Arc::new(control::RelayControl::new(
            Arc::clone(&self.ctx),
            self.or_addr,
        ))
    }
    /// Upload the descriptor to every authority now (in addition to the periodic schedule).
    pub fn republish(&self) {
        self.ctx.dir.republish.notify_one();
    }
    /// Fetch the consensus now (in addition to the schedule; rate-limited).
    pub fn refetch_consensus(&self) {
        self.ctx.refetch.notify_one();
    }
    /// The outcome of the last reachability self-test of the advertised address.
    pub fn reachability(&self) -> selftest::Reachability {
        self.ctx.dir.selftest.get()
    }
    /// Test reachability of the advertised address again now (after an address change).
    pub fn retest_reachability(&self) {
        self.ctx.dir.selftest.retest.notify_one();
    }
    /// Whether the relay currently holds a consensus.
    pub fn has_consensus(&self) -> bool {
        self.ctx.netdir().is_some()
    }
    /// Rotate the onion key now (the previous one stays accepted) and republish.
    pub fn rotate_onion_key(&self) -> Result<(), RelayError> {
        self.ctx.keys.rotate_onion()?;
        self.ctx.dir.republish.notify_one();
        Ok(())
    }
    /// Teach the relay about another relay without a consensus (tests of EXTEND only).
    #[doc(hidden)]
    pub fn dangerously_add_known_relay(
        &self,
        id: RelayId,
        addr: SocketAddr,
        link_key: X25519Public,
    ) {
        add_known_relay(&self.ctx, id, addr, link_key);
    }
    /// Stop: no new links, every link and circuit closed, background tasks ended. Dropping the
    /// handle starts the same shutdown without waiting for it.
    pub async fn shutdown(mut self) {
        self.signal_shutdown();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        // Readers notice the shutdown signal and release their slots.
        let max = u32::try_from(self.ctx.cfg.max_links).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.link_slots.acquire_many(max)).await;
    }
}

impl RelayHandle {
    fn signal_shutdown(&self) {
        self.ctx.shutdown.send_replace(true);
        self.ctx.links.close_all();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

fn add_known_relay(ctx: &Ctx, id: RelayId, addr: SocketAddr, link_key: X25519Public) {
    let mut g = ctx.extra_relays.write().unwrap_or_else(|p| p.into_inner());
    g.insert(
        id,
        KnownRelay {
            addrs: vec![addr],
            link_key,
        },
    );
}

/// Start a relay with the system resolver behind a bounded cache ([`resolver::CachingResolver`]).
pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    start_with_resolver(
        config,
        Arc::new(resolver::CachingResolver::new(SystemResolver::new())),
    )
    .await
}

/// Start a relay whose exit resolves names with `resolver` (tests inject names only the exit knows).
pub async fn start_with_resolver(
    config: RelayConfig,
    resolver: Arc<dyn Resolver>,
) -> Result<RelayHandle, RelayError> {
    config.validate()?;
    let lock = allium_directory::datadir::DataDirLock::acquire(&config.data_dir)?;
    let keys = keys::RelayKeys::load_or_create(&config.data_dir)?;
    allium_crypto::keyfile::write_fingerprint(&config.data_dir, &config.nickname, &keys.id.0)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
    let or_addr = listener.local_addr().map_err(|source| RelayError::Bind {
        addr: config.listen,
        source,
    })?;
    let advertised = config.advertised.unwrap_or(or_addr);
    if advertised.ip().is_unspecified() {
        return Err(RelayError::ConfigInvalid {
            key: "advertised",
            why: format!(
                "`listen` is the wildcard address {or_addr}; set `advertised` to the address \
                 clients should connect to"
            ),
        });
    }
    let ctx = Ctx::new(config, keys, resolver, advertised);
    let link_slots = Arc::new(Semaphore::new(ctx.cfg.max_links));
    let metrics_task = metrics::start(&ctx).await?;
    tracing::info!(
        nickname = %ctx.cfg.nickname,
        identity = %ctx.keys.id,
        addr = %or_addr,
        exit = ctx.exit_policy().is_exit(),
        "relay started"
    );
    let outbound_bind = ctx.cfg.effective_outbound_bind();
    let mut tasks = vec![
        tokio::spawn(run_listener(
            Arc::clone(&ctx),
            listener,
            Arc::clone(&link_slots),
        )),
        tokio::spawn(allium_directory::client::http::with_outbound_bind(
            outbound_bind,
            dirsync::run_publisher(Arc::clone(&ctx)),
        )),
        tokio::spawn(allium_directory::client::http::with_outbound_bind(
            outbound_bind,
            dirsync::run_consensus(Arc::clone(&ctx)),
        )),
        tokio::spawn(allium_directory::client::http::with_outbound_bind(
            outbound_bind,
            dirsync::run_maintenance(Arc::clone(&ctx)),
        )),
        tokio::spawn(selftest::run(Arc::clone(&ctx))),
    ];
    tasks.push(tokio::spawn(dos::run_oom(Arc::clone(&ctx))));
    tasks.extend(create::spawn_workers(&ctx));
    tasks.extend(metrics_task);
    Ok(RelayHandle {
        ctx,
        or_addr,
        tasks,
        link_slots,
        _lock: lock,
    })
}

/// Most link handshakes in progress from one IP address at a time.
pub const MAX_PENDING_HANDSHAKES_PER_IP: u32 = 64;

/// Counts handshakes in progress per peer IP; a slot is released on drop.
#[derive(Default)]
struct PendingHandshakes(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

struct PendingSlot {
    table: Arc<PendingHandshakes>,
    ip: std::net::IpAddr,
}

impl PendingHandshakes {
    fn try_take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PendingSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_HANDSHAKES_PER_IP {
            return None;
        }
        *n += 1;
        Some(PendingSlot {
            table: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[allow(clippy::disallowed_methods)] // Driver: back off after an accept error.
async fn run_listener(ctx: Arc<Ctx>, listener: TcpListener, slots: Arc<Semaphore>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let pending = Arc::new(PendingHandshakes::default());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    // e.g. EMFILE: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Per-address limits first: a refused connection costs no link slot and no handshake.
        // Over a limit, only a relay's address gets the handshake, to prove the relay's key.
        let Ok(dos_slot) = dos::admit_at_accept(&ctx, peer.ip(), link::coarse_now()) else {
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("link limit reached; refusing a connection");
            continue;
        };
        let Some(pending_slot) = pending.try_take(peer.ip()) else {
            tracing::debug!("too many handshakes from one address; refusing a connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let accepted = allium_proto::channel::accept(tcp, &ctx.keys.id, &ctx.keys.link).await;
            drop(pending_slot);
            let ch = match accepted {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::debug!(error = %e, "link handshake failed");
                    return;
                }
            };
            if ctx.is_shutting_down() {
                ch.close();
                return;
            }
            let peer_static = ch.peer_static();
            let Some(dos_slot) = dos::admit_after_handshake(&ctx, dos_slot, &peer_static) else {
                ch.close();
                return;
            };
            let peer_relay = ctx
                .netdir()
                .and_then(|nd| nd.by_link_key(&peer_static).map(|e| e.identity));
            ch.count_into(&ctx.link_bytes);
            let (tx, rx) = ch.split();
            // A peer that stops reading loses the link after the circuit stall timeout, so
            // circuits with nothing left to send cannot be held on a stuck link either.
            tx.set_write_timeout(ctx.limits.blocked_cap);
            let link = Link::new(
                CellSink::Channel(tx),
                false,
                peer_relay,
                Some(peer_static),
                ctx.cfg.max_circuits_per_link,
            );
            link.set_peer_ip(peer.ip());
            if let Some(id) = peer_relay {
                ctx.links.register(id, &link);
            }
            link::run_reader(Arc::clone(&ctx), link, CellSource::Channel(rx)).await;
            drop(dos_slot);
            drop(permit);
        });
    }
}
