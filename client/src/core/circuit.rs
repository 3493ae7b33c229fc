//! [`ClientCircuit`]: the sans-IO client circuit (see the module docs in `core/mod.rs`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use allium_crypto::handshake::HopKeys;
use allium_crypto::handshake::{self, ClientHandshake};
use allium_crypto::relaycell::{
    BACKWARD_MSG_OFFSET, ClientCircuitCrypto, EndToEndRole, RELAY_MSG_LEN, Tag,
};
use allium_proto::cell::{
    Cell, CellCmd, CircId, Create, Created, Destroy, DestroyReason, HTYPE_NTOR3,
};
use allium_proto::flowctl::{self, CcParams, CircRecv, CongestionControl, StreamSignal};
use allium_proto::relaymsg::{
    self, End, EndReason, Extend, RELAY_HEADER_LEN, RelayCmd, RelayHeader, RelayMsg, ResolvedValue,
    Sendme, Xoff, Xon,
};
use zeroize::Zeroizing;

use super::stream::{Stream, StreamState};
use super::{CircParams, DataCell, Event, HopTarget, StreamId, StreamTarget};
use crate::err::{CircError, StreamError};

/// Most RELAY_EARLY cells a circuit may carry (docs/protocol/90-circuits.md).
pub const MAX_RELAY_EARLY: u8 = 8;

/// Where the circuit is in its build.
enum Build {
    /// A handshake with hop `hop` is under way (CREATE sent for hop 0, EXTEND otherwise).
    Pending { hop: usize, hs: ClientHandshake },
    /// No handshake under way: the circuit has at least one hop and takes streams and EXTENDs.
    Idle,
    /// The circuit failed or was closed.
    Closed,
}

