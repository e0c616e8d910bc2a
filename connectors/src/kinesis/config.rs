//! `type: kinesis` as written in the pipeline file, for the source and the sink, and the
//! SDK client both build from it.

use std::sync::Arc;

use serde::Deserialize;
use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::config::types::{ByteSize, Duration};
use sluice_engine::config::{Location, Node, Problems};

use crate::format::{SinkKeys, SourceKeys};
pub use crate::stream::{MessageFormat, StartFrom};

/// Reads a Kinesis data stream, a partition per shard.
///
/// ```yaml
/// source:
///   type: kinesis
///   stream: plays
///   region: us-east-1
///   endpoint: http://127.0.0.1:4567   # a local Kinesis (kinesalite, LocalStack)
///   start_from: trim_horizon
///   schema: [...]
/// ```
///
/// Shards that split or merge are followed: a child is read once its parents have been
/// read to their end and checkpointed, so records of a key stay in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSourceConfig {
    /// The stream's name; or give `stream_arn`.
    pub stream: Option<String>,
    pub stream_arn: Option<String>,
    /// The AWS region; without it, the standard chain's (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's (a local Kinesis for testing).
    pub endpoint: Option<String>,
    /// Static keys, for a local Kinesis; without them the standard AWS chain is used
    /// (environment, profile files, SSO, web identity, container and instance roles).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Where a shard with no checkpoint starts: `trim_horizon` (its oldest record),
    /// `latest` (default: records written from now on) or an RFC 3339 time.
    #[serde(default, deserialize_with = "crate::stream::kinesis_start_from")]
    pub start_from: StartFrom,
    /// The payload format: `json` (one JSON object per record, the default), `avro`
    /// (Confluent-framed, with `avro:`), `protobuf` (with `protobuf:`) or `debezium`
    /// (change events; `schema` is the table's columns), as on a Kafka source
    /// (see [`crate::format`]); the registry subject is `{stream}-value`.
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
    /// How often the stream's shards are listed, to find the children of a split or merge.
    #[serde(default = "default_discover_every")]
    pub discover_every: Duration,
    /// How long a shard with nothing new waits before asking again (GetRecords; a shard
    /// takes at most 5 calls a second, shared by every consumer of the stream).
    #[serde(default = "default_idle_wait")]
    pub idle_wait: Duration,
    /// The largest record accepted (default 1MiB, Kinesis's own limit).
    #[serde(default = "default_max_record")]
    pub max_record_size: ByteSize,
    /// Worker processes (`sluice worker`): how long a member's lease on a shard lasts
    /// without renewal before another member takes the shard (the KCL's failover time).
    /// Members renew every third of it.
    #[serde(default = "default_lease_duration")]
    pub lease_duration: Duration,
}

fn default_lease_duration() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

fn default_discover_every() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}

fn default_idle_wait() -> Duration {
    Duration(std::time::Duration::from_millis(250))
}

fn default_max_record() -> ByteSize {
    ByteSize(1 << 20)
}

/// Writes each row as a JSON record to a Kinesis data stream (PutRecords).
///
/// ```yaml
/// sink:
///   type: kinesis
///   stream: plays-enriched
///   partition_key: user_id
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisSinkConfig {
    /// The stream's name; or give `stream_arn`.
    pub stream: Option<String>,
    pub stream_arn: Option<String>,
    /// The AWS region; without it, the standard chain's (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's (a local Kinesis for testing).
    pub endpoint: Option<String>,
    /// Static keys, for a local Kinesis; without them the standard AWS chain is used
    /// (environment, profile files, SSO, web identity, container and instance roles).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// The column whose value (as text) is the record's partition key; without it (or
    /// for a null) the key is a hash of the row, spreading rows over the shards.
    pub partition_key: Option<String>,
    /// A column holding an explicit hash key (a decimal 128-bit number) that picks the
    /// shard instead of the partition key's hash.
    pub explicit_hash_key: Option<String>,
    /// The payload format: `json` (the default), `avro` (with `avro:`) or `protobuf` (with
    /// `protobuf:`), as on a Kafka sink; writer schemas register under `{stream}-value`.
    #[serde(default)]
    pub format: MessageFormat,
    /// `format: avro`: the schema registry, and the writer schema when not derived.
    pub avro: Option<crate::avro::AvroSinkConfig>,
    /// `format: protobuf`: the `.proto`, the message type, and the registry if framed.
    pub protobuf: Option<crate::protobuf::ProtobufSinkConfig>,
}

impl KinesisSourceConfig {
    /// The keys that say how payloads read; the stream's name names its subject.
    pub fn format_keys(&self) -> SourceKeys<'_> {
        SourceKeys {
            format: self.format,
            schema: &self.schema,
            avro: self.avro.as_ref(),
            protobuf: self.protobuf.as_ref(),
            debezium: self.debezium.as_ref(),
            subjects: vec![self.stream_ref().name().to_string()],
        }
    }
}

impl KinesisSinkConfig {
    /// The keys that say how rows become payloads; the stream's name names its subject.
    pub fn format_keys(&self) -> SinkKeys<'_> {
        SinkKeys {
            format: self.format,
            avro: self.avro.as_ref(),
            protobuf: self.protobuf.as_ref(),
            topic: stream_name(&self.stream, &self.stream_arn),
        }
    }
}

/// `stream` or `stream_arn`.
#[derive(Debug, Clone)]
pub struct StreamRef {
    pub stream: Option<String>,
    pub stream_arn: Option<String>,
}

