//! Sources and the partitions they read.
//!
//! A [`Source`] tells the executor which partitions this process owns, as a stream of
//! [`Assignment`]s: a bounded source (files, a generator with a count) assigns all its
//! partitions and then says it is done; Kafka assigns and revokes partitions as the group
//! rebalances. Each assigned partition is read by its own [`PartitionReader`], so
//! partitions are read concurrently and in order within each one.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;

use tokio::sync::oneshot;

use crate::Result;
use crate::batch::{Envelope, PartitionInfo};
use crate::checkpoint::Checkpoint;

/// Reads the records of one partition in order.
#[async_trait]
pub trait PartitionReader: Send {
    fn info(&self) -> &Arc<PartitionInfo>;

    /// Returns between 1 and `max` records, waiting until at least one is available, or
    /// `None` when the partition has ended. The batch has the source's full schema,
    /// metadata columns included.
    ///
    /// # Errors
    /// A record that cannot be decoded is an [`crate::Error::BadRecord`] naming the
    /// partition, the offset (and line, for text files) and the reason.
    ///
    /// # Cancel safety
    /// Must be cancel safe: when the future is dropped before it completes, no record is
    /// lost and the next call returns it.
    async fn read(&mut self, max: usize) -> Result<Option<Envelope>>;

    /// The partition's end as the source knows it, for its lag; `None` where the source
    /// cannot tell (files).
    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        None
    }

    /// The offset of the first record it will read, when the source knows it before
    /// reading (Kafka: a checkpoint's offset, a take-over's, the group's, or `start_from`
    /// resolved at the assignment; Kinesis: the shard's sequence number): the
    /// partition's lag is then known from its assignment on, so a partition with records
    /// waiting to be read is never taken for an idle one.
    fn start_offset(&self) -> Option<i64> {
        None
    }

    /// Asked once, after `read` returned `None`: a sender the engine fires once everything
    /// read from the partition has gone through the stages (which saw the partition end)
    /// into the sink and a checkpoint holds it. A source whose partitions end while others
    /// begin (a Kinesis shard and its children) starts what follows on it.
    fn take_end_signal(&mut self) -> Option<oneshot::Sender<()>> {
        None
    }

    /// Asked once, after `read` returned `None`: whether the partition's records go on in
    /// partitions this process reads next (a Kinesis shard's children, read here once its
    /// end is checkpointed). The stages then keep open what the end would close (a window
    /// the children's records fall in too) instead of completing it now.
    fn continues_here(&self) -> bool {
        false
    }

    /// The partitions whose records this one continues, read here before it (a Kinesis
    /// shard's parents): the stages held their open windows for this one.
    fn follows(&self) -> Vec<Arc<str>> {
        Vec::new()
    }
}

/// Where a partition ends now: the offset the next record written to it will get (Kafka's
/// log end offset, a rate-limited generator's records due by now). Kept current by the
/// source; the engine reads it for lag, from any thread.
pub trait LogEnd: Send + Sync {
    fn log_end(&self) -> Option<i64>;

    /// Where the partition begins now (Kafka's log start offset: records before it were
    /// deleted by retention), when the source can tell. A position before it counts from
    /// it: deleted records are no lag.
    fn log_start(&self) -> Option<i64> {
        None
    }

    /// How far behind the stream's tip the partition's reader is, in milliseconds, when
    /// the source measures lag in time (Kinesis's `MillisBehindLatest`).
    fn millis_behind(&self) -> Option<u64> {
        None
    }

    /// Where the source fetches ahead of its reader (a Kinesis shard's pages): the offset
    /// after the last record fetched. Records before it exist and are on their way, so the
    /// partition is not caught up while the pipeline's position is behind it.
    fn fetched_end(&self) -> Option<i64> {
        None
    }
}

/// A change in the partitions this process reads.
pub enum Assignment {
    Assign(Box<dyn PartitionReader>),
    /// Stop reading the partition: what was read is processed, then the reader is dropped.
    Revoke {
        partition: u32,
        /// Fires once everything read from the partition is in the sink and a checkpoint
        /// holding its offset is committed (or when the pipeline stops first). A consumer
        /// group member waits for it before it lets the partition go, so the next owner
        /// starts where this one ended.
        drained: Option<oneshot::Sender<()>>,
    },
}

