//! Golden tests: each window kind with out-of-order rows, late rows and several
//! partitions, against hand-computed results; then state kept in RocksDB (eviction under a
//! tiny budget, a snapshot restored after a "crash") against the same results.

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

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
        Field::new("t", timestamp_type(), true),
    ]))
}

fn concrete(yaml: &str) -> AggregateFactory {
    let mut problems = Problems::new("test.yaml");
    let env: HashMap<String, String> = HashMap::new();
    let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).expect("yaml");
    let config = AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    config.unwrap().factory("agg", &schema()).unwrap()
}

fn factory(yaml: &str) -> Arc<dyn StageFactory> {
    Arc::new(concrete(yaml))
}

/// A row: (user, n, event time in ms).
type In = (&'static str, i64, i64);

fn batch(rows: &[In]) -> RecordBatch {
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
struct Harness {
    factory: Arc<dyn StageFactory>,
    stage: Box<dyn Stage>,
    out: Vec<String>,
    late: Vec<(u32, usize)>,
}

impl Harness {
    fn new(yaml: &str) -> Harness {
        Self::with(factory(yaml))
    }

    fn with(factory: Arc<dyn StageFactory>) -> Harness {
        let stage = factory.create().unwrap();
        Harness {
            factory,
            stage,
            out: Vec::new(),
            late: Vec::new(),
        }
    }

    fn ctx(p: u32) -> StageContext {
        StageContext {
            partition: Some(Arc::new(PartitionInfo {
                id: p,
                name: format!("topic/{p}").into(),
            })),
            ..StageContext::detached("agg")
        }
    }

    async fn feed(&mut self, p: u32, rows: &[In]) {
        let ctx = Self::ctx(p);
        let out = self.stage.process_batch(batch(rows), &ctx).await.unwrap();
        assert_eq!(out.batch.num_rows(), 0);
        for f in &out.failed {
            assert!(f.reason.starts_with("late: "), "{}", f.reason);
            self.late.push((p, f.row));
        }
        self.drain(&ctx).await;
    }

    async fn end(&mut self, p: u32) {
        let ctx = Self::ctx(p);
        self.stage.end_of_partition(&ctx).await.unwrap();
        self.drain(&ctx).await;
    }

    async fn drain(&mut self, ctx: &StageContext) {
        while let Some(b) = self.stage.pending(ctx).await.unwrap() {
            self.out.extend(rows_of(&b));
        }
    }

    fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.out)
    }
}

/// Snapshots the stage's state and commits it as checkpoint 1 of `store`.
fn checkpoint(state: &Arc<dyn StageState>, store: &RocksStore) {
    state.snapshot().unwrap();
    store
        .commit(&Checkpoint {
            id: 1,
            offsets: Default::default(),
            fallback: false,
        })
        .unwrap();
}

