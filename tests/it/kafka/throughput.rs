//! Kafka → Kafka throughput: Sluice (JSON decode, SQL, JSON encode, idempotent produce,
//! checkpoints) beside a raw rdkafka consume-and-produce loop on the same broker, in the
//! same run. Slow and machine-dependent, so it runs only with `SLUICE_KAFKA_BENCH=1`:
//!
//! ```text
//! SLUICE_KAFKA_BENCH=1 cargo test --release --test it kafka_to_kafka_throughput -- --nocapture
//! ```
//!
//! `SLUICE_KAFKA_BENCH_RECORDS` sets the record count (default 300,000). Both sides pay
//! the group join and the startup; both end when the last output is acknowledged (for
//! Sluice: when its group's committed offsets cover every input record, which happens
//! after the sink's acknowledgements, so the figure includes one checkpoint interval).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Broker, Sluice, events, pipeline_yaml, write_pipeline};

const PARTITIONS: i32 = 4;

#[test]
fn kafka_to_kafka_throughput_beside_raw_rdkafka() {
    if std::env::var("SLUICE_KAFKA_BENCH").is_err() {
        eprintln!("skipped: set SLUICE_KAFKA_BENCH=1 (see the module documentation)");
        return;
    }
    let n: usize = std::env::var("SLUICE_KAFKA_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, PARTITIONS);
    broker.create_topic(&broker.name("out-raw"), PARTITIONS);
    broker.create_topic(&broker.name("out-sluice"), PARTITIONS);
    let t0 = Instant::now();
    broker.produce(&input, &events(n, PARTITIONS));
    let produce = t0.elapsed();

    let raw = raw_loop(&broker, &input, &broker.name("out-raw"), n);

    let dir = tempfile::tempdir().unwrap();
    let group = broker.name("sluice");
    let yaml = pipeline_yaml(
        &broker,
        &input,
        &broker.name("out-sluice"),
        &group,
        Some(&dir.path().join("ckpt")),
        "",
    )
    .replace("interval: 500ms", "interval: 100ms");
    let t0 = Instant::now();
    let mut sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    let watcher = watcher(&broker, &group);
    loop {
        assert!(sluice.running(), "{}", sluice.log_text());
        if committed_total(&watcher, &input) >= n as i64 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "sluice too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    let engine = t0.elapsed();
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    eprintln!(
        "kafka throughput, {n} records of ~80 bytes, {PARTITIONS} partitions, broker at {}:\n  \
         test producer alone:           {:>9.0} records/s\n  \
         raw rdkafka consume+produce:   {:>9.0} records/s ({:.2}s)\n  \
         sluice kafka→sql→kafka:        {:>9.0} records/s ({:.2}s)\n  \
         sluice / raw:                  {:.2}",
        broker.bootstrap,
        rate(produce),
        rate(raw),
        raw.as_secs_f64(),
        rate(engine),
        engine.as_secs_f64(),
        rate(engine) / rate(raw)
    );
}

fn watcher(broker: &Broker, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", group)
        .create()
        .unwrap()
}

fn committed_total(consumer: &BaseConsumer, topic: &str) -> i64 {
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(c) => c
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum(),
        Err(_) => 0,
    }
}

/// Consumes `n` messages as a group member and produces each payload, unchanged, with the
/// same producer settings as Sluice's sink; returns the time until all are acknowledged.
fn raw_loop(broker: &Broker, input: &str, output: &str, n: usize) -> Duration {
    let t0 = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", broker.name("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[input]).unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let mut done = 0;
    while done < n {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            assert!(t0.elapsed() < Duration::from_secs(600), "raw loop too slow");
            continue;
        };
        let mut record =
            BaseRecord::<[u8], [u8]>::to(output).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        done += 1;
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    t0.elapsed()
}
