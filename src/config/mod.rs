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
//!
//! # Where things are
//! Here: the pipeline's sections, `load`/`parse`, checkpoints, scaling and the choice of
//! `sources:`/`sinks:` entries. `source.rs`, `stages.rs`, `sink.rs`: each kind's fields and
//! checks. `cases.rs`: the pipeline's `tests:`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sluice_connectors::file::FileSinkConfig;
use sluice_connectors::registry;
use sluice_engine::autoscale::{LagThreshold, ScalingPolicy};
use sluice_engine::batch;
use sluice_engine::breaker::{Breaker, BreakerPolicy, Fallback};
use sluice_engine::config::yaml::{self, Env, ProcessEnv};
use sluice_engine::config::{
    Duration, Location, Node, Problems, Value, check_keys, from_node, select_keys,
};
use sluice_engine::connector::{
    SinkSpec, SourceSpec, StageSpec, downcast_sink, downcast_source, split_kind_in,
};
use sluice_engine::executor::{Batching, CheckpointPolicy};
use sluice_engine::failure::FailurePolicy;

mod cases;
pub mod graph;
mod sink;
mod source;
mod stages;

use cases::*;
use graph::{Entry, Ref, RouteEntry};
use sink::*;
use source::*;
use stages::*;

/// The name of the output the `sink:` makes (and of the stage its refused rows are
/// dead-lettered under).
pub const SINK_NAME: &str = sluice_engine::executor::SINK_STAGE;

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
    /// In an order where each stage comes after what it reads (see [`graph`]).
    pub stages: Vec<StageConfig>,
    /// Where rows go: the `sink:`, and the `sinks:` entries that name an `input`.
    pub outputs: Vec<SinkConfig>,
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
    /// The `type:` that named it (an entry of `sluice_connectors::registry::SOURCES`).
    pub kind: &'static str,
    pub spec: Arc<dyn SourceSpec>,
    /// Where the source is in the file, for problems found while building it.
    pub at: At,
}

impl SourceConfig {
    /// The kind's own configuration, when it is a `T` (a Kafka source's brokers, ...).
    pub fn spec_as<T: SourceSpec>(&self) -> Option<&T> {
        downcast_source(self.spec.as_ref())
    }
}

pub struct StageConfig {
    /// Its name; a route's branch is `ROUTE.BRANCH`.
    pub name: String,
    /// The `type:` that named it (an entry of `sluice_udfs::registry::STAGES`).
    pub kind: &'static str,
    pub spec: Arc<dyn StageSpec>,
    pub policy: FailurePolicy,
    /// Its `input`/`inputs` as written; `None`: the stage before it.
    pub reads: Option<Vec<Ref>>,
    /// What it reads, resolved: the source or stages before it in `PipelineConfig::stages`.
    pub inputs: Vec<sluice_engine::graph::Input>,
    pub at: At,
}

#[derive(Clone)]
pub struct SinkConfig {
    /// `sink` for the `sink:`, the entry's name for a `sinks:` entry used as an output.
    pub name: String,
    /// Its `input`/`inputs` as written; `None`: the last stage.
    pub reads: Option<Vec<Ref>>,
    /// What it reads, resolved (as `StageConfig::inputs`).
    pub inputs: Vec<sluice_engine::graph::Input>,
    /// The `type:` that named it (an entry of `sluice_connectors::registry::SINKS`).
    pub kind: &'static str,
    pub spec: Arc<dyn SinkSpec>,
    /// Metadata columns (`_partition`, `_offset`, `_key`, `_timestamp`; Kafka: `_topic`,
    /// `_headers`) to write as well.
    pub metadata_columns: Vec<String>,
    pub at: At,
}

impl SinkConfig {
    /// The kind's own configuration, when it is a `T`.
    pub fn spec_as<T: SinkSpec>(&self) -> Option<&T> {
        downcast_sink(self.spec.as_ref())
    }
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
    /// The lag one worker is meant to carry: records (default 10000), or for a source
    /// whose lag is in time (Kinesis) a time behind the stream's tip (default 30s).
    lag_threshold: Option<Threshold>,
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

/// `lag_threshold`: a number of records, or a time (`30s`).
#[derive(Debug, Clone, Copy)]
struct Threshold(LagThreshold);

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl serde::de::Visitor<'_> for Either {
            type Value = Threshold;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of records (10000) or a time behind the stream's tip (30s)")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Threshold, E> {
                Ok(Threshold(LagThreshold::Records(n)))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Threshold, E> {
                // Zero is refused with the other scaling mistakes.
                let n = u64::try_from(n).map_err(|_| E::custom("must be at least 1 record"))?;
                Ok(Threshold(LagThreshold::Records(n)))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Threshold, E> {
                let time: Duration = text.parse().map_err(E::custom)?;
                Ok(Threshold(LagThreshold::Time(time.get())))
            }
        }
        d.deserialize_any(Either)
    }
}

fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}

fn default_scaling_interval() -> Duration {
    Duration::from_secs(1)
}

/// `source`: the pipeline's source (its kind, and how it measures lag), when it was read.
fn parse_scaling(
    n: &Node,
    source: Option<&SourceConfig>,
    problems: &mut Problems,
) -> Option<Scaling> {
    let kind = source.map_or("", |s| s.kind);
    let in_time = source.and_then(|s| s.spec.lag_in_time());
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
    let lag_threshold = c.lag_threshold.map_or_else(
        || ScalingPolicy::for_lag(in_time.is_some()).lag_threshold,
        |t| t.0,
    );
    match (lag_threshold, in_time) {
        (LagThreshold::Records(0), _) => {
            problems.at_key(n, &path, "lag_threshold", "must be at least 1 record");
        }
        (LagThreshold::Time(t), _) if t.is_zero() => {
            problems.at_key(n, &path, "lag_threshold", "must be longer than 0s");
        }
        (LagThreshold::Records(_), Some(lag)) => problems.at_key(
            n,
            &path,
            "lag_threshold",
            format!(
                "is a number of records, but {lag}: give a time behind the stream's tip, e.g. 30s"
            ),
        ),
        (LagThreshold::Time(_), None) => problems.at_key(
            n,
            &path,
            "lag_threshold",
            format!(
                "is a time, but a {kind} source's lag is in records: give a number of records, e.g. 10000"
            ),
        ),
        _ => {}
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
            lag_threshold,
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

/// A `tests:` case: records in, the exact records expected in an output.
pub struct TestCase {
    pub name: String,
    pub input: Vec<(Node, serde_json::Value)>,
    pub expected: Vec<serde_json::Value>,
    /// The output whose rows are compared (its index in `PipelineConfig::outputs`).
    pub output: usize,
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
    let is_output = |n: &Node| n.get("input").is_some() || n.get("inputs").is_some();
    let sink_entries: Vec<(&Node, &Node)> = match root.get("sinks").map(|n| &n.value) {
        Some(Value::Map(entries)) => entries.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    };
    let graph_outputs = sink_entries.iter().any(|(_, v)| is_output(v));
    let mut outputs = Vec::new();
    let mut outputs_complete = true;
    match root.get("sink") {
        Some(n) => {
            let picked = n.scalar().unwrap_or(SINK_NAME).to_string();
            // Named `sink` whichever entry it picks: tests, metrics and dead letters keep
            // their names when the environment picks another.
            if let Some(entry) = n.scalar().and_then(|k| root.get("sinks")?.get(k))
                && is_output(entry)
            {
                problems.at(
                    &Location::new("sink"),
                    n,
                    format!("picks `{picked}`, which is an output of its own (it names an `input`): remove `sink:` or the entry's `input`"),
                );
            }
            match pick(&root, n, "sink", "sinks", &mut problems)
                .and_then(|(n, path)| parse_sink(n, &path, SINK_NAME, &mut problems))
            {
                Some(sink) => outputs.push(sink),
                None => outputs_complete = false,
            }
        }
        None if !graph_outputs => {
            problems.at(
                &root_path.key("sink"),
                &root,
                "missing required field `sink` (or `sinks:` entries that name their `input`)",
            );
            outputs_complete = false;
        }
        None => {}
    }
    for (key, node) in &sink_entries {
        if !is_output(node) {
            continue;
        }
        let name = key.scalar().unwrap_or_default();
        let path = Location::new("sinks").key(name);
        if !sluice_engine::config::valid_name(name) {
            problems.at(
                &path,
                key,
                format!("`{name}` is not a valid output name: use letters, digits, _ and -"),
            );
        }
        if outputs.iter().any(|o: &SinkConfig| o.name == name) {
            problems.at(
                &path,
                key,
                format!(
                    "the output name `{name}` is used twice (the `sink:` is named `{SINK_NAME}`)"
                ),
            );
        }
        match parse_sink(node, &path, name, &mut problems) {
            Some(sink) => outputs.push(sink),
            None => outputs_complete = false,
        }
    }
    let dead_letter = root
        .get("dead_letter")
        .and_then(|n| pick(&root, n, "dead_letter", "sinks", &mut problems))
        .and_then(|(n, path)| parse_sink(n, &path, "dead_letter", &mut problems));
    if let Some(dead) = &dead_letter
        && dead.reads.is_some()
    {
        dead.at.problem(
            &mut problems,
            "input",
            "does not apply to the dead letters: they are the records that failed anywhere in the pipeline",
        );
    }
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
            let name = key.scalar().unwrap_or_default();
            let path = Location::new(alternatives).key(name);
            let picked = |k: &str| root.get(k).and_then(Node::scalar) == key.scalar();
            if is_source && !picked("source") {
                parse_source(node, path, &mut problems);
            } else if !is_source && !picked("sink") && !picked("dead_letter") && !is_output(node) {
                parse_sink(node, &path, name, &mut problems);
                // An entry left out is an alternative of a `sink:` or `dead_letter:` that
                // picks by name; with neither, it is an output nothing feeds.
                let picks = |k: &str| root.get(k).and_then(Node::scalar).is_some();
                if graph_outputs && !picks("sink") && !picks("dead_letter") {
                    problems.at(
                        &path,
                        key,
                        format!("nothing feeds the sink `{name}`: give it `input: STAGE` (the other `sinks:` entries are outputs), or pick it with `dead_letter: {name}`"),
                    );
                }
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
    } else if let Some(dead) = &dead_letter {
        for output in &outputs {
            check_dead_letter_files(output, dead, &mut problems);
        }
    }
    for (i, a) in outputs.iter().enumerate() {
        for b in &outputs[i + 1..] {
            check_files_apart(a, b, &mut problems);
        }
    }
    let stages = match stages {
        Some((stages, entries, routes)) if outputs_complete => {
            graph::resolve(stages, &entries, &routes, &mut outputs, &mut problems)
        }
        _ => None,
    };
    let scaling = root
        .get("scaling")
        .and_then(|n| parse_scaling(n, source.as_ref(), &mut problems));
    let tests = parse_tests(root.get("tests"), &outputs, &mut problems);

    match (name, source, stages) {
        (Some(name), Some(source), Some(stages)) if problems.is_empty() && outputs_complete => {
            Ok(PipelineConfig {
                file: file.to_string(),
                name,
                source,
                stages,
                outputs,
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
    if let Some(clash) = files_clash(sink, dead) {
        dead.at.problem(
            problems,
            "path",
            format!("{clash}: dead letters would be mixed into the output and overwrite its files; give the dead letters another `path` or a `prefix` that does not start the sink's"),
        );
    }
}

/// Two outputs of files must not write the same files, for the same reasons.
fn check_files_apart(a: &SinkConfig, b: &SinkConfig, problems: &mut Problems) {
    if let Some(clash) = files_clash(a, b) {
        b.at.problem(
            problems,
            "path",
            format!("{clash}: the two outputs would overwrite each other's files; give one another `path` or `prefix`"),
        );
    }
}

/// How `b` would write `a`'s files (the same directory and format, prefixes that overlap),
/// if it would.
fn files_clash(a: &SinkConfig, b: &SinkConfig) -> Option<String> {
    let (s, d) = (
        downcast_sink::<FileSinkConfig>(a.spec.as_ref())?,
        downcast_sink::<FileSinkConfig>(b.spec.as_ref())?,
    );
    let ext = s.format.extension();
    // Worker processes and replays add `-NAME` to a prefix, and `sluice dlq` reads every
    // `{prefix}-*` file: `part` and `part-out` in one directory would read as one.
    let overlap = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|rest| rest.starts_with('-'));
    let overlapping =
        s.prefix == d.prefix || overlap(&s.prefix, &d.prefix) || overlap(&d.prefix, &s.prefix);
    if !overlapping || ext != d.format.extension() || same_dir_key(&s.path) != same_dir_key(&d.path)
    {
        return None;
    }
    let line =
        a.at.node
            .get("path")
            .map_or(a.at.node.mark, |n| n.mark)
            .line;
    Some(format!(
        "is where `{}` writes its files (line {line}), with names that overlap (`{}-*.{ext}` and `{}-*.{ext}`)",
        a.at.path, s.prefix, d.prefix
    ))
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
