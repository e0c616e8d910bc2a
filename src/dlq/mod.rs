//! `sluice dlq`: a pipeline's dead letters read back, counted, and re-driven.
//!
//! - `inspect` reads the `dead_letter` sink of a pipeline file (a directory of JSON lines or
//!   Parquet files, or a Kafka topic up to its current end) and prints counts by stage and
//!   error class, then sample records.
//! - `replay` re-drives dead letters, optionally filtered by stage, class and time: into a
//!   Kafka topic (the original bytes and key), or back into the pipeline. Into the pipeline,
//!   a record that failed at decoding goes through the whole pipeline again (decoded with
//!   the pipeline's current schema: the usual fix is a schema change); a record that failed
//!   in a stage goes through that stage and the ones after it. Records that fail again
//!   become dead letters again; the dead-letter sink is append-only, so `--since` keeps a
//!   second replay from taking the first one's records.

mod topic;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use serde_json::Value;
use sluice_connectors::file::FileFormat;
use sluice_connectors::json::JsonDecoder;
use sluice_engine::batch::{Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::dead_letter::{Header, SOURCE_STAGE, decode_base64};
use sluice_engine::executor::{self, Pipeline, RunOptions};
use sluice_engine::graph::Input;
use sluice_engine::source::{Assignment, PartitionReader, Source};
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

pub use self::topic::{SentBack, bootstrap_of, client_options_of, replay_to_topic};
use crate::config::{PipelineConfig, SinkConfig};
use crate::plan;
use sluice_connectors::file::FileSinkConfig;
use sluice_connectors::kafka::KafkaSinkConfig;
use sluice_engine::connector::downcast_sink;

/// One dead letter read back.
#[derive(Debug, Clone)]
pub struct Letter {
    pub stage: String,
    pub error_class: String,
    pub error: String,
    pub attempts: u64,
    pub source: String,
    pub partition: u64,
    pub offset: Option<i64>,
    /// The record's key and headers as they came (`sluice_engine::dead_letter`).
    pub key: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub first_failed_at: String,
    pub last_failed_at: String,
    pub payload: Vec<u8>,
    /// The whole payload's size; `payload` holds less when it was cut to fit the
    /// dead-letter sink.
    pub payload_size: usize,
    pub payload_cut: bool,
}

/// Which letters to take.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub stage: Option<String>,
    pub class: Option<String>,
    /// Milliseconds since the epoch: letters whose last failure is at or after it.
    pub since: Option<i64>,
}

impl Filter {
    pub fn keeps(&self, l: &Letter) -> bool {
        self.stage.as_ref().is_none_or(|s| *s == l.stage)
            && self.class.as_ref().is_none_or(|c| *c == l.error_class)
            && self.since.is_none_or(|since| {
                arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(&l.last_failed_at)
                    .is_ok_and(|t| t / 1_000_000 >= since)
            })
    }
}

/// Every dead letter of the pipeline, oldest first per file or partition.
pub fn read(config: &PipelineConfig) -> anyhow::Result<Vec<Letter>> {
    let Some(sink) = &config.dead_letter else {
        bail!("{} has no `dead_letter` sink", config.file);
    };
    let spec = sink.spec.as_ref();
    if let Some(f) = downcast_sink::<FileSinkConfig>(spec) {
        read_files(&f.path, &f.prefix, f.format)
    } else if let Some(k) = downcast_sink::<KafkaSinkConfig>(spec) {
        topic::read_topic(&k.bootstrap_servers, &k.topic, &k.client_options())
    } else {
        bail!(
            "dead letters written to {} cannot be read back",
            kind_name(sink)
        )
    }
}

fn kind_name(sink: &SinkConfig) -> &'static str {
    match sink.kind {
        "file" => "files",
        "kafka" => "Kafka",
        other => other,
    }
}

