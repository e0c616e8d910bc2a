//! Windowed aggregation over Kafka across kill -9: every window's result is written, and
//! any repeat is the same row again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Broker, Sluice, produce_paced, wait_assigned, write_pipeline};

const PARTITIONS: i32 = 4;
const COUNTRIES: [&str; 4] = ["de", "fr", "us", "jp"];
/// 2026-01-01T00:00:00Z in milliseconds.
const BASE: i64 = 1_767_225_600_000;
const WINDOW: i64 = 10_000;

/// Event `i`: on partition `i % 4`, 5ms of event time apart, up to 14ms out of order.
fn event(i: i64) -> (i32, Option<String>, Vec<u8>) {
    let country = COUNTRIES[((i / 7) % 4) as usize];
    let ts = BASE + i * 5 - (i % 3) * 7;
    let payload = format!(
        r#"{{"country":"{country}","amount":{},"ts":{ts}}}"#,
        i % 100
    );
    (
        (i % PARTITIONS as i64) as i32,
        Some(format!("k{i}")),
        payload.into_bytes(),
    )
}

/// What every window holds: (country, window start) → (events, sum, max, distinct amounts).
fn expected(n: i64) -> BTreeMap<(String, i64), (i64, i64, i64, i64)> {
    type Running = (i64, i64, i64, BTreeSet<i64>);
    let mut acc: BTreeMap<(String, i64), Running> = BTreeMap::new();
    for i in 0..n {
        let country = COUNTRIES[((i / 7) % 4) as usize].to_string();
        let ts = BASE + i * 5 - (i % 3) * 7;
        let amount = i % 100;
        let e = acc
            .entry((country, ts.div_euclid(WINDOW) * WINDOW))
            .or_insert((0, 0, i64::MIN, BTreeSet::new()));
        e.0 += 1;
        e.1 += amount;
        e.2 = e.2.max(amount);
        e.3.insert(amount);
    }
    acc.into_iter()
        .map(|(k, (c, s, m, d))| (k, (c, s, m, d.len() as i64)))
        .collect()
}

fn pipeline(
    broker: &Broker,
    input: &str,
    output: &str,
    group: &str,
    ckpt: &std::path::Path,
) -> String {
    format!(
        r#"name: agg-crash
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 500
  batch_window: 20ms
  schema:
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: int64 }}
    - {{ name: ts, type: int64 }}
  options:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
stages:
  - name: per_country
    type: aggregate
    group_by: [country]
    event_time: ts
    window: {{ tumbling: 10s }}
    allowed_lateness: 100ms
    aggregates:
      events: count()
      amount: sum(amount)
      highest: max(amount)
      amounts: count_distinct(amount)
  - name: flatten
    type: sql
    query: SELECT country, arrow_cast(window_start, 'Int64') AS start_ms, events, amount, highest, amounts FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
checkpoint:
  dir: {ckpt}
  interval: 300ms
"#,
        bootstrap = broker.bootstrap,
        ckpt = ckpt.display()
    )
}

/// Distinct output rows by (country, window start).
fn windows(payloads: &[String]) -> HashMap<(String, i64), BTreeSet<String>> {
    let mut by: HashMap<(String, i64), BTreeSet<String>> = HashMap::new();
    for p in payloads {
        let v: Value = serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}"));
        let key = (
            v["country"].as_str().unwrap().to_string(),
            v["start_ms"].as_i64().unwrap(),
        );
        by.entry(key).or_default().insert(p.clone());
    }
    by
}

#[test]
fn kill_9_during_an_aggregation_loses_no_window_and_changes_none() {
    const N: i64 = 36_000;
    const KILLS: usize = 3;
    let broker = Broker::start();
    let (input, output) = (broker.name("agg-in"), broker.name("agg-out"));
    broker.create_topic(&input, PARTITIONS);
    broker.create_topic(&output, 1);
    // Then one event an hour later on every partition: every real window closes.
    let mut messages: Vec<_> = (0..N).map(event).collect();
    for p in 0..PARTITIONS {
        let late = format!(r#"{{"country":"zz","amount":0,"ts":{}}}"#, BASE + 3_600_000);
        messages.push((p, None, late.into_bytes()));
    }
    let producer = produce_paced(&broker, &input, messages, 4_000);

    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline(
        &broker,
        &input,
        &output,
        &broker.name("g"),
        &dir.path().join("ckpt"),
    );
    let path = write_pipeline(dir.path(), &yaml);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = seed | 1;
    let mut waits = Vec::new();
    for i in 0..KILLS {
        let mut sluice = Sluice::start(&path, dir.path().join(format!("log{i}")));
        wait_assigned(&mut sluice, Duration::from_secs(60));
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = Duration::from_millis(300 + x % 2000);
        waits.push(wait);
        std::thread::sleep(wait);
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        sluice.kill9();
    }
    let last = Sluice::start(&path, dir.path().join("log-last"));
    producer.join().unwrap();

    let want = expected(N);
    let deadline = Instant::now() + Duration::from_secs(180);
    // The output is small (a row per country and window): read all of it until complete.
    let mut got = windows(&broker.read_all(&output, want.len(), Duration::from_secs(60)));
    while want.keys().any(|k| !got.contains_key(k)) && Instant::now() < deadline {
        got = windows(&broker.read_all(&output, usize::MAX, Duration::from_secs(3)));
    }
    let (status, log) = last.interrupt();
    assert!(status.success(), "sluice failed: {log}");
    let payloads = broker.read_all(&output, usize::MAX, Duration::from_secs(15));
    let got = windows(&payloads);

    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "windows never written, e.g. {missing:?} (kills after {waits:?}); last log:\n{log}"
    );
    for (key, (events, amount, highest, amounts)) in &want {
        let rows = &got[key];
        assert_eq!(
            rows.len(),
            1,
            "{key:?} was written with different results (kills after {waits:?}): {rows:?}"
        );
        let v: Value = serde_json::from_str(rows.first().unwrap()).unwrap();
        assert_eq!(
            (
                v["events"].as_i64(),
                v["amount"].as_i64(),
                v["highest"].as_i64(),
                v["amounts"].as_i64()
            ),
            (Some(*events), Some(*amount), Some(*highest), Some(*amounts)),
            "{key:?}"
        );
    }
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "windows that should not exist: {extra:?}");
    eprintln!(
        "kill -9 x{KILLS} after {waits:?}: {} windows, each once with the reference result; {} rows written in all",
        want.len(),
        payloads.len()
    );
}
