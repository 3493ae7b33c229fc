//! Introduction and rendezvous points in the running relay: the cross-circuit wiring the circuit
//! cores ask for with their onion-service events (`relay/src/core/{intro,rendezvous}.rs` decide;
//! this module and the reactor deliver). `tests/src/sim.rs`'s `Overlay` is the same wiring in
//! simulated time.
//!
//! - [`HsState`] (in [`crate::ctx::Ctx`]) holds the relay's one introduction registry and one
//!   rendezvous table, each behind a mutex held only for a table operation (never across an
//!   await), with the limits of the sans-IO tables (bounded, expiring).
//! - Each circuit that takes an onion-service role gets a [`PeerHandle`]: a bounded queue
//!   ([`PEER_QUEUE`] messages) into its own reactor, plus a close signal. Every circuit keeps its
//!   one owner: other reactors only ever send it [`PeerMsg`]s.
//! - INTRODUCE2 is handed to the introduction circuit's queue with `try_send`: a full queue
//!   answers the client CANT_RELAY (a service that does not keep up is not waited for).
//! - Joined circuits send each other their cells through the same queues. A full peer queue
//!   stops the sender from reading its own inbound queue until there is room (back-pressure
//!   towards the client or service, never a growing queue); the stall counts towards the
//!   circuit's blocked cap like a full link. The queue's receiver is dropped when its reactor
//!   ends, which the peer sees (`Sender::closed`) and answers by destroying its own circuit:
//!   DESTROY of one tears down the other.
//! - A joined pair is counted once in the table while a [`PairGuard`] lives (one clone on each
//!   side); the last one dropped uncounts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use allium_proto::cell::Cell;
use allium_proto::relaymsg::Introduce;
use tokio::sync::{Notify, mpsc};

use crate::core::intro::{self, CircKey, IntroRegistry};
use crate::core::rendezvous::{self, RendezvousTable};

/// Capacity of a circuit's queue of messages from other circuits (joined cells, INTRODUCE2).
pub const PEER_QUEUE: usize = 64;

/// A message from another circuit at this relay.
#[derive(Debug)]
pub(crate) enum PeerMsg {
    /// For an introduction circuit: send this INTRODUCE2 to the service.
    Introduce2(Introduce),
    /// For a circuit waiting under a cookie: the service's RENDEZVOUS1 took it. Send RENDEZVOUS2
    /// with `handshake_info` and join `peer`.
    Join {
        /// The service's handshake half.
        handshake_info: Vec<u8>,
        /// The service circuit's handle.
        peer: PeerHandle,
        /// The pair's count in the table.
        pair: Arc<PairGuard>,
    },
    /// For a joined circuit: a cell from the peer (this relay's layer of the peer removed).
    Cell(Cell),
}

/// How other reactors reach a circuit's reactor.
#[derive(Clone, Debug)]
pub(crate) struct PeerHandle {
    /// The circuit's key in the tables.
    pub(crate) key: CircKey,
    /// Its queue of messages from other circuits.
    pub(crate) tx: mpsc::Sender<PeerMsg>,
    /// Close it (a replaced introduction circuit, an expired waiting circuit).
    pub(crate) close: Arc<Notify>,
}

/// The receiving side of a circuit's [`PeerHandle`] (its reactor's).
#[derive(Debug)]
pub(crate) struct PeerInbox {
    /// Messages from other circuits.
    pub(crate) rx: mpsc::Receiver<PeerMsg>,
    /// Our own handle, to hand to the tables and peers.
    pub(crate) handle: PeerHandle,
}

/// Keeps a joined pair counted in the rendezvous table; the last clone dropped uncounts it.
#[derive(Debug)]
pub(crate) struct PairGuard {
    hs: Arc<HsState>,
}

impl Drop for PairGuard {
    fn drop(&mut self) {
        self.hs.rend().unjoin();
    }
}

/// The relay's introduction registry and rendezvous table.
#[derive(Debug)]
pub struct HsState {
    intro: Mutex<IntroRegistry<PeerHandle>>,
    rend: Mutex<RendezvousTable<PeerHandle>>,
    next_key: AtomicU64,
    registrations_total: AtomicU64,
    joins_total: AtomicU64,
}

/// A snapshot of the onion-service counters (for `/metrics` and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HsCounts {
    /// Introduction circuits registered now.
    pub intro_registrations: u64,
    /// ESTABLISH_INTROs accepted since start.
    pub intro_registrations_total: u64,
    /// INTRODUCE1s refused as replays since start.
    pub introduce_replays_refused: u64,
    /// Circuits waiting under a rendezvous cookie now.
    pub rend_waiting: u64,
    /// Joined circuit pairs now.
    pub rend_joined: u64,
    /// Circuit pairs joined since start.
    pub rend_joins_total: u64,
}

/// The limits of [`HsState`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct HsLimits {
    pub(crate) max_registrations: usize,
    pub(crate) replay_max: usize,
    pub(crate) replay_ttl: Duration,
    pub(crate) max_waiting: usize,
    pub(crate) wait_ttl: Duration,
    pub(crate) max_joined: usize,
}

