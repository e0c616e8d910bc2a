//! `sluice dlq replay --to-topic`: a dead letter goes back to a topic with the key, headers
//! and bytes its record came with, whatever bytes they are, from a Kafka dead-letter topic
//! and from dead-letter files alike.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use super::{Broker, Sluice, write_pipeline};

/// A message as a topic holds it: key, headers in order, value.
type Message = (Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>, Vec<u8>);

/// Records that do not decode, with keys and headers a text form would change: bytes that
/// are not UTF-8, a name twice, a null value, names the dead letters' own headers use.
fn bad_messages() -> Vec<Message> {
    let header = |name: &str, value: Option<&[u8]>| (name.to_string(), value.map(<[u8]>::to_vec));
    vec![
        (
            Some(vec![0xff, 0x00, 0x01]),
            vec![
                header("trace", Some(b"t1")),
                header("bin", Some(&[0xff, 0xfe])),
                header("trace", None),
                header("stage", Some(b"forged")),
                header("headers", Some(b"9")),
            ],
            b"\xff not JSON".to_vec(),
        ),
        (None, Vec::new(), br#"{"id": "x"}"#.to_vec()),
        (
            Some(b"plain".to_vec()),
            vec![header("headers", Some(b"7"))],
            b"nope".to_vec(),
        ),
        // Larger than the dead-letter topic below takes: cut there, so never replayed
        // from it (its bytes would not be the record's).
        (Some(vec![0x80]), Vec::new(), vec![b'x'; 20_000]),
    ]
}

fn produce(broker: &Broker, topic: &str, messages: &[Message]) {
    let producer = broker.producer();
    for (key, headers, value) in messages {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic)
            .partition(0)
            .payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if !headers.is_empty() {
            let mut owned = OwnedHeaders::new();
            for (name, value) in headers {
                owned = owned.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            record = record.headers(owned);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn pipeline(broker: &Broker, input: &str, kind: &str, dir: &Path, dead_letter: &str) -> String {
    format!(
        r#"name: replay-to-topic
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  schema:
    - {{ name: id, type: int64, nullable: false }}
  options:
    session.timeout.ms: "6000"
sink:
  type: file
  path: {out}
  max_file_age: 200ms
dead_letter:
{dead_letter}
"#,
        bootstrap = broker.bootstrap,
        group = broker.name(kind),
        out = dir.join("out").display(),
    )
}

#[test]
fn a_replayed_dead_letter_has_the_key_headers_and_bytes_its_record_came_with() {
    const GOOD: usize = 50;
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, 1);
    let bad = bad_messages();
    let mut messages: Vec<Message> = (0..GOOD)
        .map(|i| (None, Vec::new(), format!(r#"{{"id":{i}}}"#).into_bytes()))
        .collect();
    for (i, m) in bad.iter().enumerate() {
        messages.insert(10 * i + 5, m.clone());
    }
    produce(&broker, &input, &messages);

    let dlq_topic = broker.name("dlq");
    broker.create_topic(&dlq_topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("dlq");
    let kinds = [
        (
            "topic",
            format!(
                "  type: kafka\n  bootstrap_servers: {}\n  topic: {dlq_topic}\n  \
                 options: {{ message.max.bytes: \"10000\" }}",
                broker.bootstrap
            ),
        ),
        (
            "files",
            format!(
                "  type: file\n  path: {}\n  max_file_age: 200ms",
                files.display()
            ),
        ),
    ];
    for (kind, dead_letter) in kinds {
        let run = dir.path().join(kind);
        std::fs::create_dir_all(&run).unwrap();
        let yaml = write_pipeline(&run, &pipeline(&broker, &input, kind, &run, &dead_letter));
        let mut sluice = Sluice::start(&yaml, run.join("log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let written = || match kind {
            "topic" => broker
                .read_messages(&dlq_topic, bad.len(), Duration::from_millis(500))
                .len(),
            _ if files.exists() => crate::read_lines(&files).len(),
            _ => 0,
        };
        while written() < bad.len() || crate::read_lines(&run.join("out")).len() < GOOD {
            assert!(
                sluice.running() && Instant::now() < deadline,
                "{kind}: {}",
                sluice.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (status, log) = sluice.interrupt();
        assert!(status.success(), "{log}");

        let back = broker.name(&format!("back-{kind}"));
        broker.create_topic(&back, 1);
        let replay = crate::sluice(&["dlq", "replay", yaml.to_str().unwrap(), "--to-topic", &back]);
        let said = format!(
            "{}{}",
            crate::text(&replay.stdout),
            crate::text(&replay.stderr)
        );
        assert!(replay.status.success(), "{kind}: {said}");
        // The cut one stays in the dead letters, said so; the rest go back as they came.
        let expected: Vec<&Message> = match kind {
            "topic" => {
                assert!(said.contains("1 dead letter left out"), "{said}");
                assert!(said.contains("its payload was cut"), "{said}");
                bad[..3].iter().collect()
            }
            _ => bad.iter().collect(),
        };
        assert!(
            said.contains(&format!(
                "replayed {} dead letters to topic",
                expected.len()
            )),
            "{kind}: {said}"
        );
        let read = broker.read_messages(&back, expected.len(), Duration::from_secs(30));
        let read: Vec<Message> = read
            .into_iter()
            .map(|m| (m.key_bytes, m.header_list, m.payload))
            .collect();
        let expected: Vec<Message> = expected.into_iter().cloned().collect();
        assert_eq!(read, expected, "{kind}");
    }
}

/// With `key_format: bytes`, `_key` holds a key's bytes as they are, and a sink keyed by
/// it (renamed: metadata columns do not reach a sink) sends them on unchanged (as text, `ff 00 01` would become `ef bf bd 00 01`).
#[test]
fn a_binary_key_goes_through_unchanged_with_key_format_bytes() {
    let broker = Broker::start();
    let (input, output) = (broker.name("in"), broker.name("out"));
    broker.create_topic(&input, 1);
    broker.create_topic(&output, 1);
    let keys: Vec<Option<Vec<u8>>> = vec![
        Some(vec![0xff, 0x00, 0x01]),
        Some(b"text".to_vec()),
        None,
        Some(vec![0x00, 0x00, 0x00, 0x00, 0x07, 0xc8, 0x01]),
    ];
    let messages: Vec<Message> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.clone(),
                Vec::new(),
                format!(r#"{{"id":{i}}}"#).into_bytes(),
            )
        })
        .collect();
    produce(&broker, &input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"name: binary-keys
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  key_format: bytes
  schema:
    - {{ name: id, type: int64, nullable: false }}
stages:
  - name: keep
    type: sql
    query: SELECT id, _key AS k FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
  key: k
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("g"),
    );
    let sluice = Sluice::start(&write_pipeline(dir.path(), &yaml), dir.path().join("log"));
    let out = broker.read_messages(&output, keys.len(), Duration::from_secs(60));
    assert_eq!(out.len(), keys.len(), "{}", sluice.log_text());
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let got: Vec<Option<Vec<u8>>> = out.iter().map(|m| m.key_bytes.clone()).collect();
    assert_eq!(got, keys);
    let first: serde_json::Value = serde_json::from_slice(&out[0].payload).unwrap();
    assert_eq!(first, serde_json::json!({"id": 0, "k": "ff0001"}));
}
