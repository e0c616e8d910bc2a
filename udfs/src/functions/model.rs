//! `model`: scores rows with an ONNX model, run in-process by tract.
//!
//! The model takes one float32 matrix `[rows, features]` and returns one float32 matrix
//! `[rows, outputs]` (a `[rows]` vector counts as one output). The named input columns, in
//! the model's feature order, are cast to float32 and packed row-major into a single tensor
//! per batch; each output becomes a new Float32 column.
//!
//! # Planning and workers
//! The ONNX file is read and optimised once, at planning, for a symbolic batch size: every
//! worker shares that plan, and a wrong path, a file that is not ONNX or a width that does
//! not match `inputs` / `outputs` is reported then, before the pipeline starts. Each worker
//! keeps its own run state, made in [`Stage::open`] along with one warm-up run on a single
//! zero row, so the first real batch does not pay for first-touch costs.
//!
//! # Failures
//! A row with a null input fails on its own (`permanent`); it is fed to the model as zeros so
//! the rest of the batch runs as one call, and its scores are dropped with it. An error from
//! tract itself fails the whole batch as `internal`: it means the model and the plan disagree.
//!
//! Inference runs on the worker's thread and never spawns: a batch is one synchronous call.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float32Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, ErrorClass, Result};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, TDim, TValue, Tensor,
    TractError, TypedRunnableModel, TypedSimpleState, tvec,
};
use tract_onnx::tract_hir::infer::GenericFactoid;

use super::{FunctionSpec, Params, assemble, extend_schema};

/// ```yaml
/// params:
///   path: pipelines/models/fraud/fraud_mlp.onnx
///   inputs: [watch_seconds_z, bitrate_z, sessions_last_hour, distinct_devices_24h,
///            country_mismatch, account_age_days_log]
///   outputs: [fraud_score]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The ONNX file, relative to the working directory. It must take one float32
    /// `[rows, features]` input and return one `[rows, outputs]` output.
    path: String,
    /// The numeric columns (integer, float or boolean) fed to the model, in its feature
    /// order. They are cast to float32.
    inputs: Vec<String>,
    /// The new Float32 columns, one per value the model returns for a row, in order.
    outputs: Vec<String>,
}

impl Params for Model {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        if self.path.is_empty() {
            problems.at_key(node, path, "path", "must name an ONNX file");
        }
        if self.inputs.is_empty() {
            problems.at_key(
                node,
                path,
                "inputs",
                "needs at least one column: list the model's features in order",
            );
        }
        if self.outputs.is_empty() {
            problems.at_key(
                node,
                path,
                "outputs",
                "needs at least one column name for the model's scores",
            );
        }
        for (i, name) in self.outputs.iter().enumerate() {
            if self.outputs[..i].contains(name) {
                problems.at_key(node, path, "outputs", format!("names `{name}` twice"));
            }
        }
    }
}

impl FunctionSpec for Model {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        for name in &self.inputs {
            let field = input.field_with_name(name).map_err(|_| {
                Error::Plan(format!("the input column `{name}` is not in the input"))
            })?;
            let ty = field.data_type();
            if !(ty.is_integer() || ty.is_floating() || *ty == DataType::Boolean) {
                return plan_err!(
                    "the input column `{name}` is {ty}; a model reads numbers \
                     (integer, float or boolean columns)"
                );
            }
        }
        let new: Vec<(&str, DataType)> = self
            .outputs
            .iter()
            .map(|n| (n.as_str(), DataType::Float32))
            .collect();
        let output = extend_schema(input, &new)?;
        let plan = load(&self.path, self.inputs.len(), self.outputs.len())?;
        Ok(Arc::new(ModelFactory {
            path: self.path.as_str().into(),
            inputs: self.inputs.as_slice().into(),
            width: self.outputs.len(),
            plan,
            output,
        }))
    }
}

