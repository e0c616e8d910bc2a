//! The pipeline file: its top-level sections and the closed sets of source, stage and sink
//! kinds.
//!
//! ```yaml
//! name: quickstart
//! source: { type: generator, partitions: 4, count: 1000000, batch_size: 8192 }
//! stages:
//!   - name: plays
//!     type: sql
//!     query: SELECT user_id, title_id FROM input WHERE event_type = 'play'
//! sink: { type: file, path: out/quickstart }
//! ```
//!
//! [`load`] reads a whole file and returns every problem in it at once, each with its YAML
//! path and line:column (see `sluice_engine::config`). It does no I/O beyond reading the
//! file (and looking up which directories the file sinks' paths name, to tell whether two
//! are one): opening data files and planning queries happen in [`crate::plan`].

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_connectors::file::{FileSinkConfig, FileSourceConfig};
use sluice_connectors::generator::GeneratorConfig;
use sluice_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use sluice_connectors::nexmark::NexmarkConfig;
use sluice_connectors::null::NullConfig;
use sluice_connectors::stdout::StdoutConfig;
use sluice_engine::autoscale::ScalingPolicy;
use sluice_engine::batch;
use sluice_engine::breaker::{Breaker, BreakerPolicy, Fallback};
use sluice_engine::config::yaml::{self, Env, ProcessEnv};
use sluice_engine::config::{
    Duration, Location, Node, Problems, Value, check_keys, from_node, select_keys, split_kind,
};
use sluice_engine::executor::{Batching, CheckpointPolicy};
use sluice_engine::failure::FailurePolicy;
use sluice_udfs::aggregate::AggregateConfig;
use sluice_udfs::functions::{self, FunctionSpec};

const TOP_LEVEL: &[&str] = &[
    "name",
    "source",
    "sources",
    "stages",
    "sink",
    "sinks",
    "dead_letter",
    "checkpoint",
    "scaling",
    "tests",
];

/// A pipeline file, read and checked.
pub struct PipelineConfig {
    pub file: String,
    pub name: String,
    pub source: SourceConfig,
    pub stages: Vec<StageConfig>,
    pub sink: SinkConfig,
    pub dead_letter: Option<SinkConfig>,
    pub checkpoint: Option<Checkpointing>,
    /// Worker tasks follow the partitions' lag (see `sluice_engine::autoscale`).
    pub scaling: Option<Scaling>,
    pub tests: Vec<TestCase>,
}

/// The `scaling` section, read.
pub struct Scaling {
    pub policy: ScalingPolicy,
    pub at: At,
}

/// The `checkpoint` section, read.
pub struct Checkpointing {
    pub dir: PathBuf,
    pub interval: std::time::Duration,
    pub at: At,
}

pub struct SourceConfig {
    pub batching: Batching,
    pub kind: SourceKind,
    /// Where the source is in the file, for problems found while building it.
    pub at: At,
}

pub enum SourceKind {
    Generator(GeneratorConfig),
    Nexmark(NexmarkConfig),
    File(FileSourceConfig),
    Kafka(KafkaSourceConfig),
}

pub struct StageConfig {
    pub name: String,
    pub kind: StageKind,
    pub policy: FailurePolicy,
    pub at: At,
}

pub enum StageKind {
    Sql {
        query: String,
    },
    Function {
        function: String,
        spec: Box<dyn FunctionSpec>,
    },
    Aggregate(Box<AggregateConfig>),
}

impl StageKind {
    /// The key whose value a planning problem points at.
    pub fn main_key(&self) -> &'static str {
        match self {
            StageKind::Sql { .. } => "query",
            StageKind::Function { .. } => "params",
            StageKind::Aggregate(_) => "aggregates",
        }
    }
}

#[derive(Clone)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// Metadata columns (`_partition`, `_offset`, `_key`, `_timestamp`; Kafka: `_topic`,
    /// `_headers`) to write as well.
    pub metadata_columns: Vec<String>,
    pub at: At,
}

#[derive(Clone)]
pub enum SinkKind {
    File(FileSinkConfig),
    Kafka(KafkaSinkConfig),
    Stdout(StdoutConfig),
    Null(NullConfig),
}