/// `user [start,end) c=… s=…` with times in seconds, for compact expectations.
fn rows_of(b: &RecordBatch) -> Vec<String> {
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

const TUMBLING: &str = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
allowed_lateness: 2s
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
";

#[tokio::test]
async fn tumbling_windows_with_disorder_lateness_and_two_partitions() {
    let mut h = Harness::new(TUMBLING);
    // Partition 0 runs ahead; out of order within the allowed 2s.
    h.feed(
        0,
        &[
            ("a", 1, 1_000),
            ("b", 2, 9_500),
            ("a", 3, 8_000),
            ("a", 4, 12_000),
        ],
    )
    .await;
    // Partition 1 has not been seen (nor assigned): partition 0 alone decides; its
    // watermark is 12s - 2s = 10s, so [0,10) closes.
    assert_eq!(h.take(), ["a [0,10) c=2 s=4", "b [0,10) c=1 s=2"]);
    // Partition 1 arrives, as a partition moved here from another process does: it is
    // judged by its own progress, not by what partition 0 emitted, so its rows of [0,10)
    // count (with keys that live in one partition, as across processes, its part of a
    // window is the whole window for its keys).
    h.feed(1, &[("a", 10, 9_000), ("b", 20, 11_000), ("a", 30, 10_500)])
        .await;
    assert!(h.late.is_empty());
    assert!(
        h.take().is_empty(),
        "partition 1's watermark is 9s: nothing more closes"
    );
    // Row 8.5s of partition 0 is behind its own watermark (10s) for [0,10): late.
    h.feed(0, &[("b", 5, 8_500), ("b", 6, 25_000)]).await;
    assert_eq!(h.late, [(0, 0)]);
    assert!(h.take().is_empty(), "the stage waits for partition 1 (9s)");
    h.feed(1, &[("a", 40, 23_000)]).await;
    // Stage watermark = min(23, 21) = 21s: partition 1's [0,10), and [10,20) merged across
    // partitions.
    assert_eq!(
        h.take(),
        [
            "a [0,10) c=1 s=10",
            "a [10,20) c=2 s=34",
            "b [10,20) c=1 s=20"
        ]
    );
    h.end(0).await;
    assert!(h.take().is_empty());
    h.end(1).await;
    assert_eq!(h.take(), ["a [20,30) c=1 s=40", "b [20,30) c=1 s=6"]);
}

#[tokio::test]
async fn sliding_windows_count_a_row_in_every_window_it_falls_in() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { sliding: { size: 10s, slide: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    );
    h.feed(
        0,
        &[
            ("a", 1, 3_000),
            ("a", 2, 7_000),
            ("b", 4, 6_000),
            ("a", 8, 12_000),
        ],
    )
    .await;
    // Watermark 12s: windows ending at 5s and 10s close.
    assert_eq!(
        h.take(),
        ["a [-5,5) c=1 s=1", "a [0,10) c=2 s=3", "b [0,10) c=1 s=4"]
    );
    // 4s: [-5,5) and [0,10) closed → late; 9s: [0,10) closed but [5,15) open → counted.
    h.feed(0, &[("a", 100, 4_000), ("b", 200, 9_000)]).await;
    assert_eq!(h.late, [(0, 0)]);
    h.end(0).await;
    assert_eq!(
        h.take(),
        [
            "a [5,15) c=2 s=10",
            "b [5,15) c=2 s=204",
            "a [10,20) c=1 s=8"
        ]
    );
}

#[tokio::test]
async fn sessions_merge_across_rows_and_partitions() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { session: { gap: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    );
    // a: 0s, 3s in partition 0 and 6s in partition 1 are one session (gaps < 5s); 20s starts another.
    h.feed(0, &[("a", 1, 0), ("b", 5, 1_000), ("a", 2, 3_000)])
        .await;
    h.feed(1, &[("a", 4, 6_000), ("b", 7, 30_000)]).await;
    // Watermarks: p0 3s, p1 30s → stage 3s: nothing has ended (b's ends at 6s).
    assert!(h.take().is_empty());
    h.feed(0, &[("a", 8, 20_000), ("a", 16, 40_000)]).await;
    // Stage watermark min(40, 30) = 30s: a [0,11) (merged across partitions), b [1,6) and
    // a [20,25) end before it.
    assert_eq!(
        h.take(),
        ["b [1,6) c=1 s=5", "a [0,11) c=3 s=7", "a [20,25) c=1 s=8"]
    );
    // A row that would start a session ended long ago is late; one that joins b's open
    // session (30s) is not.
    h.feed(1, &[("a", 100, 2_000), ("b", 32, 33_000)]).await;
    assert_eq!(h.late, [(1, 0)]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["b [30,38) c=2 s=39", "a [40,45) c=1 s=16"]);
}

/// Rows exactly `gap` apart are one session, as in Flink and Kafka Streams (sessions that
/// touch merge), across partitions too; a session stays open while the watermark is at its
/// end, since a row there still joins it.
#[tokio::test]
async fn sessions_that_touch_are_one_session() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { session: { gap: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    );
    h.feed(0, &[("a", 1, 0), ("a", 2, 5_000)]).await;
    h.feed(1, &[("a", 4, 10_000)]).await;
    // Both partitions at 15s, the end of a's session [0,15): it stays open.
    h.feed(0, &[("b", 5, 15_000)]).await;
    h.feed(1, &[("b", 6, 15_000)]).await;
    assert!(h.take().is_empty());
    h.feed(1, &[("a", 8, 15_000)]).await;
    assert!(h.late.is_empty());
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["a [0,20) c=4 s=15", "b [15,20) c=2 s=11"]);
}