/// Reads the ONNX file and optimises it for float32 `[N, features]` inputs, `N` symbolic.
/// Errors are sentences for the user naming the file.
fn load(path: &str, features: usize, outputs: usize) -> Result<Arc<TypedRunnableModel>> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return plan_err!("the model path `{path}` is not a file"),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let from = if Path::new(path).is_relative() {
                std::env::current_dir()
                    .map(|d| format!(" (relative paths start at {})", d.display()))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            return plan_err!("the model file `{path}` does not exist{from}");
        }
        Err(e) => return plan_err!("cannot read the model file `{path}`: {e}"),
    }
    let model = tract_onnx::onnx().model_for_path(path).map_err(|e| {
        Error::Plan(format!(
            "`{path}` is not an ONNX model tract can read: {e:#}"
        ))
    })?;

    let ins = model.input_outlets().map_or(0, <[_]>::len);
    let outs = model.output_outlets().map_or(0, <[_]>::len);
    if ins != 1 || outs != 1 {
        return plan_err!(
            "the model `{path}` has {} and {}; the model stage needs exactly one of each",
            count(ins, "input"),
            count(outs, "output")
        );
    }

    // What the file declares, checked first so a width mismatch reads as one, not as a
    // shape error deep in the graph.
    let declared = &model
        .input_fact(0)
        .map_err(|e| Error::Plan(format!("the model `{path}` has no readable input: {e:#}")))?
        .shape;
    let dims: Vec<&GenericFactoid<TDim>> = declared.dims().collect();
    if !declared.is_open() && dims.len() != 2 {
        return plan_err!(
            "the model `{path}` takes a rank-{} input; the model stage feeds it a \
             [rows, features] matrix",
            dims.len()
        );
    }
    if let Some(GenericFactoid::Only(d)) = dims.get(1)
        && let Some(width) = d.as_i64()
        && width != features as i64
    {
        return plan_err!(
            "the model `{path}` takes {} per row but `inputs` lists {}",
            count(width as usize, "feature"),
            count(features, "column")
        );
    }
    // Keep the file's own batch symbol when it names one: other declared shapes may use it.
    let batch = match dims.first() {
        Some(GenericFactoid::Only(TDim::Sym(s))) => s.clone(),
        _ => model.sym("N"),
    };

    let fact = InferenceFact::dt_shape(DatumType::F32, [TDim::Sym(batch), TDim::from(features)]);
    let typed = model
        .with_input_fact(0, fact)
        .and_then(|m| m.into_optimized())
        .map_err(|e| {
            Error::Plan(format!(
                "the model `{path}` cannot be prepared for float32 rows of {}: {e:#}",
                count(features, "feature")
            ))
        })?;

    let out = typed
        .output_fact(0)
        .map_err(|e| Error::Plan(format!("the model `{path}` has no readable output: {e:#}")))?;
    if !out.datum_type.is_float() {
        return plan_err!(
            "the model `{path}` returns {}; the model stage reads floating-point outputs",
            out.format_dt_shape()
        );
    }
    let width = match out.shape.dims() {
        [_] => TDim::from(1usize),
        [_, w] => w.clone(),
        other => {
            return plan_err!(
                "the model `{path}` returns a rank-{} output; the model stage reads \
                 [rows] or [rows, outputs]",
                other.len()
            );
        }
    };
    match width.as_i64() {
        Some(w) if w == outputs as i64 => {}
        Some(w) => {
            return plan_err!(
                "the model `{path}` returns {} per row but `outputs` names {}",
                count(w as usize, "value"),
                count(outputs, "column")
            );
        }
        None => {
            return plan_err!(
                "the model `{path}` returns `{width}` values per row, which depends on the \
                 input; the model stage needs a fixed number"
            );
        }
    }

    typed.into_runnable().map_err(|e| {
        Error::Plan(format!(
            "the model `{path}` cannot be planned for running: {e:#}"
        ))
    })
}

/// "1 feature", "6 features".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

struct ModelFactory {
    path: Arc<str>,
    inputs: Arc<[String]>,
    /// Values the model returns per row: the number of output columns.
    width: usize,
    plan: Arc<TypedRunnableModel>,
    output: SchemaRef,
}

impl StageFactory for ModelFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(ModelStage {
            path: self.path.clone(),
            inputs: self.inputs.clone(),
            width: self.width,
            plan: self.plan.clone(),
            state: None,
            output: self.output.clone(),
        }))
    }
}

