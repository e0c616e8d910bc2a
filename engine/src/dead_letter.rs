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
//! `partition`, `offset`, `key`, `first_failed_at`, `last_failed_at`, `payload_size`,
//! `payload_cut`, `payload_checksum`. A Kafka dead-letter sink sends `payload` as the
//! message value and the rest as headers; the other sinks get [`text_batch`], where
//! `payload` is text and `payload_base64` holds payloads that are not UTF-8.
//!
//! # Dead letters larger than their sink allows
//! A sink may take messages of a bounded size (a Kafka producer's `message.max.bytes`,
//! 1,000,000 bytes by default), and a record near that size that fails becomes a larger
//! dead letter. Refusing it would stop the run on it again at every restart, so a letter
//! that does not fit is written with its payload cut to fit: `payload_cut` is true,
//! `payload_size` holds the whole payload's size and `payload_checksum` its XXH3-64 (as
//! `xxh3:` and 16 hex digits), next to its source and offset, so the whole record can be
//! found again. `sluice dlq replay` refuses letters whose payload was cut.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::batch::{PartitionInfo, timestamp_type};
use crate::{Error, ErrorClass, Result};

/// The stage name of records that failed at decoding.
pub const SOURCE_STAGE: &str = "source";

/// The provenance columns, in order, after `payload`.
pub const PROVENANCE: [&str; 14] = [
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
    "payload_size",
    "payload_cut",
    "payload_checksum",
];

/// Room left in a message for what is not payload or provenance text (header names,
/// framing): generous, since librdkafka counts its own framing against the limit too.
const MESSAGE_MARGIN: usize = 1024;

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
        Field::new("payload_size", DataType::Int64, false),
        Field::new("payload_cut", DataType::Boolean, false),
        Field::new("payload_checksum", DataType::Utf8, true),
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
    to_batch_within(pipeline, letters, usize::MAX)
}

/// Dead letters as one batch of [`schema`], each payload cut where the letter would make a
/// message larger than `max_message` bytes (see the module's essay).
pub fn to_batch_within(
    pipeline: &str,
    letters: &[DeadLetter],
    max_message: usize,
) -> Result<RecordBatch> {
    // A provenance too large on its own (a huge key or reason) is cut first.
    let fits = |l: &DeadLetter| provenance_bytes(pipeline, l) + MESSAGE_MARGIN <= max_message;
    let letters: std::borrow::Cow<[DeadLetter]> = if letters.iter().all(fits) {
        letters.into()
    } else {
        letters
            .iter()
            .map(|l| {
                if fits(l) {
                    l.clone()
                } else {
                    with_short_provenance(l)
                }
            })
            .collect::<Vec<_>>()
            .into()
    };
    let letters = &*letters;
    let mut payload = BinaryBuilder::new();
    let mut size = Int64Builder::with_capacity(letters.len());
    let mut cut = BooleanBuilder::with_capacity(letters.len());
    let mut checksum = StringBuilder::new();
    for l in letters {
        let room = max_message.saturating_sub(provenance_bytes(pipeline, l) + MESSAGE_MARGIN);
        size.append_value(l.payload.len() as i64);
        if l.payload.len() <= room {
            payload.append_value(&l.payload);
            cut.append_value(false);
            checksum.append_null();
        } else {
            payload.append_value(&l.payload[..room]);
            cut.append_value(true);
            let hash = xxhash_rust::xxh3::xxh3_64(&l.payload);
            checksum.append_value(format!("xxh3:{hash:016x}"));
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(payload.finish())];
    columns.extend(provenance_columns(pipeline, letters));
    columns.extend([
        Arc::new(size.finish()) as ArrayRef,
        Arc::new(cut.finish()),
        Arc::new(checksum.finish()),
    ]);
    RecordBatch::try_new(schema(), columns).map_err(|e| Error::arrow("making dead letters", e))
}

/// The most of a key or reason a letter keeps when its provenance alone is too large.
const SHORT_PROVENANCE: usize = 4096;

/// `l` with its key and reason cut to [`SHORT_PROVENANCE`] bytes, the reason saying so.
fn with_short_provenance(l: &DeadLetter) -> DeadLetter {
    let cut = |text: &str| {
        let mut end = SHORT_PROVENANCE.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    };
    let mut reason = cut(&l.reason);
    if reason.len() < l.reason.len() {
        reason.push_str(&format!("… (the error was {} bytes)", l.reason.len()));
    }
    if let Some(key) = l.key.as_ref().filter(|k| k.len() > SHORT_PROVENANCE) {
        reason.push_str(&format!(
            " (the key was cut to {SHORT_PROVENANCE} of {} bytes)",
            key.len()
        ));
    }
    DeadLetter {
        reason,
        key: l.key.as_deref().map(cut),
        ..l.clone()
    }
}

/// The bytes a letter's provenance takes as text (header values), a bound.
fn provenance_bytes(pipeline: &str, l: &DeadLetter) -> usize {
    // Numbers and times as text, and the cut columns, take under 200 bytes together.
    pipeline.len()
        + l.stage.len()
        + l.reason.len()
        + l.partition.name.len()
        + l.key.as_ref().map_or(0, String::len)
        + 200
}

/// Why and where rows of a batch failed, for [`letters_of_rows`].
pub struct RowFailure<'a> {
    pub stage: &'a Arc<str>,
    pub class: ErrorClass,
    pub reason: &'a str,
    pub attempts: u32,
    /// Milliseconds since the epoch (the letters' `last_failed_at` is now).
    pub first_failed_at: i64,
}

