//! The supervisor: the run's main loop. It holds the partitions and their readers, the
//! worker pool and the first error, and handles one event at a time, a method each: an
//! assignment or revocation from the source, a reader or worker task that ended, an
//! autoscaler tick, a command, a barrier released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::lanes::Splitter;
use super::messages::{Drained, Route, WorkerMsg};
use super::pool::Pool;
use super::reader::{ReadEnd, read_partition};
use super::{Batching, Control, EMIT_INTERVAL, RunOptions, RunReport, interval, tick};
use crate::autoscale::{Autoscaler, LagThreshold};
use crate::batch::PartitionInfo;
use crate::source::{Assignment, Source};
use crate::state::StageState;
use crate::stats::{PartitionLag, RunStats};
use crate::{Error, Result};

/// Where one lane of a partition goes: with a parallelization factor of n, a partition's
/// records are split by key into n lanes, each routed to a worker of its own.
pub(super) struct Lane {
    pub(super) worker: usize,
    pub(super) route: watch::Sender<Route>,
}

/// A partition read here: its lanes, how to stop its reader, and who waits for its drain.
pub(super) struct PartitionHandle {
    pub(super) info: Arc<PartitionInfo>,
    pub(super) lanes: Vec<Lane>,
    pub(super) stop: CancellationToken,
    pub(super) drained: Option<oneshot::Sender<()>>,
    /// The reader task, to tell this handle from an earlier one of the same partition.
    pub(super) task: tokio::task::Id,
}

type ReaderResult = Result<ReadEnd>;

pub(super) struct Supervisor {
    source: Box<dyn Source>,
    batching: Batching,
    states: Vec<Arc<dyn StageState>>,
    stats: Arc<RunStats>,
    pool: Pool,
    partitions: HashMap<u32, PartitionHandle>,
    readers: JoinSet<ReaderResult>,
    /// Which partition each reader task reads.
    reader_tasks: HashMap<tokio::task::Id, u32>,
    /// Drain markers on their way to the worker that has their partition's last batch.
    markers: JoinSet<()>,
    lane_count: usize,
    splitter: Option<Arc<Splitter>>,
    autoscaler: Option<Autoscaler>,
    /// Stops the readers: cancelled on shutdown and on the first error.
    stop: CancellationToken,
    /// The source may still assign partitions.
    assigning: bool,
    first_error: Option<Error>,
    /// A worker that ended early without an error of its own lost its sink: the sink
    /// task's error, read at the end, is the one to report.
    worker_stopped: bool,
}