impl Default for HsLimits {
    fn default() -> Self {
        Self {
            max_registrations: intro::MAX_INTRO_REGISTRATIONS,
            replay_max: intro::REPLAY_CACHE_PER_KEY,
            replay_ttl: intro::REPLAY_TTL,
            max_waiting: rendezvous::MAX_WAITING_COOKIES,
            wait_ttl: rendezvous::REND_WAIT_TTL,
            max_joined: rendezvous::MAX_JOINED,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HsState {
    pub(crate) fn new(l: HsLimits) -> Self {
        Self {
            intro: Mutex::new(IntroRegistry::new(
                l.max_registrations,
                l.replay_max,
                l.replay_ttl,
            )),
            rend: Mutex::new(RendezvousTable::new(
                l.max_waiting,
                l.wait_ttl,
                l.max_joined,
            )),
            next_key: AtomicU64::new(1),
            registrations_total: AtomicU64::new(0),
            joins_total: AtomicU64::new(0),
        }
    }

    fn rend(&self) -> MutexGuard<'_, RendezvousTable<PeerHandle>> {
        lock(&self.rend)
    }

    /// A fresh queue for a circuit taking an onion-service role.
    pub(crate) fn inbox(&self) -> PeerInbox {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let close = Arc::new(Notify::new());
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        PeerInbox {
            rx,
            handle: PeerHandle { key, tx, close },
        }
    }

    /// ESTABLISH_INTRO verified on the circuit of `handle`: register it. A replaced circuit is
    /// told to close. `false`: refused (registry full).
    pub(crate) fn register_intro(
        &self,
        auth_key: allium_crypto::RelayId,
        handle: &PeerHandle,
    ) -> bool {
        let r = lock(&self.intro).register(auth_key, handle.key, handle.clone());
        match r {
            Ok(old) => {
                if let Some((_, old)) = old {
                    old.close.notify_one();
                }
                self.registrations_total.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// INTRODUCE1 from a client: hand INTRODUCE2 to the registered circuit; the status for the
    /// client's INTRODUCE_ACK.
    pub(crate) fn introduce(
        &self,
        msg: Introduce,
        now: Instant,
    ) -> allium_proto::relaymsg::IntroduceStatus {
        use allium_proto::relaymsg::IntroduceStatus;
        let target = lock(&self.intro).introduce(&msg, now);
        match target {
            Ok(h) => match h.tx.try_send(PeerMsg::Introduce2(msg)) {
                Ok(()) => IntroduceStatus::SUCCESS,
                Err(_) => IntroduceStatus::CANT_RELAY,
            },
            Err(status) => status,
        }
    }

    /// ESTABLISH_RENDEZVOUS on the circuit of `handle`: wait under `cookie`. `false`: refused.
    pub(crate) fn establish_rendezvous(
        &self,
        cookie: allium_proto::relaymsg::RendCookie,
        handle: &PeerHandle,
        now: Instant,
    ) -> bool {
        let mut t = self.rend();
        // Waiting circuits past their time leave first (their reactors close them too, at
        // their own deadline; this keeps the table's room honest in between).
        for (_, h) in t.expire(now) {
            h.close.notify_one();
        }
        t.establish(cookie, handle.key, handle.clone(), now).is_ok()
    }

    /// RENDEZVOUS1 on the service circuit of `own`: take the circuit waiting under `cookie`
    /// and send it the join. The peer's handle and the pair guard to keep, or `None`: refused.
    pub(crate) fn rendezvous1(
        self: &Arc<Self>,
        cookie: &allium_proto::relaymsg::RendCookie,
        handshake_info: Vec<u8>,
        own: &PeerHandle,
        now: Instant,
    ) -> Option<(PeerHandle, Arc<PairGuard>)> {
        let taken = self.rend().take(cookie, now);
        let (_, waiting) = taken.ok()?;
        // Counted by `take`; from here the guard uncounts it, whatever happens.
        let pair = Arc::new(PairGuard {
            hs: Arc::clone(self),
        });
        let join = PeerMsg::Join {
            handshake_info,
            peer: own.clone(),
            pair: Arc::clone(&pair),
        };
        waiting.tx.try_send(join).ok()?;
        self.joins_total.fetch_add(1, Ordering::Relaxed);
        Some((waiting, pair))
    }

    /// The circuit with `key` ended: it leaves both tables.
    pub(crate) fn remove_circuit(&self, key: CircKey) {
        lock(&self.intro).remove_circuit(key);
        self.rend().remove_circuit(key);
    }

    /// The counters now.
    pub fn counts(&self) -> HsCounts {
        let (regs, replays) = {
            let i = lock(&self.intro);
            (i.registrations() as u64, i.replays_refused())
        };
        let (waiting, joined) = {
            let r = self.rend();
            (r.waiting() as u64, r.joined() as u64)
        };
        HsCounts {
            intro_registrations: regs,
            intro_registrations_total: self.registrations_total.load(Ordering::Relaxed),
            introduce_replays_refused: replays,
            rend_waiting: waiting,
            rend_joined: joined,
            rend_joins_total: self.joins_total.load(Ordering::Relaxed),
        }
    }

    /// How long a circuit may wait under a cookie.
    pub(crate) fn wait_ttl(&self) -> Duration {
        self.rend().wait_ttl()
    }
}

impl crate::RelayHandle {
    /// The onion-service counters of this relay (introduction registrations, waiting and
    /// joined rendezvous circuits, refused INTRODUCE replays).
    pub fn hs_counts(&self) -> HsCounts {
        self.ctx.hs.counts()
    }
}
