//! Sinks: where the output of the last stage goes.
//!
//! One sink task per pipeline owns the [`Sink`] and receives batches from every worker over
//! a bounded channel, so a slow sink slows the workers and, through them, the sources.

use std::time::Duration;

use arrow::array::RecordBatch;
use async_trait::async_trait;

use crate::Result;

#[async_trait]
pub trait Sink: Send {
    /// Writes a batch (metadata columns already removed unless selected).
    ///
    /// # Errors
    /// An error stops the pipeline; what was written before stays written.
    async fn write(&mut self, batch: RecordBatch) -> Result<()>;

    /// Makes everything written so far durable and visible to readers.
    ///
    /// # Checkpointing
    /// The engine calls this before it records a checkpoint, so a checkpoint never covers
    /// records that are still in a buffer.
    async fn flush(&mut self) -> Result<()>;

    /// Flushes and releases the sink. Called once, at the end of a run.
    async fn close(&mut self) -> Result<()>;

    /// How often [`Sink::tick`] must be called (time-based rolling), if at all.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Periodic work that must happen even when no batch arrives.
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// What the sink wrote, for the run summary ("3 files in out/").
    fn summary(&self) -> String;

    /// The largest message the sink takes, in bytes, where it has such a limit (a Kafka
    /// producer's `message.max.bytes`). As a dead-letter sink, letters are cut to fit it
    /// (see [`crate::dead_letter`]).
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }

    /// The rows of the last [`Sink::write`] that the sink refused, by row index, each with
    /// the reason: rows it can never take (a message larger than it allows), which it did
    /// not write. The engine sends them to the dead letters, or stops the run naming them
    /// when there is no dead-letter sink. Called after every write.
    fn take_refused(&mut self) -> Vec<(u32, String)> {
        Vec::new()
    }
}
