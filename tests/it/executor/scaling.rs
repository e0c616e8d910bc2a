//! Workers started and retired while records flow, a parallelization factor's lanes, and
//! workers that start while a checkpoint's barrier is out.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_and_go_without_losing_or_reordering_a_record() {
    let sink = Recording::default();
    let p = pipeline(
        Box::new(generator(4, Some(80_000), None)),
        sink.clone(),
        100,
        Duration::from_millis(10),
    );
    let (tx, rx) = mpsc::channel(16);
    let scaler = tokio::spawn(async move {
        for i in 0usize.. {
            // Up and down, with moves in between.
            let n = [1, 4, 2, 6, 1, 3][i % 6];
            if tx.send(Control::ScaleTo(n)).await.is_err() {
                break;
            }
            let cmd = Control::MovePartition {
                partition: (i % 4) as u32,
                worker: i % 7,
            };
            let _ = tx.send(cmd).await;
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    let stats = RunStats::new([]);
    let report = executor::run(
        p,
        RunOptions {
            workers: Some(1),
            ..Default::default()
        },
        stats.clone(),
        CancellationToken::new(),
        Some(rx),
    )
    .await
    .unwrap();
    scaler.abort();
    sink.assert_each_partition_in_order(4, 20_000);
    assert_eq!(RunStats::get(&stats.records_out), 80_000);
    assert!(
        report.workers >= 4,
        "at most {} workers ran",
        report.workers
    );
}

/// Passes batches through after a pause between `min_delay` and `max_delay` (random):
/// batches processed at once finish in any order. A slow stage, like a remote call.
struct Jitter {
    schema: SchemaRef,
    min_delay: Duration,
    max_delay: Duration,
}

impl sluice_engine::stage::StageFactory for Jitter {
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn create(&self) -> sluice_engine::Result<Box<dyn sluice_engine::stage::Stage>> {
        Ok(Box::new(JitterStage(self.min_delay, self.max_delay)))
    }
}

struct JitterStage(Duration, Duration);

#[async_trait]
impl sluice_engine::stage::Stage for JitterStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &sluice_engine::stage::StageContext,
    ) -> sluice_engine::Result<sluice_engine::stage::StageOutput> {
        let nanos = fastrand::u64(self.0.as_nanos() as u64..=self.1.as_nanos() as u64);
        tokio::time::sleep(Duration::from_nanos(nanos)).await;
        Ok(sluice_engine::stage::StageOutput::ok(batch))
    }
}

/// `(partition, user_id, offset)` of every row, in arrival order.
fn keyed_rows(batches: &[RecordBatch]) -> Vec<(u32, i64, i64)> {
    let mut rows = Vec::new();
    for b in batches {
        let p = b
            .column_by_name("_partition")
            .unwrap()
            .as_primitive::<UInt32Type>();
        let u = b
            .column_by_name("user_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let o = b
            .column_by_name("_offset")
            .unwrap()
            .as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            rows.push((p.value(i), u.value(i), o.value(i)));
        }
    }
    rows
}

