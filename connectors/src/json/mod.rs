//! JSON: encoding rows for the sinks that write it, and decoding records into batches.
//!
//! [`JsonDecoder`] decodes records that arrive one by one (Kafka messages) on a fast path
//! straight into Arrow builders; [`decode_records`] decodes a buffer of JSON lines with
//! arrow-json, whose error messages every path reports.

mod decoder;
#[cfg(test)]
mod hostile;

use sluice_engine::json_limits as limits;

pub use decoder::JsonDecoder;
pub use limits::{MAX_DEPTH, check_depth};

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
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

/// Why a set of JSON records did not decode, and which record (by index) when one alone
/// is at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub index: Option<usize>,
    pub reason: String,
}

/// Decodes JSON records stored back to back in `buf` (record `i` starts at `starts[i]`)
/// into one batch of `schema`.
///
/// The whole buffer is decoded in one pass; only when that fails is each record decoded on
/// its own to find the first bad one, so the cost of locating errors is paid only on errors.
/// Each record is first held to the nesting limit and checked to be whole
/// ([`limits::check_line`]), so that records cannot run into each other.
pub fn decode_records(
    schema: &SchemaRef,
    buf: &[u8],
    starts: &[usize],
) -> std::result::Result<RecordBatch, DecodeError> {
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(buf.len());
        let record = &buf[start..end];
        if let Err(reason) = limits::check_line(record) {
            // A record within the limit but not whole: arrow-json's words for it alone
            // (where it starts, arrow-json's reading agrees with the check's).
            let reason = match reason.contains("nesting limit") {
                true => reason,
                false => decode(schema, record, 1).err().unwrap_or(reason),
            };
            return Err(DecodeError {
                index: Some(i),
                reason,
            });
        }
    }
    let whole = decode(schema, buf, starts.len());
    if let Ok(Some(batch)) = &whole
        && batch.num_rows() == starts.len()
    {
        return Ok(batch.clone());
    }
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(buf.len());
        let reason = match decode(schema, &buf[start..end], 1) {
            Err(reason) => reason,
            Ok(Some(b)) if b.num_rows() == 1 => continue,
            Ok(_) => "the record holds more than one JSON value".to_string(),
        };
        return Err(DecodeError {
            index: Some(i),
            reason,
        });
    }
    Err(DecodeError {
        index: None,
        reason: match whole {
            Err(reason) => reason,
            Ok(_) => "the records decode to a different number of rows".to_string(),
        },
    })
}

pub(crate) fn decode(
    schema: &SchemaRef,
    bytes: &[u8],
    records: usize,
) -> std::result::Result<Option<RecordBatch>, String> {
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(records.max(1))
        .build_decoder()
        .map_err(|e| clean_error(&e))?;
    let mut rest = bytes;
    while !rest.is_empty() {
        let used = decoder.decode(rest).map_err(|e| clean_error(&e))?;
        if used == 0 {
            // The decoder is full: more values than records.
            return Ok(None);
        }
        rest = &rest[used..];
    }
    decoder.flush().map_err(|e| clean_error(&e))
}

/// Arrow's JSON errors, said for a person (and cut short: they may quote the record).
fn clean_error(e: &arrow::error::ArrowError) -> String {
    limits::shorten(clean_error_text(e))
}

fn clean_error_text(e: &arrow::error::ArrowError) -> String {
    let text = e.to_string();
    let text = text.strip_prefix("Json error: ").unwrap_or(&text);
    // "Encountered unmasked nulls in non-nullable StructArray child: Field { "id": Int64 }"
    if let Some(rest) = text.split("non-nullable").nth(1) {
        let name = rest
            .split("name: \"")
            .nth(1)
            .or_else(|| rest.split("Field { \"").nth(1))
            .and_then(|r| r.split('"').next());
        if let Some(name) = name {
            return format!("missing required field `{name}` (it is declared nullable: false)");
        }
    }
    text.to_string()
}
