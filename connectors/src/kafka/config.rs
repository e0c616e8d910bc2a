use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::config::{ByteSize, Location, Node, Problems};

use super::security::{self, KafkaSasl, KafkaTls};
use crate::format::{SinkKeys, SourceKeys};
pub use crate::stream::{MessageFormat, StartFrom};

/// Reads JSON records from Kafka topics as a member of a consumer group.
///
/// ```yaml
/// source:
///   type: kafka
///   bootstrap_servers: ${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
///   topics: [views]
///   group: views-enricher
///   start_from: earliest
///   schema:
///     - { name: user_id, type: int64, nullable: false }
/// ```
///
/// Each topic partition is a Sluice partition named `topic/N`. Offsets are committed to
/// the group only after a checkpoint, so the group's offset is always the next record to
/// read and never runs ahead of what the sink holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Brokers to connect to first, `host:port[,host:port]`.
    pub bootstrap_servers: String,
    /// Topics to read. Give this or `topic_pattern`.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression: every matching topic is read, including ones created later.
    pub topic_pattern: Option<String>,
    /// The consumer group: processes with the same group split the partitions.
    pub group: String,
    /// Where a partition with no checkpoint and no committed offset starts: `earliest`,
    /// `latest` (default), or an RFC 3339 time (the first record at or after it).
    #[serde(default)]
    pub start_from: StartFrom,
    /// The payload format: `json` (one JSON object per message, the default), `avro`
    /// (Confluent-framed, with `avro:`) or `debezium` (change events; `schema` is the
    /// table's columns, see [`crate::debezium`]).
    #[serde(default)]
    pub format: MessageFormat,
    /// The records' fields (JSON); payloads are decoded straight into them.
    #[serde(default)]
    pub schema: SchemaSpec,
    /// `format: avro`: the reader schema and the schema registry (see [`crate::avro`]).
    pub avro: Option<crate::avro::AvroConfig>,
    /// `format: protobuf`: the `.proto`, the message type, and the registry if framed.
    pub protobuf: Option<crate::protobuf::ProtobufConfig>,
    /// `format: debezium`: what tombstones become.
    pub debezium: Option<crate::debezium::DebeziumConfig>,
    /// The largest message accepted (default 16MiB); a larger one is a bad record (a dead
    /// letter naming this limit), never decoded.
    #[serde(default = "default_max_record")]
    pub max_record_size: ByteSize,
    /// What `_key` holds: the key as text (`text`, the default; bytes that are not UTF-8
    /// become U+FFFD), or its bytes as they are (`bytes`: a binary column, for keys such as
    /// a registry-framed Avro key that a sink keyed by `_key` must send on unchanged).
    #[serde(default)]
    pub key_format: KeyFormat,
    /// An encrypted connection (see [`KafkaTls`]).
    pub tls: Option<KafkaTls>,
    /// A SASL login (see [`KafkaSasl`]).
    pub sasl: Option<Box<KafkaSasl>>,
    /// librdkafka consumer properties, passed through (`fetch.min.bytes: "1"`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// The type of a Kafka source's `_key` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    #[default]
    Text,
    Bytes,
}

fn default_max_record() -> ByteSize {
    ByteSize(16 << 20)
}

impl KafkaSourceConfig {
    /// The librdkafka properties of `tls`, `sasl` and `options`.
    pub fn client_options(&self) -> BTreeMap<String, String> {
        security::client_options(self.tls.as_ref(), self.sasl.as_deref(), &self.options)
    }

    /// The keys that say how payloads read.
    pub fn format_keys(&self) -> SourceKeys<'_> {
        SourceKeys {
            format: self.format,
            schema: &self.schema,
            avro: self.avro.as_ref(),
            protobuf: self.protobuf.as_ref(),
            debezium: self.debezium.as_ref(),
            subjects: self.topics.clone(),
        }
    }

    /// What librdkafka subscribes to: the topics, or the pattern (librdkafka reads a
    /// subscription starting with `^` as a regular expression).
    pub fn subscription(&self) -> Vec<String> {
        match &self.topic_pattern {
            Some(p) if p.starts_with('^') => vec![p.clone()],
            Some(p) => vec![format!("^{p}")],
            None => self.topics.clone(),
        }
    }
}

