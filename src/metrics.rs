//! Prometheus metrics of a running pipeline (`sluice run --metrics-addr 127.0.0.1:9898`).
//!
//! The engine counts in plain atomics ([`RunStats`]); once a second those are copied into
//! the `metrics` registry, which the Prometheus exporter serves at `/metrics`:
//!
//! | metric | labels |
//! |---|---|
//! | `sluice_records_in_total`, `sluice_records_out_total` | pipeline |
//! | `sluice_dead_letters_total` | pipeline |
//! | `sluice_checkpoints_total` | pipeline |
//! | `sluice_stage_rows_in_total`, `sluice_stage_rows_out_total` | pipeline, stage |
//! | `sluice_stage_failures_total` (rows failed for good) | pipeline, stage, class |
//! | `sluice_stage_retries_total` (rows called again) | pipeline, stage |
//! | `sluice_stage_bisections_total`, `sluice_stage_skipped_total`, `sluice_stage_defaulted_total` | pipeline, stage |
//! | `sluice_breaker_transitions_total` | pipeline, stage, to (open, closed) |
//! | `sluice_breaker_state` (0 closed, 1 open, 2 half-open) | pipeline, stage |
//! | `sluice_stage_batch_duration_seconds` (histogram: `_bucket`, `_sum`, `_count`) | pipeline, stage |
//! | `sluice_stage_cold_start_seconds` (slowest worker's `open`) | pipeline, stage |
//! | `sluice_stage_cache_hits_total`, `sluice_stage_cache_misses_total` | pipeline, stage |
//! | `sluice_stage_late_dropped_total` (late rows dropped: no dead-letter sink) | pipeline, stage |
//! | `sluice_partition_lag_records` (log end offset − committed offset) | pipeline, partition |
//! | `sluice_partition_lag_ms` (Kinesis: the shard's `MillisBehindLatest`) | pipeline, partition |
//! | `sluice_lag_records` (the sum over this process's partitions) | pipeline |
//! | `sluice_workers`, `sluice_workers_desired` (worker tasks running, and wanted) | pipeline |
//! | `sluice_autoscaler_decisions_total` | pipeline, direction (up, down) |
//! | `sluice_autoscaler_last_decision_seconds` (when the last decision was taken, seconds since the epoch; worker tasks, or worker processes on a supervisor) | pipeline, direction, from, to, reason |
//! | `sluice_worker_processes`, `sluice_worker_processes_desired` (worker processes of `sluice run --processes`, running and wanted; set by the supervisor) | pipeline |
//! | `sluice_member_metrics` (1 for each running worker process of a supervisor that serves metrics: where the member serves its own, the supervisor's port + 1 + its slot) | pipeline, member, addr |
//! | `sluice_group_lag_records` (the consumer group's lag summed over its partitions, as the supervisor reads it from the broker) | pipeline |
//! | `sluice_group_lag_ms` (Kinesis: the shards' `MillisBehindLatest` summed, as the supervisor reads it from the members' leases) | pipeline |
//! | `sluice_output_rows_total` (rows written to each output) | pipeline, output |
//! | `sluice_output_busy_seconds_total` (time writing and flushing each output: the one near 1 s per second holds every branch back) | pipeline, output |
//! | `sluice_schema_registry_requests_total` (requests to the schema registry: `answered`, `refused` — an unknown id, an incompatible schema —, `unanswered` — tries waited out) | pipeline, outcome |
//! | `sluice_schema_cache_hits_total` (Avro messages read whose writer schema the process already held) | pipeline |
//! | `sluice_schema_records_total` (Avro records per schema id: `decoded`, `refused` — its schema does not resolve, or the value does not decode —, `encoded` by a sink; ids past the first 256 counted as `schema_id="other"`) | pipeline, schema_id, outcome |
//! | `sluice_checkpoint_duration_seconds` (histogram) | pipeline |
//! | `sluice_stage_busy_seconds_total` (time in the stage's calls), `sluice_stage_back_pressured_seconds_total` (time its rows waited for the stages they reach and the sink task), `sluice_stage_cpu_seconds_total` (thread CPU time of its calls) | pipeline, stage |
//! | `sluice_stage_position` (the stage's place in the pipeline file, from 0: `sluice top` lists stages in this order) | pipeline, stage |
//! | `sluice_worker_seconds_total` (the worker tasks' time alive, summed: a stage's busy fraction is `rate(busy) / rate(worker seconds)`, its idle fraction what busy and back-pressured leave) | pipeline |
//! | `sluice_source_cpu_seconds_total` (CPU of the partition readers' reads: decoding), `sluice_source_back_pressured_seconds_total` (time they waited for a worker to take a batch), `sluice_reader_seconds_total` (their time alive) | pipeline |
//! | `sluice_output_cpu_seconds_total` (CPU of each output's writes and flushes) | pipeline, output |
//! | `sluice_queue_batches` (batches waiting in the workers' queues, `queue="workers"`, and in the sink task's, `queue="sink"`) | pipeline, queue |
//! | `sluice_process_cpu_seconds_total` (the process's CPU time, every thread) | pipeline |
//! | `sluice_tap_rows_total` (rows copied to `sluice tap` readers), `sluice_tap_skipped_rows_total` (rows a tap reader missed: it was behind) | pipeline, point (a stage, `sink`, `dead_letters`) |
//! | `sluice_checkpoint_state_bytes` (stage state the last checkpoint wrote) | pipeline |
//!
//! A partition's lag is what a consumer group tool shows for it: the broker's log end
//! offset minus the committed offset (the next record not in a checkpoint); a pipeline
//! without checkpoints counts what its sink has written. Gauges of partitions this process
//! no longer reads disappear after a few seconds, so that summing over processes (KEDA,
//! PromQL) counts each partition once.
//!
//! Records that did not decode count as failures of the stage `source`, class `decode`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use metrics_util::MetricKindMask;
use sluice_connectors::avro;
use sluice_engine::ErrorClass;
use sluice_engine::breaker::{Breaker, State};
use sluice_engine::dead_letter::SOURCE_STAGE;
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

