//! Flow control v2: per-circuit congestion control (Tor proposal 324's TOR_VEGAS) with
//! authenticated SENDMEs (Tor prop 289), and XON/XOFF stream flow control (Tor prop 344's idea).
//! Specified in `docs/protocol/70-flow-control.md`.
//!
//! Sans-IO counters; the circuit layer calls them and acts on the results:
//! - **Sender** of DATA ([`CongestionControl`]): check [`CongestionControl::can_send`] before
//!   originating a DATA cell, then report it with [`CongestionControl::note_data_sent`] with the
//!   cell's origin-layer tag and `now`. Every `sendme_inc`th cell's tag and send time are
//!   remembered in a bounded FIFO. On a circuit SENDME, [`CongestionControl::on_sendme`] checks
//!   its tag against the oldest remembered one in constant time, takes an RTT sample, and runs
//!   the Vegas update (slow start, then queue-delay driven congestion avoidance).
//! - **Receiver** of DATA ([`CircRecv`]): [`CircRecv::on_data_received`] with the tag of each
//!   DATA cell; it returns the tag to put in a SENDME every `sendme_inc` cells.
//! - **Streams** ([`StreamRecv`], [`StreamSend`]): no windows. The receiving edge counts cells
//!   delivered to its application but not yet consumed; past [`XOFF_THRESHOLD`] it sends XOFF,
//!   once drained to [`XON_THRESHOLD`] it sends XON with the measured drain rate. A sender that
//!   overshoots past [`XOFF_LIMIT`] (more than a whole maximal congestion window after the XOFF
//!   threshold) is in violation.
//!
//! Every `Err` is a flow-control violation: destroy the circuit (design §4).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::consts::Tag;
use crate::err::{ProtoError, Result};

/// The SENDME increment a relay offers in the handshake, in cells (Tor: 31).
pub const SENDME_INC_DEFAULT: u8 = 31;
/// The smallest SENDME increment a client accepts (fewer means a SENDME every few cells).
pub const SENDME_INC_MIN: u8 = 10;
/// The initial congestion window, in cells.
pub const CWND_INIT_INCS: u32 = 4;
/// The smallest congestion window, in SENDME increments.
pub const CWND_MIN_INCS: u32 = 4;
/// The largest congestion window, in cells (half of Tor's slow-start cap: about 2.3 MB of data
/// in flight, 9.7 MB/s at a 240 ms round trip). It bounds what a relay
/// queues per circuit and direction, and so the inbound queues of the drivers.
pub const CWND_MAX: u32 = 2500;
// Vegas targets, in SENDME increments (31 cells of 1 KiB: about 32 KiB, the size of one of
// Tor's per-hop outbufs, two 16 KiB TLS records). Tor's exit-circuit defaults (three hops) are
// alpha 2, beta 4, gamma 3, delta 6 outbufs; the same byte counts here keep the queue a circuit
// parks at its bottleneck at 62-124 cells (25-50 ms at 20 Mbit/s), which is what an interactive
// circuit sharing that bottleneck waits behind (issue 9's fairness run: 3 and 6 increments
// measured 1.70x its first-byte time alone; the goal is 1.5x).
/// Vegas `alpha`, in SENDME increments: below this queue estimate, grow the window.
pub const VEGAS_ALPHA_INCS: u32 = 2;
/// Vegas `beta`, in SENDME increments: above this queue estimate, shrink the window.
pub const VEGAS_BETA_INCS: u32 = 4;
/// Vegas `gamma`, in SENDME increments: above this queue estimate, leave slow start.
pub const VEGAS_GAMMA_INCS: u32 = 3;
/// Vegas `delta`, in SENDME increments: above this queue estimate, cut the window to the
/// bandwidth-delay product plus delta.
pub const VEGAS_DELTA_INCS: u32 = 6;
/// The RTT EWMA's `N` (weight `2 / (N + 1)`) in slow start.
pub const EWMA_N_SLOW_START: u64 = 2;
/// The largest RTT EWMA `N` in congestion avoidance (half a window of SENDMEs, at most this).
pub const EWMA_N_MAX: u32 = 10;
/// Most SENDME tags that can be outstanding on a circuit: [`CWND_MAX`] over the smallest
/// increment, plus one (for the cells that may be sent once `inflight` is just below cwnd).
pub const MAX_PENDING_TAGS: usize = (CWND_MAX / SENDME_INC_MIN as u32) as usize + 1;
/// The receiving edge of a stream sends XOFF when this many DATA cells were delivered to its
/// application but not consumed (about 470 KB).
pub const XOFF_THRESHOLD: u32 = 500;
/// Once an XOFF was sent, XON goes out when the unconsumed cells drop to this.
pub const XON_THRESHOLD: u32 = 100;
/// An exit's XOFF threshold ([`StreamRecv::with_thresholds`]): it sends XOFF once this many
/// DATA cells (about 62 KB) wait for a destination socket that already holds up to 64 KiB
/// unsent in the kernel. Lower than a client's [`XOFF_THRESHOLD`] because a destination that
/// never reads otherwise pins half a megabyte per stream at the exit, 200 MB for 400 streams.
pub const EXIT_XOFF_THRESHOLD: u32 = 128;
/// An exit's XON threshold (after an XOFF, XON goes out once this few cells wait).
pub const EXIT_XON_THRESHOLD: u32 = 32;
/// Most unconsumed DATA cells a stream may hold: the XOFF threshold plus a maximal congestion
/// window (what the sender may have had in flight when the XOFF reached it). More is a violation.
pub const XOFF_LIMIT: u32 = XOFF_THRESHOLD + CWND_MAX;

