//! The archive a directory cache serves from: the recent consensuses it holds (the latest and
//! a few older ones, as diff bases) and the certificate list, with every compressed body
//! computed once and shared.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::diff::{self, Layout};
use super::http::{Body, DirRequest, ok_response, parse_request, status_response};
use super::{compress, consensus_digest};
use crate::client::MAX_CERTS_LEN;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::signed::decode_canonical;
use crate::doc::{Consensus, Signed};
use crate::err::{DirError, Result};

/// How much history a [`DirArchive`] keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// Consensuses whose `valid_after` is more than this many seconds before the latest one's
    /// are dropped, and no diff is served from a consensus older than this at `now`.
    pub max_age: u64,
    /// Most consensuses held (the latest included); the oldest go first.
    pub max_docs: usize,
}

impl Default for ArchiveConfig {
    /// Three hours, at most 6 documents (with hourly consensuses: the latest and five older
    /// ones; on a test network with a short voting interval the count is what limits).
    fn default() -> Self {
        Self {
            max_age: 3 * 3600,
            max_docs: 6,
        }
    }
}

/// What a [`DirArchive`] has served (counted in [`DirArchive::respond`]).
#[derive(Debug, Default)]
pub struct ArchiveStats {
    /// Full consensuses served.
    pub full: AtomicU64,
    /// Diffs served.
    pub diffs: AtomicU64,
    /// "Not modified" answers.
    pub not_modified: AtomicU64,
    /// Certificate lists served.
    pub certs: AtomicU64,
    /// Error answers (bad request, nothing to serve).
    pub errors: AtomicU64,
    /// Bytes of all responses.
    pub bytes: AtomicU64,
}

/// One archived consensus.
#[derive(Debug)]
struct Doc {
    raw: Arc<[u8]>,
    digest: [u8; 32],
    valid_after: u64,
    /// Where its relay entries are, found on first use (computing a diff).
    layout: OnceLock<Layout>,
    /// The compressed full document, computed on first use.
    z: OnceLock<Arc<[u8]>>,
    /// The compressed diff from this document to the latest, computed on first use (`None`
    /// when it would not be smaller than the full document). Reset when a newer one arrives.
    diff: OnceLock<Option<Arc<[u8]>>>,
}

/// The certificate list and its compressed form (computed on first use).
type Certs = (Arc<[u8]>, OnceLock<Arc<[u8]>>);

/// Recent consensuses and the certificate list, served by [`DirArchive::respond`].
#[derive(Debug)]
pub struct DirArchive {
    cfg: ArchiveConfig,
    /// Oldest first; the last is the latest.
    docs: Vec<Doc>,
    certs: Option<Certs>,
    stats: ArchiveStats,
}

impl DirArchive {
    /// An empty archive.
    pub fn new(cfg: ArchiveConfig) -> Self {
        Self {
            cfg,
            docs: Vec::new(),
            certs: None,
            stats: ArchiveStats::default(),
        }
    }

    /// Add a consensus (its signed envelope, as fetched, **already verified by the caller**)
    /// valid from `valid_after`, and the certificate list that verifies it (postcard
    /// `Vec<Vec<u8>>`). The consensus becomes the latest; older ones stay as diff bases within
    /// the configured age and count. The same bytes again only replace the certificates; an
    /// older `valid_after` than the latest is refused (a rollback); the same `valid_after` with
    /// other bytes (more signatures) becomes the latest.
    pub fn insert(
        &mut self,
        consensus_raw: &[u8],
        valid_after: u64,
        certs_raw: &[u8],
    ) -> Result<()> {
        if certs_raw.len() > MAX_CERTS_LEN {
            return Err(DirError::TooLarge {
                object: "certificate list",
                len: certs_raw.len(),
                max: MAX_CERTS_LEN,
            });
        }
        let _: Vec<Vec<u8>> = decode_canonical(certs_raw, "certificate list")?;
        let signed = Signed::<Consensus>::from_bytes(consensus_raw)?;
        // The caller verified (so decoded) it: read only the leading fields, not the whole body.
        if leading_valid_after(signed.body()) != Some(valid_after) {
            return Err(DirError::invalid(
                "consensus",
                "valid_after given does not match the document's",
            ));
        }
        let digest = consensus_digest(consensus_raw);
        if let Some(latest) = self.docs.last()
            && latest.digest != digest
            && valid_after < latest.valid_after
        {
            return Err(DirError::Rollback {
                got: valid_after,
                held: latest.valid_after,
            });
        }
        let certs_changed = self
            .certs
            .as_ref()
            .is_none_or(|(c, _)| c.as_ref() != certs_raw);
        if certs_changed {
            self.certs = Some((certs_raw.into(), OnceLock::new()));
        }
        if self.docs.last().is_some_and(|l| l.digest == digest) {
            return Ok(());
        }
        self.docs.retain(|d| d.digest != digest);
        for d in &mut self.docs {
            d.diff = OnceLock::new();
        }
        self.docs.push(Doc {
            raw: consensus_raw.into(),
            digest,
            valid_after,
            layout: OnceLock::new(),
            z: OnceLock::new(),
            diff: OnceLock::new(),
        });
        let oldest = valid_after.saturating_sub(self.cfg.max_age);
        self.docs.retain(|d| d.valid_after >= oldest);
        let extra = self.docs.len().saturating_sub(self.cfg.max_docs.max(1));
        self.docs.drain(..extra);
        Ok(())
    }

