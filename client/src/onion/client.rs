//! The client side, as plain functions and one cache (no I/O, no clock: `now` is an argument).
//!
//! The driver (or a test) goes: [`descriptor_location`] (which blinded key, which HSDirs) →
//! fetch the bytes over BEGIN_DIR → [`open_descriptor`] (verify, decrypt, client authorization)
//! → [`DescCache::insert`] → pick a rendezvous point and send ESTABLISH_RENDEZVOUS
//! ([`new_cookie`]) → [`start_introduction`] (INTRODUCE1 for one of the descriptor's
//! introduction points, and the target to extend to) → on RENDEZVOUS2,
//! [`PendingIntro::finish`] gives the keys of the end-to-end hop.
//!
//! When the descriptor asks for proof of work, the driver first calls [`solve_pow`] (off the
//! async threads: it takes about `effort` milliseconds) with the number of failed attempts so
//! far, and passes the solution to [`start_introduction_pow`].

use std::collections::{BTreeMap, VecDeque};

use allium_crypto::X25519Secret;
use allium_crypto::handshake::HopKeys;
use allium_crypto::hs::ntor::{ClientIntro, IntroKeys};
use allium_crypto::hs::{BlindedPublicKey, HsAddress, Subcredential, TimePeriod, TimePeriodParams};
use allium_directory::hs::{
    HsDescContents, HsDirParams, HsDirRing, IntroPointInfo, UncheckedHsDesc,
};
use allium_proto::relaymsg::{Introduce, RendCookie, Rendezvous2};
use rand::{Rng, RngExt as _};

use super::intro::{self, IntroPlaintext, RendPoint};
use super::pow::{self, PowSolution};
use crate::core::HopTarget;

/// Most descriptors cached.
pub const DESC_CACHE_MAX: usize = 256;

/// Why reaching an onion service failed, phrased for the person at the application; each maps to
/// the SOCKS5 reply code Tor uses for it (its extended codes `0xF0`–`0xF7`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnionError {
    /// No HSDir had a descriptor (the service is not running, or not yet published).
    #[error(
        "no descriptor found for this onion service: it is offline or has not published yet; try again in a minute"
    )]
    DescNotFound,
    /// A descriptor was found but does not verify or decrypt for this address.
    #[error("the onion service's descriptor is invalid: {0}")]
    DescInvalid(String),
    /// The service requires client authorization and no key is configured for it.
    #[error(
        "this onion service requires client authorization: put a key for it in onion_client_auth_dir"
    )]
    MissingClientAuth,
    /// The configured client key is not among the service's authorised clients.
    #[error("this onion service refused the configured client authorization key")]
    BadClientAuth,
    /// Every introduction point failed.
    #[error("could not reach the onion service through any of its introduction points")]
    IntroFailed,
    /// The rendezvous failed (bad handshake reply, circuit lost).
    #[error("the rendezvous with the onion service failed")]
    RendFailed,
    /// The address is not a valid onion address.
    #[error("not a valid onion address: {0}")]
    BadAddress(String),
    /// Nothing in time.
    #[error("the onion service did not answer in time")]
    Timeout,
}

impl OnionError {
    /// The SOCKS5 reply code (Tor's extended onion-service codes).
    pub fn socks_reply(&self) -> u8 {
        match self {
            Self::DescNotFound => 0xF0,
            Self::DescInvalid(_) => 0xF1,
            Self::IntroFailed => 0xF2,
            Self::RendFailed => 0xF3,
            Self::MissingClientAuth => 0xF4,
            Self::BadClientAuth => 0xF5,
            Self::BadAddress(_) => 0xF6,
            Self::Timeout => 0xF7,
        }
    }
}

/// Where a descriptor for `addr` lives at `now`: the period, its blinded key and subcredential.
#[derive(Debug)]
pub struct DescLocation {
    /// The period.
    pub period: TimePeriod,
    /// The blinded key (the ring position and what the descriptor must be signed under).
    pub blinded: BlindedPublicKey,
    /// The subcredential (decrypts the descriptor, keys the INTRODUCE handshake).
    pub subcredential: Subcredential,
}

/// The current period's location of `addr`'s descriptor.
pub fn descriptor_location(
    addr: &HsAddress,
    tp: &TimePeriodParams,
    now_unix: u64,
) -> Result<DescLocation, OnionError> {
    let period = tp.period_at(now_unix);
    let identity = addr.identity();
    let blinded = BlindedPublicKey::derive(&identity, &period)
        .map_err(|e| OnionError::BadAddress(e.to_string()))?;
    Ok(DescLocation {
        period,
        subcredential: Subcredential::for_identity(&identity, &blinded),
        blinded,
    })
}

