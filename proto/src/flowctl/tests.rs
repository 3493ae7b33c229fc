//! Unit tests of the flow-control counters, and of the Vegas controller against a model path
//! (a FIFO bottleneck of a given rate plus a fixed propagation RTT) in simulated time.

use super::*;

fn tag(i: u32) -> Tag {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&i.to_be_bytes());
    t
}

/// A path: each DATA cell waits for the bottleneck (one cell per `cell_time`), then its
/// acknowledgement returns `base_rtt` later. A SENDME comes back for every `inc`th cell.
struct Path {
    cc: CongestionControl,
    now: Instant,
    base_rtt: Duration,
    cell_time: Duration,
    /// The bottleneck is busy (or stalled) until then.
    busy_until: Instant,
    /// SENDMEs in flight: (arrival, tag).
    acks: VecDeque<(Instant, Tag)>,
    sent: u32,
    /// Cells acknowledged so far.
    delivered: u64,
}

impl Path {
    fn new(base_rtt: Duration, cells_per_sec: u32) -> Self {
        #[allow(clippy::disallowed_methods)] // The epoch of simulated time.
        let now = Instant::now();
        Self {
            cc: CongestionControl::new(CcParams::default()),
            now,
            base_rtt,
            cell_time: Duration::from_secs(1) / cells_per_sec,
            busy_until: now,
            acks: VecDeque::new(),
            sent: 0,
            delivered: 0,
        }
    }

    /// Send as much as the window allows, then move to the next SENDME; stop at `until`.
    fn run_until(&mut self, until: Instant, mut on_sendme: impl FnMut(&CongestionControl)) {
        let inc = u32::from(self.cc.params().sendme_inc);
        loop {
            while self.cc.can_send() {
                self.sent += 1;
                let t = tag(self.sent);
                self.cc.note_data_sent(&t, self.now).unwrap();
                let start = self.busy_until.max(self.now);
                self.busy_until = start + self.cell_time;
                if self.sent.is_multiple_of(inc) {
                    self.acks.push_back((self.busy_until + self.base_rtt, t));
                }
            }
            let Some(&(at, t)) = self.acks.front() else {
                return;
            };
            if at > until {
                self.now = until;
                return;
            }
            self.acks.pop_front();
            self.now = at;
            self.cc.on_sendme(Some(&t), self.now).unwrap();
            self.delivered += u64::from(inc);
            on_sendme(&self.cc);
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until, |_| {});
    }

    /// Stall the bottleneck for `d` from now (nothing leaves it meanwhile).
    fn stall(&mut self, d: Duration) {
        let end = self.now + d;
        // Every queued cell and later one is pushed back by the stall.
        let shift = end.saturating_duration_since(self.busy_until.max(self.now));
        self.busy_until = self.busy_until.max(self.now) + shift;
        for a in &mut self.acks {
            a.0 = a.0.max(end + self.base_rtt);
        }
    }
}

#[test]
fn slow_start_doubles_the_window_each_round_trip() {
    // A fast path (no queue): the window should double every RTT, from 124 cells.
    let rtt = Duration::from_millis(100);
    let mut p = Path::new(rtt, 1_000_000);
    let start = p.now;
    let init = p.cc.cwnd();
    assert_eq!(init, CWND_INIT_INCS * u32::from(SENDME_INC_DEFAULT));
    let mut per_round = Vec::new();
    for round in 1..=4u32 {
        p.run_until(start + rtt * round + rtt / 2, |_| {});
        per_round.push(p.cc.cwnd());
    }
    assert!(p.cc.in_slow_start());
    for (i, w) in per_round.iter().enumerate() {
        let expect = init << (i + 1);
        assert!(
            *w >= expect * 9 / 10 && *w <= expect * 11 / 10,
            "round {}: cwnd {w}, expected about {expect} ({per_round:?})",
            i + 1
        );
    }
}

#[test]
fn slow_start_exits_on_queue_delay_near_the_bdp() {
    // 10,000 cells/s and 100 ms: a BDP of 1000 cells, far below CWND_MAX.
    let rtt = Duration::from_millis(100);
    let mut p = Path::new(rtt, 10_000);
    let mut exit_cwnd = None;
    let until = p.now + Duration::from_secs(3);
    p.run_until(until, |cc| {
        if !cc.in_slow_start() && exit_cwnd.is_none() {
            exit_cwnd = Some(cc.cwnd());
        }
    });
    let exit = exit_cwnd.expect("slow start must end on queue delay");
    // Slow start leaves at the BDP estimate plus gamma (3 increments); the estimate lags the
    // doubling window, so the exit may sit below the BDP: congestion avoidance climbs the rest.
    assert!(
        (700..=1700).contains(&exit),
        "slow start ended at cwnd {exit}, BDP is 1000"
    );
    // In congestion avoidance the window stays near BDP + alpha..beta, and the path is full.
    let inc = u32::from(SENDME_INC_DEFAULT);
    let w = p.cc.cwnd();
    assert!(
        w >= 1000 && w <= 1000 + (VEGAS_DELTA_INCS + 1) * inc,
        "steady cwnd {w}"
    );
    let before = p.delivered;
    p.run_for(Duration::from_secs(1));
    let rate = p.delivered - before;
    assert!(
        rate >= 9_000,
        "delivered {rate} cells/s on a 10,000 cells/s path"
    );
}

