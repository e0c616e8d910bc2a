//! A worker task: one instance of every stage, a batch at a time through the pipeline's
//! graph, and what stages produce beyond their batches (closed windows) sent on through
//! the stages and outputs that read them, after each batch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use arrow::array::RecordBatch;

use super::messages::{Delivery, SinkMsg, WorkerMsg};
use crate::batch::{self, Envelope, PartitionInfo};
use crate::busy::metered;
use crate::failure::{self, Outcome};
use crate::graph::{Graph, Input};
use crate::stage::{PlannedStage, Stage, StageContext};
use crate::stats::RunStats;
use crate::{Error, Result};

/// A worker task: opens its instances of the stages, then runs the messages of its channel
/// in order until the channel closes (or the sink is gone).
pub(super) async fn worker_loop(
    id: usize,
    pipeline: Arc<str>,
    (planned, graph): &(Vec<PlannedStage>, Graph),
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

    let _alive = stats.worker_time.enter();
    let mut chain = Chain {
        spent: vec![None; chain.len()],
        downstream: downstream(graph),
        stages: chain,
        empty: None,
        planned,
        schemas: &schemas,
        graph,
        dead_letters,
        stats: &stats,
    };
    while let Some(msg) = rx.recv().await {
        let (mut env, ticket) = match msg {
            WorkerMsg::Batch(env, ticket) => {
                stats.queued_for_workers.fetch_sub(1, Ordering::Relaxed);
                (env, ticket)
            }
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
                // Offsets 0..0: never moves the partition's position (see `sink_loop`).
                if !chain.send_pending(&partition, 0, &sink).await? {
                    break;
                }
                continue;
            }
            WorkerMsg::Ended {
                partition,
                end,
                continued,
            } => {
                for (i, (stage, ctx)) in chain.stages.iter_mut().enumerate() {
                    ctx.partition = Some(partition.clone());
                    let s = &stats.stages[i];
                    let t0 = Instant::now();
                    if continued {
                        metered(&s.cpu_nanos, stage.partition_continues(ctx)).await?;
                    } else {
                        metered(&s.cpu_nanos, stage.end_of_partition(ctx)).await?;
                    }
                    RunStats::add(&s.busy_nanos, t0.elapsed().as_nanos() as u64);
                }
                if !chain.send_pending(&partition, end, &sink).await? {
                    break;
                }
                continue;
            }
        };
        let started = Instant::now();
        let outputs = chain.run(None, &mut env).await?;
        // The source's batch is not written anywhere: not kept while the delivery waits.
        env.batch = chain.empty(&env.batch);
        let (partition, end) = (env.partition.clone(), env.offsets.end);
        // Sent even when empty: the sink task counts its offsets as done.
        let delivery = Delivery { env, outputs };
        if !chain.deliver(&sink, SinkMsg::Batch(delivery, ticket)).await {
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

/// What a stage or output reads of one batch of records: its one input's batches (shared),
/// or the rows of its several inputs merged in the records' order.
fn gather(
    inputs: &[Input],
    source: &[RecordBatch],
    rows: &[Vec<RecordBatch>],
) -> Result<Vec<RecordBatch>> {
    let read = |input: &Input| match input {
        Input::Source => source.to_vec(),
        Input::Stage(j) => rows[*j].clone(),
    };
    match inputs {
        [one] => Ok(read(one)),
        several => {
            let all = several.iter().flat_map(read).collect();
            Ok(batch::merge_inputs(all)?.into_iter().collect())
        }
    }
}

/// A worker's instances of the stages, and how to run a batch through them.
struct Chain<'a> {
    stages: Vec<(Box<dyn Stage>, StageContext)>,
    /// An empty batch of the source's schema, made once.
    empty: Option<RecordBatch>,
    planned: &'a [PlannedStage],
    schemas: &'a [arrow::datatypes::SchemaRef],
    graph: &'a Graph,
    dead_letters: bool,
    stats: &'a RunStats,
    /// Time each stage's calls took for the rows on their way to the sink task now (see
    /// [`Chain::deliver`]), for the stages called.
    spent: Vec<Option<u64>>,
    /// Per stage, the stages that read its rows, directly or through others.
    downstream: Vec<Vec<usize>>,
}

/// Per stage, the later stages its rows reach in `graph`.
fn downstream(graph: &Graph) -> Vec<Vec<usize>> {
    let n = graph.stages.len();
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in (0..n).rev() {
        let mut reached = Vec::new();
        for (j, inputs) in graph.stages.iter().enumerate().skip(i + 1) {
            if inputs
                .iter()
                .any(|input| matches!(input, Input::Stage(s) if *s == i))
            {
                reached.push(j);
                reached.extend(after[j].iter().copied());
            }
        }
        reached.sort_unstable();
        reached.dedup();
        after[i] = reached;
    }
    after
}

impl Chain<'_> {
    /// Hands a delivery to the sink task; false when it is gone. Each stage that worked on
    /// it was back-pressured meanwhile: its rows waited for the stages after it and for
    /// the sink task to take them (see [`crate::busy`]).
    async fn deliver(&mut self, sink: &mpsc::Sender<SinkMsg>, msg: SinkMsg) -> bool {
        let t0 = Instant::now();
        self.stats.queued_for_sink.fetch_add(1, Ordering::Relaxed);
        let sent = sink.send(msg).await.is_ok();
        let waited = t0.elapsed().as_nanos() as u64;
        if !sent {
            self.stats.queued_for_sink.fetch_sub(1, Ordering::Relaxed);
        }
        for i in 0..self.spent.len() {
            if self.spent[i].is_some() {
                // The stages that read this one's rows, directly or not: not its siblings.
                let after: u64 = self.downstream[i]
                    .iter()
                    .filter_map(|j| self.spent[*j])
                    .sum();
                RunStats::add(&self.stats.stages[i].back_pressured_nanos, waited + after);
            }
        }
        self.spent.iter_mut().for_each(|s| *s = None);
        sent
    }

    /// An empty batch with `like`'s schema (kept from the first call: one source, one schema).
    fn empty(&mut self, like: &RecordBatch) -> RecordBatch {
        self.empty
            .get_or_insert_with(|| RecordBatch::new_empty(like.schema()))
            .clone()
    }

    /// Runs the source's batch (`env.batch`), or with `from` the rows a stage produced
    /// beyond its batches, through the stages that read them, in order; each stage's rows
    /// go to every stage that reads them, shared. The rows of each output; the records
    /// that failed are added to `env.dead`.
    async fn run(
        &mut self,
        from: Option<(usize, RecordBatch)>,
        env: &mut Envelope,
    ) -> Result<Vec<Vec<RecordBatch>>> {
        let mut rows: Vec<Vec<RecordBatch>> = vec![Vec::new(); self.stages.len()];
        let (source, first) = match from {
            None => (vec![env.batch.clone()], 0),
            Some((stage, batch)) => {
                rows[stage].push(batch);
                (Vec::new(), stage + 1)
            }
        };
        for i in first..self.stages.len() {
            let mut produced = Vec::new();
            for batch in gather(&self.graph.stages[i], &source, &rows)? {
                if batch.num_rows() == 0 {
                    continue;
                }
                let output = self.run_stage(i, batch, env).await?;
                if output.num_rows() > 0 {
                    self.tap(i, &output);
                    produced.push(output);
                }
            }
            rows[i] = produced;
        }
        self.graph
            .outputs
            .iter()
            .map(|inputs| gather(inputs, &source, &rows))
            .collect()
    }

    async fn run_stage(
        &mut self,
        i: usize,
        input: RecordBatch,
        env: &mut Envelope,
    ) -> Result<RecordBatch> {
        let (stage, ctx) = &mut self.stages[i];
        ctx.partition = Some(env.partition.clone());
        let s = &self.stats.stages[i];
        let t0 = Instant::now();
        let output = metered(
            &s.cpu_nanos,
            failure::run_stage(
                stage.as_mut(),
                ctx,
                &self.planned[i].policy,
                &self.schemas[i],
                input,
                Outcome {
                    env,
                    dead_letters: self.dead_letters,
                },
                s,
            ),
        )
        .await;
        self.spent(i, t0);
        output
    }

    /// Copies stage `i`'s rows to its listeners (`sluice tap`), if any.
    fn tap(&self, i: usize, rows: &RecordBatch) {
        if let Some(taps) = self.stats.taps.get() {
            taps.stages[i].offer(rows);
        }
    }

    /// Counts the time since `t0` as stage `i`'s.
    fn spent(&mut self, i: usize, t0: Instant) {
        let spent = t0.elapsed().as_nanos() as u64;
        RunStats::add(&self.stats.stages[i].busy_nanos, spent);
        *self.spent[i].get_or_insert(0) += spent;
    }

    /// Sends what stages produced beyond their batches (closed windows), each chunk
    /// through the stages that read the one that produced it. False when the sink is gone.
    async fn send_pending(
        &mut self,
        partition: &Arc<PartitionInfo>,
        end: i64,
        sink: &mpsc::Sender<SinkMsg>,
    ) -> Result<bool> {
        for i in 0..self.stages.len() {
            loop {
                let (stage, ctx) = &mut self.stages[i];
                let t0 = Instant::now();
                let pending = metered(&self.stats.stages[i].cpu_nanos, stage.pending(ctx)).await?;
                self.spent(i, t0);
                let Some(batch) = pending else {
                    // Nothing more: the time asking was the stage's alone.
                    self.spent[i] = None;
                    break;
                };
                RunStats::add(&self.stats.stages[i].rows_out, batch.num_rows() as u64);
                self.tap(i, &batch);
                let mut env = Envelope {
                    partition: partition.clone(),
                    offsets: end..end,
                    batch: RecordBatch::new_empty(batch.schema()),
                    dead: Vec::new(),
                };
                let outputs = self.run(Some((i, batch)), &mut env).await?;
                if !self
                    .deliver(sink, SinkMsg::Batch(Delivery { env, outputs }, None))
                    .await
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_waits_for_the_stages_its_rows_reach_not_its_siblings() {
        // 0 → 1 → 3; 0 → 2 (a sibling branch of 1); 3 also reads the source.
        let graph = Graph {
            stages: vec![
                vec![Input::Source],
                vec![Input::Stage(0)],
                vec![Input::Stage(0)],
                vec![Input::Stage(1), Input::Source],
            ],
            outputs: vec![vec![Input::Stage(3)], vec![Input::Stage(2)]],
        };
        assert_eq!(downstream(&graph), [vec![1, 2, 3], vec![3], vec![], vec![]]);
        assert_eq!(downstream(&Graph::chain(3)), [vec![1, 2], vec![2], vec![]]);
    }
}
