//! Debezium change events from Kafka: a table's snapshot, inserts, updates and deletes
//! (with tombstones), in both envelope forms, become one row each with `_op`; replaying
//! the rows per key gives the table's final state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::broker::Produced;
use super::{Broker, Sluice, write_pipeline};
use crate::json_lines;

/// When the first change event happened (ms since the epoch, on a 5 s window boundary).
const BASE_MS: i64 = 1_700_000_000_000;

/// The messages (partition, key, value), the final table by id, and the events per op.
type Changes = (
    Vec<Produced>,
    BTreeMap<i64, Value>,
    BTreeMap<&'static str, usize>,
);

/// The changes of a `customers(id, email, tier)` table as Debezium would write them:
/// every message (partition by id, key, value; an empty value is a tombstone), the final
/// table, and the number of events of each op.
fn changes(snapshot: i64, n: usize) -> Changes {
    let mut table: BTreeMap<i64, Value> = BTreeMap::new();
    let mut messages = Vec::new();
    let mut ops = BTreeMap::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut emit = |messages: &mut Vec<_>,
                    i: usize,
                    id: i64,
                    op: &'static str,
                    before: Value,
                    after: Value| {
        *ops.entry(op).or_insert(0) += 1;
        messages.push(event(i, id, op, before, after));
    };
    for id in 0..snapshot {
        let row = json!({"id": id, "email": format!("c{id}@shop"), "tier": "free"});
        emit(
            &mut messages,
            id as usize,
            id,
            "r",
            Value::Null,
            row.clone(),
        );
        table.insert(id, row);
    }
    for i in 0..n {
        // Event times go on from the snapshot's, 10 ms apart.
        let seq = snapshot as usize + i;
        let id = (next() % (snapshot as u64 * 3 / 2)) as i64;
        match table.get(&id).cloned() {
            None => {
                let row = json!({"id": id, "email": format!("new{i}@shop"), "tier": "free"});
                emit(&mut messages, seq, id, "c", Value::Null, row.clone());
                table.insert(id, row);
            }
            Some(old) if next() % 10 < 7 => {
                let tier = ["free", "plus", "pro"][(next() % 3) as usize];
                let row = json!({"id": id, "email": format!("u{i}@shop"), "tier": tier});
                emit(&mut messages, seq, id, "u", old, row.clone());
                table.insert(id, row);
            }
            Some(old) => {
                // Replica identity default: the before image holds the key only.
                emit(
                    &mut messages,
                    seq,
                    id,
                    "d",
                    json!({"id": old["id"], "email": null, "tier": null}),
                    Value::Null,
                );
                // The tombstone: a null value under the same key.
                messages.push(((id % 2) as i32, Some(format!("{{\"id\":{id}}}")), None));
                table.remove(&id);
            }
        }
    }
    (messages, table, ops)
}

/// One change event as Debezium's JSON converter writes it: half with the
/// `schema`/`payload` wrapper (`schemas.enable`), half without; the `i`th event happened
/// at `ts_ms` [`BASE_MS`] + 10 ms × `i`.
fn event(i: usize, id: i64, op: &str, before: Value, after: Value) -> Produced {
    let change = json!({"before": before, "after": after, "op": op, "ts_ms": BASE_MS + 10 * i as i64,
        "source": {"connector": "postgresql", "table": "customers"}});
    let value = if i.is_multiple_of(2) {
        json!({"schema": {"type": "struct"}, "payload": change})
    } else {
        change
    };
    (
        (id % 2) as i32,
        Some(format!("{{\"id\":{id}}}")),
        Some(value.to_string().into_bytes()),
    )
}

/// The rows (with `_partition`, `_offset`, `_key`) applied in order per partition: the
/// table they end in, and the rows per op. Each row's key is its message's, an update's
/// `_before` the state it replaced, a delete's row its before image.
fn replay(mut rows: Vec<Value>) -> (BTreeMap<i64, Value>, BTreeMap<String, usize>) {
    rows.sort_by_key(|r| (r["_partition"].as_i64(), r["_offset"].as_i64()));
    let mut seen = BTreeMap::new();
    let mut replayed: BTreeMap<i64, Value> = BTreeMap::new();
    for r in &rows {
        let op = r["_op"].as_str().unwrap().to_string();
        *seen.entry(op.clone()).or_insert(0) += 1;
        let id = r["id"].as_i64().unwrap();
        // Each row has its own message's metadata (the key Debezium gave the event).
        assert_eq!(r["_key"], format!("{{\"id\":{id}}}"), "{r}");
        let image = json!({"id": id, "email": r["email"], "tier": r["tier"]});
        match op.as_str() {
            "r" | "c" => {
                assert!(r["_before"].is_null(), "{r}");
                assert!(replayed.insert(id, image).is_none(), "{r}");
            }
            "u" => {
                // The before image is the state the update replaced.
                let before = replayed
                    .insert(id, image)
                    .expect("an update of a row there");
                assert_eq!(r["_before"], before, "{r}");
            }
            "d" => {
                assert!(replayed.remove(&id).is_some(), "{r}");
                assert!(
                    r["email"].is_null(),
                    "a delete's row is its before image: {r}"
                );
            }
            other => panic!("op {other}: {r}"),
        }
    }
    (replayed, seen)
}

