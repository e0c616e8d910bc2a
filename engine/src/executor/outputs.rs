//! The pipeline's outputs: every sink, written by the sink task.
//!
//! The rows a batch of records led to are written to every output that gets any, all at
//! once, before the sink task takes the next batch; a checkpoint flushes every output
//! before it commits offsets. So a partition's offset never passes a record whose rows
//! some output has not made durable, and the slowest output sets the pace of all (its
//! busy time says which one it is: [`OutputStats::busy_nanos`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;

use crate::Result;
use crate::batch::ColumnSelection;
use crate::busy::metered;
use crate::sink::Sink;
use crate::stats::{OutputStats, RunStats};
use crate::tap::Taps;

/// A sink of the pipeline, with its name and the metadata columns it writes.
pub struct Output {
    pub name: Arc<str>,
    pub sink: Box<dyn Sink>,
    pub columns: ColumnSelection,
}

impl Output {
    /// The one output of a pipeline that is a chain (named `sink`).
    pub fn single(sink: Box<dyn Sink>, columns: ColumnSelection) -> Vec<Output> {
        vec![Output {
            name: super::SINK_STAGE.into(),
            sink,
            columns,
        }]
    }
}

/// Rows of one output that it refused (larger than it takes), with the batch they are in
/// (its metadata columns all there, for the dead letters' provenance).
pub(super) struct Refused {
    pub(super) output: usize,
    pub(super) batch: RecordBatch,
    pub(super) rows: Vec<(u32, String)>,
}

/// Every output of the pipeline, and their counters.
pub(super) struct Outputs {
    list: Vec<Output>,
    stats: Arc<RunStats>,
}

impl Outputs {
    pub(super) fn new(list: Vec<Output>, stats: Arc<RunStats>) -> Self {
        let counters = list
            .iter()
            .map(|o| OutputStats {
                name: o.name.clone(),
                ..Default::default()
            })
            .collect();
        // Set once per run; a second run with the same counters keeps the first.
        let _ = stats.outputs.set(counters);
        let stages: Vec<Arc<str>> = stats.stages.iter().map(|s| s.name.clone()).collect();
        let outputs: Vec<Arc<str>> = (0..list.len())
            .map(|o| match list.len() {
                1 => super::SINK_STAGE.into(),
                _ => format!("{}.{}", super::SINK_STAGE, list[o].name).into(),
            })
            .collect();
        let _ = stats.taps.set(Taps::new(&stages, &outputs));
        Outputs { list, stats }
    }

    /// The name an output's refused rows are dead-lettered under: `sink`, or with several
    /// outputs `sink.NAME`.
    pub(super) fn stage_name(&self, output: usize) -> Arc<str> {
        match self.stats.taps.get().and_then(|t| t.outputs.get(output)) {
            Some(point) => point.name.clone(),
            None => super::SINK_STAGE.into(),
        }
    }

    /// Writes each output's batches (`batches[o]` for output `o`), the outputs at once.
    /// The rows they refused.
    pub(super) async fn write(&mut self, batches: Vec<Vec<RecordBatch>>) -> Result<Vec<Refused>> {
        let stats = self.stats.outputs();
        let taps = self.stats.taps.get();
        let writes = self
            .list
            .iter_mut()
            .zip(batches)
            .enumerate()
            .filter(|(_, (_, b))| b.iter().any(|b| b.num_rows() > 0))
            .map(|(o, (output, batches))| async move {
                let cpu = stats.get(o).map(|s| &s.cpu_nanos);
                let t0 = Instant::now();
                let mut refused = Vec::new();
                let mut rows = 0;
                for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
                    let columns = output.columns.apply(&batch)?;
                    if let Some(point) = taps.and_then(|t| t.outputs.get(o)) {
                        point.offer(&columns);
                    }
                    let write = output.sink.write(columns);
                    match cpu {
                        Some(cpu) => metered(cpu, write).await?,
                        None => write.await?,
                    }
                    let refusals = output.sink.take_refused();
                    rows += (batch.num_rows() - refusals.len()) as u64;
                    if !refusals.is_empty() {
                        refused.push(Refused {
                            output: o,
                            batch,
                            rows: refusals,
                        });
                    }
                }
                if let Some(s) = stats.get(o) {
                    RunStats::add(&s.rows, rows);
                    RunStats::add(&s.busy_nanos, t0.elapsed().as_nanos() as u64);
                }
                Ok::<_, crate::Error>((rows, refused))
            });
        let mut all = Vec::new();
        for (rows, refused) in futures::future::try_join_all(writes).await? {
            RunStats::add(&self.stats.records_out, rows);
            all.extend(refused);
        }
        Ok(all)
    }

    /// Makes everything written to every output durable (at once).
    pub(super) async fn flush(&mut self) -> Result<()> {
        let stats = self.stats.outputs();
        let flushes = self
            .list
            .iter_mut()
            .enumerate()
            .map(|(o, output)| async move {
                let t0 = Instant::now();
                let flushed = match stats.get(o) {
                    Some(s) => metered(&s.cpu_nanos, output.sink.flush()).await,
                    None => output.sink.flush().await,
                };
                if let Some(s) = stats.get(o) {
                    RunStats::add(&s.busy_nanos, t0.elapsed().as_nanos() as u64);
                }
                flushed
            });
        futures::future::try_join_all(flushes).await.map(|_| ())
    }

    pub(super) async fn close(&mut self) -> Result<()> {
        futures::future::try_join_all(self.list.iter_mut().map(|o| o.sink.close()))
            .await
            .map(|_| ())
    }

    /// How often [`Outputs::tick`] must be called: the shortest of the outputs' intervals.
    pub(super) fn tick_interval(&self) -> Option<Duration> {
        self.list
            .iter()
            .filter_map(|o| o.sink.tick_interval())
            .min()
    }

    /// The periodic work of every output that has some (each checks what is due itself).
    pub(super) async fn tick(&mut self) -> Result<()> {
        for output in self.list.iter_mut() {
            if output.sink.tick_interval().is_some() {
                output.sink.tick().await?;
            }
        }
        Ok(())
    }

    /// What the outputs wrote: the sink's summary, or with several each named.
    pub(super) fn summary(&self) -> String {
        match self.list.as_slice() {
            [one] => one.sink.summary(),
            all => all
                .iter()
                .map(|o| format!("{}: {}", o.name, o.sink.summary()))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}
