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
//!   are in the sink), else at `start_from`. Its reader is handed to the engine.
//! - **Revoke**: the engine drains the partition (everything read goes through the stages
//!   into the sink, then a checkpoint commits its offset to RocksDB and to the group) and
//!   only then is the partition released. The next owner starts exactly where this one
//!   ended; nothing is read twice unless a process dies.
//!
//! # Offsets
//! Offsets are committed to the group from the checkpoint hook only, synchronously, as the
//! next offset to read. Auto-commit is off.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Array, MapBuilder, MapFieldNames, RecordBatch, StringArray,
    StringBuilder, TimestampMillisecondArray, UInt32Array,
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
use crate::json::JsonDecoder;

/// How long a revoke waits for the engine to drain a partition before letting it go
/// anyway (its records are then read again by the next owner: duplicates, not loss).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Broker round trips made inside a rebalance (committed offsets, offsets for times).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A partition's buffer pauses fetching beyond this many bytes.
const MAX_BUFFERED_BYTES: usize = 32 << 20;

type GroupConsumer = BaseConsumer<GroupContext>;

pub struct KafkaSource {
    config: KafkaSourceConfig,
    schema: SchemaRef,
    shared: Arc<GroupState>,
    events: mpsc::UnboundedReceiver<Event>,
    consumer: Arc<OnceLock<Arc<GroupConsumer>>>,
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
        let records = config.schema.to_arrow();
        let schema = batch::with_metadata_fields(
            &records,
            &batch::metadata_fields_with(&[
                Field::new(batch::TOPIC, arrow::datatypes::DataType::Utf8, true),
                Field::new(batch::HEADERS, batch::headers_type(), true),
            ]),
        )?;
        let (tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(GroupState {
            records,
            schema: schema.clone(),
            start_from: config.start_from.clone(),
            batch_size: batch_size.max(1),
            max_record: usize::try_from(config.max_record_size.0).unwrap_or(usize::MAX),
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
        let _ = self.consumer.set(consumer.clone());
        let shared = self.shared.clone();
        let polled = consumer.clone();
        let poller = std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || poll_loop(&polled, &shared))
            .map_err(|e| Error::Internal(format!("starting the Kafka polling thread: {e}")))?;
        self.poller = Some(poller);
        let shared = self.shared.clone();
        let watermarks = std::thread::Builder::new()
            .name("kafka-lag".into())
            .spawn(move || watermark_loop(&consumer, &shared))
            .map_err(|e| Error::Internal(format!("starting the Kafka lag thread: {e}")))?;
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
    records: SchemaRef,
    schema: SchemaRef,
    start_from: StartFrom,
    batch_size: usize,
    /// The largest payload decoded (`max_record_size`).
    max_record: usize,
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

fn poll_loop(consumer: &GroupConsumer, shared: &GroupState) {
    let mut cached: Option<(u64, Arc<PartitionBuffer>)> = None;
    let mut last_warning: Option<Instant> = None;
    while !shared.closing.load(Ordering::SeqCst) {
        resume_caught_up(consumer, shared);
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let _ = shared.events.send(Event::Failed(Error::External {
                        system: "kafka",
                        message: format!("the consumer failed for good: {code:?}: {reason}"),
                    }));
                    return;
                }
                // Brokers down, topics not there yet: librdkafka retries by itself.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "kafka consumer (retrying)");
                    last_warning = Some(Instant::now());
                }
                continue;
            }
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        let buffer = match &cached {
            Some((g, b))
                if *g == generation
                    && b.partition == message.partition()
                    && *b.topic == *message.topic() =>
            {
                b.clone()
            }
            _ => {
                let key = (message.topic().to_string(), message.partition());
                let live = shared.partitions.lock().expect("partitions lock");
                match live.live.get(&key) {
                    Some(b) => {
                        cached = Some((generation, b.clone()));
                        b.clone()
                    }
                    None => {
                        // Revoked while in flight: the next owner reads it.
                        continue;
                    }
                }
            }
        };
        if buffer.push(&message) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&buffer.topic, buffer.partition);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(partition = %buffer.info.name, error = %e, "cannot pause");
            }
        }
    }
}

