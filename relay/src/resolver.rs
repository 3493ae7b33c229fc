//! Name resolution at the exit, behind a small trait so tests can inject names only the exit knows.
//!
//! [`crate::start`] wraps the system resolver in a [`CachingResolver`]: answers are kept for
//! [`POSITIVE_TTL`], failures for [`NEGATIVE_TTL`] (negative caching), at most
//! [`CACHE_ENTRIES`] names, so a client that asks for the same name again and again (or for a
//! name that does not exist) costs one lookup per TTL. Every lookup, for BEGIN and RESOLVE
//! alike, holds one of the relay's resolve slots (256) while it runs.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A boxed resolution future.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Resolves host names for BEGIN and RESOLVE. The caller applies its own timeout.
pub trait Resolver: Send + Sync + 'static {
    /// Resolve `host` (a name or an IP literal) to addresses.
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}

/// The system resolver (`tokio::net::lookup_host`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![ip]);
            }
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            let mut out: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            out.dedup();
            out.truncate(16);
            Ok(out)
        })
    }
}

/// How long a successful answer is reused (the system resolver gives no TTL; Tor's exits clip
/// DNS TTLs to between 5 minutes and 1 hour, and a minute keeps a test network's renamed
/// destinations fresh).
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Most names cached; past it the entry closest to expiry goes first.
pub const CACHE_ENTRIES: usize = 4096;

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

    /// Remember `answer` for `host` (`None`: the lookup failed) from `now`.
    pub fn insert(&mut self, host: &str, answer: Option<Vec<IpAddr>>, now: Instant) {
        let ttl = if answer.is_some() {
            POSITIVE_TTL
        } else {
            NEGATIVE_TTL
        };
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
            let r = self.inner.resolve(host).await;
            let answer = match &r {
                Ok(a) if !a.is_empty() => Some(a.clone()),
                // Empty answers and failures alike (getaddrinfo does not tell NXDOMAIN from
                // SERVFAIL portably); a lookup cut by the caller's timeout is not cached.
                Ok(_) | Err(_) => None,
            };
            self.cache().insert(host, answer, driver_now());
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
        c.insert("Example.ORG", Some(a.clone()), t0);
        c.insert("nx.example", None, t0);
        assert_eq!(c.get("example.org", t0), Some(Some(a.clone())));
        assert_eq!(c.get("nx.example", t0 + NEGATIVE_TTL / 2), Some(None));
        assert_eq!(c.get("nx.example", t0 + NEGATIVE_TTL), None);
        assert_eq!(c.get("example.org", t0 + POSITIVE_TTL), None);
        for i in 0..CACHE_ENTRIES + 10 {
            c.insert(&format!("h{i}.example"), Some(a.clone()), t0);
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
            SystemResolver,
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
}