#[test]
fn the_window_falls_when_queue_delay_rises() {
    let rtt = Duration::from_millis(100);
    let mut p = Path::new(rtt, 10_000);
    p.run_for(Duration::from_secs(3));
    let high = p.cc.cwnd();
    // The bottleneck drops to a quarter: the queue grows, the RTT rises, Vegas must back off.
    p.cell_time = Duration::from_secs(1) / 2_500;
    p.run_for(Duration::from_secs(4));
    let low = p.cc.cwnd();
    let inc = u32::from(SENDME_INC_DEFAULT);
    assert!(
        low <= 250 + (VEGAS_DELTA_INCS + 1) * inc && low < high / 2,
        "cwnd {high} -> {low}; new BDP is 250"
    );
    // And the queue estimate is back within the target band.
    assert!(p.cc.queue_use() <= VEGAS_DELTA_INCS * inc);
}

#[test]
fn the_window_recovers_after_a_stall() {
    let rtt = Duration::from_millis(100);
    let mut p = Path::new(rtt, 5_000);
    p.run_for(Duration::from_secs(3));
    let before = p.cc.cwnd();
    p.stall(Duration::from_secs(2));
    p.run_for(Duration::from_secs(3));
    let after_stall = p.cc.cwnd();
    assert!(
        after_stall < before,
        "a stall must cut cwnd ({before} -> {after_stall})"
    );
    // After the stall the RTT is back to its minimum: the window must climb back.
    p.run_for(Duration::from_secs(6));
    let recovered = p.cc.cwnd();
    assert!(
        recovered >= before * 3 / 4,
        "cwnd {before} before, {after_stall} after the stall, {recovered} later"
    );
    let d0 = p.delivered;
    p.run_for(Duration::from_secs(1));
    assert!(p.delivered - d0 >= 4_500, "throughput did not recover");
}

#[test]
fn a_broken_controller_would_be_caught() {
    // Guard against the model itself: without queue delay, the window reaches the cap.
    let mut p = Path::new(Duration::from_millis(50), 10_000_000);
    p.run_for(Duration::from_secs(2));
    assert_eq!(p.cc.cwnd(), CWND_MAX);
    assert!(!p.cc.in_slow_start());
}

#[test]
fn lying_sendmes_are_rejected() {
    #[allow(clippy::disallowed_methods)] // simulated epoch
    let now = Instant::now();
    let inc = u32::from(SENDME_INC_DEFAULT);
    // Too early: fewer than sendme_inc cells sent.
    let mut cc = CongestionControl::default();
    for i in 1..inc {
        cc.note_data_sent(&tag(i), now).unwrap();
    }
    assert_eq!(
        cc.on_sendme(Some(&tag(inc - 1)), now),
        Err(ProtoError::Flow("SENDME without outstanding DATA"))
    );
    // Forged tag.
    let mut cc = CongestionControl::default();
    for i in 1..=2 * inc {
        cc.note_data_sent(&tag(i), now).unwrap();
    }
    assert_eq!(
        cc.on_sendme(Some(&tag(inc + 1)), now),
        Err(ProtoError::Flow("SENDME tag mismatch"))
    );
    // Too many: two increments sent, three SENDMEs.
    let mut cc = CongestionControl::default();
    for i in 1..=2 * inc {
        cc.note_data_sent(&tag(i), now).unwrap();
    }
    cc.on_sendme(Some(&tag(inc)), now).unwrap();
    cc.on_sendme(Some(&tag(2 * inc)), now).unwrap();
    assert!(cc.on_sendme(Some(&tag(2 * inc)), now).is_err());
    // No tag.
    assert!(CongestionControl::default().on_sendme(None, now).is_err());
}

#[test]
fn the_window_is_enforced() {
    #[allow(clippy::disallowed_methods)] // simulated epoch
    let now = Instant::now();
    let mut cc = CongestionControl::default();
    let w = cc.cwnd();
    for i in 0..w {
        cc.note_data_sent(&tag(i), now).unwrap();
    }
    assert!(!cc.can_send());
    assert_eq!(cc.budget(), 0);
    assert!(cc.note_data_sent(&tag(0), now).is_err());
}

#[test]
fn receiver_and_sender_agree_on_tags() {
    #[allow(clippy::disallowed_methods)] // simulated epoch
    let now = Instant::now();
    let mut s = CongestionControl::default();
    let mut r = CircRecv::default();
    for i in 1..=10_000u32 {
        assert!(s.can_send(), "window closed with every SENDME answered");
        s.note_data_sent(&tag(i), now).unwrap();
        if let Some(t) = r.on_data_received(&tag(i)) {
            s.on_sendme(Some(&t), now + Duration::from_millis(10))
                .unwrap();
        }
    }
    assert!(s.inflight() < u32::from(SENDME_INC_DEFAULT));
}

