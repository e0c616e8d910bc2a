//! Kafka source and sink against a real Kafka-protocol broker (tansu, or `KAFKA_BOOTSTRAP`).
//!
//! Pipelines run as `sluice` processes, as users run them, so that they can be killed with
//! SIGKILL, interrupted, and run two at a time in one consumer group.

mod aggregate;
pub(crate) mod avro;
mod broker;
mod chaos;
mod dead_letters;
mod debezium;
mod delivery;
mod errors;
mod examples;
mod first_fetch;
mod graph;
mod processes;
mod protobuf;
mod replay;
mod scaling;
mod secure;
mod throughput;
mod top;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use broker::Broker;
use serde_json::Value;

/// `n` view events as JSON, spread over `partitions` by user.
pub fn events(n: usize, partitions: i32) -> Vec<(i32, Option<String>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let user = i % 1000;
            let payload = format!(
                r#"{{"id":{i},"user_id":{user},"country":"{}","amount":{}.5}}"#,
                ["de", "fr", "us", "jp"][i % 4],
                i % 100
            );
            (
                (user as i32) % partitions,
                Some(format!("u{user}")),
                payload.into_bytes(),
            )
        })
        .collect()
}

/// The `source:` of the test pipelines: topic `input` of `events`, read by `group`.
pub fn source_yaml(broker: &Broker, input: &str, group: &str) -> String {
    format!(
        r#"source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 2000
  batch_window: 50ms
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: user_id, type: int64 }}
    - {{ name: country, type: utf8 }}
    - {{ name: amount, type: float64 }}
  options:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
"#,
        bootstrap = broker.bootstrap
    )
}

/// A pipeline from topic `input` through SQL to topic `output`.
pub fn pipeline_yaml(
    broker: &Broker,
    input: &str,
    output: &str,
    group: &str,
    checkpoint: Option<&Path>,
    extra_source: &str,
) -> String {
    let checkpoint = checkpoint
        .map(|dir| format!("checkpoint:\n  dir: {}\n  interval: 500ms\n", dir.display()))
        .unwrap_or_default();
    format!(
        r#"name: kafka-test
{source}{extra_source}stages:
  - name: enrich
    type: sql
    query: >
      SELECT id, user_id, upper(country) AS country, amount * 2 AS doubled,
             _offset AS source_offset
      FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: {output}
  key: user_id
  headers: [country]
{checkpoint}"#,
        source = source_yaml(broker, input, group),
        bootstrap = broker.bootstrap
    )
}

/// Starts the pipeline, lets it run for each of `waits` after it has partitions, and kills
/// it with SIGKILL each time (logs `log0`, `log1`, … in `dir`).
pub fn run_and_kill_9(pipeline: &Path, dir: &Path, waits: &[Duration]) {
    for (i, wait) in waits.iter().enumerate() {
        let mut sluice = Sluice::start(pipeline, dir.join(format!("log{i}")));
        wait_assigned(&mut sluice, Duration::from_secs(60));
        std::thread::sleep(*wait);
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        sluice.kill9();
    }
}

/// The run after the kills: started, and interrupted by the test only once it has
/// partitions (the killed runs may have done everything; a SIGINT before its handler is
/// installed would kill it).
pub fn start_last(pipeline: &Path, dir: &Path) -> Sluice {
    let mut last = Sluice::start(pipeline, dir.join("log-last"));
    wait_assigned(&mut last, Duration::from_secs(60));
    last
}

/// Kill moments from 200 ms to 2.7 s, from a small deterministic generator (xorshift).
pub fn moments(seed: u64, n: usize) -> Vec<Duration> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(200 + x % 2500)
        })
        .collect()
}

/// A `sluice run` in its own process; its stderr goes to a file.
pub struct Sluice {
    child: Child,
    pub log: PathBuf,
}

impl Sluice {
    pub fn start(pipeline: &Path, log: PathBuf) -> Sluice {
        Self::start_with(pipeline, log, &[])
    }

    /// `sluice run` with extra environment variables.
    pub fn start_with(pipeline: &Path, log: PathBuf, vars: &[(&str, &str)]) -> Sluice {
        Self::start_args(pipeline, log, &[], vars)
    }

