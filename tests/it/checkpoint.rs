//! Checkpoints: a restarted pipeline goes on where the last checkpoint says, and a kill -9
//! at any moment loses nothing.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{read_lines, run_yaml};

/// `(partition, offset)` of every output row, from files written with those metadata
/// columns.
fn positions(out: &Path) -> Vec<(u64, u64)> {
    if !out.exists() {
        return Vec::new();
    }
    read_lines(out)
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["_partition"].as_u64().unwrap(),
                v["_offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_finished_file_pipeline_is_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: String = (0..1000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(&input, &lines).unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        "name: resume
source:
  type: file
  path: {}
  batch_size: 100
  schema: [{{ name: n, type: int64 }}]
sink:
  type: file
  path: {}
  metadata_columns: [_partition, _offset]
checkpoint:
  dir: {}
  interval: 1h
",
        input.display(),
        out.display(),
        dir.path().join("ckpt").display()
    );
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(
        sluice_engine::stats::RunStats::get(&stats.records_out),
        1000
    );
    // The final checkpoint covers the whole file: a second run reads nothing new.
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(sluice_engine::stats::RunStats::get(&stats.records_in), 0);
    // Appended records are read from where the first run stopped.
    let more: String = (1000..1250).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(&input, lines + &more).unwrap();
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    assert_eq!(sluice_engine::stats::RunStats::get(&stats.records_in), 250);
    let mut got = positions(&out);
    got.sort();
    assert_eq!(got, (0..1250).map(|o| (0, o)).collect::<Vec<_>>());
}

/// A small deterministic random sequence, so that a failing run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    const PARTITIONS: u64 = 3;
    const COUNT: u64 = 90_000;
    const RATE: u64 = 15_000;
    const INTERVAL_MS: u64 = 100;
    const BATCH: u64 = 500;
    const KILLS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: crashy
source:
  type: generator
  partitions: {PARTITIONS}
  count: {COUNT}
  rate: {RATE}
  batch_size: {BATCH}
  batch_window: 20ms
sink:
  type: file
  path: {}
  max_file_size: 32KiB
  metadata_columns: [_partition, _offset]
checkpoint:
  dir: {}
  interval: {INTERVAL_MS}ms
",
            out.display(),
            dir.path().join("ckpt").display()
        ),
    )
    .unwrap();
    let seed = std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Lcg(seed);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--quiet", pipeline.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    for _ in 0..KILLS {
        let mut child = run();
        std::thread::sleep(Duration::from_millis(150 + rng.below(600)));
        match child.try_wait().unwrap() {
            Some(status) => panic!("the run ended before the kill ({status}): make it longer"),
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    let last = run().wait_with_output().unwrap();
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );

    let rows = positions(&out);
    let mut seen: HashMap<(u64, u64), u32> = HashMap::new();
    for r in &rows {
        *seen.entry(*r).or_default() += 1;
    }
    let per_partition = COUNT / PARTITIONS;
    let missing: Vec<_> = (0..PARTITIONS)
        .flat_map(|p| (0..per_partition).map(move |o| (p, o)))
        .filter(|k| !seen.contains_key(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(seen.len() as u64, COUNT, "records that were never input");
    let duplicates = rows.len() as u64 - COUNT;
    // A crash repeats at most what was written since the last checkpoint: one interval of
    // records at the source's rate, plus the batches being written when it was taken.
    let bound = kills as u64 * (RATE * INTERVAL_MS / 1000 + 4 * BATCH * PARTITIONS);
    eprintln!(
        "kill -9 ×{kills} (seed {seed:#x}): {COUNT} records, none lost, {duplicates} duplicates (bound {bound})"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, more than {bound}"
    );
}