/// Congestion-control parameters agreed in the circuit handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CcParams {
    /// One circuit SENDME per this many DATA cells.
    pub sendme_inc: u8,
}

impl Default for CcParams {
    fn default() -> Self {
        Self {
            sendme_inc: SENDME_INC_DEFAULT,
        }
    }
}

impl CcParams {
    /// Parameters with `sendme_inc`; fails below [`SENDME_INC_MIN`].
    pub fn new(sendme_inc: u8) -> Result<Self> {
        if sendme_inc < SENDME_INC_MIN {
            return Err(ProtoError::Flow("SENDME increment below the minimum"));
        }
        Ok(Self { sendme_inc })
    }
    fn inc(self) -> u32 {
        u32::from(self.sendme_inc)
    }
}

/// The CM/SM TLV type of the congestion-control extension of the circuit handshake.
pub const CC_EXT_TYPE: u8 = 1;
/// The only congestion-control algorithm: TOR_VEGAS-style (this module).
pub const CC_ALG_VEGAS: u8 = 1;

/// The client's request, for the handshake's CM: `type = 1, len = 1, alg = 1`.
pub fn cc_request() -> [u8; 3] {
    [CC_EXT_TYPE, 1, CC_ALG_VEGAS]
}

/// Whether a CM TLV list requests congestion control this relay speaks. A malformed list, an
/// unknown algorithm or no request at all gives `false`; unknown TLV types are ignored.
pub fn cm_requests_cc(cm: &[u8]) -> bool {
    let mut found = false;
    for entry in allium_crypto::handshake::tlv::iter(cm) {
        match entry {
            Ok((CC_EXT_TYPE, value)) => found = value == [CC_ALG_VEGAS],
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    found
}

/// The relay's answer, for the handshake's SM: `type = 1, len = 2, alg = 1, sendme_inc`.
pub fn cc_reply(params: CcParams) -> [u8; 4] {
    [CC_EXT_TYPE, 2, CC_ALG_VEGAS, params.sendme_inc]
}

/// The parameters a relay agreed to in its SM. Fails if the SM is malformed, lacks the
/// extension, names another algorithm or an increment below [`SENDME_INC_MIN`].
pub fn parse_cc_reply(sm: &[u8]) -> Result<CcParams> {
    let mut params = None;
    for entry in allium_crypto::handshake::tlv::iter(sm) {
        let (ty, value) = entry.map_err(|_| ProtoError::Flow("malformed handshake reply"))?;
        if ty != CC_EXT_TYPE {
            continue;
        }
        let [alg, inc] = value else {
            return Err(ProtoError::Flow("malformed congestion-control extension"));
        };
        if *alg != CC_ALG_VEGAS {
            return Err(ProtoError::Flow("unknown congestion-control algorithm"));
        }
        params = Some(CcParams::new(*inc)?);
    }
    params.ok_or(ProtoError::Flow(
        "the relay did not agree to congestion control",
    ))
}

/// What a SENDME did to the congestion controller (for tests and statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendmeOutcome {
    /// The RTT sample it gave.
    pub rtt: Duration,
    /// The window after it.
    pub cwnd: u32,
}

/// The sending side of a circuit: TOR_VEGAS congestion control over authenticated SENDMEs.
pub struct CongestionControl {
    params: CcParams,
    cwnd: u32,
    inflight: u32,
    slow_start: bool,
    /// Cells acknowledged since the last congestion-avoidance update.
    acked_since_update: u32,
    /// DATA cells sent since the last remembered tag (modulo `sendme_inc`).
    since_tag: u32,
    /// (tag, time sent) of every `sendme_inc`th cell, oldest first.
    pending: VecDeque<(Tag, Instant)>,
    rtt_min: Option<Duration>,
    rtt_ewma: Option<Duration>,
}

impl std::fmt::Debug for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CongestionControl")
            .field("cwnd", &self.cwnd)
            .field("inflight", &self.inflight)
            .field("slow_start", &self.slow_start)
            .field("pending", &self.pending.len())
            .field("rtt_min", &self.rtt_min)
            .field("rtt_ewma", &self.rtt_ewma)
            .finish()
    }
}

