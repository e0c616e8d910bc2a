//! Debezium change events into rows: `format: debezium` on a Kafka source.
//!
//! ```yaml
//! source:
//!   type: kafka
//!   topics: [dbserver1.inventory.customers]
//!   format: debezium
//!   schema:                      # the table's columns
//!     - { name: id, type: int64 }
//!     - { name: email, type: utf8 }
//!   debezium: { tombstones: skip }   # or keep
//! ```
//! Each event (Debezium's JSON envelope, with or without the `schema`/`payload` wrapper
//! of `schemas.enable`) becomes one row: the table's columns from the `after` image (from
//! `before` for a delete), `_op` (`c` insert, `u` update, `d` delete, `r` snapshot read),
//! `_before` (the before image, a struct; null for inserts and reads) and `_ts_ms` (when
//! the connector saw the change). An update is one row, not a delete and an insert. The
//! table's columns are all nullable: a delete's before image holds only the key when
//! the table's replica identity is the key.
//!
//! A Kafka tombstone (a null value after a delete, for log compaction) is skipped, or with
//! `tombstones: keep` a row with `_op` = `tombstone` and null columns (the key is in
//! `_key`). An event that is not a change event (no `op`), a truncate (`t`: no row to
//! show), or a change without its image is a bad record (a dead letter naming why).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, new_null_array,
};
use arrow::compute::kernels::cmp::eq;
use arrow::compute::kernels::zip::zip;
use arrow::compute::{cast, filter_record_batch, interleave_record_batch, is_not_null};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use serde::Deserialize;
use sluice_engine::{Error, Result};

use crate::avro::{AvroDecoder, AvroFormat};
use crate::json::JsonDecoder;

/// `debezium:` of a Kafka or Kinesis source (Kinesis has no null records: on Kinesis
/// `tombstones` never applies, and an empty record is a dead letter).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// What a tombstone (a null value) becomes: `skip` (the default) or `keep`.
    #[serde(default)]
    pub tombstones: Tombstones,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tombstones {
    #[default]
    Skip,
    Keep,
}

/// The operation column, the before image and the change's time.
pub const OP: &str = "_op";
pub const BEFORE: &str = "_before";
pub const TS_MS: &str = "_ts_ms";

/// The columns of the rows: the table's (nullable), `_op`, `_before`, `_ts_ms`.
pub fn records_schema(table: &Schema) -> SchemaRef {
    let image = image_fields(table);
    let mut fields: Vec<Field> = image.iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(OP, DataType::Utf8, false));
    fields.push(Field::new(BEFORE, DataType::Struct(image), true));
    fields.push(Field::new(
        TS_MS,
        sluice_engine::batch::timestamp_type(),
        true,
    ));
    Arc::new(Schema::new(fields))
}

/// The table's columns, each nullable.
fn image_fields(table: &Schema) -> Fields {
    table
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect()
}

/// One partition's decoder of change events.
pub struct DebeziumDecoder {
    envelopes: Envelopes,
    records: SchemaRef,
    tombstones: Tombstones,
}

/// How envelopes are read.
enum Envelopes {
    /// JSON: `before`, `after`, `op`, `ts_ms`, at the top and under `payload`.
    Json(JsonDecoder),
    /// Avro (Debezium's AvroConverter, through a registry), in the envelope's reader schema.
    Avro(AvroDecoder),
}