/// Told about every committed checkpoint, after it is durable: a Kafka source commits its
/// consumer group's offsets here, so the group's offsets never run ahead of the sink.
pub trait CommitHook: Send + Sync {
    /// `checkpoint` holds the offsets that changed (next offset to read, by partition name).
    /// Runs on a blocking thread; may block for a round trip.
    fn committed(&self, checkpoint: &Checkpoint);
}

/// For a source whose positions are not numbers (a Kinesis shard's sequence numbers are
/// 56 digits): the engine counts a partition's records with offsets of its own, and asks
/// the source, at every checkpoint, for the position to resume at the next offset. The
/// answer is committed with the offset, atomically ([`Checkpoint::positions`]), and given
/// back in [`Source::restore`].
pub trait PositionBook: Send + Sync {
    /// The source's position at which `partition` resumes with offset `next` (everything
    /// before it processed), when the source still knows it. `None` keeps the partition's
    /// last committed position, which the source then resumes from, skipping the records
    /// before `next` again: a position must say which offset it stands for.
    fn position(&self, partition: &str, next: i64) -> Option<String>;
}

/// Brings the newest committed state of partitions into this process before it reads them,
/// when several processes share a checkpoint directory (worker processes of one consumer
/// group): the last owner may have been another process.
pub trait Handoff: Send + Sync {
    /// Takes over the named partitions' state where another process committed a newer one
    /// than this process has; returns where each such partition's state is: the offset
    /// next to read and, for a source with positions of its own, the position committed
    /// with it. Blocking (reads other processes' checkpoints).
    ///
    /// # Errors
    /// A checkpoint that cannot be read: the partition must not be read without its state.
    fn take_over(&self, partitions: &[String]) -> Result<BTreeMap<String, ResumeAt>>;

    /// Where this process's own committed state of `partition` is (its database now, not
    /// as restored at start-up): for a partition [`Handoff::take_over`] found no newer
    /// state of, the state it will read from the store. Blocking.
    fn own(&self, partition: &str) -> Result<Option<ResumeAt>>;
}

/// Where a partition resumes: a committed offset and the source's position committed
/// with it ([`Checkpoint::positions`]; none for a source whose positions are offsets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeAt {
    /// The next offset to read.
    pub offset: i64,
    #[serde(default)]
    pub position: Option<String>,
}

/// A worker process (`sluice worker`) of several sharing one checkpoint directory: its
/// name and the directory. A source without consumer groups (Kinesis) shares its
/// partitions among the members through leases kept there.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub dir: std::path::PathBuf,
}

#[async_trait]
pub trait Source: Send {
    /// The schema of every batch, metadata columns included.
    fn schema(&self) -> SchemaRef;

    /// How many partitions the source expects to assign, to size the worker pool.
    fn partition_hint(&self) -> usize;

    /// Where to start: every partition assigned from now on starts at its offset in
    /// `checkpoint` (the next record to read), or at its beginning when it has none.
    /// Called before the first assignment when the pipeline checkpoints.
    fn restore(&mut self, checkpoint: Arc<Checkpoint>);

    /// Called with every committed checkpoint, if the source wants to know.
    fn commit_hook(&self) -> Option<Arc<dyn CommitHook>> {
        None
    }

    /// Asked for the positions a checkpoint commits with its offsets, for a source whose
    /// positions are not offsets (see [`PositionBook`]).
    fn position_book(&self) -> Option<Arc<dyn PositionBook>> {
        None
    }

    /// Given when the checkpoint directory is shared with other processes: a source whose
    /// partitions move between processes calls it before it starts reading a partition, and
    /// starts the partition at the offset it returns.
    fn set_handoff(&mut self, _handoff: Arc<dyn Handoff>) {}

    /// Given to a worker process before it runs (see [`Member`]). A source whose
    /// partitions are shared by a consumer group has no use for it.
    fn set_member(&mut self, _member: &Member) {}

    /// Whether the source needs checkpoints to run at all (a consumer group commits its
    /// offsets through them): the executor then checkpoints in memory when the pipeline
    /// configures no checkpoint store.
    fn needs_checkpoints(&self) -> bool {
        false
    }

    /// The next change of assignment; `Ok(None)` once no more will come.
    ///
    /// # Cancel safety
    /// Must be cancel safe.
    async fn next_assignment(&mut self) -> Result<Option<Assignment>>;
}
