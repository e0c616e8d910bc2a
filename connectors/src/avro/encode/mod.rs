//! Rows into Avro messages in the Confluent wire format, for a sink.
//!
//! ```yaml
//! sink:
//!   type: kafka
//!   topic: views-by-title
//!   format: avro
//!   avro:
//!     schema_registry: { url: http://registry:8081 }
//!     # schema: schemas/out.avsc   # the writer schema; derived from the columns by default
//!     # subject: views-by-title-value      # or subject_strategy: record | topic_record
//! ```
//! The writer schema is the given `.avsc` (its fields matched to columns by name) or one
//! derived from the output's columns (nullable columns as `["null", T]` unions, structs as
//! records, lists as arrays, decimals, timestamps and dates as their logical types). It is
//! registered under the subject (by default `{topic}-value`, Confluent's
//! TopicNameStrategy) when the first rows are written, or a `schema_id` already registered
//! is used as is. While the registry does not answer, writing waits (back-pressure, as for
//! a broker outage); a registry that refuses the schema (incompatible with the subject's
//! versions, or invalid) stops the run with its answer.

use std::path::PathBuf;

use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow_avro::errors::AvroError;
use arrow_avro::schema::{
    AvroSchema, FingerprintAlgorithm, FingerprintStrategy, SCHEMA_METADATA_KEY,
};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};
use serde::Deserialize;
use sluice_engine::{Error, Result};

use super::shape::Shape;
use super::{RegistryConfig, SchemaRegistry, SubjectStrategy, stats};

/// `avro:` of a Kafka or Kinesis sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvroSinkConfig {
    /// The writer schema (`.avsc`), its fields matched to the output's columns by name;
    /// derived from the columns when absent.
    pub schema: Option<PathBuf>,
    /// Where the schema is registered.
    pub schema_registry: RegistryConfig,
    /// The subject to register under (default: as `subject_strategy` names it).
    pub subject: Option<String>,
    /// How the subject is named when `subject` is not given: `topic` (`{topic}-value`,
    /// the default), `record` (the record's full name: the `.avsc`'s; a schema derived
    /// from the columns is a record named after the topic) or `topic_record`.
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
    /// The id of a schema already registered: messages carry it, nothing is registered.
    /// Without `schema`, the schema is fetched by this id.
    pub schema_id: Option<u32>,
}

impl AvroSinkConfig {
    /// What can be checked without the output's columns or a registry: the URL, the CA
    /// file, the `.avsc`.
    pub fn check(&self) -> Result<()> {
        SchemaRegistry::new(&self.schema_registry)?;
        if let Some(path) = &self.schema {
            read_schema(path)?;
        }
        Ok(())
    }
}

/// A sink's encoder: rows into framed Avro messages.
pub struct AvroEncoder {
    registry: SchemaRegistry,
    subject: String,
    /// The output's columns as written (dictionaries as their values).
    columns: SchemaRef,
    /// What the columns derive to, to compare a given or pinned schema with.
    derived: AvroSchema,
    /// The writer schema, once known (a pinned id without a file: fetched at first use).
    writer: Option<AvroSchema>,
    pinned: Option<u32>,
    /// Built once the schema's id is known (every message starts with it).
    encoder: Option<Encoder>,
    id: u32,
    /// The writer schema's shape, to find nulls it cannot hold.
    shape: Option<Shape>,
}

/// A `.avsc` file, parsed.
fn read_schema(path: &std::path::Path) -> Result<AvroSchema> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Plan(format!(
            "cannot read the Avro schema {}: {e}",
            path.display()
        ))
    })?;
    let schema = AvroSchema::new(text);
    // Computing its fingerprint parses it.
    schema
        .fingerprint(FingerprintAlgorithm::Rabin)
        .map_err(|e| Error::Plan(format!("the Avro schema {}: {e}", path.display())))?;
    Ok(schema)
}

/// The Avro schema `columns` derive to, named `name`; nullable fields default to null (so
/// that a nullable column added later is a compatible change for the registry).
fn derive(columns: &Schema, name: &str) -> Result<AvroSchema> {
    let mut named = columns.clone();
    named.metadata.insert("avro.name".into(), name.into());
    let schema = AvroSchema::try_from(&named).map_err(|e| {
        Error::Plan(format!(
            "the output's columns as an Avro schema (for `{name}`): {e}"
        ))
    })?;
    let mut json: serde_json::Value = serde_json::from_str(&schema.json_string)
        .map_err(|e| Error::Internal(format!("arrow-avro's schema JSON: {e}")))?;
    default_nulls(&mut json);
    Ok(AvroSchema::new(json.to_string()))
}

