//! Batches and the metadata columns that travel with them.
//!
//! Every source appends four columns to the records it reads: `_partition` (UInt32),
//! `_offset` (Int64, the record's position in its partition), `_key` (Utf8, nullable; Binary
//! for a Kafka source with `key_format: bytes`) and
//! `_timestamp` (event time in milliseconds, UTC, nullable). Stages see and may use them, so
//! every output and every failure can be traced to its input. Sinks leave them out unless a
//! sink selects them.
//!
//! Batches move between tasks inside an [`Envelope`], which also records the partition and
//! the offset range read, because a stage may filter out every row that carried them.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, Int64Array, MapBuilder, MapFieldNames, RecordBatch,
    StringBuilder, UInt32Array, new_null_array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::dead_letter::DeadLetter;
use crate::{Error, Result};

pub const PARTITION: &str = "_partition";
pub const OFFSET: &str = "_offset";
pub const KEY: &str = "_key";
pub const TIMESTAMP: &str = "_timestamp";

/// Kafka only: the record's topic.
pub const TOPIC: &str = "_topic";
/// Kafka only: the record's headers, a map from name to bytes.
pub const HEADERS: &str = "_headers";
/// Kinesis only: the record's sequence number, exact, as text (`SEQUENCE`, or
/// `SEQUENCE:SUB` for a user record of a KPL aggregate); `_offset` counts the shard's
/// records from the first one this pipeline read.
pub const SEQUENCE: &str = "_sequence";

/// The names of the metadata columns every source appends, in order.
pub const METADATA_COLUMNS: [&str; 4] = [PARTITION, OFFSET, KEY, TIMESTAMP];
/// Every metadata column name: the common four, then the ones some sources add.
pub const ALL_METADATA_COLUMNS: [&str; 7] =
    [PARTITION, OFFSET, KEY, TIMESTAMP, TOPIC, HEADERS, SEQUENCE];

pub fn is_metadata(name: &str) -> bool {
    ALL_METADATA_COLUMNS.contains(&name)
}

pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `_headers`: header name to value bytes; a record without headers has an empty map.
pub fn headers_type() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("keys", DataType::Utf8, false),
                Field::new("values", DataType::Binary, true),
            ]
            .into(),
        ),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

/// A column as bytes: binary of any form as it is, anything else as its text (a key of any
/// type, `_key` of either form).
pub fn bytes_column(column: &ArrayRef) -> Result<arrow::array::BinaryArray> {
    use arrow::array::AsArray;
    if let Some(bytes) = column.as_binary_opt::<i32>() {
        return Ok(bytes.clone());
    }
    // Not through text: a cast to text turns bytes that are not UTF-8 into nulls, so a
    // `LargeBinary` or `BinaryView` key (DataFusion makes views) lost its bytes.
    let values = match column.data_type() {
        DataType::Dictionary(_, values) => &**values,
        t => t,
    };
    if matches!(
        values,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    ) {
        let bytes = arrow::compute::cast(column, &DataType::Binary)
            .map_err(|e| Error::arrow("a binary column as bytes", e))?;
        return Ok(bytes.as_binary::<i32>().clone());
    }
    let bytes = arrow::compute::cast(column, &DataType::Utf8)
        .and_then(|text| arrow::compute::cast(&text, &DataType::Binary))
        .map_err(|e| Error::arrow("a column as bytes", e))?;
    Ok(bytes.as_binary::<i32>().clone())
}

/// A builder of `_headers` columns ([`headers_type`]).
pub fn headers_builder() -> MapBuilder<StringBuilder, BinaryBuilder> {
    let names = MapFieldNames {
        entry: "entries".into(),
        key: "keys".into(),
        value: "values".into(),
    };
    MapBuilder::new(Some(names), StringBuilder::new(), BinaryBuilder::new())
}

/// The metadata fields every source appends, then `extra` (e.g. `_topic`, `_headers`).
pub fn metadata_fields_with(extra: &[Field]) -> Vec<Field> {
    let mut fields = metadata_fields().to_vec();
    fields.extend_from_slice(extra);
    fields
}

fn metadata_fields() -> [Field; 4] {
    [
        Field::new(PARTITION, DataType::UInt32, false),
        Field::new(OFFSET, DataType::Int64, false),
        Field::new(KEY, DataType::Utf8, true),
        Field::new(TIMESTAMP, timestamp_type(), true),
    ]
}

