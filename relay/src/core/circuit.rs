//! [`CircuitCore`]: one circuit as a relay sees it, as a synchronous state machine.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use allium_crypto::relaycell::{
    CellBody, FORWARD_MSG_OFFSET, Forward, RELAY_MSG_LEN, RelayHopCrypto, Tag,
};
use allium_proto::cell::{Cell, CellCmd, Create, Created, Destroy, DestroyReason};
use allium_proto::flowctl::{CircRecv, CongestionControl, StreamSignal};
use allium_proto::relaymsg::{
    self, End, EndReason, EstablishIntro, Extend, Extended, IntroEstablished, Introduce,
    IntroduceAck, IntroduceStatus, RelayCmd, RelayHeader, RelayMsg, Rendezvous2,
    RendezvousEstablished, Sendme, StreamIdRule, Truncated, Xoff, Xon,
};
use zeroize::Zeroizing;

use super::stream::{Stream, StreamState};
use super::{CircError, CoreConfig, DataChunk, Event, Side};

/// Most RELAY_EARLY cells a circuit may carry forward (tor-spec §5.6).
pub const MAX_RELAY_EARLY: u8 = 8;

/// The next hop of a circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// None: this relay is the last hop (for now).
    Unextended,
    /// An EXTEND is in progress: [`Event::ExtendTo`] was emitted, CREATED not yet received.
    Extending {
        /// When the extension fails with TIMEOUT.
        deadline: Instant,
    },
    /// Extended: cells pass to and from the next hop.
    Open,
    /// The whole circuit is destroyed (with this reason on the wire).
    Closed(DestroyReason),
}

/// The onion-service role of a circuit at this relay (rend-spec-v3's introduction point and
/// rendezvous point). A circuit takes at most one role, only while this relay is its last hop,
/// and cannot be extended once it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HsRole {
    /// None (yet).
    None,
    /// A verified ESTABLISH_INTRO awaits registration ([`Event::EstablishIntro`]).
    IntroPending,
    /// A service's introduction circuit: INTRODUCE2 goes down it.
    Intro,
    /// A client's circuit whose one INTRODUCE1 awaits its ACK.
    Introducing,
    /// A client's circuit that was introduced (no second INTRODUCE1).
    Introduced,
    /// ESTABLISH_RENDEZVOUS awaits registration.
    RendPending,
    /// A client's circuit waiting under a cookie.
    RendWaiting,
    /// A service's RENDEZVOUS1 awaits the table's answer.
    Rendezvous1Pending,
    /// Joined to another circuit: cells not for this relay cross to it.
    Joined,
}

/// One circuit at a relay: hop crypto, RELAY_EARLY budget, windows, next hop and exit streams.
#[derive(Debug)]
pub struct CircuitCore {
    pub(super) cfg: CoreConfig,
    crypto: RelayHopCrypto,
    early: u8,
    next: Next,
    pub(super) streams: HashMap<u16, Stream>,
    pub(super) cc: CongestionControl,
    recv: CircRecv,
    /// Circuit SENDMEs withheld while the exit streams hold more than
    /// [`CoreConfig::circ_queue_cells`] unwritten cells, oldest first.
    withheld: VecDeque<Tag>,
    /// SENDMEs withheld since the last [`CircuitCore::take_sendmes_withheld`].
    withheld_count: u64,
    transmit: VecDeque<(Side, Cell)>,
    pub(super) events: VecDeque<Event>,
    blocked_since: Option<Instant>,
    close_error: Option<CircError>,
    originated: u64,
    /// The handshake's circuit-binding value `KH` (ESTABLISH_INTRO's MAC key).
    binding: Zeroizing<[u8; 32]>,
    hs: HsRole,
}

/// A flow-control error as a [`CircError`].
fn window(e: allium_proto::ProtoError) -> CircError {
    CircError::Window(e)
}

