//! Congestion control, XON/XOFF and optimistic data end to end on the simulated-time rig: the
//! real client core against three real relay cores, with a bottleneck link (a per-cell
//! transmission time) so queues build up as they would on a real path. Each test fails if the
//! controller is broken: no slow-start exit, no reaction to queue delay, no recovery after a
//! stall, or two round trips where optimistic data allows one.

use std::time::Duration;

use allium_client::core::{Event, StreamId, StreamTarget};
use allium_proto::flowctl::{CWND_MAX, SENDME_INC_DEFAULT, VEGAS_BETA_INCS, VEGAS_DELTA_INCS};
use allium_proto::relaymsg::{Begin, BeginFlags, Target};
use allium_tests::sim::{ECHO_PORT, Net, SOURCE_PORT, pattern_bytes};

/// One-way latency of every link: a 120 ms circuit round trip.
const L: Duration = Duration::from_millis(20);
/// Data bytes in one DATA cell.
const CELL_DATA: usize = 934;

fn begin(port: u16) -> StreamTarget {
    StreamTarget::Begin(Begin {
        target: Target::Hostname("dest.example".to_owned()),
        port,
        flags: BeginFlags::default(),
    })
}

/// A built circuit whose middle–exit link (link 2) carries `cells_per_sec` cells per second.
fn bottlenecked(cells_per_sec: u32) -> Net {
    let mut net = Net::new(3, L);
    net.link_cell_time
        .insert(2, Duration::from_secs(1) / cells_per_sec);
    net.build();
    net
}

fn received(net: &Net, sid: StreamId) -> usize {
    net.received.get(&sid).map_or(0, Vec::len)
}

/// Cells delivered to the client on `sid` during the next `d`.
fn cells_during(net: &mut Net, sid: StreamId, d: Duration) -> usize {
    let before = received(net, sid);
    net.advance(d);
    (received(net, sid) - before) / CELL_DATA
}

fn inc() -> u32 {
    u32::from(SENDME_INC_DEFAULT)
}

#[test]
fn slow_start_grows_exponentially_then_exits_on_queue_delay() {
    // 4,000 cells/s, 120 ms: a BDP of 480 cells.
    let mut net = bottlenecked(4_000);
    net.source_len = 64 * 1024 * 1024;
    let sid = net.begin(begin(SOURCE_PORT));
    net.run_until(Duration::from_secs(1), |n| received(n, sid) > 0);
    // Sample the exit's window once per round trip while in slow start.
    let mut windows = vec![net.hops[2].congestion().cwnd()];
    while net.hops[2].congestion().in_slow_start() {
        assert!(windows.len() < 40, "slow start never ended: {windows:?}");
        net.advance(Duration::from_millis(120));
        windows.push(net.hops[2].congestion().cwnd());
    }
    // Exponential: the window at least doubled from round trip to round trip at first.
    assert!(windows.len() >= 3, "{windows:?}");
    assert!(windows[1] >= 2 * windows[0] - inc(), "{windows:?}");
    // Left slow start on queue delay near the BDP (not at the cap).
    let exit = net.hops[2].congestion().cwnd();
    assert!(
        (300..=480 + (VEGAS_DELTA_INCS + 2) * inc()).contains(&exit),
        "left slow start at {exit}: {windows:?}"
    );
    // And the bottleneck is kept busy: at least 90% of its rate over the next seconds.
    net.advance(Duration::from_secs(1));
    let cells = cells_during(&mut net, sid, Duration::from_secs(2));
    assert!(
        cells >= 7_200,
        "{cells} cells in 2 s on a 4,000 cells/s path"
    );
    // Without letting the queue grow unbounded: the RTT stays within a few increments'
    // queueing of its minimum.
    let cc = net.hops[2].congestion();
    let (min, ewma) = (cc.rtt_min().unwrap(), cc.rtt_ewma().unwrap());
    let max_queue = Duration::from_secs(1) / 4_000 * (VEGAS_DELTA_INCS + 2) * inc();
    assert!(
        ewma <= min + max_queue,
        "rtt {min:?} min, {ewma:?} smoothed"
    );
}

#[test]
fn the_standing_queue_leaves_room_for_an_interactive_circuit() {
    // About 20 Mbit/s of 1 KiB cells (2,500 cells/s) and a 120 ms round trip: a 300-cell BDP,
    // issue 9's fairness setting. The queue a bulk circuit keeps at its bottleneck is what an
    // interactive circuit sharing that bottleneck waits behind: Vegas must hold it between its
    // alpha and beta (62-124 cells, 25-50 ms here), not at a window's worth of cells.
    let rate = 2_500;
    let mut net = bottlenecked(rate);
    net.source_len = 256 * 1024 * 1024;
    let sid = net.begin(begin(SOURCE_PORT));
    net.advance(Duration::from_secs(3));
    let cell_time = Duration::from_secs(1) / rate;
    let before = received(&net, sid);
    // The queueing delay the exit's controller sees, every 50 ms for 4 s.
    let mut queue_ms = Vec::new();
    for _ in 0..80 {
        net.advance(Duration::from_millis(50));
        let cc = net.hops[2].congestion();
        let (min, ewma) = (cc.rtt_min().unwrap(), cc.rtt_ewma().unwrap());
        queue_ms.push(ewma.saturating_sub(min).as_millis());
    }
    let cells = (received(&net, sid) - before) / CELL_DATA;
    queue_ms.sort_unstable();
    let median = queue_ms[queue_ms.len() / 2];
    let beta_ms = (cell_time * VEGAS_BETA_INCS * inc()).as_millis();
    // At most 50 ms (half of an interactive first byte's 109 ms alone at 10 ms per link): the
    // old targets (3 and 6 increments, 93-186 cells) let it sit at 37-74 ms.
    assert!(
        median <= 50 && median <= beta_ms + 5,
        "median queue {median} ms (beta {beta_ms} ms): {queue_ms:?}"
    );
    // Without starving the path: the bottleneck stays at least 90% busy.
    assert!(
        cells >= rate as usize * 4 * 9 / 10,
        "{cells} cells in 4 s on a {rate} cells/s path"
    );
    assert!(
        queue_ms[queue_ms.len() / 10] >= 1,
        "no queue at all: the bottleneck idles {queue_ms:?}"
    );
}

