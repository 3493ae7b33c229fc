//! The two HSDir requests, as the directory-fetch section defines them (docs/protocol/
//! 85-directory-fetch.md, "Onion-service descriptors"): sent on a BEGIN_DIR stream to an HSDir
//! that the ring picked. One function each, so that the wire form lives in one place.

use allium_crypto::hs::BlindedPublicKey;
use allium_directory::hs::desc::MAX_HS_DESC_LEN;

/// `GET /allium/v1/hs/<64 hex> HTTP/1.0` and an empty line: fetch the descriptor stored under
/// `blinded`.
pub fn fetch_request(blinded: &BlindedPublicKey) -> Vec<u8> {
    format!(
        "GET /allium/v1/hs/{} HTTP/1.0\r\n\r\n",
        hex::encode(blinded.as_bytes())
    )
    .into_bytes()
}

/// `POST /allium/v1/hs/<64 hex> HTTP/1.0`, `Content-Length`, an empty line and the descriptor:
/// upload `desc` (the signed envelope) under `blinded`. `None` when `desc` is empty or larger
/// than a descriptor may be.
pub fn upload_request(blinded: &BlindedPublicKey, desc: &[u8]) -> Option<Vec<u8>> {
    if desc.is_empty() || desc.len() > MAX_HS_DESC_LEN {
        return None;
    }
    let mut v = format!(
        "POST /allium/v1/hs/{} HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
        hex::encode(blinded.as_bytes()),
        desc.len()
    )
    .into_bytes();
    v.extend_from_slice(desc);
    Some(v)
}
