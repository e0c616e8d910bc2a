//! Broken pipeline files: every problem is reported, each with its YAML path, its
//! line:column and what was expected.

use crate::parse;
use sluice_engine::autoscale::LagThreshold;

/// The problems in `yaml`, one per line.
fn problems(yaml: &str) -> Vec<String> {
    match parse(yaml, &[]) {
        Ok(_) => panic!("expected problems in:\n{yaml}"),
        Err(text) => text.lines().map(str::to_string).collect(),
    }
}

fn one_problem(yaml: &str) -> String {
    let mut p = problems(yaml);
    assert_eq!(p.len(), 1, "expected one problem, got {p:#?}");
    p.remove(0)
}

const SINK: &str = "sink:\n  type: stdout\n";

#[test]
fn misspelled_stage_field() {
    let yaml = "name: x
source:
  type: generator
stages:
  - name: a
    type: sql
    query: SELECT * FROM input
  - name: b
    type: sql
    batch_sise: 10
    query: SELECT * FROM input
sink:
  type: stdout
";
    assert_eq!(
        one_problem(yaml),
        "stages[1].batch_sise: unknown field, expected one of name, type, retry, bisect_on_error, max_record_age, timeout, concurrency, circuit_breaker, fallback, fallback_values, input, inputs, query (x.yaml:10:5)"
    );
}

#[test]
fn unknown_top_level_section() {
    let yaml = format!("name: x\nsource:\n  type: generator\nstage:\n  - name: a\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "stage: unknown field, expected one of name, source, sources, stages, sink, sinks, dead_letter, checkpoint, scaling, tests (x.yaml:4:1)"
    );
    // `sinks:` (alternatives by name) written for `sink:`.
    let yaml = format!("name: x\nsource:\n  type: generator\nsinks:\n  type: stdout\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "sinks: holds alternatives by name, picked with `sink: NAME` (e.g. `sinks: { local: { type: file, ... }, kafka: { type: kafka, ... } }`); a single sink is written under `sink:` (x.yaml:5:3)"
    );
}

#[test]
fn missing_sink() {
    assert_eq!(
        one_problem("name: x\nsource:\n  type: generator\n"),
        "sink: missing required field `sink` (or `sinks:` entries that name their `input`) (x.yaml:1:1)"
    );
}

#[test]
fn unknown_source_type() {
    let yaml = format!("name: x\nsource:\n  type: kafak\n  topic: views\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "source.type: unknown type `kafak`, expected one of generator, nexmark, file, kafka, kinesis (x.yaml:3:9)"
    );
}

#[test]
fn kinesis_start_from_in_kafka_words() {
    let yaml = format!(
        "name: x\nsource:\n  type: kinesis\n  stream: s\n  start_from: earliest\n  schema: [{{name: a, type: int64}}]\n{SINK}"
    );
    assert_eq!(
        one_problem(&yaml),
        "source.start_from: `earliest` is not trim_horizon, latest or an RFC 3339 time such as 2026-01-31T12:00:00Z (x.yaml:5:15)"
    );
}

#[test]
fn text_where_a_number_belongs() {
    let yaml = format!("name: x\nsource:\n  type: generator\n  batch_size: lots\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "source.batch_size: expected a whole number, found `lots` (x.yaml:4:15)"
    );
}

#[test]
fn negative_partition_count() {
    let yaml = format!("name: x\nsource:\n  type: generator\n  partitions: -2\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "source.partitions: -2 is out of range: expected a whole number from 0 to 4294967295 (x.yaml:4:15)"
    );
}

#[test]
fn bad_duration() {
    let yaml = format!("name: x\nsource:\n  type: generator\n  batch_window: soon\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "source.batch_window: expected a duration such as 500ms, 5s or 2m, found `soon` (x.yaml:4:17)"
    );
}