/// Where checkpoints are kept and how often they are taken. With it, a restarted pipeline
/// goes on from the last checkpoint; without it, every run starts at the beginning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointConfig {
    /// A directory for the checkpoint store (RocksDB), one per pipeline.
    dir: PathBuf,
    /// Time between checkpoints (default 10s). Records written after the last checkpoint
    /// are written again after a crash, so this bounds the duplicates.
    #[serde(default = "default_checkpoint_interval")]
    interval: Duration,
}

fn default_checkpoint_interval() -> Duration {
    Duration(CheckpointPolicy::DEFAULT_INTERVAL)
}

/// How many workers run, from the partitions' lag: `desired = clamp(ceil(lag /
/// lag_threshold), min_workers, min(max_workers, partitions × parallelization_factor))`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScalingConfig {
    #[serde(default = "one")]
    min_workers: usize,
    /// Default: one per core.
    max_workers: Option<usize>,
    /// Records of lag one worker is meant to carry (default 10000).
    #[serde(default = "default_lag_threshold")]
    lag_threshold: u64,
    /// How long the lag must ask for fewer workers before they go (default 60s).
    #[serde(default = "default_cooldown")]
    scale_down_cooldown: Duration,
    /// Batches of one partition processed at once, each key's records kept in order (1–10).
    #[serde(default = "one")]
    parallelization_factor: usize,
    /// The column that keeps records in order under a parallelization factor (default
    /// `_key`, the record's key: Kafka's message key).
    key: Option<String>,
    /// Time between evaluations of the lag (default 1s).
    #[serde(default = "default_scaling_interval")]
    interval: Duration,
}

fn one() -> usize {
    1
}

fn default_lag_threshold() -> u64 {
    10_000
}

fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}

fn default_scaling_interval() -> Duration {
    Duration::from_secs(1)
}

fn parse_scaling(n: &Node, problems: &mut Problems) -> Option<Scaling> {
    let path = Location::new("scaling");
    let c: ScalingConfig = from_node(n, &path, &[], problems)?;
    let before = problems.len();
    let max_workers = c
        .max_workers
        .unwrap_or_else(|| ScalingPolicy::default().max_workers.max(c.min_workers));
    if c.min_workers == 0 {
        problems.at_key(n, &path, "min_workers", "must be at least 1");
    }
    if max_workers < c.min_workers {
        problems.at_key(
            n,
            &path,
            "max_workers",
            format!("is {max_workers}, below min_workers ({})", c.min_workers),
        );
    }
    if c.lag_threshold == 0 {
        problems.at_key(n, &path, "lag_threshold", "must be at least 1 record");
    }
    if !(1..=10).contains(&c.parallelization_factor) {
        problems.at_key(
            n,
            &path,
            "parallelization_factor",
            format!("is {}; it must be from 1 to 10", c.parallelization_factor),
        );
    }
    if c.interval.get().is_zero() {
        problems.at_key(n, &path, "interval", "must be longer than 0s");
    }
    (problems.len() == before).then(|| Scaling {
        policy: ScalingPolicy {
            min_workers: c.min_workers,
            max_workers,
            lag_threshold: c.lag_threshold,
            scale_down_cooldown: c.scale_down_cooldown.get(),
            parallelization_factor: c.parallelization_factor,
            key: c.key.map(Into::into),
            interval: c.interval.get(),
        },
        at: At {
            node: n.clone(),
            path,
        },
    })
}

/// A `tests:` case: records in, the exact records expected out of the last stage.
pub struct TestCase {
    pub name: String,
    pub input: Vec<(Node, serde_json::Value)>,
    pub expected: Vec<serde_json::Value>,
    pub at: At,
}

/// A component's node and YAML path, kept to place problems found after parsing.
#[derive(Clone)]
pub struct At {
    pub node: Node,
    pub path: Location,
}

impl At {
    /// A problem about `key` of this component (or the component itself when absent).
    pub fn problem(&self, problems: &mut Problems, key: &str, message: impl Into<String>) {
        problems.at_key(&self.node, &self.path, key, message);
    }
}

