//! Bootstrap and directory freshness: fetch and verify the consensus, keep it fresh, and turn it
//! into the relay list path selection uses.

use std::sync::Arc;
use std::time::Duration;

use allium_crypto::hs::{TimePeriod, TimePeriodParams};
use allium_directory::client::{
    AuthorityInfo, ConsensusCache, FetchRole, Liveness, not_published_yet,
};
use allium_directory::doc::Flags;
use allium_directory::hs::{HsDirParams, HsDirRing, period_srv};
use allium_directory::{NetDir, now_unix};
use tokio::sync::watch;

use rand::seq::SliceRandom as _;

use crate::circmgr::CircMgr;
use crate::dirfetch::{self, Outcome};
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
    /// What onion services need from the consensus (issue 13).
    #[allow(dead_code)] // for the onion-service drivers (issue 13)
    pub(crate) hs: HsView,
    /// The consensus' `enforce_distinct_subnets` parameter is on (its default): see
    /// [`DirView::relaxed`].
    pub(crate) distinct_subnets: bool,
}

/// The onion-service part of a consensus: the HSDir ring's inputs.
#[derive(Debug, Clone)]
#[allow(dead_code)] // for the onion-service drivers (issue 13)
pub(crate) struct HsView {
    /// `hsdir_n_replicas`, `hsdir_spread_store`, `hsdir_spread_fetch`.
    pub(crate) params: HsDirParams,
    /// The time periods (`hsdir_interval`): every period, blinded key and ring position the
    /// onion-service drivers compute uses these, so a network with its own interval (the test
    /// network's 20 minutes) is followed by services and clients alike.
    pub(crate) period_params: TimePeriodParams,
    /// The consensus' `valid_after` (which shared random value a period uses depends on it).
    pub(crate) valid_after: u64,
    /// `shared-rand-current-value`, if the consensus carries one.
    pub(crate) srv_current: Option<[u8; 32]>,
    /// `shared-rand-previous-value`, if the consensus carries one.
    pub(crate) srv_previous: Option<[u8; 32]>,
}

impl Default for HsView {
    /// What a consensus without onion-service parameters gives.
    fn default() -> Self {
        Self {
            params: HsDirParams::default(),
            period_params: TimePeriodParams::DEFAULT,
            valid_after: 0,
            srv_current: None,
            srv_previous: None,
        }
    }
}

impl HsView {
    /// The onion-service inputs of consensus `c`.
    pub(crate) fn from_consensus(c: &allium_directory::doc::Consensus) -> Self {
        Self {
            params: HsDirParams::from_consensus(c),
            period_params: TimePeriodParams::from_consensus(
                c.params.get(TimePeriodParams::CONSENSUS_PARAM).copied(),
            ),
            valid_after: c.valid_after,
            srv_current: c.shared_rand.and_then(|s| s.current).map(|v| v.value),
            srv_previous: c.shared_rand.and_then(|s| s.previous).map(|v| v.value),
        }
    }

    /// The shared random value of `period`: the consensus' current or previous value by
    /// rend-spec-v3 §2.2.4's rule (`allium_directory::hs::period_srv`), or the disaster value when
    /// the consensus carries no fitting one.
    pub(crate) fn srv_for(&self, period: &TimePeriod) -> [u8; 32] {
        period_srv(
            period,
            self.valid_after,
            self.srv_current.as_ref(),
            self.srv_previous.as_ref(),
        )
    }
}

impl DirView {
    /// Whether path selection may put related relays (same /16, family) on one circuit: only in
    /// a test network (`test_network` in the configuration) whose consensus turns the
    /// `enforce_distinct_subnets` parameter off (every relay on one address). A test network
    /// whose relays sit on distinct loopback /16s keeps the parameter on, and with it the rule;
    /// outside test networks the rule always holds, whatever the parameter says.
    pub(crate) fn relaxed(&self, test_network: bool) -> bool {
        test_network && !self.distinct_subnets
    }

