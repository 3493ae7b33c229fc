//! The service side, as a synchronous state machine (no I/O, no clock: `now` is an argument).
//!
//! Its driver builds circuits and carries messages; every decision is here:
//! - which introduction points are wanted ([`OnionService::intro_points_wanted`]: 3), their
//!   per-point auth and encryption keys, the ESTABLISH_INTRO for each, and what to do when one
//!   is lost (forget it: a new one with new keys is wanted);
//! - when a descriptor is due ([`OnionService::descriptor_due`]: the set of established
//!   points changed, or a new time period began) and its bytes for the current and the next
//!   period, with a revision that keeps growing across restarts (unix seconds);
//! - on INTRODUCE2 ([`OnionService::handle_introduce2`]): the auth key must be one of ours, the
//!   handshake must open under the subcredential of a period we publish for, the encrypted part
//!   must not have been seen before (replay cache per point; a full cache retires the point),
//!   then the RENDEZVOUS1 to send from a circuit to the client's rendezvous point and the keys of
//!   the end-to-end hop;
//! - for each incoming stream, the local target of its port ([`OnionService::target_for`]);
//! - with proof of work on ([`OnionService::enable_pow`], [`super::pow`]): the proof in each
//!   INTRODUCE2 ([`OnionService::handle_introduce2_pow`]), the effort-ordered queue of accepted
//!   introductions ([`OnionService::queue_introduce2`] in, [`OnionService::next_rendezvous`] out
//!   at the configured rate), and the seed and suggested effort the descriptor carries
//!   ([`OnionService::pow_tick`] once a second or so; a change makes a descriptor due).

use std::collections::{HashSet, VecDeque};

use allium_crypto::handshake::HopKeys;
use allium_crypto::hs::ntor::{self, IntroKeys};
use allium_crypto::hs::{
    BlindedKeypair, BlindedPublicKey, HsAddress, Subcredential, TimePeriod, TimePeriodParams,
};
use allium_crypto::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
use allium_directory::hs::{HsDescBuilder, HsDescContents, IntroPointInfo};
use allium_proto::relaymsg::{EstablishIntro, Introduce, RelayMsg, Rendezvous1};

use super::intro::{self, IntroPlaintext};
use super::ports::{self, PortMapping};
use super::pow::{IntroQueue, PowConfig, PowRefusal, PowSolution, PowVerifier, Pushed};
use crate::core::HopTarget;

/// Introduction points a service keeps (Tor's default).
pub const N_INTRO_POINTS: usize = 3;
/// Introductions one point accepts before it is retired (its replay cache is then full; a new
/// point with new keys replaces it, so no replay can slip past an evicted entry).
pub const MAX_INTRODUCTIONS_PER_POINT: usize = 16_384;
/// Descriptor lifetime at the HSDirs, in minutes (Tor's 180).
pub const DESC_LIFETIME_MINUTES: u16 = 180;
/// Re-upload at least this often even when nothing changed (seconds; Tor's 60-120 minutes).
pub const REUPLOAD_SECS: u64 = 3600;

/// A relay chosen as an introduction point: what the descriptor says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntroRelay {
    /// Its identity.
    pub id: RelayId,
    /// Its link (Noise static) key.
    pub link_key: X25519Public,
    /// Its ntor onion key.
    pub onion_key: X25519Public,
    /// Its link addresses (1 or 2).
    pub addrs: Vec<std::net::SocketAddr>,
}

/// Names one introduction point of a service (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntroId(pub u64);

struct IntroSlot {
    id: IntroId,
    relay: IntroRelay,
    auth: IdentityKeypair,
    enc: X25519Secret,
    established: bool,
    seen: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

/// One descriptor to upload.
#[derive(Clone, Debug)]
pub struct DescUpload {
    /// The period it is for.
    pub period: TimePeriod,
    /// The blinded key it is stored under (the ring position is computed from it).
    pub blinded: BlindedPublicKey,
    /// The signed, encrypted bytes.
    pub bytes: Vec<u8>,
}

/// What to do after an accepted INTRODUCE2: extend a circuit to `rend_point`, send `rendezvous1`
/// on it, then add the end-to-end hop with `keys` (role: service).
pub struct RendezvousTask {
    /// The client's rendezvous point.
    pub rend_point: HopTarget,
    /// RENDEZVOUS1 (cookie and handshake reply).
    pub rendezvous1: RelayMsg,
    /// Keys of the end-to-end hop.
    pub keys: HopKeys,
}

impl std::fmt::Debug for RendezvousTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RendezvousTask([redacted])")
    }
}