/// How often the partitions' log end offsets are asked for.
const WATERMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps each owned partition's log end offset (high watermark) current, from the broker:
/// the offsets librdkafka caches come with fetches, and a paused partition is not fetched.
/// The engine's lag is this minus the committed offset, what consumer group tools show.
fn watermark_loop(consumer: &GroupConsumer, shared: &GroupState) {
    let mut last_warning: Option<Instant> = None;
    while !shared.closing.load(Ordering::SeqCst) {
        let started = Instant::now();
        let live: Vec<Arc<PartitionBuffer>> = shared
            .partitions
            .lock()
            .expect("partitions lock")
            .live
            .values()
            .cloned()
            .collect();
        for buffer in live {
            if shared.closing.load(Ordering::SeqCst) {
                return;
            }
            match super::lag::watermarks(consumer, &buffer.topic, buffer.partition, LOOKUP_TIMEOUT)
            {
                Ok((low, high)) => {
                    buffer.log_end.low.store(low, Ordering::Relaxed);
                    buffer.log_end.high.store(high, Ordering::Relaxed);
                }
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(partition = %buffer.info.name, error = %e, "kafka: reading the log end offset failed (lag not updated)");
                        last_warning = Some(Instant::now());
                    }
                }
            }
        }
        // Sleeps in short steps so that closing is not held up.
        while started.elapsed() < WATERMARK_INTERVAL && !shared.closing.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A partition's log start and end offsets as last read from the broker; -1 before the
/// first read.
struct Watermarks {
    low: AtomicI64,
    high: AtomicI64,
}

impl LogEnd for Watermarks {
    fn log_end(&self) -> Option<i64> {
        let high = self.high.load(Ordering::Relaxed);
        (high >= 0).then_some(high)
    }

    fn log_start(&self) -> Option<i64> {
        let low = self.low.load(Ordering::Relaxed);
        (low >= 0).then_some(low)
    }
}

fn resume_caught_up(consumer: &GroupConsumer, shared: &GroupState) {
    let resume = std::mem::take(&mut *shared.resume.lock().expect("resume lock"));
    if resume.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in &resume {
        tpl.add_partition(topic, *partition);
    }
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(error = %e, "cannot resume partitions");
    }
}

/// Receives the consumer's callbacks on the polling thread.
struct GroupContext {
    shared: Arc<GroupState>,
    /// For the sentence that stops the run when the brokers refuse the client.
    bootstrap: String,
    sasl: Option<Box<super::KafkaSasl>>,
    refused: AtomicBool,
}

impl ClientContext for GroupContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log(level, fac, message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        super::security::oauth_token(config)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::client_error(&error, reason);
        // Refused credentials or an untrusted certificate: no retry cures them.
        if let Some(message) =
            super::security::refusal(&error, reason, &self.bootstrap, self.sasl.as_deref())
            && !self.refused.swap(true, Ordering::SeqCst)
        {
            let _ = self.shared.events.send(Event::Failed(Error::Refused {
                system: "kafka",
                message,
            }));
        }
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &GroupConsumer,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Without its state a partition is not read: the run stops on the error.
                if self.set_start_offsets(consumer, tpl) {
                    self.hand_out(tpl);
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "kafka: assigning partitions failed");
                }
                // librdkafka keeps a pause across revoke and assign: a partition this member
                // paused before it lost it would come back paused, with a fresh buffer that
                // never asks for a resume.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "kafka: resuming assigned partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.drain(tpl, consumer.assignment_lost());
                let released = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = released {
                    tracing::error!(error = %e, "kafka: releasing partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "kafka: rebalance failed; releasing partitions");
                self.drain(tpl, true);
                let _ = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
            }
        }
    }
}