    /// The HSDir ring of `period`: the relays flagged HSDir, placed by the period's shared random
    /// value ([`HsView::srv_for`]: the consensus' current or previous value, or the disaster
    /// value when it has none).
    #[allow(dead_code)] // for the onion-service drivers (issue 13)
    pub(crate) fn hsdir_ring(&self, period: &TimePeriod) -> HsDirRing {
        HsDirRing::new(
            self.relays
                .iter()
                .filter(|r| r.usable() && r.flags.hsdir)
                .map(|r| r.id),
            &self.hs.srv_for(period),
            period,
        )
    }

    /// The relay with identity `id`, if listed.
    #[allow(dead_code)] // for the onion-service drivers (issue 13)
    pub(crate) fn relay(&self, id: &allium_crypto::RelayId) -> Option<&RelayInfo> {
        self.relays.iter().find(|r| r.id == *id)
    }
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
                hsdir: e.flags.contains(Flags::HSDIR),
            },
            weight: u64::from(e.weight),
            family: e.family.clone(),
            exit_ports: e.exit.accept.iter().map(|r| (r.lo, r.hi)).collect(),
        })
        .collect();
    DirView {
        relays,
        weights: PositionWeights::from_consensus(&nd.consensus().bandwidth_weights),
        hs: HsView::from_consensus(nd.consensus()),
        distinct_subnets: nd
            .param_or_default(allium_directory::netdir::params::ENFORCE_DISTINCT_SUBNETS)
            != 0,
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

/// Longest wait before asking a directory cache again when it had nothing newer.
const NOT_NEWER_MAX: Duration = Duration::from_secs(60);

/// Why a directory fetch failed.
#[derive(Debug)]
enum FetchError {
    /// From the authorities (HTTP), or the document did not verify.
    Dir(allium_directory::DirError),
    /// Over BEGIN_DIR (circuit, stream or cache).
    Client(crate::err::ClientError),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(e) => e.fmt(f),
            Self::Client(e) => e.fmt(f),
        }
    }
}

/// Fetch a newer consensus into `cache`. With a usable consensus (after bootstrap): only from a
/// primary guard over BEGIN_DIR, never from an authority. Without one (first bootstrap, or the
/// held one aged out): from the configured fallback directory caches over BEGIN_DIR (in random
/// order), then from the authorities' HTTP ports as the last resort.
///
/// `unusable`: the held consensus cannot carry a circuit (a network that is just starting):
/// then the guards are asked first and the other sources after them.
async fn fetch_once(
    mgr: &CircMgr,
    cache: &mut ConsensusCache,
    now: u64,
    unusable: bool,
) -> Result<Outcome, FetchError> {
    if mgr.has_dir() {
        let r = async {
            let (circ, _guard) = mgr.dir_circuit().await?;
            let r = dirfetch::fetch_consensus(&circ, cache, now).await;
            circ.close_with_destroy();
            r
        }
        .await;
        mgr.metrics.dir_fetch(0, r.is_ok());
        match r {
            Ok(Outcome::NotNewer) | Err(_) if unusable => {}
            r => return r.map_err(FetchError::Client),
        }
    }
    let mut fallbacks = mgr.config().fallback_dirs.clone();
    fallbacks.shuffle(&mut rand::rng());
    let timeout = mgr.config().circuit_build_timeout;
    for f in fallbacks.iter().take(MAX_FALLBACK_TRIES) {
        let relay = dirfetch::fallback_relay(f);
        let r = async {
            let circ = dirfetch::connect_one_hop(&relay, timeout).await?;
            let r = dirfetch::fetch_consensus(&circ, cache, now).await;
            circ.close_with_destroy();
            r
        }
        .await;
        mgr.metrics.dir_fetch(1, r.is_ok());
        match r {
            Ok(Outcome::Updated) => {
                tracing::info!("bootstrap: consensus fetched from a fallback directory cache");
                return Ok(Outcome::Updated);
            }
            Ok(Outcome::NotNewer) => {}
            Err(e) => tracing::debug!("fallback directory cache failed: {e}"),
        }
    }
    let r = cache.refresh(now).await.map(|_| Outcome::Updated);
    mgr.metrics.dir_fetch(2, r.is_ok());
    r.map_err(FetchError::Dir)
}

