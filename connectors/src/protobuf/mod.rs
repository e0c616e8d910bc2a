//! Protobuf payloads decoded into Arrow (`prost-reflect`, the `.proto` compiled by
//! `protox`), plain or in the Confluent wire format (a `0` byte, the writer schema's
//! 4-byte registry id, the message-index path, the body).
//!
//! ```yaml
//! source:
//!   type: kafka
//!   format: protobuf
//!   protobuf:
//!     schema: schemas/order.proto       # imports are looked up beside it and in `include`
//!     message: shop.Order               # the records' message type: its fields are the columns
//!     schema_registry: { url: http://registry:8081 }   # leave out for unframed messages
//! ```
//! Protobuf's own rules carry schema evolution: a field the pipeline's `.proto` does not
//! know is skipped, one the writer did not send is null (or its default). With a registry,
//! each writer schema is fetched once by id, and the message its index path names must be
//! the pipeline's message type: a message of another type, not framed, with an index path
//! the writer schema does not have, or whose body does not decode is a bad record (a dead
//! letter naming the schema id and why).

mod columns;
mod decode;
mod encode;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use arrow::datatypes::{Schema, SchemaRef};
use base64::Engine;
use prost::Message as _;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde::Deserialize;
use sluice_engine::{Error, Result};

use crate::avro::{RegistryConfig, SchemaRegistry};
pub use decode::ProtobufDecoder;
pub use encode::{ProtobufEncoder, ProtobufSinkConfig};

/// `protobuf:` of a Kafka or Kinesis source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtobufConfig {
    /// The `.proto` file that declares the message type.
    pub schema: PathBuf,
    /// The message type of the records, by its full name (`shop.Order`).
    pub message: String,
    /// More directories to look up imports in (the `.proto`'s own directory is first).
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// Messages framed with a registry's schema id (the Confluent wire format); without
    /// it, each message is one plain Protobuf message.
    pub schema_registry: Option<RegistryConfig>,
}

/// A writer schema known to the process: the file it declares (to name the message its
/// index path points at), or why it cannot be used.
#[derive(Clone)]
enum Writer {
    File(Box<FileDescriptorProto>),
    Refused(String),
}

/// The pipeline's message type, the registry, the writer schemas fetched so far.
pub struct ProtobufFormat {
    message: MessageDescriptor,
    records: SchemaRef,
    registry: Option<SchemaRegistry>,
    writers: Mutex<HashMap<u32, Writer>>,
}

impl ProtobufFormat {
    /// Compiles the `.proto` and finds the message type.
    pub fn open(config: &ProtobufConfig) -> Result<Self> {
        let mut includes: Vec<PathBuf> = config
            .schema
            .parent()
            .map(|p| p.to_path_buf())
            .filter(|p| !p.as_os_str().is_empty())
            .into_iter()
            .collect();
        if includes.is_empty() {
            includes.push(PathBuf::from("."));
        }
        includes.extend(config.include.iter().cloned());
        let name = config
            .schema
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let files = protox::compile([&name], &includes).map_err(|e| {
            Error::Plan(format!(
                "the Protobuf schema {}: {e}",
                config.schema.display()
            ))
        })?;
        let pool = DescriptorPool::from_file_descriptor_set(files).map_err(|e| {
            Error::Plan(format!(
                "the Protobuf schema {}: {e}",
                config.schema.display()
            ))
        })?;
        let message = pool.get_message_by_name(&config.message).ok_or_else(|| {
            let names: Vec<String> = pool
                .all_messages()
                .map(|m| m.full_name().to_string())
                .collect();
            Error::Plan(format!(
                "{} declares no message `{}` (it declares: {})",
                config.schema.display(),
                config.message,
                names.join(", ")
            ))
        })?;
        if let Some(path) = columns::recursion(&message) {
            return Err(Error::Plan(format!(
                "`{}` holds itself ({path}): a recursive message type has no columns",
                config.message
            )));
        }
        let records = std::sync::Arc::new(Schema::new(columns::fields_of(&message)));
        Ok(ProtobufFormat {
            message,
            records,
            registry: config
                .schema_registry
                .as_ref()
                .map(SchemaRegistry::new)
                .transpose()?,
            writers: Mutex::default(),
        })
    }

