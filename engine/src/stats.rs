//! Counters a running pipeline updates and the CLI reads for its status line and summary.
//!
//! Plain relaxed atomics: readers want a recent value, not a consistent snapshot, and
//! writers must never wait. The Prometheus exporter will read the same counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Time spent inside `process_batch`, summed over workers.
    pub busy_nanos: AtomicU64,
    /// The longest `open` of any worker's instance.
    pub cold_start_nanos: AtomicU64,
}

impl StageStats {
    pub fn cold_start(&self) -> Duration {
        Duration::from_nanos(self.cold_start_nanos.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
pub struct RunStats {
    /// Records read from the source and handed to a worker.
    pub records_in: AtomicU64,
    /// Records written to the sink.
    pub records_out: AtomicU64,
    /// Records that failed in a stage or at decoding (dead letters).
    pub records_failed: AtomicU64,
    /// Records written to the dead-letter sink.
    pub records_dead_lettered: AtomicU64,
    pub batches_in: AtomicU64,
    /// The id of the last committed checkpoint.
    pub checkpoints: AtomicU64,
    pub stages: Vec<StageStats>,
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
}
