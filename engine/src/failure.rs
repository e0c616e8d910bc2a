//! What happens when a stage fails: retries with backoff, bisecting, timeouts, a limit on
//! concurrent calls, and dead letters.
//!
//! A stage call can fail in two ways: the whole batch (`Err`), or single rows
//! ([`crate::stage::StageOutput::failed`], a partial batch response). Either way the
//! error's [`ErrorClass`] decides:
//! - **transient** (timeouts, refused connections, overload): the failed rows are tried again
//!   after an exponential backoff with jitter, up to `max_attempts` calls and `max_elapsed`
//!   since the first failure. A row older than `max_record_age` (by `_timestamp`) is not
//!   tried again. Rows retried on their own come out after the rest of their batch.
//! - **permanent** and **decode**, and transient failures that ran out of attempts: the rows
//!   become dead letters. A whole-batch failure that is not transient is first bisected
//!   (when `bisect_on_error` is set): each half is tried on its own, down to single rows, so
//!   one poison record does not take its batch with it.
//!
//! Without a dead-letter sink, a row that would become a dead letter stops the pipeline
//! with its origin instead: nothing is ever dropped silently.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Semaphore;

use crate::batch::{self, Envelope};
use crate::breaker::{Breaker, Fallback, Permit};
use crate::dead_letter::{RowFailure, letters_of_rows, now_ms};
use crate::stage::{Stage, StageContext, StageOutput};
use crate::stats::{RunStats, StageStats};
use crate::{Error, ErrorClass, Result};

/// How failures of one stage are handled (see the module documentation).
#[derive(Debug, Clone)]
pub struct FailurePolicy {
    /// Calls of a batch or row in all, the first included (1: no retries).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts later than this after the first failure.
    pub max_elapsed: Option<Duration>,
    /// A row whose `_timestamp` is older than this is not retried.
    pub max_record_age: Option<Duration>,
    pub bisect_on_error: bool,
    /// A call that takes longer fails as transient.
    pub timeout: Option<Duration>,
    /// Calls in flight at once across all workers (a bulkhead).
    pub concurrency: Option<Arc<Semaphore>>,
    /// Shared by the stage's instances on every worker.
    pub breaker: Option<Arc<Breaker>>,
    /// What happens to rows while the breaker is open.
    pub fallback: Fallback,
}

impl FailurePolicy {
    /// Calls in all, the first included, when a stage sets no `retry:`.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// The first wait before a retry; each next one doubles, with jitter.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
    /// The longest wait before a retry.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            max_elapsed: None,
            max_record_age: None,
            bisect_on_error: false,
            timeout: None,
            concurrency: None,
            breaker: None,
            fallback: Fallback::DeadLetter,
        }
    }
}

impl FailurePolicy {
    /// The delay before attempt `attempt + 1`, after `attempt` calls failed: exponential
    /// from `initial_backoff` (doubling, capped at `max_backoff`) with full jitter, a
    /// uniform draw between zero and that bound, so retries of many workers spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let bound = ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

/// Rows to call the stage with, and their history.
struct Work {
    batch: RecordBatch,
    /// Calls made so far with these rows.
    attempts: u32,
    first_failure: Option<(Instant, i64)>,
    /// The last error, said for a person.
    last_error: Option<(ErrorClass, String)>,
    /// Waited already (for an open circuit): no backoff before the next call.
    waited: bool,
}

/// Where dead letters go: into the batch's envelope, or (without a dead-letter sink) an
/// error that stops the pipeline.
pub struct Outcome<'a> {
    pub env: &'a mut Envelope,
    pub dead_letters: bool,
}

