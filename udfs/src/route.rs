//! `type: route`: sends each row to every branch whose SQL predicate it matches, and the
//! rows that match none to the branch `default`.
//!
//! ```yaml
//! - name: split
//!   type: route
//!   routes:
//!     big: amount > 100
//!     eu: country IN ('DE', 'FR')
//!   # unmatched: drop      # rows that match no route are dropped (default: `split.default`)
//! ```
//! Stages and sinks read a branch as `input: split.big`. A route is planned as one stage
//! that evaluates every predicate once per row (`SELECT *, COALESCE(p, false) AS mask ...`,
//! named after the route) and one cheap stage per branch, `ROUTE.BRANCH`, that keeps the
//! rows of its mask (`filter_record_batch`, the masks dropped): a row's branches follow from
//! one evaluation, so a predicate that is not deterministic (`random()`, `now()`) cannot put
//! a row in no branch, and a predicate that fails a row fails it once, in the route. A
//! predicate that is NULL for a row does not match; `default` takes the rows no predicate
//! matched, so every row of the route's input is in at least one branch unless `unmatched:
//! drop` says otherwise. The branches share the route's columns (nothing is copied but the
//! rows each keeps).

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::boolean::{not, or};
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use sluice_engine::config::{Location, Node, Problems, Value};
use sluice_engine::connector::StageSpec;
use sluice_engine::stage::{Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, Result};

use crate::sql::SqlStageFactory;

/// The branch that takes the rows no route matched.
pub const DEFAULT_BRANCH: &str = "default";

/// The prefix of the mask columns the route stage adds (one per route, in order).
const MASK: &str = "__sluice_route_";

/// `type: route`, as written.
pub struct RouteSpec {
    /// Each branch's name and predicate, in the order written.
    pub routes: Vec<(String, String)>,
    /// Rows that match no route are dropped instead of going to `default`.
    pub drop_unmatched: bool,
}

impl RouteSpec {
    /// The branches to plan after the route stage, each a stage reading it: the routes,
    /// then `default` (unless unmatched rows are dropped).
    pub fn branches(&self) -> Vec<(String, Arc<dyn StageSpec>)> {
        let masks = self.routes.len();
        let mut out: Vec<(String, Arc<dyn StageSpec>)> = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let spec = BranchSpec {
                    masks,
                    keep: Some(i),
                };
                (name.clone(), Arc::new(spec) as Arc<dyn StageSpec>)
            })
            .collect();
        if !self.drop_unmatched {
            let spec = BranchSpec { masks, keep: None };
            out.push((DEFAULT_BRANCH.to_string(), Arc::new(spec)));
        }
        out
    }
}

#[async_trait]
impl StageSpec for RouteSpec {
    fn main_key(&self) -> &'static str {
        "routes"
    }

    /// Every input column, then each route's mask: its predicate, NULL read as false.
    async fn plan(&self, _name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let masks: Vec<String> = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("COALESCE(({p}), false) AS {MASK}{i}"))
            .collect();
        let query = format!(
            "SELECT *, {} FROM {}",
            masks.join(", "),
            crate::sql::INPUT_TABLE
        );
        let factory = SqlStageFactory::plan(&query, input.clone()).await?;
        Ok(Arc::new(factory))
    }
}

/// One branch of a route: the rows of the route stage whose mask `keep` is set (`None`:
/// those with no mask set), without the masks.
struct BranchSpec {
    masks: usize,
    keep: Option<usize>,
}

#[async_trait]
impl StageSpec for BranchSpec {
    fn main_key(&self) -> &'static str {
        "routes"
    }

    async fn plan(&self, name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let columns = input.fields().len();
        let first = columns
            .checked_sub(self.masks)
            .filter(|&f| (f..columns).all(|c| input.field(c).name().starts_with(MASK)));
        let Some(first) = first else {
            return Err(Error::Plan(format!(
                "branch `{name}` reads something other than its route"
            )));
        };
        let output = Arc::new(Schema::new(input.fields()[..first].to_vec()));
        Ok(Arc::new(Branch {
            output,
            first,
            masks: self.masks,
            keep: self.keep,
        }))
    }
}

/// A planned branch: the columns before the masks, the rows its mask keeps.
#[derive(Clone)]
struct Branch {
    output: SchemaRef,
    first: usize,
    masks: usize,
    keep: Option<usize>,
}

