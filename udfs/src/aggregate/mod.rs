//! The `aggregate` stage: keyed windows in event time, emitted when the watermark passes
//! their end.
//!
//! ```yaml
//! - name: views_per_title
//!   type: aggregate
//!   group_by: [title_id]
//!   event_time: _timestamp          # a timestamp column, or Int64 milliseconds
//!   window: { tumbling: 1m }        # or { sliding: { size: 5m, slide: 1m } }, { session: { gap: 30s } }
//!   allowed_lateness: 5s            # watermark = largest event time seen − this
//!   idle_timeout: 30s               # a partition without data this long holds nothing back
//!   max_event_time_skew: 1d         # rows further ahead of the clock are dead letters
//!   aggregates:
//!     views: count()
//!     watch_seconds: sum(watch_seconds)
//!     viewers: approx_count_distinct(user_id)
//!     longest_by: max_by(user_id, watch_seconds)   # the user of the row with the most
//!   top: { by: views, n: 10 }       # optional: per window, the rows ranked 1..10 by views
//!   state: { memory: 256MiB }       # beyond this, state lives in RocksDB
//! ```
//!
//! Output: one row per key and window when the window closes — the `group_by` columns,
//! `window_start`, `window_end` (timestamps, UTC) and one column per aggregate, in the
//! order written. Rows whose windows have all closed are late: they go to the dead-letter
//! sink with the reason, or, without one, are counted and dropped with a warning. How
//! state is kept, checkpointed and merged across partitions: [`state`].
//!
//! Windowing in SQL (`GROUP BY tumble(...)`) is not offered: a SQL stage sees one batch
//! at a time and DataFusion has no notion of watermarks or state across batches.

mod acc;
mod state;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::{ArrayRef, AsArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use sluice_engine::batch::{PartitionInfo, timestamp_type};
use sluice_engine::config::types::{ByteSize, Duration};
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::state::StageState;
use sluice_engine::{Error, ErrorClass, Result};

use acc::{AggDef, Func, Kind};
pub use state::WindowKind;
use state::{AggregateState, Closing, OutRow, Plan};

/// `type: aggregate`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Key columns (none: one group per window).
    #[serde(default)]
    group_by: Vec<String>,
    /// The event-time column (default `_timestamp`).
    #[serde(default = "default_event_time")]
    event_time: String,
    window: WindowConfig,
    /// How far behind the largest event time a row may be and still count (default 0s).
    #[serde(default = "zero")]
    allowed_lateness: Duration,
    /// A partition without data for this long does not hold the watermark back
    /// (default 30s).
    #[serde(default = "default_idle")]
    idle_timeout: Duration,
    /// How far ahead of this machine's clock an event time may be (default 1d). A row
    /// further ahead is a dead letter: taken, it would move its partition's watermark so
    /// far that every later row is late (a time in microseconds read as milliseconds).
    #[serde(default = "default_skew")]
    max_event_time_skew: Duration,
    aggregates: Aggregates,
    /// Per window, only the rows ranked highest by an aggregate.
    top: Option<TopConfig>,
    #[serde(default)]
    state: StateConfig,
}

/// `top: { by: bids, n: 1 }`: of each window's rows, those ranked 1 to `n` by the
/// aggregate `by`, largest first, ranked as SQL's `RANK()` does (tied rows share a rank, so
/// every row tied for the last place kept is kept too).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopConfig {
    by: String,
    #[serde(default = "one")]
    n: usize,
}

fn one() -> usize {
    1
}

fn default_event_time() -> String {
    sluice_engine::batch::TIMESTAMP.to_string()
}
fn zero() -> Duration {
    Duration::from_millis(0)
}
fn default_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_skew() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The longest window, slide, gap or lateness: with event times within years 0–9999, the
/// window arithmetic stays far from overflowing.
const MAX_SPAN_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WindowConfig {
    Tumbling(Duration),
    Sliding { size: Duration, slide: Duration },
    Session { gap: Duration },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateConfig {
    /// Memory for open windows across the stage's partitions (default 256MiB).
    #[serde(default = "default_memory")]
    memory: ByteSize,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            memory: default_memory(),
        }
    }
}

