//! The relay's Prometheus metrics page ([`RelayHandle::metrics_text`]), written with
//! `allium_proto::metrics` from the counters in [`crate::Stats`] and the consensus held.
//!
//! Families: `allium_relay_bytes_total{direction}` (bytes of link frames read and written, as
//! the channel counts them once per frame), `allium_relay_cells_total{direction}` (the
//! cells in those frames), `allium_link_queued_bytes`
//! (cells waiting in link send queues), `allium_sched_grouped_circuits` and
//! `allium_sched_grouped_cells_total` (circuits scheduled per client address on their next link,
//! and the cells they sent: `allium_proto::circmux` groups), `allium_circuits_open`,
//! `allium_circuits_created_total`, `allium_streams_open` (exit streams),
//! `allium_dos_rejections_total{reason}` (reasons: the circuit layer's and every
//! [`crate::dos::Refusal`]), `allium_relay_queued_bytes`, `allium_consensus_age_seconds`,
//! `allium_bootstrap_percent` (0 without a consensus, 100 with one) and
//! `allium_relay_flag{flag}` (1 when the consensus gives this relay the flag),
//! `allium_dir_streams_open`, `allium_dir_requests_total{outcome}`, `allium_dir_bytes_total`,
//! and the onion-service points ([`crate::hs`]): `allium_hs_intro_registrations`,
//! `allium_hs_intro_registrations_total`, `allium_hs_introduce_replays_total`,
//! `allium_hs_rendezvous_waiting`, `allium_hs_rendezvous_joined`,
//! `allium_hs_rendezvous_joins_total`; the HSDir store ([`crate::hsdir`]):
//! `allium_hsdir_descriptors`, `allium_hsdir_requests_total{outcome}`.

use allium_directory::doc::Flags;
use allium_proto::metrics::{Exposition, MetricType};

use crate::RelayHandle;
use crate::ctx::Ctx;

impl RelayHandle {
    /// The Prometheus metrics page (text exposition format 0.0.4), as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        page(&self.ctx, allium_directory::now_unix()).finish()
    }
}