impl Default for CongestionControl {
    fn default() -> Self {
        Self::new(CcParams::default())
    }
}

impl CongestionControl {
    /// A controller in slow start with the initial window.
    pub fn new(params: CcParams) -> Self {
        Self {
            params,
            cwnd: CWND_INIT_INCS * params.inc(),
            inflight: 0,
            slow_start: true,
            acked_since_update: 0,
            since_tag: 0,
            // Sized for a typical window; grows (bounded by MAX_PENDING_TAGS) only on fast paths.
            pending: VecDeque::with_capacity(64),
            rtt_min: None,
            rtt_ewma: None,
        }
    }
    /// The agreed parameters.
    pub fn params(&self) -> CcParams {
        self.params
    }
    /// The congestion window, in cells.
    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }
    /// DATA cells sent and not yet acknowledged.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }
    /// Whether the controller is still in slow start.
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }
    /// The smallest RTT seen (None before the first SENDME).
    pub fn rtt_min(&self) -> Option<Duration> {
        self.rtt_min
    }
    /// The smoothed RTT.
    pub fn rtt_ewma(&self) -> Option<Duration> {
        self.rtt_ewma
    }
    /// How many DATA cells may be sent now.
    pub fn budget(&self) -> u32 {
        self.cwnd.saturating_sub(self.inflight)
    }
    /// True if a DATA cell may be sent now.
    pub fn can_send(&self) -> bool {
        self.inflight < self.cwnd
    }
    /// Count one originated DATA cell whose origin-layer AEAD tag is `tag`, sent at `now`.
    /// Fails if the window is full.
    pub fn note_data_sent(&mut self, tag: &Tag, now: Instant) -> Result<()> {
        if !self.can_send() {
            return Err(ProtoError::Flow("sent DATA with a full congestion window"));
        }
        self.inflight += 1;
        self.since_tag += 1;
        if self.since_tag >= self.params.inc() {
            self.since_tag = 0;
            if self.pending.len() >= MAX_PENDING_TAGS {
                return Err(ProtoError::Flow("too many outstanding SENDME tags"));
            }
            self.pending.push_back((*tag, now));
        }
        Ok(())
    }

    /// A circuit-level SENDME arrived at `now` with `tag` (`None` if it carried none, which is an
    /// error). A SENDME for which not `sendme_inc` cells were sent, or with the wrong tag, fails.
    pub fn on_sendme(&mut self, tag: Option<&Tag>, now: Instant) -> Result<SendmeOutcome> {
        let tag = tag.ok_or(ProtoError::Flow("circuit SENDME without a tag"))?;
        let (expected, sent) = self
            .pending
            .pop_front()
            .ok_or(ProtoError::Flow("SENDME without outstanding DATA"))?;
        if !allium_crypto::ct::ct_eq(&expected, tag) {
            return Err(ProtoError::Flow("SENDME tag mismatch"));
        }
        let inc = self.params.inc();
        // Cannot underflow: a tag is remembered only after `inc` cells were counted in flight.
        self.inflight = self.inflight.saturating_sub(inc);
        let rtt = now.saturating_duration_since(sent);
        self.sample_rtt(rtt);
        self.update(inc);
        Ok(SendmeOutcome {
            rtt,
            cwnd: self.cwnd,
        })
    }

    fn sample_rtt(&mut self, rtt: Duration) {
        // A zero RTT (simulated or coarse clocks) would make every queue estimate zero.
        let rtt = rtt.max(Duration::from_micros(1));
        self.rtt_min = Some(self.rtt_min.map_or(rtt, |m| m.min(rtt)));
        // EWMA with weight 2 / (N + 1): N = 2 in slow start, so a growing queue shows at once
        // and slow start does not overshoot; then about half a window of SENDMEs (2 to 10).
        let n = if self.slow_start {
            EWMA_N_SLOW_START
        } else {
            u64::from((self.cwnd / self.params.inc() / 2).clamp(2, EWMA_N_MAX))
        };
        self.rtt_ewma = Some(match self.rtt_ewma {
            None => rtt,
            Some(e) => {
                let e = e.as_micros() as u64;
                let r = rtt.as_micros() as u64;
                let mixed = (2 * r + (n - 1) * e) / (n + 1);
                Duration::from_micros(mixed.max(1))
            }
        });
    }

    /// The Vegas estimate of the bandwidth-delay product, in cells: `cwnd * rtt_min / rtt_ewma`.
    pub fn bdp(&self) -> u32 {
        match (self.rtt_min, self.rtt_ewma) {
            (Some(min), Some(ewma)) => {
                let min = min.as_micros().max(1);
                let ewma = ewma.as_micros().max(min);
                u32::try_from(u128::from(self.cwnd) * min / ewma).unwrap_or(self.cwnd)
            }
            _ => self.cwnd,
        }
    }

    /// The Vegas queue estimate, in cells: `cwnd - bdp = cwnd * (1 - rtt_min / rtt_ewma)`.
    pub fn queue_use(&self) -> u32 {
        self.cwnd.saturating_sub(self.bdp())
    }

    fn update(&mut self, acked: u32) {
        let inc = self.params.inc();
        let queue = self.queue_use();
        let cwnd_min = CWND_MIN_INCS * inc;
        if self.slow_start {
            if queue > VEGAS_GAMMA_INCS * inc {
                // Queue delay seen: leave slow start at the path's capacity plus gamma.
                self.slow_start = false;
                self.cwnd = self.bdp().saturating_add(VEGAS_GAMMA_INCS * inc);
            } else {
                // Exponential growth: one increment per SENDME doubles the window per RTT.
                self.cwnd = self.cwnd.saturating_add(acked);
                if self.cwnd >= CWND_MAX {
                    self.slow_start = false;
                }
            }
            self.acked_since_update = 0;
        } else {
            // Congestion avoidance: one decision per window's worth of acknowledged cells.
            self.acked_since_update = self.acked_since_update.saturating_add(acked);
            if self.acked_since_update < self.cwnd {
                self.cwnd = self.cwnd.clamp(cwnd_min, CWND_MAX);
                return;
            }
            self.acked_since_update = 0;
            if queue > VEGAS_DELTA_INCS * inc {
                let target = self.bdp().saturating_add(VEGAS_DELTA_INCS * inc);
                self.cwnd = target
                    .saturating_sub(inc)
                    .min(self.cwnd.saturating_sub(inc));
            } else if queue > VEGAS_BETA_INCS * inc {
                self.cwnd = self.cwnd.saturating_sub(inc);
            } else if queue < VEGAS_ALPHA_INCS * inc {
                self.cwnd = self.cwnd.saturating_add(inc);
            }
        }
        self.cwnd = self.cwnd.clamp(cwnd_min, CWND_MAX);
    }
}

