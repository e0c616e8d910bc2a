//! Throughput of the hot path: generator → sql (filter + projection) → null.
//!
//! Run with `cargo bench --bench pipeline` (release profile). Groups:
//! - `generator`: making 8192-row batches of view events, the source's own cost;
//! - `sql_stage`: the planned SQL stage on pre-made batches (setup outside the timed loop);
//! - `pipeline`: the whole executor — reader, batching, channels, worker, stage, sink — on a
//!   single-threaded tokio runtime, so the figure is records per second on one core.
//!
//! - `kafka_decode`: Kafka message payloads (JSON view events, as the Kafka sink writes them,
//!   ~150 bytes) into one Arrow batch, no network: the sonic-rs fast path against arrow-json,
//!   and the same events as Confluent-framed Avro and as plain Protobuf.
//!
//! - `score`: personalization — 8192 events of users drawn from 100,000, each with a
//!   32-feature taste vector, scored against 1,000 titles for the top 10; `generated` with
//!   the per-user cache off (every event scored), `cached` once every user is in the cache.
//! - `enrich`: a lookup join of 8192 events keyed by user (100,000 users) — against a file
//!   table, and against a local Redis (started by the bench when `redis-server` is installed)
//!   with every key in the cache (`redis_cache_hits`) and with the cache off
//!   (`redis_cache_misses`: one pipelined HGETALL round trip per batch).
//!
//! Every group reports records/s (`Throughput::Elements`).

// The allocator the `sluice` binary runs with: stages that allocate per key (aggregation
// state) are measured as they run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use arrow::array::RecordBatch;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_connectors::generator::{GeneratorConfig, GeneratorSource};
use sluice_connectors::null::NullSink;
use sluice_engine::batch::ColumnSelection;
use sluice_engine::executor::{self, Batching, Output, Pipeline, RunOptions};
use sluice_engine::graph::Graph;
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
    let ctx = StageContext::detached("filter");
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
            graph: Graph::chain(1),
            outputs: Output::single(Box::new(NullSink::default()), ColumnSelection::default()),
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
    // The same events as Avro in the Confluent wire format (schema id 1), as a registry-
    // backed producer writes them: arrow-avro's encoder, one message per row.
    let (avro, avro_payloads) = avro_view_events(rows);
    let mut decoder = sluice_connectors::avro::AvroDecoder::new(avro, usize::MAX);
    let slices: Vec<&[u8]> = avro_payloads.iter().map(|p| p.as_ref()).collect();
    let (decoded, bad) = decoder.decode_each(&slices);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(decoded.unwrap().num_rows(), rows);
    eprintln!(
        "kafka_decode: the Avro messages are {:.0} bytes each on average",
        slices.iter().map(|p| p.len()).sum::<usize>() as f64 / rows as f64
    );
    group.bench_with_input(BenchmarkId::new("avro_confluent", rows), &rows, |b, _| {
        b.iter(|| decoder.decode_each(&slices).0.unwrap());
    });
    // And as plain Protobuf messages (Sluice's Protobuf encoder, one message per row).
    let (protobuf, proto_payloads) = protobuf_view_events(rows);
    let mut decoder = sluice_connectors::protobuf::ProtobufDecoder::new(protobuf, usize::MAX);
    let slices: Vec<&[u8]> = proto_payloads.iter().map(Vec::as_slice).collect();
    let (decoded, bad) = decoder.decode_each(&slices, |_| false);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(decoded.unwrap().num_rows(), rows);
    eprintln!(
        "kafka_decode: the Protobuf messages are {:.0} bytes each on average",
        slices.iter().map(|p| p.len()).sum::<usize>() as f64 / rows as f64
    );
    group.bench_with_input(BenchmarkId::new("protobuf", rows), &rows, |b, _| {
        b.iter(|| decoder.decode_each(&slices, |_| false).0.unwrap());
    });
    group.finish();
}

