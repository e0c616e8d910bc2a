//! A Protobuf message type as Arrow columns, and decoded messages appended to them.
//!
//! | Protobuf | Arrow |
//! |---|---|
//! | `double`, `float` | Float64, Float32 |
//! | `int32`, `sint32`, `sfixed32` | Int32 (`int64`… Int64; `uint32`, `fixed32` UInt32; …) |
//! | `bool`, `string`, `bytes` | Boolean, Utf8, Binary |
//! | an enum | Utf8: the value's name (its number when the name is unknown) |
//! | a message | Struct (null when the field is not set) |
//! | `google.protobuf.Timestamp` | Timestamp(ns, UTC) |
//! | `repeated T` | List of T |
//! | `map<K, V>` | Map of K to V (entries ordered by key) |
//!
//! A field with presence (in a message, a `oneof`, proto3 `optional`, proto2) is null
//! when not set; a proto3 scalar without presence is its default (0, "", false) when not
//! set, as Protobuf defines it.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder,
    Int64Builder, ListArray, MapArray, NullBufferBuilder, StringBuilder, StructArray,
    TimestampNanosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};

const TIMESTAMP: &str = "google.protobuf.Timestamp";

/// A message type that holds itself (`message Node { Node next = 1; }`), at any depth,
/// has no columns: the path around the loop.
pub fn recursion(message: &MessageDescriptor) -> Option<String> {
    fn walk(m: &MessageDescriptor, stack: &mut Vec<String>) -> Option<String> {
        if m.full_name() == TIMESTAMP {
            return None;
        }
        if stack.iter().any(|s| s == m.full_name()) {
            stack.push(m.full_name().to_string());
            return Some(stack.join(" → "));
        }
        stack.push(m.full_name().to_string());
        for f in m.fields() {
            let kind = match f.kind() {
                Kind::Message(entry) if f.is_map() => entry.map_entry_value_field().kind(),
                kind => kind,
            };
            if let Kind::Message(inner) = kind
                && let Some(path) = walk(&inner, stack)
            {
                return Some(path);
            }
        }
        stack.pop();
        None
    }
    walk(message, &mut Vec::new())
}

/// The Arrow fields of `message`'s fields.
pub fn fields_of(message: &MessageDescriptor) -> Fields {
    message.fields().map(|f| field_of(&f)).collect()
}

fn field_of(field: &FieldDescriptor) -> Field {
    let nullable = field.supports_presence() || field.is_list() || field.is_map();
    Field::new(field.name(), type_of(field), nullable)
}

fn type_of(field: &FieldDescriptor) -> DataType {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            unreachable!("a map field's kind is its entry message")
        };
        let key = Field::new("key", kind_type(&entry.map_entry_key_field().kind()), false);
        let value = field_of(&entry.map_entry_value_field())
            .with_name("value")
            .with_nullable(true);
        let entries = Field::new("entries", DataType::Struct(vec![key, value].into()), false);
        return DataType::Map(Arc::new(entries), false);
    }
    let item = kind_type(&field.kind());
    if field.is_list() {
        DataType::List(Arc::new(Field::new_list_field(item, true)))
    } else {
        item
    }
}

fn kind_type(kind: &Kind) -> DataType {
    match kind {
        Kind::Double => DataType::Float64,
        Kind::Float => DataType::Float32,
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => DataType::Int32,
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => DataType::Int64,
        Kind::Uint32 | Kind::Fixed32 => DataType::UInt32,
        Kind::Uint64 | Kind::Fixed64 => DataType::UInt64,
        Kind::Bool => DataType::Boolean,
        Kind::String | Kind::Enum(_) => DataType::Utf8,
        Kind::Bytes => DataType::Binary,
        Kind::Message(m) if m.full_name() == TIMESTAMP => {
            DataType::Timestamp(TimeUnit::Nanosecond, Some("+00:00".into()))
        }
        Kind::Message(m) => DataType::Struct(fields_of(m)),
    }
}