#[test]
fn duplicate_stage_names() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nstages:\n  - {{ name: a, type: sql, query: SELECT 1 }}\n  - {{ name: a, type: sql, query: SELECT 2 }}\n{SINK}"
    );
    assert_eq!(
        one_problem(&yaml),
        "stages[1].name: the stage name `a` is already used by stages[0] (line 5) (x.yaml:6:13)"
    );
}

#[test]
fn unknown_function() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nstages:\n  - name: f\n    type: function\n    function: ab_buckets\n{SINK}"
    );
    assert_eq!(
        one_problem(&yaml),
        "stages[0].function: unknown function `ab_buckets`, expected one of ab_bucket, enrich, extract, http, model, score (x.yaml:7:15)"
    );
}

#[test]
fn misspelled_function_parameter() {
    let yaml = format!(
        "name: x
source:
  type: generator
stages:
  - name: f
    type: function
    function: ab_bucket
    params:
      keey: user_id
      experiment: e
      variants: {{ a: 1 }}
{SINK}"
    );
    assert_eq!(
        problems(&yaml),
        vec![
            "stages[0].params.keey: unknown field, expected one of key, experiment, variants, output, bucket_output (x.yaml:9:7)".to_string(),
            "stages[0].params.key: missing required field (x.yaml:9:7)".to_string(),
        ]
    );
}

#[test]
fn unknown_schema_type() {
    let yaml = format!(
        "name: x
source:
  type: file
  path: data.jsonl
  schema:
    - {{ name: id, type: int64 }}
    - {{ name: tags, type: lst }}
{SINK}"
    );
    assert_eq!(
        one_problem(&yaml),
        "source.schema[1]: unknown type `lst`, expected one of bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64, utf8, binary, date32, timestamp, decimal128, list, struct (x.yaml:7:7)"
    );
}

#[test]
fn unset_environment_variable() {
    let yaml = format!("name: x\nsource:\n  type: generator\n  count: ${{COUNT}}\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "environment variable COUNT is not set (write ${COUNT:-default} to give a default) (x.yaml:4:10)"
    );
    let ok = parse(&yaml, &[("COUNT", "12")]).unwrap();
    let Some(g) = ok
        .source
        .spec_as::<sluice_connectors::generator::GeneratorConfig>()
    else {
        panic!()
    };
    assert_eq!(g.count, Some(12));
}

#[test]
fn invalid_yaml_syntax() {
    let p = one_problem("name: x\nsource: { type: generator\nsink: {}\n");
    assert!(p.starts_with("invalid YAML: "), "{p}");
    assert!(p.ends_with("(x.yaml:3:5)"), "{p}");
}

#[test]
fn stage_without_a_type() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nstages:\n  - name: a\n    query: SELECT 1\n{SINK}"
    );
    assert_eq!(
        one_problem(&yaml),
        "stages[0]: missing field `type`, expected one of sql, function, aggregate, route (x.yaml:5:5)"
    );
}

#[test]
fn unknown_metadata_column() {
    let yaml = "name: x\nsource:\n  type: generator\nsink:\n  type: stdout\n  metadata_columns: [_offset, _offest]\n";
    assert_eq!(
        one_problem(yaml),
        "sink.metadata_columns: `_offest` is not a metadata column, expected some of _partition, _offset, _key, _timestamp, _topic, _headers, _sequence (x.yaml:6:21)"
    );
}

#[test]
fn text_file_without_schema() {
    let yaml = format!("name: x\nsource:\n  type: file\n  path: in.csv\n{SINK}");
    assert_eq!(
        one_problem(&yaml),
        "source.schema: a jsonl or csv source needs a `schema`, or `infer_schema: true` to infer one from the data (x.yaml:3:3)"
    );
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let yaml = "name: x
source:
  type: generator
  partitions: many
  colour: blue
stages:
  - name: a
    type: sql
    qeury: SELECT 1
sink:
  type: file
  format: jsonl
";
    assert_eq!(
        problems(yaml),
        vec![
            "source.partitions: expected a whole number, found `many` (x.yaml:4:15)",
            "source.colour: unknown field, expected one of type, batch_size, batch_window, partitions, count, rate, users, titles, seed, start_time, interval, disorder (x.yaml:5:3)",
            "stages[0].query: missing required field (x.yaml:7:5)",
            "stages[0].qeury: unknown field, expected one of name, type, retry, bisect_on_error, max_record_age, timeout, concurrency, circuit_breaker, fallback, fallback_values, input, inputs, query (x.yaml:9:5)",
            "sink.path: missing required field (x.yaml:11:3)",
        ]
    );
}

