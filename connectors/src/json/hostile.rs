//! Hostile records against every JSON entry point: a corpus of the inputs that break
//! parsers (deep nesting, huge tokens, invalid UTF-8, overflowing numbers, NaN and
//! Infinity, duplicate keys, truncated documents), then a bounded run of random mutations
//! of them. Each input must come back as rows or as a reason, one per record: never a
//! panic, never a stack overflow (which aborts the process, and so fails this test too).
//!
//! The mutation run takes `SLUICE_FUZZ_SECS` seconds (default 3); an input that fails is
//! written to `target/fuzz-found/` and named in the failure, to be added to [`corpus`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::limits::FAST_DEPTH;
use super::{JsonDecoder, MAX_DEPTH, decode_records};

/// The inputs that have broken JSON parsers (each kept: the first one crashed Sluice).
pub(crate) fn corpus() -> Vec<Vec<u8>> {
    let deep = |open: &str, close: &str, n: usize| {
        format!("{}{}", open.repeat(n), close.repeat(n)).into_bytes()
    };
    let mut inputs = vec![
        // The poison pill: 100,000 nested arrays overflowed the stack in sonic-rs's skip.
        deep("[", "]", 100_000),
        deep(r#"{"a":"#, "}", 100_000),
        format!(r#"{{"id": 1, "extra": {}}}"#, "[".repeat(100_000)).into_bytes(),
        format!(r#"{{"id": {}1{}}}"#, "[".repeat(50_000), "]".repeat(50_000)).into_bytes(),
        format!(r#"{{"name": {}}}"#, deep("[", "]", 200_000).escape_ascii()).into_bytes(),
        deep("[", "]", MAX_DEPTH),
        deep("[", "]", MAX_DEPTH + 1),
        "[".repeat(300_000).into_bytes(),
        "{\"a\":".repeat(300_000).into_bytes(),
        // Huge tokens.
        format!(r#"{{"id": {}}}"#, "9".repeat(100_000)).into_bytes(),
        format!(r#"{{"id": 1, "name": "{}"}}"#, "x".repeat(2_000_000)).into_bytes(),
        format!(r#"{{"id": 1, "{}": 2}}"#, "k".repeat(1_000_000)).into_bytes(),
        format!(r#"{{"score": 0.{}1}}"#, "0".repeat(100_000)).into_bytes(),
        // Numbers that overflow.
        br#"{"id": 9223372036854775808}"#.to_vec(),
        br#"{"id": -9223372036854775809}"#.to_vec(),
        br#"{"id": 1e400, "score": 1e400}"#.to_vec(),
        br#"{"score": -1e400}"#.to_vec(),
        br#"{"score": 1e-400}"#.to_vec(),
        br#"{"small": 70000}"#.to_vec(),
        br#"{"id": 1.5e3}"#.to_vec(),
        // Not JSON numbers.
        br#"{"score": NaN}"#.to_vec(),
        br#"{"score": Infinity}"#.to_vec(),
        br#"{"score": -Infinity}"#.to_vec(),
        br#"{"id": 0x10}"#.to_vec(),
        br#"{"id": 01}"#.to_vec(),
        br#"{"id": +1}"#.to_vec(),
        // Duplicate keys.
        br#"{"id": 1, "id": 2}"#.to_vec(),
        br#"{"id": 1, "id": "two"}"#.to_vec(),
        // Invalid UTF-8 and escapes.
        b"{\"name\": \"\xff\xfe\"}".to_vec(),
        b"{\"\xc3\x28\": 1}".to_vec(),
        br#"{"name": "\ud800"}"#.to_vec(),
        br#"{"name": "\udc00\ud800"}"#.to_vec(),
        br#"{"name": "\u00"}"#.to_vec(),
        br#"{"name": "\x41"}"#.to_vec(),
        b"{\"name\": \"a\x00b\"}".to_vec(),
        b"\xef\xbb\xbf{\"id\": 1}".to_vec(),
        // Truncated documents.
        br#"{"id": 1, "name": "ab"#.to_vec(),
        br#"{"id": 1,"#.to_vec(),
        br#"{"id""#.to_vec(),
        b"{".to_vec(),
        b"\"".to_vec(),
        b"".to_vec(),
        b" \n\t ".to_vec(),
        // Values of the wrong shape.
        br#"[1, 2, 3]"#.to_vec(),
        br#""just a string""#.to_vec(),
        br#"null"#.to_vec(),
        br#"{"id": {"nested": true}}"#.to_vec(),
        br#"{"ts": "2026-13-45T99:99:99Z"}"#.to_vec(),
        br#"{"ts": "9999999999-01-01T00:00:00Z"}"#.to_vec(),
        br#"{"ts": 99999999999999999999}"#.to_vec(),
        br#"{"id": 1} {"id": 2}"#.to_vec(),
        br#"{"id": 1}garbage"#.to_vec(),
    ];
    inputs.push(vec![0u8; 10_000]);
    inputs.push((0..=255u8).collect());
    inputs
}

/// A flat schema (the fast path) and a nested one (arrow-json only).
fn schemas() -> Vec<SchemaRef> {
    let flat = Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
        Field::new("small", DataType::Int16, true),
        Field::new(
            "ts",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
            true,
        ),
    ]);
    let nested = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new(
            "a",
            DataType::Struct(vec![Field::new("a", DataType::Int64, true)].into()),
            true,
        ),
    ]);
    vec![Arc::new(flat), Arc::new(nested)]
}

/// Every entry point over `records` (each one record): rows or reasons, one per record.
fn every_entry_point(records: &[&[u8]]) {
    for schema in schemas() {
        for mut decoder in [
            JsonDecoder::new(schema.clone()),
            JsonDecoder::arrow_only(schema.clone()),
        ] {
            let _ = decoder.decode(records.iter().copied());
            let (batch, bad) = decoder.decode_each(records);
            let batch = batch.expect("the records that decode alone decode together");
            assert_eq!(
                batch.num_rows() + bad.len(),
                records.len(),
                "one row or reason each"
            );
            for (_, reason) in &bad {
                assert!(reason.len() < 1000, "a reason for a person: {reason}");
            }
        }
        // As JSON lines (the file source), when no record holds a line break.
        if records.iter().all(|r| !r.contains(&b'\n')) {
            let mut buf = Vec::new();
            let mut starts = Vec::new();
            for r in records {
                starts.push(buf.len());
                buf.extend_from_slice(r);
                buf.push(b'\n');
            }
            let _ = decode_records(&schema, &buf, &starts);
        }
    }
}

/// Runs `every_entry_point`, and on a panic keeps the input for the corpus.
fn survives(records: &[&[u8]]) {
    let outcome = std::panic::catch_unwind(|| every_entry_point(records));
    if let Err(panic) = outcome {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-found");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("json-{:016x}", xxhash(records)));
        std::fs::write(&path, records.join(&b'\n')).unwrap();
        std::panic::resume_unwind(Box::new(format!(
            "{} (input kept in {})",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic"),
            path.display()
        )));
    }
}

fn xxhash(records: &[&[u8]]) -> u64 {
    records.iter().fold(0xcbf29ce484222325, |h, r| {
        r.iter()
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
    })
}

#[test]
fn the_corpus_decodes_or_fails_by_record() {
    let corpus = corpus();
    for input in &corpus {
        survives(&[input]);
        // Among good records: the bad one is found, the good ones kept.
        survives(&[br#"{"id": 1}"#, input, br#"{"id": 2}"#]);
    }
}

/// Lines that are not whole JSON values cannot run into each other when JSON lines are
/// decoded joined: a string left open on one line hid the next line's nesting (found by a
/// review: a stack overflow in arrow-json), and lines that merge and split could shift rows
/// against their offsets.
#[test]
fn lines_cannot_run_into_each_other() {
    let schema = schemas().remove(0);
    let deep = format!(
        r#"","id":{}1{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let cases: [&[&[u8]]; 2] = [
        &[br#"{"x":""#, deep.as_bytes()],
        &[br#"{"id":1,"name":""#, br#""}"#, br#"{"id":3} {"id":4}"#],
    ];
    for records in cases {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for r in records {
            starts.push(buf.len());
            buf.extend_from_slice(r);
            buf.push(b'\n');
        }
        let err = decode_records(&schema, &buf, &starts).unwrap_err();
        assert_eq!(err.index, Some(0), "{}", err.reason);
        survives(records);
    }
}

#[test]
fn deep_records_fail_with_the_limit_named() {
    let schema = schemas().remove(0);
    let deep = format!(r#"{{"id": 1, "x": {}}}"#, "[".repeat(100_000));
    for mut decoder in [
        JsonDecoder::new(schema.clone()),
        JsonDecoder::arrow_only(schema.clone()),
    ] {
        let (batch, bad) = decoder.decode_each(&[br#"{"id": 7}"#, deep.as_bytes()]);
        assert_eq!(batch.unwrap().num_rows(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 1);
        assert!(bad[0].1.contains("nesting limit"), "{}", bad[0].1);
    }
    let err = decode_records(&schema, format!("{{}}\n{deep}\n").as_bytes(), &[0, 3]).unwrap_err();
    assert_eq!(err.index, Some(1));
    assert!(err.reason.contains("nesting limit"), "{}", err.reason);
}

/// One random change to `input`: the kinds of damage that reach parsers.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>) {
    const TOKENS: &[&[u8]] = &[
        b"[",
        b"]",
        b"{",
        b"}",
        b"\"",
        b"\\",
        b",",
        b":",
        b"\\u",
        b"\\ud800",
        b"NaN",
        b"-",
        b"1e999",
        b"null",
        b"\xff",
        b"\xc3",
        b"\x00",
        b"\"id\":",
        b"9999999999999999999999",
    ];
    let at = |rng: &mut fastrand::Rng, len: usize| rng.usize(..=len);
    match rng.u8(..7) {
        0 if !input.is_empty() => {
            let i = rng.usize(..input.len());
            input[i] = rng.u8(..);
        }
        1 => {
            let token = TOKENS[rng.usize(..TOKENS.len())];
            let i = at(rng, input.len());
            let times = if rng.bool() { 1 } else { rng.usize(1..500) };
            for _ in 0..times {
                input.splice(i..i, token.iter().copied());
            }
        }
        2 if !input.is_empty() => input.truncate(rng.usize(..input.len())),
        3 if !input.is_empty() => {
            let (a, b) = (rng.usize(..input.len()), rng.usize(..input.len()));
            let (a, b) = (a.min(b), a.max(b));
            let piece = input[a..b].to_vec();
            let i = at(rng, input.len());
            input.splice(i..i, piece);
        }
        4 if !input.is_empty() => {
            let i = rng.usize(..input.len());
            input.remove(i);
        }
        5 => {
            let depth = rng.usize(1..2000);
            let i = at(rng, input.len());
            let open = if rng.bool() {
                b"[" as &[u8]
            } else {
                b"{\"a\":"
            };
            for _ in 0..depth {
                input.splice(i..i, open.iter().copied());
            }
        }
        _ => input.extend_from_slice(TOKENS[rng.usize(..TOKENS.len())]),
    }
}

/// Found by the fuzz test (2026-12-06): malformed escapes (`\u` without hex digits) make
/// parsers disagree on where a string ends. The depth check, reading the openers as inside
/// a string, found 2 levels; sonic-rs's skip read 1,800 and overflowed the stack. Records
/// with more openers than `FAST_DEPTH` now never take the fast path.
#[test]
fn a_record_whose_strings_parsers_read_differently_is_not_a_crash() {
    let input = include_bytes!("found/strings-read-differently.json");
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| survives(&[br#"{"id": 1}"#, input]))
        .unwrap()
        .join()
        .unwrap();
}

/// Replays an input the fuzz test kept (`SLUICE_FUZZ_REPLAY=target/fuzz-found/json-...`).
#[test]
fn replay_a_kept_input() {
    let Some(path) = std::env::var_os("SLUICE_FUZZ_REPLAY") else {
        return;
    };
    let input = std::fs::read(path).unwrap();
    survives(&[br#"{"id": 1}"#, &input]);
}

#[test]
fn random_mutations_decode_or_fail_by_record() {
    let secs = crate::file::hostile::fuzz_seconds(3.0);
    let seed = crate::file::hostile::fuzz_seed();
    eprintln!("fuzzing the JSON decoders for {secs}s, SLUICE_FUZZ_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pool: Vec<Vec<u8>> = corpus()
        .into_iter()
        .filter(|c| c.len() < 4096)
        .chain([
            br#"{"id": 12, "name": "Ada", "score": 0.5, "small": 3, "ts": "2026-01-02T03:04:05Z"}"#
                .to_vec(),
            br#"{"id": 1, "tags": ["a", "b"], "a": {"a": 2}}"#.to_vec(),
        ])
        .collect();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    // A stack overflow aborts the process, past `survives`: the input about to be decoded
    // is kept in this file first, so that an abort leaves it behind (seen once in a full
    // `make test`, 2026-12-06, and not since).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-found");
    std::fs::create_dir_all(&dir).unwrap();
    let current = dir.join(format!("json-current-{seed}"));
    while Instant::now() < deadline {
        let mut input = pool[rng.usize(..pool.len())].clone();
        for _ in 0..rng.usize(1..4) {
            mutate(&mut rng, &mut input);
        }
        std::fs::write(&current, &input).unwrap();
        survives(&[br#"{"id": 1}"#, &input]);
        runs += 1;
        if input.len() < 4096 && pool.len() < 10_000 {
            pool.push(input);
        }
    }
    let _ = std::fs::remove_file(&current);
    eprintln!("{runs} mutated inputs survived");
}

/// Records nested as deep as the fast path takes them ([`FAST_DEPTH`]: sonic-rs skips
/// unknown values by recursion) decode within an eighth of a runtime thread's 2 MiB (on
/// the debug build too), in every shape a skipped or decoded value can have.
#[test]
fn records_at_the_fast_path_depth_fit_a_runtime_stack() {
    let inner = FAST_DEPTH - 1;
    let shapes = [
        ("[", "]"),
        (r#"{"a":"#, "}"),
        (r#"[{"a":"#, "}]"),
        (r#"{"a":["#, "]}"),
    ];
    let mut records = Vec::new();
    for (open, close) in shapes {
        let levels = inner / open.matches(['[', '{']).count();
        let value = format!("{}1{}", open.repeat(levels), close.repeat(levels));
        for field in ["extra", "id", "name", "tags", "a"] {
            records.push(format!(r#"{{"{field}": {value}}}"#));
            records.push(format!(r#"{{"id": 1, "{field}": {value}, "name": "x"}}"#));
        }
    }
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            for r in &records {
                every_entry_point(&[r.as_bytes()]);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Records nested to the limit decode in far less stack than a runtime thread has (tokio's
/// workers get 2 MiB): the limit leaves headroom on every path.
#[test]
fn records_at_the_limit_fit_a_small_stack() {
    let nested = |open: &str, close: &str| {
        format!(
            "{}1{}",
            open.repeat(MAX_DEPTH - 1),
            close.repeat(MAX_DEPTH - 1)
        )
    };
    let records = [
        format!(r#"{{"id": 1, "extra": {}}}"#, nested("[", "]")),
        format!(r#"{{"id": 1, "extra": {}}}"#, nested(r#"{"a":"#, "}")),
        format!(r#"{{"id": {}}}"#, nested("[", "]")),
        format!(r#"{{"name": {}}}"#, nested(r#"{"a":"#, "}")),
    ];
    std::thread::Builder::new()
        .stack_size(512 << 10)
        .spawn(move || {
            let records: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
            every_entry_point(&records);
        })
        .unwrap()
        .join()
        .unwrap();
}
