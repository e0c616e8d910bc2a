//! A YAML document as a tree of [`Node`]s that remember where they came from.
//!
//! Every node carries the line and column it started at, so that any problem found later —
//! by serde, by validation, or while planning a SQL query — can point at the text the user
//! wrote. Environment variables (`${VAR}`, `${VAR:-default}`) are substituted in scalars
//! while the tree is built; the location of the scalar is kept.
//!
//! Aliases are resolved by copying the anchored node. Tags are ignored. Only the first
//! document of a stream is read; a pipeline file holds one pipeline.
//!
//! # Limits
//! The tree is walked by recursion later (serde, validation, dropping it), and aliases
//! copy nodes, so a file is held to [`MAX_DEPTH`] levels of nesting and to [`MAX_NODES`]
//! nodes after aliases are expanded (a "billion laughs" file of nested aliases would
//! otherwise take all memory). Either is reported where it is exceeded and ends parsing.

use std::collections::HashMap;
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::{Location, Problems};

/// A place in a YAML file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<saphyr_parser::Marker> for Mark {
    fn from(m: saphyr_parser::Marker) -> Self {
        Mark {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// One value of the document with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub mark: Mark,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar's text after interpolation. `plain` scalars are typed by the YAML 1.2 core
    /// schema (`true`, `12`, `null`); quoted and block scalars are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order. Keys are scalars (complex keys are rejected).
    Map(Vec<(Node, Node)>),
}

/// How a plain scalar reads under the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Plain<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Node {
    pub fn scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Reads a scalar the way YAML's core schema types it.
    pub fn typed(&self) -> Option<Plain<'_>> {
        match &self.value {
            Value::Scalar { text, plain: false } => Some(Plain::Str(text)),
            Value::Scalar { text, plain: true } => Some(resolve_plain(text)),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.typed(), Some(Plain::Null))
    }

    /// The value under `key` when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A word for error messages: "a mapping", "a list", "`abc`".
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Scalar { text, .. } if text.is_empty() => "an empty value".to_string(),
            Value::Scalar { text, .. } => format!("`{text}`"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    /// Converts the node to JSON, typing plain scalars by the core schema.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Scalar { .. } => match self.typed().expect("scalar") {
                Plain::Null => J::Null,
                Plain::Bool(b) => J::Bool(b),
                Plain::Int(i) => i64::try_from(i)
                    .map(J::from)
                    .or_else(|_| u64::try_from(i).map(J::from))
                    .unwrap_or_else(|_| J::from(i as f64)),
                Plain::Float(f) => serde_json::Number::from_f64(f)
                    .map(J::Number)
                    .unwrap_or(J::Null),
                Plain::Str(s) => J::String(s.to_string()),
            },
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn resolve_plain(text: &str) -> Plain<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Plain::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Plain::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Plain::Float(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = text.parse::<i128>()
    {
        return Plain::Int(i);
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i128::from_str_radix(hex, 16)
    {
        return Plain::Int(i);
    }
    if let Some(oct) = text.strip_prefix("0o")
        && let Ok(i) = i128::from_str_radix(oct, 8)
    {
        return Plain::Int(i);
    }
    let looks_numeric = digits
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric && let Ok(f) = text.parse::<f64>() {
        return Plain::Float(f);
    }
    Plain::Str(text)
}

/// Where environment variables come from; tests pass a map instead of the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// The deepest nesting of sequences and mappings a pipeline file may have.
pub const MAX_DEPTH: usize = 64;
/// The most nodes a pipeline file may have once its aliases are expanded.
pub const MAX_NODES: usize = 1_000_000;

/// Parses the first document of `text`. Syntax errors end parsing (the rest of the document
/// cannot be trusted); interpolation errors are collected in `problems` and parsing goes on.
pub fn parse(text: &str, env: &dyn Env, problems: &mut Problems) -> Option<Node> {
    let mut builder = Builder {
        env,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        nodes: 0,
        over_limit: false,
    };
    for event in Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(ev) => ev,
            Err(err) => {
                problems.push_at(
                    Location::root(),
                    Mark::from(*err.marker()),
                    format!("invalid YAML: {}", err.info()),
                );
                return None;
            }
        };
        if builder.on_event(event, span, problems) {
            break;
        }
        if builder.over_limit {
            return None;
        }
    }
    match builder.root {
        Some(root) => Some(root),
        None => {
            problems.push_at(
                Location::root(),
                Mark { line: 1, column: 1 },
                "the file is empty: expected a pipeline mapping".to_string(),
            );
            None
        }
    }
}