/// An event time far ahead of the clock (microseconds read as milliseconds) is a dead
/// letter naming the value, and does not move its partition's watermark: the rows after it
/// are not late. Times at the ends of the 64-bit range are refused too, without overflow.
#[tokio::test]
async fn event_times_out_of_range_are_dead_letters_naming_the_value() {
    let mut stage = factory(
        "
group_by: [user]
event_time: t
window: { sliding: { size: 10s, slide: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    )
    .create()
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let micros = now * 1000;
    let ctx = Harness::ctx(0);
    let out = stage
        .process_batch(
            batch(&[
                ("a", 1, 1_000),
                ("a", 2, micros),
                ("a", 3, i64::MAX),
                ("a", 4, i64::MIN),
                ("a", 5, 2_000),
            ]),
            &ctx,
        )
        .await
        .unwrap();
    let failed: Vec<(usize, &str)> = out
        .failed
        .iter()
        .map(|f| (f.row, f.reason.as_str()))
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert_eq!(failed[0].0, 1);
    assert!(
        failed[0]
            .1
            .starts_with(&format!("event time {micros} ms (")),
        "{}",
        failed[0].1
    );
    assert!(
        failed[0]
            .1
            .contains("more than max_event_time_skew (1day) ahead of the clock")
    );
    assert!(
        failed[1].1.contains(&i64::MAX.to_string()),
        "{}",
        failed[1].1
    );
    assert_eq!(failed[2].0, 3);
    assert!(failed[2].1.contains("before the year 0"), "{}", failed[2].1);
    // The watermark is 2s, not the far future: a row at 3s is on time.
    let out = stage
        .process_batch(batch(&[("a", 6, 3_000)]), &ctx)
        .await
        .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed[0].reason);
    stage.end_of_partition(&ctx).await.unwrap();
    let mut rows = Vec::new();
    while let Some(b) = stage.pending(&ctx).await.unwrap() {
        rows.extend(rows_of(&b));
    }
    assert_eq!(rows, ["a [-5,5) c=3 s=12", "a [0,10) c=3 s=12"]);
}

/// Windows, slides, gaps and lateness longer than 100 years are refused where written.
#[test]
fn spans_beyond_a_century_are_refused() {
    let mut problems = Problems::new("test.yaml");
    let env: HashMap<String, String> = HashMap::new();
    let yaml = "
event_time: t
window: { tumbling: 1000000d }
allowed_lateness: 50000d
aggregates: { c: count() }
";
    let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).unwrap();
    AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
    let text = format!("{problems:?}");
    assert!(
        text.contains("window") && text.contains("longer than 100 years"),
        "{text}"
    );
    assert!(text.contains("allowed_lateness"), "{text}");
}

#[tokio::test]
async fn an_idle_partition_stops_holding_the_watermark_back() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("a", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 15_000)]).await;
    assert!(
        h.take().is_empty(),
        "partition 1 (watermark -1s) holds [0,10) open"
    );
    std::thread::sleep(std::time::Duration::from_millis(120));
    // Partition 1 has been idle for longer than 50ms: partition 0 alone decides.
    h.feed(0, &[("a", 4, 16_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=3"]);
    // The idle partition comes back: its rows of the emitted window are late.
    h.feed(1, &[("a", 5, 9_000), ("a", 6, 11_000)]).await;
    assert_eq!(h.late, [(1, 0)]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["a [10,20) c=3 s=13"]);
}

/// Windows close with time too: asked without a batch (as the executor does every second),
/// the stage hands out what idleness made due. When every partition has gone idle, the
/// watermark goes to the largest of theirs (as Flink flushes when its last input goes idle),
/// so the last partition to stop does not keep the windows of the others for ever.
#[tokio::test]
async fn windows_come_out_without_a_batch_once_every_partition_is_idle() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("b", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 25_000)]).await;
    assert!(h.take().is_empty(), "partition 1 holds [0,10) open");
    std::thread::sleep(std::time::Duration::from_millis(120));
    h.drain(&Harness::ctx(0)).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=2", "b [0,10) c=1 s=1"]);
    // [20,30) is open still: partition 0's watermark is 25s.
    h.drain(&Harness::ctx(1)).await;
    assert!(h.take().is_empty());
}

