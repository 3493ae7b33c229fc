//! The HSDir role of the relay: descriptors uploaded over BEGIN_DIR (`POST /allium/v1/hs/KEY`)
//! are verified and kept in an [`HsDescStore`] (bounded, expiring), and served on
//! `GET /allium/v1/hs/KEY` (docs/protocol/85-directory-fetch.md, "Onion-service descriptors").
//! Only a relay the consensus gives the HSDir flag acts as one; any other answers these
//! requests 404, as a plain directory cache does.

use allium_directory::dircache::{DirRequest, HsDescStore, parse_request};
use allium_directory::doc::Flags;

use crate::ctx::Ctx;

/// Whether the current consensus gives this relay the HSDir flag.
pub(crate) fn is_hsdir(ctx: &Ctx) -> bool {
    ctx.netdir()
        .and_then(|nd| nd.by_id(&ctx.keys.id).map(|e| e.flags))
        .is_some_and(|f| f.contains(Flags::HSDIR))
}

/// The response to a directory request if it is a descriptor request this relay answers as an
/// HSDir (`body`: the upload's bytes after the head); `None` for everything else (the archive
/// answers).
pub(crate) fn respond(ctx: &Ctx, head: &[u8], body: &[u8], now_unix: u64) -> Option<Vec<u8>> {
    let req = parse_request(head).ok()?;
    if !matches!(req, DirRequest::HsDesc { .. } | DirRequest::HsUpload { .. }) || !is_hsdir(ctx) {
        return None;
    }
    let mut store = ctx.hsdir.lock().unwrap_or_else(|p| p.into_inner());
    store.respond(&req, body, now_unix)
}

/// A snapshot of the HSDir counters (for `/metrics` and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HsDirCounts {
    /// Descriptors held now.
    pub stored: u64,
    /// Bytes of descriptors held now.
    pub bytes: u64,
    /// Uploads stored since start.
    pub uploads_stored: u64,
    /// Uploads refused since start.
    pub uploads_refused: u64,
    /// Fetches served since start.
    pub fetches_served: u64,
    /// Fetches answered 404 since start.
    pub fetches_missed: u64,
    /// Descriptors expired since start.
    pub expired: u64,
}

pub(crate) fn counts(store: &HsDescStore) -> HsDirCounts {
    use std::sync::atomic::Ordering::Relaxed;
    let s = store.stats();
    HsDirCounts {
        stored: store.len() as u64,
        bytes: store.bytes() as u64,
        uploads_stored: s.uploads_stored.load(Relaxed),
        uploads_refused: s.uploads_refused.load(Relaxed),
        fetches_served: s.fetches_served.load(Relaxed),
        fetches_missed: s.fetches_missed.load(Relaxed),
        expired: s.expired.load(Relaxed),
    }
}

impl crate::RelayHandle {
    /// The descriptor this relay serves for `blinded` now, as a fetch over BEGIN_DIR would
    /// return it (`None`: it answers 404). For tests and diagnostics; counts as a fetch.
    pub fn hsdir_descriptor(
        &self,
        blinded: &allium_crypto::hs::BlindedPublicKey,
    ) -> Option<Vec<u8>> {
        let req = DirRequest::HsDesc { blinded: *blinded };
        let head = allium_directory::dircache::encode_request(&req);
        let resp = respond(&self.ctx, &head, &[], allium_directory::now_unix())?;
        allium_directory::dircache::parse_hs_desc_response(&resp).ok()
    }

    /// The HSDir counters of this relay.
    pub fn hsdir_counts(&self) -> HsDirCounts {
        let store = self.ctx.hsdir.lock().unwrap_or_else(|p| p.into_inner());
        counts(&store)
    }
}
