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
    assert_eq!(
        rows.len() + letters.len(),
        messages.len(),
        "each message once"
    );
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

    assert_eq!(
        broker.committed(&group, &input, 0),
        rdkafka::Offset::Offset(messages.len() as i64),
        "the group is past every message"
    );
}

/// A record larger than the sink takes (librdkafka's `message.max.bytes`, 1,000,000 by
/// default) goes to the dead letters, and a dead letter larger than the dead-letter sink
/// takes is written with its payload cut, its whole size and checksum beside it: a record
/// near the limit never stops the run (it used to, on every restart).
#[test]
fn records_larger_than_a_sink_takes_become_dead_letters_cut_to_fit() {
    const SIZE: usize = 1_000_500;
    let broker = Broker::start();
    let (input, output, dlq) = (broker.name("in"), broker.name("out"), broker.name("dlq"));
    for topic in [&input, &output, &dlq] {
        broker.create_topic(topic, 1);
    }
    // Valid, but its row is larger than the sink's producer takes.
    let valid = format!(r#"{{"id": 1000, "country": "{}"}}"#, "v".repeat(SIZE - 30));
    let mut valid = valid.into_bytes();
    valid.resize(SIZE, b' ');
    // Not a record of the schema: a dead letter from the source, as large.
    let invalid = format!(
        r#"{{"id": "nope", "country": "{}"}}"#,
        "w".repeat(SIZE - 32)
    );
    let mut invalid = invalid.into_bytes();
    invalid.resize(SIZE, b' ');
    assert_eq!((valid.len(), invalid.len()), (SIZE, SIZE));
    let mut messages: Vec<(i32, Option<String>, Vec<u8>)> = (0..100)
        .map(|i| {
            (
                0,
                None,
                format!(r#"{{"id":{i},"country":"fr"}}"#).into_bytes(),
            )
        })
        .collect();
    messages.insert(30, (0, None, valid));
    messages.insert(60, (0, None, invalid.clone()));
    broker.produce(&input, &messages);

    let dir = tempfile::tempdir().unwrap();
    let group = broker.name("g");
    let yaml = format!(
        r#"name: oversized
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 20
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: country, type: utf8 }}
  options:
    session.timeout.ms: "6000"
stages:
  - name: shape
    type: sql
    query: SELECT id, country, _offset FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
dead_letter:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {dlq}
checkpoint:
  dir: {ckpt}
  interval: 300ms
"#,
        bootstrap = broker.bootstrap,
        ckpt = dir.path().join("ckpt").display(),
    );
    let mut sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    let out = broker.read_messages(&output, 100, Duration::from_secs(90));
    assert_eq!(out.len(), 100, "{}", sluice.log_text());
    let letters = broker.read_messages(&dlq, 2, Duration::from_secs(30));
    assert_eq!(letters.len(), 2, "{}", sluice.log_text());
    std::thread::sleep(Duration::from_secs(1));
    assert!(sluice.running(), "{}", sluice.log_text());
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let by_stage = |stage: &str| {
        letters
            .iter()
            .find(|l| l.headers["stage"] == stage)
            .unwrap()
    };
    let refused = by_stage("sink");
    assert!(
        refused.headers["error"].contains("message.max.bytes"),
        "{:?}",
        refused.headers
    );
    assert_eq!(refused.headers["offset"], "30");
    assert_eq!(refused.headers["payload_cut"], "true");
    let whole: usize = refused.headers["payload_size"].parse().unwrap();
    assert!(whole > SIZE - 100, "{whole}");
    assert!(refused.payload.len() < 1_000_000);
    assert!(refused.payload.starts_with(br#"{"id":1000,"country":"vvv"#));

    let undecoded = by_stage("source");
    assert_eq!(undecoded.headers["offset"], "60");
    assert_eq!(undecoded.headers["payload_cut"], "true");
    assert_eq!(undecoded.headers["payload_size"], SIZE.to_string());
    assert_eq!(
        undecoded.headers["payload_checksum"],
        format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&invalid))
    );
    assert!(invalid.starts_with(&undecoded.payload));

    assert_eq!(
        broker.committed(&group, &input, 0),
        rdkafka::Offset::Offset(102),
        "the group is past both"
    );
}