/// The HSDirs to try for `loc`, in a random order (`hsdir_spread_fetch` per replica).
pub fn fetch_order<R: Rng + ?Sized>(
    ring: &HsDirRing,
    loc: &DescLocation,
    params: &HsDirParams,
    rng: &mut R,
) -> Vec<allium_crypto::RelayId> {
    let mut c = ring.fetch_candidates(&loc.blinded, params);
    // Fisher-Yates.
    for i in (1..c.len()).rev() {
        let j = rng.random_range(0..=i);
        c.swap(i, j);
    }
    c
}

/// Verify and decrypt fetched descriptor bytes for `loc`.
pub fn open_descriptor(
    loc: &DescLocation,
    bytes: &[u8],
    now_unix: u64,
    client_key: Option<&X25519Secret>,
) -> Result<HsDescContents, OnionError> {
    let desc = UncheckedHsDesc::parse(bytes)
        .and_then(|d| d.check_for(&loc.blinded, now_unix))
        .map_err(|e| OnionError::DescInvalid(e.to_string()))?;
    desc.decrypt(&loc.subcredential, client_key).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("client authorization") {
            if client_key.is_some() {
                OnionError::BadClientAuth
            } else {
                OnionError::MissingClientAuth
            }
        } else {
            OnionError::DescInvalid(msg)
        }
    })
}

/// A fresh random rendezvous cookie.
pub fn new_cookie() -> RendCookie {
    let mut c = [0u8; allium_proto::relaymsg::REND_COOKIE_LEN];
    rand::rng().fill(&mut c[..]);
    RendCookie(c)
}

/// The client's state between INTRODUCE1 and RENDEZVOUS2.
pub struct PendingIntro {
    state: ClientIntro,
    intro: IntroPointInfo,
    subcredential: Subcredential,
}

impl std::fmt::Debug for PendingIntro {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingIntro([redacted])")
    }
}

/// What to do to introduce: extend a circuit to `intro_point`, send `introduce1` there.
#[derive(Debug)]
pub struct Introduction {
    /// The introduction point to extend to.
    pub intro_point: HopTarget,
    /// The INTRODUCE1 to send.
    pub introduce1: Introduce,
    /// The state to finish with RENDEZVOUS2.
    pub pending: PendingIntro,
}

/// Build the INTRODUCE1 for introduction point `which` of `contents`, naming `rend_point` and
/// `cookie` (for which ESTABLISH_RENDEZVOUS was sent).
pub fn start_introduction(
    loc: &DescLocation,
    contents: &HsDescContents,
    which: usize,
    rend_point: RendPoint,
    cookie: RendCookie,
) -> Result<Introduction, OnionError> {
    start_introduction_pow(loc, contents, which, rend_point, cookie, None)
}

/// The proof of work for introduction point `which` of `contents` on attempt `retry` (0: the
/// first; each failed introduction to the service counts): the descriptor's suggested effort,
/// doubled on each retry and bounded ([`pow::client_effort`]). `None`: the descriptor asks
/// for none (no parameters, an unknown scheme, or effort 0), or `which` is out of range.
/// CPU-bound: about `effort` milliseconds (at most [`pow::MAX_CLIENT_EFFORT`]).
pub fn solve_pow(contents: &HsDescContents, which: usize, retry: u32) -> Option<PowSolution> {
    solve_pow_until(contents, which, retry, &|| true)
}

/// [`solve_pow`] that gives up when `keep_going` says so ([`pow::solve_until`]).
pub fn solve_pow_until(
    contents: &HsDescContents,
    which: usize,
    retry: u32,
    keep_going: &dyn Fn() -> bool,
) -> Option<PowSolution> {
    let params = contents.pow.as_ref()?;
    let ip = contents.intro_points.get(which)?;
    let effort = pow::client_effort(params.suggested_effort, retry);
    pow::solve_until(
        params,
        &ip.auth_key,
        effort,
        pow::max_tries_for(effort),
        &mut rand::rng(),
        keep_going,
    )
}

/// How far a client goes with proof of work at one service in one connection: introductions
/// made (with a raised effort each time after the first), at most, when the descriptor asks
/// for proof of work. Without it, one.
pub const MAX_POW_ATTEMPTS: u32 = 3;

/// How one introduction (INTRODUCE1 through the descriptor's points, then the wait for
/// RENDEZVOUS2) failed, as [`PowRetry::after_failure`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntroFailure {
    /// An introduction point acknowledged with a failure status.
    Refused,
    /// The introduction was acknowledged but no RENDEZVOUS2 came in time: the service dropped
    /// it (proof invalid for it, or its queue served costlier introductions first).
    NoRendezvous,
    /// No introduction point could be reached (no circuit, no acknowledgement): more work
    /// would not help.
    Unreachable,
}

/// The proof-of-work schedule of one connection to a service (Tor proposal 327's client, as
/// arti's `HsPowClient`): the first introduction pays the descriptor's suggested effort; when
/// an introduction is refused or its rendezvous never comes, the next one pays
/// [`pow::client_effort`] of the attempt number (doubling from at least
/// [`pow::MIN_RETRY_EFFORT`], at most [`pow::MAX_CLIENT_EFFORT`]), up to [`MAX_POW_ATTEMPTS`]
/// introductions. A descriptor without proof-of-work parameters (or with a scheme this client
/// does not know) gets one introduction and no proof.
#[derive(Clone, Debug)]
pub struct PowRetry {
    suggested: Option<u32>,
    attempt: u32,
}

