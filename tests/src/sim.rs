//! A deterministic in-memory network for circuit tests: the real client circuit core
//! ([`allium_client::core::ClientCircuit`]) against real relay circuit cores
//! ([`allium_relay::core::CircuitCore`]), wired by FIFO links with a one-way latency, driven by a
//! simulated clock (quinn-proto's `Pair`, for onion circuits). No sockets, no tasks, no sleeps,
//! no wall clock: a test is a pure function of its inputs, so it runs the same on a loaded machine.
//!
//! The harness plays every driver's part: it carries cells between the cores in the order they
//! were polled (so ratchet order holds), answers `ExtendTo` by running the real CREATE answerer on
//! the next relay, answers `OpenStream`/`Resolve` with in-memory destinations, and reports the
//! data each side consumed so SENDMEs flow. A test can tamper with, drop or replay cells on any
//! link ([`Net::tamper`]), make relays unreachable, or stop the client application reading.
//!
//! ```text
//!   client ──link 0── hop 0 (guard) ──link 1── hop 1 (middle) ──link 2── hop 2 (exit) ── destinations
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_client::core::{
    CircParams, ClientCircuit, Event as ClientEvent, HopTarget, StreamId, StreamTarget,
};
use allium_crypto::{IdentityKeypair, RelayId, X25519Secret};
use allium_proto::cell::{Cell, CellCmd, CircId, DestroyReason};
use allium_proto::relaymsg::EndReason;
use allium_proto::relaymsg::IntroduceStatus;
use allium_relay::ExitPolicy;
use allium_relay::core::intro::{self, IntroRegistry};
use allium_relay::core::rendezvous::{self, RendezvousTable};
use allium_relay::core::{
    CircError, CircuitCore, CoreConfig, Event as RelayEvent, ResolveFailure, Side,
    answer_create_body,
};

/// Port of the in-memory echo destination (RFC 862's port).
pub const ECHO_PORT: u16 = 7;
/// Port of the in-memory discard destination: it reads everything and sends nothing.
pub const DISCARD_PORT: u16 = 9;
/// Port of the in-memory source: it sends [`Net::source_len`] bytes of [`pattern`], then EOF.
pub const SOURCE_PORT: u16 = 19;
/// A port on which every connection is refused.
pub const REFUSED_PORT: u16 = 1;

/// Byte `i` of the data the source destination sends (not periodic in a cell or a window, so a
/// dropped, duplicated or reordered cell changes the bytes).
pub fn pattern(i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i / 997) as u8
}

/// `len` bytes of [`pattern`].
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

/// A relay of the simulated network: its keys and address, no state.
pub struct SimRelay {
    /// Its identity.
    pub id: RelayId,
    onion: X25519Secret,
    /// Its (fictitious) OR address.
    pub addr: SocketAddr,
    /// Its exit policy (private addresses allowed: destinations are on 10.0.0.0/8).
    pub policy: Arc<ExitPolicy>,
}

impl SimRelay {
    /// Relay number `n`; an exit accepts every port.
    pub fn new(n: u8, exit: bool) -> Self {
        let id = IdentityKeypair::from_seed(&[n; 32]).public();
        let onion = X25519Secret::from_bytes([n.wrapping_add(100); 32]);
        let policy = if exit {
            ExitPolicy::accept_all(true)
        } else {
            ExitPolicy::default()
        };
        Self {
            id,
            onion,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, n, 0, 1)), 9001),
            policy: Arc::new(policy),
        }
    }

    /// What a client needs to add this relay to a circuit.
    pub fn target(&self) -> HopTarget {
        HopTarget::new(self.id, self.onion.public(), &[self.addr])
    }
}

/// A place a cell in flight is going to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The client.
    Client,
    /// Hop `hop` of the circuit, arriving from `from`.
    Hop {
        /// Index along the path (0 = guard).
        hop: usize,
        /// The side it arrives on.
        from: Side,
    },
    /// A CREATE on its way to relay `relay` (index in [`Net::relays`]), to become hop `hop`.
    Create {
        /// The relay.
        relay: usize,
        /// The hop it will be.
        hop: usize,
    },
}

