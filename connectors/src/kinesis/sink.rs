//! The Kinesis sink: rows as JSON records (or Avro, Protobuf: see [`crate::format`]), sent with PutRecords in calls of up to 500
//! records and 5 MiB. A checkpoint waits (`flush`) until Kinesis has acknowledged every
//! record written before it; records a call failed inside a successful call (throttled
//! shards) are sent again in their order, with backoff; a Kinesis that cannot be
//! reached is waited for, which back-pressures the pipeline as a Kafka outage does.
//!
//! Order: the records of a partition key are sent in the order of their rows. When a call
//! fails some records and not a later one of the same key, that later one is written first
//! (as with the Kinesis Producer Library); the failed ones follow in their order.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::Schema;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use sluice_engine::sink::Sink;
use sluice_engine::{Error, Result};
use tokio::time::Instant;

use super::KinesisSinkConfig;
use super::retry::{Backoff, Fault, classify};
use crate::format::{Encoded, Encoding};

/// PutRecords takes at most 500 records…
const RECORDS_PER_CALL: usize = 500;
/// …and 5 MiB in all.
const BYTES_PER_CALL: usize = 5 << 20;
/// A record's data and partition key together are at most 1 MiB.
const MAX_RECORD_BYTES: usize = 1 << 20;
/// Buffered records are sent once this many bytes wait.
const SEND_AT_BYTES: usize = BYTES_PER_CALL;

struct Entry {
    data: Vec<u8>,
    key: String,
    hash_key: Option<String>,
}

impl Entry {
    fn size(&self) -> usize {
        self.data.len() + self.key.len()
    }
}

pub struct KinesisSink {
    config: Arc<KinesisSinkConfig>,
    client: Option<aws_sdk_kinesis::Client>,
    key: Option<usize>,
    hash_key: Option<usize>,
    waiting: VecDeque<Entry>,
    waiting_bytes: usize,
    refused: Vec<(u32, String)>,
    /// How rows become records.
    encoding: Encoding,
    /// The batch being written, encoded.
    encoded: Encoded,
    sent: u64,
    retried: u64,
}

impl KinesisSink {
    pub fn open(config: Arc<KinesisSinkConfig>, input: &Schema) -> Result<Self> {
        let column = |name: &Option<String>| -> Result<Option<usize>> {
            match name {
                None => Ok(None),
                Some(name) => input.index_of(name).map(Some).map_err(|_| {
                    let names: Vec<&str> =
                        input.fields().iter().map(|f| f.name().as_str()).collect();
                    Error::Plan(format!(
                        "the sink's input has no column `{name}` (it has: {})",
                        names.join(", ")
                    ))
                }),
            }
        };
        Ok(KinesisSink {
            encoding: Encoding::open(&config.format_keys(), input)?,
            key: column(&config.partition_key)?,
            hash_key: column(&config.explicit_hash_key)?,
            config,
            client: None,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            refused: Vec::new(),
            encoded: Encoded::default(),
            sent: 0,
            retried: 0,
        })
    }

    async fn client(&mut self) -> aws_sdk_kinesis::Client {
        match &self.client {
            Some(c) => c.clone(),
            None => {
                let c = self.config.client_config().client().await;
                self.client = Some(c.clone());
                c
            }
        }
    }

