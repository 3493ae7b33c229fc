//! The exit's I/O: name resolution, connecting, and the two small pumps that move one stream's
//! bytes. They hold no circuit state: every decision is the circuit core's, made in the reactor
//! that owns it. Each pump reports to its reactor over the reactor's bounded I/O queue ([`Io`]).
//!
//! - The reader pump reads at most [`READ_CELLS`] cells' worth from the destination, hands the
//!   bytes to the reactor and waits for a go-ahead before reading again (the reactor gives it
//!   once the core packaged all of them), so a stream holds at most one read in memory and a
//!   blocked circuit stops reading its sockets.
//! - The writer pump drains the stream's queue of received DATA cells (bounded by XON/XOFF),
//!   coalesces them into one write, and reports how many cells it wrote so the core can count
//!   them consumed (and send XON once the queue drained after an XOFF).
//! - The destination socket keeps at most [`DEST_NOTSENT_LOWAT`] unsent bytes in the kernel
//!   (`TCP_NOTSENT_LOWAT`). Without it a destination that never reads makes the kernel take
//!   megabytes per stream (about 2.9 MiB on Linux loopback with a 4 KiB receive buffer) before
//!   the writer blocks: all of it counts as consumed, no XOFF goes out, and 400 such streams
//!   pull more than a gigabyte through the circuits that share their relays.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use allium_crypto::relaycell::MAX_DATA;
use allium_crypto::{RelayId, X25519Public};
use allium_proto::cell::{Create, DestroyReason};
use allium_proto::flowctl::XOFF_LIMIT;
use allium_proto::relaymsg::EndReason;
use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::core::{DataChunk, ResolveFailure, connect_error_reason};
use crate::ctx::Ctx;
use crate::link::Link;
use crate::ratelimit::Credit;

/// Longest wait for name resolution.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a TCP connection to the destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the destination to accept queued bytes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// The reader takes at most this many cells' worth of bytes per read.
pub const READ_CELLS: usize = 32;
/// The writer coalesces at most this many bytes per write.
const WRITE_COALESCE: usize = 64 * 1024;
/// Unsent bytes the kernel may hold for a destination socket before the writer pump waits
/// (`TCP_NOTSENT_LOWAT`, Linux only; elsewhere the kernel's default applies). It bounds unsent
/// data only: bytes in flight still grow with the connection's window, so a fast destination
/// far away is not slowed down.
pub const DEST_NOTSENT_LOWAT: u32 = 64 * 1024;
/// Queue of received DATA cells per stream: the XOFF limit plus slack for the FIN.
pub(crate) const WRITE_QUEUE: usize = XOFF_LIMIT as usize + 16;

/// What the I/O tasks of a circuit tell its reactor.
#[derive(Debug)]
pub(crate) enum Io {
    /// A name was resolved (or not).
    Resolved {
        sid: u16,
        result: Result<Vec<IpAddr>, ResolveFailure>,
    },
    /// The destination accepted the connection.
    Connected { sid: u16, tcp: TcpStream },
    /// The connection failed.
    ConnectFailed { sid: u16, reason: EndReason },
    /// Bytes read from the destination.
    Read { sid: u16, data: Bytes },
    /// The destination closed its side.
    Eof { sid: u16 },
    /// Reading or writing failed.
    Failed { sid: u16, reason: EndReason },
    /// `cells` DATA cells were written to the destination.
    Written { sid: u16, cells: usize },
    /// The link for an extension (attempt `attempt`), or why there is none.
    Extend {
        attempt: u64,
        link: Result<Arc<Link>, DestroyReason>,
        create: Create,
    },
}

/// One item of a stream's write queue.
#[derive(Debug)]
pub(crate) enum WriteItem {
    /// A received DATA cell's bytes, counted as queued memory until written (or dropped).
    Data(DataChunk, crate::dos::Charge),
    /// The client sent END DONE: shut down the write side after what is queued.
    Fin,
}

/// What one queued DATA cell costs: the cell body it keeps, and the queue slot.
const DATA_ITEM_COST: u64 = (allium_proto::cell::CELL_BODY_LEN + 64) as u64;

impl WriteItem {
    /// A DATA item for circuit `circ`, counted in `acct` (the out-of-memory handler's account)
    /// until the writer has written it or it is dropped.
    pub(crate) fn charged(
        data: DataChunk,
        circ: &Arc<crate::dos::CircQueued>,
        acct: &Arc<crate::dos::MemAccount>,
    ) -> Self {
        Self::Data(data, circ.charge(acct, DATA_ITEM_COST))
    }
}

async fn report(tx: &mpsc::Sender<Io>, io: Io) -> bool {
    tx.send(io).await.is_ok()
}