impl Dest {
    /// The link (0 = client–guard, i = hop i-1 – hop i) this destination is reached over.
    pub fn link(self) -> usize {
        match self {
            Self::Client => 0,
            Self::Hop {
                hop,
                from: Side::Prev,
            } => hop,
            Self::Hop {
                hop,
                from: Side::Next,
            } => hop + 1,
            Self::Create { hop, .. } => hop,
        }
    }
}

/// What a tamper hook does with a cell in flight.
#[derive(Debug)]
pub enum Tamper {
    /// Deliver it as it is now (the hook may have changed it).
    Deliver,
    /// Drop it.
    Drop,
    /// Deliver it twice (a replay).
    Duplicate,
}

type TamperFn = Box<dyn FnMut(Dest, &mut Cell) -> Tamper>;

/// One stream at the exit's destination.
#[derive(Debug, Default)]
pub struct Destination {
    /// Port it was opened to.
    pub port: u16,
    /// Bytes the destination received.
    pub received: Vec<u8>,
    /// Bytes still to send towards the client.
    pending: Vec<u8>,
    /// Bytes of the source already handed out (source streams).
    source_sent: usize,
    /// The client finished sending (END DONE reached the exit).
    pub got_eof: bool,
    /// EOF reported to the exit core.
    eof_reported: bool,
    /// The stream is gone from the exit's table.
    pub closed: bool,
}

/// The simulated network around one circuit.
pub struct Net {
    /// Simulated time.
    pub now: Instant,
    /// The client's circuit.
    pub client: ClientCircuit,
    /// Every relay known (the path and any extra ones), by index.
    pub relays: Vec<SimRelay>,
    /// The cores of the hops built so far, guard first.
    pub hops: Vec<CircuitCore>,
    /// One-way latency of each link.
    pub latency: Duration,
    /// Cells in flight, by (arrival time, sequence number).
    wire: BTreeMap<(Instant, u64), (Dest, Cell)>,
    seq: u64,
    /// Relays an EXTEND cannot reach.
    pub unreachable: HashSet<RelayId>,
    /// Names the exit's resolver knows.
    pub names: HashMap<String, Vec<IpAddr>>,
    /// How many bytes a [`SOURCE_PORT`] destination sends.
    pub source_len: usize,
    /// Whether the client application reads delivered data (else it piles up, unconsumed).
    pub client_reads: bool,
    /// Data delivered to the client per stream.
    pub received: HashMap<StreamId, Vec<u8>>,
    /// Data cells delivered but not consumed while `client_reads` was off.
    unconsumed: HashMap<StreamId, usize>,
    /// Bytes the client application still wants to send per stream.
    uploads: HashMap<StreamId, Vec<u8>>,
    /// Client events other than data, in order.
    pub client_events: Vec<ClientEvent>,
    /// Relay events of interest (destruction, closed streams), with the hop index.
    pub relay_log: Vec<(usize, String)>,
    /// Destroy reasons each hop sent, by hop.
    pub destroyed: HashMap<usize, DestroyReason>,
    /// The exit's destinations by (hop, stream id).
    pub destinations: HashMap<(usize, u16), Destination>,
    /// Cells delivered per link (0 = client–guard).
    pub cells_on_link: Vec<u64>,
    tamper: Option<TamperFn>,
    /// The client stopped reading its link: cells for it are held, and the guard is told its
    /// link is blocked.
    frozen_client: bool,
    /// Per-cell transmission time of a link (by link index), both directions separately: a
    /// bottleneck. Links not listed have unlimited rate.
    pub link_cell_time: HashMap<usize, Duration>,
    /// When each (link, towards-the-client) direction finishes sending what it was given.
    busy_until: HashMap<(usize, bool), Instant>,
    /// Time the exit's destinations take to accept a connection.
    pub connect_delay: Duration,
    /// Connections in progress: (when they complete, hop, stream id, address).
    connecting: Vec<(Instant, usize, u16, SocketAddr)>,
    /// When each exit stream was reported connected (by (hop, stream id)).
    pub connected_at: HashMap<(usize, u16), Instant>,
    /// When the first byte of each exit stream reached its destination.
    pub first_byte_at: HashMap<(usize, u16), Instant>,
    /// Cells held for a frozen client.
    pub held: Vec<Cell>,
    /// Onion-service events of the hops (introduction and rendezvous requests, cells for a
    /// joined circuit), with the hop index, for an [`Overlay`] to act on.
    pub hs_events: Vec<(usize, RelayEvent)>,
}