    /// Sends what waits: whole calls only, unless `all`.
    async fn send(&mut self, all: bool) -> Result<()> {
        let client = self.client().await;
        let stream = self.config.stream_ref();
        let mut backoff = Backoff::new();
        let started = Instant::now();
        let mut next_warning = Duration::from_secs(10);
        while !self.waiting.is_empty()
            && (all
                || self.waiting.len() >= RECORDS_PER_CALL
                || self.waiting_bytes >= SEND_AT_BYTES)
        {
            // The next call: records in order, up to the limits.
            let mut n = 0;
            let mut bytes = 0;
            for e in &self.waiting {
                if n == RECORDS_PER_CALL || (n > 0 && bytes + e.size() > BYTES_PER_CALL) {
                    break;
                }
                n += 1;
                bytes += e.size();
            }
            let entries: Vec<PutRecordsRequestEntry> = self
                .waiting
                .iter()
                .take(n)
                .map(|e| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(e.data.clone()))
                        .partition_key(&e.key)
                        .set_explicit_hash_key(e.hash_key.clone())
                        .build()
                        .expect("data and partition key are set")
                })
                .collect();
            let result = client
                .put_records()
                .set_stream_name(stream.stream.clone())
                .set_stream_arn(stream.stream_arn.clone())
                .set_records(Some(entries))
                .send()
                .await;
            match result {
                Ok(out) if out.records().len() != n => {
                    // Not an answer for each record: none is taken as written.
                    tracing::warn!(
                        sent = n,
                        answered = out.records().len(),
                        "PutRecords answered for another number of records; sending them again"
                    );
                    tokio::time::sleep(backoff.next()).await;
                }
                Ok(out) => {
                    // Entries that failed inside the call stay, in order, for the next one.
                    let mut kept = VecDeque::new();
                    for (entry, result) in self.waiting.drain(..n).zip(out.records()) {
                        if result.error_code().is_some() {
                            kept.push_back(entry);
                        } else {
                            self.waiting_bytes -= entry.size();
                            self.sent += 1;
                        }
                    }
                    let accepted = n - kept.len();
                    if accepted > 0 {
                        // Progress: the next wait starts short again.
                        backoff.reset();
                    }
                    if !kept.is_empty() {
                        self.retried += kept.len() as u64;
                        for e in kept.into_iter().rev() {
                            self.waiting.push_front(e);
                        }
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
                Err(e) => match classify(&format!("PutRecords to `{}`", stream.name()), &e) {
                    Fault::Stop(e) => return Err(e),
                    Fault::Throttled | Fault::Expired => tokio::time::sleep(backoff.next()).await,
                    Fault::Transient(why) => {
                        if started.elapsed() >= next_warning {
                            tracing::warn!(
                                waiting = self.waiting.len(),
                                for_ = ?started.elapsed(),
                                "records not yet acknowledged by Kinesis: {why}"
                            );
                            next_warning *= 2;
                        }
                        tokio::time::sleep(backoff.next()).await;
                    }
                },
            }
        }
        Ok(())
    }
}

impl KinesisSink {
    /// The batch's rows as records waiting to be sent; rows that do not encode, or that
    /// Kinesis cannot take, are refused.
    async fn take_rows(&mut self, batch: &RecordBatch) -> Result<()> {
        let refused_before = self.refused.len();
        self.encoding
            .encode(batch, &mut self.encoded, &mut self.refused)
            .await?;
        let unsent: std::collections::HashSet<u32> = self.refused[refused_before..]
            .iter()
            .map(|(row, _)| *row)
            .collect();
        let options = FormatOptions::default();
        let text = |column: Option<usize>| -> Result<Option<ArrayFormatter<'_>>> {
            column
                .map(|i| ArrayFormatter::try_new(batch.column(i).as_ref(), &options))
                .transpose()
                .map_err(|e| Error::arrow("formatting a key column", e))
        };
        let keys = text(self.key)?;
        let hash_keys = text(self.hash_key)?;
        let key_column = self.key.map(|i| batch.column(i));
        let hash_column = self.hash_key.map(|i| batch.column(i));
        for (row, line) in self.encoded.payloads().enumerate() {
            if unsent.contains(&(row as u32)) {
                continue;
            }
            let key = match (&keys, key_column) {
                (Some(f), Some(c)) if c.is_valid(row) => f.value(row).to_string(),
                _ => {
                    let mut h = std::hash::DefaultHasher::new();
                    line.hash(&mut h);
                    format!("{:016x}", h.finish())
                }
            };
            let hash_key = match (&hash_keys, hash_column) {
                (Some(f), Some(c)) if c.is_valid(row) => Some(f.value(row).to_string()),
                _ => None,
            };
            if let Some(h) = &hash_key
                && h.parse::<u128>().is_err()
            {
                self.refused.push((
                    row as u32,
                    format!("the explicit hash key `{h}` is not a decimal number below 2^128"),
                ));
                continue;
            }
            if key.is_empty() {
                self.refused.push((
                    row as u32,
                    "the partition key is empty; Kinesis takes keys of 1 to 256 characters"
                        .to_string(),
                ));
                continue;
            }
            let entry = Entry {
                data: line.to_vec(),
                key,
                hash_key,
            };
            if entry.size() > MAX_RECORD_BYTES || entry.key.chars().count() > 256 {
                self.refused.push((
                    row as u32,
                    format!(
                        "the record is {} bytes with its partition key of {} characters; \
                         Kinesis takes at most 1 MiB and keys of at most 256",
                        entry.size(),
                        entry.key.chars().count()
                    ),
                ));
                continue;
            }
            self.waiting_bytes += entry.size();
            self.waiting.push_back(entry);
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for KinesisSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.take_rows(&batch).await?;
        self.send(false).await
    }

    async fn flush(&mut self) -> Result<()> {
        self.send(true).await
    }

    async fn close(&mut self) -> Result<()> {
        self.send(true).await
    }

    fn summary(&self) -> String {
        format!(
            "{} records to Kinesis stream `{}` ({} sent again after throttling)",
            self.sent,
            self.config.stream_ref().name(),
            self.retried
        )
    }

    fn take_refused(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.refused)
    }
}
