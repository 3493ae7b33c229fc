//! Prometheus metrics: a small encoder of the text exposition format 0.0.4 and a histogram,
//! shared by the relay, the proxy and the authority.
//!
//! Why here and not `prometheus-client`: every role already depends on this crate, the values
//! live in each role's own atomic counters (relay `Stats`, the client's circuit manager), and
//! what is needed is only writing them out at scrape time: one family at a time, `# HELP` and
//! `# TYPE` first, samples after, label values escaped. A registry of boxed metric objects
//! would duplicate those counters. Serving `/metrics` over HTTP is the binary's job.
//!
//! Naming follows Prometheus conventions, and the encoder checks them: names match
//! `[a-zA-Z_:][a-zA-Z0-9_:]*`, counters end in `_total`, units are base units (`_seconds`,
//! `_bytes`), and a histogram's samples are `_bucket{le=..}` (cumulative, ending at `+Inf`),
//! `_sum` and `_count`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `Content-Type` of a scrape response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Check a configured metrics address: loopback only, unless `allow_public`. The error says
/// what to change.
pub fn check_address(addr: Option<SocketAddr>, allow_public: bool) -> Result<(), String> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !allow_public => Err(format!(
            "metrics_address {a} is not a loopback address: the metrics show traffic volumes and \
             circuit counts to anyone who can reach them. Use 127.0.0.1 (and scrape through a \
             tunnel), or set metrics_allow_public = true if a firewall protects the port"
        )),
        _ => Ok(()),
    }
}

/// The type of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up (name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in cumulative buckets.
    Histogram,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Whether `name` is a valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`; labels may not
/// contain `:`, which the caller checks).
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// A value as the format writes it (`+Inf`, `-Inf`, `NaN`, or the shortest exact decimal).
fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

/// A text exposition being written, one family at a time. Misuse (a bad name, a counter not
/// ending in `_total`, a family twice) is a programming error: it is skipped and reported by
/// [`Exposition::errors`] (tests assert there are none) instead of producing a page a
/// scraper rejects.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    families: Vec<String>,
    current: Option<(String, MetricType)>,
    /// The last family was refused: its samples are dropped without another error.
    refused: bool,
    errors: Vec<String>,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start family `name` with its help text; samples added next belong to it.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) -> &mut Self {
        self.current = None;
        self.refused = true;
        if !valid_name(name) {
            self.errors.push(format!("invalid metric name {name:?}"));
            return self;
        }
        if kind == MetricType::Counter && !name.ends_with("_total") {
            self.errors
                .push(format!("counter {name} does not end in _total"));
            return self;
        }
        if self.families.iter().any(|f| f == name) {
            self.errors.push(format!("family {name} written twice"));
            return self;
        }
        self.refused = false;
        self.families.push(name.to_owned());
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self.current = Some((name.to_owned(), kind));
        self
    }

    /// Add a sample of the current counter or gauge family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        match &self.current {
            Some((name, kind)) if *kind != MetricType::Histogram => {
                let name = name.clone();
                self.line(&name, labels, value);
            }
            _ if self.refused => {}
            _ => self
                .errors
                .push("sample outside a counter or gauge family".to_owned()),
        }
        self
    }

    /// Write one family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: MetricType, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(&[], value)
    }

    /// Write a whole histogram family from a snapshot.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) -> &mut Self {
        self.family(name, MetricType::Histogram, help);
        if self.current.is_none() {
            return self;
        }
        let mut cumulative = 0u64;
        for (le, n) in h.bounds.iter().zip(&h.counts) {
            cumulative = cumulative.saturating_add(*n);
            self.line(
                &format!("{name}_bucket"),
                &[("le", &fmt_value(*le))],
                cumulative as f64,
            );
        }
        self.line(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.line(&format!("{name}_sum"), &[], h.sum);
        self.line(&format!("{name}_count"), &[], h.count as f64);
        self.current = None;
        self
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if !valid_name(k) || k.contains(':') {
                    self.errors.push(format!("invalid label name {k:?}"));
                }
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", fmt_value(value));
    }

    /// What was misused while writing (empty when the page is valid).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A histogram of observations (seconds, bytes...) in fixed buckets, updated lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations in millionths (so it can be atomic).
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Buckets for circuit build times, in seconds.
pub const CIRCUIT_BUILD_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Histogram {
    /// A histogram with upper bounds `bounds` (ascending; `+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Record one observation (negative and NaN count as 0).
    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() && v > 0.0 { v } else { 0.0 };
        if let Some(i) = self.bounds.iter().position(|b| v <= *b)
            && let Some(c) = self.counts.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // Saturating float-to-int conversion; 2^64 millionths is half a million years.
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's values at one moment (per-bucket counts, not yet cumulative).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds.
    pub bounds: &'static [f64],
    /// Observations per bucket (those above the last bound are only in `count`).
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// Longest request head the metrics listener reads.
const MAX_REQUEST: usize = 4096;
/// Scrapes served at once; more wait for a slot.
const MAX_SCRAPES: usize = 8;
/// Longest a scraper may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the metrics listener answers to one request head (sans-IO: the bytes received so far).
/// `None`: the head is incomplete (and under [`MAX_REQUEST`] bytes).
pub fn respond(head: &[u8], render: &dyn Fn() -> String) -> Option<Vec<u8>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n");
    if end.is_none() && head.len() < MAX_REQUEST {
        return None;
    }
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, ctype, body) = match (end, method, path) {
        (None, ..) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            String::new(),
        ),
        (_, b"GET" | b"HEAD", Some(b"/metrics")) => ("200 OK", CONTENT_TYPE, render()),
        (_, b"GET" | b"HEAD", Some(_)) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "Allium serves Prometheus metrics at /metrics only.\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "Only GET /metrics is served here.\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != b"HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    Some(out)
}