/// Silence is not idleness while the partition has records not done yet (in retries,
/// behind a slow stage, not fetched yet): its lag keeps its windows open, and only once it
/// is caught up does its silence let the others close them.
#[tokio::test]
async fn a_silent_partition_with_a_backlog_is_not_idle() {
    use sluice_engine::source::LogEnd;
    use sluice_engine::stats::PartitionProgress;
    struct End(i64);
    impl LogEnd for End {
        fn log_end(&self) -> Option<i64> {
            Some(self.0)
        }
    }
    let behind = Arc::new(PartitionProgress::new(Some(Arc::new(End(100)))));
    behind.start_at(10);
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.factory.state().unwrap().watch(&info(1), &behind);
    h.feed(1, &[("a", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 15_000)]).await;
    std::thread::sleep(std::time::Duration::from_millis(120));
    // Partition 1 is silent for longer than 50ms, but 90 of its records are not done.
    h.feed(0, &[("a", 4, 16_000)]).await;
    let out = h.take();
    assert!(out.is_empty(), "{out:?}");
    // Caught up (everything up to its end is done): now its silence is idleness.
    behind.advance_to(100);
    h.feed(0, &[("a", 5, 17_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=3"]);
    assert!(h.late.is_empty());
}

#[tokio::test]
async fn every_aggregate_over_one_window() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { tumbling: 1m }
aggregates:
  c: count()
  s: sum(n)
  non_null: count(n)
  lo: min(n)
  hi: max(n)
  mean: avg(n)
  distinct: count_distinct(n)
  approx: approx_count_distinct(n)
  first_n: first(n)
  last_n: last(n)
",
    );
    let rows: Vec<In> = vec![
        ("a", 5, 3_000),
        ("a", 1, 1_000),
        ("a", 9, 2_000),
        ("a", 5, 4_000),
    ];
    h.feed(0, &rows).await;
    let ctx = Harness::ctx(0);
    h.stage.end_of_partition(&ctx).await.unwrap();
    let b = h.stage.pending(&ctx).await.unwrap().unwrap();
    let int = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    assert_eq!(
        [
            int("c"),
            int("s"),
            int("non_null"),
            int("lo"),
            int("hi"),
            int("distinct"),
            int("approx"),
            int("first_n"),
            int("last_n")
        ],
        [4, 20, 4, 1, 9, 3, 3, 1, 5]
    );
    let mean = b.column_by_name("mean").unwrap();
    let mean = mean
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap();
    assert_eq!(mean.value(0), 5.0);
}

/// Events of 200 users over 5 minutes in two partitions, slightly out of order.
fn workload() -> Vec<(u32, Vec<In>)> {
    const USERS: [&str; 8] = ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    let mut batches = Vec::new();
    for b in 0..60 {
        for p in 0..2u32 {
            let rows: Vec<In> = (0..50)
                .map(|i| {
                    let k = b * 50 + i;
                    let t = k * 100 + p as i64 * 37 - (k % 5) * 40;
                    (USERS[((k * 7 + p as i64) % 8) as usize], k % 13, t)
                })
                .collect();
            batches.push((p, rows));
        }
    }
    batches
}

const SPILLING: &str = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
allowed_lateness: 1s
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
state: { memory: 1KiB }
";

async fn run_workload(h: &mut Harness, batches: &[(u32, Vec<In>)]) {
    for (p, rows) in batches {
        h.feed(*p, rows).await;
    }
}

/// Runs the workload through `yaml` with its 1 KiB budget and with 1 GiB: the same rows
/// and late rows, and entries did leave memory. Returns the windows and the store.
async fn spilling_matches_memory(yaml: &str) -> (Vec<String>, RocksStore) {
    let batches = workload();
    let mut reference = Harness::new(&yaml.replace("1KiB", "1GiB"));
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let store = RocksStore::scratch().unwrap();
    let spilling = Arc::new(concrete(yaml));
    let mut h = Harness::with(spilling.clone());
    h.factory
        .state()
        .unwrap()
        .restore(store.db().unwrap())
        .unwrap();
    run_workload(&mut h, &batches).await;
    let evicted = spilling
        .shared
        .evicted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(evicted > 100, "only {evicted} entries left memory");
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), expected);
    assert_eq!(h.late, reference.late);
    (expected, store)
}