/// Why an INTRODUCE2 was refused (for logs and counters; nothing goes back to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntroRefusal {
    /// No such introduction point, or the auth key is not the point's.
    #[error("INTRODUCE2 for an unknown introduction point")]
    UnknownPoint,
    /// The handshake did not open (not for this service or period, altered, malformed).
    #[error("INTRODUCE2 did not decrypt")]
    BadHandshake,
    /// The same encrypted part was accepted before.
    #[error("INTRODUCE2 replayed")]
    Replay,
    /// The point's replay cache is full: the point is retired (close its circuit).
    #[error("introduction point retired after {MAX_INTRODUCTIONS_PER_POINT} introductions")]
    Retired,
    /// Proof of work is on and the INTRODUCE2's proof is invalid, stale or replayed.
    #[error("INTRODUCE2 refused: {0}")]
    Pow(PowRefusal),
    /// The introduction queue is full of introductions that paid more.
    #[error("INTRODUCE2 dropped: the introduction queue is full of higher efforts")]
    QueueFull,
}

/// An accepted INTRODUCE2: the rendezvous to do, and the effort its proof of work showed (0
/// without one, or with proof of work off).
#[derive(Debug)]
pub struct AcceptedIntro {
    /// What to do.
    pub task: RendezvousTask,
    /// The proven effort.
    pub effort: u32,
}

/// Proof-of-work state of a service that turned it on.
struct PowState {
    verifier: PowVerifier,
    /// The parameters in the last built descriptor.
    published: Option<allium_directory::hs::PowParams>,
}

/// One onion service's state.
pub struct OnionService {
    identity: IdentityKeypair,
    addr: HsAddress,
    ports: Vec<PortMapping>,
    auth_clients: Vec<X25519Public>,
    tp: TimePeriodParams,
    intros: Vec<IntroSlot>,
    next_id: u64,
    revision: u64,
    dirty: bool,
    published_period: Option<u64>,
    last_upload: Option<u64>,
    pow: Option<PowState>,
    queue: Option<IntroQueue<(IntroId, RendezvousTask)>>,
    queue_cfg: PowConfig,
}