/// Reads a pipeline file with the process environment.
pub fn load(path: &Path) -> Result<PipelineConfig, Problems> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut p = Problems::new(&name);
        p.push(sluice_engine::config::Problem {
            path: Location::root(),
            mark: None,
            message: format!("cannot read the file: {e}"),
        });
        p
    })?;
    parse(&name, &text, &ProcessEnv)
}

/// Reads pipeline text; `file` names it in messages.
pub fn parse(file: &str, text: &str, env: &dyn Env) -> Result<PipelineConfig, Problems> {
    let mut problems = Problems::new(file);
    let Some(root) = yaml::parse(text, env, &mut problems) else {
        return Err(problems.sorted());
    };
    let root_path = Location::root();
    if !check_keys(&root, &root_path, TOP_LEVEL, &mut problems) {
        return Err(problems.sorted());
    }
    let required = |key: &str, problems: &mut Problems| -> Option<&Node> {
        let node = root.get(key);
        if node.is_none() {
            problems.at(
                &root_path.key(key),
                &root,
                format!("missing required field `{key}`"),
            );
        }
        node
    };

    let name = required("name", &mut problems)
        .and_then(|n| from_node::<String>(n, &Location::new("name"), &[], &mut problems));
    if let Some(n) = &name
        && n.trim().is_empty()
    {
        problems.at_key(&root, &root_path, "name", "must not be empty");
    }
    let source = required("source", &mut problems)
        .and_then(|n| pick(&root, n, "source", "sources", &mut problems))
        .and_then(|(n, path)| parse_source(n, path, &mut problems));
    let stages = parse_stages(root.get("stages"), &mut problems);
    let sink = required("sink", &mut problems)
        .and_then(|n| pick(&root, n, "sink", "sinks", &mut problems))
        .and_then(|(n, path)| parse_sink(n, &path, &mut problems));
    let dead_letter = root
        .get("dead_letter")
        .and_then(|n| pick(&root, n, "dead_letter", "sinks", &mut problems))
        .and_then(|(n, path)| parse_sink(n, &path, &mut problems));
    let checkpoint = root.get("checkpoint").and_then(|n| {
        let path = Location::new("checkpoint");
        let c: CheckpointConfig = from_node(n, &path, &[], &mut problems)?;
        if c.interval.get().is_zero() {
            problems.at_key(n, &path, "interval", "must be longer than 0s");
        }
        Some(Checkpointing {
            dir: c.dir,
            interval: c.interval.get(),
            at: At {
                node: n.clone(),
                path,
            },
        })
    });
    // The alternatives not picked are checked too: a mistake in the Kafka section shows up
    // when the file is validated locally, not first in production.
    for (alternatives, is_source) in [("sources", true), ("sinks", false)] {
        let Some(Value::Map(entries)) = root.get(alternatives).map(|n| &n.value) else {
            continue;
        };
        if let Some((key, _)) = entries.iter().find(|(k, _)| k.scalar() == Some("type")) {
            let one = if is_source { "source" } else { "sink" };
            problems.at(
                &Location::new(alternatives),
                key,
                format!(
                    "holds alternatives by name, picked with `{one}: NAME` (e.g. `{alternatives}: {{ local: {{ type: file, ... }}, kafka: {{ type: kafka, ... }} }}`); a single {one} is written under `{one}:`"
                ),
            );
            continue;
        }
        for (key, node) in entries {
            let path = Location::new(alternatives).key(key.scalar().unwrap_or_default());
            let picked = |k: &str| root.get(k).and_then(Node::scalar) == key.scalar();
            if is_source && !picked("source") {
                parse_source(node, path, &mut problems);
            } else if !is_source && !picked("sink") && !picked("dead_letter") {
                parse_sink(node, &path, &mut problems);
            }
        }
    }
    if let (Some(sink), Some(dead)) = (
        root.get("sink").and_then(Node::scalar),
        root.get("dead_letter").and_then(Node::scalar),
    ) && sink == dead
        && let Some(node) = root.get("dead_letter")
    {
        problems.at(
            &Location::new("dead_letter"),
            node,
            format!("picks `{dead}`, the same entry as `sink`: dead letters would be mixed into the output"),
        );
    } else if let (Some(sink), Some(dead)) = (&sink, &dead_letter) {
        check_dead_letter_files(sink, dead, &mut problems);
    }
    let scaling = root
        .get("scaling")
        .and_then(|n| parse_scaling(n, &mut problems));
    let tests = parse_tests(root.get("tests"), &mut problems);

    match (name, source, stages, sink) {
        (Some(name), Some(source), Some(stages), Some(sink)) if problems.is_empty() => {
            Ok(PipelineConfig {
                file: file.to_string(),
                name,
                source,
                stages,
                sink,
                dead_letter,
                checkpoint,
                scaling,
                tests,
            })
        }
        _ => Err(problems.sorted()),
    }
}

