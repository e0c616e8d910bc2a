//! The Kafka source: a consumer group member whose partitions become Sluice partitions.
//!
//! # Threads
//! One thread owns the polling of the librdkafka consumer. It copies each message into the
//! buffer of its partition ([`PartitionBuffer`]: payloads back to back, offsets, keys,
//! timestamps, headers) and wakes the partition's reader; the reader, on the engine's
//! runtime, decodes a buffer's worth of payloads into one Arrow batch at a time. So decoding
//! runs in parallel across partitions and never holds up polling.
//!
//! A partition whose buffer is full (in messages or bytes) is paused in librdkafka and
//! resumed once its reader has caught up: memory stays bounded when the pipeline is slower
//! than the topic.
//!
//! # Rebalances
//! The group uses cooperative-sticky assignment: a rebalance only moves the partitions that
//! change owner. Rebalance callbacks run on the polling thread.
//! - **Assign**: each partition starts at the larger of its offset in this pipeline's
//!   checkpoint and the group's committed offset (both only ever hold offsets whose records
//!   are in the sink), else at `start_from`, resolved at the assignment to an offset (the
//!   log's start or end, or the first record at a time). Its reader is handed to the
//!   engine with that start, so the partition's lag is known before its first record.
//! - **Revoke**: the engine drains the partition (everything read goes through the stages
//!   into the sink, then a checkpoint commits its offset to RocksDB and to the group) and
//!   only then is the partition released. The next owner starts exactly where this one
//!   ended; nothing is read twice unless a process dies.
//!
//! # Offsets
//! Offsets are committed to the group from the checkpoint hook only, synchronously, as the
//! next offset to read. Auto-commit is off.
//!
//! # Where things are
//! Here: the source and the state its threads share. `threads.rs`: the polling and
//! log-end threads. `group.rs`: the rebalance callbacks and the commit hook. `buffer.rs`:
//! a partition's messages waiting for its reader. `reader.rs`: decoding them into batches.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, StringBuilder, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::datatypes::{Field, SchemaRef};
use async_trait::async_trait;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sluice_engine::batch::{self, Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::dead_letter::{DeadLetter, SOURCE_STAGE};
use sluice_engine::source::{Assignment, CommitHook, Handoff, LogEnd, PartitionReader, Source};
use sluice_engine::{Error, ErrorClass, Result};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{KafkaSourceConfig, StartFrom};
use crate::format::{Payloads, SourceFormat};

/// How long a revoke waits for the engine to drain a partition before letting it go
/// anyway (its records are then read again by the next owner: duplicates, not loss).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Broker round trips made inside a rebalance (committed offsets, offsets for times, the
/// logs' start and end).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing waits for the consumer to leave its group. librdkafka's close waits
/// for a rebalance in flight to end, which a broker can hold for the rebalance timeout
/// (minutes): the checkpoint is taken by then, so the process goes on without it and the
/// group drops the member when its session times out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// A partition's buffer pauses fetching beyond this many bytes.
const MAX_BUFFERED_BYTES: usize = 32 << 20;

type GroupConsumer = BaseConsumer<GroupContext>;

pub struct KafkaSource {
    config: KafkaSourceConfig,
    schema: SchemaRef,
    shared: Arc<GroupState>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Shared with the commit hook; taken at close.
    consumer: Arc<Mutex<Option<Arc<GroupConsumer>>>>,
    poller: Option<std::thread::JoinHandle<()>>,
    watermarks: Option<std::thread::JoinHandle<()>>,
}

enum Event {
    Assignment(Assignment),
    Failed(Error),
}

impl KafkaSource {
    /// Checks the configuration and settles the schema; connects on the first assignment.
    /// With `dead_letters`, messages that do not decode become dead letters; without, the
    /// first one stops the run.
    pub fn new(config: KafkaSourceConfig, batch_size: usize, dead_letters: bool) -> Result<Self> {
        let max_record = usize::try_from(config.max_record_size.0).unwrap_or(usize::MAX);
        let format = SourceFormat::open(&config.format_keys(), max_record)?;
        let records = format.records();
        let mut metadata = batch::metadata_fields_with(&[
            Field::new(batch::TOPIC, arrow::datatypes::DataType::Utf8, true),
            Field::new(batch::HEADERS, batch::headers_type(), true),
        ]);
        if config.key_format == super::KeyFormat::Bytes {
            for f in metadata.iter_mut().filter(|f| f.name() == batch::KEY) {
                *f = Field::new(batch::KEY, arrow::datatypes::DataType::Binary, true);
            }
        }
        let schema = batch::with_metadata_fields(&records, &metadata)?;
        let (tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(GroupState {
            format,
            schema: schema.clone(),
            start_from: config.start_from.clone(),
            batch_size: batch_size.max(1),
            dead_letters,
            checkpointed: Mutex::default(),
            checkpoint_first: AtomicBool::new(false),
            partitions: Mutex::default(),
            generation: AtomicU64::new(0),
            events: tx,
            resume: Mutex::default(),
            closing: AtomicBool::new(false),
            handoff: OnceLock::new(),
        });
        Ok(KafkaSource {
            config,
            schema,
            shared,
            events,
            consumer: Arc::default(),
            poller: None,
            watermarks: None,
        })
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "auto.offset.reset",
                match self.config.start_from {
                    StartFrom::Earliest => "earliest",
                    // A time with no record at or after it: the end, like `latest`.
                    StartFrom::Latest | StartFrom::Time(_) => "latest",
                },
            )
            .set("client.id", format!("sluice-{}", self.config.group))
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &self.config.client_options() {
            c.set(k, v);
        }
        c
    }

    /// Creates the consumer, subscribes, and starts the polling thread.
    fn start(&mut self) -> Result<()> {
        if self.poller.is_some() {
            return Ok(());
        }
        let context = GroupContext {
            shared: self.shared.clone(),
            bootstrap: self.config.bootstrap_servers.clone(),
            sasl: self.config.sasl.clone(),
            refused: AtomicBool::new(false),
        };
        let consumer: GroupConsumer = self
            .consumer_config()
            .create_with_context(context)
            .map_err(|e| kafka_error("creating the consumer", &e))?;
        let topics = self.config.subscription();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| kafka_error(&format!("subscribing to {topics:?}"), &e))?;
        let consumer = Arc::new(consumer);
        *self.consumer.lock().expect("consumer lock") = Some(consumer.clone());
        let shared = self.shared.clone();
        let polled = consumer.clone();
        let poller = std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || poll_loop(&polled, &shared))
            .map_err(|e| Error::External {
                system: "kafka",
                message: format!("cannot start the polling thread: {e}"),
            })?;
        self.poller = Some(poller);
        let shared = self.shared.clone();
        let watermarks = std::thread::Builder::new()
            .name("kafka-lag".into())
            .spawn(move || watermark_loop(&consumer, &shared))
            .map_err(|e| Error::External {
                system: "kafka",
                message: format!("cannot start the lag thread: {e}"),
            })?;
        self.watermarks = Some(watermarks);
        tracing::info!(group = %self.config.group, topics = ?topics, "kafka consumer started");
        Ok(())
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        for buffer in self
            .shared
            .partitions
            .lock()
            .expect("partitions lock")
            .live
            .values()
        {
            buffer.closed.store(true, Ordering::SeqCst);
            buffer.ready.notify_one();
        }
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        if let Some(watermarks) = self.watermarks.take() {
            let _ = watermarks.join();
        }
        if let Some(consumer) = self.consumer.lock().expect("consumer lock").take() {
            leave_group(consumer, &self.config.group);
        }
    }
}