struct ModelStage {
    path: Arc<str>,
    inputs: Arc<[String]>,
    width: usize,
    plan: Arc<TypedRunnableModel>,
    /// This worker's run state, made on first use. Dropped after a failed run, which may
    /// leave the batch size of that run bound in it.
    state: Option<TypedSimpleState>,
    output: SchemaRef,
}

impl ModelStage {
    fn tract_error(&self, doing: &str, e: TractError) -> Error {
        Error::Function {
            class: ErrorClass::Internal,
            message: format!("{doing} for the model `{}` failed: {e:#}", self.path),
        }
    }

    /// The input columns as one row-major float32 `[n, features]` tensor. Null inputs are
    /// written as 0 and their rows added to `failed`, in row order, once per row.
    fn features(&self, batch: &RecordBatch, failed: &mut Vec<RowFailure>) -> Result<Tensor> {
        let n = batch.num_rows();
        let features = self.inputs.len();
        let mut tensor = Tensor::zero::<f32>(&[n, features])
            .map_err(|e| self.tract_error("allocating the input", e))?;
        {
            let mut view = tensor
                .try_as_plain_ram_mut()
                .map_err(|e| self.tract_error("writing the input", e))?;
            let buf = view
                .as_slice_mut::<f32>()
                .map_err(|e| self.tract_error("writing the input", e))?;
            for (j, name) in self.inputs.iter().enumerate() {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::Internal(format!("input column `{name}` vanished")))?;
                let values = cast(column, &DataType::Float32)
                    .map_err(|e| Error::arrow(format!("reading the input column `{name}`"), e))?;
                let values = values.as_primitive::<Float32Type>();
                for (row, v) in buf.chunks_exact_mut(features).zip(values.values().iter()) {
                    row[j] = *v;
                }
                if values.null_count() > 0 {
                    for row in (0..n).filter(|&r| values.is_null(r)) {
                        buf[row * features + j] = 0.0;
                        failed.push(RowFailure {
                            row,
                            class: ErrorClass::Permanent,
                            reason: format!("the input column `{name}` is null"),
                        });
                    }
                }
            }
        }
        // One failure per row, naming its first null column (the sort is stable).
        failed.sort_by_key(|f| f.row);
        failed.dedup_by_key(|f| f.row);
        Ok(tensor)
    }

    /// Runs the model on `input` with this worker's state.
    fn infer(&mut self, input: Tensor) -> Result<TValue> {
        let mut state = match self.state.take() {
            Some(state) => state,
            None => self
                .plan
                .spawn()
                .map_err(|e| self.tract_error("preparing a run", e))?,
        };
        let outputs = state
            .run(tvec!(TValue::from(input)))
            .map_err(|e| self.tract_error("running inference", e))?;
        // A failed run may leave its batch size bound in the state: keep only one whose run
        // completed (and so was reset for the next).
        self.state = Some(state);
        outputs
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal(format!("the model `{}` returned no output", self.path)))
    }

    /// Splits the `[n, width]` output into one Float32 column per output.
    fn columns(&self, output: &Tensor, n: usize) -> Result<Vec<ArrayRef>> {
        let output = output
            .cast_to::<f32>()
            .map_err(|e| self.tract_error("reading the output", e))?;
        let view = output
            .try_as_plain_ram()
            .map_err(|e| self.tract_error("reading the output", e))?;
        let values = view
            .as_slice::<f32>()
            .map_err(|e| self.tract_error("reading the output", e))?;
        if values.len() != n * self.width {
            return Err(Error::Function {
                class: ErrorClass::Internal,
                message: format!(
                    "the model `{}` returned {} values for {n} rows of {}",
                    self.path,
                    values.len(),
                    count(self.width, "output")
                ),
            });
        }
        Ok((0..self.width)
            .map(|k| {
                let column: Vec<f32> = values.iter().skip(k).step_by(self.width).copied().collect();
                Arc::new(Float32Array::from(column)) as ArrayRef
            })
            .collect())
    }
}