/// The source of the JSON tests: `topic` from the start, the table's three columns.
fn json_source(broker: &Broker, topic: &str) -> String {
    format!(
        r#"source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{topic}]
  group: {group}
  start_from: earliest
  format: debezium
  schema:
    - {{ name: id, type: int64 }}
    - {{ name: email, type: utf8 }}
    - {{ name: tier, type: utf8 }}
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("g"),
    )
}

#[test]
fn debezium_changes_become_rows_and_replay_to_the_final_table() {
    let broker = Broker::start();
    let topic = broker.name("shop.public.customers");
    broker.create_topic(&topic, 2);
    let (mut messages, table, ops) = changes(400, 4_000);
    let events: usize = ops.values().sum();
    // Not change events (an empty value is no tombstone): dead letters naming why.
    let bad = [
        r#"{"op":"t","ts_ms":1}"#,
        r#"{"id":1,"email":"a row, not an event"}"#,
        "{",
        "",
    ];
    for b in bad {
        messages.push((0, Some("bad".into()), Some(b.as_bytes().to_vec())));
    }
    // Both partitions end with a tombstone: a read of nothing but it still moves the
    // partition past it (lag 0).
    for partition in 0..2 {
        messages.push((partition, Some(format!("{{\"id\":{partition}}}")), None));
    }
    broker.produce_values(&topic, &messages);

    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            r#"name: cdc
{source}stages:
  - name: changes
    type: sql
    query: SELECT _partition, _offset, _key, _op, id, email, tier, _before FROM input
sink: {{ type: file, path: {out}, format: jsonl, metadata_columns: [_partition, _offset, _key] }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
            source = json_source(&broker, &topic),
            out = dir.path().join("out").display(),
            dlq = dir.path().join("dlq").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    );
    let metrics = format!("127.0.0.1:{}", crate::free_port());
    let mut sluice = Sluice::start_args(
        &path,
        dir.path().join("log"),
        &["--metrics-addr", &metrics],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    super::wait_for_lines(
        &mut sluice,
        dir.path(),
        events,
        bad.len(),
        Duration::from_secs(120),
    );
    // Checkpoints commit both partitions to their ends, past the last tombstones.
    let lag = || {
        crate::scrape(&metrics).and_then(|samples| {
            samples
                .iter()
                .find(|(name, _, _)| name == "sluice_lag_records")
                .map(|s| s.2)
        })
    };
    while lag() != Some(0.0) {
        assert!(Instant::now() < deadline, "lag {:?}", lag());
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let rows = json_lines(&dir.path().join("out"));
    assert_eq!(
        rows.len(),
        events,
        "one row per change event; tombstones skipped"
    );
    let (replayed, seen) = replay(rows);
    let expected: BTreeMap<String, usize> = ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        replayed, table,
        "the replayed rows end in the table's final state"
    );

    let letters = json_lines(&dir.path().join("dlq"));
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), bad.len(), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("truncate")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("no `op`")), "{reasons:?}");
}

/// The same from Debezium's AvroConverter: Avro envelopes through a registry (the reader
/// schema the envelope's `.avsc`, the table its `after` record), written by the reference
/// AvroSerializer; null tombstones after each delete.
#[test]
fn debezium_avro_envelopes_replay_to_the_final_table() {
    let broker = Broker::start();
    let topic = broker.name("shop.public.customers-avro");
    broker.create_topic(&topic, 2);
    let registry = super::avro::Registry::start();
    let produced: Value = serde_json::from_str(&super::avro::tool(&[
        "produce-debezium",
        &broker.bootstrap,
        &registry.url,
        &topic,
        "3000",
    ]))
    .unwrap();
    let table: BTreeMap<i64, Value> = produced["table"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.clone()))
        .collect();
    let ops: BTreeMap<String, usize> = produced["ops"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
        .collect();
    let events: usize = ops.values().sum();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("envelope.avsc"),
        super::avro::tool(&["debezium-schema"]),
    )
    .unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            r#"name: cdc-avro
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{topic}]
  group: {group}
  start_from: earliest
  format: debezium
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: changes
    type: sql
    query: SELECT _partition, _offset, _key, _op, id, email, tier, _before FROM input