/// The complete files of the dead-letter sink: `{prefix}-{seq}.{ext}`, and those of the
/// writers that extend its prefix (the members of a worker group, `{prefix}-{member}-{seq}`,
/// and replays, `{prefix}-replay-…`). Files still being written are hidden
/// (`.part-00001.jsonl.tmp`), and files of other prefixes (the output, where it shares the
/// directory) are not dead letters.
fn read_files(
    dir: &std::path::Path,
    prefix: &str,
    format: FileFormat,
) -> anyhow::Result<Vec<Letter>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let (start, end) = (format!("{prefix}-"), format!(".{}", format.extension()));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&start) && n.ends_with(&end)
            })
        })
        .collect();
    files.sort();
    let mut letters = Vec::new();
    for file in files {
        let rows: Vec<Value> = match format {
            FileFormat::Parquet => {
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                    std::fs::File::open(&file)?,
                    8192,
                )?;
                let mut rows = Vec::new();
                for batch in reader {
                    rows.extend(sluice_connectors::json::to_json_rows(&batch?)?);
                }
                rows
            }
            _ => std::fs::read_to_string(&file)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {}", file.display()))?,
        };
        for row in rows {
            letters.push(
                letter_from_row(&row).with_context(|| format!("a row of {}", file.display()))?,
            );
        }
    }
    Ok(letters)
}

/// Bytes written as `{name}` (text) or `{name}_base64` in `row`.
fn bytes_of(row: &Value, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let base64 = format!("{name}_base64");
    Ok(match (&row[name], &row[base64.as_str()]) {
        (Value::String(t), _) => Some(t.as_bytes().to_vec()),
        (_, Value::String(b)) => {
            Some(decode_base64(b).with_context(|| format!("{base64} is not base64"))?)
        }
        _ => None,
    })
}

/// A file letter's `headers`: a list of `{name, value, value_base64}` (none before
/// dead letters kept headers).
fn headers_of(row: &Value) -> anyhow::Result<Vec<Header>> {
    let Some(list) = row["headers"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|h| {
            let name = h["name"].as_str().context("a header without a name")?;
            let value = bytes_of(h, "value")?;
            Ok((name.into(), value.map(Into::into)))
        })
        .collect()
}

fn letter_from_row(row: &Value) -> anyhow::Result<Letter> {
    let text = |k: &str| row[k].as_str().map(str::to_string);
    let payload = bytes_of(row, "payload")?.unwrap_or_default();
    Ok(Letter {
        stage: text("stage").context("no `stage`: not a dead letter")?,
        error_class: text("error_class").unwrap_or_default(),
        error: text("error").unwrap_or_default(),
        attempts: row["attempts"].as_u64().unwrap_or(1),
        source: text("source").unwrap_or_default(),
        partition: row["partition"].as_u64().unwrap_or(0),
        offset: row["offset"].as_i64(),
        key: bytes_of(row, "key")?,
        headers: headers_of(row)?,
        first_failed_at: text("first_failed_at").unwrap_or_default(),
        last_failed_at: text("last_failed_at").unwrap_or_default(),
        payload_size: row["payload_size"]
            .as_u64()
            .map_or(payload.len(), |n| n as usize),
        // Files hold a boolean, Kafka headers the text.
        payload_cut: row["payload_cut"].as_bool() == Some(true) || row["payload_cut"] == "true",
        payload,
    })
}

/// Counts by stage and error class, then up to `samples` records.
pub fn inspect(letters: &[Letter], samples: usize) -> String {
    let mut groups: BTreeMap<(&str, &str), (usize, &str, &str)> = BTreeMap::new();
    for l in letters {
        let g = groups.entry((&l.stage, &l.error_class)).or_insert((
            0,
            &l.first_failed_at,
            &l.last_failed_at,
        ));
        g.0 += 1;
        g.1 = g.1.min(&l.first_failed_at);
        g.2 = g.2.max(&l.last_failed_at);
    }
    let mut out = format!("{} dead letters\n", letters.len());
    if letters.is_empty() {
        return out;
    }
    let w = groups
        .keys()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "{:w$}  {:9}  {:>9}  {:24}  {:24}\n",
        "stage", "class", "count", "first failed", "last failed"
    ));
    for ((stage, class), (count, first, last)) in &groups {
        out.push_str(&format!(
            "{stage:w$}  {class:9}  {count:>9}  {first:24}  {last:24}\n"
        ));
    }
    out.push_str("\nsamples:\n");
    for l in letters.iter().take(samples) {
        let at = match l.offset {
            Some(o) => format!("{} offset {o}", l.source),
            None => l.source.clone(),
        };
        let payload = String::from_utf8_lossy(&l.payload);
        let payload: String = payload.chars().take(100).collect();
        out.push_str(&format!(
            "  {at} [{} {}, {} attempt(s)]: {}\n    {payload}\n",
            l.stage, l.error_class, l.attempts, l.error
        ));
    }
    out
}

