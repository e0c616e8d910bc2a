//! `file`: JSON lines, CSV and Parquet files as a source; JSON lines and Parquet as a sink.

mod config;
#[cfg(test)]
pub(crate) mod hostile;
mod sink;
mod source;

pub use config::{FileFormat, FileSinkConfig, FileSourceConfig};
pub use sink::FileSink;
pub use source::FileSource;

mod spec {
    use std::sync::Arc;

    use arrow::datatypes::{Schema, SchemaRef};
    use sluice_engine::Result;
    use sluice_engine::config::{Location, Node, Problems};
    use sluice_engine::connector::{SinkSpec, SourceSpec};
    use sluice_engine::sink::Sink;
    use sluice_engine::source::Source;

    use super::{FileSink, FileSinkConfig, FileSource, FileSourceConfig};

    impl SourceSpec for FileSourceConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            self.validate(node, path, problems);
        }

        fn declared_schema(&self) -> Option<SchemaRef> {
            let records = self.schema.as_ref()?.to_arrow();
            sluice_engine::batch::with_metadata(&records).ok()
        }

        fn open(&self, batch_size: usize, dead_letters: bool) -> Result<Box<dyn Source>> {
            let source = FileSource::open(self.clone(), batch_size)?;
            Ok(Box::new(source.with_dead_letters(dead_letters)))
        }

        fn open_error_key(&self) -> &'static str {
            "path"
        }
    }

    impl SinkSpec for FileSinkConfig {
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            self.validate(node, path, problems);
        }

        fn open(&self, _input: &Schema) -> Result<Box<dyn Sink>> {
            Ok(Box::new(FileSink::open(self.clone())?))
        }

        fn named_apart(&self, part: &str) -> Option<Arc<dyn SinkSpec>> {
            let mut config = self.clone();
            config.prefix = format!("{}-{part}", config.prefix);
            Some(Arc::new(config))
        }
    }
}
