//! The state of stateful stages (windowed aggregation), as the engine sees it.
//!
//! A stateful stage keeps its state per source partition, in memory up to a budget and in
//! the checkpoint store's RocksDB database beyond it. The engine drives it through
//! [`StageState`]:
//! - [`StageState::restore`] once before the first batch, with the database the last
//!   checkpoint was restored into;
//! - [`StageState::assign`] / [`StageState::release`] as partitions come and go, so that
//!   a partition's state moves with it (its progress is held back until it is read);
//! - [`StageState::snapshot`] at every checkpoint, while every worker waits between
//!   batches: the stage writes what changed since the last checkpoint into the database,
//!   and the store then freezes state and offsets together (see [`crate::checkpoint`]).

use std::sync::Arc;

use crate::Result;
use crate::batch::PartitionInfo;

/// Where one partition's state is in the database: every key under `prefixes`, and
/// `keys` exactly. Another process takes a partition over by copying these.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionKeys {
    pub prefixes: Vec<Vec<u8>>,
    pub keys: Vec<Vec<u8>>,
}

/// What a snapshot wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotStats {
    pub keys: u64,
    pub bytes: u64,
}

/// The engine's handle on a stateful stage's state, shared by all its instances.
pub trait StageState: Send + Sync {
    /// Attaches the database and reads what the last checkpoint holds. Called once, before
    /// the first batch and the first assignment.
    fn restore(&self, db: Arc<crate::checkpoint::StateDb>) -> Result<()>;

    /// The partition is read by this process from now on.
    fn assign(&self, partition: &PartitionInfo);

    /// What the lag of a partition just assigned is computed from (its position and the source's
    /// end of it), given right after [`StageState::assign`].
    fn watch(&self, _partition: &PartitionInfo, _lag: &Arc<crate::stats::PartitionLag>) {}

    /// The partition just assigned continues the records of `parents`, which ended here
    /// (see [`crate::source::PartitionReader::follows`]), given right after
    /// [`StageState::assign`].
    fn follows(&self, _partition: &PartitionInfo, _parents: &[Arc<str>]) {}

    /// No more assignments will come (a bounded source has assigned all its partitions):
    /// restored partitions not assigned by now are not this process's.
    fn assignments_done(&self) {}

    /// The partition is being revoked: its reader stops, and once its last batch is in a
    /// checkpoint [`StageState::release`] follows, unless it is assigned again first.
    fn revoke(&self, _partition: &PartitionInfo) {}

    /// The partition left this process after a checkpoint that covers it: its memory can
    /// go (its state is in the checkpoint, for the next owner). A partition assigned again
    /// since its revoke is kept.
    fn release(&self, partition: &PartitionInfo);

    /// Writes everything changed since the last snapshot into the database. Called while no
    /// batch is being processed; the offsets are committed right after.
    fn snapshot(&self) -> Result<SnapshotStats>;

    /// Where the partition's state is kept in the database.
    fn partition_keys(&self, _partition: &str) -> PartitionKeys {
        PartitionKeys::default()
    }

    /// The partition's state in the database was replaced by a newer one (taken over from
    /// another process) while this process did not read it: what memory holds of it is
    /// dropped, so that [`StageState::assign`] reads the new state.
    fn forget(&self, _partition: &str) {}
}
