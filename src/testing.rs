//! `sluice test`: runs the `tests:` cases of a pipeline file.
//!
//! Each case's `input` records are decoded with the source's schema (as the source would
//! decode them), given metadata columns (partition 0, offsets from 0), run through every
//! stage in the order of the graph, and the rows the case's output would write are
//! compared, in order and exactly, with `expected`. A mismatch prints a diff: per row, the fields that differ.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use serde_json::Value as Json;
use sluice_connectors::json::{decode_records, to_json_rows};
use sluice_engine::batch::{self, ColumnSelection, is_metadata};
use sluice_engine::config::Problems;
use sluice_engine::graph::Input;
use sluice_engine::stage::{PlannedStage, StageContext};

use crate::config::{PipelineConfig, TestCase};
use crate::plan;

/// The result of one test case.
pub struct Outcome {
    pub name: String,
    /// `None` when it passed; otherwise what went wrong, for a person.
    pub failure: Option<String>,
}

/// Runs every test case. Problems mean the tests could not run at all (bad input records,
/// stages that do not plan).
pub async fn run_tests(config: &PipelineConfig) -> Result<Vec<Outcome>, Problems> {
    let mut problems = Problems::new(&config.file);
    let schema = match plan::declared_schema(&config.source) {
        Some(s) => s,
        None => match plan::open_source(&config.source, false, &mut problems) {
            Some(source) => source.schema(),
            None => return Err(problems),
        },
    };
    let mut outcomes = Vec::with_capacity(config.tests.len());
    for case in &config.tests {
        // Planned for each case: stateful stages keep their state in the factory, and each
        // case starts empty.
        let Some(stages) = plan::plan_stages(config, schema.clone(), &mut problems).await else {
            return Err(problems);
        };
        let columns = plan::columns_of(&config.outputs[case.output]);
        match run_case(config, case, &schema, &stages, &columns, &mut problems).await {
            Some(failure) => outcomes.push(Outcome {
                name: case.name.clone(),
                failure,
            }),
            None => return Err(problems.sorted()),
        }
    }
    Ok(outcomes)
}

/// `None` when the case could not run (problems recorded); `Some(None)` when it passed.
async fn run_case(
    config: &PipelineConfig,
    case: &TestCase,
    schema: &SchemaRef,
    stages: &[PlannedStage],
    columns: &ColumnSelection,
    problems: &mut Problems,
) -> Option<Option<String>> {
    let records: SchemaRef = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| !is_metadata(f.name()))
            .cloned()
            .collect::<Vec<_>>(),
    ));
    let mut buf = Vec::new();
    let mut starts = Vec::with_capacity(case.input.len());
    for (_, json) in &case.input {
        starts.push(buf.len());
        serde_json::to_writer(&mut buf, json).expect("JSON values serialize");
        buf.push(b'\n');
    }
    let input_path = case.at.path.key("input");
    let decoded = match decode_records(&records, &buf, &starts) {
        Ok(b) => b,
        Err(e) => {
            let (path, node) = match e.index {
                Some(i) => (input_path.index(i), &case.input[i].0),
                None => (input_path, &case.at.node),
            };
            problems.at(
                &path,
                node,
                format!("the record does not fit the source schema: {}", e.reason),
            );
            return None;
        }
    };
    let source = match batch::append_metadata(schema, decoded, 0, 0, None, None) {
        Ok(b) => b,
        Err(e) => return Some(Some(e.to_string())),
    };
    // Each stage's rows, in the order of the stages (each after what it reads).
    let mut rows: Vec<RecordBatch> = Vec::with_capacity(stages.len());
    // What the executor hands a stage or output: its inputs' rows, merged in record order
    // when there are several; nothing when they are empty.
    let gather = |inputs: &[Input], rows: &[RecordBatch]| {
        let parts: Vec<RecordBatch> = inputs
            .iter()
            .map(|x| match x {
                Input::Source => source.clone(),
                Input::Stage(j) => rows[*j].clone(),
            })
            .collect();
        batch::merge_inputs(parts)
    };
    // Only the stages that lead to the case's output run.
    let mut needed = vec![false; stages.len()];
    let mut wanted: Vec<Input> = config.outputs[case.output].inputs.clone();
    while let Some(x) = wanted.pop() {
        if let Input::Stage(j) = x
            && !needed[j]
        {
            needed[j] = true;
            wanted.extend(config.stages[j].inputs.iter().copied());
        }
    }
    for (i, (stage, config_stage)) in stages.iter().zip(&config.stages).enumerate() {
        if !needed[i] {
            rows.push(RecordBatch::new_empty(stage.factory.output_schema()));
            continue;
        }
        let batch = match gather(&config_stage.inputs, &rows) {
            Ok(Some(b)) => b,
            // Nothing to call the stage with (an empty branch): it is not called.
            Ok(None) => {
                rows.push(RecordBatch::new_empty(stage.factory.output_schema()));
                continue;
            }
            Err(e) => return Some(Some(e.to_string())),
        };
        let ctx = StageContext {
            pipeline: config.name.as_str().into(),
            ..StageContext::detached(&stage.name)
        };
        let result = async {
            let mut instance = stage.factory.create()?;
            instance.open(&ctx).await?;
            let mut out = instance.process_batch(batch.clone(), &ctx).await?;
            // The test's rows are the whole input: windows they opened close at its end.
            instance.end_of_partition(&ctx).await?;
            let mut parts = vec![out.batch.clone()];
            while let Some(more) = instance.pending(&ctx).await? {
                parts.push(more);
            }
            if parts.len() > 1 {
                out.batch = arrow::compute::concat_batches(&parts[0].schema(), &parts)
                    .map_err(|e| sluice_engine::Error::arrow("joining stage output", e))?;
            }
            instance.close(&ctx).await?;
            Ok::<_, sluice_engine::Error>(out)
        }
        .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => return Some(Some(format!("stage `{}` failed: {e}", stage.name))),
        };
        if let Some(f) = out.failed.first() {
            let which = batch::offset_at(&batch, f.row)
                .map_or(String::new(), |o| format!(" input record {o}:"));
            return Some(Some(format!(
                "stage `{}` failed{which} {} ({} of {} rows failed)",
                stage.name,
                f.reason,
                out.failed.len(),
                batch.num_rows()
            )));
        }
        rows.push(out.batch);
    }
    let written = gather(&config.outputs[case.output].inputs, &rows);
    let actual = match written.and_then(|b| match b {
        Some(b) => columns.apply(&b).and_then(|b| to_json_rows(&b)),
        None => Ok(Vec::new()),
    }) {
        Ok(rows) => rows,
        Err(e) => return Some(Some(e.to_string())),
    };
    Some(diff(&case.expected, &actual))
}