/// Generated view events as plain Protobuf messages, and the format that reads them.
fn protobuf_view_events(
    rows: usize,
) -> (
    Arc<sluice_connectors::protobuf::ProtobufFormat>,
    Vec<Vec<u8>>,
) {
    use sluice_connectors::protobuf::{
        ProtobufConfig, ProtobufEncoder, ProtobufFormat, ProtobufSinkConfig,
    };
    const PROTO: &str = r#"syntax = "proto3";
package bench;
import "google/protobuf/timestamp.proto";
message View {
  int64 user_id = 1; int64 title_id = 2; string event_type = 3; string device = 4;
  string country = 5; int32 watch_seconds = 6; int32 bitrate_kbps = 7;
  google.protobuf.Timestamp event_time = 8;
}"#;
    let dir = std::env::temp_dir().join(format!("sluice-bench-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("views.proto"), PROTO).unwrap();
    let batch = generator(None).partition(0).generate(rows).unwrap();
    let records = ColumnSelection::default().apply(&batch.batch).unwrap();
    let sink = ProtobufSinkConfig {
        schema: dir.join("views.proto"),
        message: "bench.View".into(),
        include: Vec::new(),
        schema_registry: None,
        subject: None,
        subject_strategy: Default::default(),
    };
    let mut encoder = ProtobufEncoder::open(&sink, "views", &records.schema()).unwrap();
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(encoder.encode(&records, &mut out, &mut ends, &mut refused))
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let mut start = 0;
    let payloads = ends
        .iter()
        .map(|end| {
            let p = out[start..*end].to_vec();
            start = *end;
            p
        })
        .collect();
    let format = ProtobufFormat::open(&ProtobufConfig {
        schema: dir.join("views.proto"),
        message: "bench.View".into(),
        include: Vec::new(),
        schema_registry: None,
    })
    .unwrap();
    (Arc::new(format), payloads)
}

/// Generated view events as Confluent-framed Avro messages, and the format that reads them
/// (reader schema = writer schema, id 1, known without a registry).
fn avro_view_events(rows: usize) -> (Arc<sluice_connectors::avro::AvroFormat>, Vec<bytes::Bytes>) {
    use arrow_avro::schema::{AvroSchema, FingerprintStrategy};
    use arrow_avro::writer::{WriterBuilder, format::AvroSoeFormat};
    let batch = generator(None).partition(0).generate(rows).unwrap();
    let records = ColumnSelection::default().apply(&batch.batch).unwrap();
    let schema = records.schema();
    let mut encoder = WriterBuilder::new(schema.as_ref().clone())
        .with_fingerprint_strategy(FingerprintStrategy::Id(1))
        .build_encoder::<AvroSoeFormat>()
        .unwrap();
    encoder.encode(&records).unwrap();
    let payloads = encoder.flush().iter().collect();
    let avsc = AvroSchema::try_from(schema.as_ref()).unwrap().json_string;
    let dir = std::env::temp_dir().join(format!("sluice-bench-avro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("views.avsc"), &avsc).unwrap();
    let format = sluice_connectors::avro::AvroFormat::open(
        &sluice_connectors::avro::AvroConfig {
            schema: Some(dir.join("views.avsc")),
            schema_registry: sluice_connectors::avro::RegistryConfig::at("http://127.0.0.1:9"),
            subject: None,
        },
        &[],
    )
    .unwrap();
    assert!(format.add_writer(1, avsc));
    (Arc::new(format), payloads)
}

/// Kinesis records as the Kinesis Producer Library aggregates them (1,000 user records a
/// record), split into their user records and decoded: what the Kinesis source does with a
/// GetRecords page before the metadata columns.
fn bench_kinesis_decode(c: &mut Criterion) {
    use sluice_connectors::json::JsonDecoder;
    use sluice_connectors::kinesis::kpl;
    let rows = 8192usize;
    let payloads = view_event_payloads(rows);
    let keyed: Vec<(String, &[u8])> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("user-{}", i % 997), p.as_slice()))
        .collect();
    let aggregates: Vec<bytes::Bytes> = keyed
        .chunks(1000)
        .map(|chunk| {
            let records: Vec<(&str, &[u8])> = chunk.iter().map(|(k, p)| (k.as_str(), *p)).collect();
            bytes::Bytes::from(kpl::aggregate(&records))
        })
        .collect();
    let schema = Arc::new(sluice_connectors::generator::record_schema());
    let mut decoder = JsonDecoder::new(schema);
    let mut group = c.benchmark_group("kinesis_decode");
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_with_input(
        BenchmarkId::new("kpl_split_and_decode", rows),
        &rows,
        |b, _| {
            b.iter(|| {
                let users: Vec<_> = aggregates
                    .iter()
                    .flat_map(|a| kpl::deaggregate(a).unwrap())
                    .collect();
                decoder
                    .decode(users.iter().map(|(_, d)| d.as_ref()))
                    .unwrap()
            });
        },
    );
    group.finish();
}

/// One planned function stage, from its YAML (as under `stages:`), on `input`.
fn function_stage(
    rt: &tokio::runtime::Runtime,
    stage_yaml: &str,
    input: arrow::datatypes::SchemaRef,
) -> Box<dyn sluice_engine::stage::Stage> {
    let yaml = format!(
        "name: bench\nsource: {{ type: generator }}\nstages:\n{stage_yaml}\nsink: {{ type: null }}\n"
    );
    let config = sluice::config::parse(
        "bench.yaml",
        &yaml,
        &sluice_engine::config::yaml::ProcessEnv,
    )
    .unwrap_or_else(|p| panic!("{p}"));
    let mut problems = sluice_engine::config::Problems::new("bench.yaml");
    let planned = rt
        .block_on(sluice::plan::plan_stages(&config, input, &mut problems))
        .unwrap_or_else(|| panic!("{problems}"));
    let mut stage = planned[0].factory.create().unwrap();
    rt.block_on(stage.open(&StageContext::detached("bench")))
        .unwrap();
    stage
}

const USERS: usize = 100_000;

/// 8192 events of users drawn from `USERS`, with each user's 32-feature vector.
fn scoring_events(seed: u64) -> RecordBatch {
    use arrow::array::{Float32Builder, Int64Array, ListBuilder};
    let mut rng = fastrand::Rng::with_seed(seed);
    let taste = |user: u64| -> [f32; 32] {
        let mut r = fastrand::Rng::with_seed(user);
        std::array::from_fn(|_| r.f32() * 2.0 - 1.0)
    };
    let users: Vec<i64> = (0..8192).map(|_| rng.i64(1..=USERS as i64)).collect();
    let mut features = ListBuilder::new(Float32Builder::new());
    for &u in &users {
        features.values().append_slice(&taste(u as u64));
        features.append(true);
    }
    RecordBatch::try_from_iter([
        (
            "user_id",
            Arc::new(Int64Array::from(users)) as arrow::array::ArrayRef,
        ),
        ("features", Arc::new(features.finish()) as _),
    ])
    .unwrap()
}

fn bench_score(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.json");
    let mut rng = fastrand::Rng::with_seed(1);
    let content: Vec<serde_json::Value> = (0..1000)
        .map(|id| {
            let vector: Vec<f32> = (0..32).map(|_| rng.f32() * 2.0 - 1.0).collect();
            serde_json::json!({ "id": id, "vector": vector, "popularity": rng.f32() })
        })
        .collect();
    let weights: Vec<f32> = (0..32).map(|_| rng.f32() + 0.5).collect();
    std::fs::write(
        &model,
        serde_json::json!({ "weights": weights, "content": content }).to_string(),
    )
    .unwrap();
    let batches: Vec<RecordBatch> = (0..8).map(scoring_events).collect();
    let stage_yaml = |cache: usize| {
        format!(
            "  - name: recommend\n    type: function\n    function: score\n    params: {{ model: \"{}\", user: user_id, features: features, k: 10, cache: {{ max_entries: {cache}, ttl: 1h }} }}",
            model.display()
        )
    };
    let ctx = StageContext::detached("recommend");
    let mut group = c.benchmark_group("score");
    group.throughput(Throughput::Elements(8192));
    for (name, cache) in [("generated", 0), ("cached", USERS)] {
        let mut stage = function_stage(&rt, &stage_yaml(cache), batches[0].schema());
        if cache > 0 {
            // Every user once, so that the timed loop measures the cached path.
            for batch in &batches {
                rt.block_on(stage.process_batch(batch.clone(), &ctx))
                    .unwrap();
            }
        }
        let mut i = 0;
        group.bench_function(
            BenchmarkId::new(name, "100k_users_1000_titles_32_features"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % batches.len();
                    rt.block_on(stage.process_batch(batches[i].clone(), &ctx))
                        .unwrap()
                });
            },
        );
    }
    group.finish();
}

