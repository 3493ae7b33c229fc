//! Circuit behaviour end to end, in memory: the real client core against three real relay cores
//! ([`allium_tests::sim::Net`]), simulated time, no sockets. Every figure asserted here (round
//! trips, transfer times) is exact because nothing in the harness reads a clock.

use std::time::Duration;

use allium_client::core::{CircError, Event, StreamTarget};
use allium_proto::cell::DestroyReason;
use allium_proto::relaymsg::{Begin, BeginFlags, EndReason, Target};
use allium_relay::core::Side;
use allium_tests::sim::{
    DISCARD_PORT, Dest, ECHO_PORT, Net, REFUSED_PORT, SOURCE_PORT, Tamper, is_relay, pattern_bytes,
};

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

fn built_net() -> Net {
    let mut net = Net::new(3, L);
    net.build();
    net
}

fn connected(net: &Net, sid: allium_client::core::StreamId) -> bool {
    net.client_events
        .iter()
        .any(|e| matches!(e, Event::StreamConnected { stream } if *stream == sid))
}

fn client_destroyed(net: &Net) -> Option<&CircError> {
    net.client_events.iter().find_map(|e| match e {
        Event::Destroyed { reason } => Some(reason),
        _ => None,
    })
}

#[test]
fn three_hops_build_in_six_link_round_trips() {
    let mut net = Net::new(3, L);
    let start = net.now;
    net.build();
    // CREATE/CREATED over link 0, then each EXTEND crosses one more link each way.
    assert_eq!(net.now - start, 12 * L);
    assert_eq!(net.client.n_hops(), 3);
    assert_eq!(net.hops.len(), 3);
    assert!(
        net.client_events
            .iter()
            .any(|e| matches!(e, Event::HopAdded { hop: 2 }))
    );
    // Both EXTENDs travelled in RELAY_EARLY; nothing else did yet.
    assert_eq!(net.client.relay_early_left(), 6);
}

#[test]
fn bulk_download_is_byte_exact_and_far_beyond_the_old_window_bound() {
    // One-way 50/3 ms per link: a 100 ms circuit round trip, unlimited link rate.
    let mut net = Net::new(3, Duration::from_micros(16_667));
    net.build();
    let len = 48 * 1024 * 1024;
    net.source_len = len;
    let sid = net.begin(begin(SOURCE_PORT));
    let t0 = net.now;
    net.run_until(Duration::from_secs(60), |n| {
        n.received.get(&sid).is_some_and(|r| r.len() >= len)
    });
    let got = &net.received[&sid];
    assert_eq!(got.len(), len);
    assert!(
        *got == pattern_bytes(len),
        "bytes differ from what the source sent"
    );
    // The fixed windows of flow control v1 allowed one stream window (500 cells) per round trip:
    // this transfer would have taken `v1` at best. Congestion control grows past it in slow
    // start and runs at the window cap (5 times that window): at least 3.5 times faster overall.
    let rtt = Duration::from_millis(100);
    let v1 = rtt * len.div_ceil(500 * CELL_DATA) as u32;
    let elapsed = net.now - t0;
    eprintln!(
        "{} MiB in {elapsed:?} of simulated time over a 100 ms circuit ({:.1} MiB/s); the v1 \
         windows needed at least {v1:?}",
        len >> 20,
        len as f64 / 1_048_576.0 / elapsed.as_secs_f64()
    );
    assert!(
        elapsed * 7 <= v1 * 2,
        "{elapsed:?} for {len} bytes; the v1 window bound was {v1:?}"
    );
    let cc = net.hops[2].congestion();
    assert_eq!(cc.cwnd(), allium_proto::flowctl::CWND_MAX, "{cc:?}");
    // The stream ends cleanly once the source is done.
    net.run_until(Duration::from_secs(5), |n| {
        n.client_events
            .iter()
            .any(|e| matches!(e, Event::StreamEnded { stream, result: Ok(()) } if *stream == sid))
    });
}

#[test]
fn echo_upload_round_trip_and_half_close() {
    let mut net = built_net();
    let sid = net.begin(begin(ECHO_PORT));
    net.run_until(Duration::from_secs(5), |n| connected(n, sid));
    let data = pattern_bytes(700_000);
    net.upload(sid, &data);
    net.run_until(Duration::from_secs(60), |n| {
        n.received.get(&sid).is_some_and(|r| r.len() >= data.len())
    });
    assert!(net.received[&sid] == data);
    let dest = net.destinations.values().next().expect("one destination");
    assert!(dest.received == data);
    // Half-close: END DONE from the client reaches the destination as EOF.
    let now = net.now;
    net.client.close_stream(sid, EndReason::DONE, now);
    net.run_until(Duration::from_secs(5), |n| {
        n.destinations.values().all(|d| d.got_eof)
    });
}