/// A gauge not set for this long is dropped (a partition that went to another process).
const GAUGE_IDLE: Duration = Duration::from_secs(5);

/// Bucket bounds of the duration histograms, in seconds: a fast stage's batch (0.5 ms) to a
/// slow remote call or a large checkpoint (30 s).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Serves `/metrics` on `addr` (and with `tap`, `/tap`: see [`crate::tap`]) and keeps it
/// current until `done`.
///
/// The server and the publishing run on a thread of their own: stages that hold the
/// pipeline's threads for long polls (a CPU-bound SQL stage) would otherwise leave
/// `/metrics` unanswered for seconds.
pub fn serve(
    addr: SocketAddr,
    pipeline: &str,
    stats: Arc<RunStats>,
    breakers: Vec<Option<Arc<Breaker>>>,
    tap: bool,
    done: CancellationToken,
) -> anyhow::Result<()> {
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            DURATION_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
    let render = handle.clone();
    let breakers = Arc::new(breakers);
    let (p, s, b) = (pipeline.to_string(), stats.clone(), breakers.clone());
    // Published as it is read, so that two reads a second apart see a second's counts.
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            publish(&p, &s, &b);
            std::future::ready(render.render())
        }),
    );
    if tap {
        app = app.route(
            "/tap",
            axum::routing::get(crate::tap::serve).with_state(stats.clone()),
        );
    }
    let reach = match addr.ip().is_loopback() {
        true => "this machine only",
        false => "open to other machines",
    };
    eprintln!("metrics: http://{addr}/metrics ({reach})");
    if tap {
        eprintln!("taps: sluice tap {addr} --stage NAME ({reach})");
    }
    let pipeline = pipeline.to_string();
    // Durations go to their histograms as they are recorded.
    for s in &stats.stages {
        s.latency.export(histogram!(
            "sluice_stage_batch_duration_seconds",
            "pipeline" => pipeline.clone(),
            "stage" => s.name.to_string()
        ));
    }
    stats.checkpoint_duration.export(histogram!(
        "sluice_checkpoint_duration_seconds",
        "pipeline" => pipeline.clone()
    ));
    let publishing = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => publish(&pipeline, &stats, &breakers),
                () = done.cancelled() => {
                    publish(&pipeline, &stats, &breakers);
                    return;
                }
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sluice-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(listener, app).await {
                                tracing::warn!("the metrics server stopped: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("serving metrics on {addr}: {e}"),
                }
                // What the exporter's own listener would do: drop idle gauges.
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        handle.run_upkeep();
                    }
                });
                publishing.await;
                // Answering until the process ends.
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