/// Numbers compare by value (`10` equals `10.0`); everything else exactly.
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// A readable account of how `actual` differs from `expected`, or `None` when it does not.
fn diff(expected: &[Json], actual: &[Json]) -> Option<String> {
    let mut out = String::new();
    for i in 0..expected.len().max(actual.len()) {
        match (expected.get(i), actual.get(i)) {
            (Some(e), Some(a)) if same(e, a) => {}
            (Some(Json::Object(e)), Some(Json::Object(a))) => {
                let _ = writeln!(out, "  row {i}:");
                for (k, ev) in e {
                    match a.get(k) {
                        None => {
                            let _ = writeln!(
                                out,
                                "    {k}: expected {ev}, but the output has no such column"
                            );
                        }
                        Some(av) if !same(ev, av) => {
                            let _ = writeln!(out, "    {k}: expected {ev}, got {av}");
                        }
                        Some(_) => {}
                    }
                }
                for (k, av) in a {
                    if !e.contains_key(k) {
                        let _ = writeln!(out, "    {k}: not expected, got {av}");
                    }
                }
            }
            (Some(e), Some(a)) => {
                let _ = writeln!(out, "  row {i}:\n    - {e}\n    + {a}");
            }
            (Some(e), None) => {
                let _ = writeln!(out, "  row {i} is missing from the output:\n    - {e}");
            }
            (None, Some(a)) => {
                let _ = writeln!(out, "  row {i} was not expected:\n    + {a}");
            }
            (None, None) => {}
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(format!(
            "expected {} rows, got {}\n{}",
            expected.len(),
            actual.len(),
            out.trim_end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_names_fields_and_rows() {
        let expected = vec![json!({"a": 1, "b": "x"}), json!({"a": 2})];
        assert_eq!(
            diff(&expected, &[json!({"a": 1.0, "b": "x"}), json!({"a": 2})]),
            None
        );
        let d = diff(&expected, &[json!({"a": 1, "b": "y"})]).unwrap();
        assert!(d.contains("b: expected \"x\", got \"y\""), "{d}");
        assert!(d.contains("row 1 is missing"), "{d}");
        assert!(d.starts_with("expected 2 rows, got 1"), "{d}");
    }
}
