//! The handshake pool: CREATE cells are answered here, off the link readers (Tor's onionskin
//! queue).
//!
//! A link reader reserves the circuit id and calls [`submit`]; a few worker tasks take jobs
//! oldest first and run [`crate::core::answer_create`] (the public-key work). The queue is
//! bounded ([`Limits::create_queue`]): when it is full the *oldest* job is dropped, and a job
//! that waited longer than [`Limits::create_max_delay`] is dropped when a worker reaches it.
//! A link may have at most [`Limits::create_per_link`] CREATEs waiting (checked by its reader
//! before queueing), so one flooding link cannot evict every other link's CREATEs. Dropped
//! CREATEs are answered with DESTROY reason RESOURCELIMIT and counted in
//! [`crate::Stats::creates_dropped`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use allium_crypto::X25519Secret;
use allium_proto::cell::{Cell, CircId, DestroyReason};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::core::{CoreConfig, answer_create_body};
use crate::ctx::{Ctx, Limits};
use crate::link::{Link, coarse_now};

/// One CREATE waiting for a worker.
struct Job {
    link: Arc<Link>,
    /// The reserved id (the CREATE cell's own).
    id: CircId,
    cell: Cell,
    queued: Instant,
}

/// The queue shared by the link readers and the workers.
#[derive(Default)]
pub(crate) struct CreateQueue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Notify,
}

impl std::fmt::Debug for CreateQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateQueue").finish_non_exhaustive()
    }
}

impl CreateQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Queue a CREATE whose id `id` `link` has reserved. Never waits: if the queue is full, the
/// oldest job is refused to make room.
pub(crate) fn submit(ctx: &Ctx, link: Arc<Link>, id: CircId, cell: Cell, now: Instant) {
    let dropped = {
        let mut q = ctx.creates.lock();
        let dropped = if q.len() >= ctx.limits.create_queue.max(1) {
            q.pop_front()
        } else {
            None
        };
        q.push_back(Job {
            link,
            id,
            cell,
            queued: now,
        });
        dropped
    };
    if let Some(job) = dropped {
        refuse(ctx, &job, DestroyReason::RESOURCELIMIT);
    }
    ctx.creates.ready.notify_one();
}

/// Refuse a CREATE that was dropped from the queue.
fn refuse(ctx: &Ctx, job: &Job, reason: DestroyReason) {
    ctx.stats.note_create_dropped();
    job.link.unreserve(job.id);
    job.link.send_destroy_detached(job.id, reason);
}

/// Start the workers; they stop at shutdown.
pub(crate) fn spawn_workers(ctx: &Arc<Ctx>) -> Vec<JoinHandle<()>> {
    (0..ctx.limits.create_workers.max(1))
        .map(|_| tokio::spawn(worker(Arc::clone(ctx))))
        .collect()
}

async fn worker(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let job = ctx.creates.lock().pop_front();
        let Some(job) = job else {
            tokio::select! {
                () = ctx.creates.ready.notified() => {}
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let now = coarse_now();
        if now.saturating_duration_since(job.queued) > ctx.limits.create_max_delay {
            refuse(&ctx, &job, DestroyReason::RESOURCELIMIT);
            continue;
        }
        answer(&ctx, job, now);
        // Let readers and reactors run between handshakes.
        tokio::task::yield_now().await;
    }
}

/// Run the handshake and start the circuit's reactor (or refuse).
fn answer(ctx: &Arc<Ctx>, job: Job, now: Instant) {
    let Job { link, id, cell, .. } = job;
    if link.is_closed() {
        return;
    }
    let cfg = core_config(ctx, &link);
    let result = {
        let onion = ctx.keys.onion.read().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<&X25519Secret> = std::iter::once(&onion.current)
            .chain(onion.previous.as_ref())
            .collect();
        answer_create_body(&cell.body[..], &ctx.keys.id, &keys, cfg)
    };
    match result {
        Ok((core, created)) => match Cell::created(id, &created) {
            Ok(reply) => crate::reactor::spawn(ctx, core, link, id, reply, now),
            Err(_) => {
                link.unreserve(id);
                link.send_destroy_detached(id, DestroyReason::INTERNAL);
            }
        },
        Err(e) => {
            tracing::debug!(error = %e, "CREATE refused");
            link.unreserve(id);
            link.send_destroy_detached(id, e.wire_reason());
        }
    }
}

/// The core configuration for a circuit whose previous hop is `link`'s peer.
pub(crate) fn core_config(ctx: &Ctx, link: &Link) -> CoreConfig {
    let Limits {
        blocked_cap,
        extend_timeout,
        ..
    } = ctx.limits;
    let mut cfg = CoreConfig::new(
        ctx.keys.id,
        !ctx.is_known_relay_link(link),
        Arc::clone(&ctx.policy),
    );
    cfg.max_streams = ctx.cfg.max_streams_per_circuit;
    cfg.blocked_cap = blocked_cap;
    cfg.extend_timeout = extend_timeout;
    cfg
}
