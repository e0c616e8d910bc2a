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

/// `protobuf:` of a Kafka source.
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
        for id in missing {
            let writer = match registry.schema(id).await? {
                Ok(stored) => writer_of(id, &stored.schema, stored.schema_type.as_deref()),
                Err(no) => Writer::Refused(format!(
                    "schema id {id}: the registry at {} answers {} {}",
                    registry.url(),
                    no.status,
                    no.said
                )),
            };
            self.writers
                .lock()
                .expect("writers lock")
                .entry(id)
                .or_insert(writer);
        }
        Ok(())
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