/// One client circuit, sans-IO. See the module docs for the contract.
pub struct ClientCircuit {
    id: CircId,
    params: CircParams,
    crypto: ClientCircuitCrypto,
    build: Build,
    /// Hops still to add after the current one (from [`ClientCircuit::build`]).
    path: VecDeque<HopTarget>,
    /// Whether [`Event::Built`] is owed when `path` runs out.
    announce_built: bool,
    /// When the build (or the current extend) fails with a timeout.
    build_deadline: Option<Instant>,
    early_left: u8,
    /// Congestion control of the DATA we send to the last hop (reset with each hop added).
    cc: CongestionControl,
    /// SENDME counter of the DATA the last hop sends us.
    recv: CircRecv,
    streams: HashMap<u16, Stream>,
    next_stream: u16,
    transmit: VecDeque<Cell>,
    events: VecDeque<Event>,
    closed: Option<CircError>,
    /// Each real hop's circuit-binding value `KH` (ESTABLISH_INTRO's MAC key), by hop.
    bindings: Vec<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for ClientCircuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCircuit")
            .field("id", &self.id)
            .field("hops", &self.crypto.n_hops())
            .field("streams", &self.streams.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl ClientCircuit {
    /// A circuit with id `id` on the guard link: queues CREATE for `guard`. The build times out
    /// `params.build_timeout` after `now`.
    pub fn new(
        id: CircId,
        guard: HopTarget,
        params: CircParams,
        now: Instant,
    ) -> Result<Self, CircError> {
        Self::build(id, vec![guard], params, now)
    }

    /// A circuit along `path` (guard first): queues CREATE for the guard, then extends to each
    /// next relay as the previous one is added, and emits [`Event::Built`] after the last. The
    /// whole build times out `params.build_timeout` after `now`.
    pub fn build(
        id: CircId,
        path: Vec<HopTarget>,
        params: CircParams,
        now: Instant,
    ) -> Result<Self, CircError> {
        let mut path: VecDeque<HopTarget> = path.into();
        let guard = path.pop_front().ok_or(CircError::NotReady("empty path"))?;
        let (hs, skin) =
            handshake::client_start(&guard.id, &guard.onion_key, &flowctl::cc_request()).map_err(
                |e| CircError::Handshake {
                    hop: 0,
                    source: Arc::new(e),
                },
            )?;
        let create = Cell::create(
            id,
            &Create {
                htype: HTYPE_NTOR3,
                hdata: skin,
            },
        )
        .map_err(CircError::Encode)?;
        let announce_built = !path.is_empty();
        let mut c = Self {
            id,
            params,
            crypto: ClientCircuitCrypto::new(),
            build: Build::Pending { hop: 0, hs },
            path,
            announce_built,
            build_deadline: now.checked_add(params.build_timeout),
            early_left: MAX_RELAY_EARLY,
            cc: CongestionControl::new(CcParams::default()),
            recv: CircRecv::new(CcParams::default()),
            streams: HashMap::new(),
            next_stream: 1,
            transmit: VecDeque::with_capacity(8),
            events: VecDeque::with_capacity(8),
            closed: None,
            bindings: Vec::new(),
        };
        c.transmit.push_back(create);
        Ok(c)
    }

    /// The circuit id on the guard link.
    pub fn id(&self) -> CircId {
        self.id
    }

    /// The circuit-binding value `KH` of real hop `hop` (what an ESTABLISH_INTRO sent to that
    /// hop must be MACed with). Secret: never log it.
    pub fn hop_binding(&self, hop: usize) -> Option<&[u8; 32]> {
        self.bindings.get(hop).map(|b| &**b)
    }

    /// Number of hops added so far.
    pub fn n_hops(&self) -> usize {
        self.crypto.n_hops()
    }

    /// Number of streams in the table (opening, open or half-closed).
    pub fn n_streams(&self) -> usize {
        self.streams.len()
    }

    /// The state of stream `sid`, if it is in the table.
    pub fn stream_state(&self, sid: StreamId) -> Option<StreamState> {
        self.streams.get(&sid.get()).map(|s| s.state)
    }

    /// Whether the circuit takes streams now (built, no handshake under way, not closed).
    pub fn is_ready(&self) -> bool {
        matches!(self.build, Build::Idle) && self.path.is_empty()
    }

    /// Why the circuit closed, once it has.
    pub fn closed_reason(&self) -> Option<&CircError> {
        self.closed.as_ref()
    }

    /// Whether the circuit is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// RELAY_EARLY cells left.
    pub fn relay_early_left(&self) -> u8 {
        self.early_left
    }

    /// The congestion controller of the DATA this circuit sends (towards its last hop).
    pub fn congestion(&self) -> &CongestionControl {
        &self.cc
    }

    /// Whether the exit has stopped stream `sid` with XOFF.
    pub fn stream_paused(&self, sid: StreamId) -> Option<bool> {
        self.streams.get(&sid.get()).map(|s| !s.send.can_send())
    }

    /// Whether DATA for `sid` could be packaged now: the congestion window has room, the stream
    /// is open (or connecting with optimistic budget left) and not stopped by XOFF.
    pub fn can_package(&self, sid: StreamId) -> bool {
        self.closed.is_none()
            && self.cc.can_send()
            && self.streams.get(&sid.get()).is_some_and(|s| s.can_send())
    }

    /// The next cell to put on the guard link.
    pub fn poll_transmit(&mut self) -> Option<Cell> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`ClientCircuit::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let streams = self
            .streams
            .values()
            .filter_map(|s| s.state.deadline())
            .min();
        match (self.build_deadline, streams) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fire every deadline at or before `now`: a build past its deadline destroys the circuit;
    /// a stream not answered in time ends (END TIMEOUT for BEGIN) with
    /// [`StreamError::OpenTimeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.build_deadline.is_some_and(|d| d <= now) {
            let hop = match &self.build {
                Build::Pending { hop, .. } => *hop,
                _ => self.crypto.n_hops(),
            };
            self.events.push_back(Event::ExtendFailed {
                hop,
                error: CircError::BuildTimeout { hop },
            });
            self.fail(CircError::BuildTimeout { hop }, true);
            return;
        }
        let expired: Vec<(u16, bool)> = self
            .streams
            .iter()
            .filter_map(|(id, s)| match s.state {
                StreamState::Connecting { deadline } if deadline <= now => Some((*id, true)),
                StreamState::Resolving { deadline } if deadline <= now => Some((*id, false)),
                _ => None,
            })
            .collect();
        for (id, send_end) in expired {
            self.streams.remove(&id);
            if send_end
                && let Err(e) = self.send_msg_last(id, &RelayMsg::End(End::new(EndReason::TIMEOUT)))
            {
                self.fail(e, true);
                return;
            }
            if let Some(stream) = StreamId::new(id) {
                self.events.push_back(Event::StreamEnded {
                    stream,
                    result: Err(StreamError::OpenTimeout),
                });
            }
        }
    }

    /// Close the circuit (DESTROY, reason NONE, to the guard).
    pub fn close(&mut self) {
        self.fail(CircError::ClosedByClient, true);
    }

    /// The guard link closed: the circuit is gone (no DESTROY can be sent).
    pub fn handle_link_closed(&mut self) {
        self.fail(CircError::LinkClosed, false);
    }

    /// Destroy the circuit for `why` (its owner found a fault, e.g. the relay overran the
    /// circuit's inbound queue), telling the guard.
    pub fn abort(&mut self, why: CircError) {
        self.fail(why, true);
    }

    /// Close with `why`: drop every stream, queue DESTROY if `tell`, emit [`Event::Destroyed`].
    fn fail(&mut self, why: CircError, tell: bool) {
        if self.closed.is_some() {
            return;
        }
        self.build = Build::Closed;
        self.build_deadline = None;
        self.streams.clear();
        self.transmit.clear();
        if tell {
            self.transmit
                .push_back(Cell::destroy(self.id, DestroyReason::NONE));
        }
        self.events.push_back(Event::Destroyed {
            reason: why.clone(),
        });
        self.closed = Some(why);
    }

    /// Fail with `e` and return it (for `handle_cell`).
    fn die(&mut self, e: CircError) -> Result<(), CircError> {
        self.fail(e.clone(), true);
        Err(e)
    }

    /// Handle a cell from the guard link (in link order). `Err`: this cell destroyed the circuit
    /// (the reason is also in [`Event::Destroyed`]). Cells after the circuit closed are ignored.
    pub fn handle_cell(&mut self, cell: Cell, now: Instant) -> Result<(), CircError> {
        if self.closed.is_some() {
            return Ok(());
        }
        match cell.cmd {
            CellCmd::RELAY => match self.handle_relay(cell, now) {
                Ok(()) => Ok(()),
                Err(e) => self.die(e),
            },
            CellCmd::CREATED => match self.handle_created(&cell) {
                Ok(()) => Ok(()),
                Err(e) => self.die(e),
            },
            CellCmd::DESTROY => {
                let reason = Destroy::decode(&cell.body[..])
                    .map(|d| d.reason)
                    .unwrap_or(DestroyReason::NONE);
                let e = CircError::Destroyed(reason);
                if let Build::Pending { hop, .. } = self.build {
                    self.events.push_back(Event::ExtendFailed {
                        hop,
                        error: e.clone(),
                    });
                }
                self.fail(e.clone(), false);
                Err(e)
            }
            CellCmd::RELAY_EARLY => self.die(CircError::Protocol(
                "RELAY_EARLY travelling towards the client",
            )),
            _ => self.die(CircError::Protocol("unexpected cell command on a circuit")),
        }
    }

    fn handle_created(&mut self, cell: &Cell) -> Result<(), CircError> {
        let created = Created::decode(&cell.body[..]).map_err(|e| CircError::Malformed {
            what: "CREATED cell",
            source: e,
        })?;
        match std::mem::replace(&mut self.build, Build::Idle) {
            Build::Pending { hop: 0, hs, .. } => self.hop_done(0, hs, &created.hdata),
            other => {
                self.build = other;
                Err(CircError::Protocol("unexpected CREATED"))
            }
        }
    }

    /// The reply for hop `hop` arrived: add it, then extend on along the path.
    fn hop_done(&mut self, hop: usize, hs: ClientHandshake, reply: &[u8]) -> Result<(), CircError> {
        let (keys, server_msg) = hs.finish(reply).map_err(|e| {
            let err = CircError::Handshake {
                hop,
                source: Arc::new(e),
            };
            self.events.push_back(Event::ExtendFailed {
                hop,
                error: err.clone(),
            });
            err
        })?;
        let params = flowctl::parse_cc_reply(&server_msg).map_err(|e| {
            let err = CircError::FlowControl {
                what: "congestion-control handshake",
                source: e,
            };
            self.events.push_back(Event::ExtendFailed {
                hop,
                error: err.clone(),
            });
            err
        })?;
        // DATA flows only to and from the last hop: its parameters replace the previous hop's.
        self.cc = CongestionControl::new(params);
        self.recv = CircRecv::new(params);
        self.crypto
            .add_hop(&keys)
            .map_err(|e| CircError::Crypto(Arc::new(e)))?;
        self.bindings.push(Zeroizing::new(*keys.binding()));
        self.events.push_back(Event::HopAdded { hop });
        match self.path.pop_front() {
            Some(next) => self.start_extend(next),
            None => {
                self.build_deadline = None;
                if std::mem::take(&mut self.announce_built) {
                    self.events.push_back(Event::Built);
                }
                Ok(())
            }
        }
    }

    /// Extend the circuit to `target` (EXTEND in RELAY_EARLY to the current last hop). The
    /// extend times out `params.build_timeout` after `now`. Fails if the circuit is closed, a
    /// handshake is under way, or no RELAY_EARLY cell is left.
    pub fn extend(&mut self, target: HopTarget, now: Instant) -> Result<(), CircError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if !matches!(self.build, Build::Idle) || !self.path.is_empty() {
            return Err(CircError::NotReady("a hop is being added"));
        }
        self.build_deadline = now.checked_add(self.params.build_timeout);
        let r = self.start_extend(target);
        if r.is_err() {
            self.build_deadline = None;
        }
        r
    }

