//! The executor: runs a planned pipeline on tokio.
//!
//! # Tasks
//! ```text
//!  reader task per partition ──► worker task (owns one instance of every stage) ──► sink task
//!  (batches by size/window)        × N workers, each fed by one bounded channel       (one)
//! ```
//! - A **reader** reads its partition, cuts batches by `batch_size` / `batch_window` and
//!   sends them to the worker its partition is routed to.
//! - A **worker** runs the stage chain on one batch at a time and sends the result on.
//!   Several partitions may share a worker; a partition is served by one worker at a time,
//!   so records of a partition stay in order.
//! - The **sink** task writes batches and rolls files on a timer.
//!
//! Every channel is bounded: a slow sink blocks workers, which block readers, which stop
//! reading. Memory stays bounded by the channel capacities times the batch size.
//!
//! # Moving partitions
//! Partitions are assigned and revoked while the pipeline runs, and a partition can be
//! moved to another worker ([`Control::MovePartition`]). A move is a barrier in the data:
//! the reader sends `Release` to the old worker after its last batch there, waits until the
//! worker has processed everything before it, and only then sends to the new worker.
//!
//! # Checkpoints
//! With a [`CheckpointPolicy`], the source is restored from the last checkpoint before the
//! first assignment, and the sink task takes a checkpoint every interval and at the end:
//! flush the sink, then commit the offsets of everything it has received (see
//! [`crate::checkpoint`]). Workers forward batches that stages emptied, so that their
//! offsets count as done.
//!
//! # Revoking a partition
//! A revoke may carry a `drained` signal (a consumer group waits on it before giving the
//! partition to another member). The reader stops and sends what it has; once its task has
//! ended, a `Drain` marker follows its last batch through the worker it was routed to, and
//! the sink task, on receiving it, takes a checkpoint and then fires the signal. So the
//! partition's offset in the checkpoint (and the group) covers everything read.
//!
//! # Clean shutdown
//! Cancelling the shutdown token stops the readers; each sends what it has buffered. The
//! workers finish the batches in their channels, the sink writes them and closes. Nothing
//! that was read is dropped. The first error anywhere stops the pipeline the same way and is
//! returned.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::compute::concat_batches;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{Autoscaler, ScalingPolicy};
use crate::batch::{ColumnSelection, Envelope, PartitionInfo};
use crate::checkpoint::{Checkpoint, CheckpointStore, MemoryStore, RocksStore};
use crate::dead_letter::DeadLetterSink;
use crate::failure::{self, Outcome};
use crate::sink::Sink;
use crate::source::{Assignment, CommitHook, Handoff, PartitionReader, Source};
use crate::stage::{PlannedStage, Stage, StageContext};
use crate::state::{PartitionKeys, SnapshotStats, StageState};
use crate::stats::{PartitionProgress, RunStats};
use crate::{Error, Result};

/// How a source's records are cut into batches, like an event source mapping's batch size
/// and batching window: a batch is sent when it holds `size` records or when `window` has
/// passed since its first record, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub size: usize,
    pub window: Duration,
}

/// A pipeline ready to run: every component built, every stage planned.
pub struct Pipeline {
    pub name: Arc<str>,
    pub source: Box<dyn Source>,
    pub batching: Batching,
    pub stages: Vec<PlannedStage>,
    pub sink: Box<dyn Sink>,
    pub columns: ColumnSelection,
    pub checkpoint: Option<CheckpointPolicy>,
    /// Where records that fail go; without it, a failed record stops the run.
    pub dead_letter: Option<DeadLetterSink>,
}

/// Where and how often checkpoints are taken.
#[derive(Clone)]
pub struct CheckpointPolicy {
    pub store: Arc<dyn CheckpointStore>,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Worker tasks; default: one per partition, at most one per core.
    pub workers: Option<usize>,
    /// Batches each channel holds before its sender waits.
    pub channel_capacity: usize,
    /// Worker tasks follow the partitions' lag between its bounds (instead of `workers`).
    pub scaling: Option<ScalingPolicy>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workers: None,
            channel_capacity: 4,
            scaling: None,
        }
    }
}

/// Commands to a running pipeline.
#[derive(Debug)]
pub enum Control {
    /// Routes a partition to another worker, keeping its records in order.
    MovePartition { partition: u32, worker: usize },
    /// Runs this many worker tasks from now on (partitions are moved to balance them).
    ScaleTo(usize),
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunReport {
    /// The most worker tasks that ran at once.
    pub workers: usize,
    pub elapsed: Duration,
    pub sink: String,
}

enum WorkerMsg {
    /// A batch, or a lane's part of one (with its ticket).
    Batch(Envelope, Option<Ticket>),
    /// The partition's source ended after the batches before this (bounded sources):
    /// stages that hold rows back emit them. `end` is the partition's next offset.
    Ended {
        partition: Arc<PartitionInfo>,
        end: i64,
    },
    /// A checkpoint of stage state: the worker says it waits here (after sending everything
    /// before it to the sink) and waits until the sink has taken the snapshot.
    Barrier(oneshot::Sender<oneshot::Sender<()>>),
    /// Everything of `partition` sent before this has been processed once `done` fires.
    Release {
        partition: u32,
        done: oneshot::Sender<()>,
    },
    /// The partition's reader has ended: passed on to the sink after its last batch.
    Drain(Drained),
    /// Time has passed: stages that hold rows back hand out what is due without a batch
    /// (windows closed by a partition going idle, or taken over at a partition's end),
    /// sent on under `partition`'s name with an empty range of offsets.
    Emit(Arc<PartitionInfo>),
}

enum SinkMsg {
    Batch(Envelope, Option<Ticket>),
    Drain(Drained),
}

/// A revoked partition whose last batch is ahead of this marker.
struct Drained {
    partition: Arc<PartitionInfo>,
    done: oneshot::Sender<()>,
}

#[derive(Clone)]
struct Route {
    worker: usize,
    tx: mpsc::Sender<WorkerMsg>,
}

/// Where one lane of a partition goes: with a parallelization factor of n, a partition's
/// records are split by key into n lanes, each routed to a worker of its own.
struct Lane {
    worker: usize,
    route: watch::Sender<Route>,
}

struct PartitionHandle {
    info: Arc<PartitionInfo>,
    lanes: Vec<Lane>,
    stop: CancellationToken,
    drained: Option<oneshot::Sender<()>>,
    /// The reader task, to tell this handle from an earlier one of the same partition.
    task: tokio::task::Id,
}

/// How often checkpoints are taken when a source needs them and the pipeline sets none.
const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// How often a stateful pipeline's workers are asked for what time alone made due.
const EMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the pipeline until its source ends, `shutdown` is cancelled, or something fails.
pub async fn run(
    pipeline: Pipeline,
    options: RunOptions,
    stats: Arc<RunStats>,
    shutdown: CancellationToken,
    mut control: Option<mpsc::Receiver<Control>>,
) -> Result<RunReport> {
    let started = Instant::now();
    let Pipeline {
        name,
        mut source,
        batching,
        stages,
        sink,
        columns,
        checkpoint,
        dead_letter,
    } = pipeline;
    let dead_letters = dead_letter.is_some();
    if let Some(policy) = &checkpoint {
        let store = policy.store.clone();
        let last = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| Error::Internal(format!("loading the checkpoint: {e}")))??;
        tracing::info!(
            checkpoint = last.id,
            partitions = last.offsets.len(),
            "restoring"
        );
        stats.checkpoints.store(last.id, Ordering::Relaxed);
        source.restore(Arc::new(last));
    }
    // A consumer group commits its offsets through checkpoints: without a store, they are
    // kept in memory for the run and the group's committed offsets are where a restart
    // begins.
    let checkpoint = checkpoint.or_else(|| {
        source.needs_checkpoints().then(|| CheckpointPolicy {
            store: Arc::new(MemoryStore::default()),
            interval: DEFAULT_CHECKPOINT_INTERVAL,
        })
    });
    // Stage state needs a database: the checkpoint store's, or a scratch one when the
    // pipeline keeps no checkpoints (its state then starts empty on every run).
    let states: Vec<Arc<dyn StageState>> =
        stages.iter().filter_map(|s| s.factory.state()).collect();
    let checkpoint = match checkpoint {
        Some(policy) if states.is_empty() || policy.store.db().is_some() => Some(policy),
        policy if !states.is_empty() => Some(CheckpointPolicy {
            store: Arc::new(RocksStore::scratch()?),
            interval: policy.map_or(DEFAULT_CHECKPOINT_INTERVAL, |p| p.interval),
        }),
        policy => policy,
    };
    if let Some(db) = checkpoint.as_ref().and_then(|p| p.store.db()) {
        for state in &states {
            let (state, db) = (state.clone(), db.clone());
            tokio::task::spawn_blocking(move || state.restore(db))
                .await
                .map_err(|e| Error::Internal(format!("restoring stage state: {e}")))??;
        }
    }
    if let Some(policy) = &checkpoint
        && !states.is_empty()
    {
        // Worker processes sharing the checkpoint directory: a partition's state follows it.
        source.set_handoff(Arc::new(TakeOver {
            store: policy.store.clone(),
            states: states.clone(),
        }));
    }
    let hook = source.commit_hook();
    let mut autoscaler = options.scaling.clone().map(Autoscaler::new);
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
    let cap = options.channel_capacity.max(1);
    let stop = shutdown.child_token();

