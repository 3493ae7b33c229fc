//! Talking to the directory authorities: descriptor publication, consensus fetching, onion-key
//! rotation.
//!
//! - The signed descriptor is uploaded to every authority at start, every
//!   `descriptor_publish_interval_secs`, and right after an onion-key rotation. Failed uploads are
//!   retried with backoff (1 s doubling to 30 s) until every authority has it.
//! - The consensus is fetched at start (retried every few seconds until one verifies), then at a
//!   random time in `[fresh_until, fresh_until + spread)` where `spread` is Tor's cache window
//!   `interval/2`, widened on large networks with short periods so that all relays together
//!   fetch at most [`MAX_FETCHES_PER_AUTHORITY`] times a second from each authority
//!   ([`fetch_spread`]); and early when an unknown relay shows up (at most once per
//!   [`FORCED_FETCH_MIN_GAP`]). Until a consensus lists this relay it still accepts links and
//!   circuits.
//! - Before the first upload the relay tests its own reachability ([`crate::selftest`]).
//! - Each consensus is checked for this relay: entering it (with its flags), a change of flags,
//!   leaving it, and not appearing although the descriptor was accepted long enough ago, are
//!   logged with the likely reason ([`Membership`]).
//! - An expired consensus is used for 24 hours past valid-until with a warning, then dropped
//!   (Tor's rule, [`Liveness`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use allium_directory::client::{
    AuthorityInfo, ConsensusCache, FetchRole, Liveness, not_published_yet, upload_descriptor_to_all,
};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::policy::ExitPolicy as DescPolicy;
use allium_directory::doc::{Consensus, Flags};
use allium_directory::doc::{RelayDescriptor, Signed};
use allium_directory::now_unix;
use allium_directory::time_fmt::rfc3339;
use allium_directory::{DirError, NetDir};
use tokio::sync::Notify;

use crate::ctx::Ctx;
use crate::err::RelayError;

/// Minimum gap between consensus fetches triggered by unknown relays.
pub const FORCED_FETCH_MIN_GAP: Duration = Duration::from_secs(30);
/// The relays' fetch rate at each authority that [`fetch_spread`] keeps below (fetches per
/// second, every relay of the consensus counted). Tor's hourly consensus spreads 7,000 caches'
/// fetches over half an hour: about 4 a second in all. A 1,000-relay test network with a 2-second
/// voting interval and Tor's window would send each authority about 170 a second.
pub const MAX_FETCHES_PER_AUTHORITY: u64 = 20;

/// The width of the random window after `fresh_until` in which a relay fetches the next
/// consensus: `interval/2` (Tor's cache schedule, dir-spec §5.1), or wide enough that `relays`
/// relays each fetching once in the window send each of `authorities` authorities at most
/// [`MAX_FETCHES_PER_AUTHORITY`] fetches a second, whichever is longer. On an hourly network it
/// is always `interval/2`; on a 1,000-relay, 2-second test network relays lag the authorities by
/// up to 17 s (well within a consensus' validity plus clock-skew allowance).
pub fn fetch_spread(interval: u64, relays: usize, authorities: usize) -> u64 {
    let relays = u64::try_from(relays).unwrap_or(u64::MAX);
    let per_sec = MAX_FETCHES_PER_AUTHORITY.saturating_mul(authorities.max(1) as u64);
    (interval / 2).max(relays.div_ceil(per_sec))
}

/// When to fetch the consensus after `c`: a random time (`random` drawn uniformly) in
/// `[fresh_until, fresh_until + fetch_spread)`.
pub fn next_fetch_at(c: &Consensus, authorities: usize, random: u64) -> u64 {
    let interval = c.fresh_until.saturating_sub(c.valid_after);
    let spread = fetch_spread(interval, c.relays.len(), authorities);
    c.fresh_until
        .saturating_add(if spread == 0 { 0 } else { random % spread })
}

/// Retry interval while no consensus is held.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(2);

