//! Bad input stops the pipeline with a message naming topic, partition and offset; broker
//! errors are retried and outages waited for.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::{Broker, Sluice, jsonl_sink, pipeline_yaml, spawn_run, write_pipeline};

#[test]
fn malformed_messages_name_topic_partition_and_offset() {
    let mut huge = br#"{"id": 7, "country": ""#.to_vec();
    huge.resize(1 << 20, b'x'); // 1 MiB, never closed
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("notjson", b"hello world".to_vec(), ""),
        ("types", br#"{"id": "abc", "amount": 1.5}"#.to_vec(), "id"),
        ("empty", Vec::new(), "empty record"),
        ("huge", huge, ""),
        (
            "twovalues",
            br#"{"id": 1}{"id": 2}"#.to_vec(),
            "more than one JSON value",
        ),
    ];
    let broker = Broker::start();
    let output = broker.name("out");
    broker.create_topic(&output, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, payload, _) in &cases {
        let topic = broker.name(name);
        broker.create_topic(&topic, 1);
        let good = br#"{"id": 1, "user_id": 2, "country": "de", "amount": 1.0}"#.to_vec();
        broker.produce(
            &topic,
            &[
                (0, None, good.clone()),
                (0, None, good),
                (0, None, payload.clone()),
            ],
        );
        let case_dir = dir.path().join(name);
        std::fs::create_dir_all(&case_dir).unwrap();
        let yaml = pipeline_yaml(&broker, &topic, &output, &broker.name(name), None, "");
        runs.push((
            topic,
            Sluice::start(&write_pipeline(&case_dir, &yaml), case_dir.join("log")),
        ));
    }
    for ((topic, mut sluice), (name, _, reason)) in runs.into_iter().zip(&cases) {
        let status = sluice.wait(Duration::from_secs(90));
        let log = sluice.log_text();
        assert_eq!(status.code(), Some(1), "{name}: {log}");
        let origin = format!("bad record in topic `{topic}` partition 0 offset 2: ");
        assert!(log.contains(&origin), "{name}: want {origin:?} in:\n{log}");
        assert!(log.contains(reason), "{name}: want {reason:?} in:\n{log}");
        assert!(
            log.len() < 16 << 10,
            "{name}: the error quotes too much ({} bytes)",
            log.len()
        );
        assert!(!log.contains("panicked"), "{name}: {log}");
        let said = log
            .lines()
            .find(|l| l.contains("bad record"))
            .unwrap_or_default();
        eprintln!("{name}: {}", &said[..said.len().min(300)]);
    }
}

/// librdkafka's mock cluster: produce requests fail, then every broker goes down for two
/// seconds; the sink's producer retries and its flush waits, so every record arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_retries_broker_errors_and_waits_out_an_outage() {
    const N: usize = 20_000;
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("out", 2, 3).unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
    );
    let bootstrap = mock.bootstrap_servers();
    let yaml = format!(
        "name: mock
source:
  type: generator
  partitions: 2
  count: {N}
  rate: 10000
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: out
  metadata_columns: [_partition, _offset]
"
    );
    let outage = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for b in 1..=3 {
            mock.broker_down(b).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for b in 1..=3 {
            mock.broker_up(b).unwrap();
        }
    };
    let (run, ()) = tokio::join!(crate::run_yaml(&yaml, &[]), outage);
    let (stats, report) = run.unwrap();
    assert_eq!(
        sluice_engine::stats::RunStats::get(&stats.records_out),
        N as u64
    );
    assert!(
        report.sink.contains(&format!("{N} acknowledged")),
        "{}",
        report.sink
    );

    // The producer's retries may have written some records twice, so reading stops at N
    // distinct positions, not at N messages (which stopped short of the last ones).
    let reader = Broker::with_bootstrap(&bootstrap);
    let positions = tokio::task::spawn_blocking(move || {
        let mut positions = HashSet::new();
        let mut seen = 0;
        reader.read_messages_until("out", Duration::from_secs(60), |read| {
            for m in &read[seen..] {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                positions.insert((
                    v["_partition"].as_u64().unwrap(),
                    v["_offset"].as_u64().unwrap(),
                ));
            }
            seen = read.len();
            positions.len() >= N
        });
        positions
    })
    .await
    .unwrap();
    assert_eq!(positions.len(), N, "every generated record, once or more");
}

/// The source against the mock cluster: fetch errors and a two-second outage of every
/// broker in the middle of reading; the run goes on by itself and reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_rides_out_fetch_errors_and_an_outage() {
    const N: usize = 20_000;
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("in", 4, 3).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let producer = Broker::with_bootstrap(&bootstrap);
    let all = super::events(N, 4);
    let half = all[..N / 2].to_vec();
    tokio::task::spawn_blocking(move || producer.produce("in", &half))
        .await
        .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        r#"name: mock-source
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [in]
  group: g
  start_from: earliest
  batch_size: 1000
  schema:
    - {{ name: id, type: int64, nullable: false }}
{}"#,
        jsonl_sink(&out)
    );
    let (stop, run) = spawn_run(crate::parse(&yaml, &[]).unwrap());
    let count = |out: &std::path::Path| -> HashSet<i64> {
        if !out.exists() {
            return HashSet::new();
        }
        crate::read_lines(out)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    let wait_for = |want: usize| {
        let out = out.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while count(&out).len() < want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {want}",
                    count(&out).len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(N / 4).await;
    for b in 1..=3 {
        mock.broker_down(b).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for b in 1..=3 {
        mock.broker_up(b).unwrap();
    }
    let producer = Broker::with_bootstrap(&bootstrap);
    let rest = all[N / 2..].to_vec();
    tokio::task::spawn_blocking(move || producer.produce("in", &rest))
        .await
        .unwrap();
    wait_for(N).await;
    assert!(!run.is_finished(), "the run ended by itself");
    stop.cancel();
    let (stats, _) = run.await.unwrap().unwrap();
    assert_eq!(count(&out).len(), N);
    assert_eq!(
        sluice_engine::stats::RunStats::get(&stats.records_out),
        N as u64,
        "read once each"
    );
}
