//! Damaged files against the file source: mutated Parquet and CSV files, and records past
//! `max_record_size`, read to the end. Each must be read or refused with an error naming
//! the file; never a panic (`SLUICE_FUZZ_SECS`, default 2 each).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sluice_engine::source::{Assignment, Source};

use super::{FileSource, FileSourceConfig};

fn config(value: serde_json::Value) -> FileSourceConfig {
    serde_json::from_value(value).expect("a file source config")
}

/// Opens and reads every partition to its end: the first error, if any.
fn read_all(config: FileSourceConfig) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut source = FileSource::open(config, 100)
            .map_err(|e| e.to_string())?
            .with_dead_letters(true);
        let mut rows = 0;
        while let Some(assignment) = source.next_assignment().await.map_err(|e| e.to_string())? {
            let Assignment::Assign(mut reader) = assignment else {
                continue;
            };
            while let Some(envelope) = reader.read(100).await.map_err(|e| e.to_string())? {
                rows += envelope.batch.num_rows() + envelope.dead.len();
            }
        }
        Ok(rows)
    })
}

fn parquet_bytes() -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..300)),
            Arc::new(StringArray::from_iter_values(
                (0..300).map(|i| format!("n{i}")),
            )),
        ],
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    buf
}

fn mutate(rng: &mut fastrand::Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(rng.u8(..));
        return;
    }
    match rng.u8(..5) {
        0 => {
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
        }
        1 => bytes.truncate(rng.usize(..bytes.len())),
        2 => {
            let i = rng.usize(..bytes.len());
            let n = rng.usize(1..64);
            bytes.splice(i..i, std::iter::repeat_with(|| rng.u8(..)).take(n));
        }
        3 => {
            // A field of the footer (lengths, counts, offsets) set to something extreme.
            let i = rng.usize(bytes.len().saturating_sub(200)..bytes.len());
            bytes[i] = [0x00, 0x7f, 0x80, 0xff][rng.usize(..4)];
        }
        _ => {
            let i = rng.usize(..bytes.len());
            bytes.remove(i);
        }
    }
}

/// `SLUICE_FUZZ_SECS`, else `default`: how long a mutation run takes.
pub(crate) fn fuzz_seconds(default: f64) -> f64 {
    std::env::var("SLUICE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `SLUICE_FUZZ_SEED`, else a random seed: replays a run.
pub(crate) fn fuzz_seed() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

fn seconds() -> f64 {
    fuzz_seconds(2.0)
}

fn seed() -> u64 {
    fuzz_seed()
}

/// Reads `bytes` as `name` in a fresh directory; a panic fails with the input kept.
fn survives(name: &str, bytes: &[u8], extra: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let mut value = serde_json::json!({ "path": path });
    value
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let outcome = std::panic::catch_unwind(|| read_all(config(value)));
    if let Ok(Err(e)) = &outcome
        && e.contains("the Parquet reader failed")
    {
        // A panic of the parquet crate, caught: keep the first few for the corpus.
        let found = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-found");
        std::fs::create_dir_all(&found).unwrap();
        if std::fs::read_dir(&found).map_or(0, Iterator::count) < 20 {
            std::fs::write(
                found.join(format!("caught-{}-{name}", fastrand::u32(..))),
                bytes,
            )
            .unwrap();
        }
    }
    if outcome.is_err() {
        let found = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-found");
        std::fs::create_dir_all(&found).unwrap();
        let kept = found.join(format!("{name}-{}", fastrand::u64(..)));
        std::fs::write(&kept, bytes).unwrap();
        panic!("reading {name} panicked (input kept in {})", kept.display());
    }
}

#[test]
fn damaged_parquet_files_are_refused_by_name() {
    let good = parquet_bytes();
    assert_eq!(
        {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.parquet");
            std::fs::write(&path, &good).unwrap();
            read_all(config(serde_json::json!({ "path": path })))
        },
        Ok(300)
    );
    let seed = seed();
    eprintln!(
        "fuzzing the Parquet reader for {}s, SLUICE_FUZZ_SEED={seed}",
        seconds()
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds());
    let mut runs = 0;
    while Instant::now() < deadline {
        let mut bytes = good.clone();
        for _ in 0..rng.usize(1..4) {
            mutate(&mut rng, &mut bytes);
        }
        survives("x.parquet", &bytes, serde_json::json!({}));
        runs += 1;
    }
    eprintln!("{runs} damaged Parquet files read or refused");
}

#[test]
fn damaged_csv_files_are_read_or_refused() {
    let good = (0..200)
        .map(|i| format!("{i},\"n,{i}\",{}.5\n", i * 3))
        .collect::<String>();
    let good = format!("id,name,score\n{good}").into_bytes();
    let schema = serde_json::json!({
        "header": true,
        "schema": [
            { "name": "id", "type": "int64" },
            { "name": "name", "type": "utf8" },
            { "name": "score", "type": "float64" },
        ],
    });
    let seed = seed();
    eprintln!(
        "fuzzing the CSV reader for {}s, SLUICE_FUZZ_SEED={seed}",
        seconds()
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds());
    while Instant::now() < deadline {
        let mut bytes = good.clone();
        for _ in 0..rng.usize(1..4) {
            mutate(&mut rng, &mut bytes);
        }
        survives("x.csv", &bytes, schema.clone());
    }
}

#[test]
fn records_past_max_record_size_are_refused_not_buffered() {
    // A CSV "record" of 3 MiB with no line break, and an open quote that never closes.
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("long.csv", format!("id,name\n1,{}", "x".repeat(3 << 20))),
        (
            "quote.csv",
            format!("id,name\n1,\"{}", "y\n".repeat(2 << 20)),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let err = read_all(config(serde_json::json!({
            "path": path,
            "max_record_size": "1MiB",
            "schema": [{ "name": "id", "type": "int64" }, { "name": "name", "type": "utf8" }],
        })))
        .unwrap_err();
        assert!(err.contains("larger than max_record_size (1MiB)"), "{err}");
        assert!(err.contains(name), "{err}");
    }
}

/// Files the mutation runs found that made the parquet crate panic (each caught and
/// reported by name); kept so that they stay refused cleanly.
#[test]
fn the_parquet_corpus_is_refused_by_name() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/file/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        let err = read_all(config(serde_json::json!({ "path": path }))).unwrap_err();
        assert!(
            err.contains("Parquet") && err.contains(&*path.to_string_lossy()),
            "{}: {err}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen > 0);
}