/// Writes each row as a message to a Kafka topic: a JSON object, or Avro through a schema
/// registry (`format: avro`, see [`crate::avro::AvroSinkConfig`]).
///
/// ```yaml
/// sink:
///   type: kafka
///   bootstrap_servers: ${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
///   topic: views-enriched
///   key: user_id
///   headers: [country]
/// ```
///
/// The producer is idempotent with `acks=all`; a checkpoint waits until the broker has
/// acknowledged every message written before it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    /// A column whose value (as text) is the message key; rows with a null key get none.
    pub key: Option<String>,
    /// Columns sent as message headers (values as text), as well as in the payload.
    #[serde(default)]
    pub headers: Vec<String>,
    /// The payload format: `json` (the default) or `avro` (Confluent-framed, with `avro:`).
    #[serde(default)]
    pub format: MessageFormat,
    /// `format: avro`: the schema registry, and the writer schema when not derived.
    pub avro: Option<crate::avro::AvroSinkConfig>,
    /// `format: protobuf`: the `.proto`, the message type, and the registry if framed.
    pub protobuf: Option<crate::protobuf::ProtobufSinkConfig>,
    /// An encrypted connection (see [`KafkaTls`]).
    pub tls: Option<KafkaTls>,
    /// A SASL login (see [`KafkaSasl`]).
    pub sasl: Option<Box<KafkaSasl>>,
    /// librdkafka producer properties, passed through (`linger.ms: "20"`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl KafkaSinkConfig {
    /// The keys that say how rows become payloads.
    pub fn format_keys(&self) -> SinkKeys<'_> {
        SinkKeys {
            format: self.format,
            avro: self.avro.as_ref(),
            protobuf: self.protobuf.as_ref(),
            topic: &self.topic,
        }
    }

    /// The librdkafka properties of `tls`, `sasl` and `options`.
    pub fn client_options(&self) -> BTreeMap<String, String> {
        security::client_options(self.tls.as_ref(), self.sasl.as_deref(), &self.options)
    }
}

/// Properties Sluice sets itself, because delivery guarantees depend on them.
const CONSUMER_MANAGED: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "bootstrap.servers",
];
const PRODUCER_MANAGED: &[&str] = &["enable.idempotence", "acks", "bootstrap.servers"];

/// Checks a client's `options` (none of the `managed` ones) and its `tls:` and `sasl:`.
fn check_options(
    options: &BTreeMap<String, String>,
    (tls, sasl): (Option<&KafkaTls>, Option<&KafkaSasl>),
    managed: &[&str],
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) {
    security::validate(tls, sasl, options, node, path, problems);
    for key in options.keys() {
        if managed.contains(&key.as_str()) {
            problems.at_key(
                node,
                path,
                "options",
                format!("`{key}` is set by Sluice (delivery guarantees depend on it); remove it"),
            );
        }
    }
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

mod spec {
    use super::*;
    use arrow::datatypes::{Schema, SchemaRef};
    use sluice_engine::Result;
    use sluice_engine::connector::{SinkSpec, SourceSpec};
    use sluice_engine::dead_letter::DeadLetterSink;
    use sluice_engine::sink::Sink;
    use sluice_engine::source::Source;

    use crate::kafka::{KafkaSink, KafkaSource};

    #[async_trait::async_trait]
    impl SourceSpec for KafkaSourceConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            match (self.topics.is_empty(), &self.topic_pattern) {
                (true, None) => problems.at_key(
                    node,
                    path,
                    "topics",
                    "give `topics` (a list) or `topic_pattern` (a regular expression)",
                ),
                (false, Some(_)) => problems.at_key(
                    node,
                    path,
                    "topic_pattern",
                    "give either `topics` or `topic_pattern`, not both",
                ),
                (true, Some(pattern)) => {
                    if let Err(e) = regex::Regex::new(pattern) {
                        problems.at_key(
                            node,
                            path,
                            "topic_pattern",
                            format!("not a regular expression: {e}"),
                        );
                    }
                }
                (false, None) => {}
            }
            for topic in &self.topics {
                if !valid_topic(topic) {
                    problems.at_key(
                    node,
                    path,
                    "topics",
                    format!("`{topic}` is not a Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)"),
                );
                }
            }
            self.format_keys().check(node, path, problems);
            let security = (self.tls.as_ref(), self.sasl.as_deref());
            check_options(
                &self.options,
                security,
                CONSUMER_MANAGED,
                node,
                path,
                problems,
            );
        }

        /// `sluice validate`: an Avro or Protobuf source's declared schema against the
        /// registry's latest version of each topic's subject.
        async fn check_remote(&self) -> sluice_engine::connector::RemoteCheck {
            self.format_keys().check_remote().await
        }

        /// The Kafka source's schema never needs a connection.
        fn declared_schema(&self) -> Option<SchemaRef> {
            KafkaSource::new(self.clone(), 1, false)
                .ok()
                .map(|s| s.schema())
        }

        fn open(&self, batch_size: usize, dead_letters: bool) -> Result<Box<dyn Source>> {
            Ok(Box::new(KafkaSource::new(
                self.clone(),
                batch_size,
                dead_letters,
            )?))
        }
    }

    impl SinkSpec for KafkaSinkConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            if !valid_topic(&self.topic) {
                problems.at_key(
                    node,
                    path,
                    "topic",
                    format!("`{}` is not a Kafka topic name", self.topic),
                );
            }
            self.format_keys().check(node, path, problems);
            let security = (self.tls.as_ref(), self.sasl.as_deref());
            check_options(
                &self.options,
                security,
                PRODUCER_MANAGED,
                node,
                path,
                problems,
            );
        }

        fn open(&self, input: &Schema) -> Result<Box<dyn Sink>> {
            Ok(Box::new(KafkaSink::open(self.clone(), input)?))
        }

        /// The records' bytes with provenance headers, not rows of text.
        fn open_dead_letter(&self) -> Result<DeadLetterSink> {
            Ok(DeadLetterSink {
                sink: Box::new(KafkaSink::open_dead_letter(self.clone())?),
                text: false,
            })
        }

        fn open_error_key(&self) -> &'static str {
            "type"
        }
    }
}