/// A `dead_letter` of files must not write the `sink`'s files (the same directory, prefix
/// and format): dead letters would be mixed into the output, and the two writers would
/// number their files alike, replace each other's and remove each other's unfinished ones.
fn check_dead_letter_files(sink: &SinkConfig, dead: &SinkConfig, problems: &mut Problems) {
    let (SinkKind::File(s), SinkKind::File(d)) = (&sink.kind, &dead.kind) else {
        return;
    };
    let ext = s.format.extension();
    // Worker processes and replays add `-NAME` to a prefix, and `sluice dlq` reads every
    // `{prefix}-*` file: `part` and `part-out` in one directory would read as one.
    let overlap = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|rest| rest.starts_with('-'));
    let overlapping =
        s.prefix == d.prefix || overlap(&s.prefix, &d.prefix) || overlap(&d.prefix, &s.prefix);
    if !overlapping || ext != d.format.extension() || same_dir_key(&s.path) != same_dir_key(&d.path)
    {
        return;
    }
    let line = sink
        .at
        .node
        .get("path")
        .map_or(sink.at.node.mark, |n| n.mark)
        .line;
    dead.at.problem(
        problems,
        "path",
        format!(
            "is where `{}` writes its files (line {line}), with names that overlap (`{}-*.{ext}` and `{}-*.{ext}`): dead letters would be mixed into the output and overwrite its files; give the dead letters another `path` or a `prefix` that does not start the sink's",
            sink.at.path, s.prefix, d.prefix
        ),
    );
}

/// The directory `path` names, the same for every spelling of it: absolute, with symbolic
/// links, `.` and `..` resolved as far as the directory exists, and the rest (not created
/// yet) normalised as written.
fn same_dir_key(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let parts: Vec<Component> = absolute.components().collect();
    for existing in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..existing].iter().collect();
        let Ok(mut resolved) = head.canonicalize() else {
            continue;
        };
        for part in &parts[existing..] {
            match part {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => resolved.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return resolved;
    }
    absolute
}

const SOURCE_KINDS: &[&str] = &["generator", "nexmark", "file", "kafka"];
const SOURCE_COMMON: &[&str] = &["type", "batch_size", "batch_window"];

/// Fields every source has.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceCommon {
    #[serde(rename = "type")]
    _type: String,
    /// The most records in one batch (default 8192).
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    /// The longest a batch waits to fill up after its first record (default 100ms).
    #[serde(default = "default_batch_window")]
    batch_window: Duration,
}

fn default_batch_size() -> usize {
    8192
}
fn default_batch_window() -> Duration {
    Duration::from_millis(100)
}

/// `source: kafka` picks the entry `kafka` of the map `sources:` (likewise `sink:` and
/// `dead_letter:` of `sinks:`), so that one pipeline file runs on files or a generator
/// locally and on Kafka in production: `source: ${SOURCE:-generator}`.
fn pick<'a>(
    root: &'a Node,
    node: &'a Node,
    key: &str,
    alternatives: &str,
    problems: &mut Problems,
) -> Option<(&'a Node, Location)> {
    let Some(name) = node.scalar() else {
        return Some((node, Location::new(key)));
    };
    let choices = root.get(alternatives);
    match choices.and_then(|c| c.get(name)) {
        Some(chosen) => Some((chosen, Location::new(alternatives).key(name))),
        None => {
            let names: Vec<String> = match choices.map(|c| &c.value) {
                Some(Value::Map(entries)) => entries
                    .iter()
                    .filter_map(|(k, _)| k.scalar().map(|k| format!("`{k}`")))
                    .collect(),
                _ => Vec::new(),
            };
            let message = if names.is_empty() {
                format!(
                    "`{key}: {name}` names an entry of `{alternatives}:`, but there is no `{alternatives}:` map; write the {key} here as a map with a `type`"
                )
            } else {
                format!(
                    "`{name}` is not one of the `{alternatives}:` entries ({})",
                    names.join(", ")
                )
            };
            problems.at(&Location::new(key), node, message);
            None
        }
    }
}