impl Net {
    /// A network of `n_relays` relays (the last one an exit) and a client circuit that starts to
    /// build along all of them, one-way link latency `latency`.
    pub fn new(n_relays: u8, latency: Duration) -> Self {
        Self::with_params(n_relays, latency, CircParams::default())
    }

    /// As [`Net::new`], with the client's circuit parameters.
    pub fn with_params(n_relays: u8, latency: Duration, params: CircParams) -> Self {
        let relays: Vec<SimRelay> = (1..=n_relays)
            .map(|n| SimRelay::new(n, n == n_relays))
            .collect();
        let path = relays.iter().map(SimRelay::target).collect();
        // The epoch of simulated time: only differences from it matter, and nothing after this
        // reads the clock.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let id = CircId::new(0x8000_0001).expect("non-zero id");
        let client = ClientCircuit::build(id, path, params, now).expect("circuit start");
        let mut names = HashMap::new();
        names.insert(
            "dest.example".to_owned(),
            vec![IpAddr::V4(Ipv4Addr::new(10, 99, 0, 7))],
        );
        Self {
            now,
            client,
            relays,
            hops: Vec::new(),
            latency,
            wire: BTreeMap::new(),
            seq: 0,
            unreachable: HashSet::new(),
            names,
            source_len: 0,
            client_reads: true,
            received: HashMap::new(),
            unconsumed: HashMap::new(),
            uploads: HashMap::new(),
            client_events: Vec::new(),
            relay_log: Vec::new(),
            destroyed: HashMap::new(),
            destinations: HashMap::new(),
            cells_on_link: vec![0; usize::from(n_relays) + 1],
            tamper: None,
            frozen_client: false,
            held: Vec::new(),
            link_cell_time: HashMap::new(),
            busy_until: HashMap::new(),
            connect_delay: Duration::ZERO,
            connecting: Vec::new(),
            connected_at: HashMap::new(),
            first_byte_at: HashMap::new(),
            hs_events: Vec::new(),
        }
    }

    /// Install a hook that sees (and may alter, drop or duplicate) every cell before delivery.
    pub fn tamper(&mut self, f: impl FnMut(Dest, &mut Cell) -> Tamper + 'static) {
        self.tamper = Some(Box::new(f));
    }

    /// The client stops reading its link to the guard (its process froze): from now on cells for
    /// it stay queued, and the guard's driver reports its link to the client as blocked.
    pub fn freeze_client_link(&mut self) {
        self.frozen_client = true;
        let now = self.now;
        if let Some(guard) = self.hops.first_mut() {
            guard.note_blocked(now);
        }
    }

    /// Remove the tamper hook.
    pub fn untamper(&mut self) {
        self.tamper = None;
    }

    fn send(&mut self, dest: Dest, cell: Cell) {
        self.seq += 1;
        let link = dest.link();
        let backward = matches!(
            dest,
            Dest::Client
                | Dest::Hop {
                    from: Side::Next,
                    ..
                }
        );
        let busy = self.busy_until.get(&(link, backward)).copied();
        let start = busy.map_or(self.now, |b| b.max(self.now));
        let sent = match self.link_cell_time.get(&link) {
            Some(t) => start + *t,
            None => start,
        };
        if busy.is_some() || self.link_cell_time.contains_key(&link) {
            self.busy_until.insert((link, backward), sent);
        }
        self.wire
            .insert((sent + self.latency, self.seq), (dest, cell));
    }

