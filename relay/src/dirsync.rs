//! Talking to the directory authorities: descriptor publication, consensus fetching, onion-key
//! rotation.
//!
//! - The signed descriptor is uploaded to every authority at start, every
//!   `descriptor_publish_interval_secs`, and right after an onion-key rotation. Failed uploads are
//!   retried with backoff (1 s doubling to 30 s) until every authority has it.
//! - The consensus is fetched at start (retried every few seconds until one verifies), then at a
//!   random time in `[fresh_until, fresh_until + interval/2)` (Tor's cache schedule), and early when
//!   an unknown relay shows up (at most once per [`FORCED_FETCH_MIN_GAP`]). Until a consensus lists
//!   this relay it still accepts links and circuits.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use allium_directory::client::{
    AuthorityInfo, ConsensusCache, FetchRole, upload_descriptor_to_all,
};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::policy::{ExitPolicy as DescPolicy, PortRange};
use allium_directory::doc::{RelayDescriptor, Signed};
use allium_directory::now_unix;
use tokio::sync::Notify;

use crate::ctx::Ctx;
use crate::err::RelayError;

/// Minimum gap between consensus fetches triggered by unknown relays.
pub const FORCED_FETCH_MIN_GAP: Duration = Duration::from_secs(30);
/// Retry interval while no consensus is held.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(2);
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
}

pub(crate) fn authorities(ctx: &Ctx) -> Vec<AuthorityInfo> {
    ctx.cfg.authorities.clone()
}

/// The descriptor's view of the exit policy.
pub(crate) fn desc_policy(ctx: &Ctx) -> DescPolicy {
    let policy = ctx.exit_policy();
    DescPolicy::from_ranges(
        policy
            .port_ranges()
            .into_iter()
            .map(|(lo, hi)| PortRange { lo, hi }),
        policy.allow_private,
    )
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

/// Upload the descriptor now; returns how many authorities accepted it.
pub(crate) async fn publish_once(ctx: &Ctx) -> usize {
    let auths = authorities(ctx);
    let bytes = match build_descriptor(ctx) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build descriptor");
            return 0;
        }
    };
    *ctx.dir
        .last_descriptor
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(bytes.clone());
    if auths.is_empty() {
        return 0;
    }
    let (ok, errs) = upload_descriptor_to_all(&auths, &bytes).await;
    for (id, e) in &errs {
        tracing::debug!(authority = %id, error = %e, "descriptor upload failed");
    }
    if errs.is_empty() {
        tracing::info!(authorities = ok, "descriptor published");
    }
    ok
}

/// Publisher task.
#[allow(clippy::disallowed_methods)] // Driver task: its schedule is wall-clock time.
pub(crate) async fn run_publisher(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let n = authorities(&ctx).len();
    let interval = Duration::from_secs(ctx.cfg.descriptor_publish_interval_secs);
    let mut backoff = Duration::from_secs(1);
    let mut failures: u32 = 0;
    loop {
        let ok = publish_once(&ctx).await;
        if n > 0 && ok == 0 {
            failures = failures.saturating_add(1);
            if failures == 1 || failures.is_multiple_of(20) {
                tracing::warn!(
                    authorities = n,
                    attempts = failures,
                    "no authority accepted the descriptor; retrying (check the `authorities` \
                     addresses in the config and that the authorities are running)"
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

/// Consensus task.
#[allow(clippy::disallowed_methods)] // Driver task: its schedule is wall-clock time.
pub(crate) async fn run_consensus(ctx: Arc<Ctx>) {
    let auths = authorities(&ctx);
    if auths.is_empty() {
        return;
    }
    let mut shutdown = ctx.shutdown.subscribe();
    let path = ctx.cfg.data_dir.join("consensus.cache");
    let mut cache = ConsensusCache::open(Some(&path), auths, FetchRole::Cache, now_unix());
    if let Some(nd) = cache.netdir(now_unix()) {
        ctx.set_netdir(nd);
    }
    let mut last_forced = tokio::time::Instant::now() - FORCED_FETCH_MIN_GAP;
    let mut force = false;
    let mut failures: u32 = 0;
    loop {
        let now = now_unix();
        if force || cache.needs_fetch(now) {
            match cache.refresh(now).await {
                Ok(v) => {
                    failures = 0;
                    tracing::info!(relays = v.consensus().relays.len(), "consensus updated");
                    if let Some(nd) = cache.netdir(now_unix()) {
                        ctx.set_netdir(nd);
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if cache.current().is_none() && failures == 30 {
                        tracing::warn!(
                            error = %e,
                            "still no consensus after 30 attempts; the relay keeps accepting \
                             links but cannot extend circuits (check the `authorities` entries)"
                        );
                    } else {
                        tracing::debug!(error = %e, "consensus fetch failed");
                    }
                }
            }
        }
        force = false;
        let now = now_unix();
        let wait = if cache.current().is_none() {
            BOOTSTRAP_RETRY
        } else {
            Duration::from_secs(cache.next_fetch_at().saturating_sub(now).clamp(1, 600))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = ctx.refetch.notified() => {
                let since = last_forced.elapsed();
                if since < FORCED_FETCH_MIN_GAP {
                    tokio::select! {
                        () = tokio::time::sleep(FORCED_FETCH_MIN_GAP - since) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                last_forced = tokio::time::Instant::now();
                force = true;
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
