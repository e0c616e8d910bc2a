//! What sources that make their records (generator, nexmark) share: a partition's share of
//! the count, where it resumes after a checkpoint, its rate limit, and its envelopes.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use sluice_engine::Result;
use sluice_engine::batch::{self, Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::source::LogEnd;
use tokio::time::Instant;

/// `start_time` of a made-up stream, when it is not an RFC 3339 time: why.
pub(crate) fn start_time_problem(start_time: Option<&str>) -> Option<String> {
    let t = start_time?;
    crate::generator::parse_time_ms(t)
        .is_none()
        .then(|| format!("expected an RFC 3339 time such as 2026-01-01T00:00:00Z, found `{t}`"))
}

/// One partition of a made-up stream: the next offset, what is left of its count, its pace.
pub(crate) struct MadePartition {
    info: Arc<PartitionInfo>,
    next_offset: i64,
    remaining: Option<u64>,
    pace: Option<Pace>,
}

impl MadePartition {
    /// Partition `id` of `partitions`, named `name`, of a stream of `count` records in all
    /// (split evenly, the first partitions taking the rest) made at `rate` records per
    /// second in all; it resumes where `checkpoint` says.
    pub(crate) fn new(
        name: String,
        id: u32,
        partitions: u32,
        count: Option<u64>,
        rate: Option<f64>,
        checkpoint: &Checkpoint,
    ) -> Self {
        let (p, n) = (u64::from(id), u64::from(partitions.max(1)));
        let name: Arc<str> = name.into();
        let count = count.map(|c| c / n + u64::from(p < c % n));
        let start = checkpoint.start_of(&name).max(0) as u64;
        let start = count.map_or(start, |c| start.min(c));
        MadePartition {
            info: Arc::new(PartitionInfo { id, name }),
            next_offset: start as i64,
            remaining: count.map(|c| c - start),
            pace: rate.map(|r| Pace::new(r / n as f64, start as i64)),
        }
    }

    pub(crate) fn info(&self) -> &Arc<PartitionInfo> {
        &self.info
    }

    pub(crate) fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// `n`, or what is left of the count if less.
    pub(crate) fn clamp(&self, n: usize) -> usize {
        self.remaining.map_or(n, |r| n.min(r as usize))
    }

    /// How many records the next read makes (at most `max`), waiting until the rate limit
    /// lets at least one through; `None` once the count is reached.
    pub(crate) async fn due(&self, max: usize) -> Option<usize> {
        let max = self.clamp(max);
        if max == 0 {
            return None;
        }
        Some(match &self.pace {
            Some(pace) => pace.due(self.next_offset, max as u64).await as usize,
            None => max,
        })
    }

    /// Where the partition ends now, for its lag: the records due by now under the rate
    /// limit, or the whole count without one (all of it is there to be made); unknown for
    /// an endless stream at full speed.
    pub(crate) fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        let count_end = self.remaining.map(|r| self.next_offset + r as i64);
        match &self.pace {
            Some(pace) => Some(Arc::new(PacedEnd {
                pace: pace.clone(),
                count_end,
            })),
            None => count_end.map(|end| Arc::new(FixedEnd(end)) as Arc<dyn LogEnd>),
        }
    }

    /// Takes `n` records as made; their offsets.
    fn advance(&mut self, n: usize) -> Range<i64> {
        let first = self.next_offset;
        self.next_offset += n as i64;
        if let Some(r) = self.remaining.as_mut() {
            *r -= n as u64;
        }
        first..self.next_offset
    }

    /// The envelope of the next `records` (with their event times), which are taken as
    /// made.
    pub(crate) fn envelope(
        &mut self,
        schema: &SchemaRef,
        records: RecordBatch,
        event_time: ArrayRef,
    ) -> Result<Envelope> {
        let offsets = self.advance(records.num_rows());
        let batch = batch::append_metadata(
            schema,
            records,
            self.info.id,
            offsets.start,
            None,
            Some(event_time),
        )?;
        Ok(Envelope {
            partition: self.info.clone(),
            offsets,
            batch,
            dead: Vec::new(),
        })
    }
}

/// Paces a rate-limited partition: record `first_offset + i` is due at `started + i / rate`.
#[derive(Clone)]
struct Pace {
    rate: f64,
    started: Instant,
    first_offset: i64,
}

impl Pace {
    fn new(rate: f64, first_offset: i64) -> Self {
        Pace {
            rate,
            started: Instant::now(),
            first_offset,
        }
    }

    /// The offset after the last record due by now.
    fn end_by_now(&self) -> i64 {
        self.first_offset + (self.started.elapsed().as_secs_f64() * self.rate) as i64 + 1
    }

    /// Records due by now when `next_offset` is the next to make (at most `max`), waiting
    /// until at least one is.
    async fn due(&self, next_offset: i64, max: u64) -> u64 {
        loop {
            let due = self.end_by_now() - next_offset;
            if due > 0 {
                return (due as u64).min(max);
            }
            let next_due = (next_offset - self.first_offset) as f64 / self.rate;
            let elapsed = self.started.elapsed().as_secs_f64();
            let wait = Duration::from_secs_f64((next_due - elapsed).max(0.0005));
            tokio::time::sleep(wait).await;
        }
    }
}

/// The end of a rate-limited partition: the records due by now, within the count.
struct PacedEnd {
    pace: Pace,
    count_end: Option<i64>,
}

impl LogEnd for PacedEnd {
    fn log_end(&self) -> Option<i64> {
        let due = self.pace.end_by_now();
        Some(self.count_end.map_or(due, |end| due.min(end)))
    }
}

struct FixedEnd(i64);

impl LogEnd for FixedEnd {
    fn log_end(&self) -> Option<i64> {
        Some(self.0)
    }
}