    let (sink_tx, sink_rx) = mpsc::channel::<SinkMsg>(cap);
    let worker_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let barrier: Arc<Barrier> = Arc::default();
    let mut pool = Pool {
        stages,
        pipeline: name.clone(),
        dead_letters,
        stats: stats.clone(),
        sink: Some(sink_tx),
        failed: worker_failed.clone(),
        capacity: cap,
        tasks: JoinSet::new(),
        live: BTreeMap::new(),
        next_id: 0,
        peak: 0,
        barrier,
        wanted: None,
    };
    let mut partitions: HashMap<u32, PartitionHandle> = HashMap::new();
    // The first workers start before the sink task, which sends the checkpoint barriers:
    // no barrier can be out yet, so they do start (see `Barrier`).
    pool.scale_to(initial, &mut partitions);
    let sink_task = tokio::spawn(sink_loop(
        name.clone(),
        sink,
        dead_letter,
        sink_rx,
        columns,
        Checkpointing {
            policy: checkpoint,
            hook,
            states: states.clone(),
            barrier: pool.barrier.clone(),
            worker_failed,
        },
        stats.clone(),
    ));
    let mut scale_ticks = autoscaler.as_ref().map(|a| interval(a.policy().interval));
    // Windows close with time too, not only with the batches that arrive.
    let mut emit_ticks = (!states.is_empty()).then(|| interval(EMIT_INTERVAL));

    let mut readers: JoinSet<Result<mpsc::Sender<WorkerMsg>>> = JoinSet::new();
    let mut reader_tasks: HashMap<tokio::task::Id, u32> = HashMap::new();
    let mut first_error: Option<Error> = None;
    let record = |e: Error, first: &mut Option<Error>| {
        if first.is_none() {
            *first = Some(e);
        } else {
            tracing::debug!(error = %e, "further error while stopping");
        }
    };
    let mut assigning = true;
    // A worker that ends early without an error of its own lost its sink: the sink task's
    // error, read at the end, is the one to report.
    let mut worker_stopped = false;

    loop {
        if !assigning && readers.is_empty() {
            break;
        }
        tokio::select! {
            assignment = source.next_assignment(), if assigning => match assignment {
                Ok(Some(Assignment::Assign(reader))) => {
                    let info = reader.info().clone();
                    let id = info.id;
                    let mut lanes = Vec::with_capacity(lane_count);
                    let mut lane_rxs = Vec::with_capacity(lane_count);
                    for _ in 0..lane_count {
                        let (worker, tx) = pool.least_loaded();
                        pool.add_load(worker, 1);
                        let (route, route_rx) = watch::channel(Route { worker, tx });
                        lanes.push(Lane { worker, route });
                        lane_rxs.push(route_rx);
                    }
                    let part_stop = stop.child_token();
                    for state in &states {
                        state.assign(&info);
                    }
                    let progress = Arc::new(PartitionProgress::new(reader.log_end()));
                    if let Some(start) = reader.start_offset() {
                        progress.start_at(start);
                    }
                    for state in &states {
                        state.watch(&info, &progress);
                    }
                    stats.partitions.lock().expect("partitions lock").insert(info.name.clone(), progress.clone());
                    let task = readers.spawn(read_partition(reader, batching, lane_rxs, splitter.clone(), part_stop.clone(), stats.clone(), progress));
                    reader_tasks.insert(task.id(), id);
                    // A partition assigned again while its old reader still drains: the old
                    // handle goes (its task is no longer mapped to it).
                    if let Some(old) = partitions.insert(id, PartitionHandle { info, lanes, stop: part_stop, drained: None, task: task.id() }) {
                        old.stop.cancel();
                        pool.release_lanes(&old);
                    }
                }
                Ok(Some(Assignment::Revoke { partition, drained })) => {
                    if let Some(p) = partitions.get_mut(&partition) {
                        p.stop.cancel();
                        p.drained = drained;
                        for state in &states {
                            state.revoke(&p.info);
                        }
                        // No longer this process's to catch up on.
                        stats.partitions.lock().expect("partitions lock").remove(&p.info.name);
                    }
                    // An unknown partition has nothing to drain: dropping `drained` says so.
                }
                Ok(None) => {
                    assigning = false;
                    for state in &states {
                        state.assignments_done();
                    }
                }
                Err(e) => {
                    record(e, &mut first_error);
                    stop.cancel();
                    assigning = false;
                }
            },
            Some(joined) = readers.join_next_with_id() => {
                let (task, result) = match joined {
                    Ok((task, result)) => (task, result),
                    Err(e) => (e.id(), Err(Error::Internal(format!("a reader task panicked: {e}")))),
                };
                let handle = reader_tasks
                    .remove(&task)
                    .filter(|id| partitions.get(id).is_some_and(|p| p.task == task))
                    .and_then(|id| partitions.remove(&id));
                match (handle, result) {
                    (Some(p), Ok(last)) => {
                        pool.release_lanes(&p);
                        if let Some(done) = p.drained {
                            // After the reader's last batch, through the worker that has it.
                            let marker = WorkerMsg::Drain(Drained { partition: p.info, done });
                            tokio::spawn(async move { last.send(marker).await });
                        }
                    }
                    (Some(p), Err(e)) => {
                        pool.release_lanes(&p);
                        record(e, &mut first_error);
                        stop.cancel();
                    }
                    (None, Err(e)) => {
                        record(e, &mut first_error);
                        stop.cancel();
                    }
                    (None, Ok(_)) => {}
                }
            }
            Some(joined) = pool.tasks.join_next() => {
                // A worker ends before the readers only when it or the sink failed, or when
                // it was retired and has finished its last batch.
                match joined {
                    Ok(Err(e)) => {
                        record(e, &mut first_error);
                        stop.cancel();
                    }
                    Ok(Ok(id)) if pool.live.contains_key(&id) => {
                        worker_stopped = true;
                        stop.cancel();
                    }
                    Ok(Ok(_)) => {}
                    Err(e) => {
                        record(Error::Internal(format!("a worker task panicked: {e}")), &mut first_error);
                        stop.cancel();
                    }
                }
            }
            _ = tick(&mut scale_ticks), if assigning => {
                let Some(scaler) = autoscaler.as_mut() else { continue };
                let lag = stats.total_lag();
                if let Some(decision) = scaler.observe(Instant::now(), lag, partitions.len()) {
                    tracing::info!(from = decision.from, to = decision.to, reason = %decision.reason, "autoscaler: scaling {}", decision.direction());
                    let counter = if decision.to > decision.from { &stats.scaled_up } else { &stats.scaled_down };
                    RunStats::add(counter, 1);
                    pool.scale_to(decision.to, &mut partitions);
                }
            }
            _ = tick(&mut emit_ticks), if assigning => pool.emit_due(&partitions),
            Some(cmd) = recv_control(&mut control) => match cmd {
                Control::MovePartition { partition, worker } => {
                    match (partitions.get_mut(&partition), pool.live.contains_key(&worker)) {
                        (Some(p), true) => {
                            for lane in 0..p.lanes.len() {
                                pool.move_lane(p, lane, worker);
                            }
                        }
                        _ => tracing::warn!(partition, worker, "cannot move: no such partition or worker"),
                    }
                }
                Control::ScaleTo(n) => pool.scale_to(n, &mut partitions),
            },
            _ = pool.barrier.released.notified(), if pool.wanted.is_some() => {
                if let Some(n) = pool.wanted.take() {
                    pool.scale_to(n, &mut partitions);
                }
            }
            _ = stop.cancelled(), if assigning => assigning = false,
        }
    }

