//! `nexmark`: the events of the Nexmark streaming benchmark (people, auctions and bids of an
//! online auction house), made the way the reference generators (nexmark/nexmark for
//! Flink, Apache Beam) make them, straight into Arrow arrays.

mod config;
mod model;
mod source;

pub use config::NexmarkConfig;
pub use source::{NexmarkPartition, NexmarkSource, record_schema};

impl sluice_engine::connector::SourceSpec for NexmarkConfig {
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
        Ok(Box::new(NexmarkSource::new(self.clone())?))
    }
}