    /// Stall link `link` (both directions) for `d` from now: nothing it is given leaves it
    /// before then, and what is in flight on it waits too (a route flap, a frozen relay).
    pub fn stall_link(&mut self, link: usize, d: Duration) {
        let until = self.now + d;
        for backward in [false, true] {
            let b = self.busy_until.entry((link, backward)).or_insert(until);
            *b = (*b).max(until);
        }
        let moved: Vec<(Instant, u64)> = self
            .wire
            .iter()
            .filter(|(_, (dest, _))| dest.link() == link)
            .map(|(k, _)| *k)
            .collect();
        for k in moved {
            if let Some(v) = self.wire.remove(&k) {
                self.wire.insert((k.0.max(until + self.latency), k.1), v);
            }
        }
    }

    /// Queue `data` for upload on `stream` (packaged as flow control allows).
    pub fn upload(&mut self, stream: StreamId, data: &[u8]) {
        self.uploads
            .entry(stream)
            .or_default()
            .extend_from_slice(data);
    }

    /// Open a stream to `host:port` on the built circuit.
    pub fn begin(&mut self, target: StreamTarget) -> StreamId {
        let now = self.now;
        self.client
            .begin_stream(&target, now)
            .expect("begin_stream on a built circuit")
    }

    /// Let the client application read everything it was given while it was not reading.
    pub fn resume_reading(&mut self) {
        self.client_reads = true;
        let pending: Vec<(StreamId, usize)> = self.unconsumed.drain().collect();
        let now = self.now;
        for (sid, cells) in pending {
            self.client.consumed(sid, cells, now);
        }
    }

    /// Process everything that is due at the current time, until nothing moves.
    pub fn drive(&mut self) {
        loop {
            let mut progress = false;
            progress |= self.poll_client();
            for i in 0..self.hops.len() {
                progress |= self.poll_hop(i);
            }
            progress |= self.finish_connects();
            progress |= self.feed_destinations();
            progress |= self.deliver_due();
            if !progress {
                break;
            }
        }
    }