impl PowRetry {
    /// The schedule for a connection with descriptor `contents`.
    pub fn new(contents: &HsDescContents) -> Self {
        Self {
            suggested: contents
                .pow
                .as_ref()
                .filter(|p| p.scheme == pow::SCHEME_SHA256_V1)
                .map(|p| p.suggested_effort),
            attempt: 0,
        }
    }

    /// Whether the service asks for proof of work.
    pub fn enabled(&self) -> bool {
        self.suggested.is_some()
    }

    /// The attempt number (0: the first introduction); what [`solve_pow`] takes.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The effort of this attempt (0: no proof to send).
    pub fn effort(&self) -> u32 {
        self.suggested
            .map_or(0, |s| pow::client_effort(s, self.attempt))
    }

    /// The introduction of this attempt failed so: whether to introduce again (at the raised
    /// [`PowRetry::effort`]). Only a refused or unanswered introduction to a service that asks
    /// for proof of work is retried, at most [`MAX_POW_ATTEMPTS`] in all.
    pub fn after_failure(&mut self, how: IntroFailure) -> bool {
        if self.suggested.is_none()
            || how == IntroFailure::Unreachable
            || self.attempt.saturating_add(1) >= MAX_POW_ATTEMPTS
        {
            return false;
        }
        self.attempt += 1;
        true
    }
}

/// [`start_introduction`] with a proof of work ([`solve_pow`]) in the encrypted part.
pub fn start_introduction_pow(
    loc: &DescLocation,
    contents: &HsDescContents,
    which: usize,
    rend_point: RendPoint,
    cookie: RendCookie,
    pow: Option<&PowSolution>,
) -> Result<Introduction, OnionError> {
    let ip = contents
        .intro_points
        .get(which)
        .ok_or(OnionError::IntroFailed)?
        .clone();
    let keys = IntroKeys {
        auth_key: &ip.auth_key,
        enc_key: &ip.enc_key,
        subcredential: &loc.subcredential,
    };
    let ext: Vec<_> = pow.map(PowSolution::to_extension).into_iter().collect();
    let (state, introduce1) =
        intro::client_introduce_with(&keys, vec![], &IntroPlaintext { cookie, rend_point }, &ext)
            .map_err(|_| OnionError::IntroFailed)?;
    Ok(Introduction {
        intro_point: HopTarget::new(ip.relay_id, ip.onion_key, &ip.addrs),
        introduce1,
        pending: PendingIntro {
            state,
            intro: ip,
            subcredential: Subcredential::from_bytes(*loc.subcredential.as_bytes()),
        },
    })
}

impl PendingIntro {
    /// RENDEZVOUS2 arrived: check the service's reply, return the end-to-end keys.
    pub fn finish(self, r2: &Rendezvous2) -> Result<HopKeys, OnionError> {
        let keys = IntroKeys {
            auth_key: &self.intro.auth_key,
            enc_key: &self.intro.enc_key,
            subcredential: &self.subcredential,
        };
        self.state
            .finish(&keys, &r2.handshake_info)
            .map_err(|_| OnionError::RendFailed)
    }
}

/// Decrypted descriptors by (address, isolation group), each until its expiry; bounded, oldest
/// dropped first. Different isolation groups never share an entry, so one application's fetch
/// does not tell another that the address was visited.
#[derive(Debug, Default)]
pub struct DescCache {
    map: BTreeMap<(String, u64), (HsDescContents, u64)>,
    order: VecDeque<(String, u64)>,
}

impl DescCache {
    /// Remember `contents` for `addr` in isolation group `group` until `expires_unix`.
    pub fn insert(
        &mut self,
        addr: &HsAddress,
        group: u64,
        contents: HsDescContents,
        expires_unix: u64,
    ) {
        let k = (addr.label(), group);
        if self
            .map
            .insert(k.clone(), (contents, expires_unix))
            .is_none()
        {
            self.order.push_back(k);
        }
        while self.map.len() > DESC_CACHE_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
    }

    /// The cached descriptor, if not expired at `now_unix`.
    pub fn get(&self, addr: &HsAddress, group: u64, now_unix: u64) -> Option<&HsDescContents> {
        self.map
            .get(&(addr.label(), group))
            .filter(|(_, exp)| now_unix < *exp)
            .map(|(c, _)| c)
    }

    /// Forget `addr`'s descriptor in `group` (every introduction point failed with it).
    pub fn remove(&mut self, addr: &HsAddress, group: u64) {
        let k = (addr.label(), group);
        self.map.remove(&k);
        self.order.retain(|x| x != &k);
    }

    /// Number of cached descriptors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
