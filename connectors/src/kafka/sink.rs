//! The Kafka sink: one message per row (JSON, or Avro through a schema registry), from an
//! idempotent producer with `acks=all`.
//!
//! Every message sent is counted as outstanding until its delivery report arrives.
//! [`Sink::flush`] (which the engine calls before each checkpoint) waits until none is
//! outstanding and fails if any delivery failed, so a checkpoint never covers a message the
//! broker has not acknowledged. While a broker is away librdkafka keeps retrying (up to
//! `message.timeout.ms`, five minutes by default), and the flush waits with it.
//!
//! A row whose message would be larger than the producer's `message.max.bytes` is not sent
//! (librdkafka would refuse it, and the run would stop on it again at every restart): it is
//! refused, and the engine makes it a dead letter. As a dead-letter sink, the letters come
//! cut to that size (`sluice_engine::dead_letter`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, BinaryArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use async_trait::async_trait;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sluice_engine::sink::Sink;
use sluice_engine::{Error, Result};

use super::{KafkaSinkConfig, MessageFormat};
use crate::format::{Encoded, Encoding};

pub struct KafkaSink {
    config: KafkaSinkConfig,
    /// Dead-letter mode: batches of `sluice_engine::dead_letter::schema()`, whose `payload`
    /// bytes are sent as they are, with the provenance as headers.
    dead_letters: bool,
    producer: ThreadedProducer<DeliveryContext>,
    deliveries: Arc<Deliveries>,
    /// How rows become messages.
    encoding: Encoding,
    /// The batch being sent: its messages' payloads (or the dead letters'), back to back.
    encoded: Encoded,
    sent: u64,
    /// The producer's `message.max.bytes`: librdkafka refuses a larger message outright.
    max_message: usize,
    /// Rows of the last write that were larger than `max_message` (not sent), with why.
    refused: Vec<(u32, String)>,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_MESSAGE: usize = 1_000_000;
/// What librdkafka adds to key, value and headers when it checks a message against
/// `message.max.bytes` (a record's framing in the v2 format is well under this).
const FRAMING: usize = 128;

/// The delivery reports of the messages sent, shared with librdkafka's polling thread.
#[derive(Default)]
struct Deliveries {
    /// Messages sent whose report has not arrived.
    outstanding: AtomicI64,
    acknowledged: AtomicU64,
    /// The first failed delivery, said for a person.
    failed: Mutex<Option<String>>,
    /// Tests: runs in [`Deliveries::settled`] between its two reads, where a report from
    /// the polling thread may land.
    #[cfg(test)]
    between_reads: Mutex<Option<Hook>>,
}

/// Tests: what [`Deliveries::settled`] runs between its reads.
#[cfg(test)]
type Hook = Box<dyn FnOnce(&Deliveries) + Send>;

impl Deliveries {
    /// Records the report of one message (from librdkafka's delivery callback).
    fn report(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                let mut failed = self.failed.lock().expect("failed lock");
                failed.get_or_insert(reason);
            }
        }
        self.outstanding.fetch_sub(1, Ordering::Release);
    }

    /// The messages still outstanding, or the first failed delivery.
    ///
    /// The count is read first and the failures second. Looking at the failures first
    /// loses the last report if it fails between the two reads: no failure yet, then no
    /// message outstanding, and the flush would let a checkpoint cover a message the
    /// broker never took. In this order a count of 0 means every report has been recorded:
    /// [`Deliveries::report`] records a failure (under the mutex) before its `Release`
    /// decrement, and the `Acquire` load that reads 0 reads the last decrement, which
    /// continues the release sequence of every earlier one (each is a read-modify-write),
    /// so it synchronizes with all of them. Every failure recorded, and the mutex unlock
    /// after it, happens before this load, and the lock below sees it. A report that
    /// arrives after a load of more than 0 is seen by a later call.
    fn settled(&self) -> Result<i64, String> {
        let outstanding = self.outstanding.load(Ordering::Acquire);
        #[cfg(test)]
        if let Some(hook) = self.between_reads.lock().expect("hook lock").take() {
            hook(self);
        }
        if let Some(reason) = &*self.failed.lock().expect("failed lock") {
            return Err(reason.clone());
        }
        Ok(outstanding)
    }
}

struct DeliveryContext {
    deliveries: Arc<Deliveries>,
    /// For the sentence that stops the run when the brokers refuse the client.
    bootstrap: String,
    sasl: Option<Box<super::KafkaSasl>>,
}

impl ClientContext for DeliveryContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log(level, fac, message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        super::security::oauth_token(config)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::client_error(&error, reason);
        // Refused credentials or an untrusted certificate: no retry cures them, so the
        // next write or flush fails with the reason.
        if let Some(message) =
            super::security::refusal(&error, reason, &self.bootstrap, self.sasl.as_deref())
        {
            let mut failed = self.deliveries.failed.lock().expect("failed lock");
            failed.get_or_insert(message);
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.to_string()),
        };
        self.deliveries.report(result);
    }
}