    /// The next time something happens by itself: a cell arrives or a timer fires.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut t = self.wire.keys().next().map(|(t, _)| *t);
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.client.poll_timeout());
        consider(self.connecting.iter().map(|c| c.0).min());
        for h in &self.hops {
            consider(h.poll_timeout());
        }
        t
    }

    /// Drive, then advance the clock to the next wake-up and fire its timers; `false` when
    /// nothing is left to happen.
    pub fn step(&mut self) -> bool {
        self.drive();
        let Some(t) = self.next_wakeup() else {
            return false;
        };
        self.advance_to(t.max(self.now));
        true
    }

    /// Move the clock to `t` (not backwards) and fire every timer that is due.
    pub fn advance_to(&mut self, t: Instant) {
        self.now = self.now.max(t);
        let now = self.now;
        if self.client.poll_timeout().is_some_and(|d| d <= now) {
            self.client.handle_timeout(now);
        }
        for h in &mut self.hops {
            if h.poll_timeout().is_some_and(|d| d <= now) {
                h.handle_timeout(now);
            }
        }
        self.drive();
    }

    /// Advance the clock by `d`, processing everything that happens on the way.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        self.drive();
        while let Some(t) = self.next_wakeup() {
            if t > end {
                break;
            }
            self.advance_to(t.max(self.now));
        }
        self.advance_to(end);
    }

    /// Step until `done(self)` holds; panics after `limit` of simulated time.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let end = self.now + limit;
        self.drive();
        while !done(self) {
            assert!(
                self.now <= end,
                "condition not reached within {limit:?} of simulated time"
            );
            if !self.step() {
                assert!(
                    done(self),
                    "the network went idle before the condition held"
                );
                return;
            }
        }
    }

    /// Whether the client has seen [`ClientEvent::Built`].
    pub fn built(&self) -> bool {
        self.client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::Built))
    }

    /// Build the circuit (panics if it does not build within 10 s of simulated time).
    pub fn build(&mut self) {
        self.run_until(Duration::from_secs(10), Self::built);
    }

    fn poll_client(&mut self) -> bool {
        let mut progress = false;
        while let Some(cell) = self.client.poll_transmit() {
            progress = true;
            let dest = if self.hops.is_empty() && cell.cmd == CellCmd::CREATE {
                Dest::Create { relay: 0, hop: 0 }
            } else {
                Dest::Hop {
                    hop: 0,
                    from: Side::Prev,
                }
            };
            self.send(dest, cell);
        }
        let now = self.now;
        while let Some(ev) = self.client.poll_event() {
            progress = true;
            match ev {
                ClientEvent::StreamData { stream, data } => {
                    self.received
                        .entry(stream)
                        .or_default()
                        .extend_from_slice(data.bytes());
                    if self.client_reads {
                        self.client.consumed(stream, 1, now);
                    } else {
                        *self.unconsumed.entry(stream).or_default() += 1;
                    }
                }
                other => self.client_events.push(other),
            }
        }
        // Uploads, as far as flow control allows.
        let sids: Vec<StreamId> = self.uploads.keys().copied().collect();
        for sid in sids {
            let Some(buf) = self.uploads.get_mut(&sid) else {
                continue;
            };
            if buf.is_empty() {
                continue;
            }
            let n = self.client.package(sid, buf, now);
            if n > 0 {
                buf.drain(..n);
                progress = true;
            }
        }
        progress
    }

    fn poll_hop(&mut self, i: usize) -> bool {
        let mut progress = false;
        let now = self.now;
        while let Some((side, mut cell)) = self.hops[i].poll_transmit() {
            progress = true;
            match side {
                Side::Prev => {
                    if i == 0 {
                        cell.circ_id = Some(self.client.id());
                        self.send(Dest::Client, cell);
                    } else {
                        self.send(
                            Dest::Hop {
                                hop: i - 1,
                                from: Side::Next,
                            },
                            cell,
                        );
                    }
                }
                Side::Next => {
                    if i + 1 < self.hops.len() {
                        self.send(
                            Dest::Hop {
                                hop: i + 1,
                                from: Side::Prev,
                            },
                            cell,
                        );
                    }
                    // No next hop yet: the driver has no id on that side and drops the cell.
                }
            }
        }
        while let Some(ev) = self.hops[i].poll_event() {
            progress = true;
            self.on_relay_event(i, ev, now);
        }
        progress
    }

    fn on_relay_event(&mut self, i: usize, ev: RelayEvent, now: Instant) {
        match ev {
            RelayEvent::ExtendTo { relay, create, .. } => {
                let target = self.relays.iter().position(|r| r.id == relay);
                match target {
                    Some(j) if !self.unreachable.contains(&relay) => {
                        let cid = CircId::new(0x8000_0100 + i as u32).expect("id");
                        let cell = Cell::create(cid, &create).expect("CREATE encodes");
                        self.send(
                            Dest::Create {
                                relay: j,
                                hop: i + 1,
                            },
                            cell,
                        );
                    }
                    _ => self.hops[i].extend_failed(DestroyReason::CONNECTFAILED, now),
                }
            }
            RelayEvent::OpenStream { sid, addrs } => {
                let port = addrs.first().map_or(0, SocketAddr::port);
                if port == REFUSED_PORT {
                    self.hops[i].stream_failed(sid, EndReason::CONNECTREFUSED, now);
                    return;
                }
                let Some(addr) = addrs.first().copied() else {
                    return;
                };
                self.connecting
                    .push((now + self.connect_delay, i, sid, addr));
            }
            RelayEvent::Resolve { sid, hostname } => {
                let answer = self
                    .names
                    .get(&hostname)
                    .cloned()
                    .ok_or(ResolveFailure::NotFound);
                self.hops[i].resolved(sid, answer, now);
            }
            RelayEvent::StreamData { sid, data } => {
                let bytes = data.bytes().to_vec();
                self.first_byte_at.entry((i, sid)).or_insert(now);
                if let Some(d) = self.destinations.get_mut(&(i, sid)) {
                    if d.port == ECHO_PORT {
                        d.pending.extend_from_slice(&bytes);
                    }
                    d.received.extend_from_slice(&bytes);
                }
                self.hops[i].data_consumed(sid, 1, now);
            }
            RelayEvent::StreamEnd { sid } => {
                if let Some(d) = self.destinations.get_mut(&(i, sid)) {
                    d.got_eof = true;
                }
            }
            RelayEvent::StreamClosed { sid, graceful } => {
                if let Some(d) = self.destinations.get_mut(&(i, sid)) {
                    d.closed = true;
                }
                self.relay_log
                    .push((i, format!("stream {sid} closed (graceful: {graceful})")));
            }
            RelayEvent::NextClosed => {
                self.relay_log.push((i, "next hop closed".to_owned()));
            }
            RelayEvent::Destroyed { reason } => {
                // The driver drops every destination connection of a destroyed circuit.
                for ((hop, _), d) in &mut self.destinations {
                    if *hop == i {
                        d.closed = true;
                    }
                }
                self.destroyed.insert(i, reason);
                self.relay_log
                    .push((i, format!("destroyed ({})", reason.name())));
            }
            ev @ (RelayEvent::EstablishIntro { .. }
            | RelayEvent::Introduce1 { .. }
            | RelayEvent::EstablishRendezvous { .. }
            | RelayEvent::Rendezvous1 { .. }
            | RelayEvent::JoinedCell { .. }) => self.hs_events.push((i, ev)),
            other => self.relay_log.push((i, format!("{other:?}"))),
        }
    }

    /// Complete the destination connections that are due.
    fn finish_connects(&mut self) -> bool {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.connecting.drain(..).partition(|c| c.0 <= now);
        self.connecting = later;
        let progress = !due.is_empty();
        for (_, i, sid, addr) in due {
            if i >= self.hops.len() {
                continue;
            }
            self.destinations.insert(
                (i, sid),
                Destination {
                    port: addr.port(),
                    ..Destination::default()
                },
            );
            self.connected_at.insert((i, sid), now);
            self.hops[i].stream_connected(sid, Some(addr), now);
        }
        progress
    }

    /// Hand the exit's destinations' bytes to its core, as far as flow control allows.
    fn feed_destinations(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        let keys: Vec<(usize, u16)> = self.destinations.keys().copied().collect();
        for (i, sid) in keys {
            let Some(d) = self.destinations.get_mut(&(i, sid)) else {
                continue;
            };
            if d.closed || i >= self.hops.len() {
                continue;
            }
            if d.port == SOURCE_PORT && d.pending.is_empty() && d.source_sent < self.source_len {
                // Whole cells' worth at a time, so every DATA cell but the last is full.
                let n =
                    (self.source_len - d.source_sent).min(70 * allium_crypto::relaycell::MAX_DATA);
                d.pending = (d.source_sent..d.source_sent + n).map(pattern).collect();
                d.source_sent += n;
            }
            if !d.pending.is_empty() {
                let n = self.hops[i].package(sid, &d.pending, now);
                if n > 0 {
                    d.pending.drain(..n);
                    progress = true;
                }
            }
            let finished_source = d.port == SOURCE_PORT && d.source_sent >= self.source_len;
            let finished_echo = d.port != SOURCE_PORT && d.got_eof;
            if d.pending.is_empty() && !d.eof_reported && (finished_source || finished_echo) {
                d.eof_reported = true;
                self.hops[i].stream_eof(sid, now);
                progress = true;
            }
        }
        progress
    }

    /// Deliver every cell whose arrival time has come, in order.
    fn deliver_due(&mut self) -> bool {
        let mut progress = false;
        while let Some(entry) = self.wire.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (dest, mut cell) = entry.remove();
            progress = true;
            let verdict = match &mut self.tamper {
                Some(f) => f(dest, &mut cell),
                None => Tamper::Deliver,
            };
            match verdict {
                Tamper::Drop => continue,
                Tamper::Deliver => self.deliver(dest, cell),
                Tamper::Duplicate => {
                    let copy = Cell {
                        circ_id: cell.circ_id,
                        cmd: cell.cmd,
                        body: cell.body.clone(),
                    };
                    self.deliver(dest, cell);
                    self.deliver(dest, copy);
                }
            }
        }
        progress
    }

    fn deliver(&mut self, dest: Dest, cell: Cell) {
        let now = self.now;
        if let Some(n) = self.cells_on_link.get_mut(dest.link()) {
            *n += 1;
        }
        match dest {
            Dest::Client if self.frozen_client => self.held.push(cell),
            Dest::Client => {
                let _ = self.client.handle_cell(cell, now);
            }
            Dest::Hop { hop, from } => {
                if let Some(core) = self.hops.get_mut(hop) {
                    let _ = core.handle_cell(from, cell, now);
                }
            }
            Dest::Create { relay, hop } => {
                let r = &self.relays[relay];
                // The guard's previous hop is the client; every other hop's is a relay.
                let cfg = CoreConfig::new(r.id, hop == 0, Arc::clone(&r.policy));
                let back = match hop.checked_sub(1) {
                    None => Dest::Client,
                    Some(prev) => Dest::Hop {
                        hop: prev,
                        from: Side::Next,
                    },
                };
                let cid = cell.circ_id.expect("a CREATE carries an id");
                match answer_create_body(&cell.body[..], &r.id, &[&r.onion], cfg) {
                    Ok((core, created)) => {
                        assert_eq!(self.hops.len(), hop, "one circuit, extended in order");
                        self.hops.push(core);
                        let reply = Cell::created(cid, &created).expect("CREATED encodes");
                        self.send(back, reply);
                    }
                    Err(e) => {
                        self.send(back, Cell::destroy(cid, e.wire_reason()));
                    }
                }
            }
        }
    }
}

