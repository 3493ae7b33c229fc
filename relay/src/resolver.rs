//! Name resolution at the exit, behind a small trait so tests can inject names only the exit knows.
//!
//! [`crate::start`] puts a [`CachingResolver`] in front of the [`SystemResolver`], an
//! asynchronous DNS stub resolver (hickory-resolver on tokio: no `getaddrinfo` on the blocking
//! pool) configured from `/etc/resolv.conf` and `/etc/hosts`, so `localhost` and the names a test
//! network writes in the hosts file resolve without any DNS server. Answers are kept for their
//! DNS TTL clipped like Tor's exits to [`MIN_TTL`]..=[`MAX_TTL`] (Tor's `MIN_DNS_TTL_AT_EXIT` and
//! `MAX_DNS_TTL_AT_EXIT`: 5 minutes and 1 hour); a name that does not exist (NXDOMAIN, or no
//! address records) is remembered for its zone's negative TTL (RFC 2308) clipped the same way;
//! other failures (timeouts, SERVFAIL, refused) and answers without a TTL are kept for
//! [`NEGATIVE_TTL`] and [`POSITIVE_TTL`]. At most [`CACHE_ENTRIES`] names are kept, so a
//! client that asks for the same name again and again (or for a name that does not exist) costs
//! one lookup per TTL. IP literals never reach the cache or the resolver. Every lookup, for BEGIN
//! and RESOLVE alike, holds one of the relay's resolve slots (256) while it runs.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// A boxed resolution future.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// The outcome of one lookup and the time-to-live its source gave for it, if any: the
/// smallest TTL of the address records for an answer, the zone's negative TTL for a name
/// that does not exist.
pub type TtlFuture<'a> =
    Pin<Box<dyn Future<Output = (io::Result<Vec<IpAddr>>, Option<Duration>)> + Send + 'a>>;

/// Resolves host names for BEGIN and RESOLVE. The caller applies its own timeout.
pub trait Resolver: Send + Sync + 'static {
    /// Resolve `host` (a name or an IP literal) to addresses.
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;

    /// Resolve `host` and say how long the outcome may be reused (`None`: the source does not
    /// say). A failure whose `io::ErrorKind` is `NotFound` means the name does not exist.
    fn resolve_with_ttl<'a>(&'a self, host: &'a str) -> TtlFuture<'a> {
        Box::pin(async move { (self.resolve(host).await, None) })
    }
}

/// Most addresses kept from one answer.
const MAX_ADDRS: usize = 16;

/// The system's resolver: hickory-resolver configured from `/etc/resolv.conf` (name servers,
/// search domains, options) and `/etc/hosts`, built on first use inside the caller's tokio
/// runtime. If the system configuration cannot be read, every name lookup fails with an error
/// that says so (IP literals still work), and the reason is logged once as a warning.
#[derive(Clone, Default)]
pub struct SystemResolver {
    inner: Arc<OnceLock<Result<TokioResolver, String>>>,
    explicit: Option<Arc<ResolverConfig>>,
}

impl std::fmt::Debug for SystemResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemResolver")
            .field("explicit", &self.explicit.is_some())
            .finish_non_exhaustive()
    }
}

/// The options Allium sets on top of the system's: no cache in hickory (the
/// [`CachingResolver`] keeps answers, with Tor's clipping, on the tokio clock), and IPv4
/// addresses before IPv6 ones, both asked for at once.
fn tune(opts: &mut ResolverOpts) {
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
}

impl SystemResolver {
    /// The system configuration (read on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask only the name servers in `config` and ignore `/etc/hosts` (tests, or an operator's
    /// own resolver).
    pub fn with_config(config: ResolverConfig) -> Self {
        Self {
            inner: Arc::default(),
            explicit: Some(Arc::new(config)),
        }
    }

