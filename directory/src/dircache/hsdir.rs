//! The descriptor store of an HSDir (rend-spec-v3 §2.2's role, Allium's rules), sans-IO: uploads
//! verified before storing, one descriptor per blinded key, the highest revision wins, bounded
//! in entries and bytes, each kept until its lifetime (or its signing-key certificate) ends.
//!
//! An HSDir cannot tell which time period a blinded key belongs to (the key alone does not
//! reveal the address, by design): it checks what the descriptor proves by itself, the
//! certificate chain (blinded key → signing key → descriptor), that the certificate has not
//! expired, and that the upload's path names the descriptor's own blinded key. A descriptor of
//! a past period simply expires with its certificate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use allium_crypto::hs::BlindedPublicKey;

use super::compress;
use super::http::{Body, DirRequest, ok_response, status_response};
use crate::hs::desc::{MAX_HS_DESC_LEN, UncheckedHsDesc};

/// Default most descriptors an HSDir holds.
pub const MAX_HS_STORED: usize = 8192;
/// Default most bytes of descriptors (raw and compressed) an HSDir holds.
pub const MAX_HS_STORE_BYTES: usize = 64 * 1024 * 1024;

/// Why an upload was refused (its HTTP status is [`HsStoreError::status`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HsStoreError {
    /// Larger than [`MAX_HS_DESC_LEN`].
    #[error("descriptor larger than {MAX_HS_DESC_LEN} bytes")]
    TooLarge,
    /// Not a descriptor, or its certificate or signature does not verify, or it expired.
    #[error("descriptor refused: {0}")]
    Invalid(String),
    /// The path names another blinded key than the descriptor's.
    #[error("the descriptor is for another blinded key than the request path")]
    WrongKey,
    /// A descriptor with this revision or a higher one is held.
    #[error("revision {got} is not above the held revision {held}")]
    NotNewer {
        /// Revision held.
        held: u64,
        /// Revision uploaded.
        got: u64,
    },
    /// The store is full.
    #[error("descriptor store full")]
    Full,
}

impl HsStoreError {
    /// The HTTP status an HSDir answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge | Self::Invalid(_) | Self::WrongKey => 400,
            Self::NotNewer { .. } => 409,
            Self::Full => 503,
        }
    }
}

/// Counters of a store (all since start but `stored`/`bytes`).
#[derive(Debug, Default)]
pub struct HsStoreStats {
    /// Uploads stored.
    pub uploads_stored: AtomicU64,
    /// Uploads refused (any reason).
    pub uploads_refused: AtomicU64,
    /// Fetches answered with a descriptor.
    pub fetches_served: AtomicU64,
    /// Fetches answered 404.
    pub fetches_missed: AtomicU64,
    /// Descriptors dropped at the end of their lifetime.
    pub expired: AtomicU64,
}

struct Stored {
    /// zlib of the descriptor, as served.
    z: Vec<u8>,
    raw_len: usize,
    revision: u64,
    expires: u64,
}

impl Stored {
    fn cost(&self) -> usize {
        self.z.len() + self.raw_len
    }
}

/// The descriptors one HSDir holds.
pub struct HsDescStore {
    by_key: HashMap<[u8; 32], Stored>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    stats: HsStoreStats,
}

impl std::fmt::Debug for HsDescStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsDescStore")
            .field("entries", &self.by_key.len())
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Default for HsDescStore {
    fn default() -> Self {
        Self::new(MAX_HS_STORED, MAX_HS_STORE_BYTES)
    }
}

