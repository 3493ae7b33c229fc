//! Bootstrap and directory freshness: fetch and verify the consensus, keep it fresh, and turn it
//! into the relay list path selection uses.

use std::sync::Arc;
use std::time::Duration;

use allium_directory::client::{AuthorityInfo, ConsensusCache, FetchRole};
use allium_directory::doc::Flags;
use allium_directory::{NetDir, now_unix};
use tokio::sync::watch;

use crate::circmgr::CircMgr;
use crate::path::{PositionWeights, RelayFlags, RelayInfo};

/// The consensus file in the data directory.
pub const CACHE_FILE: &str = "consensus.cache";

/// The relays of one verified consensus, ready for path selection.
#[derive(Debug)]
pub(crate) struct DirView {
    /// Every relay listed.
    pub(crate) relays: Vec<RelayInfo>,
    /// The consensus' position weights.
    pub(crate) weights: PositionWeights,
}

/// Convert a verified consensus.
pub(crate) fn view_from(nd: &NetDir) -> DirView {
    let relays = nd
        .relays()
        .iter()
        .map(|e| RelayInfo {
            id: e.identity,
            link_key: e.link_key,
            onion_key: e.onion_key,
            addrs: e.addrs.clone(),
            flags: RelayFlags {
                running: e.flags.contains(Flags::RUNNING),
                valid: e.flags.contains(Flags::VALID),
                guard: e.flags.contains(Flags::GUARD),
                exit: e.flags.contains(Flags::EXIT),
                bad_exit: e.flags.contains(Flags::BAD_EXIT),
                fast: e.flags.contains(Flags::FAST),
                stable: e.flags.contains(Flags::STABLE),
            },
            weight: u64::from(e.weight),
            family: e.family.clone(),
            exit_ports: e.exit.accept.iter().map(|r| (r.lo, r.hi)).collect(),
        })
        .collect();
    DirView {
        relays,
        weights: PositionWeights::from_consensus(&nd.consensus().bandwidth_weights),
    }
}

fn summary(v: &DirView) -> (usize, usize, usize) {
    let usable = v.relays.iter().filter(|r| r.usable()).count();
    let exits = v.relays.iter().filter(|r| r.is_exit_for(&[])).count();
    let guards = v
        .relays
        .iter()
        .filter(|r| r.usable() && r.flags.guard)
        .count();
    (usable, exits, guards)
}

/// Fetch the consensus now (or use a valid cached one), then again on Tor's client schedule.
#[allow(clippy::disallowed_methods)] // the directory fetch driver sleeps until the next fetch
pub(crate) async fn run(
    mgr: Arc<CircMgr>,
    authorities: Vec<AuthorityInfo>,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = mgr.config().data_dir.join(CACHE_FILE);
    let mut cache = ConsensusCache::open(Some(&path), authorities, FetchRole::Client, now_unix());
    if let Some(nd) = cache.netdir(now_unix()) {
        let v = view_from(&nd);
        let (u, e, g) = summary(&v);
        tracing::info!(
            "bootstrap 40%: using the cached consensus ({u} usable relays, {e} exits, {g} guards)"
        );
        mgr.metrics.consensus(nd.valid_after());
        mgr.set_dir(v);
    } else {
        tracing::info!("bootstrap 10%: fetching the consensus from the authorities");
    }
    let mut backoff = Duration::from_secs(1);
    let mut failures = 0u32;
    // Set while the held consensus cannot carry a circuit (no exit, no guard or fewer than three
    // relays: a network that is just starting). Then a newer one is asked for every second rather
    // than on the freshness schedule.
    let mut unusable = false;
    loop {
        let now = now_unix();
        let wait = if unusable || cache.needs_fetch(now) {
            match cache.refresh(now).await {
                Ok(_) => {
                    backoff = Duration::from_secs(1);
                    failures = 0;
                    match cache.netdir(now_unix()) {
                        Some(nd) => {
                            let v = view_from(&nd);
                            let (u, e, g) = summary(&v);
                            if mgr.has_dir() {
                                tracing::debug!(
                                    "new consensus: {u} usable relays, {e} exits, {g} guards"
                                );
                            } else {
                                tracing::info!(
                                    "bootstrap 40%: consensus verified ({u} usable relays, {e} exits, {g} guards)"
                                );
                            }
                            unusable = u < 3 || e == 0 || g == 0;
                            mgr.metrics.consensus(nd.valid_after());
                            mgr.set_dir(v);
                        }
                        None => tracing::warn!(
                            "the fetched consensus is not valid now; check this machine's clock"
                        ),
                    }
                    if unusable {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(
                            cache
                                .next_fetch_at()
                                .saturating_sub(now_unix())
                                .clamp(1, 3600),
                        )
                    }
                }
                Err(e) if unusable => {
                    tracing::debug!("no newer consensus yet ({e})");
                    Duration::from_secs(1)
                }
                Err(e) if failures < 10 => {
                    // Authorities of a network that is just starting have no consensus yet: ask
                    // again every second for a while before backing off.
                    failures += 1;
                    tracing::info!("no consensus yet ({e}); retrying in 1s");
                    Duration::from_secs(1)
                }
                Err(e) => {
                    tracing::warn!(
                        "could not fetch a consensus ({e}); retrying in {}s. Check the authority addresses and identities in the configuration",
                        backoff.as_secs()
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    w
                }
            }
        } else {
            Duration::from_secs(cache.next_fetch_at().saturating_sub(now).clamp(1, 3600))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
