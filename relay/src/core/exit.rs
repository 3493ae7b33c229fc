//! The exit half of [`CircuitCore`]: BEGIN, RESOLVE, END and the driver's stream inputs.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use allium_crypto::relaycell::{MAX_DATA, RELAY_MSG_LEN};
use allium_proto::flowctl::StreamSignal;
use allium_proto::relaymsg::{
    self, AddrTtl, Begin, Connected, End, EndReason, RelayMsg, Resolve, Resolved, ResolvedValue,
    Target, Xon,
};

use super::stream::{HalfClose, Stream, StreamState};
use super::{
    CircError, CircuitCore, DNS_TTL, Event, MAX_CONNECT_ADDRS, MAX_RESOLVED_ANSWERS, ResolveFailure,
};
use crate::policy::Refusal;

impl CircuitCore {
    /// The driver resolved the name of stream `sid`.
    pub fn resolved(
        &mut self,
        sid: u16,
        result: Result<Vec<IpAddr>, ResolveFailure>,
        _now: Instant,
    ) {
        let Some(state) = self.stream_state(sid) else {
            return;
        };
        match state {
            StreamState::Lookup => {
                self.streams.remove(&sid);
                let answers = match result {
                    Ok(a) if !a.is_empty() => a
                        .into_iter()
                        .take(MAX_RESOLVED_ANSWERS)
                        .map(|ip| (ResolvedValue::Ip(ip), DNS_TTL))
                        .collect(),
                    Ok(_) | Err(ResolveFailure::NotFound) => {
                        vec![(ResolvedValue::NontransientError, 0)]
                    }
                    Err(ResolveFailure::Timeout | ResolveFailure::Busy) => {
                        vec![(ResolvedValue::TransientError, 0)]
                    }
                };
                self.originate(sid, &RelayMsg::Resolved(Resolved { answers }));
            }
            StreamState::Resolving { port, client_done } => match result {
                Ok(a) if !a.is_empty() => {
                    let addrs: Vec<SocketAddr> = a
                        .into_iter()
                        .filter(|ip| self.cfg.policy.check(*ip, port) != Err(Refusal::Address))
                        .map(|ip| SocketAddr::new(ip, port))
                        .take(MAX_CONNECT_ADDRS)
                        .collect();
                    if addrs.is_empty() {
                        self.end_stream(sid, EndReason::EXITPOLICY);
                    } else {
                        self.set_state(sid, StreamState::Connecting { client_done });
                        self.events.push_back(Event::OpenStream { sid, addrs });
                    }
                }
                Ok(_) | Err(ResolveFailure::NotFound | ResolveFailure::Busy) => {
                    self.end_stream(sid, EndReason::RESOLVEFAILED);
                }
                Err(ResolveFailure::Timeout) => self.end_stream(sid, EndReason::TIMEOUT),
            },
            _ => {}
        }
    }

    /// Stream `sid` is connected (to `peer`, reported in CONNECTED).
    pub fn stream_connected(&mut self, sid: u16, peer: Option<SocketAddr>, _now: Instant) {
        let Some(StreamState::Connecting { client_done }) = self.stream_state(sid) else {
            return;
        };
        let msg = RelayMsg::Connected(Connected {
            addr: peer.map(|p| AddrTtl {
                addr: p.ip(),
                ttl: DNS_TTL,
            }),
        });
        self.originate(sid, &msg);
        // Optimistic data that arrived before the connection goes to the destination now.
        if let Some(st) = self.streams.get_mut(&sid) {
            let early = std::mem::take(&mut st.early);
            self.events.extend(
                early
                    .into_iter()
                    .map(|data| Event::StreamData { sid, data }),
            );
        }
        if client_done {
            // The client's END DONE came before the connection: EOF after its data.
            self.events.push_back(Event::StreamEnd { sid });
        }
        self.set_state(
            sid,
            if client_done {
                StreamState::HalfClosed(HalfClose::ClientFinished)
            } else {
                StreamState::Open
            },
        );
    }