    fn start_extend(&mut self, target: HopTarget) -> Result<(), CircError> {
        let hop = self.crypto.n_hops();
        let last = hop
            .checked_sub(1)
            .ok_or(CircError::NotReady("no hop yet"))?;
        if self.early_left == 0 {
            return Err(CircError::EarlyExhausted);
        }
        let (hs, skin) =
            handshake::client_start(&target.id, &target.onion_key, &flowctl::cc_request())
                .map_err(|e| CircError::Handshake {
                    hop,
                    source: Arc::new(e),
                })?;
        let msg = RelayMsg::Extend(Extend {
            specs: target.specs.clone(),
            htype: HTYPE_NTOR3,
            hdata: skin,
        });
        self.send_msg(last, 0, &msg)?;
        self.build = Build::Pending { hop, hs };
        Ok(())
    }

    /// The RELAY or RELAY_EARLY command for the next forward cell to `hop` (see the module docs).
    fn next_cmd(&mut self, hop: usize, is_extend: bool) -> Result<CellCmd, CircError> {
        if is_extend || (hop > 0 && self.early_left > 0) {
            self.early_left = self
                .early_left
                .checked_sub(1)
                .ok_or(CircError::EarlyExhausted)?;
            Ok(CellCmd::RELAY_EARLY)
        } else {
            Ok(CellCmd::RELAY)
        }
    }

