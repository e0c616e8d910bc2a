//! Avro from Kafka through a schema registry: records written by the reference client
//! (confluent-kafka's AvroSerializer) with writer schemas that change mid-stream, read
//! into one reader schema without a restart; a writer schema that does not resolve sends
//! its records to the dead letters; a registry that stops answering is waited for.
//! Rows written as Avro by Sluice's Kafka sink are read back by the reference client's
//! AvroDeserializer.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Broker, Sluice, broker, write_pipeline};
use crate::{free_port, json_lines, root};

pub(crate) fn tools() -> PathBuf {
    root().join("tests/it/kafka/schema_tools.py")
}

/// Runs `schema_tools.py ARGS`; its stdout, or the test fails with its stderr.
pub(crate) fn tool(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(tools())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "schema_tools.py {} failed: {}",
        args[0],
        crate::text(&out.stderr)
    );
    crate::text(&out.stdout)
}

/// The test registry on a loopback port, killed when dropped.
pub(crate) struct Registry {
    child: Child,
    pub(crate) url: String,
}

impl Registry {
    pub(crate) fn start() -> Registry {
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
    tool(&[
        "produce",
        &broker.bootstrap,
        &registry.url,
        &topic,
        &N.to_string(),
    ]);

    // The registry stops answering before Sluice has fetched any writer schema: it waits.
    registry.signal(libc::SIGSTOP);
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &pipeline(&broker, &topic, &registry.url, dir.path()),
    );
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    std::thread::sleep(Duration::from_secs(10));
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
    super::wait_for_lines(&mut sluice, dir.path(), good, bad, Duration::from_secs(120));
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

/// 100,000 records of a schema with a nullable union, timestamps, a date, a decimal, a
/// nested record, an array, written by the reference producer, through the example
/// pipeline `pipelines/orders-avro.yaml` (a SQL stage adding a column), out as Avro (the schema derived from the columns and registered under `{topic}-value`),
/// read back by the reference consumer: every id once, every value equal. Malformed
/// messages on the same topic (wrong magic byte, an id the registry does not have, a
/// truncated value, an empty value, a tombstone) are dead letters naming their partition
/// and offset; nothing panics.
#[test]
fn avro_round_trip_of_100k_records_read_back_by_the_reference_consumer() {
    const N: usize = 100_000;
    let broker = Broker::start();
    let (input, output) = (broker.name("orders"), broker.name("orders-avro"));
    broker.create_topic(&input, 2);
    broker.create_topic(&output, 2);
    let registry = Registry::start();
    tool(&[
        "produce-rich",
        &broker.bootstrap,
        &registry.url,
        &input,
        &N.to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut sluice = Sluice::start_args(
        &root().join("pipelines/orders-avro.yaml"),
        dir.path().join("log"),
        &["--metrics-addr", &metrics],
        &[
            ("KAFKA_BOOTSTRAP", &broker.bootstrap),
            ("SCHEMA_REGISTRY", &registry.url),
            ("INPUT_TOPIC", &input),
            ("OUTPUT_TOPIC", &output),
            ("GROUP", &broker.name("g")),
            ("DEAD_LETTERS", "file"),
            ("DLQ_DIR", dir.path().join("dlq").to_str().unwrap()),
            ("CHECKPOINT_DIR", dir.path().join("ckpt").to_str().unwrap()),
        ],
    );
    let checked = Command::new("python3")
        .arg(tools())
        .args([
            "check",
            &broker.bootstrap,
            &registry.url,
            &output,
            &N.to_string(),
        ])
        .output()
        .unwrap();
    assert!(sluice.running(), "sluice stopped:\n{}", sluice.log_text());
    // Records per schema id on /metrics: the input's schema (the registry's id 1) decoded,
    // the output's (id 2) encoded, id 999 (unknown to the registry) refused.
    let records = |samples: &crate::Samples, id: &str, outcome: &str| {
        samples
            .iter()
            .find(|(name, labels, _)| {
                name == "sluice_schema_records_total"
                    && labels["schema_id"] == id
                    && labels["outcome"] == outcome
            })
            .map_or(0.0, |s| s.2)
    };
    let n = N as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let samples = loop {
        let samples = crate::scrape(&metrics).unwrap_or_default();
        if (
            records(&samples, "1", "decoded"),
            records(&samples, "2", "encoded"),
        ) == (n, n)
            && records(&samples, "999", "refused") == 1.0
        {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "schema metrics: {:?}",
            samples
                .iter()
                .filter(|s| s.0.starts_with("sluice_schema"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let value = |name: &str, outcome: Option<&str>| {
        samples
            .iter()
            .find(|(m, labels, _)| {
                m == name
                    && outcome.is_none_or(|o| labels.get("outcome").map(String::as_str) == Some(o))
            })
            .map_or(0.0, |s| s.2)
    };
    assert!(
        value("sluice_schema_registry_requests_total", Some("answered")) >= 2.0,
        "{samples:?}"
    );
    assert_eq!(
        value("sluice_schema_registry_requests_total", Some("refused")),
        1.0,
        "id 999"
    );
    // Messages whose writer schema was cached when read: all but the first chunks'.
    let hits = value("sluice_schema_cache_hits_total", None);
    assert!(hits >= n / 2.0 && hits <= n + 2.0, "{hits}");
    let (status, log) = sluice.interrupt();
    assert!(
        checked.status.success(),
        "the reference consumer: {}\n{log}",
        crate::text(&checked.stderr)
    );
    assert!(status.success(), "{log}");
    let said = crate::text(&checked.stdout);
    assert!(
        said.starts_with(&format!("checked {N} records, 0 duplicates, schema ids [")),
        "{said}"
    );
    let (ids, subject) = said.trim().split_once("; ").unwrap();
    let ids = ids.rsplit_once('[').unwrap().1.trim_end_matches(']');
    assert_eq!(
        ids,
        subject.rsplit_once(' ').unwrap().1,
        "messages framed with the one id registered under the topic's subject: {said}"
    );

    let letters = json_lines(&dir.path().join("dlq"));
    let mut by_key: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["source"], format!("{input}/0"), "{l}");
            assert_eq!(l["partition"], 0, "{l}");
            assert!(l["offset"].as_i64().unwrap() >= (N / 2) as i64, "{l}");
            (
                l["key"].as_str().unwrap_or_default().to_string(),
                l["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    by_key.sort();
    let keys: Vec<&str> = by_key.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "empty",
            "tombstone",
            "truncated",
            "unknown-id",
            "wrong-magic"
        ],
        "{by_key:?}"
    );
    let reason = |key: &str| by_key.iter().find(|(k, _)| k == key).unwrap().1.clone();
    assert!(
        reason("wrong-magic").contains("Confluent wire format"),
        "{by_key:?}"
    );
    assert!(reason("unknown-id").contains("schema id 999"), "{by_key:?}");
    assert!(reason("empty").contains("empty message"), "{by_key:?}");
    assert!(!reason("truncated").is_empty(), "{by_key:?}");
}

/// A sink with a given `.avsc` whose `user` has no null: rows with a null user are dead
/// letters of the sink naming the field, with their partition and offset; every other row
/// is on the topic, each once; none is both.
#[test]
fn rows_the_given_avro_schema_cannot_hold_are_dead_letters_of_the_sink() {
    const N: usize = 3_000;
    let broker = Broker::start();
    let output = broker.name("users-avro");
    broker.create_topic(&output, 1);
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("out.avsc"),
        r#"{"type": "record", "name": "Play", "fields": [
  {"name": "n", "type": "long"},
  {"name": "user", "type": "string"}
]}"#,
    )
    .unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            r#"name: avro-refusals
source: {{ type: generator, count: {N}, partitions: 2 }}
stages:
  - name: plays
    type: sql
    query: SELECT _partition, _offset, _offset AS n, CASE WHEN _offset % 10 = 0 THEN NULL ELSE 'u' END AS user FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
  format: avro
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
"#,
            bootstrap = broker.bootstrap,
            avsc = dir.path().join("out.avsc").display(),
            registry = registry.url,
            dlq = dir.path().join("dlq").display(),
        ),
    );
    let run = crate::sluice(&["run", path.to_str().unwrap()]);
    assert!(run.status.success(), "{}", crate::text(&run.stderr));
    let letters = json_lines(&dir.path().join("dlq"));
    let bad = N / 10;
    assert_eq!(letters.len(), bad, "{letters:?}");
    for l in &letters {
        assert_eq!(l["stage"], "sink", "{l}");
        assert!(
            l["error"]
                .as_str()
                .unwrap()
                .contains("`user` is null, and the writer schema has no null"),
            "{l}"
        );
        // The letter is the refused row (its index in the batch kept right).
        let offset = l["offset"].as_i64().unwrap();
        assert_eq!(offset % 10, 0, "{l}");
        let row: Value = serde_json::from_str(l["payload"].as_str().unwrap()).unwrap();
        assert_eq!(row["n"].as_i64(), Some(offset), "{l}");
    }
    let messages = broker.read_messages(&output, N - bad + 1, Duration::from_secs(20));
    assert_eq!(
        messages.len(),
        N - bad,
        "each good row once, none both refused and sent"
    );
    for m in &messages {
        assert_eq!(m.payload[0], 0, "Confluent framing");
        assert!(m.payload.ends_with(&[2, b'u']), "{:?}", m.payload);
    }
}

/// `sluice validate` asks the registry for each topic's subject and resolves its latest
/// version against the reader schema: a latest version the pipeline cannot read is a
/// problem at the `avro` key's line; no subject yet, or a registry that does not answer,
/// is a note (the file may be right). Protobuf sources likewise.
#[test]
fn validate_checks_declared_schemas_against_the_registrys_latest_versions() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("view.avsc"), READER).unwrap();
    let avro = write_pipeline(
        dir.path(),
        &format!(
            r#"name: avro-validate
source:
  type: kafka
  bootstrap_servers: 127.0.0.1:9
  topics: [views]
  group: g
  format: avro
  avro:
    schema: {avsc}
    schema_registry: {{ url: "{registry}" }}
sink: {{ type: stdout }}
"#,
            avsc = dir.path().join("view.avsc").display(),
            registry = registry.url,
        ),
    );
    let validate = |path: &Path| {
        let out = crate::sluice(&["validate", path.to_str().unwrap()]);
        (out.status.success(), crate::text(&out.stdout))
    };
    let (ok, said) = validate(&avro);
    assert!(
        ok && said.contains("note: the schema registry has no subject `views-value` yet"),
        "{said}"
    );

    tool(&["register", &registry.url, "views-value", "v2"]);
    let (ok, said) = validate(&avro);
    assert!(
        ok && !said.contains("note:"),
        "a compatible latest version: {said}"
    );

    tool(&["register", &registry.url, "views-value", "bad"]);
    let (ok, said) = validate(&avro);
    assert!(!ok, "{said}");
    assert!(
        said.contains("pipeline.yaml:9:"),
        "at the `avro` key's line: {said}"
    );
    assert!(
        said.contains("the registry's latest version of subject `views-value` (version 2)")
            && said.contains("does not resolve against the reader schema"),
        "{said}"
    );

    // Protobuf: a latest version whose `id` is a string.
    let proto = dir.path().join("proto.yaml");
    std::fs::write(
        &proto,
        format!(
            r#"name: proto-validate
source:
  type: kafka
  bootstrap_servers: 127.0.0.1:9
  topics: [orders]
  group: g
  format: protobuf
  protobuf:
    schema: {schema}
    message: shop.Order
    schema_registry: {{ url: "{registry}" }}
sink: {{ type: stdout }}
"#,
            schema = root().join("tests/it/kafka/proto/order.proto").display(),
            registry = registry.url,
        ),
    )
    .unwrap();
    tool(&["register", &registry.url, "orders-value", "proto-bad"]);
    let (ok, said) = validate(&proto);
    assert!(!ok, "{said}");
    assert!(
        said.contains("field 1 (`id` of shop.Order) is String"),
        "{said}"
    );

    // The registry gone: a note, not a problem.
    drop(registry);
    let (ok, said) = validate(&avro);
    assert!(ok && said.contains("did not answer"), "{said}");
}

