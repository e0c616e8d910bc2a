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
//!
//! # Where things are
//! Here: the pipeline, its options and `run`, which wires the tasks. `supervisor.rs`: the
//! main loop — partitions assigned and revoked, readers and workers that end, scaling,
//! commands. `messages.rs`: what the tasks send each other and the release, barrier and
//! drain protocols. `reader.rs`: a partition's reader and batcher. `lanes.rs`: a partition
//! split by key over workers. `pool.rs`: the workers, started, retired and balanced.
//! `worker.rs`: a batch through the stages. `sink_task.rs`: writing and the offsets done.
//! `checkpointing.rs`: checkpoints, the barrier's pause and the take-over of state.

mod checkpointing;
mod lanes;
mod messages;
mod outputs;
mod pool;
mod reader;
mod sink_task;
mod supervisor;
mod worker;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::autoscale::ScalingPolicy;
use crate::checkpoint::{CheckpointStore, MemoryStore, RocksStore};
use crate::dead_letter::DeadLetterSink;
use crate::graph::Graph;
use crate::source::Source;
use crate::stage::PlannedStage;
use crate::state::StageState;
use crate::stats::RunStats;
use crate::{Error, Result};

use checkpointing::{Checkpointing, TakeOver};
use messages::SinkMsg;
pub use outputs::Output;
use outputs::Outputs;
use pool::Pool;
pub use sink_task::SINK_STAGE;
use sink_task::SinkTask;
use supervisor::Supervisor;

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
    /// In a topological order: each reads the source or stages before it (`graph`).
    pub stages: Vec<PlannedStage>,
    /// What each stage and output reads ([`Graph::chain`] for a pipeline in a row).
    pub graph: Graph,
    pub outputs: Vec<Output>,
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

impl CheckpointPolicy {
    /// How often a pipeline's declared checkpoints (`checkpoint: { dir }`) are taken
    /// unless it says otherwise.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
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

/// How often checkpoints are taken when the pipeline declares none but needs them: a
/// consumer group's offsets committed through an in-memory store (as often as Kafka's own
/// `auto.commit.interval.ms`), or stage state in a scratch database. Shorter than
/// [`CheckpointPolicy::DEFAULT_INTERVAL`]: nothing is written to disk for it but the state.
const UNDECLARED_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// How often a stateful pipeline's workers are asked for what time alone made due.
pub(super) const EMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the pipeline until its source ends, `shutdown` is cancelled, or something fails.
pub async fn run(
    pipeline: Pipeline,
    options: RunOptions,
    stats: Arc<RunStats>,
    shutdown: CancellationToken,
    control: Option<mpsc::Receiver<Control>>,
) -> Result<RunReport> {
    let started = Instant::now();
    let Pipeline {
        name,
        mut source,
        batching,
        stages,
        graph,
        outputs,
        checkpoint,
        dead_letter,
    } = pipeline;
    graph
        .check()
        .map_err(|e| Error::Internal(format!("the pipeline's graph: {e}")))?;
    if graph.stages.len() != stages.len() || graph.outputs.len() != outputs.len() {
        return Err(Error::Internal(
            "the pipeline's graph does not match its stages and outputs".into(),
        ));
    }
    let states: Vec<Arc<dyn StageState>> =
        stages.iter().filter_map(|s| s.factory.state()).collect();
    let checkpoint = restore(source.as_mut(), checkpoint, &states, &stats).await?;
    let cap = options.channel_capacity.max(1);
    let (sink_tx, sink_rx) = mpsc::channel::<SinkMsg>(cap);
    let pool = Pool::new(
        stages,
        graph,
        name.clone(),
        dead_letter.is_some(),
        stats.clone(),
        sink_tx,
        cap,
    );
    let checkpointing = Checkpointing {
        policy: checkpoint,
        hook: source.commit_hook(),
        book: source.position_book(),
        states: states.clone(),
        barrier: pool.barrier.clone(),
        worker_failed: pool.failed(),
        stats: stats.clone(),
    };
    let outputs = Outputs::new(outputs, stats.clone());
    let stop = shutdown.child_token();
    let mut supervisor = Supervisor::start(source, batching, &options, states, stats, pool, stop);
    let sink_task =
        tokio::spawn(SinkTask::new(name, outputs, dead_letter, checkpointing).run(sink_rx));
    supervisor.run(control).await;
    supervisor.finish(sink_task, started).await
}

/// Restores the source's offsets and the stages' state from the last checkpoint, and says
/// where checkpoints go: the pipeline's store; one in memory for a source that commits
/// through checkpoints (a consumer group) when the pipeline keeps none; a scratch database
/// for stage state when the store has none.
async fn restore(
    source: &mut dyn Source,
    checkpoint: Option<CheckpointPolicy>,
    states: &[Arc<dyn StageState>],
    stats: &RunStats,
) -> Result<Option<CheckpointPolicy>> {
    if let Some(policy) = &checkpoint {
        let store = policy.store.clone();
        let last = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| Error::task("checkpoint load", e))??;
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
            interval: UNDECLARED_CHECKPOINT_INTERVAL,
        })
    });
    // Stage state needs a database: the checkpoint store's, or a scratch one when the
    // pipeline keeps no checkpoints (its state then starts empty on every run).
    let checkpoint = match checkpoint {
        Some(policy) if states.is_empty() || policy.store.db().is_some() => Some(policy),
        policy if !states.is_empty() => Some(CheckpointPolicy {
            store: Arc::new(RocksStore::scratch()?),
            interval: policy.map_or(UNDECLARED_CHECKPOINT_INTERVAL, |p| p.interval),
        }),
        policy => policy,
    };
    if let Some(db) = checkpoint.as_ref().and_then(|p| p.store.db()) {
        for state in states {
            let (state, db) = (state.clone(), db.clone());
            tokio::task::spawn_blocking(move || state.restore(db))
                .await
                .map_err(|e| Error::task("stage state restore", e))??;
        }
    }
    if let Some(policy) = &checkpoint
        && !states.is_empty()
    {
        // Worker processes sharing the checkpoint directory: a partition's state follows it.
        source.set_handoff(Arc::new(TakeOver {
            store: policy.store.clone(),
            states: states.to_vec(),
        }));
    }
    Ok(checkpoint)
}

pub(super) fn interval(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// # Cancel safety
/// Cancel safe: waits on the interval only.
pub(super) async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