    /// Encrypt an encoded relay message for `hop` and queue it.
    fn send_raw(&mut self, hop: usize, msg: &[u8], is_extend: bool) -> Result<Tag, CircError> {
        let cmd = self.next_cmd(hop, is_extend)?;
        let mut cell = Cell::new_zeroed(Some(self.id), cmd);
        let tag = self
            .crypto
            .encrypt_forward(hop, cmd.0, msg, &mut cell.body)
            .map_err(|e| CircError::Crypto(Arc::new(e)))?;
        self.transmit.push_back(cell);
        Ok(tag)
    }

    fn send_msg(&mut self, hop: usize, sid: u16, msg: &RelayMsg) -> Result<Tag, CircError> {
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = msg.encode(sid, &mut buf).map_err(CircError::Encode)?;
        let body = buf.get(..n).ok_or(CircError::NotReady("message length"))?;
        self.send_raw(hop, body, matches!(msg, RelayMsg::Extend(_)))
    }

    fn last_hop(&self) -> Result<usize, CircError> {
        self.crypto
            .n_hops()
            .checked_sub(1)
            .ok_or(CircError::NotReady("the circuit has no hop"))
    }

    fn send_msg_last(&mut self, sid: u16, msg: &RelayMsg) -> Result<Tag, CircError> {
        let last = self.last_hop()?;
        self.send_msg(last, sid, msg)
    }