fn publish(pipeline: &str, stats: &RunStats, breakers: &[Option<Arc<Breaker>>]) {
    let p = pipeline.to_string();
    let get = RunStats::get;
    counter!("sluice_records_in_total", "pipeline" => p.clone()).absolute(get(&stats.records_in));
    counter!("sluice_records_out_total", "pipeline" => p.clone()).absolute(get(&stats.records_out));
    counter!("sluice_dead_letters_total", "pipeline" => p.clone())
        .absolute(get(&stats.records_dead_lettered));
    counter!("sluice_checkpoints_total", "pipeline" => p.clone()).absolute(get(&stats.checkpoints));
    let lags = stats.lags();
    for (partition, lag) in &lags {
        gauge!("sluice_partition_lag_records", "pipeline" => p.clone(), "partition" => partition.to_string())
            .set(*lag as f64);
    }
    for (partition, ms) in stats.lags_ms() {
        gauge!("sluice_partition_lag_ms", "pipeline" => p.clone(), "partition" => partition.to_string())
            .set(ms as f64);
    }
    gauge!("sluice_lag_records", "pipeline" => p.clone())
        .set(lags.iter().map(|(_, l)| *l).sum::<u64>() as f64);
    gauge!("sluice_workers", "pipeline" => p.clone()).set(get(&stats.workers) as f64);
    gauge!("sluice_workers_desired", "pipeline" => p.clone())
        .set(get(&stats.workers_desired) as f64);
    counter!("sluice_autoscaler_decisions_total", "pipeline" => p.clone(), "direction" => "up")
        .absolute(get(&stats.scaled_up));
    counter!("sluice_autoscaler_decisions_total", "pipeline" => p.clone(), "direction" => "down")
        .absolute(get(&stats.scaled_down));
    if let Some((at, decision)) = &*stats.last_decision.lock().expect("decision lock") {
        publish_decision(&p, *at, decision);
    }
    gauge!("sluice_checkpoint_state_bytes", "pipeline" => p.clone())
        .set(get(&stats.checkpoint_state_bytes) as f64);
    for o in stats.outputs() {
        let labels = [("pipeline", p.clone()), ("output", o.name.to_string())];
        counter!("sluice_output_rows_total", &labels).absolute(get(&o.rows));
        // Seconds with their fraction: a gauge holds a float (it only grows).
        gauge!("sluice_output_busy_seconds_total", &labels).set(get(&o.busy_nanos) as f64 / 1e9);
    }
    publish_time(&p, stats);
    publish_schemas(&p);
    let mut stage_dead = 0;
    for (i, s) in stats.stages.iter().enumerate() {
        let stage = s.name.to_string();
        let labels = [("pipeline", p.clone()), ("stage", stage.clone())];
        counter!("sluice_stage_rows_in_total", &labels).absolute(get(&s.rows_in));
        counter!("sluice_stage_rows_out_total", &labels).absolute(get(&s.rows_out));
        counter!("sluice_stage_retries_total", &labels).absolute(get(&s.retries));
        counter!("sluice_stage_bisections_total", &labels).absolute(get(&s.bisections));
        counter!("sluice_stage_skipped_total", &labels).absolute(get(&s.skipped));
        counter!("sluice_stage_defaulted_total", &labels).absolute(get(&s.defaulted));
        for class in ErrorClass::ALL {
            counter!("sluice_stage_failures_total", "pipeline" => p.clone(), "stage" => stage.clone(), "class" => class.as_str())
                .absolute(get(&s.failed_by_class[class as usize]));
        }
        counter!("sluice_stage_cache_hits_total", &labels).absolute(get(&s.cache_hits));
        counter!("sluice_stage_cache_misses_total", &labels).absolute(get(&s.cache_misses));
        counter!("sluice_stage_late_dropped_total", &labels).absolute(get(&s.late_dropped));
        gauge!("sluice_stage_cold_start_seconds", &labels).set(s.cold_start().as_secs_f64());
        stage_dead += get(&s.dead_letters);
        counter!("sluice_breaker_transitions_total", "pipeline" => p.clone(), "stage" => stage.clone(), "to" => "open")
            .absolute(get(&s.breaker_opened));
        counter!("sluice_breaker_transitions_total", "pipeline" => p.clone(), "stage" => stage.clone(), "to" => "closed")
            .absolute(get(&s.breaker_closed));
        if let Some(Some(b)) = breakers.get(i) {
            let state = match b.state() {
                State::Closed => 0.0,
                State::Open => 1.0,
                State::HalfOpen => 2.0,
            };
            gauge!("sluice_breaker_state", &labels).set(state);
        }
    }
    counter!("sluice_stage_failures_total", "pipeline" => p, "stage" => SOURCE_STAGE, "class" => ErrorClass::Decode.as_str())
        .absolute(get(&stats.records_dead_lettered).saturating_sub(stage_dead));
}

