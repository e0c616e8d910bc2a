//! Counters a running pipeline updates and the CLI reads for its status line and summary.
//!
//! Plain relaxed atomics: readers want a recent value, not a consistent snapshot, and
//! writers must never wait. The Prometheus exporter will read the same counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::busy::TaskTime;
use crate::source::LogEnd;
use crate::tap::Taps;

#[derive(Debug, Default)]
pub struct StageStats {
    pub name: Arc<str>,
    pub rows_in: AtomicU64,
    pub rows_out: AtomicU64,
    /// Rows that failed for good (dead-lettered, or the error that stopped the run).
    pub rows_failed: AtomicU64,
    /// Rows called again after a transient failure (one per row per retry).
    pub retries: AtomicU64,
    /// Failed batches split in two to isolate the failing rows.
    pub bisections: AtomicU64,
    /// Rows sent to the dead-letter sink.
    pub dead_letters: AtomicU64,
    /// Rows dropped by the `skip` fallback while the circuit was open.
    pub skipped: AtomicU64,
    /// Rows given default values by the `default` fallback.
    pub defaulted: AtomicU64,
    /// Rows that failed for good, by [`crate::ErrorClass`] (in the order of `ErrorClass::ALL`).
    pub failed_by_class: [AtomicU64; 4],
    /// Times the stage's circuit breaker opened, and closed again.
    pub breaker_opened: AtomicU64,
    pub breaker_closed: AtomicU64,
    pub batches: AtomicU64,
    /// The longest `open` of any worker's instance.
    pub cold_start_nanos: AtomicU64,
    /// Time of each `process_batch` call.
    pub latency: LatencyHistogram,
    /// Lookups a stage answered from its cache, and those it had to fetch.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Late rows dropped because the pipeline has no dead-letter sink.
    pub late_dropped: AtomicU64,
    /// Time in the stage's calls (see [`crate::busy`]), and the CPU time of those calls.
    pub busy_nanos: AtomicU64,
    pub cpu_nanos: AtomicU64,
    /// Time the rows the stage produced waited for the stages after it and the sink task.
    pub back_pressured_nanos: AtomicU64,
}

impl StageStats {
    pub fn cold_start(&self) -> Duration {
        Duration::from_nanos(self.cold_start_nanos.load(Ordering::Relaxed))
    }
}

/// A histogram of durations that many threads record into without waiting: log-linear
/// buckets (8 per power of two) of nanoseconds, so a quantile is within 12.5% of the truth
/// from a nanosecond to centuries, in 4 KiB.
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    /// The Prometheus histogram every duration is also recorded in, once metrics are served.
    exported: std::sync::OnceLock<metrics::Histogram>,
}

const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            exported: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::index(ns)].fetch_add(1, Ordering::Relaxed);
        if let Some(h) = self.exported.get() {
            h.record(d.as_secs_f64());
        }
    }

    /// Records every duration from now on in `histogram` too (seconds).
    pub fn export(&self, histogram: metrics::Histogram) {
        let _ = self.exported.set(histogram);
    }

    /// Adds every duration recorded in `other`.
    pub fn merge(&self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The duration below which a fraction `q` (0..=1) of the recorded ones fall (the upper
    /// edge of the bucket holding it); `None` before anything was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_nanos(Self::upper(i)));
            }
        }
        None
    }

    fn index(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros();
        let mantissa = (ns >> (exp - SUB_BITS)) & (SUB - 1);
        (SUB + u64::from(exp - SUB_BITS) * SUB + mantissa) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let exp = (i - SUB) / SUB + u64::from(SUB_BITS);
        let mantissa = (i - SUB) % SUB;
        let lower = (SUB + mantissa) << (exp - u64::from(SUB_BITS));
        lower.saturating_add((1u64 << (exp - u64::from(SUB_BITS))) - 1)
    }
}

