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
//! `partition`, `offset`, `key` (the record's key bytes), `first_failed_at`,
//! `last_failed_at`, `payload_size`, `payload_cut`, `payload_checksum`, `headers` (the
//! record's own headers, in order, values as bytes; null when it had none).
//!
//! A Kafka dead-letter sink sends `payload` as the message value and `key` as its key, both
//! as they came, then the record's own headers as they came, then the rest as headers,
//! the last of them `headers`: how many of the message's headers, from the first, are the
//! record's own. So `sluice dlq replay --to-topic` sends a record back with the key,
//! headers and bytes it had, whatever bytes they are. The other sinks get [`text_batch`]
//! ([`text`]).
//!
//! The key and headers are exact for records that failed at decoding, the ones replayed
//! as they came. A row that failed in a stage carries its `_key` and `_headers` columns as
//! the stage saw them, when the stage kept them: `_key` is text unless the Kafka source
//! says `key_format: bytes`, so a key that is not UTF-8 has replacement characters there.
//!
//! # Dead letters larger than their sink allows
//! A sink may take messages of a bounded size (a Kafka producer's `message.max.bytes`,
//! 1,000,000 bytes by default), and a record near that size that fails becomes a larger
//! dead letter. Refusing it would stop the run on it again at every restart, so a letter
//! that does not fit is written with its payload cut to fit: `payload_cut` is true,
//! `payload_size` holds the whole payload's size and `payload_checksum` its XXH3-64 (as
//! `xxh3:` and 16 hex digits), next to its source and offset, so the whole record can be
//! found again. A letter whose provenance alone is too large has its key and reason cut
//! and its headers left out, the error saying so, and is marked `payload_cut` too: it no
//! longer holds its record as it came. `sluice dlq replay` refuses letters marked cut.
//!
//! A sink may also refuse a letter it cannot take at all (a Kinesis record over 1 MiB once
//! written as text and base64): [`DeadLetterSink::write`] writes it again cut to half its
//! size, and again, and stops the run naming it when even [`MIN_CUT`] bytes are refused,
//! or when a cut letter is refused for the same reason as before (not its size: an empty
//! Kinesis partition key). A letter is never dropped.

mod text;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

pub use self::text::{decode_base64, encode_base64, text_batch, text_schema};
use crate::batch::{PartitionInfo, headers_type, timestamp_type};
use crate::{Error, ErrorClass, Result};

/// The stage name of records that failed at decoding.
pub const SOURCE_STAGE: &str = "source";

/// The provenance columns, in order, after `payload`.
pub const PROVENANCE: [&str; 15] = [
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
    "headers",
];

/// A record's header as it came: its name and its value's bytes (`None`: a null value).
pub type Header = (Box<str>, Option<Box<[u8]>>);

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
    /// The record's key as it came (bytes, whatever they are).
    pub key: Option<Vec<u8>>,
    /// The record's own headers, in order (Kafka's; none for the other sources).
    pub headers: Vec<Header>,
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
        Field::new("key", DataType::Binary, true),
        Field::new("first_failed_at", timestamp_type(), false),
        Field::new("last_failed_at", timestamp_type(), false),
        Field::new("payload_size", DataType::Int64, false),
        Field::new("payload_cut", DataType::Boolean, false),
        Field::new("payload_checksum", DataType::Utf8, true),
        Field::new("headers", headers_type(), true),
    ]
}

