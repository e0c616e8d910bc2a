//! A source's payloads into rows: the format opened once per source ([`SourceFormat`]),
//! a decoder per partition ([`Payloads`]).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use sluice_engine::{Error, Result};

use super::SourceKeys;
use crate::avro::{AvroDecoder, AvroFormat};
use crate::debezium::{DebeziumConfig, DebeziumDecoder};
use crate::json::JsonDecoder;
use crate::protobuf::{ProtobufDecoder, ProtobufFormat};
use crate::stream::MessageFormat;

/// What a source's `format:` reads, opened once: the reader schema and the writer schemas
/// fetched so far are shared by its partitions' decoders.
pub struct SourceFormat {
    /// `format: avro` (and Debezium's Avro envelopes).
    avro: Option<Arc<AvroFormat>>,
    /// `format: protobuf`.
    protobuf: Option<Arc<ProtobufFormat>>,
    /// `format: debezium`: the table's columns, and what tombstones become.
    debezium: Option<(SchemaRef, DebeziumConfig)>,
    /// The columns a payload decodes to.
    records: SchemaRef,
    max_record: usize,
}

impl SourceFormat {
    /// Opens the format of a source's keys; payloads over `max_record` bytes are refused.
    pub fn open(keys: &SourceKeys<'_>, max_record: usize) -> Result<Self> {
        let avro = match (keys.format, keys.avro) {
            (MessageFormat::Avro | MessageFormat::Debezium, Some(avro)) => {
                Some(Arc::new(AvroFormat::open(avro, &keys.subjects)?))
            }
            (MessageFormat::Avro, None) => {
                return Err(Error::Plan("`format: avro` needs `avro:`".into()));
            }
            _ => None,
        };
        let debezium = match (keys.format, &avro) {
            (MessageFormat::Debezium, None) => Some((
                keys.schema.to_arrow(),
                keys.debezium.cloned().unwrap_or_default(),
            )),
            // Debezium's Avro envelopes: the table is the envelope's `after` record.
            (MessageFormat::Debezium, Some(format)) => Some((
                Arc::new(crate::debezium::table_of(&format.records())?),
                keys.debezium.cloned().unwrap_or_default(),
            )),
            _ => None,
        };
        let protobuf = match (keys.format, keys.protobuf) {
            (MessageFormat::Protobuf, Some(p)) => Some(Arc::new(ProtobufFormat::open(p)?)),
            (MessageFormat::Protobuf, None) => {
                return Err(Error::Plan("`format: protobuf` needs `protobuf:`".into()));
            }
            _ => None,
        };
        let records = match (&protobuf, &debezium, &avro) {
            (Some(format), _, _) => format.records(),
            (None, Some((table, _)), _) => crate::debezium::records_schema(table),
            (None, None, Some(format)) => format.records(),
            (None, None, None) => keys.schema.to_arrow(),
        };
        Ok(SourceFormat {
            avro,
            protobuf,
            debezium,
            records,
            max_record,
        })
    }

    /// The columns a payload decodes to (before the source's metadata columns).
    pub fn records(&self) -> SchemaRef {
        self.records.clone()
    }

    /// A decoder for one partition.
    pub fn decoder(&self) -> Payloads {
        let max = self.max_record;
        match (&self.protobuf, &self.avro, &self.debezium) {
            (Some(format), _, _) => Payloads::Protobuf(ProtobufDecoder::new(format.clone(), max)),
            (None, Some(format), Some((table, config))) => {
                Payloads::Debezium(DebeziumDecoder::avro(format.clone(), table, config, max))
            }
            (None, Some(format), None) => Payloads::Avro(AvroDecoder::new(format.clone(), max)),
            (None, None, Some((table, config))) => {
                Payloads::Debezium(DebeziumDecoder::new(table, config, max))
            }
            (None, None, None) => {
                Payloads::Json(JsonDecoder::new(self.records.clone()).with_max_record(max))
            }
        }
    }
}

/// How a partition's payloads are decoded.
pub enum Payloads {
    Json(JsonDecoder),
    Avro(AvroDecoder),
    Protobuf(ProtobufDecoder),
    Debezium(DebeziumDecoder),
}

/// What a read's payloads decoded to.
pub struct Decoded {
    /// A row per payload neither bad nor skipped, in their order.
    pub records: RecordBatch,
    /// Payloads that did not decode, by index (ascending), with why.
    pub bad: Vec<(usize, String)>,
    /// Payloads that hold no record (Debezium tombstones), by index (ascending).
    pub skipped: Vec<usize>,
}

impl Decoded {
    /// The payloads that became no row (bad or skipped), by index (ascending).
    pub fn gone(&self) -> Vec<usize> {
        let mut gone: Vec<usize> = self
            .bad
            .iter()
            .map(|b| b.0)
            .chain(self.skipped.iter().copied())
            .collect();
        gone.sort_unstable();
        gone
    }
}

impl Payloads {
    /// Fetches the writer schemas `payloads` name that are not known yet, waiting for the
    /// registry while it does not answer. Cancel safe: what was fetched stays fetched.
    pub async fn prepare<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        match self {
            Payloads::Avro(avro) => avro.prepare(payloads).await,
            Payloads::Protobuf(protobuf) => protobuf.prepare(payloads).await,
            Payloads::Debezium(debezium) => debezium.prepare(payloads).await,
            Payloads::Json(_) => Ok(()),
        }
    }

    /// Decodes what decodes of `payloads`, naming the rest; `tombstone(i)` says the `i`th
    /// message had no value at all (a Kafka null).
    pub fn decode_each(
        &mut self,
        payloads: &[&[u8]],
        tombstone: impl Fn(usize) -> bool,
    ) -> Result<Decoded> {
        let (records, bad, skipped) = match self {
            Payloads::Json(json) => {
                let (records, bad) = json.decode_each(payloads);
                let records = records.map_err(|e| {
                    Error::Internal(format!("decoding records that decoded alone: {}", e.reason))
                })?;
                (records, bad, Vec::new())
            }
            Payloads::Avro(avro) => {
                let (records, bad) = avro.decode_each(payloads);
                (records?, bad, Vec::new())
            }
            Payloads::Protobuf(protobuf) => {
                let (records, bad) = protobuf.decode_each(payloads, tombstone);
                (records?, bad, Vec::new())
            }
            Payloads::Debezium(debezium) => {
                let decoded = debezium.decode_each(payloads, tombstone);
                (decoded.rows?, decoded.bad, decoded.skipped)
            }
        };
        Ok(Decoded {
            records,
            bad,
            skipped,
        })
    }

    /// Decodes `payloads` whole, for a source without dead letters: the first payload that
    /// does not decode is the error `bad` makes of its index (`None`: the read as a whole)
    /// and reason. Returns the rows and the skipped payloads (Debezium tombstones).
    pub fn decode_all(
        &mut self,
        payloads: &[&[u8]],
        tombstone: impl Fn(usize) -> bool,
        bad: impl Fn(Option<usize>, String) -> Error,
    ) -> Result<(RecordBatch, Vec<usize>)> {
        match self {
            // JSON's own path: one decode, and the first bad record's error as it says it.
            Payloads::Json(json) => json
                .decode(payloads.iter().copied())
                .map(|records| (records, Vec::new()))
                .map_err(|e| bad(e.index, e.reason)),
            decoder => {
                let decoded = decoder.decode_each(payloads, tombstone)?;
                if let Some((i, reason)) = decoded.bad.into_iter().next() {
                    return Err(bad(Some(i), reason));
                }
                Ok((decoded.records, decoded.skipped))
            }
        }
    }
}