/// The rows of `batch` at `rows` as dead letters of `partition`: each row as JSON (record
/// and metadata columns), with the offset and key its metadata columns hold.
pub fn letters_of_rows(
    batch: &RecordBatch,
    rows: &[u32],
    partition: &Arc<PartitionInfo>,
    failure: RowFailure<'_>,
) -> Result<Vec<DeadLetter>> {
    let selected = if rows.len() == batch.num_rows() {
        batch.clone()
    } else {
        let indices = arrow::array::UInt32Array::from(rows.to_vec());
        arrow::compute::take_record_batch(batch, &indices)
            .map_err(|e| Error::arrow("selecting failed rows", e))?
    };
    let payloads = row_json(&selected)?;
    let keys = selected
        .column_by_name(crate::batch::KEY)
        .and_then(|c| c.as_string_opt::<i32>().cloned());
    let now = now_ms();
    Ok(payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| DeadLetter {
            stage: failure.stage.clone(),
            class: failure.class,
            reason: failure.reason.to_string(),
            attempts: failure.attempts,
            partition: partition.clone(),
            offset: crate::batch::offset_at(&selected, i),
            key: keys
                .as_ref()
                .filter(|k| k.is_valid(i))
                .map(|k| k.value(i).to_string()),
            first_failed_at: failure.first_failed_at.min(now),
            last_failed_at: now,
            payload,
        })
        .collect())
}

/// Each row as a JSON object (record and metadata columns), for dead letters.
fn row_json(batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
    let mut buf = Vec::new();
    {
        let mut writer = arrow::json::writer::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::LineDelimited>(&mut buf);
        writer
            .write(batch)
            .and_then(|()| writer.finish())
            .map_err(|e| Error::arrow("writing failed rows as JSON", e))?;
    }
    Ok(buf
        .split(|b| *b == b'\n')
        .take(batch.num_rows())
        .map(<[u8]>::to_vec)
        .collect())
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
    /// Writes the letters, each cut to fit the sink's largest message if it has one.
    pub async fn write(&mut self, pipeline: &str, letters: &[DeadLetter]) -> Result<()> {
        let max = self.sink.max_message_bytes().unwrap_or(usize::MAX);
        let batch = to_batch_within(pipeline, letters, max)?;
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

    #[test]
    fn letters_larger_than_the_sink_takes_are_cut_with_their_size_and_checksum() {
        let letter = |payload: Vec<u8>| DeadLetter {
            stage: SOURCE_STAGE.into(),
            class: ErrorClass::Decode,
            reason: "not JSON".into(),
            attempts: 1,
            partition: Arc::new(PartitionInfo {
                id: 0,
                name: "in/0".into(),
            }),
            offset: Some(3),
            key: None,
            first_failed_at: 1,
            last_failed_at: 1,
            payload,
        };
        let big = vec![b'x'; 1_000_500];
        let batch = to_batch_within(
            "p",
            &[letter(b"small".to_vec()), letter(big.clone())],
            1_000_000,
        )
        .unwrap();
        let payload = batch.column(0).as_binary::<i32>();
        assert_eq!(payload.value(0), b"small");
        assert!(payload.value(1).len() < 1_000_000 - 1024);
        assert!(big.starts_with(payload.value(1)));
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let sizes = column("payload_size");
        let sizes = sizes.as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!((sizes.value(0), sizes.value(1)), (5, 1_000_500));
        let cut = column("payload_cut");
        let cut = cut.as_boolean();
        assert_eq!((cut.value(0), cut.value(1)), (false, true));
        let checksum = column("payload_checksum");
        let checksum = checksum.as_string::<i32>();
        assert!(checksum.is_null(0));
        assert_eq!(
            checksum.value(1),
            format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&big))
        );
        // Text sinks get the same provenance.
        let text = text_batch(&batch).unwrap();
        assert!(text.column_by_name("payload_cut").is_some());
    }

    #[test]
    fn a_provenance_too_large_for_the_sink_is_cut_too() {
        let letter = DeadLetter {
            stage: SOURCE_STAGE.into(),
            class: ErrorClass::Decode,
            reason: "é".repeat(300_000),
            attempts: 1,
            partition: Arc::new(PartitionInfo {
                id: 0,
                name: "in/0".into(),
            }),
            offset: Some(3),
            key: Some("k".repeat(999_900)),
            first_failed_at: 1,
            last_failed_at: 1,
            payload: b"x".to_vec(),
        };
        let batch = to_batch_within("p", &[letter], 1_000_000).unwrap();
        let text = |name: &str| {
            batch
                .column_by_name(name)
                .unwrap()
                .as_string::<i32>()
                .value(0)
                .to_string()
        };
        assert_eq!(text("key").len(), SHORT_PROVENANCE);
        assert!(text("error").contains("the error was 600000 bytes"));
        assert!(text("error").contains("the key was cut to 4096 of 999900 bytes"));
        let total: usize = batch
            .columns()
            .iter()
            .map(|c| c.get_array_memory_size())
            .sum();
        assert!(total < 1_000_000, "{total}");
    }
}
