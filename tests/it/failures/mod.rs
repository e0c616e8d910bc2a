//! Failures never lose a record: retries with backoff, bisecting, per-row failures,
//! `max_record_age`, timeouts, and dead letters with their provenance.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, SchemaRef, UInt32Type};
use async_trait::async_trait;
use sluice_connectors::generator::{GeneratorConfig, GeneratorSource};
use sluice_engine::batch::ColumnSelection;
use sluice_engine::dead_letter::DeadLetterSink;
use sluice_engine::executor::{self, Batching, Output, Pipeline, RunOptions};
use sluice_engine::failure::FailurePolicy;
use sluice_engine::graph::Graph;
use sluice_engine::sink::Sink;
use sluice_engine::stage::{
    PlannedStage, RowFailure, Stage, StageContext, StageFactory, StageOutput,
};
use sluice_engine::stats::RunStats;
use sluice_engine::{Error, ErrorClass};
use tokio_util::sync::CancellationToken;

mod breaker;

fn generator(partitions: u32, count: u64, rate: Option<f64>) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions,
        count: Some(count),
        rate,
        users: 1000,
        titles: 100,
        seed: 3,
        start_time: None,
        interval: None,
        disorder: None,
    })
    .unwrap()
}

/// Keeps every batch it is given.
#[derive(Clone, Default)]
pub(crate) struct Collect(Arc<Mutex<Vec<RecordBatch>>>);

impl Collect {
    pub(crate) fn batches(&self) -> Vec<RecordBatch> {
        self.0.lock().unwrap().clone()
    }

    /// `(partition, offset)` of every row written.
    fn positions(&self) -> Vec<(u32, i64)> {
        self.batches()
            .iter()
            .flat_map(|b| {
                let p = b
                    .column_by_name("_partition")
                    .unwrap()
                    .as_primitive::<UInt32Type>()
                    .clone();
                let o = b
                    .column_by_name("_offset")
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .clone();
                p.values().to_vec().into_iter().zip(o.values().to_vec())
            })
            .collect()
    }

    /// Dead letters as JSON objects (text form).
    fn letters(&self) -> Vec<serde_json::Value> {
        self.batches()
            .iter()
            .flat_map(|b| sluice_connectors::json::to_json_rows(b).unwrap())
            .collect()
    }
}

#[async_trait]
impl Sink for Collect {
    async fn write(&mut self, batch: RecordBatch) -> sluice_engine::Result<()> {
        self.0.lock().unwrap().push(batch);
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

/// A stage made of a closure over each batch and the number of the call.
#[derive(Clone)]
struct TestStage {
    schema: SchemaRef,
    calls: Arc<AtomicU64>,
    /// The first call waits this long before it answers.
    slow_first_call: Option<Duration>,
    #[allow(clippy::type_complexity)]
    behave: Arc<dyn Fn(&RecordBatch, u64) -> sluice_engine::Result<StageOutput> + Send + Sync>,
}

impl StageFactory for TestStage {
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn create(&self) -> sluice_engine::Result<Box<dyn Stage>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait]
impl Stage for TestStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> sluice_engine::Result<StageOutput> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if let (0, Some(wait)) = (call, self.slow_first_call) {
            tokio::time::sleep(wait).await;
        }
        (self.behave)(&batch, call)
    }
}

fn offsets(batch: &RecordBatch) -> Vec<i64> {
    batch
        .column_by_name("_offset")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec()
}

fn stage(
    source: &GeneratorSource,
    name: &str,
    policy: FailurePolicy,
    behave: impl Fn(&RecordBatch, u64) -> sluice_engine::Result<StageOutput> + Send + Sync + 'static,
) -> PlannedStage {
    use sluice_engine::source::Source;
    PlannedStage {
        name: name.into(),
        factory: Arc::new(TestStage {
            schema: source.schema(),
            calls: Arc::default(),
            slow_first_call: None,
            behave: Arc::new(behave),
        }),
        policy,
    }
}

