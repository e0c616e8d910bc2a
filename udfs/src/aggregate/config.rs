//! The stage as written (`type: aggregate`), checked, and planned against its input.

use super::*;

/// `type: aggregate`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Key columns (none: one group per window).
    #[serde(default)]
    group_by: Vec<String>,
    /// The event-time column (default `_timestamp`).
    #[serde(default = "default_event_time")]
    event_time: String,
    window: WindowConfig,
    /// How far behind the largest event time a row may be and still count (default 0s).
    #[serde(default = "zero")]
    allowed_lateness: Duration,
    /// A partition without data for this long does not hold the watermark back
    /// (default 30s).
    #[serde(default = "default_idle")]
    idle_timeout: Duration,
    /// How far ahead of this machine's clock an event time may be (default 1d). A row
    /// further ahead is a dead letter: taken, it would move its partition's watermark so
    /// far that every later row is late (a time in microseconds read as milliseconds).
    #[serde(default = "default_skew")]
    max_event_time_skew: Duration,
    aggregates: Aggregates,
    /// Per window, only the rows ranked highest by an aggregate.
    top: Option<TopConfig>,
    #[serde(default)]
    state: StateConfig,
}

/// `top: { by: bids, n: 1 }`: of each window's rows, those ranked 1 to `n` by the
/// aggregate `by`, largest first, ranked as SQL's `RANK()` does (tied rows share a rank, so
/// every row tied for the last place kept is kept too).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TopConfig {
    pub(super) by: String,
    #[serde(default = "one")]
    pub(super) n: usize,
}

pub(super) fn one() -> usize {
    1
}

pub(super) fn default_event_time() -> String {
    sluice_engine::batch::TIMESTAMP.to_string()
}
pub(super) fn zero() -> Duration {
    Duration::from_millis(0)
}
pub(super) fn default_idle() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_skew() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The longest window, slide, gap or lateness: with event times within years 0–9999, the
/// window arithmetic stays far from overflowing.
pub(super) const MAX_SPAN_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum WindowConfig {
    Tumbling(Duration),
    Sliding { size: Duration, slide: Duration },
    Session { gap: Duration },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateConfig {
    /// Memory for open windows across the stage's partitions (default 256MiB).
    #[serde(default = "default_memory")]
    pub(super) memory: ByteSize,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            memory: default_memory(),
        }
    }
}

pub(super) fn default_memory() -> ByteSize {
    ByteSize(256 << 20)
}

/// `aggregates:` — output name to `function(column)`, in the order written.
#[derive(Debug)]
pub(super) struct Aggregates(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Aggregates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Aggregates;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of output column to aggregate, e.g. `views: count()`")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Aggregates, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Aggregates(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An aggregate as written: `count()`, `sum(watch_seconds)`, `max_by(auction, price)`.
pub(super) struct Expression {
    pub(super) func: Func,
    pub(super) column: Option<String>,
    /// The second column of `max_by`/`min_by`.
    pub(super) by: Option<String>,
}

pub(super) fn parse_expression(text: &str) -> std::result::Result<Expression, String> {
    let t = text.trim();
    let (name, rest) = t.split_once('(').ok_or_else(|| {
        format!("`{t}` is not an aggregate: write `function(column)`, e.g. `sum(amount)`")
    })?;
    let args = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("`{t}`: missing `)`"))?
        .trim();
    let name = name.trim();
    let (arg, by) = match args.split_once(',') {
        Some((a, b)) => (a.trim(), Some(b.trim().to_string())),
        None => (args, None),
    };
    let column = (!arg.is_empty() && arg != "*").then(|| arg.to_string());
    let func = Func::parse(name, column.is_some()).ok_or_else(|| {
        format!(
            "unknown aggregate function `{name}`, expected one of {}",
            Func::NAMES.join(", ")
        )
    })?;
    let two = matches!(func, Func::MaxBy | Func::MinBy);
    if two && (column.is_none() || by.as_deref().is_none_or(str::is_empty)) {
        return Err(format!(
            "`{name}` needs two columns: `{name}(column, by)` keeps `column` of the row with the {} `by`",
            if func == Func::MaxBy {
                "largest"
            } else {
                "smallest"
            }
        ));
    }
    if !two && by.is_some() {
        return Err(format!("`{name}` takes one column: `{name}(column)`"));
    }
    if column.is_none() && func != Func::CountRows {
        return Err(format!("`{name}` needs a column: `{name}(column)`"));
    }
    Ok(Expression { func, column, by })
}