/// Drops the consumer (it leaves the group: its last revoke, a LeaveGroup) on a thread of
/// its own, waiting at most [`CLOSE_TIMEOUT`] for it.
fn leave_group(consumer: Arc<GroupConsumer>, group: &str) {
    let (left, done) = std::sync::mpsc::channel();
    let closing = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = left.send(());
        });
    if closing.is_err() {
        tracing::warn!(
            group,
            "kafka: cannot start the closing thread; not leaving the group"
        );
        return;
    }
    if done.recv_timeout(CLOSE_TIMEOUT).is_err() {
        tracing::warn!(
            group,
            "kafka: leaving the consumer group did not finish in {CLOSE_TIMEOUT:?}; going on (the group drops this member when its session times out)"
        );
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn partition_hint(&self) -> usize {
        // Unknown until the group assigns; the engine caps workers at the cores.
        usize::MAX
    }

    fn restore(&mut self, checkpoint: Arc<Checkpoint>) {
        let mut known = self.shared.checkpointed.lock().expect("checkpointed lock");
        known.extend(checkpoint.offsets.iter().map(|(k, v)| (k.clone(), *v)));
        self.shared
            .checkpoint_first
            .store(checkpoint.fallback, Ordering::Relaxed);
    }

    fn commit_hook(&self) -> Option<Arc<dyn CommitHook>> {
        Some(Arc::new(GroupCommitter {
            consumer: self.consumer.clone(),
            shared: self.shared.clone(),
        }))
    }

    fn needs_checkpoints(&self) -> bool {
        true
    }

    fn set_handoff(&mut self, handoff: Arc<dyn Handoff>) {
        let _ = self.shared.handoff.set(handoff);
    }

    async fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        self.start()?;
        match self.events.recv().await {
            Some(Event::Assignment(a)) => Ok(Some(a)),
            Some(Event::Failed(e)) => Err(e),
            None => Ok(None),
        }
    }
}