/// The autoscaler's last decision: when (seconds since the epoch), labelled with what it
/// did and why.
pub fn publish_decision(p: &str, at: u64, decision: &sluice_engine::autoscale::Decision) {
    gauge!(
        "sluice_autoscaler_last_decision_seconds",
        "pipeline" => p.to_string(),
        "direction" => decision.direction(),
        "from" => decision.from.to_string(),
        "to" => decision.to.to_string(),
        "reason" => decision.reason.clone()
    )
    .set(at as f64);
}

/// Where time goes (see `sluice_engine::busy`): seconds as gauges that only grow (the
/// counters of the `metrics` crate hold integers).
fn publish_time(p: &str, stats: &RunStats) {
    let seconds = |nanos: u64| nanos as f64 / 1e9;
    let get = RunStats::get;
    for (i, s) in stats.stages.iter().enumerate() {
        let labels = [("pipeline", p.to_string()), ("stage", s.name.to_string())];
        gauge!("sluice_stage_position", &labels).set(i as f64);
        gauge!("sluice_stage_busy_seconds_total", &labels).set(seconds(get(&s.busy_nanos)));
        gauge!("sluice_stage_back_pressured_seconds_total", &labels)
            .set(seconds(get(&s.back_pressured_nanos)));
        gauge!("sluice_stage_cpu_seconds_total", &labels).set(seconds(get(&s.cpu_nanos)));
    }
    let pipeline = [("pipeline", p.to_string())];
    gauge!("sluice_worker_seconds_total", &pipeline).set(seconds(stats.worker_time.nanos()));
    gauge!("sluice_reader_seconds_total", &pipeline).set(seconds(stats.reader_time.nanos()));
    gauge!("sluice_source_cpu_seconds_total", &pipeline).set(seconds(get(&stats.source_cpu_nanos)));
    gauge!("sluice_source_back_pressured_seconds_total", &pipeline)
        .set(seconds(get(&stats.source_blocked_nanos)));
    gauge!("sluice_process_cpu_seconds_total", &pipeline)
        .set(seconds(sluice_engine::busy::process_cpu_nanos()));
    for o in stats.outputs() {
        let labels = [("pipeline", p.to_string()), ("output", o.name.to_string())];
        gauge!("sluice_output_cpu_seconds_total", &labels).set(seconds(get(&o.cpu_nanos)));
    }
    if let Some(taps) = stats.taps.get() {
        for point in taps.points() {
            let labels = [
                ("pipeline", p.to_string()),
                ("point", point.name.to_string()),
            ];
            counter!("sluice_tap_rows_total", &labels).absolute(get(&point.rows));
            counter!("sluice_tap_skipped_rows_total", &labels).absolute(get(&point.skipped));
        }
    }
    for (queue, n) in [
        ("workers", &stats.queued_for_workers),
        ("sink", &stats.queued_for_sink),
    ] {
        gauge!("sluice_queue_batches", "pipeline" => p.to_string(), "queue" => queue)
            .set(n.load(std::sync::atomic::Ordering::Relaxed).max(0) as f64);
    }
}

/// The schema registry's requests and records per schema id (Avro sources and sinks);
/// nothing while the pipeline has none.
fn publish_schemas(p: &str) {
    let schemas = avro::stats();
    let get = RunStats::get;
    let requests = [
        ("answered", &schemas.fetched),
        ("refused", &schemas.refused),
        ("unanswered", &schemas.unanswered),
    ];
    if requests.iter().all(|(_, n)| get(n) == 0) {
        return;
    }
    for (outcome, n) in requests {
        counter!("sluice_schema_registry_requests_total", "pipeline" => p.to_string(), "outcome" => outcome)
            .absolute(get(n));
    }
    counter!("sluice_schema_cache_hits_total", "pipeline" => p.to_string())
        .absolute(get(&schemas.cache_hits));
    for (id, counts) in schemas.by_id() {
        for (outcome, n) in [
            ("decoded", counts.decoded),
            ("refused", counts.refused),
            ("encoded", counts.encoded),
        ] {
            let id = id.map_or_else(|| "other".to_string(), |id| id.to_string());
            counter!("sluice_schema_records_total", "pipeline" => p.to_string(), "schema_id" => id, "outcome" => outcome)
                .absolute(n);
        }
    }
}