impl KafkaSink {
    /// Creates the producer; `input` is the schema of the batches it will get, which must
    /// hold the key and header columns.
    pub fn open(config: KafkaSinkConfig, input: &Schema) -> Result<Self> {
        for column in config.key.iter().chain(&config.headers) {
            if input.field_with_name(column).is_err() {
                let names: Vec<&str> = input.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(Error::Plan(format!(
                    "the sink's input has no column `{column}` (it has: {})",
                    names.join(", ")
                )));
            }
        }
        let encoding = Encoding::open(&config.format_keys(), input)?;
        let deliveries = Arc::new(Deliveries::default());
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("client.id", format!("sluice-{}", config.topic))
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &config.client_options() {
            c.set(k, v);
        }
        let producer = c
            .create_with_context(DeliveryContext {
                deliveries: deliveries.clone(),
                bootstrap: config.bootstrap_servers.clone(),
                sasl: config.sasl.clone(),
            })
            .map_err(|e| Error::External {
                system: "kafka",
                message: format!("creating the producer: {e}"),
            })?;
        let max_message = config
            .options
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_MESSAGE);
        Ok(KafkaSink {
            config,
            dead_letters: false,
            producer,
            deliveries,
            encoding,
            encoded: Encoded::default(),
            sent: 0,
            max_message,
            refused: Vec::new(),
        })
    }

    /// A sink for dead letters: each failed record's bytes as the message value, keyed by
    /// its original key, with its own headers and then pipeline, stage, error class, error,
    /// attempts, source, partition, offset and failure times as headers, the last one
    /// `headers`, how many of the message's first headers are the record's own
    /// (`sluice_engine::dead_letter`). Messages wait for the broker for as long as it takes
    /// (`message.timeout.ms` 0): a dead letter is never dropped.
    pub fn open_dead_letter(mut config: KafkaSinkConfig) -> Result<Self> {
        if config.format != MessageFormat::Json
            || config.avro.is_some()
            || config.protobuf.is_some()
        {
            return Err(Error::Plan(
                "dead letters carry each record's bytes as they came, with provenance headers: \
                 leave `format` and `avro` out of the dead-letter sink"
                    .into(),
            ));
        }
        config.key = Some("key".into());
        config.headers = sluice_engine::dead_letter::PROVENANCE
            .iter()
            .filter(|c| !matches!(**c, "key" | "headers"))
            .map(|c| c.to_string())
            .collect();
        config
            .options
            .entry("message.timeout.ms".into())
            .or_insert_with(|| "0".into());
        let schema = sluice_engine::dead_letter::schema();
        let mut sink = KafkaSink::open(config, &schema)?;
        sink.dead_letters = true;
        Ok(sink)
    }

    fn check_failed(&self) -> Result<()> {
        match &*self.deliveries.failed.lock().expect("failed lock") {
            Some(reason) => Err(self.delivery_failed(reason)),
            None => Ok(()),
        }
    }

    fn delivery_failed(&self, reason: &str) -> Error {
        Error::External {
            system: "kafka",
            message: format!("delivery to topic `{}` failed: {reason}", self.config.topic),
        }
    }
}

/// A key column as bytes: binary as it is, anything else as text.
fn key_column(batch: &RecordBatch, name: &str) -> Result<BinaryArray> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("the sink's input lost column `{name}`")))?;
    sluice_engine::batch::bytes_column(column)
}

