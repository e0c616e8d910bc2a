//! `input:`/`inputs:` of stages and sinks: the pipeline as a graph.
//!
//! ```yaml
//! stages:
//!   - { name: plays, type: sql, query: ... }              # reads the source (first stage)
//!   - { name: per_title, type: aggregate, ... }           # reads `plays` (the one before)
//!   - { name: per_country, input: plays, type: aggregate, ... }
//! sinks:
//!   titles: { type: file, path: out/titles, input: per_title }
//!   countries: { type: kafka, topic: countries, input: per_country }
//! ```
//! A stage that names no input reads the stage before it (the first one, the source); the
//! `sink:` reads the last stage. So a pipeline that names no inputs is the chain it always
//! was. An input is `source`, a stage's name, or a route's branch (`split.big`). Every
//! mistake is reported at once with its line: an input that names nothing, stages that read
//! each other in a cycle, a stage or branch whose rows go nowhere, a `sinks:` entry that
//! nothing feeds. Stages are then put in an order where each comes after what it reads
//! (the order of the file where it can be).

use std::collections::HashMap;

use sluice_engine::graph::Input;
use sluice_udfs::route::DEFAULT_BRANCH;

use super::*;

/// The input that means the pipeline's source.
pub const SOURCE: &str = "source";

/// A name in `input:`/`inputs:`, with where it is written.
#[derive(Clone)]
pub struct Ref {
    pub name: String,
    pub node: Node,
}

/// Reads `input: NAME` or `inputs: [A, B]` of a stage or sink; `None` when it names none.
pub(super) fn parse_reads(
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) -> Option<Vec<Ref>> {
    let one = node.get("input");
    let many = node.get("inputs");
    if let (Some(_), Some(m)) = (one, many) {
        problems.at(
            &path.key("inputs"),
            m,
            "give `input` (one) or `inputs` (several), not both",
        );
    }
    let item = |n: &Node, at: Location, problems: &mut Problems| match n.scalar() {
        Some(name) if !name.is_empty() => Some(Ref {
            name: name.to_string(),
            node: n.clone(),
        }),
        _ => {
            problems.at(
                &at,
                n,
                format!(
                    "expected the name of a stage, a route's branch (`route.branch`) or `source`, found {}",
                    n.describe()
                ),
            );
            None
        }
    };
    if let Some(n) = one {
        return Some(item(n, path.key("input"), problems).into_iter().collect());
    }
    let n = many?;
    let Value::Seq(items) = &n.value else {
        problems.at(
            &path.key("inputs"),
            n,
            format!("expected a list of names, found {}", n.describe()),
        );
        return Some(Vec::new());
    };
    if items.is_empty() {
        problems.at(
            &path.key("inputs"),
            n,
            "reads nothing: name at least one input",
        );
    }
    Some(
        items
            .iter()
            .enumerate()
            .filter_map(|(i, x)| item(x, path.key("inputs").index(i), problems))
            .collect(),
    )
}

/// A route as written, before it became its branches' stages.
pub(super) struct RouteEntry {
    pub name: String,
    /// The stage that evaluates the predicates (named as the route; not an input anyone
    /// may name).
    pub stage: usize,
    /// Its branches' names (each a stage `ROUTE.BRANCH` reading the route's stage).
    pub branches: Vec<String>,
    pub at: At,
}

/// One entry of `stages:` in the order written: a stage (its index in the stages before
/// ordering) or a route (its index in the routes).
pub(super) enum Entry {
    Stage(usize),
    Route(usize),
}