impl AggregateConfig {
    /// Reads the stage's keys (the common ones removed); problems are placed at them.
    pub fn parse(
        node: &Node,
        path: &Location,
        skip: &[&str],
        problems: &mut Problems,
    ) -> Option<Self> {
        let before = problems.len();
        let config: AggregateConfig = sluice_engine::config::from_node(node, path, skip, problems)?;
        let ms = |d: Duration| d.get().as_millis().min(i64::MAX as u128) as i64;
        let spans = match &config.window {
            WindowConfig::Tumbling(size) => vec![("window", *size)],
            WindowConfig::Sliding { size, slide } => vec![("window", *size), ("window", *slide)],
            WindowConfig::Session { gap } => vec![("window", *gap)],
        };
        for (key, span) in spans.into_iter().chain([
            ("allowed_lateness", config.allowed_lateness),
            ("max_event_time_skew", config.max_event_time_skew),
        ]) {
            if ms(span) > MAX_SPAN_MS {
                problems.at_key(node, path, key, format!("{span} is longer than 100 years"));
            }
        }
        match &config.window {
            WindowConfig::Tumbling(size) if ms(*size) <= 0 => {
                problems.at_key(node, path, "window", "the window size must be at least 1ms")
            }
            WindowConfig::Sliding { size, slide } => {
                if ms(*slide) <= 0 || ms(*size) < ms(*slide) {
                    problems.at_key(
                        node,
                        path,
                        "window",
                        "a sliding window needs 0 < slide <= size",
                    );
                } else if ms(*size) % ms(*slide) != 0 {
                    problems.at_key(
                        node,
                        path,
                        "window",
                        format!(
                            "the size ({size}) must be a multiple of the slide ({slide}), so every \
                             row falls in the same number of windows"
                        ),
                    );
                }
            }
            WindowConfig::Session { gap } if ms(*gap) <= 0 => {
                problems.at_key(node, path, "window", "the session gap must be at least 1ms")
            }
            _ => {}
        }
        if config.aggregates.0.is_empty() {
            problems.at_key(
                node,
                path,
                "aggregates",
                "name at least one aggregate, e.g. `events: count()`",
            );
        }
        for (name, text) in &config.aggregates.0 {
            if let Err(e) = parse_expression(text) {
                problems.at_key(node, path, "aggregates", format!("`{name}`: {e}"));
            }
        }
        if let Some(top) = &config.top {
            if top.n == 0 {
                problems.at_key(node, path, "top", "`n` must be at least 1");
            }
            if !config.aggregates.0.iter().any(|(name, _)| *name == top.by) {
                problems.at_key(
                    node,
                    path,
                    "top",
                    format!(
                        "`by: {}` must name one of the aggregates ({})",
                        top.by,
                        config
                            .aggregates
                            .0
                            .iter()
                            .map(|(n, _)| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            if matches!(config.window, WindowConfig::Session { .. }) {
                problems.at_key(
                    node,
                    path,
                    "top",
                    "`top` ranks the rows of a window; session windows are per key",
                );
            }
        }
        (problems.len() == before).then_some(config)
    }

    pub(super) fn window(&self) -> WindowKind {
        let ms = |d: Duration| d.get().as_millis() as i64;
        match self.window {
            WindowConfig::Tumbling(size) => WindowKind::Tumbling { size: ms(size) },
            WindowConfig::Sliding { size, slide } => WindowKind::Sliding {
                size: ms(size),
                slide: ms(slide),
            },
            WindowConfig::Session { gap } => WindowKind::Session { gap: ms(gap) },
        }
    }

    /// Plans the stage against its input schema; the error is a sentence for the user.
    pub fn plan(&self, stage: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        self.factory(stage, input).map(|f| Arc::new(f) as _)
    }

    pub(super) fn factory(&self, stage: &str, input: &SchemaRef) -> Result<AggregateFactory> {
        let column = |name: &str, what: &str| {
            input.index_of(name).map_err(|_| {
                Error::Plan(format!(
                    "{what} `{name}` is not a column of the stage's input; it has {}",
                    input
                        .fields()
                        .iter()
                        .map(|f| format!("`{}`", f.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let event_time = column(&self.event_time, "the event-time column")?;
        match input.field(event_time).data_type() {
            DataType::Timestamp(..) | DataType::Int64 => {}
            other => {
                return plan_err!(
                    "the event-time column `{}` is {other}; it must be a timestamp or Int64 \
                     milliseconds since the epoch",
                    self.event_time
                );
            }
        }
        let mut fields = Vec::new();
        let mut group_by = Vec::new();
        let mut sort_fields = Vec::new();
        for name in &self.group_by {
            let i = column(name, "the group_by column")?;
            let field = input.field(i);
            if !RowConverter::supports_fields(&[SortField::new(field.data_type().clone())]) {
                return plan_err!("cannot group by `{name}` of type {}", field.data_type());
            }
            group_by.push(i);
            sort_fields.push(SortField::new(field.data_type().clone()));
            fields.push(Field::new(name, field.data_type().clone(), true));
        }
        fields.push(Field::new("window_start", timestamp_type(), false));
        fields.push(Field::new("window_end", timestamp_type(), false));
        let mut aggs = Vec::new();
        for (name, text) in &self.aggregates.0 {
            let Expression {
                func,
                column: col,
                by,
            } = parse_expression(text).map_err(|e| Error::Plan(format!("`{name}`: {e}")))?;
            let read = |c: &String| {
                let i = column(c, &format!("`{name}` reads"))?;
                let ty = input.field(i).data_type();
                let kind = Kind::of(ty).ok_or_else(|| {
                    Error::Plan(format!("`{name}`: cannot aggregate `{c}` of type {ty}"))
                })?;
                Ok::<_, Error>((i, kind, ty.clone()))
            };
            let input_col = col.as_ref().map(read).transpose()?;
            if let (Some((_, Kind::Text, _)), Some(c)) = (&input_col, &col)
                && matches!(func, Func::Sum | Func::Avg)
            {
                return plan_err!("`{name}`: `{c}` is text; sum and avg need numbers");
            }
            let by = by.as_ref().map(read).transpose()?.map(|(i, k, _)| (i, k));
            let output = AggDef::output_type(func, input_col.as_ref().map(|(_, k, t)| (t, *k)));
            if fields.iter().any(|f| f.name() == name) {
                return plan_err!(
                    "the output column `{name}` is also a group_by column or window_start/window_end; \
                     choose another name"
                );
            }
            fields.push(Field::new(name, output.clone(), true));
            aggs.push(AggDef {
                name: name.clone(),
                func,
                input: input_col.map(|(i, k, _)| (i, k)),
                by,
                output,
            });
        }
        let converter = RowConverter::new(sort_fields)
            .map_err(|e| Error::arrow("ordering the group keys", e))?;
        let output: SchemaRef = Arc::new(Schema::new(fields));
        let plan = Plan {
            stage: stage.into(),
            group_by,
            converter,
            event_time,
            window: self.window(),
            lateness: self.allowed_lateness.get().as_millis() as i64,
            idle_timeout: self.idle_timeout.get().as_millis() as i64,
            max_skew: self.max_event_time_skew.get().as_millis() as i64,
            aggs,
            budget: self.state.memory.0 as usize,
            output,
        };
        Ok(AggregateFactory {
            shared: Arc::new(AggregateState::new(plan)),
            top: self.top.as_ref().map(|t| {
                let agg = self.aggregates.0.iter().position(|(n, _)| *n == t.by);
                (agg.expect("parse checked `top.by`"), t.n)
            }),
        })
    }
}

#[async_trait]
impl StageSpec for AggregateConfig {
    fn main_key(&self) -> &'static str {
        "aggregates"
    }

    async fn plan(&self, name: &str, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        AggregateConfig::plan(self, name, input)
    }
}

/// Reads a `type: aggregate` stage (see [`sluice_engine::connector::StageEntry`]).
pub fn parse_stage(
    fields: &Node,
    _node: &Node,
    path: &Location,
    common: &[&str],
    problems: &mut Problems,
) -> Option<Arc<dyn StageSpec>> {
    AggregateConfig::parse(fields, path, common, problems).map(|c| Arc::new(c) as _)
}
