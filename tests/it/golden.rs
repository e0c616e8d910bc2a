//! Golden tests: each folder of `tests/golden/` holds a `pipeline.yaml`, its input files and
//! `expected.jsonl`. The pipeline runs with `GOLDEN` set to the folder and `OUT` to a fresh
//! directory; its output (JSON lines, or Parquet read back as JSON) must equal the expected
//! rows. Rows are compared as a sorted set: partitions run concurrently, so their
//! interleaving is not fixed (order within a partition is tested in `executor`).
//!
//! `UPDATE_GOLDEN=1 cargo test --test it golden` rewrites the expected files; read the diff
//! before committing it.

use std::path::Path;

use crate::{parse, root};

fn output_rows(dir: &Path) -> Vec<String> {
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "an unfinished file was left behind: {name}"
        );
        if name.ends_with(".parquet") {
            let file = std::fs::File::open(&path).unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024)
                    .unwrap();
            for batch in reader {
                for row in sluice_connectors::json::to_json_rows(&batch.unwrap()).unwrap() {
                    rows.push(row.to_string());
                }
            }
        } else {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                rows.push(value.to_string());
            }
        }
    }
    rows.sort();
    rows
}

async fn check(case: &Path) {
    let out = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(case.join("pipeline.yaml")).unwrap();
    let golden = case.display().to_string();
    let out_dir = out.path().join("out").display().to_string();
    let config = parse(&yaml, &[("GOLDEN", &golden), ("OUT", &out_dir)])
        .unwrap_or_else(|e| panic!("{golden}: {e}"));
    sluice::run_config(&config, Default::default(), Default::default())
        .await
        .unwrap_or_else(|e| panic!("{golden}: {e}"));
    let actual = output_rows(Path::new(&out_dir));
    let expected_file = case.join("expected.jsonl");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_file, actual.join("\n") + "\n").unwrap();
        return;
    }
    let expected: Vec<String> = std::fs::read_to_string(&expected_file)
        .unwrap_or_else(|e| panic!("{}: {e}", expected_file.display()))
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(actual, expected, "golden output of {golden} differs");
}

#[tokio::test]
async fn golden_outputs() {
    let mut cases: Vec<_> = std::fs::read_dir(root().join("tests/golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("pipeline.yaml").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "golden cases went missing: {cases:?}");
    for case in cases {
        check(&case).await;
    }
}