impl GroupContext {
    /// Sets where each newly assigned partition starts (see the module documentation).
    /// False when the partitions' state could not be taken over (the run is stopping).
    fn set_start_offsets(&self, consumer: &GroupConsumer, tpl: &mut TopicPartitionList) -> bool {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // A partition whose newest state another worker process committed starts exactly
        // where that state is (its offset is in that process's checkpoint, and in the
        // group's unless the group commit failed).
        let mut taken: HashMap<(String, i32), i64> = HashMap::new();
        if let Some(handoff) = self.shared.handoff.get() {
            let names: Vec<String> = parts.iter().map(|(t, p)| partition_name(t, *p)).collect();
            match handoff.take_over(&names) {
                Ok(offsets) => {
                    let mut known = self.shared.checkpointed.lock().expect("checkpointed lock");
                    for (name, offset) in offsets {
                        if let Some((topic, partition)) = parse_name(&name) {
                            taken.insert((topic.to_string(), partition), offset);
                        }
                        known.insert(name, offset);
                    }
                }
                Err(e) => {
                    let _ = self.shared.events.send(Event::Failed(e));
                    return false;
                }
            }
        }
        let checkpointed: HashMap<(String, i32), i64> = {
            let known = self.shared.checkpointed.lock().expect("checkpointed lock");
            parts
                .iter()
                .filter_map(|(t, p)| Some(((t.clone(), *p), *known.get(&partition_name(t, *p))?)))
                .collect()
        };
        let by_time = matches!(self.shared.start_from, StartFrom::Time(_));
        if checkpointed.is_empty() && !by_time {
            // librdkafka starts at the committed offset, else at auto.offset.reset.
            return true;
        }
        let committed = match consumer.committed_offsets(tpl.clone(), LOOKUP_TIMEOUT) {
            Ok(c) => c.to_topic_map(),
            Err(e) => {
                tracing::warn!(error = %e, "kafka: reading committed offsets failed; using the checkpoint");
                HashMap::new()
            }
        };
        let checkpoint_first = self.shared.checkpoint_first.load(Ordering::Relaxed);
        let mut unknown = Vec::new();
        for (topic, partition) in &parts {
            let key = (topic.clone(), *partition);
            let group = match committed.get(&key) {
                Some(Offset::Offset(o)) => Some(*o),
                _ => None,
            };
            let start = taken
                .get(&key)
                .copied()
                .or(match (checkpointed.get(&key), group) {
                    (Some(c), Some(_)) if checkpoint_first => Some(*c),
                    (Some(c), Some(g)) => Some((*c).max(g)),
                    (Some(c), None) => Some(*c),
                    (None, Some(g)) => Some(g),
                    (None, None) => None,
                });
            match start {
                Some(o) => {
                    let _ = tpl.set_partition_offset(topic, *partition, Offset::Offset(o));
                }
                None => unknown.push(key),
            }
        }
        if let (StartFrom::Time(ms), false) = (&self.shared.start_from, unknown.is_empty()) {
            let mut times = TopicPartitionList::new();
            for (t, p) in &unknown {
                let _ = times.add_partition_offset(t, *p, Offset::Offset(*ms));
            }
            match consumer.offsets_for_times(times, LOOKUP_TIMEOUT) {
                Ok(found) => {
                    for e in found.elements() {
                        let _ = tpl.set_partition_offset(e.topic(), e.partition(), e.offset());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "kafka: offsets for start_from time failed"),
            }
        }
        true
    }

    /// Creates a buffer per new partition and hands its reader to the engine.
    fn hand_out(&self, tpl: &TopicPartitionList) {
        let mut partitions = self.shared.partitions.lock().expect("partitions lock");
        for e in tpl.elements() {
            let key = (e.topic().to_string(), e.partition());
            let next_id = partitions.ids.len() as u32;
            let id = *partitions.ids.entry(key.clone()).or_insert(next_id);
            let buffer = Arc::new(PartitionBuffer::new(
                Arc::new(PartitionInfo {
                    id,
                    name: partition_name(e.topic(), e.partition()).into(),
                }),
                e.topic().into(),
                e.partition(),
                self.shared.batch_size,
            ));
            partitions.live.insert(key, buffer.clone());
            let reader = KafkaReader {
                decoder: JsonDecoder::new(self.shared.records.clone())
                    .with_max_record(self.shared.max_record),
                schema: self.shared.schema.clone(),
                buffer,
                shared: self.shared.clone(),
                start: match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            };
            tracing::info!(partition = %reader.buffer.info.name, "kafka partition assigned");
            let _ = self
                .shared
                .events
                .send(Event::Assignment(Assignment::Assign(Box::new(reader))));
        }
    }

    /// Revokes the partitions and waits until the engine has drained and checkpointed them.
    fn drain(&self, tpl: &TopicPartitionList, lost: bool) {
        let mut waits = Vec::new();
        {
            let mut partitions = self.shared.partitions.lock().expect("partitions lock");
            for e in tpl.elements() {
                let key = (e.topic().to_string(), e.partition());
                let Some(buffer) = partitions.live.remove(&key) else {
                    continue;
                };
                partitions.draining.insert(key);
                // The reader keeps its buffer until the engine stops it: what it has taken
                // is processed; what is left is the next owner's to read.
                let (done, drained) = oneshot::channel();
                let revoke = Assignment::Revoke {
                    partition: buffer.info.id,
                    drained: Some(done),
                };
                if self.shared.events.send(Event::Assignment(revoke)).is_ok() {
                    waits.push((buffer.info.name.clone(), drained));
                }
            }
        }
        if self.shared.closing.load(Ordering::SeqCst) {
            // Shutting down: the engine has already drained and taken its last checkpoint.
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for (name, mut drained) in waits {
            loop {
                match drained.try_recv() {
                    Ok(()) | Err(oneshot::error::TryRecvError::Closed) => break,
                    // The source is closing (the engine has stopped): nothing will drain.
                    Err(oneshot::error::TryRecvError::Empty)
                        if self.shared.closing.load(Ordering::SeqCst) =>
                    {
                        break;
                    }
                    Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        tracing::warn!(partition = %name, "kafka: partition not drained in time; releasing it (the next owner reads its last records again)");
                        break;
                    }
                }
            }
            tracing::info!(partition = %name, lost, "kafka partition revoked");
        }
        let mut partitions = self.shared.partitions.lock().expect("partitions lock");
        for e in tpl.elements() {
            partitions
                .draining
                .remove(&(e.topic().to_string(), e.partition()));
        }
    }
}

/// Commits the group's offsets after each checkpoint.
struct GroupCommitter {
    consumer: Arc<OnceLock<Arc<GroupConsumer>>>,
    shared: Arc<GroupState>,
}

impl CommitHook for GroupCommitter {
    fn committed(&self, checkpoint: &Checkpoint) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut known = self.shared.checkpointed.lock().expect("checkpointed lock");
            let partitions = self.shared.partitions.lock().expect("partitions lock");
            for (name, offset) in &checkpoint.offsets {
                known.insert(name.clone(), *offset);
                // Only partitions this member owns: one released after a drain timed out
                // may have moved on under its new owner.
                let owned = |key: &(String, i32)| {
                    partitions.live.contains_key(key) || partitions.draining.contains(key)
                };
                if let Some((topic, partition)) = parse_name(name)
                    && owned(&(topic.to_string(), partition))
                {
                    let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(*offset));
                }
            }
        }
        let Some(consumer) = self.consumer.get() else {
            return;
        };
        if tpl.count() == 0 {
            return;
        }
        // The checkpoint is durable already; a failed group commit only means a restart
        // without this checkpoint store begins a little earlier.
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "kafka: committing group offsets failed");
        }
    }
}