/// The receiving side of a circuit: a SENDME every `sendme_inc` DATA cells, echoing the tag of
/// the cell that made it due.
#[derive(Clone, Debug)]
pub struct CircRecv {
    params: CcParams,
    count: u32,
}

impl Default for CircRecv {
    fn default() -> Self {
        Self::new(CcParams::default())
    }
}

impl CircRecv {
    /// A fresh counter.
    pub fn new(params: CcParams) -> Self {
        Self { params, count: 0 }
    }
    /// Count one DATA cell that arrived with origin-layer tag `tag`. Returns `Some(tag)` when a
    /// circuit SENDME carrying that tag is due: send it at once.
    pub fn on_data_received(&mut self, tag: &Tag) -> Option<Tag> {
        self.count += 1;
        if self.count >= self.params.inc() {
            self.count = 0;
            Some(*tag)
        } else {
            None
        }
    }
}

/// The receiving edge of a stream: counts cells delivered to the application and consumed, and
/// says when XOFF and XON are due.
#[derive(Clone, Debug, Default)]
pub struct StreamRecv {
    /// Cells delivered to the application and not consumed yet.
    unconsumed: u32,
    /// When the XOFF went out, while one is in force.
    xoff_since: Option<Instant>,
    /// Cells consumed since the XOFF.
    drained: u64,
    /// This edge's own (XOFF, XON) thresholds; `None`: [`XOFF_THRESHOLD`] and [`XON_THRESHOLD`].
    thresholds: Option<(u32, u32)>,
}