    drop(partitions);
    let peak = pool.peak;
    let mut workers = pool.close();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => record(e, &mut first_error),
            Err(e) => record(
                Error::Internal(format!("a worker task panicked: {e}")),
                &mut first_error,
            ),
        }
    }
    let sink_summary = match sink_task.await {
        Ok(Ok(summary)) => Some(summary),
        Ok(Err(e)) => {
            record(e, &mut first_error);
            None
        }
        Err(e) => {
            record(
                Error::Internal(format!("the sink task panicked: {e}")),
                &mut first_error,
            );
            None
        }
    };
    if worker_stopped {
        record(
            Error::Internal("a worker stopped while partitions were still being read".into()),
            &mut first_error,
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(RunReport {
            workers: peak,
            elapsed: started.elapsed(),
            sink: sink_summary.unwrap_or_default(),
        }),
    }
}

/// Takes partitions' state over from other processes sharing the checkpoint directory.
struct TakeOver {
    store: Arc<dyn CheckpointStore>,
    states: Vec<Arc<dyn StageState>>,
}

impl Handoff for TakeOver {
    fn take_over(&self, partitions: &[String]) -> Result<BTreeMap<String, i64>> {
        let keys: Vec<(String, PartitionKeys)> = partitions
            .iter()
            .map(|name| {
                let mut keys = PartitionKeys::default();
                for state in &self.states {
                    let k = state.partition_keys(name);
                    keys.prefixes.extend(k.prefixes);
                    keys.keys.extend(k.keys);
                }
                (name.clone(), keys)
            })
            .collect();
        let taken = self.store.take_over(&keys)?;
        for name in taken.keys() {
            for state in &self.states {
                state.forget(name);
            }
        }
        Ok(taken)
    }
}

/// The worker tasks: started and retired as the autoscaler decides, each fed by its own
/// channel. Workers are numbered in the order they start; a retired one finishes what it
/// was sent and ends once no reader routes to it any more.
struct Pool {
    stages: Vec<PlannedStage>,
    pipeline: Arc<str>,
    dead_letters: bool,
    stats: Arc<RunStats>,
    /// Dropped when the pool closes, so that the sink task ends after the last worker.
    sink: Option<mpsc::Sender<SinkMsg>>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    capacity: usize,
    tasks: JoinSet<Result<usize>>,
    /// Workers taking partitions: their channel and how many partitions they serve.
    live: BTreeMap<usize, (mpsc::Sender<WorkerMsg>, usize)>,
    next_id: usize,
    peak: usize,
    /// Every worker's channel, for checkpoint barriers, and whether one is out.
    barrier: Arc<Barrier>,
    /// Workers wanted while a barrier was out: started once it is released.
    wanted: Option<usize>,
}

/// The workers a stateful checkpoint's barrier goes to (retired ones drop out once ended),
/// and whether one is out. While it is, no worker starts: one started after the barrier
/// went out would not be paused, and could change state while it is snapshotted (rows past
/// the offsets the checkpoint commits, windows emitted and missing from it). Scaling up
/// waits for the release; moves between workers need not (every one of them is paused).
#[derive(Default)]
struct Barrier {
    targets: std::sync::Mutex<BarrierTargets>,
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct BarrierTargets {
    /// Each worker's channel, and a receiver that closes when its task has ended.
    workers: Vec<(mpsc::WeakSender<WorkerMsg>, watch::Receiver<()>)>,
    out: bool,
}

/// A worker a barrier must stop: one that takes messages is paused; one retired, whose
/// channel is closed while it still works through what was queued, is waited for.
enum Target {
    Live(mpsc::Sender<WorkerMsg>, watch::Receiver<()>),
    Draining(watch::Receiver<()>),
}

impl Barrier {
    /// Marks a barrier out; the workers it must stop.
    fn send_out(&self) -> Vec<Target> {
        let mut targets = self.targets.lock().expect("barrier lock");
        targets.out = true;
        targets
            .workers
            .retain(|(_, ended)| ended.has_changed().is_ok());
        targets
            .workers
            .iter()
            .map(|(w, ended)| match w.upgrade() {
                Some(w) => Target::Live(w, ended.clone()),
                None => Target::Draining(ended.clone()),
            })
            .collect()
    }

    /// The workers go on: waiting scale-ups may start theirs.
    fn release(&self) {
        self.targets.lock().expect("barrier lock").out = false;
        self.released.notify_one();
    }

