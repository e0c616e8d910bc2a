//! Lag on /metrics and workers that follow it, against a real broker.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Broker, Sluice, events, wait_assigned, write_pipeline};
use crate::{Samples, SlowFunction, free_port, scrape};

/// The value of `name` whose labels include `labels`.
fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

/// What consumer group tools compute: per partition, the broker's high watermark minus the
/// group's committed offset (the whole partition when nothing is committed). The high
/// watermark is the one fetch responses carry: tansu's answer to the log end offset query
/// is off by up to a producer batch (see `fetched_high_watermark` in the Kafka source).
fn broker_lag(broker: &Broker, topic: &str, group: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let high = |p: i32| {
        let c = std::ffi::CString::new(topic).unwrap();
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: a live client, a C string and live out-pointers; reads librdkafka's cache.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                consumer.client().native_ptr(),
                c.as_ptr(),
                p,
                &mut low,
                &mut high,
            )
        };
        (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then_some((low, high))
    };
    // Fetch until every partition's fetch response has told its watermarks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..partitions).any(|p| high(p).is_none()) {
        assert!(
            Instant::now() < deadline,
            "no fetch response for every partition"
        );
        let _ = consumer.poll(Duration::from_millis(50));
    }
    (0..partitions)
        .map(|p| {
            let (low, high) = high(p).unwrap();
            let done = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            high - done
        })
        .collect()
}

/// Kafka `input` (records of [`super::events`]) → the slow function → Kafka `output`,
/// checkpoints every 300ms, then `scaling` (YAML, may be empty).
pub(super) fn pipeline(
    broker: &Broker,
    (input, output, group): (&str, &str, &str),
    dir: &Path,
    function: &SlowFunction,
    batch_size: usize,
    scaling: &str,
) -> String {
    format!(
        r#"name: scaling-test
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: {batch_size}
  batch_window: 100ms
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: user_id, type: int64 }}
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: float64 }}
  options:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
stages:
{stage}sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
checkpoint:
  dir: {checkpoint}
  interval: 300ms
{scaling}"#,
        bootstrap = broker.bootstrap,
        stage = function.stage_yaml("id"),
        checkpoint = dir.join("checkpoint").display(),
    )
}

/// Whether the samples give each partition `p` of `topic` the lag `lags[p]`.
fn lag_is(samples: &Samples, topic: &str, lags: &[i64]) -> bool {
    lags.iter().enumerate().all(|(p, lag)| {
        let partition = format!("{topic}/{p}");
        sample(
            samples,
            "sluice_partition_lag_records",
            &[("partition", &partition)],
        ) == Some(*lag as f64)
    })
}

