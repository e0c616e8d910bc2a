//! `stages:`: the fields every stage has (retries, bisecting, timeouts, concurrency, the
//! circuit breaker and its fallback), and each kind's.

use sluice_udfs::registry;

use super::*;

pub(super) const STAGE_COMMON: &[&str] = &[
    "name",
    "type",
    "retry",
    "bisect_on_error",
    "max_record_age",
    "timeout",
    "concurrency",
    "circuit_breaker",
    "fallback",
    "fallback_values",
    "input",
    "inputs",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StageCommon {
    /// A stable name: it labels metrics, errors and dead-lettered records.
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) _type: String,
    /// How transient failures are retried (default: 3 attempts, backoff 100ms doubling to
    /// 10s, with jitter).
    pub(super) retry: Option<RetryConfig>,
    /// Split a batch that fails (not transiently) in halves, down to single rows, so that
    /// only the failing rows become dead letters (default false).
    #[serde(default)]
    pub(super) bisect_on_error: bool,
    /// A record older than this (by `_timestamp`) is not retried but dead-lettered.
    pub(super) max_record_age: Option<Duration>,
    /// A call that takes longer fails as a transient error.
    pub(super) timeout: Option<Duration>,
    /// At most this many calls of the stage at once, across workers.
    pub(super) concurrency: Option<usize>,
    /// Stop calling the stage while its calls fail transiently too often.
    pub(super) circuit_breaker: Option<BreakerConfig>,
    /// While the circuit is open: `dead_letter` (default), `skip`, `default` (the output
    /// columns get `fallback_values`), or `pause` (stop reading until calls pass again).
    #[serde(default)]
    pub(super) fallback: FallbackKind,
    /// `fallback: default`: values of output columns, e.g. `{ score: 0.0, label: unknown }`.
    #[serde(default)]
    pub(super) fallback_values: serde_json::Map<String, serde_json::Value>,
    /// What it reads (read with their locations by `graph::parse_reads`).
    #[serde(default, rename = "input")]
    pub(super) _input: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "inputs")]
    pub(super) _inputs: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
pub(super) enum FallbackKind {
    #[default]
    DeadLetter,
    Skip,
    Default,
    Pause,
}

/// `circuit_breaker:` of a stage.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BreakerConfig {
    /// Open when at least this share of calls in `window` failed transiently (default 0.5).
    #[serde(default = "default_ratio")]
    pub(super) failure_ratio: f64,
    /// ... and at least this many calls were made in it (default 10).
    #[serde(default = "default_min_calls")]
    pub(super) min_calls: u32,
    /// The sliding window of calls counted (default 10s).
    #[serde(default = "default_window")]
    pub(super) window: Duration,
    /// How long the circuit stays open before trial calls (default 5s).
    #[serde(default = "default_open_for")]
    pub(super) open_for: Duration,
    /// Trial calls that must pass to close the circuit again (default 3).
    #[serde(default = "default_half_open")]
    pub(super) half_open_calls: u32,
}

pub(super) fn default_ratio() -> f64 {
    0.5
}
pub(super) fn default_min_calls() -> u32 {
    10
}
pub(super) fn default_window() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_open_for() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_half_open() -> u32 {
    3
}

/// `retry:` of a stage.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryConfig {
    /// Calls in all, the first included (1: no retries; default 3).
    #[serde(default = "default_attempts")]
    pub(super) max_attempts: u32,
    /// The first wait (default 100ms); each next one doubles, with jitter.
    #[serde(default = "default_initial_backoff")]
    pub(super) initial_backoff: Duration,
    /// The longest wait (default 10s).
    #[serde(default = "default_max_backoff")]
    pub(super) max_backoff: Duration,
    /// No retry starts later than this after the first failure (default: no limit).
    pub(super) max_elapsed: Option<Duration>,
}

pub(super) fn default_attempts() -> u32 {
    FailurePolicy::DEFAULT_MAX_ATTEMPTS
}
pub(super) fn default_initial_backoff() -> Duration {
    Duration(FailurePolicy::DEFAULT_INITIAL_BACKOFF)
}
pub(super) fn default_max_backoff() -> Duration {
    Duration(FailurePolicy::DEFAULT_MAX_BACKOFF)
}