/// Runs one stage on `input` under its policy: returns the rows it produced and adds the
/// rows that could not be processed to `outcome`.
pub async fn run_stage(
    stage: &mut dyn Stage,
    ctx: &StageContext,
    policy: &FailurePolicy,
    output_schema: &SchemaRef,
    input: RecordBatch,
    outcome: Outcome<'_>,
    stats: &StageStats,
) -> Result<RecordBatch> {
    let Outcome { env, dead_letters } = outcome;
    let mut grave = Grave {
        ctx,
        env,
        dead_letters,
        stats,
    };
    RunStats::add(&stats.rows_in, input.num_rows() as u64);
    let mut outputs = Vec::new();
    let mut queue = VecDeque::from([Work {
        batch: input,
        attempts: 0,
        first_failure: None,
        last_error: None,
        waited: false,
    }]);
    while let Some(mut work) = queue.pop_front() {
        if work.attempts > 0 && !std::mem::take(&mut work.waited) {
            let delay = policy.backoff(work.attempts);
            RunStats::add(&stats.retries, work.batch.num_rows() as u64);
            tracing::debug!(stage = %ctx.stage, attempt = work.attempts + 1, ?delay, "retrying");
            tokio::time::sleep(delay).await;
        }
        if let Some(breaker) = &policy.breaker
            && let Permit::Rejected(wait) = breaker.permit(stats)
        {
            if policy.fallback == Fallback::Pause {
                tokio::time::sleep(wait.min(Duration::from_millis(500))).await;
                // The call was never made: attempts stay as they were.
                queue.push_front(Work {
                    waited: true,
                    ..work
                });
                continue;
            }
            let reason = match &work.last_error {
                Some((_, e)) => format!("circuit breaker open (last error: {e})"),
                None => "circuit breaker open: recent calls failed too often".to_string(),
            };
            if let Some(out) = fall_back(&mut grave, policy, output_schema, &work, &reason)? {
                outputs.push(out);
            }
            continue;
        }
        work.attempts += 1;
        let called = call(stage, ctx, policy, &work.batch, stats).await;
        if let Some(breaker) = &policy.breaker {
            let failed = matches!(&called, Err(e) if e.class() == ErrorClass::Transient);
            breaker.record(failed, stats);
        }
        match called {
            Ok(StageOutput { batch, failed }) => {
                if batch.num_rows() > 0 {
                    outputs.push(batch);
                }
                if failed.is_empty() {
                    continue;
                }
                let failure_time = work.first_failure.unwrap_or((Instant::now(), now_ms()));
                let (mut retry, mut dead) = (Vec::new(), Vec::new());
                for f in failed {
                    let again = f.class == ErrorClass::Transient
                        && may_retry(policy, &work, failure_time.0)
                        && !too_old(policy, &work.batch, f.row);
                    if again {
                        retry.push((f.row, f.class, f.reason));
                    } else {
                        dead.push((f.row, f.class, f.reason));
                    }
                }
                for (row, class, reason) in dead {
                    let reason = with_age(policy, &work.batch, row, reason);
                    grave.bury(
                        &work.batch,
                        &[row as u32],
                        class,
                        &reason,
                        work.attempts,
                        failure_time.1,
                    )?;
                }
                if !retry.is_empty() {
                    let rows: Vec<u32> = retry.iter().map(|r| r.0 as u32).collect();
                    let (class, reason) = (retry[0].1, retry[0].2.clone());
                    queue.push_back(Work {
                        batch: take_rows(&work.batch, &rows)?,
                        attempts: work.attempts,
                        first_failure: Some(failure_time),
                        last_error: Some((class, reason)),
                        waited: false,
                    });
                }
            }
            // Refused credentials fail every record alike: stop, and keep them unread.
            Err(e @ Error::Refused { .. }) => return Err(e),
            Err(e) => {
                let failure_time = work.first_failure.unwrap_or((Instant::now(), now_ms()));
                let class = e.class();
                let reason = e.to_string();
                let n = work.batch.num_rows();
                if class == ErrorClass::Transient && may_retry(policy, &work, failure_time.0) {
                    // Rows too old to wait for go to the dead letters; the rest retry.
                    let (old, young): (Vec<u32>, Vec<u32>) =
                        (0..n as u32).partition(|&r| too_old(policy, &work.batch, r as usize));
                    if !old.is_empty() {
                        let why = with_age(policy, &work.batch, old[0] as usize, reason.clone());
                        grave.bury(
                            &work.batch,
                            &old,
                            class,
                            &why,
                            work.attempts,
                            failure_time.1,
                        )?;
                    }
                    if !young.is_empty() {
                        let batch = if old.is_empty() {
                            work.batch
                        } else {
                            take_rows(&work.batch, &young)?
                        };
                        queue.push_front(Work {
                            batch,
                            attempts: work.attempts,
                            first_failure: Some(failure_time),
                            last_error: Some((class, reason)),
                            waited: false,
                        });
                    }
                } else if policy.bisect_on_error && n > 1 && class != ErrorClass::Transient {
                    // Each half is called once more; halves of halves down to single rows.
                    RunStats::add(&stats.bisections, 1);
                    let (left, right) = (
                        work.batch.slice(0, n / 2),
                        work.batch.slice(n / 2, n - n / 2),
                    );
                    for half in [right, left] {
                        queue.push_front(Work {
                            batch: half,
                            attempts: 0,
                            first_failure: Some(failure_time),
                            last_error: Some((class, reason.clone())),
                            waited: false,
                        });
                    }
                } else {
                    let rows: Vec<u32> = (0..n as u32).collect();
                    let reason = match (&work.last_error, class) {
                        (_, ErrorClass::Transient) if work.attempts > 1 => {
                            format!("{reason} (gave up after {} attempts)", work.attempts)
                        }
                        _ => reason,
                    };
                    grave.bury(
                        &work.batch,
                        &rows,
                        class,
                        &reason,
                        work.attempts,
                        failure_time.1,
                    )?;
                }
            }
        }
    }
    match outputs.len() {
        0 => Ok(RecordBatch::new_empty(output_schema.clone())),
        1 => Ok(outputs.pop().expect("one output")),
        _ => concat_batches(output_schema, &outputs)
            .map_err(|e| Error::arrow("joining a stage's outputs", e)),
    }
}