/// The full name of the record an Avro schema's JSON declares (`namespace.name`), for
/// the record name strategies.
fn full_name(json: &str) -> Result<String> {
    let schema: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("a writer schema that is not JSON: {e}")))?;
    let Some(name) = schema["name"].as_str().filter(|n| !n.is_empty()) else {
        return Err(Error::Plan(
            "the writer schema is not a named record: no record name to name its subject by".into(),
        ));
    };
    Ok(match schema["namespace"].as_str() {
        Some(namespace) if !namespace.is_empty() && !name.contains('.') => {
            format!("{namespace}.{name}")
        }
        _ => name.to_string(),
    })
}

/// Gives every field of a record (nested ones too) whose type is a union starting with
/// `null` a `"default": null`.
fn default_nulls(ty: &mut serde_json::Value) {
    if let Some(fields) = ty.get_mut("fields").and_then(|f| f.as_array_mut()) {
        for field in fields {
            let first_null = field["type"]
                .as_array()
                .is_some_and(|b| b.first().is_some_and(|b| b == "null"));
            if first_null && field.get("default").is_none() {
                field["default"] = serde_json::Value::Null;
            }
            default_nulls(&mut field["type"]);
        }
    }
    for key in ["type", "items", "values"] {
        if let Some(inner) = ty.get_mut(key).filter(|v| v.is_object() || v.is_array()) {
            default_nulls(inner);
        }
    }
    if let Some(branches) = ty.as_array_mut() {
        branches.iter_mut().for_each(default_nulls);
    }
}

/// The output's columns as written: a dictionary column as its values.
fn plain(input: &Schema) -> Schema {
    Schema::new(
        input
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Dictionary(_, values) => {
                    Arc::new(f.as_ref().clone().with_data_type(values.as_ref().clone()))
                }
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
    )
}