/// Messages of one partition waiting for its reader, in chunks of at most a batch.
struct PartitionBuffer {
    info: Arc<PartitionInfo>,
    topic: Arc<str>,
    partition: i32,
    chunk_size: usize,
    queue: Mutex<Queue>,
    ready: Notify,
    /// The partition was revoked or the source is closing: no more messages come.
    closed: AtomicBool,
    log_end: Arc<Watermarks>,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    messages: usize,
    bytes: usize,
    paused: bool,
}

impl PartitionBuffer {
    fn new(info: Arc<PartitionInfo>, topic: Arc<str>, partition: i32, chunk_size: usize) -> Self {
        PartitionBuffer {
            info,
            topic,
            partition,
            chunk_size,
            queue: Mutex::default(),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            log_end: Arc::new(Watermarks {
                low: AtomicI64::new(-1),
                high: AtomicI64::new(-1),
            }),
        }
    }

    /// Adds a message; true when the partition should be paused now.
    fn push(&self, message: &BorrowedMessage<'_>) -> bool {
        let pause = {
            let mut q = self.queue.lock().expect("queue lock");
            if q.chunks.back().is_none_or(|c| c.len() >= self.chunk_size) {
                q.chunks.push_back(Chunk::default());
            }
            let chunk = q.chunks.back_mut().expect("a chunk");
            let bytes = chunk.push(message);
            q.messages += 1;
            q.bytes += bytes;
            let full = q.messages >= 4 * self.chunk_size || q.bytes >= MAX_BUFFERED_BYTES;
            let pause = full && !q.paused;
            q.paused |= pause;
            pause
        };
        self.ready.notify_one();
        pause
    }