#[tokio::test]
async fn state_beyond_the_budget_is_kept_in_rocksdb_with_the_same_results() {
    let (windows, _) = spilling_matches_memory(SPILLING).await;
    assert_eq!(windows.len(), 30 * 8);
}

/// Sliding windows keep one pane per slide: a pane that spilled is read whole for the
/// windows that close while it still changes, and lazily (then deleted) for its last one.
/// Same windows as in memory, and nothing left in the database.
#[tokio::test]
async fn sliding_panes_beyond_the_budget_give_the_same_windows() {
    let sliding = SPILLING.replace("{ tumbling: 10s }", "{ sliding: { size: 10s, slide: 2s } }");
    let (windows, store) = spilling_matches_memory(&sliding).await;
    assert!(windows.len() > 5 * 30 * 7, "{}", windows.len());
    let db = store.db().unwrap();
    let panes_left = db
        .iterator(rocksdb::IteratorMode::Start)
        .map(|kv| kv.unwrap().0)
        .filter(|k| k.windows(3).any(|w| w == b"/w/"))
        .count();
    assert_eq!(panes_left, 0);
}

#[tokio::test]
async fn a_restored_snapshot_goes_on_as_if_nothing_happened() {
    let batches = workload();
    let mut reference = Harness::new(SPILLING);
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    {
        let store = RocksStore::open(dir.path()).unwrap();
        let mut h = Harness::new(SPILLING);
        let state = h.factory.state().unwrap();
        state.restore(store.db().unwrap()).unwrap();
        run_workload(&mut h, &batches[..50]).await;
        checkpoint(&state, &store);
        out.extend(h.take());
        // Work after the checkpoint that a crash loses (its output was emitted, so it
        // will be emitted again: duplicates, never different rows).
        run_workload(&mut h, &batches[50..70]).await;
        out.extend(h.take());
    }
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(SPILLING);
    h.factory
        .state()
        .unwrap()
        .restore(store.db().unwrap())
        .unwrap();
    run_workload(&mut h, &batches[50..]).await;
    h.end(0).await;
    h.end(1).await;
    out.extend(h.take());
    let mut distinct = out.clone();
    distinct.sort();
    distinct.dedup();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(
        distinct, want,
        "every window once, with the uninterrupted result"
    );
    assert!(
        out.len() > expected.len(),
        "the lost work was emitted again"
    );
}

fn info(p: u32) -> PartitionInfo {
    PartitionInfo {
        id: p,
        name: format!("topic/{p}").into(),
    }
}

/// A partition that leaves (revoked, its state checkpointed and released) while the others
/// emit, and comes back, is judged by its own progress: its rows of windows only the others
/// closed count, and its windows come out complete (keys live in one partition).
#[tokio::test]
async fn a_partition_that_comes_back_is_judged_by_its_own_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    state.assign(&info(1));
    h.feed(1, &[("b", 1, 1_000), ("b", 2, 3_000)]).await;
    h.feed(0, &[("a", 1, 2_000)]).await;
    assert!(h.take().is_empty());
    checkpoint(&state, &store);
    state.revoke(&info(1));
    state.release(&info(1));
    // Partition 0 alone: [0,10) and [10,20) close.
    h.feed(0, &[("a", 2, 25_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1"]);
    // Partition 1 is back, at its checkpointed progress (watermark 1s).
    state.assign(&info(1));
    h.feed(1, &[("b", 4, 5_000), ("b", 8, 12_000)]).await;
    assert!(h.late.is_empty(), "its rows of [0,10) count");
    assert_eq!(h.take(), ["b [0,10) c=3 s=7"]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["b [10,20) c=1 s=8", "a [20,30) c=1 s=2"]);
}

/// A checkpoint in `dir` of a tumbling aggregate that has `a` at 1s in partition 0 and `b`
/// at 2s in partition 1.
async fn checkpoint_two_partitions(dir: &std::path::Path) {
    let store = RocksStore::open(dir).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    h.feed(0, &[("a", 1, 1_000)]).await;
    h.feed(1, &[("b", 2, 2_000)]).await;
    checkpoint(&state, &store);
}

/// After a restart, the partitions in the checkpoint that this process is not assigned
/// (another process owns them now) are neither emitted nor read: only the assigned ones.
#[tokio::test]
async fn restored_partitions_not_assigned_here_are_not_emitted() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_two_partitions(dir.path()).await;
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    h.feed(0, &[("a", 3, 3_000)]).await;
    // Partition 1 (restored, owned elsewhere) holds the watermark back until idle...
    assert!(h.take().is_empty());
    std::thread::sleep(std::time::Duration::from_millis(120));
    // ...and then its partial window is not emitted beside partition 0's.
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=4"]);
}

/// At the end of a bounded input, a partition that has not ended (silent, held up behind
/// retries) is closed only through its own progress, not to the end of time: its later
/// rows still count.
#[tokio::test]
async fn the_end_of_the_input_does_not_close_a_partition_that_has_not_ended() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("a", 1, 1_000), ("a", 2, 15_000)]).await;
    h.feed(0, &[("b", 5, 2_000)]).await;
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1", "b [0,10) c=1 s=5"]);
    std::thread::sleep(std::time::Duration::from_millis(120));
    // Partition 1 is idle and partition 0 has ended: [10,20) stays open for partition 1.
    h.end(0).await;
    assert!(h.take().is_empty());
    h.feed(1, &[("a", 3, 16_000)]).await;
    assert!(h.late.is_empty());
    h.end(1).await;
    assert_eq!(h.take(), ["a [10,20) c=2 s=5"]);
}