/// Resolve `host` (bounded by [`RESOLVE_TIMEOUT`]) and report it.
pub(crate) async fn resolve(
    ctx: Arc<Ctx>,
    sid: u16,
    host: String,
    slot: OwnedSemaphorePermit,
    tx: mpsc::Sender<Io>,
) {
    let result = match tokio::time::timeout(RESOLVE_TIMEOUT, ctx.resolver.resolve(&host)).await {
        Ok(Ok(a)) if !a.is_empty() => Ok(a),
        Ok(_) => Err(ResolveFailure::NotFound),
        Err(_) => Err(ResolveFailure::Timeout),
    };
    drop(slot);
    report(&tx, Io::Resolved { sid, result }).await;
}

/// Connect to the first of `addrs` that accepts (bounded by [`CONNECT_TIMEOUT`]) and report it.
pub(crate) async fn connect(sid: u16, addrs: Vec<SocketAddr>, tx: mpsc::Sender<Io>) {
    let attempt = async {
        let mut last = EndReason::MISC;
        for a in &addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = connect_error_reason(e.kind()),
            }
        }
        Err(last)
    };
    let io = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            limit_unsent(&tcp);
            Io::Connected { sid, tcp }
        }
        Ok(Err(reason)) => Io::ConnectFailed { sid, reason },
        Err(_) => Io::ConnectFailed {
            sid,
            reason: EndReason::TIMEOUT,
        },
    };
    report(&tx, io).await;
}

