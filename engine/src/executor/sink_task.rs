//! The sink task: writes what the workers send to every output, counts each partition's
//! offsets as done once every output (or the dead-letter sink) has its records, rolls
//! files on the outputs' timers, and takes the checkpoints (`checkpointing.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::checkpointing::{Checkpointing, Offsets, pause_workers, wait_paused};
use super::messages::{Delivery, Drained, Paused, SinkMsg};
use super::outputs::{Outputs, Refused};
use super::{interval, tick};
use crate::batch::Envelope;
use crate::dead_letter::DeadLetterSink;
use crate::stats::RunStats;
use crate::{Error, Result};

/// The sink task's state: the outputs, what it has received and committed of each
/// partition, and the checkpoint under way.
pub(super) struct SinkTask {
    pipeline: Arc<str>,
    sink: Outputs,
    dead_letter: Option<DeadLetterSink>,
    checkpointing: Checkpointing,
    stats: Arc<RunStats>,
    offsets: Offsets,
    /// Revoked partitions waiting for the checkpoint that covers them.
    drains: Vec<Drained>,
    /// A checkpoint of stateful stages waiting for every worker to pause (one task at most).
    pausing: JoinSet<Paused>,
}

impl SinkTask {
    pub(super) fn new(
        pipeline: Arc<str>,
        sink: Outputs,
        dead_letter: Option<DeadLetterSink>,
        checkpointing: Checkpointing,
    ) -> Self {
        SinkTask {
            pipeline,
            sink,
            dead_letter,
            stats: checkpointing.stats.clone(),
            checkpointing,
            offsets: Offsets::default(),
            drains: Vec::new(),
            pausing: JoinSet::new(),
        }
    }

    /// Runs until every worker has dropped its sender, then closes the sinks and takes the
    /// last checkpoint. The sinks' summary.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<SinkMsg>) -> Result<String> {
        let stats = self.stats.clone();
        let _alive = stats.sink_time.enter();
        let mut ticker = self.sink.tick_interval().map(interval);
        let mut checkpoints = self
            .checkpointing
            .policy
            .as_ref()
            .map(|c| interval(c.interval));
        let stateful = !self.checkpointing.states.is_empty();
        loop {
            // Whether a checkpoint is due: on the timer, and for revoked partitions.
            let due = tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.receive(msg).await?;
                    !self.drains.is_empty()
                }
                paused = wait_paused(&mut self.pausing) => {
                    let paused = paused?;
                    // Everything the workers sent before pausing is in the channel: take it in.
                    while let Ok(msg) = rx.try_recv() {
                        self.receive(msg).await?;
                    }
                    let cp = &self.checkpointing;
                    cp.take(&mut self.sink, self.dead_letter.as_mut(), &mut self.offsets).await?;
                    drop(paused);
                    cp.barrier.release();
                    cp.finish_drains(&mut self.drains, &mut self.offsets);
                    false
                }
                _ = tick(&mut ticker), if ticker.is_some() => {
                    self.sink.tick().await?;
                    false
                }
                _ = tick(&mut checkpoints), if checkpoints.is_some() => true,
            };
            if !due {
                continue;
            }
            if stateful {
                // Taken once every worker waits between batches (the branch above).
                if self.pausing.is_empty() {
                    pause_workers(&self.checkpointing.barrier, &mut self.pausing);
                }
            } else {
                self.checkpointing
                    .take_and_release(
                        &mut self.sink,
                        self.dead_letter.as_mut(),
                        &mut self.drains,
                        &mut self.offsets,
                    )
                    .await?;
            }
        }
        self.sink.close().await?;
        if let Some(dlq) = &mut self.dead_letter {
            dlq.sink.close().await?;
        }
        // Every worker has ended: the state is still.
        self.checkpointing
            .take_and_release(
                &mut self.sink,
                self.dead_letter.as_mut(),
                &mut self.drains,
                &mut self.offsets,
            )
            .await?;
        Ok(match &self.dead_letter {
            Some(dlq) => format!(
                "{}; dead letters: {}",
                self.sink.summary(),
                dlq.sink.summary()
            ),
            None => self.sink.summary(),
        })
    }

    /// Writes a batch (its failed records to the dead letters) and counts its offsets as
    /// received, or takes a drained partition's marker.
    async fn receive(&mut self, msg: SinkMsg) -> Result<()> {
        let (Delivery { env, outputs }, ticket) = match msg {
            SinkMsg::Batch(delivery, ticket) => {
                self.stats.queued_for_sink.fetch_sub(1, Ordering::Relaxed);
                (delivery, ticket)
            }
            SinkMsg::Drain(drained) => {
                self.drains.push(drained);
                return Ok(());
            }
        };
        let stats = &self.stats;
        for refused in self.sink.write(outputs).await? {
            let stage = self.sink.stage_name(refused.output);
            bury_refused(
                &self.pipeline,
                &env,
                &stage,
                &refused,
                self.dead_letter.as_mut(),
                stats,
            )
            .await?;
        }
        if !env.dead.is_empty() {
            let dlq = self
                .dead_letter
                .as_mut()
                .ok_or_else(|| Error::Internal("dead letters without a dead-letter sink".into()))?;
            dlq.write(&self.pipeline, &env.dead).await?;
            tap_dead_letters(stats, &self.pipeline, &env.dead);
            RunStats::add(&stats.records_dead_lettered, env.dead.len() as u64);
            RunStats::add(&stats.records_failed, env.dead.len() as u64);
        }
        // A lane's part: the partition is done up to the first batch with a part still out.
        let done = match &ticket {
            Some(ticket) => match ticket.done() {
                Some(end) => end,
                None => return Ok(()),
            },
            None => env.offsets.end,
        };
        if self.checkpointing.policy.is_none() && !env.offsets.is_empty() {
            // Without checkpoints, a record is done once the sink has it.
            if let Some(p) = stats.partition(&env.partition.name) {
                p.advance_to(done);
            }
        }
        // Output made at the end of a partition (closed windows) carries an empty range: it
        // never starts or lowers a partition's position.
        match self.offsets.received.get_mut(&env.partition.name) {
            Some(end) => *end = (*end).max(done),
            None if !env.offsets.is_empty() => {
                self.offsets
                    .received
                    .insert(env.partition.name.clone(), done);
            }
            None => {}
        }
        Ok(())
    }
}

