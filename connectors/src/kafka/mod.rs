//! `kafka`: topics as a source (a consumer group member) and as a sink (an idempotent
//! producer). JSON payloads are decoded straight into Arrow batches.

mod config;
mod lag;
mod msk_iam;
mod security;
mod sink;
mod source;

pub use config::{KafkaSinkConfig, KafkaSourceConfig, MessageFormat, StartFrom};
pub use lag::{GroupLag, Lag};
pub use security::{KafkaSasl, KafkaTls, LoginContext, is_security_property};
pub use sink::KafkaSink;
pub use source::KafkaSource;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// librdkafka's log lines, into tracing: warnings and worse as warnings (a broker that
/// went away is worth seeing, not worth stopping for), the rest as debug.
fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
        _ => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
    }
}

/// A client error librdkafka reports on its own (it keeps retrying).
fn client_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", "{error}: {reason}");
}

mod spec {
    use arrow::datatypes::{Schema, SchemaRef};
    use sluice_engine::Result;
    use sluice_engine::config::{Location, Node, Problems};
    use sluice_engine::connector::{SinkSpec, SourceSpec};
    use sluice_engine::dead_letter::DeadLetterSink;
    use sluice_engine::sink::Sink;
    use sluice_engine::source::Source;

    use super::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};

    impl SourceSpec for KafkaSourceConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            self.validate(node, path, problems);
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
            self.validate(node, path, problems);
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