/// Keep at most [`DEST_NOTSENT_LOWAT`] unsent bytes in the kernel for a destination socket
/// (best effort: a failure is logged at debug level and the kernel's default applies).
pub(crate) fn limit_unsent(tcp: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(DEST_NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "could not set TCP_NOTSENT_LOWAT on a destination socket");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// Whether extending to `relay` (link key `link_key`) at `addr` would go back to the previous
/// hop `prev`: the same identity (or link key), or the same public address. Such a circuit
/// would cross one relay twice in a row, which gains a client nothing and lets an attacker
/// amplify traffic between two relays. Internal addresses are exempt: a test network runs
/// every relay on one loopback host.
pub(crate) fn extends_back(
    relay: &RelayId,
    link_key: &X25519Public,
    addr: SocketAddr,
    prev: &Link,
) -> bool {
    let same_id = prev.peer_relay.as_ref() == Some(relay)
        || prev.peer_static.as_ref().is_some_and(|k| k.ct_eq(link_key));
    let same_addr = prev.peer_ip().is_some_and(|ip| {
        canonical(ip) == canonical(addr.ip()) && !allium_directory::addr::is_internal(ip)
    });
    same_id || same_addr
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Find the next relay, check the client's address against the directory, refuse to go back
/// to the previous hop ([`extends_back`]), and open (or reuse) a link to it.
pub(crate) async fn extend(
    ctx: Arc<Ctx>,
    prev: Arc<Link>,
    attempt: u64,
    relay: RelayId,
    addrs: Vec<SocketAddr>,
    create: Create,
    tx: mpsc::Sender<Io>,
) {
    let link = async {
        let Some(known) = ctx.lookup_relay(&relay) else {
            ctx.refetch.notify_one();
            return Err(DestroyReason::CONNECTFAILED);
        };
        // The client's address must be one the consensus lists for that identity.
        let addr = addrs
            .iter()
            .find(|a| known.addrs.contains(a))
            .copied()
            .ok_or(DestroyReason::CONNECTFAILED)?;
        if extends_back(&relay, &known.link_key, addr, &prev) {
            tracing::debug!("refused an EXTEND back to the previous hop");
            return Err(DestroyReason::PROTOCOL);
        }
        ctx.links
            .get_or_connect(&ctx, relay, addr, known.link_key)
            .await
            .ok_or(DestroyReason::CONNECTFAILED)
    }
    .await;
    report(
        &tx,
        Io::Extend {
            attempt,
            link,
            create,
        },
    )
    .await;
}

/// Destination → reactor. Reads again only after a go-ahead on `more`.
pub(crate) async fn read_pump(
    ctx: Arc<Ctx>,
    sid: u16,
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<Io>,
    mut more: mpsc::Receiver<()>,
) {
    let mut credit = Credit::default();
    let mut buf = BytesMut::new();
    // Small streams keep a small buffer; it grows to READ_CELLS cells once a read fills it.
    let mut want = 4 * MAX_DATA;
    loop {
        buf.reserve(want);
        let n = match rd.read_buf(&mut (&mut buf).limit(want)).await {
            Ok(0) => {
                report(&tx, Io::Eof { sid }).await;
                return;
            }
            Ok(n) => n,
            Err(e) => {
                let reason = connect_error_reason(e.kind());
                report(&tx, Io::Failed { sid, reason }).await;
                return;
            }
        };
        if n == want {
            want = READ_CELLS * MAX_DATA;
        }
        credit.spend(&ctx.bucket, n as u64).await;
        let data = buf.split().freeze();
        if !report(&tx, Io::Read { sid, data }).await {
            return;
        }
        if more.recv().await.is_none() {
            return;
        }
    }
}

/// Reactor → destination. Ends when the queue closes (the stream finished) or on FIN.
pub(crate) async fn write_pump(
    sid: u16,
    mut rx: mpsc::Receiver<WriteItem>,
    mut wr: OwnedWriteHalf,
    tx: mpsc::Sender<Io>,
) {
    let mut out: Vec<u8> = Vec::new();
    // The charges of the cells in `out`: released once the destination took them.
    let mut charges = Vec::new();
    loop {
        let Some(first) = rx.recv().await else {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
            return;
        };
        let mut fin = false;
        let mut cells = 0usize;
        let mut item = Some(first);
        while let Some(it) = item.take() {
            match it {
                WriteItem::Data(d, charge) => {
                    out.extend_from_slice(d.bytes());
                    charges.push(charge);
                    cells += 1;
                }
                WriteItem::Fin => {
                    fin = true;
                    break;
                }
            }
            if out.len() < WRITE_COALESCE {
                item = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            let reason = match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(connect_error_reason(e.kind())),
                Err(_) => Some(EndReason::TIMEOUT),
            };
            if let Some(reason) = reason {
                report(&tx, Io::Failed { sid, reason }).await;
                return;
            }
            out.clear();
            charges.clear();
        }
        if cells > 0 {
            // The reactor may be gone after a graceful close: keep draining regardless.
            let _ = tx.send(Io::Written { sid, cells }).await;
        }
        if fin {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::CellSink;

    fn link(peer: Option<RelayId>, key: Option<X25519Public>, ip: Option<&str>) -> Arc<Link> {
        let (tx, _rx) = mpsc::channel(1);
        let l = Link::new(CellSink::Mpsc(tx), false, peer, key, 8);
        if let Some(ip) = ip {
            l.set_peer_ip(ip.parse().unwrap());
        }
        l
    }

    /// Bytes `tcp` takes before its peer reads anything (writes until no room comes within
    /// 200 ms).
    async fn unread_capacity(tcp: &TcpStream) -> usize {
        let buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < 64 << 20 {
            match tcp.try_write(&buf) {
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let room = tokio::time::timeout(Duration::from_millis(200), tcp.writable());
                    if room.await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        total
    }

    /// A destination that accepts and never reads (4 KiB receive buffer, as in the attack suite):
    /// the exit's socket to it takes a few tens of KiB, not the megabytes the kernel would
    /// otherwise queue (which count as consumed, so no XOFF would stop the client).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn a_destination_that_never_reads_holds_little_in_the_kernel() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(8).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        connect(7, vec![listener.local_addr().unwrap()], tx).await;
        let (_never_read, _) = listener.accept().await.unwrap();
        let Some(Io::Connected { sid: 7, tcp }) = rx.recv().await else {
            panic!("not connected");
        };
        let taken = unread_capacity(&tcp).await;
        assert!(
            taken <= 4 * DEST_NOTSENT_LOWAT as usize,
            "{taken} bytes queued in the kernel for a destination that never reads"
        );
        assert!(taken > 0);
    }

    #[test]
    fn extend_back_to_the_previous_hop_is_refused() {
        let a = RelayId([1; 32]);
        let b = RelayId([2; 32]);
        let ka = X25519Public([3; 32]);
        let kb = X25519Public([4; 32]);
        let to = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // Same identity, on a link we opened (peer_relay known).
        let prev = link(Some(a), Some(ka), Some("198.18.0.1"));
        assert!(extends_back(&a, &ka, to("198.18.0.1:9001"), &prev));
        // Same link key on an incoming link whose identity we did not look up.
        let incoming = link(None, Some(ka), Some("198.18.0.1"));
        assert!(extends_back(&a, &ka, to("203.0.114.9:9001"), &incoming));
        // Another relay at the previous hop's public address (any port, mapped form too).
        let client = link(None, Some(kb), Some("203.0.114.9"));
        assert!(extends_back(&a, &ka, to("203.0.114.9:443"), &client));
        assert!(extends_back(
            &a,
            &ka,
            to("[::ffff:203.0.114.9]:443"),
            &client
        ));
        // Elsewhere: allowed.
        assert!(!extends_back(&b, &kb, to("203.0.114.10:9001"), &prev));
        assert!(!extends_back(&a, &ka, to("203.0.114.10:9001"), &client));
        // A test network's loopback relays share one address: identity alone decides there.
        let local = link(None, Some(kb), Some("127.0.0.1"));
        assert!(!extends_back(&a, &ka, to("127.0.0.1:9001"), &local));
        assert!(extends_back(&b, &kb, to("127.0.0.1:9001"), &local));
    }
}
