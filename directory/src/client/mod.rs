//! The client side of the directory: fetch and verify the consensus, upload descriptors, cache.
//!
//! Acceptance rule (design §5): valid signatures from more than half of the distinct configured
//! authorities, each through a certificate that the authority's identity signed and that is valid
//! now; `valid_after - 5 min <= now <= valid_until + 24 h` (Tor's "reasonably live" rule: past
//! `valid_until` it is used, with a warning, only while no newer one is available; see
//! [`Liveness`]); newer than the consensus held.

pub mod cache;
pub mod http;

use std::net::SocketAddr;
use std::time::Duration;

use allium_crypto::RelayId;

use crate::doc::consensus::{CLOCK_SKEW, MAX_CONSENSUS_LEN};
use crate::doc::descriptor::MAX_DESC_LEN;
use crate::doc::signed::Document as _;
use crate::doc::signed::decode_canonical;
use crate::doc::{AuthCert, Consensus, Signed, VerifiedCert, VerifiedConsensus};
use crate::err::{DirError, Result};
use crate::paths;

pub use cache::{ConsensusCache, FetchRole};

pub use crate::authinfo::AuthorityInfo;

/// Most certificates in a `/allium/v1/certs` reply.
pub const MAX_CERTS: usize = 32;
/// Cap on a `/allium/v1/certs` reply.
pub const MAX_CERTS_LEN: usize = 64 * 1024;

/// How long past `valid_until` a consensus stays usable while no newer one can be had (Tor's
/// `REASONABLY_LIVE_TIME`, 24 hours).
pub const REASONABLY_LIVE_SECS: u64 = 24 * 3600;

/// Where a consensus stands at some time, for use and for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Dated in the future beyond the allowed clock skew.
    NotYetValid,
    /// Within its validity window (with clock skew).
    Live,
    /// Past `valid_until` but within [`REASONABLY_LIVE_SECS`]: used, with a warning, until a
    /// newer one arrives.
    Expired {
        /// Its `valid_until`.
        expired_at: u64,
        /// When it stops being usable.
        usable_until: u64,
    },
    /// Expired more than [`REASONABLY_LIVE_SECS`] ago: refused.
    TooOld {
        /// Its `valid_until`.
        expired_at: u64,
    },
}

impl Liveness {
    /// Classify `c` at `now`.
    pub fn of(c: &Consensus, now: u64) -> Self {
        if now.saturating_add(CLOCK_SKEW) < c.valid_after {
            return Self::NotYetValid;
        }
        if now <= c.valid_until.saturating_add(CLOCK_SKEW) {
            return Self::Live;
        }
        let usable_until = c.valid_until.saturating_add(REASONABLY_LIVE_SECS);
        if now <= usable_until {
            Self::Expired {
                expired_at: c.valid_until,
                usable_until,
            }
        } else {
            Self::TooOld {
                expired_at: c.valid_until,
            }
        }
    }

    /// Whether a consensus in this state may be used.
    pub fn usable(self) -> bool {
        matches!(self, Self::Live | Self::Expired { .. })
    }

    /// The operator's warning for an expired (but still usable) consensus, if this is one.
    pub fn warning(self) -> Option<String> {
        match self {
            Self::Expired {
                expired_at,
                usable_until,
            } => Some(format!(
                "consensus expired at {}; using it until {} while no newer one is available; \
                 check that a majority of authorities is running",
                crate::time_fmt::rfc3339(expired_at),
                crate::time_fmt::rfc3339(usable_until)
            )),
            _ => None,
        }
    }

    /// Refuse a consensus that may not be used, with an error that says why.
    pub fn check(self) -> Result<()> {
        match self {
            Self::Live | Self::Expired { .. } => Ok(()),
            Self::NotYetValid => Err(DirError::NotValidNow {
                object: Consensus::NAME,
                why: "not yet valid (dated in the future; check the clock)",
            }),
            Self::TooOld { .. } => Err(DirError::NotValidNow {
                object: Consensus::NAME,
                why: "expired more than 24 hours ago (too old to use; check that a majority of \
                      authorities is running)",
            }),
        }
    }
}

/// A consensus with the certificates that verified it.
#[derive(Clone, Debug)]
pub struct FetchedConsensus {
    /// The verified consensus.
    pub verified: VerifiedConsensus,
    /// The certificates (signed envelopes) used to verify it.
    pub certs: Vec<Signed<AuthCert>>,
}