/// `count` generated records on `partitions` through a [`Jitter`] stage of `delay`
/// (from, to) into a [`Collect`] sink, with `factor` workers and lanes keyed by user.
fn with_lanes(
    partitions: u32,
    count: u64,
    batch_size: usize,
    delay: (Duration, Duration),
    factor: usize,
) -> (Pipeline, Collect, RunOptions) {
    let source = generator(partitions, Some(count), None);
    let schema = source.schema();
    let sink = Collect::default();
    let mut p = pipeline(
        Box::new(source),
        Recording::default(),
        batch_size,
        Duration::from_millis(5),
    );
    p.outputs[0].sink = Box::new(sink.clone());
    p.graph = Graph::chain(1);
    p.stages = vec![sluice_engine::stage::PlannedStage {
        name: "slow".into(),
        factory: Arc::new(Jitter {
            schema,
            min_delay: delay.0,
            max_delay: delay.1,
        }),
        policy: Default::default(),
    }];
    let options = RunOptions {
        workers: Some(factor),
        scaling: Some(sluice_engine::autoscale::ScalingPolicy {
            min_workers: factor,
            max_workers: factor,
            parallelization_factor: factor,
            key: Some("user_id".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    (p, sink, options)
}

/// Each (partition, user)'s offsets arrived in increasing order; how many rows arrived
/// before a row of a lower offset of their partition (other keys overtaking).
fn assert_keys_in_order(rows: &[(u32, i64, i64)]) -> usize {
    let mut seen: HashMap<(u32, i64), i64> = HashMap::new();
    let mut highest: HashMap<u32, i64> = HashMap::new();
    let mut overtaken = 0;
    for (p, user, offset) in rows {
        if let Some(last) = seen.insert((*p, *user), *offset) {
            assert!(
                last < *offset,
                "user {user} of partition {p}: offset {offset} after {last}"
            );
        }
        let top = highest.entry(*p).or_insert(i64::MIN);
        if *top > *offset {
            overtaken += 1;
        }
        *top = (*top).max(*offset);
    }
    overtaken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallelization_factor_keeps_each_keys_order() {
    let jitter = (Duration::ZERO, Duration::from_millis(2));
    let (p, sink, options) = with_lanes(2, 20_000, 50, jitter, 8);
    let stats = RunStats::new([&Arc::<str>::from("slow")]);
    executor::run(p, options, stats.clone(), CancellationToken::new(), None)
        .await
        .unwrap();
    let rows = keyed_rows(&sink.batches());
    assert_eq!(rows.len(), 20_000);
    let overtaken = assert_keys_in_order(&rows);
    let mut all: HashMap<u32, Vec<i64>> = HashMap::new();
    for (p, _, offset) in &rows {
        all.entry(*p).or_default().push(*offset);
    }
    for (p, mut offsets) in all {
        offsets.sort_unstable();
        assert_eq!(offsets, (0..10_000).collect::<Vec<i64>>(), "partition {p}");
    }
    // The lanes did run at once: other keys' records overtook each other.
    assert!(
        overtaken > 0,
        "no record was overtaken: the lanes ran one after another"
    );
}

/// A stage that takes 10ms a batch, on one partition: each lane adds a batch in flight.
/// Prints the throughput for factors 1, 2, 4 and 8 (`cargo test --test it --
/// executor::a_parallelization_factor_multiplies --nocapture`); asserts only that every
/// record comes out once, each key in order (times are not asserted in tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallelization_factor_multiplies_a_slow_stages_throughput() {
    const N: u64 = 20_000;
    for factor in [1, 2, 4, 8] {
        let ten_ms = (Duration::from_millis(10), Duration::from_millis(10));
        let (p, sink, options) = with_lanes(1, N, 100, ten_ms, factor);
        let stats = RunStats::new([&Arc::<str>::from("slow")]);
        let t0 = std::time::Instant::now();
        executor::run(p, options, stats.clone(), CancellationToken::new(), None)
            .await
            .unwrap();
        let elapsed = t0.elapsed();
        let rows = keyed_rows(&sink.batches());
        assert_eq!(rows.len() as u64, N);
        assert_keys_in_order(&rows);
        eprintln!(
            "parallelization_factor {factor}: {N} records in {elapsed:.2?}, {:.0} records/s",
            N as f64 / elapsed.as_secs_f64()
        );
    }
}

/// A stateful stage that counts batches it was given while its state was being
/// snapshotted: a checkpoint's barrier must have every worker paused then.
struct Frozen {
    schema: SchemaRef,
    state: Arc<FrozenState>,
}

#[derive(Default)]
struct FrozenState {
    snapshotting: std::sync::atomic::AtomicBool,
    snapshots: AtomicU64,
    during: AtomicU64,
}

impl sluice_engine::stage::StageFactory for Frozen {
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn create(&self) -> sluice_engine::Result<Box<dyn sluice_engine::stage::Stage>> {
        Ok(Box::new(FrozenStage(self.state.clone())))
    }
    fn state(&self) -> Option<Arc<dyn sluice_engine::state::StageState>> {
        Some(self.state.clone())
    }
}

struct FrozenStage(Arc<FrozenState>);

#[async_trait]
impl sluice_engine::stage::Stage for FrozenStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &sluice_engine::stage::StageContext,
    ) -> sluice_engine::Result<sluice_engine::stage::StageOutput> {
        if self.0.snapshotting.load(Ordering::SeqCst) {
            self.0.during.fetch_add(1, Ordering::SeqCst);
        }
        Ok(sluice_engine::stage::StageOutput::ok(batch))
    }
}

impl sluice_engine::state::StageState for FrozenState {
    fn restore(&self, _db: Arc<sluice_engine::checkpoint::StateDb>) -> sluice_engine::Result<()> {
        Ok(())
    }
    fn assign(&self, _partition: &sluice_engine::batch::PartitionInfo) {}
    fn release(&self, _partition: &sluice_engine::batch::PartitionInfo) {}
    fn snapshot(&self) -> sluice_engine::Result<sluice_engine::state::SnapshotStats> {
        self.snapshotting.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        self.snapshotting.store(false, Ordering::SeqCst);
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        Ok(Default::default())
    }
}

/// Workers started (and lanes given to them) while a checkpoint's barrier is out must not
/// process anything until it is released: the snapshot would hold state past the offsets
/// it commits, or miss windows emitted meanwhile. Scaling waits for the barrier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_during_a_checkpoint_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = generator(4, None, Some(40_000.0));
    let schema = source.schema();
    let state = Arc::new(FrozenState::default());
    let mut p = pipeline(
        Box::new(source),
        Recording::default(),
        100,
        Duration::from_millis(5),
    );
    p.graph = Graph::chain(1);
    p.stages = vec![sluice_engine::stage::PlannedStage {
        name: "frozen".into(),
        factory: Arc::new(Frozen {
            schema,
            state: state.clone(),
        }),
        policy: Default::default(),
    }];
    p.checkpoint = Some(sluice_engine::executor::CheckpointPolicy {
        store: Arc::new(sluice_engine::checkpoint::RocksStore::open(dir.path()).unwrap()),
        interval: Duration::from_millis(10),
    });
    let (tx, rx) = mpsc::channel(16);
    let scaler = tokio::spawn(async move {
        for i in 0usize.. {
            let n = [1, 4, 2, 6, 1, 3][i % 6];
            if tx.send(Control::ScaleTo(n)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    let stop = CancellationToken::new();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.cancel();
        })
    };
    executor::run(
        p,
        RunOptions {
            workers: Some(1),
            ..Default::default()
        },
        RunStats::new([&Arc::<str>::from("frozen")]),
        stop,
        Some(rx),
    )
    .await
    .unwrap();
    scaler.abort();
    stopper.abort();
    let snapshots = state.snapshots.load(Ordering::SeqCst);
    assert!(snapshots > 20, "only {snapshots} snapshots");
    assert_eq!(
        state.during.load(Ordering::SeqCst),
        0,
        "batches processed while the state was snapshotted ({snapshots} snapshots)"
    );
}
