//! Bad messages mixed into good ones: every bad one in the dead-letter sink with its reason
//! and original bytes, every good one in the output.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Broker, Sluice, write_pipeline};

fn lines(dir: &Path) -> Vec<Value> {
    if !dir.exists() {
        return Vec::new();
    }
    crate::read_lines(dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The n-th bad message: bad JSON, wrong types, truncated, binary garbage, empty.
fn bad(n: usize) -> Vec<u8> {
    match n % 5 {
        0 => format!(r#"{{"id": {n}, "country": "de""#).into_bytes(),
        1 => format!(r#"{{"id": "bad-{n}", "amount": 1.5}}"#).into_bytes(),
        2 => format!(r#"{{"id": {n}, "user_id": 3, "coun"#).into_bytes(),
        3 => {
            let mut b = vec![0xff, 0x00, 0x9c, 0x80];
            b.extend_from_slice(&(n as u64).to_le_bytes());
            b
        }
        _ => Vec::new(),
    }
}

#[test]
fn malformed_messages_among_good_ones_go_to_the_dead_letters() {
    const GOOD: usize = 100_000;
    const BAD: usize = 10_000;
    const PARTITIONS: i32 = 4;
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, PARTITIONS);
    let mut messages = Vec::with_capacity(GOOD + BAD);
    let mut bad_payloads = HashSet::new();
    let (mut g, mut b) = (0, 0);
    while g < GOOD || b < BAD {
        if b < BAD && (g % 10 == 0 || g >= GOOD) {
            let payload = bad(b);
            // Empty ones are all alike: count them apart.
            bad_payloads.insert(payload.clone());
            messages.push(((b as i32) % PARTITIONS, None, payload));
            b += 1;
        }
        if g < GOOD {
            let payload = format!(
                r#"{{"id":{g},"user_id":{},"country":"fr","amount":2.5}}"#,
                g % 77
            );
            messages.push(((g as i32) % PARTITIONS, None, payload.into_bytes()));
            g += 1;
        }
    }
    broker.produce(&input, &messages);

    let dir = tempfile::tempdir().unwrap();
    let (out, dlq) = (dir.path().join("out"), dir.path().join("dlq"));
    let yaml = format!(
        r#"name: mixed
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 1000
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: user_id, type: int64 }}
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: float64 }}
  options:
    session.timeout.ms: "6000"
stages:
  - name: shape
    type: sql
    query: SELECT id, upper(country) AS country FROM input
sink:
  type: file
  path: {out}
  max_file_age: 200ms
dead_letter:
  type: file
  path: {dlq}
  max_file_age: 200ms
checkpoint:
  dir: {ckpt}
  interval: 500ms
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("g"),
        out = out.display(),
        dlq = dlq.display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let mut sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    let deadline = Instant::now() + Duration::from_secs(180);
    while lines(&out).len() < GOOD || lines(&dlq).len() < BAD {
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        assert!(
            Instant::now() < deadline,
            "{} good, {} dead letters so far:\n{}",
            lines(&out).len(),
            lines(&dlq).len(),
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("10,000 records did not decode (dead-lettered)"),
        "{log}"
    );

    let good: HashMap<i64, usize> = lines(&out).iter().fold(HashMap::new(), |mut m, v| {
        assert_eq!(v["country"], "FR");
        *m.entry(v["id"].as_i64().unwrap()).or_default() += 1;
        m
    });
    assert_eq!(good.len(), GOOD, "every good record");
    assert!(good.values().all(|c| *c == 1), "once");
    let letters = lines(&dlq);
    assert_eq!(letters.len(), BAD, "every bad record, once");
    let mut seen = HashSet::new();
    for l in &letters {
        assert_eq!(l["stage"], "source");
        assert_eq!(l["error_class"], "decode");
        assert!(!l["error"].as_str().unwrap().is_empty());
        assert!(
            l["source"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{input}/"))
        );
        assert!(l["offset"].is_i64());
        let payload = match (&l["payload"], &l["payload_base64"]) {
            (Value::String(text), Value::Null) => text.as_bytes().to_vec(),
            (Value::Null, Value::String(b64)) => {
                sluice_engine::dead_letter::decode_base64(b64).unwrap()
            }
            other => panic!("payload {other:?}"),
        };
        assert!(bad_payloads.contains(&payload), "{l}");
        seen.insert(payload);
    }
    assert_eq!(
        seen.len(),
        bad_payloads.len(),
        "each bad payload kept as it was"
    );
    let reasons: HashSet<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("empty record")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("failed to parse")),
        "{reasons:?}"
    );
}

fn replay_pipeline(broker: &Broker, input: &str, dir: &Path, fixed: bool) -> String {
    let (country_nullable, bucket_key) = if fixed {
        ("true", "id")
    } else {
        ("false", "user_id")
    };
    format!(
        r#"name: replayable
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: user_id, type: int64 }}
    - {{ name: country, type: utf8, nullable: {country_nullable} }}
    - {{ name: amount, type: int64 }}
  options:
    session.timeout.ms: "6000"
stages:
  - name: shape
    type: sql
    query: SELECT id, user_id, country, amount, _offset FROM input
  - name: bucket
    type: function
    function: ab_bucket
    params: {{ key: {bucket_key}, experiment: e1, variants: {{ a: 50, b: 50 }} }}
sink:
  type: file
  path: {out}
  max_file_age: 200ms
dead_letter:
  type: file
  path: {dlq}
  max_file_age: 200ms
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("replay"),
        out = dir.join("out").display(),
        dlq = dir.join("dlq").display(),
    )
}

