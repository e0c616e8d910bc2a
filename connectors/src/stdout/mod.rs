//! `stdout`: JSON lines on standard output, for trying pipelines and piping into `jq`.

use std::io::Write;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::sink::Sink;
use sluice_engine::{Error, Result};

/// Writes each row as a JSON object on its own line.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

#[derive(Default)]
pub struct StdoutSink {
    rows: u64,
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        let mut writer = crate::json::lines_writer(&mut lock);
        writer
            .write(&batch)
            .map_err(|e| Error::arrow("writing to standard output", e))?;
        drop(writer);
        lock.flush().map_err(|e| Error::io("<stdout>", e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        std::io::stdout()
            .flush()
            .map_err(|e| Error::io("<stdout>", e))
    }

    async fn close(&mut self) -> Result<()> {
        self.flush().await
    }

    fn summary(&self) -> String {
        format!("{} rows to standard output", self.rows)
    }
}

impl sluice_engine::connector::SinkSpec for StdoutConfig {
    fn open(
        &self,
        _input: &arrow::datatypes::Schema,
    ) -> sluice_engine::Result<Box<dyn sluice_engine::sink::Sink>> {
        Ok(Box::new(StdoutSink::default()))
    }
}