fn fast_retries(max_attempts: u32) -> FailurePolicy {
    FailurePolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..FailurePolicy::default()
    }
}

async fn run(
    source: GeneratorSource,
    stages: Vec<PlannedStage>,
    out: &Collect,
    dead: Option<&Collect>,
) -> Result<Arc<RunStats>, Error> {
    let stats = RunStats::new(stages.iter().map(|s| &s.name));
    let pipeline = Pipeline {
        name: "failures".into(),
        source: Box::new(source),
        batching: Batching {
            size: 500,
            window: Duration::from_millis(20),
        },
        graph: Graph::chain(stages.len()),
        stages,
        outputs: Output::single(
            Box::new(out.clone()),
            ColumnSelection {
                keep_metadata: vec!["_partition".into(), "_offset".into()],
            },
        ),
        checkpoint: None,
        dead_letter: dead.map(|d| DeadLetterSink {
            sink: Box::new(d.clone()),
            text: true,
        }),
    };
    executor::run(
        pipeline,
        RunOptions::default(),
        stats.clone(),
        CancellationToken::new(),
        None,
    )
    .await?;
    Ok(stats)
}

fn transient(message: &str) -> Error {
    Error::Function {
        class: ErrorClass::Transient,
        message: message.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_every_record_arrives() {
    const N: u64 = 10_000;
    let source = generator(2, N, None);
    // Every batch fails twice (a flaky service), then goes through.
    let seen: Arc<Mutex<HashMap<(u32, i64), u32>>> = Arc::default();
    let flaky = stage(&source, "flaky", fast_retries(4), move |batch, _| {
        let first = (
            batch
                .column_by_name("_partition")
                .unwrap()
                .as_primitive::<UInt32Type>()
                .value(0),
            offsets(batch)[0],
        );
        let mut seen = seen.lock().unwrap();
        let n = seen.entry(first).or_insert(0);
        *n += 1;
        if *n <= 2 {
            return Err(transient("503 Service Unavailable"));
        }
        Ok(StageOutput::ok(batch.clone()))
    });
    let out = Collect::default();
    let stats = run(source, vec![flaky], &out, None).await.unwrap();
    let positions: HashSet<(u32, i64)> = out.positions().into_iter().collect();
    assert_eq!(positions.len() as u64, N, "every record arrives");
    assert_eq!(out.positions().len() as u64, N, "and once");
    assert_eq!(
        RunStats::get(&stats.stages[0].retries),
        2 * N,
        "two retries per row"
    );
    assert_eq!(RunStats::get(&stats.records_failed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_record_is_bisected_into_the_dead_letters() {
    const N: u64 = 10_000;
    const POISON: i64 = 4242;
    let source = generator(1, N, None);
    let policy = FailurePolicy {
        bisect_on_error: true,
        ..fast_retries(3)
    };
    let poison = stage(&source, "score", policy, |batch, _| {
        if offsets(batch).contains(&POISON) {
            return Err(Error::Function {
                class: ErrorClass::Permanent,
                message: "model rejected the input: NaN feature".into(),
            });
        }
        Ok(StageOutput::ok(batch.clone()))
    });
    let (out, dead) = (Collect::default(), Collect::default());
    let stats = run(source, vec![poison], &out, Some(&dead)).await.unwrap();
    let positions: Vec<(u32, i64)> = out.positions();
    assert_eq!(positions.len() as u64, N - 1);
    assert!(!positions.contains(&(0, POISON)));
    let letters = dead.letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l["pipeline"], "failures");
    assert_eq!(l["stage"], "score");
    assert_eq!(l["error_class"], "permanent");
    assert_eq!(l["error"], "model rejected the input: NaN feature");
    assert_eq!(l["source"], "generator/0");
    assert_eq!(l["partition"], 0);
    assert_eq!(l["offset"], POISON);
    assert_eq!(l["attempts"], 1);
    let row: serde_json::Value = serde_json::from_str(l["payload"].as_str().unwrap()).unwrap();
    assert_eq!(row["_offset"], POISON, "the row itself, as JSON");
    assert!(row["user_id"].is_i64());
    assert!(RunStats::get(&stats.stages[0].bisections) > 0);
    assert_eq!(RunStats::get(&stats.records_dead_lettered), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rows_are_dead_lettered_and_the_rest_goes_on() {
    const N: u64 = 5_000;
    let source = generator(2, N, None);
    // Permanent failures for every 100th offset, transient ones (forever) for every 250th
    // + 1: the first go at once, the second after max_attempts calls.
    let rows = stage(&source, "enrich", fast_retries(3), |batch, _| {
        let failed = offsets(batch)
            .iter()
            .enumerate()
            .filter_map(|(row, o)| match o {
                o if o % 100 == 0 => Some(RowFailure {
                    row,
                    class: ErrorClass::Permanent,
                    reason: format!("no such title for offset {o}"),
                }),
                o if o % 250 == 1 => Some(RowFailure {
                    row,
                    class: ErrorClass::Transient,
                    reason: "lookup timed out".into(),
                }),
                _ => None,
            })
            .collect::<Vec<_>>();
        let keep: Vec<u32> = (0..batch.num_rows() as u32)
            .filter(|r| !failed.iter().any(|f| f.row == *r as usize))
            .collect();
        let indices = arrow::array::UInt32Array::from(keep);
        let columns = batch
            .columns()
            .iter()
            .map(|c| arrow::compute::take(c, &indices, None).unwrap())
            .collect();
        Ok(StageOutput {
            batch: RecordBatch::try_new(batch.schema(), columns).unwrap(),
            failed,
        })
    });
    let (out, dead) = (Collect::default(), Collect::default());
    let stats = run(source, vec![rows], &out, Some(&dead)).await.unwrap();
    let letters = dead.letters();
    let permanent = letters
        .iter()
        .filter(|l| l["error_class"] == "permanent")
        .count();
    let transient = letters
        .iter()
        .filter(|l| l["error_class"] == "transient")
        .inspect(|l| assert_eq!(l["attempts"], 3, "{l}"))
        .count();
    // Per partition of 2,500 offsets: 25 multiples of 100, 10 of 250k+1.
    assert_eq!((permanent, transient), (50, 20));
    assert_eq!(
        out.positions().len() + letters.len(),
        N as usize,
        "output + dead letters = input"
    );
    assert_eq!(RunStats::get(&stats.stages[0].retries), 20 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_older_than_max_record_age_are_not_retried() {
    // The generator's default event times are in January 2026: older than an hour.
    let source = generator(1, 1000, None);
    let policy = FailurePolicy {
        max_record_age: Some(Duration::from_secs(3600)),
        ..fast_retries(5)
    };
    let down = stage(&source, "remote", policy, |_, _| {
        Err(transient("connection refused"))
    });
    let (out, dead) = (Collect::default(), Collect::default());
    let stats = run(source, vec![down], &out, Some(&dead)).await.unwrap();
    let letters = dead.letters();
    assert_eq!(letters.len(), 1000);
    assert!(letters.iter().all(|l| l["attempts"] == 1));
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("older than max_record_age 1h"),
        "{}",
        letters[0]["error"]
    );
    assert_eq!(RunStats::get(&stats.stages[0].retries), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_times_out_and_is_retried() {
    let source = generator(1, 2000, None);
    let policy = FailurePolicy {
        timeout: Some(Duration::from_millis(50)),
        ..fast_retries(3)
    };
    let mut slow = stage(&source, "slow", policy, |batch, _| {
        Ok(StageOutput::ok(batch.clone()))
    });
    slow.factory = Arc::new(TestStage {
        schema: slow.factory.output_schema(),
        calls: Arc::default(),
        slow_first_call: Some(Duration::from_secs(5)),
        behave: Arc::new(|batch, _| Ok(StageOutput::ok(batch.clone()))),
    });
    let out = Collect::default();
    let stats = run(source, vec![slow], &out, None).await.unwrap();
    assert_eq!(out.positions().len(), 2000);
    assert!(
        RunStats::get(&stats.stages[0].retries) > 0,
        "the timed-out batch was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_sink_a_failed_record_stops_the_run() {
    let source = generator(1, 1000, None);
    let bad = stage(&source, "strict", fast_retries(1), |batch, _| {
        let failed = offsets(batch)
            .iter()
            .position(|o| *o == 321)
            .map(|row| RowFailure {
                row,
                class: ErrorClass::Permanent,
                reason: "invalid country".into(),
            })
            .into_iter()
            .collect();
        Ok(StageOutput {
            batch: batch.clone(),
            failed,
        })
    });
    let err = run(source, vec![bad], &Collect::default(), None)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "stage `strict` failed on generator/0 offset 321: invalid country"
    );
}

/// The dead-letter topic's brokers go away for three seconds mid-run: writing dead letters
/// waits (back-pressure on the whole pipeline) and goes on when they return; every record
/// is in the output or in the dead-letter topic, with its provenance in headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_dead_letter_sink_pauses_the_pipeline_and_loses_nothing() {
    use rdkafka::mocking::MockCluster;
    use sluice_connectors::kafka::{KafkaSink, KafkaSinkConfig};
    const N: u64 = 20_000;
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("dlq", 2, 3).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let source = generator(2, N, Some(5_000.0));
    // Every 10th record fails for good.
    let picky = stage(&source, "picky", fast_retries(1), |batch, _| {
        let failed = offsets(batch)
            .iter()
            .enumerate()
            .filter(|(_, o)| *o % 10 == 0)
            .map(|(row, o)| RowFailure {
                row,
                class: ErrorClass::Permanent,
                reason: format!("rejected {o}"),
            })
            .collect();
        Ok(StageOutput {
            batch: batch.slice(0, 0),
            failed,
        })
    });
    let dlq = KafkaSink::open_dead_letter(KafkaSinkConfig {
        bootstrap_servers: bootstrap.clone(),
        topic: "dlq".into(),
        key: None,
        headers: Vec::new(),
        format: Default::default(),
        avro: None,
        protobuf: None,
        tls: None,
        sasl: None,
        options: Default::default(),
    })
    .unwrap();
    let stats = RunStats::new([&picky.name]);
    let out = Collect::default();
    let pipeline = Pipeline {
        name: "dlq-outage".into(),
        source: Box::new(source),
        batching: Batching {
            size: 500,
            window: Duration::from_millis(20),
        },
        stages: vec![picky],
        graph: Graph::chain(1),
        outputs: Output::single(Box::new(out.clone()), ColumnSelection::default()),
        checkpoint: None,
        dead_letter: Some(DeadLetterSink {
            sink: Box::new(dlq),
            text: false,
        }),
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for b in 1..=3 {
            mock.broker_down(b).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        for b in 1..=3 {
            mock.broker_up(b).unwrap();
        }
    };
    let (run, ()) = tokio::join!(
        executor::run(
            pipeline,
            RunOptions::default(),
            stats.clone(),
            CancellationToken::new(),
            None
        ),
        outage
    );
    let report = run.unwrap();
    assert_eq!(RunStats::get(&stats.records_dead_lettered), N / 10);
    assert!(
        report.sink.contains(&format!("{} acknowledged", N / 10)),
        "{}",
        report.sink
    );

    // Read until every dead letter is seen: a record written twice (at least once, through
    // the outage) must not end the reading before the last one.
    let reader = crate::kafka::Broker::with_bootstrap(&bootstrap);
    let read = tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::new();
        let mut looked = 0;
        reader.read_messages_until("dlq", Duration::from_secs(60), |read| {
            for m in &read[looked..] {
                seen.insert((m.headers["source"].clone(), m.headers["offset"].clone()));
            }
            looked = read.len();
            seen.len() as u64 >= N / 10
        })
    })
    .await
    .unwrap();
    let offsets: HashSet<(String, String)> = read
        .iter()
        .map(|m| {
            assert_eq!(m.headers["stage"], "picky");
            assert_eq!(m.headers["error_class"], "permanent");
            assert_eq!(
                m.headers["error"],
                format!("rejected {}", m.headers["offset"])
            );
            let row: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(row["_offset"].to_string(), m.headers["offset"]);
            (m.headers["source"].clone(), m.headers["offset"].clone())
        })
        .collect();
    assert_eq!(
        offsets.len() as u64,
        N / 10,
        "every dead letter, in the topic ({} messages read)",
        read.len()
    );
}

/// JSON lines files: lines that do not decode go to the dead letters with their line
/// number and bytes; the rest keep their own offsets.
#[tokio::test]
async fn bad_lines_of_a_file_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut text = Vec::new();
    for i in 0..1000 {
        match i % 10 {
            3 => text.extend_from_slice(format!("{{\"n\": \"three-{i}\"}}\n").as_bytes()),
            7 => text.extend_from_slice(b"\xff\xfe not json\n"),
            _ => text.extend_from_slice(format!("{{\"n\": {i}}}\n").as_bytes()),
        }
    }
    std::fs::write(&input, &text).unwrap();
    let (out, dlq) = (dir.path().join("out"), dir.path().join("dlq"));
    let yaml = format!(
        "name: lines
source:
  type: file
  path: {}
  batch_size: 64
  schema: [{{ name: n, type: int64 }}]
sink:
  type: file
  path: {}
  metadata_columns: [_offset]
dead_letter:
  type: file
  path: {}
checkpoint:
  dir: {}
  interval: 1h
",
        input.display(),
        out.display(),
        dlq.display(),
        dir.path().join("ckpt").display()
    );
    let (stats, _) = crate::run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(RunStats::get(&stats.records_out), 800);
    assert_eq!(RunStats::get(&stats.records_dead_lettered), 200);
    for row in crate::read_lines(&out) {
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["n"], v["_offset"], "each good row keeps its own offset");
    }
    let letters: Vec<serde_json::Value> = crate::read_lines(&dlq)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 200);
    let l = letters.iter().find(|l| l["offset"] == 13).unwrap();
    assert_eq!(l["payload"], r#"{"n": "three-13"}"#);
    assert!(l["error"].as_str().unwrap().starts_with("line 14: "), "{l}");
    let l = letters.iter().find(|l| l["offset"] == 17).unwrap();
    assert_eq!(l["payload_base64"], "//4gbm90IGpzb24=");

    // Run again: the checkpoint covers every line, good and bad.
    let (stats, _) = crate::run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(RunStats::get(&stats.records_out), 0);
    assert_eq!(RunStats::get(&stats.records_dead_lettered), 0);
}

/// A line over max_record_size is a dead letter of its first bytes; the lines after it
/// are read as usual.
#[tokio::test]
async fn an_oversized_line_is_dead_lettered_and_reading_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let long = format!("{{\"n\": 1, \"pad\": \"{}\"}}\n", "x".repeat(5000));
    std::fs::write(&input, format!("{{\"n\": 0}}\n{long}{{\"n\": 2}}\n")).unwrap();
    let (out, dlq) = (dir.path().join("out"), dir.path().join("dlq"));
    let yaml = format!(
        "name: long
source:
  type: file
  path: {}
  max_record_size: 1KiB
  schema: [{{ name: n, type: int64 }}]
sink: {{ type: file, path: {} }}
dead_letter: {{ type: file, path: {} }}
",
        input.display(),
        out.display(),
        dlq.display()
    );
    let (stats, _) = crate::run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(RunStats::get(&stats.records_out), 2);
    let letters: Vec<serde_json::Value> = crate::read_lines(&dlq)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["offset"], 1);
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("larger than max_record_size (1KiB)"),
        "{}",
        letters[0]["error"]
    );
    assert!(letters[0]["payload"].as_str().unwrap().len() <= 1025);
}
