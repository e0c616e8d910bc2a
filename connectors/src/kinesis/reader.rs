//! A shard's reader: a task that calls GetRecords, paced within the shard's limits, and
//! the engine's [`PartitionReader`] that decodes what it fetched into batches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringBuilder, TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use sluice_engine::batch::{Envelope, PartitionInfo};
use sluice_engine::dead_letter::{DeadLetter, SOURCE_STAGE};
use sluice_engine::source::{LogEnd, PartitionReader};
use sluice_engine::{Error, ErrorClass, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::kpl;
use super::position::{Book, Resume};
use super::retry::{Backoff, Fault, classify};
use super::{StartFrom, StreamRef};
use crate::format::Payloads;

/// A shard takes at most 5 GetRecords calls a second…
const MIN_CALL_GAP: Duration = Duration::from_millis(200);
/// …and returns at most 2 MiB a second: a call that returned more waits longer.
const BYTES_PER_SECOND: f64 = 2.0 * 1024.0 * 1024.0;
/// The most records one GetRecords call returns.
const RECORDS_PER_CALL: i32 = 10_000;
/// Fetched responses waiting for the reader: bounds memory when the pipeline is slower.
const FETCHED_AHEAD: usize = 2;
/// How long past a shard's next call (every `idle_wait` at its tip) its last "at the tip"
/// still holds.
const FRESH_SLACK: Duration = Duration::from_secs(1);

/// One user record as fetched.
pub(super) struct Raw {
    sequence: Arc<str>,
    /// Its index in a KPL aggregate.
    sub: Option<u64>,
    key: Option<Arc<str>>,
    arrival_ms: Option<i64>,
    data: Bytes,
}

enum Fetched {
    Records(Vec<Raw>),
    /// The shard is closed and read to its end.
    End,
    Failed(Error),
}

/// Where a shard starts.
#[derive(Debug, Clone)]
pub(super) enum Start {
    After(Resume),
    From(StartFrom),
}

/// How far a shard's reader is: milliseconds behind the stream's tip as its last
/// GetRecords said, and the records fetched.
pub struct MillisBehind {
    /// What the last response said (`-1` before the first), and when (milliseconds since
    /// the epoch). A confirmation ages: past `fresh` after it, the time since counts as
    /// behind too (a call that hangs or fails, an outage), so an old "at the tip" never
    /// lets a shard pass for caught up.
    said: std::sync::Mutex<(i64, i64)>,
    fresh: i64,
    /// The offset after the last record fetched (see [`LogEnd::fetched_end`]).
    fetched: AtomicI64,
}

impl MillisBehind {
    /// For a shard called every `idle_wait` while at its tip.
    pub(super) fn new(idle_wait: Duration) -> Self {
        MillisBehind {
            said: std::sync::Mutex::new((-1, 0)),
            fresh: (idle_wait + FRESH_SLACK).as_millis() as i64,
            fetched: AtomicI64::new(i64::MIN),
        }
    }

    fn said(&self, behind: i64) {
        *self.said.lock().expect("behind lock") = (behind, now_ms());
    }

    /// Read to its end: nothing of it is behind, for good (no call follows to renew it).
    fn ended(&self) {
        *self.said.lock().expect("behind lock") = (0, i64::MAX);
    }
}

impl LogEnd for MillisBehind {
    /// Sequence numbers are not offsets: the lag is in time only.
    fn log_end(&self) -> Option<i64> {
        None
    }

    fn millis_behind(&self) -> Option<u64> {
        let (behind, at) = *self.said.lock().expect("behind lock");
        let aged = now_ms()
            .saturating_sub(at)
            .saturating_sub(self.fresh)
            .max(0);
        u64::try_from(behind).ok().map(|b| b + aged as u64)
    }

    fn fetched_end(&self) -> Option<i64> {
        Some(self.fetched.load(Ordering::Acquire)).filter(|&f| f != i64::MIN)
    }
}

/// What a shard's fetch task needs.
pub(super) struct Fetch {
    pub client: aws_sdk_kinesis::Client,
    pub stream: StreamRef,
    pub shard: Arc<str>,
    pub name: Arc<str>,
    pub idle_wait: Duration,
    pub behind: Arc<MillisBehind>,
}

impl Fetch {
    async fn run(self, start: Start, tx: mpsc::Sender<Fetched>) {
        if let Err(e) = self.fetch(start, &tx).await {
            let _ = tx.send(Fetched::Failed(e)).await;
        }
    }

    async fn fetch(&self, start: Start, tx: &mpsc::Sender<Fetched>) -> Result<()> {
        // The user records of the resume point's aggregate that were done already.
        let mut done_in = match &start {
            Start::After(Resume {
                sequence,
                sub: Some(sub),
            }) => Some((sequence.clone(), *sub)),
            _ => None,
        };
        // What a renewed iterator starts after: the last record handed to the reader. A
        // shard started at `latest` that has fetched nothing yet renews at the time it
        // started, not at a later "latest" (an expiry after an outage would skip records).
        let first = start.clone();
        let mut renew = match start {
            Start::From(StartFrom::Latest) => Start::From(StartFrom::Time(now_ms())),
            other => other,
        };
        let mut iterator = self.iterator(&first).await?;
        let mut backoff = Backoff::new();
        let mut next_call = Instant::now();
        loop {
            tokio::time::sleep_until(next_call).await;
            let called = Instant::now();
            next_call = called + MIN_CALL_GAP;
            let out = match self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(RECORDS_PER_CALL)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    match classify(&format!("GetRecords on {}", self.name), &e) {
                        Fault::Expired => iterator = self.iterator(&renew).await?,
                        Fault::Throttled => next_call += backoff.next(),
                        Fault::Transient(why) => {
                            let wait = backoff.next();
                            tracing::warn!(shard = %self.name, retry_in = ?wait, "{why}");
                            next_call += wait;
                        }
                        Fault::Stop(e) => return Err(e),
                    }
                    continue;
                }
            };
            backoff.reset();
            let millis_behind = out.millis_behind_latest;
            let next_iterator = out.next_shard_iterator;
            let mut bytes = 0usize;
            let mut fetched = Vec::with_capacity(out.records.len());
            // The records are taken, not copied: a plain record's bytes become its `Raw`.
            for record in out.records {
                let sequence: Arc<str> = record.sequence_number.into();
                let arrival_ms = record
                    .approximate_arrival_timestamp
                    .and_then(|t| t.to_millis().ok());
                let data = Bytes::from(record.data.into_inner());
                bytes += data.len();
                match kpl::deaggregate(&data) {
                    Some(users) => {
                        let skip = match &done_in {
                            Some((s, sub)) if *s == sequence => Some(*sub),
                            _ => None,
                        };
                        for (i, (key, data)) in users.into_iter().enumerate() {
                            if skip.is_some_and(|done| i as u64 <= done) {
                                continue;
                            }
                            fetched.push(Raw {
                                sequence: sequence.clone(),
                                sub: Some(i as u64),
                                key,
                                arrival_ms,
                                data,
                            });
                        }
                    }
                    None => fetched.push(Raw {
                        sequence: sequence.clone(),
                        sub: None,
                        key: record.partition_key.map(Arc::from),
                        arrival_ms,
                        data,
                    }),
                }
                renew = Start::After(Resume {
                    sequence,
                    sub: None,
                });
                done_in = None;
            }
            // An empty page of a shard still behind is no reason to wait.
            let caught_up = match millis_behind {
                Some(ms) => ms == 0,
                None => fetched.is_empty(),
            };
            // Counted before the reader can see them, and before the response's "at the
            // tip": the shard is not caught up until the pipeline is past them.
            self.behind
                .fetched
                .fetch_add(fetched.len() as i64, Ordering::AcqRel);
            self.behind.said(millis_behind.unwrap_or(-1));
            if !fetched.is_empty() && tx.send(Fetched::Records(fetched)).await.is_err() {
                return Ok(());
            }
            match next_iterator {
                Some(next) => iterator = next,
                None => {
                    // Read to its end: nothing of it is behind (kinesalite keeps counting).
                    self.behind.ended();
                    let _ = tx.send(Fetched::End).await;
                    return Ok(());
                }
            }
            let paced = Duration::from_secs_f64(bytes as f64 / BYTES_PER_SECOND);
            next_call = next_call.max(called + paced);
            if caught_up {
                next_call = next_call.max(called + self.idle_wait);
            }
        }
    }

    /// A shard iterator at `start`, retried while throttled or unreachable.
    async fn iterator(&self, start: &Start) -> Result<String> {
        let mut backoff = Backoff::new();
        loop {
            let call = self
                .client
                .get_shard_iterator()
                .set_stream_name(self.stream.stream.clone())
                .set_stream_arn(self.stream.stream_arn.clone())
                .shard_id(self.shard.as_ref());
            let call = match start {
                Start::After(Resume {
                    sequence,
                    sub: Some(_),
                }) => call
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(sequence.as_ref()),
                Start::After(Resume {
                    sequence,
                    sub: None,
                }) => call
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(sequence.as_ref()),
                Start::From(StartFrom::Earliest) => {
                    call.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                Start::From(StartFrom::Latest) => {
                    call.shard_iterator_type(ShardIteratorType::Latest)
                }
                Start::From(StartFrom::Time(ms)) => call
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
            };
            match call.send().await {
                Ok(out) => match out.shard_iterator() {
                    Some(it) => return Ok(it.to_owned()),
                    None => {
                        return Err(Error::External {
                            system: "kinesis",
                            message: format!("GetShardIterator on {} gave no iterator", self.name),
                        });
                    }
                },
                Err(e) => match classify(&format!("GetShardIterator on {}", self.name), &e) {
                    Fault::Stop(e) => return Err(e),
                    Fault::Transient(why) => {
                        let wait = backoff.next();
                        tracing::warn!(shard = %self.name, retry_in = ?wait, "{why}");
                        tokio::time::sleep(wait).await;
                    }
                    Fault::Throttled | Fault::Expired => tokio::time::sleep(backoff.next()).await,
                },
            }
        }
    }
}