/// Builders for the columns of one message type (or of one field's values).
pub enum Column {
    Bool(BooleanBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    U32(UInt32Builder),
    U64(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Str(StringBuilder),
    Bytes(BinaryBuilder),
    Enum(StringBuilder, prost_reflect::EnumDescriptor),
    Time(TimestampNanosecondBuilder),
    Message(Message),
    List {
        item: Box<Column>,
        offsets: Vec<i32>,
        valid: NullBufferBuilder,
        field: Arc<Field>,
    },
    Map {
        keys: Box<Column>,
        values: Box<Column>,
        offsets: Vec<i32>,
        valid: NullBufferBuilder,
        entry: Arc<Field>,
    },
}

/// A message's fields as columns, with which rows hold a message.
pub struct Message {
    fields: Vec<(FieldDescriptor, Column)>,
    arrow: Fields,
    valid: NullBufferBuilder,
}

impl Message {
    pub fn new(descriptor: &MessageDescriptor) -> Self {
        Message {
            fields: descriptor
                .fields()
                .map(|f| {
                    let column = Column::of_field(&f);
                    (f, column)
                })
                .collect(),
            arrow: fields_of(descriptor),
            valid: NullBufferBuilder::new(0),
        }
    }

    /// Appends `message` as a row (`None`: a null row).
    pub fn append(&mut self, message: Option<&DynamicMessage>) {
        self.valid.append(message.is_some());
        for (field, column) in &mut self.fields {
            match message {
                Some(m) if !field.supports_presence() || m.has_field(field) => {
                    column.append(Some(&m.get_field(field)));
                }
                _ => column.append(None),
            }
        }
    }

    /// The rows so far, as columns; the builders start over.
    pub fn finish_columns(&mut self) -> Vec<ArrayRef> {
        self.valid = NullBufferBuilder::new(0);
        self.fields.iter_mut().map(|(_, c)| c.finish()).collect()
    }

    fn finish(&mut self) -> ArrayRef {
        let nulls = self.valid.finish();
        let columns = self.fields.iter_mut().map(|(_, c)| c.finish()).collect();
        Arc::new(StructArray::new(self.arrow.clone(), columns, nulls))
    }
}

impl Column {
    fn of_field(field: &FieldDescriptor) -> Column {
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                unreachable!("a map field's kind is its entry message")
            };
            let DataType::Map(entries, _) = type_of(field) else {
                unreachable!("type_of gives a map a Map")
            };
            return Column::Map {
                keys: Box::new(Column::of_kind(&entry.map_entry_key_field().kind())),
                values: Box::new(Column::of_kind(&entry.map_entry_value_field().kind())),
                offsets: vec![0],
                valid: NullBufferBuilder::new(0),
                entry: entries,
            };
        }
        let item = Column::of_kind(&field.kind());
        if field.is_list() {
            let DataType::List(item_field) = type_of(field) else {
                unreachable!("type_of gives a list a List")
            };
            return Column::List {
                item: Box::new(item),
                offsets: vec![0],
                valid: NullBufferBuilder::new(0),
                field: item_field,
            };
        }
        item
    }

    fn of_kind(kind: &Kind) -> Column {
        match kind {
            Kind::Double => Column::F64(Float64Builder::new()),
            Kind::Float => Column::F32(Float32Builder::new()),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Column::I32(Int32Builder::new()),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Column::I64(Int64Builder::new()),
            Kind::Uint32 | Kind::Fixed32 => Column::U32(UInt32Builder::new()),
            Kind::Uint64 | Kind::Fixed64 => Column::U64(UInt64Builder::new()),
            Kind::Bool => Column::Bool(BooleanBuilder::new()),
            Kind::String => Column::Str(StringBuilder::new()),
            Kind::Bytes => Column::Bytes(BinaryBuilder::new()),
            Kind::Enum(e) => Column::Enum(StringBuilder::new(), e.clone()),
            Kind::Message(m) if m.full_name() == TIMESTAMP => {
                Column::Time(TimestampNanosecondBuilder::new().with_timezone("+00:00"))
            }
            Kind::Message(m) => Column::Message(Message::new(m)),
        }
    }

