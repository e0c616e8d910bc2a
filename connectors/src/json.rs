//! JSON lines encoding shared by the sinks that write it.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::json::writer::{JsonArray, LineDelimited, Writer, WriterBuilder};
use sluice_engine::{Error, Result};

/// One JSON object per row; nulls are written as `null`, not left out, so every line has
/// every column.
pub fn lines_writer<W: Write>(w: W) -> Writer<W, LineDelimited> {
    WriterBuilder::new().with_explicit_nulls(true).build(w)
}

/// Encodes a batch as a JSON array of row objects (for tests and HTTP bodies).
pub fn to_json_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    let mut writer: Writer<_, JsonArray> = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build(&mut buf);
    writer
        .write(batch)
        .and_then(|_| writer.finish())
        .map_err(|e| Error::arrow("encoding rows as JSON", e))?;
    drop(writer);
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&buf).map_err(|e| Error::Internal(format!("re-reading JSON rows: {e}")))
}
