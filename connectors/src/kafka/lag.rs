//! A consumer group's lag as the broker sees it, the way KEDA's Kafka scaler reads it:
//! per partition of the subscribed topics, the log end offset minus the group's committed
//! offset (the whole retained partition when the group has committed nothing there).
//!
//! Used by `sluice run --processes auto`, which is not a member of the group: it only asks.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::{Error, Result};

use super::KafkaSourceConfig;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the lag of a pipeline's consumer group. Blocking: one metadata request, one
/// committed-offsets request and one log-end request per partition each time.
pub struct GroupLag {
    consumer: BaseConsumer<super::LoginContext>,
    topics: Vec<String>,
    pattern: Option<regex::Regex>,
    group: String,
}

/// The group's lag now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    /// Per partition (`topic/partition`), in order.
    pub partitions: Vec<(String, u64)>,
}

impl Lag {
    pub fn total(&self) -> u64 {
        self.partitions.iter().map(|(_, l)| l).sum()
    }
}

impl GroupLag {
    pub fn new(config: &KafkaSourceConfig) -> Result<Self> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false");
        // Security and network settings apply to this client too.
        for (k, v) in &config.client_options() {
            client.set(k, v);
        }
        let consumer = client
            .create_with_context(super::LoginContext)
            .map_err(|e| Error::External {
                system: "kafka",
                message: format!("creating a client to read the group's lag: {e}"),
            })?;
        let pattern = match &config.topic_pattern {
            Some(_) => {
                // The anchored form the consumer subscribes with.
                let anchored = config.subscription().remove(0);
                Some(
                    regex::Regex::new(&anchored)
                        .map_err(|e| Error::Plan(format!("topic_pattern `{anchored}`: {e}")))?,
                )
            }
            None => None,
        };
        Ok(GroupLag {
            consumer,
            topics: config.topics.clone(),
            pattern,
            group: config.group.clone(),
        })
    }

    /// Every partition's lag.
    pub fn read(&self) -> Result<Lag> {
        let failed = |doing: &str, e: rdkafka::error::KafkaError| Error::External {
            system: "kafka",
            message: format!("{doing} of group `{}`: {e}", self.group),
        };
        // Serves librdkafka's requests for a login token (AWS_MSK_IAM), which only a poll
        // answers; nothing is assigned to this client, so no record comes.
        let _ = self.consumer.poll(Duration::ZERO);
        let metadata = self
            .consumer
            .fetch_metadata(None, TIMEOUT)
            .map_err(|e| failed("reading topic metadata", e))?;
        let mut tpl = TopicPartitionList::new();
        for topic in metadata.topics() {
            let wanted = match &self.pattern {
                Some(p) => p.is_match(topic.name()),
                None => self.topics.iter().any(|t| t == topic.name()),
            };
            if wanted {
                for p in topic.partitions() {
                    tpl.add_partition(topic.name(), p.id());
                }
            }
        }
        let committed = self
            .consumer
            .committed_offsets(tpl.clone(), TIMEOUT)
            .map_err(|e| failed("reading the committed offsets", e))?;
        let mut partitions = Vec::with_capacity(tpl.count());
        for e in tpl.elements() {
            let (low, high) = watermarks(&self.consumer, e.topic(), e.partition(), TIMEOUT)
                .map_err(|err| failed("reading the log end offsets", err))?;
            let done = match committed
                .find_partition(e.topic(), e.partition())
                .map(|c| c.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            partitions.push((
                format!("{}/{}", e.topic(), e.partition()),
                (high - done).max(0) as u64,
            ));
        }
        Ok(Lag { partitions })
    }
}

/// A partition's log start and end offsets (low and high watermarks), asked of the broker
/// (`ListOffsets`). Brokers answer with the high watermark; tansu answers with the start of
/// the last record batch plus one, so the end is also taken from the high watermark of the
/// client's last fetch response when it has one (a partition it reads, not paused: the
/// lag of a paused partition can then be short by up to one producer batch, on tansu only).
pub(super) fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<(i64, i64)> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    Ok((
        low,
        high.max(fetched_high_watermark(consumer, topic, partition).unwrap_or(-1)),
    ))
}

/// The high watermark of the partition's last fetch response, as librdkafka caches it.
fn fetched_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic` is a C string
    // that outlives the call, and the out-pointers are to live locals. The call only reads
    // librdkafka's cache (no I/O) and is thread safe.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}
