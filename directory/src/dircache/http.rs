//! The bytes of a directory fetch over a BEGIN_DIR stream: a minimal HTTP/1.0-shaped request
//! head (no user agent, no optional headers, one fixed form per request) and a response of
//! status line, `Content-Length`, `Content-Encoding` and body.

use super::diff;
use crate::client::MAX_CERTS_LEN;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::err::{DirError, Result};
use crate::hs::desc::MAX_HS_DESC_LEN;
use crate::paths;
use allium_crypto::hs::BlindedPublicKey;

/// Longest request head a cache reads (request line, `X-Have`, blank line).
pub const MAX_REQUEST_HEAD: usize = 1024;
/// Most digests in one `X-Have` line.
pub const MAX_HAVE: usize = 8;
/// Longest response a client reads: a compressed consensus of [`MAX_CONSENSUS_LEN`] plus the
/// head (zlib adds at most a few bytes per 16 KiB block of incompressible input).
pub const MAX_RESPONSE: usize = MAX_CONSENSUS_LEN + 64 * 1024;
/// Longest response head.
pub(crate) const MAX_RESPONSE_HEAD: usize = 512;
/// Longest error reason kept from a response body.
const MAX_REASON: usize = 200;

const VERSION: &[u8] = b"HTTP/1.0";
const HAVE: &[u8] = b"X-Have: ";
const DIFF_FROM: &str = "X-Diff-From";

/// What a client asks a directory cache for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirRequest {
    /// The latest consensus; `have` lists the [`super::consensus_digest`]s of consensuses the
    /// client holds (at most [`MAX_HAVE`]), so the cache can answer with a diff or
    /// "not modified".
    Consensus {
        /// Digests of consensuses held, most preferred first.
        have: Vec<[u8; 32]>,
    },
    /// The authority certificate list.
    Certs,
    /// An onion-service descriptor by blinded key, from an HSDir (`GET /allium/v1/hs/KEY`).
    HsDesc {
        /// The blinded key it is stored under.
        blinded: BlindedPublicKey,
    },
    /// A descriptor upload to an HSDir (`POST /allium/v1/hs/KEY`): the head announces `len`
    /// bytes of descriptor (at most [`MAX_HS_DESC_LEN`]), which follow the head on the stream.
    HsUpload {
        /// The blinded key it is to be stored under (the descriptor's own).
        blinded: BlindedPublicKey,
        /// Length of the descriptor that follows.
        len: usize,
    },
}

/// The path prefix of descriptor requests; the blinded key follows in lowercase hex.
pub const HS_PATH_PREFIX: &str = "/allium/v1/hs/";

fn hs_path(out: &mut Vec<u8>, blinded: &BlindedPublicKey) {
    out.extend_from_slice(HS_PATH_PREFIX.as_bytes());
    out.extend_from_slice(hex::encode(blinded.0).as_bytes());
}

/// The whole upload of descriptor `desc` (head and body) for `blinded`.
pub fn encode_hs_upload(blinded: &BlindedPublicKey, desc: &[u8]) -> Vec<u8> {
    let mut out = encode_request(&DirRequest::HsUpload {
        blinded: *blinded,
        len: desc.len(),
    });
    out.extend_from_slice(desc);
    out
}

