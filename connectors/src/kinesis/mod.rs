//! Kinesis data streams: a source that reads a stream's shards as partitions and follows
//! them through splits and merges, and a sink that writes rows with PutRecords.
//!
//! # Shards and positions
//! A shard is a partition named `stream/shardId-000000000001`. Its records get offsets
//! counted by the engine from the first record this pipeline read (`_offset`); the exact
//! sequence number is `_sequence` (text: sequence numbers have up to 56 digits, more than
//! any integer column holds). Each checkpoint commits, with a shard's offset, the sequence
//! number to resume after (`position.rs`), so a restart goes on with
//! `AFTER_SEQUENCE_NUMBER` and loses nothing, whenever the process died.
//!
//! # Resharding
//! Shards are listed every `discover_every`. A child of a split or merge is read once its
//! parents have been read to their end and their last records checkpointed (`shards.rs`):
//! the reader of a shard at its end tells the source, which revokes the shard; the engine
//! drains it (its records through the stages into the sink, then a checkpoint) and only
//! then does the source start the children. Records of a key stay in order, as the KCL
//! keeps them.
//!
//! A window open while its shard splits or merges waits for the children's records: the
//! shard's end reaches the stages as a partition that continues (its children are read
//! here next), not as an end that closes its windows.
//!
//! # Worker processes
//! `sluice worker` processes share a stream's shards through leases kept in the shared
//! checkpoint directory, with the KCL's rules (`lease.rs`: owner, renewal counter, expiry
//! by the taker's clock, checkpoint, parents; balancing by asking for a lease, which the
//! owner hands over after draining and checkpointing the shard). `members.rs` is the
//! source's side: passes over the table in a task of their own, state taken over before a
//! taken shard is read, checkpoints written into the leases.
//!
//! # Calls
//! GetRecords is paced within a shard's limits (5 calls a second, 2 MiB a second);
//! throttling and outages are retried with exponential backoff and jitter (`retry.rs`); an
//! expired iterator is renewed after the last record fetched. Records aggregated by the
//! Kinesis Producer Library are split into their user records (`kpl.rs`).
//!
//! # Where things are
//! `config.rs`: the YAML and the SDK client. `source.rs`: listing and assigning shards.
//! `lease.rs`, `members.rs`: leases for worker processes.
//! `reader.rs`: a shard's fetch task and its batches. `sink.rs`: PutRecords.

mod config;
pub mod kpl;
mod lease;
mod members;
mod position;
mod reader;
mod retry;
mod shards;
mod sink;
mod source;

pub use config::{ClientConfig, KinesisSinkConfig, KinesisSourceConfig, StartFrom, StreamRef};
pub use members::LeaseLag;
pub use sink::KinesisSink;
pub use source::KinesisSource;
