//! The registry of Rust functions usable as `function` stages, by name.
//!
//! ```yaml
//! - name: assign_variant
//!   type: function
//!   function: ab_bucket
//!   params: { key: user_id, experiment: row-order-2026, variants: { control: 50, treatment: 50 } }
//! ```
//!
//! A function's `params` are a serde struct read with located errors; it is then planned
//! against its input schema ([`FunctionSpec::plan`]) into a stage factory. Adding a function
//! means writing those two pieces and one line in [`REGISTRY`].

mod ab_bucket;
mod enrich;
mod extract;
mod http;
mod model;
mod score;

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::de::DeserializeOwned;
use sluice_engine::config::{Location, Node, Problems, from_node};
use sluice_engine::connector::StageSpec;
use sluice_engine::stage::{RowFailure, StageFactory};
use sluice_engine::{Error, Result, plan_err};

/// A function's parameters, read and checked, ready to plan against an input schema.
pub trait FunctionSpec: Send + Sync {
    /// Checks the input columns the function needs and returns its stage factory.
    /// The error ([`Error::Plan`], made with `plan_err!`) is a sentence for the user,
    /// placed at the stage's `params`.
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>>;
}

/// Parameters that can check themselves beyond their types (pure, no I/O).
pub trait Params: DeserializeOwned + FunctionSpec + 'static {
    fn validate(&self, _node: &Node, _path: &Location, _problems: &mut Problems) {}
}

/// A registered function.
pub struct FunctionEntry {
    pub name: &'static str,
    /// One line for `sluice validate` and error messages.
    pub summary: &'static str,
    pub parse: fn(&Node, &Location, &mut Problems) -> Option<Box<dyn FunctionSpec>>,
}

fn parse<P: Params>(
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) -> Option<Box<dyn FunctionSpec>> {
    let before = problems.len();
    let params: P = from_node(node, path, &[], problems)?;
    params.validate(node, path, problems);
    (problems.len() == before).then(|| Box::new(params) as Box<dyn FunctionSpec>)
}

/// Every function, by name.
pub static REGISTRY: &[FunctionEntry] = &[
    FunctionEntry {
        name: "ab_bucket",
        summary: "assigns each row to an experiment variant by a stable hash of a key column",
        parse: parse::<ab_bucket::AbBucket>,
    },
    FunctionEntry {
        name: "enrich",
        summary: "adds columns looked up by a key column in a file, Redis or PostgreSQL (cached)",
        parse: parse::<enrich::Enrich>,
    },
    FunctionEntry {
        name: "extract",
        summary: "extracts named regex groups of a text column into new columns",
        parse: parse::<extract::Extract>,
    },
    FunctionEntry {
        name: "http",
        summary: "sends batches of rows as JSON to an HTTP endpoint and adds its per-row results as columns",
        parse: parse::<http::Http>,
    },
    FunctionEntry {
        name: "model",
        summary: "scores rows with an ONNX model (tract): numeric columns in, one Float32 column per model output",
        parse: parse::<model::Model>,
    },
    FunctionEntry {
        name: "score",
        summary: "recommends the top-k content for each user's feature vector (personalization)",
        parse: parse::<score::Score>,
    },
];

/// A URL or connection string for people: its password (and a user given alone, which Redis
/// may take for a password) replaced by `***`, so that `redis://:secret@host:6379/0` reads
/// `redis://:***@host:6379/0`, and a `pass=` parameter (of `redis+unix://` URLs) likewise.
///
/// The user part ends at the last `@` of the whole URL, not of the host part: a password
/// with an unencoded `/`, `?` or `#` must not end it early (and show the rest). PostgreSQL's
/// `key=value` connection strings have their `password=` hidden the same way.
pub(crate) fn redact(url: &str) -> String {
    if !url.contains("://") {
        return url
            .split(' ')
            .map(|p| match p.split_once('=') {
                Some(("password", _)) => "password=***".to_string(),
                _ => p.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    let (scheme, rest) = url.split_at(url.find("://").map_or(0, |i| i + 3));
    let mut shown = scheme.to_string();
    match rest.rfind('@') {
        Some(at) => {
            let user = &rest[..at];
            match user.split_once(':') {
                Some((name, _)) => shown.push_str(&format!("{name}:***")),
                None => shown.push_str("***"),
            }
            shown.push_str(&rest[at..]);
        }
        None => shown.push_str(rest),
    }
    match shown.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => shown,
    }
}

pub fn lookup(name: &str) -> Option<&'static FunctionEntry> {
    REGISTRY.iter().find(|f| f.name == name)
}

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|f| f.name).collect()
}

/// The input schema plus new nullable columns; fails when a name is taken.
fn extend_schema(input: &SchemaRef, new: &[(&str, DataType)]) -> Result<SchemaRef> {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    for (name, ty) in new {
        if input.field_with_name(name).is_ok() {
            return plan_err!(
                "the output column `{name}` already exists in the input; choose another name"
            );
        }
        fields.push(Field::new(*name, ty.clone(), true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// Input columns plus the new ones, without the rows that failed.
fn assemble(
    schema: &SchemaRef,
    input: &RecordBatch,
    new: Vec<ArrayRef>,
    failed: &[RowFailure],
) -> Result<RecordBatch> {
    let mut columns = input.columns().to_vec();
    columns.extend(new);
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::arrow("assembling function output", e))?;
    if failed.is_empty() {
        return Ok(batch);
    }
    let mut keep = vec![true; batch.num_rows()];
    for f in failed {
        keep[f.row] = false;
    }
    filter_record_batch(&batch, &BooleanArray::from(keep))
        .map_err(|e| Error::arrow("removing failed rows", e))
}

/// `type: function`: a registered function with its parameters, read by the function.
pub struct FunctionStage(Box<dyn FunctionSpec>);

/// `type: function`, as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionStageConfig {
    /// The function's name in the registry.
    function: String,
    /// The function's parameters; read by the function itself.
    #[serde(default)]
    #[allow(dead_code)]
    params: serde::de::IgnoredAny,
}

#[async_trait::async_trait]
impl StageSpec for FunctionStage {
    fn main_key(&self) -> &'static str {
        "params"
    }

    async fn plan(&self, _name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        self.0.plan(input)
    }
}

/// Reads a `type: function` stage: the function looked up by name, its `params` read by it
/// (see [`sluice_engine::connector::StageEntry`]).
pub fn parse_stage(
    fields: &Node,
    node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<dyn StageSpec>> {
    let config: FunctionStageConfig = from_node(fields, path, common, problems)?;
    let function = config.function;
    let Some(entry) = lookup(&function) else {
        problems.at_key(
            node,
            path,
            "function",
            format!(
                "unknown function `{function}`, expected one of {}",
                names().join(", ")
            ),
        );
        return None;
    };
    let empty = Node {
        mark: node.mark,
        value: sluice_engine::config::Value::Map(Vec::new()),
    };
    let params = node.get("params").unwrap_or(&empty);
    let spec = (entry.parse)(params, &path.key("params"), problems)?;
    Some(Arc::new(FunctionStage(spec)))
}
