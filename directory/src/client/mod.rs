//! The client side of the directory: fetch and verify the consensus, upload descriptors, cache.
//!
//! Acceptance rule (design §5): valid signatures from more than half of the distinct configured
//! authorities, each through a certificate that the authority's identity signed and that is valid
//! now; `valid_after - 5 min <= now <= valid_until + 5 min`; newer than the consensus held.

pub mod cache;
pub mod http;

use std::net::SocketAddr;
use std::time::Duration;

use allium_crypto::RelayId;

use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::descriptor::MAX_DESC_LEN;
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
        .filter(|c| authorities.iter().any(|a| a.ct_eq(&c.identity())))
        .collect())
}

/// Encode a list of signed certificates for `/allium/v1/certs`.
pub fn encode_cert_list(certs: &[Signed<AuthCert>]) -> Vec<u8> {
    let list: Vec<Vec<u8>> = certs.iter().map(|c| c.to_bytes()).collect();
    postcard::to_allocvec(&list).unwrap_or_default()
}

/// Verify consensus envelope bytes and certificate-list bytes (as fetched or cached).
pub fn verify_consensus_bytes(
    consensus: &[u8],
    certs: &[u8],
    authorities: &[AuthorityInfo],
    now: u64,
) -> Result<FetchedConsensus> {
    let ids: Vec<RelayId> = authorities.iter().map(|a| a.identity).collect();
    let certs = parse_cert_list(certs, &ids)?;
    let signed = Signed::<Consensus>::from_bytes(consensus)?;
    let verified = signed.verify(&ids, &certs, now)?;
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
    verify_consensus_bytes(&body, &certs, authorities, now)
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
    for a in order {
        match fetch_consensus_from(a.dir_addr, authorities, now, http::DEFAULT_TIMEOUT).await {
            Ok(f) => match f.verified.check_newer_than(held) {
                Ok(()) => return Ok(f),
                Err(e) => last = e,
            },
            Err(e) => {
                tracing::debug!(authority = %a.identity, error = %e, "consensus fetch failed");
                last = e;
            }
        }
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