#[tokio::test]
async fn a_query_on_a_missing_column_points_at_the_query() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nstages:\n  - name: a\n    type: sql\n    query: SELECT user_idd FROM input\n{SINK}"
    );
    let config = parse(&yaml, &[]).unwrap();
    let problems = sluice::plan::check(&config).await.unwrap_err().to_string();
    assert!(problems.starts_with("stages[0].query: "), "{problems}");
    assert!(problems.contains("user_idd"), "{problems}");
    assert!(problems.ends_with("(x.yaml:7:12)"), "{problems}");
}

#[test]
fn failure_policies_are_read_and_checked() {
    let yaml = "name: x
source:
  type: generator
stages:
  - name: score
    type: sql
    query: SELECT * FROM input
    retry: { max_attempts: 5, initial_backoff: 50ms, max_backoff: 2s, max_elapsed: 1m }
    bisect_on_error: true
    max_record_age: 1h
    timeout: 3s
    concurrency: 4
    circuit_breaker: { failure_ratio: 0.25, min_calls: 20, window: 30s, open_for: 10s, half_open_calls: 2 }
    fallback: default
    fallback_values: { user_id: 0 }
sink:
  type: stdout
dead_letter:
  type: file
  path: out/dlq
";
    let config = parse(yaml, &[]).unwrap();
    let p = &config.stages[0].policy;
    assert_eq!(p.max_attempts, 5);
    assert_eq!(p.initial_backoff, std::time::Duration::from_millis(50));
    assert_eq!(p.max_elapsed, Some(std::time::Duration::from_secs(60)));
    assert!(p.bisect_on_error);
    assert_eq!(p.timeout, Some(std::time::Duration::from_secs(3)));
    assert!(p.breaker.is_some() && p.concurrency.is_some());
    assert!(matches!(
        p.fallback,
        sluice_engine::breaker::Fallback::Default(_)
    ));

    let yaml = "name: x
source:
  type: generator
stages:
  - name: score
    type: sql
    query: SELECT * FROM input
    retry: { max_attempts: 0 }
    fallback: skip
sink:
  type: stdout
";
    assert_eq!(
        problems(yaml),
        [
            "stages[0].retry: max_attempts must be at least 1 (1: no retries) (x.yaml:8:12)",
            "stages[0].fallback: a fallback applies while the circuit is open: add `circuit_breaker` (x.yaml:9:15)",
        ]
    );
}

#[test]
fn alternatives_are_picked_by_name_and_checked() {
    let base = "name: x\nsource: ${SOURCE:-gen}\nsources:\n  gen: { type: generator }\n  kafka: { type: kafka, bootstrap_servers: h, topics: [t], group: g, schema: [{ name: a, type: int64 }] }\n";
    let yaml = format!("{base}sink: out\nsinks:\n  out: {{ type: stdout }}\n");
    let config = parse(&yaml, &[]).unwrap();
    assert_eq!(config.source.kind, "generator");
    let config = parse(&yaml, &[("SOURCE", "kafka")]).unwrap();
    assert_eq!(config.source.kind, "kafka");
    assert_eq!(
        parse(&yaml, &[("SOURCE", "kafak")]).err().unwrap(),
        "source: `kafak` is not one of the `sources:` entries (`gen`, `kafka`) (x.yaml:2:9)"
    );
    // An alternative not picked is still checked.
    let yaml =
        format!("{base}sink: out\nsinks:\n  out: {{ type: stdout }}\n  bad: {{ type: file }}\n");
    assert!(
        parse(&yaml, &[])
            .err()
            .unwrap()
            .starts_with("sinks.bad.path: missing"),
        "{:?}",
        parse(&yaml, &[]).err()
    );
    // Dead letters never go where the output goes.
    let yaml = format!("{base}sink: out\ndead_letter: out\nsinks:\n  out: {{ type: stdout }}\n");
    assert_eq!(
        parse(&yaml, &[]).err().unwrap(),
        "dead_letter: picks `out`, the same entry as `sink`: dead letters would be mixed into the output (x.yaml:7:14)"
    );
}