impl CircuitCore {
    /// A circuit whose handshake produced `crypto`.
    pub fn new(cfg: CoreConfig, crypto: RelayHopCrypto) -> Self {
        let cc = cfg.cc;
        Self {
            cfg,
            crypto,
            early: 0,
            next: Next::Unextended,
            streams: HashMap::new(),
            cc: CongestionControl::new(cc),
            recv: CircRecv::new(cc),
            withheld: VecDeque::new(),
            withheld_count: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            blocked_since: None,
            close_error: None,
            originated: 0,
            binding: Zeroizing::new([0; 32]),
            hs: HsRole::None,
        }
    }

    /// Keep the handshake's circuit-binding value (`HopKeys::binding`), which ESTABLISH_INTRO's
    /// MAC must be keyed with. [`super::answer_create`] sets it.
    pub fn set_binding(&mut self, binding: &[u8; 32]) {
        self.binding.copy_from_slice(binding);
    }

    /// The onion-service role of this circuit.
    pub fn hs_role(&self) -> HsRole {
        self.hs
    }

    // ---- Onion-service driver inputs ----

    /// The answer to [`Event::EstablishIntro`]: registered (INTRO_ESTABLISHED goes out) or
    /// refused (the circuit is destroyed with RESOURCELIMIT).
    pub fn intro_registered(&mut self, ok: bool) {
        if self.hs != HsRole::IntroPending || self.is_closed() {
            return;
        }
        if ok {
            self.hs = HsRole::Intro;
            self.originate(0, &RelayMsg::IntroEstablished(IntroEstablished::default()));
        } else {
            self.close(
                CircError::HsRefused {
                    what: "introduction registry full",
                },
                None,
            );
        }
    }

    /// Send INTRODUCE2 down this introduction circuit. `false` if it is not one (any more).
    pub fn send_introduce2(&mut self, msg: Introduce) -> bool {
        if self.hs != HsRole::Intro || self.is_closed() {
            return false;
        }
        self.originate(0, &RelayMsg::Introduce2(msg));
        !self.is_closed()
    }

    /// The answer to [`Event::Introduce1`]: INTRODUCE_ACK with `status` goes to the client.
    pub fn introduce_acked(&mut self, status: IntroduceStatus) {
        if self.hs != HsRole::Introducing || self.is_closed() {
            return;
        }
        self.hs = HsRole::Introduced;
        self.originate(0, &RelayMsg::IntroduceAck(IntroduceAck::new(status)));
    }

    /// The answer to [`Event::EstablishRendezvous`]: waiting (RENDEZVOUS_ESTABLISHED goes out)
    /// or refused (destroyed with RESOURCELIMIT).
    pub fn rendezvous_registered(&mut self, ok: bool) {
        if self.hs != HsRole::RendPending || self.is_closed() {
            return;
        }
        if ok {
            self.hs = HsRole::RendWaiting;
            self.originate(0, &RelayMsg::RendezvousEstablished(RendezvousEstablished));
        } else {
            self.close(
                CircError::HsRefused {
                    what: "rendezvous cookie refused",
                },
                None,
            );
        }
    }

    /// On the waiting client circuit: the service answered. RENDEZVOUS2 with `handshake_info`
    /// goes to the client and the circuit is joined. `false` if it was not waiting.
    pub fn rendezvous_joined(&mut self, handshake_info: Vec<u8>) -> bool {
        if self.hs != HsRole::RendWaiting || self.is_closed() {
            return false;
        }
        self.hs = HsRole::Joined;
        self.originate(0, &RelayMsg::Rendezvous2(Rendezvous2 { handshake_info }));
        !self.is_closed()
    }

    /// On the service's circuit: the answer to [`Event::Rendezvous1`]. Joined, or destroyed (no
    /// circuit waits under that cookie, or a limit).
    pub fn rendezvous1_result(&mut self, ok: bool) {
        if self.hs != HsRole::Rendezvous1Pending || self.is_closed() {
            return;
        }
        if ok {
            self.hs = HsRole::Joined;
        } else {
            self.close(
                CircError::HsRefused {
                    what: "no circuit waits under that rendezvous cookie",
                },
                None,
            );
        }
    }