    /// Registers a new worker's channel and end, unless a barrier is out (then `false`).
    fn join(&self, worker: &mpsc::Sender<WorkerMsg>, ended: watch::Receiver<()>) -> bool {
        let mut targets = self.targets.lock().expect("barrier lock");
        if targets.out {
            return false;
        }
        targets.workers.push((worker.downgrade(), ended));
        true
    }
}

impl Pool {
    /// Starts a worker; its stages open in its task. `None` while a checkpoint's barrier
    /// is out (see [`Barrier`]).
    fn spawn(&mut self) -> Option<usize> {
        let (tx, mut rx) = mpsc::channel(self.capacity);
        // Dropped when the task ends: a barrier waits for a retired worker's end.
        let (running, ended) = watch::channel(());
        if !self.barrier.join(&tx, ended) {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(id, (tx, 0));
        self.peak = self.peak.max(self.live.len());
        let chain = self.stages.clone();
        let (name, stats) = (self.pipeline.clone(), self.stats.clone());
        let sink = self.sink.clone().expect("the pool is open");
        let (failed, dead_letters) = (self.failed.clone(), self.dead_letters);
        self.tasks.spawn(async move {
            let _running = running;
            let result = worker_loop(id, name, chain, dead_letters, &mut rx, sink, stats).await;
            if result.is_err() {
                // Before the channel (and any barrier in it) is dropped: the sink task must
                // not snapshot state that is ahead of what it received.
                failed.store(true, Ordering::Release);
            }
            result.map(|()| id)
        });
        Some(id)
    }

    /// The live worker with the fewest partitions (the oldest among equals).
    fn least_loaded(&self) -> (usize, mpsc::Sender<WorkerMsg>) {
        let (id, (tx, _)) = self
            .live
            .iter()
            .min_by_key(|(id, (_, load))| (*load, **id))
            .expect("at least one worker");
        (*id, tx.clone())
    }

    fn add_load(&mut self, worker: usize, delta: isize) {
        if let Some((_, load)) = self.live.get_mut(&worker) {
            *load = load.saturating_add_signed(delta);
        }
    }

    /// A partition's reader has ended: its lanes no longer load their workers.
    fn release_lanes(&mut self, p: &PartitionHandle) {
        for lane in &p.lanes {
            self.add_load(lane.worker, -1);
        }
    }

    /// Routes a lane of the partition to `worker` from its next batch on (the reader hands
    /// it off: the old worker finishes the lane's batches first).
    fn move_lane(&mut self, p: &mut PartitionHandle, lane: usize, worker: usize) {
        let Some((tx, _)) = self.live.get(&worker) else {
            return;
        };
        let from = p.lanes[lane].worker;
        if from == worker {
            return;
        }
        let tx = tx.clone();
        self.add_load(from, -1);
        self.add_load(worker, 1);
        tracing::debug!(partition = %p.info.name, lane, from, to = worker, "moving partition");
        p.lanes[lane].worker = worker;
        p.lanes[lane].route.send_replace(Route { worker, tx });
    }

    /// Starts or retires workers until `n` (at least one) take partitions, then spreads
    /// the partitions' lanes evenly over them. Workers that cannot start while a barrier is
    /// out start at its release ([`Pool::wanted`]).
    fn scale_to(&mut self, n: usize, partitions: &mut HashMap<u32, PartitionHandle>) {
        let n = n.max(1);
        self.stats
            .workers_desired
            .store(n as u64, Ordering::Relaxed);
        self.wanted = None;
        while self.live.len() < n {
            if self.spawn().is_none() {
                self.wanted = Some(n);
                break;
            }
        }
        while self.live.len() > n {
            let (&retired, _) = self.live.last_key_value().expect("workers");
            self.live.remove(&retired);
            for p in partitions.values_mut() {
                for lane in 0..p.lanes.len() {
                    if p.lanes[lane].worker == retired {
                        let (to, _) = self.least_loaded();
                        self.move_lane(p, lane, to);
                    }
                }
            }
        }
        self.stats
            .workers
            .store(self.live.len() as u64, Ordering::Relaxed);
        // Even out: one partition at a time from the busiest worker to the idlest.
        loop {
            let busiest = self
                .live
                .iter()
                .max_by_key(|(id, (_, load))| (*load, std::cmp::Reverse(**id)));
            let (&from, &(_, most)) = busiest.expect("workers");
            let (to, _) = self.least_loaded();
            let fewest = self.live[&to].1;
            if most <= fewest + 1 {
                break;
            }
            let Some((p, lane)) = partitions.values_mut().find_map(|p| {
                let lane = p.lanes.iter().position(|l| l.worker == from)?;
                Some((p, lane))
            }) else {
                break;
            };
            self.move_lane(p, lane, to);
        }
    }

    /// Asks the least loaded worker to hand out what stateful stages have due (see
    /// [`WorkerMsg::Emit`]). A worker whose channel is full is busy: it hands out what is
    /// due after its next batch anyway.
    fn emit_due(&self, partitions: &HashMap<u32, PartitionHandle>) {
        // Under a partition read here now: not one revoked and draining, whose provenance
        // the rows would take and whose state a later stage would add them to.
        let Some(p) = partitions
            .values()
            .find(|p| p.drained.is_none() && !p.stop.is_cancelled())
        else {
            return;
        };
        let (_, tx) = self.least_loaded();
        let _ = tx.try_send(WorkerMsg::Emit(p.info.clone()));
    }

    /// Stops taking work: the workers end once their channels are empty. Their tasks.
    fn close(mut self) -> JoinSet<Result<usize>> {
        self.live.clear();
        self.sink = None;
        self.tasks
    }
}

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

/// Accumulates reads into batches of `size` records or `window` of time.
struct Batcher {
    batching: Batching,
    parts: Vec<Envelope>,
    rows: usize,
    deadline: Option<tokio::time::Instant>,
    ended: bool,
}

impl Batcher {
    fn new(batching: Batching) -> Self {
        Batcher {
            batching,
            parts: Vec::new(),
            rows: 0,
            deadline: None,
            ended: false,
        }
    }

    /// The next batch, or `None` when the partition has ended and nothing is buffered.
    ///
    /// # Cancel safety
    /// Cancel safe: what was read stays buffered in `self`.
    async fn next(&mut self, reader: &mut dyn PartitionReader) -> Result<Option<Envelope>> {
        while !self.ended && self.rows < self.batching.size {
            let want = self.batching.size - self.rows;
            let read = match self.deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, reader.read(want)).await {
                        Ok(read) => read?,
                        Err(_) => break,
                    }
                }
                None => reader.read(want).await?,
            };
            match read {
                // Reads whose records all failed still carry their offsets and dead letters.
                Some(env) if env.batch.num_rows() > 0 || !env.dead.is_empty() => {
                    if self.parts.is_empty() {
                        self.deadline = Some(tokio::time::Instant::now() + self.batching.window);
                    }
                    self.rows += env.batch.num_rows();
                    self.parts.push(env);
                }
                Some(_) => {}
                None => self.ended = true,
            }
        }
        self.take()
    }

    /// Whatever is buffered, as one batch.
    fn take(&mut self) -> Result<Option<Envelope>> {
        self.rows = 0;
        self.deadline = None;
        match self.parts.len() {
            0 => Ok(None),
            1 => Ok(self.parts.pop()),
            _ => {
                let mut parts = std::mem::take(&mut self.parts);
                let schema = parts[0].batch.schema();
                let batch = concat_batches(&schema, parts.iter().map(|p| &p.batch))
                    .map_err(|e| Error::arrow("joining reads into a batch", e))?;
                let dead = parts
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.dead))
                    .collect();
                Ok(Some(Envelope {
                    partition: parts[0].partition.clone(),
                    offsets: parts[0].offsets.start..parts[parts.len() - 1].offsets.end,
                    batch,
                    dead,
                }))
            }
        }
    }
}