/// A `redis-server` on a free loopback port for the bench, if one is installed.
struct BenchRedis(std::process::Child, u16);

impl BenchRedis {
    fn start() -> Option<BenchRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(BenchRedis(child, port))
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench_enrich(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("profiles.csv");
    let plans = ["basic", "standard", "premium"];
    let mut csv = String::from("user_id,plan,country,age\n");
    for user in 1..=USERS {
        csv.push_str(&format!(
            "{user},{},C{},{}\n",
            plans[user % 3],
            user % 50,
            18 + user % 60
        ));
    }
    std::fs::write(&table, csv).unwrap();
    let batches: Vec<RecordBatch> = (0..8)
        .map(|seed| {
            let events = scoring_events(seed);
            events.project(&[0]).unwrap()
        })
        .collect();
    let schema = batches[0].schema();
    let ctx = StageContext::detached("profile");
    let mut group = c.benchmark_group("enrich");
    group.throughput(Throughput::Elements(8192));
    let run = |group: &mut criterion::BenchmarkGroup<'_, _>,
               name: &str,
               stage_yaml: String,
               warm: bool| {
        let mut stage = function_stage(&rt, &stage_yaml, schema.clone());
        if warm {
            for batch in &batches {
                rt.block_on(stage.process_batch(batch.clone(), &ctx))
                    .unwrap();
            }
        }
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % batches.len();
                rt.block_on(stage.process_batch(batches[i].clone(), &ctx))
                    .unwrap()
            });
        });
    };
    run(
        &mut group,
        "file_table",
        format!(
            "  - name: profile\n    type: function\n    function: enrich\n    params: {{ key: user_id, file: {{ path: \"{}\" }} }}",
            table.display()
        ),
        false,
    );
    match BenchRedis::start() {
        Some(redis) => {
            let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.1)).unwrap();
            let mut conn = client.get_connection().unwrap();
            for chunk in (1..=USERS).collect::<Vec<_>>().chunks(10_000) {
                let mut pipe = redis::pipe();
                for user in chunk {
                    pipe.cmd("HSET")
                        .arg(format!("profile:{user}"))
                        .arg("plan")
                        .arg(plans[user % 3])
                        .arg("country")
                        .arg(format!("C{}", user % 50))
                        .arg("age")
                        .arg(18 + user % 60)
                        .ignore();
                }
                let () = pipe.query(&mut conn).unwrap();
            }
            let stage = |cache: usize| {
                format!(
                    "  - name: profile\n    type: function\n    function: enrich\n    params: {{ key: user_id, redis: {{ url: \"redis://127.0.0.1:{}\", key_prefix: \"profile:\" }}, columns: [{{ name: plan, type: utf8 }}, {{ name: country, type: utf8 }}, {{ name: age, type: int64 }}], cache: {{ max_entries: {cache}, ttl: 1h }} }}",
                    redis.1
                )
            };
            run(&mut group, "redis_cache_hits", stage(USERS), true);
            run(&mut group, "redis_cache_misses", stage(0), false);
        }
        None => eprintln!("enrich: no redis-server installed; the Redis cases are skipped"),
    }
    group.finish();
}

