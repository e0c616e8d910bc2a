//! Pipelines as graphs: one read feeding several branches and outputs, routes, and the
//! mistakes a graph can have, each named with its line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use sluice_engine::stats::RunStats;

use crate::{json_lines, parse, run_yaml};

const SOURCE: &str = "source:
  type: generator
  partitions: 4
  count: 40000
  users: 500
  titles: 50
  seed: 5
  start_time: \"2026-01-01T00:00:00Z\"
  interval: 10ms
  batch_size: 2000
";

/// The plays, the plays per title and minute, and every record as read.
const PLAYS: &str = "type: sql
    query: SELECT user_id, title_id, watch_seconds, _partition AS p, _offset AS o FROM input WHERE event_type = 'play'";
const PER_TITLE: &str = "type: aggregate
    group_by: [title_id]
    event_time: event_time
    window: { tumbling: 1m }
    aggregates: { views: count(), watch: sum(watch_seconds) }";

fn sink(dir: &Path, name: &str, input: &str) -> String {
    format!(
        "  {name}:\n    type: file\n    path: {}\n    format: jsonl\n    input: {input}\n    metadata_columns: [_partition, _offset]\n",
        dir.join(name).display()
    )
}

/// Rows as sorted JSON text: outputs compared as multisets (partitions interleave).
fn sorted(dir: &Path) -> Vec<String> {
    let mut rows: Vec<String> = json_lines(dir).iter().map(Value::to_string).collect();
    rows.sort();
    rows
}