#[test]
fn a_client_that_stops_reading_sends_xoff_and_xon_resumes() {
    use allium_proto::flowctl::{XOFF_LIMIT, XOFF_THRESHOLD};
    let mut net = built_net();
    let len = 8 * 1024 * 1024;
    net.source_len = len;
    net.client_reads = false;
    let sid = net.begin(begin(SOURCE_PORT));
    net.advance(Duration::from_secs(5));
    // XOFF at the threshold; the exit stops once it arrives (what was in flight still lands).
    let got = net.received.get(&sid).map_or(0, Vec::len);
    assert!(
        got >= XOFF_THRESHOLD as usize * CELL_DATA && got <= XOFF_LIMIT as usize * CELL_DATA,
        "{got} bytes delivered to a client that does not read"
    );
    assert_eq!(
        net.hops[2].stream_budget(sid.get()),
        Some(0),
        "XOFF in force"
    );
    assert!(got < len);
    let cells = net.cells_on_link.clone();
    net.advance(Duration::from_secs(5));
    assert_eq!(
        net.cells_on_link, cells,
        "cells moved while the stream was stopped"
    );
    net.resume_reading();
    net.run_until(Duration::from_secs(60), |n| {
        n.received.get(&sid).is_some_and(|r| r.len() >= len)
    });
    assert!(net.received[&sid] == pattern_bytes(len));
}

#[test]
fn refused_connection_and_resolution() {
    let mut net = built_net();
    let sid = net.begin(begin(REFUSED_PORT));
    net.run_until(Duration::from_secs(5), |n| {
        n.client_events
            .iter()
            .any(|e| matches!(e, Event::StreamEnded { stream, result: Err(_) } if *stream == sid))
    });
    let r = net.begin(StreamTarget::Resolve("dest.example".to_owned()));
    net.run_until(Duration::from_secs(5), |n| {
        n.client_events.iter().any(
            |e| matches!(e, Event::Resolved { stream, addrs } if *stream == r && addrs.len() == 1),
        )
    });
    let unknown = net.begin(StreamTarget::Resolve("nowhere.example".to_owned()));
    net.run_until(Duration::from_secs(5), |n| {
        n.client_events.iter().any(|e| match e {
            Event::Resolved { stream, addrs } => *stream == unknown && addrs.is_empty(),
            Event::StreamEnded { stream, .. } => *stream == unknown,
            _ => false,
        })
    });
    // The circuit survives failed streams.
    assert!(client_destroyed(&net).is_none());
}

/// Flip one bit of each of the first few forward relay cells the guard passes to the middle:
/// the middle destroys the circuit at the first one, and the exit never sees a tagged cell.
#[test]
fn a_tagged_forward_cell_is_caught_by_the_next_hop() {
    for bit in [0usize, 8 * 100 + 3, 8 * 1018 + 7] {
        let mut net = built_net();
        let sid = net.begin(begin(DISCARD_PORT));
        net.run_until(Duration::from_secs(5), |n| connected(n, sid));
        net.tamper(move |dest, cell| {
            if dest
                == (Dest::Hop {
                    hop: 1,
                    from: Side::Prev,
                })
                && is_relay(cell)
            {
                cell.body[bit / 8] ^= 1 << (bit % 8);
            }
            Tamper::Deliver
        });
        net.upload(sid, &[0x55; 3000]);
        net.run_until(Duration::from_secs(5), |n| client_destroyed(n).is_some());
        assert!(
            net.hops[1].is_closed(),
            "the middle did not destroy the circuit"
        );
        assert!(net.hops[2].is_closed(), "the exit was not told");
        assert!(
            net.destinations.values().all(|d| d.received.is_empty()),
            "a tagged cell reached the destination"
        );
    }
}

/// A cell altered on its way back is caught by the client, which destroys the circuit.
#[test]
fn a_tagged_backward_cell_is_caught_by_the_client() {
    let mut net = built_net();
    net.source_len = 10_000_000;
    let sid = net.begin(begin(SOURCE_PORT));
    net.run_until(Duration::from_secs(5), |n| connected(n, sid));
    let mut n = 0;
    net.tamper(move |dest, cell| {
        if dest == Dest::Client && is_relay(cell) {
            n += 1;
            if n == 10 {
                cell.body[500] ^= 0x01;
            }
        }
        Tamper::Deliver
    });
    net.run_until(Duration::from_secs(5), |n| client_destroyed(n).is_some());
    assert!(matches!(client_destroyed(&net), Some(CircError::Auth(_))));
    // The client told the guard, and the guard the rest of the path.
    net.advance(Duration::from_secs(1));
    assert!(net.hops.iter().all(|h| h.is_closed()));
}

