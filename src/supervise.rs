//! `sluice run --processes N|auto`: worker processes of one consumer group, supervised.
//!
//! Each worker is `sluice worker FILE --member worker-K`, a member of the pipeline's Kafka
//! consumer group with its own checkpoint store in the shared directory
//! (`DIR/members/worker-K`); the group's cooperative rebalancing spreads the partitions, and
//! a partition's stage state follows it from member to member (see
//! `sluice_engine::checkpoint::RocksStore::open_member`).
//!
//! - `N`: N workers; one that exits on its own is started again (after a pause that grows
//!   while it keeps failing).
//! - `auto`: the pipeline's `scaling:` section (or its defaults) decides how many, from the
//!   group's lag as the broker reports it (what KEDA reads): `min_workers` to `max_workers`,
//!   never more than the partitions. A worker stopped on the way down gets SIGTERM: it
//!   finishes and commits what it read, and its partitions move with their state. With a
//!   Kafka source none is stopped while the group moves partitions, for up to a minute
//!   ([`owners`]).
//!
//! Each worker's log lines start with its name (`worker-1 | ...`): they share the
//! supervisor's standard error.
//!
//! On SIGINT or SIGTERM every worker is stopped the same way, and the supervisor waits.
//! A worker that has not exited [`STOP_GRACE`] after its SIGTERM is killed (SIGKILL), as
//! Kubernetes does after a pod's grace period: what it committed stands, and what it read
//! since is read again by the partition's next owner.

pub mod owners;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use sluice_connectors::kafka::GroupLag;
use sluice_engine::autoscale::{Autoscaler, ScalingPolicy};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::Count;
use crate::config::PipelineConfig;
use sluice_connectors::kafka::KafkaSourceConfig;
use sluice_connectors::kinesis::{KinesisSourceConfig, LeaseLag};
use sluice_engine::connector::downcast_source;

/// The name of worker slot `slot`: its checkpoint store's directory, kept across restarts.
pub fn member_name(slot: usize) -> String {
    format!("worker-{slot}")
}

/// A worker process and what the supervisor knows of it.
struct Worker {
    child: Child,
    started: Instant,
    /// Consecutive starts that ended early: the pause before the next grows with them.
    failures: u32,
    /// Where it reports the partitions it reads (`--processes auto` of a Kafka source).
    report: Option<PathBuf>,
}

struct Supervisor {
    exe: PathBuf,
    file: PathBuf,
    /// Running workers by slot.
    workers: BTreeMap<usize, Worker>,
    /// Workers told to stop, with when, until they have.
    stopping: Vec<Stopping>,
    /// Slots whose worker died, with when to start it again and its failure count.
    restarts: BTreeMap<usize, (Instant, u32)>,
    pipeline: String,
    /// The supervisor's metrics address: worker slot K serves its own on the port K + 1
    /// above it, and the supervisor lists them (`sluice_member_metrics`) for `sluice top`.
    metrics_addr: Option<SocketAddr>,
    /// `--tap`: each member serves taps on its metrics address.
    tap: bool,
    /// The autoscaler's last decision, and when (seconds since the epoch).
    last_decision: Option<(u64, sluice_engine::autoscale::Decision)>,
    /// Where the workers report the partitions they read (`--processes auto` of a Kafka
    /// source: see [`owners`]).
    reports: Option<owners::Reports>,
}

/// A worker that ran this long before exiting on its own was not crash-looping.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// How long a worker has to finish after SIGTERM before it is killed. A clean stop takes a
/// batch and a checkpoint; one that hangs (a consumer whose group leave never completes)
/// would otherwise keep the supervisor waiting for good.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A worker told to stop.
struct Stopping {
    slot: usize,
    child: Child,
    since: Instant,
    killed: bool,
}

impl Stopping {
    /// Kills the worker once its grace period is over.
    fn kill_when_overdue(&mut self) {
        if self.killed || self.since.elapsed() < STOP_GRACE {
            return;
        }
        tracing::warn!(
            member = member_name(self.slot),
            "worker process still running {STOP_GRACE:?} after SIGTERM; killing it (its last checkpoint stands)"
        );
        if let Err(e) = self.child.start_kill() {
            tracing::warn!(member = member_name(self.slot), error = %e, "cannot kill a worker process");
        }
        self.killed = true;
    }
}