enum Open {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
        /// The node count when the sequence started.
        first: usize,
    },
    Map {
        mark: Mark,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
        first: usize,
    },
}

struct Builder<'e> {
    env: &'e dyn Env,
    stack: Vec<Open>,
    /// Anchored nodes, with how many nodes each holds.
    anchors: HashMap<usize, (Node, usize)>,
    root: Option<Node>,
    /// Nodes made so far, aliases counted at their expanded size.
    nodes: usize,
    /// A limit was exceeded (and reported): the rest of the file is not read.
    over_limit: bool,
}

impl Builder<'_> {
    /// Returns true when the first document is complete.
    fn on_event(&mut self, event: Event<'_>, span: Span, problems: &mut Problems) -> bool {
        let mark = Mark::from(span.start);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let text = interpolate(&text, mark, self.env, problems);
                let node = Node {
                    mark,
                    value: Value::Scalar {
                        text,
                        plain: style == ScalarStyle::Plain,
                    },
                };
                self.nodes += 1;
                self.complete(node, anchor, 1, problems)
            }
            Event::Alias(id) => {
                let size = self.anchors.get(&id).map_or(0, |(_, size)| *size);
                if self.count(size, mark, problems) {
                    return false;
                }
                let node = match self.anchors.get(&id) {
                    Some((n, _)) => Node { mark, ..n.clone() },
                    None => {
                        problems.push_at(Location::root(), mark, "unknown alias".to_string());
                        Node {
                            mark,
                            value: Value::Scalar {
                                text: String::new(),
                                plain: true,
                            },
                        }
                    }
                };
                self.complete(node, 0, 0, problems)
            }
            Event::SequenceStart(anchor, _) => {
                if self.too_deep(mark, problems) {
                    return false;
                }
                self.nodes += 1;
                self.stack.push(Open::Seq {
                    mark,
                    anchor,
                    items: Vec::new(),
                    first: self.nodes - 1,
                });
                false
            }
            Event::MappingStart(anchor, _) => {
                if self.too_deep(mark, problems) {
                    return false;
                }
                self.nodes += 1;
                self.stack.push(Open::Map {
                    mark,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                    first: self.nodes - 1,
                });
                false
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, first) = match self.stack.pop() {
                    Some(Open::Seq {
                        mark,
                        anchor,
                        items,
                        first,
                    }) => (
                        Node {
                            mark,
                            value: Value::Seq(items),
                        },
                        anchor,
                        first,
                    ),
                    Some(Open::Map {
                        mark,
                        anchor,
                        entries,
                        first,
                        ..
                    }) => (
                        Node {
                            mark,
                            value: Value::Map(entries),
                        },
                        anchor,
                        first,
                    ),
                    None => return false,
                };
                let size = self.nodes - first;
                self.complete(node, anchor, size, problems)
            }
            Event::DocumentEnd => self.root.is_some(),
            _ => false,
        }
    }

    /// Reports nesting beyond [`MAX_DEPTH`]; true when it is.
    fn too_deep(&mut self, mark: Mark, problems: &mut Problems) -> bool {
        if self.stack.len() < MAX_DEPTH {
            return false;
        }
        problems.push_at(
            Location::root(),
            mark,
            format!("the file nests lists and mappings deeper than {MAX_DEPTH} levels (the limit)"),
        );
        self.over_limit = true;
        true
    }

    /// Counts `size` more nodes and reports going past [`MAX_NODES`]; true when it does.
    fn count(&mut self, size: usize, mark: Mark, problems: &mut Problems) -> bool {
        self.nodes = self.nodes.saturating_add(size);
        if self.nodes <= MAX_NODES {
            return false;
        }
        problems.push_at(
            Location::root(),
            mark,
            format!("aliases expand the file to more than {MAX_NODES} values (the limit)"),
        );
        self.over_limit = true;
        true
    }

    /// Adds a finished node (of `size` nodes) to what is open.
    fn complete(
        &mut self,
        node: Node,
        anchor: usize,
        size: usize,
        problems: &mut Problems,
    ) -> bool {
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                true
            }
            Some(Open::Seq { items, .. }) => {
                items.push(node);
                false
            }
            Some(Open::Map { entries, key, .. }) => {
                match key.take() {
                    None => {
                        if node.scalar().is_none() {
                            problems.push_at(
                                Location::root(),
                                node.mark,
                                "mapping keys must be plain words, not lists or mappings"
                                    .to_string(),
                            );
                        } else if let Some((first, _)) =
                            entries.iter().find(|(k, _)| k.scalar() == node.scalar())
                        {
                            problems.push_at(
                                Location::root(),
                                node.mark,
                                format!(
                                    "duplicate key `{}` (first at line {})",
                                    node.scalar().unwrap_or_default(),
                                    first.mark.line
                                ),
                            );
                        }
                        *key = Some(node);
                    }
                    Some(k) => entries.push((k, node)),
                }
                false
            }
        }
    }
}