    /// The digest ([`consensus_digest`]) of the latest consensus held.
    pub fn latest_digest(&self) -> Option<[u8; 32]> {
        self.docs.last().map(|d| d.digest)
    }

    /// The latest consensus held (raw envelope).
    pub fn latest(&self) -> Option<&[u8]> {
        self.docs.last().map(|d| &*d.raw)
    }

    /// How many consensuses are held (the latest and the diff bases).
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether no consensus is held.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// What has been served so far.
    pub fn stats(&self) -> &ArchiveStats {
        &self.stats
    }

    /// The whole response (head and body) to a request head (as delimited by
    /// [`super::request_head_complete`]) at `now`: the certificate list; the latest consensus
    /// as a diff from the newest consensus the client holds that is still within `max_age`
    /// when that is smaller, else in full; "304 Not Modified" when the client holds the
    /// latest; 400 for a request that is not exactly of our form; 404 when nothing is held.
    pub fn respond(&self, request_head: &[u8], now: u64) -> Vec<u8> {
        let resp = match parse_request(request_head) {
            Err(_) => {
                self.count(&self.stats.errors);
                status_response(400, "malformed directory request")
            }
            Ok(DirRequest::Certs) => match &self.certs {
                Some((raw, z)) => {
                    self.count(&self.stats.certs);
                    ok_response(Body::Full(z.get_or_init(|| compress(raw).into())))
                }
                None => {
                    self.count(&self.stats.errors);
                    status_response(404, "no certificates yet")
                }
            },
            Ok(DirRequest::Consensus { have }) => self.respond_consensus(&have, now),
            // Descriptors live in an HSDir's `HsDescStore`, which answers these first.
            Ok(DirRequest::HsDesc { .. } | DirRequest::HsUpload { .. }) => {
                self.count(&self.stats.errors);
                status_response(404, "this relay is not an HSDir")
            }
        };
        self.stats
            .bytes
            .fetch_add(resp.len() as u64, Ordering::Relaxed);
        resp
    }

    /// Where the latest compressed full body lives, if computed (tests: it is computed once).
    #[cfg(test)]
    pub(crate) fn docs_z_ptr(&self) -> Option<*const u8> {
        self.docs.last()?.z.get().map(|z| z.as_ptr())
    }

    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn respond_consensus(&self, have: &[[u8; 32]], now: u64) -> Vec<u8> {
        let Some(latest) = self.docs.last() else {
            self.count(&self.stats.errors);
            return status_response(404, "no consensus yet");
        };
        if have.contains(&latest.digest) {
            self.count(&self.stats.not_modified);
            return status_response(304, "");
        }
        let full = latest.z.get_or_init(|| compress(&latest.raw).into());
        let base = self.docs.iter().rev().skip(1).find(|d| {
            have.contains(&d.digest) && d.valid_after.saturating_add(self.cfg.max_age) >= now
        });
        if let Some(b) = base
            && let Some(z) = b
                .diff
                .get_or_init(|| {
                    let bl = b.layout.get_or_init(|| Layout::of(&b.raw));
                    let ll = latest.layout.get_or_init(|| Layout::of(&latest.raw));
                    let d = diff::compute_with(&b.raw, bl, &latest.raw, ll).ok()?;
                    let z = compress(&d);
                    (z.len() < full.len()).then(|| z.into())
                })
                .as_ref()
        {
            self.count(&self.stats.diffs);
            return ok_response(Body::Diff(z, b.digest));
        }
        self.count(&self.stats.full);
        ok_response(Body::Full(full))
    }
}

/// `valid_after` from the start of a consensus body: the third field, after the `version` and
/// `method` varints (docs/protocol/80-directory.md, "Consensus").
fn leading_valid_after(body: &[u8]) -> Option<u64> {
    let mut it = body.iter();
    let mut varint = || -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = *it.next()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    varint()?;
    varint()?;
    varint()
}

/// The largest consensus an archive holds is the largest one a client accepts.
const _: () = assert!(MAX_CONSENSUS_LEN <= u32::MAX as usize);
