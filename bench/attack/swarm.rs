//! Many attacker connections on a set of TCP listeners, for `bench/attack/run.py`: the connection
//! flood, slowloris and garbage attacks.
//!
//! Each `--target LABEL,KIND,ADDR` gets `--per-target` connections from `--source`, each a task:
//! - `--mode hold`: connect and keep the connection (connection flood);
//! - `--mode trickle`: send the next byte of the listener's never-complete request every
//!   `--interval` seconds (± 20 %), slowloris;
//! - `--mode garbage`: write pseudo-random bytes as fast as the socket takes them.
//!
//! A connection the server closes or refuses is counted and opened again, at most
//! `--reopen-per-s` per listener per second (a token bucket that starts full). Every socket has
//! SO_LINGER 0, so the tool's closes are resets and leave no TIME_WAIT behind. `--udp ADDR` adds
//! about `--udp-per-s` random datagrams a second to that address (garbage on a DNS port).
//!
//! The same attack was a Python selector thread in run.py until 2026-12-01; at about 2,200 new
//! connections a second that thread used 0.5 to 0.8 of a core in the interpreter, on the two
//! cores whose CPU bounds the honest throughput being measured. Here it is one thread of tokio:
//! 0.13 of a core for slowloris (2,100 new connections a second), 0.2 for the connection flood
//! (5,600 a second), most of it the kernel's loopback handshakes.
//!
//! After `--secs`, or at SIGTERM, it prints one JSON object: per listener `max_held`, `open`,
//! `opened`, `connected`, `refused`, `closed_by_server`, `bytes_sent`, and totals.
//!
//!     cargo build --release --example swarm
//!     swarm --mode trickle --per-target 400 --secs 20 \
//!         --target relay0/or,or,127.1.0.1:5000 --target proxy/socks,socks,127.0.0.1:9050

// A real-time load generator talking to real sockets: a driver (clock and sleeps allowed).
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// What each connection does once it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Connect and hold.
    Hold,
    /// One byte of a never-complete request every interval.
    Trickle,
    /// Random bytes as fast as the socket takes them.
    Garbage,
}

/// Many connections on TCP listeners (connection flood, slowloris, garbage).
#[derive(Parser, Debug)]
struct Args {
    /// `LABEL,KIND,ADDR`; KIND is one of or, dir, metrics, control, socks, http_tunnel.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Source address of every connection (the attacker's address).
    #[arg(long, default_value = "127.0.0.77")]
    source: IpAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Connections held open per listener.
    #[arg(long, default_value_t = 400)]
    per_target: u32,
    /// Trickle: seconds between two bytes of one connection.
    #[arg(long, default_value_t = 3.0)]
    interval: f64,
    /// New connections per listener per second, at most.
    #[arg(long, default_value_t = 500.0)]
    reopen_per_s: f64,
    /// How long to run, seconds.
    #[arg(long, default_value_t = 20.0)]
    secs: f64,
    /// Also send random datagrams to this UDP address.
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Datagrams a second with `--udp`.
    #[arg(long, default_value_t = 2000.0)]
    udp_per_s: f64,
}

/// Counters of one listener.
#[derive(Default)]
struct Stats {
    open: AtomicU64,
    max_held: AtomicU64,
    opened: AtomicU64,
    connected: AtomicU64,
    refused: AtomicU64,
    closed_by_server: AtomicU64,
    bytes_sent: AtomicU64,
}

struct Target {
    label: String,
    kind: String,
    addr: SocketAddr,
    stats: Stats,
    /// Reopen budget: one permit per new connection, refilled by [`refill`].
    tokens: Semaphore,
}

/// Refill every listener's reopen budget: `rate` permits a second, at most `cap` waiting. (A
/// semaphore, so the thousands of slots that wait for a permit sleep instead of polling a clock.)
async fn refill(targets: Vec<Arc<Target>>, rate: f64, cap: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut owed = 0.0f64;
    loop {
        tick.tick().await;
        let now = Instant::now();
        owed += now.saturating_duration_since(last).as_secs_f64() * rate;
        last = now;
        let whole = owed.floor();
        owed -= whole;
        for t in &targets {
            let room = cap.saturating_sub(t.tokens.available_permits());
            t.tokens.add_permits((whole as usize).min(room));
        }
    }
}

/// What a slowloris sends on a listener of this kind, one byte at a time (never complete).
fn slow_prefix(kind: &str) -> Vec<u8> {
    let mut v = Vec::new();
    match kind {
        "metrics" | "dir" => v.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "),
        "http_tunnel" => {
            v.extend_from_slice(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        }
        "socks" => {
            // Greeting offering 255 methods, then a CONNECT to a 255-byte name, never finished.
            v.extend_from_slice(&[0x05, 0xff]);
            v.extend(0..=254u8);
            v.extend_from_slice(&[0x05, 0x01, 0x00, 0x03, 0xff]);
            v.resize(v.len() + 255, b'a');
            return v;
        }
        "control" => v.extend_from_slice(b"PROTOCOLINFO "),
        // OR: a Noise message-1 length prefix (96 bytes), then the message byte by byte.
        _ => {
            v.extend_from_slice(&[0x00, 0x60]);
            v.resize(2 + 96, 0x11);
            for _ in 0..50_000 {
                v.extend_from_slice(&[0x00, 0x60]);
            }
            return v;
        }
    }
    let fill = if kind == "control" { b'1' } else { b'a' };
    v.resize(v.len() + 100_000, fill);
    v
}

/// splitmix64: jitter and garbage bytes need no cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

async fn connect(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(source, 0))?;
    let s = tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    // Resets on close: the tool leaves no TIME_WAIT behind.
    s.set_zero_linger()?;
    Ok(s)
}

