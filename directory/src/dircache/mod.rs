//! Directory caches, sans-IO: the archive of recent consensuses a cache serves, the request and
//! response bytes of a directory fetch over a BEGIN_DIR stream, and consensus diffs
//! (docs/protocol/80-directory.md, "Directory cache requests" and "Consensus diffs").
//!
//! Agreed API (with the "dircache" transport): [`DirArchive`] (`new`, `insert`,
//! `latest_digest`, `respond`), [`DirRequest`], [`encode_request`], [`MAX_REQUEST_HEAD`],
//! [`MAX_RESPONSE`], [`request_head_complete`], [`parse_consensus_response`],
//! [`parse_certs_response`]. Additions beyond it: [`consensus_digest`] (the digest a client
//! sends in `have`), [`response_complete`] (where a response ends, for a reader that does not
//! wait for the end of the stream), [`ArchiveConfig`] fields, [`ArchiveStats`] /
//! [`DirArchive::stats`], and the diff functions [`diff::compute`] and [`diff::apply`].
//!
//! Everything here takes bytes in and gives bytes out; nothing reads the clock (`now` is a
//! parameter) and nothing does I/O. Input from the network is bounded before anything is
//! allocated for it, and parsed without panics.

mod archive;
pub mod diff;
mod hsdir;
mod http;

pub use archive::{ArchiveConfig, ArchiveStats, DirArchive};
pub use hsdir::{HsDescStore, HsStoreError, HsStoreStats, MAX_HS_STORE_BYTES, MAX_HS_STORED};
pub use http::{
    DirRequest, HS_PATH_PREFIX, MAX_HAVE, MAX_REQUEST_HEAD, MAX_RESPONSE, encode_hs_upload,
    encode_request, parse_certs_response, parse_consensus_response, parse_hs_desc_response,
    parse_hs_upload_response, parse_request, request_head_complete, response_complete,
};

/// The digest that names a consensus in requests, responses and diffs: SHA-256 of the whole
/// signed envelope as served (body and signatures), so a diff base is pinned to exact bytes.
/// (The body digest, [`crate::doc::Signed::digest`], does not cover the signatures, which
/// authorities add after publication.)
pub fn consensus_digest(raw: &[u8]) -> [u8; 32] {
    crate::doc::signed::sha256(raw)
}

/// Zlib-compress (the `deflate` content encoding of HTTP) at the best level: done once per
/// body and shared.
pub(crate) fn compress(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    if e.write_all(bytes).is_err() {
        return Vec::new();
    }
    e.finish().unwrap_or_default()
}

/// Inflate a zlib stream, refusing more than `max` bytes of output.
pub(crate) fn inflate(z: &[u8], max: usize, object: &'static str) -> crate::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let mut dec = flate2::read::ZlibDecoder::new(z).take(max as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|_| crate::DirError::Malformed {
            object,
            why: "bad zlib stream",
        })?;
    if out.len() > max {
        return Err(crate::DirError::TooLarge {
            object,
            len: out.len(),
            max,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod hsdir_tests;
#[cfg(test)]
mod tests;
