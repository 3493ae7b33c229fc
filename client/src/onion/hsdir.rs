//! The two HSDir exchanges, as the directory-fetch section defines them (docs/protocol/
//! 85-directory-fetch.md, "Onion-service descriptors"): sent on a BEGIN_DIR stream to an HSDir
//! that the ring picked. The request bytes come from the directory crate's encoder (the same
//! one whose parser the relay's HSDir role uses, relay/src/hsdir.rs), so the wire form lives in
//! one place; responses are read with its parsers.

use allium_crypto::hs::BlindedPublicKey;
use allium_directory::dircache::{
    DirRequest, encode_hs_upload, encode_request, parse_hs_desc_response, parse_hs_upload_response,
    response_complete,
};
use allium_directory::hs::desc::MAX_HS_DESC_LEN;

use super::client::OnionError;

/// `GET /allium/v1/hs/<64 hex> HTTP/1.0` and an empty line: fetch the descriptor stored under
/// `blinded`.
pub fn fetch_request(blinded: &BlindedPublicKey) -> Vec<u8> {
    encode_request(&DirRequest::HsDesc { blinded: *blinded })
}

/// `POST /allium/v1/hs/<64 hex> HTTP/1.0`, `Content-Length`, an empty line and the descriptor:
/// upload `desc` (the signed envelope) under `blinded`. `None` when `desc` is empty or larger
/// than a descriptor may be.
pub fn upload_request(blinded: &BlindedPublicKey, desc: &[u8]) -> Option<Vec<u8>> {
    if desc.is_empty() || desc.len() > MAX_HS_DESC_LEN {
        return None;
    }
    Some(encode_hs_upload(blinded, desc))
}

/// How much of an HSDir's response has arrived on the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseProgress {
    /// Keep reading.
    Partial,
    /// The whole response is the first `n` bytes of the buffer.
    Complete(usize),
}

/// Whether `buf` (what the BEGIN_DIR stream delivered so far) holds a whole response. An error
/// means the HSDir sent something that is not a valid response: close the stream and try the
/// next HSDir.
pub fn response_progress(buf: &[u8]) -> Result<ResponseProgress, OnionError> {
    match response_complete(buf) {
        Ok(Some(n)) => Ok(ResponseProgress::Complete(n)),
        Ok(None) => Ok(ResponseProgress::Partial),
        Err(e) => Err(OnionError::DescInvalid(format!("bad HSDir response: {e}"))),
    }
}

/// The descriptor (the signed envelope, still to be opened with
/// [`super::client::open_descriptor`]) in an HSDir's whole response to [`fetch_request`].
/// A 404, another refusal or a malformed answer is [`OnionError::DescNotFound`] (this HSDir
/// has no usable copy): the caller asks the next HSDir.
pub fn fetch_response(resp: &[u8]) -> Result<Vec<u8>, OnionError> {
    parse_hs_desc_response(resp).map_err(|_| OnionError::DescNotFound)
}

/// `Ok` if an HSDir's whole response to [`upload_request`] says it stored the descriptor; the
/// error (status and reason, for the log) otherwise.
pub fn upload_response(resp: &[u8]) -> Result<(), String> {
    parse_hs_upload_response(resp).map_err(|e| e.to_string())
}