/// Why a letter cut to fit the dead-letter sink is not replayed.
fn cut_reason(l: &Letter) -> String {
    let what = if l.payload.len() < l.payload_size {
        format!(
            "its payload was cut to {} of {} bytes",
            l.payload.len(),
            l.payload_size
        )
    } else {
        "its key or headers were cut (its error says which)".to_string()
    };
    format!(
        "{} offset {:?}: {what} to fit the dead-letter sink; read the record from its source",
        l.source, l.offset,
    )
}

/// What a replay into the pipeline did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub letters: usize,
    pub out: u64,
    pub failed_again: u64,
    /// Letters whose payload no longer fits the stage's input at all (counted, not lost:
    /// they stay in the dead-letter sink).
    pub unreadable: Vec<String>,
}

/// Re-drives letters through the pipeline from the stage where each failed.
pub async fn replay_into_pipeline(
    config: &PipelineConfig,
    letters: &[Letter],
) -> anyhow::Result<Replayed> {
    let mut problems = sluice_engine::config::Problems::new(&config.file);
    let schema = match plan::declared_schema(&config.source) {
        Some(s) => s,
        None => plan::open_source(&config.source, false, &mut problems)
            .map(|s| s.schema())
            .ok_or_else(|| anyhow::anyhow!("{problems}"))?,
    };
    let stages = plan::plan_stages(config, schema.clone(), &mut problems)
        .await
        .ok_or_else(|| anyhow::anyhow!("{problems}"))?;
    let mut replayed = Replayed::default();
    // Rows the sink refused would be refused again: they stay where they are.
    let refused_by_an_output = |stage: &str| {
        stage == executor::SINK_STAGE
            || stage
                .strip_prefix(executor::SINK_STAGE)
                .is_some_and(|rest| rest.starts_with('.'))
    };
    for l in letters.iter().filter(|l| refused_by_an_output(&l.stage)) {
        replayed.unreadable.push(format!(
            "{} offset {:?}: refused by the sink ({}); it stays in the dead letters",
            l.source, l.offset, l.error
        ));
    }
    // One run per stage where letters failed, in pipeline order.
    let mut starts: Vec<(usize, String)> = vec![(0, SOURCE_STAGE.to_string())];
    starts.extend(
        stages
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.name.to_string())),
    );
    for (index, stage) in starts {
        let group: Vec<&Letter> = letters.iter().filter(|l| l.stage == stage).collect();
        if group.is_empty() {
            continue;
        }
        let from_source = stage == SOURCE_STAGE;
        // The schema of what the stage reads (all its inputs give the same columns).
        let input = match config.stages.get(index).and_then(|s| s.inputs.first()) {
            Some(Input::Stage(j)) if !from_source => stages[*j].factory.output_schema(),
            _ => schema.clone(),
        };
        let (batch, unreadable) = decode_letters(&group, &input, from_source);
        replayed.unreadable.extend(unreadable);
        replayed.letters += batch.num_rows();
        if batch.num_rows() == 0 {
            continue;
        }
        let suffix = format!("replay-{}", sluice_engine::dead_letter::now_ms());
        let mut pipeline = plan::build_beside(config, &suffix)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        let planned = std::mem::take(&mut pipeline.stages);
        // The stage and what it leads to, reading the letters as their source.
        let (graph, kept) = if from_source {
            (pipeline.graph.clone(), (0..planned.len()).collect())
        } else {
            pipeline.graph.from_stage(index)
        };
        let pipeline = Pipeline {
            source: Box::new(ReplaySource::new(batch, &stage)),
            stages: kept.iter().map(|&k| planned[k].clone()).collect(),
            graph,
            checkpoint: None,
            ..pipeline
        };
        let stats = RunStats::new(pipeline.stages.iter().map(|s| &s.name));
        executor::run(
            pipeline,
            RunOptions::default(),
            stats.clone(),
            CancellationToken::new(),
            None,
        )
        .await?;
        replayed.out += RunStats::get(&stats.records_out);
        replayed.failed_again += RunStats::get(&stats.records_dead_lettered);
    }
    Ok(replayed)
}