/// Decode a list of signed certificates (postcard `Vec<Vec<u8>>`), keep those signed by one of
/// `authorities`. Certificates outside their window are kept; the consensus check looks at time.
pub fn parse_cert_list(bytes: &[u8], authorities: &[RelayId]) -> Result<Vec<VerifiedCert>> {
    Ok(parse_all_certs(bytes)?
        .into_iter()
        .filter(|c| authorities.iter().any(|a| a.ct_eq(&c.identity())))
        .collect())
}

/// Every certificate of a list whose self-signature checks, configured or not (the ones of
/// unconfigured identities only serve to explain a failure).
fn parse_all_certs(bytes: &[u8]) -> Result<Vec<VerifiedCert>> {
    if bytes.len() > MAX_CERTS_LEN {
        return Err(DirError::TooLarge {
            object: "certificate list",
            len: bytes.len(),
            max: MAX_CERTS_LEN,
        });
    }
    let list: Vec<Vec<u8>> = decode_canonical(bytes, "certificate list")?;
    if list.len() > MAX_CERTS {
        return Err(DirError::invalid(
            "certificate list",
            "too many certificates",
        ));
    }
    Ok(list
        .iter()
        .filter_map(|b| Signed::<AuthCert>::from_bytes(b).ok())
        .filter_map(|s| s.verify().ok())
        .collect())
}

fn short(id: &RelayId) -> String {
    id.to_hex().chars().take(16).collect()
}

/// Why a consensus lacks a majority of valid signatures, naming each configured authority that
/// did not sign (identity and address) and each signer whose identity no `[[authorities]]` entry
/// names. A certificate for an unconfigured identity next to a configured authority without one
/// is a configuration mistake ([`DirError::Config`]); anything else is the usual
/// [`DirError::BadSignature`] (the detail is logged at debug).
fn explain_signature_failure(
    signed: &Signed<Consensus>,
    signers: &[RelayId],
    all_certs: &[VerifiedCert],
    authorities: &[AuthorityInfo],
    now: u64,
) -> DirError {
    let mut problems = Vec::new();
    let mut configured_without_cert = 0usize;
    let mut seen: Vec<RelayId> = Vec::new();
    for a in authorities {
        if seen.contains(&a.identity) || signers.contains(&a.identity) {
            continue;
        }
        seen.push(a.identity);
        let who = format!("authority {} at {}", short(&a.identity), a.dir_addr);
        let certs: Vec<&VerifiedCert> = all_certs
            .iter()
            .filter(|c| c.identity().ct_eq(&a.identity))
            .collect();
        if certs.is_empty() {
            configured_without_cert += 1;
            problems.push(format!("{who}: no certificate for the configured identity"));
        } else if !certs.iter().any(|c| c.is_valid_at(now)) {
            let until = certs.iter().map(|c| c.cert().expires).max().unwrap_or(0);
            problems.push(format!(
                "{who}: its certificate is not valid now (expires {}; check this machine's \
                 clock, or the authority must run `allium authority certify`)",
                crate::time_fmt::rfc3339(until)
            ));
        } else {
            problems.push(format!("{who}: did not sign this consensus"));
        }
    }
    let mut strangers = Vec::new();
    for c in all_certs {
        let configured = authorities.iter().any(|a| a.identity.ct_eq(&c.identity()));
        if !configured && signed.has_valid_sig_by(&c.signing_key()) {
            strangers.push(c.identity());
            problems.push(format!(
                "a signature is by authority identity {} (certified signing key), which no \
                 [[authorities]] entry names",
                c.identity().to_hex()
            ));
        }
    }
    let text = format!(
        "{} of {} configured authorities signed (more than half are needed): {}",
        signers.len(),
        seen.len() + signers.len(),
        problems.join("; ")
    );
    if configured_without_cert > 0 && !strangers.is_empty() {
        DirError::Config(format!(
            "{text}; check the `identity` of each [[authorities]] entry (copy it from \
             `allium keygen show` on the authority)"
        ))
    } else {
        // Authorities down or not yet agreed: the usual error, with the detail for debugging.
        tracing::debug!("consensus refused: {text}");
        DirError::BadSignature {
            object: Consensus::NAME,
            why: "not signed by more than half of the configured authorities",
        }
    }
}