/// Why `given`'s field types are not what the columns are written as (arrow-avro writes
/// by the Arrow type), if they are not.
fn misfit(given: &AvroSchema, derived: &AvroSchema) -> Option<String> {
    let given = Shape::parse(&given.json_string).ok()?;
    let derived = Shape::parse(&derived.json_string).ok()?;
    let wrong = given.mismatches(&derived);
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

impl AvroEncoder {
    /// An encoder of `input` rows for `topic`; fails when the columns do not fit the
    /// writer schema (or have a type Avro cannot hold).
    pub fn open(config: &AvroSinkConfig, topic: &str, input: &Schema) -> Result<Self> {
        let columns = plain(input);
        let derived = derive(&columns, topic)?;
        let writer = match (&config.schema, config.schema_id) {
            (Some(path), _) => {
                let given = read_schema(path)?;
                if let Some(why) = misfit(&given, &derived) {
                    return Err(Error::Plan(format!(
                        "the output's columns do not fit the Avro schema {}: {why}",
                        path.display()
                    )));
                }
                Some(given)
            }
            (None, Some(_)) => None,
            (None, None) => Some(derived.clone()),
        };
        let mut encoder = AvroEncoder {
            registry: SchemaRegistry::new(&config.schema_registry)?,
            subject: match &config.subject {
                Some(subject) => subject.clone(),
                None => {
                    let named = writer.as_ref().unwrap_or(&derived);
                    config
                        .subject_strategy
                        .subject(topic, &full_name(&named.json_string)?)
                }
            },
            columns: Arc::new(columns),
            derived,
            writer: None,
            pinned: config.schema_id,
            encoder: None,
            id: 0,
            shape: None,
        };
        if let Some(writer) = writer {
            // Built once with a placeholder id, to say now if the columns do not fit.
            encoder
                .build(writer, 0)
                .map_err(|e| Error::Plan(e.to_string()))?;
            encoder.encoder = None;
        }
        Ok(encoder)
    }

    /// The writer schema as Avro JSON, once known.
    pub fn schema_json(&self) -> Option<&str> {
        self.writer.as_ref().map(|w| w.json_string.as_str())
    }

    /// An encoder of the columns with `writer`, framing each message with `id`.
    fn build(&mut self, writer: AvroSchema, id: u32) -> Result<()> {
        let mut columns = self.columns.as_ref().clone();
        columns
            .metadata
            .insert(SCHEMA_METADATA_KEY.into(), writer.json_string.clone());
        let encoder = WriterBuilder::new(columns)
            .with_fingerprint_strategy(FingerprintStrategy::Id(id))
            .build_encoder::<AvroSoeFormat>()
            .map_err(|e| Error::Refused {
                system: "avro",
                message: format!(
                    "the output's columns do not fit the Avro writer schema of subject `{}`: {e}",
                    self.subject
                ),
            })?;
        self.shape = Some(
            Shape::parse(&writer.json_string)
                .map_err(|e| Error::Internal(format!("an Avro schema's JSON: {e}")))?,
        );
        self.writer = Some(writer);
        self.encoder = Some(encoder);
        self.id = id;
        Ok(())
    }

    /// The schema registered as `id`, refused unless it is Avro and fits the columns
    /// (and, with a file, is the file's schema).
    async fn pinned_schema(&self, id: u32) -> Result<AvroSchema> {
        let refused = |message: String| Error::Refused {
            system: "schema registry",
            message,
        };
        let stored = match self.registry.schema(id).await? {
            Ok(stored) => stored,
            Err(no) => {
                return Err(refused(format!(
                    "schema id {id}: the registry at {} answers {} {}",
                    self.registry.url(),
                    no.status,
                    no.said
                )));
            }
        };
        if let Some(kind) = stored.schema_type.filter(|t| t != "AVRO") {
            return Err(refused(format!(
                "schema id {id} is a {kind} schema, not Avro"
            )));
        }
        let registered = AvroSchema::new(stored.schema);
        let fingerprint = |s: &AvroSchema| s.fingerprint(FingerprintAlgorithm::Rabin).ok();
        match &self.writer {
            Some(file) if fingerprint(file) != fingerprint(&registered) => Err(refused(format!(
                "schema id {id} is not the schema of the sink's `avro.schema` file (their canonical forms differ)"
            ))),
            Some(file) => Ok(file.clone()),
            None => match misfit(&registered, &self.derived) {
                Some(why) => Err(refused(format!(
                    "the output's columns do not fit schema id {id}: {why}"
                ))),
                None => Ok(registered),
            },
        }
    }

    /// Builds the encoder, registering the writer schema (or fetching the pinned one).
    async fn ready(&mut self) -> Result<()> {
        if self.encoder.is_some() {
            return Ok(());
        }
        let (writer, id) = match (self.writer.clone(), self.pinned) {
            (_, Some(id)) => (self.pinned_schema(id).await?, id),
            (Some(writer), None) => {
                let id = self
                    .registry
                    .register(&self.subject, &writer.json_string)
                    .await?;
                tracing::info!(subject = %self.subject, id, "Avro writer schema registered");
                (writer, id)
            }
            (None, None) => unreachable!("open derives a schema when none is pinned"),
        };
        self.build(writer, id)
    }

    /// `batch` on the encoder's columns: dictionaries cast to their values, the fields
    /// (nullability, metadata) as planned.
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let columns = batch
            .columns()
            .iter()
            .zip(self.columns.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c.clone())
                } else {
                    cast(c, f.data_type())
                        .map_err(|e| Error::arrow(format!("column `{}` for Avro", f.name()), e))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        RecordBatch::try_new(self.columns.clone(), columns)
            .map_err(|e| Error::arrow("the sink's rows on its planned columns", e))
    }

    /// Appends each row of `batch` as one message to `out`, its end in `ends` (one per
    /// row). A row that does not encode (a null where the writer schema has no null, a
    /// value its type cannot hold) gets an empty message and is named in `refused` with
    /// the reason; a batch no row of which can encode (a type arrow-avro cannot write)
    /// fails.
    pub async fn encode(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        refused: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        self.ready().await?;
        let batch = &self.conform(batch)?;
        let refused_before = refused.len();
        // arrow-avro writes a null where the schema has none as the type's empty value:
        // such rows are found first.
        let names: Vec<&str> = self
            .columns
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        let nulls = self
            .shape
            .as_ref()
            .expect("ready")
            .forbidden_nulls(batch.columns(), &names);
        let encoder = self.encoder.as_mut().expect("ready");
        if nulls.iter().all(Option::is_none) && encoder.encode(batch).is_ok() {
            append(encoder, out, ends);
            stats().written(self.id, batch.num_rows() as u64);
            return Ok(());
        }
        // Row by row: the rare batch with a row that does not encode.
        drop(encoder.flush());
        for (row, null) in nulls.into_iter().enumerate() {
            let failed = match null {
                Some(field) => Some(format!(
                    "the row does not encode as Avro: `{field}` is null, and the writer schema has no null for it"
                )),
                None => match encoder.encode(&batch.slice(row, 1)) {
                    Ok(()) => {
                        append(encoder, out, ends);
                        None
                    }
                    // The columns, not the row: no row can be written.
                    Err(e @ (AvroError::SchemaError(_) | AvroError::NYI(_))) => {
                        return Err(Error::Refused {
                            system: "avro",
                            message: format!("the output's rows cannot be written as Avro: {e}"),
                        });
                    }
                    Err(e) => {
                        drop(encoder.flush());
                        Some(format!("the row does not encode as Avro: {e}"))
                    }
                },
            };
            if let Some(why) = failed {
                ends.push(out.len());
                refused.push((row as u32, why));
            }
        }
        let written = batch.num_rows() - (refused.len() - refused_before);
        stats().written(self.id, written as u64);
        Ok(())
    }
}

/// The encoder's rows, appended to `out`, with their ends.
fn append(encoder: &mut Encoder, out: &mut Vec<u8>, ends: &mut Vec<usize>) {
    let rows = encoder.flush();
    let base = out.len();
    out.extend_from_slice(rows.bytes());
    ends.extend(rows.offsets()[1..].iter().map(|end| base + end));
}

#[cfg(test)]
mod tests;
