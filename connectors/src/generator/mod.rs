//! `generator`: synthetic view events of a streaming service.

mod config;
mod source;

pub use config::GeneratorConfig;
pub use source::{GeneratorPartition, GeneratorSource, record_schema};

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub(crate) fn parse_time_ms(text: &str) -> Option<i64> {
    arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(text)
        .ok()
        .map(|ns| ns / 1_000_000)
}