/// Fallback directory caches tried per bootstrap attempt before the authorities.
const MAX_FALLBACK_TRIES: usize = 3;

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
    let mut not_newer = Duration::from_secs(1);
    loop {
        let now = now_unix();
        let wait = if unusable || cache.needs_fetch(now) {
            match fetch_once(&mgr, &mut cache, now, unusable).await {
                Ok(Outcome::NotNewer) => {
                    // The cache has nothing newer yet: ask again later (doubling, capped), not
                    // in a tight loop.
                    tracing::debug!("the directory cache has no newer consensus yet");
                    let w = if unusable {
                        Duration::from_secs(1)
                    } else {
                        not_newer
                    };
                    not_newer = (not_newer * 2).min(NOT_NEWER_MAX);
                    w
                }
                Ok(Outcome::Updated) => {
                    not_newer = Duration::from_secs(1);
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
                Err(FetchError::Dir(e)) if not_published_yet(&e).is_some() => {
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
                Err(FetchError::Dir(e @ allium_directory::DirError::Config(_))) => {
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

    fn consensus(params: &[(&str, i32)]) -> allium_directory::doc::Consensus {
        allium_directory::doc::Consensus {
            version: 1,
            method: 1,
            valid_after: VU,
            fresh_until: VU + 3600,
            valid_until: VU + 3 * 3600,
            voters: vec![],
            params: params.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            relays: vec![],
            bandwidth_weights: Default::default(),
            shared_rand: None,
        }
    }

    #[test]
    fn onion_periods_follow_the_consensus_interval() {
        use crate::onion::OnionService;
        use crate::onion::client::descriptor_location;
        // hsdir_interval sets the periods; absent or out of range, the default.
        let v = HsView::from_consensus(&consensus(&[("hsdir_interval", 20)]));
        assert_eq!(v.period_params, TimePeriodParams::TESTNET);
        for bad in [
            &[][..],
            &[("hsdir_interval", 4)],
            &[("hsdir_interval", 14_401)],
        ] {
            let d = HsView::from_consensus(&consensus(bad));
            assert_eq!(d.period_params, TimePeriodParams::DEFAULT, "{bad:?}");
        }
        assert_eq!(HsView::default().period_params, TimePeriodParams::DEFAULT);

        // A service given the view's periods (as its driver does) publishes under the blinded
        // key a client computes from the same view; under the default periods it would not be
        // found.
        let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
        let mut svc = OnionService::new(
            allium_crypto::IdentityKeypair::from_seed(&[5; 32]),
            ports,
            vec![],
            TimePeriodParams::DEFAULT,
        )
        .expect("service");
        svc.set_period_params(v.period_params);
        let id = svc.add_intro_point(crate::onion::IntroRelay {
            id: allium_crypto::IdentityKeypair::from_seed(&[6; 32]).public(),
            link_key: allium_crypto::X25519Secret::from_bytes([7; 32]).public(),
            onion_key: allium_crypto::X25519Secret::from_bytes([8; 32]).public(),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 9000))],
        });
        svc.intro_established(id);
        let ups = svc.build_descriptors(VU).expect("descriptors");
        let loc = descriptor_location(svc.address(), &v.period_params, VU).expect("location");
        assert_eq!(loc.period.length_minutes, 20);
        let up = ups
            .iter()
            .find(|u| u.blinded == loc.blinded)
            .expect("published under the client's blinded key");
        assert_eq!(up.period, loc.period);
        let wrong =
            descriptor_location(svc.address(), &TimePeriodParams::DEFAULT, VU).expect("location");
        assert!(ups.iter().all(|u| u.blinded != wrong.blinded));
        // A new interval in a later consensus makes a descriptor due at once.
        assert!(!svc.descriptor_due(VU));
        svc.set_period_params(TimePeriodParams::with_length(60));
        assert!(svc.descriptor_due(VU));
    }
}
