//! The generator source: view events of a streaming service, made straight into Arrow
//! arrays.
//!
//! Each partition has its own random sequence seeded from `(seed, partition)`, so the same
//! seed gives the same records whatever the batch size or timing. A user belongs to one
//! partition (`user_id % partitions`), the way a keyed Kafka topic is partitioned. Event time
//! advances by a fixed interval per record, optionally jittered backwards (`disorder`).
//!
//! The hot loop draws two 64-bit random numbers per record and appends to pre-sized
//! builders; strings come from static tables. No allocation per record.

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use rand_pcg::Pcg64Mcg;
use rand_pcg::rand_core::{Rng, SeedableRng};
use sluice_engine::batch::{self, Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::source::{Assignment, LogEnd, PartitionReader, Source};
use sluice_engine::{Error, Result};
use std::sync::Arc;

use super::GeneratorConfig;
use crate::made::MadePartition;

const EVENT_TYPES: [(&str, u32); 5] = [
    ("play", 60),
    ("pause", 15),
    ("seek", 10),
    ("stop", 10),
    ("rate", 5),
];
const DEVICES: [(&str, u32); 5] = [
    ("tv", 40),
    ("mobile", 30),
    ("web", 15),
    ("tablet", 10),
    ("console", 5),
];
const COUNTRIES: [(&str, u32); 10] = [
    ("US", 30),
    ("BR", 12),
    ("IN", 12),
    ("GB", 8),
    ("DE", 8),
    ("MX", 8),
    ("FR", 6),
    ("JP", 6),
    ("CA", 5),
    ("KR", 5),
];
const BITRATES_KBPS: [i32; 8] = [235, 750, 1750, 3000, 4300, 5800, 8000, 16000];

/// Jan 1 2026, 00:00:00 UTC.
const DEFAULT_START_MS: i64 = 1_767_225_600_000;

/// The record fields of a generated view event, in order.
pub fn record_schema() -> Schema {
    Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("title_id", DataType::Int64, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("watch_seconds", DataType::Int32, false),
        Field::new("bitrate_kbps", DataType::Int32, false),
        Field::new("event_time", batch::timestamp_type(), false),
    ])
}

/// Maps a byte to a table index with the table's weights (out of 100).
fn weighted_table<T>(table: &[(T, u32)]) -> [u8; 256] {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut out = [0u8; 256];
    let mut idx = 0usize;
    let mut acc = table[0].1;
    for (b, slot) in out.iter_mut().enumerate() {
        while (b as u32) * total >= acc * 256 && idx + 1 < table.len() {
            idx += 1;
            acc += table[idx].1;
        }
        *slot = idx as u8;
    }
    out
}

/// Uniform integer in `0..n` from 32 random bits (Lemire's multiply-shift).
#[inline]
fn below(bits: u32, n: u64) -> u64 {
    (u64::from(bits) * n) >> 32
}

/// Everything a partition needs to generate its records.
#[derive(Clone)]
struct Plan {
    schema: SchemaRef,
    partitions: u64,
    users_per_partition: u64,
    extra_users: u64,
    titles: u64,
    start_ms: i64,
    interval_ms: f64,
    disorder_ms: u64,
    event_types: [u8; 256],
    devices: [u8; 256],
    countries: [u8; 256],
}

pub struct GeneratorSource {
    plan: Plan,
    config: GeneratorConfig,
    next_partition: u32,
    start: Arc<Checkpoint>,
}

impl GeneratorSource {
    pub fn new(config: GeneratorConfig) -> Result<Self> {
        let partitions = u64::from(config.partitions.max(1));
        let rate_per_partition = config.rate.map(|r| r / partitions as f64);
        let interval_ms = match (config.interval, rate_per_partition) {
            (Some(i), _) => i.get().as_secs_f64() * 1000.0,
            (None, Some(rate)) => 1000.0 / rate,
            (None, None) => 1.0,
        };
        let start_ms = match &config.start_time {
            Some(t) => super::parse_time_ms(t).ok_or_else(|| {
                Error::Plan(format!("generator start_time `{t}` is not RFC 3339"))
            })?,
            None => DEFAULT_START_MS,
        };
        let plan = Plan {
            schema: batch::with_metadata(&record_schema())?,
            partitions,
            users_per_partition: config.users / partitions,
            extra_users: config.users % partitions,
            titles: config.titles.max(1),
            start_ms,
            interval_ms,
            disorder_ms: config.disorder.map_or(0, |d| d.get().as_millis() as u64),
            event_types: weighted_table(&EVENT_TYPES),
            devices: weighted_table(&DEVICES),
            countries: weighted_table(&COUNTRIES),
        };
        Ok(GeneratorSource {
            plan,
            config,
            next_partition: 0,
            start: Arc::default(),
        })
    }

