//! A small HTTP/1.1 server on loopback, the destination of the test network's streams.
//!
//! - `GET /` answers a short page.
//! - `GET /bytes/N` answers N bytes of the deterministic pattern [`pattern_byte`] (N ≤ 16 GiB).
//! - `POST /sink` reads a `Content-Length` body and answers `<length> <fnv64 hex>` of what it read.
//!
//! Requests are bounded (8 KiB of headers, a 30 s header timeout); one request per connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The byte at offset `i` of every `/bytes/N` body.
pub fn pattern_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

/// Fill `buf` with the pattern starting at offset `start`.
pub fn fill_pattern(start: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(start + k as u64);
    }
}

/// FNV-1a 64 over a stream of bytes, used to check uploads.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Absorb bytes.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

const MAX_HEADER: usize = 8192;
const MAX_BODY: u64 = 16 << 30;

/// The page `GET /` answers.
pub const HELLO: &str =
    "Hello from the Allium test network: this page reached you through three relays.\n";

/// Bind `addr` and serve until the task is dropped. Returns the bound address.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = serve(sock).await;
            });
        }
    });
    Ok((local, task))
}

async fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let head_end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before headers"));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(p + 4);
            }
            if buf.len() > MAX_HEADER {
                return Err(std::io::Error::other("headers too large"));
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::other("header timeout"))??;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let content_length: u64 = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);

    match (method, path) {
        ("GET", "/") => {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HELLO}",
                HELLO.len()
            );
            sock.write_all(resp.as_bytes()).await?;
        }
        ("GET", p) if p.starts_with("/bytes/") => {
            let Some(n) = p
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                return bad(sock).await;
            };
            if n > MAX_BODY {
                return bad(sock).await;
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            );
            sock.write_all(resp.as_bytes()).await?;
            let mut chunk = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while off < n {
                let len = usize::try_from((n - off).min(chunk.len() as u64)).unwrap_or(chunk.len());
                fill_pattern(off, &mut chunk[..len]);
                sock.write_all(&chunk[..len]).await?;
                off += len as u64;
            }
        }
        ("POST", "/sink") => {
            if content_length > MAX_BODY {
                return bad(sock).await;
            }
            let mut h = Fnv64::default();
            let already = &buf[head_end..];
            let mut got = already.len() as u64;
            h.update(already);
            let mut chunk = vec![0u8; 64 * 1024];
            while got < content_length {
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                h.update(&chunk[..n]);
                got += n as u64;
            }
            let body = format!("{got} {:016x}\n", h.0);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await?;
        }
        _ => {
            sock.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        }
    }
    sock.shutdown().await
}

async fn bad(mut sock: TcpStream) -> std::io::Result<()> {
    sock.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
}
