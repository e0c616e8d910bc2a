//! The example pipelines run on Kafka when the environment says so: the same file, with
//! `SOURCE=kafka SINK=kafka` picking the Kafka entries of its `sources:` and `sinks:`.

use std::collections::HashSet;
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