/// The stage name of rows the sink refused.
pub const SINK_STAGE: &str = "sink";

/// Rows an output refused (it can never take them: larger than it allows) go to the dead
/// letters of the stage `stage` (`sink`, or `sink.NAME` with several outputs); without a
/// dead-letter sink, the first one stops the run.
async fn bury_refused(
    pipeline: &str,
    env: &Envelope,
    stage: &Arc<str>,
    refused: &Refused,
    dead_letter: Option<&mut DeadLetterSink>,
    stats: &RunStats,
) -> Result<()> {
    let batch = &refused.batch;
    let refused = &refused.rows;
    let Some(dlq) = dead_letter else {
        let (row, reason) = &refused[0];
        let origin = match crate::batch::offset_at(batch, *row as usize) {
            Some(o) => format!("{} offset {o}", env.partition.name),
            None => env.origin(),
        };
        return Err(Error::Stage {
            stage: stage.to_string(),
            origin,
            class: crate::ErrorClass::Permanent,
            message: reason.clone(),
        });
    };
    let mut letters = Vec::with_capacity(refused.len());
    for (row, reason) in refused {
        // Stages that drop `_offset` leave the batch's range as the best provenance.
        let reason = match crate::batch::offset_at(batch, *row as usize) {
            Some(_) => reason.clone(),
            None => format!(
                "{reason} (one of {}: the stages dropped `_offset`)",
                env.origin()
            ),
        };
        letters.extend(crate::dead_letter::letters_of_rows(
            batch,
            &[*row],
            &env.partition,
            crate::dead_letter::RowFailure {
                stage,
                class: crate::ErrorClass::Permanent,
                reason: &reason,
                attempts: 1,
                first_failed_at: crate::dead_letter::now_ms(),
            },
        )?);
    }
    dlq.write(pipeline, &letters).await?;
    tap_dead_letters(stats, pipeline, &letters);
    RunStats::add(&stats.records_dead_lettered, letters.len() as u64);
    RunStats::add(&stats.records_failed, letters.len() as u64);
    Ok(())
}

/// Copies dead letters to their listeners (`sluice tap --stage dead_letters`), if any, as
/// the rows a file dead-letter sink writes.
fn tap_dead_letters(stats: &RunStats, pipeline: &str, letters: &[crate::dead_letter::DeadLetter]) {
    let Some(point) = stats.taps.get().map(|t| &t.dead_letters) else {
        return;
    };
    if point.active()
        && let Ok(rows) = crate::dead_letter::to_batch(pipeline, letters)
            .and_then(|b| crate::dead_letter::text_batch(&b))
    {
        point.offer(&rows);
    }
}
