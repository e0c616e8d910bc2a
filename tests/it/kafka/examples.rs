//! The example pipelines run on Kafka when the environment says so: the same file, with
//! `SOURCE=kafka SINK=kafka` picking the Kafka entries of its `sources:` and `sinks:`.

use std::collections::HashSet;

use arrow::array::Array;
use std::time::Duration;

use super::{Broker, Sluice, wait_for_output};
use crate::root;

#[test]
fn personalization_runs_from_topic_to_topic() {
    const N: usize = 5_000;
    let broker = Broker::start();
    let (input, output) = (broker.name("views"), broker.name("recommendations"));
    broker.create_topic(&input, 2);
    broker.create_topic(&output, 2);
    let events: Vec<(i32, Option<String>, Vec<u8>)> = (0..N)
        .map(|i| {
            let user = 1 + i % 2000;
            let payload = format!(
                r#"{{"user_id":{user},"title_id":{},"event_type":"play","device":"tv","country":"BR","watch_seconds":60,"bitrate_kbps":3000,"event_time":"2026-11-01T10:00:{:02}Z"}}"#,
                10_000 + i % 500,
                i % 60
            );
            ((user % 2) as i32, Some(user.to_string()), payload.into_bytes())
        })
        .collect();
    broker.produce(&input, &events);

    let dir = tempfile::tempdir().unwrap();
    let pipeline = root().join("pipelines/personalization.yaml");
    let group = broker.name("g");
    let sluice = Sluice::start_with(
        &pipeline,
        dir.path().join("log"),
        &[
            ("SOURCE", "kafka"),
            ("SINK", "kafka"),
            ("KAFKA_BOOTSTRAP", &broker.bootstrap),
            ("INPUT_TOPIC", &input),
            ("OUTPUT_TOPIC", &output),
            ("GROUP", &group),
        ],
    );
    let out = wait_for_output(&broker, &output, N, Duration::from_secs(120));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "sluice failed: {log}");
    assert!(out.len() >= N, "{} of {N} out; log:\n{log}", out.len());
    let mut users = HashSet::new();
    for payload in &out {
        let row: serde_json::Value = serde_json::from_str(payload).unwrap();
        let user = row["user_id"].as_i64().unwrap();
        users.insert(user);
        assert_eq!(
            row["recommendations"].as_array().unwrap().len(),
            10,
            "{row}"
        );
        let source = row["source"].as_str().unwrap();
        if user % 10 == 0 {
            assert_eq!(source, "fallback", "{row}");
        } else {
            assert!(source == "generated" || source == "cache", "{row}");
        }
    }
    assert_eq!(users.len(), 2000);
}

/// One read, three outputs: the raw events as Parquet, views per title to a topic, alerts
/// as JSON lines; each output checked against the raw events.
#[test]
fn views_fanout_writes_parquet_a_topic_and_alerts_from_one_read() {
    const N: usize = 20_000;
    let broker = Broker::start();
    let titles = broker.name("title-views");
    broker.create_topic(&titles, 2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let count = N.to_string();
    let mut sluice = Sluice::start_with(
        &root().join("pipelines/views-fanout.yaml"),
        dir.path().join("log"),
        &[
            ("COUNT", &count),
            ("KAFKA_BOOTSTRAP", &broker.bootstrap),
            ("TITLES_TOPIC", &titles),
            ("OUT_DIR", out.to_str().unwrap()),
            ("CHECKPOINT_DIR", dir.path().join("ckpt").to_str().unwrap()),
        ],
    );
    let status = sluice.wait(Duration::from_secs(180));
    assert!(status.success(), "sluice failed:\n{}", sluice.log_text());

    let raw = crate::nexmark::read_parquet(&out.join("raw"));
    let rows: usize = raw.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, N, "every event in the raw archive");
    let (mut binge, mut starved) = (0, 0);
    for batch in &raw {
        let column = |name: &str| {
            arrow::compute::cast(
                batch.column_by_name(name).unwrap(),
                &arrow::datatypes::DataType::Int64,
            )
            .unwrap()
        };
        let (watch, kbps) = (column("watch_seconds"), column("bitrate_kbps"));
        let watch = watch
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let kbps = kbps
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        for i in 0..batch.num_rows() {
            binge += usize::from(watch.is_valid(i) && watch.value(i) > 4500);
            starved += usize::from(kbps.is_valid(i) && kbps.value(i) < 300);
        }
    }
    let alerts = crate::json_lines(&out.join("alerts"));
    let reasons = |r: &str| alerts.iter().filter(|a| a["reason"] == r).count();
    assert!(
        binge > 0 && starved > 0,
        "the events hold alerts of both kinds"
    );
    assert_eq!((reasons("binge"), reasons("starved")), (binge, starved));
    // Views per title and minute add up to every event.
    let views: i64 = broker
        .read_all(&titles, usize::MAX, Duration::from_secs(10))
        .iter()
        .map(|m| {
            serde_json::from_str::<serde_json::Value>(m).unwrap()["views"]
                .as_i64()
                .unwrap()
        })
        .sum();
    assert_eq!(views, N as i64, "views in the topic");
}