#[test]
fn small_sendme_increments_are_refused() {
    assert!(CcParams::new(SENDME_INC_MIN - 1).is_err());
    assert_eq!(
        CcParams::new(SENDME_INC_MIN).unwrap().sendme_inc,
        SENDME_INC_MIN
    );
}

#[test]
fn xoff_then_xon_with_a_drain_rate() {
    #[allow(clippy::disallowed_methods)] // simulated epoch
    let t0 = Instant::now();
    let mut r = StreamRecv::new();
    for _ in 1..XOFF_THRESHOLD {
        assert_eq!(r.on_data(t0).unwrap(), StreamSignal::None);
    }
    assert_eq!(r.on_data(t0).unwrap(), StreamSignal::Xoff);
    assert!(r.is_xoff());
    // The overshoot is allowed up to the limit.
    for _ in XOFF_THRESHOLD..XOFF_LIMIT {
        assert_eq!(r.on_data(t0).unwrap(), StreamSignal::None);
    }
    assert!(r.on_data(t0).is_err(), "past the XOFF limit");
    let mut r = StreamRecv::new();
    for _ in 0..XOFF_THRESHOLD {
        r.on_data(t0).unwrap();
    }
    // Draining 400 cells in one second: XON once at most XON_THRESHOLD remain.
    assert_eq!(
        r.on_consumed(300, t0 + Duration::from_millis(500)),
        StreamSignal::None
    );
    let StreamSignal::Xon(rate) = r.on_consumed(100, t0 + Duration::from_secs(1)) else {
        panic!("XON due");
    };
    let expect = 400 * crate::consts::MAX_DATA as u32 / 1024;
    assert!(rate.abs_diff(expect) <= 1, "rate {rate}, expected {expect}");
    assert!(!r.is_xoff());
    assert_eq!(r.unconsumed(), XOFF_THRESHOLD - 400);
}

#[test]
fn stream_sender_pauses_and_resumes() {
    let mut s = StreamSend::new();
    assert!(s.can_send());
    s.on_xoff().unwrap();
    assert!(!s.can_send());
    assert!(s.on_xoff().is_err(), "a second XOFF is a violation");
    s.on_xon(1234);
    assert!(s.can_send());
    assert_eq!(s.rate_advisory(), 1234);
    s.on_xon(5);
    assert_eq!(s.rate_advisory(), 5);
}

#[test]
fn handshake_extension_round_trips() {
    assert!(cm_requests_cc(&cc_request()));
    // Unknown types are ignored, before or after.
    assert!(cm_requests_cc(&[9, 2, 0, 0, 1, 1, 1, 7, 0]));
    assert!(!cm_requests_cc(&[]));
    assert!(!cm_requests_cc(&[1, 1, 2]), "unknown algorithm");
    assert!(!cm_requests_cc(&[1, 1]), "truncated");
    let p = CcParams::default();
    assert_eq!(cc_reply(p), [1, 2, 1, 31]);
    assert_eq!(parse_cc_reply(&cc_reply(p)).unwrap(), p);
    assert!(parse_cc_reply(&[]).is_err());
    assert!(
        parse_cc_reply(&[1, 2, 1, 5]).is_err(),
        "increment too small"
    );
    assert!(parse_cc_reply(&[1, 2, 2, 31]).is_err(), "unknown algorithm");
    assert!(parse_cc_reply(&[1, 1, 1]).is_err(), "short value");
    assert!(parse_cc_reply(&[1, 2, 1]).is_err(), "truncated");
}

#[test]
fn an_edge_with_its_own_thresholds_stops_and_resumes_earlier() {
    #[allow(clippy::disallowed_methods)] // simulated epoch
    let t0 = Instant::now();
    let mut r = StreamRecv::with_thresholds(64, 16);
    assert_eq!(r.thresholds(), (64, 16));
    assert_eq!(r.limit(), 64 + CWND_MAX);
    for _ in 1..64 {
        assert_eq!(r.on_data(t0).unwrap(), StreamSignal::None);
    }
    assert_eq!(r.on_data(t0).unwrap(), StreamSignal::Xoff);
    // Drained to 17: still stopped; to 16: XON.
    assert_eq!(r.on_consumed(47, t0), StreamSignal::None);
    assert!(matches!(r.on_consumed(1, t0), StreamSignal::Xon(_)));
    // The overshoot past its own threshold is bounded by a maximal window, not XOFF_LIMIT.
    let mut r = StreamRecv::with_thresholds(64, 16);
    for _ in 0..r.limit() {
        r.on_data(t0).unwrap();
    }
    assert!(r.on_data(t0).is_err(), "past this edge's limit");
    // Out-of-range thresholds are clamped.
    assert_eq!(StreamRecv::with_thresholds(0, 9).thresholds(), (1, 0));
    assert_eq!(
        StreamRecv::with_thresholds(10_000, 10_000).thresholds(),
        (XOFF_THRESHOLD, XOFF_THRESHOLD - 1)
    );
    assert_eq!(StreamRecv::new().limit(), XOFF_LIMIT);
}