    /// Stream `sid` failed (connect, read or write error): END with `reason`, stream forgotten.
    pub fn stream_failed(&mut self, sid: u16, reason: EndReason, _now: Instant) {
        if self.streams.contains_key(&sid) {
            self.end_stream(sid, reason);
        }
    }

    /// The destination of stream `sid` closed its side: END DONE goes to the client after the
    /// bytes packaged so far; the stream is forgotten if the client had finished too.
    pub fn stream_eof(&mut self, sid: u16, _now: Instant) {
        match self.stream_state(sid) {
            Some(StreamState::Open) => {
                self.originate(sid, &RelayMsg::End(End::new(EndReason::DONE)));
                self.set_state(sid, StreamState::HalfClosed(HalfClose::DestinationFinished));
            }
            Some(StreamState::HalfClosed(HalfClose::ClientFinished)) => {
                self.originate(sid, &RelayMsg::End(End::new(EndReason::DONE)));
                self.remove_stream(sid, true);
            }
            _ => {}
        }
    }

    /// The destination of stream `sid` accepted `cells` more DATA cells: an XON goes out if the
    /// stream was stopped with XOFF and its queue has drained, and withheld circuit SENDMEs go
    /// out once the circuit's streams hold no more than [`super::CoreConfig::circ_queue_cells`].
    pub fn data_consumed(&mut self, sid: u16, cells: usize, now: Instant) {
        let Some(st) = self.streams.get_mut(&sid) else {
            return;
        };
        let cells = u32::try_from(cells).unwrap_or(u32::MAX);
        if let StreamSignal::Xon(rate_kib) = st.recv.on_consumed(cells, now) {
            self.originate(sid, &RelayMsg::Xon(Xon { rate_kib }));
        }
        self.release_sendmes();
    }

    /// Package destination bytes of stream `sid` into DATA cells, as far as the congestion window
    /// and the client's XON/XOFF allow. Returns how many bytes were taken (0 if blocked or the
    /// stream is gone). If not all could be taken, the stream is ended with TIMEOUT unless room
    /// opens and the rest is offered again within [`super::CoreConfig::window_timeout`].
    pub fn package(&mut self, sid: u16, data: &[u8], now: Instant) -> usize {
        let used = self.package_inner(sid, data, now);
        if let Some(st) = self.streams.get_mut(&sid) {
            if used < data.len() {
                st.window_blocked_since.get_or_insert(now);
            } else {
                st.window_blocked_since = None;
            }
        }
        used
    }

    fn package_inner(&mut self, sid: u16, data: &[u8], now: Instant) -> usize {
        let Some(budget) = self.stream_budget(sid) else {
            return 0;
        };
        let mut used = 0;
        let mut buf = [0u8; RELAY_MSG_LEN];
        for chunk in data.chunks(MAX_DATA).take(budget) {
            let len = relaymsg::encode_data(sid, chunk, &mut buf);
            let msg = buf.get(..len).unwrap_or(&[]);
            let Some(tag) = self.encrypt_backward(msg) else {
                return used;
            };
            if self.cc.note_data_sent(&tag, now).is_err() {
                // Cannot happen within the budget; treat as a local failure.
                self.close(CircError::Local, None);
                return used;
            }
            used += chunk.len();
        }
        used
    }