impl Supervisor {
    /// Starts the first workers: before the sink task, which sends the checkpoint barriers,
    /// so no barrier can be out yet and they do start (see `pool::Barrier`).
    pub(super) fn start(
        source: Box<dyn Source>,
        batching: Batching,
        options: &RunOptions,
        states: Vec<Arc<dyn StageState>>,
        stats: Arc<RunStats>,
        mut pool: Pool,
        stop: CancellationToken,
    ) -> Self {
        let autoscaler = options.scaling.clone().map(Autoscaler::new);
        let lane_count = options
            .scaling
            .as_ref()
            .map_or(1, |s| s.parallelization_factor.max(1));
        let splitter = (lane_count > 1).then(|| {
            let key = options.scaling.as_ref().and_then(|s| s.key.clone());
            Arc::new(Splitter::new(
                lane_count,
                key.unwrap_or_else(|| crate::batch::KEY.into()),
            ))
        });
        let initial = match &autoscaler {
            Some(a) => a.desired(),
            None => options.workers.unwrap_or_else(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                source.partition_hint().clamp(1, cores)
            }),
        };
        let mut partitions = HashMap::new();
        pool.scale_to(initial, &mut partitions);
        Supervisor {
            source,
            batching,
            states,
            stats,
            pool,
            partitions,
            readers: JoinSet::new(),
            reader_tasks: HashMap::new(),
            markers: JoinSet::new(),
            lane_count,
            splitter,
            autoscaler,
            stop,
            assigning: true,
            first_error: None,
            worker_stopped: false,
        }
    }

    /// Handles events until the source assigns no more partitions and every reader has
    /// ended.
    pub(super) async fn run(&mut self, mut control: Option<mpsc::Receiver<Control>>) {
        let mut scale_ticks = self
            .autoscaler
            .as_ref()
            .map(|a| interval(a.policy().interval));
        // Windows close with time too, not only with the batches that arrive.
        let mut emit_ticks = (!self.states.is_empty()).then(|| interval(EMIT_INTERVAL));
        while self.assigning || !self.readers.is_empty() {
            tokio::select! {
                assignment = self.source.next_assignment(), if self.assigning => {
                    self.on_assignment(assignment);
                }
                Some(joined) = self.readers.join_next_with_id() => self.on_reader_done(joined),
                Some(joined) = self.pool.tasks.join_next() => self.on_worker_done(joined),
                _ = tick(&mut scale_ticks), if self.assigning => self.on_scale_tick(),
                _ = tick(&mut emit_ticks), if self.assigning => {
                    self.pool.emit_due(&self.partitions);
                }
                Some(cmd) = recv_control(&mut control) => self.on_control(cmd),
                _ = self.pool.barrier.released.notified(), if self.pool.wanted.is_some() => {
                    if let Some(n) = self.pool.wanted.take() {
                        self.pool.scale_to(n, &mut self.partitions);
                    }
                }
                Some(sent) = self.markers.join_next() => {
                    if let Err(e) = sent {
                        self.fail(Error::task("drain marker", e));
                    }
                }
                _ = self.stop.cancelled(), if self.assigning => self.assigning = false,
            }
        }
    }

    /// The first error stops the readers; later ones are only logged.
    fn fail(&mut self, e: Error) {
        self.record(e);
        self.stop.cancel();
    }

    fn record(&mut self, e: Error) {
        if self.first_error.is_none() {
            self.first_error = Some(e);
        } else {
            tracing::debug!(error = %e, "further error while stopping");
        }
    }

    fn on_assignment(&mut self, assignment: Result<Option<Assignment>>) {
        match assignment {
            Ok(Some(Assignment::Assign(reader))) => {
                let info = reader.info().clone();
                let id = info.id;
                let mut lanes = Vec::with_capacity(self.lane_count);
                let mut lane_rxs = Vec::with_capacity(self.lane_count);
                for _ in 0..self.lane_count {
                    let (worker, tx) = self.pool.least_loaded();
                    self.pool.add_load(worker, 1);
                    let (route, route_rx) = watch::channel(Route { worker, tx });
                    lanes.push(Lane { worker, route });
                    lane_rxs.push(route_rx);
                }
                let part_stop = self.stop.child_token();
                for state in &self.states {
                    state.assign(&info);
                }
                let lag = Arc::new(PartitionLag::new(reader.log_end()));
                if let Some(start) = reader.start_offset() {
                    lag.start_at(start);
                }
                let parents = reader.follows();
                for state in &self.states {
                    state.watch(&info, &lag);
                    if !parents.is_empty() {
                        state.follows(&info, &parents);
                    }
                }
                self.stats
                    .partitions
                    .lock()
                    .expect("partitions lock")
                    .insert(info.name.clone(), lag.clone());
                let task = self.readers.spawn(read_partition(
                    reader,
                    self.batching,
                    lane_rxs,
                    self.splitter.clone(),
                    part_stop.clone(),
                    self.stats.clone(),
                    lag,
                ));
                self.reader_tasks.insert(task.id(), id);
                let handle = PartitionHandle {
                    info,
                    lanes,
                    stop: part_stop,
                    drained: None,
                    task: task.id(),
                };
                // A partition assigned again while its old reader still drains: the old
                // handle goes (its task is no longer mapped to it).
                if let Some(old) = self.partitions.insert(id, handle) {
                    old.stop.cancel();
                    self.pool.release_lanes(&old);
                }
            }
            Ok(Some(Assignment::Revoke { partition, drained })) => {
                if let Some(p) = self.partitions.get_mut(&partition) {
                    p.stop.cancel();
                    p.drained = drained;
                    for state in &self.states {
                        state.revoke(&p.info);
                    }
                    // No longer this process's to catch up on.
                    self.stats
                        .partitions
                        .lock()
                        .expect("partitions lock")
                        .remove(&p.info.name);
                }
                // An unknown partition has nothing to drain: dropping `drained` says so.
            }
            Ok(None) => {
                self.assigning = false;
                for state in &self.states {
                    state.assignments_done();
                }
            }
            Err(e) => {
                self.fail(e);
                self.assigning = false;
            }
        }
    }

    fn on_reader_done(
        &mut self,
        joined: std::result::Result<(tokio::task::Id, ReaderResult), tokio::task::JoinError>,
    ) {
        let (task, result) = match joined {
            Ok((task, result)) => (task, result),
            Err(e) => (e.id(), Err(Error::task("reader", e))),
        };
        let handle = self
            .reader_tasks
            .remove(&task)
            .filter(|id| self.partitions.get(id).is_some_and(|p| p.task == task))
            .and_then(|id| self.partitions.remove(&id));
        match (handle, result) {
            (Some(p), Ok(ReadEnd { last, end_signal })) => {
                self.pool.release_lanes(&p);
                // Revoked, or ended with a source waiting for its end to be checkpointed.
                if let Some(done) = p.drained.or(end_signal) {
                    // After the reader's last batch, through the worker that has it.
                    let marker = WorkerMsg::Drain(Drained {
                        partition: p.info,
                        done,
                    });
                    self.markers.spawn(async move {
                        let _ = last.send(marker).await;
                    });
                }
            }
            (Some(p), Err(e)) => {
                self.pool.release_lanes(&p);
                self.fail(e);
            }
            (None, Err(e)) => self.fail(e),
            (None, Ok(_)) => {}
        }
    }

    /// A worker ends before the readers only when it or the sink failed, or when it was
    /// retired and has finished its last batch.
    fn on_worker_done(
        &mut self,
        joined: std::result::Result<Result<usize>, tokio::task::JoinError>,
    ) {
        match joined {
            Ok(Err(e)) => self.fail(e),
            Ok(Ok(id)) if self.pool.live.contains_key(&id) => {
                self.worker_stopped = true;
                self.stop.cancel();
            }
            Ok(Ok(_)) => {}
            Err(e) => self.fail(Error::task("worker", e)),
        }
    }

    fn on_scale_tick(&mut self) {
        let Some(scaler) = self.autoscaler.as_mut() else {
            return;
        };
        let lag = match scaler.policy().lag_threshold {
            LagThreshold::Records(_) => self.stats.total_lag(),
            LagThreshold::Time(_) => self.stats.total_lag_ms(),
        };
        if let Some(decision) = scaler.observe(Instant::now(), lag, self.partitions.len()) {
            tracing::info!(from = decision.from, to = decision.to, reason = %decision.reason, "autoscaler: scaling {}", decision.direction());
            let counter = if decision.to > decision.from {
                &self.stats.scaled_up
            } else {
                &self.stats.scaled_down
            };
            RunStats::add(counter, 1);
            self.pool.scale_to(decision.to, &mut self.partitions);
            *self.stats.last_decision.lock().expect("decision lock") =
                Some((crate::dead_letter::now_ms() as u64 / 1000, decision));
        }
    }

    fn on_control(&mut self, cmd: Control) {
        match cmd {
            Control::MovePartition { partition, worker } => {
                match (
                    self.partitions.get_mut(&partition),
                    self.pool.live.contains_key(&worker),
                ) {
                    (Some(p), true) => {
                        for lane in 0..p.lanes.len() {
                            self.pool.move_lane(p, lane, worker);
                        }
                    }
                    _ => tracing::warn!(
                        partition,
                        worker,
                        "cannot move: no such partition or worker"
                    ),
                }
            }
            Control::ScaleTo(n) => self.pool.scale_to(n, &mut self.partitions),
        }
    }

    /// Lets the workers finish what they were sent, then the sink task: the first error of
    /// the run, or its report.
    pub(super) async fn finish(
        mut self,
        sink_task: JoinHandle<Result<String>>,
        started: Instant,
    ) -> Result<RunReport> {
        // Drain markers reach their workers before the workers are told to end.
        while let Some(sent) = self.markers.join_next().await {
            if let Err(e) = sent {
                self.record(Error::task("drain marker", e));
            }
        }
        self.partitions.clear();
        let peak = self.pool.peak;
        let mut workers = self.pool.close();
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.record(e),
                Err(e) => self.record(Error::task("worker", e)),
            }
        }
        let sink_summary = match sink_task.await {
            Ok(Ok(summary)) => Some(summary),
            Ok(Err(e)) => {
                self.record(e);
                None
            }
            Err(e) => {
                self.record(Error::task("sink", e));
                None
            }
        };
        if self.worker_stopped {
            self.record(Error::Internal(
                "a worker stopped while partitions were still being read".into(),
            ));
        }
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(RunReport {
                workers: peak,
                elapsed: started.elapsed(),
                sink: sink_summary.unwrap_or_default(),
            }),
        }
    }
}

/// The next command, if the pipeline takes commands; pending once their sender is gone.
///
/// # Cancel safety
/// Cancel safe.
async fn recv_control(control: &mut Option<mpsc::Receiver<Control>>) -> Option<Control> {
    match control {
        Some(rx) => match rx.recv().await {
            Some(cmd) => Some(cmd),
            None => {
                *control = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
