//! A tiny bounded HTTP/1.1 client over tokio: one request per connection (`Connection: close`),
//! a cap on response size, a deadline on the whole exchange. No chunked encoding, no redirects.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::err::{DirError, Result};

/// Longest response header block.
const MAX_HEADER: usize = 16 * 1024;
/// Default deadline for one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// Turn a non-2xx status into an error that quotes the first line of the body.
    pub fn into_ok(self, what: &str) -> Result<Vec<u8>> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let reason = String::from_utf8_lossy(self.body.get(..200).unwrap_or(&self.body))
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        Err(DirError::HttpStatus {
            what: what.to_string(),
            status: self.status,
            reason,
        })
    }
}

tokio::task_local! {
    /// The local IP that outgoing directory connections of the current task bind to (Tor's
    /// `OutboundBindAddress`); set with [`with_outbound_bind`].
    static OUTBOUND_BIND: Option<IpAddr>;
}

/// Run `fut` with every directory request it makes bound to the local address `bind` (port
/// chosen by the system) when `bind` is `Some`, so the authorities see the node's own address
/// rather than whatever the routing table picks.
pub async fn with_outbound_bind<F: std::future::Future>(bind: Option<IpAddr>, fut: F) -> F::Output {
    OUTBOUND_BIND.scope(bind, fut).await
}

/// The outbound bind address in force for the current task, if any.
pub fn outbound_bind() -> Option<IpAddr> {
    OUTBOUND_BIND.try_with(|b| *b).ok().flatten()
}

/// Connect to `addr`, from `bind` (port chosen by the system) when given and of the same address
/// family as `addr` (Tor's `OutboundBindAddress`). Relays' links to other relays and authorities'
/// reachability probes use it too, so a peer counts each node's connections against that node's
/// own address.
pub async fn connect_from(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind else {
        return TcpStream::connect(addr).await;
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if ip.is_ipv4() == addr.is_ipv4() {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    sock.connect(addr).await
}

/// Send one request and read the response, with at most `max_body` body bytes, all within
/// `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    max_body: usize,
    timeout: Duration,
) -> Result<Response> {
    let what = format!("{method} {path} at {addr}");
    tokio::time::timeout(
        timeout,
        request_inner(addr, method, path, body, max_body, &what),
    )
    .await
    .map_err(|_| DirError::Timeout { what: what.clone() })?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    max_body: usize,
    what: &str,
) -> Result<Response> {
    let mut s = connect_from(addr, outbound_bind())
        .await
        .map_err(|e| DirError::net_io(what, e))?;
    let _ = s.set_nodelay(true);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: allium\r\n"
    );
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| DirError::net_io(what, e))?;
    if let Some(b) = body {
        s.write_all(b)
            .await
            .map_err(|e| DirError::net_io(what, e))?;
    }
    s.flush().await.map_err(|e| DirError::net_io(what, e))?;

    let cap = max_body.saturating_add(MAX_HEADER);
    let mut buf: Vec<u8> = Vec::with_capacity(8192.min(cap));
    let mut chunk = vec![0u8; 16 * 1024];
    let mut header_end: Option<usize> = None;
    let mut content_length: Option<usize> = None;
    let mut status = 0u16;
    loop {
        if let (Some(h), Some(cl)) = (header_end, content_length)
            && buf.len() >= h.saturating_add(cl)
        {
            break;
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| DirError::net_io(what, e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > cap {
            return Err(DirError::TooLarge {
                object: "HTTP response",
                len: buf.len(),
                max: cap,
            });
        }
        if header_end.is_none() {
            if let Some(pos) = find(&buf, b"\r\n\r\n") {
                let h = pos + 4;
                let head = buf.get(..pos).unwrap_or_default();
                let (st, cl) = parse_head(head, what)?;
                if let Some(cl) = cl
                    && cl > max_body
                {
                    return Err(DirError::TooLarge {
                        object: "HTTP response body",
                        len: cl,
                        max: max_body,
                    });
                }
                status = st;
                content_length = cl;
                header_end = Some(h);
            } else if buf.len() > MAX_HEADER {
                return Err(DirError::net(what, "response header too long"));
            }
        }
    }
    let h = header_end.ok_or_else(|| DirError::net(what, "connection closed before a response"))?;
    let mut body = buf.split_off(h);
    if let Some(cl) = content_length {
        if body.len() < cl {
            return Err(DirError::net(what, "response body truncated"));
        }
        body.truncate(cl);
    }
    if body.len() > max_body {
        return Err(DirError::TooLarge {
            object: "HTTP response body",
            len: body.len(),
            max: max_body,
        });
    }
    Ok(Response { status, body })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Fuzzing entry point: parse a response header block (the bytes before the blank line) exactly
/// as [`request`] does; returns the status and the Content-Length.
#[doc(hidden)]
pub fn fuzz_parse_head(head: &[u8]) -> Result<(u16, Option<usize>)> {
    parse_head(head, "fuzzed response")
}

fn parse_head(head: &[u8], what: &str) -> Result<(u16, Option<usize>)> {
    let text = std::str::from_utf8(head).map_err(|_| DirError::net(what, "non-UTF-8 header"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let proto = parts.next().unwrap_or("");
    if !proto.starts_with("HTTP/1.") {
        return Err(DirError::net(what, "not an HTTP/1.x response"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DirError::net(what, "bad status line"))?;
    let mut cl = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-length") {
            cl = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| DirError::net(what, "bad Content-Length"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(DirError::net(what, "chunked responses are not supported"));
        }
    }
    Ok((status, cl))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn head_parsing() {
        let (st, cl) =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx: y", "t").expect("ok");
        assert_eq!((st, cl), (200, Some(12)));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "t").is_err());
        assert!(parse_head(b"SSH-2.0", "t").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: -1", "t").is_err());
    }

    proptest! {
        #[test]
        fn head_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_head(&bytes, "t");
        }
    }

    #[tokio::test]
    async fn response_size_is_bounded() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            for _ in 0..2 {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await;
                let _ = s.write_all(&[0u8; 2000]).await;
            }
        });
        let err = request(addr, "GET", "/", None, 1000, DEFAULT_TIMEOUT)
            .await
            .expect_err("too big");
        assert!(matches!(err, DirError::TooLarge { .. }), "{err}");
        // Truncated body (server closes early).
        let err = request(addr, "GET", "/", None, 1 << 20, DEFAULT_TIMEOUT)
            .await
            .expect_err("short");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