#[derive(Debug, Default)]
pub struct RunStats {
    /// Records read from the source and handed to a worker.
    pub records_in: AtomicU64,
    /// Records written to the outputs (a record written to two outputs counts twice).
    pub records_out: AtomicU64,
    /// Records that failed in a stage or at decoding (dead letters).
    pub records_failed: AtomicU64,
    /// Records written to the dead-letter sink.
    pub records_dead_lettered: AtomicU64,
    pub batches_in: AtomicU64,
    /// Time a worker takes to run one batch through every stage (its closed-window output
    /// included), from taking it off its queue to handing the result to the sink task.
    pub batch_latency: LatencyHistogram,
    /// The id of the last committed checkpoint.
    pub checkpoints: AtomicU64,
    /// Time each checkpoint took (state snapshot, sink flush, offsets committed).
    pub checkpoint_duration: LatencyHistogram,
    /// Bytes of stage state the last checkpoint wrote.
    pub checkpoint_state_bytes: AtomicU64,
    /// Worker tasks running, and how many the autoscaler wants (equal without one).
    pub workers: AtomicU64,
    pub workers_desired: AtomicU64,
    /// Autoscaler decisions, up and down.
    pub scaled_up: AtomicU64,
    pub scaled_down: AtomicU64,
    /// The autoscaler's last decision, and when (seconds since the epoch).
    pub last_decision: Mutex<Option<(u64, crate::autoscale::Decision)>>,
    /// The partitions this process reads, by name, with what their lag is computed from.
    pub partitions: Mutex<BTreeMap<Arc<str>, Arc<PartitionLag>>>,
    pub stages: Vec<StageStats>,
    /// Per output (sink), in the pipeline's order: set once when the run starts.
    pub outputs: std::sync::OnceLock<Vec<OutputStats>>,
    /// Where time goes (see [`crate::busy`]): the workers' time alive, the partition
    /// readers' (with the CPU of their reads: decoding, and the time they waited for a
    /// worker to take a batch), the sink task's.
    pub worker_time: TaskTime,
    pub reader_time: TaskTime,
    pub source_cpu_nanos: AtomicU64,
    pub source_blocked_nanos: AtomicU64,
    pub sink_time: TaskTime,
    /// Where rows can be tapped (`sluice tap`): set once when the run starts.
    pub taps: std::sync::OnceLock<Arc<Taps>>,
    /// Batches waiting in the workers' queues, and in the sink task's.
    pub queued_for_workers: AtomicI64,
    pub queued_for_sink: AtomicI64,
}

/// What one output (sink) of the pipeline took.
#[derive(Debug, Default)]
pub struct OutputStats {
    pub name: Arc<str>,
    /// Rows written to it (refused ones not counted).
    pub rows: AtomicU64,
    /// Time spent writing and flushing it: an output busy most of the time is the one
    /// that holds the pipeline back (every output of a batch is written before the next).
    pub busy_nanos: AtomicU64,
    /// The CPU time of its writes and flushes (encoding, the client library's calls).
    pub cpu_nanos: AtomicU64,
}

impl RunStats {
    /// The outputs' counters (none before the run starts).
    pub fn outputs(&self) -> &[OutputStats] {
        self.outputs.get().map_or(&[], Vec::as_slice)
    }
}

/// How far one partition is: the source's end of it and the pipeline's position in it.
pub struct PartitionLag {
    /// Where the partition ends now (Kafka: the log end offset), when the source can tell.
    pub end: Option<Arc<dyn LogEnd>>,
    /// The next offset not yet done: committed by a checkpoint when the pipeline takes
    /// them (what a consumer group's committed offset says), else written to the sink.
    /// `i64::MIN` until known.
    pub position: AtomicI64,
    /// The end of the batches read from the partition and handed to the workers:
    /// `i64::MIN` before the first. Past `position`, batches are in flight (in the
    /// stages, in retries, on their way to the sink or to a checkpoint).
    pub read: AtomicI64,
}

impl std::fmt::Debug for PartitionLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLag")
            .field("end", &self.end.as_ref().and_then(|e| e.log_end()))
            .field("position", &self.position.load(Ordering::Relaxed))
            .field("read", &self.read.load(Ordering::Relaxed))
            .finish()
    }
}

impl PartitionLag {
    pub fn new(end: Option<Arc<dyn LogEnd>>) -> Self {
        PartitionLag {
            end,
            position: AtomicI64::new(i64::MIN),
            read: AtomicI64::new(i64::MIN),
        }
    }

