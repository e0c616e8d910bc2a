//! The stage on a worker: rows added to the shared state, closed windows emitted in
//! chunks, and the `top` ranking of each window.

use super::*;

pub struct AggregateFactory {
    pub(super) shared: Arc<AggregateState>,
    /// `top`: the ranking aggregate's index and how many ranks are kept.
    pub(super) top: Option<(usize, usize)>,
}

impl StageFactory for AggregateFactory {
    fn output_schema(&self) -> SchemaRef {
        self.shared.plan.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(AggregateStage {
            shared: self.shared.clone(),
            closing: None,
            broken: None,
            top: self.top.map(|(agg, n)| Top::new(agg, n)),
        }))
    }

    fn state(&self) -> Option<Arc<dyn StageState>> {
        Some(self.shared.clone())
    }
}

pub(super) struct AggregateStage {
    pub(super) shared: Arc<AggregateState>,
    /// Windows this instance closed and is emitting.
    pub(super) closing: Option<Closing>,
    /// A failure of the state store, reported by `pending` so that it stops the run.
    pub(super) broken: Option<Error>,
    pub(super) top: Option<Top>,
}

/// Keeps the top-ranked rows of each window as its rows are emitted (in window order).
pub(super) struct Top {
    pub(super) agg: usize,
    pub(super) n: usize,
    /// The end of the window being collected.
    pub(super) window: Option<i64>,
    /// Rows of that window that may still rank, with their ranking value (read once).
    pub(super) candidates: Vec<(acc::Value, OutRow)>,
    /// Rows of finished windows, to emit.
    pub(super) ready: Vec<OutRow>,
}

impl Top {
    pub(super) fn new(agg: usize, n: usize) -> Self {
        Top {
            agg,
            n,
            window: None,
            candidates: Vec::new(),
            ready: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, row: OutRow) {
        if self.window != Some(row.end) {
            self.finish_window();
            self.window = Some(row.end);
        }
        self.candidates
            .push((acc::rank_value(&row.accs[self.agg]), row));
        if self.candidates.len() >= 2 * self.n + 4096 {
            self.prune();
        }
    }

    /// Drops the candidates that can no longer rank in the top `n`: those below the n-th
    /// largest value (ranks only grow as rows arrive).
    pub(super) fn prune(&mut self) {
        if self.candidates.len() <= self.n {
            return;
        }
        self.candidates
            .select_nth_unstable_by(self.n - 1, |a, b| acc::rank_cmp(&b.0, &a.0));
        let nth = self.candidates[self.n - 1].0.clone();
        self.candidates
            .retain(|(value, _)| acc::rank_cmp(value, &nth).is_ge());
    }

    /// The window being collected is complete: its top rows become ready, in key order.
    pub(super) fn finish_window(&mut self) {
        self.prune();
        self.candidates
            .sort_unstable_by(|a, b| a.1.key.cmp(&b.1.key));
        self.ready
            .extend(self.candidates.drain(..).map(|(_, row)| row));
        self.window = None;
    }
}

pub(super) fn partition_of(ctx: &StageContext) -> Arc<PartitionInfo> {
    ctx.partition.clone().unwrap_or_else(|| {
        Arc::new(PartitionInfo {
            id: 0,
            name: "input".into(),
        })
    })
}

pub(super) fn format_time(ms: i64) -> String {
    match arrow::temporal_conversions::timestamp_ms_to_datetime(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => format!("{ms} ms since 1970"),
    }
}

impl AggregateStage {
    pub(super) fn skew(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shared.plan.max_skew as u64)
    }

    pub(super) fn close_windows(&mut self) -> Result<()> {
        if self.closing.is_none() {
            self.closing = self.shared.close_windows()?;
        }
        Ok(())
    }

    pub(super) fn rows_to_batch(&self, rows: Vec<OutRow>) -> Result<RecordBatch> {
        let plan = &self.shared.plan;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(plan.output.fields().len());
        if !plan.group_by.is_empty() {
            let parser = plan.converter.parser();
            columns.extend(
                plan.converter
                    .convert_rows(rows.iter().map(|r| parser.parse(&r.key)))
                    .map_err(|e| Error::arrow("writing the group keys", e))?,
            );
        }
        let utc = |it: &mut dyn Iterator<Item = i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from_iter_values(it).with_timezone("UTC"))
        };
        columns.push(utc(&mut rows.iter().map(|r| r.start)));
        columns.push(utc(&mut rows.iter().map(|r| r.end)));
        for (j, def) in plan.aggs.iter().enumerate() {
            columns.push(acc::finish(def, rows.iter().map(|r| &r.accs[j]))?);
        }
        // Group columns come back as the converter's types; the schema says nullable.
        RecordBatch::try_new(plan.output.clone(), columns)
            .map_err(|e| Error::arrow("assembling window results", e))
    }
}

