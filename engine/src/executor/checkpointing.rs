//! Checkpoints, taken by the sink task: the barrier that pauses every worker while stage
//! state is snapshotted, every output flushed, the offsets committed with the state, revoked
//! partitions released once a checkpoint covers them, and the take-over of a partition's
//! state from another process sharing the checkpoint directory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::CheckpointPolicy;
use super::messages::{Drained, Paused, WorkerMsg};
use super::outputs::Outputs;
use super::pool::{Barrier, Target};
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::dead_letter::DeadLetterSink;
use crate::source::{CommitHook, Handoff, PositionBook, ResumeAt};
use crate::state::{PartitionKeys, SnapshotStats, StageState};
use crate::stats::RunStats;
use crate::{Error, Result};

/// Per partition, by name: the next offset after everything the sink task received
/// (written, emptied by the stages, or dead-lettered), and what the last checkpoint
/// committed.
#[derive(Default)]
pub(super) struct Offsets {
    pub(super) received: HashMap<Arc<str>, i64>,
    pub(super) committed: HashMap<Arc<str>, i64>,
}

/// What the sink task needs to take checkpoints.
pub(super) struct Checkpointing {
    pub(super) policy: Option<CheckpointPolicy>,
    pub(super) hook: Option<Arc<dyn CommitHook>>,
    /// The source's positions for the offsets a checkpoint commits, when it has its own.
    pub(super) book: Option<Arc<dyn PositionBook>>,
    /// Stateful stages: their checkpoints wait until every worker is between batches.
    pub(super) states: Vec<Arc<dyn StageState>>,
    pub(super) barrier: Arc<Barrier>,
    /// Set when a worker stopped on an error: its stages' state may be ahead of what the
    /// sink received, so no further checkpoint of a stateful pipeline is taken.
    pub(super) worker_failed: Arc<AtomicBool>,
    pub(super) stats: Arc<RunStats>,
}