    /// A reader for one partition, for benches and tests that drive partitions directly.
    /// It starts where the restored checkpoint says, jumping its random sequence ahead, so
    /// its records are those an uninterrupted run would have made.
    pub fn partition(&self, id: u32) -> GeneratorPartition {
        let p = u64::from(id);
        let made = MadePartition::new(
            format!("generator/{id}"),
            id,
            self.config.partitions,
            self.config.count,
            self.config.rate,
            &self.start,
        );
        let seed = self.config.seed ^ p.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        rng.advance(made.next_offset() as u128 * DRAWS_PER_RECORD);
        GeneratorPartition {
            plan: self.plan.clone(),
            partition: p,
            users_here: self.plan.users_per_partition + u64::from(p < self.plan.extra_users),
            rng,
            made,
        }
    }
}

#[async_trait]
impl Source for GeneratorSource {
    fn schema(&self) -> SchemaRef {
        self.plan.schema.clone()
    }

    fn partition_hint(&self) -> usize {
        self.config.partitions as usize
    }

    fn restore(&mut self, checkpoint: Arc<Checkpoint>) {
        self.start = checkpoint;
    }

    async fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        if self.next_partition >= self.config.partitions {
            return Ok(None);
        }
        let reader = self.partition(self.next_partition);
        self.next_partition += 1;
        Ok(Some(Assignment::Assign(Box::new(reader))))
    }
}

/// Random numbers drawn per record; restoring jumps the sequence ahead by this much.
const DRAWS_PER_RECORD: u128 = 2;

pub struct GeneratorPartition {
    plan: Plan,
    partition: u64,
    users_here: u64,
    rng: Pcg64Mcg,
    made: MadePartition,
}

impl GeneratorPartition {
    /// Generates the next `n` records (fewer when the partition's count runs out).
    pub fn generate(&mut self, n: usize) -> Result<Envelope> {
        let n = self.made.clamp(n);
        let plan = &self.plan;
        let mut user_id = Int64Builder::with_capacity(n);
        let mut title_id = Int64Builder::with_capacity(n);
        let mut event_type = StringBuilder::with_capacity(n, n * 5);
        let mut device = StringBuilder::with_capacity(n, n * 6);
        let mut country = StringBuilder::with_capacity(n, n * 2);
        let mut watch = Int32Builder::with_capacity(n);
        let mut bitrate = Int32Builder::with_capacity(n);
        let mut event_time = Vec::with_capacity(n);
        let first = self.made.next_offset();
        for i in 0..n as i64 {
            let a = self.rng.next_u64();
            let b = self.rng.next_u64();
            let user = below((a >> 32) as u32, self.users_here);
            user_id.append_value((user * plan.partitions + self.partition + 1) as i64);
            // Squaring a uniform number skews views toward low (popular) title ids.
            let u = u64::from(a as u32);
            title_id.append_value(((((u * u) >> 32) * plan.titles) >> 32) as i64 + 1);
            event_type.append_value(EVENT_TYPES[plan.event_types[(b & 0xff) as usize] as usize].0);
            device.append_value(DEVICES[plan.devices[((b >> 8) & 0xff) as usize] as usize].0);
            country.append_value(COUNTRIES[plan.countries[((b >> 16) & 0xff) as usize] as usize].0);
            watch.append_value(below(((b >> 24) & 0xffff) as u32 * 0x1_0001, 7200) as i32);
            bitrate.append_value(BITRATES_KBPS[((b >> 40) & 7) as usize]);
            let jitter = if plan.disorder_ms > 0 {
                below(((b >> 43) << 11) as u32, plan.disorder_ms + 1) as i64
            } else {
                0
            };
            let offset = first + i;
            event_time.push(plan.start_ms + (offset as f64 * plan.interval_ms) as i64 - jitter);
        }
        let event_time: ArrayRef =
            Arc::new(TimestampMillisecondArray::from(event_time).with_timezone("UTC"));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(user_id.finish()),
            Arc::new(title_id.finish()),
            Arc::new(event_type.finish()),
            Arc::new(device.finish()),
            Arc::new(country.finish()),
            Arc::new(watch.finish()),
            Arc::new(bitrate.finish()),
            event_time.clone(),
        ];
        let records = RecordBatch::try_new(Arc::new(record_schema()), columns)
            .map_err(|e| Error::arrow("building generated records", e))?;
        self.made.envelope(&plan.schema, records, event_time)
    }
}