fn kafka_error(doing: &str, e: &KafkaError) -> Error {
    Error::External {
        system: "kafka",
        message: format!("{doing}: {e}"),
    }
}

/// State shared by the source, the polling thread (and its rebalance callbacks), the
/// partition readers and the commit hook.
struct GroupState {
    /// How payloads decode: the reader schema and the writer schemas fetched so far.
    format: SourceFormat,
    schema: SchemaRef,
    start_from: StartFrom,
    batch_size: usize,
    /// Messages that do not decode become dead letters instead of stopping the run.
    dead_letters: bool,
    /// Per partition name, the next offset to read according to this pipeline's
    /// checkpoints (restored at start, then updated by every commit).
    checkpointed: Mutex<HashMap<String, i64>>,
    /// The restored checkpoint replaces a lost later one ([`Checkpoint::fallback`]): a
    /// partition starts at its checkpointed offset even where the group's is ahead (the
    /// group's moved on with the lost checkpoint, past state the restored one lacks).
    checkpoint_first: AtomicBool,
    partitions: Mutex<Partitions>,
    /// Changes with every rebalance, so the polling thread's cached buffer is re-checked.
    generation: AtomicU64,
    events: mpsc::UnboundedSender<Event>,
    /// Paused partitions whose readers have caught up.
    resume: Mutex<Vec<(Arc<str>, i32)>>,
    closing: AtomicBool,
    /// Brings a partition's state from another worker process before it is read.
    handoff: OnceLock<Arc<dyn Handoff>>,
}

#[derive(Default)]
struct Partitions {
    /// Sluice partition ids, stable for the life of the process.
    ids: HashMap<(String, i32), u32>,
    live: HashMap<(String, i32), Arc<PartitionBuffer>>,
    /// Revoked, being drained: still this member's to commit until released.
    draining: std::collections::HashSet<(String, i32)>,
}

fn partition_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// `topic/3` back to its parts (topic names cannot hold `/`).
fn parse_name(name: &str) -> Option<(&str, i32)> {
    let (topic, partition) = name.rsplit_once('/')?;
    Some((topic, partition.parse().ok()?))
}

mod buffer;
mod group;
mod reader;
mod threads;

use buffer::*;
use group::*;
use reader::*;
use threads::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            parse_name(&partition_name("views.v2", 11)),
            Some(("views.v2", 11))
        );
        assert_eq!(parse_name("data/x.jsonl"), None);
    }

    /// A partition starts at its offset while the log holds it, where librdkafka's reset
    /// goes once retention deleted it, and at `start_from` where the group has none; what
    /// the brokers did not answer is left to librdkafka.
    #[test]
    fn a_partition_starts_where_librdkafka_would_read_first() {
        let (earliest, latest) = (StartFrom::Earliest, StartFrom::Latest);
        let log = Some((100, 500));
        // An offset the log holds, its end included.
        assert_eq!(start_offset(Some(120), true, log, &earliest), Some(120));
        assert_eq!(start_offset(Some(500), true, log, &latest), Some(500));
        // Deleted by retention: the log's start, or its end.
        assert_eq!(start_offset(Some(40), true, log, &earliest), Some(100));
        assert_eq!(start_offset(Some(40), true, log, &latest), Some(500));
        // No offset anywhere.
        assert_eq!(start_offset(None, true, log, &earliest), Some(100));
        assert_eq!(start_offset(None, true, log, &latest), Some(500));
        let time = StartFrom::read("2026-01-01T00:00:00Z", "earliest").unwrap();
        assert_eq!(start_offset(None, true, log, &time), Some(500));
        // Unanswered: the group's offset, or the log's bounds.
        assert_eq!(start_offset(None, false, log, &earliest), None);
        assert_eq!(start_offset(None, true, None, &earliest), None);
        assert_eq!(start_offset(Some(40), true, None, &earliest), Some(40));
    }
}