#[async_trait]
impl Stage for AggregateStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &StageContext,
    ) -> Result<StageOutput> {
        let shared = self.shared.clone();
        let plan = &shared.plan;
        let partition = partition_of(ctx);
        let time_column = batch.column(plan.event_time);
        let times = cast(
            time_column,
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )
        .map_err(|e| Error::arrow("reading event times", e))?;
        let times = times.as_primitive::<TimestampMillisecondType>();
        let keys = if plan.group_by.is_empty() {
            None
        } else {
            let columns: Vec<ArrayRef> = plan
                .group_by
                .iter()
                .map(|&i| batch.column(i).clone())
                .collect();
            Some(
                plan.converter
                    .convert_columns(&columns)
                    .map_err(|e| Error::arrow("encoding group keys", e))?,
            )
        };
        let inputs = acc::cast_inputs(&plan.aggs, batch.columns())?;
        let added = match shared.add(&partition, &batch, times, keys.as_ref(), &inputs) {
            Ok(added) => added,
            Err(e) => {
                // Some rows may be in the state already: the batch must not be retried,
                // bisected or dead-lettered. The error comes out of `pending`, which stops
                // the pipeline before any further checkpoint.
                self.broken = Some(e);
                return Ok(StageOutput::ok(RecordBatch::new_empty(plan.output.clone())));
            }
        };
        let mut failed: Vec<RowFailure> = added
            .no_time
            .iter()
            .map(|&row| RowFailure {
                row,
                class: ErrorClass::Permanent,
                reason: format!(
                    "no event time: `{}` is null",
                    batch.schema().field(plan.event_time).name()
                ),
            })
            .collect();
        let skew = humantime::format_duration(self.skew());
        failed.extend(added.out_of_range.iter().map(|&(row, time)| RowFailure {
            row,
            class: ErrorClass::Permanent,
            reason: if time > 0 {
                format!(
                    "event time {time} ms ({}) is more than max_event_time_skew ({skew}) ahead \
                     of the clock: a time in microseconds or nanoseconds read as milliseconds?",
                    format_time(time)
                )
            } else {
                format!(
                    "event time {time} ms ({}) is before the year 0",
                    format_time(time)
                )
            },
        }));
        if !added.late.is_empty() {
            if ctx.dead_letters {
                failed.extend(added.late.iter().map(|&(row, time, closed)| RowFailure {
                    row,
                    class: ErrorClass::Permanent,
                    reason: format!(
                        "late: event time {} is behind the watermark {} of {}; its window has closed",
                        format_time(time),
                        format_time(closed),
                        partition.name
                    ),
                }));
            } else {
                let n = added.late.len() as u64;
                let before = self.shared.late_dropped.fetch_add(n, Ordering::Relaxed);
                ctx.stage_stats()
                    .late_dropped
                    .fetch_add(n, Ordering::Relaxed);
                if before == 0 || (before + n) / 10_000 > before / 10_000 {
                    tracing::warn!(
                        stage = %ctx.stage,
                        partition = %partition.name,
                        dropped = before + n,
                        "late rows dropped (no dead-letter sink): their windows had closed"
                    );
                }
            }
        }
        failed.sort_unstable_by_key(|f| f.row);
        // The windows this batch closed come out through `pending`, called next.
        Ok(StageOutput {
            batch: RecordBatch::new_empty(plan.output.clone()),
            failed,
        })
    }

    async fn end_of_partition(&mut self, ctx: &StageContext) -> Result<()> {
        self.shared.end(&partition_of(ctx));
        Ok(())
    }

    async fn partition_continues(&mut self, ctx: &StageContext) -> Result<()> {
        self.shared.continues(&partition_of(ctx));
        Ok(())
    }

    async fn pending(&mut self, _ctx: &StageContext) -> Result<Option<RecordBatch>> {
        if let Some(e) = self.broken.take() {
            return Err(e);
        }
        // The one place the watermark is looked at: after every batch and end of
        // partition, and on the executor's timer for windows that time alone closes (see
        // `Stage::pending`).
        self.close_windows()?;
        loop {
            if let Some(top) = &mut self.top
                && !top.ready.is_empty()
            {
                let rows = std::mem::take(&mut top.ready);
                return self.rows_to_batch(rows).map(Some);
            }
            let Some(closing) = &mut self.closing else {
                return Ok(None);
            };
            let rows = closing.next_chunk()?;
            if rows.is_empty() {
                self.closing = None;
                // The last window of a closing is complete for the partitions it closed. (A
                // partition that emits a window after the others did, having been elsewhere
                // meanwhile, gets a ranking of its own: see docs/aggregation.md, Limits.)
                if let Some(top) = &mut self.top {
                    top.finish_window();
                }
                // The watermark may have moved on while these were emitted.
                self.close_windows()?;
                if self.closing.is_none() && self.top.as_ref().is_none_or(|t| t.ready.is_empty()) {
                    return Ok(None);
                }
                continue;
            }
            match &mut self.top {
                Some(top) => rows.into_iter().for_each(|r| top.push(r)),
                None => return self.rows_to_batch(rows).map(Some),
            }
        }
    }
}
