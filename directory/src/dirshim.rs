//! TEMPORARY stand-in for `crate::dircache` (helper "diff" owns the real module): the agreed API,
//! full documents only. Deleted when w3-diff is merged.
#![allow(missing_docs)]

use crate::err::{DirError, Result};

pub const MAX_REQUEST_HEAD: usize = 1024;
pub const MAX_RESPONSE: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug, Default)]
pub struct ArchiveConfig {
    pub keep: usize,
}

#[derive(Debug, Default)]
pub struct DirArchive {
    consensus: Option<(Vec<u8>, u64)>,
    certs: Vec<u8>,
}

pub enum DirRequest {
    Consensus { have: Vec<[u8; 32]> },
    Certs,
}

impl DirArchive {
    pub fn new(_cfg: ArchiveConfig) -> Self {
        Self::default()
    }
    pub fn insert(
        &mut self,
        consensus_raw: &[u8],
        valid_after: u64,
        certs_raw: &[u8],
    ) -> Result<()> {
        if self
            .consensus
            .as_ref()
            .is_some_and(|(_, v)| *v >= valid_after)
        {
            return Ok(());
        }
        self.consensus = Some((consensus_raw.to_vec(), valid_after));
        self.certs = certs_raw.to_vec();
        Ok(())
    }
    pub fn latest_digest(&self) -> Option<[u8; 32]> {
        self.consensus.as_ref().and_then(|(c, _)| {
            crate::doc::Signed::<crate::doc::Consensus>::from_bytes(c)
                .ok()
                .map(|s| s.digest())
        })
    }
    pub fn respond(&self, request_head: &[u8], _now: u64) -> Vec<u8> {
        let body = if request_head.starts_with(b"GET /c ") {
            self.consensus.as_ref().map(|(c, _)| c.clone())
        } else if request_head.starts_with(b"GET /k ") {
            Some(self.certs.clone())
        } else {
            None
        };
        match body {
            Some(b) => {
                let mut out = format!("200 {}\r\n\r\n", b.len()).into_bytes();
                out.extend_from_slice(&b);
                out
            }
            None => b"404 0\r\n\r\n".to_vec(),
        }
    }
}

pub fn encode_request(req: &DirRequest) -> Vec<u8> {
    match req {
        DirRequest::Consensus { .. } => b"GET /c \r\n\r\n".to_vec(),
        DirRequest::Certs => b"GET /k \r\n\r\n".to_vec(),
    }
}

pub fn request_head_complete(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn body(resp: &[u8]) -> Result<Vec<u8>> {
    let end = request_head_complete(resp).ok_or(DirError::Malformed {
        object: "dir response",
        why: "no head",
    })?;
    if !resp.starts_with(b"200 ") {
        return Err(DirError::Malformed {
            object: "dir response",
            why: "not 200",
        });
    }
    Ok(resp.get(end..).unwrap_or(&[]).to_vec())
}

pub fn parse_consensus_response(resp: &[u8], _have: Option<&[u8]>) -> Result<Vec<u8>> {
    body(resp)
}

pub fn parse_certs_response(resp: &[u8]) -> Result<Vec<u8>> {
    body(resp)
}
