//! `extract`: pulls fields out of a text column with a regular expression's named groups.
//!
//! Each named group becomes a new text column. Matching reuses one set of capture
//! locations per stage instance and copies matched slices straight into Arrow builders:
//! nothing is allocated per row.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, ErrorClass, Result};

use super::{FunctionSpec, Params, assemble, extend_schema};

/// ```yaml
/// params:
///   column: user_agent
///   pattern: '^(?P<app>\w+)/(?P<app_version>[\d.]+)'
///   on_mismatch: fail
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extract {
    /// The text column to match.
    column: String,
    /// A regular expression (Rust `regex` syntax); each named group `(?P<name>…)` becomes a
    /// column.
    pattern: String,
    /// A row the pattern does not match: `null` gives nulls in the new columns (default),
    /// `fail` fails the row.
    #[serde(default)]
    on_mismatch: OnMismatch,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnMismatch {
    #[default]
    Null,
    Fail,
}

impl Params for Extract {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        match Regex::new(&self.pattern) {
            Err(e) => problems.at_key(
                node,
                path,
                "pattern",
                format!("not a valid regular expression: {e}"),
            ),
            Ok(re) if re.capture_names().flatten().next().is_none() => problems.at_key(
                node,
                path,
                "pattern",
                "has no named group: write (?P<name>...) for each field to extract",
            ),
            Ok(_) => {}
        }
    }
}

impl FunctionSpec for Extract {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let field = input.field_with_name(&self.column).map_err(|_| {
            Error::Plan(format!("the column `{}` is not in the input", self.column))
        })?;
        if !matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            return plan_err!(
                "the column `{}` is {}, not text",
                self.column,
                field.data_type()
            );
        }
        let regex = Regex::new(&self.pattern).map_err(|e| Error::Plan(e.to_string()))?;
        let groups: Vec<(usize, String)> = regex
            .capture_names()
            .enumerate()
            .filter_map(|(i, n)| n.map(|n| (i, n.to_string())))
            .collect();
        let new: Vec<(&str, DataType)> = groups
            .iter()
            .map(|(_, n)| (n.as_str(), DataType::Utf8))
            .collect();
        let output = extend_schema(input, &new)?;
        Ok(Arc::new(ExtractFactory {
            column: self.column.clone(),
            regex,
            groups,
            fail_on_mismatch: self.on_mismatch == OnMismatch::Fail,
            output,
        }))
    }
}

struct ExtractFactory {
    column: String,
    regex: Regex,
    groups: Vec<(usize, String)>,
    fail_on_mismatch: bool,
    output: SchemaRef,
}

impl StageFactory for ExtractFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(ExtractStage {
            locations: self.regex.capture_locations(),
            regex: self.regex.clone(),
            column: self.column.clone(),
            groups: self.groups.iter().map(|(i, _)| *i).collect(),
            fail_on_mismatch: self.fail_on_mismatch,
            output: self.output.clone(),
        }))
    }
}

struct ExtractStage {
    regex: Regex,
    locations: regex::CaptureLocations,
    column: String,
    groups: Vec<usize>,
    fail_on_mismatch: bool,
    output: SchemaRef,
}

#[async_trait]
impl Stage for ExtractStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> Result<StageOutput> {
        let column = batch
            .column_by_name(&self.column)
            .ok_or_else(|| Error::Internal(format!("column `{}` vanished", self.column)))?;
        let text =
            cast(column, &DataType::Utf8).map_err(|e| Error::arrow("reading the column", e))?;
        let text = text.as_string::<i32>();
        let n = text.len();
        let mut builders: Vec<StringBuilder> = self
            .groups
            .iter()
            .map(|_| StringBuilder::with_capacity(n, n * 8))
            .collect();
        let mut failed = Vec::new();
        for row in 0..n {
            let matched = text.is_valid(row)
                && self
                    .regex
                    .captures_read(&mut self.locations, text.value(row))
                    .is_some();
            if matched {
                let value = text.value(row);
                for (b, group) in builders.iter_mut().zip(&self.groups) {
                    match self.locations.get(*group) {
                        Some((start, end)) => b.append_value(&value[start..end]),
                        None => b.append_null(),
                    }
                }
            } else {
                builders.iter_mut().for_each(StringBuilder::append_null);
                if self.fail_on_mismatch {
                    failed.push(RowFailure {
                        row,
                        class: ErrorClass::Permanent,
                        reason: if text.is_valid(row) {
                            format!("`{}` does not match the pattern", self.column)
                        } else {
                            format!("`{}` is null", self.column)
                        },
                    });
                }
            }
        }
        let new: Vec<ArrayRef> = builders
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let out = assemble(&self.output, &batch, new, &failed)?;
        Ok(StageOutput { batch: out, failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{Field, Schema};

    #[tokio::test]
    async fn extracts_named_groups() {
        let schema = Arc::new(Schema::new(vec![Field::new("ua", DataType::Utf8, true)]));
        let spec = Extract {
            column: "ua".into(),
            pattern: r"^(?P<app>\w+)/(?P<ver>[\d.]+)".into(),
            on_mismatch: OnMismatch::Fail,
        };
        let mut stage = spec.plan(&schema).unwrap().create().unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec![
                Some("tvapp/4.2 (x)"),
                Some("junk"),
                None,
            ]))],
        )
        .unwrap();
        let ctx = StageContext::detached("x");
        let out = stage.process_batch(batch, &ctx).await.unwrap();
        assert_eq!(out.batch.num_rows(), 1);
        assert_eq!(out.batch.column(1).as_string::<i32>().value(0), "tvapp");
        assert_eq!(out.batch.column(2).as_string::<i32>().value(0), "4.2");
        assert_eq!(
            out.failed.iter().map(|f| f.row).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
