//! Name resolution at the exit, behind a small trait so tests can inject names only the exit knows.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;

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
mod tests {
    use super::*;

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
