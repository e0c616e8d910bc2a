//! Rows into Protobuf messages, for a Kafka sink: plain, or in the Confluent wire format
//! with the `.proto` registered under the topic's subject.
//!
//! ```yaml
//! sink:
//!   type: kafka
//!   topic: orders-enriched
//!   format: protobuf
//!   protobuf:
//!     schema: schemas/order.proto
//!     message: shop.Order
//!     schema_registry: { url: http://registry:8081 }   # subject: orders-enriched-value
//! ```
//! Columns are matched to the message's fields by name (each column must be a field;
//! a field without a column is left unset), with the types a source of this message
//! would read (integers and floats are cast to the field's width). A row that Protobuf
//! cannot hold (a null in a field without presence, a null list item or map value, an
//! enum name the enum does not have, a timestamp out of range) is refused with the
//! reason: a dead letter of the sink. The file that declares the message is registered
//! (as a serialized descriptor, as the reference clients do) when the first rows are
//! written; imports other than Google's well-known types are not registered yet (refused
//! at start).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{can_cast_types, cast};
use arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use serde::Deserialize;
use sluice_engine::{Error, Result};

use super::columns::fields_of;
use super::{ProtobufConfig, ProtobufFormat};
use crate::avro::{RegistryConfig, SchemaRegistry, SubjectStrategy, stats};

/// `protobuf:` of a Kafka or Kinesis sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtobufSinkConfig {
    /// The `.proto` file that declares the message type.
    pub schema: PathBuf,
    /// The message type rows are written as (`shop.Order`).
    pub message: String,
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// Frame messages with the registered schema's id; without it, plain messages.
    pub schema_registry: Option<RegistryConfig>,
    /// The subject to register under (default: as `subject_strategy` names it).
    pub subject: Option<String>,
    /// How the subject is named when `subject` is not given: `topic` (`{topic}-value`,
    /// the default), `record` (the message's full name, `shop.Order`) or `topic_record`.
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
}

impl ProtobufSinkConfig {
    /// The message type rows are written as (its `.proto` compiled).
    pub fn format(&self) -> Result<ProtobufFormat> {
        ProtobufFormat::open(&ProtobufConfig {
            schema: self.schema.clone(),
            message: self.message.clone(),
            include: self.include.clone(),
            schema_registry: None,
        })
    }
}

/// A sink's encoder: rows into Protobuf messages.
pub struct ProtobufEncoder {
    message: MessageDescriptor,
    /// The columns as the message's fields read them (each cast to that type).
    columns: SchemaRef,
    /// For each column, its field.
    fields: Vec<FieldDescriptor>,
    /// The registry, the subject and the `.proto` text to register, and the prefix of every
    /// message once registered (magic byte, id, index path).
    registry: Option<(SchemaRegistry, String, String)>,
    prefix: Option<Vec<u8>>,
    id: u32,
}

impl ProtobufEncoder {
    /// An encoder of `input` rows; fails when a column is not a field of the message or
    /// has a type the field cannot take.
    pub fn open(config: &ProtobufSinkConfig, topic: &str, input: &Schema) -> Result<Self> {
        let format = config.format()?;
        let message = format.message.clone();
        let want = fields_of(&message);
        let mut problems = Vec::new();
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for column in input.fields() {
            let Some(field) = message.get_field_by_name(column.name()) else {
                problems.push(format!(
                    "`{}` is not a field of {}",
                    column.name(),
                    message.full_name()
                ));
                continue;
            };
            let target = want.find(column.name()).expect("a field has a column").1;
            if !fits(column.data_type(), target.data_type()) {
                problems.push(format!(
                    "`{}` is {}; the field is read as {}",
                    column.name(),
                    column.data_type(),
                    target.data_type()
                ));
            }
            fields.push(field);
            columns.push(target.as_ref().clone().with_nullable(true));
        }
        if !problems.is_empty() {
            return Err(Error::Plan(format!(
                "the output's columns do not fit {} of {}: {} (CAST them in SQL)",
                message.full_name(),
                config.schema.display(),
                problems.join("; ")
            )));
        }
        let registry = match &config.schema_registry {
            None => None,
            Some(r) => {
                let file = message.parent_file();
                if let Some(import) = file
                    .dependencies()
                    .map(|d| d.name().to_string())
                    .find(|d| !d.starts_with("google/protobuf/"))
                {
                    return Err(Error::Plan(format!(
                        "{} imports {import}: registering a .proto with imports (schema references) is not done yet",
                        config.schema.display()
                    )));
                }
                // The file that declares the message, as clients register it (a base64
                // FileDescriptorProto, which registries take beside .proto text): the
                // index path of every message points into it.
                let text = base64::engine::general_purpose::STANDARD
                    .encode(file.file_descriptor_proto().encode_to_vec());
                let subject = match &config.subject {
                    Some(subject) => subject.clone(),
                    None => config.subject_strategy.subject(topic, message.full_name()),
                };
                Some((SchemaRegistry::new(r)?, subject, text))
            }
        };
        Ok(ProtobufEncoder {
            message,
            columns: Arc::new(Schema::new(columns)),
            fields,
            registry,
            prefix: None,
            id: 0,
        })
    }