#[async_trait]
impl PartitionReader for GeneratorPartition {
    fn info(&self) -> &Arc<PartitionInfo> {
        self.made.info()
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        match self.made.due(max).await {
            Some(n) => self.generate(n).map(Some),
            None => Ok(None),
        }
    }

    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        self.made.log_end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    fn source(seed: u64, partitions: u32) -> GeneratorSource {
        GeneratorSource::new(GeneratorConfig {
            partitions,
            count: Some(1000),
            rate: None,
            users: 50,
            titles: 20,
            seed,
            start_time: None,
            interval: None,
            disorder: None,
        })
        .unwrap()
    }

    #[test]
    fn same_seed_same_records_whatever_the_batch_size() {
        let mut a = source(7, 2).partition(1);
        let mut b = source(7, 2).partition(1);
        let whole = a.generate(100).unwrap().batch;
        let first = b.generate(30).unwrap().batch;
        let rest = b.generate(70).unwrap().batch;
        let joined = arrow::compute::concat_batches(&whole.schema(), [&first, &rest]).unwrap();
        assert_eq!(whole, joined);
        let mut c = source(8, 2).partition(1);
        assert_ne!(whole, c.generate(100).unwrap().batch);
    }

    #[test]
    fn users_belong_to_their_partition_and_stay_in_range() {
        let mut p = source(1, 4).partition(3);
        let batch = p.generate(200).unwrap().batch;
        let users = batch.column(0).as_primitive::<Int64Type>();
        for u in users.values() {
            assert_eq!((u - 1) % 4, 3);
            assert!((1..=50).contains(u));
        }
        let titles = batch.column(1).as_primitive::<Int64Type>();
        assert!(titles.values().iter().all(|t| (1..=20).contains(t)));
        assert_eq!(batch.column_by_name("_offset").unwrap().len(), 200);
        assert_eq!(p.generate(500).unwrap().batch.num_rows(), 50);
    }

    #[tokio::test]
    async fn bounded_count_is_split_over_partitions() {
        let mut src = source(0, 3);
        let mut total = 0;
        while let Some(Assignment::Assign(mut r)) = src.next_assignment().await.unwrap() {
            while let Some(env) = r.read(64).await.unwrap() {
                assert!(env.batch.num_rows() <= 64);
                total += env.batch.num_rows();
            }
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn restored_partitions_continue_the_same_sequence() {
        let mut whole = source(3, 2).partition(1);
        let all = whole.generate(500).unwrap().batch;
        let mut restored = source(3, 2);
        restored.restore(Arc::new(Checkpoint {
            id: 1,
            offsets: [("generator/1".to_string(), 200)].into(),
            fallback: false,
            positions: Default::default(),
        }));
        let mut rest = restored.partition(1);
        let env = rest.generate(1000).unwrap();
        assert_eq!(env.offsets, 200..500, "the count ends the partition at 500");
        assert_eq!(env.batch, all.slice(200, 300));
    }

    #[test]
    fn weights_cover_the_table() {
        let t = weighted_table(&EVENT_TYPES);
        let plays = t.iter().filter(|i| **i == 0).count();
        assert!((150..=156).contains(&plays), "{plays}");
        assert_eq!(*t.last().unwrap() as usize, EVENT_TYPES.len() - 1);
    }
}
