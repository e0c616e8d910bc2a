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

impl sluice_engine::connector::SourceSpec for GeneratorConfig {
    fn check(
        &self,
        node: &sluice_engine::config::Node,
        path: &sluice_engine::config::Location,
        problems: &mut sluice_engine::config::Problems,
    ) {
        self.validate(node, path, problems);
    }

    fn declared_schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        sluice_engine::batch::with_metadata(&record_schema()).ok()
    }

    fn open(
        &self,
        _batch_size: usize,
        _dead_letters: bool,
    ) -> sluice_engine::Result<Box<dyn sluice_engine::source::Source>> {
        Ok(Box::new(GeneratorSource::new(self.clone())?))
    }
}
