//! Bootstrap and directory freshness: fetch and verify the consensus, keep it fresh, and turn it
//! into the relay list path selection uses.

use std::sync::Arc;
use std::time::Duration;

use allium_directory::client::{
    AuthorityInfo, ConsensusCache, FetchRole, Liveness, not_published_yet,
};
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

/// How often the warning about using an expired consensus is repeated.
const EXPIRED_WARNING_EVERY: u64 = 3600;

/// What the running client does about the age of the consensus it holds.
#[derive(Debug, PartialEq, Eq)]
enum ExpiryAction {
    /// Nothing to say.
    Nothing,
    /// Keep using it, with this warning.
    Warn(String),
    /// Stop using it (more than 24 h past valid-until), with this warning.
    Drop(String),
}

/// Tor's rule for a running client at `now`: warn (at most every [`EXPIRED_WARNING_EVERY`])
/// while an expired consensus is used, and drop one that expired more than 24 hours ago.
/// `last_warned` is the time of the last warning (0: never).
fn expiry_action(
    liveness: Option<Liveness>,
    has_dir: bool,
    now: u64,
    last_warned: &mut u64,
) -> ExpiryAction {
    match liveness {
        Some(l @ Liveness::Expired { .. }) => {
            if *last_warned != 0 && now.saturating_sub(*last_warned) < EXPIRED_WARNING_EVERY {
                return ExpiryAction::Nothing;
            }
            *last_warned = now;
            l.warning()
                .map_or(ExpiryAction::Nothing, ExpiryAction::Warn)
        }
        Some(Liveness::TooOld { expired_at }) if has_dir => ExpiryAction::Drop(format!(
            "the consensus expired at {} (more than 24 hours ago) and is no longer used; no \
             circuits can be built until a newer one arrives; check that a majority of \
             authorities is running",
            allium_directory::time_fmt::rfc3339(expired_at)
        )),
        Some(Liveness::TooOld { .. }) => ExpiryAction::Nothing,
        _ => {
            *last_warned = 0;
            ExpiryAction::Nothing
        }
    }
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
    let mut expiry_warned = 0u64;
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
                Err(e) if not_published_yet(&e).is_some() => {
                    // A network that is just starting: say when, not "check the configuration".
                    if failures.is_multiple_of(60) {
                        tracing::info!(
                            "the authorities have not published a consensus yet: {}",
                            not_published_yet(&e).unwrap_or_default()
                        );
                    }
                    failures = failures.saturating_add(1);
                    Duration::from_secs(1)
                }
                Err(e @ allium_directory::DirError::Config(_)) => {
                    tracing::warn!("could not use the consensus: {e}");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    w
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
                        "could not fetch a consensus ({e}); retrying in {}s. Check that the \
                         authorities are running and reachable from here",
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
        let now = now_unix();
        match expiry_action(cache.liveness(now), mgr.has_dir(), now, &mut expiry_warned) {
            ExpiryAction::Nothing => {}
            ExpiryAction::Warn(w) => tracing::warn!("{w}"),
            ExpiryAction::Drop(w) => {
                mgr.clear_dir();
                tracing::warn!("{w}");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VU: u64 = 1_800_000_000;

    #[test]
    fn running_client_warns_while_expired_then_drops_it() {
        let mut warned = 0;
        let expired = Some(Liveness::Expired {
            expired_at: VU,
            usable_until: VU + 86400,
        });
        let ExpiryAction::Warn(w) = expiry_action(expired, true, VU + 60, &mut warned) else {
            panic!("first warning");
        };
        assert!(w.starts_with("consensus expired at 2027-01-15T08:00:00Z; using it until"));
        // Not repeated within the hour, repeated after it.
        assert_eq!(
            expiry_action(expired, true, VU + 120, &mut warned),
            ExpiryAction::Nothing
        );
        assert!(matches!(
            expiry_action(expired, true, VU + 60 + 3600, &mut warned),
            ExpiryAction::Warn(_)
        ));
        // Past 24 hours: dropped once (then there is no relay list to drop).
        let too_old = Some(Liveness::TooOld { expired_at: VU });
        let ExpiryAction::Drop(w) = expiry_action(too_old, true, VU + 86401, &mut warned) else {
            panic!("dropped");
        };
        assert!(w.contains("no longer used"), "{w}");
        assert_eq!(
            expiry_action(too_old, false, VU + 86402, &mut warned),
            ExpiryAction::Nothing
        );
        // A live one resets the warning clock.
        assert_eq!(
            expiry_action(Some(Liveness::Live), true, VU + 90000, &mut warned),
            ExpiryAction::Nothing
        );
        assert_eq!(warned, 0);
    }
}