/// Without `schema:`, the reader schema is the registry's latest version of the topic's
/// subject when the pipeline starts; a subject the registry does not have stops the start
/// with that said.
#[test]
fn without_a_schema_file_the_registrys_latest_version_is_the_reader_schema() {
    const N: usize = 2_000;
    let broker = Broker::start();
    let topic = broker.name("orders-latest");
    broker.create_topic(&topic, 2);
    let registry = Registry::start();
    tool(&[
        "produce-rich",
        &broker.bootstrap,
        &registry.url,
        &topic,
        &N.to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = |topic: &str| {
        format!(
            r#"name: avro-latest
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{topic}]
  group: {group}
  start_from: earliest
  format: avro
  avro:
    schema_registry: {{ url: "{registry}" }}
stages:
  - name: orders
    type: sql
    query: SELECT id, user, address.city AS city FROM input
sink: {{ type: file, path: {out}, format: jsonl }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
"#,
            bootstrap = broker.bootstrap,
            group = broker.name("g"),
            registry = registry.url,
            out = dir.path().join("out").display(),
            dlq = dir.path().join("dlq").display(),
        )
    };
    let missing = write_pipeline(dir.path(), &yaml("no-such-topic"));
    let out = crate::sluice(&["validate", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        crate::text(&out.stdout)
            .contains("has no subject `no-such-topic-value` to take the reader schema from"),
        "{}",
        crate::text(&out.stdout)
    );

    let path = write_pipeline(dir.path(), &yaml(&topic));
    let mut sluice = Sluice::start(&path, dir.path().join("log"));
    super::wait_for_lines(&mut sluice, dir.path(), N, 0, Duration::from_secs(90));
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let mut rows = json_lines(&dir.path().join("out"));
    rows.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(rows.len(), N);
    for (i, r) in rows.iter().enumerate() {
        let user = if i % 3 == 0 {
            Value::Null
        } else {
            Value::from(format!("user-{}\u{e9}", i % 97))
        };
        assert_eq!(
            (&r["user"], r["city"].as_str()),
            (&user, Some(["Berlin", "Paris", "Lagos"][i % 3])),
            "{r}"
        );
    }
}
