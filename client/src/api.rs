//! The embeddable client: Allium inside an application, without a SOCKS port (Arti's
//! `TorClient` is the model).
//!
//! ```no_run
//! use allium_client::{Client, ProxyConfig};
//! use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ProxyConfig::load(std::path::Path::new("proxy.toml"))?;
//! let client = Client::bootstrap(config).await?;
//! let mut stream = client.connect(("example.com", 80)).await?;
//! stream
//!     .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
//!     .await?;
//! let mut page = Vec::new();
//! stream.read_to_end(&mut page).await?;
//!
//! // Streams of an isolated client never share a circuit with this one's.
//! let other = client.isolated();
//! let _s = other.connect(("example.org", 443)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! A [`DataStream`] is `AsyncRead + AsyncWrite`. A stream the exit closes cleanly reads EOF; a
//! stream cut by a circuit failure or an error END reads an error (`ConnectionReset`), so a cut
//! transfer is never taken for a complete one. Shutting the write side down sends END.
//!
//! Isolation, as in Arti: every [`Client`] has an isolation token; clones share it (and so
//! their circuits), [`Client::isolated`] makes a client with a fresh one. Streams of different
//! tokens never share a circuit, nor with SOCKS clients of the same process.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadBuf,
};
use tokio::sync::mpsc;

use crate::circ::{Circuit, StreamEvent};
use crate::config::ProxyConfig;
use crate::core::StreamId;
use crate::err::{ClientError, StreamError};
use crate::isolation::IsolationKey;
use crate::socks::wire::Target;
use crate::{ProxyHandle, stream};

/// Most attempts to open one stream on different circuits.
const ATTEMPTS: usize = 3;
/// Longest [`Client::connect`] and [`Client::resolve`] take in all.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest [`Client::bootstrap`] waits for a consensus and a first circuit.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes buffered between a [`DataStream`] and its stream task, each way.
const PIPE: usize = 64 * 1024;
/// Bytes read from the application per cell batch (16 full cells).
const UPSTREAM_BUF: usize = 16 * allium_proto::relaymsg::MAX_DATA;

/// A token that isolates streams: streams with different tokens never share a circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IsolationToken(u64);

impl IsolationToken {
    /// A token different from every other one made in this process.
    #[allow(clippy::new_without_default)] // a default would suggest a shared value
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn key(self) -> IsolationKey {
        IsolationKey::Token(self.0)
    }
}

/// Something [`Client::connect`] can connect to: `("host", port)`, `(IpAddr, port)`,
/// a `SocketAddr`, or `"host:port"`.
pub trait IntoTarget {
    /// The target, or why it is not one.
    fn into_target(self) -> Result<Target, ClientError>;
}

fn bad_target() -> ClientError {
    ClientError::Stream(StreamError::BadTarget(None))
}

impl IntoTarget for (&str, u16) {
    fn into_target(self) -> Result<Target, ClientError> {
        let (host, port) = self;
        match host.parse::<IpAddr>() {
            Ok(ip) => Ok(Target::Ip(SocketAddr::new(ip, port))),
            Err(_) if !host.is_empty() && host.len() <= crate::socks::wire::MAX_HOST_LEN => {
                Ok(Target::Host(host.to_owned(), port))
            }
            Err(_) => Err(bad_target()),
        }
    }
}

impl IntoTarget for (String, u16) {
    fn into_target(self) -> Result<Target, ClientError> {
        (self.0.as_str(), self.1).into_target()
    }
}

impl IntoTarget for (IpAddr, u16) {
    fn into_target(self) -> Result<Target, ClientError> {
        Ok(Target::Ip(SocketAddr::new(self.0, self.1)))
    }
}

impl IntoTarget for SocketAddr {
    fn into_target(self) -> Result<Target, ClientError> {
        Ok(Target::Ip(self))
    }
}

impl IntoTarget for &str {
    fn into_target(self) -> Result<Target, ClientError> {
        if let Ok(a) = self.parse::<SocketAddr>() {
            return Ok(Target::Ip(a));
        }
        let (host, port) = self.rsplit_once(':').ok_or_else(bad_target)?;
        let port = port.parse::<u16>().map_err(|_| bad_target())?;
        (host, port).into_target()
    }
}