    /// Up to `max` messages, oldest first; asks for a resume when a paused partition has
    /// room again.
    fn take(&self, max: usize, shared: &GroupState) -> Option<Chunk> {
        let mut q = self.queue.lock().expect("queue lock");
        let front = q.chunks.front_mut()?;
        let chunk = if front.len() <= max {
            q.chunks.pop_front().expect("a chunk")
        } else {
            front.split_front(max)
        };
        q.messages -= chunk.len();
        q.bytes -= chunk.bytes();
        if q.paused && q.messages <= self.chunk_size && q.bytes < MAX_BUFFERED_BYTES / 2 {
            q.paused = false;
            shared
                .resume
                .lock()
                .expect("resume lock")
                .push((self.topic.clone(), self.partition));
        }
        Some(chunk)
    }
}

/// A header's name and value.
type HeaderPair = (Box<str>, Option<Box<[u8]>>);

/// Messages stored column by column, as they will be decoded.
#[derive(Default)]
struct Chunk {
    payloads: Vec<u8>,
    payload_ends: Vec<usize>,
    offsets: Vec<i64>,
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    has_key: Vec<bool>,
    timestamps: Vec<Option<i64>>,
    /// Headers of all messages, and where each message's headers end.
    headers: Vec<HeaderPair>,
    header_ends: Vec<usize>,
}

impl Chunk {
    fn len(&self) -> usize {
        self.offsets.len()
    }

    fn bytes(&self) -> usize {
        self.payloads.len() + self.keys.len()
    }