/// Bind `metrics_address` if it is configured; the task serving it is returned to join the
/// relay's others.
pub(crate) async fn start(
    ctx: &std::sync::Arc<Ctx>,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::RelayError> {
    let Some(addr) = ctx.cfg.metrics_address else {
        return Ok(None);
    };
    let (l, _bound) = allium_proto::metrics::bind(addr, ctx.cfg.metrics_allow_public)
        .await
        .map_err(|why| crate::RelayError::ConfigInvalid {
            key: "metrics_address",
            why,
        })?;
    let c = std::sync::Arc::clone(ctx);
    let render: allium_proto::metrics::Render =
        std::sync::Arc::new(move || page(&c, allium_directory::now_unix()).finish());
    Ok(Some(tokio::spawn(allium_proto::metrics::serve(l, render))))
}

/// The page for the relay behind `ctx` at `now` (Unix seconds).
pub(crate) fn page(ctx: &Ctx, now: u64) -> Exposition {
    let s = &ctx.stats;
    let mut e = Exposition::new();
    e.family(
        "allium_relay_bytes_total",
        MetricType::Counter,
        "Bytes read from and written to links (whole frames, framing included).",
    )
    .sample(&[("direction", "read")], ctx.link_bytes.read() as f64)
    .sample(&[("direction", "written")], ctx.link_bytes.written() as f64);
    e.family(
        "allium_relay_cells_total",
        MetricType::Counter,
        "Cells read from and written to links (the cells of the frames relay_bytes_total counts).",
    )
    .sample(&[("direction", "read")], ctx.link_bytes.cells_read() as f64)
    .sample(
        &[("direction", "written")],
        ctx.link_bytes.cells_written() as f64,
    );
    e.single(
        "allium_link_queued_bytes",
        MetricType::Gauge,
        "Bytes of cells waiting in the send queues of open links, now.",
        ctx.link_bytes.queued_bytes() as f64,
    );
    e.single(
        "allium_sched_grouped_circuits",
        MetricType::Gauge,
        "Open circuits from clients that share their next link by client address (one \
         scheduling group per IPv4 address or IPv6 /64), now.",
        s.grouped_circuits() as f64,
    );
    e.single(
        "allium_sched_grouped_cells_total",
        MetricType::Counter,
        "Cells written to links by circuits scheduled in a client-address group.",
        ctx.link_bytes.cells_written_grouped() as f64,
    );
    e.single(
        "allium_circuits_open",
        MetricType::Gauge,
        "Circuits currently open through this relay (as any hop).",
        s.open_circuits() as f64,
    );
    e.single(
        "allium_circuits_created_total",
        MetricType::Counter,
        "Circuits created through this relay since start.",
        s.total_circuits() as f64,
    );
    let exit_open = ctx
        .cfg
        .max_exit_streams
        .saturating_sub(ctx.exit_slots.available_permits());
    e.single(
        "allium_streams_open",
        MetricType::Gauge,
        "Exit streams (destination sockets) currently open.",
        exit_open as f64,
    );
    e.family(
        "allium_dos_rejections_total",
        MetricType::Counter,
        "Circuits and CREATEs refused to protect the relay, by reason.",
    )
    .sample(&[("reason", "queue_overflow")], s.queue_overflows() as f64)
    .sample(
        &[("reason", "blocked_destroy")],
        s.blocked_destroys() as f64,
    )
    .sample(&[("reason", "create_dropped")], s.creates_dropped() as f64)
    .sample(
        &[("reason", "protocol_violation")],
        s.protocol_violations() as f64,
    );
    for r in crate::dos::Refusal::ALL {
        e.sample(&[("reason", r.label())], s.dos_rejections(r) as f64);
    }
    e.single(
        "allium_dos_link_read_pauses_total",
        MetricType::Counter,
        "Times a client link was not read for a while because its refused CREATEs came faster \
         than dos.link_refusal_rate.",
        s.link_pauses() as f64,
    );
    e.single(
        "allium_exit_sendmes_withheld_total",
        MetricType::Counter,
        "Circuit SENDMEs withheld because the circuit's exit streams held more than \
         dos.exit_circuit_queue_cells unwritten cells.",
        s.sendmes_withheld() as f64,
    );
    e.single(
        "allium_relay_queued_bytes",
        MetricType::Gauge,
        "Bytes queued in circuit queues now (capped by dos.max_queued_bytes).",
        ctx.dos.mem.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    e.single(
        "allium_dir_streams_open",
        MetricType::Gauge,
        "Directory (BEGIN_DIR) streams being served now.",
        s.dir_streams_open() as f64,
    );
    e.family(
        "allium_dir_requests_total",
        MetricType::Counter,
        "Directory streams by outcome: answered in full, or refused/cut (limits, timeout, \
         oversized request, dir_cache off).",
    )
    .sample(&[("outcome", "served")], s.dir_requests_served() as f64)
    .sample(&[("outcome", "refused")], s.dir_streams_refused() as f64);
    e.single(
        "allium_dir_bytes_total",
        MetricType::Counter,
        "Bytes of directory responses served over BEGIN_DIR.",
        s.dir_bytes_served() as f64,
    );
    let hs = ctx.hs.counts();
    e.single(
        "allium_hs_intro_registrations",
        MetricType::Gauge,
        "Introduction circuits registered at this relay now (onion services' intro points).",
        hs.intro_registrations as f64,
    );
    e.single(
        "allium_hs_intro_registrations_total",
        MetricType::Counter,
        "ESTABLISH_INTROs accepted since start.",
        hs.intro_registrations_total as f64,
    );
    e.single(
        "allium_hs_introduce_replays_total",
        MetricType::Counter,
        "INTRODUCE1s refused as replays since start.",
        hs.introduce_replays_refused as f64,
    );
    e.single(
        "allium_hs_rendezvous_waiting",
        MetricType::Gauge,
        "Client circuits waiting under a rendezvous cookie now.",
        hs.rend_waiting as f64,
    );
    e.single(
        "allium_hs_rendezvous_joined",
        MetricType::Gauge,
        "Joined rendezvous circuit pairs now.",
        hs.rend_joined as f64,
    );
    e.single(
        "allium_hs_rendezvous_joins_total",
        MetricType::Counter,
        "Rendezvous circuit pairs joined since start.",
        hs.rend_joins_total as f64,
    );
    let hd = {
        let store = ctx.hsdir.lock().unwrap_or_else(|p| p.into_inner());
        crate::hsdir::counts(&store)
    };
    e.single(
        "allium_hsdir_descriptors",
        MetricType::Gauge,
        "Onion-service descriptors held as an HSDir now.",
        hd.stored as f64,
    );
    e.family(
        "allium_hsdir_requests_total",
        MetricType::Counter,
        "Descriptor requests at this HSDir by outcome.",
    )
    .sample(&[("outcome", "stored")], hd.uploads_stored as f64)
    .sample(&[("outcome", "upload_refused")], hd.uploads_refused as f64)
    .sample(&[("outcome", "served")], hd.fetches_served as f64)
    .sample(&[("outcome", "not_found")], hd.fetches_missed as f64);
    let nd = ctx.netdir();
    e.single(
        "allium_consensus_age_seconds",
        MetricType::Gauge,
        "Seconds since the consensus in use became valid (NaN: no consensus yet).",
        nd.as_ref()
            .map_or(f64::NAN, |nd| now.saturating_sub(nd.valid_after()) as f64),
    );
    e.single(
        "allium_bootstrap_percent",
        MetricType::Gauge,
        "100 once the relay holds a consensus, 0 before.",
        if nd.is_some() { 100.0 } else { 0.0 },
    );
    let ours = nd
        .as_ref()
        .and_then(|nd| nd.by_id(&ctx.keys.id).map(|e| e.flags))
        .unwrap_or(Flags::empty());
    e.family(
        "allium_relay_flag",
        MetricType::Gauge,
        "1 when the consensus gives this relay the flag, else 0.",
    );
    for (flag, name) in Flags::ALL {
        e.sample(
            &[("flag", name)],
            if ours.contains(flag) { 1.0 } else { 0.0 },
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use crate::RelayConfig;

    #[tokio::test]
    async fn page_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = RelayConfig::for_test("MetricsTest", dir.path());
        cfg.metrics_address = Some("127.0.0.1:0".parse().unwrap());
        let h = crate::start(cfg).await.unwrap();
        let e = super::page(&h.ctx, 1000);
        assert!(e.errors().is_empty(), "{:?}", e.errors());
        let page = e.finish();
        for line in [
            "# TYPE allium_relay_cells_total counter",
            "allium_relay_cells_total{direction=\"read\"} 0",
            "allium_circuits_open 0",
            "allium_link_queued_bytes 0",
            "allium_sched_grouped_circuits 0",
            "# TYPE allium_sched_grouped_cells_total counter",
            "allium_sched_grouped_cells_total 0",
            "allium_relay_bytes_total{direction=\"read\"} 0",
            "allium_streams_open 0",
            "allium_dos_rejections_total{reason=\"queue_overflow\"} 0",
            "allium_dos_rejections_total{reason=\"create_rate\"} 0",
            "allium_dos_rejections_total{reason=\"conn_concurrent\"} 0",
            "allium_relay_queued_bytes 0",
            "allium_consensus_age_seconds NaN",
            "allium_bootstrap_percent 0",
            "allium_relay_flag{flag=\"Guard\"} 0",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
        }
        h.shutdown().await;
    }
}