/// Whether a cell carries a relay message (RELAY or RELAY_EARLY).
pub fn is_relay(cell: &Cell) -> bool {
    cell.cmd == CellCmd::RELAY || cell.cmd == CellCmd::RELAY_EARLY
}

/// Several simulated circuits whose last hops are the same relay (the circuits of [`Net::new`]
/// with the same relay count share relays, keys included), with that relay's introduction
/// registry and rendezvous table: the part of the relay's driver that wires circuits to each
/// other (`relay/src/reactor.rs` in the real relay). Circuit `k` is `nets[k]`; its handle and
/// circuit key in the tables is `k`. Cells for a joined circuit cross at once, in order.
pub struct Overlay {
    /// The circuits.
    pub nets: Vec<Net>,
    /// The last relay's introduction registry.
    pub intro: IntroRegistry<usize>,
    /// The last relay's rendezvous table.
    pub rend: RendezvousTable<usize>,
    /// Joined pairs, both ways.
    pub joined: HashMap<usize, usize>,
    /// Every cell that crossed a join, as the rendezvous relay saw it: (from circuit, body).
    pub crossed: Vec<(usize, Vec<u8>)>,
    /// Circuits whose closing the overlay already handled.
    closed: HashSet<usize>,
}

impl Overlay {
    /// `n` circuits of `hops` hops each (not built yet), with default limits.
    pub fn new(n: usize, hops: u8, latency: Duration) -> Self {
        Self::with_limits(
            n,
            hops,
            latency,
            IntroRegistry::new(
                intro::MAX_INTRO_REGISTRATIONS,
                intro::REPLAY_CACHE_PER_KEY,
                intro::REPLAY_TTL,
            ),
            RendezvousTable::new(
                rendezvous::MAX_WAITING_COOKIES,
                rendezvous::REND_WAIT_TTL,
                rendezvous::MAX_JOINED,
            ),
        )
    }