impl std::fmt::Debug for OnionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnionService")
            .field("intro_points", &self.intros.len())
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl OnionService {
    /// A service with this identity, port map and authorised clients (empty: none required).
    pub fn new(
        identity: IdentityKeypair,
        ports: Vec<PortMapping>,
        auth_clients: Vec<X25519Public>,
        tp: TimePeriodParams,
    ) -> Result<Self, allium_crypto::hs::AddrError> {
        let addr = HsAddress::from_identity(&identity.public())?;
        Ok(Self {
            identity,
            addr,
            ports,
            auth_clients,
            tp,
            intros: Vec::new(),
            next_id: 1,
            revision: 0,
            dirty: true,
            published_period: None,
            last_upload: None,
            pow: None,
            queue: None,
            queue_cfg: PowConfig::default(),
        })
    }

    /// Turn proof of work on (the `pow = true` of its table) at `now_unix`, with the queue's
    /// rate and burst from `cfg`. The next descriptor carries the puzzle seed.
    pub fn enable_pow(&mut self, cfg: PowConfig, now_unix: u64) {
        self.queue_cfg = cfg;
        self.queue = None;
        self.pow = Some(PowState {
            verifier: PowVerifier::new(now_unix, &mut rand::rng()),
            published: None,
        });
        self.dirty = true;
    }

    /// Whether proof of work is on.
    pub fn pow_enabled(&self) -> bool {
        self.pow.is_some()
    }

    /// The effort the service suggests now (`None`: proof of work is off).
    pub fn suggested_effort(&self) -> Option<u32> {
        self.pow.as_ref().map(|p| p.verifier.suggested_effort())
    }

    /// Proof-of-work housekeeping at `now_unix` (unix seconds) and `now_ms` (the queue's
    /// clock): replace an expired seed, and once per [`super::pow::UPDATE_PERIOD_SECS`]
    /// recompute the suggested effort from the queue's statistics. Returns whether the
    /// descriptor's proof-of-work parameters changed (a descriptor is then due).
    pub fn pow_tick(&mut self, now_unix: u64, now_ms: u64) -> bool {
        let Some(pow) = self.pow.as_mut() else {
            return false;
        };
        pow.verifier.rotate_if_due(now_unix, &mut rand::rng());
        if pow.verifier.controller_mut().due(now_unix) {
            let stats = self
                .queue
                .as_mut()
                .map(|q| q.take_stats(now_ms))
                .unwrap_or_default();
            let before = pow.verifier.suggested_effort();
            let after = pow.verifier.controller_mut().update(&stats, now_unix);
            if before != after {
                tracing::info!(
                    "onion service: suggested proof-of-work effort {before} -> {after} \
                     ({} served, {} dropped, {} waiting)",
                    stats.served,
                    stats.dropped,
                    stats.waiting
                );
            }
        }
        let changed = pow.published.as_ref() != Some(&pow.verifier.params());
        if changed && pow.published.is_some() {
            self.dirty = true;
        }
        changed
    }

    /// Its address.
    pub fn address(&self) -> &HsAddress {
        &self.addr
    }

    /// Set the time-period parameters (from a new consensus).
    pub fn set_period_params(&mut self, tp: TimePeriodParams) {
        if tp != self.tp {
            self.tp = tp;
            self.dirty = true;
        }
    }

    /// How many more introduction points to set up.
    pub fn intro_points_wanted(&self) -> usize {
        N_INTRO_POINTS.saturating_sub(self.intros.len())
    }

    /// Relays already used as introduction points (pick others).
    pub fn intro_relays(&self) -> Vec<RelayId> {
        self.intros.iter().map(|s| s.relay.id).collect()
    }

    /// Take `relay` as a new introduction point, with fresh keys.
    pub fn add_intro_point(&mut self, relay: IntroRelay) -> IntroId {
        let id = IntroId(self.next_id);
        self.next_id = self.next_id.saturating_add(1);
        self.intros.push(IntroSlot {
            id,
            relay,
            auth: IdentityKeypair::generate(),
            enc: X25519Secret::generate(),
            established: false,
            seen: HashSet::new(),
            order: VecDeque::new(),
        });
        id
    }

    /// The ESTABLISH_INTRO for point `id`, bound to the circuit whose last hop (the point) has
    /// handshake binding `binding`.
    pub fn establish_intro(&self, id: IntroId, binding: &[u8; 32]) -> Option<RelayMsg> {
        let slot = self.intros.iter().find(|s| s.id == id)?;
        EstablishIntro::new_signed(&slot.auth, binding, vec![])
            .ok()
            .map(RelayMsg::EstablishIntro)
    }

    /// INTRO_ESTABLISHED arrived for point `id`.
    pub fn intro_established(&mut self, id: IntroId) {
        if let Some(s) = self.intros.iter_mut().find(|s| s.id == id)
            && !s.established
        {
            s.established = true;
            self.dirty = true;
        }
    }

    /// Point `id`'s circuit is gone (or failed to establish): forget the point. A new one is
    /// wanted; the descriptor changes if it was in it.
    pub fn intro_lost(&mut self, id: IntroId) {
        if let Some(i) = self.intros.iter().position(|s| s.id == id) {
            let s = self.intros.remove(i);
            if s.established {
                self.dirty = true;
            }
        }
    }

    /// Number of established introduction points.
    pub fn n_established(&self) -> usize {
        self.intros.iter().filter(|s| s.established).count()
    }

    /// Whether descriptors should be built and uploaded now: at least one point is established
    /// and the set changed, a new period began, or the last upload is [`REUPLOAD_SECS`] old.
    pub fn descriptor_due(&self, now_unix: u64) -> bool {
        if self.n_established() == 0 {
            return false;
        }
        self.dirty
            || self.published_period != Some(self.tp.period_at(now_unix).number)
            || self
                .last_upload
                .is_none_or(|t| now_unix.saturating_sub(t) >= REUPLOAD_SECS)
    }

    /// The periods a descriptor is published for at `now`: the current one and the next.
    fn periods(&self, now_unix: u64) -> [TimePeriod; 2] {
        let cur = self.tp.period_at(now_unix);
        [cur, cur.next()]
    }

    /// Build the descriptors for the current and the next period, listing the established
    /// points. Marks them published.
    pub fn build_descriptors(
        &mut self,
        now_unix: u64,
    ) -> Result<Vec<DescUpload>, allium_directory::DirError> {
        let contents = HsDescContents {
            version: allium_directory::hs::desc::HS_DESC_VERSION,
            intro_points: self
                .intros
                .iter()
                .filter(|s| s.established)
                .map(|s| IntroPointInfo {
                    relay_id: s.relay.id,
                    link_key: s.relay.link_key,
                    onion_key: s.relay.onion_key,
                    addrs: s.relay.addrs.clone(),
                    auth_key: s.auth.public(),
                    enc_key: s.enc.public(),
                })
                .collect(),
            pow: self.pow.as_ref().map(|p| p.verifier.params()),
        };
        // Unix seconds, and always more than the last one: an HSDir keeps the highest revision,
        // so a restarted service (whose counter starts again) still replaces its old descriptor.
        self.revision = self.revision.saturating_add(1).max(now_unix);
        let mut out = Vec::with_capacity(2);
        for period in self.periods(now_unix) {
            let blinded = BlindedKeypair::derive(&self.identity, &period);
            let subcred = Subcredential::for_identity(&self.identity.public(), &blinded.public());
            let signing = IdentityKeypair::generate();
            let period_end = self.tp.start_unix(period.number.saturating_add(1));
            let bytes = HsDescBuilder {
                blinded: &blinded,
                signing_key: &signing,
                subcredential: &subcred,
                revision: self.revision,
                lifetime_minutes: DESC_LIFETIME_MINUTES,
                // Valid through the end of its period plus the lifetime, as Tor's certificates.
                cert_expires: period_end
                    .saturating_add(u64::from(DESC_LIFETIME_MINUTES) * 60)
                    .max(now_unix.saturating_add(u64::from(DESC_LIFETIME_MINUTES) * 60)),
                contents: &contents,
                auth_clients: &self.auth_clients,
            }
            .build()?;
            out.push(DescUpload {
                period,
                blinded: blinded.public(),
                bytes,
            });
        }
        self.dirty = false;
        if let Some(p) = self.pow.as_mut() {
            p.published = contents.pow;
        }
        self.published_period = Some(self.tp.period_at(now_unix).number);
        self.last_upload = Some(now_unix);
        Ok(out)
    }

    /// No HSDir stored the descriptors last built: they are due again (the driver waits its
    /// backoff first).
    pub fn descriptor_upload_failed(&mut self) {
        self.dirty = true;
    }

    /// An INTRODUCE2 arrived on point `id`'s circuit. With proof of work on, its proof is
    /// checked as in [`OnionService::handle_introduce2_pow`] (whose effort this drops: use
    /// [`OnionService::queue_introduce2`] to have it count).
    pub fn handle_introduce2(
        &mut self,
        id: IntroId,
        msg: &Introduce,
        now_unix: u64,
    ) -> Result<RendezvousTask, IntroRefusal> {
        self.handle_introduce2_pow(id, msg, now_unix)
            .map(|a| a.task)
    }

    /// [`OnionService::handle_introduce2`], with the effort proven. With proof of work on, an
    /// INTRODUCE2 without a proof has effort 0; one whose proof is invalid, for a seed that is
    /// neither the current nor the previous one, or replays a (seed, nonce) is refused
    /// ([`IntroRefusal::Pow`]). With it off, a proof is ignored.
    pub fn handle_introduce2_pow(
        &mut self,
        id: IntroId,
        msg: &Introduce,
        now_unix: u64,
    ) -> Result<AcceptedIntro, IntroRefusal> {
        let identity = self.identity.public();
        let cur = self.tp.period_at(now_unix);
        let periods = [cur, cur.next(), cur.prev()];
        let i = self
            .intros
            .iter()
            .position(|s| s.id == id)
            .ok_or(IntroRefusal::UnknownPoint)?;
        let slot = self.intros.get_mut(i).ok_or(IntroRefusal::UnknownPoint)?;
        if !slot.auth.public().ct_eq(&msg.auth_key) {
            return Err(IntroRefusal::UnknownPoint);
        }
        let token = ntor::replay_token(&msg.replay_material());
        if slot.seen.contains(&token) {
            return Err(IntroRefusal::Replay);
        }
        let auth = slot.auth.public();
        let enc_pub = slot.enc.public();
        let mut opened = None;
        for p in periods {
            let Ok(blinded) = BlindedPublicKey::derive(&identity, &p) else {
                continue;
            };
            let subcred = Subcredential::for_identity(&identity, &blinded);
            let keys = IntroKeys {
                auth_key: &auth,
                enc_key: &enc_pub,
                subcredential: &subcred,
            };
            if let Ok((plain, ext, state)) = intro::service_open_with(&keys, &slot.enc, msg) {
                let answer = state
                    .respond(&keys)
                    .map_err(|_| IntroRefusal::BadHandshake)?;
                opened = Some((plain, ext, answer));
                break;
            }
        }
        let (plain, ext, (reply, keys)) = opened.ok_or(IntroRefusal::BadHandshake)?;
        let effort = match self.pow.as_mut() {
            None => 0,
            Some(pow) => {
                let sol = match ext
                    .iter()
                    .find(|e| e.ty == allium_proto::relaymsg::HsExtension::POW)
                {
                    Some(e) => Some(
                        PowSolution::from_extension(e)
                            .map_err(|_| IntroRefusal::Pow(PowRefusal::Invalid))?,
                    ),
                    None => None,
                };
                pow.verifier
                    .verify(sol.as_ref(), &auth, now_unix)
                    .map_err(IntroRefusal::Pow)?
            }
        };
        slot.seen.insert(token);
        slot.order.push_back(token);
        if slot.order.len() >= MAX_INTRODUCTIONS_PER_POINT {
            // Accept this one, then retire the point: its key will never be accepted again.
            let id = slot.id;
            self.intro_lost(id);
        }
        let IntroPlaintext { cookie, rend_point } = plain;
        Ok(AcceptedIntro {
            task: RendezvousTask {
                rend_point: HopTarget::new(rend_point.id, rend_point.onion_key, &rend_point.addrs),
                rendezvous1: RelayMsg::Rendezvous1(Rendezvous1 {
                    cookie,
                    handshake_info: reply.to_vec(),
                }),
                keys,
            },
            effort,
        })
    }

    /// Check an INTRODUCE2 ([`OnionService::handle_introduce2_pow`]) and queue the accepted
    /// rendezvous by its effort, at `now_ms` on the queue's clock. The driver then takes work
    /// with [`OnionService::next_rendezvous`]. `Ok(Some(id))`: to make room, an earlier
    /// introduction (that came through point `id`) with a lower effort was dropped.
    pub fn queue_introduce2(
        &mut self,
        id: IntroId,
        msg: &Introduce,
        now_unix: u64,
        now_ms: u64,
    ) -> Result<Option<IntroId>, IntroRefusal> {
        let acc = self.handle_introduce2_pow(id, msg, now_unix)?;
        let cfg = self.queue_cfg;
        let q = self
            .queue
            .get_or_insert_with(|| IntroQueue::new(cfg.queue_rate, cfg.queue_burst, now_ms));
        match q.push((id, acc.task), acc.effort, now_ms) {
            Pushed::Queued => Ok(None),
            Pushed::Evicted((old, _)) => Ok(Some(old)),
            Pushed::Refused(_) => Err(IntroRefusal::QueueFull),
        }
    }

    /// The next queued rendezvous to do at `now_ms` (highest effort first), if the queue's rate
    /// allows one now; with the introduction point it came through.
    pub fn next_rendezvous(&mut self, now_ms: u64) -> Option<(IntroId, RendezvousTask)> {
        self.queue
            .as_mut()
            .and_then(|q| q.pop(now_ms))
            .map(|(item, _)| item)
    }

    /// When [`OnionService::next_rendezvous`] may give something (`None`: nothing queued).
    pub fn next_rendezvous_at(&self, now_ms: u64) -> Option<u64> {
        self.queue.as_ref().and_then(|q| q.next_pop_at(now_ms))
    }

    /// Introductions waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.len())
    }

    /// Introductions the queue dropped so far (no room for their effort, or waited too long).
    pub fn queue_dropped(&self) -> u64 {
        self.queue.as_ref().map_or(0, |q| q.dropped_total())
    }

    /// Whether point `id` still exists (a retired or lost point's circuit should be closed).
    pub fn has_intro_point(&self, id: IntroId) -> bool {
        self.intros.iter().any(|s| s.id == id)
    }

    /// The local target for an incoming stream to `port`; `None`: refuse the stream.
    pub fn target_for(&self, port: u16) -> Option<std::net::SocketAddr> {
        ports::target_for(&self.ports, port)
    }
}
