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
//! Stages and sinks read a branch as `input: split.big`. A route is planned as one filter
//! per branch (`SELECT * FROM input WHERE ...`), each a stage of its own named
//! `ROUTE.BRANCH` in metrics, errors and dead letters; the branches share the route's
//! input batch (nothing is copied to route it). A predicate that is NULL for a row does not
//! match; `default` takes the rows no predicate matched, so every row of the route's input
//! is in at least one branch unless `unmatched: drop` says otherwise.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use sluice_engine::config::{Location, Node, Problems, Value};
use sluice_engine::connector::StageSpec;
use sluice_engine::stage::StageFactory;
use sluice_engine::{Error, Result};

use crate::sql::SqlStageFactory;

/// The branch that takes the rows no route matched.
pub const DEFAULT_BRANCH: &str = "default";

/// `type: route`, as written.
pub struct RouteSpec {
    /// Each branch's name and predicate, in the order written.
    pub routes: Vec<(String, String)>,
    /// Rows that match no route are dropped instead of going to `default`.
    pub drop_unmatched: bool,
}

impl RouteSpec {
    /// The branches to plan, each with its filter: the routes, then `default` (unless
    /// unmatched rows are dropped).
    pub fn branches(&self) -> Vec<(String, Arc<dyn StageSpec>)> {
        let mut out: Vec<(String, Arc<dyn StageSpec>)> = self
            .routes
            .iter()
            .map(|(name, predicate)| {
                let spec = BranchSpec {
                    filter: format!("({predicate})"),
                };
                (name.clone(), Arc::new(spec) as Arc<dyn StageSpec>)
            })
            .collect();
        if !self.drop_unmatched {
            let any = self
                .routes
                .iter()
                .map(|(_, p)| format!("COALESCE(({p}), false)"))
                .collect::<Vec<_>>()
                .join(" OR ");
            let spec = BranchSpec {
                filter: format!("NOT ({any})"),
            };
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

    async fn plan(&self, name: &str, _input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        Err(Error::Plan(format!(
            "the route `{name}` is planned as its branches, not as one stage"
        )))
    }
}

/// One branch of a route: the rows of the route's input that match its filter.
struct BranchSpec {
    filter: String,
}

#[async_trait]
impl StageSpec for BranchSpec {
    fn main_key(&self) -> &'static str {
        "routes"
    }

    async fn plan(&self, name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let query = format!(
            "SELECT * FROM {} WHERE {}",
            crate::sql::INPUT_TABLE,
            self.filter
        );
        let factory = SqlStageFactory::plan(&query, input.clone())
            .await
            .map_err(|e| Error::Plan(format!("branch `{name}`: {e}")))?;
        Ok(Arc::new(factory))
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

    #[test]
    fn the_default_branch_takes_what_no_route_matched() {
        let spec = RouteSpec {
            routes: vec![
                ("big".into(), "a > 1".into()),
                ("eu".into(), "c = 'DE'".into()),
            ],
            drop_unmatched: false,
        };
        let names: Vec<String> = spec.branches().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["big", "eu", "default"]);
        let dropped = RouteSpec {
            drop_unmatched: true,
            ..spec
        };
        assert_eq!(dropped.branches().len(), 2);
    }
}
