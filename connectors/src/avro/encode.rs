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
//!     # subject: views-by-title-value
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

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{Fields, Schema};
use arrow_avro::schema::{
    AvroSchema, FingerprintAlgorithm, FingerprintStrategy, SCHEMA_METADATA_KEY,
};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};
use serde::Deserialize;
use sluice_engine::{Error, Result};

use super::{RegistryConfig, SchemaRegistry, stats};

/// `avro:` of a Kafka sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvroSinkConfig {
    /// The writer schema (`.avsc`), its fields matched to the output's columns by name;
    /// derived from the columns when absent.
    pub schema: Option<PathBuf>,
    /// Where the schema is registered.
    pub schema_registry: RegistryConfig,
    /// The subject to register under (default `{topic}-value`).
    pub subject: Option<String>,
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
    /// The output's columns, with the writer schema (once known) in their metadata.
    columns: Schema,
    /// The writer schema, once known (a pinned id without a file: fetched at first use).
    writer: Option<AvroSchema>,
    pinned: Option<u32>,
    /// Built once the schema's id is known (every message starts with it).
    encoder: Option<Encoder>,
    id: u32,
    /// The writer schema's JSON, to find nulls it cannot hold.
    shape: serde_json::Value,
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

impl AvroEncoder {
    /// An encoder of `input` rows for `topic`; fails when the columns do not fit the
    /// writer schema (or have a type Avro cannot hold).
    pub fn open(config: &AvroSinkConfig, topic: &str, input: &Schema) -> Result<Self> {
        let writer = match (&config.schema, config.schema_id) {
            (Some(path), _) => Some(read_schema(path)?),
            (None, Some(_)) => None,
            (None, None) => {
                // Named after the topic (arrow-avro makes it a valid Avro name).
                let mut named = input.clone();
                named.metadata.insert("avro.name".into(), topic.into());
                Some(AvroSchema::try_from(&named).map_err(|e| {
                    Error::Plan(format!(
                        "the output's columns as an Avro schema (topic `{topic}`): {e}"
                    ))
                })?)
            }
        };
        let mut encoder = AvroEncoder {
            registry: SchemaRegistry::new(&config.schema_registry)?,
            subject: config
                .subject
                .clone()
                .unwrap_or_else(|| format!("{topic}-value")),
            columns: Schema::new(input.fields().clone()),
            writer: None,
            pinned: config.schema_id,
            encoder: None,
            id: 0,
            shape: serde_json::Value::Null,
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
        let mut columns = self.columns.clone();
        columns
            .metadata
            .insert(SCHEMA_METADATA_KEY.into(), writer.json_string.clone());
        let encoder = WriterBuilder::new(columns)
            .with_fingerprint_strategy(FingerprintStrategy::Id(id))
            .build_encoder::<AvroSoeFormat>()
            .map_err(|e| Error::Refused {
                system: "schema registry",
                message: format!(
                    "the output's columns do not fit the Avro writer schema of subject `{}`: {e}",
                    self.subject
                ),
            })?;
        self.shape = serde_json::from_str(&writer.json_string).unwrap_or_default();
        self.writer = Some(writer);
        self.encoder = Some(encoder);
        self.id = id;
        Ok(())
    }

    /// Builds the encoder, registering the writer schema (or fetching the pinned one).
    async fn ready(&mut self) -> Result<()> {
        if self.encoder.is_none() {
            let (writer, id) = match (self.writer.clone(), self.pinned) {
                (Some(writer), Some(id)) => (writer, id),
                (Some(writer), None) => {
                    let id = self
                        .registry
                        .register(&self.subject, &writer.json_string)
                        .await?;
                    tracing::info!(subject = %self.subject, id, "Avro writer schema registered");
                    (writer, id)
                }
                (None, Some(id)) => match self.registry.schema(id).await? {
                    Ok(stored) if stored.schema_type.as_deref().is_none_or(|t| t == "AVRO") => {
                        (AvroSchema::new(stored.schema), id)
                    }
                    Ok(stored) => {
                        return Err(Error::Refused {
                            system: "schema registry",
                            message: format!(
                                "schema id {id} is a {} schema, not Avro",
                                stored.schema_type.unwrap_or_default()
                            ),
                        });
                    }
                    Err(no) => {
                        return Err(Error::Refused {
                            system: "schema registry",
                            message: format!(
                                "schema id {id}: the registry at {} answers {} {}",
                                self.registry.url(),
                                no.status,
                                no.said
                            ),
                        });
                    }
                },
                (None, None) => unreachable!("open derives a schema when none is pinned"),
            };
            self.build(writer, id)?;
        }
        Ok(())
    }

    /// Appends each row of `batch` as one message to `out`, its end in `ends` (one per
    /// row). A row that does not encode (a null where the writer schema has no null, a
    /// value its type cannot hold) gets an empty message and is named in `refused` with
    /// the reason.
    pub async fn encode(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        refused: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        self.ready().await?;
        let refused_before = refused.len();
        // arrow-avro writes a null where the schema has none as the type's empty value:
        // such rows are found first.
        let mut nulls = vec![None; batch.num_rows()];
        if let Some(fields) = self.shape.get("fields") {
            forbidden_nulls(
                batch.columns(),
                &batch.schema().fields,
                fields,
                "",
                &mut nulls,
            );
        }
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

/// Marks in `nulls` (one per row) the rows where a column of `columns` is null while its
/// field in `fields` (a record's Avro fields) has no null in its type, naming the field;
/// records nested in records are followed (not those inside arrays or maps).
fn forbidden_nulls(
    columns: &[ArrayRef],
    arrow: &Fields,
    fields: &serde_json::Value,
    path: &str,
    nulls: &mut [Option<String>],
) {
    for field in fields.as_array().into_iter().flatten() {
        let Some(name) = field.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some((i, _)) = arrow.find(name) else {
            continue;
        };
        let column = &columns[i];
        let mut ty = &field["type"];
        if let Some(branches) = ty.as_array() {
            if branches.iter().any(|b| b == "null") {
                continue;
            }
            // A union without null: its one branch, if it is one.
            if let [one] = branches.as_slice() {
                ty = one;
            }
        }
        if let Some(null) = column.logical_nulls()
            && null.null_count() > 0
        {
            for (row, valid) in null.iter().enumerate() {
                if !valid && nulls[row].is_none() {
                    nulls[row] = Some(format!("{path}{name}"));
                }
            }
        }
        if let (Some(inner), Some(record)) = (ty.get("fields"), column.as_struct_opt()) {
            let path = format!("{path}{name}.");
            forbidden_nulls(record.columns(), record.fields(), inner, &path, nulls);
        }
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
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        Array, ArrayRef, Decimal128Array, Int64Array, ListArray, StringArray, StructArray,
        TimestampMicrosecondArray,
    };
    use arrow::datatypes::{DataType, Field, Int64Type, TimeUnit};

    use super::*;
    use crate::avro::{AvroConfig, AvroDecoder, AvroFormat};

    fn config(schema: Option<PathBuf>) -> AvroSinkConfig {
        AvroSinkConfig {
            schema,
            schema_registry: RegistryConfig::at("http://127.0.0.1:9"),
            subject: None,
            schema_id: None,
        }
    }

    /// Nullable strings, timestamps, decimals, a nested record and an array: rows into a
    /// derived writer schema and back, unchanged.
    fn rows() -> RecordBatch {
        let point = Fields::from(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("label", DataType::Utf8, true),
        ]);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(StringArray::from(vec![Some("a"), None, Some("c\nd")])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![0, 1_700_000_000_123_456, -5])
                    .with_timezone("+00:00"),
            ),
            Arc::new(
                Decimal128Array::from(vec![12345, -1, 0])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(StructArray::new(
                point.clone(),
                vec![
                    Arc::new(Int64Array::from(vec![7, 8, 9])),
                    Arc::new(StringArray::from(vec![None, Some("p"), Some("q")])),
                ],
                None,
            )),
            Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                Some(vec![Some(1), Some(2)]),
                Some(vec![]),
                Some(vec![Some(3)]),
            ])),
        ];
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("user", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                false,
            ),
            Field::new("amount", DataType::Decimal128(10, 2), false),
            Field::new("point", DataType::Struct(point), false),
            Field::new(
                "tags",
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                false,
            ),
        ]);
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    /// An encoder framing with `id`, as if the registry had given it.
    fn encoder(config: &AvroSinkConfig, input: &Schema, id: u32) -> AvroEncoder {
        let mut encoder = AvroEncoder::open(config, "views-out", input).unwrap();
        let writer = AvroSchema::new(encoder.schema_json().unwrap().to_string());
        encoder.build(writer, id).unwrap();
        encoder
    }

    #[tokio::test]
    async fn rows_encode_into_a_derived_schema_and_decode_back_unchanged() {
        let batch = rows();
        let mut encoder = encoder(&config(None), &batch.schema(), 42);
        let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        encoder
            .encode(&batch, &mut out, &mut ends, &mut refused)
            .await
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(ends.len(), 3);
        let mut messages = Vec::new();
        let mut start = 0;
        for end in &ends {
            assert_eq!(
                &out[start..start + 5],
                &[0, 0, 0, 0, 42],
                "Confluent framing"
            );
            messages.push(&out[start..*end]);
            start = *end;
        }

        // Read back with the writer schema as the reader schema.
        let json = encoder.schema_json().unwrap().to_string();
        assert!(json.contains("\"name\":\"views_out\""), "{json}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.avsc"), &json).unwrap();
        let format = AvroFormat::open(&AvroConfig {
            schema: dir.path().join("w.avsc"),
            schema_registry: RegistryConfig::at("http://127.0.0.1:9"),
        })
        .unwrap();
        assert!(format.add_writer(42, json));
        let mut decoder = AvroDecoder::new(Arc::new(format), 1 << 20);
        let (back, bad) = decoder.decode_each(&messages);
        assert!(bad.is_empty(), "{bad:?}");
        let back = back.unwrap();
        for (i, column) in batch.columns().iter().enumerate() {
            assert_eq!(
                back.column(i).to_data(),
                column.to_data(),
                "column {}",
                batch.schema().field(i).name()
            );
        }
    }

    /// A given `.avsc` takes the columns it names; a row with a null where it has no null
    /// is refused with the reason, the others are written.
    #[tokio::test]
    async fn a_row_the_writer_schema_cannot_hold_is_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.avsc");
        std::fs::write(
            &path,
            r#"{"type":"record","name":"Out","fields":[{"name":"user","type":"string"},{"name":"id","type":"long"}]}"#,
        )
        .unwrap();
        let batch = rows();
        let mut encoder = encoder(&config(Some(path)), &batch.schema(), 3);
        let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        encoder
            .encode(&batch, &mut out, &mut ends, &mut refused)
            .await
            .unwrap();
        assert_eq!(ends.len(), 3, "a slot per row");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, 1);
        assert!(
            refused[0]
                .1
                .contains("`user` is null, and the writer schema has no null"),
            "{refused:?}"
        );
        assert_eq!(ends[1], ends[0], "the refused row's slot is empty");
        // `user` first, as the schema orders it: "a" is a length 1 (zig-zag 2) and `a`.
        assert_eq!(&out[5..7], &[2, b'a']);
    }

    #[test]
    fn columns_the_schema_names_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.avsc");
        std::fs::write(
            &path,
            r#"{"type":"record","name":"Out","fields":[{"name":"missing","type":"long"}]}"#,
        )
        .unwrap();
        let err = AvroEncoder::open(&config(Some(path)), "t", &rows().schema())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
