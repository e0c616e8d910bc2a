//! `kafka`: topics as a source (a consumer group member) and as a sink (an idempotent
//! producer). JSON payloads are decoded straight into Arrow batches.

mod config;
mod sink;
mod source;

pub use config::{KafkaSinkConfig, KafkaSourceConfig, MessageFormat, StartFrom};
pub use sink::KafkaSink;
pub use source::KafkaSource;
