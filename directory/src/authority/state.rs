//! The authority's shared state: what it holds (descriptors, reachability history, certificates,
//! votes, the consensus being signed and the one being served), loading it from the data
//! directory at start, and the lock around it.
//!
//! The behaviour on that state lives in sibling modules, one concept each: `serve` (what the
//! HTTP server reads, descriptor uploads), `round` (votes, consensus computation, signatures,
//! publication), `probe` (reachability tests and expiry), `schedule` (when each phase runs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use allium_crypto::RelayId;

use super::config::AuthorityConfig;
use super::keys::AuthorityKeys;
use super::limits::{ConnCaps, ConnLimiter, LimitLog, SourceLimiter, SourceRates};
use super::reach::Reachability;
use super::store::Store;
use super::vote::RelayHistory;
use crate::doc::{Consensus, Signed, VerifiedCert, VerifiedDescriptor, VerifiedVote};
use crate::err::Result;
use crate::now_unix;

/// Concurrent reachability probes.
pub(super) const PROBE_CONCURRENCY: usize = 32;

/// The consensus being served, with its encodings made once.
#[derive(Clone)]
pub(super) struct Published {
    pub(super) signed: Signed<Consensus>,
    pub(super) valid_after: u64,
    pub(super) bytes: axum::body::Bytes,
    pub(super) z: axum::body::Bytes,
}

/// Everything the authority holds, behind [`Inner`]'s lock.
#[derive(Default)]
pub(super) struct State {
    /// Relay descriptors by identity.
    pub(super) descs: BTreeMap<RelayId, VerifiedDescriptor>,
    /// Reachability history by relay identity.
    pub(super) history: BTreeMap<RelayId, RelayHistory>,
    /// Certificates by authority identity (the one with the latest expiry).
    pub(super) certs: BTreeMap<RelayId, VerifiedCert>,
    /// Votes by period, then by authority.
    pub(super) votes: BTreeMap<u64, BTreeMap<RelayId, Arc<VerifiedVote>>>,
    /// The consensus being signed.
    pub(super) pending: Option<(u64, Signed<Consensus>)>,
    /// The consensus being served.
    pub(super) current: Option<Published>,
    /// `/descriptors` reply, rebuilt after a change.
    pub(super) descs_reply: Option<axum::body::Bytes>,
    /// The shared-random protocol state.
    pub(super) sr: super::shared_random::SrState,
}

/// The shared authority state.
pub(crate) struct Inner {
    pub(crate) cfg: AuthorityConfig,
    /// The configuration as last reloaded: its vote inputs (`config::RELOADABLE_KEYS`) count
    /// from the next vote on; the other keys keep their start-up values in `cfg`.
    pub(crate) live: std::sync::RwLock<Arc<AuthorityConfig>>,
    pub(crate) keys: AuthorityKeys,
    pub(super) ids: Vec<RelayId>,
    pub(super) reach: Arc<dyn Reachability>,
    pub(super) store: Store,
    pub(super) state: Mutex<State>,
    pub(super) probe_slots: Arc<tokio::sync::Semaphore>,
    /// Concurrent large (vote) uploads being read from the authorities' addresses.
    pub(crate) big_uploads: Arc<tokio::sync::Semaphore>,
    /// Concurrent vote uploads being read from any other address (a flood of slow vote
    /// uploads cannot take the authorities' slots).
    pub(crate) big_uploads_other: Arc<tokio::sync::Semaphore>,
    /// Source addresses treated as authorities (sorted).
    pub(crate) authority_addrs: Vec<std::net::IpAddr>,
    /// POST rate per source address and prefix.
    pub(crate) sources: Mutex<SourceLimiter>,
    /// HTTP connection slots.
    pub(crate) conns: Mutex<ConnLimiter>,
    /// HTTP connections accepted so far, by source address (at most
    /// [`MAX_COUNTED_SOURCES`] addresses; tests and directory-load measurements read it).
    pub(crate) accepted_by_ip: Mutex<std::collections::HashMap<std::net::IpAddr, u64>>,
    /// Refusal counters.
    pub(crate) limit_log: LimitLog,
    /// Descriptors accepted from an authority's address (exempt from the upload limits).
    pub(crate) desc_accepted_exempt: std::sync::atomic::AtomicU64,
    /// Descriptors accepted from any other address (charged to the upload limits).
    pub(crate) desc_accepted_charged: std::sync::atomic::AtomicU64,
    /// Whether the background prober runs (then a vote only re-probes stale relays).
    pub(super) background_probing: std::sync::atomic::AtomicBool,
}

/// Zlib-compress `bytes` (the `.z` form of the consensus); empty on failure.
fn compress(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    if e.write_all(bytes).is_err() {
        return Vec::new();
    }
    e.finish().unwrap_or_default()
}

/// Most distinct source addresses whose accepted connections are counted.
pub(crate) const MAX_COUNTED_SOURCES: usize = 4096;