    /// Registers the `.proto` (once) and makes the prefix of every message.
    async fn ready(&mut self) -> Result<()> {
        let Some((registry, subject, text)) = &self.registry else {
            self.prefix = Some(Vec::new());
            return Ok(());
        };
        if self.prefix.is_some() {
            return Ok(());
        }
        let id = registry.register_as(subject, text, "PROTOBUF").await?;
        tracing::info!(%subject, id, "Protobuf schema registered");
        let mut prefix = vec![0];
        prefix.extend_from_slice(&id.to_be_bytes());
        // The message's index path in its file: the indexes of `message_type` and of each
        // `nested_type` in its descriptor path (4, i, 3, j, …).
        let path: Vec<i64> = self
            .message
            .path()
            .iter()
            .skip(1)
            .step_by(2)
            .map(|i| i64::from(*i))
            .collect();
        if path == [0] {
            prefix.push(0);
        } else {
            zigzag(&mut prefix, path.len() as i64);
            for i in path {
                zigzag(&mut prefix, i);
            }
        }
        self.prefix = Some(prefix);
        self.id = id;
        Ok(())
    }

    /// Appends each row of `batch` as one message to `out`, its end in `ends` (one per
    /// row); a row Protobuf cannot hold gets an empty slot and is named in `refused`.
    pub async fn encode(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        refused: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        self.ready().await?;
        let prefix = self.prefix.as_deref().expect("ready");
        // Columns widened to their fields' types; a value the cast could not hold (out of
        // range) comes out null where the column had one: its row is refused, not written
        // with the field unset.
        let mut lost: Vec<Option<String>> = vec![None; batch.num_rows()];
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .zip(self.columns.fields())
            .map(|(c, f)| {
                if same(c.data_type(), f.data_type()) {
                    return Ok(c.clone());
                }
                let cast = cast(c, f.data_type())
                    .map_err(|e| Error::arrow(format!("column `{}` for Protobuf", f.name()), e))?;
                if cast.logical_null_count() > c.logical_null_count() {
                    for (row, slot) in lost.iter_mut().enumerate() {
                        if slot.is_none() && c.is_valid(row) && cast.is_null(row) {
                            *slot = Some(format!(
                                "`{}` holds a value a {} field cannot (out of its range)",
                                f.name(),
                                f.data_type()
                            ));
                        }
                    }
                }
                Ok(cast)
            })
            .collect::<Result<_>>()?;
        let mut written = 0;
        for (row, lost) in lost.into_iter().enumerate() {
            let start = out.len();
            let message = match lost {
                Some(why) => Err(why),
                None => self.row(&columns, row),
            };
            match message {
                Ok(message) => {
                    out.extend_from_slice(prefix);
                    message.encode(out).map_err(|e| {
                        Error::Internal(format!("encoding a Protobuf message: {e}"))
                    })?;
                    written += 1;
                }
                Err(why) => {
                    out.truncate(start);
                    refused.push((
                        row as u32,
                        format!(
                            "the row does not encode as {}: {why}",
                            self.message.full_name()
                        ),
                    ));
                }
            }
            ends.push(out.len());
        }
        if self.registry.is_some() {
            stats().written(self.id, written);
        }
        Ok(())
    }

    /// Row `row` of `columns` as a message.
    fn row(&self, columns: &[ArrayRef], row: usize) -> std::result::Result<DynamicMessage, String> {
        let mut message = DynamicMessage::new(self.message.clone());
        for (field, column) in self.fields.iter().zip(columns) {
            if let Some(value) = field_value(field, column.as_ref(), row)? {
                message.set_field(field, value);
            }
        }
        Ok(message)
    }
}

/// Whether a column of type `from` can be written as a field read as `to`: the same
/// ([`same`]), or an integer cast to another integer's width, a float to another float's,
/// a timestamp to nanoseconds (at the top of a column or as a list's items: values a cast
/// cannot hold are refused by row).
fn fits(from: &DataType, to: &DataType) -> bool {
    same(from, to)
        || match (from, to) {
            (DataType::List(a), DataType::List(b)) => {
                same(a.data_type(), b.data_type()) || widens(a.data_type(), b.data_type())
            }
            _ => widens(from, to),
        }
}

/// A cast within one family: integer to integer, float to float, timestamp to timestamp.
fn widens(from: &DataType, to: &DataType) -> bool {
    let family = (from.is_integer() && to.is_integer())
        || (from.is_floating() && to.is_floating())
        || matches!(
            (from, to),
            (DataType::Timestamp(_, _), DataType::Timestamp(_, _))
        );
    family && can_cast_types(from, to)
}

/// The same type, structs compared by their children's names (a struct's values are
/// written to its message's fields by name): every child of `from` a field of `to` of
/// the same type.
fn same(from: &DataType, to: &DataType) -> bool {
    match (from, to) {
        (DataType::Struct(a), DataType::Struct(b)) => a.iter().all(|child| {
            b.find(child.name())
                .is_some_and(|(_, f)| same(child.data_type(), f.data_type()))
        }),
        (DataType::List(a), DataType::List(b)) => same(a.data_type(), b.data_type()),
        (DataType::Map(a, _), DataType::Map(b, _)) => same(a.data_type(), b.data_type()),
        _ => from.equals_datatype(to),
    }
}

