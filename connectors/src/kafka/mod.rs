//! `kafka`: topics as a source (a consumer group member) and as a sink (an idempotent
//! producer). JSON payloads are decoded straight into Arrow batches.

mod config;
mod lag;
mod msk_iam;
mod security;
mod sink;
mod source;

pub use config::{KafkaSinkConfig, KafkaSourceConfig, KeyFormat, MessageFormat, StartFrom};
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
