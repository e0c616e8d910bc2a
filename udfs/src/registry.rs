//! Every stage kind, by the `type:` that names it (functions have a table of their own in
//! [`crate::functions`]). A new kind is a configuration type implementing `StageSpec`
//! (`sluice_engine::connector`) and one line here.

use sluice_engine::connector::StageEntry;

use crate::{aggregate, functions, route, sql};

pub static STAGES: &[StageEntry] = &[
    StageEntry {
        name: "sql",
        summary: "a SELECT over each batch (DataFusion SQL)",
        parse: sql::parse_stage,
    },
    StageEntry {
        name: "function",
        summary: "a registered function called on each batch, with its `params`",
        parse: functions::parse_stage,
    },
    StageEntry {
        name: "aggregate",
        summary: "keyed windows in event time, emitted when the watermark passes their end",
        parse: aggregate::parse_stage,
    },
    StageEntry {
        name: "route",
        summary: "sends each row to the branches whose SQL predicates it matches (`ROUTE.BRANCH`)",
        parse: route::parse_stage,
    },
];
