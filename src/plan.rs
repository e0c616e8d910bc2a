//! From a checked configuration to a pipeline ready to run: open the source (which settles
//! its schema), plan every stage against the schema the stage before it produces, open the
//! sink. Problems found here point at the component in the YAML that caused them.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use sluice_engine::batch::{self, ColumnSelection};
use sluice_engine::checkpoint::RocksStore;
use sluice_engine::config::Problems;
use sluice_engine::dead_letter::DeadLetterSink;
use sluice_engine::executor::{CheckpointPolicy, Output, Pipeline};
use sluice_engine::graph::{Graph, Input};
use sluice_engine::sink::Sink;
use sluice_engine::source::{Member, Source};
use sluice_engine::stage::PlannedStage;

use crate::config::{PipelineConfig, SinkConfig, SourceConfig};

/// Opens the source; its schema includes the metadata columns.
///
/// With `dead_letters`, records that do not decode become dead letters (where the source
/// supports it) instead of stopping the run.
pub fn open_source(
    config: &SourceConfig,
    dead_letters: bool,
    problems: &mut Problems,
) -> Option<Box<dyn Source>> {
    match config.spec.open(config.batching.size, dead_letters) {
        Ok(source) => Some(source),
        Err(e) => {
            let key = config.spec.open_error_key();
            config.at.problem(problems, key, e.to_string());
            None
        }
    }
}

/// The source's schema when it can be known without reading data (declared, or fixed by
/// the source kind); `sluice test` uses it so that tests need no data files.
pub fn declared_schema(config: &SourceConfig) -> Option<SchemaRef> {
    config.spec.declared_schema()
}