impl StreamRef {
    /// The name for people and partition names: the stream's name (from its ARN too).
    pub fn name(&self) -> &str {
        stream_name(&self.stream, &self.stream_arn)
    }

    fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
        match (&self.stream, &self.stream_arn) {
            (None, None) => problems.at_key(node, path, "stream", "give `stream` or `stream_arn`"),
            (Some(_), Some(_)) => problems.at_key(
                node,
                path,
                "stream_arn",
                "give either `stream` or `stream_arn`, not both",
            ),
            (Some(name), None) => {
                if !valid_stream(name) {
                    problems.at_key(
                        node,
                        path,
                        "stream",
                        format!(
                            "`{name}` is not a Kinesis stream name (1 to 128 letters, digits, \
                             `.`, `_`, `-`)"
                        ),
                    );
                }
            }
            (None, Some(arn)) => {
                if !arn.starts_with("arn:") || !arn.contains(":stream/") {
                    problems.at_key(
                        node,
                        path,
                        "stream_arn",
                        format!("`{arn}` is not a stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"),
                    );
                }
            }
        }
    }
}

/// `stream`, or the name at the end of `stream_arn`.
fn stream_name<'a>(stream: &'a Option<String>, stream_arn: &'a Option<String>) -> &'a str {
    match (stream, stream_arn) {
        (Some(name), _) => name,
        (None, Some(arn)) => arn.rsplit('/').next().unwrap_or(arn),
        (None, None) => "",
    }
}

fn valid_stream(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where the Kinesis API is and who calls it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// The keys the source and the sink share.
macro_rules! stream_and_client {
    ($t:ty) => {
        impl $t {
            pub fn stream_ref(&self) -> StreamRef {
                StreamRef {
                    stream: self.stream.clone(),
                    stream_arn: self.stream_arn.clone(),
                }
            }

            pub fn client_config(&self) -> ClientConfig {
                ClientConfig {
                    region: self.region.clone(),
                    endpoint: self.endpoint.clone(),
                    access_key_id: self.access_key_id.clone(),
                    secret_access_key: self.secret_access_key.clone(),
                }
            }
        }
    };
}

stream_and_client!(KinesisSourceConfig);
stream_and_client!(KinesisSinkConfig);

impl ClientConfig {
    fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.at_key(
                node,
                path,
                "secret_access_key",
                "give `access_key_id` and `secret_access_key` together",
            );
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.at_key(
                node,
                path,
                "endpoint",
                format!("`{endpoint}` is not an http:// or https:// URL"),
            );
        }
    }

    /// The SDK client: the standard AWS chain, with what the pipeline sets over it. TLS
    /// through rustls on ring (the SDK's default would build aws-lc with cmake). Retries
    /// are Sluice's own (see `super::retry`), so the SDK makes one attempt per call.
    pub async fn client(&self) -> aws_sdk_kinesis::Client {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        // A call that hangs (a connection half-open, a stuck proxy) fails and is retried
        // instead of holding up its shard or the sink for good.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .read_timeout(std::time::Duration::from_secs(30))
            .operation_attempt_timeout(std::time::Duration::from_secs(60))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "sluice pipeline",
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let config = loader.load().await;
        aws_sdk_kinesis::Client::new(&config)
    }
}

mod spec {
    use super::*;
    use arrow::datatypes::{Schema, SchemaRef};
    use sluice_engine::Result;
    use sluice_engine::connector::{SinkSpec, SourceSpec};
    use sluice_engine::sink::Sink;
    use sluice_engine::source::Source;

    use crate::kinesis::{KinesisSink, KinesisSource};

    #[async_trait::async_trait]
    impl SourceSpec for KinesisSourceConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            self.stream_ref().check(node, path, problems);
            self.client_config().check(node, path, problems);
            self.format_keys().check(node, path, problems);
            if self.idle_wait.get() < std::time::Duration::from_millis(200) {
                problems.at_key(
                    node,
                    path,
                    "idle_wait",
                    "must be at least 200ms: a shard takes at most 5 GetRecords calls a second",
                );
            }
        }

        /// `sluice validate`: an Avro or Protobuf source's declared schema against the
        /// registry's latest version of the stream's subject.
        async fn check_remote(&self) -> sluice_engine::connector::RemoteCheck {
            self.format_keys().check_remote().await
        }

        fn lag_in_time(&self) -> Option<&'static str> {
            Some("a Kinesis source's lag is in time (each shard's MillisBehindLatest)")
        }

        /// The source's schema never needs a connection.
        fn declared_schema(&self) -> Option<SchemaRef> {
            KinesisSource::new(self.clone(), 1, false)
                .ok()
                .map(|s| s.schema())
        }

        fn open(&self, batch_size: usize, dead_letters: bool) -> Result<Box<dyn Source>> {
            Ok(Box::new(KinesisSource::new(
                self.clone(),
                batch_size,
                dead_letters,
            )?))
        }
    }

    impl SinkSpec for KinesisSinkConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            self.stream_ref().check(node, path, problems);
            self.client_config().check(node, path, problems);
            self.format_keys().check(node, path, problems);
        }

        fn open(&self, input: &Schema) -> Result<Box<dyn Sink>> {
            Ok(Box::new(KinesisSink::open(Arc::new(self.clone()), input)?))
        }

        fn open_error_key(&self) -> &'static str {
            "stream"
        }
    }
}
