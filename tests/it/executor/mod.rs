//! The executor's promises: order per partition (also while partitions move between
//! workers), partitions assigned and revoked while running, bounded memory under a slow
//! sink, batches cut by size and by window, clean shutdown, failures that name their origin.
//! Workers that come and go, lanes and checkpoints while scaling: `scaling.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, SchemaRef, UInt32Type};
use async_trait::async_trait;
use sluice_connectors::generator::{GeneratorConfig, GeneratorSource};
use sluice_engine::batch::ColumnSelection;
use sluice_engine::executor::{self, Batching, Control, Output, Pipeline, RunOptions};
use sluice_engine::graph::Graph;
use sluice_engine::sink::Sink;
use sluice_engine::source::{Assignment, Source};
use sluice_engine::stats::RunStats;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::failures::Collect;

mod scaling;

fn generator(partitions: u32, count: Option<u64>, rate: Option<f64>) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions,
        count,
        rate,
        users: 1000,
        titles: 100,
        seed: 1,
        start_time: None,
        interval: None,
        disorder: None,
    })
    .unwrap()
}

/// Records `(partition, offset)` of every row in arrival order; optionally slow.
#[derive(Clone, Default)]
struct Recording {
    rows: Arc<Mutex<Vec<(u32, i64)>>>,
    delay: Duration,
}

#[async_trait]
impl Sink for Recording {
    async fn write(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        let p = batch
            .column_by_name("_partition")
            .unwrap()
            .as_primitive::<UInt32Type>();
        let o = batch
            .column_by_name("_offset")
            .unwrap()
            .as_primitive::<Int64Type>();
        self.rows
            .lock()
            .unwrap()
            .extend(p.values().iter().copied().zip(o.values().iter().copied()));
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }
    async fn flush(&mut self) -> sluice_engine::Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> sluice_engine::Result<()> {
        Ok(())
    }
    fn summary(&self) -> String {
        String::new()
    }
}

impl Recording {
    /// Every partition's offsets arrived once each, in order.
    fn assert_each_partition_in_order(&self, partitions: usize, each: i64) {
        let parts = self.by_partition();
        assert_eq!(parts.len(), partitions);
        for (p, offsets) in parts {
            assert_eq!(
                offsets,
                (0..each).collect::<Vec<i64>>(),
                "partition {p} out of order or incomplete"
            );
        }
    }

    fn by_partition(&self) -> HashMap<u32, Vec<i64>> {
        let mut map: HashMap<u32, Vec<i64>> = HashMap::new();
        for (p, o) in self.rows.lock().unwrap().iter() {
            map.entry(*p).or_default().push(*o);
        }
        map
    }
}