fn default_memory() -> ByteSize {
    ByteSize(256 << 20)
}

/// `aggregates:` — output name to `function(column)`, in the order written.
#[derive(Debug)]
struct Aggregates(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Aggregates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Aggregates;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of output column to aggregate, e.g. `views: count()`")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Aggregates, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Aggregates(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An aggregate as written: `count()`, `sum(watch_seconds)`, `max_by(auction, price)`.
struct Expression {
    func: Func,
    column: Option<String>,
    /// The second column of `max_by`/`min_by`.
    by: Option<String>,
}

fn parse_expression(text: &str) -> std::result::Result<Expression, String> {
    let t = text.trim();
    let (name, rest) = t.split_once('(').ok_or_else(|| {
        format!("`{t}` is not an aggregate: write `function(column)`, e.g. `sum(amount)`")
    })?;
    let args = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("`{t}`: missing `)`"))?
        .trim();
    let name = name.trim();
    let (arg, by) = match args.split_once(',') {
        Some((a, b)) => (a.trim(), Some(b.trim().to_string())),
        None => (args, None),
    };
    let column = (!arg.is_empty() && arg != "*").then(|| arg.to_string());
    let func = Func::parse(name, column.is_some()).ok_or_else(|| {
        format!(
            "unknown aggregate function `{name}`, expected one of {}",
            Func::NAMES.join(", ")
        )
    })?;
    let two = matches!(func, Func::MaxBy | Func::MinBy);
    if two && (column.is_none() || by.as_deref().is_none_or(str::is_empty)) {
        return Err(format!(
            "`{name}` needs two columns: `{name}(column, by)` keeps `column` of the row with the {} `by`",
            if func == Func::MaxBy {
                "largest"
            } else {
                "smallest"
            }
        ));
    }
    if !two && by.is_some() {
        return Err(format!("`{name}` takes one column: `{name}(column)`"));
    }
    if column.is_none() && func != Func::CountRows {
        return Err(format!("`{name}` needs a column: `{name}(column)`"));
    }
    Ok(Expression { func, column, by })
}