fn parse_source(node: &Node, path: Location, problems: &mut Problems) -> Option<SourceConfig> {
    let (kind, node) = split_kind(node, &path, SOURCE_KINDS, problems)?;
    let common = select_keys(node, SOURCE_COMMON, true);
    let rest = select_keys(node, SOURCE_COMMON, false);
    let common: Option<SourceCommon> = from_node(&common, &path, &[], problems);
    let kind = match kind {
        "generator" => {
            from_node(&rest, &path, SOURCE_COMMON, problems).map(|c: GeneratorConfig| {
                c.validate(node, &path, problems);
                SourceKind::Generator(c)
            })
        }
        "nexmark" => from_node(&rest, &path, SOURCE_COMMON, problems).map(|c: NexmarkConfig| {
            c.validate(node, &path, problems);
            SourceKind::Nexmark(c)
        }),
        "file" => from_node(&rest, &path, SOURCE_COMMON, problems).map(|c: FileSourceConfig| {
            c.validate(node, &path, problems);
            SourceKind::File(c)
        }),
        "kafka" => from_node(&rest, &path, SOURCE_COMMON, problems).map(|c: KafkaSourceConfig| {
            c.validate(node, &path, problems);
            SourceKind::Kafka(c)
        }),
        _ => unreachable!("split_kind checked the kind"),
    };
    let common = common?;
    if common.batch_size == 0 {
        problems.at_key(node, &path, "batch_size", "must be at least 1");
    }
    Some(SourceConfig {
        batching: Batching {
            size: common.batch_size,
            window: common.batch_window.get(),
        },
        kind: kind?,
        at: At {
            node: node.clone(),
            path,
        },
    })
}

const STAGE_KINDS: &[&str] = &["sql", "function", "aggregate"];
const STAGE_COMMON: &[&str] = &[
    "name",
    "type",
    "retry",
    "bisect_on_error",
    "max_record_age",
    "timeout",
    "concurrency",
    "circuit_breaker",
    "fallback",
    "fallback_values",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageCommon {
    /// A stable name: it labels metrics, errors and dead-lettered records.
    name: String,
    #[serde(rename = "type")]
    _type: String,
    /// How transient failures are retried (default: 3 attempts, backoff 100ms doubling to
    /// 10s, with jitter).
    retry: Option<RetryConfig>,
    /// Split a batch that fails (not transiently) in halves, down to single rows, so that
    /// only the failing rows become dead letters (default false).
    #[serde(default)]
    bisect_on_error: bool,
    /// A record older than this (by `_timestamp`) is not retried but dead-lettered.
    max_record_age: Option<Duration>,
    /// A call that takes longer fails as a transient error.
    timeout: Option<Duration>,
    /// At most this many calls of the stage at once, across workers.
    concurrency: Option<usize>,
    /// Stop calling the stage while its calls fail transiently too often.
    circuit_breaker: Option<BreakerConfig>,
    /// While the circuit is open: `dead_letter` (default), `skip`, `default` (the output
    /// columns get `fallback_values`), or `pause` (stop reading until calls pass again).
    #[serde(default)]
    fallback: FallbackKind,
    /// `fallback: default`: values of output columns, e.g. `{ score: 0.0, label: unknown }`.
    #[serde(default)]
    fallback_values: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
enum FallbackKind {
    #[default]
    DeadLetter,
    Skip,
    Default,
    Pause,
}

/// `circuit_breaker:` of a stage.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerConfig {
    /// Open when at least this share of calls in `window` failed transiently (default 0.5).
    #[serde(default = "default_ratio")]
    failure_ratio: f64,
    /// ... and at least this many calls were made in it (default 10).
    #[serde(default = "default_min_calls")]
    min_calls: u32,
    /// The sliding window of calls counted (default 10s).
    #[serde(default = "default_window")]
    window: Duration,
    /// How long the circuit stays open before trial calls (default 5s).
    #[serde(default = "default_open_for")]
    open_for: Duration,
    /// Trial calls that must pass to close the circuit again (default 3).
    #[serde(default = "default_half_open")]
    half_open_calls: u32,
}

fn default_ratio() -> f64 {
    0.5
}
fn default_min_calls() -> u32 {
    10
}
fn default_window() -> Duration {
    Duration::from_secs(10)
}
fn default_open_for() -> Duration {
    Duration::from_secs(5)
}
fn default_half_open() -> u32 {
    3
}

/// `retry:` of a stage.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryConfig {
    /// Calls in all, the first included (1: no retries; default 3).
    #[serde(default = "default_attempts")]
    max_attempts: u32,
    /// The first wait (default 100ms); each next one doubles, with jitter.
    #[serde(default = "default_initial_backoff")]
    initial_backoff: Duration,
    /// The longest wait (default 10s).
    #[serde(default = "default_max_backoff")]
    max_backoff: Duration,
    /// No retry starts later than this after the first failure (default: no limit).
    max_elapsed: Option<Duration>,
}