    /// Appends one value of this column's type (`None`: null).
    fn append(&mut self, value: Option<&Value>) {
        match (self, value) {
            (Column::Bool(b), v) => b.append_option(v.and_then(Value::as_bool)),
            (Column::I32(b), v) => b.append_option(v.and_then(Value::as_i32)),
            (Column::I64(b), v) => b.append_option(v.and_then(Value::as_i64)),
            (Column::U32(b), v) => b.append_option(v.and_then(Value::as_u32)),
            (Column::U64(b), v) => b.append_option(v.and_then(Value::as_u64)),
            (Column::F32(b), v) => b.append_option(v.and_then(Value::as_f32)),
            (Column::F64(b), v) => b.append_option(v.and_then(Value::as_f64)),
            (Column::Str(b), v) => b.append_option(v.and_then(Value::as_str)),
            (Column::Bytes(b), v) => b.append_option(v.and_then(Value::as_bytes)),
            (Column::Enum(b, e), v) => match v.and_then(Value::as_enum_number) {
                Some(n) => match e.get_value(n) {
                    Some(named) => b.append_value(named.name()),
                    None => b.append_value(n.to_string()),
                },
                None => b.append_null(),
            },
            (Column::Time(b), v) => b.append_option(v.and_then(Value::as_message).and_then(nanos)),
            (Column::Message(m), v) => m.append(v.and_then(Value::as_message)),
            (
                Column::List {
                    item,
                    offsets,
                    valid,
                    ..
                },
                v,
            ) => {
                let items = v.and_then(Value::as_list);
                for i in items.into_iter().flatten() {
                    item.append(Some(i));
                }
                let end =
                    offsets.last().copied().unwrap_or(0) + items.map_or(0, |l| l.len() as i32);
                offsets.push(end);
                valid.append(items.is_some());
            }
            (
                Column::Map {
                    keys,
                    values,
                    offsets,
                    valid,
                    ..
                },
                v,
            ) => {
                let map = v.and_then(Value::as_map);
                let mut entries: Vec<(&MapKey, &Value)> = map.into_iter().flatten().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in &entries {
                    keys.append(Some(&Value::from((*k).clone())));
                    values.append(Some(v));
                }
                let end = offsets.last().copied().unwrap_or(0) + entries.len() as i32;
                offsets.push(end);
                valid.append(map.is_some());
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Bool(b) => Arc::new(b.finish()),
            Column::I32(b) => Arc::new(b.finish()),
            Column::I64(b) => Arc::new(b.finish()),
            Column::U32(b) => Arc::new(b.finish()),
            Column::U64(b) => Arc::new(b.finish()),
            Column::F32(b) => Arc::new(b.finish()),
            Column::F64(b) => Arc::new(b.finish()),
            Column::Str(b) | Column::Enum(b, _) => Arc::new(b.finish()),
            Column::Bytes(b) => Arc::new(b.finish()),
            Column::Time(b) => Arc::new(b.finish()),
            Column::Message(m) => m.finish(),
            Column::List {
                item,
                offsets,
                valid,
                field,
            } => {
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                Arc::new(ListArray::new(
                    field.clone(),
                    offsets,
                    item.finish(),
                    valid.finish(),
                ))
            }
            Column::Map {
                keys,
                values,
                offsets,
                valid,
                entry,
            } => {
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let DataType::Struct(fields) = entry.data_type() else {
                    unreachable!("a map's entries are a struct")
                };
                let entries =
                    StructArray::new(fields.clone(), vec![keys.finish(), values.finish()], None);
                Arc::new(MapArray::new(
                    entry.clone(),
                    offsets,
                    entries,
                    valid.finish(),
                    false,
                ))
            }
        }
    }
}

/// A `google.protobuf.Timestamp` as nanoseconds since the epoch (`None` when it does not
/// fit in an i64: before 1677 or after 2262).
fn nanos(t: &DynamicMessage) -> Option<i64> {
    let seconds = t.get_field_by_name("seconds").and_then(|v| v.as_i64())?;
    let nanos = t.get_field_by_name("nanos").and_then(|v| v.as_i32())?;
    seconds
        .checked_mul(1_000_000_000)?
        .checked_add(i64::from(nanos))
}