/// A field declared required that some producers leave out, and a stage keyed on a column
/// with nulls, send records to the dead letters; after the fix, `sluice dlq replay` puts
/// them through, each from where it failed.
#[test]
fn fixed_records_flow_again_with_dlq_replay() {
    const N: usize = 2_000;
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, 2);
    let messages: Vec<_> = (0..N)
        .map(|i| {
            let country = if i % 10 == 3 {
                ""
            } else {
                r#","country":"de""#
            };
            let user = if i % 10 == 7 {
                "null".to_string()
            } else {
                (i % 50).to_string()
            };
            let payload = format!(
                r#"{{"id":{i},"user_id":{user}{country},"amount":{}}}"#,
                i % 7
            );
            ((i % 2) as i32, Some(format!("k{i}")), payload.into_bytes())
        })
        .collect();
    broker.produce(&input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let (out, dlq) = (dir.path().join("out"), dir.path().join("dlq"));
    let v1 = write_pipeline(
        dir.path(),
        &replay_pipeline(&broker, &input, dir.path(), false),
    );
    let mut sluice = Sluice::start(&v1, dir.path().join("log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&out).len() < N * 8 / 10 || lines(&dlq).len() < N * 2 / 10 {
        assert!(
            sluice.running() && Instant::now() < deadline,
            "{} out, {} dead letters:\n{}",
            lines(&out).len(),
            lines(&dlq).len(),
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let inspect = crate::sluice(&["dlq", "inspect", v1.to_str().unwrap(), "--samples", "2"]);
    let table = crate::text(&inspect.stdout);
    assert!(inspect.status.success(), "{}", crate::text(&inspect.stderr));
    assert!(table.starts_with("400 dead letters\n"), "{table}");
    let row = |stage: &str, class: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([stage, class]))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    };
    assert_eq!(row("source", "decode").as_deref(), Some("200"), "{table}");
    assert_eq!(
        row("bucket", "permanent").as_deref(),
        Some("200"),
        "{table}"
    );

    // The fix: country may be missing, and the experiment is keyed on a column without nulls.
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v2, replay_pipeline(&broker, &input, dir.path(), true)).unwrap();
    let replay = crate::sluice(&["dlq", "replay", v2.to_str().unwrap()]);
    let said = crate::text(&replay.stdout);
    assert!(
        replay.status.success(),
        "{said}{}",
        crate::text(&replay.stderr)
    );
    assert!(
        said.contains("replayed 400 dead letters: 400 rows out, 0 failed again"),
        "{said}"
    );

    let ids: HashMap<i64, usize> = lines(&out).iter().fold(HashMap::new(), |mut m, v| {
        *m.entry(v["id"].as_i64().unwrap()).or_default() += 1;
        m
    });
    assert_eq!(ids.len(), N, "every record is in the output now");
    assert!(ids.values().all(|c| *c == 1));
    let seven = lines(&out).into_iter().find(|v| v["id"] == 7).unwrap();
    assert!(
        seven["user_id"].is_null() && seven["variant"].is_string(),
        "{seven}"
    );
}

/// A Kafka pipeline fed the hostile messages among good ones: each hostile one becomes a
/// row or a dead letter (the deep ones naming the nesting limit), every good one reaches
/// the output, the run ends cleanly, and the group's committed offset is past all of them.
#[test]
fn hostile_messages_are_dead_lettered_and_the_group_moves_past_them() {
    const GOOD: usize = 200;
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, 1);
    let hostile = crate::hostile::messages();
    let mut messages = Vec::new();
    for g in 0..GOOD {
        let payload = format!(r#"{{"id":{g},"country":"fr","amount":1.5}}"#);
        messages.push((0, None, payload.into_bytes()));
        if let Some(h) = hostile.get(g) {
            messages.push((0, None, h.clone()));
        }
    }
    broker.produce(&input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let (out, dlq) = (dir.path().join("out"), dir.path().join("dlq"));
    let group = broker.name("g");
    let yaml = format!(
        r#"name: hostile
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 50
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: float64 }}
  options:
    session.timeout.ms: "6000"
stages:
  - name: shape
    type: sql
    query: SELECT id, country FROM input
sink:
  type: file
  path: {out}
  max_file_age: 200ms
dead_letter:
  type: file
  path: {dlq}
  max_file_age: 200ms
checkpoint:
  dir: {ckpt}
  interval: 300ms
"#,
        bootstrap = broker.bootstrap,
        out = out.display(),
        dlq = dlq.display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let mut sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(&out).len() + lines(&dlq).len() < messages.len() {
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        assert!(
            Instant::now() < deadline,
            "{} rows, {} dead letters of {}:\n{}",
            lines(&out).len(),
            lines(&dlq).len(),
            messages.len(),
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A checkpoint after the last record commits the group past it.
    std::thread::sleep(Duration::from_secs(1));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let rows = lines(&out);
    let letters = lines(&dlq);
    assert_eq!(rows.len() + letters.len(), messages.len(), "each message once");
    let good: HashSet<i64> = rows
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .filter(|id| *id < GOOD as i64)
        .collect();
    assert_eq!(good.len(), GOOD, "every good record");
    let deep_letters = letters
        .iter()
        .filter(|l| l["error"].as_str().unwrap().contains("nesting limit"))
        .count();
    assert_eq!(deep_letters, 4, "the deep ones name the limit");
    for l in &letters {
        assert_eq!(l["error_class"], "decode", "{l}");
        assert!(l["error"].as_str().unwrap().len() < 1000, "a short reason");
    }

    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(&input, 0);
    let committed = rdkafka::consumer::Consumer::committed_offsets(
        &consumer,
        tpl,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        committed.elements()[0].offset(),
        rdkafka::Offset::Offset(messages.len() as i64),
        "the group is past every message"
    );
}