    fn build(&self) -> Result<TokioResolver, String> {
        let provider = TokioRuntimeProvider::default();
        let builder = match &self.explicit {
            Some(cfg) => {
                let mut b = TokioResolver::builder_with_config((**cfg).clone(), provider);
                b.options_mut().use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
                b
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                format!(
                    "cannot read the system DNS configuration (/etc/resolv.conf): {e}; exits \
                     resolve no names until it is readable and the relay restarted"
                )
            })?,
        };
        let mut builder = builder;
        tune(builder.options_mut());
        builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
    }

    fn resolver(&self) -> Result<&TokioResolver, io::Error> {
        let r = self.inner.get_or_init(|| {
            let r = self.build();
            if let Err(e) = &r {
                tracing::warn!("{e}");
            }
            r
        });
        r.as_ref().map_err(|e| io::Error::other(e.clone()))
    }
}

/// The TTL hickory reports for a name that does not exist, and the error kind for it.
fn lookup_error(e: &NetError) -> (io::Error, Option<Duration>) {
    use hickory_resolver::net::DnsError;
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => (
            io::Error::new(io::ErrorKind::NotFound, "no such name"),
            nr.negative_ttl.map(|t| Duration::from_secs(u64::from(t))),
        ),
        NetError::Timeout => (
            io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"),
            None,
        ),
        other => (
            io::Error::other(format!("DNS lookup failed: {other}")),
            None,
        ),
    }
}

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move { self.resolve_with_ttl(host).await.0 })
    }

    fn resolve_with_ttl<'a>(&'a self, host: &'a str) -> TtlFuture<'a> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return (Ok(vec![ip]), None);
            }
            let r = match self.resolver() {
                Ok(r) => r,
                Err(e) => return (Err(e), None),
            };
            match r.lookup_ip(host).await {
                Ok(lookup) => {
                    let ttl = lookup
                        .as_lookup()
                        .answers()
                        .iter()
                        .filter(|rec| rec.data.ip_addr().is_some())
                        .map(|rec| rec.ttl)
                        .min()
                        .map(|t| Duration::from_secs(u64::from(t)));
                    let mut out: Vec<IpAddr> = Vec::new();
                    for ip in lookup.iter() {
                        if !out.contains(&ip) && out.len() < MAX_ADDRS {
                            out.push(ip);
                        }
                    }
                    if out.is_empty() {
                        (
                            Err(io::Error::new(
                                io::ErrorKind::NotFound,
                                "no address records",
                            )),
                            None,
                        )
                    } else {
                        (Ok(out), ttl)
                    }
                }
                Err(e) => {
                    let (err, ttl) = lookup_error(&e);
                    (Err(err), ttl)
                }
            }
        })
    }
}