impl Supervisor {
    fn start(&mut self, slot: usize, failures: u32) -> anyhow::Result<()> {
        let member = member_name(slot);
        let mut command = Command::new(&self.exe);
        command.arg("worker").arg(&self.file).args([
            "--member",
            &member,
            "--no-scaling",
            "--log-member",
        ]);
        let report = self.reports.as_mut().map(|r| r.next(slot));
        if let Some(file) = &report {
            command.arg("--report-partitions").arg(file);
        }
        if let Some(addr) = self.member_metrics(slot) {
            // A port still held (a member of the slot draining) is no reason to fail.
            command.args(["--metrics-addr", &addr.to_string(), "--metrics-optional"]);
            if self.tap {
                command.arg("--tap");
            }
        }
        let child = command
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker process {member}"))?;
        tracing::info!(member, pid = child.id(), "worker process started");
        self.workers.insert(
            slot,
            Worker {
                child,
                started: Instant::now(),
                failures,
                report,
            },
        );
        Ok(())
    }

    /// Stops the worker in the highest slot (SIGTERM: it drains and commits first).
    fn stop_one(&mut self) {
        if let Some((slot, mut worker)) = self.workers.pop_last() {
            terminate(&mut worker.child);
            tracing::info!(member = member_name(slot), "worker process stopping");
            self.stopping.push(Stopping {
                slot,
                child: worker.child,
                since: Instant::now(),
                killed: false,
            });
        }
    }

    /// Starts or stops workers until `n` run (slots 0..n).
    fn scale_to(&mut self, n: usize) -> anyhow::Result<()> {
        while self.workers.len() > n {
            self.stop_one();
        }
        self.restarts.retain(|slot, _| *slot < n);
        for slot in 0..n {
            if !self.workers.contains_key(&slot) && !self.restarts.contains_key(&slot) {
                self.start(slot, 0)?;
            }
        }
        Ok(())
    }

    /// Reaps workers that exited: those not told to stop are started again later.
    fn reap(&mut self) {
        let mut exited = Vec::new();
        for (slot, worker) in &mut self.workers {
            if let Ok(Some(status)) = worker.child.try_wait() {
                exited.push((*slot, status, worker.started.elapsed(), worker.failures));
            }
        }
        for (slot, status, ran, failures) in exited {
            self.workers.remove(&slot);
            let failures = if ran > HEALTHY_RUN { 0 } else { failures + 1 };
            let pause = Duration::from_secs(1 << failures.min(5));
            tracing::warn!(member = member_name(slot), %status, "worker process exited; starting it again in {pause:?}");
            self.restarts
                .insert(slot, (Instant::now() + pause, failures));
        }
        self.stopping.retain_mut(|w| match w.child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(member = member_name(w.slot), %status, "worker process stopped");
                false
            }
            _ => {
                w.kill_when_overdue();
                true
            }
        });
    }

    fn restart_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let due: Vec<(usize, u32)> = self
            .restarts
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(slot, (_, failures))| (*slot, *failures))
            .collect();
        for (slot, failures) in due {
            self.restarts.remove(&slot);
            self.start(slot, failures)?;
        }
        Ok(())
    }

    /// Where worker slot `slot` serves its metrics, when the supervisor serves its own.
    fn member_metrics(&self, slot: usize) -> Option<SocketAddr> {
        let addr = self.metrics_addr.filter(|a| a.port() != 0)?;
        let port = u16::try_from(usize::from(addr.port()) + 1 + slot).ok()?;
        Some(SocketAddr::new(addr.ip(), port))
    }

    /// `lag`: the gauge's name and value.
    fn publish(&self, desired: usize, lag: Option<(&'static str, u64)>) {
        let p = self.pipeline.clone();
        if let Some((at, decision)) = &self.last_decision {
            crate::metrics::publish_decision(&p, *at, decision);
        }
        for slot in self.workers.keys() {
            if let Some(addr) = self.member_metrics(*slot) {
                gauge!("sluice_member_metrics", "pipeline" => p.clone(), "member" => member_name(*slot), "addr" => addr.to_string())
                    .set(1.0);
            }
        }
        gauge!("sluice_worker_processes", "pipeline" => p.clone()).set(self.workers.len() as f64);
        gauge!("sluice_worker_processes_desired", "pipeline" => p.clone()).set(desired as f64);
        if let Some((name, lag)) = lag {
            gauge!(name, "pipeline" => p).set(lag as f64);
        }
    }

    /// Stops every worker and waits for them.
    async fn stop_all(&mut self) -> bool {
        while !self.workers.is_empty() {
            self.stop_one();
        }
        let mut clean = true;
        for mut w in std::mem::take(&mut self.stopping) {
            let left = STOP_GRACE.saturating_sub(w.since.elapsed());
            if tokio::time::timeout(left, w.child.wait()).await.is_err() {
                w.kill_when_overdue();
            }
            let slot = w.slot;
            match w.child.wait().await {
                Ok(status) if status.success() => {
                    tracing::info!(member = member_name(slot), "worker process stopped");
                }
                Ok(status) => {
                    clean = false;
                    tracing::error!(member = member_name(slot), %status, "worker process failed while stopping");
                }
                Err(e) => {
                    clean = false;
                    tracing::error!(member = member_name(slot), error = %e, "cannot wait for a worker process");
                }
            }
        }
        clean
    }
}

fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped (id() is Some).
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

/// What `--processes auto` reads the lag from: a Kafka consumer group's (records, from the
/// broker), or a Kinesis stream's leases (time, as the members wrote it).
enum LagReader {
    Group(GroupLag),
    Leases(LeaseLag),
}

impl LagReader {
    fn new(config: &PipelineConfig) -> anyhow::Result<LagReader> {
        let spec = config.source.spec.as_ref();
        if let Some(kafka) = downcast_source::<KafkaSourceConfig>(spec) {
            return Ok(LagReader::Group(GroupLag::new(kafka)?));
        }
        match (
            downcast_source::<KinesisSourceConfig>(spec),
            &config.checkpoint,
        ) {
            (Some(kinesis), Some(c)) => Ok(LagReader::Leases(LeaseLag::new(&c.dir, kinesis)?)),
            _ => bail!("--processes auto needs a Kafka or a Kinesis source"),
        }
    }

    /// The gauge the lag is published as.
    fn gauge(&self) -> &'static str {
        match self {
            LagReader::Group(_) => "sluice_group_lag_records",
            LagReader::Leases(_) => "sluice_group_lag_ms",
        }
    }

    /// The lag now. Blocking.
    fn read(&self) -> anyhow::Result<Reading> {
        Ok(match self {
            LagReader::Group(group) => {
                let lag = group.read()?;
                Reading {
                    total: lag.total(),
                    partitions: lag.partitions.len(),
                    names: lag.partitions.into_iter().map(|(name, _)| name).collect(),
                }
            }
            LagReader::Leases(leases) => {
                let (total, partitions) = leases.read()?;
                Reading {
                    total,
                    partitions,
                    names: Vec::new(),
                }
            }
        })
    }
}

/// One reading of the lag.
struct Reading {
    /// In the gauge's unit.
    total: u64,
    /// The partitions there are to read.
    partitions: usize,
    /// Their names (`topic/partition`), where the reader knows them (a consumer group).
    names: Vec<String>,
}

/// Why `config` cannot run as worker processes, if it cannot: they share a Kafka topic's
/// partitions through a consumer group, a Kinesis stream's shards through leases kept in
/// the checkpoint directory; a partition's windows move through that directory too.
pub fn worker_refusal(config: &PipelineConfig) -> Option<String> {
    match config.source.kind {
        "kafka" if config.checkpoint.is_none() && config.stages.iter().any(|s| s.kind == "aggregate") => Some(
            "an aggregate stage needs `checkpoint.dir` (a directory every worker process reaches): \
             a partition's windows move with it from process to process through it"
                .into(),
        ),
        "kafka" => None,
        "kinesis" if config.checkpoint.is_none() => Some(
            "a Kinesis source needs `checkpoint.dir` (a directory every worker process reaches): \
             the members share the stream's shards through leases kept there"
                .into(),
        ),
        "kinesis" => None,
        _ => Some(
            "worker processes need a Kafka source (its consumer group splits the partitions) or a Kinesis source \
             (leases split the shards); run other sources with `sluice run` and --workers N|auto for more worker tasks"
                .into(),
        ),
    }
}

