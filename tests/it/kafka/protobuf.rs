//! Protobuf through a schema registry, both ways: messages written by the reference
//! client's ProtobufSerializer (nested messages, repeated fields, a oneof, an enum, a map,
//! proto3 optional, a Timestamp) read into columns, each value as written, and written
//! back as Protobuf that its ProtobufDeserializer reads equal to what was produced;
//! messages that are no `shop.Order` (another message of the file, an index path out of
//! range, an unknown schema id, a truncated body) are dead letters naming why.

use std::time::Duration;

use serde_json::{Value, json};

use super::avro::{Registry, tool};
use super::{Broker, Sluice, write_pipeline};
use crate::{json_lines, root};

/// What `proto_order(i)` in schema_tools.py wrote, as the file sink writes the row.
fn expected(i: i64) -> Value {
    let city = ["Berlin", "Paris", "Lagos"][(i % 3) as usize];
    let status = ["NEW", "PAID", "SHIPPED"][(i % 3) as usize];
    json!({
        "id": i,
        "user": if i % 3 == 0 { Value::Null } else { json!(format!("user-{}\u{e9}", i % 97)) },
        "at_ns": (1_767_225_600 + i) * 1_000_000_000 + (i % 1000) * 1000,
        "address": {"city": city,
                    "zip": if i % 5 == 0 { Value::Null } else { json!(10_000 + i) }},
        "items": (0..i % 4).collect::<Vec<_>>(),
        "card": if i % 2 == 1 { json!(format!("card-{i}")) } else { Value::Null },
        "voucher": if i % 2 == 0 { json!(format!("V{i}")) } else { Value::Null },
        "status": status,
        "counts": {"a": i % 7, "b": 1},
        "score": i as f64 / 8.0,
    })
}

#[test]
fn protobuf_round_trip_of_100k_orders_through_the_reference_client() {
    const N: usize = 100_000;
    let broker = Broker::start();
    let (topic, output) = (broker.name("orders-proto"), broker.name("orders-proto-out"));
    broker.create_topic(&topic, 2);
    broker.create_topic(&output, 2);
    let registry = Registry::start();
    tool(&[
        "produce-proto",
        &broker.bootstrap,
        &registry.url,
        &topic,
        &N.to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            r#"name: proto-in
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{topic}]
  group: {group}
  start_from: earliest
  format: protobuf
  protobuf:
    schema: {proto}
    message: shop.Order
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: orders
    type: sql
    query: SELECT id, user, at, address, items, card, voucher, status, counts, score FROM input
  - name: rows
    type: sql
    query: SELECT id, user, arrow_cast(at, 'Int64') AS at_ns, address, items, card, voucher, status, counts, score FROM input
sinks:
  rows: {{ type: file, path: {out}, format: jsonl, input: rows }}
  topic:
    input: orders
    type: kafka
    bootstrap_servers: {bootstrap}
    topic: {output}
    key: id
    format: protobuf
    protobuf:
      schema: {proto}
      message: shop.Order
      schema_registry: {{ url: "{registry}" }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
            bootstrap = broker.bootstrap,
            group = broker.name("g"),
            proto = root().join("tests/it/kafka/proto/order.proto").display(),
            registry = registry.url,
            out = dir.path().join("out").display(),
            dlq = dir.path().join("dlq").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    );
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    // The reference consumer reads the Protobuf output while it is written.
    let checked = tool(&[
        "check-proto",
        &broker.bootstrap,
        &registry.url,
        &output,
        &N.to_string(),
    ]);
    assert!(
        checked.starts_with(&format!("checked {N} records, 0 duplicates")),
        "{checked}"
    );
    let (ids, subject) = checked.trim().split_once("; ").unwrap();
    assert_eq!(
        ids.rsplit_once('[').unwrap().1.trim_end_matches(']'),
        subject.rsplit_once(' ').unwrap().1,
        "messages framed with the one id registered under the topic's subject: {checked}"
    );
    super::wait_for_lines(&mut sluice, dir.path(), N, 4, Duration::from_secs(120));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let mut rows = json_lines(&dir.path().join("out"));
    assert_eq!(rows.len(), N, "each message once");
    rows.sort_by_key(|r| r["id"].as_i64());
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row, &expected(i as i64));
    }
    let letters = json_lines(&dir.path().join("dlq"));
    let mut why: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_string(),
                l["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    why.sort();
    let keys: Vec<&str> = why.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["index-out-of-range", "refund", "truncated", "unknown-id"],
        "{why:?}"
    );
    assert!(why[0].1.contains("no message at index path [9]"), "{why:?}");
    assert!(
        why[1]
            .1
            .contains("the message is a shop.Refund, not a shop.Order"),
        "{why:?}"
    );
    assert!(why[2].1.contains("not a shop.Order"), "{why:?}");
    assert!(why[3].1.contains("schema id 999"), "{why:?}");
}