/// The table's columns of Debezium's Avro envelope `envelope`: the fields of its `after`
/// record; why not, when it is no envelope.
pub fn table_of(envelope: &Schema) -> Result<Schema> {
    let no = |what: &str| {
        Error::Plan(format!(
            "the Avro schema is not a Debezium envelope: {what} (it has: {})",
            envelope
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    let after = envelope
        .field_with_name("after")
        .map_err(|_| no("no `after` field"))?;
    let DataType::Struct(fields) = after.data_type() else {
        return Err(no("`after` is not a record"));
    };
    for name in ["before", "op"] {
        envelope
            .field_with_name(name)
            .map_err(|_| no(&format!("no `{name}` field")))?;
    }
    Ok(Schema::new(fields.clone()))
}

/// What [`DebeziumDecoder::decode_each`] made of a chunk.
pub struct Decoded {
    /// A row per message not bad or skipped, in message order.
    pub rows: Result<RecordBatch>,
    /// Messages that are not change events, by index, with why (ascending).
    pub bad: Vec<(usize, String)>,
    /// Tombstones skipped, by index (ascending).
    pub skipped: Vec<usize>,
}

impl DebeziumDecoder {
    pub fn new(table: &Schema, config: &DebeziumConfig, max_record: usize) -> Self {
        let image = DataType::Struct(image_fields(table));
        let change = |extra: Vec<Field>| {
            let mut fields = vec![
                Field::new("before", image.clone(), true),
                Field::new("after", image.clone(), true),
                Field::new("op", DataType::Utf8, true),
                Field::new("ts_ms", DataType::Int64, true),
            ];
            fields.extend(extra);
            fields
        };
        let payload = Field::new("payload", DataType::Struct(change(vec![]).into()), true);
        let envelope = Arc::new(Schema::new(change(vec![payload])));
        DebeziumDecoder {
            envelopes: Envelopes::Json(JsonDecoder::new(envelope).with_max_record(max_record)),
            records: records_schema(table),
            tombstones: config.tombstones,
        }
    }

    /// A decoder of Debezium's Avro envelopes, read in `format`'s reader schema (the
    /// envelope's `.avsc`), whose `after` record has the fields of `table` ([`table_of`]).
    pub fn avro(
        format: Arc<AvroFormat>,
        table: &Schema,
        config: &DebeziumConfig,
        max_record: usize,
    ) -> Self {
        DebeziumDecoder {
            envelopes: Envelopes::Avro(AvroDecoder::new(format, max_record)),
            records: records_schema(table),
            tombstones: config.tombstones,
        }
    }

    /// Avro: fetches the writer schemas the messages name (see [`AvroDecoder::prepare`]).
    pub async fn prepare<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        match &mut self.envelopes {
            Envelopes::Avro(avro) => avro.prepare(payloads).await,
            Envelopes::Json(_) => Ok(()),
        }
    }

    /// Decodes each message of `payloads` into a row, naming those that are not change
    /// events; tombstones (the messages `tombstone` says have a null value: an empty value
    /// is no tombstone, and no event) are skipped or kept as configured.
    pub fn decode_each(
        &mut self,
        payloads: &[&[u8]],
        tombstone: impl Fn(usize) -> bool,
    ) -> Decoded {
        let (tombstones, events): (Vec<usize>, Vec<usize>) =
            (0..payloads.len()).partition(|&i| tombstone(i));
        let bodies: Vec<&[u8]> = events.iter().map(|&i| payloads[i]).collect();
        let (envelopes, unread) = match &mut self.envelopes {
            Envelopes::Json(json) => {
                let (envelopes, unread) = json.decode_each(&bodies);
                let envelopes = envelopes.map_err(|e| {
                    Error::Internal(format!("decoding records that decoded alone: {}", e.reason))
                });
                (envelopes, unread)
            }
            Envelopes::Avro(avro) => avro.decode_each(&bodies),
        };
        let mut bad: Vec<(usize, String)> = unread
            .into_iter()
            .map(|(i, why)| (events[i], why))
            .collect();
        let read: Vec<usize> = {
            let unread: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
            events
                .into_iter()
                .filter(|i| unread.binary_search(i).is_err())
                .collect()
        };
        let rows = envelopes
            .and_then(|envelopes| self.rows(&envelopes))
            .and_then(|(rows, invalid)| {
                // Events without a row: dead letters; the others, with the tombstones kept.
                let mut keep = vec![true; rows.num_rows()];
                for (row, why) in invalid {
                    keep[row] = false;
                    bad.push((read[row], why));
                }
                let rows = filter_record_batch(&rows, &BooleanArray::from(keep.clone()))
                    .map_err(|e| Error::arrow("keeping change events", e))?;
                let read: Vec<usize> = read
                    .iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|(i, _)| *i)
                    .collect();
                self.with_tombstones(rows, &read, &tombstones)
            });
        bad.sort_by_key(|(i, _)| *i);
        let skipped = match self.tombstones {
            Tombstones::Skip => tombstones,
            Tombstones::Keep => Vec::new(),
        };
        Decoded { rows, bad, skipped }
    }

    /// The rows of decoded envelopes, and the envelopes that hold no row change (by row,
    /// with why).
    fn rows(&self, envelopes: &RecordBatch) -> Result<(RecordBatch, Vec<(usize, String)>)> {
        fn arrow(what: &'static str) -> impl Fn(arrow::error::ArrowError) -> Error {
            move |e| Error::arrow(format!("Debezium events: {what}"), e)
        }
        let (before, after, op, ts) = match &self.envelopes {
            Envelopes::Json(_) => {
                let payload = envelopes.column(4).as_struct();
                // With `schemas.enable`, the change is under `payload`; without, at the top.
                let top = is_not_null(envelopes.column(2)).map_err(arrow("op"))?;
                let pick = |i: usize| -> Result<ArrayRef> {
                    zip(&top, envelopes.column(i), payload.column(i)).map_err(arrow("envelope"))
                };
                (pick(0)?, pick(1)?, pick(2)?, pick(3)?)
            }
            Envelopes::Avro(_) => {
                let column = |name: &str| envelopes.column_by_name(name).cloned();
                let absent = || new_null_array(&DataType::Int64, envelopes.num_rows());
                (
                    column("before").expect("checked by table_of"),
                    column("after").expect("checked by table_of"),
                    column("op").expect("checked by table_of"),
                    column("ts_ms").unwrap_or_else(absent),
                )
            }
        };
        // On the rows' own types (an Avro image's fields may be non-nullable).
        let before = cast(
            &before,
            self.records
                .field_with_name(BEFORE)
                .expect("a column")
                .data_type(),
        )
        .map_err(arrow("before"))?;
        let after = cast(&after, before.data_type()).map_err(arrow("after"))?;
        // `op` as text whatever the envelope's schema made it (an Avro enum is a dictionary;
        // a registry's schema could make it anything): a type that is no text is an error,
        // never a panic at every batch.
        let op = cast(&op, &DataType::Utf8).map_err(arrow("op"))?;
        let ops = op.as_string::<i32>();
        let mut invalid = Vec::new();
        for row in 0..envelopes.num_rows() {
            let why = match ops.is_valid(row).then(|| ops.value(row)) {
                None => Some("not a Debezium change event: no `op` (nor `payload.op`)".to_string()),
                Some("c" | "u" | "r") if after.is_null(row) => Some(format!(
                    "a Debezium `{}` event without its `after` image",
                    ops.value(row)
                )),
                Some("d") if before.is_null(row) => {
                    Some("a Debezium `d` event without its `before` image".to_string())
                }
                Some("c" | "u" | "r" | "d") => None,
                Some("t") => {
                    Some("a Debezium truncate (`t`): the table was emptied, no row to show".into())
                }
                Some(other) => Some(format!("Debezium op `{other}` is not c, u, d or r")),
            };
            if let Some(why) = why {
                invalid.push((row, why));
            }
        }
        let deleted = eq(ops, &StringArray::new_scalar("d")).map_err(arrow("op"))?;
        let image = zip(&deleted, &before, &after).map_err(arrow("images"))?;
        let mut columns: Vec<ArrayRef> = image.as_struct().columns().to_vec();
        columns.push(cast(&op, &DataType::Utf8).map_err(arrow("op"))?);
        columns.push(before);
        columns.push(cast(&ts, &sluice_engine::batch::timestamp_type()).map_err(arrow("ts_ms"))?);
        // `_op` is not null in the rows kept; the ones without are dropped by the caller.
        let schema = Arc::new(Schema::new(
            self.records
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let rows = RecordBatch::try_new(schema, columns).map_err(arrow("rows"))?;
        Ok((rows, invalid))
    }

    /// `rows` (of the messages `read`), with a row for each kept tombstone at its place,
    /// on the records' schema.
    fn with_tombstones(
        &self,
        rows: RecordBatch,
        read: &[usize],
        tombstones: &[usize],
    ) -> Result<RecordBatch> {
        let arrow = |e| Error::arrow("Debezium rows", e);
        let rows = if self.tombstones == Tombstones::Skip || tombstones.is_empty() {
            rows
        } else {
            let schema = rows.schema();
            let mut columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|f| new_null_array(f.data_type(), 1))
                .collect();
            let op = schema.index_of(OP).map_err(arrow)?;
            columns[op] = Arc::new(StringArray::from(vec!["tombstone"]));
            let tombstone = RecordBatch::try_new(schema, columns).map_err(arrow)?;
            // Message order: each read row and each tombstone where its message was.
            let mut order: Vec<(usize, (usize, usize))> = read
                .iter()
                .enumerate()
                .map(|(row, &i)| (i, (0, row)))
                .chain(tombstones.iter().map(|&i| (i, (1, 0))))
                .collect();
            order.sort_unstable_by_key(|(i, _)| *i);
            let indices: Vec<(usize, usize)> = order.into_iter().map(|(_, at)| at).collect();
            interleave_record_batch(&[&rows, &tombstone], &indices).map_err(arrow)?
        };
        RecordBatch::try_new(self.records.clone(), rows.columns().to_vec()).map_err(arrow)
    }
}

#[cfg(test)]
mod tests;