/// Replaying or dropping a forward cell breaks the ratchet at the next hop.
#[test]
fn replayed_or_dropped_forward_cells_destroy_the_circuit() {
    for replay in [true, false] {
        let mut net = built_net();
        let sid = net.begin(begin(DISCARD_PORT));
        net.run_until(Duration::from_secs(5), |n| connected(n, sid));
        let mut seen = 0;
        net.tamper(move |dest, cell| {
            if dest
                == (Dest::Hop {
                    hop: 1,
                    from: Side::Prev,
                })
                && is_relay(cell)
            {
                seen += 1;
                if seen == 2 {
                    return if replay {
                        Tamper::Duplicate
                    } else {
                        Tamper::Drop
                    };
                }
            }
            Tamper::Deliver
        });
        net.upload(sid, &[0xAA; 10 * CELL_DATA]);
        net.run_until(Duration::from_secs(5), |n| client_destroyed(n).is_some());
        assert!(net.hops[1].is_closed(), "replay: {replay}");
        let dest = net.destinations.values().next().expect("destination");
        // The original of the replayed cell got through, then its copy failed; a dropped cell
        // makes the next one fail.
        let through = if replay { 2 } else { 1 };
        assert_eq!(dest.received.len(), through * CELL_DATA, "replay: {replay}");
    }
}

#[test]
fn extend_to_an_unreachable_relay_is_truncated() {
    let mut net = Net::new(3, L);
    let exit = net.relays[2].id;
    net.unreachable.insert(exit);
    net.run_until(Duration::from_secs(10), |n| client_destroyed(n).is_some());
    assert!(net.client_events.iter().any(|e| matches!(
        e,
        Event::ExtendFailed {
            hop: 2,
            error: CircError::Truncated {
                hop: 1,
                reason: DestroyReason::CONNECTFAILED
            }
        }
    )));
    assert_eq!(net.hops.len(), 2);
}

#[test]
fn a_lost_create_times_the_build_out() {
    let mut net = Net::new(3, L);
    net.tamper(|dest, _| {
        if matches!(dest, Dest::Create { hop: 2, .. }) {
            Tamper::Drop
        } else {
            Tamper::Deliver
        }
    });
    let start = net.now;
    net.run_until(Duration::from_secs(30), |n| client_destroyed(n).is_some());
    assert!(matches!(
        client_destroyed(&net),
        Some(CircError::BuildTimeout { hop: 2 })
    ));
    assert_eq!(
        net.now - start,
        Duration::from_secs(10),
        "default build timeout"
    );
}

#[test]
fn client_close_destroys_every_hop_and_stream() {
    let mut net = built_net();
    net.source_len = 10_000_000;
    let sid = net.begin(begin(SOURCE_PORT));
    net.run_until(Duration::from_secs(5), |n| connected(n, sid));
    net.advance(Duration::from_millis(500));
    net.client.close();
    net.advance(Duration::from_secs(1));
    for (i, h) in net.hops.iter().enumerate() {
        assert!(h.is_closed(), "hop {i} still open");
    }
    assert!(net.destinations.values().all(|d| d.closed));
    // After the DESTROY nothing moves.
    let cells = net.cells_on_link.clone();
    net.advance(Duration::from_secs(5));
    assert_eq!(net.cells_on_link, cells);
}

/// The guard cannot write to a frozen client link: past the blocked cap it destroys the circuit
/// towards the rest of the path (nothing piles up at the middle or the exit).
#[test]
fn a_frozen_client_link_is_destroyed_after_the_blocked_cap() {
    let mut net = built_net();
    net.source_len = 50_000_000;
    let sid = net.begin(begin(SOURCE_PORT));
    net.run_until(Duration::from_secs(5), |n| connected(n, sid));
    net.advance(Duration::from_millis(300));
    net.freeze_client_link();
    net.advance(Duration::from_secs(29));
    assert!(!net.hops[0].is_closed(), "destroyed before the cap");
    net.advance(Duration::from_secs(2));
    assert!(net.hops[0].is_closed(), "not destroyed after the cap");
    net.advance(Duration::from_secs(1));
    assert!(net.hops[1].is_closed() && net.hops[2].is_closed());
    assert!(net.destinations.values().all(|d| d.closed));
}