    pub(super) fn on_begin(&mut self, sid: u16, begin: Begin) -> Result<(), CircError> {
        if self.cfg.prev_is_client {
            // No one-hop exit circuits.
            self.originate(sid, &RelayMsg::End(End::new(EndReason::TORPROTOCOL)));
            return Ok(());
        }
        let policy = &self.cfg.policy;
        if !policy.is_exit() || !policy.port_allowed(begin.port) {
            self.originate(sid, &RelayMsg::End(End::new(EndReason::EXITPOLICY)));
            return Ok(());
        }
        if self.streams.contains_key(&sid) {
            return Err(CircError::Unexpected {
                what: "BEGIN on a stream id in use",
            });
        }
        if self.streams.len() >= self.cfg.max_streams {
            self.originate(sid, &RelayMsg::End(End::new(EndReason::RESOURCELIMIT)));
            return Ok(());
        }
        match begin.target {
            Target::Ip(ip) => {
                if self.cfg.policy.check(ip, begin.port) == Err(Refusal::Address) {
                    self.originate(sid, &RelayMsg::End(End::new(EndReason::EXITPOLICY)));
                    return Ok(());
                }
                let addrs = vec![SocketAddr::new(ip, begin.port)];
                self.streams.insert(
                    sid,
                    Stream::new(StreamState::Connecting { client_done: false }),
                );
                self.events.push_back(Event::OpenStream { sid, addrs });
            }
            Target::Hostname(hostname) => {
                let state = StreamState::Resolving {
                    port: begin.port,
                    client_done: false,
                };
                self.streams.insert(sid, Stream::new(state));
                self.events.push_back(Event::Resolve { sid, hostname });
            }
        }
        Ok(())
    }

    pub(super) fn on_resolve(&mut self, sid: u16, req: Resolve) -> Result<(), CircError> {
        if self.cfg.prev_is_client || !self.cfg.policy.is_exit() {
            self.originate(sid, &RelayMsg::End(End::new(EndReason::EXITPOLICY)));
            return Ok(());
        }
        if self.streams.contains_key(&sid) {
            return Err(CircError::Unexpected {
                what: "RESOLVE on a stream id in use",
            });
        }
        if self.streams.len() >= self.cfg.max_streams {
            let busy = RelayMsg::Resolved(Resolved {
                answers: vec![(ResolvedValue::TransientError, 0)],
            });
            self.originate(sid, &busy);
            return Ok(());
        }
        self.streams.insert(sid, Stream::new(StreamState::Lookup));
        self.events.push_back(Event::Resolve {
            sid,
            hostname: req.hostname,
        });
        Ok(())
    }

    pub(super) fn on_end(&mut self, sid: u16, reason: EndReason) {
        let Some(state) = self.stream_state(sid) else {
            return;
        };
        if reason != EndReason::DONE {
            self.remove_stream(sid, false);
            return;
        }
        let new = match state {
            StreamState::Lookup => {
                self.remove_stream(sid, false);
                return;
            }
            // Not connected yet: the end is passed on after the held optimistic data, once the
            // connection is made (`stream_connected`), so the destination sees data then EOF.
            StreamState::Resolving { port, .. } => {
                self.set_state(
                    sid,
                    StreamState::Resolving {
                        port,
                        client_done: true,
                    },
                );
                return;
            }
            StreamState::Connecting { .. } => {
                self.set_state(sid, StreamState::Connecting { client_done: true });
                return;
            }
            StreamState::Open => StreamState::HalfClosed(HalfClose::ClientFinished),
            StreamState::HalfClosed(HalfClose::DestinationFinished) => {
                self.events.push_back(Event::StreamEnd { sid });
                self.remove_stream(sid, true);
                return;
            }
            // A second END DONE: nothing new.
            StreamState::HalfClosed(HalfClose::ClientFinished) => return,
        };
        self.set_state(sid, new);
        self.events.push_back(Event::StreamEnd { sid });
    }

    pub(super) fn set_state(&mut self, sid: u16, state: StreamState) {
        if let Some(st) = self.streams.get_mut(&sid) {
            st.state = state;
        }
    }

    pub(super) fn remove_stream(&mut self, sid: u16, graceful: bool) {
        if let Some(st) = self.streams.remove(&sid) {
            if st.state != StreamState::Lookup {
                self.events.push_back(Event::StreamClosed { sid, graceful });
            }
            // Its unwritten cells no longer count against the circuit's queue cap.
            self.release_sendmes();
        }
    }

    pub(super) fn end_stream(&mut self, sid: u16, reason: EndReason) {
        self.originate(sid, &RelayMsg::End(End::new(reason)));
        self.remove_stream(sid, false);
    }
}
