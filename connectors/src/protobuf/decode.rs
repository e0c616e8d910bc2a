//! One partition's Protobuf decoding: messages into the message type's columns, each one
//! that does not decode named with the reason.

use std::sync::Arc;

use arrow::array::RecordBatch;
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use sluice_engine::{Error, Result};

use super::columns::Message;
use super::{ProtobufFormat, Writer, message_at};
use crate::avro::schema_id;

/// Index paths deeper than this are refused (no real schema nests messages so deep).
const MAX_PATH: usize = 16;

/// The largest message decoded (whatever `max_record_size` says): a decoded message takes
/// up to ~60 times its size (each packed element is a value of its own), so a 16 MiB one
/// could take a gigabyte.
const MAX_MESSAGE: usize = 4 << 20;

pub struct ProtobufDecoder {
    format: Arc<ProtobufFormat>,
    /// The largest message decoded (`max_record_size`); a larger one is refused unread.
    max_record: usize,
    columns: Message,
}

impl ProtobufDecoder {
    pub fn new(format: Arc<ProtobufFormat>, max_record: usize) -> Self {
        ProtobufDecoder {
            columns: Message::new(&format.message),
            format,
            max_record: max_record.min(MAX_MESSAGE),
        }
    }

    /// Makes sure every writer schema the messages name is known (fetched, waiting for the
    /// registry) before [`ProtobufDecoder::decode_each`] runs.
    pub async fn prepare<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        if self.format.registry.is_none() {
            return Ok(());
        }
        let mut ids = std::collections::HashMap::new();
        for id in payloads.filter_map(schema_id) {
            *ids.entry(id).or_default() += 1;
        }
        let ids = crate::avro::most_named_first(ids);
        self.format.learn(ids.into_iter()).await
    }

    /// Decodes what decodes, in the message type's columns; each message that does not
    /// is named by index with the reason. `tombstone` says which messages have a null
    /// value (none to decode; an empty value is a message of defaults).
    pub fn decode_each(
        &mut self,
        payloads: &[&[u8]],
        tombstone: impl Fn(usize) -> bool,
    ) -> (Result<RecordBatch>, Vec<(usize, String)>) {
        let mut bad = Vec::new();
        {
            let writers = self.format.writers.lock().expect("writers lock");
            for (i, payload) in payloads.iter().enumerate() {
                let decoded = if tombstone(i) {
                    Err("a tombstone (a null value): no message".to_string())
                } else {
                    self.body(payload, &writers)
                        .and_then(|body| self.message(body))
                };
                match decoded {
                    Ok(message) => self.columns.append(Some(&message)),
                    Err(why) => bad.push((i, why)),
                }
            }
        }
        if self.format.registry.is_some() {
            crate::avro::stats().read(payloads, &bad);
        }
        let batch =
            RecordBatch::try_new(self.format.records.clone(), self.columns.finish_columns())
                .map_err(|e| Error::arrow("Protobuf records", e));
        (batch, bad)
    }

    /// The Protobuf body of a message, or why there is none to decode.
    fn body<'a>(
        &self,
        payload: &'a [u8],
        writers: &std::collections::HashMap<u32, Writer>,
    ) -> std::result::Result<&'a [u8], String> {
        if payload.len() > self.max_record {
            return Err(format!(
                "the record is {} bytes, larger than max_record_size ({}; Protobuf messages at most {})",
                payload.len(),
                sluice_engine::config::ByteSize(self.max_record as u64),
                sluice_engine::config::ByteSize(MAX_MESSAGE as u64)
            ));
        }
        if self.format.registry.is_none() {
            return Ok(payload);
        }
        let Some(id) = schema_id(payload) else {
            return Err("not a Protobuf message in the Confluent wire format (a 0 byte, then a 4-byte schema id)".into());
        };
        let (path, body) = index_path(&payload[5..]).ok_or_else(|| {
            format!("schema id {id}: the message-index path after the schema id does not read")
        })?;
        let file = match writers.get(&id) {
            Some(Writer::File(file)) => file,
            Some(Writer::Refused(why)) => return Err(why.clone()),
            None => return Err(crate::avro::not_fetched(id)),
        };
        let want = self.format.message.full_name();
        match message_at(file, &path) {
            Some(name) if name == want => Ok(body),
            Some(name) => Err(format!(
                "schema id {id}: the message is a {name}, not a {want}"
            )),
            None => Err(format!(
                "schema id {id} has no message at index path {path:?} (a message index out of range)"
            )),
        }
    }

    /// The body as the pipeline's message type.
    fn message(&self, body: &[u8]) -> std::result::Result<DynamicMessage, String> {
        let message = DynamicMessage::decode(self.format.message.clone(), body)
            .map_err(|e| format!("not a {}: {e}", self.format.message.full_name()))?;
        match out_of_range(&message) {
            Some(field) => Err(format!(
                "`{field}` is a timestamp outside what Arrow holds in nanoseconds (1677 to 2262)"
            )),
            None => Ok(message),
        }
    }
}

/// The message-index path at the start of `rest` (a zig-zag varint count, then as many
/// zig-zag varint indexes; a count of 0 is the path `[0]`), and the bytes after it.
fn index_path(rest: &[u8]) -> Option<(Vec<i64>, &[u8])> {
    let (count, mut rest) = zigzag(rest)?;
    if count == 0 {
        return Some((vec![0], rest));
    }
    let count = usize::try_from(count).ok().filter(|c| *c <= MAX_PATH)?;
    let mut path = Vec::with_capacity(count);
    for _ in 0..count {
        let (index, after) = zigzag(rest)?;
        path.push(index);
        rest = after;
    }
    Some((path, rest))
}

/// A zig-zag varint, and the bytes after it.
fn zigzag(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let signed = (value >> 1) as i64 ^ -((value & 1) as i64);
            return Some((signed, &bytes[i + 1..]));
        }
    }
    None
}

/// The first `google.protobuf.Timestamp` field (by path) whose value does not fit in
/// nanoseconds since the epoch as an i64.
fn out_of_range(message: &DynamicMessage) -> Option<String> {
    for (field, value) in message.fields() {
        let inner = |v: &Value| -> Option<String> {
            let m = v.as_message()?;
            if m.descriptor().full_name() == "google.protobuf.Timestamp" {
                let seconds = m.get_field_by_name("seconds")?.as_i64()?;
                let nanos = m.get_field_by_name("nanos")?.as_i32()?;
                let fits = seconds
                    .checked_mul(1_000_000_000)
                    .and_then(|s| s.checked_add(i64::from(nanos)))
                    .is_some();
                return (!fits).then(String::new);
            }
            out_of_range(m)
        };
        if !matches!(field.kind(), Kind::Message(_)) {
            continue;
        }
        let found = match value {
            Value::List(items) => items.iter().find_map(inner),
            Value::Map(entries) => entries.values().find_map(inner),
            other => inner(other),
        };
        if let Some(below) = found {
            return Some(match below.as_str() {
                "" => field.name().to_string(),
                below => format!("{}.{below}", field.name()),
            });
        }
    }
    None
}