#[test]
fn the_scaling_section_is_read_with_its_defaults() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nscaling:\n  max_workers: 8\n  lag_threshold: 5000\n  scale_down_cooldown: 30s\n{SINK}"
    );
    let config = parse(&yaml, &[]).unwrap();
    let policy = &config.scaling.as_ref().unwrap().policy;
    assert_eq!(
        (policy.min_workers, policy.max_workers, policy.lag_threshold),
        (1, 8, LagThreshold::Records(5000))
    );
    assert_eq!(
        policy.scale_down_cooldown,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(policy.parallelization_factor, 1);
    assert_eq!(policy.interval, std::time::Duration::from_secs(1));
}

#[test]
fn scaling_mistakes_are_named() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nscaling:\n  min_workers: 4\n  max_workers: 2\n  lag_threshold: 0\n  parallelization_factor: 11\n{SINK}"
    );
    assert_eq!(
        problems(&yaml),
        vec![
            "scaling.max_workers: is 2, below min_workers (4) (x.yaml:6:16)",
            "scaling.lag_threshold: must be at least 1 record (x.yaml:7:18)",
            "scaling.parallelization_factor: is 11; it must be from 1 to 10 (x.yaml:8:27)",
        ]
    );
}

#[test]
fn a_lag_threshold_is_in_the_unit_the_source_measures_lag_in() {
    let kinesis =
        "name: x\nsource:\n  type: kinesis\n  stream: s\n  schema: [{name: a, type: int64}]\n";
    let yaml = format!("{kinesis}scaling:\n  lag_threshold: 5000\n{SINK}");
    assert_eq!(
        problems(&yaml),
        vec![
            "scaling.lag_threshold: is a number of records, but a Kinesis source's lag is in time \
             (each shard's MillisBehindLatest): give a time behind the stream's tip, e.g. 30s (x.yaml:7:18)"
        ]
    );
    let yaml =
        format!("name: x\nsource:\n  type: generator\nscaling:\n  lag_threshold: 30s\n{SINK}");
    assert_eq!(
        problems(&yaml),
        vec![
            "scaling.lag_threshold: is a time, but a generator source's lag is in records: \
             give a number of records, e.g. 10000 (x.yaml:5:18)"
        ]
    );
    let yaml = format!("{kinesis}scaling:\n  max_workers: 4\n{SINK}");
    let config = parse(&yaml, &[]).unwrap();
    assert_eq!(
        config.scaling.unwrap().policy.lag_threshold,
        LagThreshold::Time(std::time::Duration::from_secs(30)),
        "a Kinesis source's default"
    );
    let yaml = format!("{kinesis}scaling:\n  lag_threshold: soon\n{SINK}");
    let found = problems(&yaml);
    assert!(
        found[0].contains("expected a duration such as 500ms"),
        "{found:?}"
    );
}

#[tokio::test]
async fn a_parallelization_factor_needs_a_key_and_stateless_stages() {
    let yaml = format!(
        "name: x\nsource:\n  type: generator\nscaling:\n  parallelization_factor: 4\n  key: user\nstages:\n  - name: a\n    type: sql\n    query: SELECT * FROM input\n{SINK}"
    );
    let config = parse(&yaml, &[]).unwrap();
    let problems = sluice::plan::check(&config).await.unwrap_err().to_string();
    assert!(
        problems
            .starts_with("scaling.key: `user` is not a column of the source's records (user_id, "),
        "{problems}"
    );
    let yaml = "name: x
source:
  type: generator
scaling:
  parallelization_factor: 4
  key: user_id
stages:
  - name: counts
    type: aggregate
    group_by: [user_id]
    window: { tumbling: 10s }
    aggregates:
      n: count()
sink:
  type: stdout
";
    let config = parse(yaml, &[]).unwrap();
    let problems = sluice::plan::check(&config).await.unwrap_err().to_string();
    assert_eq!(
        problems,
        "scaling.parallelization_factor: cannot be above 1 with the stateful stage `counts`: its windows are kept per partition, in the order of the partition's records (x.yaml:5:27)"
    );
}

