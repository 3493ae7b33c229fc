//! Driver test of the per-client scheduling groups (`crate::reactor`, `allium_proto::circmux`):
//! circuits from client links at two addresses through one relay onto one next-hop link, whose
//! scheduler the test drains as a link writer would. Fails if the relay stops grouping.

use std::collections::HashMap;
use std::sync::Mutex;

use allium_proto::circmux::{CircuitMux, MuxConfig};
use tokio::sync::Notify;

use super::*;
use crate::link::MemMux;

/// A link the relay believes it opened to relay [`NEXT`] (registered, so EXTEND reuses it),
/// whose outgoing cells wait in a scheduler large enough for everything the test sends. Returns
/// the sender of cells from `NEXT` and the scheduler.
fn attach_next_mux(r: &TestRelay) -> (mpsc::Sender<Cell>, Arc<MemMux>) {
    let mm = Arc::new(MemMux {
        mux: Mutex::new(CircuitMux::new(MuxConfig {
            circ_cap: 10_000,
            total_cap: 100_000,
            ..MuxConfig::default()
        })),
        room: Notify::new(),
    });
    let (tx_in, rx_in) = mpsc::channel(8192);
    let link = Link::new(CellSink::Mux(Arc::clone(&mm)), true, Some(NEXT), None, 4096);
    tokio::spawn(run_reader(
        Arc::clone(&r.ctx),
        Arc::clone(&link),
        CellSource::Mpsc(rx_in),
    ));
    r.ctx.links.register(NEXT, &link);
    crate::add_known_relay(
        &r.ctx,
        NEXT,
        "127.0.0.1:9".parse().unwrap(),
        X25519Public([0; 32]),
    );
    (tx_in, mm)
}

fn pop(mm: &MemMux) -> Option<Cell> {
    let c = mm.mux.lock().unwrap().pop(test_now());
    mm.room.notify_waiters();
    c
}

async fn pop_wait(mm: &MemMux) -> Cell {
    tokio::time::timeout(T, async {
        loop {
            if let Some(c) = pop(mm) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("timed out waiting for a cell on the next link")
}

/// Extend `tc` to [`NEXT`] through the scheduler link; returns its id there.
async fn extend_mux(
    ml: &mut MemLink,
    tc: &mut TestCirc,
    next_tx: &mpsc::Sender<Cell>,
    mm: &MemMux,
) -> CircId {
    let ext = RelayMsg::Extend(Extend {
        specs: vec![
            LinkSpec::Ed25519Id(NEXT),
            LinkSpec::Ipv4("127.0.0.1:9".parse().unwrap()),
        ],
        htype: 1,
        hdata: vec![0; 100],
    });
    let (c, _) = relay_cell(tc, 0, CellCmd::RELAY_EARLY, 0, &ext);
    ml.tx.send(c).await.unwrap();
    let create = pop_wait(mm).await;
    assert_eq!(create.cmd, CellCmd::CREATE);
    let next_id = create.circ_id.unwrap();
    next_tx
        .send(Cell::created(next_id, &Created { hdata: vec![1; 64] }).unwrap())
        .await
        .unwrap();
    let (_, _, msg, _) = open_backward(tc, ml.recv().await);
    assert!(matches!(msg, RelayMsg::Extended(_)), "{msg:?}");
    tc.cc.add_hop(&hop2_keys()).unwrap();
    next_id
}

/// Twenty busy circuits from one address (over two links) and one from another share one
/// next-hop link: each address gets about half of it, not 1/21 for the lone circuit. Circuits
/// from a relay's link at the busy address are not put in its group. The gauge counts the
/// grouped circuits and falls back to 0 when they close.
#[tokio::test]
async fn one_address_with_many_circuits_does_not_crowd_out_another() {
    const PER_ATTACKER: usize = 40;
    const HONEST: usize = 200;
    let r = test_relay(ExitPolicy::default());
    let (next_tx, mm) = attach_next_mux(&r);
    let mut circs: Vec<(MemLink, Vec<(TestCirc, CircId)>)> = Vec::new();
    // Two client links from the attacker's address, one from the honest client's, and a relay's
    // link from the attacker's address.
    for (ip, as_relay, n) in [
        ("127.0.0.77", false, 10),
        ("127.0.0.77", false, 10),
        ("127.0.0.1", false, 1),
        ("127.0.0.77", true, 2),
    ] {
        // The relay at the other end is not NEXT (that would be extending back).
        let peer = as_relay.then_some(RelayId([8; 32]));
        let mut ml = attach_full(&r.ctx, peer, false, 2048, 16);
        ml.link.set_peer_ip(ip.parse().unwrap());
        let mut on_link = Vec::new();
        for _ in 0..n {
            let mut tc = create_circuit(&mut ml, &r.ctx).await;
            let next_id = extend_mux(&mut ml, &mut tc, &next_tx, &mm).await;
            on_link.push((tc, next_id));
        }
        circs.push((ml, on_link));
    }
    let ids = |links: std::ops::Range<usize>| -> Vec<CircId> {
        circs[links]
            .iter()
            .flat_map(|(_, cs)| cs.iter().map(|(_, id)| *id))
            .collect()
    };
    let (attacker, honest, relayed) = (ids(0..2), ids(2..3)[0], ids(3..4));
    {
        let m = mm.mux.lock().unwrap();
        let g = m.group_of(attacker[0]);
        assert!(g.is_some());
        assert!(attacker.iter().all(|&id| m.group_of(id) == g));
        assert!(m.group_of(honest).is_some() && m.group_of(honest) != g);
        assert!(relayed.iter().all(|&id| m.group_of(id).is_none()));
        assert_eq!(m.n_groups(), 2);
    }
    assert_eq!(r.ctx.stats.grouped_circuits(), 21);

    // Every client circuit queues its cells for hop 2; nothing leaves until all are queued.
    let drop_msg = RelayMsg::Drop(Default::default());
    for (ml, cs) in &mut circs[..3] {
        let n = if cs.len() == 1 { HONEST } else { PER_ATTACKER };
        for (tc, _) in cs.iter_mut() {
            for _ in 0..n {
                let (c, _) = relay_cell(tc, 1, CellCmd::RELAY, 0, &drop_msg);
                ml.tx.send(c).await.unwrap();
            }
        }
    }
    let total = 20 * PER_ATTACKER + HONEST;
    wait_until(|| mm.mux.lock().unwrap().len() == total).await;

    // The link sends 200 cells: about half are the honest circuit's (it starts a little ahead,
    // its address having sent 1 CREATE here against 20). Per circuit it would be about 1/21.
    let mut counts: HashMap<bool, usize> = HashMap::new();
    for _ in 0..200 {
        let c = pop(&mm).unwrap();
        *counts.entry(c.circ_id == Some(honest)).or_default() += 1;
    }
    let honest_cells = counts.get(&true).copied().unwrap_or(0);
    assert!((90..=125).contains(&honest_cells), "{counts:?}");
    assert!(mm.mux.lock().unwrap().grouped_sent() >= 200);

    // The client links close: their circuits end and the gauge falls back.
    drop(circs);
    wait_until(|| r.ctx.stats.grouped_circuits() == 0).await;
}