sink: {{ type: file, path: {out}, format: jsonl, metadata_columns: [_partition, _offset, _key] }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
            bootstrap = broker.bootstrap,
            group = broker.name("g"),
            avsc = dir.path().join("envelope.avsc").display(),
            registry = registry.url,
            out = dir.path().join("out").display(),
            dlq = dir.path().join("dlq").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    );
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    super::wait_for_lines(&mut sluice, dir.path(), events, 0, Duration::from_secs(120));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let rows = json_lines(&dir.path().join("out"));
    assert_eq!(
        rows.len(),
        events,
        "one row per change event; tombstones skipped"
    );
    assert!(json_lines(&dir.path().join("dlq")).is_empty());
    let (replayed, seen) = replay(rows);
    assert_eq!(seen, ops);
    assert_eq!(
        replayed, table,
        "the replayed rows end in the table's final state"
    );
}

/// Each key's latest state per window, counted: a tumbling aggregate keeps each customer's
/// last change in a 5 s window (`last(_op)`, `last(tier)`, `count()`), a SQL stage drops
/// those whose last change deleted them, and a second aggregate counts the customers left
/// per tier and window. The counts equal a reference computed here from the produced
/// events (the order of a key's events is its partition's).
#[test]
fn a_windowed_count_of_each_keys_latest_state_equals_the_reference() {
    const WINDOW_MS: i64 = 5_000;
    let broker = Broker::start();
    let topic = broker.name("shop.public.customers-windows");
    broker.create_topic(&topic, 2);
    let (mut messages, _, ops) = changes(400, 4_000);
    let events: usize = ops.values().sum();

    // The reference: per (window, id) the last op and tier and the number of changes;
    // then per (window start in s, tier) the customers not deleted and their changes.
    let mut latest: BTreeMap<(i64, i64), (String, Value, i64)> = BTreeMap::new();
    for (_, _, value) in &messages {
        let Some(value) = value else { continue };
        let v: Value = serde_json::from_slice(value).unwrap();
        let change = v.get("payload").unwrap_or(&v);
        let op = change["op"].as_str().unwrap().to_string();
        let image = if op == "d" {
            &change["before"]
        } else {
            &change["after"]
        };
        let window = change["ts_ms"].as_i64().unwrap().div_euclid(WINDOW_MS) * WINDOW_MS;
        let entry = latest
            .entry((window, image["id"].as_i64().unwrap()))
            .or_insert((String::new(), Value::Null, 0));
        *entry = (op, image["tier"].clone(), entry.2 + 1);
    }
    let mut reference: BTreeMap<(i64, String), (i64, i64)> = BTreeMap::new();
    for ((window, _), (op, tier, changes)) in &latest {
        if op != "d" {
            let counts = reference
                .entry((window / 1000, tier.as_str().unwrap().to_string()))
                .or_default();
            counts.0 += 1;
            counts.1 += changes;
        }
    }
    let windows = latest
        .keys()
        .map(|(w, _)| w)
        .collect::<std::collections::BTreeSet<_>>();
    assert!(windows.len() >= 8, "{windows:?}");

    // Two later events per partition close every window of the changes (the first
    // aggregate's last window, then the second's): the input is unbounded.
    let last = events + 1;
    for (n, seq) in [(0, last + 6_000), (1, last + 12_000)] {
        for partition in 0..2 {
            let id = 10_000_000 + 2 * n + partition;
            let row = json!({"id": id, "email": "flush@shop", "tier": "flush"});
            messages.push(event(seq, id, "c", Value::Null, row));
        }
    }
    broker.produce_values(&topic, &messages);

    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            r#"name: cdc-windows
{source}stages:
  - name: latest
    type: aggregate
    group_by: [id]
    event_time: _ts_ms
    window: {{ tumbling: 5s }}
    aggregates: {{ op: last(_op), tier: last(tier), changes: count() }}
  - name: live
    type: sql
    query: SELECT window_start, tier, changes FROM input WHERE op <> 'd'
  - name: per_tier
    type: aggregate
    group_by: [tier]
    event_time: window_start
    window: {{ tumbling: 5s }}
    aggregates: {{ customers: count(), changes: sum(changes) }}
  - name: shaped
    type: sql
    query: SELECT to_unixtime(window_start) AS start_s, tier, customers, changes FROM input WHERE tier <> 'flush'
sink: {{ type: file, path: {out}, format: jsonl }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
            source = json_source(&broker, &topic),
            out = dir.path().join("out").display(),
            dlq = dir.path().join("dlq").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    );
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    super::wait_for_lines(
        &mut sluice,
        dir.path(),
        reference.len(),
        0,
        Duration::from_secs(120),
    );
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let got: BTreeMap<(i64, String), (i64, i64)> = json_lines(&dir.path().join("out"))
        .iter()
        .map(|r| {
            (
                (
                    r["start_s"].as_i64().unwrap(),
                    r["tier"].as_str().unwrap().to_string(),
                ),
                (
                    r["customers"].as_i64().unwrap(),
                    r["changes"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        got.len(),
        json_lines(&dir.path().join("out")).len(),
        "one row per window and tier"
    );
    assert_eq!(got, reference);
}