/// Shortest time an answer with a TTL is kept (Tor's `MIN_DNS_TTL_AT_EXIT`).
pub const MIN_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest time an answer with a TTL is kept (Tor's `MAX_DNS_TTL_AT_EXIT`).
pub const MAX_TTL: Duration = Duration::from_secs(60 * 60);
/// How long an answer whose source gave no TTL is reused (static test names; a minute keeps a
/// test network's renamed destinations fresh).
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long a failure without a negative TTL (a timeout, SERVFAIL, no configuration) is
/// remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Most names cached; past it the entry closest to expiry goes first.
pub const CACHE_ENTRIES: usize = 4096;

/// How long to keep an outcome: the source's TTL clipped to [`MIN_TTL`]..=[`MAX_TTL`], or
/// [`POSITIVE_TTL`] / [`NEGATIVE_TTL`] when it gave none.
pub fn cache_ttl(found: bool, ttl: Option<Duration>) -> Duration {
    match (ttl, found) {
        (Some(t), _) => t.clamp(MIN_TTL, MAX_TTL),
        (None, true) => POSITIVE_TTL,
        (None, false) => NEGATIVE_TTL,
    }
}

/// The cache behind [`CachingResolver`] (sans-IO: the time is passed in).
#[derive(Debug, Default)]
pub struct DnsCache {
    map: HashMap<String, (Option<Vec<IpAddr>>, Instant)>,
    /// Expiry order (entries may be stale: checked against `map`).
    order: BTreeSet<(Instant, String)>,
}

impl DnsCache {
    /// The cached answer for `host` (`Some(None)`: a cached failure), if fresh at `now`.
    pub fn get(&self, host: &str, now: Instant) -> Option<Option<Vec<IpAddr>>> {
        let key = host.to_ascii_lowercase();
        match self.map.get(&key) {
            Some((v, exp)) if *exp > now => Some(v.clone()),
            _ => None,
        }
    }

    /// When the entry for `host` expires, if there is one.
    pub fn expires_at(&self, host: &str) -> Option<Instant> {
        self.map.get(&host.to_ascii_lowercase()).map(|(_, e)| *e)
    }

    /// Remember `answer` for `host` (`None`: the lookup failed) for `ttl` from `now`.
    pub fn insert(&mut self, host: &str, answer: Option<Vec<IpAddr>>, ttl: Duration, now: Instant) {
        let key = host.to_ascii_lowercase();
        let exp = now + ttl;
        // Drop what expired, then the soonest to expire while full.
        while let Some((t, k)) = self.order.first().cloned() {
            if t > now && self.map.len() < CACHE_ENTRIES {
                break;
            }
            self.order.pop_first();
            if self.map.get(&k).is_some_and(|(_, e)| *e == t) {
                self.map.remove(&k);
            }
        }
        if let Some((_, old)) = self.map.insert(key.clone(), (answer, exp)) {
            self.order.remove(&(old, key.clone()));
        }
        self.order.insert((exp, key));
    }

    /// Names cached now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A resolver with a bounded cache of answers and failures ([`DnsCache`]) in front of another.
/// IP literals bypass the cache.
pub struct CachingResolver<R> {
    inner: R,
    cache: Mutex<DnsCache>,
}

impl<R> std::fmt::Debug for CachingResolver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingResolver").finish_non_exhaustive()
    }
}

impl<R: Resolver> CachingResolver<R> {
    /// Cache `inner`'s answers.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            cache: Mutex::new(DnsCache::default()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DnsCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The driver clock (tokio's, so tests can pause it).
#[allow(clippy::disallowed_methods)] // The resolver is an I/O driver: time enters here.
fn driver_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl<R: Resolver> Resolver for CachingResolver<R> {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![ip]);
            }
            if let Some(hit) = self.cache().get(host, driver_now()) {
                return hit
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "cached failure"));
            }
            let (r, ttl) = self.inner.resolve_with_ttl(host).await;
            // Empty answers count as failures; a lookup cut by the caller's timeout is not
            // cached (this future is dropped before it gets here).
            let answer = match &r {
                Ok(a) if !a.is_empty() => Some(a.clone()),
                Ok(_) | Err(_) => None,
            };
            let keep = cache_ttl(answer.is_some(), ttl);
            self.cache().insert(host, answer, keep, driver_now());
            r
        })
    }
}

/// A resolver with fixed extra names in front of another resolver (tests).
#[derive(Debug, Clone)]
pub struct StaticResolver<R> {
    names: Vec<(String, Vec<IpAddr>)>,
    fallback: R,
}

impl<R: Resolver> StaticResolver<R> {
    /// Names answered from the table; everything else goes to `fallback`.
    pub fn new(names: Vec<(String, Vec<IpAddr>)>, fallback: R) -> Self {
        Self { names, fallback }
    }
}