/// How long the consensus task sleeps, and whether a forced fetch is due when it wakes: the
/// regular wait (`regular`: the bootstrap retry, or until the next scheduled fetch), cut short
/// by a forced fetch that an unknown relay asked for (`force_at`: when
/// [`FORCED_FETCH_MIN_GAP`] after the last forced fetch allows it). A forced fetch held back by
/// the gap never holds back the regular schedule: before the first consensus the relay keeps
/// retrying every [`BOOTSTRAP_RETRY`] however many unknown relays it meets (it would otherwise
/// sit without a consensus, refusing every EXTEND, for the whole gap).
fn consensus_wait(
    regular: Duration,
    force_at: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> (Duration, bool) {
    match force_at {
        Some(at) if at.saturating_duration_since(now) < regular => {
            (at.saturating_duration_since(now), true)
        }
        _ => (regular, false),
    }
}
/// Descriptor lifetime.
const DESC_LIFETIME_SECS: u64 = 2 * 24 * 3600;
/// Bandwidth reported before anything was measured.
const DEFAULT_OBSERVED_BW: u64 = 1024 * 1024;

/// Directory-related state.
#[derive(Debug, Default)]
pub(crate) struct DirState {
    /// `published` of the last descriptor (strictly increasing).
    last_published: AtomicU64,
    /// Highest 10-second average throughput seen (bytes/s).
    peak_bw: AtomicU64,
    /// Wakes the publisher.
    pub(crate) republish: Notify,
    /// The last descriptor uploaded (envelope bytes), for tests and `allium testnet`.
    pub(crate) last_descriptor: Mutex<Option<Vec<u8>>>,
    /// When an authority first accepted a descriptor (unix seconds; 0: not yet).
    first_accepted: AtomicU64,
    /// The reachability self-test.
    pub(crate) selftest: crate::selftest::SelfTestState,
}

pub(crate) fn authorities(ctx: &Ctx) -> Vec<AuthorityInfo> {
    ctx.cfg.authorities.clone()
}

/// The descriptor's view of the exit policy.
pub(crate) fn desc_policy(ctx: &Ctx) -> DescPolicy {
    ctx.exit_policy().descriptor_policy()
}

/// Build and sign the current descriptor.
pub(crate) fn build_descriptor(ctx: &Ctx) -> Result<Vec<u8>, RelayError> {
    let now = now_unix();
    let prev = ctx.dir.last_published.load(Ordering::Relaxed);
    let published = now.max(prev.saturating_add(1));
    ctx.dir.last_published.store(published, Ordering::Relaxed);
    let live = ctx.live();
    let mut family = live.family_ids()?;
    family.retain(|f| !f.ct_eq(&ctx.keys.id));
    family.sort();
    family.dedup();
    let peak = ctx.dir.peak_bw.load(Ordering::Relaxed);
    let observed = match (live.bandwidth_rate, peak) {
        (0, 0) => DEFAULT_OBSERVED_BW,
        (0, p) => p,
        (r, 0) => r.min(DEFAULT_OBSERVED_BW.max(r)),
        (r, p) => r.min(p.max(DEFAULT_OBSERVED_BW)),
    };
    let desc = RelayDescriptor {
        version: DESC_VERSION,
        identity: ctx.keys.id,
        link_key: ctx.keys.link.public(),
        onion_key: ctx.keys.onion_public(),
        nickname: live.nickname.clone(),
        addrs: vec![ctx.advertised],
        bandwidth_observed: ctx.cfg.test_advertise_bandwidth.unwrap_or(observed),
        exit_policy: desc_policy(ctx),
        family,
        protocols: default_protocols(),
        contact: live.contact.clone(),
        published,
        expires: published.saturating_add(DESC_LIFETIME_SECS),
    };
    let signed = Signed::sign(&desc, &ctx.keys.identity)
        .map_err(|e| RelayError::Descriptor(e.to_string()))?;
    Ok(signed.to_bytes())
}

/// Upload the descriptor now; returns how many authorities accepted it (and, when none did,
/// the first refusal, for the operator's warning).
pub(crate) async fn publish_once(ctx: &Ctx) -> (usize, Option<String>) {
    let auths = authorities(ctx);
    let bytes = match build_descriptor(ctx) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build descriptor");
            return (0, None);
        }
    };
    *ctx.dir
        .last_descriptor
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(bytes.clone());
    if auths.is_empty() {
        return (0, None);
    }
    let (ok, errs) = upload_descriptor_to_all(&auths, &bytes).await;
    if ok > 0 {
        let _ = ctx.dir.first_accepted.compare_exchange(
            0,
            now_unix(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for (id, e) in &errs {
        tracing::debug!(authority = %id, error = %e, "descriptor upload failed");
    }
    if errs.is_empty() {
        tracing::info!(authorities = ok, "descriptor published");
    }
    let why = auths.iter().find_map(|a| {
        errs.iter()
            .find(|(id, _)| *id == a.identity)
            .map(|(_, e)| format!("{}: {e}", a.dir_addr))
    });
    (ok, why)
}

/// Publisher task.
#[allow(clippy::disallowed_methods)] // Driver task: its schedule is wall-clock time.
pub(crate) async fn run_publisher(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let n = authorities(&ctx).len();
    let interval = Duration::from_secs(ctx.cfg.descriptor_publish_interval_secs);
    let mut backoff = Duration::from_secs(1);
    let mut failures: u32 = 0;
    // Tor's order: test reachability before the first upload (then keep retrying on failure).
    crate::selftest::test_and_log(&ctx, crate::selftest::first_retry(&ctx)).await;
    loop {
        let (ok, why) = publish_once(&ctx).await;
        if n > 0 && ok == 0 {
            failures = failures.saturating_add(1);
            if failures == 1 || failures.is_multiple_of(20) {
                tracing::warn!(
                    authorities = n,
                    attempts = failures,
                    "no authority accepted the descriptor ({}); retrying (check that the \
                     authorities are running, reachable from here at their `dir_addr`, and \
                     what they answered)",
                    why.as_deref().unwrap_or("no answer")
                );
            }
        } else {
            failures = 0;
        }
        let wait = if n > 0 && ok < n {
            let w = backoff.min(interval);
            backoff = (backoff * 2).min(Duration::from_secs(30));
            w
        } else {
            backoff = Duration::from_secs(1);
            interval
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = ctx.dir.republish.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What the relay knows about its own place in the consensus, for notices when it changes.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    /// The flags of the last consensus that listed this relay (`None`: not listed in it).
    listed: Option<Flags>,
    /// `valid_after` of the last consensus looked at.
    last_va: u64,
    /// Whether the "still not listed" warning was given for the current absence.
    absence_warned: bool,
}

/// How many voting periods after its descriptor was first accepted a relay should appear.
const PERIODS_TO_APPEAR: u64 = 2;

impl Membership {
    /// Look at a new consensus. `first_accepted` is when an authority first accepted this
    /// relay's descriptor (0: never). Returns the notices to log: `(warn?, text)`.
    pub(crate) fn observe(
        &mut self,
        c: &Consensus,
        me: &allium_crypto::RelayId,
        advertised: std::net::SocketAddr,
        first_accepted: u64,
    ) -> Vec<(bool, String)> {
        if c.valid_after <= self.last_va {
            return Vec::new();
        }
        self.last_va = c.valid_after;
        let mut out = Vec::new();
        let va = rfc3339(c.valid_after);
        let entry = c
            .relays
            .binary_search_by(|e| e.identity.cmp(me))
            .ok()
            .and_then(|i| c.relays.get(i));
        match (self.listed, entry) {
            (None, Some(e)) => {
                self.absence_warned = false;
                out.push((
                    false,
                    format!(
                        "this relay is in the consensus of {va} with flags [{}]",
                        e.flags
                    ),
                ));
            }
            (Some(old), Some(e)) if old != e.flags => out.push((
                false,
                format!(
                    "this relay's flags changed in the consensus of {va}: [{old}] -> [{}]",
                    e.flags
                ),
            )),
            (Some(_), None) => {
                self.absence_warned = true;
                out.push((
                    true,
                    format!(
                        "this relay is no longer in the consensus of {va}; likely the \
                         authorities could not reach {advertised} (check that the relay is \
                         reachable there: port forwarding, firewall, the `advertised` key) or \
                         did not receive its descriptor"
                    ),
                ));
            }
            (None, None) => {
                let period = c.fresh_until.saturating_sub(c.valid_after).max(1);
                let due = first_accepted.saturating_add(PERIODS_TO_APPEAR.saturating_mul(period));
                if first_accepted != 0 && c.valid_after > due && !self.absence_warned {
                    self.absence_warned = true;
                    out.push((
                        true,
                        format!(
                            "this relay is still not in the consensus of {va}, although \
                             authorities accepted its descriptor at {}; likely the \
                             authorities cannot reach {advertised} (check port forwarding, the \
                             firewall and the `advertised` key), or they refuse its address \
                             (a private address needs `allow_private_addresses` on a test \
                             network)",
                            rfc3339(first_accepted)
                        ),
                    ));
                }
            }
            _ => {}
        }
        if let Some(e) = entry
            && !e.addrs.contains(&advertised)
        {
            out.push((
                true,
                format!(
                    "the consensus lists this relay at {} but it advertises {advertised}; \
                     another process may be publishing this identity (two relays on one \
                     data directory?)",
                    e.addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        self.listed = entry.map(|e| e.flags);
        out
    }
}

/// Use a consensus: install it, log this relay's membership changes.
fn install_netdir(ctx: &Ctx, nd: NetDir, membership: &mut Membership) {
    let first = ctx.dir.first_accepted.load(Ordering::Relaxed);
    for (warn, text) in membership.observe(nd.consensus(), &ctx.keys.id, ctx.advertised, first) {
        if warn {
            tracing::warn!("{text}");
        } else {
            tracing::info!("{text}");
        }
    }
    ctx.set_netdir(nd);
}

/// Put the held (verified) consensus and its certificates into the directory archive this
/// relay serves over BEGIN_DIR.
fn archive_current(ctx: &Ctx, cache: &ConsensusCache) {
    let (Some((consensus, certs)), Some(v)) = (cache.current_raw(), cache.current()) else {
        return;
    };
    let va = v.consensus().valid_after;
    let mut archive = ctx.dir_archive.write().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = archive.insert(&consensus, va, &certs) {
        tracing::warn!("could not add the consensus to the directory cache: {e}");
    }
}

/// Consensus task.
#[allow(clippy::disallowed_methods)] // Driver task: its schedule is wall-clock time.
pub(crate) async fn run_consensus(ctx: Arc<Ctx>) {
    let auths = authorities(&ctx);
    if auths.is_empty() {
        return;
    }
    let n_auths = auths.len();
    let mut shutdown = ctx.shutdown.subscribe();
    let path = ctx.cfg.data_dir.join("consensus.cache");
    let mut cache = ConsensusCache::open(Some(&path), auths, FetchRole::Cache, now_unix());
    let mut membership = Membership::default();
    if let Some(nd) = cache.netdir(now_unix()) {
        tracing::info!(valid_after = nd.valid_after(), "using the cached consensus");
        install_netdir(&ctx, nd, &mut membership);
        archive_current(&ctx, &cache);
    }
    let mut last_forced = tokio::time::Instant::now() - FORCED_FETCH_MIN_GAP;
    // A forced fetch asked for but held back by the gap: when it may run.
    let mut force_at: Option<tokio::time::Instant> = None;
    let mut force = false;
    let mut failures: u32 = 0;
    let mut expiry_warned: u64 = 0;
    let mut next_fetch = cache
        .current()
        .map(|v| next_fetch_at(v.consensus(), n_auths, allium_crypto::rng::random_u64()))
        .unwrap_or(0);
    loop {
        let now = now_unix();
        if force || cache.current().is_none() || now >= next_fetch {
            // This fetch also answers any forced fetch still waiting for the gap.
            force_at = None;
            match cache.refresh(now).await {
                Ok(v) => {
                    failures = 0;
                    next_fetch =
                        next_fetch_at(v.consensus(), n_auths, allium_crypto::rng::random_u64());
                    tracing::info!(relays = v.consensus().relays.len(), "consensus updated");
                    if let Some(nd) = cache.netdir(now_unix()) {
                        install_netdir(&ctx, nd, &mut membership);
                    }
                    archive_current(&ctx, &cache);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if let Some(why) = not_published_yet(&e) {
                        if failures == 1 {
                            tracing::info!(
                                "the authorities have not published a consensus yet: {why}"
                            );
                        }
                    } else if matches!(e, DirError::Config(_)) {
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!("cannot use the consensus: {e}");
                        }
                    } else if cache.current().is_none() && failures == 30 {
                        tracing::warn!(
                            error = %e,
                            "still no consensus after 30 attempts; the relay keeps accepting \
                             links but cannot extend circuits (check that the authorities are \
                             running and reachable from here)"
                        );
                    } else {
                        tracing::debug!(error = %e, "consensus fetch failed");
                    }
                }
            }
        }
        force = false;
        let now = now_unix();
        match cache.liveness(now) {
            Some(l @ Liveness::Expired { .. }) => {
                if expiry_warned == 0 || now.saturating_sub(expiry_warned) >= 3600 {
                    expiry_warned = now;
                    if let Some(w) = l.warning() {
                        tracing::warn!("{w}");
                    }
                }
            }
            Some(Liveness::TooOld { expired_at }) if ctx.netdir().is_some() => {
                *ctx.netdir.write().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::warn!(
                    "the consensus expired at {} (more than 24 hours ago) and is no longer used; \
                     this relay cannot extend circuits until a newer one arrives; check that a \
                     majority of authorities is running",
                    rfc3339(expired_at)
                );
            }
            _ => expiry_warned = 0,
        }
        let wait = if cache.current().is_none() {
            BOOTSTRAP_RETRY
        } else if !cache.liveness(now).is_some_and(|l| l == Liveness::Live) {
            // Expired: ask again often for a newer one.
            BOOTSTRAP_RETRY.max(Duration::from_secs(30))
        } else {
            Duration::from_secs(next_fetch.saturating_sub(now).clamp(1, 600))
        };
        let (sleep_for, forced) = consensus_wait(wait, force_at, tokio::time::Instant::now());
        tokio::select! {
            () = tokio::time::sleep(sleep_for) => {
                if forced {
                    last_forced = tokio::time::Instant::now();
                    force = true;
                }
            }
            () = ctx.refetch.notified() => {
                let allowed = last_forced + FORCED_FETCH_MIN_GAP;
                if tokio::time::Instant::now() >= allowed {
                    last_forced = tokio::time::Instant::now();
                    force = true;
                } else {
                    force_at = Some(allowed);
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Onion-key rotation task (and the throughput sampler for `bandwidth_observed`).
#[allow(clippy::disallowed_methods)] // Driver task: key age is wall-clock time.
pub(crate) async fn run_maintenance(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let rotation = ctx.cfg.onion_rotation();
    let sample = Duration::from_secs(10);
    let mut last_bytes = ctx.stats.bytes_read();
    loop {
        let age = ctx.keys.onion_age(SystemTime::now());
        if age >= rotation {
            match ctx.keys.rotate_onion() {
                Ok(()) => {
                    tracing::info!("onion key rotated; republishing the descriptor");
                    ctx.dir.republish.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "onion key rotation failed"),
            }
            continue;
        }
        let wait = (rotation - age).min(sample);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let bytes = ctx.stats.bytes_read();
        let rate = bytes.saturating_sub(last_bytes) / sample.as_secs().max(1);
        last_bytes = bytes;
        ctx.dir.peak_bw.fetch_max(rate, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use allium_crypto::{IdentityKeypair, X25519Secret};
    use allium_directory::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
    use allium_directory::doc::{ConsensusEntry, ExitPolicy};

    use super::*;

    const VA: u64 = 1_800_000_000;
    const I: u64 = 3600;

    fn consensus(va: u64, me: Option<(allium_crypto::RelayId, Flags, &str)>) -> Consensus {
        let relays = me
            .map(|(id, flags, addr)| ConsensusEntry {
                identity: id,
                link_key: X25519Secret::generate().public(),
                onion_key: X25519Secret::generate().public(),
                nickname: "me".into(),
                addrs: vec![addr.parse().expect("addr")],
                flags,
                weight: 1,
                exit: ExitPolicy::reject_all(),
                family: vec![],
                measured: true,
            })
            .into_iter()
            .collect();
        Consensus {
            version: CONSENSUS_VERSION,
            method: CONSENSUS_METHOD,
            valid_after: va,
            fresh_until: va + I,
            valid_until: va + 3 * I,
            voters: vec![],
            params: BTreeMap::new(),
            relays,
            shared_rand: None,
            bandwidth_weights: BTreeMap::new(),
        }
    }

    #[test]
    fn fetch_spread_is_tors_window_unless_the_authorities_would_be_flooded() {
        // Hourly consensus: Tor's half interval, whatever the size.
        assert_eq!(fetch_spread(3600, 7000, 9), 1800);
        assert_eq!(fetch_spread(3600, 1000, 3), 1800);
        // A small test network keeps the half interval.
        assert_eq!(fetch_spread(2, 20, 3), 1);
        // 1,000 relays, 2-second periods, 3 authorities: 1000 / 60 per second.
        assert_eq!(fetch_spread(2, 1000, 3), 17);
        assert_eq!(fetch_spread(2, 1000, 0), 50);
        // The rate it bounds: each relay fetches once per window, at most.
        for (n, a) in [(1000usize, 3usize), (5000, 5), (61, 3)] {
            let spread = fetch_spread(2, n, a).max(1);
            assert!(n as u64 / spread <= MAX_FETCHES_PER_AUTHORITY * a as u64);
        }
    }

    #[test]
    fn next_fetch_is_in_the_window() {
        let mut c = consensus(1_800_000_000, None);
        c.fresh_until = c.valid_after + 2;
        let spread = fetch_spread(2, c.relays.len(), 3);
        for r in [0u64, 1, 7, u64::MAX] {
            let t = next_fetch_at(&c, 3, r);
            assert!(
                t >= c.fresh_until && t < c.fresh_until + spread.max(1),
                "{t}"
            );
        }
    }

    #[test]
    fn membership_notices() {
        let id = IdentityKeypair::generate().public();
        let adv: std::net::SocketAddr = "192.0.2.1:9001".parse().expect("addr");
        let mut m = Membership::default();
        let accepted = VA - 10;
        // Not listed within the first periods after the upload: nothing to say yet.
        assert!(
            m.observe(&consensus(VA, None), &id, adv, accepted)
                .is_empty()
        );
        assert!(
            m.observe(&consensus(VA + I, None), &id, adv, accepted)
                .is_empty()
        );
        // Still not listed later: one warning with the likely reason.
        let n = m.observe(&consensus(VA + 3 * I, None), &id, adv, accepted);
        assert_eq!(n.len(), 1);
        assert!(
            n[0].0 && n[0].1.contains("still not in the consensus"),
            "{n:?}"
        );
        assert!(n[0].1.contains("cannot reach 192.0.2.1:9001"), "{n:?}");
        assert!(
            m.observe(&consensus(VA + 4 * I, None), &id, adv, accepted)
                .is_empty()
        );
        // Enters with flags (notice), flags change (notice), then leaves (warning).
        let rv = Flags::RUNNING | Flags::VALID;
        let n = m.observe(
            &consensus(VA + 5 * I, Some((id, rv, "192.0.2.1:9001"))),
            &id,
            adv,
            accepted,
        );
        assert_eq!(n.len(), 1);
        assert!(!n[0].0 && n[0].1.contains("is in the consensus") && n[0].1.contains("Running"));
        let same = m.observe(
            &consensus(VA + 6 * I, Some((id, rv, "192.0.2.1:9001"))),
            &id,
            adv,
            accepted,
        );
        assert!(same.is_empty());
        let n = m.observe(
            &consensus(VA + 7 * I, Some((id, rv | Flags::FAST, "192.0.2.1:9001"))),
            &id,
            adv,
            accepted,
        );
        assert!(!n[0].0 && n[0].1.contains("flags changed") && n[0].1.contains("Fast"));
        // An old consensus again says nothing.
        assert!(
            m.observe(&consensus(VA, None), &id, adv, accepted)
                .is_empty()
        );
        let n = m.observe(&consensus(VA + 8 * I, None), &id, adv, accepted);
        assert!(
            n[0].0 && n[0].1.contains("no longer in the consensus"),
            "{n:?}"
        );
        // Listed at another address: warned.
        let n = m.observe(
            &consensus(VA + 9 * I, Some((id, rv, "192.0.2.9:9001"))),
            &id,
            adv,
            accepted,
        );
        assert!(
            n.iter()
                .any(|(w, t)| *w && t.contains("lists this relay at 192.0.2.9:9001"))
        );
        // A relay whose descriptor was never accepted is not told it is missing.
        let mut m = Membership::default();
        assert!(
            m.observe(&consensus(VA + 9 * I, None), &id, adv, 0)
                .is_empty()
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // Only an origin: consensus_wait is arithmetic on it.
    fn a_held_back_forced_fetch_never_delays_the_regular_schedule() {
        let now = tokio::time::Instant::now();
        let secs = Duration::from_secs;
        // Nothing forced: the regular wait.
        assert_eq!(
            consensus_wait(BOOTSTRAP_RETRY, None, now),
            (BOOTSTRAP_RETRY, false)
        );
        // Before the first consensus, an unknown relay 1 s after the last forced fetch: the gap
        // holds the forced fetch back 29 s, the bootstrap retry still comes in 2 s (it used to
        // wait out the whole gap, refusing every EXTEND meanwhile).
        let held = Some(now + FORCED_FETCH_MIN_GAP - secs(1));
        assert_eq!(
            consensus_wait(BOOTSTRAP_RETRY, held, now),
            (BOOTSTRAP_RETRY, false)
        );
        // With a consensus due in 10 minutes, the forced fetch runs once the gap allows.
        assert_eq!(
            consensus_wait(secs(600), held, now),
            (FORCED_FETCH_MIN_GAP - secs(1), true)
        );
        // A forced fetch already allowed runs at once.
        assert_eq!(
            consensus_wait(secs(600), Some(now), now),
            (Duration::ZERO, true)
        );
    }
}
