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
  type: kinesis
  {input}
  start_from: trim_horizon
  idle_wait: 200ms
  format: avro
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: orders
    type: sql
    query: SELECT *, CAST(cardinality(items) AS BIGINT) AS item_count FROM input
sink:
  type: kinesis
  {output}
  partition_key: id
  format: avro
  avro:
    schema_registry: {{ url: "{registry}" }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 1s }}
"#,
        input = k.yaml("orders").replace("\n    ", "\n  "),
        output = k.yaml("orders-enriched").replace("\n    ", "\n  "),
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