/// A function that renders the current metrics page.
pub type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Serve `GET /metrics` on `listener` until the task is dropped or aborted: a thin tokio
/// driver around [`respond`], one request per connection, [`MAX_SCRAPES`] at once, each
/// request bounded in size and time.
pub async fn serve(listener: tokio::net::TcpListener, render: Render) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut sock = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a metrics connection failed: {e}");
                #[allow(clippy::disallowed_methods)] // a tokio driver backing off
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = std::sync::Arc::clone(&render);
        tokio::spawn(async move {
            let exchange = async {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                loop {
                    let n = sock.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    let room = MAX_REQUEST.saturating_sub(head.len());
                    head.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
                    if let Some(reply) = respond(&head, &*render) {
                        sock.write_all(&reply).await?;
                        return sock.shutdown().await;
                    }
                }
            };
            let r: Result<std::io::Result<()>, _> =
                tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
            if let Ok(Err(e)) = r {
                tracing::debug!("a metrics request failed: {e}");
            }
            drop(permit);
        });
    }
}

/// Bind `addr` for metrics, after [`check_address`]; returns the listener for [`serve`] and the
/// bound address.
pub async fn bind(
    addr: SocketAddr,
    allow_public: bool,
) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    check_address(Some(addr), allow_public)?;
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("binding the metrics address {addr}: {e} (is another program using it? choose another port)")
    })?;
    let bound = l
        .local_addr()
        .map_err(|e| format!("reading the metrics address: {e}"))?;
    tracing::info!("Prometheus metrics at http://{bound}/metrics");
    Ok((l, bound))
}

