//! What the tasks send each other, and the three protocols built on it.
//!
//! ```text
//!  reader ──WorkerMsg──► worker ──SinkMsg──► sink task
//! ```
//! - **Release** (a lane moves to another worker): the reader sends `Release` to the old
//!   worker after the lane's last batch there and waits for `done` before it sends to the
//!   new one, so a partition's records stay in order across the move.
//! - **Barrier** (a checkpoint of stage state): the sink task sends `Barrier` to every
//!   worker; each answers with a sender to resume it once everything before the barrier is
//!   in the sink's channel, and waits. When all wait, the sink task takes in what is in its
//!   channel, snapshots the state with the offsets, and drops the resume senders
//!   ([`Paused`]). No worker starts while a barrier is out (`pool::Barrier`).
//! - **Drain** (a revoked partition, or one whose source asks to be told when its end is
//!   checkpointed): once the partition's reader has ended, a `Drain`
//!   marker follows its last batch through the worker that has it; the sink task, on
//!   receiving it, takes a checkpoint covering everything read and then fires `done`, on
//!   which a consumer group waits before it gives the partition to another member.

use std::sync::Arc;

use arrow::array::RecordBatch;
use tokio::sync::{mpsc, oneshot};

use super::lanes::Ticket;
use crate::batch::{Envelope, PartitionInfo};

pub(super) enum WorkerMsg {
    /// A batch, or a lane's part of one (with its ticket).
    Batch(Envelope, Option<Ticket>),
    /// The partition's source ended after the batches before this (bounded sources):
    /// stages that hold rows back emit them, unless its records go on in partitions read
    /// next (`continued`). `end` is the partition's next offset.
    Ended {
        partition: Arc<PartitionInfo>,
        end: i64,
        continued: bool,
    },
    /// A checkpoint of stage state: the worker says it waits here (after sending everything
    /// before it to the sink) and waits until the sink has taken the snapshot.
    Barrier(oneshot::Sender<oneshot::Sender<()>>),
    /// Everything of `partition` sent before this has been processed once `done` fires.
    Release {
        partition: u32,
        done: oneshot::Sender<()>,
    },
    /// The partition's reader has ended: passed on to the sink after its last batch.
    Drain(Drained),
    /// Time has passed: stages that hold rows back hand out what is due without a batch
    /// (windows closed by a partition going idle, or taken over at a partition's end),
    /// sent on under `partition`'s name with an empty range of offsets.
    Emit(Arc<PartitionInfo>),
}

pub(super) enum SinkMsg {
    Batch(Delivery, Option<Ticket>),
    Drain(Drained),
}

/// What a batch of records led to: the rows for each output (`outputs[o]`, in the order
/// of the pipeline's outputs), and the envelope with the partition, the offsets read and
/// the records that failed. The batch in the envelope is not written anywhere.
pub(super) struct Delivery {
    pub(super) env: Envelope,
    pub(super) outputs: Vec<Vec<RecordBatch>>,
}

/// A revoked partition whose last batch is ahead of this marker.
pub(super) struct Drained {
    pub(super) partition: Arc<PartitionInfo>,
    pub(super) done: oneshot::Sender<()>,
}

#[derive(Clone)]
pub(super) struct Route {
    pub(super) worker: usize,
    pub(super) tx: mpsc::Sender<WorkerMsg>,
}

/// Every worker waiting at a barrier, to be resumed by dropping these.
pub(super) type Paused = Vec<oneshot::Sender<()>>;