/// The aggregate stage on one partition: `RECORDS` events over `keys` distinct keys in one
/// tumbling window (so every key stays in state), count + sum + max, then the window's
/// emission. Memory only (no checkpoint store), as between checkpoints.
fn bench_aggregate(c: &mut Criterion) {
    use arrow::array::{Int64Array, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    const RECORDS: usize = 2_000_000;
    const BATCH: usize = 8192;
    let rt = runtime();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("n", DataType::Int64, false),
        Field::new("t", sluice_engine::batch::timestamp_type(), false),
    ]));
    let mut group = c.benchmark_group("aggregate");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    for keys in [1_000u64, 1_000_000] {
        let mut rng = fastrand::Rng::with_seed(keys);
        let batches: Vec<RecordBatch> = (0..RECORDS / BATCH)
            .map(|b| {
                let t0 = (b * BATCH) as i64;
                RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from_iter_values(
                            (0..BATCH).map(|_| rng.u64(0..keys) as i64),
                        )),
                        Arc::new(Int64Array::from_iter_values(
                            (0..BATCH).map(|_| rng.i64(0..1000)),
                        )),
                        Arc::new(
                            TimestampMillisecondArray::from_iter_values(
                                (0..BATCH as i64).map(|i| t0 + i),
                            )
                            .with_timezone("UTC"),
                        ),
                    ],
                )
                .unwrap()
            })
            .collect();
        let stage_yaml = "  - name: agg
    type: aggregate
    group_by: [key]
    event_time: t
    window: { tumbling: 1h }
    aggregates: { c: count(), s: sum(n), m: max(n) }
    state: { memory: 4GiB }";
        group.bench_function(
            BenchmarkId::new("tumbling_count_sum_max", format!("{keys}_keys")),
            |b| {
                b.iter_batched(
                    || function_stage(&rt, stage_yaml, schema.clone()),
                    |mut stage| {
                        rt.block_on(async {
                            let ctx = StageContext::detached("agg");
                            for batch in &batches {
                                stage.process_batch(batch.clone(), &ctx).await.unwrap();
                            }
                            stage.end_of_partition(&ctx).await.unwrap();
                            let mut rows = 0;
                            while let Some(out) = stage.pending(&ctx).await.unwrap() {
                                rows += out.num_rows();
                            }
                            assert!(rows as u64 <= keys);
                            stage
                        })
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_aggregate,
    bench_score,
    bench_enrich,
    bench_generator,
    bench_sql_stage,
    bench_pipeline,
    bench_kafka_decode,
    bench_kinesis_decode
);
criterion_main!(benches);