fn pipeline(source: Box<dyn Source>, sink: Recording, size: usize, window: Duration) -> Pipeline {
    Pipeline {
        name: "t".into(),
        source,
        batching: Batching { size, window },
        stages: Vec::new(),
        graph: Graph::chain(0),
        outputs: Output::single(
            Box::new(sink),
            ColumnSelection {
                keep_metadata: vec!["_partition".into(), "_offset".into()],
            },
        ),
        checkpoint: None,
        dead_letter: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_partition_holds_while_partitions_move() {
    let sink = Recording::default();
    let p = pipeline(
        Box::new(generator(3, Some(60_000), None)),
        sink.clone(),
        100,
        Duration::from_millis(10),
    );
    let (tx, rx) = mpsc::channel(16);
    let mover = tokio::spawn(async move {
        for i in 0u32..300 {
            let cmd = Control::MovePartition {
                partition: i % 3,
                worker: (i as usize * 7) % 3,
            };
            if tx.send(cmd).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    });
    let stats = RunStats::new([]);
    let options = RunOptions {
        workers: Some(3),
        ..Default::default()
    };
    executor::run(
        p,
        options,
        stats.clone(),
        CancellationToken::new(),
        Some(rx),
    )
    .await
    .unwrap();
    mover.abort();
    sink.assert_each_partition_in_order(3, 20_000);
    assert_eq!(RunStats::get(&stats.records_out), 60_000);
}

/// Assigns endless partition 0, then 1, revokes 1, then 0, then ends.
struct Rebalancing {
    inner: GeneratorSource,
    step: u32,
    /// When the current step is due; kept across calls so that the method is cancel safe.
    due: Option<tokio::time::Instant>,
}

#[async_trait]
impl Source for Rebalancing {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
    fn partition_hint(&self) -> usize {
        2
    }
    fn restore(&mut self, _: Arc<sluice_engine::checkpoint::Checkpoint>) {}
    async fn next_assignment(&mut self) -> sluice_engine::Result<Option<Assignment>> {
        let delay = [0, 50, 200, 100, 0]
            .get(self.step as usize)
            .copied()
            .unwrap_or(0);
        let due = *self
            .due
            .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(delay));
        tokio::time::sleep_until(due).await;
        self.due = None;
        self.step += 1;
        Ok(match self.step {
            1 => Some(Assignment::Assign(Box::new(self.inner.partition(0)))),
            2 => Some(Assignment::Assign(Box::new(self.inner.partition(1)))),
            3 => Some(Assignment::Revoke {
                partition: 1,
                drained: None,
            }),
            4 => Some(Assignment::Revoke {
                partition: 0,
                drained: None,
            }),
            _ => None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_come_and_go_while_running() {
    let sink = Recording::default();
    // Both partitions are endless, at 5000 records/s each, until revoked.
    let source = Rebalancing {
        inner: generator(2, None, Some(10_000.0)),
        step: 0,
        due: None,
    };
    let p = pipeline(Box::new(source), sink.clone(), 50, Duration::from_millis(5));
    let stats = RunStats::new([]);
    let run = executor::run(
        p,
        RunOptions::default(),
        stats.clone(),
        CancellationToken::new(),
        None,
    );
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("revoking every partition must let the run end")
        .unwrap();
    let parts = sink.by_partition();
    for p in [0, 1] {
        let offsets = &parts[&p];
        assert!(!offsets.is_empty(), "partition {p} was never read");
        assert_eq!(
            *offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {p} has gaps"
        );
    }
    // Partition 0 was read for longer than partition 1.
    assert!(parts[&0].len() > parts[&1].len());
    assert_eq!(
        RunStats::get(&stats.records_in),
        RunStats::get(&stats.records_out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_holds_back_the_source_and_shutdown_drains() {
    let sink = Recording {
        delay: Duration::from_millis(3),
        ..Default::default()
    };
    let p = pipeline(
        Box::new(generator(2, None, None)),
        sink.clone(),
        1000,
        Duration::from_millis(10),
    );
    let stats = RunStats::new([]);
    let shutdown = CancellationToken::new();
    let options = RunOptions {
        workers: Some(2),
        channel_capacity: 4,
        scaling: None,
    };
    let run = tokio::spawn(executor::run(
        p,
        options,
        stats.clone(),
        shutdown.clone(),
        None,
    ));
    let max_in_flight = Arc::new(AtomicU64::new(0));
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let in_flight = RunStats::get(&stats.records_in) - RunStats::get(&stats.records_out);
        max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    // Channels: 2 workers × 4 + sink 4, plus one batch in each worker and in the sink, and
    // one counted batch per reader waiting to be sent.
    let bound = (2 * 4 + 4 + 2 + 1 + 2) * 1000;
    let seen = max_in_flight.load(Ordering::Relaxed);
    assert!(
        seen <= bound,
        "{seen} records in flight, more than the bound {bound}"
    );
    assert!(RunStats::get(&stats.records_out) > 0);
    assert_eq!(
        RunStats::get(&stats.records_in),
        RunStats::get(&stats.records_out),
        "shutdown must write everything that was read"
    );
    for (p, offsets) in sink.by_partition() {
        assert_eq!(
            offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {p}"
        );
    }
}

/// Runs with default options until the source ends.
async fn run_to_end(p: Pipeline) -> Arc<RunStats> {
    let stats = RunStats::new([]);
    executor::run(
        p,
        RunOptions::default(),
        stats.clone(),
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap();
    stats
}

#[tokio::test]
async fn batches_are_cut_by_size() {
    let p = pipeline(
        Box::new(generator(1, Some(1000), None)),
        Recording::default(),
        64,
        Duration::from_secs(10),
    );
    let stats = run_to_end(p).await;
    assert_eq!(RunStats::get(&stats.batches_in), 16); // 15 × 64 + 40
    assert_eq!(RunStats::get(&stats.records_out), 1000);
}

#[tokio::test]
async fn batches_are_cut_by_window_when_records_trickle_in() {
    // 400 records at 2000/s take 200ms; one batch could hold them all, but the 20ms window
    // sends what has arrived.
    let p = pipeline(
        Box::new(generator(1, Some(400), Some(2000.0))),
        Recording::default(),
        100_000,
        Duration::from_millis(20),
    );
    let stats = run_to_end(p).await;
    assert!(
        RunStats::get(&stats.batches_in) > 2,
        "{}",
        RunStats::get(&stats.batches_in)
    );
    assert_eq!(RunStats::get(&stats.records_out), 400);
}

#[tokio::test]
async fn a_failed_row_stops_the_run_and_names_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"user_id\":1}\n{\"user_id\":2}\n{\"user_id\":null}\n",
    )
    .unwrap();
    let yaml = format!(
        "name: t
source:
  type: file
  path: {}
  schema: [{{ name: user_id, type: int64 }}]
stages:
  - name: ab
    type: function
    function: ab_bucket
    params: {{ key: user_id, experiment: e, variants: {{ a: 1 }} }}
sink:
  type: null
",
        input.display()
    );
    let e = crate::run_yaml(&yaml, &[]).await.unwrap_err();
    assert_eq!(
        e,
        format!(
            "stage `ab` failed on {} offset 2: the key `user_id` is null: no variant can be assigned",
            input.display()
        )
    );
}

/// Fails its third write.
struct FailingSink(u32);

#[async_trait]
impl Sink for FailingSink {
    async fn write(&mut self, _: RecordBatch) -> sluice_engine::Result<()> {
        self.0 += 1;
        if self.0 == 3 {
            return Err(sluice_engine::Error::io(
                "out/x",
                std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full"),
            ));
        }
        Ok(())
    }
    async fn flush(&mut self) -> sluice_engine::Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> sluice_engine::Result<()> {
        Ok(())
    }
    fn summary(&self) -> String {
        String::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_error_is_the_error_reported() {
    let mut p = pipeline(
        Box::new(generator(2, None, None)),
        Recording::default(),
        100,
        Duration::from_millis(10),
    );
    p.outputs[0].sink = Box::new(FailingSink(0));
    let stats = RunStats::new([]);
    let e = executor::run(
        p,
        RunOptions::default(),
        stats,
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), "out/x: disk full");
}

/// A partition reader that panics on its first read.
struct Panicking(Arc<sluice_engine::batch::PartitionInfo>);

#[async_trait]
impl sluice_engine::source::PartitionReader for Panicking {
    fn info(&self) -> &Arc<sluice_engine::batch::PartitionInfo> {
        &self.0
    }
    async fn read(
        &mut self,
        _: usize,
    ) -> sluice_engine::Result<Option<sluice_engine::batch::Envelope>> {
        panic!("a bug in a reader");
    }
}

/// Partition 0 from an endless generator, and partition 1 that panics.
struct WithPanic(GeneratorSource, u32);

#[async_trait]
impl Source for WithPanic {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }
    fn partition_hint(&self) -> usize {
        2
    }
    fn restore(&mut self, _: Arc<sluice_engine::checkpoint::Checkpoint>) {}
    async fn next_assignment(&mut self) -> sluice_engine::Result<Option<Assignment>> {
        self.1 += 1;
        Ok(match self.1 {
            1 => Some(Assignment::Assign(Box::new(self.0.partition(0)))),
            2 => Some(Assignment::Assign(Box::new(Panicking(Arc::new(
                sluice_engine::batch::PartitionInfo {
                    id: 1,
                    name: "bad/1".into(),
                },
            ))))),
            _ => None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_reader_stops_the_run_with_an_error() {
    let p = pipeline(
        Box::new(WithPanic(generator(2, None, None), 0)),
        Recording::default(),
        100,
        Duration::from_millis(10),
    );
    let run = executor::run(
        p,
        RunOptions::default(),
        RunStats::new([]),
        CancellationToken::new(),
        None,
    );
    let e = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the endless partition must be stopped too")
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("internal error: a reader task panicked"),
        "{e}"
    );
}