/// Appends `v` as a zig-zag varint.
fn zigzag(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The value of `field` at `row` of `array` (`None`: leave the field unset), or why the
/// row cannot hold it.
fn field_value(
    field: &FieldDescriptor,
    array: &dyn Array,
    row: usize,
) -> std::result::Result<Option<Value>, String> {
    if array.is_null(row) {
        let absent = field.supports_presence() || field.is_list() || field.is_map();
        return if absent {
            Ok(None)
        } else {
            Err(format!(
                "`{}` is null, and the field has no presence to be unset",
                field.name()
            ))
        };
    }
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            unreachable!("a map field's kind is its entry message")
        };
        let map = array.as_map();
        let (keys, values) = (map.keys(), map.values());
        let range = map.value_offsets()[row] as usize..map.value_offsets()[row + 1] as usize;
        let mut out = std::collections::HashMap::with_capacity(range.len());
        let (key_field, value_field) = (entry.map_entry_key_field(), entry.map_entry_value_field());
        for i in range {
            let key = value_of(&key_field.kind(), keys.as_ref(), i, field.name())?;
            let key = map_key(key)
                .ok_or_else(|| format!("`{}` has a key a map cannot have", field.name()))?;
            if values.is_null(i) {
                return Err(format!("`{}` has a null value", field.name()));
            }
            let value = value_of(&value_field.kind(), values.as_ref(), i, field.name())?;
            if out.insert(key, value).is_some() {
                return Err(format!("`{}` holds a key twice", field.name()));
            }
        }
        return Ok(Some(Value::Map(out)));
    }
    if field.is_list() {
        let list = array.as_list::<i32>();
        let items = list.values();
        let range = list.value_offsets()[row] as usize..list.value_offsets()[row + 1] as usize;
        let mut out = Vec::with_capacity(range.len());
        for i in range {
            if items.is_null(i) {
                return Err(format!("`{}` holds a null item", field.name()));
            }
            out.push(value_of(&field.kind(), items.as_ref(), i, field.name())?);
        }
        return Ok(Some(Value::List(out)));
    }
    value_of(&field.kind(), array, row, field.name()).map(Some)
}

/// The (non-null) value at `i` of `array` as a value of `kind`.
fn value_of(
    kind: &Kind,
    array: &dyn Array,
    i: usize,
    name: &str,
) -> std::result::Result<Value, String> {
    use arrow::datatypes as t;
    Ok(match kind {
        Kind::Double => Value::F64(array.as_primitive::<t::Float64Type>().value(i)),
        Kind::Float => Value::F32(array.as_primitive::<t::Float32Type>().value(i)),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(array.as_primitive::<t::Int32Type>().value(i))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(array.as_primitive::<t::Int64Type>().value(i))
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(array.as_primitive::<t::UInt32Type>().value(i)),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(array.as_primitive::<t::UInt64Type>().value(i)),
        Kind::Bool => Value::Bool(array.as_boolean().value(i)),
        Kind::String => Value::String(array.as_string::<i32>().value(i).to_string()),
        Kind::Bytes => Value::Bytes(array.as_binary::<i32>().value(i).to_vec().into()),
        Kind::Enum(e) => {
            let label = array.as_string::<i32>().value(i);
            match e.get_value_by_name(label) {
                Some(v) => Value::EnumNumber(v.number()),
                None => match label.parse::<i32>() {
                    Ok(n) => Value::EnumNumber(n),
                    Err(_) => {
                        return Err(format!(
                            "`{name}`: {label} is not a value of {}",
                            e.full_name()
                        ));
                    }
                },
            }
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            let DataType::Timestamp(TimeUnit::Nanosecond, _) = array.data_type() else {
                return Err(format!("`{name}` is not a timestamp"));
            };
            let nanos = array.as_primitive::<t::TimestampNanosecondType>().value(i);
            let mut ts = DynamicMessage::new(m.clone());
            ts.set_field_by_name("seconds", Value::I64(nanos.div_euclid(1_000_000_000)));
            ts.set_field_by_name("nanos", Value::I32(nanos.rem_euclid(1_000_000_000) as i32));
            Value::Message(ts)
        }
        Kind::Message(m) => {
            let record = array.as_struct();
            let mut message = DynamicMessage::new(m.clone());
            for f in m.fields() {
                if let Some(child) = record.column_by_name(f.name())
                    && let Some(v) = field_value(&f, child.as_ref(), i)?
                {
                    message.set_field(&f, v);
                }
            }
            Value::Message(message)
        }
    })
}

fn map_key(v: Value) -> Option<MapKey> {
    Some(match v {
        Value::Bool(b) => MapKey::Bool(b),
        Value::I32(n) => MapKey::I32(n),
        Value::I64(n) => MapKey::I64(n),
        Value::U32(n) => MapKey::U32(n),
        Value::U64(n) => MapKey::U64(n),
        Value::String(s) => MapKey::String(s),
        _ => return None,
    })
}