impl HsDescStore {
    /// An empty store holding at most `max_entries` descriptors and `max_bytes` bytes.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            stats: HsStoreStats::default(),
        }
    }

    /// Verify and store descriptor `body` uploaded for `path_key` at `now` (Unix seconds).
    pub fn upload(
        &mut self,
        path_key: &BlindedPublicKey,
        body: &[u8],
        now: u64,
    ) -> Result<(), HsStoreError> {
        let r = self.try_upload(path_key, body, now);
        let c = match r {
            Ok(()) => &self.stats.uploads_stored,
            Err(_) => &self.stats.uploads_refused,
        };
        c.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn try_upload(
        &mut self,
        path_key: &BlindedPublicKey,
        body: &[u8],
        now: u64,
    ) -> Result<(), HsStoreError> {
        if body.len() > MAX_HS_DESC_LEN {
            return Err(HsStoreError::TooLarge);
        }
        let d = UncheckedHsDesc::parse(body)
            .and_then(|u| u.check(now))
            .map_err(|e| HsStoreError::Invalid(e.to_string()))?;
        if !allium_crypto::ct::ct_eq(&d.blinded_key().0, &path_key.0) {
            return Err(HsStoreError::WrongKey);
        }
        self.expire(now);
        let key = path_key.0;
        if let Some(old) = self.by_key.get(&key)
            && old.revision >= d.revision()
        {
            return Err(HsStoreError::NotNewer {
                held: old.revision,
                got: d.revision(),
            });
        }
        let lifetime = u64::from(d.lifetime_minutes()) * 60;
        let new = Stored {
            z: compress(d.as_bytes()),
            raw_len: d.as_bytes().len(),
            revision: d.revision(),
            expires: now.saturating_add(lifetime).min(d.cert_expires()),
        };
        let freed = self.by_key.get(&key).map_or(0, Stored::cost);
        let entries_after = self.by_key.len() + usize::from(freed == 0);
        if entries_after > self.max_entries || self.bytes - freed + new.cost() > self.max_bytes {
            return Err(HsStoreError::Full);
        }
        self.bytes = self.bytes - freed + new.cost();
        self.by_key.insert(key, new);
        Ok(())
    }

    /// The descriptor held for `key` at `now` (compressed, as served), if any.
    pub fn get_compressed(&self, key: &BlindedPublicKey, now: u64) -> Option<&[u8]> {
        self.by_key
            .get(&key.0)
            .filter(|s| s.expires > now)
            .map(|s| s.z.as_slice())
    }

    /// Drop the descriptors whose time is up; how many went.
    pub fn expire(&mut self, now: u64) -> usize {
        let before = self.by_key.len();
        let mut freed = 0;
        self.by_key.retain(|_, s| {
            let keep = s.expires > now;
            if !keep {
                freed += s.cost();
            }
            keep
        });
        self.bytes -= freed;
        let n = before - self.by_key.len();
        self.stats.expired.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The whole response to a descriptor request (`None` for other requests): the descriptor
    /// (200, deflate) or 404 for [`DirRequest::HsDesc`]; 200 (empty) or the refusal's status
    /// with its reason for [`DirRequest::HsUpload`] whose `body` followed the head.
    pub fn respond(&mut self, req: &DirRequest, body: &[u8], now: u64) -> Option<Vec<u8>> {
        match req {
            DirRequest::HsDesc { blinded } => Some(match self.get_compressed(blinded, now) {
                Some(z) => {
                    self.stats.fetches_served.fetch_add(1, Ordering::Relaxed);
                    ok_response(Body::Full(z))
                }
                None => {
                    self.stats.fetches_missed.fetch_add(1, Ordering::Relaxed);
                    status_response(404, "no descriptor for this blinded key")
                }
            }),
            DirRequest::HsUpload { blinded, len } => {
                if body.len() != *len {
                    self.stats.uploads_refused.fetch_add(1, Ordering::Relaxed);
                    return Some(status_response(
                        400,
                        "body length differs from Content-Length",
                    ));
                }
                Some(match self.upload(blinded, body, now) {
                    Ok(()) => status_response(200, ""),
                    Err(e) => status_response(e.status(), &e.to_string()),
                })
            }
            _ => None,
        }
    }

    /// Descriptors held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Bytes held (raw and compressed).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The counters.
    pub fn stats(&self) -> &HsStoreStats {
        &self.stats
    }
}