async fn read_partition(
    mut reader: Box<dyn PartitionReader>,
    batching: Batching,
    mut lanes: Vec<watch::Receiver<Route>>,
    splitter: Option<Arc<Splitter>>,
    stop: CancellationToken,
    stats: Arc<RunStats>,
    progress: Arc<PartitionProgress>,
) -> Result<mpsc::Sender<WorkerMsg>> {
    let info = reader.info().clone();
    // Split partitions read a batch per lane at a time, so that each lane's part is about
    // a batch: n batches of the partition in flight at once, as with Lambda's factor.
    let batching = Batching {
        size: batching.size.saturating_mul(lanes.len()),
        ..batching
    };
    let mut batcher = Batcher::new(batching);
    let mut current: Vec<Route> = lanes
        .iter_mut()
        .map(|r| r.borrow_and_update().clone())
        .collect();
    let ledger = splitter.as_ref().map(|_| Arc::new(Ledger::default()));
    let mut end = None;
    let mut exhausted = false;
    'read: loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => batcher.take()?,
            next = batcher.next(reader.as_mut()) => {
                let next = next?;
                exhausted = next.is_none();
                next
            }
        };
        let Some(env) = next else { break };
        if end.is_none() {
            // Lag counts from the first record read until a checkpoint says more.
            progress.start_at(env.offsets.start);
        }
        end = Some(env.offsets.end);
        RunStats::add(&stats.records_in, env.batch.num_rows() as u64);
        RunStats::add(&stats.batches_in, 1);
        let parts = match (&splitter, &ledger) {
            (Some(splitter), Some(ledger)) => splitter.split(env, ledger)?,
            _ => vec![(0, env, None)],
        };
        for (lane, env, ticket) in parts {
            if lanes[lane].has_changed().unwrap_or(false) {
                let new = lanes[lane].borrow_and_update().clone();
                if new.worker != current[lane].worker {
                    hand_off(&info, &current[lane]).await;
                    current[lane] = new;
                }
            }
            if current[lane]
                .tx
                .send(WorkerMsg::Batch(env, ticket))
                .await
                .is_err()
            {
                // The worker is gone: the pipeline is stopping and the worker's error says why.
                break 'read;
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    // Every lane but the last finishes what it was sent, so that whatever follows on the
    // last lane's worker (the end of the partition, a Drain marker) comes after all of it.
    let last = current.pop().expect("a partition has at least one lane");
    for other in &current {
        if other.worker != last.worker {
            hand_off(&info, other).await;
        }
    }
    if exhausted {
        let ended = WorkerMsg::Ended {
            partition: info.clone(),
            end: end.unwrap_or(0),
        };
        let _ = last.tx.send(ended).await;
    }
    // The worker that holds this partition's last batch: a Drain marker must follow it
    // there, even if a move was requested since.
    Ok(last.tx)
}

/// Splits a partition's batches into lanes by key (`parallelization_factor`): records of
/// one key always take the same lane, and a lane is processed in order, so each key's
/// records stay in order while the lanes run at once. Records without a key have no order
/// to keep and are spread by offset.
pub(crate) struct Splitter {
    lanes: usize,
    key: Arc<str>,
}

/// One batch split into lanes: done once every part is in the sink.
struct Split {
    parts: std::sync::atomic::AtomicUsize,
    end: i64,
}

/// A split partition's batches in read order, not yet all in the sink: its offset is
/// committed only up to the first of them.
#[derive(Default)]
struct Ledger(std::sync::Mutex<std::collections::VecDeque<Arc<Split>>>);

/// What the sink needs to count a part of a split batch.
struct Ticket {
    split: Arc<Split>,
    ledger: Arc<Ledger>,
}

impl Ticket {
    /// Counts this part as written; the partition's new end of done records, if the
    /// earliest unfinished batch finished.
    fn done(&self) -> Option<i64> {
        if self.split.parts.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let mut pending = self.ledger.0.lock().expect("ledger lock");
        let mut end = None;
        while pending
            .front()
            .is_some_and(|s| s.parts.load(Ordering::Acquire) == 0)
        {
            end = pending.pop_front().map(|s| s.end);
        }
        end
    }
}

impl Splitter {
    pub(crate) fn new(lanes: usize, key: Arc<str>) -> Self {
        Splitter { lanes, key }
    }

    /// The batch's parts by lane (lanes without records get none; the batch's failed
    /// records ride with the first part), registered in `ledger`.
    fn split(
        &self,
        env: Envelope,
        ledger: &Arc<Ledger>,
    ) -> Result<Vec<(usize, Envelope, Option<Ticket>)>> {
        let Envelope {
            partition,
            offsets,
            batch,
            mut dead,
        } = env;
        let column = batch.column_by_name(&self.key).ok_or_else(|| {
            Error::Internal(format!(
                "parallelization_factor splits records by `{}`, which the source's records do not have",
                self.key
            ))
        })?;
        let mut by_lane: Vec<Vec<u32>> = vec![Vec::new(); self.lanes];
        if batch.num_rows() > 0 {
            let converter = arrow::row::RowConverter::new(vec![arrow::row::SortField::new(
                column.data_type().clone(),
            )])
            .map_err(|e| Error::arrow("hashing the keys of a batch", e))?;
            let rows = converter
                .convert_columns(std::slice::from_ref(column))
                .map_err(|e| Error::arrow("hashing the keys of a batch", e))?;
            for i in 0..batch.num_rows() {
                let lane = if column.is_null(i) {
                    (offsets.start as usize).wrapping_add(i) % self.lanes
                } else {
                    (xxhash_rust::xxh3::xxh3_64(rows.row(i).as_ref()) % self.lanes as u64) as usize
                };
                by_lane[lane].push(i as u32);
            }
        }
        let mut parts = Vec::new();
        for (lane, rows) in by_lane.into_iter().enumerate() {
            if rows.is_empty() && !(parts.is_empty() && lane + 1 == self.lanes) {
                continue;
            }
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                let indices = arrow::array::UInt32Array::from(rows);
                arrow::compute::take_record_batch(&batch, &indices)
                    .map_err(|e| Error::arrow("splitting a batch into lanes", e))?
            };
            parts.push((lane, part));
        }
        let split = Arc::new(Split {
            parts: std::sync::atomic::AtomicUsize::new(parts.len()),
            end: offsets.end,
        });
        ledger
            .0
            .lock()
            .expect("ledger lock")
            .push_back(split.clone());
        Ok(parts
            .into_iter()
            .map(|(lane, part)| {
                let env = Envelope {
                    partition: partition.clone(),
                    offsets: offsets.clone(),
                    batch: part,
                    dead: std::mem::take(&mut dead),
                };
                let ticket = Ticket {
                    split: split.clone(),
                    ledger: ledger.clone(),
                };
                (lane, env, Some(ticket))
            })
            .collect())
    }
}

