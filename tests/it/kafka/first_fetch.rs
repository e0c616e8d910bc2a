//! A partition's start is known from its assignment, so its lag is too: a partition whose
//! first fetch is slow is not taken for an idle one while the others close its windows.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use sluice_connectors::kafka::{KafkaSource, KafkaSourceConfig};
use sluice_engine::source::{Assignment, Source};

use super::Broker;

/// 2026-01-01T00:00:00Z in milliseconds.
const BASE: i64 = 1_767_225_600_000;

fn source_yaml(bootstrap: &str, group: &str, start_from: &str, rest: &str) -> String {
    format!(
        r#"name: first-fetch
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [in]
  group: {group}
  start_from: {start_from}
  batch_size: 100
  schema:
    - {{ name: country, type: utf8 }}
    - {{ name: ts, type: int64 }}
{rest}"#
    )
}

/// Each partition's reader, as the source hands it out, says where it starts before it
/// reads a record: a new group's `earliest` at the log's start, `latest` at its end, and a
/// partition the group committed at the committed offset. (Before, a consumer group reading
/// a partition for the first time knew its start only from its first record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_s_start_is_known_at_its_assignment() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("in", 3, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let producer = Broker::with_bootstrap(&bootstrap);
    let messages: Vec<_> = (0..30)
        .map(|i| {
            (
                i % 3,
                None,
                format!(r#"{{"country":"de","ts":{i}}}"#).into_bytes(),
            )
        })
        .collect();
    tokio::task::spawn_blocking(move || producer.produce("in", &messages))
        .await
        .unwrap();
    // The group `committed` has an offset for partition 1 only.
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("in", 1, Offset::Offset(4))
        .unwrap();
    committer.commit(&tpl, CommitMode::Sync).unwrap();
    drop(committer);

    for (group, start_from, want) in [
        ("committed", "earliest", [0, 4, 0]),
        ("new", "earliest", [0, 0, 0]),
        ("newer", "latest", [10, 10, 10]),
    ] {
        let yaml = source_yaml(&bootstrap, group, start_from, "sink: { type: null }\n");
        let config = crate::parse(&yaml, &[]).unwrap();
        let kafka = config.source.spec_as::<KafkaSourceConfig>().unwrap();
        let mut source = KafkaSource::new(kafka.clone(), 100, false).unwrap();
        let mut starts = HashMap::new();
        while starts.len() < 3 {
            let next = tokio::time::timeout(Duration::from_secs(30), source.next_assignment())
                .await
                .expect("assigned within 30 s")
                .unwrap();
            if let Some(Assignment::Assign(reader)) = next {
                starts.insert(reader.info().name.to_string(), reader.start_offset());
            }
        }
        for (partition, want) in want.iter().enumerate() {
            assert_eq!(
                starts[&format!("in/{partition}")],
                Some(*want),
                "group {group}, start_from {start_from}, partition {partition}: {starts:?}"
            );
        }
        tokio::task::spawn_blocking(move || drop(source))
            .await
            .unwrap();
    }
}

/// Two partitions, each led by its own broker; the second broker answers every request
/// 2 s late, so partition 1's first records come seconds after its assignment (its start
/// looked up, then a fetch). It is silent for longer than `idle_timeout` meanwhile, but it
/// has records waiting: it must not count as idle, or partition 0 (already past the
/// window) closes the window without it and its rows are dropped as late. Every row of
/// both partitions is in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_first_fetch_is_slow_is_not_idle() {
    const SLOW: usize = 50;
    let mock = MockCluster::new(2).unwrap();
    mock.create_topic("in", 2, 1).unwrap();
    mock.partition_leader("in", 0, Some(1)).unwrap();
    mock.partition_leader("in", 1, Some(2)).unwrap();
    mock.coordinator(MockCoordinator::Group("g".into()), 1)
        .unwrap();
    let bootstrap = mock.bootstrap_servers();
    let record = |partition: i32, country: &str, ms: i64| {
        let payload = format!(r#"{{"country":"{country}","ts":{}}}"#, BASE + ms);
        (partition, None, payload.into_bytes())
    };
    let mut messages: Vec<_> = (0..SLOW as i64)
        .map(|i| record(1, "fr", 1_000 + i))
        .collect();
    messages.push(record(0, "de", 2_000));
    messages.push(record(0, "de", 25_000));
    let producer = Broker::with_bootstrap(&bootstrap);
    tokio::task::spawn_blocking(move || producer.produce("in", &messages))
        .await
        .unwrap();
    mock.broker_round_trip_time(2, Duration::from_secs(2))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let rest = format!(
        r#"stages:
  - name: per_country
    type: aggregate
    group_by: [country]
    event_time: ts
    window: {{ tumbling: 10s }}
    idle_timeout: 1s
    aggregates:
      events: count()
{}"#,
        super::jsonl_sink(&out)
    );
    let (stop, run) = super::spawn_run(
        crate::parse(&source_yaml(&bootstrap, "g", "earliest", &rest), &[]).unwrap(),
    );
    let read = || -> Vec<Value> {
        if !out.exists() {
            return Vec::new();
        }
        crate::read_lines(&out)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Both rows of the first window, or a row that turned up without the other's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read().len() < 2 && tokio::time::Instant::now() < deadline && !run.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A row written late would be a second row of the window: give it time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (stats, _) = run.await.unwrap().unwrap();
    let rows = read();
    let late = sluice_engine::stats::RunStats::get(&stats.stages[0].late_dropped);
    let mut counts: Vec<(&str, &str, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["country"].as_str().unwrap(),
                r["window_start"].as_str().unwrap(),
                r["events"].as_i64().unwrap(),
            )
        })
        .collect();
    counts.sort();
    assert_eq!(late, 0, "rows dropped as late; windows written: {rows:?}");
    let start = "2026-01-01T00:00:00Z";
    assert_eq!(
        counts,
        [("de", start, 1), ("fr", start, SLOW as i64)],
        "the first window of both partitions, complete, and no other: {rows:?}"
    );
}