    fn handle_relay(&mut self, mut cell: Cell, now: Instant) -> Result<(), CircError> {
        let (hop, tag) = self
            .crypto
            .decrypt_backward(cell.cmd.0, &mut cell.body)
            .map_err(|e| CircError::Auth(Arc::new(e)))?;
        let last = self.last_hop()?;
        let region = cell
            .body
            .get(BACKWARD_MSG_OFFSET..BACKWARD_MSG_OFFSET + RELAY_MSG_LEN)
            .ok_or(CircError::Protocol("short relay cell"))?;
        let (h, _) = RelayHeader::parse(region).map_err(|e| CircError::Malformed {
            what: "relay header",
            source: e,
        })?;
        if h.cmd == RelayCmd::DATA {
            if hop != last || h.stream_id == 0 {
                return Err(CircError::Protocol("DATA from a hop that is not the exit"));
            }
            return self.handle_data(h.stream_id, usize::from(h.len), tag, cell, now);
        }
        let (sid, msg) = RelayMsg::decode(region).map_err(|e| CircError::Malformed {
            what: "relay message",
            source: e,
        })?;
        self.handle_control(hop, last, sid, msg, now)
    }

    fn handle_data(
        &mut self,
        sid: u16,
        len: usize,
        tag: Tag,
        cell: Cell,
        now: Instant,
    ) -> Result<(), CircError> {
        if let Some(t) = self.recv.on_data_received(&tag) {
            self.send_msg_last(0, &RelayMsg::Sendme(Sendme { tag: Some(t) }))?;
        }
        let Some(s) = self.streams.get_mut(&sid) else {
            // Data for a stream we already closed.
            return Ok(());
        };
        if !s.state.can_receive() {
            return Err(CircError::Protocol(
                "DATA on a stream that is not open for receiving",
            ));
        }
        let signal = s.recv.on_data(now).map_err(|e| CircError::FlowControl {
            what: "stream XOFF limit",
            source: e,
        })?;
        if let Some(stream) = StreamId::new(sid) {
            self.events.push_back(Event::StreamData {
                stream,
                data: DataCell::new(cell.body, len),
            });
        }
        if signal == StreamSignal::Xoff {
            self.send_msg_last(sid, &RelayMsg::Xoff(Xoff))?;
        }
        Ok(())
    }

