//! Dead letters for sinks that write text (files, stdout, Kinesis): [`text_batch`].
//!
//! Bytes that are not UTF-8 cannot be text, so each byte column becomes two:
//! - `payload` (text, when the bytes are UTF-8) and `payload_base64` (else);
//! - `key` and `key_base64` the same way;
//! - `headers` becomes a list of `{name, value, value_base64}`, in the record's order, each
//!   value in one of the two (both null for a null value).
//!
//! So a letter read back from a file has the bytes it was written with, whatever they are.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, ListBuilder, MapArray, RecordBatch, StringBuilder,
    StructBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use base64::Engine;

use crate::{Error, Result};

/// Standard base64 with padding (RFC 4648).
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode_base64`]; `None` for text that is not base64.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The byte columns of [`super::schema`] that become text and base64.
const SPLIT: [&str; 2] = ["payload", "key"];

/// The fields of one header in [`text_schema`]'s `headers`.
fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, true),
        Field::new("value_base64", DataType::Utf8, true),
    ])
}

fn headers_field() -> Field {
    let header = Field::new("item", DataType::Struct(header_fields()), true);
    Field::new("headers", DataType::List(Arc::new(header)), true)
}

/// The schema of [`text_batch`].
pub fn text_schema() -> SchemaRef {
    let mut fields = Vec::new();
    for f in super::schema().fields() {
        let name = f.name().as_str();
        if SPLIT.contains(&name) {
            fields.push(Field::new(name, DataType::Utf8, true));
            fields.push(Field::new(format!("{name}_base64"), DataType::Utf8, true));
        } else if name == "headers" {
            fields.push(headers_field());
        } else {
            fields.push(f.as_ref().clone());
        }
    }
    Arc::new(Schema::new(fields))
}

/// A batch of [`super::schema`] for sinks that write text (the module's essay).
pub fn text_batch(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (f, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = f.name().as_str();
        if SPLIT.contains(&name) {
            let bytes = column.as_binary_opt::<i32>().ok_or_else(|| {
                Error::Internal(format!("dead letters without a binary `{name}`"))
            })?;
            let (text, base64) = split(bytes);
            columns.extend([Arc::new(text) as ArrayRef, Arc::new(base64)]);
        } else if name == "headers" {
            let map = column
                .as_map_opt()
                .ok_or_else(|| Error::Internal("dead letters' headers are not a map".into()))?;
            columns.push(Arc::new(headers_list(map)));
        } else {
            columns.push(column.clone());
        }
    }
    RecordBatch::try_new(text_schema(), columns)
        .map_err(|e| Error::arrow("making dead letters as text", e))
}

/// Bytes as text where they are UTF-8, else as base64 in the second column.
fn split(bytes: &BinaryArray) -> (arrow::array::StringArray, arrow::array::StringArray) {
    let mut text = StringBuilder::new();
    let mut base64 = StringBuilder::new();
    for value in bytes.iter() {
        let (t, b) = as_text(value);
        text.append_option(t);
        base64.append_option(b);
    }
    (text.finish(), base64.finish())
}

/// `(text, base64)`: one of them for bytes, neither for a null.
fn as_text(bytes: Option<&[u8]>) -> (Option<&str>, Option<String>) {
    match bytes.map(|b| (b, std::str::from_utf8(b))) {
        Some((_, Ok(text))) => (Some(text), None),
        Some((b, Err(_))) => (None, Some(encode_base64(b))),
        None => (None, None),
    }
}

fn headers_list(map: &MapArray) -> arrow::array::ListArray {
    let header = StructBuilder::from_fields(header_fields(), 0);
    let mut list = ListBuilder::new(header).with_field(Arc::new(Field::new(
        "item",
        DataType::Struct(header_fields()),
        true,
    )));
    for i in 0..map.len() {
        if map.is_null(i) {
            list.append(false);
            continue;
        }
        let entries = map.value(i);
        let names = entries.column(0).as_string::<i32>();
        let values = entries.column(1).as_binary::<i32>();
        let headers = list.values();
        for j in 0..entries.len() {
            let (text, base64) = as_text(values.is_valid(j).then(|| values.value(j)));
            field(headers, 0).append_value(names.value(j));
            field(headers, 1).append_option(text);
            field(headers, 2).append_option(base64);
            headers.append(true);
        }
        list.append(true);
    }
    list.finish()
}

fn field(header: &mut StructBuilder, k: usize) -> &mut StringBuilder {
    header
        .field_builder::<StringBuilder>(k)
        .expect("a header's fields are text")
}