/// The schema of dead-letter batches as the engine makes them.
pub fn schema() -> SchemaRef {
    let mut fields = vec![Field::new("payload", DataType::Binary, false)];
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
    // A provenance too large on its own (a huge key, reason or headers) is cut first; a
    // letter whose key or headers were cut no longer holds its record as it came, and is
    // marked cut as one whose payload was.
    let fits = |l: &DeadLetter| provenance_bytes(pipeline, l) + MESSAGE_MARGIN <= max_message;
    let mut whole = vec![true; letters.len()];
    let letters: std::borrow::Cow<[DeadLetter]> = if letters.iter().all(fits) {
        letters.into()
    } else {
        letters
            .iter()
            .zip(&mut whole)
            .map(|(l, whole)| {
                if fits(l) {
                    l.clone()
                } else {
                    let short = with_short_provenance(l);
                    *whole = short.key == l.key && short.headers.len() == l.headers.len();
                    short
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
    for (l, whole) in letters.iter().zip(whole) {
        let room = max_message.saturating_sub(provenance_bytes(pipeline, l) + MESSAGE_MARGIN);
        size.append_value(l.payload.len() as i64);
        if l.payload.len() <= room {
            payload.append_value(&l.payload);
            cut.append_value(!whole);
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
        Arc::new(headers_column(letters)),
    ]);
    RecordBatch::try_new(schema(), columns).map_err(|e| Error::arrow("making dead letters", e))
}

/// The most of a key or reason a letter keeps when its provenance alone is too large.
const SHORT_PROVENANCE: usize = 4096;

/// `l` with its key and reason cut to [`SHORT_PROVENANCE`] bytes and its headers left out,
/// the reason saying so.
fn with_short_provenance(l: &DeadLetter) -> DeadLetter {
    // Text is cut where a character starts; a key that is not text, anywhere.
    let cut = |bytes: &[u8]| {
        let mut end = SHORT_PROVENANCE.min(bytes.len());
        if let Ok(text) = std::str::from_utf8(bytes) {
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        bytes[..end].to_vec()
    };
    let mut reason = String::from_utf8(cut(l.reason.as_bytes())).expect("cut at a character");
    if reason.len() < l.reason.len() {
        reason.push_str(&format!("… (the error was {} bytes)", l.reason.len()));
    }
    if let Some(key) = l.key.as_ref().filter(|k| k.len() > SHORT_PROVENANCE) {
        reason.push_str(&format!(
            " (the key was cut to {SHORT_PROVENANCE} of {} bytes)",
            key.len()
        ));
    }
    if !l.headers.is_empty() {
        reason.push_str(&format!(
            " (its {} headers, {} bytes, were left out)",
            l.headers.len(),
            headers_bytes(&l.headers)
        ));
    }
    DeadLetter {
        reason,
        key: l.key.as_deref().map(cut),
        headers: Vec::new(),
        ..l.clone()
    }
}

/// The bytes a letter's provenance takes as header values and key, a bound.
fn provenance_bytes(pipeline: &str, l: &DeadLetter) -> usize {
    // Numbers and times as text, and the cut columns, take under 200 bytes together.
    pipeline.len()
        + l.stage.len()
        + l.reason.len()
        + l.partition.name.len()
        + l.key.as_ref().map_or(0, Vec::len)
        + headers_bytes(&l.headers)
        + 200
}

/// The bytes headers take in a message: names, values, and two lengths each.
fn headers_bytes(headers: &[Header]) -> usize {
    headers
        .iter()
        .map(|(name, value)| 10 + name.len() + value.as_ref().map_or(0, |v| v.len()))
        .sum()
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
/// and metadata columns), with the offset, key and headers its metadata columns hold.
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
    let key_at = key_reader(&selected);
    let headers_at = headers_reader(&selected);
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
            key: key_at(i),
            headers: headers_at(i),
            first_failed_at: failure.first_failed_at.min(now),
            last_failed_at: now,
            payload,
        })
        .collect())
}

/// The `_key` of a row of `batch`, as bytes: binary as it is, anything else as text (none
/// without the column, or of a type that has no text).
fn key_reader(batch: &RecordBatch) -> impl Fn(usize) -> Option<Vec<u8>> {
    let keys = batch
        .column_by_name(crate::batch::KEY)
        .and_then(|c| crate::batch::bytes_column(c).ok());
    move |i| {
        let k = keys.as_ref().filter(|k| k.is_valid(i))?;
        Some(k.value(i).to_vec())
    }
}

/// The `_headers` of a row of `batch` (none without the column).
fn headers_reader(batch: &RecordBatch) -> impl Fn(usize) -> Vec<Header> + '_ {
    let map = batch
        .column_by_name(crate::batch::HEADERS)
        .and_then(|c| c.as_map_opt());
    move |i| {
        let Some(map) = map.filter(|m| m.is_valid(i)) else {
            return Vec::new();
        };
        let entries = map.value(i);
        let (Some(names), Some(values)) = (
            entries.column(0).as_string_opt::<i32>(),
            entries.column(1).as_binary_opt::<i32>(),
        ) else {
            return Vec::new();
        };
        (0..entries.len())
            .map(|j| {
                let value = values.is_valid(j).then(|| values.value(j).into());
                (names.value(j).into(), value)
            })
            .collect()
    }
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
    let mut key = BinaryBuilder::new();
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

/// The letters' headers as a `_headers` map column; null for a letter without headers.
fn headers_column(letters: &[DeadLetter]) -> arrow::array::MapArray {
    let mut map = crate::batch::headers_builder();
    for l in letters {
        for (name, value) in &l.headers {
            map.keys().append_value(name);
            map.values().append_option(value.as_deref());
        }
        map.append(!l.headers.is_empty())
            .expect("keys and values appended in pairs");
    }
    map.finish()
}

/// The pipeline's dead-letter sink, and the form it takes records in.
pub struct DeadLetterSink {
    pub sink: Box<dyn crate::sink::Sink>,
    /// `true`: [`text_batch`] rows (files, stdout); `false`: [`schema`] rows (Kafka, which
    /// sends the payload bytes as they are).
    pub text: bool,
}

/// The smallest size a letter a sink refuses is cut to before the run stops on it.
pub const MIN_CUT: usize = 16 << 10;

impl DeadLetterSink {
    /// Writes the letters, each cut to fit the sink's largest message if it has one; the
    /// ones it refuses even so, again cut smaller (the module's essay).
    pub async fn write(&mut self, pipeline: &str, letters: &[DeadLetter]) -> Result<()> {
        let mut max = self.sink.max_message_bytes().unwrap_or(usize::MAX);
        let mut todo: std::borrow::Cow<[DeadLetter]> = letters.into();
        // Why each letter of `todo` was refused the last time: refused again for the same
        // reason once cut, it is not its size the sink refuses (an empty partition key).
        let mut before: Vec<String> = Vec::new();
        loop {
            let batch = to_batch_within(pipeline, &todo, max)?;
            let batch = if self.text {
                text_batch(&batch)?
            } else {
                batch
            };
            self.sink.write(batch).await?;
            let refused = self.sink.take_refused();
            let Some(first) = refused.first() else {
                return Ok(());
            };
            let largest = refused
                .iter()
                .map(|(r, _)| {
                    let l = &todo[*r as usize];
                    l.payload.len() + provenance_bytes(pipeline, l) + MESSAGE_MARGIN
                })
                .max()
                .unwrap_or(0);
            let again = refused
                .iter()
                .find(|(r, why)| before.get(*r as usize) == Some(why));
            if max.min(largest) <= MIN_CUT || again.is_some() {
                let (row, why) = again.unwrap_or(first);
                let l = &todo[*row as usize];
                return Err(Error::Refused {
                    system: "dead-letter sink",
                    message: format!(
                        "it refuses the dead letter of {}{} (stage {}), also at {} bytes: {why}",
                        l.partition.name,
                        l.offset.map_or(String::new(), |o| format!(" offset {o}")),
                        l.stage,
                        max.min(largest)
                    ),
                });
            }
            max = (max.min(largest) / 2).max(MIN_CUT);
            before = refused.iter().map(|(_, why)| why.clone()).collect();
            todo = refused
                .iter()
                .map(|(r, _)| todo[*r as usize].clone())
                .collect::<Vec<_>>()
                .into();
        }
    }
}

#[cfg(test)]
mod tests;