/// Resolves what every stage and output reads, checks the graph, and returns the stages
/// in an order where each comes after what it reads, each with `inputs` set (indices in
/// that order); every output's `inputs` likewise. `None` when something is wrong (in
/// `problems`).
pub(super) fn resolve(
    mut stages: Vec<StageConfig>,
    entries: &[Entry],
    routes: &[RouteEntry],
    outputs: &mut [SinkConfig],
    problems: &mut Problems,
) -> Option<Vec<StageConfig>> {
    let before = problems.len();
    let mut names: HashMap<String, Input> = HashMap::new();
    names.insert(SOURCE.to_string(), Input::Source);
    for (i, s) in stages.iter().enumerate() {
        if !routes.iter().any(|r| r.stage == i) {
            names.insert(s.name.clone(), Input::Stage(i));
        }
    }
    let expected = std::iter::once(SOURCE)
        .chain(
            stages
                .iter()
                .enumerate()
                .filter(|(i, _)| !routes.iter().any(|r| r.stage == *i))
                .map(|(_, s)| s.name.as_str()),
        )
        .collect::<Vec<_>>()
        .join(", ");
    let lookup = |r: &Ref, problems: &mut Problems, path: &Location| -> Option<Input> {
        if let Some(input) = names.get(&r.name) {
            return Some(*input);
        }
        let message = match routes.iter().find(|x| x.name == r.name) {
            Some(route) => format!(
                "`{}` is a route: read one of its branches, {}",
                r.name,
                route
                    .branches
                    .iter()
                    .map(|b| format!("{}.{b}", route.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "`{}` is not a stage, a route's branch or `source`; expected one of {}",
                r.name, expected
            ),
        };
        problems.at(path, &r.node, message);
        None
    };
    // What the entry before each one is: the default input of a stage that names none.
    let previous = |k: usize, problems: &mut Problems, at: &At, what: &str| -> Option<Input> {
        match k.checked_sub(1).map(|p| &entries[p]) {
            None => Some(Input::Source),
            Some(Entry::Stage(i)) => Some(Input::Stage(*i)),
            Some(Entry::Route(r)) => {
                let route = &routes[*r];
                problems.at(
                    &at.path,
                    &at.node,
                    format!(
                        "{what} follows the route `{}`: say which branch it reads, e.g. `input: {}.{}`",
                        route.name, route.name, route.branches[0]
                    ),
                );
                None
            }
        }
    };
    let input_path = |at: &At| at.path.key("input");
    for (k, entry) in entries.iter().enumerate() {
        // A stage, or a route's own stage (its branches read it already).
        let i = match entry {
            Entry::Stage(i) => *i,
            Entry::Route(r) => routes[*r].stage,
        };
        let inputs: Vec<Input> = match stages[i].reads.clone() {
            Some(reads) => {
                let path = input_path(&stages[i].at);
                repeated(&reads, &path, problems);
                reads
                    .iter()
                    .filter_map(|r| lookup(r, problems, &path))
                    .collect()
            }
            None => {
                let at = stages[i].at.clone();
                previous(k, problems, &at, "this stage")
                    .into_iter()
                    .collect()
            }
        };
        stages[i].inputs = inputs;
    }
    let last = entries.len();
    for output in outputs.iter_mut() {
        output.inputs = match output.reads.clone() {
            Some(reads) => {
                let path = input_path(&output.at);
                repeated(&reads, &path, problems);
                reads
                    .iter()
                    .filter_map(|r| lookup(r, problems, &path))
                    .collect()
            }
            None => previous(last, problems, &output.at, "the sink")
                .into_iter()
                .collect(),
        };
    }
    check_dangling(&stages, routes, outputs, problems);
    if problems.len() > before {
        return None;
    }
    order(stages, outputs, problems)
}

/// An input named twice would take every row twice.
fn repeated(reads: &[Ref], path: &Location, problems: &mut Problems) {
    for (i, r) in reads.iter().enumerate() {
        if reads[..i].iter().any(|x| x.name == r.name) {
            problems.at(
                path,
                &r.node,
                format!("`{}` is named twice: its rows would be taken twice", r.name),
            );
        }
    }
}

/// Every stage's and branch's rows must go somewhere: a stage nothing reads is a mistake
/// (its work is lost), and so is a branch (its rows would vanish).
fn check_dangling(
    stages: &[StageConfig],
    routes: &[RouteEntry],
    outputs: &[SinkConfig],
    problems: &mut Problems,
) {
    let read = |i: usize| {
        stages.iter().any(|s| s.inputs.contains(&Input::Stage(i)))
            || outputs.iter().any(|o| o.inputs.contains(&Input::Stage(i)))
    };
    for (i, stage) in stages.iter().enumerate() {
        if read(i) {
            continue;
        }
        match stage.name.split_once('.') {
            Some((route, branch)) => {
                let Some(r) = routes.iter().find(|r| r.name == route) else {
                    continue;
                };
                if branch == DEFAULT_BRANCH {
                    r.at.problem(
                        problems,
                        "routes",
                        format!(
                            "rows that match no route go to `{}`, which nothing reads: read it (`input: {}`) or drop them with `unmatched: drop`",
                            stage.name, stage.name
                        ),
                    );
                } else {
                    let node = r.at.node.get("routes").and_then(|n| {
                        let Value::Map(entries) = &n.value else { return None };
                        entries.iter().find(|(k, _)| k.scalar() == Some(branch)).map(|(k, _)| k)
                    });
                    problems.at(
                        &r.at.path.key("routes").key(branch),
                        node.unwrap_or(&r.at.node),
                        format!(
                            "nothing reads the branch `{}`: its rows would go nowhere; give a stage or sink `input: {}`",
                            stage.name, stage.name
                        ),
                    );
                }
            }
            None => stage.at.problem(
                problems,
                "name",
                format!(
                    "nothing reads the stage `{}`: its rows would go nowhere; give a stage or sink `input: {}`, or remove it",
                    stage.name, stage.name
                ),
            ),
        }
    }
}

/// Orders the stages so that each comes after what it reads, the file's order kept where
/// it can be; renumbers every input. Stages that read each other in a cycle are reported.
fn order(
    stages: Vec<StageConfig>,
    outputs: &mut [SinkConfig],
    problems: &mut Problems,
) -> Option<Vec<StageConfig>> {
    let n = stages.len();
    let mut placed: Vec<Option<usize>> = vec![None; n];
    let mut order = Vec::with_capacity(n);
    loop {
        let ready = (0..n).find(|&i| {
            placed[i].is_none()
                && stages[i].inputs.iter().all(|x| match x {
                    Input::Source => true,
                    Input::Stage(j) => placed[*j].is_some(),
                })
        });
        let Some(i) = ready else { break };
        placed[i] = Some(order.len());
        order.push(i);
    }
    if order.len() < n {
        // Walk back from an unplaced stage along unplaced inputs until a stage repeats.
        let mut path = vec![(0..n).find(|&i| placed[i].is_none()).expect("one is left")];
        loop {
            let at = *path.last().expect("not empty");
            let next = stages[at]
                .inputs
                .iter()
                .find_map(|x| match x {
                    Input::Stage(j) if placed[*j].is_none() => Some(*j),
                    _ => None,
                })
                .expect("an unplaced stage reads an unplaced one");
            if let Some(start) = path.iter().position(|&p| p == next) {
                let cycle: Vec<&StageConfig> = path[start..].iter().map(|&i| &stages[i]).collect();
                let names: Vec<String> = cycle
                    .iter()
                    .map(|s| format!("`{}` (line {})", s.name, s.at.node.mark.line))
                    .collect();
                cycle[0].at.problem(
                    problems,
                    "input",
                    format!(
                        "stages read each other in a cycle: {} reads {} (each reads the next, the last the first); rows cannot flow in a circle",
                        names[0],
                        names[1..].iter().chain(std::iter::once(&names[0])).cloned().collect::<Vec<_>>().join(", which reads ")
                    ),
                );
                return None;
            }
            path.push(next);
        }
    }
    let renumber = |x: &Input| match x {
        Input::Source => Input::Source,
        Input::Stage(j) => Input::Stage(placed[*j].expect("placed")),
    };
    for output in outputs.iter_mut() {
        output.inputs = output.inputs.iter().map(renumber).collect();
    }
    let mut slots: Vec<Option<StageConfig>> = stages.into_iter().map(Some).collect();
    Some(
        order
            .iter()
            .map(|&i| {
                let mut s = slots[i].take().expect("each once");
                s.inputs = s.inputs.iter().map(renumber).collect();
                s
            })
            .collect(),
    )
}

/// The graph for a person, one line per stage and output with what it reads:
///
/// ```text
/// source (kafka)
///   plays (sql)  ← source
///   per_title (aggregate)  ← plays
/// output titles (file)  ← per_title
/// ```
pub fn describe(config: &PipelineConfig) -> String {
    let name = |x: &Input| match x {
        Input::Source => SOURCE.to_string(),
        Input::Stage(j) => config.stages[*j].name.clone(),
    };
    let reads = |inputs: &[Input]| inputs.iter().map(name).collect::<Vec<_>>().join(", ");
    let width = config
        .stages
        .iter()
        .map(|s| s.name.len() + s.kind.len())
        .chain(
            config
                .outputs
                .iter()
                .map(|o| o.name.len() + o.kind.len() + 7),
        )
        .max()
        .unwrap_or(0)
        + 3;
    let mut out = format!("source ({})\n", config.source.kind);
    for s in &config.stages {
        let label = format!("{} ({})", s.name, s.kind);
        out.push_str(&format!("  {label:width$}  ← {}\n", reads(&s.inputs)));
    }
    for o in &config.outputs {
        let label = format!("output {} ({})", o.name, o.kind);
        out.push_str(&format!("{label:width$}    ← {}\n", reads(&o.inputs)));
    }
    out
}
