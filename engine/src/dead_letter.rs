//! Dead letters: records that could not be processed, kept with where they came from and
//! why, so that nothing is ever dropped.
//!
//! A record becomes a dead letter when it cannot be decoded (its original bytes are kept),
//! or when a stage fails it permanently, or transiently beyond its retry policy (the row is
//! kept as JSON). Dead letters travel with the batch they came from to the sink task, which
//! writes them to the pipeline's `dead_letter` sink; a checkpoint flushes that sink as well
//! as the main one, so an offset is only committed once every record before it is in one
//! of the two.
//!
//! # The dead-letter record
//! [`schema`]: `payload` (the bytes), then the provenance — `pipeline`, `stage` (`source`
//! for decoding), `error_class`, `error`, `attempts`, `source` (file or `topic/N`),
//! `partition`, `offset`, `key`, `first_failed_at`, `last_failed_at`. A Kafka dead-letter
//! sink sends `payload` as the message value and the rest as headers; the other sinks get
//! [`text_batch`], where `payload` is text and `payload_base64` holds payloads that are not
//! UTF-8.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::batch::{PartitionInfo, timestamp_type};
use crate::{Error, ErrorClass, Result};

/// The stage name of records that failed at decoding.
pub const SOURCE_STAGE: &str = "source";

/// The provenance columns, in order, after `payload`.
pub const PROVENANCE: [&str; 11] = [
    "pipeline",
    "stage",
    "error_class",
    "error",
    "attempts",
    "source",
    "partition",
    "offset",
    "key",
    "first_failed_at",
    "last_failed_at",
];

/// One record that failed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stage: Arc<str>,
    pub class: ErrorClass,
    pub reason: String,
    /// How many times it was tried (1 when it was not retried).
    pub attempts: u32,
    pub partition: Arc<PartitionInfo>,
    /// The record's offset when known (a stage may have dropped `_offset`).
    pub offset: Option<i64>,
    pub key: Option<String>,
    /// Milliseconds since the epoch.
    pub first_failed_at: i64,
    pub last_failed_at: i64,
    /// The original bytes (decoding) or the row as JSON (stages).
    pub payload: Vec<u8>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn provenance_fields() -> Vec<Field> {
    vec![
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("error_class", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("partition", DataType::UInt32, false),
        Field::new("offset", DataType::Int64, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("first_failed_at", timestamp_type(), false),
        Field::new("last_failed_at", timestamp_type(), false),
    ]
}

/// The schema of dead-letter batches as the engine makes them.
pub fn schema() -> SchemaRef {
    let mut fields = vec![Field::new("payload", DataType::Binary, false)];
    fields.extend(provenance_fields());
    Arc::new(Schema::new(fields))
}

/// The schema of [`text_batch`].
pub fn text_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("payload", DataType::Utf8, true),
        Field::new("payload_base64", DataType::Utf8, true),
    ];
    fields.extend(provenance_fields());
    Arc::new(Schema::new(fields))
}

/// Dead letters as one batch of [`schema`].
pub fn to_batch(pipeline: &str, letters: &[DeadLetter]) -> Result<RecordBatch> {
    let mut payload = BinaryBuilder::new();
    for l in letters {
        payload.append_value(&l.payload);
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(payload.finish())];
    columns.extend(provenance_columns(pipeline, letters));
    RecordBatch::try_new(schema(), columns).map_err(|e| Error::arrow("making dead letters", e))
}

/// A batch of [`schema`] for sinks that write text: `payload` as text when it is UTF-8,
/// else in `payload_base64`.
pub fn text_batch(batch: &RecordBatch) -> Result<RecordBatch> {
    let payload = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::BinaryArray>()
        .ok_or_else(|| Error::Internal("dead letters without a binary payload".into()))?;
    let mut text = StringBuilder::new();
    let mut base64 = StringBuilder::new();
    for bytes in payload.iter() {
        match bytes.map(std::str::from_utf8) {
            Some(Ok(s)) => {
                text.append_value(s);
                base64.append_null();
            }
            Some(Err(_)) => {
                text.append_null();
                base64.append_value(encode_base64(bytes.unwrap_or_default()));
            }
            None => {
                text.append_null();
                base64.append_null();
            }
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(text.finish()), Arc::new(base64.finish())];
    columns.extend(batch.columns()[1..].iter().cloned());
    RecordBatch::try_new(text_schema(), columns)
        .map_err(|e| Error::arrow("making dead letters as text", e))
}

fn provenance_columns(pipeline: &str, letters: &[DeadLetter]) -> Vec<ArrayRef> {
    let n = letters.len();
    let mut pipeline_col = StringBuilder::with_capacity(n, n * pipeline.len());
    let mut stage = StringBuilder::new();
    let mut class = StringBuilder::new();
    let mut error = StringBuilder::new();
    let mut attempts = UInt32Builder::with_capacity(n);
    let mut source = StringBuilder::new();
    let mut partition = UInt32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut key = StringBuilder::new();
    let mut first = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut last = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    for l in letters {
        pipeline_col.append_value(pipeline);
        stage.append_value(&l.stage);
        class.append_value(l.class.as_str());
        error.append_value(&l.reason);
        attempts.append_value(l.attempts);
        source.append_value(&l.partition.name);
        partition.append_value(l.partition.id);
        offset.append_option(l.offset);
        key.append_option(l.key.as_deref());
        first.append_value(l.first_failed_at);
        last.append_value(l.last_failed_at);
    }
    vec![
        Arc::new(pipeline_col.finish()),
        Arc::new(stage.finish()),
        Arc::new(class.finish()),
        Arc::new(error.finish()),
        Arc::new(attempts.finish()),
        Arc::new(source.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(key.finish()),
        Arc::new(first.finish()),
        Arc::new(last.finish()),
    ]
}

/// Standard base64 with padding (RFC 4648).
pub fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of [`encode_base64`]; `None` for text that is not base64.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// The pipeline's dead-letter sink, and the form it takes records in.
pub struct DeadLetterSink {
    pub sink: Box<dyn crate::sink::Sink>,
    /// `true`: [`text_batch`] rows (files, stdout); `false`: [`schema`] rows (Kafka, which
    /// sends the payload bytes as they are).
    pub text: bool,
}

impl DeadLetterSink {
    pub async fn write(&mut self, pipeline: &str, letters: &[DeadLetter]) -> Result<()> {
        let batch = to_batch(pipeline, letters)?;
        let batch = if self.text {
            text_batch(&batch)?
        } else {
            batch
        };
        self.sink.write(batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for bytes in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xff, 0, 0x80],
        ] {
            let text = encode_base64(bytes);
            assert_eq!(decode_base64(&text).as_deref(), Some(bytes), "{text}");
        }
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
    }

    #[test]
    fn letters_become_rows() {
        let letter = DeadLetter {
            stage: SOURCE_STAGE.into(),
            class: ErrorClass::Decode,
            reason: "not JSON".into(),
            attempts: 1,
            partition: Arc::new(PartitionInfo {
                id: 2,
                name: "views/2".into(),
            }),
            offset: Some(17),
            key: Some("u1".into()),
            first_failed_at: 1,
            last_failed_at: 1,
            payload: vec![0xff, b'x'],
        };
        let batch = to_batch("p", &[letter]).unwrap();
        assert_eq!(batch.num_rows(), 1);
        let text = text_batch(&batch).unwrap();
        assert!(text.column(0).is_null(0));
        assert_eq!(
            text.column(1)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .value(0),
            "/3g="
        );
    }
}
