//! Windowed aggregation through the whole engine: file partitions read concurrently with
//! late rows dead-lettered, the analytics examples against an independent count, and state
//! kept within its memory budget (RSS measured).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sluice_engine::stats::RunStats;

use crate::{json_lines, root, run_yaml};

/// Two partitions (files), out of order within 2s, with late rows in both.
fn write_inputs(dir: &Path) {
    let line = |user: &str, n: i64, secs: f64| {
        format!(
            "{{\"user\":\"{user}\",\"n\":{n},\"ts\":{}}}\n",
            (secs * 1000.0) as i64
        )
    };
    let a: String = [
        line("a", 1, 1.0),
        line("b", 2, 9.5),
        line("a", 3, 8.0),
        line("a", 4, 12.0),
        line("b", 5, 8.5), // late: this file's watermark is 10s, [0,10) has closed
        line("b", 6, 25.0),
    ]
    .concat();
    let b: String = [
        line("a", 10, 9.0),
        line("b", 20, 11.0),
        line("a", 30, 10.5),
        line("a", 40, 23.0),
        line("a", 50, 3.0), // late: 3s is 20s behind
    ]
    .concat();
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::write(dir.join("in/a.jsonl"), a).unwrap();
    std::fs::write(dir.join("in/b.jsonl"), b).unwrap();
}

fn files_pipeline(dir: &Path, dead_letters: bool) -> String {
    let dlq = if dead_letters {
        format!(
            "dead_letter: {{ type: file, path: {}, format: jsonl }}\n",
            dir.join("dlq").display()
        )
    } else {
        String::new()
    };
    format!(
        r#"name: windows
source:
  type: file
  path: {input}
  format: jsonl
  batch_size: 2
  schema:
    - {{ name: user, type: utf8 }}
    - {{ name: n, type: int64 }}
    - {{ name: ts, type: int64 }}
stages:
  - name: per_user
    type: aggregate
    group_by: [user]
    event_time: ts
    window: {{ tumbling: 10s }}
    allowed_lateness: 2s
    aggregates:
      c: count()
      s: sum(n)
  - name: shape
    type: sql
    query: SELECT user, arrow_cast(window_start, 'Int64') / 1000 AS start, c, s FROM input
sink:
  type: file
  path: {out}
  format: jsonl
{dlq}"#,
        input = dir.join("in").display(),
        out = dir.join("out").display(),
    )
}