/// A revoked partition's windows are the next owner's to emit: emissions here leave them.
#[tokio::test]
async fn a_revoked_partition_is_not_emitted_here() {
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.assign(&info(0));
    state.assign(&info(1));
    h.feed(1, &[("b", 1, 1_000), ("b", 2, 30_000)]).await;
    h.feed(0, &[("a", 1, 2_000)]).await;
    state.revoke(&info(1));
    h.feed(0, &[("a", 2, 25_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1"]);
}

/// Once a bounded source has assigned all it will, restored partitions it did not assign
/// are not this process's: they stop holding the watermark back.
#[tokio::test]
async fn restored_partitions_never_assigned_stop_holding_the_watermark_back() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_two_partitions(dir.path()).await;
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    state.assignments_done();
    h.feed(0, &[("a", 3, 3_000)]).await;
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=4"]);
}

#[test]
fn mistakes_are_named() {
    let parse = |yaml: &str| {
        let mut problems = Problems::new("test.yaml");
        let env: HashMap<String, String> = HashMap::new();
        let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).unwrap();
        let config = AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
        match config {
            Some(c) => c.plan("agg", &schema()).err().unwrap_or_default(),
            None => problems
                .iter()
                .map(|p| p.message.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    };
    let base = "event_time: t\nwindow: { tumbling: 1m }\naggregates: { c: count() }\n";
    assert!(
        parse(&base.replace("count()", "median(n)"))
            .contains("unknown aggregate function `median`")
    );
    assert!(parse(&base.replace("count()", "sum()")).contains("`sum` needs a column"));
    assert!(parse(&base.replace("count()", "sum(user)")).contains("sum and avg need numbers"));
    assert!(parse(&base.replace("count()", "max(nope)")).contains("`nope` is not a column"));
    assert!(
        parse(&base.replace("event_time: t", "event_time: user")).contains("must be a timestamp")
    );
    assert!(
        parse(&base.replace("{ tumbling: 1m }", "{ sliding: { size: 5m, slide: 2m } }"))
            .contains("multiple of the slide")
    );
    assert!(parse(&format!("{base}group_by: [c]\n")).contains("`c` is not a column"));
    assert!(
        parse(&base.replace("c: count()", "window_end: count()")).contains("choose another name")
    );
    assert!(parse(&base.replace("count()", "max_by(n)")).contains("`max_by` needs two columns"));
    assert!(parse(&base.replace("count()", "'sum(n, t)'")).contains("`sum` takes one column"));
    assert!(
        parse(&format!("{base}top: {{ by: nope }}\n")).contains("must name one of the aggregates")
    );
    assert!(parse(&format!("{base}top: {{ by: c, n: 0 }}\n")).contains("at least 1"));
    assert!(
        parse(
            &format!("{base}top: {{ by: c }}\n")
                .replace("{ tumbling: 1m }", "{ session: { gap: 1m } }")
        )
        .contains("session windows are per key")
    );
    assert_eq!(parse(base), "");
}

/// `max_by`/`min_by` keep the value of the row with the largest/smallest `by`; of tied
/// rows, the earliest in event time, whichever partition it came from.
#[tokio::test]
async fn max_by_and_min_by_pick_a_row_and_ties_go_to_the_earliest() {
    let mut h = Harness::new(
        "
event_time: t
window: { tumbling: 1m }
aggregates:
  top_user: max_by(user, n)
  low_user: min_by(user, n)
  top_n: max(n)
",
    );
    h.feed(0, &[("late-tie", 9, 5_000), ("small", 1, 2_000)])
        .await;
    h.feed(
        1,
        &[
            ("early-tie", 9, 3_000),
            ("also-small", 1, 1_000),
            ("mid", 4, 4_000),
        ],
    )
    .await;
    let (c0, c1) = (Harness::ctx(0), Harness::ctx(1));
    h.stage.end_of_partition(&c0).await.unwrap();
    h.stage.end_of_partition(&c1).await.unwrap();
    let b = h.stage.pending(&c1).await.unwrap().unwrap();
    let text = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0)
            .to_string()
    };
    assert_eq!(b.num_rows(), 1);
    assert_eq!(text("top_user"), "early-tie");
    assert_eq!(text("low_user"), "also-small");
}

/// `top` keeps the rows of each window ranked 1..=n by an aggregate, ties included (as
/// RANK() does), and drops the rest — also when a window has more rows than the
/// candidates it keeps while emitting.
#[tokio::test]
async fn top_keeps_the_highest_ranked_rows_of_each_window_with_ties() {
    let yaml = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
aggregates:
  c: count()
top: { by: c, n: 2 }
";
    let mut h = Harness::new(yaml);
    // Window [0,10s): a=3, b=3, c=2, d=1 -> ranks 1,1,3,4: a and b only.
    // Window [10s,20s): e=1, f=2, g=1 -> ranks 2,1,2: all three (g and e tie for 2nd).
    let rows: Vec<In> = vec![
        ("a", 0, 1_000),
        ("b", 0, 1_000),
        ("a", 0, 2_000),
        ("c", 0, 2_000),
        ("b", 0, 3_000),
        ("a", 0, 3_000),
        ("b", 0, 4_000),
        ("c", 0, 4_000),
        ("d", 0, 5_000),
        ("e", 0, 11_000),
        ("f", 0, 12_000),
        ("f", 0, 13_000),
        ("g", 0, 14_000),
    ];
    h.feed(0, &rows).await;
    h.end(0).await;
    let users: Vec<String> = h
        .take()
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(users, ["a", "b", "e", "f", "g"]);

    // 10,000 keys in one window (more than the candidates kept while emitting): the two
    // keys with the most rows.
    let mut h = Harness::new(yaml);
    let names: Vec<&'static str> = (0..10_000)
        .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
        .collect();
    let mut rows: Vec<In> = names.iter().map(|n| (*n, 0, 1_000)).collect();
    rows.extend([
        (names[7], 0, 2_000),
        (names[9_999], 0, 2_000),
        (names[9_999], 0, 3_000),
    ]);
    h.feed(0, &rows).await;
    h.end(0).await;
    let users: Vec<String> = h
        .take()
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(users, ["k7", "k9999"]);
}

#[tokio::test]
async fn a_partition_released_and_assigned_again_continues_from_its_stored_state() {
    let batches = workload();
    let mut reference = Harness::new(SPILLING);
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let store = RocksStore::scratch().unwrap();
    let mut h = Harness::new(SPILLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    run_workload(&mut h, &batches[..40]).await;
    // A rebalance: the partition is drained, checkpointed and let go, then comes back.
    state.snapshot().unwrap();
    let p1 = PartitionInfo {
        id: 1,
        name: "topic/1".into(),
    };
    // Assigned again before the release of its drain arrives: the release keeps it.
    state.revoke(&p1);
    state.assign(&p1);
    state.release(&p1);
    run_workload(&mut h, &batches[40..44]).await;
    // Revoked, drained and released; then assigned again: it comes back from the store.
    state.snapshot().unwrap();
    state.revoke(&p1);
    state.release(&p1);
    state.assign(&p1);
    run_workload(&mut h, &batches[44..]).await;
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), expected);
}