/// The schema a source produces: its record fields followed by the metadata columns.
pub fn with_metadata(records: &Schema) -> Result<SchemaRef> {
    with_metadata_fields(records, &metadata_fields())
}

/// Like [`with_metadata`], with the given metadata fields.
pub fn with_metadata_fields(records: &Schema, metadata: &[Field]) -> Result<SchemaRef> {
    let mut fields: Vec<Field> = records
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for f in &fields {
        if is_metadata(f.name()) {
            return Err(Error::Plan(format!(
                "the record field `{}` has the name of a metadata column; rename it",
                f.name()
            )));
        }
    }
    fields.extend_from_slice(metadata);
    Ok(Arc::new(Schema::new(fields)))
}

/// What a stage or output with several inputs gets of one batch of records: the inputs'
/// rows as one batch, in the order of the records (by `_offset`, when the rows have it;
/// in the order of the inputs otherwise), so that each partition's order holds where
/// branches meet again. `None` when every input is empty. One input is passed on as it is.
pub fn merge_inputs(mut batches: Vec<RecordBatch>) -> Result<Option<RecordBatch>> {
    batches.retain(|b| b.num_rows() > 0);
    if batches.len() <= 1 {
        return Ok(batches.pop());
    }
    let schema = batches[0].schema();
    let merged = arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| Error::arrow("joining the rows of several inputs", e))?;
    let Ok(offsets) = schema.index_of(OFFSET) else {
        return Ok(Some(merged));
    };
    let order = arrow::compute::sort_to_indices(merged.column(offsets), None, None)
        .map_err(|e| Error::arrow("ordering the rows of several inputs", e))?;
    arrow::compute::take_record_batch(&merged, &order)
        .map(Some)
        .map_err(|e| Error::arrow("ordering the rows of several inputs", e))
}

/// Where a batch came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Index of the partition within its source.
    pub id: u32,
    /// A name for people: a file path, `topic/3`, `generator/2`.
    pub name: Arc<str>,
}

/// A batch in flight with its provenance.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub partition: Arc<PartitionInfo>,
    /// Offsets read from the partition for this batch, whether or not rows survive stages.
    pub offsets: Range<i64>,
    pub batch: RecordBatch,
    /// Records of this range that failed (at decoding or in a stage), on their way to the
    /// dead-letter sink.
    pub dead: Vec<DeadLetter>,
}

impl Envelope {
    /// "data/views.jsonl offsets 0..8191" — for error messages.
    pub fn origin(&self) -> String {
        if self.offsets.end - self.offsets.start == 1 {
            format!("{} offset {}", self.partition.name, self.offsets.start)
        } else {
            format!(
                "{} offsets {}..={}",
                self.partition.name,
                self.offsets.start,
                self.offsets.end - 1
            )
        }
    }
}

/// Appends the metadata columns to decoded records.
///
/// `key` and `timestamp` default to nulls when the source has none, as do any further
/// metadata columns of `schema`. `records` must not
/// already hold metadata columns; `schema` is the source's full schema.
pub fn append_metadata(
    schema: &SchemaRef,
    records: RecordBatch,
    partition: u32,
    first_offset: i64,
    key: Option<ArrayRef>,
    timestamp: Option<ArrayRef>,
) -> Result<RecordBatch> {
    let n = records.num_rows();
    let offsets = Int64Array::from_iter_values(first_offset..first_offset + n as i64);
    append_metadata_at(schema, records, partition, offsets, key, timestamp)
}

/// Like [`append_metadata`], with each row's offset given (when some records of a range
/// were left out).
pub fn append_metadata_at(
    schema: &SchemaRef,
    records: RecordBatch,
    partition: u32,
    offsets: Int64Array,
    key: Option<ArrayRef>,
    timestamp: Option<ArrayRef>,
) -> Result<RecordBatch> {
    let n = records.num_rows();
    let mut columns = records.columns().to_vec();
    columns.push(Arc::new(UInt32Array::from_value(partition, n)));
    columns.push(Arc::new(offsets));
    columns.push(key.unwrap_or_else(|| new_null_array(&DataType::Utf8, n)));
    columns.push(timestamp.unwrap_or_else(|| new_null_array(&timestamp_type(), n)));
    // Metadata some sources add (`_topic`, `_headers`): null where a record has none.
    for field in schema.fields().iter().skip(columns.len()) {
        columns.push(new_null_array(field.data_type(), n));
    }
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::arrow("attaching metadata columns", e))
}