fn default_attempts() -> u32 {
    FailurePolicy::DEFAULT_MAX_ATTEMPTS
}
fn default_initial_backoff() -> Duration {
    Duration(FailurePolicy::DEFAULT_INITIAL_BACKOFF)
}
fn default_max_backoff() -> Duration {
    Duration(FailurePolicy::DEFAULT_MAX_BACKOFF)
}

impl StageCommon {
    fn policy(&self, node: &Node, path: &Location, problems: &mut Problems) -> FailurePolicy {
        let mut policy = FailurePolicy {
            bisect_on_error: self.bisect_on_error,
            max_record_age: self.max_record_age.map(|d| d.get()),
            timeout: self.timeout.map(|d| d.get()),
            concurrency: self
                .concurrency
                .map(|n| std::sync::Arc::new(tokio::sync::Semaphore::new(n))),
            ..FailurePolicy::default()
        };
        if let Some(b) = &self.circuit_breaker {
            if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
                problems.at_key(
                    node,
                    path,
                    "circuit_breaker",
                    "failure_ratio must be above 0 and at most 1",
                );
            }
            if b.min_calls == 0 || b.half_open_calls == 0 {
                problems.at_key(
                    node,
                    path,
                    "circuit_breaker",
                    "min_calls and half_open_calls must be at least 1",
                );
            }
            policy.breaker = Some(std::sync::Arc::new(Breaker::new(BreakerPolicy {
                failure_ratio: b.failure_ratio,
                min_calls: b.min_calls,
                window: b.window.get(),
                open_for: b.open_for.get(),
                half_open_calls: b.half_open_calls,
            })));
        }
        policy.fallback = match self.fallback {
            FallbackKind::DeadLetter => Fallback::DeadLetter,
            FallbackKind::Skip => Fallback::Skip,
            FallbackKind::Pause => Fallback::Pause,
            FallbackKind::Default => Fallback::Default(self.fallback_values.clone()),
        };
        if self.fallback != FallbackKind::Default && !self.fallback_values.is_empty() {
            problems.at_key(
                node,
                path,
                "fallback_values",
                "only used with `fallback: default`",
            );
        }
        if self.fallback != FallbackKind::DeadLetter && self.circuit_breaker.is_none() {
            problems.at_key(
                node,
                path,
                "fallback",
                "a fallback applies while the circuit is open: add `circuit_breaker`",
            );
        }
        if self.concurrency == Some(0) {
            problems.at_key(node, path, "concurrency", "must be at least 1");
        }
        if let Some(r) = &self.retry {
            if r.max_attempts == 0 {
                problems.at_key(
                    node,
                    path,
                    "retry",
                    "max_attempts must be at least 1 (1: no retries)",
                );
            }
            if r.initial_backoff.get() > r.max_backoff.get() {
                problems.at_key(
                    node,
                    path,
                    "retry",
                    "initial_backoff is longer than max_backoff",
                );
            }
            policy.max_attempts = r.max_attempts;
            policy.initial_backoff = r.initial_backoff.get();
            policy.max_backoff = r.max_backoff.get();
            policy.max_elapsed = r.max_elapsed.map(|d| d.get());
        }
        policy
    }
}

