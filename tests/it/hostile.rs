//! Hostile input run the way a user runs Sluice: records that crash parsers in a file
//! pipeline (with and without a dead-letter sink) and hostile pipeline files. The process
//! must finish on its own terms: every record in the output or the dead letters, or a
//! clear error naming the record — never a signal (a stack overflow aborts with SIGABRT).
//! The decoders' own corpus and mutation runs are in `connectors/src/json/hostile.rs`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

/// The messages that crash parsers: deep nesting (the poison pill that overflowed the
/// stack on every restart), huge tokens, overflowing numbers, NaN, invalid UTF-8, lone
/// surrogates, duplicate keys, truncation. None holds a line break. Ids of the ones that
/// may decode are from 1,000,001.
pub fn messages() -> Vec<Vec<u8>> {
    let deep = "[".repeat(100_000);
    vec![
        format!("{deep}{}", "]".repeat(100_000)).into_bytes(),
        format!(r#"{{"id": 1000001, "extra": {deep}}}"#).into_bytes(),
        format!(r#"{{"id": 1000002, "country": {deep}}}"#).into_bytes(),
        r#"{"a":"#.repeat(100_000).into_bytes(),
        format!(r#"{{"id": {}}}"#, "9".repeat(100_000)).into_bytes(),
        format!(r#"{{"id": 1000003, "country": "{}"}}"#, "x".repeat(500_000)).into_bytes(),
        br#"{"id": 1000004, "amount": NaN}"#.to_vec(),
        br#"{"id": 1000005, "amount": 1e400}"#.to_vec(),
        br#"{"id": 9223372036854775808}"#.to_vec(),
        b"{\"id\": 1000006, \"country\": \"\xff\xfe\"}".to_vec(),
        br#"{"id": 1000007, "country": "\ud800"}"#.to_vec(),
        br#"{"id": 1000008, "id": 1000009}"#.to_vec(),
        br#"{"id": 1000010, "country": "fr""#.to_vec(),
    ]
}

/// How many of [`messages`] nest past the limit.
pub const DEEP: usize = 4;

/// Good records 0..good with a hostile one after each of the first ones, as JSON lines.
fn jsonl(good: usize) -> Vec<u8> {
    let hostile = messages();
    let mut out = Vec::new();
    for g in 0..good {
        out.extend_from_slice(format!(r#"{{"id":{g},"country":"fr","amount":1.5}}"#).as_bytes());
        out.push(b'\n');
        if let Some(h) = hostile.get(g) {
            out.extend_from_slice(h);
            out.push(b'\n');
        }
    }
    out
}

fn pipeline(dir: &Path, dead_letter: bool) -> std::path::PathBuf {
    let dlq = if dead_letter {
        format!(
            "dead_letter: {{ type: file, path: {} }}\n",
            dir.join("dlq").display()
        )
    } else {
        String::new()
    };
    let yaml = format!(
        r#"name: hostile
source:
  type: file
  path: {input}
  format: jsonl
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: float64 }}
stages:
  - name: shape
    type: sql
    query: SELECT id, country FROM input
sink: {{ type: file, path: {out} }}
{dlq}"#,
        input = dir.join("in.jsonl").display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("p.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn a_file_of_hostile_records_is_read_to_the_end_with_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), jsonl(100)).unwrap();
    let run = crate::sluice(&["run", pipeline(dir.path(), true).to_str().unwrap()]);
    let said = format!("{}{}", crate::text(&run.stdout), crate::text(&run.stderr));
    assert_eq!(run.status.signal(), None, "killed by a signal: {said}");
    assert!(run.status.success(), "{said}");
    let rows = crate::json_lines(&dir.path().join("out"));
    let letters = crate::json_lines(&dir.path().join("dlq"));
    assert_eq!(rows.len() + letters.len(), 100 + messages().len(), "{said}");
    let good = rows.iter().filter(|r| r["id"].as_i64() < Some(100)).count();
    assert_eq!(good, 100, "every good record");
    let deep = letters
        .iter()
        .filter(|l| l["error"].as_str().unwrap().contains("nesting limit"))
        .count();
    assert_eq!(deep, DEEP, "{letters:?}");
    for l in &letters {
        assert!(l["offset"].is_i64(), "{l}");
        assert!(l["error"].as_str().unwrap().len() < 1000, "a short reason");
    }
}

#[test]
fn without_dead_letters_a_deep_record_stops_the_run_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), jsonl(3)).unwrap();
    let run = crate::sluice(&["run", pipeline(dir.path(), false).to_str().unwrap()]);
    let said = format!("{}{}", crate::text(&run.stdout), crate::text(&run.stderr));
    assert_eq!(run.status.signal(), None, "killed by a signal: {said}");
    assert_eq!(run.status.code(), Some(1), "{said}");
    assert!(said.contains("in.jsonl line 2"), "{said}");
    assert!(said.contains("nesting limit"), "{said}");
    assert!(
        said.len() < 5000,
        "the error does not quote the record: {said}"
    );
}

#[test]
fn hostile_pipeline_files_are_refused_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "flow.yaml",
            format!(
                "name: x\nsource: {}{}\n",
                "[".repeat(200_000),
                "]".repeat(200_000)
            ),
            "recursion limit exceeded",
        ),
        (
            "block.yaml",
            (0..2_000)
                .map(|i| format!("{}k:\n", " ".repeat(i)))
                .collect(),
            "deeper than 64 levels",
        ),
        (
            "bomb.yaml",
            {
                let mut t = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
                for i in 1..10 {
                    t.push_str(&format!(
                        "a{i}: &a{i} [{}]\n",
                        vec![format!("*a{}", i - 1); 10].join(", ")
                    ));
                }
                t
            },
            "more than 1000000 values",
        ),
        (
            "binary.yaml",
            String::from_utf8_lossy(&[0xff, 0xfe, 0, 1, b'[', b'{']).into_owned(),
            "",
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = crate::sluice(&["validate", path.to_str().unwrap()]);
        let said = format!("{}{}", crate::text(&out.stdout), crate::text(&out.stderr));
        assert_eq!(out.status.signal(), None, "{name}: killed by a signal");
        assert_ne!(out.status.code(), Some(0), "{name}: {said}");
        assert!(said.contains(expected), "{name}: {said}");
        assert!(
            said.contains(&format!("{name}:")),
            "{name} is named: {said}"
        );
    }
}