/// Waits until the old worker has processed everything this partition sent it.
async fn hand_off(info: &PartitionInfo, old: &Route) {
    let (done, processed) = oneshot::channel();
    let release = WorkerMsg::Release {
        partition: info.id,
        done,
    };
    if old.tx.send(release).await.is_ok() {
        let _ = processed.await;
    }
    tracing::debug!(partition = %info.name, from = old.worker, "partition handed off");
}

async fn worker_loop(
    id: usize,
    pipeline: Arc<str>,
    planned: Vec<PlannedStage>,
    dead_letters: bool,
    rx: &mut mpsc::Receiver<WorkerMsg>,
    sink: mpsc::Sender<SinkMsg>,
    stats: Arc<RunStats>,
) -> Result<()> {
    // Asked once: a factory may build its schema on every call.
    let schemas: Vec<_> = planned.iter().map(|s| s.factory.output_schema()).collect();
    let mut chain: Vec<(Box<dyn Stage>, StageContext)> = Vec::with_capacity(planned.len());
    for (i, stage) in planned.iter().enumerate() {
        let ctx = StageContext {
            pipeline: pipeline.clone(),
            stage: stage.name.clone(),
            worker: id,
            stats: stats.clone(),
            index: i,
            partition: None,
            dead_letters,
        };
        let mut instance = stage.factory.create()?;
        let t0 = Instant::now();
        instance.open(&ctx).await.map_err(|e| Error::Stage {
            stage: stage.name.to_string(),
            origin: format!("start-up of worker {id}"),
            class: e.class(),
            message: e.to_string(),
        })?;
        stats.stages[i]
            .cold_start_nanos
            .fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        chain.push((instance, ctx));
    }

    let mut chain = Chain {
        stages: chain,
        planned: &planned,
        schemas: &schemas,
        dead_letters,
        stats: &stats,
    };
    while let Some(msg) = rx.recv().await {
        let (mut env, ticket) = match msg {
            WorkerMsg::Batch(env, ticket) => (env, ticket),
            WorkerMsg::Release { partition, done } => {
                tracing::trace!(worker = id, partition, "released partition");
                let _ = done.send(());
                continue;
            }
            WorkerMsg::Drain(drained) => {
                if sink.send(SinkMsg::Drain(drained)).await.is_err() {
                    break;
                }
                continue;
            }
            WorkerMsg::Barrier(waiting) => {
                let (resume, resumed) = oneshot::channel();
                if waiting.send(resume).is_ok() {
                    let _ = resumed.await;
                }
                continue;
            }
            WorkerMsg::Emit(partition) => {
                // Offsets 0..0: never moves the partition's progress (see `sink_loop`).
                if !chain.send_pending(&partition, 0, &sink).await? {
                    break;
                }
                continue;
            }
            WorkerMsg::Ended { partition, end } => {
                for (stage, ctx) in chain.stages.iter_mut() {
                    ctx.partition = Some(partition.clone());
                    stage.end_of_partition(ctx).await?;
                }
                if !chain.send_pending(&partition, end, &sink).await? {
                    break;
                }
                continue;
            }
        };
        let started = Instant::now();
        chain.run(0, &mut env).await?;
        let (partition, end) = (env.partition.clone(), env.offsets.end);
        // Sent even when empty: the sink task counts its offsets as done.
        if sink.send(SinkMsg::Batch(env, ticket)).await.is_err() {
            break;
        }
        if !chain.send_pending(&partition, end, &sink).await? {
            break;
        }
        stats.batch_latency.record(started.elapsed());
    }

    for (stage, ctx) in &mut chain.stages {
        stage.close(ctx).await?;
    }
    Ok(())
}

/// A worker's instances of the stages, and how to run a batch through them.
struct Chain<'a> {
    stages: Vec<(Box<dyn Stage>, StageContext)>,
    planned: &'a [PlannedStage],
    schemas: &'a [arrow::datatypes::SchemaRef],
    dead_letters: bool,
    stats: &'a RunStats,
}

