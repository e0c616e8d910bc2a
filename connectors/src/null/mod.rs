//! `null`: counts rows and drops them; measures an engine without a sink's cost.

use arrow::array::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::Result;
use sluice_engine::sink::Sink;

/// Discards every row, counting them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {}

#[derive(Default)]
pub struct NullSink {
    rows: u64,
    batches: u64,
}

#[async_trait]
impl Sink for NullSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        self.batches += 1;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "{} rows in {} batches discarded (null sink)",
            self.rows, self.batches
        )
    }
}

impl sluice_engine::connector::SinkSpec for NullConfig {
    fn open(
        &self,
        _input: &arrow::datatypes::Schema,
    ) -> sluice_engine::Result<Box<dyn sluice_engine::sink::Sink>> {
        Ok(Box::new(NullSink::default()))
    }
}