/// Scrapes until `ok` holds for the samples, or panics after `timeout` with the last ones.
fn scrape_until(
    addr: &str,
    timeout: Duration,
    what: &str,
    mut ok: impl FnMut(&Samples) -> bool,
) -> Samples {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(samples) = scrape(addr) {
            if ok(&samples) {
                return samples;
            }
            last = Some(samples);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {timeout:?}; last scrape: {last:#?}");
}

#[test]
fn the_lag_on_metrics_is_the_brokers_log_end_minus_the_committed_offset() {
    let broker = Broker::start();
    let (input, output, group) = (broker.name("in"), broker.name("out"), broker.name("g"));
    broker.create_topic(&input, 4);
    broker.create_topic(&output, 1);
    let dir = tempfile::tempdir().unwrap();
    let function = SlowFunction::start(Duration::ZERO);
    let yaml = pipeline(
        &broker,
        (&input, &output, &group),
        dir.path(),
        &function,
        200,
        "",
    );
    let file = write_pipeline(dir.path(), &yaml);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut sluice = Sluice::start_args(
        &file,
        dir.path().join("log"),
        &["--metrics-addr", &addr],
        &[],
    );
    wait_assigned(&mut sluice, Duration::from_secs(60));
    let all = events(3000, 4);
    broker.produce(&input, &all[..1000]);
    assert_eq!(
        broker
            .read_all(&output, 1000, Duration::from_secs(60))
            .len(),
        1000
    );
    // Committed: the group has caught up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lags = broker_lag(&broker, &input, &group, 4);
        if lags.iter().all(|l| *l == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group's offsets never caught up: {lags:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The stage stops answering: what comes now is read but never committed.
    function.hold();
    broker.produce(&input, &all[1000..]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while function.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no request reached the held function"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let lags = broker_lag(&broker, &input, &group, 4);
    assert_eq!(lags.iter().sum::<i64>(), 2000, "{lags:?}");
    let samples = scrape_until(
        &addr,
        Duration::from_secs(20),
        "lag as the broker says",
        |s| lag_is(s, &input, &lags),
    );
    assert_eq!(sample(&samples, "sluice_lag_records", &[]), Some(2000.0));
    // The same broker state still (nothing committed meanwhile).
    assert_eq!(broker_lag(&broker, &input, &group, 4), lags);
    for name in [
        "sluice_records_in_total",
        "sluice_records_out_total",
        "sluice_workers",
        "sluice_workers_desired",
        "sluice_checkpoints_total",
        "sluice_checkpoint_duration_seconds_count",
        "sluice_checkpoint_state_bytes",
        "sluice_stage_rows_in_total",
        "sluice_stage_cold_start_seconds",
        "sluice_stage_batch_duration_seconds_bucket",
    ] {
        assert!(
            samples.iter().any(|(n, _, _)| n == name),
            "{name} is not on /metrics"
        );
    }
    assert_eq!(
        sample(&samples, "sluice_records_out_total", &[]),
        Some(1000.0),
        "records through the stage before it was held"
    );

    function.release();
    assert_eq!(
        broker
            .read_all(&output, 3000, Duration::from_secs(60))
            .len(),
        3000
    );
    scrape_until(
        &addr,
        Duration::from_secs(20),
        "no lag once everything is committed",
        |s| lag_is(s, &input, &[0; 4]),
    );
    assert_eq!(broker_lag(&broker, &input, &group, 4), vec![0; 4]);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
}

#[test]
fn workers_rise_with_the_backlog_and_fall_back_after_the_cooldown() {
    const N: usize = 200_000;
    const PARTITIONS: i32 = 8;
    let broker = Broker::start();
    let (input, output, group) = (broker.name("in"), broker.name("out"), broker.name("g"));
    broker.create_topic(&input, PARTITIONS);
    broker.create_topic(&output, 4);
    let dir = tempfile::tempdir().unwrap();
    // One worker does ~3,300 records/s through this stage; eight, ~26,000.
    let function = SlowFunction::start(Duration::from_millis(150));
    let scaling = "scaling:\n  min_workers: 1\n  max_workers: 8\n  lag_threshold: 4000\n  scale_down_cooldown: 5s\n  interval: 500ms\n";
    let yaml = pipeline(
        &broker,
        (&input, &output, &group),
        dir.path(),
        &function,
        500,
        scaling,
    );
    let file = write_pipeline(dir.path(), &yaml);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut sluice = Sluice::start_args(
        &file,
        dir.path().join("log"),
        &["--metrics-addr", &addr],
        &[("RUST_LOG", "warn,sluice_engine=info,sluice_connectors=info")],
    );
    wait_assigned(&mut sluice, Duration::from_secs(60));
    let before = scrape_until(&addr, Duration::from_secs(10), "metrics served", |s| {
        sample(s, "sluice_workers", &[]).is_some()
    });
    assert_eq!(
        sample(&before, "sluice_workers", &[]),
        Some(1.0),
        "one worker while idle"
    );

    let t0 = Instant::now();
    let producer = super::produce_paced(&broker, &input, events(N, PARTITIONS), 100_000);
    // (seconds, workers, desired, lag, records out)
    let mut timeline: Vec<(f64, f64, f64, f64, f64)> = Vec::new();
    let mut drained_at = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(
            Instant::now() < deadline,
            "not done in time: {:?}\n{}",
            &timeline[timeline.len().saturating_sub(20)..],
            sluice.log_text()
        );
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        if let Some(s) = scrape(&addr) {
            let get = |name| sample(&s, name, &[]).unwrap_or(f64::NAN);
            let row = (
                t0.elapsed().as_secs_f64(),
                get("sluice_workers"),
                get("sluice_workers_desired"),
                get("sluice_lag_records"),
                get("sluice_records_out_total"),
            );
            timeline.push(row);
            if row.4 >= N as f64 && drained_at.is_none() {
                drained_at = Some(row.0);
            }
            if drained_at.is_some() && row.1 == 1.0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    producer.join().unwrap();
    let samples = scrape(&addr).expect("metrics");
    let peak = timeline.iter().map(|r| r.1).fold(0.0, f64::max);
    eprintln!("timeline (s, workers, desired, lag, out):");
    for r in timeline.iter().step_by(4) {
        eprintln!("  {:6.1} {:2} {:2} {:8} {:8}", r.0, r.1, r.2, r.3, r.4);
    }
    assert_eq!(peak, 8.0, "workers never reached 8: {timeline:?}");
    let up = sample(
        &samples,
        "sluice_autoscaler_decisions_total",
        &[("direction", "up")],
    )
    .unwrap();
    let down = sample(
        &samples,
        "sluice_autoscaler_decisions_total",
        &[("direction", "down")],
    )
    .unwrap();
    assert!(up >= 1.0 && down >= 1.0, "decisions: {up} up, {down} down");
    // Down only after the cooldown: the first worker left at least the cooldown (5s) after
    // the lag last asked for 8, less what the samples' timing blurs (metrics published every
    // 1s, scraped every 0.25s, the autoscaler evaluating every 0.5s): 3s. Without the
    // cooldown a worker would leave within a second of the lag falling.
    let drained = drained_at.unwrap();
    let last_asked_eight = timeline
        .iter()
        .filter(|r| r.3 > 7.0 * 4000.0)
        .map(|r| r.0)
        .fold(0.0, f64::max);
    let first_below = timeline
        .iter()
        .skip_while(|r| r.1 < 8.0)
        .find(|r| r.1 < 8.0)
        .map(|r| r.0)
        .unwrap();
    assert!(
        first_below >= last_asked_eight + 3.0,
        "a worker left {:.1}s after the lag last asked for 8 (cooldown 5s)",
        first_below - last_asked_eight
    );
    let log = sluice.log_text();
    assert!(log.contains("autoscaler: scaling up"), "{log}");
    assert!(log.contains("scale_down_cooldown"), "{log}");

    // Nothing lost, nothing twice (no failure happened).
    let (written, distinct) = super::ids_written(&broker, &output, N);
    eprintln!("drained after {drained:.1}s; {up} decisions up, {down} down");
    assert_eq!(distinct, N, "records lost");
    assert_eq!(written, N, "duplicates without any failure");
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
}
