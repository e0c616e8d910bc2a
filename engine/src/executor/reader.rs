//! A partition's reader task: reads, cuts batches by size and window ([`Batcher`]), splits
//! them into lanes, and sends each to the worker its lane is routed to. A move of a lane to
//! another worker is handed off: the old worker finishes the lane's batches first.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arrow::compute::concat_batches;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::Batching;
use super::lanes::{Ledger, Splitter};
use super::messages::{Route, WorkerMsg};
use crate::batch::{Envelope, PartitionInfo};
use crate::busy::metered;
use crate::source::PartitionReader;
use crate::stats::{PartitionLag, RunStats};
use crate::{Error, Result};

/// Accumulates reads into batches of `size` records or `window` of time.
pub(super) struct Batcher {
    batching: Batching,
    parts: Vec<Envelope>,
    rows: usize,
    deadline: Option<tokio::time::Instant>,
    ended: bool,
}

impl Batcher {
    pub(super) fn new(batching: Batching) -> Self {
        Batcher {
            batching,
            parts: Vec::new(),
            rows: 0,
            deadline: None,
            ended: false,
        }
    }

    /// The next batch, or `None` when the partition has ended and nothing is buffered.
    ///
    /// # Cancel safety
    /// Cancel safe: what was read stays buffered in `self`.
    async fn next(&mut self, reader: &mut dyn PartitionReader) -> Result<Option<Envelope>> {
        while !self.ended && self.rows < self.batching.size {
            let want = self.batching.size - self.rows;
            let read = match self.deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, reader.read(want)).await {
                        Ok(read) => read?,
                        Err(_) => break,
                    }
                }
                None => reader.read(want).await?,
            };
            match read {
                // Reads whose records all failed still carry their offsets and dead letters,
                // and reads of only messages that hold no record (Debezium tombstones) their
                // offsets: the partition is done past them.
                Some(env)
                    if env.batch.num_rows() > 0
                        || !env.dead.is_empty()
                        || !env.offsets.is_empty() =>
                {
                    if self.parts.is_empty() {
                        self.deadline = Some(tokio::time::Instant::now() + self.batching.window);
                    }
                    self.rows += env.batch.num_rows();
                    self.parts.push(env);
                }
                Some(_) => {}
                None => self.ended = true,
            }
        }
        self.take()
    }

    /// Whatever is buffered, as one batch.
    fn take(&mut self) -> Result<Option<Envelope>> {
        self.rows = 0;
        self.deadline = None;
        match self.parts.len() {
            0 => Ok(None),
            1 => Ok(self.parts.pop()),
            _ => {
                let mut parts = std::mem::take(&mut self.parts);
                let schema = parts[0].batch.schema();
                let batch = concat_batches(&schema, parts.iter().map(|p| &p.batch))
                    .map_err(|e| Error::arrow("joining reads into a batch", e))?;
                let dead = parts
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.dead))
                    .collect();
                Ok(Some(Envelope {
                    partition: parts[0].partition.clone(),
                    offsets: parts[0].offsets.start..parts[parts.len() - 1].offsets.end,
                    batch,
                    dead,
                }))
            }
        }
    }
}

pub(super) async fn read_partition(
    mut reader: Box<dyn PartitionReader>,
    batching: Batching,
    mut lanes: Vec<watch::Receiver<Route>>,
    splitter: Option<Arc<Splitter>>,
    stop: CancellationToken,
    stats: Arc<RunStats>,
    lag: Arc<PartitionLag>,
) -> Result<ReadEnd> {
    let info = reader.info().clone();
    let _alive = stats.reader_time.enter();
    // Split partitions read a batch per lane at a time, so that each lane's part is about
    // a batch: n batches of the partition in flight at once, as with Lambda's factor.
    let batching = Batching {
        size: batching.size.saturating_mul(lanes.len()),
        ..batching
    };
    let mut batcher = Batcher::new(batching);
    let mut current: Vec<Route> = lanes
        .iter_mut()
        .map(|r| r.borrow_and_update().clone())
        .collect();
    let ledger = splitter.as_ref().map(|_| Arc::new(Ledger::default()));
    let mut end = None;
    let mut exhausted = false;
    'read: loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => batcher.take()?,
            next = metered(&stats.source_cpu_nanos, batcher.next(reader.as_mut())) => {
                let next = next?;
                exhausted = next.is_none();
                next
            }
        };
        let Some(env) = next else { break };
        if end.is_none() {
            // Lag counts from the first record read until a checkpoint says more.
            lag.start_at(env.offsets.start);
        }
        end = Some(env.offsets.end);
        lag.read_to(env.offsets.end);
        RunStats::add(&stats.records_in, env.batch.num_rows() as u64);
        RunStats::add(&stats.batches_in, 1);
        let parts = match (&splitter, &ledger) {
            (Some(splitter), Some(ledger)) => splitter.split(env, ledger)?,
            _ => vec![(0, env, None)],
        };
        for (lane, env, ticket) in parts {
            if lanes[lane].has_changed().unwrap_or(false) {
                let new = lanes[lane].borrow_and_update().clone();
                if new.worker != current[lane].worker {
                    hand_off(&info, &current[lane]).await;
                    current[lane] = new;
                }
            }
            let t0 = Instant::now();
            stats.queued_for_workers.fetch_add(1, Ordering::Relaxed);
            let sent = current[lane].tx.send(WorkerMsg::Batch(env, ticket)).await;
            RunStats::add(&stats.source_blocked_nanos, t0.elapsed().as_nanos() as u64);
            if sent.is_err() {
                // The worker is gone: the pipeline is stopping and the worker's error says why.
                stats.queued_for_workers.fetch_sub(1, Ordering::Relaxed);
                break 'read;
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    // Every lane but the last finishes what it was sent, so that whatever follows on the
    // last lane's worker (the end of the partition, a Drain marker) comes after all of it.
    let last = current.pop().expect("a partition has at least one lane");
    for other in &current {
        if other.worker != last.worker {
            hand_off(&info, other).await;
        }
    }
    if exhausted {
        let ended = WorkerMsg::Ended {
            partition: info.clone(),
            end: end.unwrap_or(0),
            continued: reader.continues_here(),
        };
        let _ = last.tx.send(ended).await;
    }
    // The worker that holds this partition's last batch: a Drain marker must follow it
    // there, even if a move was requested since. A source that waits for the partition's
    // end to be checkpointed gets one as a revoked partition does.
    Ok(ReadEnd {
        last: last.tx,
        end_signal: if exhausted {
            reader.take_end_signal()
        } else {
            None
        },
    })
}

/// Where a partition's reading ended: the worker that has its last batch, and the end
/// signal its source asked for (see [`PartitionReader::take_end_signal`]).
pub(super) struct ReadEnd {
    pub(super) last: mpsc::Sender<WorkerMsg>,
    pub(super) end_signal: Option<oneshot::Sender<()>>,
}

/// Waits until the old worker has processed everything this partition sent it.
async fn hand_off(info: &PartitionInfo, old: &Route) {
    let (done, processed) = oneshot::channel();
    let release = WorkerMsg::Release {
        partition: info.id,
        done,
    };
    if old.tx.send(release).await.is_ok() {
        let _ = processed.await;
    }
    tracing::debug!(partition = %info.name, from = old.worker, "partition handed off");
}
