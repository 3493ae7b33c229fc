//! The handshake pool: CREATE cells are answered here, off the link readers (Tor's onionskin
//! queue).
//!
//! A link reader reserves the circuit id and calls [`submit`]; a few worker threads take jobs
//! oldest first and run [`crate::core::answer_create`] (the public-key work). The workers are
//! dedicated OS threads at a lower scheduling priority (nice +10, where the OS allows it), not
//! tasks on the runtime: under a CREATE flood the link readers and circuit reactors, which carry
//! established circuits, keep the CPU, and the flood only fills (and ages out of) this queue. The queue is
//! bounded ([`Limits::create_queue`]): when it is full the *oldest* job is dropped, and a job
//! that waited longer than [`Limits::create_max_delay`] is dropped when a worker reaches it.
//! A link may have at most [`Limits::create_per_link`] CREATEs waiting (checked by its reader
//! before queueing), so one flooding link cannot evict every other link's CREATEs. Dropped
//! CREATEs are answered with DESTROY reason RESOURCELIMIT and counted in
//! [`crate::Stats::creates_dropped`].

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use allium_crypto::X25519Secret;
use allium_proto::cell::{Cell, CircId, DestroyReason};
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
    ready: Condvar,
    /// When a refusal was last logged, and the refusal count then (one info line a minute).
    last_log: Mutex<Option<(Instant, u64)>>,
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

/// How much lower than the rest of the relay the handshake workers run (nice increment).
const WORKER_NICE: i32 = 10;
/// How often an idle worker checks for shutdown.
const WORKER_POLL: Duration = Duration::from_millis(200);

/// Refuse a CREATE that was dropped from the queue.
fn refuse(ctx: &Ctx, job: &Job, reason: DestroyReason) {
    ctx.stats.note_create_dropped();
    job.link.unreserve(job.id);
    job.link.send_destroy_detached(job.id, reason);
    log_refusals(ctx, coarse_now());
}

/// How often refused CREATEs are reported at info.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Say at info, at most once a minute, that the handshake queue is refusing CREATEs (a flood
/// must not flood the log too). No addresses.
fn log_refusals(ctx: &Ctx, now: Instant) {
    let total = ctx.stats.creates_dropped();
    let mut last = ctx
        .creates
        .last_log
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let since = match *last {
        Some((t, _)) if now.saturating_duration_since(t) < REFUSAL_LOG_EVERY => return,
        Some((_, n)) => total.saturating_sub(n),
        None => total,
    };
    *last = Some((now, total));
    tracing::info!(
        refused = since,
        total,
        "handshake queue full or too slow: CREATE cells refused with DESTROY (RESOURCELIMIT); \
         established circuits are not affected"
    );
}

/// Start the workers (OS threads; they stop at shutdown). Each returned task ends when its
/// worker thread has stopped.
pub(crate) fn spawn_workers(ctx: &Arc<Ctx>) -> Vec<JoinHandle<()>> {
    if ctx.limits.create_on_runtime {
        return (0..ctx.limits.create_workers.max(1))
            .map(|_| tokio::spawn(runtime_worker(Arc::clone(ctx))))
            .collect();
    }
    let rt = tokio::runtime::Handle::current();
    (0..ctx.limits.create_workers.max(1))
        .filter_map(|i| {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let ctx = Arc::clone(ctx);
            let rt = rt.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("allium-onionskin-{i}"))
                .spawn(move || {
                    lower_priority();
                    // Reactors of answered circuits are spawned on the relay's runtime.
                    let _guard = rt.enter();
                    worker(&ctx);
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => Some(tokio::spawn(async move {
                    let _ = done_rx.await;
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a handshake worker thread");
                    None
                }
            }
        })
        .collect()
}

/// Lower this thread's scheduling priority (best effort: some sandboxes refuse).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(tid), current + WORKER_NICE) {
        tracing::debug!(error = %e, "could not lower the handshake worker's priority");
    }
}

fn worker(ctx: &Arc<Ctx>) {
    let shutdown = ctx.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let job = {
            let mut q = ctx.creates.lock();
            if q.is_empty() {
                q = match ctx.creates.ready.wait_timeout(q, WORKER_POLL) {
                    Ok((q, _)) => q,
                    Err(p) => p.into_inner().0,
                };
            }
            q.pop_front()
        };
        if let Some(job) = job {
            run_job(ctx, job);
        }
    }
}

/// The same worker as a task on the runtime ([`Limits::create_on_runtime`], paused-clock tests).
async fn runtime_worker(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.subscribe();
    let mut poll = tokio::time::interval(Duration::from_millis(1));
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let job = ctx.creates.lock().pop_front();
        match job {
            Some(job) => {
                run_job(&ctx, job);
                tokio::task::yield_now().await;
            }
            None => {
                tokio::select! {
                    _ = poll.tick() => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

fn run_job(ctx: &Arc<Ctx>, job: Job) {
    let now = coarse_now();
    if now.saturating_duration_since(job.queued) > ctx.limits.create_max_delay {
        refuse(ctx, &job, DestroyReason::RESOURCELIMIT);
        return;
    }
    answer(ctx, job, now);
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
        ctx.exit_policy(),
    );
    cfg.max_streams = ctx.live().max_streams_per_circuit;
    cfg.circ_queue_cells = ctx.dos.cfg.exit_circuit_queue_cells;
    cfg.blocked_cap = blocked_cap;
    cfg.extend_timeout = extend_timeout;
    cfg
}