/// [`bind`], then [`serve`] in a new task; returns the bound address and the task.
pub async fn spawn(
    addr: SocketAddr,
    allow_public: bool,
    render: Render,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let (l, bound) = bind(addr, allow_public).await?;
    Ok((bound, tokio::spawn(serve(l, render))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaping() {
        let mut e = Exposition::new();
        e.family(
            "allium_relay_cells_total",
            MetricType::Counter,
            "Cells.\nBy direction \\ kind.",
        )
        .sample(&[("direction", "read")], 3.0)
        .sample(&[("direction", "we\"ird\\\n")], 4.0);
        e.single("allium_circuits_open", MetricType::Gauge, "Open.", 2.0);
        assert!(e.errors().is_empty());
        let page = e.finish();
        assert_eq!(
            page,
            "# HELP allium_relay_cells_total Cells.\\nBy direction \\\\ kind.\n\
             # TYPE allium_relay_cells_total counter\n\
             allium_relay_cells_total{direction=\"read\"} 3\n\
             allium_relay_cells_total{direction=\"we\\\"ird\\\\\\n\"} 4\n\
             # HELP allium_circuits_open Open.\n\
             # TYPE allium_circuits_open gauge\n\
             allium_circuits_open 2\n"
        );
    }

    #[test]
    fn misuse_is_reported_not_written() {
        let mut e = Exposition::new();
        e.single("allium_cells", MetricType::Counter, "no _total", 1.0);
        e.single("9bad", MetricType::Gauge, "bad name", 1.0);
        e.single("ok_total", MetricType::Counter, "ok", 1.0);
        e.single("ok_total", MetricType::Counter, "twice", 1.0);
        e.family("g", MetricType::Gauge, "g")
            .sample(&[("bad:label", "x")], 1.0);
        assert_eq!(e.errors().len(), 4, "{:?}", e.errors());
        let page = e.finish();
        assert!(!page.contains("allium_cells"));
        assert!(!page.contains("9bad"));
        assert_eq!(page.matches("# TYPE ok_total").count(), 1);
    }

    #[test]
    fn histogram_is_cumulative_and_ends_at_inf() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![4, 1]);
        assert_eq!(s.count, 6);
        assert!((s.sum - 3.65).abs() < 1e-9);
        let mut e = Exposition::new();
        e.histogram("allium_circuit_build_seconds", "Build time.", &s);
        assert!(e.errors().is_empty());
        let page = e.finish();
        assert_eq!(
            page,
            "# HELP allium_circuit_build_seconds Build time.\n\
             # TYPE allium_circuit_build_seconds histogram\n\
             allium_circuit_build_seconds_bucket{le=\"0.1\"} 4\n\
             allium_circuit_build_seconds_bucket{le=\"1\"} 5\n\
             allium_circuit_build_seconds_bucket{le=\"+Inf\"} 6\n\
             allium_circuit_build_seconds_sum 3.65\n\
             allium_circuit_build_seconds_count 6\n"
        );
    }

    #[test]
    fn http_answers() {
        let render = || "a 1\n".to_owned();
        assert_eq!(
            respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n", &render),
            None
        );
        let ok = respond(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", &render).unwrap();
        let ok = String::from_utf8(ok).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(ok.contains("Content-Length: 4\r\n"));
        assert!(ok.ends_with("\r\n\r\na 1\n"));
        let head = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &render).unwrap();
        assert!(head.ends_with(b"\r\n\r\n"));
        let nf = respond(b"GET / HTTP/1.1\r\n\r\n", &render).unwrap();
        assert!(nf.starts_with(b"HTTP/1.1 404 "));
        let post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", &render).unwrap();
        assert!(post.starts_with(b"HTTP/1.1 405 "));
        let big = vec![b'a'; MAX_REQUEST];
        assert!(
            respond(&big, &render)
                .unwrap()
                .starts_with(b"HTTP/1.1 431 ")
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let render: Render = std::sync::Arc::new(|| "allium_up 1\n".to_owned());
        let (addr, task) = spawn("127.0.0.1:0".parse().unwrap(), false, render)
            .await
            .unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"));
        assert!(out.ends_with("allium_up 1\n"));
        task.abort();
        let e = spawn(
            "0.0.0.0:0".parse().unwrap(),
            false,
            std::sync::Arc::new(String::new),
        )
        .await
        .unwrap_err();
        assert!(e.contains("metrics_allow_public"));
    }

    #[test]
    fn addresses() {
        assert!(check_address(None, false).is_ok());
        assert!(check_address(Some("127.0.0.1:9035".parse().unwrap()), false).is_ok());
        assert!(check_address(Some("[::1]:9035".parse().unwrap()), false).is_ok());
        let e = check_address(Some("0.0.0.0:9035".parse().unwrap()), false).unwrap_err();
        assert!(e.contains("metrics_allow_public"));
        assert!(check_address(Some("0.0.0.0:9035".parse().unwrap()), true).is_ok());
        assert_eq!(fmt_value(f64::INFINITY), "+Inf");
        assert_eq!(fmt_value(f64::NAN), "NaN");
        assert_eq!(fmt_value(0.25), "0.25");
    }
}
