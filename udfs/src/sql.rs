//! The `sql` stage: a DataFusion query over each incoming batch, registered as table `input`.
//!
//! The query is parsed, optimised and turned into a physical plan once per worker, in
//! [`Stage::open`]. Each batch is put into a one-batch slot that the plan's scan reads, and
//! the same physical plan is executed again: no SQL parsing or planning per batch.
//!
//! Only queries are allowed: DDL (`CREATE TABLE …`), DML and other statements are rejected
//! when the stage is planned.
//!
//! A query that fails on a batch (a cast that does not fit, a division by zero) fails the
//! whole batch with the error's message; the failure policy decides what happens next.

use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use sluice_engine::stage::{Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, ErrorClass, Result};

/// The table name under which a stage's query sees its input batch.
pub const INPUT_TABLE: &str = "input";

/// Holds the batch the next execution of the plan reads.
struct Slot {
    schema: SchemaRef,
    batch: Mutex<Option<RecordBatch>>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.batch.lock().expect("slot lock").take();
        let stream = futures::stream::iter(batch.map(Ok));
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// A query planned against one input schema: the plan, its slot and its session.
struct Planned {
    slot: Arc<Slot>,
    plan: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
}

async fn plan(query: &str, input: &SchemaRef) -> Result<Planned> {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(64 * 1024)
        .with_information_schema(false);
    let ctx = SessionContext::new_with_config(config);
    let slot = Arc::new(Slot {
        schema: input.clone(),
        batch: Mutex::new(None),
    });
    let table = StreamingTable::try_new(
        input.clone(),
        vec![slot.clone() as Arc<dyn PartitionStream>],
    )
    .map_err(|e| Error::Plan(clean(&e)))?;
    ctx.register_table(INPUT_TABLE, Arc::new(table))
        .map_err(|e| Error::Plan(clean(&e)))?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = ctx
        .sql_with_options(query, options)
        .await
        .map_err(|e| Error::Plan(clean(&e)))?;
    let plan = frame
        .create_physical_plan()
        .await
        .map_err(|e| Error::Plan(clean(&e)))?;
    if plan.properties().output_partitioning().partition_count() != 1 {
        return Err(Error::Internal(
            "the query plan has more than one partition".into(),
        ));
    }
    Ok(Planned {
        slot,
        plan,
        task: ctx.task_ctx(),
    })
}

/// DataFusion's error text, without the enum's prefix noise.
fn clean(e: &datafusion::error::DataFusionError) -> String {
    let text = e.strip_backtrace();
    for prefix in [
        "Error during planning: ",
        "SQL error: ",
        "Schema error: ",
        "This feature is not implemented: ",
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    text
}

/// A planned `sql` stage.
pub struct SqlStageFactory {
    query: Arc<str>,
    input: SchemaRef,
    output: SchemaRef,
}

impl SqlStageFactory {
    /// Plans `query` against `input`. The error ([`Error::Plan`]) is DataFusion's reason,
    /// for the caller to place at the query in the YAML.
    pub async fn plan(query: &str, input: SchemaRef) -> Result<Self> {
        let planned = plan(query, &input).await?;
        Ok(SqlStageFactory {
            query: query.into(),
            input,
            output: planned.plan.schema(),
        })
    }
}

impl StageFactory for SqlStageFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(SqlStage {
            query: self.query.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
            planned: None,
        }))
    }
}

pub struct SqlStage {
    query: Arc<str>,
    input: SchemaRef,
    output: SchemaRef,
    planned: Option<Planned>,
}

#[async_trait]
impl Stage for SqlStage {
    async fn open(&mut self, _ctx: &StageContext) -> Result<()> {
        let planned = plan(&self.query, &self.input).await?;
        self.planned = Some(planned);
        Ok(())
    }

    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> Result<StageOutput> {
        let planned = self
            .planned
            .as_ref()
            .ok_or_else(|| Error::Internal("sql stage used before open".into()))?;
        *planned.slot.batch.lock().expect("slot lock") = Some(batch);
        let batches = collect(planned.plan.clone(), planned.task.clone())
            .await
            .map_err(|e| Error::Function {
                class: ErrorClass::Permanent,
                message: clean(&e),
            })?;
        let out = match batches.len() {
            0 => RecordBatch::new_empty(self.output.clone()),
            1 => batches.into_iter().next().expect("one batch"),
            _ => concat_batches(&self.output, &batches)
                .map_err(|e| Error::arrow("joining query output", e))?,
        };
        Ok(StageOutput::ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn input() -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("kind", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(StringArray::from(vec!["play", "stop", "play", "seek"])),
            ],
        )
        .unwrap();
        (schema, batch)
    }

    fn ctx() -> StageContext {
        StageContext::detached("s")
    }

    #[tokio::test]
    async fn the_plan_is_reused_for_every_batch() {
        let (schema, batch) = input();
        let factory = SqlStageFactory::plan(
            "SELECT id * 10 AS id10, upper(kind) AS kind FROM input WHERE kind = 'play'",
            schema,
        )
        .await
        .unwrap();
        assert_eq!(factory.output_schema().field(0).name(), "id10");
        let mut stage = factory.create().unwrap();
        stage.open(&ctx()).await.unwrap();
        for _ in 0..3 {
            let out = stage
                .process_batch(batch.clone(), &ctx())
                .await
                .unwrap()
                .batch;
            assert_eq!(
                out.column(0).as_primitive::<Int64Type>().values(),
                &[10, 30]
            );
            assert_eq!(out.column(1).as_string::<i32>().value(0), "PLAY");
        }
    }

    #[tokio::test]
    async fn planning_errors_name_the_problem() {
        let (schema, _) = input();
        let e = SqlStageFactory::plan("SELECT nope FROM input", schema.clone())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = SqlStageFactory::plan("CREATE TABLE x (a INT)", schema)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.to_lowercase().contains("ddl"), "{e}");
    }

    #[tokio::test]
    async fn a_runtime_failure_fails_the_batch() {
        let (schema, batch) = input();
        let factory = SqlStageFactory::plan("SELECT CAST(kind AS BIGINT) AS n FROM input", schema)
            .await
            .unwrap();
        let mut stage = factory.create().unwrap();
        stage.open(&ctx()).await.unwrap();
        let e = stage.process_batch(batch, &ctx()).await.err().unwrap();
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(e.to_string().contains("play"), "{e}");
    }
}

/// `type: sql`, as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSpec {
    /// A SELECT over the table `input`, which holds the incoming batch.
    pub query: String,
}

#[async_trait]
impl sluice_engine::connector::StageSpec for SqlSpec {
    fn main_key(&self) -> &'static str {
        "query"
    }

    async fn plan(&self, _name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        Ok(Arc::new(
            SqlStageFactory::plan(&self.query, input.clone()).await?,
        ))
    }
}

/// Reads a `type: sql` stage (see [`sluice_engine::connector::StageEntry`]).
pub fn parse_stage(
    fields: &sluice_engine::config::Node,
    node: &sluice_engine::config::Node,
    path: &sluice_engine::config::Location,
    common: &[&str],
    problems: &mut sluice_engine::config::Problems,
) -> Option<Arc<dyn sluice_engine::connector::StageSpec>> {
    let spec: SqlSpec = sluice_engine::config::from_node(fields, path, common, problems)?;
    if spec.query.trim().is_empty() {
        problems.at_key(node, path, "query", "must not be empty");
        return None;
    }
    Some(Arc::new(spec))
}
