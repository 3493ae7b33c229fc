//! The HTTP CONNECT tunnel port (Tor's `HTTPTunnelPort`): `CONNECT host:port HTTP/1.1` opens a
//! stream through a circuit, exactly as a SOCKS CONNECT does, for applications (browsers, apt,
//! package managers) that speak HTTP proxies but not SOCKS.
//!
//! Two parts:
//! - [`HeadParser`]: a sans-IO parser of one request head (request line and headers), bounded
//!   at [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers. It reports how many bytes the head
//!   takes, so whatever the client sends after it stays stream data.
//! - `serve`: the tokio listener, a thin driver like the SOCKS one: peek, parse, read out
//!   exactly the head, then open the stream and splice with the SOCKS port's own code
//!   (`socks::server::open_and_splice`: same isolation, retries, timeouts, control-port
//!   stream events).
//!
//! Isolation: a `Proxy-Authorization: Basic` header becomes the same isolation key as SOCKS5
//! username/password with those credentials (any other scheme: its whole value is the key);
//! without the header the stream is isolated as an unauthenticated SOCKS stream.
//! Replies: `200 Connection established`, or a 4xx/5xx chosen from the same failure the SOCKS
//! reply code comes from ([`status_for_reply`]). Any method other than CONNECT gets `405` with
//! a page saying this is a tunnel port and how to configure the client. Destinations and
//! credentials are never logged.

use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::circmgr::CircMgr;
use crate::isolation::IsolationKey;
use crate::local_limits::Admitted;
use crate::metrics::Outcome as Ended;
use crate::socks::server::{Failure, Front, accept_client_port, open_and_splice, reply_code_for};
use crate::socks::wire::{MAX_HOST_LEN, Target, reply};

/// Longest request head accepted (request line and headers, with the blank line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// A parsed CONNECT request. `Debug` redacts the target and the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where to.
    pub target: Target,
    /// The isolation key (from `Proxy-Authorization`).
    pub isolation: IsolationKey,
    /// The HTTP minor version of the request (replies use the same).
    pub minor_version: u8,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("target", &"[redacted]")
            .field("isolation", &self.isolation)
            .field("minor_version", &self.minor_version)
            .finish()
    }
}

/// What a complete request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A CONNECT to carry out.
    Connect(ConnectRequest),
    /// Another method: answer [`method_not_allowed`].
    OtherMethod,
}

/// Why a head cannot be served (each has its reply, [`HeadError::response`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// Not an HTTP/1.x request head.
    #[error("malformed HTTP request head")]
    Malformed,
    /// Longer than [`MAX_HEAD`] or more than [`MAX_HEADERS`] headers.
    #[error("HTTP request head too large")]
    TooLarge,
    /// CONNECT to something that is not `host:port` with a port from 1 to 65535.
    #[error("CONNECT target is not host:port")]
    BadTarget,
}

impl HeadError {
    /// The response for this error.
    pub fn response(&self) -> Vec<u8> {
        match self {
            Self::Malformed => response(400, "Bad Request", "The request could not be parsed."),
            Self::TooLarge => response(
                431,
                "Request Header Fields Too Large",
                "The request head is longer than this proxy accepts.",
            ),
            Self::BadTarget => response(
                400,
                "Bad Request",
                "CONNECT needs a target of the form host:port (for example example.com:443).",
            ),
        }
    }
}

/// The state of one request head being received. Sans-IO: feed it the bytes received so far.
#[derive(Debug, Default)]
pub struct HeadParser {
    _private: (),
}

