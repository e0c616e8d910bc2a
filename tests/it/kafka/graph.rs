//! One read, two outputs (a Kafka topic and files): nothing lost on either across kills,
//! and an output whose broker stops answering holds the other back.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    Broker, Sluice, by_id, events, missing_ids, moments, produce_paced, run_and_kill_9,
    source_yaml, write_pipeline,
};

/// The complete files' rows of a file output (not the one being written).
fn file_rows(dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_str().unwrap().starts_with('.') {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            rows.push(serde_json::from_str(line).unwrap());
        }
    }
    rows
}

/// Every line in the directory, the file being written included.
fn lines_written(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .map(|text| text.lines().count())
            .sum()
    })
}

/// Kafka in; `enrich` to a topic, and its rows with `doubled > 100` (ids with `id % 100 >=
/// 50`) to files.
fn graph_yaml(broker: &Broker, input: &str, output: &str, files: &Path, ckpt: &Path) -> String {
    format!(
        r#"name: kafka-graph
{source}stages:
  - name: enrich
    type: sql
    query: SELECT id, user_id, upper(country) AS country, amount * 2 AS doubled FROM input
  - name: big
    type: sql
    query: SELECT id, doubled FROM input WHERE doubled > 100
sinks:
  topic:
    input: enrich
    type: kafka
    bootstrap_servers: {bootstrap}
    topic: {output}
  files:
    input: big
    type: file
    path: {files}
    format: jsonl
checkpoint:
  dir: {ckpt}
  interval: 500ms
"#,
        source = source_yaml(broker, input, &broker.name("g")),
        bootstrap = broker.bootstrap,
        files = files.display(),
        ckpt = ckpt.display(),
    )
}

#[test]
fn kill_9_five_times_loses_nothing_on_either_output() {
    const N: usize = 40_000;
    const KILLS: usize = 5;
    let broker = Broker::start();
    let (input, output) = (broker.name("in"), broker.name("out"));
    broker.create_topic(&input, 4);
    broker.create_topic(&output, 2);
    let producer = produce_paced(&broker, &input, events(N, 4), 2_000);
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let pipeline = write_pipeline(
        dir.path(),
        &graph_yaml(&broker, &input, &output, &files, &dir.path().join("ckpt")),
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let waits = moments(seed, KILLS);
    run_and_kill_9(&pipeline, dir.path(), &waits);
    let last = super::start_last(&pipeline, dir.path());
    producer.join().unwrap();
    let want_files = (0..N as i64).filter(|i| i % 100 >= 50).count();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Everything there (duplicates make more messages than ids).
        let topic = broker.read_all(&output, usize::MAX, Duration::from_secs(5));
        let done_topic = by_id(&topic).0.len() >= N;
        let ids: std::collections::HashSet<i64> = file_rows(&files)
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        if done_topic && ids.len() >= want_files {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not everything arrived: {} ids in the topic, {} of {want_files} in the files",
            by_id(&topic).0.len(),
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, log) = last.interrupt();
    assert!(status.success(), "sluice failed: {log}");

    let topic = broker.read_all(&output, usize::MAX, Duration::from_secs(15));
    let (rows, counts) = by_id(&topic);
    let lost = missing_ids(&rows, 0..N as i64);
    assert!(
        lost.is_empty(),
        "lost in the topic: {lost:?} (kills after {waits:?})"
    );
    let mut in_files: HashMap<i64, usize> = HashMap::new();
    for r in file_rows(&files) {
        let id = r["id"].as_i64().unwrap();
        assert!(id % 100 >= 50, "a row the filter drops: {r}");
        assert_eq!(
            r["doubled"].as_f64().unwrap(),
            ((id % 100) as f64 + 0.5) * 2.0
        );
        *in_files.entry(id).or_default() += 1;
    }
    let lost = missing_ids(&in_files, (0..N as i64).filter(|i| i % 100 >= 50));
    assert!(
        lost.is_empty(),
        "lost in the files: {lost:?} (kills after {waits:?})"
    );
    let dup_topic: usize = counts.values().map(|c| c - 1).sum();
    let dup_files: usize = in_files.values().map(|c| c - 1).sum();
    // Each kill repeats at most what was read since the last checkpoint (500ms).
    let bound = KILLS * 10_000;
    eprintln!(
        "graph, kill -9 x{KILLS} after {waits:?}: {N} records, none lost on either output; duplicates: topic {dup_topic}, files {dup_files} (bound {bound})"
    );
    assert!(
        dup_topic <= bound && dup_files <= bound,
        "{dup_topic}/{dup_files} > {bound}"
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_frozen_output_holds_the_others_back_and_everything_arrives_after() {
    const N: u64 = 60_000;
    let broker = Broker::start();
    if broker.pid().is_none() {
        eprintln!("skipped: set KAFKA_BROKER_PID to freeze the broker at KAFKA_BOOTSTRAP");
        return;
    }
    let output = broker.name("out");
    broker.create_topic(&output, 2);
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    // A generator (not the frozen broker) feeds both outputs, 3,000 records a second.
    let yaml = format!(
        r#"name: frozen-output
source: {{ type: generator, partitions: 2, count: {N}, rate: 3000, batch_size: 500, batch_window: 50ms }}
stages:
  - name: rows
    type: sql
    query: SELECT _partition AS p, _offset AS o, user_id FROM input
sinks:
  topic: {{ type: kafka, bootstrap_servers: {bootstrap}, topic: {output}, input: rows }}
  files: {{ type: file, path: {files}, format: jsonl, input: rows }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
        bootstrap = broker.bootstrap,
        files = files.display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let mut sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    broker.read_all(&output, 3_000, Duration::from_secs(60));

    broker.freeze();
    // The next checkpoint's flush waits for the frozen broker; the sink task waits in it.
    std::thread::sleep(Duration::from_secs(3));
    let (lines_at_3s, rss_at_3s) = (lines_written(&files), rss_kib(sluice.pid()));
    std::thread::sleep(Duration::from_secs(7));
    let (lines_at_10s, rss_at_10s) = (lines_written(&files), rss_kib(sluice.pid()));
    assert!(sluice.running(), "sluice gave up:\n{}", sluice.log_text());
    broker.thaw();
    eprintln!(
        "topic frozen 10s: file output {lines_at_3s} lines at 3s, {lines_at_10s} at 10s; RSS {rss_at_3s} KiB, {rss_at_10s} KiB"
    );
    assert_eq!(
        lines_at_3s, lines_at_10s,
        "the file output went on while the topic's broker was frozen"
    );
    assert!(
        rss_at_10s < rss_at_3s + 20 * 1024,
        "memory grew while frozen: {rss_at_3s} KiB -> {rss_at_10s} KiB"
    );

    let status = sluice.wait(Duration::from_secs(120));
    assert!(status.success(), "sluice failed:\n{}", sluice.log_text());
    let key = |v: &Value| (v["p"].as_i64().unwrap(), v["o"].as_i64().unwrap());
    let topic: std::collections::HashSet<(i64, i64)> = broker
        .read_all(&output, usize::MAX, Duration::from_secs(15))
        .iter()
        .map(|m| key(&serde_json::from_str(m).unwrap()))
        .collect();
    let in_files: std::collections::HashSet<(i64, i64)> =
        file_rows(&files).iter().map(key).collect();
    assert_eq!(topic.len() as u64, N, "every record in the topic");
    assert_eq!(in_files.len() as u64, N, "every record in the files");
}