impl StageFactory for Branch {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait]
impl Stage for Branch {
    async fn process_batch(&mut self, batch: RecordBatch, _: &StageContext) -> Result<StageOutput> {
        let mask = |i: usize| batch.column(self.first + i).as_boolean();
        let keep = match self.keep {
            Some(i) => mask(i).clone(),
            None => {
                let mut any = mask(0).clone();
                for i in 1..self.masks {
                    any = or(&any, mask(i)).map_err(|e| Error::arrow("routing rows", e))?;
                }
                not(&any).map_err(|e| Error::arrow("routing rows", e))?
            }
        };
        let columns =
            RecordBatch::try_new(self.output.clone(), batch.columns()[..self.first].to_vec())
                .map_err(|e| Error::arrow("routing rows", e))?;
        let rows =
            filter_record_batch(&columns, &keep).map_err(|e| Error::arrow("routing rows", e))?;
        Ok(StageOutput::ok(rows))
    }
}

/// Reads a `type: route` stage (see [`sluice_engine::connector::StageEntry`]).
pub fn parse_stage(
    fields: &Node,
    node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<dyn StageSpec>> {
    let before = problems.len();
    sluice_engine::config::check_keys(
        fields,
        path,
        &[common, &["routes", "unmatched"]].concat(),
        problems,
    );
    let drop_unmatched = match fields.get("unmatched") {
        None => false,
        Some(n) if n.scalar() == Some("drop") => true,
        Some(n) if n.scalar() == Some(DEFAULT_BRANCH) => false,
        Some(n) => {
            problems.at(
                &path.key("unmatched"),
                n,
                format!(
                    "expected `default` (rows that match no route go to the branch `default`) or `drop`, found {}",
                    n.describe()
                ),
            );
            false
        }
    };
    let mut routes = Vec::new();
    match fields.get("routes").map(|n| (n, &n.value)) {
        Some((_, Value::Map(entries))) if !entries.is_empty() => {
            for (key, value) in entries {
                let name = key.scalar().unwrap_or_default();
                let at = path.key("routes").key(name);
                if name == DEFAULT_BRANCH {
                    problems.at(&at, key, "`default` is the branch of the rows that match no route; name this route otherwise");
                } else if !sluice_engine::config::valid_name(name) {
                    problems.at(
                        &at,
                        key,
                        format!("`{name}` is not a valid branch name: use letters, digits, _ and -"),
                    );
                }
                match value.scalar() {
                    Some(p) if !p.trim().is_empty() => routes.push((name.to_string(), p.to_string())),
                    _ => problems.at(
                        &at,
                        value,
                        format!("expected a SQL predicate such as `amount > 100`, found {}", value.describe()),
                    ),
                }
            }
        }
        Some((n, _)) => problems.at(
            &path.key("routes"),
            n,
            "expected branches with their SQL predicates, e.g. `routes: { big: amount > 100, eu: country = 'DE' }`",
        ),
        None => problems.at(
            path,
            node,
            "missing field `routes`: the branches with their SQL predicates, e.g. `routes: { big: amount > 100 }`",
        ),
    }
    (problems.len() == before).then(|| {
        Arc::new(RouteSpec {
            routes,
            drop_unmatched,
        }) as Arc<dyn StageSpec>
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    fn spec(drop_unmatched: bool) -> RouteSpec {
        RouteSpec {
            routes: vec![
                ("big".into(), "a > 1".into()),
                ("de".into(), "c = 'DE'".into()),
            ],
            drop_unmatched,
        }
    }

    #[test]
    fn the_default_branch_takes_what_no_route_matched() {
        let names: Vec<String> = spec(false).branches().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["big", "de", "default"]);
        assert_eq!(spec(true).branches().len(), 2);
    }

    /// Each predicate is evaluated once, by the route; each branch keeps its rows, a row
    /// in two branches when it matches two, NULL matching none.
    #[tokio::test]
    async fn every_row_lands_in_the_branches_it_matches() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("c", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![Some(5), Some(0), None, Some(2)])),
                Arc::new(StringArray::from(vec![
                    Some("DE"),
                    Some("FR"),
                    Some("US"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let ctx = StageContext::detached("split");
        let route = spec(false).plan("split", &schema).await.unwrap();
        let mut stage = route.create().unwrap();
        stage.open(&ctx).await.unwrap();
        let marked = stage.process_batch(batch, &ctx).await.unwrap().batch;
        let mut kept = Vec::new();
        for (_, branch) in spec(false).branches() {
            let factory = branch.plan("b", &marked.schema()).await.unwrap();
            assert_eq!(factory.output_schema(), schema);
            let mut b = factory.create().unwrap();
            let rows = b.process_batch(marked.clone(), &ctx).await.unwrap().batch;
            let a: Vec<Option<i64>> = rows
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .collect();
            kept.push(a);
        }
        assert_eq!(kept[0], [Some(5), Some(2)]);
        assert_eq!(kept[1], [Some(5)]);
        assert_eq!(kept[2], [Some(0), None]);
    }
}