fn windows(out: &Path) -> BTreeMap<(String, i64), (i64, i64)> {
    json_lines(out)
        .iter()
        .map(|r| {
            (
                (
                    r["user"].as_str().unwrap().to_string(),
                    r["start"].as_i64().unwrap(),
                ),
                (r["c"].as_i64().unwrap(), r["s"].as_i64().unwrap()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_read_concurrently_give_one_row_per_key_and_window() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let (stats, _) = run_yaml(&files_pipeline(dir.path(), true), &[])
        .await
        .unwrap();
    let got = windows(&dir.path().join("out"));
    let want: BTreeMap<(String, i64), (i64, i64)> = [
        (("a".to_string(), 0), (3, 14)),
        (("b".to_string(), 0), (1, 2)),
        (("a".to_string(), 10), (2, 34)),
        (("b".to_string(), 10), (1, 20)),
        (("a".to_string(), 20), (1, 40)),
        (("b".to_string(), 20), (1, 6)),
    ]
    .into();
    // Each file's late rows are decided by its own order (5 and 50), and no window closes
    // before both files have shown data, however their batches interleave.
    let dead = json_lines(&dir.path().join("dlq"));
    let mut late: Vec<i64> = dead
        .iter()
        .map(|d| {
            assert!(d["error"].as_str().unwrap().starts_with("late: "), "{d}");
            let payload: Value = serde_json::from_str(d["payload"].as_str().unwrap()).unwrap();
            payload["n"].as_i64().unwrap()
        })
        .collect();
    late.sort();
    assert_eq!(got, want);
    assert_eq!(late, [5, 50]);
    let counted: i64 = got.values().map(|v| v.0).sum();
    assert_eq!(
        counted + late.len() as i64,
        11,
        "every row counted or dead-lettered"
    );
    assert_eq!(
        RunStats::get(&stats.records_dead_lettered),
        late.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_sink_late_rows_are_counted_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let (stats, _) = run_yaml(&files_pipeline(dir.path(), false), &[])
        .await
        .unwrap();
    let dropped = RunStats::get(&stats.stages[0].late_dropped);
    let counted: i64 = windows(&dir.path().join("out")).values().map(|v| v.0).sum();
    assert_eq!((counted, dropped), (9, 2));
}

fn example(name: &str) -> String {
    std::fs::read_to_string(root().join("pipelines").join(name)).unwrap()
}

/// The generator's plays of the analytics examples, written out by a plain SQL stage.
async fn plays(count: &str, out: &Path) -> Vec<Value> {
    let yaml = example("analytics.yaml");
    let source = &yaml[yaml.find("\nsources:").unwrap()..yaml.find("\nstages:").unwrap()];
    let reference = format!(
        "name: reference\nsource: generator{source}\nstages:\n  - name: plays\n    type: sql\n    query: SELECT title_id, user_id, country, watch_seconds, arrow_cast(event_time, 'Int64') AS ms FROM input WHERE event_type = 'play'\nsink: {{ type: file, path: {}, format: jsonl }}\n",
        out.display()
    );
    run_yaml(&reference, &[("COUNT", count)]).await.unwrap();
    json_lines(out)
}

/// One read, two reports: each output of the analytics example against a plain count of
/// what it reads (the titles of the plays, the countries of every event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_counts_titles_and_countries_like_plain_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run_yaml(
        &example("analytics.yaml"),
        &[
            ("COUNT", "200000"),
            ("OUT_DIR", out.to_str().unwrap()),
            ("CHECKPOINT_DIR", dir.path().join("ckpt").to_str().unwrap()),
        ],
    )
    .await
    .unwrap();
    countries_add_up(&out.join("countries"), dir.path()).await;
    let out = out.join("titles");
    let mut want: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    let mut viewers: BTreeMap<(i64, i64), std::collections::BTreeSet<i64>> = BTreeMap::new();
    for p in plays("200000", &dir.path().join("plays")).await {
        let minute = p["ms"].as_i64().unwrap().div_euclid(60_000) * 60_000;
        let key = (p["title_id"].as_i64().unwrap(), minute);
        let e = want.entry(key).or_default();
        e.0 += 1;
        e.1 += p["watch_seconds"].as_i64().unwrap();
        viewers
            .entry(key)
            .or_default()
            .insert(p["user_id"].as_i64().unwrap());
    }
    let rows = json_lines(&out);
    let mut errors = Vec::new();
    let mut got: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for r in &rows {
        let start = r["window_start"].as_str().unwrap();
        let minute = humantime::parse_rfc3339(start)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let key = (r["title_id"].as_i64().unwrap(), minute);
        let prev = got.insert(
            key,
            (
                r["views"].as_i64().unwrap(),
                r["watch_seconds"].as_i64().unwrap(),
            ),
        );
        assert!(prev.is_none(), "a window written twice: {r}");
        // HyperLogLog: within 5% (3 at small counts, where hash collisions decide) of the
        // exact distinct count; over thousands of windows the mean error is what matters.
        let exact = viewers.get(&key).map_or(0, |v| v.len()) as f64;
        let approx = r["viewers"].as_f64().unwrap();
        assert!(
            (approx - exact).abs() <= (exact * 0.05).max(3.0),
            "{r}: exact {exact}"
        );
        errors.push((approx - exact).abs() / exact.max(1.0));
    }
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "per-title counts differ from a plain count of the plays"
    );
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(
        mean < 0.01,
        "mean relative error of approx_count_distinct: {mean}"
    );
}

/// Watch time per country in `out` adds up to the watch time of every event.
async fn countries_add_up(out: &Path, dir: &Path) {
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    let everything = plays_and_pauses("200000", &dir.join("all")).await;
    for p in &everything {
        *want
            .entry(p["country"].as_str().unwrap().to_string())
            .or_default() += p["watch_seconds"].as_i64().unwrap();
    }
    let mut got: BTreeMap<String, i64> = BTreeMap::new();
    for r in json_lines(out) {
        *got.entry(r["country"].as_str().unwrap().to_string())
            .or_default() += r["watch_seconds"].as_i64().unwrap();
    }
    assert_eq!(got, want);
}

/// Every generated event (the countries report counts all of them).
async fn plays_and_pauses(count: &str, out: &Path) -> Vec<Value> {
    let yaml = example("analytics.yaml");
    let source = &yaml[yaml.find("\nsources:").unwrap()..yaml.find("\nstages:").unwrap()];
    let reference = format!(
        "name: reference\nsource: generator{source}\nsink: {{ type: file, path: {}, format: jsonl }}\n",
        out.display()
    );
    run_yaml(&reference, &[("COUNT", count)]).await.unwrap();
    json_lines(out)
}

/// Peak resident memory (KiB) of a `sluice run` of `yaml`, from the kernel's accounting of
/// the exited child.
fn peak_rss_kib(yaml: &str, dir: &Path) -> (u64, String) {
    let path = dir.join("p.yaml");
    std::fs::write(&path, yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--quiet", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let output = std::thread::spawn(move || child.wait_with_output());
    // wait_with_output reaps the child; read the peak before it does, from /proc.
    let mut peak = 0u64;
    while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        if let Some(kib) = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
        {
            peak = peak.max(kib);
        }
        if status.contains("State:\tZ") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = output.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (peak, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every record its own key, in one tumbling window of a day, or (`sessions`) in its own
/// session with an hour's gap: all open until the end of the input.
fn keys_yaml(dir: &Path, keys: u64, budget_mib: u64, sessions: bool) -> String {
    let window = if sessions {
        "{ session: { gap: 1h } }"
    } else {
        "{ tumbling: 1d }"
    };
    format!(
        r#"name: many-keys
source:
  type: generator
  partitions: 2
  count: {keys}
  users: 1000
  titles: 100
  interval: 1ms
  batch_size: 8192
stages:
  # Every record is its own key: {keys} distinct keys in open windows.
  - name: per_record
    type: aggregate
    group_by: [_partition, _offset]
    event_time: event_time
    window: {window}
    aggregates:
      c: count()
      watch: sum(watch_seconds)
    state: {{ memory: {budget_mib}MiB }}
sink: {{ type: null }}
checkpoint:
  dir: {ckpt}
  interval: 5s
"#,
        ckpt = dir.join("ckpt").display()
    )
}

/// Peak RSS of `keys` distinct keys under a budget, against the same pipeline with 10,000
/// keys (the engine's own footprint). The overhead stated beyond the budget
/// (docs/aggregation.md): 80 MiB (RocksDB's write buffers and block cache, batches in
/// flight, the emitted chunk), 30% of the budget (allocator slack: memory of evicted entries
/// is reused, not returned), and 4 MiB per million keys (RocksDB's filters and indexes of the
/// stored keys, compaction), plus 32 MiB for a debug build's own slack.
fn keys_stay_within_budget(keys: u64, budget_mib: u64, sessions: bool) {
    let overhead_mib = 80 + budget_mib * 3 / 10 + 4 * keys / 1_000_000 + 32;
    let base_dir = tempfile::tempdir().unwrap();
    let (base, _) = peak_rss_kib(
        &keys_yaml(base_dir.path(), 10_000, budget_mib, sessions),
        base_dir.path(),
    );
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let (peak, _) = peak_rss_kib(
        &keys_yaml(dir.path(), keys, budget_mib, sessions),
        dir.path(),
    );
    let limit = base + (budget_mib + overhead_mib) * 1024;
    eprintln!(
        "{keys} distinct keys (sessions: {sessions}), budget {budget_mib} MiB: peak RSS {} MiB (10,000 keys: {} MiB; limit {} MiB) in {:.1?}",
        peak / 1024,
        base / 1024,
        limit / 1024,
        t0.elapsed()
    );
    assert!(
        peak <= limit,
        "peak RSS {} MiB is over the base {} MiB + the budget {budget_mib} MiB + {overhead_mib} MiB",
        peak / 1024,
        base / 1024
    );
}

#[test]
fn a_million_keys_stay_within_the_memory_budget() {
    keys_stay_within_budget(1_000_000, 32, false);
}

/// Sessions leave memory for the database as windows do: a million keys, each its own
/// session open until the end of the input, which reads them back a chunk at a time.
#[test]
fn a_million_sessions_stay_within_the_memory_budget() {
    keys_stay_within_budget(1_000_000, 32, true);
}

/// Ten million keys: about ten minutes on a debug build, so it runs with `SLUICE_SOAK=1`
/// (README: longer runs). The release figures are in docs/aggregation.md.
#[test]
fn ten_million_keys_stay_within_the_memory_budget() {
    if std::env::var_os("SLUICE_SOAK").is_none() {
        eprintln!("skipped: set SLUICE_SOAK=1 to run 10 million keys");
        return;
    }
    keys_stay_within_budget(10_000_000, 256, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_restarted_reads_nothing_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let yaml = format!(
        "{}checkpoint: {{ dir: {}, interval: 100ms }}\n",
        files_pipeline(dir.path(), true),
        dir.path().join("ckpt").display()
    );
    let (first, _) = run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(RunStats::get(&first.records_in), 11);
    let rows = json_lines(&dir.path().join("out")).len();
    assert_eq!(rows, 6);
    // The windows were emitted and the offsets checkpointed at the end: a restart (twice,
    // so that a checkpoint of the second run cannot send the third back to the start) has
    // nothing to read and nothing to emit.
    for _ in 0..2 {
        let (again, _) = run_yaml(&yaml, &[]).await.unwrap();
        assert_eq!(RunStats::get(&again.records_in), 0);
        assert_eq!(json_lines(&dir.path().join("out")).len(), rows);
    }
}