/// A `dead_letter` of files where the `sink` writes its files (same directory, however
/// spelled and whether or not it exists yet, same prefix and format) would mix dead letters
/// into the output and overwrite its files: refused where it is written, by `sluice
/// validate` and `sluice run` alike.
#[test]
fn dead_letters_never_write_the_sinks_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("out"), dir.path().join("link")).unwrap();
    let d = dir.path().display();
    let yaml = |sink: &str, dead: &str| {
        format!(
            "name: x\nsource:\n  type: generator\nsink:\n  type: file\n  path: {sink}\ndead_letter:\n  type: file\n  path: {dead}\n"
        )
    };
    let refused = "dead_letter.path: is where `sink` writes its files (line 6), with names that overlap (`part-*.jsonl` and `part-*.jsonl`): dead letters would be mixed into the output and overwrite its files; give the dead letters another `path` or a `prefix` that does not start the sink's (x.yaml:9:9)";
    for (sink, dead) in [
        (format!("{d}/out"), format!("{d}/out/")),
        (format!("{d}/out"), format!("{d}/link")),
        (format!("{d}/out"), format!("{d}/missing/../out")),
        (format!("{d}/later/a/.."), format!("{d}/./later")),
        ("out/x".to_string(), "./out/x/".to_string()),
    ] {
        assert_eq!(
            one_problem(&yaml(&sink, &dead)),
            refused,
            "{sink} and {dead}"
        );
    }
    // A prefix that starts the other's (`part` and `part-out`): `part-*` reads both.
    let overlapping = yaml(&format!("{d}/out\n  prefix: part-out"), &format!("{d}/out"));
    assert!(
        one_problem(&overlapping)
            .contains("names that overlap (`part-out-*.jsonl` and `part-*.jsonl`)"),
        "{}",
        one_problem(&overlapping)
    );
    // Another prefix or format in the same directory, or another directory: its own files.
    for dead in [
        format!("{d}/out\n  prefix: dead"),
        format!("{d}/out\n  format: parquet"),
        format!("{d}/dead"),
    ] {
        if let Err(e) = parse(&yaml(&format!("{d}/out"), &dead), &[]) {
            panic!("{dead}: {e}");
        }
    }
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, yaml(&format!("{d}/out"), &format!("{d}/link"))).unwrap();
    let want = refused.replace("x.yaml", file.to_str().unwrap());
    for command in ["validate", "run"] {
        let out = crate::sluice(&[command, file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{command}");
        let said = crate::text(&out.stdout) + &crate::text(&out.stderr);
        assert!(said.contains(&want), "{command}:\n{said}");
    }
}

/// The format keys are checked alike on Kafka and Kinesis, at their lines.
#[test]
fn format_keys_are_checked_on_kinesis_as_on_kafka() {
    let yaml = "name: x
source:
  type: kinesis
  stream: s
  format: avro
sink:
  type: kinesis
  stream: t
  format: avro
  avro:
    schema_registry: { url: \"http://127.0.0.1:8081\" }
    subject: mine
    subject_strategy: record
";
    assert_eq!(
        problems(yaml),
        [
            "source.format: `format: avro` needs `avro: { schema_registry: { url } }` (and `schema: FILE.avsc`, else the registry's latest version is the reader schema) (x.yaml:5:11)",
            "sink.avro: give `subject` or `subject_strategy`, not both (x.yaml:11:5)",
        ]
    );
}