impl Checkpointing {
    /// Takes a checkpoint, if the pipeline keeps them: stage state (while every worker
    /// waits), then the sink flushed and the offsets committed. None of a stateful pipeline
    /// after a worker failed.
    pub(super) async fn take(
        &self,
        sink: &mut Outputs,
        dead_letter: Option<&mut DeadLetterSink>,
        offsets: &mut Offsets,
    ) -> Result<()> {
        let Some(policy) = &self.policy else {
            return Ok(());
        };
        if !self.states.is_empty() && self.worker_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let t0 = Instant::now();
        let written = snapshot_states(&self.states).await?;
        let taken = self
            .commit(policy, sink, dead_letter, offsets, written.bytes > 0)
            .await?;
        if taken {
            self.stats.checkpoint_duration.record(t0.elapsed());
            self.stats
                .checkpoint_state_bytes
                .store(written.bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Takes a checkpoint ([`Checkpointing::take`]), then releases the partitions that
    /// were drained for it.
    pub(super) async fn take_and_release(
        &self,
        sink: &mut Outputs,
        dead_letter: Option<&mut DeadLetterSink>,
        drains: &mut Vec<Drained>,
        offsets: &mut Offsets,
    ) -> Result<()> {
        self.take(sink, dead_letter, offsets).await?;
        self.finish_drains(drains, offsets);
        Ok(())
    }

    /// Revoked partitions whose records are all in a committed checkpoint: their stage
    /// state is released and their drain is reported done.
    pub(super) fn finish_drains(&self, drains: &mut Vec<Drained>, offsets: &mut Offsets) {
        for Drained { partition, done } in drains.drain(..) {
            for state in &self.states {
                state.release(&partition);
            }
            // A later owner of the partition reports its own position.
            offsets.received.remove(&partition.name);
            offsets.committed.remove(&partition.name);
            let _ = done.send(());
            tracing::debug!(partition = %partition.name, "revoked partition drained");
        }
    }

    /// Flushes every output, then commits the offsets that advanced since the last checkpoint,
    /// and the stage state when it changed without them (windows that time closed: their
    /// rows went to the sink and the state no longer holds them). Whether there was
    /// anything to commit.
    async fn commit(
        &self,
        policy: &CheckpointPolicy,
        sink: &mut Outputs,
        dead_letter: Option<&mut DeadLetterSink>,
        offsets: &mut Offsets,
        state_changed: bool,
    ) -> Result<bool> {
        let changed: BTreeMap<String, i64> = offsets
            .received
            .iter()
            .filter(|(name, offset)| offsets.committed.get(*name) != Some(offset))
            .map(|(name, offset)| (name.to_string(), *offset))
            .collect();
        if changed.is_empty() && !state_changed {
            return Ok(false);
        }
        let t0 = Instant::now();
        sink.flush().await?;
        // Failed records count as done only once the dead-letter sink holds them.
        if let Some(dlq) = dead_letter {
            dlq.sink.flush().await?;
        }
        let stats = &self.stats;
        let positions = match &self.book {
            Some(book) => changed
                .iter()
                .filter_map(|(name, next)| Some((name.clone(), book.position(name, *next)?)))
                .collect(),
            None => BTreeMap::new(),
        };
        let checkpoint = Checkpoint {
            id: stats.checkpoints.load(Ordering::Relaxed) + 1,
            offsets: changed,
            positions,
            fallback: false,
        };
        let store = policy.store.clone();
        let hook = self.hook.clone();
        let id = checkpoint.id;
        let checkpoint = tokio::task::spawn_blocking(move || {
            store.commit(&checkpoint)?;
            if let Some(hook) = hook {
                hook.committed(&checkpoint);
            }
            Ok::<_, Error>(checkpoint)
        })
        .await
        .map_err(|e| Error::task("checkpoint commit", e))??;
        {
            // What the group's committed offsets now say: the lag counts from here.
            let partitions = stats.partitions.lock().expect("partitions lock");
            for (name, offset) in &checkpoint.offsets {
                if let Some(p) = partitions.get(name.as_str()) {
                    p.advance_to(*offset);
                }
            }
        }
        for (name, offset) in checkpoint.offsets {
            offsets.committed.insert(name.into(), offset);
        }
        stats.checkpoints.store(id, Ordering::Relaxed);
        tracing::debug!(checkpoint = id, took = ?t0.elapsed(), "checkpoint committed");
        Ok(true)
    }
}

/// Sends a barrier to every worker, in a task of `pausing` that yields once all of them
/// wait at it (a worker that has ended does not count).
pub(super) fn pause_workers(barrier: &Barrier, pausing: &mut JoinSet<Paused>) {
    let workers = barrier.send_out();
    pausing.spawn(async move {
        let mut waiting = Vec::with_capacity(workers.len());
        let mut draining = Vec::new();
        for worker in workers {
            match worker {
                Target::Live(worker, ended) => {
                    let (tx, rx) = oneshot::channel();
                    match worker.send(WorkerMsg::Barrier(tx)).await {
                        Ok(()) => waiting.push((rx, ended)),
                        Err(_) => draining.push(ended),
                    }
                }
                Target::Draining(ended) => draining.push(ended),
            }
        }
        let mut resumes = Vec::with_capacity(waiting.len());
        for (rx, ended) in waiting {
            match rx.await {
                Ok(resume) => resumes.push(resume),
                // It stopped before the barrier: wait until it has, if it is not done.
                Err(_) => draining.push(ended),
            }
        }
        // Retired workers finish what they were given, then end: not during the snapshot.
        for mut ended in draining {
            while ended.changed().await.is_ok() {}
        }
        resumes
    });
}

/// Every worker paused by the barrier out (see [`pause_workers`]); pending while none is.
///
/// # Cancel safety
/// Cancel safe.
pub(super) async fn wait_paused(pausing: &mut JoinSet<Paused>) -> Result<Paused> {
    match pausing.join_next().await {
        Some(paused) => paused.map_err(|e| Error::task("checkpoint barrier", e)),
        None => std::future::pending().await,
    }
}

async fn snapshot_states(states: &[Arc<dyn StageState>]) -> Result<SnapshotStats> {
    if states.is_empty() {
        return Ok(SnapshotStats::default());
    }
    let states = states.to_vec();
    let t0 = Instant::now();
    let written = tokio::task::spawn_blocking(move || {
        states.iter().try_fold(SnapshotStats::default(), |sum, s| {
            let one = s.snapshot()?;
            Ok::<_, Error>(SnapshotStats {
                keys: sum.keys + one.keys,
                bytes: sum.bytes + one.bytes,
            })
        })
    })
    .await
    .map_err(|e| Error::task("stage state snapshot", e))??;
    tracing::debug!(keys = written.keys, bytes = written.bytes, took = ?t0.elapsed(), "stage state snapshot");
    Ok(written)
}

/// Takes partitions' state over from other processes sharing the checkpoint directory.
pub(super) struct TakeOver {
    pub(super) store: Arc<dyn CheckpointStore>,
    pub(super) states: Vec<Arc<dyn StageState>>,
}

impl Handoff for TakeOver {
    fn take_over(&self, partitions: &[String]) -> Result<BTreeMap<String, ResumeAt>> {
        let keys: Vec<(String, PartitionKeys)> = partitions
            .iter()
            .map(|name| {
                let mut keys = PartitionKeys::default();
                for state in &self.states {
                    let k = state.partition_keys(name);
                    keys.prefixes.extend(k.prefixes);
                    keys.keys.extend(k.keys);
                }
                (name.clone(), keys)
            })
            .collect();
        let taken = self.store.take_over(&keys)?;
        for name in taken.keys() {
            for state in &self.states {
                state.forget(name);
            }
        }
        taken
            .into_keys()
            .filter_map(|name| match self.store.resume_at(&name) {
                Ok(at) => at.map(|at| Ok((name, at))),
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    fn own(&self, partition: &str) -> Result<Option<ResumeAt>> {
        self.store.resume_at(partition)
    }
}