impl HeadParser {
    /// A parser that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Look at `input`, every byte received so far from the client (the caller has not taken
    /// any out yet). `Ok(None)`: the head is incomplete, wait for more (never once `input`
    /// holds [`MAX_HEAD`] bytes: that is [`HeadError::TooLarge`]). `Ok(Some((head, n)))`: the
    /// head is the first `n` bytes; the rest is stream data.
    pub fn parse(&mut self, input: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
        let window = input.get(..input.len().min(MAX_HEAD)).unwrap_or_default();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if window.len() >= MAX_HEAD => {
                return Err(HeadError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        };
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed);
        };
        if !method.eq_ignore_ascii_case("CONNECT") {
            return Ok(Some((Head::OtherMethod, n)));
        }
        let target = parse_authority(path).ok_or(HeadError::BadTarget)?;
        let isolation = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("Proxy-Authorization"))
            .map_or(IsolationKey::NoAuth, |h| isolation_from(h.value));
        Ok(Some((
            Head::Connect(ConnectRequest {
                target,
                isolation,
                minor_version: version,
            }),
            n,
        )))
    }
}

/// `host:port` or `[v6]:port` (RFC 9110 authority-form).
fn parse_authority(s: &str) -> Option<Target> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return (addr.port() != 0).then_some(Target::Ip(addr));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !ok {
        return None;
    }
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => Some(Target::Ip((ip, port).into())),
        Err(_) => Some(Target::Host(host.to_ascii_lowercase(), port)),
    }
}

/// The isolation key for a `Proxy-Authorization` value: `Basic user:pass` gives the same key
/// as SOCKS5 username/password; anything else is a key of its own.
fn isolation_from(value: &[u8]) -> IsolationKey {
    let basic = value
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case(b"basic "))
        .and_then(|_| value.get(6..))
        .map(|v| v.trim_ascii())
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
    match basic {
        Some(decoded) => match decoded.iter().position(|&b| b == b':') {
            Some(i) => IsolationKey::credentials(
                decoded.get(..i).unwrap_or_default(),
                decoded.get(i + 1..).unwrap_or_default(),
            ),
            None => IsolationKey::credentials(decoded, Vec::new()),
        },
        // A distinct key that no SOCKS credentials can equal: the user is the whole value,
        // the password a byte no Basic header decodes to alone.
        None => IsolationKey::credentials(value, [0xFFu8]),
    }
}

/// A response with a short HTML page.
fn response(status: u16, reason: &str, text: &str) -> Vec<u8> {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>\n\
         <body><h1>{reason}</h1>\n<p>{text}</p>\n</body></html>\n"
    );
    let mut extra = String::new();
    if status == 405 {
        extra.push_str("Allow: CONNECT\r\n");
    }
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The `405` answer to any method but CONNECT.
pub fn method_not_allowed() -> Vec<u8> {
    response(
        405,
        "Method Not Allowed",
        "This is Allium's HTTP CONNECT tunnel port, not a web server nor a forwarding HTTP \
         proxy: it only carries out <code>CONNECT host:port</code>. Configure your application \
         to use this address as its HTTPS proxy (for example <code>curl --proxytunnel --proxy \
         http://HOST:PORT</code>, or <code>https_proxy=http://HOST:PORT</code>); plain \
         <code>http://</code> URLs need <code>--proxytunnel</code> too. Or use the SOCKS port \
         with <code>socks5h://</code>.",
    )
}

/// The status line for a SOCKS5 reply code (the code [`reply_code_for`] chose for a failure).
pub fn status_for_reply(code: u8) -> (u16, &'static str, &'static str) {
    match code {
        reply::NOT_ALLOWED => (
            502,
            "Bad Gateway",
            "No exit relay allows connections to this port, or the exit's policy refused it.",
        ),
        reply::HOST_UNREACHABLE | reply::NETWORK_UNREACHABLE => (
            502,
            "Bad Gateway",
            "The exit relay could not resolve or reach the host.",
        ),
        reply::CONNECTION_REFUSED => (
            502,
            "Bad Gateway",
            "The destination refused the connection.",
        ),
        reply::TTL_EXPIRED => (
            504,
            "Gateway Timeout",
            "The connection through the network timed out; try again.",
        ),
        _ => (
            503,
            "Service Unavailable",
            "No circuit could carry the connection (the proxy may still be bootstrapping); try again.",
        ),
    }
}

/// The response for a failed CONNECT.
fn failure_response(f: &Failure) -> Vec<u8> {
    let (status, reason, text) = status_for_reply(reply_code_for(f));
    response(status, reason, text)
}