/// A chain of `stage` (none: the records as read) into files at `out`.
async fn single_chain(stage: Option<&str>, out: &Path) -> Vec<String> {
    let stages = stage.map_or(String::new(), |s| {
        format!("stages:\n  - name: branch\n    {s}\n")
    });
    let yaml = format!(
        "name: chain\n{SOURCE}{stages}sink:\n  type: file\n  path: {}\n  format: jsonl\n  metadata_columns: [_partition, _offset]\n",
        out.display()
    );
    run_yaml(&yaml, &[]).await.unwrap();
    sorted(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_output_of_one_read_equals_its_branch_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("graph");
    let yaml = format!(
        "name: graph\n{SOURCE}stages:\n  - name: plays\n    {PLAYS}\n  - name: per_title\n    input: source\n    {PER_TITLE}\nsinks:\n{}{}{}",
        sink(&out, "plays", "plays"),
        sink(&out, "titles", "per_title"),
        sink(&out, "raw", "source"),
    );
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    // The source was read once.
    assert_eq!(RunStats::get(&stats.records_in), 40_000);
    let alone = dir.path().join("alone");
    let expected = [
        (
            "plays",
            single_chain(Some(PLAYS), &alone.join("plays")).await,
        ),
        (
            "titles",
            single_chain(Some(PER_TITLE), &alone.join("titles")).await,
        ),
        ("raw", single_chain(None, &alone.join("raw")).await),
    ];
    for (name, want) in expected {
        let got = sorted(&out.join(name));
        assert!(!want.is_empty(), "{name}: the chain wrote nothing");
        assert_eq!(got.len(), want.len(), "rows of {name}");
        assert!(
            got == want,
            "{name}: the graph's output differs from the chain's"
        );
    }
    let written: BTreeMap<String, u64> = stats
        .outputs()
        .iter()
        .map(|o| (o.name.to_string(), RunStats::get(&o.rows)))
        .collect();
    assert_eq!(written["raw"], 40_000);
    assert_eq!(
        RunStats::get(&stats.records_out),
        written.values().sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_sends_each_row_to_every_branch_it_matches_and_the_rest_to_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The predicate of `long` is NULL for every seventh user: NULL matches no route.
    let yaml = format!(
        "name: routes\n{SOURCE}stages:\n  - name: split\n    type: route\n    routes:\n      long: CASE WHEN user_id % 7 = 0 THEN NULL ELSE watch_seconds END > 1000\n      tv: device = 'tv'\nsinks:\n{}{}{}{}",
        sink(&out, "long", "split.long"),
        sink(&out, "tv", "split.tv"),
        sink(&out, "rest", "split.default"),
        sink(&out, "all", "source"),
    );
    run_yaml(&yaml, &[]).await.unwrap();
    let at = |r: &Value| {
        (
            r["_partition"].as_i64().unwrap(),
            r["_offset"].as_i64().unwrap(),
        )
    };
    let ids = |name: &str| -> BTreeSet<(i64, i64)> {
        json_lines(&out.join(name)).iter().map(at).collect()
    };
    let all = json_lines(&out.join("all"));
    assert_eq!(all.len(), 40_000);
    let (mut long, mut tv, mut rest) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut nulls = 0;
    for r in &all {
        let null = r["user_id"].as_i64().unwrap() % 7 == 0;
        let is_long = !null && r["watch_seconds"].as_i64().is_some_and(|w| w > 1000);
        nulls += usize::from(null);
        let is_tv = r["device"].as_str() == Some("tv");
        if is_long {
            long.insert(at(r));
        }
        if is_tv {
            tv.insert(at(r));
        }
        if !is_long && !is_tv {
            rest.insert(at(r));
        }
    }
    assert!(nulls > 0, "the input has NULLs to route");
    assert!(!long.is_empty() && !tv.is_empty() && long.intersection(&tv).next().is_some());
    assert_eq!(ids("long"), long);
    assert_eq!(ids("tv"), tv);
    assert_eq!(ids("rest"), rest);
    // Each row once per branch it matched: nothing copied twice into one branch.
    assert_eq!(json_lines(&out.join("tv")).len(), tv.len());
}

/// A predicate is evaluated once per row, by the route: with `random()`, each row is in
/// its branch or in `default`, never in both and never in neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_of_a_random_route_is_in_exactly_one_branch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        "name: sample\n{SOURCE}stages:\n  - name: split\n    type: route\n    routes: {{ sample: random() < 0.5 }}\nsinks:\n{}{}",
        sink(&out, "sample", "split.sample"),
        sink(&out, "rest", "split.default"),
    );
    run_yaml(&yaml, &[]).await.unwrap();
    let at = |r: &Value| {
        (
            r["_partition"].as_i64().unwrap(),
            r["_offset"].as_i64().unwrap(),
        )
    };
    let sample: BTreeSet<_> = json_lines(&out.join("sample")).iter().map(at).collect();
    let rest: BTreeSet<_> = json_lines(&out.join("rest")).iter().map(at).collect();
    assert!(!sample.is_empty() && !rest.is_empty());
    assert!(sample.is_disjoint(&rest), "a row in both branches");
    assert_eq!(sample.len() + rest.len(), 40_000, "every row in one branch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_reads_several_inputs_and_tests_check_the_named_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Two branches of the same columns meet again in one stage.
    let yaml = format!(
        "name: merge\n{SOURCE}stages:
  - name: pick
    type: sql
    query: SELECT _partition, _offset, event_type FROM input
  - name: split
    type: route
    input: pick
    routes: {{ plays: event_type = 'play' }}
  - name: both
    inputs: [split.plays, split.default]
    type: sql
    query: SELECT _partition AS p, _offset AS o FROM input
sinks:
  merged: {{ type: file, path: {}, format: jsonl, input: both }}
",
        out.display()
    );
    run_yaml(&yaml, &[]).await.unwrap();
    let mut got: Vec<(i64, i64)> = json_lines(&out)
        .iter()
        .map(|r| (r["p"].as_i64().unwrap(), r["o"].as_i64().unwrap()))
        .collect();
    // Where the branches meet again, each partition's rows are in the partition's order
    // (the rows kept `_offset`).
    let mut last: BTreeMap<i64, i64> = BTreeMap::new();
    for (p, o) in &got {
        let before = last.insert(*p, *o);
        assert!(
            before.is_none_or(|b| b < *o),
            "partition {p}: {o} after {before:?}"
        );
    }
    got.sort();
    got.dedup();
    assert_eq!(
        got.len(),
        40_000,
        "every row once, through one branch or the other"
    );
    assert_eq!(json_lines(&out).len(), 40_000);

    let config = parse(
        &format!(
            "{yaml}tests:\n  - name: plays and the rest meet\n    output: merged\n    input:\n      - {{ user_id: 1, title_id: 2, event_type: play, device: tv, country: DE, watch_seconds: 5, bitrate_kbps: 1, event_time: \"2026-01-01T00:00:00Z\" }}\n      - {{ user_id: 1, title_id: 2, event_type: pause, device: tv, country: DE, watch_seconds: 5, bitrate_kbps: 1, event_time: \"2026-01-01T00:00:01Z\" }}\n    expected:\n      - {{ p: 0, o: 0 }}\n      - {{ p: 0, o: 1 }}\n"
        ),
        &[],
    )
    .unwrap();
    let outcomes = sluice::testing::run_tests(&config).await.unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].failure.is_none(), "{:?}", outcomes[0].failure);
}