/// An Allium client inside an application. Cheap to clone; clones share circuits and the
/// isolation token. The client stops when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<ProxyHandle>,
    isolation: IsolationToken,
}

impl Client {
    /// Start a client from `config` and wait until it can carry streams (a verified consensus
    /// and a first circuit; at most two minutes). The SOCKS port is not opened; the HTTP
    /// CONNECT and DNS ports are, if configured.
    pub async fn bootstrap(config: ProxyConfig) -> Result<Self, ClientError> {
        let handle = crate::start_with(config, false).await?;
        handle.wait_ready(BOOTSTRAP_TIMEOUT).await?;
        Ok(Self {
            handle: Arc::new(handle),
            isolation: IsolationToken::new(),
        })
    }

    /// A client on the same network whose streams never share a circuit with this one's.
    pub fn isolated(&self) -> Self {
        self.with_isolation(IsolationToken::new())
    }

    /// A client on the same network whose streams use `token` (streams of equal tokens may
    /// share circuits).
    pub fn with_isolation(&self, token: IsolationToken) -> Self {
        Self {
            handle: Arc::clone(&self.handle),
            isolation: token,
        }
    }

    /// This client's isolation token.
    pub fn isolation_token(&self) -> IsolationToken {
        self.isolation
    }

    /// The proxy behind this client (circuits, ports, metrics).
    pub fn handle(&self) -> &ProxyHandle {
        &self.handle
    }

    /// Open a stream to `target` through a circuit: the exit connects to it. Host names are
    /// resolved by the exit. A `.allium.alt` name is an onion service, reached by a rendezvous
    /// (never through an exit); its failures are [`ClientError::Onion`].
    pub async fn connect(&self, target: impl IntoTarget) -> Result<DataStream, ClientError> {
        let target = target.into_target()?;
        let key = self.isolation.key();
        let (circ, sid, rx) = tokio::time::timeout(OPEN_TIMEOUT, self.open(&target, &key))
            .await
            .unwrap_or(Err(ClientError::Timeout("opening a stream")))?;
        Ok(DataStream::spawn(circ, sid, rx))
    }