    /// Appends a message; returns the bytes it added.
    fn push(&mut self, m: &BorrowedMessage<'_>) -> usize {
        let payload = m.payload().unwrap_or_default();
        self.payloads.extend_from_slice(payload);
        self.payload_ends.push(self.payloads.len());
        self.offsets.push(m.offset());
        let key = m.key();
        self.keys.extend_from_slice(key.unwrap_or_default());
        self.key_ends.push(self.keys.len());
        self.has_key.push(key.is_some());
        self.timestamps.push(m.timestamp().to_millis());
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                self.headers.push((
                    String::from_utf8_lossy(h.key.as_bytes()).into(),
                    h.value.map(Into::into),
                ));
            }
        }
        self.header_ends.push(self.headers.len());
        payload.len() + key.map_or(0, <[u8]>::len)
    }

    fn range(ends: &[usize], i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { ends[i - 1] };
        start..ends[i]
    }

    fn payload(&self, i: usize) -> &[u8] {
        &self.payloads[Self::range(&self.payload_ends, i)]
    }

    fn key(&self, i: usize) -> Option<&[u8]> {
        self.has_key[i].then(|| &self.keys[Self::range(&self.key_ends, i)])
    }

    /// The chunk without the messages at `drop` (ascending): metadata of the rows kept.
    fn without(&self, drop: &[usize]) -> Chunk {
        let mut kept = Chunk::default();
        let mut skip = drop.iter().peekable();
        for i in 0..self.len() {
            if skip.peek() == Some(&&i) {
                skip.next();
                continue;
            }
            kept.payload_ends.push(0);
            kept.offsets.push(self.offsets[i]);
            let key = self.key(i);
            kept.keys.extend_from_slice(key.unwrap_or_default());
            kept.key_ends.push(kept.keys.len());
            kept.has_key.push(key.is_some());
            kept.timestamps.push(self.timestamps[i]);
            kept.headers
                .extend_from_slice(&self.headers[Self::range(&self.header_ends, i)]);
            kept.header_ends.push(kept.headers.len());
        }
        kept
    }

    /// Splits off the first `n` messages.
    fn split_front(&mut self, n: usize) -> Chunk {
        fn split_ends(ends: &mut Vec<usize>, n: usize) -> (Vec<usize>, usize) {
            let cut = ends[n - 1];
            let front = ends.drain(..n).collect();
            for e in ends.iter_mut() {
                *e -= cut;
            }
            (front, cut)
        }
        let (payload_ends, cut) = split_ends(&mut self.payload_ends, n);
        let payloads = self.payloads.drain(..cut).collect();
        let (key_ends, cut) = split_ends(&mut self.key_ends, n);
        let keys = self.keys.drain(..cut).collect();
        let (header_ends, cut) = split_ends(&mut self.header_ends, n);
        let headers = self.headers.drain(..cut).collect();
        Chunk {
            payloads,
            payload_ends,
            offsets: self.offsets.drain(..n).collect(),
            keys,
            key_ends,
            has_key: self.has_key.drain(..n).collect(),
            timestamps: self.timestamps.drain(..n).collect(),
            headers,
            header_ends,
        }
    }
}

/// Reads one partition's buffer and decodes it into batches.
struct KafkaReader {
    decoder: JsonDecoder,
    schema: SchemaRef,
    buffer: Arc<PartitionBuffer>,
    shared: Arc<GroupState>,
    /// Where the assignment starts it, when set here (not left to the group's offset).
    start: Option<i64>,
}

impl KafkaReader {
    fn envelope(&mut self, chunk: Chunk) -> Result<Envelope> {
        if self.shared.dead_letters {
            return self.envelope_keeping_bad(chunk);
        }
        let chunk = &chunk;
        let n = chunk.len();
        let records = self
            .decoder
            .decode((0..n).map(|i| chunk.payload(i)))
            .map_err(|e| {
                let at = match e.index {
                    Some(i) => format!("offset {}", chunk.offsets[i]),
                    None => format!("offsets {}..={}", chunk.offsets[0], chunk.offsets[n - 1]),
                };
                Error::BadRecord {
                    origin: format!(
                        "topic `{}` partition {} {at}",
                        self.buffer.topic, self.buffer.partition
                    ),
                    reason: e.reason,
                }
            })?;
        let offsets = chunk.offsets[0]..chunk.offsets[n - 1] + 1;
        self.assemble(records, chunk, offsets, Vec::new())
    }