/// The letters as one batch of `schema` (a stage's input). Letters that failed at
/// decoding get their metadata from their provenance.
fn decode_letters(
    letters: &[&Letter],
    schema: &SchemaRef,
    raw: bool,
) -> (RecordBatch, Vec<String>) {
    let mut rows: Vec<Vec<u8>> = Vec::with_capacity(letters.len());
    let mut unreadable = Vec::new();
    for l in letters {
        if l.payload_cut {
            unreadable.push(cut_reason(l));
            continue;
        }
        if !raw {
            rows.push(l.payload.clone());
            continue;
        }
        match serde_json::from_slice::<Value>(&l.payload) {
            Ok(Value::Object(mut row)) => {
                row.insert("_partition".into(), l.partition.into());
                if let Some(o) = l.offset {
                    row.insert("_offset".into(), o.into());
                }
                if let Some(k) = &l.key {
                    // A binary `_key` (`key_format: bytes`) reads as hex in JSON.
                    let key = match schema.field_with_name(sluice_engine::batch::KEY) {
                        Ok(f) if f.data_type() == &arrow::datatypes::DataType::Binary => {
                            k.iter().map(|b| format!("{b:02x}")).collect()
                        }
                        _ => String::from_utf8_lossy(k).into_owned(),
                    };
                    row.insert("_key".into(), key.into());
                }
                rows.push(serde_json::to_vec(&row).expect("JSON values serialize"));
            }
            _ => unreadable.push(format!(
                "{} offset {:?}: not a JSON object",
                l.source, l.offset
            )),
        }
    }
    let mut decoder = JsonDecoder::new(schema.clone());
    let slices: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
    let (batch, bad) = decoder.decode_each(&slices);
    for (i, reason) in bad {
        unreadable.push(format!(
            "{}: {reason}",
            String::from_utf8_lossy(&rows[i])
                .chars()
                .take(80)
                .collect::<String>()
        ));
    }
    (
        batch.unwrap_or_else(|_| RecordBatch::new_empty(schema.clone())),
        unreadable,
    )
}

/// A source of one partition holding one prepared batch.
struct ReplaySource {
    batch: Option<RecordBatch>,
    schema: SchemaRef,
    name: String,
}

impl ReplaySource {
    fn new(batch: RecordBatch, stage: &str) -> Self {
        ReplaySource {
            schema: batch.schema(),
            batch: Some(batch),
            name: format!("replay/{stage}"),
        }
    }
}

#[async_trait]
impl Source for ReplaySource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn partition_hint(&self) -> usize {
        1
    }
    fn restore(&mut self, _: Arc<Checkpoint>) {}
    async fn next_assignment(&mut self) -> sluice_engine::Result<Option<Assignment>> {
        Ok(self.batch.take().map(|batch| {
            Assignment::Assign(Box::new(ReplayReader {
                info: Arc::new(PartitionInfo {
                    id: 0,
                    name: self.name.as_str().into(),
                }),
                batch: Some(batch),
                next: 0,
            }) as Box<dyn PartitionReader>)
        }))
    }
}

struct ReplayReader {
    info: Arc<PartitionInfo>,
    batch: Option<RecordBatch>,
    next: usize,
}

#[async_trait]
impl PartitionReader for ReplayReader {
    fn info(&self) -> &Arc<PartitionInfo> {
        &self.info
    }
    async fn read(&mut self, max: usize) -> sluice_engine::Result<Option<Envelope>> {
        let Some(all) = &self.batch else {
            return Ok(None);
        };
        let start = self.next;
        let n = max.max(1).min(all.num_rows() - start);
        let batch = all.slice(start, n);
        self.next += n;
        if self.next >= all.num_rows() {
            self.batch = None;
        }
        Ok(Some(Envelope {
            partition: self.info.clone(),
            offsets: start as i64..self.next as i64,
            batch,
            dead: Vec::new(),
        }))
    }
}