    /// A cell from the joined circuit ([`Event::JoinedCell`] there): add this hop's backward
    /// layer and send it towards this circuit's origin.
    pub fn joined_cell(&mut self, mut cell: Cell) {
        if self.hs != HsRole::Joined || self.is_closed() {
            return;
        }
        if let Err(e) = self.crypto.relay_backward(&mut cell.body) {
            self.close(CircError::BackwardCrypto(Arc::new(e)), None);
            return;
        }
        cell.circ_id = None;
        cell.cmd = CellCmd::RELAY;
        self.transmit.push_back((Side::Prev, cell));
    }

    /// The joined circuit was destroyed: so is this one (DESTROY towards the origin).
    pub fn join_closed(&mut self) {
        if self.hs == HsRole::Joined {
            self.close(CircError::JoinClosed, None);
        }
    }

    // ---- Outputs ----

    /// The next cell to send, and on which side. Cells carry no circuit id (`None`; see the module docs).
    pub fn poll_transmit(&mut self) -> Option<(Side, Cell)> {
        self.transmit.pop_front()
    }

    /// Whether cells are waiting in the transmit queue.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Number of cells waiting in the transmit queue.
    pub fn transmit_len(&self) -> usize {
        self.transmit.len()
    }

    /// The next thing the driver must do.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`CircuitCore::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let ext = match self.next {
            Next::Extending { deadline } => Some(deadline),
            _ => None,
        };
        let blocked = self
            .blocked_since
            .and_then(|t| t.checked_add(self.cfg.blocked_cap));
        let window = self
            .streams
            .values()
            .filter_map(|s| s.window_blocked_since)
            .min()
            .and_then(|t| t.checked_add(self.cfg.window_timeout));
        [ext, blocked, window].into_iter().flatten().min()
    }

    /// The next-hop state.
    pub fn next(&self) -> Next {
        self.next
    }

    /// Whether the previous hop is taken for a client (this relay is the first hop: no BEGIN).
    pub fn prev_is_client(&self) -> bool {
        self.cfg.prev_is_client
    }

    /// The previous hop turned out to be a relay after all (the relay learnt it from a newer
    /// consensus than the one it had when the CREATE came): BEGIN and RESOLVE are allowed from
    /// now on. A relay is never reclassified as a client.
    pub fn note_prev_is_relay(&mut self) {
        self.cfg.prev_is_client = false;
    }

    /// Whether the circuit has been destroyed.
    pub fn is_closed(&self) -> bool {
        matches!(self.next, Next::Closed(_))
    }

    /// Why the circuit was destroyed, once it is.
    pub fn close_error(&self) -> Option<&CircError> {
        self.close_error.as_ref()
    }

    /// The state of stream `sid`, if it is in the table.
    pub fn stream_state(&self, sid: u16) -> Option<StreamState> {
        self.streams.get(&sid).map(|s| s.state)
    }

    /// Number of entries in the stream table.
    pub fn n_streams(&self) -> usize {
        self.streams.len()
    }

    /// How many DATA cells stream `sid` may send now (the congestion window's room, 0 while the
    /// client's XOFF is in force); `None` if the stream is gone or its destination may not send.
    pub fn stream_budget(&self, sid: u16) -> Option<usize> {
        let st = self.streams.get(&sid)?;
        if self.is_closed() || !st.state.destination_may_send() {
            return None;
        }
        if !st.send.can_send() {
            return Some(0);
        }
        usize::try_from(self.cc.budget()).ok()
    }

    /// The congestion controller of the data this relay sends towards the client.
    pub fn congestion(&self) -> &CongestionControl {
        &self.cc
    }

    /// Circuit SENDMEs withheld since the last call (for the relay's counters).
    pub fn take_sendmes_withheld(&mut self) -> u64 {
        std::mem::take(&mut self.withheld_count)
    }

    /// DATA cells the exit streams hold that their destinations have not taken yet.
    pub fn queued_cells(&self) -> u32 {
        self.streams
            .values()
            .fold(0u32, |n, s| n.saturating_add(s.recv.unconsumed()))
    }

    /// Circuit SENDMEs being withheld now.
    pub fn sendmes_withheld(&self) -> usize {
        self.withheld.len()
    }

    /// Whether the exit streams hold more than the circuit queue cap.
    fn over_queue_cap(&self) -> bool {
        let cap = self.cfg.circ_queue_cells;
        cap > 0 && self.queued_cells() > cap
    }

    /// A circuit SENDME with `tag` is due: send it, or withhold it (after the ones already
    /// withheld) while the exit streams hold more than the cap.
    fn sendme_due(&mut self, tag: Tag) -> Result<(), CircError> {
        if self.withheld.is_empty() && !self.over_queue_cap() {
            self.originate(0, &RelayMsg::Sendme(Sendme { tag: Some(tag) }));
            return Ok(());
        }
        if self.withheld.len() >= allium_proto::flowctl::MAX_PENDING_TAGS {
            // The client had more than a maximal congestion window unacknowledged.
            return Err(CircError::Unexpected {
                what: "DATA beyond the congestion window while SENDMEs were withheld",
            });
        }
        self.withheld.push_back(tag);
        self.withheld_count += 1;
        Ok(())
    }

    /// The exit streams drained (or closed): release the withheld SENDMEs once they hold no
    /// more than the cap.
    pub(super) fn release_sendmes(&mut self) {
        if self.withheld.is_empty() || self.over_queue_cap() {
            return;
        }
        while let Some(tag) = self.withheld.pop_front() {
            self.originate(0, &RelayMsg::Sendme(Sendme { tag: Some(tag) }));
        }
    }

    /// Cells this core originated since the last call (for traffic statistics).
    pub fn take_originated(&mut self) -> u64 {
        std::mem::take(&mut self.originated)
    }

    // ---- Inputs ----

    /// A cell for this circuit arrived from `from`. PADDING and CREATE never reach a core (the
    /// link handles them). On `Err` the circuit is already destroyed.
    pub fn handle_cell(&mut self, from: Side, cell: Cell, now: Instant) -> Result<(), CircError> {
        if self.is_closed() {
            return Ok(());
        }
        let r = match (from, cell.cmd) {
            (Side::Prev, CellCmd::RELAY | CellCmd::RELAY_EARLY) => self.forward(cell, now),
            (Side::Next, CellCmd::RELAY) => self.backward(cell),
            (Side::Next, CellCmd::RELAY_EARLY) => Err(CircError::BackwardRelayEarly),
            (Side::Next, CellCmd::CREATED) => self.on_created(&cell),
            (_, CellCmd::DESTROY) => {
                let reason = Destroy::decode(&cell.body[..])
                    .map(|d| d.reason)
                    .unwrap_or(DestroyReason::NONE);
                self.on_destroy(from, reason);
                return Ok(());
            }
            _ => Err(CircError::Unexpected {
                what: "link cell command for this side",
            }),
        };
        self.fail_on_err(r)
    }

    /// The link on `side` closed: destroy the circuit (DESTROY goes only to the other side).
    pub fn link_closed(&mut self, side: Side) {
        if side == Side::Next && matches!(self.next, Next::Extending { .. }) {
            self.fail_extend(DestroyReason::CONNECTFAILED, false);
            return;
        }
        self.close(CircError::LinkClosed, Some(side));
    }

    /// Destroy the circuit for a reason found by the driver (queue overflow, shutdown).
    pub fn destroy(&mut self, error: CircError) {
        self.close(error, None);
    }

    /// Time has passed: fail a late extension, destroy a circuit blocked past its cap.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if let Some(t) = self.blocked_since
            && now.saturating_duration_since(t) >= self.cfg.blocked_cap
        {
            let secs = self.cfg.blocked_cap.as_secs();
            self.close(CircError::Blocked { secs }, None);
            return;
        }
        if let Next::Extending { deadline } = self.next
            && now >= deadline
        {
            self.fail_extend(DestroyReason::TIMEOUT, true);
        }
        let cap = self.cfg.window_timeout;
        let expired: Vec<u16> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.window_blocked_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= cap)
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in expired {
            // The client never opened the window: END TIMEOUT.
            self.end_stream(sid, EndReason::TIMEOUT);
        }
    }

    /// The link the driver must write to is full since `now` (idempotent while blocked).
    pub fn note_blocked(&mut self, now: Instant) {
        if self.blocked_since.is_none() {
            self.blocked_since = Some(now);
        }
    }

    /// The driver could write again.
    pub fn note_unblocked(&mut self) {
        self.blocked_since = None;
    }

    /// The extension could not be made before a CREATE was sent (unknown relay, address
    /// mismatch, link failure, no room on the link): TRUNCATED with `reason` goes to the client;
    /// the circuit may extend again.
    pub fn extend_failed(&mut self, reason: DestroyReason, _now: Instant) {
        if matches!(self.next, Next::Extending { .. }) {
            self.fail_extend(reason, false);
        }
    }

    // ---- Forward path ----

    fn forward(&mut self, mut cell: Cell, now: Instant) -> Result<(), CircError> {
        let cmd = cell.cmd;
        if cmd == CellCmd::RELAY_EARLY {
            self.early = self.early.saturating_add(1);
            if self.early > MAX_RELAY_EARLY {
                return Err(CircError::RelayEarlyBudget {
                    max: MAX_RELAY_EARLY,
                });
            }
        }
        match self
            .crypto
            .decrypt_forward(cmd.0, &mut cell.body)
            .map_err(|e| CircError::BadTag(Arc::new(e)))?
        {
            Forward::Pass if self.hs == HsRole::Joined => {
                // Not for this relay: its end-to-end layer belongs to the other end of the join.
                cell.circ_id = None;
                cell.cmd = CellCmd::RELAY;
                self.events.push_back(Event::JoinedCell { cell });
                Ok(())
            }
            Forward::Pass => {
                if self.next != Next::Open {
                    return Err(CircError::NoNextHop);
                }
                cell.circ_id = None;
                self.transmit.push_back((Side::Next, cell));
                Ok(())
            }
            Forward::Recognized { tag } => self.handle_msg(cmd, tag, cell.body, now),
        }
    }

    fn handle_msg(
        &mut self,
        cmd: CellCmd,
        tag: Tag,
        body: Box<CellBody>,
        now: Instant,
    ) -> Result<(), CircError> {
        let region = body
            .get(FORWARD_MSG_OFFSET..)
            .ok_or(CircError::Unexpected {
                what: "short cell body",
            })?;
        let (hdr, data) = RelayHeader::parse(region).map_err(CircError::Malformed)?;
        let sid = hdr.stream_id;
        match (hdr.cmd.stream_id_rule(), sid) {
            (StreamIdRule::Zero, 0) | (StreamIdRule::Any, _) => {}
            (StreamIdRule::NonZero, s) if s != 0 => {}
            _ => return Err(CircError::StreamIdRule { cmd: hdr.cmd, sid }),
        }
        match hdr.cmd {
            RelayCmd::DATA => {
                let start = FORWARD_MSG_OFFSET + relaymsg::RELAY_HEADER_LEN;
                let len = usize::from(hdr.len);
                self.on_data(sid, tag, DataChunk { body, start, len }, now)
            }
            RelayCmd::SENDME => {
                let msg = RelayMsg::decode_body(hdr.cmd, data).map_err(CircError::Malformed)?;
                let RelayMsg::Sendme(Sendme { tag }) = msg else {
                    return Err(CircError::Unexpected {
                        what: "SENDME body",
                    });
                };
                self.on_sendme(sid, tag.as_ref(), now)
            }
            _ => {
                let msg = RelayMsg::decode_body(hdr.cmd, data).map_err(CircError::Malformed)?;
                self.handle_control(cmd, sid, msg, now)
            }
        }
    }

    fn handle_control(
        &mut self,
        cmd: CellCmd,
        sid: u16,
        msg: RelayMsg,
        now: Instant,
    ) -> Result<(), CircError> {
        match msg {
            // An introduction or rendezvous circuit carries onion-service cells only: its last
            // hop is no exit and no directory cache for whoever holds the circuit.
            RelayMsg::Begin(_) | RelayMsg::Resolve(_) | RelayMsg::BeginDir(_)
                if self.hs != HsRole::None =>
            {
                self.originate(sid, &RelayMsg::End(End::new(EndReason::TORPROTOCOL)));
                Ok(())
            }
            RelayMsg::Begin(b) => self.on_begin(sid, b),
            RelayMsg::Resolve(r) => self.on_resolve(sid, r),
            RelayMsg::BeginDir(_) => self.on_begin_dir(sid),
            RelayMsg::End(e) => {
                self.on_end(sid, e.reason);
                Ok(())
            }
            RelayMsg::Extend(_) if self.hs != HsRole::None => Err(CircError::Unexpected {
                what: "EXTEND on an onion-service circuit",
            }),
            RelayMsg::Extend(e) => self.on_extend(cmd, e, now),
            RelayMsg::EstablishIntro(m) => self.on_establish_intro(&m),
            RelayMsg::Introduce1(msg) => {
                self.hs_start(HsRole::Introducing, "INTRODUCE1")?;
                self.events.push_back(Event::Introduce1 { msg });
                Ok(())
            }
            RelayMsg::EstablishRendezvous(m) => {
                self.hs_start(HsRole::RendPending, "ESTABLISH_RENDEZVOUS")?;
                self.events
                    .push_back(Event::EstablishRendezvous { cookie: m.cookie });
                Ok(())
            }
            RelayMsg::Rendezvous1(m) => {
                self.hs_start(HsRole::Rendezvous1Pending, "RENDEZVOUS1")?;
                self.events.push_back(Event::Rendezvous1 {
                    cookie: m.cookie,
                    handshake_info: m.handshake_info,
                });
                Ok(())
            }
            RelayMsg::Truncate(_) => {
                self.drop_next();
                let t = Truncated {
                    reason: DestroyReason::REQUESTED,
                };
                self.originate(0, &RelayMsg::Truncated(t));
                Ok(())
            }
            RelayMsg::Xoff(Xoff) => match self.streams.get_mut(&sid) {
                Some(st) => st.send.on_xoff().map_err(window),
                None => Ok(()),
            },
            RelayMsg::Xon(Xon { rate_kib }) => {
                if let Some(st) = self.streams.get_mut(&sid) {
                    st.send.on_xon(rate_kib);
                }
                Ok(())
            }
            RelayMsg::Drop(_) | RelayMsg::Unrecognized(_) => Ok(()),
            RelayMsg::Connected(_) => Err(CircError::Unexpected { what: "CONNECTED" }),
            RelayMsg::Extended(_) => Err(CircError::Unexpected { what: "EXTENDED" }),
            RelayMsg::Truncated(_) => Err(CircError::Unexpected { what: "TRUNCATED" }),
            RelayMsg::Resolved(_) => Err(CircError::Unexpected { what: "RESOLVED" }),
            _ => Err(CircError::Unexpected {
                what: "backward-only relay message",
            }),
        }
    }

    /// BEGIN_DIR: a directory stream, served by the driver ([`Event::OpenDirStream`]), only
    /// where this relay is the last hop (never on a circuit that extends or is extending).
    fn on_begin_dir(&mut self, sid: u16) -> Result<(), CircError> {
        if self.next != Next::Unextended {
            self.originate(sid, &RelayMsg::End(End::new(EndReason::NOTDIRECTORY)));
            return Ok(());
        }
        if self.streams.contains_key(&sid) {
            return Err(CircError::Unexpected {
                what: "BEGIN_DIR on a stream id in use",
            });
        }
        if self.streams.len() >= self.cfg.max_streams {
            self.originate(sid, &RelayMsg::End(End::new(EndReason::RESOURCELIMIT)));
            return Ok(());
        }
        self.streams.insert(
            sid,
            Stream::new(StreamState::Connecting { client_done: false }),
        );
        self.events.push_back(Event::OpenDirStream { sid });
        Ok(())
    }

    /// Take onion-service role `role`: only as the last hop, only once per circuit.
    fn hs_start(&mut self, role: HsRole, what: &'static str) -> Result<(), CircError> {
        if self.hs != HsRole::None || self.next != Next::Unextended {
            return Err(CircError::Unexpected { what });
        }
        self.hs = role;
        Ok(())
    }

    fn on_establish_intro(&mut self, m: &EstablishIntro) -> Result<(), CircError> {
        self.hs_start(HsRole::IntroPending, "ESTABLISH_INTRO")?;
        m.verify(&self.binding)
            .map_err(|e| CircError::IntroAuth(Arc::new(e)))?;
        self.events.push_back(Event::EstablishIntro {
            auth_key: m.auth_key,
        });
        Ok(())
    }

    fn on_data(
        &mut self,
        sid: u16,
        tag: Tag,
        data: DataChunk,
        now: Instant,
    ) -> Result<(), CircError> {
        let due = self.recv.on_data_received(&tag);
        let r = self.accept_data(sid, data, now);
        if let Some(t) = due {
            // The circuit SENDME goes out at once (it measures the path) unless the exit
            // streams already hold more than the cap (counting this cell).
            self.sendme_due(t)?;
        }
        r
    }

    fn accept_data(&mut self, sid: u16, data: DataChunk, now: Instant) -> Result<(), CircError> {
        let Some(st) = self.streams.get_mut(&sid) else {
            // A stream that just ended: the data is dropped.
            return Ok(());
        };
        if !st.state.accepts_client_data() {
            return Err(CircError::Unexpected {
                what: "DATA after END",
            });
        }
        let signal = st.recv.on_data(now).map_err(window)?;
        if !matches!(
            st.state,
            StreamState::Resolving { .. } | StreamState::Connecting { .. }
        ) {
            self.events.push_back(Event::StreamData { sid, data });
        } else {
            // Optimistic data: held until the destination is connected (bounded by the XOFF
            // limit through `recv`).
            st.early.push_back(data);
        }
        if signal == StreamSignal::Xoff {
            self.originate(sid, &RelayMsg::Xoff(Xoff));
        }
        Ok(())
    }

    fn on_sendme(&mut self, sid: u16, tag: Option<&Tag>, now: Instant) -> Result<(), CircError> {
        if sid != 0 {
            // Streams use XON/XOFF: a stream SENDME is a protocol violation.
            return Err(CircError::Unexpected {
                what: "stream-level SENDME",
            });
        }
        self.cc.on_sendme(tag, now).map(|_| ()).map_err(window)
    }

    fn on_extend(&mut self, cmd: CellCmd, ext: Extend, now: Instant) -> Result<(), CircError> {
        if cmd != CellCmd::RELAY_EARLY {
            return Err(CircError::Unexpected {
                what: "EXTEND outside RELAY_EARLY",
            });
        }
        if self.next != Next::Unextended || !self.streams.is_empty() {
            return Err(CircError::Unexpected {
                what: "EXTEND on a circuit with a next hop or streams",
            });
        }
        let relay = match ext.relay_id() {
            Some(id) if !id.ct_eq(&self.cfg.own_id) => id,
            _ => {
                let t = Truncated {
                    reason: DestroyReason::PROTOCOL,
                };
                self.originate(0, &RelayMsg::Truncated(t));
                return Ok(());
            }
        };
        let deadline = now.checked_add(self.cfg.extend_timeout).unwrap_or(now);
        self.next = Next::Extending { deadline };
        let addrs = ext.addrs().collect();
        self.events.push_back(Event::ExtendTo {
            relay,
            addrs,
            create: Create {
                htype: ext.htype,
                hdata: ext.hdata,
            },
        });
        Ok(())
    }

    // ---- Backward path ----

    fn backward(&mut self, mut cell: Cell) -> Result<(), CircError> {
        if self.next != Next::Open {
            // A late cell from a next hop that was just dropped.
            return Ok(());
        }
        self.crypto
            .relay_backward(&mut cell.body)
            .map_err(|e| CircError::BackwardCrypto(Arc::new(e)))?;
        cell.circ_id = None;
        cell.cmd = CellCmd::RELAY;
        self.transmit.push_back((Side::Prev, cell));
        Ok(())
    }

    fn on_created(&mut self, cell: &Cell) -> Result<(), CircError> {
        if !matches!(self.next, Next::Extending { .. }) {
            return Err(CircError::Unexpected { what: "CREATED" });
        }
        match Created::decode(&cell.body[..]) {
            Ok(c) => {
                self.next = Next::Open;
                self.originate(0, &RelayMsg::Extended(Extended { hdata: c.hdata }));
            }
            Err(_) => self.fail_extend(DestroyReason::PROTOCOL, true),
        }
        Ok(())
    }

    fn on_destroy(&mut self, from: Side, reason: DestroyReason) {
        if from == Side::Next && matches!(self.next, Next::Extending { .. }) {
            // The next relay refused the CREATE: the client may try another.
            self.fail_extend(DestroyReason::DESTROYED, false);
            return;
        }
        if from == Side::Next && self.next != Next::Open {
            return;
        }
        self.close(CircError::DestroyReceived { reason }, Some(from));
    }

    // ---- Helpers ----

    /// Drop a half-built or open next hop (DESTROY towards it if `send_destroy`) and send
    /// TRUNCATED with `reason`.
    fn fail_extend(&mut self, reason: DestroyReason, send_destroy: bool) {
        if send_destroy {
            self.drop_next();
        } else {
            self.next = Next::Unextended;
            self.events.push_back(Event::NextClosed);
        }
        self.originate(0, &RelayMsg::Truncated(Truncated { reason }));
    }

    /// Forget the next hop, sending it a DESTROY (reason NONE).
    fn drop_next(&mut self) {
        if matches!(self.next, Next::Extending { .. } | Next::Open) {
            self.transmit
                .push_back((Side::Next, destroy_cell(DestroyReason::NONE)));
            self.next = Next::Unextended;
            self.events.push_back(Event::NextClosed);
        }
    }

    /// Encrypt `msg` as a new backward cell and queue it. `None` if the circuit is closed (or
    /// just closed because the crypto failed).
    pub(super) fn encrypt_backward(&mut self, msg: &[u8]) -> Option<Tag> {
        if self.is_closed() {
            return None;
        }
        let mut cell = Cell::new_zeroed(None, CellCmd::RELAY);
        match self
            .crypto
            .encrypt_backward(CellCmd::RELAY.0, msg, &mut cell.body)
        {
            Ok(tag) => {
                self.transmit.push_back((Side::Prev, cell));
                self.originated += 1;
                Some(tag)
            }
            Err(e) => {
                self.close(CircError::BackwardCrypto(Arc::new(e)), None);
                None
            }
        }
    }

    /// Originate a control message towards the client.
    pub(super) fn originate(&mut self, sid: u16, msg: &RelayMsg) {
        let mut buf = [0u8; RELAY_MSG_LEN];
        match msg.encode(sid, &mut buf) {
            Ok(n) => {
                let m = buf.get(..n).unwrap_or(&[]);
                let _ = self.encrypt_backward(m);
            }
            Err(_) => self.close(CircError::Local, None),
        }
    }

    /// On a violation: destroy (DESTROY both ways: the side that misbehaved learns nothing
    /// more), keep the error for [`CircuitCore::close_error`] and return an equal one.
    fn fail_on_err(&mut self, r: Result<(), CircError>) -> Result<(), CircError> {
        r.inspect_err(|e| self.close(e.clone(), None))
    }

    /// Destroy: DESTROY on every side other than `from` (whose DESTROY or link failure this
    /// is), drop the streams, emit [`Event::Destroyed`].
    pub(super) fn close(&mut self, error: CircError, from: Option<Side>) {
        if self.is_closed() {
            return;
        }
        let reason = error.wire_reason();
        let had_next = matches!(self.next, Next::Extending { .. } | Next::Open);
        // What was queued is still sent (it precedes the DESTROY on each link).
        if from != Some(Side::Prev) {
            self.transmit.push_back((Side::Prev, destroy_cell(reason)));
        }
        if had_next && from != Some(Side::Next) {
            self.transmit.push_back((Side::Next, destroy_cell(reason)));
        }
        self.next = Next::Closed(reason);
        self.streams.clear();
        self.close_error = Some(error);
        self.events.push_back(Event::Destroyed { reason });
    }
}

/// A DESTROY cell with no circuit id (the driver writes the id).
fn destroy_cell(reason: DestroyReason) -> Cell {
    let mut c = Cell::new_zeroed(None, CellCmd::DESTROY);
    Destroy { reason }.encode(&mut c.body);
    c
}
