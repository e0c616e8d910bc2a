//! A partition's reader: its buffer decoded into Arrow batches.

use super::*;

/// Reads one partition's buffer and decodes it into batches.
pub(super) struct KafkaReader {
    pub(super) decoder: Payloads,
    pub(super) schema: SchemaRef,
    pub(super) buffer: Arc<PartitionBuffer>,
    pub(super) shared: Arc<GroupState>,
    /// Where the assignment starts it; `None` where the brokers did not answer the lookups
    /// and librdkafka finds the start itself.
    pub(super) start: Option<i64>,
    /// A chunk taken from the buffer whose Avro writer schemas are being fetched: kept
    /// here, so that a `read` cancelled while it waits for the registry loses nothing.
    pub(super) held: Option<Chunk>,
}

impl KafkaReader {
    pub(super) fn envelope(&mut self, chunk: Chunk) -> Result<Envelope> {
        if self.shared.dead_letters {
            return self.envelope_keeping_bad(chunk);
        }
        let n = chunk.len();
        let offsets = chunk.offsets[0]..chunk.offsets[n - 1] + 1;
        let whole = &chunk;
        let bad = |index: Option<usize>, reason: String| {
            let at = match index {
                Some(i) => format!("offset {}", whole.offsets[i]),
                None => format!("offsets {}..={}", whole.offsets[0], whole.offsets[n - 1]),
            };
            Error::BadRecord {
                origin: format!(
                    "topic `{}` partition {} {at}",
                    self.buffer.topic, self.buffer.partition
                ),
                reason,
            }
        };
        let payloads: Vec<&[u8]> = (0..n).map(|i| whole.payload(i)).collect();
        let tombstone = |i: usize| !whole.has_payload[i];
        let (records, skipped) = self.decoder.decode_all(&payloads, tombstone, bad)?;
        if skipped.is_empty() {
            self.assemble(records, whole, offsets, Vec::new())
        } else {
            // Debezium tombstones: no row, their offsets read all the same.
            self.assemble(records, &whole.without(&skipped), offsets, Vec::new())
        }
    }

    /// Decoded records of `chunk` with their metadata columns, for the offset range read.
    pub(super) fn assemble(
        &self,
        records: RecordBatch,
        chunk: &Chunk,
        offsets: std::ops::Range<i64>,
        dead: Vec<DeadLetter>,
    ) -> Result<Envelope> {
        let mut columns = records.columns().to_vec();
        columns.extend(self.metadata(chunk));
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Error::arrow("attaching Kafka metadata columns", e))?;
        Ok(Envelope {
            partition: self.buffer.info.clone(),
            offsets,
            batch,
            dead,
        })
    }

    /// Decodes what decodes; each message that does not becomes a dead letter with its
    /// original bytes.
    pub(super) fn envelope_keeping_bad(&mut self, chunk: Chunk) -> Result<Envelope> {
        let n = chunk.len();
        let payloads: Vec<&[u8]> = (0..n).map(|i| chunk.payload(i)).collect();
        let decoded = self
            .decoder
            .decode_each(&payloads, |i| !chunk.has_payload[i])?;
        let offsets = chunk.offsets[0]..chunk.offsets[n - 1] + 1;
        let mut dead = Vec::with_capacity(decoded.bad.len());
        let now = sluice_engine::dead_letter::now_ms();
        for (i, reason) in &decoded.bad {
            dead.push(DeadLetter {
                stage: SOURCE_STAGE.into(),
                class: ErrorClass::Decode,
                reason: reason.clone(),
                attempts: 1,
                partition: self.buffer.info.clone(),
                offset: Some(chunk.offsets[*i]),
                key: chunk.key(*i).map(<[u8]>::to_vec),
                headers: chunk.headers[Chunk::range(&chunk.header_ends, *i)].to_vec(),
                first_failed_at: now,
                last_failed_at: now,
                payload: payloads[*i].to_vec(),
            });
        }
        // Rows only for the messages neither bad nor skipped (Debezium tombstones).
        let gone = decoded.gone();
        let chunk = if gone.is_empty() {
            chunk
        } else {
            chunk.without(&gone)
        };
        self.assemble(decoded.records, &chunk, offsets, dead)
    }

    /// `_partition _offset _key _timestamp _topic _headers`
    pub(super) fn metadata(&self, chunk: &Chunk) -> [ArrayRef; 6] {
        let n = chunk.len();
        let key_at =
            |i: usize| chunk.has_key[i].then(|| &chunk.keys[Chunk::range(&chunk.key_ends, i)]);
        // `key_format: bytes` makes `_key` binary.
        let as_bytes = self
            .schema
            .field_with_name(batch::KEY)
            .is_ok_and(|f| f.data_type() == &arrow::datatypes::DataType::Binary);
        let keys: ArrayRef = if as_bytes {
            let mut keys = arrow::array::BinaryBuilder::with_capacity(n, chunk.keys.len());
            for i in 0..n {
                keys.append_option(key_at(i));
            }
            Arc::new(keys.finish())
        } else {
            let mut keys = StringBuilder::with_capacity(n, chunk.keys.len());
            for i in 0..n {
                keys.append_option(key_at(i).map(String::from_utf8_lossy));
            }
            Arc::new(keys.finish())
        };
        let mut headers = sluice_engine::batch::headers_builder();
        for i in 0..n {
            for (k, v) in &chunk.headers[Chunk::range(&chunk.header_ends, i)] {
                headers.keys().append_value(k);
                match v {
                    Some(v) => headers.values().append_value(v),
                    None => headers.values().append_null(),
                }
            }
            headers
                .append(true)
                .expect("keys and values appended in pairs");
        }
        let topic: &str = &self.buffer.topic;
        [
            Arc::new(UInt32Array::from_value(self.buffer.info.id, n)),
            Arc::new(Int64Array::from(chunk.offsets.clone())),
            keys,
            Arc::new(
                TimestampMillisecondArray::from(chunk.timestamps.clone()).with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(topic, n))),
            Arc::new(headers.finish()),
        ]
    }
}

#[async_trait]
impl PartitionReader for KafkaReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.buffer.info
    }

    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        Some(self.buffer.log_end.clone())
    }

    fn start_offset(&self) -> Option<i64> {
        self.start
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        loop {
            if self.held.is_none() {
                self.held = self.buffer.take(max.max(1), &self.shared);
            }
            if let Some(chunk) = &self.held {
                // Writer schemas first: fetched (waiting for the registry) before
                // decoding. Cancel safe: the chunk stays held until it is decoded.
                let payloads = (0..chunk.len()).map(|i| chunk.payload(i));
                self.decoder.prepare(payloads).await?;
                let chunk = self.held.take().expect("held above");
                return self.envelope(chunk).map(Some);
            }
            if self.buffer.closed.load(Ordering::SeqCst) {
                return Ok(None);
            }
            // Cancel safe: nothing is taken until a chunk is there.
            self.buffer.ready.notified().await;
        }
    }
}