    /// As [`Overlay::new`] with the given tables.
    pub fn with_limits(
        n: usize,
        hops: u8,
        latency: Duration,
        intro: IntroRegistry<usize>,
        rend: RendezvousTable<usize>,
    ) -> Self {
        let nets: Vec<Net> = (0..n).map(|_| Net::new(hops, latency)).collect();
        // One clock for all.
        let now = nets.first().map(|n| n.now).expect("at least one circuit");
        let mut o = Self {
            nets,
            intro,
            rend,
            joined: HashMap::new(),
            crossed: Vec::new(),
            closed: HashSet::new(),
        };
        for n in &mut o.nets {
            n.now = now;
        }
        o
    }

    /// Build every circuit.
    pub fn build(&mut self) {
        self.run_until(Duration::from_secs(10), |o| o.nets.iter().all(Net::built));
    }

    /// Process everything due now, on every circuit and across them, until nothing moves.
    pub fn drive(&mut self) {
        loop {
            let mut progress = false;
            for n in &mut self.nets {
                n.drive();
            }
            for k in 0..self.nets.len() {
                let evs = std::mem::take(&mut self.nets[k].hs_events);
                for (hop, ev) in evs {
                    progress = true;
                    self.on_hs_event(k, hop, ev);
                }
            }
            progress |= self.propagate_closes();
            if !progress {
                break;
            }
        }
    }

