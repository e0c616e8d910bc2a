//! Payload formats of message streams, shared by the Kafka and Kinesis connectors: the
//! `format:` key and its companions (`schema:`, `avro:`, `protobuf:`, `debezium:`) as a
//! source or a sink declares them, checked here once ([`SourceKeys`], [`SinkKeys`]);
//! payloads decoded into rows ([`SourceFormat`], [`Payloads`]) and rows encoded into
//! payloads ([`Encoding`]).
//!
//! A stream's subject in the schema registry is named after the Kafka topic or the Kinesis
//! stream (`{name}-value`, Confluent's TopicNameStrategy), unless `subject:` says otherwise.

mod decode;
mod encode;

pub use decode::{Decoded, Payloads, SourceFormat};
pub use encode::{Encoded, Encoding};

use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::connector::RemoteCheck;

use crate::avro::{AvroConfig, AvroFormat, AvroSinkConfig, SubjectStrategy};
use crate::debezium::DebeziumConfig;
use crate::protobuf::{ProtobufConfig, ProtobufFormat, ProtobufSinkConfig};
use crate::stream::MessageFormat;

/// How a source's payloads read, as its keys say.
pub struct SourceKeys<'a> {
    pub format: MessageFormat,
    /// The records' fields (JSON), or a Debezium table's columns.
    pub schema: &'a SchemaSpec,
    pub avro: Option<&'a AvroConfig>,
    pub protobuf: Option<&'a ProtobufConfig>,
    pub debezium: Option<&'a DebeziumConfig>,
    /// The topics (or the stream) read: their subjects hold the writer schemas.
    pub subjects: Vec<String>,
}

impl SourceKeys<'_> {
    /// Checks the format's keys together, at the keys of the source's `node`.
    pub fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
        if self.format == MessageFormat::Protobuf && !self.schema.0.is_empty() {
            problems.at_key(node, path, "schema", "the columns of Protobuf records come from the message type (`protobuf.message`); leave `schema` out");
        }
        let opened = self.protobuf.map(|p| ProtobufFormat::open(p).map(drop));
        check_protobuf(self.format, opened, node, path, problems);
        if self.debezium.is_some() && self.format != MessageFormat::Debezium {
            problems.at_key(node, path, "debezium", "applies to `format: debezium`");
        }
        if self.format == MessageFormat::Debezium {
            let reserved = [
                crate::debezium::OP,
                crate::debezium::BEFORE,
                crate::debezium::TS_MS,
            ];
            for field in &self.schema.0 {
                if reserved.contains(&field.0.name().as_str()) {
                    problems.at_key(
                        node,
                        path,
                        "schema",
                        format!("`{}` is a column Sluice adds to Debezium rows; the table's columns cannot use it", field.0.name()),
                    );
                }
            }
        }
        match (self.format, self.avro) {
            (MessageFormat::Protobuf, _) => {}
            (MessageFormat::Json | MessageFormat::Debezium, None) if self.schema.0.is_empty() => {
                problems.at_key(node, path, "schema", "declare at least one field (with `format: debezium`, the table's columns)");
            }
            (MessageFormat::Json, Some(_)) => problems.at_key(
                node,
                path,
                "avro",
                "applies to `format: avro` (and `debezium`); this source reads JSON",
            ),
            (MessageFormat::Debezium, Some(avro)) => {
                if !self.schema.0.is_empty() {
                    problems.at_key(node, path, "schema", "with Debezium's Avro envelopes, the table's columns are the envelope's `after` record; leave `schema` out");
                }
                match AvroFormat::open(avro, &self.subjects) {
                    Ok(format) => {
                        if let Err(e) = crate::debezium::table_of(&format.records()) {
                            problems.at_key(node, path, "avro", e.to_string());
                        }
                    }
                    Err(e) => problems.at_key(node, path, "avro", e.to_string()),
                }
            }
            (MessageFormat::Avro, None) => problems.at_key(
                node,
                path,
                "format",
                "`format: avro` needs `avro: { schema_registry: { url } }` (and `schema: FILE.avsc`, else the registry's latest version is the reader schema)",
            ),
            (MessageFormat::Avro, Some(_)) if !self.schema.0.is_empty() => problems.at_key(
                node,
                path,
                "schema",
                "the columns of Avro records come from the reader schema (`avro.schema`); leave `schema` out",
            ),
            (MessageFormat::Avro, Some(avro)) => {
                if let Err(e) = AvroFormat::open(avro, &self.subjects) {
                    problems.at_key(node, path, "avro", e.to_string());
                }
            }
            _ => {}
        }
    }

    /// `sluice validate`: an Avro or Protobuf source's declared schema against the
    /// registry's latest version of each subject.
    pub async fn check_remote(&self) -> RemoteCheck {
        match (self.format, self.avro, self.protobuf) {
            (MessageFormat::Avro, Some(avro), _) => match AvroFormat::open(avro, &self.subjects) {
                Ok(format) => {
                    format
                        .check_latest(&self.subjects, &avro.reader(&self.subjects))
                        .await
                }
                Err(_) => RemoteCheck::default(),
            },
            (MessageFormat::Protobuf, _, Some(p)) => match ProtobufFormat::open(p) {
                Ok(format) => {
                    format
                        .check_latest(&self.subjects, &p.schema.display().to_string())
                        .await
                }
                Err(_) => RemoteCheck::default(),
            },
            _ => RemoteCheck::default(),
        }
    }
}