/// The schema of what reads `inputs`: the source's or a planned stage's; with several
/// inputs, they must give the same columns (a problem at `at`'s `inputs` otherwise).
fn schema_of(
    inputs: &[Input],
    source: &SchemaRef,
    planned: &[PlannedStage],
    names: &[String],
    at: &crate::config::At,
    problems: &mut Problems,
) -> Option<SchemaRef> {
    let of = |x: &Input| match x {
        Input::Source => source.clone(),
        Input::Stage(j) => planned[*j].factory.output_schema(),
    };
    let name = |x: &Input| match x {
        Input::Source => crate::config::graph::SOURCE.to_string(),
        Input::Stage(j) => names[*j].clone(),
    };
    let first = of(inputs.first()?);
    for x in &inputs[1..] {
        let other = of(x);
        if other.fields() != first.fields() {
            let columns = |s: &SchemaRef| {
                s.fields()
                    .iter()
                    .map(|f| format!("{} {}", f.name(), f.data_type()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            at.problem(
                problems,
                "inputs",
                format!(
                    "`{}` and `{}` give different columns, so their rows cannot go to one place: `{}` has ({}), `{}` has ({})",
                    name(&inputs[0]),
                    name(x),
                    name(&inputs[0]),
                    columns(&first),
                    name(x),
                    columns(&other)
                ),
            );
            return None;
        }
    }
    Some(first)
}

/// The graph of the configuration: what each stage and output reads.
pub fn graph_of(config: &PipelineConfig) -> Graph {
    Graph {
        stages: config.stages.iter().map(|s| s.inputs.clone()).collect(),
        outputs: config.outputs.iter().map(|o| o.inputs.clone()).collect(),
    }
}

/// Plans every stage in order, each against the schema of what it reads. Stops at the
/// first stage that cannot be planned, since the stages after it may have no input schema.
pub async fn plan_stages(
    config: &PipelineConfig,
    input: SchemaRef,
    problems: &mut Problems,
) -> Option<Vec<PlannedStage>> {
    let mut planned = Vec::with_capacity(config.stages.len());
    let names: Vec<String> = config.stages.iter().map(|s| s.name.clone()).collect();
    for stage in &config.stages {
        let schema = schema_of(&stage.inputs, &input, &planned, &names, &stage.at, problems)?;
        let factory = stage.spec.plan(&stage.name, &schema).await;
        match factory {
            Ok(factory) => {
                if let sluice_engine::breaker::Fallback::Default(values) = &stage.policy.fallback {
                    let out = factory.output_schema();
                    for name in values.keys() {
                        if out.field_with_name(name).is_err() {
                            stage.at.problem(
                                problems,
                                "fallback_values",
                                format!("`{name}` is not an output column of the stage"),
                            );
                        }
                    }
                    let none = arrow::array::RecordBatch::new_empty(schema.clone());
                    if let Err(e) = sluice_engine::failure::defaults(&out, &none, values) {
                        stage.at.problem(problems, "fallback_values", e.to_string());
                    }
                }
                planned.push(PlannedStage {
                    name: stage.name.as_str().into(),
                    factory,
                    policy: stage.policy.clone(),
                });
            }
            Err(e) => {
                stage
                    .at
                    .problem(problems, stage.spec.main_key(), e.to_string());
                return None;
            }
        }
    }
    Some(planned)
}

/// The schema each output writes: what it reads, its metadata columns chosen.
pub fn output_schemas(
    config: &PipelineConfig,
    source: &SchemaRef,
    stages: &[PlannedStage],
    problems: &mut Problems,
) -> Option<Vec<SchemaRef>> {
    let names: Vec<String> = config.stages.iter().map(|s| s.name.clone()).collect();
    let mut out = Vec::with_capacity(config.outputs.len());
    for output in &config.outputs {
        let schema = schema_of(&output.inputs, source, stages, &names, &output.at, problems)?;
        out.push(Arc::new(columns_of(output).apply_schema(&schema)));
    }
    Some(out)
}

/// The metadata columns an output writes.
pub fn columns_of(output: &SinkConfig) -> ColumnSelection {
    ColumnSelection {
        keep_metadata: output.metadata_columns.clone(),
    }
}

/// Opens the sink; `input` is the schema of the batches it will write.
fn open_sink(
    config: &SinkConfig,
    input: &arrow::datatypes::Schema,
    problems: &mut Problems,
) -> Option<Box<dyn Sink>> {
    let key = config.spec.open_error_key();
    config
        .spec
        .open(input)
        .map_err(|e| config.at.problem(problems, key, e.to_string()))
        .ok()
}

/// Opens the dead-letter sink: Kafka gets the records' bytes with provenance headers,
/// the other kinds rows of text.
fn open_dead_letter(config: &SinkConfig, problems: &mut Problems) -> Option<DeadLetterSink> {
    let key = config.spec.open_error_key();
    config
        .spec
        .open_dead_letter()
        .map_err(|e| config.at.problem(problems, key, e.to_string()))
        .ok()
}

/// A parallelization factor splits partitions by a key the records have, and only for
/// stages without state (windows are kept per partition, in the order of its records).
fn check_scaling(
    config: &PipelineConfig,
    schema: &SchemaRef,
    stages: &[PlannedStage],
    problems: &mut Problems,
) {
    let Some(scaling) = &config.scaling else {
        return;
    };
    if scaling.policy.parallelization_factor <= 1 {
        return;
    }
    let key = scaling.policy.key.as_deref().unwrap_or(batch::KEY);
    if schema.field_with_name(key).is_err() {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        scaling.at.problem(
            problems,
            "key",
            format!(
                "`{key}` is not a column of the source's records ({})",
                names.join(", ")
            ),
        );
    }
    if let Some(stateful) = stages.iter().find(|s| s.factory.state().is_some()) {
        scaling.at.problem(
            problems,
            "parallelization_factor",
            format!(
                "cannot be above 1 with the stateful stage `{}`: its windows are kept per partition, in the order of the partition's records",
                stateful.name
            ),
        );
    }
}

/// Checks everything `run` would, without opening the sink or reading records.
pub async fn check(config: &PipelineConfig) -> Result<(), Problems> {
    let mut problems = Problems::new(&config.file);
    let dead_letters = config.dead_letter.is_some();
    if let Some(source) = open_source(&config.source, dead_letters, &mut problems)
        && let Some(stages) = plan_stages(config, source.schema(), &mut problems).await
    {
        check_scaling(config, &source.schema(), &stages, &mut problems);
        output_schemas(config, &source.schema(), &stages, &mut problems);
    }
    problems.into_result(())
}

/// `sluice validate`'s questions to the outside systems the pipeline names (the source's
/// schema against its registry): problems at their keys, and notes.
pub async fn check_remote(config: &PipelineConfig) -> (Problems, Vec<String>) {
    let mut problems = Problems::new(&config.file);
    let check = config.source.spec.check_remote().await;
    for (key, message) in check.problems {
        config.source.at.problem(&mut problems, key, message);
    }
    (problems, check.notes)
}

/// Builds the pipeline: source opened, stages planned, sink opened.
pub async fn build(config: &PipelineConfig) -> Result<Pipeline, Problems> {
    build_with(config, None, None).await
}

/// Like [`build`], for one of several worker processes of a consumer group (`sluice
/// worker`): its checkpoint store is its own within the shared directory
/// (`DIR/members/MEMBER`), partitions bring their state from the member that had them, and
/// file outputs are named `{prefix}-{member}-{seq}`, so that members sharing a directory
/// never write, count or clean up each other's files.
pub async fn build_member(config: &PipelineConfig, member: &str) -> Result<Pipeline, Problems> {
    build_with(config, None, Some(member)).await
}

/// Like [`build`], for a second writer beside the running pipeline (`sluice dlq replay`):
/// no checkpoint store (RocksDB allows one process), and file outputs named with
/// `prefix_suffix` so that their files never clash with the pipeline's own.
pub async fn build_beside(
    config: &PipelineConfig,
    prefix_suffix: &str,
) -> Result<Pipeline, Problems> {
    build_with(config, Some(prefix_suffix), None).await
}

/// The sink as this writer opens it: a file sink's prefix extended by the member's name
/// and the suffix of a writer beside the pipeline, each as `-{part}`.
fn own_files(config: &SinkConfig, member: Option<&str>, suffix: Option<&str>) -> SinkConfig {
    let mut config = config.clone();
    for part in [member.map(file_name_safe), suffix.map(str::to_string)]
        .into_iter()
        .flatten()
    {
        if let Some(apart) = config.spec.named_apart(&part) {
            config.spec = apart;
        }
    }
    config
}

/// A member name (a host or pod name, `$SLUICE_MEMBER`) made safe in a file name: letters,
/// digits, `-`, `_` and `.` stay; a name that needed other characters replaced by `_`
/// gets a hash of itself after it, so that two names never become one (`a b` and `a_b`).
fn file_name_safe(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe == name && !name.is_empty() && !name.starts_with('.') {
        return safe;
    }
    // FNV-1a: the same on every build, so a restarted member finds its own files.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}-{:08x}", safe.trim_start_matches('.'), hash as u32)
}

async fn build_with(
    config: &PipelineConfig,
    beside_suffix: Option<&str>,
    member: Option<&str>,
) -> Result<Pipeline, Problems> {
    let mut problems = Problems::new(&config.file);
    let mut source = open_source(&config.source, config.dead_letter.is_some(), &mut problems);
    if let (Some(source), Some(member), Some(c)) = (&mut source, member, &config.checkpoint) {
        // Sources without consumer groups share partitions through the shared directory.
        source.set_member(&Member {
            name: file_name_safe(member),
            dir: c.dir.clone(),
        });
    }
    let stages = match &source {
        Some(s) => plan_stages(config, s.schema(), &mut problems).await,
        None => None,
    };
    if let (Some(source), Some(stages)) = (&source, &stages) {
        check_scaling(config, &source.schema(), stages, &mut problems);
    }
    let checkpoint = config
        .checkpoint
        .as_ref()
        .filter(|_| beside_suffix.is_none())
        .and_then(|c| {
            match member.map_or_else(
                || RocksStore::open(&c.dir),
                |m| RocksStore::open_member(&c.dir, m),
            ) {
                Ok(store) => Some(CheckpointPolicy {
                    store: Arc::new(store),
                    interval: c.interval,
                }),
                Err(e) => {
                    c.at.problem(&mut problems, "dir", e.to_string());
                    None
                }
            }
        });
    let outputs = match (&source, &stages) {
        (Some(source), Some(stages)) if problems.is_empty() => {
            output_schemas(config, &source.schema(), stages, &mut problems).map(|schemas| {
                config
                    .outputs
                    .iter()
                    .zip(schemas)
                    .filter_map(|(output, schema)| {
                        let sink = own_files(output, member, beside_suffix);
                        Some(Output {
                            name: output.name.as_str().into(),
                            sink: open_sink(&sink, &schema, &mut problems)?,
                            columns: columns_of(output),
                        })
                    })
                    .collect::<Vec<_>>()
            })
        }
        _ => None,
    };
    let dead_letter = match &config.dead_letter {
        Some(d) if problems.is_empty() => {
            open_dead_letter(&own_files(d, member, beside_suffix), &mut problems)
        }
        _ => None,
    };
    match (source, stages, outputs) {
        (Some(source), Some(stages), Some(outputs)) if problems.is_empty() => Ok(Pipeline {
            dead_letter,
            checkpoint,
            name: config.name.as_str().into(),
            source,
            batching: config.source.batching,
            stages,
            graph: graph_of(config),
            outputs,
        }),
        _ => Err(problems.sorted()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_become_safe_file_name_parts() {
        assert_eq!(file_name_safe("worker-1"), "worker-1");
        assert_eq!(file_name_safe("pod.ns"), "pod.ns");
        let changed = file_name_safe("pod.ns/x y");
        assert!(changed.starts_with("pod.ns_x_y-"), "{changed}");
        // Two names never become one.
        assert_ne!(file_name_safe("a b"), file_name_safe("a_b"));
        assert_ne!(file_name_safe("a b"), file_name_safe("a/b"));
        assert!(!file_name_safe(".hidden").starts_with('.'));
        assert!(!file_name_safe("").is_empty());
    }
}
