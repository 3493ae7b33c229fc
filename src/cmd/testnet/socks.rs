//! A minimal SOCKS5 client (RFC 1928/1929, plus Tor's RESOLVE 0xF0), used by `allium testnet` to check
//! that the network carries streams, and by the whole-network tests.
//!
//! Every read is bounded by the caller's timeout; names are always sent unresolved (ATYP 3).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Why a SOCKS request failed.
#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    /// The proxy answered with a non-zero reply code.
    #[error("SOCKS proxy replied with code {0:#04x}")]
    Reply(u8),
    /// The proxy violated the protocol.
    #[error("SOCKS protocol error: {0}")]
    Protocol(&'static str),
    /// The proxy did not answer in time.
    #[error("SOCKS proxy did not answer in time")]
    Timeout,
    /// I/O error.
    #[error("SOCKS I/O error: {0}")]
    Io(#[from] io::Error),
}

impl SocksError {
    /// The SOCKS reply code, if the proxy sent one.
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            Self::Reply(c) => Some(*c),
            _ => None,
        }
    }
}

const CMD_CONNECT: u8 = 1;
const CMD_TOR_RESOLVE: u8 = 0xF0;

async fn negotiate(s: &mut TcpStream, auth: Option<(&str, &str)>) -> Result<(), SocksError> {
    match auth {
        None => s.write_all(&[5, 1, 0]).await?,
        Some(_) => s.write_all(&[5, 1, 2]).await?,
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    if m[0] != 5 {
        return Err(SocksError::Protocol("not a SOCKS5 proxy"));
    }
    match (m[1], auth) {
        (0, None) => Ok(()),
        (2, Some((u, p))) => {
            let (u, p) = (u.as_bytes(), p.as_bytes());
            let ul =
                u8::try_from(u.len()).map_err(|_| SocksError::Protocol("username too long"))?;
            let pl =
                u8::try_from(p.len()).map_err(|_| SocksError::Protocol("password too long"))?;
            let mut req = vec![1, ul];
            req.extend_from_slice(u);
            req.push(pl);
            req.extend_from_slice(p);
            s.write_all(&req).await?;
            let mut r = [0u8; 2];
            s.read_exact(&mut r).await?;
            if r[1] != 0 {
                return Err(SocksError::Protocol("username/password refused"));
            }
            Ok(())
        }
        _ => Err(SocksError::Protocol(
            "proxy chose an unexpected auth method",
        )),
    }
}

async fn request(
    s: &mut TcpStream,
    cmd: u8,
    host: &str,
    port: u16,
) -> Result<Option<IpAddr>, SocksError> {
    let hl = u8::try_from(host.len()).map_err(|_| SocksError::Protocol("host name too long"))?;
    let mut req = vec![5, cmd, 0, 3, hl];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::Protocol("bad reply version"));
    }
    if head[1] != 0 {
        return Err(SocksError::Reply(head[1]));
    }
    let ip = match head[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await?;
            Some(IpAddr::from([a[0], a[1], a[2], a[3]]))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await?;
            let mut b = [0u8; 16];
            b.copy_from_slice(&a[..16]);
            Some(IpAddr::from(b))
        }
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await?;
            let mut rest = vec![0u8; usize::from(l[0]) + 2];
            s.read_exact(&mut rest).await?;
            None
        }
        _ => return Err(SocksError::Protocol("bad reply address type")),
    };
    Ok(ip)
}

/// Open a stream to `host:port` through the SOCKS5 proxy at `proxy` (the name is resolved by the exit).
pub async fn connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<TcpStream, SocksError> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(proxy).await?;
        s.set_nodelay(true)?;
        negotiate(&mut s, auth).await?;
        request(&mut s, CMD_CONNECT, host, port).await?;
        Ok(s)
    })
    .await
    .map_err(|_| SocksError::Timeout)?
}

/// Resolve `host` at the exit with Tor's RESOLVE (0xF0) extension.
pub async fn resolve(
    proxy: SocketAddr,
    host: &str,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<IpAddr, SocksError> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(proxy).await?;
        negotiate(&mut s, auth).await?;
        request(&mut s, CMD_TOR_RESOLVE, host, 0)
            .await?
            .ok_or(SocksError::Protocol("RESOLVE answered with a name"))
    })
    .await
    .map_err(|_| SocksError::Timeout)?
}