/// `type: sql`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlStageConfig {
    /// A SELECT over the table `input`, which holds the incoming batch.
    query: String,
}

/// `type: function`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionStageConfig {
    /// The function's name in the registry.
    function: String,
    /// The function's parameters; read by the function itself.
    #[serde(default)]
    #[allow(dead_code)]
    params: serde::de::IgnoredAny,
}

fn parse_stages(node: Option<&Node>, problems: &mut Problems) -> Option<Vec<StageConfig>> {
    let Some(node) = node else {
        return Some(Vec::new());
    };
    let path = Location::new("stages");
    let items = match &node.value {
        Value::Seq(items) => items,
        _ if node.is_null() => return Some(Vec::new()),
        _ => {
            problems.at(
                &path,
                node,
                format!("expected a list of stages, found {}", node.describe()),
            );
            return None;
        }
    };
    let mut stages = Vec::with_capacity(items.len());
    let mut complete = true;
    for (i, item) in items.iter().enumerate() {
        match parse_stage(item, &path.index(i), problems) {
            Some(stage) => stages.push(stage),
            None => complete = false,
        }
    }
    for (i, stage) in stages.iter().enumerate() {
        let name = &stage.name;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            stage.at.problem(
                problems,
                "name",
                format!("`{name}` is not a valid stage name: use letters, digits, _ and -"),
            );
        }
        if let Some(first) = stages[..i].iter().find(|s| s.name == *name) {
            stage.at.problem(
                problems,
                "name",
                format!(
                    "the stage name `{name}` is already used by {} (line {})",
                    first.at.path, first.at.node.mark.line
                ),
            );
        }
    }
    complete.then_some(stages)
}

fn parse_stage(node: &Node, path: &Location, problems: &mut Problems) -> Option<StageConfig> {
    let (kind, node) = split_kind(node, path, STAGE_KINDS, problems)?;
    let common = select_keys(node, STAGE_COMMON, true);
    let rest = select_keys(node, STAGE_COMMON, false);
    let common: Option<StageCommon> = from_node(&common, path, &[], problems);
    let kind = match kind {
        "sql" => from_node(&rest, path, STAGE_COMMON, problems).and_then(|c: SqlStageConfig| {
            if c.query.trim().is_empty() {
                problems.at_key(node, path, "query", "must not be empty");
                return None;
            }
            Some(StageKind::Sql { query: c.query })
        }),
        "function" => {
            let c: Option<FunctionStageConfig> = from_node(&rest, path, STAGE_COMMON, problems);
            c.and_then(|c| parse_function(node, path, c.function, problems))
        }
        "aggregate" => AggregateConfig::parse(&rest, path, STAGE_COMMON, problems)
            .map(|c| StageKind::Aggregate(Box::new(c))),
        _ => unreachable!("split_kind checked the kind"),
    };
    let common = common?;
    let policy = common.policy(node, path, problems);
    Some(StageConfig {
        name: common.name,
        kind: kind?,
        policy,
        at: At {
            node: node.clone(),
            path: path.clone(),
        },
    })
}

fn parse_function(
    node: &Node,
    path: &Location,
    function: String,
    problems: &mut Problems,
) -> Option<StageKind> {
    let Some(entry) = functions::lookup(&function) else {
        problems.at_key(
            node,
            path,
            "function",
            format!(
                "unknown function `{function}`, expected one of {}",
                functions::names().join(", ")
            ),
        );
        return None;
    };
    let empty = Node {
        mark: node.mark,
        value: Value::Map(Vec::new()),
    };
    let params = node.get("params").unwrap_or(&empty);
    let spec = (entry.parse)(params, &path.key("params"), problems)?;
    Some(StageKind::Function { function, spec })
}