/// The problems of a broken graph, one per line.
fn problems(yaml: &str) -> Vec<String> {
    match parse(yaml, &[]) {
        Ok(_) => panic!("expected problems in:\n{yaml}"),
        Err(text) => text.lines().map(str::to_string).collect(),
    }
}

#[test]
fn graph_mistakes_are_each_named_with_their_line() {
    let yaml = "name: x
source: { type: generator }
stages:
  - name: a
    input: b
    type: sql
    query: SELECT * FROM input
  - name: b
    input: a
    type: sql
    query: SELECT * FROM input
sink: { type: stdout }
";
    let p = problems(yaml);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].starts_with("stages[0].input: stages read each other in a cycle: `a` (line 4) reads `b` (line 8), which reads `a` (line 4)"),
        "{p:#?}"
    );
    assert!(p[0].ends_with("(x.yaml:5:12)"), "{p:#?}");

    // Unknown input, dangling stage, a sink fed by nothing, an unread default branch and a
    // route read by its name: all at once, each at its line.
    let yaml = "name: x
source: { type: generator }
stages:
  - name: a
    type: sql
    query: SELECT * FROM input
  - name: lost
    input: source
    type: sql
    query: SELECT * FROM input
  - name: split
    type: route
    input: a
    routes: { big: user_id > 10 }
  - name: c
    input: nope
    type: sql
    query: SELECT * FROM input
sinks:
  out: { type: stdout, input: split.big }
  whole: { type: stdout, input: split }
  spare: { type: stdout }
  c_out: { type: stdout, input: c }
";
    let p = problems(yaml);
    let expect = [
        "stages[1].name: nothing reads the stage `lost`: its rows would go nowhere; give a stage or sink `input: lost`, or remove it (x.yaml:7:11)",
        "stages[2].routes: rows that match no route go to `split.default`, which nothing reads: read it (`input: split.default`) or drop them with `unmatched: drop` (x.yaml:14:13)",
        "stages[3].input: `nope` is not a stage, a route's branch or `source`; expected one of source, a, lost, split.big, split.default, c (x.yaml:16:12)",
        "sinks.whole.input: `split` is a route: read one of its branches, split.big, split.default (x.yaml:21:33)",
        "sinks.spare: nothing feeds the sink `spare`: give it `input: STAGE` (the other `sinks:` entries are outputs), or pick it with `dead_letter: spare` (x.yaml:22:3)",
    ];
    assert_eq!(p, expect, "{p:#?}");

    // An input named twice, and a stage named as the outputs' refusals are.
    let yaml = "name: x
source: { type: generator }
stages:
  - name: sink
    type: sql
    query: SELECT * FROM input
sinks:
  out: { type: stdout, inputs: [sink, sink] }