impl Inner {
    /// Count an accepted HTTP connection from `ip` (addresses beyond
    /// [`MAX_COUNTED_SOURCES`] are not counted).
    pub(crate) fn note_accepted(&self, ip: std::net::IpAddr) {
        let mut m = self
            .accepted_by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_add(1);
        } else if m.len() < MAX_COUNTED_SOURCES {
            m.insert(ip, 1);
        }
    }

    /// The configuration as last reloaded (see `live`).
    pub(crate) fn live_cfg(&self) -> Arc<AuthorityConfig> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Take the reloadable keys from `new` (the others are ignored).
    pub(crate) fn reconfigure(&self, new: &AuthorityConfig) {
        let mut merged = (*self.live_cfg()).clone();
        merged.flags = new.flags.clone();
        merged.bad_exits = new.bad_exits.clone();
        merged.params = new.params.clone();
        merged.allow_private_addresses = new.allow_private_addresses;
        merged.max_relays = new.max_relays;
        merged.log_level = new.log_level.clone();
        merged.heartbeat_period_secs = new.heartbeat_period_secs;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
    }

    /// Open the data directory and load what a previous run stored.
    pub(crate) fn new(
        cfg: AuthorityConfig,
        keys: AuthorityKeys,
        reach: Arc<dyn Reachability>,
    ) -> Result<Self> {
        let store = Store::open(&cfg.data_dir)?;
        let mut ids = cfg.authority_ids();
        ids.sort();
        let now = now_unix();
        let mut st = State {
            descs: store.load_descriptors(),
            history: store.load_history(),
            sr: store.load_shared_random(),
            ..State::default()
        };
        st.descs.retain(|_, d| d.desc().expires > now);
        for c in store.load_certs() {
            if ids.contains(&c.identity()) {
                insert_cert(&mut st.certs, c);
            }
        }
        insert_cert(&mut st.certs, keys.cert.clone());
        let certs: Vec<VerifiedCert> = st.certs.values().cloned().collect();
        for v in store.load_votes() {
            for c in &certs {
                if let Ok(vv) = v.clone().verify(c, now) {
                    st.votes
                        .entry(vv.vote().valid_after)
                        .or_default()
                        .insert(vv.vote().authority, Arc::new(vv));
                    break;
                }
            }
        }
        // Only votes for the periods still accepted are kept (see `round::vote_window`).
        let (lo, _) = super::round::vote_window(now, cfg.voting_interval_secs);
        st.votes.retain(|p, _| *p >= lo);
        if let Some(c) = store.load_consensus(false)
            && let Ok(v) = c.clone().verify_signatures_only(&ids, &certs, now)
        {
            let va = v.consensus().valid_after;
            st.current = Some(published(c, va));
        }
        if let Some(c) = store.load_consensus(true)
            && let Ok(body) = c.dangerously_decode_unverified()
        {
            st.pending = Some((body.valid_after, c));
        }
        let l = &cfg.limits;
        let sources = SourceLimiter::new(SourceRates {
            addr_burst: l.upload_burst,
            addr_per_min: l.upload_per_min,
            prefix_burst: l.prefix_upload_burst,
            prefix_per_min: l.prefix_upload_per_min,
            max_sources: l.max_tracked_sources,
        });
        let conns = ConnLimiter::new(ConnCaps {
            total: cfg.max_connections,
            reserved: l.reserved_authority_connections,
            per_addr: l.max_connections_per_addr,
            per_prefix: l.max_connections_per_prefix,
        });
        let authority_addrs = cfg.authority_addrs();
        Ok(Self {
            authority_addrs,
            sources: Mutex::new(sources),
            conns: Mutex::new(conns),
            accepted_by_ip: Mutex::new(std::collections::HashMap::new()),
            limit_log: LimitLog::default(),
            desc_accepted_exempt: std::sync::atomic::AtomicU64::new(0),
            desc_accepted_charged: std::sync::atomic::AtomicU64::new(0),
            background_probing: std::sync::atomic::AtomicBool::new(false),
            big_uploads_other: Arc::new(tokio::sync::Semaphore::new(1)),
            live: std::sync::RwLock::new(Arc::new(cfg.clone())),
            cfg,
            keys,
            ids,
            reach,
            store,
            state: Mutex::new(st),
            probe_slots: Arc::new(tokio::sync::Semaphore::new(PROBE_CONCURRENCY)),
            big_uploads: Arc::new(tokio::sync::Semaphore::new(4)),
        })
    }

    /// Lock the state (a poisoned lock is taken over: every writer leaves it consistent).
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` is one of the authorities' addresses.
    pub(crate) fn is_authority_addr(&self, ip: std::net::IpAddr) -> bool {
        self.authority_addrs
            .binary_search(&super::limits::canonical(ip))
            .is_ok()
    }

    /// The other configured authorities.
    pub(super) fn peers(&self) -> Vec<(RelayId, std::net::SocketAddr)> {
        let me = self.keys.identity();
        self.cfg
            .authorities
            .iter()
            .filter(|a| a.identity != me)
            .map(|a| (a.identity, a.dir_addr))
            .collect()
    }

    /// The certificates held that are valid at `now`.
    pub(super) fn valid_certs(&self, now: u64) -> Vec<VerifiedCert> {
        self.lock()
            .certs
            .values()
            .filter(|c| c.is_valid_at(now))
            .cloned()
            .collect()
    }
}

/// The served form of a consensus.
pub(super) fn published(signed: Signed<Consensus>, valid_after: u64) -> Published {
    let bytes = signed.to_bytes();
    let z = compress(&bytes);
    Published {
        signed,
        valid_after,
        bytes: bytes.into(),
        z: z.into(),
    }
}

/// Keep the certificate with the latest expiry per authority.
pub(super) fn insert_cert(map: &mut BTreeMap<RelayId, VerifiedCert>, c: VerifiedCert) {
    match map.get(&c.identity()) {
        Some(old) if old.cert().expires >= c.cert().expires => {}
        _ => {
            map.insert(c.identity(), c);
        }
    }
}