/// Reads one shard: what its fetch task fetched, decoded into batches.
pub(super) struct ShardReader {
    pub(super) info: Arc<PartitionInfo>,
    pub(super) stream: Arc<str>,
    pub(super) shard: Arc<str>,
    pub(super) schema: SchemaRef,
    pub(super) decoder: Payloads,
    pub(super) dead_letters: bool,
    pub(super) book: Arc<Book>,
    /// Fired by the engine once the shard's end is checkpointed (see
    /// [`PartitionReader::take_end_signal`]).
    end_signal: Option<oneshot::Sender<()>>,
    /// The shard's children are read by this process after it (one process reads every
    /// shard; not so for worker processes sharing leases).
    continues_here: bool,
    follows: Vec<Arc<str>>,
    fetched: mpsc::Receiver<Fetched>,
    fetch: JoinHandle<()>,
    pending: VecDeque<Raw>,
    /// The offset of the next record.
    next: i64,
    /// Records before this offset were processed before a restart: dropped.
    skip_before: i64,
    /// Read to its end (and said so): nothing more comes.
    at_end: bool,
    behind: Arc<MillisBehind>,
}

/// What [`ShardReader::start`] needs besides the fetch.
pub(super) struct ReaderParts {
    pub info: Arc<PartitionInfo>,
    pub stream: Arc<str>,
    pub schema: SchemaRef,
    pub decoder: Payloads,
    pub dead_letters: bool,
    pub book: Arc<Book>,
    pub end_signal: oneshot::Sender<()>,
    pub continues_here: bool,
    /// Partition names of the shard's parents read here before it.
    pub follows: Vec<Arc<str>>,
}