    /// Decoded records of `chunk` with their metadata columns, for the offset range read.
    fn assemble(
        &self,
        records: RecordBatch,
        chunk: &Chunk,
        offsets: std::ops::Range<i64>,
        dead: Vec<DeadLetter>,
    ) -> Result<Envelope> {
        let mut columns = records.columns().to_vec();
        columns.extend(self.metadata(chunk));
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Error::arrow("attaching Kafka metadata columns", e))?;
        Ok(Envelope {
            partition: self.buffer.info.clone(),
            offsets,
            batch,
            dead,
        })
    }

    /// Decodes what decodes; each message that does not becomes a dead letter with its
    /// original bytes.
    fn envelope_keeping_bad(&mut self, chunk: Chunk) -> Result<Envelope> {
        let n = chunk.len();
        let payloads: Vec<&[u8]> = (0..n).map(|i| chunk.payload(i)).collect();
        let (records, bad) = self.decoder.decode_each(&payloads);
        let records = records.map_err(|e| {
            Error::Internal(format!("decoding records that decoded alone: {}", e.reason))
        })?;
        let offsets = chunk.offsets[0]..chunk.offsets[n - 1] + 1;
        let mut dead = Vec::with_capacity(bad.len());
        let now = sluice_engine::dead_letter::now_ms();
        for (i, reason) in &bad {
            dead.push(DeadLetter {
                stage: SOURCE_STAGE.into(),
                class: ErrorClass::Decode,
                reason: reason.clone(),
                attempts: 1,
                partition: self.buffer.info.clone(),
                offset: Some(chunk.offsets[*i]),
                key: chunk
                    .key(*i)
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                first_failed_at: now,
                last_failed_at: now,
                payload: payloads[*i].to_vec(),
            });
        }
        let chunk = if bad.is_empty() {
            chunk
        } else {
            let bad: Vec<usize> = bad.iter().map(|b| b.0).collect();
            chunk.without(&bad)
        };
        self.assemble(records, &chunk, offsets, dead)
    }

    /// `_partition _offset _key _timestamp _topic _headers`
    fn metadata(&self, chunk: &Chunk) -> [ArrayRef; 6] {
        let n = chunk.len();
        let mut keys = StringBuilder::with_capacity(n, chunk.keys.len());
        for i in 0..n {
            if chunk.has_key[i] {
                let key = &chunk.keys[Chunk::range(&chunk.key_ends, i)];
                match std::str::from_utf8(key) {
                    Ok(k) => keys.append_value(k),
                    Err(_) => keys.append_value(String::from_utf8_lossy(key)),
                }
            } else {
                keys.append_null();
            }
        }
        let names = MapFieldNames {
            entry: "entries".into(),
            key: "keys".into(),
            value: "values".into(),
        };
        let mut headers = MapBuilder::new(Some(names), StringBuilder::new(), BinaryBuilder::new());
        for i in 0..n {
            for (k, v) in &chunk.headers[Chunk::range(&chunk.header_ends, i)] {
                headers.keys().append_value(k);
                match v {
                    Some(v) => headers.values().append_value(v),
                    None => headers.values().append_null(),
                }
            }
            headers
                .append(true)
                .expect("keys and values appended in pairs");
        }
        let topic: &str = &self.buffer.topic;
        [
            Arc::new(UInt32Array::from_value(self.buffer.info.id, n)),
            Arc::new(Int64Array::from(chunk.offsets.clone())),
            Arc::new(keys.finish()),
            Arc::new(
                TimestampMillisecondArray::from(chunk.timestamps.clone()).with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(topic, n))),
            Arc::new(headers.finish()),
        ]
    }
}

#[async_trait]
impl PartitionReader for KafkaReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.buffer.info
    }

    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        Some(self.buffer.log_end.clone())
    }

    fn start_offset(&self) -> Option<i64> {
        self.start
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        loop {
            if let Some(chunk) = self.buffer.take(max.max(1), &self.shared) {
                return self.envelope(chunk).map(Some);
            }
            if self.buffer.closed.load(Ordering::SeqCst) {
                return Ok(None);
            }
            // Cancel safe: nothing is taken until a chunk is there.
            self.buffer.ready.notified().await;
        }
    }
}

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
}