impl StageCommon {
    pub(super) fn policy(
        &self,
        node: &Node,
        path: &Location,
        problems: &mut Problems,
    ) -> FailurePolicy {
        let mut policy = FailurePolicy {
            bisect_on_error: self.bisect_on_error,
            max_record_age: self.max_record_age.map(|d| d.get()),
            timeout: self.timeout.map(|d| d.get()),
            concurrency: self
                .concurrency
                .map(|n| std::sync::Arc::new(tokio::sync::Semaphore::new(n))),
            ..FailurePolicy::default()
        };
        if let Some(b) = &self.circuit_breaker {
            if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
                problems.at_key(
                    node,
                    path,
                    "circuit_breaker",
                    "failure_ratio must be above 0 and at most 1",
                );
            }
            if b.min_calls == 0 || b.half_open_calls == 0 {
                problems.at_key(
                    node,
                    path,
                    "circuit_breaker",
                    "min_calls and half_open_calls must be at least 1",
                );
            }
            policy.breaker = Some(std::sync::Arc::new(Breaker::new(BreakerPolicy {
                failure_ratio: b.failure_ratio,
                min_calls: b.min_calls,
                window: b.window.get(),
                open_for: b.open_for.get(),
                half_open_calls: b.half_open_calls,
            })));
        }
        policy.fallback = match self.fallback {
            FallbackKind::DeadLetter => Fallback::DeadLetter,
            FallbackKind::Skip => Fallback::Skip,
            FallbackKind::Pause => Fallback::Pause,
            FallbackKind::Default => Fallback::Default(self.fallback_values.clone()),
        };
        if self.fallback != FallbackKind::Default && !self.fallback_values.is_empty() {
            problems.at_key(
                node,
                path,
                "fallback_values",
                "only used with `fallback: default`",
            );
        }
        if self.fallback != FallbackKind::DeadLetter && self.circuit_breaker.is_none() {
            problems.at_key(
                node,
                path,
                "fallback",
                "a fallback applies while the circuit is open: add `circuit_breaker`",
            );
        }
        if self.concurrency == Some(0) {
            problems.at_key(node, path, "concurrency", "must be at least 1");
        }
        if let Some(r) = &self.retry {
            if r.max_attempts == 0 {
                problems.at_key(
                    node,
                    path,
                    "retry",
                    "max_attempts must be at least 1 (1: no retries)",
                );
            }
            if r.initial_backoff.get() > r.max_backoff.get() {
                problems.at_key(
                    node,
                    path,
                    "retry",
                    "initial_backoff is longer than max_backoff",
                );
            }
            policy.max_attempts = r.max_attempts;
            policy.initial_backoff = r.initial_backoff.get();
            policy.max_backoff = r.max_backoff.get();
            policy.max_elapsed = r.max_elapsed.map(|d| d.get());
        }
        policy
    }
}

/// The stages as written (a route already its branches' stages, `ROUTE.BRANCH`), the
/// entries of `stages:` in order, and the routes. `None` when one could not be read.
pub(super) type ParsedStages = (Vec<StageConfig>, Vec<Entry>, Vec<RouteEntry>);

pub(super) fn parse_stages(node: Option<&Node>, problems: &mut Problems) -> Option<ParsedStages> {
    let Some(node) = node else {
        return Some(Default::default());
    };
    let path = Location::new("stages");
    let items = match &node.value {
        Value::Seq(items) => items,
        _ if node.is_null() => return Some(Default::default()),
        _ => {
            problems.at(
                &path,
                node,
                format!("expected a list of stages, found {}", node.describe()),
            );
            return None;
        }
    };
    let mut written: Vec<StageConfig> = Vec::with_capacity(items.len());
    let mut complete = true;
    for (i, item) in items.iter().enumerate() {
        match parse_stage(item, &path.index(i), problems) {
            Some(stage) => written.push(stage),
            None => complete = false,
        }
    }
    for (i, stage) in written.iter().enumerate() {
        let name = &stage.name;
        if !sluice_engine::config::valid_name(name) {
            stage.at.problem(
                problems,
                "name",
                format!("`{name}` is not a valid stage name: use letters, digits, _ and -"),
            );
        } else if name == graph::SOURCE || name == SINK_NAME {
            stage.at.problem(
                problems,
                "name",
                format!("`{name}` is a reserved name (`source` is read as the pipeline's source in `input:`, `sink` names the rows an output refused in the dead letters); name the stage otherwise"),
            );
        }
        if let Some(first) = written[..i].iter().find(|s| s.name == *name) {
            stage.at.problem(
                problems,
                "name",
                format!(
                    "the stage name `{name}` is already used by {} (line {})",
                    first.at.path, first.at.node.mark.line
                ),
            );
        }
    }
    if !complete {
        return None;
    }
    // A route becomes its own stage (the predicates, evaluated once) and a stage per
    // branch reading it, in the route's place.
    let (mut stages, mut entries, mut routes) = (Vec::new(), Vec::new(), Vec::new());
    for stage in written {
        let Some(route) = (stage.spec.as_ref() as &dyn std::any::Any)
            .downcast_ref::<sluice_udfs::route::RouteSpec>()
        else {
            entries.push(Entry::Stage(stages.len()));
            stages.push(stage);
            continue;
        };
        let branch_specs = route.branches();
        let at = stage.at.clone();
        let name = stage.name.clone();
        let route_stage = stages.len();
        stages.push(stage);
        let mut branches = Vec::new();
        for (branch, spec) in branch_specs {
            branches.push(branch.clone());
            stages.push(StageConfig {
                name: format!("{name}.{branch}"),
                kind: "route",
                spec,
                policy: FailurePolicy::default(),
                reads: None,
                inputs: vec![sluice_engine::graph::Input::Stage(route_stage)],
                at: at.clone(),
            });
        }
        entries.push(Entry::Route(routes.len()));
        routes.push(RouteEntry {
            name,
            stage: route_stage,
            branches,
            at,
        });
    }
    Some((stages, entries, routes))
}

pub(super) fn parse_stage(
    node: &Node,
    path: &Location,
    problems: &mut Problems,
) -> Option<StageConfig> {
    let (entry, node) = split_kind_in(node, path, registry::STAGES, problems)?;
    let common = select_keys(node, STAGE_COMMON, true);
    let rest = select_keys(node, STAGE_COMMON, false);
    let common: Option<StageCommon> = from_node(&common, path, &[], problems);
    let spec = (entry.parse)(&rest, node, path, STAGE_COMMON, problems);
    let reads = graph::parse_reads(node, path, problems);
    let common = common?;
    let policy = common.policy(node, path, problems);
    Some(StageConfig {
        name: common.name,
        kind: entry.name,
        spec: spec?,
        policy,
        reads,
        inputs: Vec::new(),
        at: At {
            node: node.clone(),
            path: path.clone(),
        },
    })
}