#[test]
fn the_window_falls_when_the_bottleneck_slows() {
    let mut net = bottlenecked(8_000);
    net.source_len = 256 * 1024 * 1024;
    let sid = net.begin(begin(SOURCE_PORT));
    net.advance(Duration::from_secs(3));
    let high = net.hops[2].congestion().cwnd();
    assert!(high >= 900, "cwnd {high} on a 960-cell BDP");
    // The bottleneck drops to a quarter: queue delay rises and Vegas must back off.
    net.link_cell_time.insert(2, Duration::from_secs(1) / 2_000);
    net.advance(Duration::from_secs(4));
    let low = net.hops[2].congestion().cwnd();
    assert!(
        low <= 240 + (VEGAS_DELTA_INCS + 2) * inc() && low * 2 < high,
        "cwnd {high} -> {low}; the BDP is now 240"
    );
    // The path stays busy at its new rate.
    let cells = cells_during(&mut net, sid, Duration::from_secs(2));
    assert!(
        cells >= 3_600,
        "{cells} cells in 2 s on a 2,000 cells/s path"
    );
}

#[test]
fn throughput_recovers_after_a_stall() {
    let mut net = bottlenecked(4_000);
    net.source_len = 256 * 1024 * 1024;
    let sid = net.begin(begin(SOURCE_PORT));
    net.advance(Duration::from_secs(3));
    let before = cells_during(&mut net, sid, Duration::from_secs(1));
    assert!(before >= 3_600, "{before}");
    // The guard–middle link stalls for 2 s (a frozen relay); nothing is lost.
    net.stall_link(1, Duration::from_secs(2));
    net.advance(Duration::from_secs(2));
    let cwnd_after = net.hops[2].congestion().cwnd();
    assert!(
        cwnd_after < CWND_MAX,
        "the window must not run away during a stall"
    );
    // Within a few seconds the stream runs at the bottleneck rate again.
    net.advance(Duration::from_secs(3));
    let after = cells_during(&mut net, sid, Duration::from_secs(1));
    assert!(
        after * 10 >= before * 9,
        "{before} cells/s before the stall, {after} after"
    );
    assert!(net.destroyed.is_empty(), "{:?}", net.destroyed);
    let got = &net.received[&sid];
    assert!(*got == pattern_bytes(got.len()), "bytes lost or reordered");
}

#[test]
fn optimistic_data_reaches_the_exit_before_connected_and_costs_one_round_trip() {
    let mut net = Net::new(3, L);
    net.connect_delay = Duration::from_millis(30);
    net.build();
    let t0 = net.now;
    let sid = net.begin(begin(ECHO_PORT));
    // The application's request rides right behind BEGIN, before any answer came back.
    let request = b"GET / HTTP/1.1\r\nHost: dest.example\r\n\r\n";
    net.upload(sid, request);
    net.run_until(Duration::from_secs(5), |n| {
        received(n, sid) >= request.len()
    });
    assert_eq!(&net.received[&sid][..], &request[..]);
    let key = net
        .connected_at
        .keys()
        .next()
        .copied()
        .expect("one stream at the exit");
    // The exit held the bytes and wrote them the moment the connection was up (CONNECTED went
    // out at that same instant, behind them on the way back).
    assert_eq!(net.first_byte_at[&key], net.connected_at[&key]);
    assert_eq!(net.connected_at[&key] - t0, 3 * L + net.connect_delay);
    // The response is back one circuit round trip (plus the connect) after BEGIN; without
    // optimistic data the request would have waited for CONNECTED: two round trips.
    let one_rtt = 6 * L + net.connect_delay;
    assert_eq!(net.now - t0, one_rtt);
    assert!(
        net.client_events
            .iter()
            .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
    );
}

#[test]
fn uploads_are_congestion_controlled_by_the_client() {
    // The client is the sender of uploads: its controller runs against the exit's SENDMEs.
    let mut net = Net::new(3, L);
    net.link_cell_time.insert(1, Duration::from_secs(1) / 4_000);
    net.build();
    let sid = net.begin(begin(ECHO_PORT));
    let data = pattern_bytes(6 * 1024 * 1024);
    net.upload(sid, &data);
    net.run_until(Duration::from_secs(30), |n| received(n, sid) >= data.len());
    assert!(net.received[&sid] == data);
    let cc = net.client.congestion();
    assert!(!cc.in_slow_start(), "{cc:?}");
    assert!(cc.cwnd() < CWND_MAX, "{cc:?}");
    assert!(cc.rtt_min().is_some());
}