/// How a sink's rows become payloads, as its keys say.
pub struct SinkKeys<'a> {
    pub format: MessageFormat,
    pub avro: Option<&'a AvroSinkConfig>,
    pub protobuf: Option<&'a ProtobufSinkConfig>,
    /// The topic (or stream) written: writer schemas register under its subject.
    pub topic: &'a str,
}

impl SinkKeys<'_> {
    /// Checks the format's keys together, at the keys of the sink's `node`.
    pub fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
        let opened = self.protobuf.map(|p| p.format().map(drop));
        check_protobuf(self.format, opened, node, path, problems);
        let named = [
            self.avro
                .map(|a| ("avro", a.subject.is_some(), a.subject_strategy)),
            self.protobuf
                .map(|p| ("protobuf", p.subject.is_some(), p.subject_strategy)),
        ];
        for (key, subject, strategy) in named.into_iter().flatten() {
            if subject && strategy != SubjectStrategy::Topic {
                problems.at_key(
                    node,
                    path,
                    key,
                    "give `subject` or `subject_strategy`, not both",
                );
            }
        }
        // What names a subject, where nothing is registered.
        let unregistered = self.avro.is_some_and(|a| a.schema_id.is_some())
            || self.protobuf.is_some_and(|p| p.schema_registry.is_none());
        let named = self.avro.map(|a| (a.subject.is_some(), a.subject_strategy));
        let named = named.or(self
            .protobuf
            .map(|p| (p.subject.is_some(), p.subject_strategy)));
        if unregistered
            && named.is_some_and(|(s, strategy)| s || strategy != SubjectStrategy::Topic)
        {
            problems.at_key(
                node,
                path,
                if self.avro.is_some() { "avro" } else { "protobuf" },
                "`subject` and `subject_strategy` name where a schema is registered: nothing is (a pinned `schema_id`, or no `schema_registry`)",
            );
        }
        match (self.format, self.avro) {
            (MessageFormat::Json, None) | (MessageFormat::Protobuf, _) => {}
            (MessageFormat::Debezium, _) => problems.at_key(
                node,
                path,
                "format",
                "Debezium change events are read, not written: a sink writes `json`, `avro` or `protobuf`",
            ),
            (MessageFormat::Json, Some(_)) => problems.at_key(
                node,
                path,
                "avro",
                "applies to `format: avro`; this sink writes JSON",
            ),
            (MessageFormat::Avro, None) => problems.at_key(
                node,
                path,
                "format",
                "`format: avro` needs `avro: { schema_registry: { url } }`",
            ),
            (MessageFormat::Avro, Some(avro)) => {
                if let Err(e) = avro.check() {
                    problems.at_key(node, path, "avro", e.to_string());
                }
            }
        }
    }
}

/// `format: protobuf` and `protobuf:` go together; `opened` is how compiling the
/// `protobuf:`'s message type went.
fn check_protobuf(
    format: MessageFormat,
    opened: Option<sluice_engine::Result<()>>,
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) {
    match (format, opened) {
        (MessageFormat::Protobuf, None) => problems.at_key(
            node,
            path,
            "format",
            "`format: protobuf` needs `protobuf: { schema: FILE.proto, message: NAME }`",
        ),
        (MessageFormat::Protobuf, Some(Err(e))) => {
            problems.at_key(node, path, "protobuf", e.to_string())
        }
        (MessageFormat::Protobuf, Some(Ok(()))) | (_, None) => {}
        (_, Some(_)) => problems.at_key(node, path, "protobuf", "applies to `format: protobuf`"),
    }
}