";
    let p = problems(yaml);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(
        p[0].starts_with("stages[0].name: `sink` is a reserved name"),
        "{p:#?}"
    );
    assert_eq!(
        p[1],
        "sinks.out.input: `sink` is named twice: its rows would be taken twice (x.yaml:8:39)"
    );

    // A stage after a route must say which branch it reads.
    let yaml = "name: x
source: { type: generator }
stages:
  - name: split
    type: route
    routes: { big: user_id > 10 }
    unmatched: drop
  - name: after
    type: sql
    query: SELECT * FROM input
sink: { type: stdout }
";
    let p = problems(yaml);
    assert_eq!(
        p,
        [
            "stages[0].routes.big: nothing reads the branch `split.big`: its rows would go nowhere; give a stage or sink `input: split.big` (x.yaml:6:15)",
            "stages[1]: this stage follows the route `split`: say which branch it reads, e.g. `input: split.big` (x.yaml:8:5)"
        ],
    );
}

#[test]
fn validate_prints_the_graph() {
    let out = crate::sluice(&["validate", "pipelines/analytics.yaml"]);
    let text = crate::text(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("watch_time_per_country (aggregate)  ← source"),
        "{text}"
    );
    assert!(text.contains("output titles (file)"), "{text}");
    assert!(text.contains("← views_per_title"), "{text}");
}

/// The letters of a stage on one branch are re-driven through that stage and what it leads
/// to: after the fix they reach its output, and the other branch's output gets nothing
/// again.
#[test]
fn dlq_replay_re_drives_a_branch_from_the_stage_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let lines: String = (0..100)
        .map(|i| {
            let user = if i % 10 == 7 {
                "null".to_string()
            } else {
                (i % 13).to_string()
            };
            format!("{{\"id\":{i},\"user_id\":{user}}}\n")
        })
        .collect();
    std::fs::write(input.join("part.jsonl"), lines).unwrap();
    let yaml = |key: &str| {
        format!(
            "name: replay-graph
source:
  type: file
  path: {input}
  format: jsonl
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: user_id, type: int64 }}
stages:
  - name: bucket
    type: function
    function: ab_bucket
    params: {{ key: {key}, experiment: e1, variants: {{ a: 50, b: 50 }} }}
  - name: ids
    input: source
    type: sql
    query: SELECT id FROM input
sinks:
  bucketed: {{ type: file, path: {out}, format: jsonl, input: bucket }}
  copies: {{ type: file, path: {copies}, format: jsonl, input: ids }}
dead_letter: {{ type: file, path: {dlq}, format: jsonl }}
",
            input = input.display(),
            out = dir.path().join("out").display(),
            copies = dir.path().join("copies").display(),
            dlq = dir.path().join("dlq").display(),
        )
    };
    let (v1, v2) = (dir.path().join("v1.yaml"), dir.path().join("v2.yaml"));
    std::fs::write(&v1, yaml("user_id")).unwrap();
    std::fs::write(&v2, yaml("id")).unwrap();
    let run = crate::sluice(&["run", "--quiet", v1.to_str().unwrap()]);
    assert!(run.status.success(), "{}", crate::text(&run.stderr));
    let ids = |name: &str| -> BTreeSet<i64> {
        json_lines(&dir.path().join(name))
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids("out").len(), 90);
    assert_eq!(ids("copies").len(), 100);

    let replay = crate::sluice(&["dlq", "replay", v2.to_str().unwrap()]);
    assert!(
        replay.status.success(),
        "{}{}",
        crate::text(&replay.stdout),
        crate::text(&replay.stderr)
    );
    assert_eq!(ids("out"), (0..100).collect::<BTreeSet<i64>>());
    assert_eq!(json_lines(&dir.path().join("out")).len(), 100, "each once");
    assert_eq!(
        json_lines(&dir.path().join("copies")).len(),
        100,
        "the other branch untouched"
    );
}
