//! The stage trait: one hot method that turns a batch into a batch.
//!
//! A stage kind (SQL, a Rust function, a model, an HTTP call) is planned once per pipeline
//! into a [`StageFactory`], which knows the stage's output schema. Each worker asks the
//! factory for its own [`Stage`] instance and calls [`Stage::open`] once before the first
//! batch: that is where a stage loads models or opens connection pools (the "initialise
//! outside the handler" rule of function platforms), and its duration is reported as the
//! stage's cold start. The instance is then reused for every batch the worker processes.
//!
//! A stage never spawns tasks of its own: work it starts must end when the worker drops it
//! (on shutdown or when partitions move).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;

use crate::batch::PartitionInfo;
use crate::state::StageState;
use crate::stats::{RunStats, StageStats};
use crate::{ErrorClass, Result};

/// What a stage knows about where it runs.
#[derive(Debug, Clone)]
pub struct StageContext {
    pub pipeline: Arc<str>,
    pub stage: Arc<str>,
    /// Index of the worker that owns this instance.
    pub worker: usize,
    /// The run's counters; this stage's are `stats.stages[index]`.
    pub stats: Arc<RunStats>,
    pub index: usize,
    /// The partition of the batch being processed (set by the worker before each call).
    pub partition: Option<Arc<PartitionInfo>>,
    /// Whether the pipeline has a dead-letter sink.
    pub dead_letters: bool,
}

impl StageContext {
    /// A context outside a running pipeline (tests, benches), with counters of its own.
    pub fn detached(stage: &str) -> Self {
        let stage: Arc<str> = Arc::from(stage);
        StageContext {
            pipeline: Arc::from("detached"),
            stats: RunStats::new([&stage]),
            stage,
            worker: 0,
            index: 0,
            partition: None,
            dead_letters: true,
        }
    }

    /// This stage's counters.
    pub fn stage_stats(&self) -> &StageStats {
        &self.stats.stages[self.index]
    }
}

/// One input row a stage could not process, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFailure {
    /// Index of the row in the batch given to [`Stage::process_batch`].
    pub row: usize,
    pub class: ErrorClass,
    pub reason: String,
}

/// The rows a stage produced, and the input rows it failed on.
#[derive(Debug)]
pub struct StageOutput {
    pub batch: RecordBatch,
    pub failed: Vec<RowFailure>,
}

impl StageOutput {
    pub fn ok(batch: RecordBatch) -> Self {
        StageOutput {
            batch,
            failed: Vec::new(),
        }
    }
}

/// A running instance of a stage, owned by one worker.
///
/// # Errors
/// `process_batch` returns `Err` when the whole batch failed, with the error's class telling
/// whether it may be retried. Rows that failed on their own go in [`StageOutput::failed`]
/// and the other rows go on.
///
/// # State
/// Stateless stages need nothing. A stateful stage keeps its state where every worker's
/// instance reaches it, per source partition, and hands the engine a [`StageState`]
/// through its factory: the engine restores it, tells it which partitions come and go, and
/// snapshots it at checkpoints while every worker waits between batches.
#[async_trait]
pub trait Stage: Send {
    /// Prepares the instance before its first batch (cold start).
    async fn open(&mut self, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }

    /// Processes one batch. The output schema is the factory's `output_schema`.
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &StageContext,
    ) -> Result<StageOutput>;

    /// The partition `ctx.partition` has ended (a bounded source read all of it): a stage
    /// that holds rows back (open windows) completes what the end of input completes, and
    /// hands the rows out through [`Stage::pending`].
    async fn end_of_partition(&mut self, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }

    /// The partition `ctx.partition` has ended and its records go on in partitions this
    /// process reads next (see [`crate::source::PartitionReader::continues_here`]): a
    /// stage that holds rows back keeps them open for those; nothing closes because of it.
    async fn partition_continues(&mut self, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }

    /// Rows the stage produced beyond a call's output (closed windows), a chunk at a time.
    /// The worker calls it after every batch and every end of partition until it returns
    /// `None`, and sends each chunk through the stages after this one. In a pipeline with
    /// stateful stages, some worker also calls it every second without a batch: rows that
    /// time alone makes due (a partition gone idle, state taken over at a partition's end
    /// where no batch follows) must come out then too.
    async fn pending(&mut self, _ctx: &StageContext) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// Releases what `open` acquired. Called once when the worker stops.
    async fn close(&mut self, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }
}

/// A planned stage: validated against its input schema, ready to make instances.
pub trait StageFactory: Send + Sync {
    /// The schema of the batches the stage's instances produce.
    fn output_schema(&self) -> SchemaRef;

    /// Makes an instance for one worker. Cheap; expensive set-up belongs in `open`.
    fn create(&self) -> Result<Box<dyn Stage>>;

    /// The stage's state, for a stage that keeps any.
    fn state(&self) -> Option<Arc<dyn StageState>> {
        None
    }
}

/// A stage in a pipeline: its YAML name, its factory, and how its failures are handled.
#[derive(Clone)]
pub struct PlannedStage {
    pub name: Arc<str>,
    pub factory: Arc<dyn StageFactory>,
    pub policy: crate::failure::FailurePolicy,
}