    fn handle_control(
        &mut self,
        hop: usize,
        last: usize,
        sid: u16,
        msg: RelayMsg,
        now: Instant,
    ) -> Result<(), CircError> {
        if hop != last && !matches!(msg, RelayMsg::Drop(_) | RelayMsg::Truncated(_)) {
            return Err(CircError::Protocol(
                "relay message from an intermediate hop",
            ));
        }
        let stream = StreamId::new(sid);
        match msg {
            RelayMsg::Sendme(Sendme { tag }) if sid == 0 => {
                self.cc
                    .on_sendme(tag.as_ref(), now)
                    .map_err(|e| CircError::FlowControl {
                        what: "circuit SENDME",
                        source: e,
                    })?;
            }
            RelayMsg::Sendme(_) => {
                return Err(CircError::Protocol(
                    "stream-level SENDME (streams use XON/XOFF)",
                ));
            }
            RelayMsg::Xoff(Xoff) => {
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.send.on_xoff().map_err(|e| CircError::FlowControl {
                        what: "XOFF",
                        source: e,
                    })?;
                }
            }
            RelayMsg::Xon(Xon { rate_kib }) => {
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.send.on_xon(rate_kib);
                }
            }
            RelayMsg::Connected(_) => {
                let (Some(stream), Some(s)) = (stream, self.streams.get_mut(&sid)) else {
                    return Ok(());
                };
                if !matches!(s.state, StreamState::Connecting { .. }) {
                    return Err(CircError::Protocol("CONNECTED on a stream not connecting"));
                }
                s.state = StreamState::Open;
                self.events.push_back(Event::StreamConnected { stream });
            }
            RelayMsg::End(End { reason, .. }) => {
                let (Some(stream), Some(s)) = (stream, self.streams.get_mut(&sid)) else {
                    return Ok(());
                };
                let done = reason == EndReason::DONE;
                let result = if done && s.state.deadline().is_none() {
                    Ok(())
                } else {
                    Err(StreamError::Ended(reason))
                };
                if done && s.state == StreamState::Open {
                    s.state = StreamState::RemoteDone;
                } else {
                    self.streams.remove(&sid);
                }
                self.events.push_back(Event::StreamEnded { stream, result });
            }
            RelayMsg::Resolved(r) => {
                let Some(stream) = stream else {
                    return Err(CircError::Protocol("RESOLVED on stream 0"));
                };
                match self.streams.get(&sid).map(|s| s.state) {
                    Some(StreamState::Resolving { .. }) => {
                        self.streams.remove(&sid);
                        let addrs: Vec<IpAddr> = r
                            .answers
                            .iter()
                            .filter_map(|(v, _ttl)| match v {
                                ResolvedValue::Ip(ip) => Some(*ip),
                                _ => None,
                            })
                            .collect();
                        self.events.push_back(Event::Resolved { stream, addrs });
                    }
                    Some(_) => {
                        return Err(CircError::Protocol("RESOLVED on a stream not resolving"));
                    }
                    None => {}
                }
            }
            RelayMsg::Extended(e) => match std::mem::replace(&mut self.build, Build::Idle) {
                Build::Pending { hop, hs, .. } if hop > 0 => self.hop_done(hop, hs, &e.hdata)?,
                other => {
                    self.build = other;
                    return Err(CircError::Protocol("unexpected EXTENDED"));
                }
            },
            RelayMsg::Truncated(t) => {
                let err = CircError::Truncated {
                    hop,
                    reason: t.reason,
                };
                if let Build::Pending { hop: adding, .. } = self.build {
                    self.events.push_back(Event::ExtendFailed {
                        hop: adding,
                        error: err.clone(),
                    });
                }
                return Err(err);
            }
            RelayMsg::Drop(_) => {}
            RelayMsg::IntroEstablished(_)
            | RelayMsg::IntroduceAck(_)
            | RelayMsg::Introduce2(_)
            | RelayMsg::RendezvousEstablished(_)
            | RelayMsg::Rendezvous2(_) => {
                if self.crypto.end_to_end_role().is_some() {
                    return Err(CircError::Protocol(
                        "onion-service message after the rendezvous",
                    ));
                }
                self.events.push_back(Event::OnionService { msg });
            }
            RelayMsg::Begin(begin)
                if self.crypto.end_to_end_role() == Some(EndToEndRole::Service) =>
            {
                let Some(stream) = stream else {
                    return Err(CircError::Protocol("BEGIN on stream 0"));
                };
                if self.streams.contains_key(&sid) {
                    return Err(CircError::Protocol("BEGIN on a stream in use"));
                }
                if self.streams.len() >= self.params.max_streams {
                    // Refuse this stream, keep the circuit.
                    self.send_msg_last(sid, &RelayMsg::End(End::new(EndReason::RESOURCELIMIT)))?;
                    return Ok(());
                }
                self.streams
                    .insert(sid, Stream::new(StreamState::Open, false));
                self.events
                    .push_back(Event::IncomingStream { stream, begin });
            }
            _ => return Err(CircError::Protocol("unexpected relay command")),
        }
        Ok(())
    }

    /// Send an onion-service message (ESTABLISH_INTRO, INTRODUCE1, ESTABLISH_RENDEZVOUS,
    /// RENDEZVOUS1) to the last hop, on stream 0. Fails for any other message, or if the circuit
    /// is closed, not built, or already joined end to end.
    pub fn send_onion_service(&mut self, msg: &RelayMsg) -> Result<(), CircError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if !self.is_ready() || self.crypto.end_to_end_role().is_some() {
            return Err(CircError::NotReady("the circuit is not ready for this"));
        }
        if !matches!(
            msg,
            RelayMsg::EstablishIntro(_)
                | RelayMsg::Introduce1(_)
                | RelayMsg::EstablishRendezvous(_)
                | RelayMsg::Rendezvous1(_)
        ) {
            return Err(CircError::Protocol("not an onion-service request"));
        }
        if let Err(e) = self.send_msg_last(0, msg) {
            self.fail(e.clone(), true);
            return Err(e);
        }
        Ok(())
    }

    /// Add the end-to-end virtual hop (keys from the onion-service handshake) after the
    /// rendezvous point, which is the last hop now: the client after RENDEZVOUS2, the service
    /// after it sent RENDEZVOUS1. From then on streams and DATA go to and come from the other
    /// end, and flow control runs end to end (a fresh window, default parameters). Emits
    /// [`Event::HopAdded`] for the virtual hop.
    pub fn add_end_to_end(&mut self, keys: &HopKeys, role: EndToEndRole) -> Result<(), CircError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if !self.is_ready() {
            return Err(CircError::NotReady("the circuit is still being built"));
        }
        if !self.streams.is_empty() {
            return Err(CircError::NotReady(
                "streams are open to the rendezvous point",
            ));
        }
        self.crypto
            .add_end_to_end(keys, role)
            .map_err(|e| CircError::Crypto(Arc::new(e)))?;
        self.cc = CongestionControl::new(CcParams::default());
        self.recv = CircRecv::new(CcParams::default());
        let hop = self.crypto.n_hops().saturating_sub(1);
        self.events.push_back(Event::HopAdded { hop });
        Ok(())
    }

    /// Service role: accept incoming stream `sid` (CONNECTED goes to the client).
    pub fn accept_stream(&mut self, sid: StreamId) -> Result<(), CircError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if self.crypto.end_to_end_role() != Some(EndToEndRole::Service)
            || !self.streams.contains_key(&sid.get())
        {
            return Err(CircError::NotReady("no such incoming stream"));
        }
        let msg = RelayMsg::Connected(relaymsg::Connected::default());
        if let Err(e) = self.send_msg_last(sid.get(), &msg) {
            self.fail(e.clone(), true);
            return Err(e);
        }
        Ok(())
    }

    /// Open a stream to `target` on the last hop: queues BEGIN, BEGIN_DIR or RESOLVE. The answer
    /// comes as [`Event::StreamConnected`], [`Event::Resolved`] or [`Event::StreamEnded`]; none
    /// within `params.stream_timeout` of `now` ends the stream with
    /// [`StreamError::OpenTimeout`]. Fails (and opens nothing) if the circuit is closed or not
    /// built, carries `params.max_streams` streams, or the request does not encode
    /// ([`CircError::Encode`], e.g. a host name too long).
    pub fn begin_stream(
        &mut self,
        target: &StreamTarget,
        now: Instant,
    ) -> Result<StreamId, CircError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if !self.is_ready() {
            return Err(CircError::NotReady("the circuit is still being built"));
        }
        if self.streams.len() >= self.params.max_streams {
            return Err(CircError::TooManyStreams);
        }
        // Onion addresses never reach an exit or its resolver (issue 13): the last check before
        // a BEGIN or RESOLVE is encoded. Streams to an onion service send no host name.
        let host = match target {
            StreamTarget::Begin(b) => match &b.target {
                relaymsg::Target::Hostname(h) => Some(h.as_str()),
                relaymsg::Target::Ip(_) => None,
            },
            StreamTarget::Resolve(h) => Some(h.as_str()),
            StreamTarget::BeginDir => None,
        };
        if host.is_some_and(allium_crypto::hs::is_hs_hostname) {
            return Err(CircError::Encode(allium_proto::ProtoError::Invalid {
                object: "host name",
                problem: "an onion address (.allium.alt) is never sent to an exit or a resolver",
            }));
        }
        let mut id = self.next_stream;
        while id == 0 || self.streams.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_stream = id.wrapping_add(1);
        let deadline = now.checked_add(self.params.stream_timeout).unwrap_or(now);
        let (msg, state, optimistic) = match target {
            StreamTarget::Begin(b) => (
                RelayMsg::Begin(b.clone()),
                StreamState::Connecting { deadline },
                true,
            ),
            StreamTarget::BeginDir => (
                RelayMsg::BeginDir(relaymsg::BeginDir),
                StreamState::Connecting { deadline },
                false,
            ),
            StreamTarget::Resolve(h) => (
                RelayMsg::Resolve(relaymsg::Resolve {
                    hostname: h.clone(),
                }),
                StreamState::Resolving { deadline },
                false,
            ),
        };
        let mut buf = [0u8; RELAY_MSG_LEN];
        let n = msg.encode(id, &mut buf).map_err(CircError::Encode)?;
        let body = buf.get(..n).ok_or(CircError::NotReady("message length"))?;
        let last = self.last_hop()?;
        if let Err(e) = self.send_raw(last, body, false) {
            self.fail(e.clone(), true);
            return Err(e);
        }
        self.streams.insert(id, Stream::new(state, optimistic));
        StreamId::new(id).ok_or(CircError::NotReady("stream id"))
    }

    /// Package as much of `data` as flow control allows as DATA cells on stream `sid`; returns
    /// the number of bytes taken (0 if the congestion window is full, the stream is stopped by
    /// XOFF or cannot send, or the circuit is closed). A BEGIN stream may send up to
    /// [`super::OPTIMISTIC_MAX`] cells before CONNECTED (optimistic data).
    pub fn package(&mut self, sid: StreamId, data: &[u8], now: Instant) -> usize {
        let Ok(last) = self.last_hop() else { return 0 };
        let mut off = 0;
        let mut msg = [0u8; RELAY_MSG_LEN];
        while off < data.len() && self.closed.is_none() && self.can_package(sid) {
            let n = relaymsg::encode_data(sid.get(), data.get(off..).unwrap_or_default(), &mut msg);
            let taken = n.saturating_sub(RELAY_HEADER_LEN);
            if taken == 0 {
                break;
            }
            let tag = match self.send_raw(last, msg.get(..n).unwrap_or_default(), false) {
                Ok(t) => t,
                Err(e) => {
                    self.fail(e, true);
                    break;
                }
            };
            if let Some(s) = self.streams.get_mut(&sid.get()) {
                s.note_sent();
            }
            if let Err(e) = self.cc.note_data_sent(&tag, now) {
                self.fail(
                    CircError::FlowControl {
                        what: "package window",
                        source: e,
                    },
                    true,
                );
                break;
            }
            off += taken;
        }
        off
    }

    /// The application took `cells` more DATA cells of stream `sid` at `now`: sends XON if the
    /// stream was stopped with XOFF and has drained.
    pub fn consumed(&mut self, sid: StreamId, cells: usize, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        let Some(s) = self.streams.get_mut(&sid.get()) else {
            return;
        };
        let cells = u32::try_from(cells).unwrap_or(u32::MAX);
        if let StreamSignal::Xon(rate_kib) = s.recv.on_consumed(cells, now)
            && let Err(e) = self.send_msg_last(sid.get(), &RelayMsg::Xon(Xon { rate_kib }))
        {
            self.fail(e, true);
        }
    }

    /// We are done with stream `sid`: with [`EndReason::DONE`], we send no more data (the exit
    /// may still send until its own END); with any other reason, abort it at once. Sends END
    /// unless already sent (an abort after our DONE is sent too, so the exit stops sending).
    pub fn close_stream(&mut self, sid: StreamId, reason: EndReason, _now: Instant) {
        if self.closed.is_some() {
            return;
        }
        let Some(s) = self.streams.get_mut(&sid.get()) else {
            return;
        };
        let abort = reason != EndReason::DONE;
        let send = match s.state {
            StreamState::Open if !abort => {
                s.state = StreamState::LocalDone;
                true
            }
            StreamState::LocalDone if !abort => false,
            StreamState::Resolving { .. } => {
                self.streams.remove(&sid.get());
                false
            }
            _ => {
                self.streams.remove(&sid.get());
                true
            }
        };
        if send && let Err(e) = self.send_msg_last(sid.get(), &RelayMsg::End(End::new(reason))) {
            self.fail(e, true);
        }
    }
}
