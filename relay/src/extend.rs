//! EXTEND: open (or reuse) a link to the next relay, send CREATE, answer EXTENDED or TRUNCATED.

use std::sync::Arc;
use std::time::Duration;

use allium_proto::cell::{Cell, CellCmd, CircId, Create, Created, DestroyReason};
use allium_proto::relaymsg::{Extend, Extended, RelayMsg, Truncated};
use tokio::sync::oneshot;

use crate::circuit::{Circuit, Next, Side, Violation};
use crate::ctx::Ctx;
use crate::link::{InsertError, Slot};

/// Longest time from EXTEND to CREATED.
pub const EXTEND_TIMEOUT: Duration = Duration::from_secs(20);

/// EXTEND arrived (already decrypted, addressed to this hop).
pub(crate) fn on_extend(
    circ: &Arc<Circuit>,
    ctx: &Arc<Ctx>,
    cmd: CellCmd,
    ext: Extend,
) -> Result<(), Violation> {
    if cmd != CellCmd::RELAY_EARLY {
        return Err(Violation);
    }
    {
        let mut inner = circ.lock();
        if !matches!(inner.next, Next::None) || !inner.streams.is_empty() {
            return Err(Violation);
        }
        inner.next = Next::Extending;
    }
    let circ = Arc::clone(circ);
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let res = tokio::time::timeout(EXTEND_TIMEOUT, extend(&circ, &ctx, ext)).await;
        let reason = match res {
            Ok(Ok(())) => return,
            Ok(Err(reason)) => reason,
            Err(_) => DestroyReason::TIMEOUT,
        };
        fail_extend(&circ, &ctx, reason).await;
    });
    Ok(())
}

async fn extend(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, ext: Extend) -> Result<(), DestroyReason> {
    let id = ext.relay_id().ok_or(DestroyReason::PROTOCOL)?;
    if id.ct_eq(&ctx.keys.id) {
        return Err(DestroyReason::PROTOCOL);
    }
    let Some(known) = ctx.lookup_relay(&id) else {
        ctx.refetch.notify_one();
        return Err(DestroyReason::CONNECTFAILED);
    };
    // The client's address must be one the consensus lists for that identity.
    let addr = ext
        .addrs()
        .find(|a| known.addrs.contains(a))
        .ok_or(DestroyReason::CONNECTFAILED)?;
    let link = ctx
        .links
        .get_or_connect(ctx, id, addr, known.link_key)
        .await
        .ok_or(DestroyReason::CONNECTFAILED)?;
    if circ.is_closed() {
        return Ok(());
    }
    let (tx, rx) = oneshot::channel();
    let next_id = match link.allocate(Slot {
        circ: Arc::clone(circ),
        side: Side::Next,
    }) {
        Ok(i) => i,
        Err(InsertError::Full) => return Err(DestroyReason::RESOURCELIMIT),
        Err(_) => return Err(DestroyReason::CONNECTFAILED),
    };
    {
        let mut inner = circ.lock();
        if circ.is_closed() || !matches!(inner.next, Next::Extending) {
            drop(inner);
            link.remove(next_id);
            return Ok(());
        }
        inner.next = Next::Pending {
            link: Arc::clone(&link),
            id: next_id,
            tx: Some(tx),
        };
    }
    let cid = CircId::new(next_id).ok_or(DestroyReason::INTERNAL)?;
    let create = Create {
        htype: ext.htype,
        hdata: ext.hdata,
    };
    let cell = Cell::create(cid, &create).map_err(|_| DestroyReason::PROTOCOL)?;
    if !link.sink.send(cell).await {
        return Err(DestroyReason::CONNECTFAILED);
    }
    // Dropped sender (circuit destroyed, DESTROY from the next hop) ends the wait.
    let body = rx.await.map_err(|_| DestroyReason::DESTROYED)?;
    let created = Created::decode(&body[..]).map_err(|_| DestroyReason::PROTOCOL)?;
    complete(circ, ctx, created.hdata).await;
    Ok(())
}

/// CREATED arrived: the next hop is open; tell the client with EXTENDED.
async fn complete(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, hdata: Vec<u8>) {
    {
        let mut inner = circ.lock();
        let next = std::mem::replace(&mut inner.next, Next::None);
        inner.next = match next {
            Next::Pending { link, id, .. } => Next::Open { link, id },
            other => other,
        };
    }
    let msg = RelayMsg::Extended(Extended { hdata });
    circ.send_msg(ctx, 0, &msg).await;
}

/// The extension failed: drop any half-built next hop and send TRUNCATED.
async fn fail_extend(circ: &Arc<Circuit>, ctx: &Arc<Ctx>, reason: DestroyReason) {
    if circ.is_closed() {
        return;
    }
    let next = {
        let mut inner = circ.lock();
        if matches!(inner.next, Next::Open { .. }) {
            // The extension completed after all (the timeout raced with EXTENDED).
            return;
        }
        std::mem::replace(&mut inner.next, Next::None)
    };
    if let Next::Pending { link, id, .. } = next {
        link.remove(id);
        link.send_destroy_detached(id, DestroyReason::NONE);
    }
    let msg = RelayMsg::Truncated(Truncated { reason });
    circ.send_msg(ctx, 0, &msg).await;
}