/// Applies the fallback to rows the open breaker kept from the stage: dead letters, skipped
/// rows, or rows with default values (returned).
fn fall_back(
    grave: &mut Grave<'_>,
    policy: &FailurePolicy,
    output_schema: &SchemaRef,
    work: &Work,
    reason: &str,
) -> Result<Option<RecordBatch>> {
    let stats = grave.stats;
    let n = work.batch.num_rows();
    match &policy.fallback {
        Fallback::DeadLetter | Fallback::Pause => {
            let rows: Vec<u32> = (0..n as u32).collect();
            grave.bury(
                &work.batch,
                &rows,
                ErrorClass::Transient,
                reason,
                work.attempts,
                now_ms(),
            )?;
            Ok(None)
        }
        Fallback::Skip => {
            RunStats::add(&stats.skipped, n as u64);
            Ok(None)
        }
        Fallback::Default(values) => {
            RunStats::add(&stats.defaulted, n as u64);
            defaults(output_schema, &work.batch, values).map(Some)
        }
    }
}

/// Rows of `schema` from `input`: its columns where the names match, `values` (repeated)
/// for the others, nulls for the rest.
pub fn defaults(
    schema: &SchemaRef,
    input: &RecordBatch,
    values: &serde_json::Map<String, serde_json::Value>,
) -> Result<RecordBatch> {
    let n = input.num_rows();
    // One row of the default values, decoded by arrow-json into the output types.
    let row = serde_json::to_vec(values).expect("JSON values serialize");
    let one = crate::failure::decode_one(schema, &row)?;
    let zeros = arrow::array::UInt32Array::from(vec![0u32; n]);
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| match input.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() && !values.contains_key(field.name()) => {
                Ok(c.clone())
            }
            _ => take(one.column(i), &zeros, None),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::arrow("filling default values", e))?;
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::arrow("filling default values", e))
}