/// The `_offset` of a row, when the batch still carries the column (a SQL stage may have
/// dropped it).
pub fn offset_at(batch: &RecordBatch, row: usize) -> Option<i64> {
    batch
        .column_by_name(OFFSET)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .filter(|c| row < c.len())
        .map(|c| c.value(row))
}

/// Which columns a sink writes: all record columns, plus the metadata columns it names.
#[derive(Debug, Clone, Default)]
pub struct ColumnSelection {
    pub keep_metadata: Vec<String>,
}

impl ColumnSelection {
    /// The schema [`ColumnSelection::apply`] gives batches of `schema`.
    pub fn apply_schema(&self, schema: &Schema) -> Schema {
        Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !is_metadata(f.name()) || self.keep_metadata.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        )
    }

    /// Drops metadata columns that were not selected. Cheap: columns are shared, not copied.
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let schema = batch.schema();
        let keep: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| !is_metadata(f.name()) || self.keep_metadata.contains(f.name()))
            .map(|(i, _)| i)
            .collect();
        if keep.len() == schema.fields().len() {
            return Ok(batch.clone());
        }
        batch
            .project(&keep)
            .map_err(|e| Error::arrow("selecting sink columns", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    #[test]
    fn binary_of_every_form_is_bytes_as_it_is() {
        use arrow::array::{
            Array, BinaryViewArray, FixedSizeBinaryArray, LargeBinaryArray, UInt32Array,
        };
        // Not UTF-8: through text these became nulls.
        let raw: [&[u8]; 2] = [&[0xff, 0x00, 0xfe], &[0xc3, 0x28, 0x80]];
        let dictionary = arrow::array::DictionaryArray::new(
            arrow::array::Int32Array::from(vec![1, 0]),
            Arc::new(arrow::array::BinaryArray::from_iter_values([
                raw[1], raw[0],
            ])),
        );
        let columns: [ArrayRef; 4] = [
            Arc::new(LargeBinaryArray::from_iter_values(raw)),
            Arc::new(BinaryViewArray::from_iter_values(raw)),
            Arc::new(FixedSizeBinaryArray::try_from_iter(raw.into_iter()).unwrap()),
            Arc::new(dictionary),
        ];
        for column in &columns {
            let bytes = bytes_column(column).unwrap();
            assert_eq!(bytes.null_count(), 0, "{}", column.data_type());
            assert_eq!(bytes.value(0), raw[0], "{}", column.data_type());
            assert_eq!(bytes.value(1), raw[1], "{}", column.data_type());
            // A slice, as a batch split for a sink is.
            let slice = bytes_column(&column.slice(1, 1)).unwrap();
            assert_eq!((slice.len(), slice.value(0)), (1, raw[1]));
        }
        // A null key stays null.
        let nulls: ArrayRef = Arc::new(LargeBinaryArray::from(vec![None, Some(raw[0])]));
        let bytes = bytes_column(&nulls).unwrap();
        assert!(bytes.is_null(0));
        assert_eq!(bytes.value(1), raw[0]);
        // Anything else is its text.
        let ints: ArrayRef = Arc::new(UInt32Array::from(vec![7, 42]));
        assert_eq!(bytes_column(&ints).unwrap().value(1), b"42");
    }

    #[test]
    fn metadata_round_trip() {
        let records = Schema::new(vec![Field::new("a", DataType::Utf8, true)]);
        let schema = with_metadata(&records).unwrap();
        let batch = RecordBatch::try_new(
            Arc::new(records),
            vec![Arc::new(StringArray::from(vec!["x", "y"]))],
        )
        .unwrap();
        let full = append_metadata(&schema, batch, 3, 10, None, None).unwrap();
        assert_eq!(full.num_columns(), 5);
        let offsets = full
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(offsets.values(), &[10, 11]);
        assert_eq!(full.column(3).null_count(), 2);
        let out = ColumnSelection {
            keep_metadata: vec![OFFSET.into()],
        }
        .apply(&full)
        .unwrap();
        assert_eq!(
            out.schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            vec!["a", "_offset"]
        );
    }

    #[test]
    fn record_fields_may_not_shadow_metadata() {
        let records = Schema::new(vec![Field::new("_offset", DataType::Int64, true)]);
        assert!(with_metadata(&records).is_err());
    }
}