/// A column as text, for keys and headers.
fn text_column(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("the sink's input lost column `{name}`")))?;
    let text = cast(column, &DataType::Utf8)
        .map_err(|e| Error::arrow(format!("column `{name}` as text"), e))?;
    Ok(text.as_string::<i32>().clone())
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.check_failed()?;
        let refused_before = self.refused.len();
        if self.dead_letters {
            // The payloads as they are, one per slot.
            let payload = batch
                .column(0)
                .as_binary_opt::<i32>()
                .ok_or_else(|| Error::Internal("dead letters without a binary payload".into()))?;
            self.encoded.clear();
            for p in payload.iter() {
                self.encoded.push(p.unwrap_or_default());
            }
        } else {
            self.encoding
                .encode(&batch, &mut self.encoded, &mut self.refused)
                .await?;
        }
        // Rows refused while encoding (not sent; their slots are empty).
        let unsent: std::collections::HashSet<u32> = self.refused[refused_before..]
            .iter()
            .map(|(row, _)| *row)
            .collect();
        let keys = match &self.config.key {
            Some(k) => Some(key_column(&batch, k)?),
            None => None,
        };
        // A dead letter's record's own headers, sent first.
        let own = match self.dead_letters {
            true => batch.column_by_name("headers").and_then(|c| c.as_map_opt()),
            false => None,
        };
        let headers: Vec<(&str, StringArray)> = self
            .config
            .headers
            .iter()
            .map(|h| Ok((h.as_str(), text_column(&batch, h)?)))
            .collect::<Result<_>>()?;
        let topic = self.config.topic.as_str();
        for (row, payload) in self.encoded.payloads().enumerate() {
            if unsent.contains(&(row as u32)) {
                continue;
            }
            let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(keys) = &keys
                && keys.is_valid(row)
            {
                record = record.key(keys.value(row));
            }
            let mut size = FRAMING + payload.len() + record.key.map_or(0, <[u8]>::len);
            if !headers.is_empty() {
                let mut owned = OwnedHeaders::new_with_capacity(headers.len());
                let mut own_count = 0;
                if let Some(own) = own.filter(|m| m.is_valid(row)) {
                    let entries = own.value(row);
                    let names = entries.column(0).as_string::<i32>();
                    let values = entries.column(1).as_binary::<i32>();
                    for j in 0..entries.len() {
                        let value = values.is_valid(j).then(|| values.value(j));
                        size += 10 + names.value(j).len() + value.map_or(0, <[u8]>::len);
                        owned = owned.insert(Header {
                            key: names.value(j),
                            value,
                        });
                    }
                    own_count = entries.len();
                }
                for (name, values) in &headers {
                    let value = values.is_valid(row).then(|| values.value(row));
                    // Each header also carries two lengths (varints).
                    size += 10 + name.len() + value.map_or(0, str::len);
                    owned = owned.insert(Header { key: name, value });
                }
                if self.dead_letters {
                    let count = own_count.to_string();
                    size += 10 + "headers".len() + count.len();
                    owned = owned.insert(Header {
                        key: "headers",
                        value: Some(&count),
                    });
                }
                record = record.headers(owned);
            }
            if size > self.max_message {
                let reason = format!(
                    "the message is {size} bytes, more than the producer of topic `{topic}` \
                     takes (message.max.bytes: {})",
                    self.max_message
                );
                // A dead letter too, when even cut to `max_message_bytes` it does not fit
                // (a huge pipeline or stage name): `DeadLetterSink::write` cuts it smaller.
                self.refused.push((row as u32, reason));
                continue;
            }
            self.deliveries.outstanding.fetch_add(1, Ordering::Acquire);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => {
                        self.deliveries.outstanding.fetch_sub(1, Ordering::Release);
                        return Err(Error::External {
                            system: "kafka",
                            message: format!("sending to topic `{topic}`: {e}"),
                        });
                    }
                }
            }
            self.sent += 1;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut next_warning = Duration::from_secs(10);
        loop {
            let outstanding = self
                .deliveries
                .settled()
                .map_err(|reason| self.delivery_failed(&reason))?;
            if outstanding <= 0 {
                return Ok(());
            }
            if started.elapsed() >= next_warning {
                tracing::warn!(
                    topic = %self.config.topic,
                    outstanding,
                    waited = ?started.elapsed(),
                    "waiting for the broker to acknowledge messages"
                );
                next_warning += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.flush().await?;
        // Nothing is outstanding: this returns at once.
        let _ = self.producer.flush(Duration::from_secs(1));
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "{} messages to topic `{}` ({} acknowledged)",
            self.sent,
            self.config.topic,
            self.deliveries.acknowledged.load(Ordering::Relaxed)
        )
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.max_message.saturating_sub(FRAMING))
    }

    fn take_refused(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last outstanding message fails at the worst moment for `flush`: between its
    /// look at the failures and its look at the outstanding count. The failure must still
    /// be seen, or a checkpoint would cover a message the broker never took.
    #[test]
    fn a_delivery_failing_in_the_middle_of_a_flush_is_seen() {
        let deliveries = Deliveries::default();
        deliveries.outstanding.store(1, Ordering::Relaxed);
        *deliveries.between_reads.lock().unwrap() = Some(Box::new(|d: &Deliveries| {
            d.report(Err("Local: Message timed out".into()))
        }));
        assert_eq!(
            deliveries.settled(),
            Err("Local: Message timed out".to_string())
        );
        assert_eq!(deliveries.outstanding.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn acknowledged_deliveries_settle() {
        let deliveries = Deliveries::default();
        deliveries.outstanding.store(2, Ordering::Relaxed);
        deliveries.report(Ok(()));
        assert_eq!(deliveries.settled(), Ok(1));
        deliveries.report(Ok(()));
        assert_eq!(deliveries.settled(), Ok(0));
        assert_eq!(deliveries.acknowledged.load(Ordering::Relaxed), 2);
    }
}