/// One JSON object as a one-row batch of `schema` (missing fields null).
pub fn decode_one(schema: &SchemaRef, row: &[u8]) -> Result<RecordBatch> {
    // Required fields may be missing from the defaults: decode against a nullable copy.
    let nullable = Arc::new(arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let mut decoder = arrow::json::ReaderBuilder::new(nullable)
        .build_decoder()
        .map_err(|e| Error::arrow("reading default values", e))?;
    decoder
        .decode(row)
        .map_err(|e| Error::arrow("reading default values", e))?;
    decoder
        .flush()
        .map_err(|e| Error::arrow("reading default values", e))?
        .ok_or_else(|| Error::Internal("no default row".into()))
}

/// One call of the stage, under the policy's bulkhead and timeout.
async fn call(
    stage: &mut dyn Stage,
    ctx: &StageContext,
    policy: &FailurePolicy,
    batch: &RecordBatch,
    stats: &StageStats,
) -> Result<StageOutput> {
    let _permit = match &policy.concurrency {
        Some(s) => Some(
            s.acquire()
                .await
                .map_err(|_| Error::Internal("bulkhead closed".into()))?,
        ),
        None => None,
    };
    let t0 = Instant::now();
    let output = match policy.timeout {
        Some(limit) => {
            match tokio::time::timeout(limit, stage.process_batch(batch.clone(), ctx)).await {
                Ok(output) => output,
                Err(_) => Err(Error::Function {
                    class: ErrorClass::Transient,
                    message: format!("timed out after {}", humantime::format_duration(limit)),
                }),
            }
        }
        None => stage.process_batch(batch.clone(), ctx).await,
    };
    RunStats::add(&stats.batches, 1);
    stats.latency.record(t0.elapsed());
    if let Ok(out) = &output {
        RunStats::add(&stats.rows_out, out.batch.num_rows() as u64);
    }
    output
}

fn may_retry(policy: &FailurePolicy, work: &Work, first_failure: Instant) -> bool {
    work.attempts < policy.max_attempts
        && policy
            .max_elapsed
            .is_none_or(|limit| first_failure.elapsed() < limit)
}

/// Whether the row's `_timestamp` is older than `max_record_age`.
fn too_old(policy: &FailurePolicy, batch: &RecordBatch, row: usize) -> bool {
    let Some(limit) = policy.max_record_age else {
        return false;
    };
    let Some(ts) = batch
        .column_by_name(batch::TIMESTAMP)
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
    else {
        return false;
    };
    ts.is_valid(row) && now_ms() - ts.value(row) > limit.as_millis() as i64
}

fn with_age(policy: &FailurePolicy, batch: &RecordBatch, row: usize, reason: String) -> String {
    match policy.max_record_age {
        Some(limit) if too_old(policy, batch, row) => format!(
            "{reason} (not retried: the record is older than max_record_age {})",
            humantime::format_duration(limit)
        ),
        _ => reason,
    }
}

fn take_rows(batch: &RecordBatch, rows: &[u32]) -> Result<RecordBatch> {
    let indices = arrow::array::UInt32Array::from(rows.to_vec());
    arrow::compute::take_record_batch(batch, &indices)
        .map_err(|e| Error::arrow("selecting rows to retry", e))
}

/// Where a stage's failed rows go: the envelope's dead letters, or (without a dead-letter
/// sink) the error that stops the pipeline.
struct Grave<'a> {
    ctx: &'a StageContext,
    env: &'a mut Envelope,
    dead_letters: bool,
    stats: &'a StageStats,
}

impl Grave<'_> {
    /// Makes dead letters of `rows` of `batch`.
    fn bury(
        &mut self,
        batch: &RecordBatch,
        rows: &[u32],
        class: ErrorClass,
        reason: &str,
        attempts: u32,
        first_failed_at: i64,
    ) -> Result<()> {
        let Grave {
            ctx,
            env,
            dead_letters,
            stats,
        } = self;
        let (ctx, dead_letters, stats) = (*ctx, *dead_letters, *stats);
        RunStats::add(&stats.rows_failed, rows.len() as u64);
        RunStats::add(&stats.failed_by_class[class as usize], rows.len() as u64);
        if !dead_letters {
            let first = rows[0] as usize;
            let origin = match batch::offset_at(batch, first) {
                Some(o) => format!("{} offset {o}", env.partition.name),
                None => env.origin(),
            };
            let more = match rows.len() {
                1 => String::new(),
                n => format!(" (and {} more rows of the batch)", n - 1),
            };
            return Err(Error::Stage {
                stage: ctx.stage.to_string(),
                origin,
                class,
                message: format!("{reason}{more}"),
            });
        }
        env.dead.extend(letters_of_rows(
            batch,
            rows,
            &env.partition,
            RowFailure {
                stage: &ctx.stage,
                class,
                reason,
                attempts,
                first_failed_at,
            },
        )?);
        RunStats::add(&stats.dead_letters, rows.len() as u64);
        Ok(())
    }
}