/// Substitutes `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
fn interpolate(text: &str, mark: Mark, env: &dyn Env, problems: &mut Problems) -> String {
    if !text.contains('$') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                problems.push_at(
                    Location::root(),
                    mark,
                    format!(
                        "unclosed `${{` in `{text}`: expected `${{NAME}}` or `${{NAME:-default}}`"
                    ),
                );
                out.push_str(&rest[pos..]);
                return out;
            };
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_name {
                problems.push_at(
                    Location::root(),
                    mark,
                    format!(
                        "`${{{expr}}}` is not a valid variable: names are letters, digits and _"
                    ),
                );
            } else {
                match (env.var(name), default) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => problems.push_at(
                        Location::root(),
                        mark,
                        format!(
                            "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                        ),
                    ),
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([("TOPIC".to_string(), "views".to_string())])
    }

    #[test]
    fn interpolates_with_defaults() {
        let mut p = Problems::new("x.yaml");
        let m = Mark::default();
        assert_eq!(interpolate("t-${TOPIC}", m, &env(), &mut p), "t-views");
        assert_eq!(interpolate("${NOPE:-out/x}", m, &env(), &mut p), "out/x");
        assert_eq!(interpolate("$$5 and $x", m, &env(), &mut p), "$5 and $x");
        assert!(p.is_empty());
        interpolate("${NOPE}", m, &env(), &mut p);
        assert_eq!(p.len(), 1);
        assert!(p.to_string().contains("NOPE is not set"), "{p}");
    }

    #[test]
    fn marks_are_one_based() {
        let mut p = Problems::new("x.yaml");
        let root = parse("a: 1\nb:\n  c: [x, 'y']\n", &env(), &mut p).unwrap();
        assert!(p.is_empty());
        let c = root.get("b").unwrap().get("c").unwrap();
        assert_eq!(c.mark, Mark { line: 3, column: 6 });
        let Value::Seq(items) = &c.value else {
            panic!()
        };
        assert_eq!(items[1].typed(), Some(Plain::Str("y")));
        assert_eq!(root.get("a").unwrap().typed(), Some(Plain::Int(1)));
    }

    #[test]
    fn core_schema() {
        assert_eq!(resolve_plain("~"), Plain::Null);
        assert_eq!(resolve_plain("-12"), Plain::Int(-12));
        assert_eq!(resolve_plain("1.5e3"), Plain::Float(1500.0));
        assert_eq!(resolve_plain("5s"), Plain::Str("5s"));
        assert_eq!(resolve_plain("1.2.3"), Plain::Str("1.2.3"));
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let mut p = Problems::new("x.yaml");
        parse("a: 1\na: 2\n", &env(), &mut p);
        assert!(
            p.to_string()
                .contains("duplicate key `a` (first at line 1)"),
            "{p}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_where_it_starts() {
        let mut p = Problems::new("x.yaml");
        let flow = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        assert!(parse(&flow, &env(), &mut p).is_none());
        assert!(p.to_string().contains("deeper than 64 levels"), "{p}");
        assert!(p.to_string().contains("x.yaml:1:67"), "{p}");
        // Past 255 levels of flow, the scanner stops first, with a located error too.
        let mut p = Problems::new("x.yaml");
        let flow = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&flow, &env(), &mut p).is_none());
        assert!(p.to_string().contains("recursion limit exceeded"), "{p}");

        let mut p = Problems::new("x.yaml");
        let block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse(&block, &env(), &mut p).is_none());
        assert!(p.to_string().contains("deeper than 64 levels"), "{p}");
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let mut p = Problems::new("x.yaml");
        assert!(parse(&text, &env(), &mut p).is_none());
        assert!(p.to_string().contains("more than 1000000 values"), "{p}");
        // Aliases that stay small are fine.
        let mut p = Problems::new("x.yaml");
        let node = parse("a: &x {k: 1}\nb: *x\n", &env(), &mut p).unwrap();
        assert!(p.is_empty(), "{p}");
        assert_eq!(node.get("b").unwrap().get("k").unwrap().scalar(), Some("1"));
    }

    /// Random bytes and damaged pipelines parse into a tree or into problems, never a
    /// panic or a stack overflow (`SLUICE_FUZZ_SECS`, default 2).
    #[test]
    fn random_yaml_parses_or_reports() {
        let secs: f64 = std::env::var("SLUICE_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0);
        let seed = std::env::var("SLUICE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("fuzzing the YAML parser for {secs}s, SLUICE_FUZZ_SEED={seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        const SEED_TEXT: &str = "name: q\nsource: { type: generator, count: 10 }\nstages:\n  - name: s\n    type: sql\n    query: SELECT * FROM input\nsink: &s { type: stdout }\nx: *s\ny: \"${A:-b}\"\nz: [1, {a: b}, !t c, |\n  block\n  ]\n";
        const TOKENS: &[&str] = &[
            "[",
            "]",
            "{",
            "}",
            ": ",
            "- ",
            "&a ",
            "*a",
            "!!",
            "${",
            "'",
            "\"",
            "\n  ",
            "? ",
            "---\n",
            "...\n",
            "#",
            "|",
            ">",
            "\t",
            "\u{feff}",
            "%YAML 1.2\n",
            ",",
        ];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        let mut runs = 0;
        while std::time::Instant::now() < deadline {
            let mut text = SEED_TEXT.to_string();
            for _ in 0..rng.usize(1..8) {
                let mut at = rng.usize(..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let token = TOKENS[rng.usize(..TOKENS.len())];
                let times = if rng.u8(..4) == 0 {
                    rng.usize(1..300)
                } else {
                    1
                };
                text.insert_str(at, &token.repeat(times));
                if rng.u8(..4) == 0 {
                    let cut = rng.usize(..=text.len());
                    if text.is_char_boundary(cut) {
                        text.truncate(cut);
                    }
                }
            }
            let outcome = std::panic::catch_unwind(|| {
                let mut p = Problems::new("x.yaml");
                parse(&text, &env(), &mut p);
            });
            assert!(outcome.is_ok(), "parsing panicked on {text:?}");
            runs += 1;
        }
        eprintln!("{runs} damaged files parsed");
    }
}