    /// Drive, then step every circuit's clock to the earliest wake-up; `false` when idle.
    pub fn step(&mut self) -> bool {
        self.drive();
        let Some(t) = self.nets.iter().filter_map(Net::next_wakeup).min() else {
            return false;
        };
        let t = t.max(self.now());
        for n in &mut self.nets {
            n.advance_to(t);
        }
        true
    }

    /// The common clock.
    pub fn now(&self) -> Instant {
        self.nets
            .first()
            .map(|n| n.now)
            .expect("at least one circuit")
    }

    /// Step until `done(self)`; panics after `limit` of simulated time or when idle first.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let end = self.now() + limit;
        self.drive();
        while !done(self) {
            assert!(self.now() <= end, "not reached within {limit:?}");
            if !self.step() {
                assert!(
                    done(self),
                    "the network went idle before the condition held"
                );
                return;
            }
        }
    }

    /// The last hop (the shared relay) of circuit `k`.
    pub fn last(&mut self, k: usize) -> &mut CircuitCore {
        let n = &mut self.nets[k];
        let i = n.hops.len() - 1;
        &mut n.hops[i]
    }

    fn on_hs_event(&mut self, k: usize, hop: usize, ev: RelayEvent) {
        let now = self.now();
        match ev {
            RelayEvent::EstablishIntro { auth_key } => {
                let ok = match self.intro.register(auth_key, k as u64, k) {
                    Ok(Some((_, old))) => {
                        self.last(old).destroy(CircError::Local);
                        true
                    }
                    Ok(None) => true,
                    Err(_) => false,
                };
                self.nets[k].hops[hop].intro_registered(ok);
            }
            RelayEvent::Introduce1 { msg } => {
                let status = match self.intro.introduce(&msg, now) {
                    Ok(h) if self.last(h).send_introduce2(msg) => IntroduceStatus::SUCCESS,
                    Ok(_) => IntroduceStatus::CANT_RELAY,
                    Err(s) => s,
                };
                self.nets[k].hops[hop].introduce_acked(status);
            }
            RelayEvent::EstablishRendezvous { cookie } => {
                let ok = self.rend.establish(cookie, k as u64, k, now).is_ok();
                self.nets[k].hops[hop].rendezvous_registered(ok);
            }
            RelayEvent::Rendezvous1 {
                cookie,
                handshake_info,
            } => match self.rend.take(&cookie, now) {
                Ok((_, h)) if self.last(h).rendezvous_joined(handshake_info) => {
                    self.joined.insert(k, h);
                    self.joined.insert(h, k);
                    self.nets[k].hops[hop].rendezvous1_result(true);
                }
                Ok(_) => {
                    self.rend.unjoin();
                    self.nets[k].hops[hop].rendezvous1_result(false);
                }
                Err(_) => self.nets[k].hops[hop].rendezvous1_result(false),
            },
            RelayEvent::JoinedCell { cell } => {
                self.crossed.push((k, cell.body.to_vec()));
                if let Some(&other) = self.joined.get(&k) {
                    self.last(other).joined_cell(cell);
                }
            }
            other => self.nets[k].relay_log.push((hop, format!("{other:?}"))),
        }
    }

    /// A closed last hop leaves the tables; its joined partner is destroyed too.
    fn propagate_closes(&mut self) -> bool {
        let mut progress = false;
        for k in 0..self.nets.len() {
            let Some(last) = self.nets[k].hops.last() else {
                continue;
            };
            if !last.is_closed() || !self.closed.insert(k) {
                continue;
            }
            progress = true;
            self.intro.remove_circuit(k as u64);
            self.rend.remove_circuit(k as u64);
            if let Some(other) = self.joined.remove(&k) {
                self.joined.remove(&other);
                self.rend.unjoin();
                self.last(other).join_closed();
            }
        }
        progress
    }
}
