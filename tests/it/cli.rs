//! The `sluice` command as a user runs it: exit codes, messages, the test runner's diff,
//! and a clean stop on SIGINT.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{read_lines, root, sluice, text};

#[test]
fn validate_accepts_the_examples_and_lists_every_problem() {
    let out = sluice(&["validate", "pipelines/quickstart.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    // Then the graph: what each stage and output reads.
    assert_eq!(
        text(&out.stdout),
        "pipelines/quickstart.yaml: ok\nsource (generator)\n  plays (sql)            ← source\n  experiment (function)  ← plays\noutput sink (file)       ← experiment\n"
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "name: x\nsource:\n  type: generator\n  batch_size: -1\nstages:\n  - name: a\n    type: sql\n    query: SELECT 1\n    retries: 3\nsink:\n  type: kafak\n",
    )
    .unwrap();
    let out = sluice(&["validate", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let f = broken.display();
    assert_eq!(
        text(&out.stdout),
        format!(
            "source.batch_size: -1 is out of range: expected a whole number from 0 to 18446744073709551615 ({f}:4:15)\n\
             stages[0].retries: unknown field, expected one of name, type, retry, bisect_on_error, max_record_age, timeout, concurrency, circuit_breaker, fallback, fallback_values, input, inputs, query ({f}:9:5)\n\
             sink.type: unknown type `kafak`, expected one of file, kafka, kinesis, stdout, null ({f}:11:9)\n\
             {f}: 3 problems\n"
        )
    );
}

#[test]
fn test_passes_on_the_example_and_shows_a_diff_on_a_wrong_expectation() {
    let out = sluice(&["test", "pipelines/quickstart.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).ends_with("1 passed, 0 failed\n"));

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.yaml");
    let yaml = std::fs::read_to_string(root().join("pipelines/quickstart.yaml"))
        .unwrap()
        .replace("quality: uhd", "quality: hd");
    std::fs::write(&wrong, yaml).unwrap();
    let out = sluice(&["test", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.contains("row 1:\n            quality: expected \"hd\", got \"uhd\""),
        "{stdout}"
    );
    assert!(stdout.ends_with("0 passed, 1 failed\n"), "{stdout}");
}

#[test]
fn bad_input_stops_the_run_with_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("views.jsonl");
    std::fs::write(
        &input,
        "{\"user_id\": 1}\n{\"user_id\": 2}\n{\"user_id\": \"x\"}\n",
    )
    .unwrap();
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: p\nsource:\n  type: file\n  path: {}\n  schema: [{{ name: user_id, type: int64, nullable: false }}]\nsink:\n  type: null\n",
            input.display()
        ),
    )
    .unwrap();
    let out = sluice(&["run", pipeline.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: bad record in {} line 3 (offset 2): ",
            input.display()
        )),
        "{stderr}"
    );
}

#[test]
fn sigint_finishes_what_was_read_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let pipeline = dir.path().join("endless.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: endless\nsource:\n  type: generator\n  partitions: 2\n  rate: 20000\n  batch_window: 20ms\nstages:\n  - {{ name: keep, type: sql, query: SELECT * FROM input }}\nsink:\n  type: file\n  path: {}\n  max_file_size: 200KiB\n",
            out_dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", pipeline.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first file is complete, then interrupt.
    let started = Instant::now();
    while !(out_dir.exists()
        && std::fs::read_dir(&out_dir)
            .unwrap()
            .any(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no output file appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling a child process we own and have not waited for.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("stopping: finishing the batches in flight"),
        "{stderr}"
    );
    // "endless: N records in, N out, 0 failed in …": nothing read was dropped.
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("endless: "))
        .expect(&stderr);
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words[1], words[4], "{summary}");
    let written = read_lines(&out_dir).len();
    assert_eq!(words[1].replace(',', "").parse::<usize>().unwrap(), written);
    assert!(written > 0);
    // Each stage's line gives its batch latency percentiles and its cold start.
    let stage = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("stage "))
        .expect(&stderr);
    assert!(
        stage.contains("p50/p95/p99 ") && stage.contains(" ms  cold start "),
        "{stage}"
    );
}

#[test]
fn functions_are_listed() {
    let out = sluice(&["functions"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        ["ab_bucket", "extract", "enrich", "score", "model", "http"]
            .iter()
            .all(|f| stdout.contains(f)),
        "{stdout}"
    );
}

/// `--metrics-addr` serves Prometheus text while the pipeline runs.
#[test]
fn run_serves_prometheus_metrics() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.yaml");
    std::fs::write(
        &file,
        "name: m
source: { type: generator, partitions: 2, count: 12000, rate: 4000 }
stages:
  - name: s
    type: sql
    query: SELECT user_id FROM input
    circuit_breaker: { min_calls: 5 }
sink: { type: null }
",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // A port alone serves this machine only, and says so.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "run",
            "-q",
            "--metrics-addr",
            &port.to_string(),
            file.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(std::time::Instant::now() < deadline, "no metrics served");
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            continue;
        };
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        if text.contains("sluice_records_in_total")
            && text.contains("sluice_stage_batch_duration_seconds_count")
        {
            break text;
        }
    };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let said = crate::text(&out.stderr);
    assert!(
        said.contains(&format!(
            "metrics: http://{addr}/metrics (this machine only)"
        )),
        "{said}"
    );
    for want in [
        "sluice_records_in_total{pipeline=\"m\"}",
        "sluice_stage_rows_in_total{pipeline=\"m\",stage=\"s\"}",
        "sluice_stage_failures_total{pipeline=\"m\",stage=\"s\",class=\"transient\"} 0",
        "sluice_breaker_transitions_total{pipeline=\"m\",stage=\"s\",to=\"open\"} 0",
        "sluice_breaker_state{pipeline=\"m\",stage=\"s\"} 0",
        "sluice_stage_batch_duration_seconds_bucket{pipeline=\"m\",stage=\"s\",le=\"0.5\"}",
        "sluice_stage_batch_duration_seconds_count{pipeline=\"m\",stage=\"s\"}",
        "sluice_stage_cold_start_seconds{pipeline=\"m\",stage=\"s\"}",
        "sluice_stage_cache_hits_total{pipeline=\"m\",stage=\"s\"} 0",
        // Per output: what the pipeline's one output (`sink`) took and how long it was busy.
        "sluice_output_rows_total{pipeline=\"m\",output=\"sink\"}",
        "sluice_output_busy_seconds_total{pipeline=\"m\",output=\"sink\"}",
    ] {
        assert!(body.contains(want), "{want} in:\n{body}");
    }
}