#[async_trait]
impl Stage for ModelStage {
    /// Makes the worker's run state and runs the model once on a zero row.
    async fn open(&mut self, _ctx: &StageContext) -> Result<()> {
        let zero = Tensor::zero::<f32>(&[1, self.inputs.len()])
            .map_err(|e| self.tract_error("allocating the warm-up input", e))?;
        self.infer(zero)?;
        Ok(())
    }

    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> Result<StageOutput> {
        let n = batch.num_rows();
        let mut failed = Vec::new();
        let new = if n == 0 {
            (0..self.width)
                .map(|_| Arc::new(Float32Array::from(Vec::<f32>::new())) as ArrayRef)
                .collect()
        } else {
            let input = self.features(&batch, &mut failed)?;
            let output = self.infer(input)?;
            self.columns(&output, n)?
        };
        let out = assemble(&self.output, &batch, new, &failed)?;
        Ok(StageOutput { batch: out, failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Float64Array, Int64Array};
    use arrow::datatypes::{Field, Schema};

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines/models/fraud/");

    /// Written by `pipelines/models/fraud/make_model.py` with numpy's forward pass.
    #[derive(Deserialize)]
    struct Reference {
        inputs: Vec<String>,
        rows: Vec<Vec<f64>>,
        scores: Vec<Vec<f32>>,
    }

    fn reference() -> Reference {
        let text = std::fs::read_to_string(format!("{DIR}reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn spec(inputs: &[String], outputs: &[&str]) -> Model {
        Model {
            path: format!("{DIR}fraud_mlp.onnx"),
            inputs: inputs.to_vec(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ctx() -> StageContext {
        StageContext::detached("score")
    }

    /// The reference rows as a batch: a passthrough `session_id`, the two count features as
    /// Int64, `country_mismatch` as Boolean and the others as Float64, so every cast runs.
    /// `null` puts a null at (row, feature).
    fn batch(r: &Reference, rows: usize, null: Option<(usize, usize)>) -> RecordBatch {
        let mut fields = vec![Field::new("session_id", DataType::Int64, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(
            (0..rows as i64).map(|i| 1000 + i),
        ))];
        for (j, name) in r.inputs.iter().enumerate() {
            let cell = |i: usize| (null != Some((i, j))).then(|| r.rows[i][j]);
            let (ty, column): (DataType, ArrayRef) = match name.as_str() {
                "sessions_last_hour" | "distinct_devices_24h" => (
                    DataType::Int64,
                    Arc::new(Int64Array::from_iter(
                        (0..rows).map(|i| cell(i).map(|v| v as i64)),
                    )),
                ),
                "country_mismatch" => (
                    DataType::Boolean,
                    Arc::new(BooleanArray::from_iter(
                        (0..rows).map(|i| cell(i).map(|v| v == 1.0)),
                    )),
                ),
                _ => (
                    DataType::Float64,
                    Arc::new(Float64Array::from_iter((0..rows).map(cell))),
                ),
            };
            fields.push(Field::new(name, ty, true));
            columns.push(column);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    fn scores(out: &RecordBatch) -> Vec<f32> {
        out.column_by_name("fraud_score")
            .unwrap()
            .as_primitive::<Float32Type>()
            .values()
            .to_vec()
    }

    #[tokio::test]
    async fn matches_numpy_on_the_reference_rows() {
        let r = reference();
        assert_eq!(r.rows.len(), 64);
        let all = batch(&r, 64, None);
        let factory = spec(&r.inputs, &["fraud_score"])
            .plan(&all.schema())
            .unwrap();
        let mut stage = factory.create().unwrap();
        stage.open(&ctx()).await.unwrap();
        // A smaller batch first: the worker's state must rebind the batch size each run.
        let some = stage.process_batch(all.slice(0, 10), &ctx()).await.unwrap();
        assert_eq!(some.batch.num_rows(), 10);
        let out = stage.process_batch(all.clone(), &ctx()).await.unwrap();
        assert!(out.failed.is_empty());
        assert_eq!(out.batch.schema(), factory.output_schema());
        assert_eq!(out.batch.column(0), all.column(0));
        let got = scores(&out.batch);
        for (i, (got, want)) in got.iter().zip(&r.scores).enumerate() {
            assert!(
                (got - want[0]).abs() < 1e-5,
                "row {i}: tract {got}, numpy {}",
                want[0]
            );
        }
        // Kernels may be picked by batch size: agreement, not bit-equality.
        for (a, b) in scores(&some.batch).iter().zip(&got[..10]) {
            assert!((a - b).abs() < 1e-6, "{a} != {b}");
        }
        // The reference is spread out, so a constant output could not pass.
        let (lo, hi) = got
            .iter()
            .fold((1f32, 0f32), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
        assert!(lo < 0.1 && hi > 0.9, "{lo}..{hi}");
    }

    #[tokio::test]
    async fn a_null_input_fails_its_row_only() {
        let r = reference();
        let input = batch(&r, 3, Some((1, 1)));
        let mut stage = spec(&r.inputs, &["fraud_score"])
            .plan(&input.schema())
            .unwrap()
            .create()
            .unwrap();
        stage.open(&ctx()).await.unwrap();
        let out = stage.process_batch(input, &ctx()).await.unwrap();
        assert_eq!(
            out.failed,
            vec![RowFailure {
                row: 1,
                class: ErrorClass::Permanent,
                reason: format!("the input column `{}` is null", r.inputs[1]),
            }]
        );
        let got = scores(&out.batch);
        assert_eq!(got.len(), 2);
        assert!((got[0] - r.scores[0][0]).abs() < 1e-5);
        assert!((got[1] - r.scores[2][0]).abs() < 1e-5);
    }

    #[tokio::test]
    async fn an_empty_batch_gives_an_empty_batch() {
        let r = reference();
        let input = batch(&r, 0, None);
        let mut stage = spec(&r.inputs, &["fraud_score"])
            .plan(&input.schema())
            .unwrap()
            .create()
            .unwrap();
        let out = stage.process_batch(input, &ctx()).await.unwrap();
        assert_eq!(out.batch.num_rows(), 0);
        assert_eq!(out.batch.num_columns(), 8);
    }

    #[test]
    fn plan_names_the_file_and_both_counts() {
        let r = reference();
        let schema = batch(&r, 1, None).schema();
        let e = spec(&r.inputs[..5], &["fraud_score"])
            .plan(&schema)
            .err()
            .unwrap();
        assert!(e.to_string().contains("fraud_mlp.onnx"), "{e}");
        assert!(
            e.to_string()
                .contains("takes 6 features per row but `inputs` lists 5 columns"),
            "{e}"
        );
        let e = spec(&r.inputs, &["a", "b"]).plan(&schema).err().unwrap();
        assert!(e.to_string().contains("fraud_mlp.onnx"), "{e}");
        assert!(
            e.to_string()
                .contains("returns 1 value per row but `outputs` names 2 columns"),
            "{e}"
        );
    }

    #[test]
    fn plan_checks_the_columns_and_the_file() {
        let r = reference();
        let schema = batch(&r, 1, None).schema();
        let mut inputs = r.inputs.clone();
        inputs[2] = "sessions".into();
        let e = spec(&inputs, &["fraud_score"]).plan(&schema).err().unwrap();
        assert!(
            e.to_string()
                .contains("the input column `sessions` is not in the input"),
            "{e}"
        );
        let text = Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)]));
        let e = spec(&["x".into()], &["s"]).plan(&text).err().unwrap();
        assert!(e.to_string().contains("is Utf8"), "{e}");

        let mut missing = spec(&r.inputs, &["fraud_score"]);
        missing.path = format!("{DIR}nope.onnx");
        let e = missing.plan(&schema).err().unwrap();
        assert!(e.to_string().contains("nope.onnx` does not exist"), "{e}");

        let mut not_onnx = spec(&r.inputs, &["fraud_score"]);
        not_onnx.path = format!("{DIR}make_model.py");
        let e = not_onnx.plan(&schema).err().unwrap();
        assert!(
            e.to_string()
                .contains("make_model.py` is not an ONNX model"),
            "{e}"
        );
    }
}
