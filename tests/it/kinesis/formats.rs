//! Avro on Kinesis: records framed by the reference AvroSerializer (Confluent wire format,
//! the writer schema registered under `{stream}-value`) read by a Kinesis source, through
//! SQL, and written by a Kinesis sink as Avro that the reference AvroDeserializer reads.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::Kinesalite;
use crate::json_lines;
use crate::kafka::avro::{Registry, tool, tools};
use crate::kafka::{Sluice, write_pipeline};

/// The keys of a `source:` reading `stream` from its start (indented for a top-level key).
fn reading(k: &Kinesalite, stream: &str) -> String {
    format!(
        "{}\n  start_from: trim_horizon\n  idle_wait: 200ms",
        writing(k, stream)
    )
}

/// The keys of a `sink:` writing `stream`.
fn writing(k: &Kinesalite, stream: &str) -> String {
    format!(
        "type: kinesis\n  {}",
        k.yaml(stream).replace("\n    ", "\n  ")
    )
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn avro_records_go_through_kinesis_both_ways() {
    const N: usize = 5_000;
    let k = Kinesalite::with_streams(&[("orders", 2), ("orders-enriched", 2)]);
    let registry = Registry::start();
    let framed = tool(&["serialize-rich", &registry.url, "orders", &N.to_string()]);
    let mut records: Vec<(String, Vec<u8>)> = framed
        .lines()
        .enumerate()
        .map(|(i, hex)| (i.to_string(), from_hex(hex)))
        .collect();
    assert_eq!(records.len(), N);
    // Not one whole Avro value of a known schema: dead letters naming the shard.
    let last = records[N - 1].1.clone();
    let malformed = [
        ("wrong-magic", vec![1, 0, 0, 0, 1, 2]),
        ("unknown-id", vec![0, 0, 0, 3, 0xe7, 2, 4]),
        ("truncated", last[..last.len() / 2].to_vec()),
    ];
    for (key, data) in &malformed {
        records.push((key.to_string(), data.clone()));
    }
    k.kinesis.put("orders", &records);

    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"name: kinesis-avro
source:
  {input}
  format: avro
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: orders
    type: sql
    query: SELECT *, CAST(cardinality(items) AS BIGINT) AS item_count FROM input
sink:
  {output}
  partition_key: id
  format: avro
  avro:
    schema_registry: {{ url: "{registry}" }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 1s }}
"#,
        input = reading(&k, "orders"),
        output = writing(&k, "orders-enriched"),
        avsc = crate::root().join("pipelines/schemas/order.avsc").display(),
        registry = registry.url,
        dlq = dir.path().join("dlq").display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let path = write_pipeline(dir.path(), &yaml);
    let sluice = Sluice::start(&path, dir.path().join("log"));
    let out = k
        .kinesis
        .wait_for("orders-enriched", N, Duration::from_secs(180));
    // The malformed records came last: the run goes on until they are dead letters.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while json_lines(&dir.path().join("dlq")).len() < malformed.len()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let letters = json_lines(&dir.path().join("dlq"));
    assert!(
        out.len() >= N,
        "{} of {N} records written\n{log}",
        out.len()
    );

    // The reference deserializer reads every record back equal to what was produced.
    let mut check = Command::new("python3")
        .arg(tools())
        .args([
            "check-lines",
            &registry.url,
            "orders-enriched",
            &N.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = check.stdin.take().unwrap();
    for r in &out {
        let hex: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(stdin, "{}\t{hex}", r.key).unwrap();
    }
    drop(stdin);
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        crate::text(&checked.stdout),
        crate::text(&checked.stderr)
    );
    eprintln!("{}", crate::text(&checked.stdout));

    let mut keys: Vec<&str> = letters.iter().map(|l| l["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["truncated", "unknown-id", "wrong-magic"],
        "{letters:?}"
    );
    for l in &letters {
        let reason = l["error"].as_str().unwrap();
        assert!(reason.contains("stream `orders` shard"), "{reason}");
    }
}

/// Debezium's JSON envelopes on Kinesis: each change event one row with `_op`; an empty or
/// non-event record a dead letter.
#[test]
fn debezium_change_events_on_kinesis_become_rows() {
    let k = Kinesalite::with_streams(&[("customers", 2)]);
    let event = |op: &str, id: i64, before: serde_json::Value, after: serde_json::Value| {
        let change = serde_json::json!({"before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_000_i64 + id});
        (format!("{id}"), change.to_string().into_bytes())
    };
    let row = |id: i64, tier: &str| serde_json::json!({"id": id, "email": format!("c{id}@shop"), "tier": tier});
    let mut records = Vec::new();
    for id in 0..100 {
        records.push(event("r", id, serde_json::Value::Null, row(id, "free")));
    }
    for id in 0..50 {
        records.push(event("u", id, row(id, "free"), row(id, "pro")));
    }
    for id in 90..100 {
        records.push(event("d", id, row(id, "free"), serde_json::Value::Null));
    }
    records.push(("bad".into(), br#"{"op":"t","ts_ms":1}"#.to_vec()));
    k.kinesis.put("customers", &records);

    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"name: kinesis-cdc
source:
  {input}
  format: debezium
  schema:
    - {{ name: id, type: int64 }}
    - {{ name: email, type: utf8 }}
    - {{ name: tier, type: utf8 }}
stages:
  - name: changes
    type: sql
    query: SELECT _op, id, tier FROM input
sink: {{ type: file, path: {out}, format: jsonl }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
        input = reading(&k, "customers"),
        out = dir.path().join("out").display(),
        dlq = dir.path().join("dlq").display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let path = write_pipeline(dir.path(), &yaml);
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    crate::kafka::wait_for_lines(&mut sluice, dir.path(), 160, 1, Duration::from_secs(120));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let rows = json_lines(&dir.path().join("out"));
    let count = |op: &str, tier: Option<&str>| {
        rows.iter()
            .filter(|r| r["_op"] == op && tier.is_none_or(|t| r["tier"] == t))
            .count()
    };
    assert_eq!(
        (
            count("r", Some("free")),
            count("u", Some("pro")),
            count("d", None)
        ),
        (100, 50, 10),
        "{rows:?}"
    );
    let letters = json_lines(&dir.path().join("dlq"));
    assert!(
        letters[0]["error"].as_str().unwrap().contains("truncate"),
        "{letters:?}"
    );
}

/// Protobuf both ways on Kinesis (plain messages, no registry): rows written by a Kinesis
/// sink as `shop.View` messages, read back by a Kinesis source into the same columns.
#[test]
fn protobuf_records_go_through_kinesis_and_back() {
    const N: i64 = 3_000;
    let k = Kinesalite::with_streams(&[("views-pb", 2)]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("view.proto"),
        "syntax = \"proto3\";\npackage shop;\nmessage View {\n  int64 id = 1;\n  string user = 2;\n  optional double amount = 3;\n}\n",
    )
    .unwrap();
    let input: String = (0..N)
        .map(|i| match i % 3 {
            0 => format!("{{\"id\":{i},\"user\":\"u{}\",\"amount\":null}}\n", i % 7),
            _ => format!("{{\"id\":{i},\"user\":\"u{}\",\"amount\":{i}.5}}\n", i % 7),
        })
        .collect();
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    let proto = format!(
        "{{ schema: {}, message: shop.View }}",
        dir.path().join("view.proto").display()
    );
    let writer = write_pipeline(
        dir.path(),
        &format!(
            r#"name: kinesis-pb-out
source:
  type: file
  path: {input}
  format: jsonl
  schema:
    - {{ name: id, type: int64 }}
    - {{ name: user, type: utf8 }}
    - {{ name: amount, type: float64 }}
sink:
  {output}
  partition_key: id
  format: protobuf
  protobuf: {proto}
"#,
            input = dir.path().join("in.jsonl").display(),
            output = writing(&k, "views-pb"),
        ),
    );
    let out = crate::sluice(&["run", writer.to_str().unwrap()]);
    assert!(out.status.success(), "{}", crate::text(&out.stderr));

    let reader = dir.path().join("reader.yaml");
    std::fs::write(
        &reader,
        format!(
            r#"name: kinesis-pb-in
source:
  {input}
  format: protobuf
  protobuf: {proto}
sink: {{ type: file, path: {out}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
            input = reading(&k, "views-pb"),
            out = dir.path().join("out").display(),
            ckpt = dir.path().join("ckpt").display(),
        ),
    )
    .unwrap();
    let mut sluice = Sluice::start(&reader, dir.path().join("log"));
    crate::kafka::wait_for_lines(
        &mut sluice,
        dir.path(),
        N as usize,
        0,
        Duration::from_secs(120),
    );
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let mut rows = json_lines(&dir.path().join("out"));
    rows.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(rows.len(), N as usize);
    for (i, r) in rows.iter().enumerate() {
        let i = i as i64;
        assert_eq!(r["id"], i, "{r}");
        assert_eq!(r["user"], format!("u{}", i % 7), "{r}");
        match i % 3 {
            0 => assert!(r["amount"].is_null(), "unset optional: {r}"),
            _ => assert_eq!(r["amount"], i as f64 + 0.5, "{r}"),
        }
    }
}