const SINK_KINDS: &[&str] = &["file", "kafka", "stdout", "null"];
const SINK_COMMON: &[&str] = &["type", "metadata_columns"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkCommon {
    #[serde(rename = "type")]
    _type: String,
    /// Metadata columns to write along with the record columns (default none).
    #[serde(default)]
    metadata_columns: Vec<String>,
}

fn parse_sink(node: &Node, path: &Location, problems: &mut Problems) -> Option<SinkConfig> {
    let (kind, node) = split_kind(node, path, SINK_KINDS, problems)?;
    let common = select_keys(node, SINK_COMMON, true);
    let rest = select_keys(node, SINK_COMMON, false);
    let common: Option<SinkCommon> = from_node(&common, path, &[], problems);
    let kind = match kind {
        "file" => from_node(&rest, path, SINK_COMMON, problems).map(|c: FileSinkConfig| {
            c.validate(node, path, problems);
            SinkKind::File(c)
        }),
        "kafka" => from_node(&rest, path, SINK_COMMON, problems).map(|c: KafkaSinkConfig| {
            c.validate(node, path, problems);
            SinkKind::Kafka(c)
        }),
        "stdout" => from_node(&rest, path, SINK_COMMON, problems).map(SinkKind::Stdout),
        "null" => from_node(&rest, path, SINK_COMMON, problems).map(SinkKind::Null),
        _ => unreachable!("split_kind checked the kind"),
    };
    let common = common?;
    for name in &common.metadata_columns {
        if !batch::is_metadata(name) {
            problems.at_key(
                node,
                path,
                "metadata_columns",
                format!(
                    "`{name}` is not a metadata column, expected some of {}",
                    batch::ALL_METADATA_COLUMNS.join(", ")
                ),
            );
        }
    }
    Some(SinkConfig {
        kind: kind?,
        metadata_columns: common.metadata_columns,
        at: At {
            node: node.clone(),
            path: path.clone(),
        },
    })
}

const TEST_KEYS: &[&str] = &["name", "input", "expected"];

fn parse_tests(node: Option<&Node>, problems: &mut Problems) -> Vec<TestCase> {
    let path = Location::new("tests");
    let Some(node) = node else { return Vec::new() };
    let Value::Seq(items) = &node.value else {
        problems.at(
            &path,
            node,
            format!("expected a list of test cases, found {}", node.describe()),
        );
        return Vec::new();
    };
    let mut tests = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = path.index(i);
        if !check_keys(item, &path, TEST_KEYS, problems) {
            continue;
        }
        let name = match item.get("name").and_then(Node::scalar) {
            Some(n) => n.to_string(),
            None => {
                problems.at(&path.key("name"), item, "missing required field `name`");
                continue;
            }
        };
        let rows = |key: &str, problems: &mut Problems| -> Option<Vec<Node>> {
            let Some(list) = item.get(key) else {
                problems.at(
                    &path.key(key),
                    item,
                    format!("missing required field `{key}`"),
                );
                return None;
            };
            match &list.value {
                Value::Seq(rows) => {
                    let mut ok = true;
                    for (j, row) in rows.iter().enumerate() {
                        if !matches!(row.value, Value::Map(_)) {
                            problems.at(
                                &path.key(key).index(j),
                                row,
                                format!("expected a record (a mapping), found {}", row.describe()),
                            );
                            ok = false;
                        }
                    }
                    ok.then(|| rows.clone())
                }
                _ => {
                    problems.at(
                        &path.key(key),
                        list,
                        format!("expected a list of records, found {}", list.describe()),
                    );
                    None
                }
            }
        };
        let input = rows("input", problems);
        let expected = rows("expected", problems);
        if let (Some(input), Some(expected)) = (input, expected) {
            tests.push(TestCase {
                name,
                input: input
                    .into_iter()
                    .map(|n| {
                        let json = n.to_json();
                        (n, json)
                    })
                    .collect(),
                expected: expected.iter().map(Node::to_json).collect(),
                at: At {
                    node: item.clone(),
                    path,
                },
            });
        }
    }
    tests
}