impl<R: Resolver> Resolver for StaticResolver<R> {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        if let Some((_, addrs)) = self
            .names
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(host))
        {
            let addrs = addrs.clone();
            return Box::pin(async move { Ok(addrs) });
        }
        self.fallback.resolve(host)
    }

    fn resolve_with_ttl<'a>(&'a self, host: &'a str) -> TtlFuture<'a> {
        if self.names.iter().any(|(n, _)| n.eq_ignore_ascii_case(host)) {
            return Box::pin(async move { (self.resolve(host).await, None) });
        }
        self.fallback.resolve_with_ttl(host)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests: one real instant as the origin of simulated time.
mod tests {
    use super::*;

    #[test]
    fn cache_ttls_negative_entries_and_bound() {
        let t0 = Instant::now();
        let mut c = DnsCache::default();
        let a = vec!["192.0.2.1".parse::<IpAddr>().unwrap()];
        c.insert("Example.ORG", Some(a.clone()), POSITIVE_TTL, t0);
        c.insert("nx.example", None, NEGATIVE_TTL, t0);
        assert_eq!(c.get("example.org", t0), Some(Some(a.clone())));
        assert_eq!(c.get("nx.example", t0 + NEGATIVE_TTL / 2), Some(None));
        assert_eq!(c.get("nx.example", t0 + NEGATIVE_TTL), None);
        assert_eq!(c.get("example.org", t0 + POSITIVE_TTL), None);
        for i in 0..CACHE_ENTRIES + 10 {
            c.insert(&format!("h{i}.example"), Some(a.clone()), POSITIVE_TTL, t0);
        }
        assert!(c.len() <= CACHE_ENTRIES);
    }

    /// Counts lookups that reach it.
    struct Counting(std::sync::atomic::AtomicUsize);
    impl Resolver for Counting {
        fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let found = host.starts_with("ok");
            Box::pin(async move {
                if found {
                    Ok(vec!["192.0.2.7".parse().unwrap()])
                } else {
                    Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn caching_resolver_answers_repeats_from_the_cache() {
        let r = CachingResolver::new(Counting(Default::default()));
        let n = || r.inner.0.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..3 {
            r.resolve("ok.example").await.unwrap();
            assert!(r.resolve("missing.example").await.is_err());
        }
        assert_eq!(n(), 2);
        tokio::time::advance(NEGATIVE_TTL).await;
        assert!(r.resolve("missing.example").await.is_err());
        r.resolve("ok.example").await.unwrap();
        assert_eq!(n(), 3);
        tokio::time::advance(POSITIVE_TTL).await;
        r.resolve("ok.example").await.unwrap();
        assert_eq!(n(), 4);
    }

    #[tokio::test]
    async fn static_names_and_literals() {
        let r = StaticResolver::new(
            vec![("secret.exit".into(), vec!["127.0.0.1".parse().unwrap()])],
            SystemResolver::new(),
        );
        assert_eq!(
            r.resolve("SECRET.exit").await.unwrap(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            r.resolve("10.0.0.1").await.unwrap(),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    /// A DNS server on 127.0.53.x for the test: `short.test` has an A record with TTL 5,
    /// `long.test` one with TTL 86400, every other name is NXDOMAIN with a negative TTL of 7
    /// (SOA), and AAAA queries get no records. Counts the A queries per name.
    async fn dns_responder(ip: &str) -> (std::net::SocketAddr, Arc<Mutex<HashMap<String, usize>>>) {
        let sock = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = Arc::clone(&counts);
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = &buf[..n];
                // The question: labels from offset 12 to the root label, then type and class.
                let mut i = 12;
                let mut labels = Vec::new();
                while q[i] != 0 {
                    let l = usize::from(q[i]);
                    labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + l]).to_ascii_lowercase());
                    i += 1 + l;
                }
                let qend = i + 5;
                let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
                let name = labels.join(".");
                let ttl = match name.as_str() {
                    "short.test" => Some(5u32),
                    "long.test" => Some(86_400),
                    _ => None,
                };
                if qtype == 1 {
                    *seen.lock().unwrap().entry(name.clone()).or_default() += 1;
                }
                let mut r = Vec::new();
                r.extend_from_slice(&q[..2]); // id
                let rcode = if ttl.is_none() { 3 } else { 0 }; // NXDOMAIN or NOERROR
                r.extend_from_slice(&[0x81, 0x80 | rcode]);
                let answer = qtype == 1 && ttl.is_some();
                r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, u8::from(!answer), 0, 0]);
                r.extend_from_slice(&q[12..qend]);
                if let (true, Some(t)) = (answer, ttl) {
                    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                    r.extend_from_slice(&t.to_be_bytes());
                    r.extend_from_slice(&[0, 4, 192, 0, 2, 53]);
                } else {
                    // SOA for `test.` (the last label of the question): TTL 7, minimum 7.
                    let zone = i - 5; // offset of "\x04test\x00"
                    r.extend_from_slice(&[0xc0, u8::try_from(zone).unwrap(), 0, 6, 0, 1]);
                    r.extend_from_slice(&7u32.to_be_bytes());
                    r.extend_from_slice(&[0, 22, 0, 0]);
                    for v in [1u32, 3600, 600, 86_400, 7] {
                        r.extend_from_slice(&v.to_be_bytes());
                    }
                }
                let _ = sock.send_to(&r, from).await;
            }
        });
        (addr, counts)
    }

    #[tokio::test]
    async fn dns_answers_are_cached_for_their_clipped_ttl_and_failures_negatively() {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
        let (addr, counts) = dns_responder("127.0.53.1").await;
        let mut conn = ConnectionConfig::udp();
        conn.port = addr.port();
        let mut ns = NameServerConfig::udp(addr.ip());
        ns.connections = vec![conn];
        let sys = SystemResolver::with_config(ResolverConfig::from_name_servers(vec![ns]));

        // The resolver reports the records' TTL and the zone's negative TTL as they are.
        let (r, ttl) = sys.resolve_with_ttl("short.test.").await;
        assert_eq!(r.unwrap(), vec!["192.0.2.53".parse::<IpAddr>().unwrap()]);
        assert_eq!(ttl, Some(Duration::from_secs(5)));
        let (r, ttl) = sys.resolve_with_ttl("nx.test.").await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(ttl, Some(Duration::from_secs(7)));

        // The cache clips them like Tor: 5 s and 7 s become 5 minutes, a day becomes an hour.
        let c = CachingResolver::new(sys);
        let t0 = driver_now();
        for name in ["short.test.", "long.test.", "nx.test."] {
            for _ in 0..3 {
                let r = c.resolve(name).await;
                assert_eq!(r.is_ok(), name != "nx.test.", "{name}");
            }
        }
        let t1 = driver_now();
        let left = |name: &str| c.cache().expires_at(name).unwrap();
        for (name, ttl) in [
            ("short.test.", MIN_TTL),
            ("nx.test.", MIN_TTL),
            ("long.test.", MAX_TTL),
        ] {
            assert!(left(name) >= t0 + ttl && left(name) <= t1 + ttl, "{name}");
            assert!(
                c.cache()
                    .get(name, t1 + ttl - Duration::from_secs(1))
                    .is_some()
            );
            assert_eq!(c.cache().get(name, t1 + ttl), None, "{name} expires");
        }
        // One query each reached the server: repeats and the failure came from the cache.
        let counts = counts.lock().unwrap().clone();
        assert_eq!(counts.get("short.test"), Some(&2), "{counts:?}"); // the direct lookup too
        assert_eq!(counts.get("long.test"), Some(&1), "{counts:?}");
        assert_eq!(counts.get("nx.test"), Some(&2), "{counts:?}");
        // IP literals never reach the server or the cache.
        assert_eq!(
            c.resolve("192.0.2.9").await.unwrap(),
            vec!["192.0.2.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.cache().len(), 3);
    }

    #[tokio::test]
    async fn system_configuration_resolves_localhost_from_the_hosts_file() {
        let r = CachingResolver::new(SystemResolver::new());
        let a = r.resolve("localhost").await.unwrap();
        assert!(a.iter().all(IpAddr::is_loopback) && !a.is_empty(), "{a:?}");
    }
}
