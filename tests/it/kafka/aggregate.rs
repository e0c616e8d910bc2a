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
/// The kill -9 test's windows (10s).
const WINDOW: i64 = 10_000;

/// Event `i`'s country: changing every 7 events, so that every partition has all four.
fn mixed(i: i64) -> &'static str {
    COUNTRIES[((i / 7) % 4) as usize]
}

/// Event `i`'s country when each partition has one of its own (the topic keyed by
/// country, as worker processes need for per-country results).
pub(super) fn by_partition(i: i64) -> &'static str {
    COUNTRIES[(i % PARTITIONS as i64) as usize]
}

/// Event `i`: on partition `i % 4`, 5ms of event time apart, up to 14ms out of order.
pub(super) fn event(i: i64, country: fn(i64) -> &'static str) -> (i32, Option<String>, Vec<u8>) {
    let country = country(i);
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
/// With tumbling windows of `window` milliseconds.
pub(super) fn expected(n: i64, country: fn(i64) -> &'static str, window: i64) -> Expected {
    type Running = (i64, i64, i64, BTreeSet<i64>);
    let mut acc: BTreeMap<(String, i64), Running> = BTreeMap::new();
    for i in 0..n {
        let country = country(i).to_string();
        let ts = BASE + i * 5 - (i % 3) * 7;
        let amount = i % 100;
        let e = acc
            .entry((country, ts.div_euclid(window) * window))
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
    window: i64,
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
    window: {{ tumbling: {window}ms }}
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
pub(super) fn windows(payloads: &[String]) -> HashMap<(String, i64), BTreeSet<String>> {
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
    let Aggregation {
        broker,
        output,
        dir,
        path,
        producer,
    } = Aggregation::start(N, mixed, 4_000, WINDOW);
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
    let last = super::start_last(&path, dir.path());
    producer.join().unwrap();

    let want = expected(N, mixed, WINDOW);
    wait_for_windows(&broker, &output, &want);
    let (status, log) = last.interrupt();
    assert!(status.success(), "sluice failed: {log}");
    let written = assert_each_window_once(
        &broker,
        &output,
        &want,
        &format!("kills after {waits:?}; last log:\n{log}"),
    );
    eprintln!(
        "kill -9 x{KILLS} after {waits:?}: {} windows, each once with the reference result; {written} rows written in all",
        want.len(),
    );
}

/// Two aggregates over one read (10 s and 20 s windows), each to its own topic: their
/// state is in the same checkpoints, so after kills at random moments every window of
/// both is written, each with the reference result.
#[test]
fn kill_9_with_two_aggregates_over_one_read_loses_no_window_on_either() {
    const N: i64 = 24_000;
    const KILLS: usize = 3;
    let (broker, (input, output), dir, yaml) = set_up(PARTITIONS, WINDOW);
    let wide = broker.name("agg-wide");
    broker.create_topic(&wide, 1);
    let second_branch = format!(
        r#"  - name: per_country_wide
    input: source
    type: aggregate
    group_by: [country]
    event_time: ts
    window: {{ tumbling: {}ms }}
    allowed_lateness: 100ms
    aggregates: {{ events: count(), amount: sum(amount), highest: max(amount), amounts: count_distinct(amount) }}
  - name: flatten_wide
    type: sql
    query: SELECT country, arrow_cast(window_start, 'Int64') AS start_ms, events, amount, highest, amounts FROM input
sinks:
  wide: {{ type: kafka, bootstrap_servers: {}, topic: {wide}, input: flatten_wide }}
sink:
  input: flatten
"#,
        2 * WINDOW,
        broker.bootstrap
    );
    let yaml = yaml.replacen("sink:\n", &second_branch, 1);
    let path = write_pipeline(dir.path(), &yaml);
    let producer = produce_paced(&broker, &input, messages(N, mixed), 4_000);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let waits = super::moments(seed, KILLS);
    super::run_and_kill_9(&path, dir.path(), &waits);
    let last = super::start_last(&path, dir.path());
    producer.join().unwrap();
    let (narrow_want, wide_want) = (expected(N, mixed, WINDOW), expected(N, mixed, 2 * WINDOW));
    wait_for_windows(&broker, &output, &narrow_want);
    wait_for_windows(&broker, &wide, &wide_want);
    let (status, log) = last.interrupt();
    assert!(status.success(), "sluice failed: {log}");
    let context = format!("kills after {waits:?}; last log:\n{log}");
    assert_each_window_once(&broker, &output, &narrow_want, &context);
    assert_each_window_once(&broker, &wide, &wide_want, &context);
    eprintln!(
        "two aggregates, kill -9 x{KILLS} after {waits:?}: {} and {} windows, each once with the reference result",
        narrow_want.len(),
        wide_want.len()
    );
}

/// A partition that stops sending holds windows back only until it is idle: then they come
/// out by themselves, with no further record to carry them out. (Before emission ran on a
/// timer, they waited for the next record of any partition; here, for ever.) What came out
/// so is in the next checkpoint although no offset moved: after a restart the window is
/// not emitted again, and a row for it sent meanwhile is late, not a second, different
/// result.
#[test]
fn windows_held_back_by_a_silent_partition_come_out_once_it_is_idle() {
    let (broker, (input, output), dir, yaml) = set_up(2, WINDOW);
    let yaml = yaml.replace(
        "    allowed_lateness: 100ms\n",
        "    allowed_lateness: 100ms\n    idle_timeout: 2s\n",
    );
    let path = write_pipeline(dir.path(), &yaml);
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    wait_assigned(&mut sluice, Duration::from_secs(60));
    let record = |partition: i32, country: &str, ms: i64| {
        let payload = format!(r#"{{"country":"{country}","amount":1,"ts":{}}}"#, BASE + ms);
        (partition, None, payload.into_bytes())
    };
    // Partition 1 sends in the first window only; partition 0 goes on into the third.
    broker.produce(
        &input,
        &[
            record(1, "fr", 1_000),
            record(1, "fr", 2_000),
            record(0, "de", 3_000),
            record(0, "de", 25_000),
        ],
    );
    let rows = broker.read_all(&output, 2, Duration::from_secs(30));
    let got = windows(&rows);
    let want = [("de".to_string(), BASE), ("fr".to_string(), BASE)];
    assert!(
        want.iter().all(|k| got.contains_key(k)) && got.len() == 2,
        "want the first window of both partitions, got {rows:?}\n{}",
        sluice.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    broker.produce(&input, &[record(1, "fr", 5_000)]);
    let mut sluice = Sluice::start(&path, dir.path().join("log2"));
    wait_assigned(&mut sluice, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(8));
    let rows = broker.read_all(&output, usize::MAX, Duration::from_secs(3));
    assert_eq!(
        rows.len(),
        2,
        "each window once, as first emitted: {rows:?}\n{}",
        sluice.log_text()
    );
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
}

/// The aggregation pipeline over a topic of its own, its `n` events being produced at
/// `per_second` (then the events that close every window).
pub(super) struct Aggregation {
    pub broker: Broker,
    pub output: String,
    pub dir: tempfile::TempDir,
    /// The pipeline file, checkpoints in `dir/ckpt`.
    pub path: std::path::PathBuf,
    pub producer: std::thread::JoinHandle<()>,
}

impl Aggregation {
    /// Tumbling windows of `window` milliseconds.
    pub fn start(
        n: i64,
        country: fn(i64) -> &'static str,
        per_second: usize,
        window: i64,
    ) -> Aggregation {
        let (broker, (input, output), dir, yaml) = set_up(PARTITIONS, window);
        let producer = produce_paced(&broker, &input, messages(n, country), per_second);
        let path = write_pipeline(dir.path(), &yaml);
        Aggregation {
            broker,
            output,
            dir,
            path,
            producer,
        }
    }
}

/// A broker with an input topic of `partitions` and an output topic, a directory, and the
/// aggregation pipeline over them (tumbling windows of `window` ms, checkpoints in
/// `dir/ckpt`).
fn set_up(partitions: i32, window: i64) -> (Broker, (String, String), tempfile::TempDir, String) {
    let broker = Broker::start();
    let (input, output) = (broker.name("agg-in"), broker.name("agg-out"));
    broker.create_topic(&input, partitions);
    broker.create_topic(&output, 1);
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline(
        &broker,
        &input,
        &output,
        &broker.name("g"),
        &dir.path().join("ckpt"),
        window,
    );
    (broker, (input, output), dir, yaml)
}

/// `n` events, then one an hour later on every partition: every real window closes.
fn messages(n: i64, country: fn(i64) -> &'static str) -> Vec<(i32, Option<String>, Vec<u8>)> {
    let mut messages: Vec<_> = (0..n).map(|i| event(i, country)).collect();
    for p in 0..PARTITIONS {
        let late = format!(r#"{{"country":"zz","amount":0,"ts":{}}}"#, BASE + 3_600_000);
        messages.push((p, None, late.into_bytes()));
    }
    messages
}

/// Reads the output until every window is there (the output is small: a row per country
/// and window), for up to three minutes.
pub(super) fn wait_for_windows(broker: &Broker, output: &str, want: &Expected) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut got = windows(&broker.read_all(output, want.len(), Duration::from_secs(60)));
    while want.keys().any(|k| !got.contains_key(k)) && Instant::now() < deadline {
        got = windows(&broker.read_all(output, usize::MAX, Duration::from_secs(3)));
    }
}

pub(super) type Expected = BTreeMap<(String, i64), (i64, i64, i64, i64)>;

/// Every window of `want` is in the output, each written as one distinct row (repeats of
/// it allowed) equal to the reference, and no other window; the rows written in all.
pub(super) fn assert_each_window_once(
    broker: &Broker,
    output: &str,
    want: &Expected,
    context: &str,
) -> usize {
    let payloads = broker.read_all(output, usize::MAX, Duration::from_secs(15));
    let got = windows(&payloads);
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "windows never written, e.g. {missing:?} ({context})"
    );
    for (key, (events, amount, highest, amounts)) in want {
        let rows = &got[key];
        assert_eq!(
            rows.len(),
            1,
            "{key:?} was written with different results: {rows:?} ({context})"
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
    payloads.len()
}