/// Ask each authority for its own certificate and name every one whose identity is not the one
/// configured for its address (the precise form of a [`DirError::Config`] identity error).
pub async fn check_authority_identities(authorities: &[AuthorityInfo]) -> Vec<String> {
    let futs = authorities.iter().map(|a| async move {
        let got = async {
            let b = http::request(
                a.dir_addr,
                "GET",
                paths::CERT,
                None,
                MAX_CERTS_LEN,
                http::DEFAULT_TIMEOUT,
            )
            .await?
            .into_ok("fetching the authority certificate")?;
            Signed::<AuthCert>::from_bytes(&b)?.verify()
        }
        .await;
        match got {
            Ok(c) if !c.identity().ct_eq(&a.identity) => Some(format!(
                "the authority at {} has identity {}, but its [[authorities]] entry says {}; \
                 correct `identity` for dir_addr = \"{}\"",
                a.dir_addr,
                c.identity().to_hex(),
                a.identity.to_hex(),
                a.dir_addr
            )),
            _ => None,
        }
    });
    futures::future::join_all(futs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// If `e` says the authorities simply have not published a first consensus yet, their
/// explanation (which says when the first voting period ends).
pub fn not_published_yet(e: &DirError) -> Option<&str> {
    match e {
        DirError::NoConsensus { last } => not_published_yet(last),
        DirError::HttpStatus {
            status: 404,
            reason,
            ..
        } if reason.starts_with("no consensus yet") => Some(reason),
        _ => None,
    }
}

/// Encode a list of signed certificates for `/allium/v1/certs`.
pub fn encode_cert_list(certs: &[Signed<AuthCert>]) -> Vec<u8> {
    let list: Vec<Vec<u8>> = certs.iter().map(|c| c.to_bytes()).collect();
    postcard::to_allocvec(&list).unwrap_or_default()
}

/// Verify consensus envelope bytes and certificate-list bytes (as fetched or cached): the
/// signatures, then the time rule ([`Liveness`]: refused when not yet valid or too old).
pub fn verify_consensus_bytes(
    consensus: &[u8],
    certs: &[u8],
    authorities: &[AuthorityInfo],
    now: u64,
) -> Result<FetchedConsensus> {
    let f = verify_consensus_signatures(consensus, certs, authorities, now)?;
    Liveness::of(f.verified.consensus(), now).check()?;
    Ok(f)
}

/// As [`verify_consensus_bytes`] without the time rule, for tools that show a consensus of any
/// age with its [`Liveness`] (certificates must still be valid at `now`).
pub fn verify_consensus_signatures(
    consensus: &[u8],
    certs: &[u8],
    authorities: &[AuthorityInfo],
    now: u64,
) -> Result<FetchedConsensus> {
    let ids: Vec<RelayId> = authorities.iter().map(|a| a.identity).collect();
    let all_certs = parse_all_certs(certs)?;
    let certs: Vec<VerifiedCert> = all_certs
        .iter()
        .filter(|c| ids.iter().any(|a| a.ct_eq(&c.identity())))
        .cloned()
        .collect();
    let signed = Signed::<Consensus>::from_bytes(consensus)?;
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    let signers = crate::doc::consensus::valid_signers(&signed, &distinct, &certs, now);
    if signers.len() * 2 <= distinct.len() {
        return Err(explain_signature_failure(
            &signed,
            &signers,
            &all_certs,
            authorities,
            now,
        ));
    }
    if signers.len() < distinct.len()
        && let DirError::Config(why) =
            explain_signature_failure(&signed, &signers, &all_certs, authorities, now)
    {
        // Enough signatures, but some configured identity is wrong: say so while it still works.
        tracing::warn!("consensus accepted, but an authority identity looks wrong: {why}");
    }
    let verified = signed.verify_signatures_only(&ids, &certs, now)?;
    Ok(FetchedConsensus {
        verified,
        certs: certs.into_iter().map(|c| c.signed().clone()).collect(),
    })
}

/// Inflate a zlib stream, refusing to produce more than `max` bytes.
pub fn inflate_bounded(z: &[u8], max: usize) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let mut dec = flate2::read::ZlibDecoder::new(z).take(max as u64 + 1);
    dec.read_to_end(&mut out).map_err(|_| DirError::Malformed {
        object: "compressed consensus",
        why: "bad zlib stream",
    })?;
    if out.len() > max {
        return Err(DirError::TooLarge {
            object: "consensus",
            len: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Fetch the compressed consensus and the certificate list from one authority, then verify.
pub async fn fetch_consensus_from(
    addr: SocketAddr,
    authorities: &[AuthorityInfo],
    now: u64,
    timeout: Duration,
) -> Result<FetchedConsensus> {
    let (body, certs) = fetch_raw_from(addr, timeout).await?;
    verify_consensus_bytes(&body, &certs, authorities, now)
}

/// Fetch the consensus envelope (inflated) and the certificate list from one authority,
/// unverified.
async fn fetch_raw_from(addr: SocketAddr, timeout: Duration) -> Result<(Vec<u8>, Vec<u8>)> {
    let z = http::request(
        addr,
        "GET",
        paths::CONSENSUS_Z,
        None,
        MAX_CONSENSUS_LEN,
        timeout,
    )
    .await?
    .into_ok("fetching the consensus")?;
    let body = inflate_bounded(&z, MAX_CONSENSUS_LEN)?;
    let certs = http::request(addr, "GET", paths::CERTS, None, MAX_CERTS_LEN, timeout)
        .await?
        .into_ok("fetching authority certificates")?;
    Ok((body, certs))
}

/// For display (`allium consensus show`): the consensus of the first authority whose
/// signatures verify, whatever its age; the caller shows its [`Liveness`].
pub async fn fetch_consensus_any_age(
    authorities: &[AuthorityInfo],
    now: u64,
) -> Result<FetchedConsensus> {
    let mut last = DirError::invalid("authority list", "no authorities configured");
    for a in authorities {
        match fetch_raw_from(a.dir_addr, http::DEFAULT_TIMEOUT).await {
            Ok((body, certs)) => {
                match verify_consensus_signatures(&body, &certs, authorities, now) {
                    Ok(f) => return Ok(f),
                    Err(e) => last = e,
                }
            }
            Err(e) => last = e,
        }
    }
    Err(DirError::NoConsensus {
        last: Box::new(last),
    })
}

/// Fetch a consensus newer than `held` from the first authority (in random order) that gives an
/// acceptable one.
pub async fn fetch_consensus_newer(
    authorities: &[AuthorityInfo],
    now: u64,
    held: Option<&VerifiedConsensus>,
) -> Result<FetchedConsensus> {
    let mut order: Vec<&AuthorityInfo> = authorities.iter().collect();
    // Random start, so load spreads over the authorities.
    if !order.is_empty() {
        let start = (allium_crypto::rng::random_u64() % order.len() as u64) as usize;
        order.rotate_left(start);
    }
    let mut last = DirError::invalid("authority list", "no authorities configured");
    let mut identity_problem = None;
    for a in order {
        match fetch_consensus_from(a.dir_addr, authorities, now, http::DEFAULT_TIMEOUT).await {
            Ok(f) => match f.verified.check_newer_than(held) {
                Ok(()) => return Ok(f),
                Err(e) => last = e,
            },
            Err(e) => {
                tracing::debug!(authority = %a.identity, error = %e, "consensus fetch failed");
                if matches!(e, DirError::Config(_)) {
                    identity_problem = Some(e);
                } else {
                    last = e;
                }
            }
        }
    }
    if let Some(e) = identity_problem {
        let named = check_authority_identities(authorities).await;
        if !named.is_empty() {
            return Err(DirError::Config(named.join("; ")));
        }
        return Err(e);
    }
    Err(DirError::NoConsensus {
        last: Box::new(last),
    })
}

/// Fetch and verify a consensus from any of `authorities` (no rollback check: use
/// [`ConsensusCache`] or [`fetch_consensus_newer`] when a consensus is already held).
pub async fn fetch_consensus(authorities: &[AuthorityInfo], now: u64) -> Result<VerifiedConsensus> {
    Ok(fetch_consensus_newer(authorities, now, None)
        .await?
        .verified)
}

/// Upload a signed descriptor (envelope bytes) to one authority.
pub async fn upload_descriptor(addr: SocketAddr, signed_bytes: &[u8]) -> Result<()> {
    if signed_bytes.len() > MAX_DESC_LEN {
        return Err(DirError::TooLarge {
            object: "relay descriptor",
            len: signed_bytes.len(),
            max: MAX_DESC_LEN,
        });
    }
    http::request(
        addr,
        "POST",
        paths::DESCRIPTOR,
        Some(signed_bytes),
        4096,
        Duration::from_secs(20),
    )
    .await?
    .into_ok("uploading the descriptor")?;
    Ok(())
}

/// Upload a signed descriptor to every authority; returns how many accepted it, and the
/// errors of the others.
pub async fn upload_descriptor_to_all(
    authorities: &[AuthorityInfo],
    signed_bytes: &[u8],
) -> (usize, Vec<(RelayId, DirError)>) {
    let futs = authorities.iter().map(|a| async move {
        (
            a.identity,
            upload_descriptor(a.dir_addr, signed_bytes).await,
        )
    });
    let results = futures::future::join_all(futs).await;
    let mut ok = 0;
    let mut errs = Vec::new();
    for (id, r) in results {
        match r {
            Ok(()) => ok += 1,
            Err(e) => errs.push((id, e)),
        }
    }
    (ok, errs)
}