/// One connection slot: open, attack until the server closes, count, open again.
async fn slot(t: Arc<Target>, a: Arc<Args>, prefix: Arc<Vec<u8>>, junk: Arc<Vec<u8>>, id: u64) {
    let mut rng = Rng(seed() ^ id.wrapping_mul(0x2545_f491_4f6c_dd1d));
    loop {
        // Wait for the listener's reopen budget.
        match t.tokens.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
        t.stats.opened.fetch_add(1, Ordering::Relaxed);
        let held = t.stats.open.fetch_add(1, Ordering::Relaxed) + 1;
        t.stats.max_held.fetch_max(held, Ordering::Relaxed);
        match connect(a.source, t.addr).await {
            Ok(s) => {
                t.stats.connected.fetch_add(1, Ordering::Relaxed);
                run_conn(s, &t, &a, &prefix, &junk, &mut rng).await;
                t.stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                t.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        t.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Attack one open connection until the server closes it (or it fails).
async fn run_conn(s: TcpStream, t: &Target, a: &Args, prefix: &[u8], junk: &[u8], rng: &mut Rng) {
    let (mut rd, mut wr) = s.into_split();
    let mut buf = vec![0u8; 4096];
    let mut off = 0usize;
    loop {
        match a.mode {
            Mode::Hold => match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            Mode::Trickle => {
                let wait = Duration::from_secs_f64(a.interval * rng.range_f64(0.8, 1.2));
                tokio::select! {
                    r = rd.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    () = tokio::time::sleep(wait) => {
                        let b = prefix[off % prefix.len()];
                        if wr.write_all(&[b]).await.is_err() {
                            return;
                        }
                        off += 1;
                        t.stats.bytes_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Mode::Garbage => {
                let start = (rng.next() as usize) % (junk.len() - 65_536);
                tokio::select! {
                    r = rd.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    r = wr.write(&junk[start..start + 65_536]) => match r {
                        Ok(n) => {
                            t.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

/// Random datagrams, `per_s` a second, 1 to 512 bytes each.
async fn udp_garbage(
    source: IpAddr,
    to: SocketAddr,
    per_s: f64,
    junk: Arc<Vec<u8>>,
    sent: Arc<AtomicU64>,
) {
    let Ok(sock) = UdpSocket::bind(SocketAddr::new(source, 0)).await else {
        return;
    };
    let mut rng = Rng(seed());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (per_s / 100.0).max(1.0) as usize;
    loop {
        tick.tick().await;
        for _ in 0..per_tick {
            let len = 1 + (rng.next() as usize) % 512;
            let start = (rng.next() as usize) % (junk.len() - 512);
            if sock.send_to(&junk[start..start + len], to).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn parse_target(s: &str) -> Result<(String, String, SocketAddr), String> {
    let mut it = s.splitn(3, ',');
    let (Some(label), Some(kind), Some(addr)) = (it.next(), it.next(), it.next()) else {
        return Err(format!("--target {s:?}: expected LABEL,KIND,ADDR"));
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("--target {s:?}: bad address: {e}"))?;
    Ok((label.to_owned(), kind.to_owned(), addr))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let a = Arc::new(Args::parse());
    let mut targets = Vec::new();
    for s in &a.targets {
        let (label, kind, addr) = parse_target(s)?;
        targets.push(Arc::new(Target {
            label,
            kind,
            addr,
            stats: Stats::default(),
            tokens: Semaphore::new(a.per_target as usize),
        }));
    }
    let mut rng = Rng(seed());
    let junk: Arc<Vec<u8>> = Arc::new(
        (0..1 << 20)
            .map(|_| (rng.next() >> 56) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(refill(
        targets.clone(),
        a.reopen_per_s,
        a.per_target as usize,
    ));
    let mut id = 0u64;
    for t in &targets {
        let prefix = Arc::new(slow_prefix(&t.kind));
        for _ in 0..a.per_target {
            id += 1;
            tasks.spawn(slot(t.clone(), a.clone(), prefix.clone(), junk.clone(), id));
        }
    }
    let datagrams = Arc::new(AtomicU64::new(0));
    let udp = a.udp.map(|to| {
        tokio::spawn(udp_garbage(
            a.source,
            to,
            a.udp_per_s,
            junk.clone(),
            datagrams.clone(),
        ))
    });
    // Until --secs have passed or SIGTERM (run.py's stop), whichever comes first.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs_f64(a.secs)) => {}
        _ = term.recv() => {}
    }
    // Counters first, then drop every socket (resets).
    let mut listeners = serde_json::Map::new();
    let (mut held_end, mut held_max) = (0, 0);
    for t in &targets {
        let s = &t.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        held_end += g(&s.open);
        held_max += g(&s.max_held);
        listeners.insert(
            t.label.clone(),
            serde_json::json!({
                "max_held": g(&s.max_held),
                "open": g(&s.open),
                "opened": g(&s.opened),
                "connected": g(&s.connected),
                "refused": g(&s.refused),
                "closed_by_server": g(&s.closed_by_server),
                "bytes_sent": g(&s.bytes_sent),
            }),
        );
    }
    tasks.abort_all();
    if let Some(h) = udp {
        h.abort();
    }
    let out = serde_json::json!({
        "tool": "swarm",
        "mode": format!("{:?}", a.mode).to_lowercase(),
        "per_target": a.per_target,
        "secs": a.secs,
        "listeners": listeners,
        "held_at_end_total": held_end,
        "max_held_total": held_max,
        "dns_datagrams": datagrams.load(Ordering::Relaxed),
    });
    println!("{out}");
    Ok(())
}
