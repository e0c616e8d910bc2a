//! A sink's rows into payloads: JSON, Avro or Protobuf, one payload per row.

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use sluice_engine::{Error, Result};

use super::SinkKeys;
use crate::avro::AvroEncoder;
use crate::json::lines_writer;
use crate::protobuf::ProtobufEncoder;
use crate::stream::MessageFormat;

/// How a sink's rows become payloads.
pub enum Encoding {
    /// One JSON object per row.
    Json,
    /// Confluent-framed Avro.
    Avro(AvroEncoder),
    /// Protobuf, plain or Confluent-framed.
    Protobuf(ProtobufEncoder),
}

/// A batch's payloads, back to back: one slot per row, empty for a row refused.
#[derive(Default)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Where each row's payload ends.
    ends: Vec<usize>,
    /// Bytes between payloads (the newline after a JSON row).
    separator: usize,
}

impl Encoded {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.separator = 0;
    }

    /// Adds a payload as it is (a dead letter's bytes).
    pub fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.ends.push(self.bytes.len());
    }

    /// Fails unless there is a slot for each of `rows`: a row without one would be
    /// acknowledged and written nowhere.
    pub fn check_slots(&self, rows: usize) -> Result<()> {
        if self.ends.len() == rows {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "{rows} rows encoded into {} payloads",
                self.ends.len()
            )))
        }
    }

    /// The payloads, a slot per row in order.
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let payload = &self.bytes[start..end];
            start = end + self.separator;
            payload
        })
    }
}

impl Encoding {
    /// The encoding of a sink's keys, for rows of `input`; Avro and Protobuf writer
    /// schemas register under the subject of `keys.topic` (unless given otherwise).
    pub fn open(keys: &SinkKeys<'_>, input: &Schema) -> Result<Self> {
        Ok(match (keys.format, keys.avro, keys.protobuf) {
            (MessageFormat::Json, _, _) => Encoding::Json,
            (MessageFormat::Avro, Some(avro), _) => {
                Encoding::Avro(AvroEncoder::open(avro, keys.topic, input)?)
            }
            (MessageFormat::Protobuf, _, Some(p)) => {
                Encoding::Protobuf(ProtobufEncoder::open(p, keys.topic, input)?)
            }
            (MessageFormat::Avro, None, _) => {
                return Err(Error::Plan("`format: avro` needs `avro:`".into()));
            }
            (MessageFormat::Protobuf, _, None) => {
                return Err(Error::Plan("`format: protobuf` needs `protobuf:`".into()));
            }
            (MessageFormat::Debezium, _, _) => {
                return Err(Error::Plan(
                    "Debezium change events are read, not written: a sink writes `json`, `avro` or `protobuf`".into(),
                ));
            }
        })
    }

    /// Encodes `batch` into `out` (cleared first), a slot per row; rows that cannot be
    /// written go to `refused` with why (their slots empty). Avro and Protobuf wait for the
    /// registry at the first write (the writer schema's id).
    pub async fn encode(
        &mut self,
        batch: &RecordBatch,
        out: &mut Encoded,
        refused: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        out.clear();
        self.encode_rows(batch, out, refused).await?;
        out.check_slots(batch.num_rows())
    }

    async fn encode_rows(
        &mut self,
        batch: &RecordBatch,
        out: &mut Encoded,
        refused: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        match self {
            Encoding::Protobuf(protobuf) => {
                protobuf
                    .encode(batch, &mut out.bytes, &mut out.ends, refused)
                    .await
            }
            Encoding::Avro(avro) => {
                avro.encode(batch, &mut out.bytes, &mut out.ends, refused)
                    .await
            }
            Encoding::Json => {
                let mut writer = lines_writer(&mut out.bytes);
                writer
                    .write(batch)
                    .and_then(|_| writer.finish())
                    .map_err(|e| Error::arrow("encoding rows as JSON", e))?;
                drop(writer);
                // JSON escapes newlines inside strings: every `\n` ends a row.
                for (i, b) in out.bytes.iter().enumerate() {
                    if *b == b'\n' {
                        out.ends.push(i);
                    }
                }
                out.separator = 1;
                Ok(())
            }
        }
    }
}