/// `200 Connection established` in the client's HTTP version.
fn established(minor_version: u8) -> Vec<u8> {
    format!(
        "HTTP/1.{} 200 Connection established\r\n\r\n",
        minor_version.min(1)
    )
    .into_bytes()
}

/// Close a connection whose answer is sent without resetting it while the client is still
/// sending: stop writing, then read and discard (at most 64 KiB, at most 2 s) until it closes.
pub(crate) async fn close_gently(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        while total < 64 * 1024 {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

/// Accept HTTP CONNECT clients until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    mgr: Arc<CircMgr>,
    shutdown: watch::Receiver<bool>,
) {
    let m = Arc::clone(&mgr);
    accept_client_port(
        listener,
        &mgr,
        "HTTP CONNECT",
        shutdown,
        move |sock, adm| {
            let mgr = Arc::clone(&m);
            async move { handle(&mgr, sock, adm).await }
        },
    )
    .await;
}

/// Read the head and not a byte more: peek; while the head is incomplete every peeked byte is
/// part of it, so read those out and peek again; once complete, read out only its rest.
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Result<Head, HeadError>> {
    let mut parser = HeadParser::new();
    let mut acc: Vec<u8> = Vec::with_capacity(1024);
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let room = MAX_HEAD.saturating_sub(acc.len()).max(1);
        let n = sock.peek(buf.get_mut(..room).unwrap_or_default()).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let before = acc.len();
        acc.extend_from_slice(buf.get(..n).unwrap_or_default());
        match parser.parse(&acc) {
            Ok(Some((head, used))) => {
                let rest = used.saturating_sub(before);
                if let Some(taken) = buf.get_mut(..rest) {
                    sock.read_exact(taken).await?;
                }
                return Ok(Ok(head));
            }
            Ok(None) => {
                if let Some(taken) = buf.get_mut(..n) {
                    sock.read_exact(taken).await?;
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

async fn handle(mgr: &CircMgr, mut sock: TcpStream, mut adm: Admitted) {
    let t = mgr.config().socks_handshake_timeout;
    let read = tokio::time::timeout(t, read_head(&mut sock)).await;
    adm.handshake_done();
    let head = match read {
        Ok(Ok(Ok(h))) => h,
        Ok(Ok(Err(e))) => {
            tracing::debug!("HTTP CONNECT request refused: {e}");
            mgr.metrics.tunnel(Ended::Refused);
            let _ = sock.write_all(&e.response()).await;
            close_gently(sock).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("HTTP CONNECT request not read: {e}");
            mgr.metrics.tunnel(Ended::Refused);
            return;
        }
        Err(_) => {
            tracing::debug!("HTTP CONNECT request timed out");
            mgr.metrics.tunnel(Ended::Timeout);
            return;
        }
    };
    let req = match head {
        Head::Connect(r) => r,
        Head::OtherMethod => {
            tracing::debug!("a non-CONNECT request on the HTTP CONNECT port");
            mgr.metrics.tunnel(Ended::WrongProtocol);
            let _ = sock.write_all(&method_not_allowed()).await;
            close_gently(sock).await;
            return;
        }
    };
    open_and_splice(
        mgr,
        sock,
        &req.target,
        &req.isolation,
        false,
        Front::Tunnel,
        &established(req.minor_version),
        failure_response,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(input: &[u8]) -> (ConnectRequest, usize) {
        match HeadParser::new().parse(input) {
            Ok(Some((Head::Connect(r), n))) => (r, n),
            other => panic!("expected a CONNECT, got {other:?}"),
        }
    }

    #[test]
    fn connect_with_trailing_data_and_byte_by_byte() {
        let head = b"CONNECT Example.COM:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let mut input = head.to_vec();
        input.extend_from_slice(b"\x16\x03\x01 client hello");
        let (r, n) = connect(&input);
        assert_eq!(n, head.len());
        assert_eq!(r.target, Target::Host("example.com".into(), 443));
        assert_eq!(r.isolation, IsolationKey::NoAuth);
        assert_eq!(r.minor_version, 1);
        // Every strict prefix is incomplete.
        for i in 0..head.len() {
            assert_eq!(HeadParser::new().parse(&head[..i]), Ok(None), "prefix {i}");
        }
        let dbg = format!("{r:?}");
        assert!(!dbg.to_lowercase().contains("example"));
    }

    #[test]
    fn targets() {
        let t = |s: &str| parse_authority(s);
        assert_eq!(
            t("10.0.0.1:80"),
            Some(Target::Ip("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            t("[::1]:443"),
            Some(Target::Ip("[::1]:443".parse().unwrap()))
        );
        assert_eq!(t("a.b-c_d:1"), Some(Target::Host("a.b-c_d".into(), 1)));
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:65536",
            ":80",
            "/path:80",
            "http://example.com:80",
            "exa mple:80",
            "[::1]",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(t(&format!("{}:80", "a".repeat(256))), None);
        let r = HeadParser::new().parse(b"CONNECT example.com HTTP/1.1\r\n\r\n");
        assert_eq!(r, Err(HeadError::BadTarget));
    }

    #[test]
    fn proxy_authorization_isolates_like_socks() {
        let (r, _) =
            connect(b"CONNECT h:1 HTTP/1.0\r\nproxy-authorization: Basic YWxpY2U6cHc=\r\n\r\n");
        assert_eq!(r.isolation, IsolationKey::credentials("alice", "pw"));
        assert_eq!(r.minor_version, 0);
        let (other, _) =
            connect(b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Bearer xyz\r\n\r\n");
        assert_ne!(other.isolation, IsolationKey::NoAuth);
        assert_ne!(other.isolation, r.isolation);
        let (same, _) = connect(b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Bearer xyz\r\n\r\n");
        assert_eq!(same.isolation, other.isolation);
    }

    #[test]
    fn other_methods_and_garbage() {
        for m in [
            "GET / HTTP/1.1",
            "POST /x HTTP/1.0",
            "GET http://example.com/ HTTP/1.1",
        ] {
            let input = format!("{m}\r\nHost: x\r\n\r\n");
            assert!(matches!(
                HeadParser::new().parse(input.as_bytes()),
                Ok(Some((Head::OtherMethod, n))) if n == input.len()
            ));
        }
        let page = String::from_utf8(method_not_allowed()).unwrap();
        assert!(page.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(page.contains("Allow: CONNECT\r\n"));
        assert!(page.contains("HTTP CONNECT tunnel"));
        let (head, body) = page.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(
            HeadParser::new().parse(b"\x05\x01\x00"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            HeadParser::new().parse(b"CONNECT h:1 HTTP/2.0\r\n\r\n"),
            Err(HeadError::Malformed)
        );
    }

    #[test]
    fn bounded() {
        // A head that never ends is refused once MAX_HEAD bytes are in.
        let mut long = b"CONNECT h:1 HTTP/1.1\r\n".to_vec();
        while long.len() < MAX_HEAD {
            long.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(HeadParser::new().parse(&long), Err(HeadError::TooLarge));
        let mut many = b"CONNECT h:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(HeadParser::new().parse(&many), Err(HeadError::TooLarge));
        let r = HeadError::TooLarge.response();
        assert!(r.starts_with(b"HTTP/1.1 431 "));
    }

    #[test]
    fn failures_map_to_gateway_statuses() {
        assert_eq!(status_for_reply(reply::CONNECTION_REFUSED).0, 502);
        assert_eq!(status_for_reply(reply::HOST_UNREACHABLE).0, 502);
        assert_eq!(status_for_reply(reply::NOT_ALLOWED).0, 502);
        assert_eq!(status_for_reply(reply::TTL_EXPIRED).0, 504);
        assert_eq!(status_for_reply(reply::GENERAL_FAILURE).0, 503);
        let r = failure_response(&Failure::TimedOut);
        assert!(r.starts_with(b"HTTP/1.1 504 Gateway Timeout\r\n"));
        assert_eq!(
            established(1),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        assert_eq!(
            established(0),
            b"HTTP/1.0 200 Connection established\r\n\r\n"
        );
    }
}