    /// `sluice run PIPELINE ARGS…` with extra environment variables.
    pub fn start_args(
        pipeline: &Path,
        log: PathBuf,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> Sluice {
        let mut all = vec!["run", pipeline.to_str().unwrap()];
        all.extend_from_slice(args);
        Self::spawn(&all, log, vars)
    }

    /// `sluice ARGS…` with extra environment variables.
    pub fn spawn(args: &[&str], log: PathBuf, vars: &[(&str, &str)]) -> Sluice {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env("RUST_LOG", "warn,sluice_connectors=info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sluice");
        Sluice { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGINT, then waits for a clean exit.
    pub fn interrupt(mut self) -> (ExitStatus, String) {
        broker::signal(self.pid(), libc::SIGINT);
        let status = self.wait(Duration::from_secs(60));
        (status, self.log_text())
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("sluice did not exit in {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output rows by input id, with how often each id was written.
pub fn by_id(payloads: &[String]) -> (HashMap<i64, Value>, HashMap<i64, usize>) {
    let mut rows = HashMap::new();
    let mut counts = HashMap::new();
    for p in payloads {
        let v: Value = serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}"));
        let id = v["id"].as_i64().unwrap();
        *counts.entry(id).or_insert(0) += 1;
        rows.insert(id, v);
    }
    (rows, counts)
}

/// The first ten of `want` that `have` lacks (none: nothing lost).
pub fn missing_ids<V>(have: &HashMap<i64, V>, want: impl Iterator<Item = i64>) -> Vec<i64> {
    want.filter(|i| !have.contains_key(i)).take(10).collect()
}

/// Waits until `topic` holds at least `want` messages (read from the beginning each time).
pub fn wait_for_output(
    broker: &Broker,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> Vec<String> {
    broker.read_all(topic, want, timeout)
}

/// Waits while `sluice` runs until `dir/out` holds `rows` JSON lines and `dir/dlq`
/// `letters`; fails after `timeout` with the counts and the log.
pub fn wait_for_lines(
    sluice: &mut Sluice,
    dir: &Path,
    rows: usize,
    letters: usize,
    timeout: Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    let count = |name: &str| crate::json_lines(&dir.join(name)).len();
    while count("out") < rows || count("dlq") < letters {
        assert!(
            sluice.running() && std::time::Instant::now() < deadline,
            "{} rows, {} dead letters:\n{}",
            count("out"),
            count("dlq"),
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Writes the pipeline file into `dir`.
pub fn write_pipeline(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("pipeline.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Sends the messages at about `per_second` on a thread of its own.
pub fn produce_paced(
    broker: &Broker,
    topic: &str,
    messages: Vec<(i32, Option<String>, Vec<u8>)>,
    per_second: usize,
) -> std::thread::JoinHandle<()> {
    let bootstrap = broker.bootstrap.clone();
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let started = Instant::now();
        let chunk = (per_second / 20).max(1);
        for (i, part) in messages.chunks(chunk).enumerate() {
            Broker::with_bootstrap(&bootstrap).produce(&topic, part);
            let due = started + Duration::from_millis(50 * (i as u64 + 1));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })
}

/// Waits until the log says at least one partition was assigned.
pub fn wait_assigned(sluice: &mut Sluice, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !sluice.log_text().contains("kafka partition assigned") {
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        assert!(
            Instant::now() < deadline,
            "no partition assigned in {timeout:?}:\n{}",
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The partitions a process's log says it was assigned, in order of the log.
pub fn assigned_partitions(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("kafka partition assigned"))
        .filter_map(|l| l.split("partition=").nth(1))
        .map(|p| p.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// The records in `topic` by their `id`: how many were written and how many distinct ids,
/// reported on stderr. Waits until `want` are there (or two minutes), then reads all.
pub fn ids_written(broker: &Broker, topic: &str, want: usize) -> (usize, usize) {
    broker.read_all(topic, want, Duration::from_secs(120));
    let ids: Vec<i64> = broker
        .read_all(topic, usize::MAX, Duration::from_secs(5))
        .iter()
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    eprintln!(
        "{want} records in, {} out, {distinct} distinct, {} duplicates",
        ids.len(),
        ids.len() - distinct
    );
    (ids.len(), distinct)
}

/// A file sink writing JSON lines under `out`, closing a file every 100 ms.
pub fn jsonl_sink(out: &Path) -> String {
    format!(
        "sink:\n  type: file\n  path: {}\n  format: jsonl\n  max_file_age: 100ms\n",
        out.display()
    )
}

/// A pipeline run in this process: its stats and report once it ends.
pub type Run = tokio::task::JoinHandle<
    anyhow::Result<(
        std::sync::Arc<sluice_engine::stats::RunStats>,
        sluice_engine::executor::RunReport,
    )>,
>;

/// Runs the pipeline in this process (against a mock cluster the test holds) until the
/// token is cancelled.
pub fn spawn_run(
    config: sluice::config::PipelineConfig,
) -> (tokio_util::sync::CancellationToken, Run) {
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { sluice::run_config(&config, Default::default(), stop).await }
    });
    (stop, run)
}
