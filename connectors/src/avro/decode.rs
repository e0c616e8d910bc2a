//! One partition's Avro decoding: framed messages into the reader schema's columns, each
//! message that does not decode named with the reason.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_avro::reader::Decoder;
use arrow_avro::schema::AvroSchema;
use sluice_engine::{Error, Result};

use super::{AvroFormat, Writer, decoder_for, schema_id, stats};

/// One partition's decoder: Avro messages into the reader schema's columns.
pub struct AvroDecoder {
    format: Arc<AvroFormat>,
    /// The largest message decoded (`max_record_size`); a larger one is refused unread.
    max_record: usize,
    /// Built for the resolvable writer ids in `ids`; rebuilt when a message names another.
    decoder: Option<Decoder>,
    ids: HashSet<u32>,
}

impl AvroDecoder {
    pub fn new(format: Arc<AvroFormat>, max_record: usize) -> Self {
        AvroDecoder {
            format,
            max_record,
            decoder: None,
            ids: HashSet::new(),
        }
    }

    /// Makes sure every writer schema the messages name is known (fetched, waiting for the
    /// registry) before [`AvroDecoder::decode_each`] runs.
    pub async fn prepare<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        // Messages per writer schema id.
        let mut ids: HashMap<u32, u64> = HashMap::new();
        for id in payloads.filter_map(schema_id) {
            *ids.entry(id).or_default() += 1;
        }
        let cached: u64 = if ids.keys().all(|id| self.ids.contains(id)) {
            ids.values().sum()
        } else {
            let known = self.format.writers.lock().expect("writers lock");
            ids.iter()
                .filter(|(id, _)| known.contains_key(id))
                .map(|(_, n)| n)
                .sum()
        };
        stats().count(&stats().cache_hits, cached);
        if ids.keys().all(|id| self.ids.contains(id)) {
            return Ok(());
        }
        self.format
            .learn(super::most_named_first(ids).into_iter())
            .await?;
        self.rebuild()
            .map_err(|e| Error::Internal(format!("an Avro decoder of resolved schemas: {e}")))
    }

    /// A decoder of every writer schema that resolves (none while none does).
    fn rebuild(&mut self) -> std::result::Result<(), String> {
        let (resolvable, ids) = self.format.known();
        self.ids = ids;
        self.decoder = if resolvable.is_empty() {
            None
        } else {
            Some(decoder_for(&self.format.reader, &resolvable).map_err(|e| e.to_string())?)
        };
        Ok(())
    }

    /// Why a message cannot be decoded before its body is read: too large, not framed, a
    /// writer schema that does not resolve (`writers`: the known ones, locked once a chunk).
    fn refusal(&self, payload: &[u8], writers: &HashMap<u32, Writer>) -> Option<String> {
        if payload.len() > self.max_record {
            return Some(format!(
                "the record is {} bytes, larger than max_record_size ({})",
                payload.len(),
                sluice_engine::config::ByteSize(self.max_record as u64)
            ));
        }
        if payload.is_empty() {
            return Some(
                "an empty message (a tombstone, or a value of zero bytes) holds no Avro value"
                    .into(),
            );
        }
        let Some(id) = schema_id(payload) else {
            return Some(
                "not an Avro message in the Confluent wire format (a 0 byte, then a 4-byte schema id)"
                    .into(),
            );
        };
        match writers.get(&id) {
            Some(Writer::Refused(why)) => Some(why.clone()),
            Some(Writer::Resolves(writer)) => self.second_frame(payload, id, writer, writers),
            None => Some(super::not_fetched(id)),
        }
    }

    /// A message that holds its value and then another frame (`0` and a known id) would
    /// leave the decoder waiting for that frame's body in the next message: refused. A
    /// valid message never decodes whole without its last five bytes (Avro reads exactly
    /// the bytes of one value), so that is the test, made only for messages ending so.
    fn second_frame(
        &self,
        payload: &[u8],
        id: u32,
        writer: &AvroSchema,
        writers: &HashMap<u32, Writer>,
    ) -> Option<String> {
        let tail = payload.len().checked_sub(5).filter(|&t| t > 5)?;
        let trailing = schema_id(&payload[tail..])?;
        if !writers.contains_key(&trailing) {
            return None;
        }
        let mut alone = decoder_for(&self.format.reader, &[(id, writer.clone())]).ok()?;
        let head = &payload[..tail];
        let whole = alone.decode(head).ok()? == head.len()
            && alone
                .flush()
                .ok()
                .flatten()
                .is_some_and(|b| b.num_rows() == 1);
        whole.then(|| "the message holds a second frame after its value".to_string())
    }

    /// Decodes what decodes, in the reader schema's columns; each message that does not is
    /// named by index with the reason.
    pub fn decode_each(
        &mut self,
        payloads: &[&[u8]],
    ) -> (Result<RecordBatch>, Vec<(usize, String)>) {
        let mut bad: Vec<(usize, String)> = {
            let writers = self.format.writers.lock().expect("writers lock");
            payloads
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.refusal(p, &writers).map(|why| (i, why)))
                .collect()
        };
        let refused: HashSet<usize> = bad.iter().map(|(i, _)| *i).collect();
        let good: Vec<usize> = (0..payloads.len())
            .filter(|i| !refused.contains(i))
            .collect();
        match self.decode_all(good.iter().map(|&i| payloads[i])) {
            Ok(batch) => {
                stats().read(payloads, &bad);
                (Ok(batch), bad)
            }
            Err(_) => {
                // A body that does not decode: find it (and any other) one message at a time.
                let mut fine = Vec::with_capacity(good.len());
                for &i in &good {
                    match self.decode_all(std::iter::once(payloads[i])) {
                        Ok(_) => fine.push(i),
                        Err(why) => bad.push((i, why)),
                    }
                }
                bad.sort_by_key(|(i, _)| *i);
                let batch = self
                    .decode_all(fine.iter().map(|&i| payloads[i]))
                    .map_err(|why| {
                        Error::Internal(format!("decoding messages that decoded alone: {why}"))
                    });
                stats().read(payloads, &bad);
                (batch, bad)
            }
        }
    }

    /// Every message, each a whole framed Avro datum, as one batch; the reason of the first
    /// failure otherwise (the decoder is rebuilt after one: its state is unknown).
    fn decode_all<'a>(
        &mut self,
        payloads: impl Iterator<Item = &'a [u8]>,
    ) -> std::result::Result<RecordBatch, String> {
        let result = self.try_decode_all(payloads);
        if result.is_err() {
            self.ids.clear();
            self.decoder = None;
        }
        result
    }

    fn try_decode_all<'a>(
        &mut self,
        payloads: impl Iterator<Item = &'a [u8]>,
    ) -> std::result::Result<RecordBatch, String> {
        let mut payloads = payloads.peekable();
        if payloads.peek().is_none() {
            return Ok(RecordBatch::new_empty(self.format.records.clone()));
        }
        if self.decoder.is_none() {
            self.rebuild()?;
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return Err("no writer schema resolves".into());
        };
        let size = decoder.batch_size();
        let mut batches = Vec::new();
        // Rows out so far (flushed, and in the batch being filled): after each message one
        // more, so a message that ends inside a value (or holds two) is caught at its end,
        // before the next message's bytes could be read as its rest.
        let mut flushed = 0;
        for (done, payload) in payloads.enumerate() {
            let mut at = 0;
            while at < payload.len() {
                let used = decoder.decode(&payload[at..]).map_err(|e| e.to_string())?;
                at += used;
                if at < payload.len() {
                    // A new writer schema: the rows before it come out first.
                    match decoder.flush().map_err(|e| e.to_string())? {
                        Some(batch) => {
                            flushed += batch.num_rows();
                            batches.push(batch);
                        }
                        None if used == 0 => return Err("the message ends inside a value".into()),
                        None => {}
                    }
                }
            }
            if flushed + (size - decoder.capacity()) != done + 1 {
                return Err("the message is not one whole Avro value".into());
            }
        }
        if let Some(batch) = decoder.flush().map_err(|e| e.to_string())? {
            batches.push(batch);
        }
        match batches.len() {
            0 => Ok(RecordBatch::new_empty(self.format.records.clone())),
            1 => Ok(batches.pop().expect("one")),
            _ => arrow::compute::concat_batches(&self.format.records, &batches)
                .map_err(|e| e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::{AvroConfig, MAGIC, RegistryConfig};
    use arrow::array::AsArray;

    const READER: &str = r#"{"type":"record","name":"R","fields":[{"name":"id","type":"long"},{"name":"tag","type":"string","default":"none"}]}"#;

    fn format() -> Arc<AvroFormat> {
        format_reading(READER)
    }

    fn format_reading(reader: &str) -> Arc<AvroFormat> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.avsc");
        std::fs::write(&path, reader).unwrap();
        let format = AvroFormat::open(
            &AvroConfig {
                schema: Some(path),
                schema_registry: RegistryConfig::at("http://127.0.0.1:9"),
                subject: None,
            },
            &[],
        )
        .unwrap();
        // A writer without `tag`, known as id 7 (as if fetched).
        let writer = AvroSchema::new(
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"long"}]}"#.into(),
        );
        format
            .writers
            .lock()
            .unwrap()
            .insert(7, Writer::Resolves(writer));
        format
            .writers
            .lock()
            .unwrap()
            .insert(8, Writer::Refused("schema id 8 does not resolve".into()));
        Arc::new(format)
    }

    /// `id` as Avro's zig-zag varint, framed with schema id `schema`.
    fn message(schema: u32, id: i64) -> Vec<u8> {
        let mut out = vec![MAGIC];
        out.extend_from_slice(&schema.to_be_bytes());
        let mut z = ((id << 1) ^ (id >> 63)) as u64;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out
    }

    #[test]
    fn messages_decode_into_the_reader_schema_and_bad_ones_are_named() {
        let format = format();
        assert_eq!(format.records().fields().len(), 2);
        let mut decoder = AvroDecoder::new(format, 64);
        let (good, unframed, refused, cut, big) = (
            message(7, 300),
            b"{\"id\":1}".to_vec(),
            message(8, 5),
            message(7, 300)[..5].to_vec(),
            vec![0u8; 100],
        );
        let second = message(7, -2);
        let payloads: Vec<&[u8]> = vec![&good, &unframed, &refused, &cut, &big, &second];
        let (batch, bad) = decoder.decode_each(&payloads);
        let batch = batch.unwrap();
        assert_eq!(batch.num_rows(), 2);
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        assert_eq!(ids.values(), &[300, -2]);
        let tags = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        assert_eq!(tags.value(0), "none", "the reader's default");
        let reasons: Vec<(usize, &str)> = bad.iter().map(|(i, r)| (*i, r.as_str())).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(
            reasons[0].1.contains("Confluent wire format"),
            "{reasons:?}"
        );
        assert_eq!(reasons[1], (2, "schema id 8 does not resolve"));
        assert_eq!(reasons[2].0, 3, "{reasons:?}");
        assert!(
            reasons[3].1.contains("larger than max_record_size"),
            "{reasons:?}"
        );
    }

    /// A value followed by a second frame of a known id is refused, not left to swallow
    /// the next message's header; the next message still decodes.
    #[test]
    fn a_second_frame_after_the_value_is_refused() {
        let mut decoder = AvroDecoder::new(format(), 1 << 20);
        let mut doubled = message(7, 300);
        doubled.extend_from_slice(&[MAGIC, 0, 0, 0, 7]);
        let next = message(7, 5);
        let (batch, bad) = decoder.decode_each(&[&doubled, &next]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].1.contains("second frame"), "{bad:?}");
        let batch = batch.unwrap();
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        assert_eq!(ids.values(), &[5]);
    }

    /// A writer whose values take no bytes makes a message of two headers: the value, then
    /// a second frame whose body would be the next message. `second_frame` does not look
    /// at it (its head is a header alone, for which the decoder gives no row), but the
    /// count of rows per message refuses it; the next message decodes.
    #[test]
    fn a_second_frame_after_a_value_of_no_bytes_is_refused() {
        let reader = READER.replace(r#""type":"long""#, r#""type":"long","default":0"#);
        let format = format_reading(&reader);
        let empty = AvroSchema::new(r#"{"type":"record","name":"R","fields":[]}"#.into());
        assert!(matches!(
            format.resolve(9, empty.json_string.clone(), None, &[]),
            Writer::Resolves(_)
        ));
        format.add_writer(9, empty.json_string);
        let mut decoder = AvroDecoder::new(format, 1 << 20);
        let mut doubled = message(9, 0)[..5].to_vec();
        doubled.extend_from_slice(&[MAGIC, 0, 0, 0, 7]);
        assert_eq!(doubled.len(), 10);
        let next = message(7, 5);
        let (batch, bad) = decoder.decode_each(&[&doubled, &next]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(
            bad[0],
            (0, "the message is not one whole Avro value".into())
        );
        let batch = batch.unwrap();
        let ids = batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(ids.values(), &[5]);
    }

    /// Before any writer schema resolves, a chunk of refused messages is all dead letters,
    /// not a failure of the run.
    #[test]
    fn refused_messages_alone_are_only_refused() {
        let format = format();
        format.writers.lock().unwrap().remove(&7);
        let mut decoder = AvroDecoder::new(format, 1 << 20);
        let refused = message(8, 1);
        let (batch, bad) = decoder.decode_each(&[&refused, b"x"]);
        assert_eq!(batch.unwrap().num_rows(), 0);
        assert_eq!(bad.len(), 2);
    }
}
