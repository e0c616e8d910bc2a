//! Sources against real files: formats, partitions, metadata columns, and bad input that
//! must stop the pipeline with the file, line, offset and reason — never a panic.

use std::path::Path;

use serde_json::{Value, json};

use crate::{read_lines, run_yaml};

fn jsonl_pipeline(input: &Path, out: &Path, extra: &str) -> String {
    format!(
        "name: t
source:
  type: file
  path: {}
  batch_size: 4
{extra}  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: name, type: utf8 }}
sink:
  type: file
  path: {}
  metadata_columns: [_offset]
",
        input.display(),
        out.display()
    )
}

async fn run_jsonl(lines: &str, extra: &str) -> (Result<u64, String>, Vec<Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines).unwrap();
    let out = dir.path().join("out");
    let result = run_yaml(&jsonl_pipeline(&input, &out, extra), &[])
        .await
        .map(|(stats, _)| sluice_engine::stats::RunStats::get(&stats.records_out));
    let rows = if out.exists() {
        read_lines(&out)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    (result, rows, input.display().to_string())
}

#[tokio::test]
async fn blank_lines_are_skipped_and_offsets_stay_dense() {
    let (result, rows, _) = run_jsonl(
        "{\"id\":1,\"name\":\"a\"}\n\n  \n{\"id\":2}\n{\"id\":3,\"name\":null}",
        "",
    )
    .await;
    assert_eq!(result, Ok(3));
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "name": "a", "_offset": 0}),
            json!({"id": 2, "name": null, "_offset": 1}),
            json!({"id": 3, "name": null, "_offset": 2}),
        ]
    );
}

async fn bad_input(lines: &str, extra: &str) -> String {
    let (result, _, path) = run_jsonl(lines, extra).await;
    let e = result.expect_err("bad input must fail the run");
    e.replace(&path, "IN")
}

#[tokio::test]
async fn invalid_json_names_file_line_and_offset() {
    let e = bad_input("{\"id\":1}\n\n{\"id\":2,\n{\"id\":4}\n", "").await;
    assert!(e.starts_with("bad record in IN line 3 (offset 1): "), "{e}");
}

#[tokio::test]
async fn wrong_type_names_the_value() {
    let e = bad_input("{\"id\":1}\n{\"id\":\"seven\"}\n", "").await;
    assert!(e.starts_with("bad record in IN line 2 (offset 1): "), "{e}");
    assert!(e.contains("seven"), "{e}");
}

#[tokio::test]
async fn missing_required_field() {
    let e = bad_input("{\"id\":1}\n{\"name\":\"x\"}\n", "").await;
    assert_eq!(
        e,
        "bad record in IN line 2 (offset 1): missing required field `id` (it is declared nullable: false)"
    );
}

#[tokio::test]
async fn empty_record() {
    let e = bad_input("{}\n", "").await;
    assert_eq!(
        e,
        "bad record in IN line 1 (offset 0): missing required field `id` (it is declared nullable: false)"
    );
}

#[tokio::test]
async fn two_values_on_one_line() {
    let e = bad_input("{\"id\":1} {\"id\":2}\n", "").await;
    assert_eq!(
        e,
        "bad record in IN line 1 (offset 0): the record holds more than one JSON value"
    );
}

#[tokio::test]
async fn a_huge_record_is_refused_not_loaded() {
    let big = format!(
        "{{\"id\":1}}\n{{\"id\":2,\"name\":\"{}\"}}\n",
        "x".repeat(10_000)
    );
    let e = bad_input(&big, "  max_record_size: 1KiB\n").await;
    assert_eq!(
        e,
        "bad record in IN line 2: the record is larger than max_record_size (1KiB)"
    );
}

#[tokio::test]
async fn not_json_at_all() {
    let e = bad_input("id,name\n1,a\n", "").await;
    assert!(e.starts_with("bad record in IN line 1 (offset 0): "), "{e}");
}

#[tokio::test]
async fn csv_with_header_and_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "id,name\n1,a\n2,b\n").unwrap();
    let out = dir.path().join("out");
    let yaml = |input: &Path| {
        format!(
            "name: t\nsource:\n  type: file\n  path: {}\n  schema:\n    - {{ name: id, type: int64 }}\n    - {{ name: name, type: utf8 }}\nsink:\n  type: file\n  path: {}\n",
            input.display(),
            out.display()
        )
    };
    run_yaml(&yaml(&input), &[]).await.unwrap();
    assert_eq!(
        read_lines(&out),
        vec![r#"{"id":1,"name":"a"}"#, r#"{"id":2,"name":"b"}"#]
    );

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "id,name\n1,a\nx,b\n").unwrap();
    let e = run_yaml(&yaml(&bad), &[]).await.unwrap_err();
    assert!(
        e.starts_with(&format!("bad record in {}", bad.display())),
        "{e}"
    );
    assert!(
        e.contains("'x'") || e.contains("\"x\"") || e.contains(" x "),
        "{e}"
    );
}

#[tokio::test]
async fn a_directory_is_one_partition_per_file_and_parquet_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for (i, name) in ["b.jsonl", "a.jsonl", "c.jsonl"].iter().enumerate() {
        let lines: String = (0..5)
            .map(|j| format!("{{\"id\":{}}}\n", i * 10 + j))
            .collect();
        std::fs::write(input.join(name), lines).unwrap();
    }
    std::fs::write(input.join(".hidden.jsonl"), "not read\n").unwrap();
    let parquet = dir.path().join("parquet");
    let yaml = format!(
        "name: t\nsource:\n  type: file\n  path: {}\n  format: jsonl\n  schema: [{{ name: id, type: int64 }}]\nsink:\n  type: file\n  format: parquet\n  path: {}\n  metadata_columns: [_partition, _offset]\n",
        input.display(),
        parquet.display()
    );
    run_yaml(&yaml, &[]).await.unwrap();

    // Read the Parquet output back.
    let mut rows: Vec<(u64, u64, u64)> = Vec::new();
    for file in std::fs::read_dir(&parquet).unwrap() {
        let file = std::fs::File::open(file.unwrap().path()).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024).unwrap();
        for batch in reader {
            for v in sluice_connectors::json::to_json_rows(&batch.unwrap()).unwrap() {
                rows.push((
                    v["_partition"].as_u64().unwrap(),
                    v["_offset"].as_u64().unwrap(),
                    v["id"].as_u64().unwrap(),
                ));
            }
        }
    }
    rows.sort();
    // Files are partitions in name order: a.jsonl is 0, b.jsonl 1, c.jsonl 2.
    let expected: Vec<(u64, u64, u64)> = [(0u64, 10u64), (1, 0), (2, 20)]
        .iter()
        .flat_map(|(p, base)| (0..5).map(move |o| (*p, o, base + o)))
        .collect();
    assert_eq!(rows, expected);
}
