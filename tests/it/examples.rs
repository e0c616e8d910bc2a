//! The function-stage example pipelines run end to end on the embedded default and give
//! the right answers: personalization (enrich → score), content metadata (files → Parquet,
//! bad names dead-lettered), fraud scoring (ONNX model), entitlements (remote HTTP function
//! against the shipped stand-in service).

use std::collections::HashMap;
use std::process::{Command, Stdio};

use arrow::array::AsArray;
use serde_json::Value;
use sluice_engine::stats::RunStats;

use crate::{json_lines, root, run_yaml};

fn example(name: &str) -> String {
    std::fs::read_to_string(root().join("pipelines").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personalization_recommends_from_profiles_and_falls_back_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (stats, _) = run_yaml(
        &example("personalization.yaml"),
        &[("COUNT", "20000"), ("OUT_DIR", out.to_str().unwrap())],
    )
    .await
    .unwrap();
    let rows = json_lines(&out);
    assert!(rows.len() > 1000, "{} plays", rows.len());
    // The fallback list: the 10 most popular titles of the model file.
    let model: Value = serde_json::from_str(&example("models/recs/model.json")).unwrap();
    let mut titles: Vec<(i64, f64)> = model["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_i64().unwrap(), c["popularity"].as_f64().unwrap()))
        .collect();
    titles.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let popular: Vec<Value> = titles[..10].iter().map(|t| Value::from(t.0)).collect();
    let mut by_source: HashMap<String, usize> = HashMap::new();
    let mut first_list: HashMap<i64, Value> = HashMap::new();
    for row in &rows {
        let user = row["user_id"].as_i64().unwrap();
        let source = row["source"].as_str().unwrap();
        *by_source.entry(source.to_string()).or_default() += 1;
        let list = &row["recommendations"];
        assert_eq!(list.as_array().unwrap().len(), 10, "{row}");
        if user % 10 == 0 {
            assert_eq!(source, "fallback", "user {user} has no profile");
            assert_eq!(row["plan"], "unknown");
            assert_eq!(list.as_array().unwrap(), &popular);
        } else {
            assert!(source == "generated" || source == "cache", "{row}");
            assert_ne!(row["plan"], "unknown");
            // A user's list is the same whether scored now or served from the cache.
            let first = first_list.entry(user).or_insert_with(|| list.clone());
            assert_eq!(first, list, "user {user}");
        }
    }
    assert!(by_source["cache"] > by_source["generated"], "{by_source:?}");
    assert!(by_source["fallback"] > 0, "{by_source:?}");
    let recommend = &stats.stages[2];
    assert_eq!(&*recommend.name, "recommend");
    assert!(RunStats::get(&recommend.cache_hits) > 0);
    assert!(recommend.latency.quantile(0.99).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_metadata_parses_file_names_into_parquet_and_dead_letters_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out"), dir.path().join("dead"));
    run_yaml(
        &example("content-metadata.yaml"),
        &[
            ("OUT_DIR", out.to_str().unwrap()),
            ("DLQ_DIR", dead.to_str().unwrap()),
        ],
    )
    .await
    .unwrap();
    let mut rows = 0;
    for file in std::fs::read_dir(&out).unwrap() {
        let file = std::fs::File::open(file.unwrap().path()).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows();
            let tier = batch.column_by_name("tier").unwrap().as_string::<i32>();
            let resolution = batch
                .column_by_name("resolution")
                .unwrap()
                .as_string::<i32>();
            for i in 0..batch.num_rows() {
                let want = match resolution.value(i) {
                    "2160p" => "uhd",
                    "1080p" => "hd",
                    _ => "sd",
                };
                assert_eq!(tier.value(i), want);
            }
        }
    }
    let letters = json_lines(&dead);
    assert_eq!(
        rows + letters.len(),
        500,
        "every upload out or dead-lettered"
    );
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        assert_eq!(letter["stage"], "name");
        let payload: Value = serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert!(
            payload["filename"].as_str().unwrap().contains("final"),
            "{letter}"
        );
        assert!(
            letter["source"].as_str().unwrap().contains("uploads-0"),
            "{letter}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_scoring_scores_every_play_with_the_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (stats, _) = run_yaml(
        &example("fraud-scoring.yaml"),
        &[("COUNT", "20000"), ("OUT_DIR", out.to_str().unwrap())],
    )
    .await
    .unwrap();
    let rows = json_lines(&out);
    assert!(rows.len() > 1000);
    let mut actions: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let score = row["fraud_score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{row}");
        let want = if score >= 0.9 {
            "block"
        } else if score >= 0.6 {
            "review"
        } else {
            "ok"
        };
        assert_eq!(row["action"], want, "{row}");
        *actions.entry(want.to_string()).or_default() += 1;
    }
    assert!(actions.len() >= 2, "scores spread over tiers: {actions:?}");
    assert!(stats.stages[1].cold_start() > std::time::Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlements_calls_the_remote_function_and_dead_letters_refused_rows() {
    let port = crate::free_port();
    let mut server = Command::new("python3")
        .arg(root().join("pipelines/functions/entitlements_server.py"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, dead) = (dir.path().join("out"), dir.path().join("dead"));
    let url = format!("http://127.0.0.1:{port}/entitlements");
    let result = run_yaml(
        &example("entitlements.yaml"),
        &[
            ("COUNT", "20000"),
            ("OUT_DIR", out.to_str().unwrap()),
            ("DLQ_DIR", dead.to_str().unwrap()),
            ("ENTITLEMENTS_URL", &url),
        ],
    )
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let (stats, _) = result.unwrap();
    let rows = json_lines(&out);
    let letters = json_lines(&dead);
    let plays = RunStats::get(&stats.stages[0].rows_out) as usize;
    assert_eq!(
        rows.len() + letters.len(),
        plays,
        "every play out or dead-lettered"
    );
    assert!(!letters.is_empty());
    for row in &rows {
        let (title, country) = (
            row["title_id"].as_i64().unwrap(),
            row["country"].as_str().unwrap(),
        );
        assert_ne!(title % 101, 0);
        let allowed = title % 7 != 0 || country == "US" || country == "GB";
        assert_eq!(row["allowed"], allowed, "{row}");
    }
    for letter in &letters {
        let payload: Value = serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["title_id"].as_i64().unwrap() % 101, 0, "{letter}");
        assert!(
            letter["error"]
                .as_str()
                .unwrap()
                .contains("is not in the catalogue"),
            "{letter}"
        );
    }
}

/// The README's Layout section says where to look for a behaviour: every path it names is
/// there, and every function, trait or type it names is defined in one of those files.
#[test]
fn the_readme_layout_names_what_is_there() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("## Layout").expect("a Layout section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let quoted: Vec<&str> = section.split('`').skip(1).step_by(2).collect();
    let mut sources = String::new();
    let mut paths = 0;
    for part in &quoted {
        if part.contains('/') && (part.ends_with(".rs") || part.ends_with('/')) {
            let path = root().join(part);
            assert!(
                path.exists(),
                "README Layout names {part}, which is not there"
            );
            let files: Vec<std::path::PathBuf> = if path.is_dir() {
                std::fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                    .collect()
            } else {
                vec![path]
            };
            for file in files {
                sources.push_str(&std::fs::read_to_string(file).unwrap());
            }
            paths += 1;
        }
    }
    assert!(paths >= 8, "only {paths} paths in the Layout section");
    for part in &quoted {
        let name = part.rsplit("::").next().unwrap();
        let is_name = !name.is_empty()
            && !part.contains('/')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.chars().any(|c| c.is_ascii_alphabetic());
        if is_name {
            let defined = ["fn ", "trait ", "struct ", "enum "]
                .iter()
                .any(|kw| sources.contains(&format!("{kw}{name}")));
            assert!(
                defined,
                "README Layout names `{part}`, defined in none of its files"
            );
        }
    }
}