    /// The records' columns (before the metadata columns).
    pub fn records(&self) -> SchemaRef {
        self.records.clone()
    }

    /// Fetches the writer schemas of `ids` not known yet, waiting while the registry does
    /// not answer.
    async fn learn(&self, ids: impl Iterator<Item = u32>) -> Result<()> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let missing: Vec<u32> = {
            let known = self.writers.lock().expect("writers lock");
            ids.filter(|id| !known.contains_key(id)).collect()
        };
        let fetch = |id: u32| async move {
            Ok(match registry.schema(id).await? {
                Ok(stored) => match writer_of(id, &stored.schema, stored.schema_type.as_deref()) {
                    Writer::File(file) => match conflicts(&file, &self.message) {
                        Some(why) => Writer::Refused(format!("schema id {id}: {why}")),
                        None => Writer::File(file),
                    },
                    refused => refused,
                },
                Err(no) => Writer::Refused(format!(
                    "schema id {id}: the registry at {} answers {} {}",
                    registry.url(),
                    no.status,
                    no.said
                )),
            })
        };
        crate::avro::look_up(missing, fetch, |id, writer| {
            let mut writers = self.writers.lock().expect("writers lock");
            writers.entry(id).or_insert(writer);
            crate::avro::forget_refused(&mut writers, |w| matches!(w, Writer::Refused(_)));
        })
        .await
    }
}

impl ProtobufFormat {
    /// For `sluice validate`: each topic's subject (`{topic}-value`) in the registry, its
    /// latest version's declaration of the message checked against the pipeline's.
    pub async fn check_latest(
        &self,
        topics: &[String],
        file: &str,
    ) -> sluice_engine::connector::RemoteCheck {
        let Some(registry) = &self.registry else {
            return Default::default();
        };
        registry
            .check_subjects(topics, file, "protobuf", |latest| {
                match writer_of(latest.id, &latest.schema, latest.schema_type.as_deref()) {
                    Writer::File(f) => conflicts(&f, &self.message),
                    Writer::Refused(why) => Some(why),
                }
            })
            .await
    }
}

/// A fetched writer schema: a `.proto` text, or (as clients register it, and registries
/// give it with `?format=serialized`) a base64 `FileDescriptorProto`.
fn writer_of(id: u32, schema: &str, kind: Option<&str>) -> Writer {
    if kind != Some("PROTOBUF") {
        return Writer::Refused(format!(
            "schema id {id} is a {} schema, not Protobuf",
            kind.unwrap_or("AVRO")
        ));
    }
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(schema.trim())
        && let Ok(file) = FileDescriptorProto::decode(bytes.as_slice())
    {
        return Writer::File(Box::new(file));
    }
    match protox_parse::parse(&format!("schema-{id}.proto"), schema) {
        Ok(file) => Writer::File(Box::new(file)),
        Err(e) => Writer::Refused(format!(
            "schema id {id} is not a .proto Sluice can read: {e}"
        )),
    }
}

/// Why the writer file's declaration of the reader's message type would decode wrong with
/// the reader's (a field number of another type, or repeated in one and not the other, in
/// it or in the messages it holds), if it would. Protobuf's compatible changes pass: a
/// field only one side has, int32 to int64, uint32 to uint64 or int64, sint32 to sint64,
/// an enum and int32, string and bytes.
fn conflicts(file: &FileDescriptorProto, reader: &MessageDescriptor) -> Option<String> {
    use prost_types::DescriptorProto;
    fn collect<'a>(
        prefix: &str,
        messages: &'a [DescriptorProto],
        out: &mut HashMap<String, &'a DescriptorProto>,
    ) {
        for m in messages {
            let name = format!("{prefix}.{}", m.name());
            collect(&name, &m.nested_type, out);
            out.insert(name, m);
        }
    }
    let mut messages = HashMap::new();
    let prefix = match file.package() {
        "" => String::new(),
        p => format!(".{p}"),
    };
    collect(&prefix, &file.message_type, &mut messages);
    let name = format!(".{}", reader.full_name());
    let writer = messages.get(&name)?;
    let mut seen = std::collections::HashSet::new();
    check(reader, &name, writer, &messages, &mut seen)
}