/// What the receiving edge must send after a stream event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamSignal {
    /// Nothing.
    None,
    /// Send XOFF.
    Xoff,
    /// Send XON with this rate advisory (KiB/s).
    Xon(u32),
}

impl StreamRecv {
    /// A fresh stream.
    pub fn new() -> Self {
        Self::default()
    }
    /// A fresh stream whose edge sends XOFF at `xoff` unconsumed cells and XON once they drop
    /// to `xon`. Each edge picks its own thresholds (an exit, whose destination socket buffers
    /// too, stops a stream much earlier than a client): `xoff` is clamped to
    /// `1..=`[`XOFF_THRESHOLD`] and `xon` to below it. The peer may still overshoot by a maximal
    /// congestion window ([`CWND_MAX`]); past that it is in violation.
    pub fn with_thresholds(xoff: u32, xon: u32) -> Self {
        let xoff = xoff.clamp(1, XOFF_THRESHOLD);
        Self {
            thresholds: Some((xoff, xon.min(xoff - 1))),
            ..Self::default()
        }
    }
    /// The XOFF and XON thresholds of this edge, in cells.
    pub fn thresholds(&self) -> (u32, u32) {
        self.thresholds.unwrap_or((XOFF_THRESHOLD, XON_THRESHOLD))
    }
    /// Most unconsumed cells the peer may cause: the XOFF threshold plus a maximal congestion
    /// window ([`XOFF_LIMIT`] with the default thresholds).
    pub fn limit(&self) -> u32 {
        self.thresholds().0 + CWND_MAX
    }
    /// Cells delivered and not consumed yet.
    pub fn unconsumed(&self) -> u32 {
        self.unconsumed
    }
    /// Whether an XOFF is in force.
    pub fn is_xoff(&self) -> bool {
        self.xoff_since.is_some()
    }
    /// A DATA cell arrived for the application at `now`. Fails when the peer ignored XOFF past
    /// [`XOFF_LIMIT`].
    pub fn on_data(&mut self, now: Instant) -> Result<StreamSignal> {
        self.unconsumed += 1;
        if self.unconsumed > self.limit() {
            return Err(ProtoError::Flow("stream DATA beyond the XOFF limit"));
        }
        if self.xoff_since.is_none() && self.unconsumed >= self.thresholds().0 {
            self.xoff_since = Some(now);
            self.drained = 0;
            return Ok(StreamSignal::Xoff);
        }
        Ok(StreamSignal::None)
    }
    /// The application consumed `cells` more cells at `now` (counts beyond what was delivered are
    /// ignored).
    pub fn on_consumed(&mut self, cells: u32, now: Instant) -> StreamSignal {
        let cells = cells.min(self.unconsumed);
        self.unconsumed -= cells;
        let Some(since) = self.xoff_since else {
            return StreamSignal::None;
        };
        self.drained = self.drained.saturating_add(u64::from(cells));
        if self.unconsumed > self.thresholds().1 {
            return StreamSignal::None;
        }
        self.xoff_since = None;
        let micros = now.saturating_duration_since(since).as_micros().max(1);
        // Bytes per second over the drain, in KiB/s (a DATA cell carries up to 498 bytes).
        let bytes = u128::from(self.drained) * crate::consts::MAX_DATA as u128;
        let kib = bytes * 1_000_000 / micros / 1024;
        StreamSignal::Xon(u32::try_from(kib).unwrap_or(u32::MAX).max(1))
    }
}

/// The sending edge of a stream: paused by XOFF, resumed by XON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSend {
    paused: bool,
    rate_kib: u32,
}

impl StreamSend {
    /// A fresh (unpaused) stream.
    pub fn new() -> Self {
        Self::default()
    }
    /// Whether DATA may be packaged on the stream.
    pub fn can_send(&self) -> bool {
        !self.paused
    }
    /// The last XON's rate advisory, KiB/s (0: none received).
    pub fn rate_advisory(&self) -> u32 {
        self.rate_kib
    }
    /// An XOFF arrived. A second XOFF without an XON in between is a violation.
    pub fn on_xoff(&mut self) -> Result<()> {
        if self.paused {
            return Err(ProtoError::Flow("XOFF on a stream already paused"));
        }
        self.paused = true;
        Ok(())
    }
    /// An XON arrived (allowed unpaused too: it updates the advisory).
    pub fn on_xon(&mut self, rate_kib: u32) {
        self.paused = false;
        self.rate_kib = rate_kib;
    }
}

#[cfg(test)]
mod tests;
