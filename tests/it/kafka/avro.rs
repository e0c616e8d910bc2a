//! Avro from Kafka through a schema registry: records written by the reference client
//! (confluent-kafka's AvroSerializer) with writer schemas that change mid-stream, read
//! into one reader schema without a restart; a writer schema that does not resolve sends
//! its records to the dead letters; a registry that stops answering is waited for.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Broker, Sluice, broker, write_pipeline};
use crate::{free_port, json_lines, root};

fn tools() -> PathBuf {
    root().join("tests/it/kafka/avro_tools.py")
}

/// The test registry on a loopback port, killed when dropped.
struct Registry {
    child: Child,
    url: String,
}

impl Registry {
    fn start() -> Registry {
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(tools())
            .args(["registry", &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the test registry");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the registry did not start");
        Registry {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn signal(&self, signal: i32) {
        broker::signal(self.child.id() as i32, signal);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pipeline's reader schema: `country` (with a default) that v1 lacks, `user` that v3
/// removed, `amount` a long that v3 writes as an int.
const READER: &str = r#"{"type": "record", "name": "View", "fields": [
  {"name": "id", "type": "long"},
  {"name": "user", "type": ["null", "string"], "default": null},
  {"name": "amount", "type": "long"},
  {"name": "country", "type": "string", "default": "??"}
]}"#;

fn pipeline(broker: &Broker, topic: &str, registry: &str, dir: &Path) -> String {
    std::fs::write(dir.join("view.avsc"), READER).unwrap();
    format!(
        r#"name: avro-in
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{topic}]
  group: {group}
  start_from: earliest
  format: avro
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: rows
    type: sql
    query: SELECT id, user, amount, country FROM input
sink: {{ type: file, path: {out}, format: jsonl }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
checkpoint: {{ dir: {ckpt}, interval: 500ms }}
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("g"),
        avsc = dir.join("view.avsc").display(),
        out = dir.join("out").display(),
        dlq = dir.join("dlq").display(),
        ckpt = dir.join("ckpt").display(),
    )
}

#[test]
fn avro_writer_schemas_change_mid_stream_and_an_incompatible_one_is_dead_lettered() {
    const N: i64 = 4_000;
    let broker = Broker::start();
    let topic = broker.name("avro");
    broker.create_topic(&topic, 2);
    let registry = Registry::start();
    let produced = Command::new("python3")
        .arg(tools())
        .args([
            "produce",
            &broker.bootstrap,
            &registry.url,
            &topic,
            &N.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        produced.status.success(),
        "the reference producer failed: {}",
        crate::text(&produced.stderr)
    );

    // The registry stops answering before Sluice has fetched any writer schema: it waits.
    registry.signal(libc::SIGSTOP);
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &pipeline(&broker, &topic, &registry.url, dir.path()),
    );
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        sluice.running(),
        "sluice gave up on the registry:\n{}",
        sluice.log_text()
    );
    assert!(
        json_lines(&dir.path().join("out")).is_empty(),
        "decoded without a schema"
    );
    registry.signal(libc::SIGCONT);

    let (good, bad) = ((N - N / 4) as usize, (N / 4) as usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while json_lines(&dir.path().join("out")).len() < good
        || json_lines(&dir.path().join("dlq")).len() < bad
    {
        assert!(
            sluice.running() && Instant::now() < deadline,
            "{} rows, {} dead letters:\n{}",
            json_lines(&dir.path().join("out")).len(),
            json_lines(&dir.path().join("dlq")).len(),
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");

    let rows = json_lines(&dir.path().join("out"));
    assert_eq!(rows.len(), good, "each record once");
    for r in &rows {
        let i = r["id"].as_i64().unwrap();
        assert_eq!(r["amount"].as_i64(), Some(i * 3), "{r}");
        let (user, country) = match i % 4 {
            0 => (Value::from(format!("u{}", i % 7)), "??"),
            1 => (Value::from(format!("u{}", i % 7)), "DE"),
            2 => (Value::Null, "FR"),
            _ => panic!("a record of the incompatible schema came through: {r}"),
        };
        assert_eq!(
            (&r["user"], r["country"].as_str()),
            (&user, Some(country)),
            "{r}"
        );
    }
    let letters = json_lines(&dir.path().join("dlq"));
    assert_eq!(letters.len(), bad);
    for l in &letters {
        let error = l["error"].as_str().unwrap();
        assert!(
            error.contains("schema id 4 does not resolve against the reader schema"),
            "{l}"
        );
        assert_eq!(l["stage"], "source");
    }
}