/// The message a field's `type_name` names, seen from the message `scope` (a parsed
/// `.proto` leaves names as written: relative to the scopes around the field).
fn resolve<'a>(
    type_name: &str,
    scope: &str,
    messages: &HashMap<String, &'a prost_types::DescriptorProto>,
) -> Option<&'a prost_types::DescriptorProto> {
    if type_name.starts_with('.') {
        return messages.get(type_name).copied();
    }
    let mut scope = scope;
    loop {
        if let Some(m) = messages.get(&format!("{scope}.{type_name}")) {
            return Some(m);
        }
        let (outer, _) = scope.rsplit_once('.')?;
        scope = outer;
    }
}

fn check(
    reader: &MessageDescriptor,
    name: &str,
    writer: &prost_types::DescriptorProto,
    messages: &HashMap<String, &prost_types::DescriptorProto>,
    seen: &mut std::collections::HashSet<String>,
) -> Option<String> {
    use prost_reflect::Kind;
    use prost_types::field_descriptor_proto::{Label, Type};
    if !seen.insert(reader.full_name().to_string()) {
        return None;
    }
    for w in &writer.field {
        let Some(r) = u32::try_from(w.number())
            .ok()
            .and_then(|n| reader.get_field(n))
        else {
            continue;
        };
        let said = |what: &str| {
            Some(format!(
                "field {} (`{}` of {}) {what}",
                w.number(),
                r.name(),
                reader.full_name()
            ))
        };
        if (w.label() == Label::Repeated) != (r.is_list() || r.is_map()) {
            return said("is repeated on one side only");
        }
        // A parsed (not compiled) file leaves a named type's kind unset: a message if the
        // name resolves to one of the file's; else an enum, or a type from an import (not
        // in the file to check: it reads as a message or an enum).
        let named = w
            .r#type
            .is_none()
            .then(|| resolve(w.type_name(), name, messages));
        let kind = match named {
            Some(Some(_)) => Type::Message,
            Some(None) => Type::Group,
            None => w.r#type(),
        };
        let reads = match (kind, r.kind()) {
            (Type::Group, Kind::Message(_) | Kind::Enum(_) | Kind::Int32) => true,
            (Type::Double, Kind::Double)
            | (Type::Float, Kind::Float)
            | (Type::Int32 | Type::Enum, Kind::Int32 | Kind::Enum(_))
            | (Type::Int32 | Type::Int64, Kind::Int64)
            | (Type::Uint32, Kind::Uint32 | Kind::Uint64 | Kind::Int64)
            | (Type::Uint64, Kind::Uint64)
            | (Type::Sint32, Kind::Sint32 | Kind::Sint64)
            | (Type::Sint64, Kind::Sint64)
            | (Type::Fixed32, Kind::Fixed32)
            | (Type::Fixed64, Kind::Fixed64)
            | (Type::Sfixed32, Kind::Sfixed32)
            | (Type::Sfixed64, Kind::Sfixed64)
            | (Type::Bool, Kind::Bool)
            | (Type::String | Type::Bytes, Kind::String | Kind::Bytes) => true,
            (Type::Message, Kind::Message(inner)) => {
                let nested = resolve(w.type_name(), name, messages);
                if let Some(nested) = nested
                    && !inner.full_name().starts_with("google.protobuf.")
                {
                    let inner_name = format!(".{}", inner.full_name());
                    if let Some(why) = check(&inner, &inner_name, nested, messages, seen) {
                        return Some(why);
                    }
                }
                true
            }
            _ => false,
        };
        if !reads {
            return said(&format!(
                "is {:?} in the writer's schema and {:?} in the pipeline's",
                w.r#type(),
                r.kind()
            ));
        }
    }
    None
}

/// The full name of the message at `path` (indexes into the file's messages, then into
/// nested messages) in `file`.
fn message_at(file: &FileDescriptorProto, path: &[i64]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut message = file.message_type.get(usize::try_from(*first).ok()?)?;
    let mut name = match file.package() {
        "" => message.name().to_string(),
        package => format!("{package}.{}", message.name()),
    };
    for i in rest {
        message = message.nested_type.get(usize::try_from(*i).ok()?)?;
        name = format!("{name}.{}", message.name());
    }
    Some(name)
}

#[cfg(test)]
mod tests;
