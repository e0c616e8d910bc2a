//! Throughput of the hot path: generator → sql (filter + projection) → null.
//!
//! Run with `cargo bench --bench pipeline` (release profile). Groups:
//! - `generator`: making 8192-row batches of view events, the source's own cost;
//! - `sql_stage`: the planned SQL stage on pre-made batches (setup outside the timed loop);
//! - `pipeline`: the whole executor — reader, batching, channels, worker, stage, sink — on a
//!   single-threaded tokio runtime, so the figure is records per second on one core.
//!
//! - `kafka_decode`: Kafka message payloads (JSON view events, as the Kafka sink writes them,
//!   ~150 bytes) into one Arrow batch, no network: the sonic-rs fast path against arrow-json.
//!
//! Every group reports records/s (`Throughput::Elements`).

use std::sync::Arc;

use arrow::array::RecordBatch;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_connectors::generator::{GeneratorConfig, GeneratorSource};
use sluice_connectors::null::NullSink;
use sluice_engine::batch::ColumnSelection;
use sluice_engine::executor::{self, Batching, Pipeline, RunOptions};
use sluice_engine::stage::{PlannedStage, StageContext, StageFactory};
use sluice_engine::stats::RunStats;
use sluice_udfs::sql::SqlStageFactory;
use tokio_util::sync::CancellationToken;

const QUERY: &str = "SELECT user_id, title_id, watch_seconds * 2 AS doubled, country \
                     FROM input WHERE event_type = 'play' AND watch_seconds > 60";

fn generator(count: Option<u64>) -> GeneratorSource {
    GeneratorSource::new(GeneratorConfig {
        partitions: 1,
        count,
        rate: None,
        users: 100_000,
        titles: 10_000,
        seed: 7,
        start_time: None,
        interval: None,
        disorder: None,
    })
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bench_generator(c: &mut Criterion) {
    let mut group = c.benchmark_group("generator");
    {
        let rows = 8192usize;
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("view_events", rows), &rows, |b, &rows| {
            let mut partition = generator(None).partition(0);
            b.iter(|| partition.generate(rows).unwrap());
        });
    }
    group.finish();
}

fn bench_sql_stage(c: &mut Criterion) {
    let rt = runtime();
    let source = generator(None);
    let factory = rt
        .block_on(SqlStageFactory::plan(
            QUERY,
            sluice_engine::source::Source::schema(&source),
        ))
        .unwrap();
    let mut stage = factory.create().unwrap();
    let ctx = StageContext {
        pipeline: "bench".into(),
        stage: "filter".into(),
        worker: 0,
    };
    rt.block_on(stage.open(&ctx)).unwrap();
    let mut group = c.benchmark_group("sql_stage");
    for rows in [8192usize, 65536] {
        let mut partition = source.partition(0);
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(
            BenchmarkId::new("filter_projection", rows),
            &rows,
            |b, &rows| {
                b.iter_batched(
                    || partition.generate(rows).unwrap().batch,
                    |batch: RecordBatch| rt.block_on(stage.process_batch(batch, &ctx)).unwrap(),
                    BatchSize::SmallInput,
                );
            },
        );
    }
    group.finish();
}

fn bench_pipeline(c: &mut Criterion) {
    const RECORDS: u64 = 2_000_000;
    let rt = runtime();
    let schema = sluice_engine::source::Source::schema(&generator(None));
    let factory: Arc<dyn StageFactory> =
        Arc::new(rt.block_on(SqlStageFactory::plan(QUERY, schema)).unwrap());
    let run_once = |batch_size: usize| {
        let pipeline = Pipeline {
            name: "bench".into(),
            source: Box::new(generator(Some(RECORDS))),
            batching: Batching {
                size: batch_size,
                window: std::time::Duration::from_millis(100),
            },
            stages: vec![PlannedStage {
                name: "filter".into(),
                factory: factory.clone(),
                policy: Default::default(),
            }],
            sink: Box::new(NullSink::default()),
            columns: ColumnSelection::default(),
            checkpoint: None,
            dead_letter: None,
        };
        let stats = RunStats::new(pipeline.stages.iter().map(|s| &s.name));
        let options = RunOptions {
            workers: Some(1),
            ..Default::default()
        };
        rt.block_on(executor::run(
            pipeline,
            options,
            stats.clone(),
            CancellationToken::new(),
            None,
        ))
        .unwrap();
        stats
    };
    // Outside the timed loop: the pipeline really moves every record through the stage.
    let stats = run_once(8192);
    assert_eq!(RunStats::get(&stats.stages[0].rows_in), RECORDS);
    assert!(RunStats::get(&stats.records_out) > RECORDS / 2);

    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS));
    for batch_size in [8192usize, 65536] {
        group.bench_with_input(
            BenchmarkId::new("generator_sql_null", batch_size),
            &batch_size,
            |b, &batch_size| {
                b.iter(|| run_once(batch_size));
            },
        );
    }
    group.finish();
}

/// The payloads the Kafka sink writes for generated view events, one per message.
fn view_event_payloads(rows: usize) -> Vec<Vec<u8>> {
    let batch = generator(None).partition(0).generate(rows).unwrap();
    let records = ColumnSelection::default().apply(&batch.batch).unwrap();
    let mut lines = Vec::new();
    let mut writer = sluice_connectors::json::lines_writer(&mut lines);
    writer.write(&records).unwrap();
    writer.finish().unwrap();
    drop(writer);
    lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn bench_kafka_decode(c: &mut Criterion) {
    use sluice_connectors::json::JsonDecoder;
    let rows = 8192usize;
    let payloads = view_event_payloads(rows);
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    eprintln!(
        "kafka_decode: {rows} payloads, {:.0} bytes each on average, e.g. {}",
        bytes as f64 / rows as f64,
        String::from_utf8_lossy(&payloads[0])
    );
    let schema = sluice_connectors::generator::record_schema();
    let schema = Arc::new(schema);
    let mut group = c.benchmark_group("kafka_decode");
    group.throughput(Throughput::Elements(rows as u64));
    let mut fast = JsonDecoder::new(schema.clone());
    assert!(fast.is_fast());
    let mut arrow = JsonDecoder::arrow_only(schema);
    assert_eq!(
        fast.decode(payloads.iter().map(Vec::as_slice)).unwrap(),
        arrow.decode(payloads.iter().map(Vec::as_slice)).unwrap(),
        "both paths decode the same batch"
    );
    group.bench_with_input(BenchmarkId::new("sonic_fast_path", rows), &rows, |b, _| {
        b.iter(|| fast.decode(payloads.iter().map(Vec::as_slice)).unwrap());
    });
    group.bench_with_input(BenchmarkId::new("arrow_json", rows), &rows, |b, _| {
        b.iter(|| arrow.decode(payloads.iter().map(Vec::as_slice)).unwrap());
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_generator,
    bench_sql_stage,
    bench_pipeline,
    bench_kafka_decode
);
criterion_main!(benches);