    async fn open(
        &self,
        target: &Target,
        key: &IsolationKey,
    ) -> Result<(Arc<Circuit>, StreamId, mpsc::Receiver<StreamEvent>), ClientError> {
        let mgr = &self.handle.mgr;
        if let Target::Host(host, port) = target
            && crate::socks::server::is_onion_target(target)
        {
            // An onion service: the rendezvous client, never an exit.
            let (circ, sid, rx) =
                crate::onion::clidrv::open_stream(mgr, host, *port, key, false).await?;
            let sid = StreamId::new(sid).ok_or(ClientError::Stream(StreamError::Unexpected))?;
            return Ok((circ, sid, rx));
        }
        let port = target.port();
        if !mgr.exit_exists(port) {
            return Err(ClientError::NoExitForPort(port));
        }
        let mut last = ClientError::RecentBuildFailed;
        for _ in 0..ATTEMPTS {
            let circ = mgr.get_circuit(Some(port), key).await?;
            match stream::connect(&circ, target).await {
                Ok((sid, rx)) => {
                    let sid =
                        StreamId::new(sid).ok_or(ClientError::Stream(StreamError::Unexpected))?;
                    return Ok((circ, sid, rx));
                }
                Err(e) if e.is_retriable() => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Resolve `host` at an exit (never locally).
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ClientError> {
        let key = self.isolation.key();
        let attempt = async {
            let mut last = ClientError::RecentBuildFailed;
            for _ in 0..ATTEMPTS {
                let circ = self.handle.mgr.get_circuit(None, &key).await?;
                match stream::lookup(&circ, host).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_retriable() => last = e,
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        };
        tokio::time::timeout(OPEN_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(ClientError::Timeout("resolving at an exit")))
    }
}

/// A stream through the network: `AsyncRead + AsyncWrite`. Dropping it closes the stream.
#[derive(Debug)]
pub struct DataStream {
    pipe: DuplexStream,
    /// Set when the stream was cut (circuit failure, error END): EOF then reads as an error.
    cut: Arc<AtomicBool>,
}

impl DataStream {
    fn spawn(circ: Arc<Circuit>, sid: StreamId, rx: mpsc::Receiver<StreamEvent>) -> Self {
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let cut = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_stream(circ, sid, rx, theirs, Arc::clone(&cut)));
        Self { pipe: ours, cut }
    }

    fn check_eof(&self, before: usize, buf: &ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if buf.filled().len() == before && buf.remaining() > 0 && self.cut.load(Ordering::Acquire) {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the stream was cut (its circuit failed or the exit ended it with an error)",
            )))
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl AsyncRead for DataStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.pipe).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => self.check_eof(before, buf),
            other => other,
        }
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

/// Carry bytes between the pipe's far end and stream `sid` until both directions are done.
async fn run_stream(
    circ: Arc<Circuit>,
    sid: StreamId,
    mut rx: mpsc::Receiver<StreamEvent>,
    pipe: DuplexStream,
    cut: Arc<AtomicBool>,
) {
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let up_circ = Arc::clone(&circ);
    let mut up = tokio::spawn(async move {
        let mut buf = vec![0u8; UPSTREAM_BUF];
        loop {
            buf.resize(UPSTREAM_BUF, 0);
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    up_circ
                        .end_stream(sid.get(), allium_proto::relaymsg::EndReason::DONE)
                        .await;
                    return;
                }
                Ok(n) => n,
            };
            buf.truncate(n);
            match up_circ.send_data(sid, buf).await {
                Ok(b) => buf = b,
                Err(_) => return,
            }
        }
    });
    let clean = loop {
        let Some(ev) = rx.recv().await else {
            break false;
        };
        match ev {
            StreamEvent::Data(d) => {
                if wr.write_all(d.bytes()).await.is_err() {
                    // The application dropped the stream.
                    break false;
                }
                if circ.consumed(sid, 1).await.is_err() {
                    break false;
                }
            }
            StreamEvent::End(Ok(())) => break true,
            StreamEvent::End(Err(e)) => {
                tracing::debug!(circ = %circ.id, "the exit ended an embedded stream: {e}");
                break false;
            }
            StreamEvent::Connected | StreamEvent::Resolved(_) => {}
        }
    };
    if clean {
        let _ = wr.shutdown().await;
        drop(wr);
        // The exit is done; the stream ends when the application's side is done too.
        let _ = (&mut up).await;
    } else {
        cut.store(true, Ordering::Release);
        up.abort();
        circ.end_stream(sid.get(), allium_proto::relaymsg::EndReason::MISC)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            ("example.com", 443).into_target().unwrap(),
            Target::Host("example.com".into(), 443)
        );
        assert_eq!(
            ("10.0.0.1", 80).into_target().unwrap(),
            Target::Ip("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "example.com:8080".into_target().unwrap(),
            Target::Host("example.com".into(), 8080)
        );
        assert_eq!(
            "[::1]:22".into_target().unwrap(),
            Target::Ip("[::1]:22".parse().unwrap())
        );
        assert!("example.com".into_target().is_err());
        assert!(("", 1).into_target().is_err());
        assert!(("a".repeat(256).as_str(), 1).into_target().is_err());
    }

    #[test]
    fn tokens_isolate() {
        let a = IsolationToken::new();
        let b = IsolationToken::new();
        assert_ne!(a, b);
        assert!(!a.key().compatible_with(Some(&b.key())));
        assert!(a.key().compatible_with(Some(&a.key())));
        assert!(!a.key().compatible_with(Some(&IsolationKey::NoAuth)));
    }

    #[tokio::test]
    async fn a_cut_stream_reads_an_error_and_a_clean_one_eof() {
        for cut in [false, true] {
            let (ours, mut theirs) = tokio::io::duplex(64);
            let flag = Arc::new(AtomicBool::new(cut));
            let mut s = DataStream {
                pipe: ours,
                cut: Arc::clone(&flag),
            };
            theirs.write_all(b"abc").await.unwrap();
            drop(theirs);
            let mut got = Vec::new();
            let r = s.read_to_end(&mut got).await;
            assert_eq!(got, b"abc");
            assert_eq!(r.is_err(), cut);
        }
    }
}
