//! The dead letters of a Kafka dead-letter topic, read back (`dlq inspect`, `dlq replay`),
//! and `replay --to-topic`: letters sent back to a topic with their keys and headers.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sluice_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig, LoginContext};
use sluice_engine::connector::{downcast_sink, downcast_source};
use sluice_engine::dead_letter::Header;

use super::{Letter, cut_reason, letter_from_row};
use crate::config::PipelineConfig;

pub(super) fn read_topic(
    bootstrap: &str,
    topic: &str,
    options: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<Letter>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer<LoginContext> = client(bootstrap, options)
        .set("group.id", "sluice-dlq-inspect")
        .set("enable.auto.commit", "false")
        .create_with_context(LoginContext)?;
    // Serves librdkafka's request for a login token (AWS_MSK_IAM) before the first call
    // that needs a connection; nothing is assigned yet, so no record comes.
    let _ = consumer.poll(Duration::ZERO);
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(t) = metadata.topics().first() else {
        bail!("no topic `{topic}`");
    };
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            ends.insert(p.id(), high);
        }
    }
    let mut letters = Vec::new();
    if ends.is_empty() {
        return Ok(letters);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Past the ends, what is there already is read too, until a poll finds nothing: a
    // broker may give an end short of the last record (tansu gives the last batch's first
    // offset, plus one).
    loop {
        if std::time::Instant::now() > deadline {
            if ends.is_empty() {
                break;
            }
            bail!("reading `{topic}` took too long");
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            if ends.is_empty() {
                break;
            }
            continue;
        };
        let m = m?;
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            ends.remove(&m.partition());
        }
        let mut row = serde_json::Map::new();
        let all: Vec<Header> = m.headers().map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|h| (h.key.into(), h.value.map(Into::into)))
                .collect()
        });
        // The record's own headers come first; the last header says how many there are
        // (a count that cannot be one, in a topic something else wrote: none).
        let own = match all.last() {
            Some((name, Some(count))) if &**name == "headers" => std::str::from_utf8(count)
                .ok()
                .and_then(|c| c.parse::<usize>().ok())
                .filter(|c| *c < all.len())
                .unwrap_or(0),
            _ => 0,
        };
        for (name, value) in &all[own..] {
            let value = String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned();
            let value = match &**name {
                "attempts" | "partition" | "offset" | "payload_size" => value
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(value)),
                _ => Value::String(value),
            };
            row.insert(name.to_string(), value);
        }
        let mut letter = letter_from_row(&Value::Object(row))?;
        letter.payload = m.payload().unwrap_or_default().to_vec();
        letter.key = m.key().map(<[u8]>::to_vec);
        letter.headers = all;
        letter.headers.truncate(own);
        letters.push(letter);
    }
    Ok(letters)
}

/// The pipeline's Kafka brokers: its source's, else its dead-letter sink's.
pub fn bootstrap_of(config: &PipelineConfig) -> Option<String> {
    kafka_client_of(config).map(|(bootstrap, _)| bootstrap)
}

/// The brokers and client properties (`tls:`, `sasl:`, `options:`) of the pipeline's Kafka
/// source, else of its Kafka dead-letter sink.
fn kafka_client_of(config: &PipelineConfig) -> Option<(String, BTreeMap<String, String>)> {
    if let Some(k) = downcast_source::<KafkaSourceConfig>(config.source.spec.as_ref()) {
        return Some((k.bootstrap_servers.clone(), k.client_options()));
    }
    let dead = config.dead_letter.as_ref()?;
    let k = downcast_sink::<KafkaSinkConfig>(dead.spec.as_ref())?;
    Some((k.bootstrap_servers.clone(), k.client_options()))
}

/// A client of `bootstrap` with the properties of `options` that say how to connect (TLS,
/// SASL): the pipeline's other client properties mean nothing to the clients `sluice dlq`
/// makes.
fn client(bootstrap: &str, options: &BTreeMap<String, String>) -> rdkafka::ClientConfig {
    let mut client = rdkafka::ClientConfig::new();
    for (k, v) in options {
        if sluice_connectors::kafka::is_security_property(k) {
            client.set(k, v);
        }
    }
    client.set("bootstrap.servers", bootstrap);
    client
}

/// How the pipeline connects to its brokers (`tls:`, `sasl:`, `options:` of its Kafka
/// source, else of its Kafka dead-letter sink), for `replay --to-topic`.
pub fn client_options_of(config: &PipelineConfig) -> BTreeMap<String, String> {
    kafka_client_of(config)
        .map(|(_, options)| options)
        .unwrap_or_default()
}

/// What a replay to a topic did.
#[derive(Debug, Default)]
pub struct SentBack {
    pub sent: usize,
    /// Letters whose payload was cut (not the record's bytes): not sent, they stay in the
    /// dead-letter sink.
    pub left_out: Vec<String>,
}

/// Sends the letters' original bytes, with their keys and headers, to a Kafka topic; not
/// those whose payload was cut.
pub fn replay_to_topic(
    letters: &[Letter],
    bootstrap: &str,
    topic: &str,
    options: &BTreeMap<String, String>,
) -> anyhow::Result<SentBack> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<LoginContext> = client(bootstrap, options)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(LoginContext)?;
    let mut back = SentBack::default();
    for l in letters {
        if l.payload_cut {
            back.left_out.push(cut_reason(l));
            continue;
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(&l.payload);
        if let Some(k) = &l.key {
            record = record.key(k);
        }
        if !l.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(l.headers.len());
            for (name, value) in &l.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            record = record.headers(headers);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context(format!("sending to `{topic}`")),
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .with_context(|| format!("waiting for `{topic}` to acknowledge"))?;
    back.sent = letters.len() - back.left_out.len();
    Ok(back)
}