/// The request head for `req`. Digests beyond [`MAX_HAVE`] are left out.
pub fn encode_request(req: &DirRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    if let DirRequest::HsUpload { blinded, len } = req {
        out.extend_from_slice(b"POST ");
        hs_path(&mut out, blinded);
        out.push(b' ');
        out.extend_from_slice(VERSION);
        out.extend_from_slice(format!("\r\nContent-Length: {len}\r\n\r\n").as_bytes());
        return out;
    }
    out.extend_from_slice(b"GET ");
    match req {
        DirRequest::HsDesc { blinded } => {
            hs_path(&mut out, blinded);
            out.push(b' ');
            out.extend_from_slice(VERSION);
            out.extend_from_slice(b"\r\n");
        }
        DirRequest::HsUpload { .. } => {}
        DirRequest::Consensus { have } => {
            out.extend_from_slice(paths::CONSENSUS.as_bytes());
            out.push(b' ');
            out.extend_from_slice(VERSION);
            out.extend_from_slice(b"\r\n");
            if !have.is_empty() {
                out.extend_from_slice(HAVE);
                for (i, d) in have.iter().take(MAX_HAVE).enumerate() {
                    if i > 0 {
                        out.push(b' ');
                    }
                    out.extend_from_slice(hex::encode(d).as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        DirRequest::Certs => {
            out.extend_from_slice(paths::CERTS.as_bytes());
            out.push(b' ');
            out.extend_from_slice(VERSION);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The length of the request head at the start of `buf` (through the blank line), once it is
/// all there. `None` means "read more" while `buf` is shorter than [`MAX_REQUEST_HEAD`]; past
/// that, the peer is not sending a valid request and the stream should be closed.
pub fn request_head_complete(buf: &[u8]) -> Option<usize> {
    let window = buf.get(..MAX_REQUEST_HEAD.min(buf.len()))?;
    find(window, b"\r\n\r\n").map(|i| i + 4)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn bad(why: &'static str) -> DirError {
    DirError::Malformed {
        object: "directory request",
        why,
    }
}

/// Parse a request head exactly as [`encode_request`] writes it (anything else is refused, so
/// every client's request for the same thing is the same bytes).
pub fn parse_request(head: &[u8]) -> Result<DirRequest> {
    if head.len() > MAX_REQUEST_HEAD {
        return Err(bad("request head too long"));
    }
    let body = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or(bad("request head does not end with an empty line"))?;
    let mut lines = body.split(|b| *b == b'\n');
    let first = lines.next().ok_or(bad("empty request"))?;
    let second = lines.next();
    if lines.next().is_some() {
        return Err(bad("unexpected header lines"));
    }
    // Lines end with CRLF: the split on LF leaves a CR on every line but the last.
    let first = match second {
        Some(_) => first
            .strip_suffix(b"\r")
            .ok_or(bad("lines must end with CRLF"))?,
        None => first,
    };
    if let Some(rest) = first.strip_prefix(b"POST ") {
        let path = rest
            .strip_suffix(b" HTTP/1.0")
            .ok_or(bad("request line must end with HTTP/1.0"))?;
        let blinded = parse_hs_path(path)?.ok_or(bad("only descriptors are uploaded"))?;
        let len = second
            .and_then(|l| l.strip_prefix(b"Content-Length: "))
            .ok_or(bad("an upload needs a Content-Length"))?;
        let len = parse_len(len)?;
        return Ok(DirRequest::HsUpload { blinded, len });
    }
    let rest = first
        .strip_prefix(b"GET ")
        .ok_or(bad("only GET and POST are served"))?;
    let path = rest
        .strip_suffix(b" HTTP/1.0")
        .ok_or(bad("request line must end with HTTP/1.0"))?;
    if let Some(blinded) = parse_hs_path(path)? {
        if second.is_some() {
            return Err(bad("unexpected header lines"));
        }
        return Ok(DirRequest::HsDesc { blinded });
    }
    if path == paths::CERTS.as_bytes() {
        if second.is_some() {
            return Err(bad("unexpected header lines"));
        }
        return Ok(DirRequest::Certs);
    }
    if path != paths::CONSENSUS.as_bytes() {
        return Err(bad("unknown path"));
    }
    let Some(line) = second else {
        return Ok(DirRequest::Consensus { have: Vec::new() });
    };
    let list = line
        .strip_prefix(HAVE)
        .ok_or(bad("the only header allowed is X-Have"))?;
    let mut have = Vec::new();
    for word in list.split(|b| *b == b' ') {
        if have.len() >= MAX_HAVE {
            return Err(bad("too many digests in X-Have"));
        }
        let mut d = [0u8; 32];
        if word.len() != 64 || hex::decode_to_slice(word, &mut d).is_err() {
            return Err(bad("X-Have must list 64-digit hex digests"));
        }
        if word.iter().any(u8::is_ascii_uppercase) {
            return Err(bad("X-Have digests must be lowercase hex"));
        }
        have.push(d);
    }
    Ok(DirRequest::Consensus { have })
}

/// `Some(key)` if `path` is a descriptor path; an error if it is one with a bad key.
fn parse_hs_path(path: &[u8]) -> Result<Option<BlindedPublicKey>> {
    let Some(key) = path.strip_prefix(HS_PATH_PREFIX.as_bytes()) else {
        return Ok(None);
    };
    let mut k = [0u8; 32];
    if key.len() != 64
        || key.iter().any(u8::is_ascii_uppercase)
        || hex::decode_to_slice(key, &mut k).is_err()
    {
        return Err(bad("a descriptor path ends with 64 lowercase hex digits"));
    }
    Ok(Some(BlindedPublicKey(k)))
}

/// An upload's Content-Length: decimal, no leading zero, 1 to [`MAX_HS_DESC_LEN`].
fn parse_len(v: &[u8]) -> Result<usize> {
    if v.is_empty() || v.len() > 6 || !v.iter().all(u8::is_ascii_digit) || v.first() == Some(&b'0')
    {
        return Err(bad("bad Content-Length"));
    }
    let n = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or(bad("bad Content-Length"))?;
    if n > MAX_HS_DESC_LEN {
        return Err(bad("descriptor larger than MAX_HS_DESC_LEN"));
    }
    Ok(n)
}

/// A response body and how it is encoded.
pub(crate) enum Body<'a> {
    /// A zlib-compressed full document.
    Full(&'a [u8]),
    /// A zlib-compressed diff from the consensus with this digest.
    Diff(&'a [u8], [u8; 32]),
}

/// A 200 response.
pub(crate) fn ok_response(body: Body<'_>) -> Vec<u8> {
    let (bytes, from) = match body {
        Body::Full(b) => (b, None),
        Body::Diff(b, from) => (b, Some(from)),
    };
    let mut out = Vec::with_capacity(bytes.len() + 128);
    out.extend_from_slice(b"HTTP/1.0 200 OK\r\n");
    out.extend_from_slice(format!("Content-Length: {}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(b"Content-Encoding: deflate\r\n");
    if let Some(d) = from {
        out.extend_from_slice(format!("{DIFF_FROM}: {}\r\n", hex::encode(d)).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out
}

/// A response without a document: `status` with a one-line plain-text reason (empty for 304).
pub(crate) fn status_response(status: u16, reason: &str) -> Vec<u8> {
    let phrase = match status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.0 {status} {phrase}\r\nContent-Length: {}\r\n\r\n",
        reason.len()
    )
    .into_bytes();
    out.extend_from_slice(reason.as_bytes());
    out
}

/// A parsed response.
#[derive(Debug)]
struct Response<'a> {
    status: u16,
    deflate: bool,
    diff_from: Option<[u8; 32]>,
    body: &'a [u8],
}

fn rbad(why: &'static str) -> DirError {
    DirError::Malformed {
        object: "directory response",
        why,
    }
}

/// A parsed response head.
struct Head {
    status: u16,
    len: usize,
    deflate: bool,
    diff_from: Option<[u8; 32]>,
    /// Length of the head, blank line included.
    head_len: usize,
}

/// Parse the head of a response.
fn parse_head(resp: &[u8]) -> Result<Head> {
    let window = resp
        .get(..MAX_RESPONSE_HEAD.min(resp.len()))
        .unwrap_or(resp);
    let end = find(window, b"\r\n\r\n").ok_or(rbad("no complete response head"))?;
    let head = window.get(..end).ok_or(rbad("no complete response head"))?;
    let head = std::str::from_utf8(head).map_err(|_| rbad("response head is not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(rbad("empty response"))?;
    let rest = status_line
        .strip_prefix("HTTP/1.0 ")
        .ok_or(rbad("status line must start with HTTP/1.0"))?;
    let code = rest.get(..3).ok_or(rbad("no status code"))?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || rest.as_bytes().get(3) != Some(&b' ') {
        return Err(rbad("bad status code"));
    }
    let status: u16 = code.parse().map_err(|_| rbad("bad status code"))?;
    let mut len = None;
    let mut deflate = false;
    let mut from = None;
    for line in lines {
        let (name, value) = line
            .split_once(": ")
            .ok_or(rbad("header line without ': '"))?;
        match name {
            "Content-Length" if len.is_none() => {
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(rbad("bad Content-Length"));
                }
                let n: usize = value.parse().map_err(|_| rbad("bad Content-Length"))?;
                if n > MAX_RESPONSE {
                    return Err(DirError::TooLarge {
                        object: "directory response",
                        len: n,
                        max: MAX_RESPONSE,
                    });
                }
                len = Some(n);
            }
            "Content-Encoding" if !deflate => {
                if value != "deflate" {
                    return Err(rbad("unknown Content-Encoding"));
                }
                deflate = true;
            }
            DIFF_FROM if from.is_none() => {
                let mut d = [0u8; 32];
                if value.len() != 64 || hex::decode_to_slice(value, &mut d).is_err() {
                    return Err(rbad("bad X-Diff-From digest"));
                }
                from = Some(d);
            }
            _ => return Err(rbad("unexpected or repeated header")),
        }
    }
    let len = len.ok_or(rbad("no Content-Length"))?;
    Ok(Head {
        status,
        len,
        deflate,
        diff_from: from,
        head_len: end + 4,
    })
}

/// The total length of the response at the start of `buf` once it has all arrived (head and
/// `Content-Length` bytes of body); `Ok(None)` means "read more". An error means the head is
/// malformed or longer than allowed: close the stream.
pub fn response_complete(buf: &[u8]) -> Result<Option<usize>> {
    let window = buf.get(..MAX_RESPONSE_HEAD.min(buf.len())).unwrap_or(buf);
    if find(window, b"\r\n\r\n").is_none() {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(rbad("response head too long"));
        }
        return Ok(None);
    }
    let h = parse_head(buf)?;
    let total = h.head_len.saturating_add(h.len);
    Ok((buf.len() >= total).then_some(total))
}

fn parse_response(resp: &[u8]) -> Result<Response<'_>> {
    if resp.len() > MAX_RESPONSE {
        return Err(DirError::TooLarge {
            object: "directory response",
            len: resp.len(),
            max: MAX_RESPONSE,
        });
    }
    let Head {
        status,
        len,
        deflate,
        diff_from,
        head_len,
    } = parse_head(resp)?;
    let body = resp.get(head_len..).unwrap_or_default();
    if body.len() != len {
        return Err(rbad("body length differs from Content-Length (truncated?)"));
    }
    Ok(Response {
        status,
        deflate,
        diff_from,
        body,
    })
}

/// The error for a non-200 status: the status and the first line of the body, printable only.
fn status_error(what: &str, r: &Response<'_>) -> DirError {
    let reason: String = r
        .body
        .split(|b| *b == b'\n')
        .next()
        .unwrap_or_default()
        .iter()
        .take(MAX_REASON)
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                char::from(*b)
            } else {
                '?'
            }
        })
        .collect();
    DirError::HttpStatus {
        what: what.to_string(),
        status: r.status,
        reason,
    }
}

/// The consensus envelope (raw signed bytes, not yet verified) from a cache's whole response
/// to a [`DirRequest::Consensus`]. `have` is the raw consensus whose digest the request listed
/// first: a diff is applied to it (and the result's digest checked), and "304 Not Modified"
/// returns a copy of it. A diff that does not apply is an error; fetch again without `have`.
pub fn parse_consensus_response(resp: &[u8], have: Option<&[u8]>) -> Result<Vec<u8>> {
    const WHAT: &str = "fetching the consensus from a directory cache";
    let r = parse_response(resp)?;
    match r.status {
        200 => {}
        304 => {
            return have.map(<[u8]>::to_vec).ok_or(rbad(
                "\"not modified\" but no consensus was offered in the request",
            ));
        }
        _ => return Err(status_error(WHAT, &r)),
    }
    if !r.deflate {
        return Err(rbad("the body must be deflate-encoded"));
    }
    match r.diff_from {
        None => super::inflate(r.body, MAX_CONSENSUS_LEN, "consensus"),
        Some(from) => {
            let base = have.ok_or(rbad("a diff was sent but no consensus was offered"))?;
            if super::consensus_digest(base) != from {
                return Err(rbad("the diff is from another consensus than the one held"));
            }
            let d = super::inflate(r.body, diff::MAX_DIFF_LEN, "consensus diff")?;
            diff::apply(base, &d)
        }
    }
}

/// The certificate list bytes (postcard `Vec<Vec<u8>>`, as `client::parse_cert_list` reads)
/// from a cache's whole response to a [`DirRequest::Certs`].
pub fn parse_certs_response(resp: &[u8]) -> Result<Vec<u8>> {
    let r = parse_response(resp)?;
    if r.status != 200 {
        return Err(status_error(
            "fetching authority certificates from a directory cache",
            &r,
        ));
    }
    if !r.deflate || r.diff_from.is_some() {
        return Err(rbad(
            "the certificate list must be a deflate-encoded document",
        ));
    }
    super::inflate(r.body, MAX_CERTS_LEN, "certificate list")
}

/// The descriptor (raw envelope, not yet verified) from an HSDir's whole response to a
/// [`DirRequest::HsDesc`]; a 404 (not held) is an error like any other status.
pub fn parse_hs_desc_response(resp: &[u8]) -> Result<Vec<u8>> {
    let r = parse_response(resp)?;
    if r.status != 200 {
        return Err(status_error(
            "fetching an onion-service descriptor from an HSDir",
            &r,
        ));
    }
    if !r.deflate || r.diff_from.is_some() {
        return Err(rbad("the descriptor must be a deflate-encoded document"));
    }
    super::inflate(r.body, MAX_HS_DESC_LEN, "onion-service descriptor")
}

/// `Ok` if an HSDir's whole response to a [`DirRequest::HsUpload`] says the descriptor was
/// stored (200); the status and reason otherwise.
pub fn parse_hs_upload_response(resp: &[u8]) -> Result<()> {
    let r = parse_response(resp)?;
    if r.status != 200 {
        return Err(status_error(
            "uploading an onion-service descriptor to an HSDir",
            &r,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        for req in [
            DirRequest::Certs,
            DirRequest::Consensus { have: vec![] },
            DirRequest::Consensus {
                have: vec![[7u8; 32]],
            },
            DirRequest::Consensus {
                have: (0..MAX_HAVE as u8).map(|i| [i; 32]).collect(),
            },
        ] {
            let head = encode_request(&req);
            assert!(head.len() <= MAX_REQUEST_HEAD);
            assert_eq!(request_head_complete(&head), Some(head.len()));
            assert_eq!(parse_request(&head).unwrap(), req);
        }
    }

    #[test]
    fn request_bytes_are_fixed() {
        assert_eq!(
            encode_request(&DirRequest::Certs),
            b"GET /allium/v1/certs HTTP/1.0\r\n\r\n"
        );
        let h = encode_request(&DirRequest::Consensus {
            have: vec![[0xab; 32]],
        });
        let want = format!(
            "GET /allium/v1/consensus HTTP/1.0\r\nX-Have: {}\r\n\r\n",
            "ab".repeat(32)
        );
        assert_eq!(h, want.as_bytes());
    }

    #[test]
    fn request_head_complete_waits_and_bounds() {
        let head = encode_request(&DirRequest::Certs);
        for cut in 0..head.len() {
            assert_eq!(request_head_complete(&head[..cut]), None);
        }
        let mut more = head.clone();
        more.extend_from_slice(b"trailing");
        assert_eq!(request_head_complete(&more), Some(head.len()));
        // A terminator beyond the bound is not looked for.
        let mut long = vec![b'a'; MAX_REQUEST_HEAD];
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request_head_complete(&long), None);
    }

    #[test]
    fn requests_other_than_ours_are_refused() {
        let d = "ab".repeat(32);
        for bad in [
            "POST /allium/v1/certs HTTP/1.0\r\n\r\n".to_string(),
            "GET /allium/v1/certs HTTP/1.1\r\n\r\n".to_string(),
            "GET /allium/v1/descriptors HTTP/1.0\r\n\r\n".to_string(),
            "GET /allium/v1/certs HTTP/1.0\r\nUser-Agent: x\r\n\r\n".to_string(),
            "GET /allium/v1/consensus HTTP/1.0\r\nUser-Agent: x\r\n\r\n".to_string(),
            format!("GET /allium/v1/consensus HTTP/1.0\r\nX-Have: {d}\r\nX-Have: {d}\r\n\r\n"),
            format!(
                "GET /allium/v1/consensus HTTP/1.0\r\nX-Have: {}\r\n\r\n",
                "AB".repeat(32)
            ),
            format!("GET /allium/v1/consensus HTTP/1.0\r\nX-Have: {d} \r\n\r\n"),
            "GET /allium/v1/consensus HTTP/1.0\r\nX-Have: \r\n\r\n".to_string(),
            format!(
                "GET /allium/v1/consensus HTTP/1.0\r\nX-Have: {}\r\n\r\n",
                vec![d.clone(); MAX_HAVE + 1].join(" ")
            ),
            "GET /allium/v1/consensus HTTP/1.0\r\n".to_string(),
            String::new(),
        ] {
            assert!(parse_request(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_head_parse_and_complete() {
        let z = super::super::compress(b"hello certs");
        let r = ok_response(Body::Full(&z));
        for cut in 0..r.len() {
            assert_eq!(response_complete(&r[..cut]).unwrap(), None);
        }
        assert_eq!(response_complete(&r).unwrap(), Some(r.len()));
        assert_eq!(parse_certs_response(&r).unwrap(), b"hello certs");
        // Truncated or padded bodies are refused.
        assert!(parse_certs_response(&r[..r.len() - 1]).is_err());
        let mut long = r.clone();
        long.push(0);
        assert!(parse_certs_response(&long).is_err());
        assert!(response_complete(&[b'x'; MAX_RESPONSE_HEAD]).is_err());
    }

    #[test]
    fn error_statuses_carry_a_printable_reason() {
        let r = status_response(404, "no consensus yet\x1b[31m");
        let e = parse_certs_response(&r).unwrap_err().to_string();
        assert!(e.contains("404") && e.contains("no consensus yet"), "{e}");
        assert!(!e.contains('\x1b'));
        let r = status_response(304, "");
        assert_eq!(
            parse_consensus_response(&r, Some(b"held")).unwrap(),
            b"held"
        );
        assert!(parse_consensus_response(&r, None).is_err());
    }

    #[test]
    fn malformed_responses_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\n\r\n",
            b"HTTP/1.0 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nContent-Encoding: gzip\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nContent-Encoding: deflate\r\n\r\nabc",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nX-Diff-From: zz\r\n\r\n",
        ] {
            assert!(parse_consensus_response(bad, Some(b"x")).is_err());
            assert!(parse_certs_response(bad).is_err());
        }
    }
}