/// Runs the workers of `config` (read from `file`) until `shutdown`.
pub async fn supervise(
    file: &Path,
    config: &PipelineConfig,
    count: Count,
    (metrics_addr, tap): (Option<SocketAddr>, bool),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(refused) = worker_refusal(config) {
        bail!("--processes: {refused}");
    }

    if let Some(addr) = metrics_addr {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(Duration::from_secs(5)),
            )
            .install()
            .map_err(|e| anyhow!("serving metrics on {addr}: {e}"))?;
    }
    let mut supervisor = Supervisor {
        exe: std::env::current_exe().context("finding the sluice executable")?,
        file: file.to_path_buf(),
        workers: BTreeMap::new(),
        stopping: Vec::new(),
        restarts: BTreeMap::new(),
        pipeline: config.name.clone(),
        metrics_addr,
        tap,
        last_decision: None,
        reports: match (count, config.source.kind) {
            (Count::Auto, "kafka") => owners::Reports::create()
                .inspect_err(|e| tracing::warn!(error = %e, "cannot create a directory for the workers to report their partitions in: scale-downs wait for time alone, not for every partition to have an owner"))
                .ok(),
            _ => None,
        },
    };
    let policy = config.scaling.as_ref().map_or_else(
        || ScalingPolicy::for_lag(config.source.spec.lag_in_time().is_some()),
        |s| s.policy.clone(),
    );
    // A process is one member: the parallelization factor applies inside processes.
    let policy = ScalingPolicy {
        parallelization_factor: 1,
        ..policy
    };
    // For `auto`: the autoscaler and what reads the lag.
    let mut scaling = match count {
        Count::Fixed(_) => None,
        Count::Auto => Some((
            // Each process that leaves is a rebalance: one at a time.
            Autoscaler::new(policy.clone()).one_step_down(),
            Arc::new(LagReader::new(config)?),
        )),
    };
    let fixed = match count {
        Count::Fixed(n) => n,
        Count::Auto => policy.min_workers,
    };
    let desired = |scaling: &Option<(Autoscaler, Arc<LagReader>)>| {
        scaling
            .as_ref()
            .map_or(fixed, |(scaler, _)| scaler.desired())
    };
    supervisor.scale_to(desired(&scaling))?;
    let mut tick = tokio::time::interval(match count {
        Count::Fixed(_) => Duration::from_millis(500),
        Count::Auto => policy.interval,
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lag_warning: Option<Instant> = None;
    let mut unsettled = owners::Unsettled::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        supervisor.reap();
        supervisor.restart_due()?;
        let mut lag_now = None;
        if let Some((scaler, reader)) = scaling.as_mut() {
            // One member leaves the group at a time, and the next only a cooldown after the
            // last has gone (not after it was told to go).
            if !supervisor.stopping.is_empty() {
                scaler.hold_scale_down(Instant::now());
            }
            let gauge = reader.gauge();
            let reader = reader.clone();
            match tokio::task::spawn_blocking(move || reader.read()).await? {
                Ok(Reading {
                    total,
                    partitions,
                    names,
                }) => {
                    lag_now = Some((gauge, total));
                    // Nor while the group moves partitions: one leaving in the middle of a
                    // rebalance starts it over (see `owners`).
                    if supervisor.reports.is_some() {
                        let files = supervisor
                            .workers
                            .values()
                            .filter_map(|w| w.report.as_deref());
                        if !unsettled.observe(&owners::Reports::read(files), &names) {
                            scaler.unsettled();
                        }
                    }
                    if let Some(decision) = scaler.observe(Instant::now(), total, partitions) {
                        tracing::info!(from = decision.from, to = decision.to, reason = %decision.reason, "autoscaler: worker processes {}", decision.direction());
                        counter!("sluice_autoscaler_decisions_total", "pipeline" => config.name.clone(), "direction" => decision.direction()).increment(1);
                        supervisor.scale_to(decision.to)?;
                        let at = sluice_engine::dead_letter::now_ms() as u64 / 1000;
                        supervisor.last_decision = Some((at, decision));
                    }
                }
                Err(e) => {
                    if lag_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(error = %e, "cannot read the lag; keeping {} worker process(es)", scaler.desired());
                        lag_warning = Some(Instant::now());
                    }
                }
            }
        }
        supervisor.publish(desired(&scaling), lag_now);
    }
    eprintln!("stopping: every worker process finishes what it read");
    if supervisor.stop_all().await {
        Ok(())
    } else {
        bail!("a worker process did not stop cleanly")
    }
}