    /// Records not done yet: the end minus the position, once both are known.
    pub fn lag(&self) -> Option<u64> {
        let source = self.end.as_ref()?;
        let end = source.log_end()?;
        let position = self.position.load(Ordering::Relaxed);
        if position == i64::MIN {
            return None;
        }
        let position = position.max(source.log_start().unwrap_or(i64::MIN));
        Some(end.saturating_sub(position).max(0) as u64)
    }

    /// How far behind the stream's tip the partition is in time, where the source says.
    pub fn lag_ms(&self) -> Option<u64> {
        self.end.as_ref()?.millis_behind()
    }

    /// Sets the position the first time it becomes known (where the source starts the
    /// partition, or the first record read).
    pub fn start_at(&self, offset: i64) {
        let _ =
            self.position
                .compare_exchange(i64::MIN, offset, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn advance_to(&self, offset: i64) {
        self.position.fetch_max(offset, Ordering::Relaxed);
    }

    /// A batch ending at `end` was read and handed to the workers.
    pub fn read_to(&self, end: i64) {
        self.read.fetch_max(end, Ordering::Relaxed);
    }

    /// Whether records read, or fetched by the source ahead of its reader, are not done
    /// yet: a batch between the reader and the sink or a checkpoint, a fetched page not
    /// read yet (see [`LogEnd::fetched_end`]).
    pub fn in_flight(&self) -> bool {
        let position = self.position.load(Ordering::Relaxed);
        let fetched = self.end.as_ref().and_then(|e| e.fetched_end());
        [Some(self.read.load(Ordering::Relaxed)), fetched]
            .into_iter()
            .flatten()
            .any(|end| end != i64::MIN && (position == i64::MIN || position < end))
    }
}

impl RunStats {
    pub fn new<'a>(stage_names: impl IntoIterator<Item = &'a Arc<str>>) -> Arc<Self> {
        Arc::new(RunStats {
            stages: stage_names
                .into_iter()
                .map(|name| StageStats {
                    name: name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The partitions' lag by name (those whose lag is known).
    pub fn lags(&self) -> Vec<(Arc<str>, u64)> {
        self.by_partition(PartitionLag::lag)
    }

    /// Every partition's lag in milliseconds, where its source measures it in time.
    pub fn lags_ms(&self) -> Vec<(Arc<str>, u64)> {
        self.by_partition(PartitionLag::lag_ms)
    }

    fn by_partition(&self, lag: impl Fn(&PartitionLag) -> Option<u64>) -> Vec<(Arc<str>, u64)> {
        let partitions = self.partitions.lock().expect("partitions lock");
        partitions
            .iter()
            .filter_map(|(name, p)| Some((name.clone(), lag(p)?)))
            .collect()
    }

    /// The sum of every partition's known lag.
    pub fn total_lag(&self) -> u64 {
        self.total(PartitionLag::lag)
    }

    /// The sum of every partition's lag in milliseconds, where sources measure it in time.
    pub fn total_lag_ms(&self) -> u64 {
        self.total(PartitionLag::lag_ms)
    }

    fn total(&self, lag: impl Fn(&PartitionLag) -> Option<u64>) -> u64 {
        let partitions = self.partitions.lock().expect("partitions lock");
        partitions.values().filter_map(|p| lag(p)).sum()
    }

    /// What the partition's lag is computed from, registered when it is assigned.
    pub fn partition(&self, name: &str) -> Option<Arc<PartitionLag>> {
        self.partitions
            .lock()
            .expect("partitions lock")
            .get(name)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            1000,
            123_456_789,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let i = LatencyHistogram::index(ns);
            assert!(i < BUCKETS);
            assert!(i >= last, "{ns}");
            last = i;
            assert!(LatencyHistogram::upper(i) >= ns, "{ns} above its bucket");
            if i > 0 {
                assert!(LatencyHistogram::upper(i - 1) < ns, "{ns} below its bucket");
            }
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        for (q, want) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0), (1.0, 100.0)] {
            let got = h.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!(
                got >= want && got <= want * 1.125,
                "p{q}: {got}ms, want ~{want}ms"
            );
        }
        assert_eq!(h.count(), 100);
    }
}
