//! Golden tests: each window kind with out-of-order rows, late rows and several
//! partitions, against hand-computed results; then state kept in RocksDB (eviction under a
//! tiny budget, a snapshot restored after a "crash") against the same results.
//!
//! `windows.rs`: window kinds, event time, idleness and the aggregate functions, in memory.
//! `storage.rs`: the same results with state in RocksDB, restored, and partitions that move.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sluice_engine::batch::{PartitionInfo, timestamp_type};
use sluice_engine::checkpoint::{Checkpoint, CheckpointStore, RocksStore};
use sluice_engine::config::{Location, Problems};
use sluice_engine::stage::{Stage, StageContext, StageFactory};
use sluice_engine::state::StageState;

use super::{AggregateConfig, AggregateFactory};

mod concurrent;
mod storage;
mod windows;

pub(super) fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
        Field::new("t", timestamp_type(), true),
    ]))
}

pub(super) fn concrete(yaml: &str) -> AggregateFactory {
    let mut problems = Problems::new("test.yaml");
    let env: HashMap<String, String> = HashMap::new();
    let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).expect("yaml");
    let config = AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    config.unwrap().factory("agg", &schema()).unwrap()
}

pub(super) fn factory(yaml: &str) -> Arc<AggregateFactory> {
    Arc::new(concrete(yaml))
}

/// A row: (user, n, event time in ms).
pub(super) type In = (&'static str, i64, i64);

pub(super) fn batch(rows: &[In]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.2))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .unwrap()
}

/// Runs batches through one instance of the stage, each on its partition; returns the
/// emitted rows (as text, in emission order) and the late rows (partition, index in batch).
pub(super) struct Harness {
    pub(super) factory: Arc<AggregateFactory>,
    pub(super) stage: Box<dyn Stage>,
    pub(super) out: Vec<String>,
    pub(super) late: Vec<(u32, usize)>,
}

impl Harness {
    pub(super) fn new(yaml: &str) -> Harness {
        Self::with(factory(yaml))
    }

    pub(super) fn with(factory: Arc<AggregateFactory>) -> Harness {
        let stage = factory.create().unwrap();
        Harness {
            factory,
            stage,
            out: Vec::new(),
            late: Vec::new(),
        }
    }

    pub(super) fn ctx(p: u32) -> StageContext {
        StageContext {
            partition: Some(Arc::new(PartitionInfo {
                id: p,
                name: format!("topic/{p}").into(),
            })),
            ..StageContext::detached("agg")
        }
    }

    pub(super) async fn feed(&mut self, p: u32, rows: &[In]) {
        let ctx = Self::ctx(p);
        let out = self.stage.process_batch(batch(rows), &ctx).await.unwrap();
        assert_eq!(out.batch.num_rows(), 0);
        for f in &out.failed {
            assert!(f.reason.starts_with("late: "), "{}", f.reason);
            self.late.push((p, f.row));
        }
        self.drain(&ctx).await;
        self.factory.shared.check_memory();
    }

    pub(super) async fn end(&mut self, p: u32) {
        let ctx = Self::ctx(p);
        self.stage.end_of_partition(&ctx).await.unwrap();
        self.drain(&ctx).await;
        self.factory.shared.check_memory();
    }

    pub(super) async fn drain(&mut self, ctx: &StageContext) {
        while let Some(b) = self.stage.pending(ctx).await.unwrap() {
            self.out.extend(rows_of(&b));
        }
    }

    pub(super) fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.out)
    }
}

/// Snapshots the stage's state and commits it as checkpoint 1 of `store`.
pub(super) fn checkpoint(state: &Arc<dyn StageState>, store: &RocksStore) {
    state.snapshot().unwrap();
    store
        .commit(&Checkpoint {
            id: 1,
            offsets: Default::default(),
            fallback: false,
            positions: Default::default(),
        })
        .unwrap();
}

/// `user [start,end) c=… s=…` with times in seconds, for compact expectations.
pub(super) fn rows_of(b: &RecordBatch) -> Vec<String> {
    let user = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
    let ts = |i: usize| {
        b.column(i)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap()
    };
    let (start, end) = (ts(1), ts(2));
    let int = |i: usize| b.column(i).as_any().downcast_ref::<Int64Array>().unwrap();
    (0..b.num_rows())
        .map(|r| {
            let mut s = format!(
                "{} [{},{}) c={}",
                user.value(r),
                start.value(r) as f64 / 1000.0,
                end.value(r) as f64 / 1000.0,
                int(3).value(r)
            );
            if b.num_columns() > 4 {
                s.push_str(&format!(" s={}", int(4).value(r)));
            }
            s
        })
        .collect()
}

pub(super) const TUMBLING: &str = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
allowed_lateness: 2s
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
";

pub(super) fn info(p: u32) -> PartitionInfo {
    PartitionInfo {
        id: p,
        name: format!("topic/{p}").into(),
    }
}