impl Chain<'_> {
    /// Runs `env` through the stages from `from` on.
    async fn run(&mut self, from: usize, env: &mut Envelope) -> Result<()> {
        for (i, (stage, ctx)) in self.stages.iter_mut().enumerate().skip(from) {
            if env.batch.num_rows() == 0 {
                break;
            }
            ctx.partition = Some(env.partition.clone());
            let input = env.batch.clone();
            let output = failure::run_stage(
                stage.as_mut(),
                ctx,
                &self.planned[i].policy,
                &self.schemas[i],
                input,
                Outcome {
                    env: &mut *env,
                    dead_letters: self.dead_letters,
                },
                &self.stats.stages[i],
            )
            .await?;
            env.batch = output;
        }
        Ok(())
    }

    /// Sends what stages produced beyond their batches (closed windows), each chunk
    /// through the stages after the one that produced it. False when the sink is gone.
    async fn send_pending(
        &mut self,
        partition: &Arc<PartitionInfo>,
        end: i64,
        sink: &mpsc::Sender<SinkMsg>,
    ) -> Result<bool> {
        for i in 0..self.stages.len() {
            loop {
                let (stage, ctx) = &mut self.stages[i];
                let Some(batch) = stage.pending(ctx).await? else {
                    break;
                };
                RunStats::add(&self.stats.stages[i].rows_out, batch.num_rows() as u64);
                let mut env = Envelope {
                    partition: partition.clone(),
                    offsets: end..end,
                    batch,
                    dead: Vec::new(),
                };
                self.run(i + 1, &mut env).await?;
                if sink.send(SinkMsg::Batch(env, None)).await.is_err() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// What the sink task needs to take checkpoints.
struct Checkpointing {
    policy: Option<CheckpointPolicy>,
    hook: Option<Arc<dyn CommitHook>>,
    /// Stateful stages: their checkpoints wait until every worker is between batches.
    states: Vec<Arc<dyn StageState>>,
    barrier: Arc<Barrier>,
    /// Set when a worker stopped on an error: its stages' state may be ahead of what the
    /// sink received, so no further checkpoint of a stateful pipeline is taken.
    worker_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointing {
    /// Takes a checkpoint, if the pipeline keeps them: stage state (while every worker
    /// waits), then the sink flushed and the offsets committed. None of a stateful pipeline
    /// after a worker failed.
    async fn take(
        &self,
        sink: &mut dyn Sink,
        dead_letter: Option<&mut DeadLetterSink>,
        progress: &HashMap<Arc<str>, i64>,
        committed: &mut HashMap<Arc<str>, i64>,
        stats: &RunStats,
    ) -> Result<()> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        if !self.states.is_empty() && self.worker_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let t0 = Instant::now();
        let written = snapshot_states(&self.states).await?;
        let taken = take_checkpoint(
            sink,
            dead_letter,
            policy,
            self.hook.as_ref(),
            (progress, committed),
            written.bytes > 0,
            stats,
        )
        .await?;
        if taken {
            stats.checkpoint_duration.record(t0.elapsed());
            stats
                .checkpoint_state_bytes
                .store(written.bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Takes a checkpoint ([`Checkpointing::take`]), then releases the partitions that
    /// were drained for it.
    async fn take_and_release(
        &self,
        sink: &mut dyn Sink,
        dead_letter: Option<&mut DeadLetterSink>,
        drains: &mut Vec<Drained>,
        progress: &mut HashMap<Arc<str>, i64>,
        committed: &mut HashMap<Arc<str>, i64>,
        stats: &RunStats,
    ) -> Result<()> {
        self.take(sink, dead_letter, progress, committed, stats)
            .await?;
        self.finish_drains(drains, progress, committed);
        Ok(())
    }

    /// Revoked partitions whose records are all in a committed checkpoint: their stage
    /// state is released and their drain is reported done.
    fn finish_drains(
        &self,
        drains: &mut Vec<Drained>,
        progress: &mut HashMap<Arc<str>, i64>,
        committed: &mut HashMap<Arc<str>, i64>,
    ) {
        for Drained { partition, done } in drains.drain(..) {
            for state in &self.states {
                state.release(&partition);
            }
            // A later owner of the partition reports its own progress.
            progress.remove(&partition.name);
            committed.remove(&partition.name);
            let _ = done.send(());
            tracing::debug!(partition = %partition.name, "revoked partition drained");
        }
    }
}

/// Every worker waiting at a barrier, to be resumed by dropping these.
type Paused = Vec<oneshot::Sender<()>>;

async fn sink_loop(
    pipeline: Arc<str>,
    mut sink: Box<dyn Sink>,
    mut dead_letter: Option<DeadLetterSink>,
    mut rx: mpsc::Receiver<SinkMsg>,
    columns: ColumnSelection,
    checkpointing: Checkpointing,
    stats: Arc<RunStats>,
) -> Result<String> {
    let mut ticker = sink.tick_interval().map(interval);
    let mut checkpoints = checkpointing.policy.as_ref().map(|c| interval(c.interval));
    let stateful = !checkpointing.states.is_empty();
    let checkpointed = checkpointing.policy.is_some();
    // Per partition: the next offset after everything received (written or emptied).
    let mut progress: HashMap<Arc<str>, i64> = HashMap::new();
    let mut committed: HashMap<Arc<str>, i64> = HashMap::new();
    // Revoked partitions waiting for the checkpoint that covers them.
    let mut drains: Vec<Drained> = Vec::new();
    // A checkpoint of stateful stages waiting for every worker to pause.
    let mut pausing: Option<oneshot::Receiver<Paused>> = None;
    let received = async |msg: SinkMsg,
                          sink: &mut Box<dyn Sink>,
                          dead_letter: &mut Option<DeadLetterSink>,
                          progress: &mut HashMap<Arc<str>, i64>,
                          drains: &mut Vec<Drained>|
           -> Result<()> {
        let (env, ticket) = match msg {
            SinkMsg::Batch(env, ticket) => (env, ticket),
            SinkMsg::Drain(drained) => {
                drains.push(drained);
                return Ok(());
            }
        };
        if env.batch.num_rows() > 0 {
            let batch = columns.apply(&env.batch)?;
            let rows = batch.num_rows() as u64;
            sink.write(batch).await?;
            let refused = sink.take_refused();
            RunStats::add(&stats.records_out, rows - refused.len() as u64);
            if !refused.is_empty() {
                bury_refused(&pipeline, &env, &refused, dead_letter.as_mut(), &stats).await?;
            }
        }
        if !env.dead.is_empty() {
            let dlq = dead_letter
                .as_mut()
                .ok_or_else(|| Error::Internal("dead letters without a dead-letter sink".into()))?;
            dlq.write(&pipeline, &env.dead).await?;
            RunStats::add(&stats.records_dead_lettered, env.dead.len() as u64);
            RunStats::add(&stats.records_failed, env.dead.len() as u64);
        }
        // A lane's part: the partition is done up to the first batch with a part still out.
        let done = match &ticket {
            Some(ticket) => match ticket.done() {
                Some(end) => end,
                None => return Ok(()),
            },
            None => env.offsets.end,
        };
        if !checkpointed && !env.offsets.is_empty() {
            // Without checkpoints, a record is done once the sink has it.
            if let Some(p) = stats.partition(&env.partition.name) {
                p.advance_to(done);
            }
        }
        // Output made at the end of a partition (closed windows) carries an empty range: it
        // never starts or lowers a partition's progress.
        match progress.get_mut(&env.partition.name) {
            Some(end) => *end = (*end).max(done),
            None if !env.offsets.is_empty() => {
                progress.insert(env.partition.name.clone(), done);
            }
            None => {}
        }
        Ok(())
    };
    loop {
        // Whether a checkpoint is due: on the timer, and for revoked partitions.
        let due = tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                received(msg, &mut sink, &mut dead_letter, &mut progress, &mut drains).await?;
                !drains.is_empty()
            }
            paused = wait_paused(&mut pausing) => {
                pausing = None;
                // Everything the workers sent before pausing is in the channel: take it in.
                while let Ok(msg) = rx.try_recv() {
                    received(msg, &mut sink, &mut dead_letter, &mut progress, &mut drains).await?;
                }
                checkpointing.take(sink.as_mut(), dead_letter.as_mut(), &progress, &mut committed, &stats).await?;
                drop(paused);
                checkpointing.barrier.release();
                checkpointing.finish_drains(&mut drains, &mut progress, &mut committed);
                false
            }
            _ = tick(&mut ticker), if ticker.is_some() => {
                sink.tick().await?;
                false
            }
            _ = tick(&mut checkpoints), if checkpoints.is_some() => true,
        };
        if !due {
            continue;
        }
        if stateful {
            // Taken once every worker waits between batches (the branch above).
            pausing.get_or_insert_with(|| pause_workers(&checkpointing.barrier));
        } else {
            checkpointing
                .take_and_release(
                    sink.as_mut(),
                    dead_letter.as_mut(),
                    &mut drains,
                    &mut progress,
                    &mut committed,
                    &stats,
                )
                .await?;
        }
    }
    sink.close().await?;
    if let Some(dlq) = &mut dead_letter {
        dlq.sink.close().await?;
    }
    // Every worker has ended: the state is still.
    checkpointing
        .take_and_release(
            sink.as_mut(),
            dead_letter.as_mut(),
            &mut drains,
            &mut progress,
            &mut committed,
            &stats,
        )
        .await?;
    Ok(match &dead_letter {
        Some(dlq) => format!("{}; dead letters: {}", sink.summary(), dlq.sink.summary()),
        None => sink.summary(),
    })
}

/// The stage name of rows the sink refused.
pub const SINK_STAGE: &str = "sink";

/// Rows the sink refused (it can never take them: larger than it allows) go to the dead
/// letters of the stage `sink`; without a dead-letter sink, the first one stops the run.
async fn bury_refused(
    pipeline: &str,
    env: &Envelope,
    refused: &[(u32, String)],
    dead_letter: Option<&mut DeadLetterSink>,
    stats: &RunStats,
) -> Result<()> {
    let Some(dlq) = dead_letter else {
        let (row, reason) = &refused[0];
        let origin = match crate::batch::offset_at(&env.batch, *row as usize) {
            Some(o) => format!("{} offset {o}", env.partition.name),
            None => env.origin(),
        };
        return Err(Error::Stage {
            stage: SINK_STAGE.into(),
            origin,
            class: crate::ErrorClass::Permanent,
            message: reason.clone(),
        });
    };
    let stage: Arc<str> = SINK_STAGE.into();
    let mut letters = Vec::with_capacity(refused.len());
    for (row, reason) in refused {
        // Stages that drop `_offset` leave the batch's range as the best provenance.
        let reason = match crate::batch::offset_at(&env.batch, *row as usize) {
            Some(_) => reason.clone(),
            None => format!(
                "{reason} (one of {}: the stages dropped `_offset`)",
                env.origin()
            ),
        };
        letters.extend(crate::dead_letter::letters_of_rows(
            &env.batch,
            &[*row],
            &env.partition,
            crate::dead_letter::RowFailure {
                stage: &stage,
                class: crate::ErrorClass::Permanent,
                reason: &reason,
                attempts: 1,
                first_failed_at: crate::dead_letter::now_ms(),
            },
        )?);
    }
    dlq.write(pipeline, &letters).await?;
    RunStats::add(&stats.records_dead_lettered, letters.len() as u64);
    RunStats::add(&stats.records_failed, letters.len() as u64);
    Ok(())
}

/// Sends a barrier to every worker; the receiver yields once all of them wait at it (a
/// worker that has ended does not count).
fn pause_workers(barrier: &Barrier) -> oneshot::Receiver<Paused> {
    let workers = barrier.send_out();
    let (all_paused, paused) = oneshot::channel();
    tokio::spawn(async move {
        let mut waiting = Vec::with_capacity(workers.len());
        let mut draining = Vec::new();
        for worker in workers {
            match worker {
                Target::Live(worker, ended) => {
                    let (tx, rx) = oneshot::channel();
                    match worker.send(WorkerMsg::Barrier(tx)).await {
                        Ok(()) => waiting.push((rx, ended)),
                        Err(_) => draining.push(ended),
                    }
                }
                Target::Draining(ended) => draining.push(ended),
            }
        }
        let mut resumes = Vec::with_capacity(waiting.len());
        for (rx, ended) in waiting {
            match rx.await {
                Ok(resume) => resumes.push(resume),
                // It stopped before the barrier: wait until it has, if it is not done.
                Err(_) => draining.push(ended),
            }
        }
        // Retired workers finish what they were given, then end: not during the snapshot.
        for mut ended in draining {
            while ended.changed().await.is_ok() {}
        }
        let _ = all_paused.send(resumes);
    });
    paused
}

/// # Cancel safety
/// Cancel safe.
async fn wait_paused(pausing: &mut Option<oneshot::Receiver<Paused>>) -> Paused {
    match pausing {
        Some(rx) => rx.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

async fn snapshot_states(states: &[Arc<dyn StageState>]) -> Result<SnapshotStats> {
    if states.is_empty() {
        return Ok(SnapshotStats::default());
    }
    let states = states.to_vec();
    let t0 = Instant::now();
    let written = tokio::task::spawn_blocking(move || {
        states.iter().try_fold(SnapshotStats::default(), |sum, s| {
            let one = s.snapshot()?;
            Ok::<_, Error>(SnapshotStats {
                keys: sum.keys + one.keys,
                bytes: sum.bytes + one.bytes,
            })
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("snapshotting stage state: {e}")))??;
    tracing::debug!(keys = written.keys, bytes = written.bytes, took = ?t0.elapsed(), "stage state snapshot");
    Ok(written)
}

fn interval(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// # Cancel safety
/// Cancel safe: waits on the interval only.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The next offset of each partition, by name.
type Offsets = HashMap<Arc<str>, i64>;

/// Flushes the sink, then commits the offsets that advanced since the last checkpoint,
/// and the stage state when it changed without them (windows that time closed: their rows
/// went to the sink and the state no longer holds them). Whether there was anything to
/// commit.
async fn take_checkpoint(
    sink: &mut dyn Sink,
    dead_letter: Option<&mut DeadLetterSink>,
    policy: &CheckpointPolicy,
    hook: Option<&Arc<dyn CommitHook>>,
    (progress, committed): (&Offsets, &mut Offsets),
    state_changed: bool,
    stats: &RunStats,
) -> Result<bool> {
    let changed: std::collections::BTreeMap<String, i64> = progress
        .iter()
        .filter(|(name, offset)| committed.get(*name) != Some(offset))
        .map(|(name, offset)| (name.to_string(), *offset))
        .collect();
    if changed.is_empty() && !state_changed {
        return Ok(false);
    }
    let t0 = Instant::now();
    sink.flush().await?;
    // Failed records count as done only once the dead-letter sink holds them.
    if let Some(dlq) = dead_letter {
        dlq.sink.flush().await?;
    }
    let checkpoint = Checkpoint {
        id: stats.checkpoints.load(Ordering::Relaxed) + 1,
        offsets: changed,
        fallback: false,
    };
    let store = policy.store.clone();
    let hook = hook.cloned();
    let id = checkpoint.id;
    let checkpoint = tokio::task::spawn_blocking(move || {
        store.commit(&checkpoint)?;
        if let Some(hook) = hook {
            hook.committed(&checkpoint);
        }
        Ok::<_, Error>(checkpoint)
    })
    .await
    .map_err(|e| Error::Internal(format!("committing a checkpoint: {e}")))??;
    {
        // What the group's committed offsets now say: the lag counts from here.
        let partitions = stats.partitions.lock().expect("partitions lock");
        for (name, offset) in &checkpoint.offsets {
            if let Some(p) = partitions.get(name.as_str()) {
                p.advance_to(*offset);
            }
        }
    }
    for (name, offset) in checkpoint.offsets {
        committed.insert(name.into(), offset);
    }
    stats.checkpoints.store(id, Ordering::Relaxed);
    tracing::debug!(checkpoint = id, took = ?t0.elapsed(), "checkpoint committed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(ledger: &Arc<Ledger>, parts: usize, end: i64) -> Vec<Ticket> {
        let split = Arc::new(Split {
            parts: std::sync::atomic::AtomicUsize::new(parts),
            end,
        });
        ledger.0.lock().unwrap().push_back(split.clone());
        (0..parts)
            .map(|_| Ticket {
                split: split.clone(),
                ledger: ledger.clone(),
            })
            .collect()
    }

    #[test]
    fn a_split_partition_is_done_up_to_its_first_unfinished_batch() {
        let ledger = Arc::new(Ledger::default());
        let a = split(&ledger, 2, 100);
        let b = split(&ledger, 1, 200);
        let c = split(&ledger, 3, 300);
        // Later batches finishing first commit nothing.
        assert_eq!(b[0].done(), None);
        assert_eq!(c[2].done(), None);
        assert_eq!(a[0].done(), None);
        // The first batch's last part: done through the second, which finished before.
        assert_eq!(a[1].done(), Some(200));
        assert_eq!(c[0].done(), None);
        assert_eq!(c[1].done(), Some(300));
        assert!(ledger.0.lock().unwrap().is_empty());
    }
}