impl ShardReader {
    /// Starts the shard's fetch task at `start`; its first record gets offset `first`, and
    /// records before `skip_before` are dropped.
    pub(super) fn start(
        parts: ReaderParts,
        fetch: Fetch,
        start: Start,
        first: i64,
        skip_before: i64,
    ) -> Self {
        let (tx, fetched) = mpsc::channel(FETCHED_AHEAD);
        let shard = fetch.shard.clone();
        let behind = fetch.behind.clone();
        behind.fetched.store(first, Ordering::Release);
        let task = tokio::spawn(fetch.run(start, tx));
        ShardReader {
            info: parts.info,
            stream: parts.stream,
            shard,
            schema: parts.schema,
            decoder: parts.decoder,
            dead_letters: parts.dead_letters,
            book: parts.book,
            end_signal: Some(parts.end_signal),
            continues_here: parts.continues_here,
            follows: parts.follows,
            fetched,
            fetch: task,
            pending: VecDeque::new(),
            next: first,
            skip_before,
            at_end: false,
            behind,
        }
    }

    fn origin(&self, raw: &Raw) -> String {
        origin(&self.stream, &self.shard, raw)
    }

    fn envelope(&mut self, max: usize) -> Result<Envelope> {
        let n = self.pending.len().min(max.max(1));
        let raws: Vec<Raw> = self.pending.drain(..n).collect();
        let first = self.next;
        self.next += n as i64;
        let offsets = first..self.next;
        let payloads: Vec<&[u8]> = raws.iter().map(|r| r.data.as_ref()).collect();
        let mut dead = Vec::new();
        // Kinesis has no null records: no payload is a tombstone.
        let (records, kept) = if self.dead_letters {
            let decoded = self.decoder.decode_each(&payloads, |_| false)?;
            let now = sluice_engine::dead_letter::now_ms();
            for (i, reason) in &decoded.bad {
                let raw = &raws[*i];
                dead.push(DeadLetter {
                    stage: SOURCE_STAGE.into(),
                    class: ErrorClass::Decode,
                    reason: format!("{reason} ({})", self.origin(raw)),
                    attempts: 1,
                    partition: self.info.clone(),
                    offset: Some(first + *i as i64),
                    key: raw.key.as_deref().map(|k| k.as_bytes().to_vec()),
                    headers: Vec::new(),
                    first_failed_at: now,
                    last_failed_at: now,
                    payload: raw.data.to_vec(),
                });
            }
            let gone = decoded.gone();
            let kept: Vec<usize> = (0..n).filter(|i| gone.binary_search(i).is_err()).collect();
            (decoded.records, kept)
        } else {
            let (stream, shard) = (&self.stream, &self.shard);
            let bad = |index: Option<usize>, reason: String| Error::BadRecord {
                origin: match index {
                    Some(i) => origin(stream, shard, &raws[i]),
                    None => format!("stream `{stream}` shard {shard}"),
                },
                reason,
            };
            let (records, skipped) = self.decoder.decode_all(&payloads, |_| false, bad)?;
            let kept: Vec<usize> = (0..n)
                .filter(|i| skipped.binary_search(i).is_err())
                .collect();
            (records, kept)
        };
        let mut columns = records.columns().to_vec();
        columns.extend(self.metadata(&raws, &kept, first));
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Error::arrow("attaching Kinesis metadata columns", e))?;
        let last = raws.last().expect("a batch has a record");
        self.book.read(
            &self.info.name,
            self.next,
            Resume {
                sequence: last.sequence.clone(),
                sub: last.sub,
            },
        );
        Ok(Envelope {
            partition: self.info.clone(),
            offsets,
            batch,
            dead,
        })
    }

    /// `_partition _offset _key _timestamp _sequence` of the records kept.
    fn metadata(&self, raws: &[Raw], kept: &[usize], first: i64) -> [ArrayRef; 5] {
        let n = kept.len();
        let mut keys = StringBuilder::with_capacity(n, n * 16);
        let mut sequences = StringBuilder::with_capacity(n, n * 60);
        let mut offsets = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        for &i in kept {
            let raw = &raws[i];
            keys.append_option(raw.key.as_deref());
            sequences.append_value(sequence_text(raw));
            offsets.push(first + i as i64);
            times.push(raw.arrival_ms);
        }
        [
            Arc::new(UInt32Array::from_value(self.info.id, n)),
            Arc::new(Int64Array::from(offsets)),
            Arc::new(keys.finish()),
            Arc::new(TimestampMillisecondArray::from(times).with_timezone("UTC")),
            Arc::new(sequences.finish()),
        ]
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where a record came from, for errors and dead letters.
fn origin(stream: &str, shard: &str, raw: &Raw) -> String {
    format!(
        "stream `{stream}` shard {shard} sequence number {}",
        sequence_text(raw)
    )
}

fn sequence_text(raw: &Raw) -> String {
    match raw.sub {
        Some(sub) => format!("{}:{sub}", raw.sequence),
        None => raw.sequence.to_string(),
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        self.fetch.abort();
    }
}

#[async_trait]
impl PartitionReader for ShardReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.info
    }

    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        Some(self.behind.clone())
    }

    /// Records before the resume point were done before a restart: the position starts
    /// there, so a shard is not caught up while a page it fetched is on its way.
    fn start_offset(&self) -> Option<i64> {
        Some(self.skip_before)
    }

    fn take_end_signal(&mut self) -> Option<oneshot::Sender<()>> {
        self.end_signal.take()
    }

    fn continues_here(&self) -> bool {
        self.continues_here
    }

    fn follows(&self) -> Vec<Arc<str>> {
        self.follows.clone()
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        loop {
            if !self.pending.is_empty() {
                // Writer schemas first: fetched (waiting for the registry) before
                // decoding. Cancel safe: the records stay pending until decoded.
                let n = self.pending.len().min(max.max(1));
                let payloads = self.pending.iter().take(n).map(|r| r.data.as_ref());
                self.decoder.prepare(payloads).await?;
                return self.envelope(max).map(Some);
            }
            if self.at_end {
                return Ok(None);
            }
            // Cancel safe: a response is taken whole, and only between awaits.
            match self.fetched.recv().await {
                Some(Fetched::Records(records)) => {
                    self.pending.extend(records);
                    while self.next < self.skip_before && self.pending.pop_front().is_some() {
                        self.next += 1;
                    }
                }
                Some(Fetched::End) => {
                    // Read to its end: the stages see the partition end, and once its last
                    // records are checkpointed the engine fires the end signal, on which
                    // the source starts the shard's children.
                    self.at_end = true;
                    return Ok(None);
                }
                Some(Fetched::Failed(e)) => return Err(e),
                None => {
                    return Err(Error::Internal(format!(
                        "the fetch task of {} ended without saying why",
                        self.info.name
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_answer_that_a_shard_is_at_its_tip_ages_into_lag_and_its_end_does_not() {
        let behind = MillisBehind::new(Duration::from_millis(200));
        assert_eq!(behind.millis_behind(), None, "before its first call");
        assert_eq!(behind.fetched_end(), None);
        behind.said(0);
        assert_eq!(behind.millis_behind(), Some(0));
        // The last answer came 5 s ago (calls hang, or the service is unreachable): 3.8 s
        // past when the next was due count as behind.
        behind.said.lock().unwrap().1 -= 5_000;
        let aged = behind.millis_behind().unwrap();
        assert!((3_800..4_000).contains(&aged), "{aged}");
        behind.said(250);
        assert_eq!(behind.millis_behind(), Some(250));
        behind.ended();
        behind.said.lock().unwrap().1 -= 5_000;
        assert_eq!(behind.millis_behind(), Some(0), "an end does not age");
        behind.fetched.store(7, Ordering::Release);
        assert_eq!(behind.fetched_end(), Some(7));
    }
}