impl AggregateConfig {
    /// Reads the stage's keys (the common ones removed); problems are placed at them.
    pub fn parse(
        node: &Node,
        path: &Location,
        skip: &[&str],
        problems: &mut Problems,
    ) -> Option<Self> {
        let before = problems.len();
        let config: AggregateConfig = sluice_engine::config::from_node(node, path, skip, problems)?;
        let ms = |d: Duration| d.get().as_millis().min(i64::MAX as u128) as i64;
        let spans = match &config.window {
            WindowConfig::Tumbling(size) => vec![("window", *size)],
            WindowConfig::Sliding { size, slide } => vec![("window", *size), ("window", *slide)],
            WindowConfig::Session { gap } => vec![("window", *gap)],
        };
        for (key, span) in spans.into_iter().chain([
            ("allowed_lateness", config.allowed_lateness),
            ("max_event_time_skew", config.max_event_time_skew),
        ]) {
            if ms(span) > MAX_SPAN_MS {
                problems.at_key(node, path, key, format!("{span} is longer than 100 years"));
            }
        }
        match &config.window {
            WindowConfig::Tumbling(size) if ms(*size) <= 0 => {
                problems.at_key(node, path, "window", "the window size must be at least 1ms")
            }
            WindowConfig::Sliding { size, slide } => {
                if ms(*slide) <= 0 || ms(*size) < ms(*slide) {
                    problems.at_key(
                        node,
                        path,
                        "window",
                        "a sliding window needs 0 < slide <= size",
                    );
                } else if ms(*size) % ms(*slide) != 0 {
                    problems.at_key(
                        node,
                        path,
                        "window",
                        format!(
                            "the size ({size}) must be a multiple of the slide ({slide}), so every \
                             row falls in the same number of windows"
                        ),
                    );
                }
            }
            WindowConfig::Session { gap } if ms(*gap) <= 0 => {
                problems.at_key(node, path, "window", "the session gap must be at least 1ms")
            }
            _ => {}
        }
        if config.aggregates.0.is_empty() {
            problems.at_key(
                node,
                path,
                "aggregates",
                "name at least one aggregate, e.g. `events: count()`",
            );
        }
        for (name, text) in &config.aggregates.0 {
            if let Err(e) = parse_expression(text) {
                problems.at_key(node, path, "aggregates", format!("`{name}`: {e}"));
            }
        }
        if let Some(top) = &config.top {
            if top.n == 0 {
                problems.at_key(node, path, "top", "`n` must be at least 1");
            }
            if !config.aggregates.0.iter().any(|(name, _)| *name == top.by) {
                problems.at_key(
                    node,
                    path,
                    "top",
                    format!(
                        "`by: {}` must name one of the aggregates ({})",
                        top.by,
                        config
                            .aggregates
                            .0
                            .iter()
                            .map(|(n, _)| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            if matches!(config.window, WindowConfig::Session { .. }) {
                problems.at_key(
                    node,
                    path,
                    "top",
                    "`top` ranks the rows of a window; session windows are per key",
                );
            }
        }
        (problems.len() == before).then_some(config)
    }

    fn window(&self) -> WindowKind {
        let ms = |d: Duration| d.get().as_millis() as i64;
        match self.window {
            WindowConfig::Tumbling(size) => WindowKind::Tumbling { size: ms(size) },
            WindowConfig::Sliding { size, slide } => WindowKind::Sliding {
                size: ms(size),
                slide: ms(slide),
            },
            WindowConfig::Session { gap } => WindowKind::Session { gap: ms(gap) },
        }
    }

    /// Plans the stage against its input schema; the error is a sentence for the user.
    pub fn plan(
        &self,
        stage: &str,
        input: &SchemaRef,
    ) -> std::result::Result<Arc<dyn StageFactory>, String> {
        self.factory(stage, input).map(|f| Arc::new(f) as _)
    }

    fn factory(
        &self,
        stage: &str,
        input: &SchemaRef,
    ) -> std::result::Result<AggregateFactory, String> {
        let column = |name: &str, what: &str| {
            input.index_of(name).map_err(|_| {
                format!(
                    "{what} `{name}` is not a column of the stage's input; it has {}",
                    input
                        .fields()
                        .iter()
                        .map(|f| format!("`{}`", f.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        };
        let event_time = column(&self.event_time, "the event-time column")?;
        match input.field(event_time).data_type() {
            DataType::Timestamp(..) | DataType::Int64 => {}
            other => {
                return Err(format!(
                    "the event-time column `{}` is {other}; it must be a timestamp or Int64 \
                     milliseconds since the epoch",
                    self.event_time
                ));
            }
        }
        let mut fields = Vec::new();
        let mut group_by = Vec::new();
        let mut sort_fields = Vec::new();
        for name in &self.group_by {
            let i = column(name, "the group_by column")?;
            let field = input.field(i);
            if !RowConverter::supports_fields(&[SortField::new(field.data_type().clone())]) {
                return Err(format!(
                    "cannot group by `{name}` of type {}",
                    field.data_type()
                ));
            }
            group_by.push(i);
            sort_fields.push(SortField::new(field.data_type().clone()));
            fields.push(Field::new(name, field.data_type().clone(), true));
        }
        fields.push(Field::new("window_start", timestamp_type(), false));
        fields.push(Field::new("window_end", timestamp_type(), false));
        let mut aggs = Vec::new();
        for (name, text) in &self.aggregates.0 {
            let Expression {
                func,
                column: col,
                by,
            } = parse_expression(text).map_err(|e| format!("`{name}`: {e}"))?;
            let read = |c: &String| {
                let i = column(c, &format!("`{name}` reads"))?;
                let ty = input.field(i).data_type();
                let kind = Kind::of(ty)
                    .ok_or_else(|| format!("`{name}`: cannot aggregate `{c}` of type {ty}"))?;
                Ok::<_, String>((i, kind, ty.clone()))
            };
            let input_col = col.as_ref().map(read).transpose()?;
            if let (Some((_, Kind::Text, _)), Some(c)) = (&input_col, &col)
                && matches!(func, Func::Sum | Func::Avg)
            {
                return Err(format!("`{name}`: `{c}` is text; sum and avg need numbers"));
            }
            let by = by.as_ref().map(read).transpose()?.map(|(i, k, _)| (i, k));
            let output = AggDef::output_type(func, input_col.as_ref().map(|(_, k, t)| (t, *k)));
            if fields.iter().any(|f| f.name() == name) {
                return Err(format!(
                    "the output column `{name}` is also a group_by column or window_start/window_end; \
                     choose another name"
                ));
            }
            fields.push(Field::new(name, output.clone(), true));
            aggs.push(AggDef {
                name: name.clone(),
                func,
                input: input_col.map(|(i, k, _)| (i, k)),
                by,
                output,
            });
        }
        let converter = RowConverter::new(sort_fields).map_err(|e| e.to_string())?;
        let output: SchemaRef = Arc::new(Schema::new(fields));
        let plan = Plan {
            stage: stage.into(),
            group_by,
            converter,
            event_time,
            window: self.window(),
            lateness: self.allowed_lateness.get().as_millis() as i64,
            idle_timeout: self.idle_timeout.get().as_millis() as i64,
            max_skew: self.max_event_time_skew.get().as_millis() as i64,
            aggs,
            budget: self.state.memory.0 as usize,
            output,
        };
        Ok(AggregateFactory {
            shared: Arc::new(AggregateState::new(plan)),
            top: self.top.as_ref().map(|t| {
                let agg = self.aggregates.0.iter().position(|(n, _)| *n == t.by);
                (agg.expect("parse checked `top.by`"), t.n)
            }),
        })
    }
}

pub struct AggregateFactory {
    shared: Arc<AggregateState>,
    /// `top`: the ranking aggregate's index and how many ranks are kept.
    top: Option<(usize, usize)>,
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

struct AggregateStage {
    shared: Arc<AggregateState>,
    /// Windows this instance closed and is emitting.
    closing: Option<Closing>,
    /// A failure of the state store, reported by `pending` so that it stops the run.
    broken: Option<Error>,
    top: Option<Top>,
}

/// Keeps the top-ranked rows of each window as its rows are emitted (in window order).
struct Top {
    agg: usize,
    n: usize,
    /// The end of the window being collected.
    window: Option<i64>,
    /// Rows of that window that may still rank, with their ranking value (read once).
    candidates: Vec<(acc::Value, OutRow)>,
    /// Rows of finished windows, to emit.
    ready: Vec<OutRow>,
}

impl Top {
    fn new(agg: usize, n: usize) -> Self {
        Top {
            agg,
            n,
            window: None,
            candidates: Vec::new(),
            ready: Vec::new(),
        }
    }

    fn push(&mut self, row: OutRow) {
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
    fn prune(&mut self) {
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
    fn finish_window(&mut self) {
        self.prune();
        self.candidates
            .sort_unstable_by(|a, b| a.1.key.cmp(&b.1.key));
        self.ready
            .extend(self.candidates.drain(..).map(|(_, row)| row));
        self.window = None;
    }
}

fn partition_of(ctx: &StageContext) -> Arc<PartitionInfo> {
    ctx.partition.clone().unwrap_or_else(|| {
        Arc::new(PartitionInfo {
            id: 0,
            name: "input".into(),
        })
    })
}

fn format_time(ms: i64) -> String {
    match arrow::temporal_conversions::timestamp_ms_to_datetime(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => format!("{ms} ms since 1970"),
    }
}

impl AggregateStage {
    fn skew(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shared.plan.max_skew as u64)
    }

    fn close_windows(&mut self) -> Result<()> {
        if self.closing.is_none() {
            self.closing = self.shared.close_windows()?;
        }
        Ok(())
    }

    fn rows_to_batch(&self, rows: Vec<OutRow>) -> Result<RecordBatch> {
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

#[cfg(test)]
mod tests;
